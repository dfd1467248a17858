//! The UDP receive loop: one datagram is one message (RFC 3261 §18.1.1), or a STUN
//! keepalive answered here ([`super::stun`]). Each shard runs
//! one per socket, on its own runtime, and passes what it reads to the shard it belongs to.
//! Parse failures go to the core as [`InboundEvent::Malformed`] so that the answer (a 400,
//! or nothing) is decided in one place.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tandem_sip::Message;
use tokio::net::UdpSocket;

use super::{stamp_via, stun, Flow, Inbound, InboundEvent, ListenerContext, TransportKind};

/// Larger than any UDP payload, so nothing is ever truncated silently.
const RECV_BUFFER: usize = 65_536;

/// Receives on `socket`, a copy of a listening socket, registered with the runtime of
/// `shard`, the shard this loop runs on.
pub(super) async fn receive_loop(socket: std::net::UdpSocket, shard: usize, ctx: ListenerContext) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, shard, "cannot register a UDP socket; not receiving");
            return;
        }
    };
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "UDP socket has no local address; not receiving");
            return;
        }
    };
    let max = ctx.transports.limits().max_message_size;
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let received = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, remote) = match received {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors for earlier sends surface here on some platforms; keep going.
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        let datagram = &buf[..n];
        if stun::looks_like_stun(datagram) {
            if ctx.transports.screen_keepalive(remote.ip()) {
                if let Some(answer) = stun::binding_response(datagram, remote) {
                    ctx.transports
                        .stats()
                        .keepalives
                        .fetch_add(1, Ordering::Relaxed);
                    let _ = socket.try_send_to(&answer, remote);
                }
            }
            continue;
        }
        if datagram
            .iter()
            .all(|b| matches!(b, b'\r' | b'\n' | b' ' | b'\t' | 0))
        {
            // Keepalives some phones send over UDP; there is nothing to answer.
            ctx.transports
                .stats()
                .keepalives
                .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let flow = Flow {
            transport: TransportKind::Udp,
            local,
            remote,
            connection: None,
        };
        let raw = Bytes::copy_from_slice(datagram);
        let event = match Message::parse_datagram(raw.clone(), max) {
            Ok(message) if ctx.transports.limits().refuses_agent(&message) => {
                ctx.transports
                    .stats()
                    .scanners_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(message) if !ctx.transports.screen(&message, remote.ip()) => continue,
            Ok(mut message) => {
                stamp_via(&mut message, remote);
                InboundEvent::Message(Inbound { message, flow })
            }
            Err(error) => InboundEvent::Malformed { raw, flow, error },
        };
        if ctx.inbound.send(event, shard).await.is_err() {
            break;
        }
    }
}
