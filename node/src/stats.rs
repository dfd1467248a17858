//! Counters every part of the node bumps and the HTTP metrics endpoint will read. Plain
//! atomics: cheap enough for the SIP hot path, and never a lock.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    pub requests_received: AtomicU64,
    pub responses_received: AtomicU64,
    pub responses_sent: AtomicU64,
    /// Unparseable or invalid messages answered with 400 or 505.
    pub malformed_answered: AtomicU64,
    /// Unparseable messages that could not be answered and were dropped.
    pub malformed_dropped: AtomicU64,
    pub keepalives: AtomicU64,
    pub connections_refused: AtomicU64,
    pub sends_dropped: AtomicU64,
    pub retransmissions_absorbed: AtomicU64,
    /// Requests refused by digest authentication (wrong, stale-invalid or replayed
    /// credentials, or not allowed for the account); plain challenges do not count.
    pub auth_failures: AtomicU64,
    pub registrations_ok: AtomicU64,
}

impl Stats {
    /// Whether the n-th malformed message deserves a log line: the first hundred, then one
    /// in a thousand, so a flood of garbage cannot flood the log.
    pub fn log_malformed(&self) -> bool {
        let n = self.malformed_answered.load(Ordering::Relaxed)
            + self.malformed_dropped.load(Ordering::Relaxed);
        n <= 100 || n.is_multiple_of(1000)
    }
}
