//! TCP and TLS: accept loops, and one task per connection that frames messages by
//! Content-Length, answers RFC 5626 CRLFCRLF pings with CRLF, writes whatever is queued for
//! the connection, and closes it when idle, when the peer closes, when framing fails
//! (after a stream error there is no way to find the next message boundary), or when a
//! write does not complete within the write timeout.
//!
//! Every packet is hostile here too: a connection is admitted only under the node-wide
//! and the per-address limits, counted from accept (so TLS handshakes in progress count),
//! and no write may wait for ever, or a peer that never reads would hold its slot, and
//! its task, until the node restarts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tandem_sip::{Frame, Message, StreamFramer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{stamp_via, Inbound, InboundEvent, ListenerContext, TransportKind};
use crate::Error;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a framing error, how long queued answers (the 400) get to go out before closing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Messages queued for one connection before further ones are dropped.
pub(super) const QUEUE_DEPTH: usize = 256;

/// Accepts on `listener` (non-blocking, made a tokio listener here, on this thread) and
/// runs each connection on the next SIP thread.
pub(super) async fn accept_loop(
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: ListenerContext,
    stop_accepting: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register a listener; not accepting");
            return;
        }
    };
    let kind = if tls.is_some() {
        TransportKind::Tls
    } else {
        TransportKind::Tcp
    };
    let Ok(local) = listener.local_addr() else {
        return;
    };
    loop {
        let accepted = tokio::select! {
            _ = stop_accepting.cancelled() => break,
            _ = ctx.stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(%local, transport = %kind, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admission = match ctx.transports.admit(remote) {
            Ok(a) => a,
            Err(why) => {
                ctx.transports
                    .stats()
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%remote, transport = %kind, "{why}; refusing connection");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx2 = ctx.clone();
        let tls = tls.clone();
        let runtime = ctx.shards.next().clone();
        // Moved as a std socket, to belong to the reactor of the thread it runs on.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "cannot hand a connection to a SIP thread");
                continue;
            }
        };
        ctx.tracker.spawn_on(
            async move {
                let _admission = admission;
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "cannot register a connection");
                        return;
                    }
                };
                match tls {
                    None => serve(stream, kind, local, remote, ctx2).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(s)) => serve(s, kind, local, remote, ctx2).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                        }
                    }
                }
            },
            &runtime,
        );
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    kind: TransportKind,
    local: SocketAddr,
    remote: SocketAddr,
    ctx: ListenerContext,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE_DEPTH);
    let Some(flow) = ctx.transports.register(kind, local, remote, tx) else {
        ctx.transports
            .stats()
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    tracing::debug!(%remote, transport = %kind, "connection opened");
    run_connection(stream, flow, rx, ctx).await;
}

/// One registered connection, accepted or opened by this node, until it closes.
pub(super) async fn run_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    flow: super::Flow,
    mut rx: mpsc::Receiver<Bytes>,
    ctx: ListenerContext,
) {
    let (kind, remote) = (flow.transport, flow.remote);
    let limits = ctx.transports.limits().clone();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(8192);
    let mut framer = StreamFramer::new(limits.max_message_size);
    let mut deadline = Instant::now() + limits.idle_timeout;
    let mut reading = true;
    loop {
        tokio::select! {
            _ = ctx.stop.cancelled() => break,
            _ = sleep_until(deadline) => {
                if reading {
                    tracing::debug!(%remote, transport = %kind, "closing idle connection");
                }
                break;
            }
            out = rx.recv() => {
                let Some(bytes) = out else { break };
                if !write_within(&mut writer, &bytes, limits.write_timeout, remote).await {
                    break;
                }
                if reading {
                    deadline = Instant::now() + limits.idle_timeout;
                }
            }
            r = reader.read_buf(&mut buf), if reading => {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => deadline = Instant::now() + limits.idle_timeout,
                }
                loop {
                    match framer.next(&buf) {
                        Ok(Frame::Incomplete) => break,
                        Ok(Frame::Skip(n)) => buf.advance(n),
                        Ok(Frame::Ping(n)) => {
                            buf.advance(n);
                            ctx.transports.stats().keepalives.fetch_add(1, Ordering::Relaxed);
                            if !write_within(&mut writer, b"\r\n", limits.write_timeout, remote).await {
                                reading = false;
                                deadline = Instant::now();
                                break;
                            }
                        }
                        Ok(Frame::Message(n)) => {
                            let raw = buf.split_to(n).freeze();
                            let event = match Message::parse_stream(raw.clone()) {
                                Ok(message) if limits.refuses_agent(&message) => {
                                    ctx.transports.stats().scanners_dropped.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                Ok(message) if !ctx.transports.screen(&message, remote.ip()) => continue,
                                Ok(mut message) => {
                                    stamp_via(&mut message, remote);
                                    InboundEvent::Message(Inbound { message, flow })
                                }
                                Err(error) => InboundEvent::Malformed { raw, flow, error },
                            };
                            if ctx.inbound.send(event, 0).await.is_err() {
                                reading = false;
                                break;
                            }
                        }
                        Err(error) => {
                            let raw = buf.split().freeze();
                            let _ = ctx.inbound.send(InboundEvent::Malformed { raw, flow, error }, 0).await;
                            reading = false;
                            deadline = Instant::now() + CLOSE_GRACE;
                            break;
                        }
                    }
                }
            }
        }
    }
    ctx.transports.unregister(&flow);
    let _ = tokio::time::timeout(limits.write_timeout, writer.shutdown()).await;
    tracing::debug!(%remote, transport = %kind, "connection closed");
}

/// Writes all of `bytes` unless the peer takes longer than `limit` to accept them; false
/// when the write failed or timed out, and the connection must close.
async fn write_within<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    limit: Duration,
    remote: SocketAddr,
) -> bool {
    match tokio::time::timeout(limit, writer.write_all(bytes)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::info!(%remote, "a write did not complete in {limit:?} (the peer stopped reading); closing the connection");
            false
        }
    }
}

/// Builds the TLS acceptor for the SIP listeners from PEM files.
pub fn load_tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, Error> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| Error::Io {
            context: format!("reading {}", p.display()),
            source,
        })
    };
    let certs = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no PEM certificate found",
            cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| Error::Tls(format!("{}: no PEM private key found", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
