//! Mutual TLS for the internal listener (raft-store/DESIGN.md, "The Raft network"): every
//! node presents a certificate from the cluster's private CA that names its node id, and
//! accepts a peer, in either direction, only if the peer's certificate comes from that
//! same CA, names a node id, and that id was not removed from the cluster. Server and
//! client configurations are built once from PEM files; the removed ids are asked of the
//! node's replica on every handshake, and no TLS session is resumed, so every connection
//! is a handshake that asks.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{ServerConfig, SignatureScheme};

use crate::certs::{node_id_of, NODE_ID_URI};
use crate::replica::Replica;
use crate::types::NodeId;
use crate::Error;

/// How long a node that just left the membership is still accepted on the cluster link:
/// long enough for a leader that removed itself to hear the change acknowledged.
pub const REMOVAL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The TLS configurations of one node on the internal listener.
#[derive(Clone)]
pub struct ClusterTls {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: ClientConfig,
    revocations: Arc<Revocations>,
    node_id: Option<NodeId>,
}

/// Which node ids the cluster removed, as this node's replica knows them. Until
/// [`ClusterTls::revoke_with`] is called (an offline `tandem cluster join` never does),
/// none is known to be removed.
#[derive(Default)]
struct Revocations {
    removed: OnceLock<Box<dyn Fn(NodeId) -> bool + Send + Sync>>,
}

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Revocations")
    }
}

impl Revocations {
    /// The node id `cert` names, if the cluster has not removed it.
    fn check(&self, cert: &CertificateDer<'_>) -> Result<NodeId, rustls::Error> {
        let id = node_id_of(cert).ok_or_else(|| {
            rustls::Error::General(format!(
                "the peer's certificate names no node id ({NODE_ID_URI}<id>); issue it \
                 again with `tandem cert node --id`"
            ))
        })?;
        if self.removed.get().is_some_and(|removed| removed(id)) {
            return Err(rustls::Error::General(format!(
                "node {id} was removed from the cluster; its certificate is revoked"
            )));
        }
        Ok(id)
    }
}

/// A connection from a peer that reads as refused once the cluster removes the peer
/// ([`ClusterTls::ended_on_removal`]).
pub(crate) struct MemberConnection<S> {
    inner: S,
    /// `None` only if the handshake passed without a node id, which the verifier refuses.
    peer: Option<NodeId>,
    revocations: Arc<Revocations>,
    /// When the peer was last found not removed: reads on the write path of every Raft
    /// append ask again only after [`RECHECK`], far inside the removal's grace.
    checked: Option<tokio::time::Instant>,
}

/// How often an open connection asks again whether its peer was removed.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for MemberConnection<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let now = tokio::time::Instant::now();
        let due = self
            .checked
            .is_none_or(|t| now.duration_since(t) >= RECHECK);
        let removed = due
            && match self.peer {
                Some(id) => self
                    .revocations
                    .removed
                    .get()
                    .is_some_and(|removed| removed(id)),
                None => true,
            };
        if due && !removed {
            self.checked = Some(now);
        }
        if removed {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "node {} was removed from the cluster; its connection is closed",
                    self.peer.unwrap_or(0)
                ),
            )));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for MemberConnection<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The CA's checks, then the node id's.
#[derive(Debug)]
struct MemberClientVerifier {
    ca: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for MemberClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.ca.verify_client_cert(end_entity, intermediates, now)?;
        self.revocations.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca.supported_verify_schemes()
    }
}

/// The CA's checks (the name included), then the node id's.
#[derive(Debug)]
struct MemberServerVerifier {
    ca: Arc<WebPkiServerVerifier>,
    revocations: Arc<Revocations>,
}

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.ca.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.revocations.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca.supported_verify_schemes()
    }
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{what}: no PEM certificate found")));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, Error> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::Tls(format!("{what}: {e}")))?
        .ok_or_else(|| Error::Tls(format!("{what}: no PEM private key found")))
}

impl ClusterTls {
    /// Reads the cluster CA certificate and this node's certificate and key.
    pub fn load(ca_cert: &Path, cert: &Path, key: &Path) -> Result<ClusterTls, Error> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::Io(format!("reading {}: {e}", p.display())))
        };
        Self::from_pem(&read(ca_cert)?, &read(cert)?, &read(key)?)
    }

    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<ClusterTls, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in certs(ca_pem, "cluster CA certificate")? {
            roots
                .add(ca)
                .map_err(|e| Error::Tls(format!("cluster CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = certs(cert_pem, "node certificate")?;
        let revocations = Arc::new(Revocations::default());
        let ca = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
        let verifier = Arc::new(MemberClientVerifier {
            ca,
            revocations: revocations.clone(),
        });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key(key_pem, "node key")?)
            .map_err(|e| Error::Tls(format!("node certificate and key: {e}")))?;
        // A resumed session skips the certificate checks, the removed ids included.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let ca = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| Error::Tls(format!("server verifier: {e}")))?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MemberServerVerifier {
                ca,
                revocations: revocations.clone(),
            }))
            .with_client_auth_cert(chain.clone(), key(key_pem, "node key")?)
            .map_err(|e| Error::Tls(format!("node certificate and key: {e}")))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(ClusterTls {
            server: Arc::new(server),
            client,
            revocations,
            node_id: node_id_of(&chain[0]),
        })
    }

    /// Ends a connection of the cluster link at its next read once the cluster removes the
    /// node its certificate names: a handshake is checked once, and a pooled connection
    /// made before the removal would otherwise go on carrying requests.
    pub(crate) fn ended_on_removal<S>(
        &self,
        stream: tokio_rustls::server::TlsStream<S>,
    ) -> MemberConnection<tokio_rustls::server::TlsStream<S>> {
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| node_id_of(cert));
        MemberConnection {
            inner: stream,
            peer,
            revocations: self.revocations.clone(),
            checked: None,
        }
    }

    /// The node id this node's own certificate names, if any.
    pub fn node_id(&self) -> Option<NodeId> {
        self.node_id
    }

    /// From now on, every handshake of the cluster link refuses a peer whose node id
    /// `removed` says the cluster removed. Set once; later calls change nothing.
    fn revoke_with(&self, removed: impl Fn(NodeId) -> bool + Send + Sync + 'static) {
        let _ = self.revocations.removed.set(Box::new(removed));
    }

    /// Refuses, from now on, every peer the cluster removed: retired in `replica`'s state
    /// and out of the membership it knows. A node that left the membership is still
    /// accepted for [`REMOVAL_GRACE`] after this node saw it leave, measured from the
    /// change itself (a task watches the membership), never from the peer's first
    /// attempt: a leader that removes itself must hear that change acknowledged, and a
    /// certificate of a node removed long ago gets no window at all. A read error refuses.
    pub fn revoke_removed(&self, replica: &Replica) {
        let departed = Arc::new(std::sync::Mutex::new((
            tokio::time::Instant::now(),
            std::collections::BTreeSet::<NodeId>::new(),
        )));
        let mut metrics = replica.raft().metrics();
        let watched = departed.clone();
        tokio::spawn(async move {
            let members = |m: &openraft::RaftMetrics<NodeId, crate::types::NodeInfo>| {
                m.membership_config
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect::<std::collections::BTreeSet<NodeId>>()
            };
            let mut previous = members(&metrics.borrow());
            // Ends when Raft stops and drops the sender.
            while metrics.changed().await.is_ok() {
                let current = members(&metrics.borrow());
                let left: std::collections::BTreeSet<NodeId> =
                    previous.difference(&current).copied().collect();
                if !left.is_empty() {
                    *watched.lock().expect("departures lock") = (tokio::time::Instant::now(), left);
                }
                previous = current;
            }
        });
        let replica = replica.clone();
        self.revoke_with(move |peer| {
            let removed = replica.reader().is_retired(peer).unwrap_or(true)
                && !replica.members().iter().any(|m| m.id == peer);
            removed && {
                let (at, left) = &*departed.lock().expect("departures lock");
                !(left.contains(&peer) && at.elapsed() < REMOVAL_GRACE)
            }
        });
    }
}

/// The SHA-256 fingerprint (hex) of the first certificate in a CA file: what a data dir
/// records of the cluster it belongs to, so another cluster's node cannot run on it.
pub fn ca_fingerprint(ca_cert: &Path) -> Result<String, Error> {
    let pem = std::fs::read(ca_cert)
        .map_err(|e| Error::Io(format!("reading {}: {e}", ca_cert.display())))?;
    let first = certs(&pem, "cluster CA certificate")?.remove(0);
    let digest = ring::digest::digest(&ring::digest::SHA256, first.as_ref());
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Refusals logged once a second at most, each line counting those left out since the one
/// before: a peer retrying its handshake in a loop, or anyone who can reach a port, must
/// not fill the disk with the same line. The SIP proxy's refusals of a full dialog table
/// use it too.
#[derive(Default)]
pub struct RefusalLog {
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
    left_out: std::sync::atomic::AtomicU64,
}

impl RefusalLog {
    pub const fn new() -> RefusalLog {
        RefusalLog {
            last: std::sync::Mutex::new(None),
            left_out: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(how many were left out since the last line)` if this refusal may be logged.
    pub fn may_log(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = tokio::time::Instant::now();
        let mut last = self.last.lock().expect("refusal log lock");
        if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.left_out.swap(0, Ordering::Relaxed))
    }
}

/// TLS handshakes one listener runs at once. Past it, the oldest is dropped for the newest:
/// a client's handshake takes a few milliseconds, so whoever opens connections and never
/// finishes them pushes only each other out, and a client that does finish gets through
/// unless this many new connections arrive within its handshake.
pub const MAX_HANDSHAKES: usize = 64;
/// Handshakes from one address at once on one listener: half of [`MAX_HANDSHAKES`]. Past
/// it a new connection from there is closed at once, so one address never holds more than
/// half the places, nor pushes out anyone else's handshake. A member opening connections in
/// a burst (its pool opens one per concurrent request) stays well under it. Connections
/// that completed their handshake do not count.
pub const MAX_PER_ADDRESS: usize = MAX_HANDSHAKES / 2;
/// Established connections at once on one listener. Past it a new one is closed once its
/// handshake completes; connections already serving are never dropped for it.
pub const MAX_ESTABLISHED: usize = 512;

/// What one listener's connections hold: per address, how many handshakes; how many are
/// established; the handshakes in progress, oldest first, each with what ends it.
#[derive(Default)]
struct Gate {
    per_address: std::collections::HashMap<std::net::IpAddr, usize>,
    established: usize,
    handshaking: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
    next: u64,
}

/// Why `accept_tls` closed a connection without serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turned {
    Address,
    Established,
}

/// A connection's place in its listener's [`Gate`], given back when dropped.
pub struct Slot {
    gate: Arc<std::sync::Mutex<Gate>>,
    address: std::net::IpAddr,
    id: u64,
    established: bool,
}

impl Slot {
    /// Takes a place for a connection from `address`, with what ends its handshake early
    /// (when newer ones push it out), or says why not.
    fn take(
        gate: &Arc<std::sync::Mutex<Gate>>,
        address: std::net::IpAddr,
    ) -> Result<(Slot, tokio::sync::oneshot::Receiver<()>), Turned> {
        let mut g = gate.lock().expect("connection gate");
        let from_there = g.per_address.entry(address).or_insert(0);
        if *from_there >= MAX_PER_ADDRESS {
            return Err(Turned::Address);
        }
        *from_there += 1;
        if g.handshaking.len() >= MAX_HANDSHAKES {
            // Its slot goes when its task sees the signal; the sender's drop is the signal.
            g.handshaking.pop_front();
        }
        let id = g.next;
        g.next += 1;
        let (end, ended) = tokio::sync::oneshot::channel();
        g.handshaking.push_back((id, end));
        let slot = Slot {
            gate: gate.clone(),
            address,
            id,
            established: false,
        };
        Ok((slot, ended))
    }

    /// The handshake completed: the connection now counts as established, if there is room.
    fn establish(&mut self) -> Result<(), Turned> {
        let mut g = self.gate.lock().expect("connection gate");
        if g.established >= MAX_ESTABLISHED {
            return Err(Turned::Established);
        }
        g.ended_handshake(self.id, self.address);
        g.established += 1;
        self.established = true;
        Ok(())
    }
}

impl Gate {
    /// Forgets handshake `id` from `address`, however it ended.
    fn ended_handshake(&mut self, id: u64, address: std::net::IpAddr) {
        self.handshaking.retain(|(i, _)| *i != id);
        if let Some(n) = self.per_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&address);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.gate.lock().expect("connection gate");
        if self.established {
            g.established -= 1;
        } else {
            g.ended_handshake(self.id, self.address);
        }
    }
}

/// A connection [`accept_tls`] let in: the stream, and its place among the listener's
/// connections, which it holds until dropped.
pub struct Admitted<S> {
    stream: S,
    slot: Slot,
}

impl<S> Admitted<S> {
    /// The stream and its place, to serve the one while holding the other.
    pub fn into_parts(self) -> (S, Slot) {
        (self.stream, self.slot)
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes beside the
/// accept loop, each within `handshake`, so a client that stalls its handshake holds up no
/// one else. Every port is reachable by anyone, so what a listener holds is bounded: at
/// most [`MAX_HANDSHAKES`] handshakes at once (the oldest dropped for the newest) and
/// [`MAX_PER_ADDRESS`] from one address, and at most [`MAX_ESTABLISHED`] established.
/// Returns the established connections, to serve, and the accept task, to abort once the
/// server has stopped. `what` names the listener in the log.
pub fn accept_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake: std::time::Duration,
    what: &'static str,
) -> (
    impl tokio_stream::Stream<
            Item = std::io::Result<
                Admitted<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
            >,
        > + Send
        + Unpin,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let refusals = Arc::new(RefusalLog::default());
    let gate = Arc::new(std::sync::Mutex::new(Gate::default()));
    // A handshake pushed out by a newer one ends (and closes its socket) when its task next
    // runs; under a burst of connections the accept loop could run far ahead of those
    // tasks, holding many more sockets than places. Each handshake task holds a permit, so
    // the loop takes a connection's permit only once the one it pushed out has closed.
    let alive = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (mut slot, pushed_out) = match Slot::take(&gate, peer.ip()) {
                Ok(x) => x,
                Err(_) => {
                    if let Some(more) = refusals.may_log() {
                        tracing::warn!(%peer, limit = MAX_PER_ADDRESS, refused_since_last_line = more,
                            "{what}: closed a connection: too many handshakes from its address");
                    }
                    continue;
                }
            };
            let Ok(alive) = alive.clone().acquire_owned().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, refusals) = (acceptor.clone(), tx.clone(), refusals.clone());
            tokio::spawn(async move {
                let _alive = alive;
                let done = tokio::select! {
                    done = tokio::time::timeout(handshake, acceptor.accept(tcp)) => done,
                    _ = pushed_out => {
                        if let Some(more) = refusals.may_log() {
                            tracing::warn!(%peer, limit = MAX_HANDSHAKES, refused_since_last_line = more,
                                "{what}: dropped an unfinished TLS handshake for newer ones");
                        }
                        return;
                    }
                };
                match done {
                    Ok(Ok(stream)) => {
                        if slot.establish().is_err() {
                            if let Some(more) = refusals.may_log() {
                                tracing::warn!(%peer, limit = MAX_ESTABLISHED, refused_since_last_line = more,
                                    "{what}: closed a connection: too many established");
                            }
                            return;
                        }
                        let _ = tx.send(Admitted { stream, slot }).await;
                    }
                    Ok(Err(e)) => {
                        if let Some(more) = refusals.may_log() {
                            tracing::warn!(%peer, error = %e, refused_since_last_line = more,
                                "{what}: refused a TLS handshake")
                        }
                    }
                    Err(_) => {
                        if let Some(more) = refusals.may_log() {
                            tracing::warn!(%peer, refused_since_last_line = more,
                                "{what}: a TLS handshake timed out")
                        }
                    }
                }
            });
        }
    });
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, std::io::Error>,
    );
    (incoming, accept_loop)
}

/// Serves every connection `incoming` yields (from [`accept_tls`], whose `accept_loop` it
/// ends) with `serve`, each on a task of its own, until `stop` completes; then it accepts
/// no more and waits for every connection, which `serve` finishes through
/// [`until_stopped`] and the receiver it is given.
pub async fn serve_each<S, Fut>(
    mut incoming: impl tokio_stream::Stream<Item = std::io::Result<Admitted<S>>> + Unpin,
    accept_loop: tokio::task::JoinHandle<()>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    mut serve: impl FnMut(Admitted<S>, tokio::sync::watch::Receiver<bool>) -> Fut,
) where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = stopping.send(true);
    });
    let mut connections = tokio::task::JoinSet::new();
    let mut until_stop = stopped.clone();
    loop {
        let admitted = tokio::select! {
            _ = async { drop(until_stop.wait_for(|s| *s).await) } => break,
            next = tokio_stream::StreamExt::next(&mut incoming) => match next {
                Some(Ok(admitted)) => admitted,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(serve(admitted, stopped.clone()));
    }
    accept_loop.abort();
    while connections.join_next().await.is_some() {}
}

/// Runs `connection` to its end, unless `stopped` turns true first: then `graceful` asks
/// it to finish the request it is on, and it runs until it has.
pub async fn until_stopped<C: std::future::Future>(
    connection: C,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = async { drop(stopped.wait_for(|s| *s).await) } => {
            graceful(connection.as_mut());
            let _ = connection.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn address(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f01_0000 + n))
    }

    #[test]
    fn a_gate_bounds_handshakes_addresses_and_established_connections() {
        let gate = Arc::new(std::sync::Mutex::new(Gate::default()));
        // One address: MAX_PER_ADDRESS handshakes, then none until one ends.
        let mut from_one: Vec<_> = (0..MAX_PER_ADDRESS)
            .map(|_| Slot::take(&gate, address(0)).expect("a place"))
            .collect();
        assert_eq!(Slot::take(&gate, address(0)).err(), Some(Turned::Address));
        // A completed handshake gives its address's place back while it stays open.
        let (mut done, _ended) = from_one.pop().unwrap();
        done.establish().expect("room");
        let refill = Slot::take(&gate, address(0)).expect("the place it gave back");
        assert_eq!(Slot::take(&gate, address(0)).err(), Some(Turned::Address));
        drop((refill, done, from_one));
        assert!(gate.lock().unwrap().per_address.is_empty());

        // Handshakes: past MAX_HANDSHAKES the oldest is told to end, and only it.
        let mut handshakes: Vec<_> = (0..MAX_HANDSHAKES as u32)
            .map(|n| Slot::take(&gate, address(n)).expect("a place"))
            .collect();
        let newest = Slot::take(&gate, address(1_000)).expect("a place");
        assert!(handshakes[0]
            .1
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Closed));
        assert!(handshakes[1..].iter_mut().all(|(_, ended)| ended
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Empty)));
        assert_eq!(gate.lock().unwrap().handshaking.len(), MAX_HANDSHAKES);
        drop(newest);
        drop(handshakes);
        let g = gate.lock().unwrap();
        assert!(g.handshaking.is_empty() && g.per_address.is_empty());
        drop(g);

        // Established: MAX_ESTABLISHED at once; a closed one makes room for the next.
        let mut established = Vec::new();
        for n in 0..MAX_ESTABLISHED as u32 {
            let (mut slot, _ended) = Slot::take(&gate, address(n)).expect("a place");
            slot.establish().expect("room");
            established.push(slot);
        }
        let (mut one_more, _ended) = Slot::take(&gate, address(9_999)).expect("a place");
        assert_eq!(one_more.establish(), Err(Turned::Established));
        drop(one_more);
        drop(established.pop());
        let (mut next, _ended) = Slot::take(&gate, address(9_999)).expect("a place");
        next.establish().expect("room made by the closed one");
        drop(next);
        drop(established);
        let g = gate.lock().unwrap();
        assert_eq!(g.established, 0);
        assert!(g.handshaking.is_empty() && g.per_address.is_empty());
    }
}
