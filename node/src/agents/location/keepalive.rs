//! NAT keepalives for UDP bindings (the NAT rules, RFC 5626 §4.4 in spirit): a phone
//! behind NAT that registered over UDP stays reachable only while its NAT keeps the mapping,
//! so the node it registered through, its edge node, sends a CRLFCRLF datagram over the
//! binding's flow every `registrar.nat_keepalive_secs`. Only the edge node does: its flow is
//! the mapping, and every node pinging every contact would multiply the traffic for
//! nothing. Bindings are read and sent to in chunks spread over the interval, not in one
//! burst, so neither the traffic nor the memory of a round grows with it all at once.
//! Bindings held in the degraded-mode overlay count as this node's too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_raft_store::command::Binding;
use tandem_raft_store::types::NodeId;
use tokio_util::sync::CancellationToken;

use super::flow_of_stored;
use super::overlay::BindingOverlay;
use crate::clock::now_ms;
use crate::cluster::ClusterNode;
use crate::stack::stats::Stats;
use crate::stack::transport::{TransportKind, Transports};

/// Bindings pinged per chunk; chunks are spread over the interval.
const CHUNK: usize = 500;

/// Sends keepalives to this node's UDP bindings every `every` until `stop`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cluster: ClusterNode,
    overlay: Arc<BindingOverlay>,
    transports: Transports,
    stats: Arc<Stats>,
    me: NodeId,
    every: Duration,
    stop: CancellationToken,
) {
    let ping = Bytes::from_static(b"\r\n\r\n");
    let send = |bindings: &[Binding], now: u64| {
        let flows = bindings
            .iter()
            .filter(|b| b.expires_at_ms > now)
            .filter_map(|b| flow_of_stored(&b.flow))
            .filter(|f| f.transport == TransportKind::Udp);
        for flow in flows {
            if transports.send(&flow, ping.clone()).is_ok() {
                stats.keepalives_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    loop {
        let round = tokio::time::Instant::now();
        let reader = cluster.replica.reader();
        // Bindings registered while the node had no quorum are held in its overlay
        // (node/DESIGN.md, "Degraded mode"); their phones need keepalives all the same.
        let held = overlay.held_for_edge(me);
        let stored = reader.count_bindings_by_edge(me) as usize;
        let chunks = (stored + held.len()).div_ceil(CHUNK).max(1);
        let pause = every / u32::try_from(chunks).unwrap_or(u32::MAX);
        send(&held, now_ms());
        drop(held);
        // The stored ones page by page: a node with 100,000 bindings would otherwise hold
        // them all in memory at once, every round.
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (page, next) = match reader.bindings_by_edge_page(me, after.as_deref(), CHUNK) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read this node's bindings for keepalives");
                    break;
                }
            };
            send(&overlay.without_held(page), now_ms());
            let Some(next) = next else { break };
            after = Some(next);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(round + every) => {}
        }
    }
}
