//! The SIP stack: everything between the sockets and the agents, naming no agent.
//!
//! - [`transport`]: UDP, TCP and TLS sockets, flows, RFC 3581 and §18 response routing,
//!   and where a URI says to send.
//! - [`transaction`]: the RFC 3261 transaction machines (sans-IO) and the layer that
//!   runs them on tokio time.
//! - [`shard`]: the SIP threads, and the Call-ID hash that picks a message's thread.
//! - [`locate`]: RFC 3263 server location (which transport, address and port for a URI,
//!   in which order), sans-IO; [`resolve`] drives it with hickory-resolver.
//! - [`responses`]: what every response carries, and the one map from a parse or
//!   validation error to a status code.
//! - [`stats`]: the SIP counters `/metrics` reads.
//!
//! The stack ends at [`CoreEvent`]: a request matched to its server transaction, a
//! malformed message, or a response that matched nothing, handed to "the core" (RFC 3261's
//! transaction user). Which core that is, the stack does not know: in a node it is the
//! dispatcher and its agents (`crate::agents`), in the layer's tests the test itself.

pub mod locate;
pub mod resolve;
pub mod responses;
pub mod shard;
pub mod stats;
pub mod transaction;
pub mod transport;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use transaction::CoreEvent;
use transaction::{start_shards, LayerHandle, TimerSettings, CHANNEL_DEPTH};
use transport::{Inlet, Limits, Listeners, Transports};

use stats::Stats;

/// A started stack: the transports feeding one transaction layer shard per SIP thread.
pub struct SipStack {
    pub transports: Transports,
    pub layer: LayerHandle,
    /// What the agents handle, one channel per shard, in shard order: the dispatcher of
    /// shard `i` belongs on runtime `i`.
    pub core_events: Vec<mpsc::Receiver<CoreEvent>>,
}

/// Starts the transports on `listeners` and one transaction layer shard on each runtime of
/// `shards`, all tracked by `tracker` and stopped by `stop`; `stop_accepting` closes the
/// accept loops first during a graceful shutdown. The server passes the SIP threads; tests
/// pass their own runtime's handle, once or several times.
#[allow(clippy::too_many_arguments)]
pub fn start(
    listeners: Listeners,
    limits: Limits,
    stats: Arc<Stats>,
    settings: TimerSettings,
    shards: &[tokio::runtime::Handle],
    tracker: &TaskTracker,
    stop: CancellationToken,
    stop_accepting: CancellationToken,
) -> SipStack {
    assert!(
        (1..=shard::MAX_SHARDS).contains(&shards.len()),
        "between 1 and {} shards",
        shard::MAX_SHARDS
    );
    let (inbound, inbound_rx): (Vec<_>, Vec<_>) =
        shards.iter().map(|_| mpsc::channel(CHANNEL_DEPTH)).unzip();
    let transports = Transports::start(
        listeners,
        limits,
        stats,
        Inlet::new(inbound),
        shards,
        tracker,
        stop.clone(),
        stop_accepting,
    );
    let (layer, core_events) =
        start_shards(&transports, settings, inbound_rx, shards, tracker, &stop);
    SipStack {
        transports,
        layer,
        core_events,
    }
}
