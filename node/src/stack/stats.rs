//! Counters every part of the node bumps and the HTTP metrics endpoint will read. Plain
//! atomics: cheap enough for the SIP hot path, and never a lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Methods counted one by one on `/metrics`; any other is counted as `OTHER`.
pub const METHODS: [&str; 14] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "INFO",
    "UPDATE",
    "PRACK",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
];

/// A fixed array of counters (arrays of atomics have no `Default` beyond 32).
#[derive(Debug)]
pub struct Counters<const N: usize>(pub [AtomicU64; N]);

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Counters<N> {
    pub fn bump(&self, i: usize) {
        if let Some(c) = self.0.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub requests_received: AtomicU64,
    pub responses_received: AtomicU64,
    pub responses_sent: AtomicU64,
    /// Unparseable or invalid messages answered with 400 or 505.
    pub malformed_answered: AtomicU64,
    /// Unparseable messages that could not be answered and were dropped.
    pub malformed_dropped: AtomicU64,
    /// Keepalives received: CRLF pings, and STUN Binding requests answered.
    pub keepalives: AtomicU64,
    /// CRLFCRLF keepalives sent to UDP bindings this node is the edge of.
    pub keepalives_sent: AtomicU64,
    /// Connections refused by the node-wide or the per-address limit.
    pub connections_refused: AtomicU64,
    /// TCP and TLS connections open now (the connection table's size).
    pub connections_open: AtomicU64,
    /// Requests from known scanners (`sip.refused_user_agents`), dropped unanswered.
    pub scanners_dropped: AtomicU64,
    /// Source addresses the flood limit tracks, bans it started, and requests it dropped.
    pub flood_addresses: AtomicU64,
    pub flood_bans: AtomicU64,
    pub flood_dropped: AtomicU64,
    /// New requests refused with 503 because the transaction table was full.
    pub transactions_refused: AtomicU64,
    /// New calls refused because the calling account had `max_concurrent_calls` calls.
    pub call_limit_refusals: AtomicU64,
    pub sends_dropped: AtomicU64,
    /// SIP threads found stalled ([`crate::stack::shard::ShardThreads::watch`]).
    pub sip_thread_stalls: AtomicU64,
    pub retransmissions_absorbed: AtomicU64,
    /// Requests refused by digest authentication (wrong, stale-invalid or replayed
    /// credentials, or not allowed for the account); plain challenges do not count.
    pub auth_failures: AtomicU64,
    /// Keys in the authenticator's lockout tables (per address and account, per address)
    /// and nonces in its replay guard: the sizes of tables peers' input grows.
    pub auth_lockout_keys: AtomicU64,
    pub auth_address_keys: AtomicU64,
    pub auth_replay_nonces: AtomicU64,
    /// Logins the authenticator holds opened (HA1 decrypted), and how often a request's
    /// login was not among them, so its account was read from the store.
    pub auth_logins_opened: AtomicU64,
    pub auth_account_reads: AtomicU64,
    /// Requests received, by [`METHODS`] index (the last is every other method).
    pub requests_by_method: Counters<15>,
    /// Responses sent, by status code minus 100 (100 to 699).
    pub responses_by_status: Counters<600>,
}

impl Stats {
    pub fn count_request(&self, method: &str) {
        let i = METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(METHODS.len());
        self.requests_by_method.bump(i);
    }

    pub fn count_response(&self, status: u16) {
        if (100..700).contains(&status) {
            self.responses_by_status.bump(usize::from(status - 100));
        }
    }

    /// Whether the n-th malformed message deserves a log line: the first hundred, then one
    /// in a thousand, so a flood of garbage cannot flood the log.
    pub fn log_malformed(&self) -> bool {
        let n = self.malformed_answered.load(Ordering::Relaxed)
            + self.malformed_dropped.load(Ordering::Relaxed);
        n <= 100 || n.is_multiple_of(1000)
    }
}
