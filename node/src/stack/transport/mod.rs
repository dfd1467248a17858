//! SIP transports (RFC 3261 §18): UDP sockets, and TCP and TLS connections framed with
//! Content-Length. Every received message arrives with its [`Flow`], the exact path it
//! came over, and anything sent back over a flow reuses that socket or connection, which is
//! what lets a phone behind NAT hear from us. Requests get RFC 3581 `received`/`rport`
//! stamped on their top Via here, before anything else reads them.

pub mod flood;
mod stream;
mod stun;
mod target;
mod tls_client;
mod udp;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_sip::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::stack::stats::Stats;
use crate::Error;

pub use flood::{FloodLimit, Vouch};
pub use stream::load_tls_acceptor;

use flood::{FloodGuard, Verdict};

/// The most source addresses the flood limit tracks; the oldest make room.
pub const FLOOD_TABLE_MAX: usize = 100_000;
pub use target::{next_hop, transport_param, OwnAddrs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    Udp,
    Tcp,
    Tls,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Udp => "UDP",
            TransportKind::Tcp => "TCP",
            TransportKind::Tls => "TLS",
        }
    }

    pub fn is_reliable(self) -> bool {
        !matches!(self, TransportKind::Udp)
    }

    /// The port a Via sent-by without a port implies (RFC 3261 §18.2.2).
    pub fn default_port(self) -> u16 {
        match self {
            TransportKind::Tls => 5061,
            _ => 5060,
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one TCP or TLS connection for as long as it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

/// The path a message took: transport, our socket, the peer, and for streams the
/// connection. Sending over a flow goes back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: TransportKind,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub connection: Option<ConnectionId>,
}

/// A message as it arrived.
#[derive(Debug)]
pub struct Inbound {
    pub message: Message,
    pub flow: Flow,
}

/// What the transports hand upwards.
// Messages travel by value on purpose: boxing would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum InboundEvent {
    Message(Inbound),
    /// Bytes that did not parse; the core decides whether they can be answered.
    Malformed {
        raw: Bytes,
        flow: Flow,
        error: tandem_sip::Error,
    },
}

/// Where received messages go: one channel per shard of the transaction layer, and each
/// message to the shard its Call-ID belongs to (see [`crate::stack::shard`]).
#[derive(Clone)]
pub struct Inlet {
    shards: Arc<[mpsc::Sender<InboundEvent>]>,
}

impl Inlet {
    pub fn new(shards: Vec<mpsc::Sender<InboundEvent>>) -> Inlet {
        assert!(!shards.is_empty(), "an inlet needs a shard");
        Inlet {
            shards: shards.into(),
        }
    }

    /// Hands `event` to its shard. Bytes that did not parse belong to no call and go to
    /// `here`, the caller's own shard. Fails once that shard has stopped.
    pub async fn send(&self, event: InboundEvent, here: usize) -> Result<(), ()> {
        let shard = match &event {
            InboundEvent::Message(m) => {
                crate::stack::shard::of_message(&m.message, self.shards.len())
            }
            InboundEvent::Malformed { .. } => here,
        };
        self.shards[shard % self.shards.len()]
            .send(event)
            .await
            .map_err(|_| ())
    }
}

/// Limits applied to every listener and connection.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_message_size: usize,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// Lowercase User-Agent fragments whose requests are dropped unanswered.
    pub refused_user_agents: Vec<String>,
    pub flood: FloodLimit,
    /// Transactions (server and client, completed ones included) the node holds at most.
    pub max_transactions: usize,
}

impl Limits {
    /// Whether `message` is a request from a known scanner, to drop before any
    /// transaction exists: no answer tells it a SIP server is here, and nothing is kept.
    pub(crate) fn refuses_agent(&self, message: &Message) -> bool {
        message.is_request() && user_agent_matches(message, &self.refused_user_agents)
    }
}

/// Whether `message`'s User-Agent contains one of `fragments` (lowercase), ignoring case.
pub fn user_agent_matches(message: &Message, fragments: &[String]) -> bool {
    if fragments.is_empty() {
        return false;
    }
    let Ok(Some(agent)) = message.header(&tandem_sip::HeaderName::UserAgent) else {
        return false;
    };
    // Compared in place: every phone's requests pass here, and none should pay for a
    // lowercased copy of its User-Agent.
    let agent = agent.as_bytes();
    fragments.iter().any(|f| {
        agent
            .windows(f.len())
            .any(|w| w.eq_ignore_ascii_case(f.as_bytes()))
    })
}

struct Connection {
    flow: Flow,
    tx: mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct ConnectionTable {
    by_id: HashMap<ConnectionId, Connection>,
    by_remote: HashMap<(TransportKind, SocketAddr), ConnectionId>,
}

/// What opening a connection needs: the same as an accepted one gets.
struct Outbound {
    inbound: Inlet,
    tracker: TaskTracker,
    stop: CancellationToken,
    shards: Shards,
}

/// The SIP threads' runtimes, which every connection task runs on, in turn: never the
/// main runtime, where Raft's heartbeats and elections must not wait behind a flood of
/// TLS handshakes or a peer's megabytes of framing.
#[derive(Clone)]
pub(crate) struct Shards {
    handles: Arc<[tokio::runtime::Handle]>,
    next: Arc<AtomicU64>,
}

impl Shards {
    fn new(handles: &[tokio::runtime::Handle]) -> Shards {
        assert!(!handles.is_empty(), "connections need a SIP thread");
        Shards {
            handles: handles.into(),
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The runtime the next connection runs on.
    pub(crate) fn next(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        &self.handles[i % self.handles.len()]
    }
}

struct Shared {
    /// Sends go straight to the non-blocking sockets, from any thread: a datagram that does
    /// not fit is dropped, never waited for, so no reactor needs to know these sockets.
    udp: HashMap<SocketAddr, Arc<std::net::UdpSocket>>,
    outbound: std::sync::OnceLock<Outbound>,
    connections: Mutex<ConnectionTable>,
    /// Accepted connections, handshaking or open, by the peer's IP address.
    admitted: Mutex<HashMap<IpAddr, usize>>,
    next_connection: AtomicU64,
    limits: Limits,
    stats: Arc<Stats>,
    flood: Mutex<FloodGuard>,
    vouch: std::sync::OnceLock<Arc<dyn Vouch>>,
    /// The node's drain flag: a draining node answers no STUN keepalive.
    draining: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>>,
}

/// An accepted connection's place under the limits, from accept until it closes (a TLS
/// handshake in progress holds one too); given back on drop.
pub(crate) struct Admission {
    transports: Transports,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut admitted = self
            .transports
            .shared
            .admitted
            .lock()
            .expect("admission table lock");
        if let Some(n) = admitted.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                admitted.remove(&self.ip);
            }
        }
    }
}

/// A cheap handle for sending; the listeners and connection tasks hold the other end.
#[derive(Clone)]
pub struct Transports {
    shared: Arc<Shared>,
}

/// Everything needed to start listening.
pub struct Listeners {
    /// Non-blocking; each shard's receive loop registers its own copy with its runtime.
    pub udp: Vec<Arc<std::net::UdpSocket>>,
    pub tcp: Vec<tokio::net::TcpListener>,
    pub tls: Vec<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
}

/// Connections the kernel queues for a listener before the accept loop takes them. The
/// usual 128 overflows when a few hundred phones reconnect at once (a node restarting, a
/// NAT changing), and a connect that meets a full queue is left half-open at the client.
const LISTEN_BACKLOG: u32 = 1024;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] (the kernel caps it at
/// net.core.somaxconn).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Listeners {
    /// The bound addresses, by transport.
    pub fn addrs(&self) -> OwnAddrs {
        let local = |l: &tokio::net::TcpListener| l.local_addr().ok();
        OwnAddrs {
            udp: self
                .udp
                .iter()
                .filter_map(|s| s.local_addr().ok())
                .collect(),
            tcp: self.tcp.iter().filter_map(local).collect(),
            tls: self.tls.iter().filter_map(|(l, _)| local(l)).collect(),
            advertise: None,
        }
    }

    /// Binds every configured listener up front, so a port in use fails start-up with a
    /// clear message instead of half-starting.
    pub async fn bind(config: &crate::config::SipConfig) -> Result<Listeners, Error> {
        let mut udp = Vec::new();
        for &addr in &config.udp {
            let bind_error = |source| Error::Bind {
                transport: "UDP",
                addr,
                source,
            };
            let s = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
            s.set_nonblocking(true).map_err(bind_error)?;
            // The kernel's default receive buffer (about 200 KiB) overflows in bursts of a
            // few thousand messages per second, and every datagram lost there costs a
            // retransmission or a failed call. Best effort: the kernel caps it at
            // net.core.rmem_max.
            let buffers = socket2::SockRef::from(&s);
            if let Err(e) = buffers.set_recv_buffer_size(UDP_BUFFER) {
                tracing::debug!(%addr, error = %e, "cannot enlarge the UDP receive buffer");
            }
            let _ = buffers.set_send_buffer_size(UDP_BUFFER);
            udp.push(Arc::new(s));
        }
        let mut tcp = Vec::new();
        for &addr in &config.tcp {
            tcp.push(listen(addr).map_err(|source| Error::Bind {
                transport: "TCP",
                addr,
                source,
            })?);
        }
        let mut tls = Vec::new();
        if !config.tls.is_empty() {
            let (Some(cert), Some(key)) = (&config.tls_certificate, &config.tls_private_key) else {
                return Err(Error::Tls(
                    "sip.tls needs sip.tls_certificate and sip.tls_private_key".into(),
                ));
            };
            let acceptor = load_tls_acceptor(cert, key)?;
            for &addr in &config.tls {
                let l = listen(addr).map_err(|source| Error::Bind {
                    transport: "TLS",
                    addr,
                    source,
                })?;
                tls.push((l, acceptor.clone()));
            }
        }
        Ok(Listeners { udp, tcp, tls })
    }
}

/// Receive and send buffer asked for on each SIP UDP socket.
const UDP_BUFFER: usize = 4 << 20;

/// How long opening a TCP connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the listener tasks need besides their sockets.
#[derive(Clone)]
pub(crate) struct ListenerContext {
    pub transports: Transports,
    pub inbound: Inlet,
    pub tracker: TaskTracker,
    /// Cancelled when the whole node stops: closes sockets and connections.
    pub stop: CancellationToken,
    pub shards: Shards,
}

impl Transports {
    /// Starts the receive loops and accept loops. Every UDP socket gets one receive loop on
    /// each shard's runtime in `shards` (the kernel hands each datagram to one of them);
    /// accept loops and connections run on the shards' runtimes too, in turn, never on the
    /// caller's (the main runtime, which runs Raft). Accept loops also
    /// stop on `stop_accepting`, which shutdown cancels first so no new connections arrive
    /// while draining.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        listeners: Listeners,
        limits: Limits,
        stats: Arc<Stats>,
        inbound: Inlet,
        shards: &[tokio::runtime::Handle],
        tracker: &TaskTracker,
        stop: CancellationToken,
        stop_accepting: CancellationToken,
    ) -> Transports {
        let udp = listeners
            .udp
            .iter()
            .map(|s| {
                (
                    s.local_addr().expect("bound socket has an address"),
                    s.clone(),
                )
            })
            .collect();
        let transports = Transports {
            shared: Arc::new(Shared {
                udp,
                outbound: std::sync::OnceLock::new(),
                connections: Mutex::new(ConnectionTable::default()),
                admitted: Mutex::default(),
                next_connection: AtomicU64::new(1),
                flood: Mutex::new(FloodGuard::new(limits.flood.clone(), FLOOD_TABLE_MAX)),
                limits,
                stats,
                vouch: std::sync::OnceLock::new(),
                draining: std::sync::OnceLock::new(),
            }),
        };
        let shards = Shards::new(shards);
        let _ = transports.shared.outbound.set(Outbound {
            inbound: inbound.clone(),
            tracker: tracker.clone(),
            stop: stop.clone(),
            shards: shards.clone(),
        });
        let ctx = ListenerContext {
            transports: transports.clone(),
            inbound,
            tracker: tracker.clone(),
            stop,
            shards: shards.clone(),
        };
        for socket in &listeners.udp {
            for (shard, runtime) in shards.handles.iter().enumerate() {
                match socket.try_clone() {
                    Ok(copy) => {
                        tracker.spawn_on(udp::receive_loop(copy, shard, ctx.clone()), runtime);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, shard, "cannot share a UDP socket with a SIP thread")
                    }
                }
            }
        }
        // Accept loops on the SIP threads too. A tokio socket belongs to the reactor of
        // the runtime it was made on, so each listener moves as a std one and is made
        // again on its thread.
        let listening = listeners
            .tcp
            .into_iter()
            .map(|l| (l, None))
            .chain(listeners.tls.into_iter().map(|(l, a)| (l, Some(a))));
        for (l, acceptor) in listening {
            match l.into_std() {
                Ok(l) => {
                    let accept =
                        stream::accept_loop(l, acceptor, ctx.clone(), stop_accepting.clone());
                    tracker.spawn_on(accept, shards.next());
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot hand a listener to a SIP thread; not accepting")
                }
            }
        }
        transports
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Lets the flood limit ask the agents what a request proves (set once, when the
    /// agents exist; until then a banned address loses every request but ACK and CANCEL).
    pub fn set_vouch(&self, vouch: Arc<dyn Vouch>) {
        let _ = self.shared.vouch.set(vouch);
    }

    /// Whether a parsed message from `ip` goes on, under the flood limit. Responses and
    /// ACKs always do, uncounted; CANCELs count but pass a ban; other requests from a
    /// banned address pass only with proof of a round trip. Cluster members are never
    /// limited (see [`flood`]).
    pub(crate) fn screen(&self, message: &Message, ip: IpAddr) -> bool {
        if !self.shared.limits.flood.is_on()
            || !message.is_request()
            || message.method() == Some(&tandem_sip::Method::Ack)
        {
            return true;
        }
        let vouch = self.shared.vouch.get();
        // Members first: their traffic is most of a loaded node's, and never limited.
        if vouch.is_some_and(|v| v.trusted(ip)) {
            return true;
        }
        self.flood_admit(ip) == Verdict::Pass
            || flood::passes_bans(message)
            || vouch.is_some_and(|v| v.proves_round_trip(message, ip))
            || self.flood_drop()
    }

    /// Stops STUN keepalive answers while `flag` is set: a draining node's phones then
    /// see their flow fail and register through another node at once (RFC 5626 §4.4.1),
    /// instead of at their next refresh.
    pub fn set_draining(&self, flag: Arc<std::sync::atomic::AtomicBool>) {
        let _ = self.shared.draining.set(flag);
    }

    /// Whether a STUN keepalive from `ip` is answered ([`stun`]): not while draining; it
    /// counts against the source's flood limit like a request, and a banned source gets no
    /// answer, since a keepalive proves nothing about its source.
    pub(crate) fn screen_keepalive(&self, ip: IpAddr) -> bool {
        if self
            .shared
            .draining
            .get()
            .is_some_and(|d| d.load(Ordering::Relaxed))
        {
            return false;
        }
        !self.shared.limits.flood.is_on()
            || self.shared.vouch.get().is_some_and(|v| v.trusted(ip))
            || self.flood_admit(ip) == Verdict::Pass
            || self.flood_drop()
    }

    /// Counts a request the flood limit drops; false, for the caller to return.
    fn flood_drop(&self) -> bool {
        self.shared
            .stats
            .flood_dropped
            .fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Counts one request from `ip` against its flood limit.
    fn flood_admit(&self, ip: IpAddr) -> Verdict {
        let mut newly_banned = false;
        let verdict = {
            let mut guard = self.shared.flood.lock().expect("flood guard");
            let v = guard.admit(ip, tokio::time::Instant::now(), &mut newly_banned);
            let tracked = guard.len() as u64;
            self.shared
                .stats
                .flood_addresses
                .store(tracked, Ordering::Relaxed);
            v
        };
        if newly_banned {
            self.shared.stats.flood_bans.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %ip,
                ban = ?self.shared.limits.flood.ban,
                "flood: the address sent more requests than sip.flood_requests_per_sec allows; \
                 only requests that prove a round trip pass until the ban lapses"
            );
        }
        verdict
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Sends bytes over a flow: the UDP socket it names, or the connection it names. If
    /// that connection has closed, another open connection to the same peer is used.
    /// Never waits: a full connection queue drops the message like a lost datagram would,
    /// and the transaction layer's retransmissions recover.
    pub fn send(&self, flow: &Flow, bytes: Bytes) -> Result<(), Error> {
        match flow.transport {
            TransportKind::Udp => {
                let socket = self
                    .shared
                    .udp
                    .get(&flow.local)
                    .or_else(|| self.shared.udp.values().next())
                    .ok_or(Error::NoRoute {
                        transport: "UDP",
                        addr: flow.remote,
                    })?;
                match socket.send_to(&bytes, flow.remote) {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.stats().sends_dropped.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(source) => Err(Error::Io {
                        context: format!("UDP send to {}", flow.remote),
                        source,
                    }),
                }
            }
            kind => {
                let table = self
                    .shared
                    .connections
                    .lock()
                    .expect("connection table lock");
                // A connection id from before a restart may name another peer's
                // connection now: it counts only if it still leads to the same peer.
                let conn = flow
                    .connection
                    .and_then(|id| table.by_id.get(&id))
                    .filter(|c| c.flow.remote == flow.remote && c.flow.transport == kind)
                    .or_else(|| {
                        table
                            .by_remote
                            .get(&(kind, flow.remote))
                            .and_then(|id| table.by_id.get(id))
                    })
                    .ok_or(Error::NoRoute {
                        transport: kind.as_str(),
                        addr: flow.remote,
                    })?;
                if conn.tx.try_send(bytes).is_err() {
                    self.stats().sends_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// A flow to `remote` over `kind` for a request this node originates or forwards:
    /// UDP goes out of a listening socket of the same address family; TCP reuses an open
    /// connection to that address or opens one. TLS here only reuses an open connection
    /// (a phone registered over TLS has one); `flow_to_tls` opens one, given the name the
    /// server's certificate must carry.
    pub async fn flow_to(&self, kind: TransportKind, remote: SocketAddr) -> Result<Flow, Error> {
        let no_route = || Error::NoRoute {
            transport: kind.as_str(),
            addr: remote,
        };
        if kind == TransportKind::Udp {
            let local = self
                .shared
                .udp
                .keys()
                .find(|a| a.is_ipv4() == remote.is_ipv4())
                .copied()
                .ok_or_else(no_route)?;
            return Ok(Flow {
                transport: kind,
                local,
                remote,
                connection: None,
            });
        }
        if let Ok(flow) = self.existing(kind, remote) {
            return Ok(flow);
        }
        if kind == TransportKind::Tls {
            // A new TLS connection needs the name to verify: `flow_to_tls`.
            return Err(no_route());
        }
        let outbound = self.shared.outbound.get().ok_or_else(no_route)?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(remote))
            .await
            .map_err(|_| Error::Io {
                context: format!("connecting to {remote} over TCP"),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| Error::Io {
                context: format!("connecting to {remote} over TCP"),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().map_err(|source| Error::Io {
            context: "reading a new connection's address".into(),
            source,
        })?;
        // Run on a SIP thread, and registered with that thread's reactor; converted before
        // it takes a place in the table, which a failure here must not leave behind.
        let stream = stream.into_std().map_err(|source| Error::Io {
            context: "handing a new connection to a SIP thread".into(),
            source,
        })?;
        let (tx, rx) = mpsc::channel(stream::QUEUE_DEPTH);
        let flow = self
            .register(kind, local, remote, tx)
            .ok_or(Error::NoRoute {
                transport: "TCP (connection limit reached)",
                addr: remote,
            })?;
        let ctx = self.outbound_context(outbound);
        outbound.tracker.spawn_on(
            async move {
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => stream::run_connection(stream, flow, rx, ctx).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register a new connection");
                        ctx.transports.unregister(&flow);
                    }
                }
            },
            outbound.shards.next(),
        );
        Ok(flow)
    }

    /// What a connection this node opened runs with, like an accepted one's.
    fn outbound_context(&self, outbound: &Outbound) -> ListenerContext {
        ListenerContext {
            transports: self.clone(),
            inbound: outbound.inbound.clone(),
            tracker: outbound.tracker.clone(),
            stop: outbound.stop.clone(),
            shards: outbound.shards.clone(),
        }
    }

    /// The open connection to `remote` over `kind`, if there is one.
    fn existing(&self, kind: TransportKind, remote: SocketAddr) -> Result<Flow, ()> {
        let table = self
            .shared
            .connections
            .lock()
            .expect("connection table lock");
        table
            .by_remote
            .get(&(kind, remote))
            .and_then(|id| table.by_id.get(id))
            .map(|c| c.flow)
            .ok_or(())
    }

    fn register(
        &self,
        transport: TransportKind,
        local: SocketAddr,
        remote: SocketAddr,
        tx: mpsc::Sender<Bytes>,
    ) -> Option<Flow> {
        let mut table = self
            .shared
            .connections
            .lock()
            .expect("connection table lock");
        if table.by_id.len() >= self.shared.limits.max_connections {
            return None;
        }
        let id = ConnectionId(self.shared.next_connection.fetch_add(1, Ordering::Relaxed));
        let flow = Flow {
            transport,
            local,
            remote,
            connection: Some(id),
        };
        table.by_id.insert(id, Connection { flow, tx });
        table.by_remote.insert((transport, remote), id);
        let open = table.by_id.len() as u64;
        self.shared
            .stats
            .connections_open
            .store(open, Ordering::Relaxed);
        Some(flow)
    }

    fn unregister(&self, flow: &Flow) {
        let mut table = self
            .shared
            .connections
            .lock()
            .expect("connection table lock");
        if let Some(id) = flow.connection {
            if let Some(c) = table.by_id.remove(&id) {
                let key = (c.flow.transport, c.flow.remote);
                if table.by_remote.get(&key) == Some(&id) {
                    table.by_remote.remove(&key);
                }
            }
        }
        let open = table.by_id.len() as u64;
        self.shared
            .stats
            .connections_open
            .store(open, Ordering::Relaxed);
    }

    /// A place for a connection just accepted from `remote`, or why there is none: the
    /// node-wide limit (accepted connections, handshakes included, plus those this node
    /// opened) or the per-address one.
    pub(crate) fn admit(&self, remote: SocketAddr) -> Result<Admission, &'static str> {
        let limits = &self.shared.limits;
        let mut admitted = self.shared.admitted.lock().expect("admission table lock");
        let accepted: usize = admitted.values().sum();
        if accepted.max(self.open_connections()) >= limits.max_connections {
            return Err("connection limit reached");
        }
        let from_there = admitted.entry(remote.ip()).or_insert(0);
        if *from_there >= limits.max_connections_per_address {
            return Err("per-address connection limit reached");
        }
        *from_there += 1;
        Ok(Admission {
            transports: self.clone(),
            ip: remote.ip(),
        })
    }

    pub fn open_connections(&self) -> usize {
        self.shared
            .connections
            .lock()
            .expect("connection table lock")
            .by_id
            .len()
    }
}

/// RFC 3261 §18.2.1 and RFC 3581: record where a request really came from in its top Via,
/// so responses find their way back through NAT.
pub(crate) fn stamp_via(message: &mut Message, source: SocketAddr) {
    if !message.is_request() {
        return;
    }
    let Ok(via) = message.top_via() else {
        return;
    };
    let source_ip = source.ip();
    let wrong_host = via.host.ip() != Some(source_ip);
    let rport = via.rport().is_some();
    if !wrong_host && !rport {
        return;
    }
    let mut via = via.clone();
    via.params.set("received", Some(&ip_param(source_ip)));
    if rport {
        let port = tandem_sip::addr::decimal(source.port().into());
        via.params.set("rport", Some(port.as_str()));
    }
    let _ = message.replace_top_via(via);
}

fn ip_param(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => tandem_sip::addr::ip_string(ip),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Where a response to a request that arrived over `flow` goes (RFC 3261 §18.2.2, RFC 3581):
/// back over the same connection for streams; for UDP to the source address when rport
/// was asked for, else to the source IP and the Via port.
pub(crate) fn response_flow(request: &Message, flow: &Flow) -> Flow {
    if flow.transport.is_reliable() {
        return *flow;
    }
    let Ok(via) = request.top_via() else {
        return *flow;
    };
    if via.rport().is_some() {
        return *flow;
    }
    let port = via.port.unwrap_or(flow.transport.default_port());
    Flow {
        remote: SocketAddr::new(flow.remote.ip(), port),
        ..*flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(via: &str) -> Message {
        let text =
            format!("OPTIONS sip:x@y SIP/2.0\r\nVia: {via}\r\nVia: SIP/2.0/UDP second\r\n\r\n");
        Message::parse_datagram(Bytes::from(text), 65535).unwrap()
    }

    #[test]
    fn stamps_received_and_rport() {
        let mut m = req("SIP/2.0/UDP phone.example.com:5062;rport;branch=z9hG4bK1");
        stamp_via(&mut m, "192.0.2.7:40001".parse().unwrap());
        let v = m.top_via().unwrap();
        assert_eq!(v.received(), Some("192.0.2.7"));
        assert_eq!(v.rport(), Some(Some(40001)));
        assert_eq!(v.branch(), Some("z9hG4bK1"));
        assert_eq!(m.vias().unwrap().len(), 2);

        let mut m = req("SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK1");
        stamp_via(&mut m, "192.0.2.7:5062".parse().unwrap());
        assert_eq!(
            m.top_via().unwrap().received(),
            None,
            "same address: nothing to add"
        );
    }

    #[test]
    fn responses_follow_rport_or_the_via_port() {
        let flow = Flow {
            transport: TransportKind::Udp,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: "192.0.2.7:40001".parse().unwrap(),
            connection: None,
        };
        let with_rport = req("SIP/2.0/UDP h:5062;rport=40001;received=192.0.2.7");
        assert_eq!(response_flow(&with_rport, &flow).remote, flow.remote);
        let without = req("SIP/2.0/UDP h:5062;received=192.0.2.7");
        assert_eq!(
            response_flow(&without, &flow).remote,
            "192.0.2.7:5062".parse().unwrap()
        );
        let no_port = req("SIP/2.0/UDP h");
        assert_eq!(
            response_flow(&no_port, &flow).remote,
            "192.0.2.7:5060".parse().unwrap()
        );
    }
}
