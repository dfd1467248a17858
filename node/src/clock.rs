//! Wall-clock time where it must be shared between nodes. Timers and timeouts go through
//! tokio's clock (`clippy.toml` bans `std::time::Instant`); this module is only for
//! absolute times that other nodes read: a binding's expiry, a nonce's issue time, the
//! "now" of the leader's expiry sweep, a provider lease's end.
//!
//! Those times are only as good as the clock that wrote them, and a clock that steps (a
//! VM resumed, NTP correcting a bad start, an operator) would make a leader sweep away
//! every binding it thinks lapsed, or an edge node write bindings that lapse at once.
//! So [`now_ms`] is the node's own clock plus a correction (node/DESIGN.md, "Clocks"):
//! - a **step** of more than [`STEP_MS`] against the monotonic clock is taken out at
//!   once, so the time a node hands out stays continuous;
//! - **the cluster's clock wins**: each ping answer from a full peer carries its Date, and
//!   once two peers have answered since the last step, the correction is the median of
//!   their offsets and ours (zero), so one node whose clock is wrong follows the other
//!   two, and a node whose clock was fixed follows them back. The correction moves only
//!   by more than [`STEP_MS`] (Date has whole seconds and an answer takes a moment), so
//!   the time does not wobble between pings, and offsets under it count as none.
//! - Without two peers (a standalone node, a pair) nothing says which clock is right, and
//!   a step is believed after [`TRUST_STEP_AFTER`].
//!
//! The pings travel on the SIP port, so someone who can read the traffic between two
//! nodes could forge their answers' Date; their random tokens stop anyone who cannot.

// The real monotonic clock, not tokio's: a step of the wall clock is measured against it,
// and tokio's clock stands still or leaps in tests with paused time.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A clock change larger than this is a step, and peers' offsets below it are noise.
pub const STEP_MS: i64 = 2_000;
/// How long a step is kept out while no two peers say which clock is right.
pub const TRUST_STEP_AFTER: Duration = Duration::from_secs(10);
/// A peer's offset older than this no longer counts.
const OFFSET_FRESH: Duration = Duration::from_secs(10);

/// Added to the system clock by [`now_ms`].
static CORRECTION_MS: AtomicI64 = AtomicI64::new(0);

#[derive(Default)]
struct State {
    /// The last reading: the system clock, and the monotonic clock at that moment.
    last: Option<(u64, Instant)>,
    /// When the last step was seen, if it is still taken out without peers' word.
    stepped_at: Option<Instant>,
    /// What the steps since the peers last decided added to the correction.
    held_ms: i64,
    /// Each peer's clock less ours (ms), measured since the last step, and when.
    offsets: HashMap<u64, (i64, Instant)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// The system clock in Unix milliseconds, uncorrected.
pub fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix time in milliseconds, as the cluster agrees on it (see the module doc). Binding
/// expiry is absolute and replicated, so every node must read it against the same clock.
pub fn now_ms() -> u64 {
    let mut guard = STATE.lock().expect("clock lock");
    // Both clocks read under the lock: a wait for it must not look like a step.
    let system = system_now_ms();
    let mono = Instant::now();
    let state = guard.get_or_insert_with(State::default);
    if let Some((before, at)) = state.last {
        let expected = before as i64 + mono.duration_since(at).as_millis() as i64;
        let step = system as i64 - expected;
        if step.abs() > STEP_MS {
            CORRECTION_MS.fetch_sub(step, Ordering::SeqCst);
            state.held_ms -= step;
            state.stepped_at = Some(mono);
            state.offsets.clear();
            tracing::warn!(
                step_ms = step,
                correction_ms = CORRECTION_MS.load(Ordering::SeqCst),
                "the system clock stepped; the step is taken out until the peers' clocks say which is right"
            );
        }
    }
    state.last = Some((system, mono));
    if state
        .stepped_at
        .is_some_and(|at| mono.duration_since(at) > TRUST_STEP_AFTER)
        && state.offsets.len() < 2
    {
        // Only the steps are undone; what the peers decided before them stands.
        CORRECTION_MS.fetch_sub(state.held_ms, Ordering::SeqCst);
        state.held_ms = 0;
        state.stepped_at = None;
        tracing::warn!("no two peers said otherwise: the stepped system clock is believed");
    }
    (system as i64 + CORRECTION_MS.load(Ordering::Relaxed)).max(0) as u64
}

/// The correction [`now_ms`] adds now (ms), for status and metrics.
pub fn correction_ms() -> i64 {
    CORRECTION_MS.load(Ordering::Relaxed)
}

/// A full peer's answer carried `date` (its Date header), received just now.
pub fn observe_peer(peer: u64, date: &str) {
    let Ok(at) = httpdate::parse_http_date(date) else {
        return;
    };
    let Ok(peer_secs) = at.duration_since(std::time::UNIX_EPOCH) else {
        return;
    };
    // Date truncates to the second: half a second is its middle.
    let peer_ms = peer_secs.as_millis() as i64 + 500;
    // Read through now_ms first, so a step since the last reading is seen before this
    // offset is stored against the stepped clock.
    let _ = now_ms();
    let system = system_now_ms() as i64;
    let mono = Instant::now();
    let mut guard = STATE.lock().expect("clock lock");
    let state = guard.get_or_insert_with(State::default);
    state.offsets.insert(peer, (peer_ms - system, mono));
    state
        .offsets
        .retain(|_, (_, at)| mono.duration_since(*at) < OFFSET_FRESH);
    if state.offsets.len() < 2 {
        return;
    }
    let mut all: Vec<i64> = state.offsets.values().map(|(o, _)| *o).collect();
    all.push(0);
    all.sort_unstable();
    // With an even count (four members and more), the lower middle.
    let median = all[(all.len() - 1) / 2];
    let wanted = if median.abs() < STEP_MS { 0 } else { median };
    state.stepped_at = None;
    state.held_ms = 0;
    // Each sample is off by up to a second or so (Date has whole seconds, the answer takes
    // a moment): the correction moves only for a difference larger than that, so the time
    // handed out does not wobble from one ping to the next.
    let current = CORRECTION_MS.load(Ordering::SeqCst);
    if wanted != current && (wanted == 0 || (wanted - current).abs() >= STEP_MS) {
        CORRECTION_MS.store(wanted, Ordering::SeqCst);
        tracing::warn!(
            correction_ms = wanted,
            "this node's clock differs from its peers': it follows theirs"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test for the whole module: the state is the process's.
    #[test]
    fn a_step_is_taken_out_and_the_peers_median_decides() {
        let real =
            |now: u64| httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(now));
        let before = now_ms();
        assert!(before.abs_diff(system_now_ms()) < 1_000);
        // Two peers agree with this clock: no correction.
        observe_peer(2, &real(system_now_ms()));
        observe_peer(3, &real(system_now_ms()));
        assert_eq!(correction_ms(), 0);
        // Two peers ten minutes ahead: the median is theirs.
        let ahead = system_now_ms() + 600_000;
        observe_peer(2, &real(ahead));
        observe_peer(3, &real(ahead));
        let c = correction_ms();
        assert!((599_000..=601_000).contains(&c), "{c}");
        // One peer far off, one with us: the median is ours.
        observe_peer(2, &real(system_now_ms() + 3_600_000));
        observe_peer(3, &real(system_now_ms()));
        assert_eq!(correction_ms(), 0);
    }
}
