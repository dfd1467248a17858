//! Where each AOR can be reached: the bindings the registrar writes and the proxy reads,
//! and the duties that keep them true.
//!
//! - [`overlay`]: binding writes held while this node has no quorum, replayed once it has
//!   one (node/DESIGN.md, "Degraded mode"), kept on disk by `journal`.
//! - [`refreshes`]: the Call-ID and CSeq of refreshes answered without a write (node/DESIGN.md,
//!   "Bindings are written when they change").
//! - [`keepalive`]: CRLFCRLF to the UDP phones this node is the edge node of.
//! - [`sweep`]: the leader's removal of lapsed bindings, in bounded batches.
//!
//! The overlay's replay and the sweep run on every node, the witness included (a witness
//! can lead), so [`spawn_duties`] does not need the SIP stack.

mod journal;
pub mod keepalive;
pub mod overlay;
pub mod refreshes;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use tandem_raft_store::command::StoredFlow;
use tandem_raft_store::replica::Replica;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::stack::transport::{ConnectionId, Flow, TransportKind};

use overlay::BindingOverlay;

/// How often the leader removes lapsed bindings, and at most how many per command, so a
/// sweep never becomes one huge write (dialplan/DESIGN.md, "Retention in bounded batches").
const SWEEP_EVERY: Duration = Duration::from_secs(10);
const SWEEP_BATCH: u32 = 1000;

/// Starts the overlay's replay and the binding sweep, on any node.
pub fn spawn_duties(
    replica: &Replica,
    overlay: &Arc<BindingOverlay>,
    quorum_timeout: Duration,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) {
    tracker.spawn(overlay::replay_when_healthy(
        overlay.clone(),
        replica.clone(),
        quorum_timeout,
        stop.clone(),
    ));
    // Whichever node leads (a witness too) removes lapsed bindings.
    tracker.spawn(sweep::sweep_bindings(
        replica.clone(),
        SWEEP_EVERY,
        SWEEP_BATCH,
        stop.clone(),
    ));
}

/// A binding's stored flow as the transport layer's, to send over.
pub fn flow_of_stored(f: &StoredFlow) -> Option<Flow> {
    let transport = match f.transport.as_str() {
        "UDP" => TransportKind::Udp,
        "TCP" => TransportKind::Tcp,
        "TLS" => TransportKind::Tls,
        _ => return None,
    };
    Some(Flow {
        transport,
        local: f.local.parse().ok()?,
        remote: f.remote.parse().ok()?,
        connection: f.connection.map(ConnectionId),
    })
}
