//! Which other nodes answer SIP right now. Every second each node sends an OPTIONS to every
//! other full node's SIP address, outside any transaction, and notes who answered. The
//! proxy asks [`PeerMonitor::is_up`] before sending a call through a binding's edge node
//! (node/DESIGN.md, "Edge nodes"): if the edge stopped answering, the call goes straight to
//! the binding's public address instead. Any answer counts, a draining node's 503 included:
//! the question is whether it can relay, not whether it takes new calls.
//!
//! Each answer's Date tells this node how far its clock is from the peer's
//! ([`crate::clock`]).
//!
//! An answer counts only from the address the peer was pinged at and only if its branch
//! carries one of the last two random tokens sent there: UDP sources are easily forged,
//! and a forged "200 OK" from a dead node's address would otherwise keep calls flowing
//! into it instead of straight to the phones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tandem_raft_store::command::NodeRecord;
use tandem_raft_store::types::NodeId;
use tandem_sip::{HeaderName, Message};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterNode;
use crate::stack::transport::{TransportKind, Transports};

/// How often each peer is asked.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A peer that has not answered for this long is down.
const DOWN_AFTER: Duration = Duration::from_millis(3500);
/// Branches of the pings start with this, so their answers can be recognised.
const PING_BRANCH: &str = "z9hG4bKtdmping.";

/// The last time each peer answered.
#[derive(Debug, Default)]
pub struct PeerMonitor {
    seen: Mutex<HashMap<NodeId, Instant>>,
    /// Where each peer was last pinged, and the tokens of its last two pings: only an
    /// answer from there, naming one of them, counts.
    pinged: Mutex<HashMap<NodeId, (SocketAddr, [u64; 2])>>,
}

/// A node's SIP address for `kind`, from its registry record (`udp:127.0.0.2:5060`).
pub fn sip_addr(record: &NodeRecord, kind: TransportKind) -> Option<SocketAddr> {
    let prefix = format!("{}:", kind.as_str().to_ascii_lowercase());
    record
        .sip_addrs
        .iter()
        .find_map(|a| a.strip_prefix(&prefix)?.parse().ok())
}

impl PeerMonitor {
    /// Whether `node` answered recently.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.seen
            .lock()
            .expect("peer table lock")
            .get(&node)
            .is_some_and(|t| t.elapsed() < DOWN_AFTER)
    }

    /// Every peer pinged so far, in id order, with whether it answered recently.
    pub fn peers(&self) -> Vec<(NodeId, bool)> {
        let mut ids: Vec<NodeId> = self
            .pinged
            .lock()
            .expect("peer table lock")
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids.into_iter().map(|id| (id, self.is_up(id))).collect()
    }

    /// Takes a response that matched no transaction, from `source`; true if it answered
    /// one of our pings.
    pub fn on_response(&self, response: &Message, source: SocketAddr) -> bool {
        let Ok(via) = response.top_via() else {
            return false;
        };
        let Some(rest) = via.branch().and_then(|b| b.strip_prefix(PING_BRANCH)) else {
            return false;
        };
        let mut parts = rest.split('.');
        let node = parts.next().and_then(|id| id.parse::<NodeId>().ok());
        let token = parts.next().and_then(|t| u64::from_str_radix(t, 16).ok());
        let (Some(node), Some(token)) = (node, token) else {
            return true;
        };
        let genuine = self
            .pinged
            .lock()
            .expect("peer table lock")
            .get(&node)
            .is_some_and(|(addr, tokens)| *addr == source && tokens.contains(&token));
        if !genuine {
            return true;
        }
        self.seen
            .lock()
            .expect("peer table lock")
            .insert(node, Instant::now());
        if let Ok(Some(date)) = response.header(&HeaderName::Date) {
            crate::clock::observe_peer(node, &date);
        }
        true
    }

    /// Pings every other full node until `stop`.
    pub async fn run(
        self: std::sync::Arc<Self>,
        cluster: ClusterNode,
        transports: Transports,
        me: NodeId,
        via_addr: SocketAddr,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            round += 1;
            use rand::Rng;
            let nodes = cluster.replica.reader().nodes().unwrap_or_default();
            for node in nodes.iter().filter(|n| n.id != me) {
                let Some(addr) = sip_addr(node, TransportKind::Udp) else {
                    continue;
                };
                let Ok(flow) = transports.flow_to(TransportKind::Udp, addr).await else {
                    continue;
                };
                let token: u64 = rand::thread_rng().gen();
                {
                    let mut pinged = self.pinged.lock().expect("peer table lock");
                    let entry = pinged.entry(node.id).or_insert((addr, [token; 2]));
                    // A new address starts afresh; otherwise the previous token stays
                    // good, for an answer still on its way.
                    let previous = if entry.0 == addr { entry.1[0] } else { token };
                    *entry = (addr, [token, previous]);
                }
                let ping = ping(node.id, round, token, via_addr, addr, me);
                let _ = transports.send(&flow, ping.to_bytes());
            }
        }
    }
}

fn ping(
    to: NodeId,
    round: u64,
    token: u64,
    via: SocketAddr,
    target: SocketAddr,
    me: NodeId,
) -> Message {
    let uri = tandem_sip::Uri::Sip(tandem_sip::SipUri::new(
        None,
        tandem_sip::Host::Ip(target.ip()),
        Some(target.port()),
    ));
    let mut m = Message::request(tandem_sip::Method::Options, uri);
    m.push_header(
        HeaderName::Via,
        format!("SIP/2.0/UDP {via};branch={PING_BRANCH}{to}.{token:x};rport"),
    );
    m.push_header(HeaderName::MaxForwards, "0");
    m.push_header(
        HeaderName::From,
        format!("<sip:node{me}@{via}>;tag=ping{me}"),
    );
    m.push_header(HeaderName::To, format!("<sip:{target}>"));
    m.push_header(HeaderName::CallId, format!("tandem-ping-{me}-{to}-{round}"));
    m.push_header(HeaderName::CSeq, format!("{round} OPTIONS"));
    m.push_header(HeaderName::ContentLength, "0");
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_peer_is_up_while_it_answers_pings() {
        let monitor = PeerMonitor::default();
        assert!(!monitor.is_up(2), "never heard from");
        let via: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        let request = ping(2, 7, 0xfeed, via, "127.0.0.2:5060".parse().unwrap(), 1);
        let answer = Message::response_to(&request, 200, "OK");
        let peer: SocketAddr = "127.0.0.2:5060".parse().unwrap();
        assert!(monitor.on_response(&answer, peer));
        assert!(!monitor.is_up(2), "never pinged there");
        monitor
            .pinged
            .lock()
            .unwrap()
            .insert(2, (peer, [0xbeef, 0xcafe]));
        assert!(monitor.on_response(&answer, peer));
        assert!(
            !monitor.is_up(2),
            "an answer to a ping never sent does not count"
        );
        monitor
            .pinged
            .lock()
            .unwrap()
            .insert(2, (peer, [0xbeef, 0xfeed]));
        assert!(monitor.on_response(&answer, "127.0.0.9:5060".parse().unwrap()));
        assert!(!monitor.is_up(2), "an answer from elsewhere does not count");
        assert!(monitor.on_response(&answer, peer));
        assert!(monitor.is_up(2));
        assert!(!monitor.is_up(3));
        tokio::time::advance(DOWN_AFTER).await;
        assert!(!monitor.is_up(2), "silent for too long");
        let other = Message::response_to(&plain(), 200, "OK");
        assert!(!monitor.on_response(&other, peer), "not a ping");
    }

    fn plain() -> Message {
        let text = "OPTIONS sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
                    From: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n";
        Message::parse_datagram(bytes::Bytes::from(text), 65535).unwrap()
    }
}
