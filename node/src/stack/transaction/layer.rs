//! The transaction layer's runtime: one task that owns every transaction, matches incoming
//! messages to them (RFC 3261 §17.1.3 and §17.2.3), drives the sans-IO machines, runs their
//! timers on tokio time and carries out what they ask for. Requests that start a server
//! transaction, ACKs for 2xx responses and responses that match nothing go to the core.

use std::collections::hash_map::RandomState;
use std::future::poll_fn;

use bytes::Bytes;
use rustc_hash::FxBuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use tandem_sip::{HeaderName, Message, Method};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use super::split_map::SplitMap;
use super::{
    Action, Actions, ClientInvite, ClientNonInvite, Reliability, ServerInvite, ServerNonInvite,
    Timer, TimerSettings,
};
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::stack::shard::MAX_SHARDS;
use crate::stack::transport::{response_flow, Flow, Inbound, InboundEvent, Transports};

/// Names one transaction for the lifetime of the layer. The low bits name its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxId(u64);

impl TxId {
    fn shard(self) -> usize {
        (self.0 % MAX_SHARDS as u64) as usize
    }
}

/// What the layer hands to the core.
#[derive(Debug)]
pub enum CoreEvent {
    /// A request. `tx` is the server transaction to answer through; it is `None` for an ACK
    /// that matched no transaction (the ACK for a 2xx, routed end to end).
    Request {
        request: Message,
        flow: Flow,
        tx: Option<TxId>,
        cancels: Option<TxId>,
    },
    /// Bytes that did not parse.
    Malformed {
        raw: Bytes,
        flow: Flow,
        error: tandem_sip::Error,
    },
    /// A response that matched no client transaction.
    StrayResponse { response: Message, flow: Flow },
}

/// What a client transaction reports to whoever sent the request.
#[derive(Debug)]
pub enum ClientEvent {
    /// Boxed: each client transaction has its own channel, and a channel allocates room
    /// for 32 events when it is made.
    Response(Box<Message>),
    Timeout,
    TransportError,
}

enum Command {
    Respond {
        tx: TxId,
        response: Message,
        /// A final that keeps no transaction state (see `respond_stateless`).
        stateless: bool,
    },
    Abandon {
        tx: TxId,
    },
    SendRequest {
        request: Message,
        flow: Flow,
        events: EventSink,
    },
}

/// Where a client transaction's events go: a channel of its own, or a channel it shares
/// with the other branches of a fork, each event tagged with the branch's index.
pub enum EventSink {
    Own(mpsc::UnboundedSender<ClientEvent>),
    Tagged(mpsc::UnboundedSender<(usize, ClientEvent)>, usize),
}

impl EventSink {
    /// Sends `event`, or drops it if whoever sent the request no longer listens.
    fn send(&self, event: ClientEvent) {
        match self {
            EventSink::Own(tx) => {
                let _ = tx.send(event);
            }
            EventSink::Tagged(tx, tag) => {
                let _ = tx.send((*tag, event));
            }
        }
    }
}

/// The transactions still owing a final response, over every shard: drain and shutdown
/// wait for none to be left, and `/metrics` shows how many there are. A shard adds the
/// change in its own count after each event it handles; waiters are woken only when the
/// total reaches 0, which is all they wait for (a watch channel woke them on every
/// change, about 1% of a loaded SIP thread). Beside it, every transaction the shards'
/// tables hold, completed ones included (kept to absorb retransmissions until Timers J,
/// K, L or M), which is what the tables cost.
#[derive(Debug, Default)]
pub struct ActiveTransactions {
    count: AtomicUsize,
    idle: Notify,
    held: AtomicUsize,
}

impl ActiveTransactions {
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Every transaction in the tables, finished or not.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A shard's count went from `before` to `now`; the total includes `before`, so it
    /// never goes below 0.
    fn moved(&self, before: usize, now: usize) {
        if now >= before {
            self.count.fetch_add(now - before, Ordering::AcqRel);
        } else if self.count.fetch_sub(before - now, Ordering::AcqRel) == before - now {
            self.idle.notify_waiters();
        }
    }

    /// Returns once no transaction is active.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a 0 reached in between still wakes it.
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The core's way to answer requests and send new ones. One handle serves every shard: a
/// response goes to the shard of its transaction, a new request to the shard of its
/// Call-ID, where its responses will arrive.
#[derive(Clone)]
pub struct LayerHandle {
    shards: Arc<[mpsc::UnboundedSender<Command>]>,
    active: Arc<ActiveTransactions>,
}

impl LayerHandle {
    fn to_shard_of(&self, tx: TxId, command: Command) {
        let _ = self.shards[tx.shard() % self.shards.len()].send(command);
    }

    /// Sends a response through a server transaction. Responses for a transaction that
    /// has already ended are dropped, as RFC 3261 requires.
    pub fn respond(&self, tx: TxId, response: Message) {
        self.to_shard_of(
            tx,
            Command::Respond {
                tx,
                response,
                stateless: false,
            },
        );
    }

    /// Sends a final response and ends its transaction at once, so a retransmission of
    /// the request is handled as a new one (RFC 3261 §8.2.7), and nothing is retransmitted
    /// to a source that may be spoofed. For answers that are computed afresh anyway: a
    /// challenge, a refusal, the node's own answer to OPTIONS. A 2xx to an INVITE is
    /// sent the usual way (see `ServerInvite::on_tu_response_stateless`).
    pub fn respond_stateless(&self, tx: TxId, response: Message) {
        self.to_shard_of(
            tx,
            Command::Respond {
                tx,
                response,
                stateless: true,
            },
        );
    }

    /// Ends a non-INVITE server transaction without a final response (RFC 4320 §4.2); it
    /// goes on absorbing retransmissions for as long as the client may send them.
    pub fn abandon(&self, tx: TxId) {
        self.to_shard_of(tx, Command::Abandon { tx });
    }

    /// Starts a client transaction. The request must carry its top Via with a branch. An
    /// ACK (for a 2xx) is sent once, without a transaction.
    pub fn send_request(
        &self,
        request: Message,
        flow: Flow,
    ) -> mpsc::UnboundedReceiver<ClientEvent> {
        let (events, rx) = mpsc::unbounded_channel();
        self.send_request_to(request, flow, EventSink::Own(events));
        rx
    }

    /// Starts a client transaction, as [`LayerHandle::send_request`], whose events go to
    /// `events`.
    pub fn send_request_to(&self, request: Message, flow: Flow, events: EventSink) {
        let shard = crate::stack::shard::of_message(&request, self.shards.len());
        let _ = self.shards[shard].send(Command::SendRequest {
            request,
            flow,
            events,
        });
    }

    /// Transactions still waiting for a final response, over all shards; shutdown waits for
    /// this to reach 0.
    pub fn active(&self) -> Arc<ActiveTransactions> {
        self.active.clone()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ServerKey {
    /// RFC 3261 §17.2.3: branch, sent-by and method (ACK counted as INVITE).
    Branch {
        branch: String,
        /// The Via's host and port (0 when it has none), compared as parsed.
        sent_by: (tandem_sip::Host, u16),
        method: Method,
    },
    /// RFC 2543 peers without the magic cookie: the dialog-ish fields instead.
    Legacy {
        call_id: String,
        cseq: u32,
        from_tag: String,
        via: String,
        method: Method,
    },
}

fn key_method(m: &Method) -> Method {
    if *m == Method::Ack {
        Method::Invite
    } else {
        m.clone()
    }
}

fn server_key(request: &Message, method: Method) -> Result<ServerKey, tandem_sip::Error> {
    let via = request.top_via()?;
    if via.is_rfc3261_branch() {
        return Ok(ServerKey::Branch {
            branch: via.branch().unwrap_or_default().to_owned(),
            sent_by: (via.host.clone(), via.port.unwrap_or(0)),
            method,
        });
    }
    Ok(ServerKey::Legacy {
        call_id: request.call_id()?.into_owned(),
        cseq: request.cseq()?.seq,
        from_tag: request.from()?.tag().unwrap_or_default().to_owned(),
        via: format!(
            "{}:{}:{}",
            via.host,
            via.port.unwrap_or(0),
            via.branch().unwrap_or_default()
        ),
        method,
    })
}

/// RFC 3261 §17.1.3: a response matches by the top Via branch and the CSeq method.
fn client_key(message: &Message) -> Result<(String, Method), tandem_sip::Error> {
    let via = message.top_via()?;
    let branch = via.branch().ok_or(tandem_sip::Error::Header {
        name: "Via",
        reason: "no branch",
    })?;
    Ok((branch.to_owned(), message.cseq()?.method))
}

enum ServerMachine {
    Invite(ServerInvite),
    NonInvite(ServerNonInvite),
}

impl ServerMachine {
    fn has_final(&self) -> bool {
        match self {
            ServerMachine::Invite(m) => m.has_final(),
            ServerMachine::NonInvite(m) => m.has_final(),
        }
    }
}

struct ServerEntry {
    key: ServerKey,
    flow: Flow,
    machine: ServerMachine,
    /// Kept for INVITEs only, to build a 100 Trying if the core is slow. Boxed, as most
    /// entries live on without it (32 s after a final, on UDP).
    invite: Option<Box<Message>>,
}

enum ClientMachine {
    Invite(ClientInvite),
    NonInvite(ClientNonInvite),
}

impl ClientMachine {
    fn has_final(&self) -> bool {
        match self {
            ClientMachine::Invite(m) => m.has_final(),
            ClientMachine::NonInvite(m) => m.has_final(),
        }
    }
}

struct ClientEntry {
    key: (String, Method),
    flow: Flow,
    machine: ClientMachine,
    /// An INVITE, until its final response: the ACK for a non-2xx is built from it.
    /// Boxed, as the entry lives on without it.
    invite: Option<Box<Message>>,
    events: EventSink,
}

/// How many inbound messages and core events may queue between the tasks.
pub const CHANNEL_DEPTH: usize = 4096;

/// Starts one transaction layer shard on each runtime of `shards`, fed by the matching
/// receiver of `inbound` and tracked by `tracker` until `stop`. Returns the handle every
/// agent answers and sends through, and what each shard hands upward, in shard order: the
/// receiver of shard `i` belongs on runtime `i`.
pub fn start_shards(
    transports: &Transports,
    settings: TimerSettings,
    inbound: Vec<mpsc::Receiver<InboundEvent>>,
    shards: &[tokio::runtime::Handle],
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> (LayerHandle, Vec<mpsc::Receiver<CoreEvent>>) {
    assert!(
        (1..=MAX_SHARDS).contains(&shards.len()) && inbound.len() == shards.len(),
        "between 1 and {MAX_SHARDS} shards, each with its inbound channel"
    );
    let active = Arc::new(ActiveTransactions::default());
    // Each shard holds its share of the node's cap, rounded up.
    let max_held = transports.limits().max_transactions.div_ceil(shards.len());
    let mut commands = Vec::new();
    let mut core_events = Vec::new();
    for (shard, (runtime, inbound)) in shards.iter().zip(inbound).enumerate() {
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (core_tx, core_rx) = mpsc::channel(CHANNEL_DEPTH);
        let layer = TransactionLayer {
            shard: shard as u64,
            settings,
            transports: transports.clone(),
            to_core: core_tx,
            servers: SplitMap::default(),
            server_index: SplitMap::default(),
            clients: SplitMap::default(),
            client_index: SplitMap::default(),
            timers: DelayQueue::new(),
            timer_keys: SplitMap::default(),
            next_id: 0,
            active: 0,
            published: 0,
            held: 0,
            published_held: 0,
            max_held,
            shared_active: active.clone(),
            commands: commands_rx,
        };
        tracker.spawn_on(layer.run(inbound, stop.clone()), runtime);
        commands.push(commands_tx);
        core_events.push(core_rx);
    }
    let handle = LayerHandle {
        shards: commands.into(),
        active,
    };
    (handle, core_events)
}

/// One shard's state, owned by its task.
struct TransactionLayer {
    shard: u64,
    settings: TimerSettings,
    transports: Transports,
    to_core: mpsc::Sender<CoreEvent>,
    // Under sustained load these maps hold every transaction of the last 32 s, so they are
    // split into parts that grow one at a time (see `split_map`), and entries are boxed,
    // so a growing part moves pointers, not entries (perf showed the copy and its page
    // faults at a tenth of a node's CPU at 2,500 calls/s).
    // Maps keyed by the layer's own ids use FxHash; those keyed by what peers send keep
    // std's keyed SipHash, so no peer can choose keys that collide.
    servers: SplitMap<TxId, Box<ServerEntry>, FxBuildHasher>,
    server_index: SplitMap<ServerKey, TxId, RandomState>,
    clients: SplitMap<TxId, Box<ClientEntry>, FxBuildHasher>,
    client_index: SplitMap<(String, Method), TxId, RandomState>,
    timers: DelayQueue<(TxId, Timer)>,
    timer_keys: SplitMap<(TxId, Timer), delay_queue::Key, FxBuildHasher>,
    next_id: u64,
    /// This shard's transactions still owing a final response, and how many of them the
    /// shared count includes.
    active: usize,
    published: usize,
    /// This shard's entries in `servers` and `clients`, and how many the shared count
    /// includes.
    held: usize,
    published_held: usize,
    /// This shard's share of `sip.max_transactions`: a new server transaction past it is
    /// refused with a stateless 503 (CANCEL and in-dialog requests have a tenth more).
    max_held: usize,
    shared_active: Arc<ActiveTransactions>,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl TransactionLayer {
    /// Runs until `stop` is cancelled or every input has closed.
    async fn run(mut self, mut inbound: mpsc::Receiver<InboundEvent>, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(expired) = poll_fn(|cx| self.timers.poll_expired(cx)) => {
                    let (id, timer) = expired.into_inner();
                    self.timer_keys.remove(&(id, timer));
                    self.on_timer(id, timer).await;
                }
                Some(cmd) = self.commands.recv() => self.on_command(cmd).await,
                event = inbound.recv() => match event {
                    Some(InboundEvent::Message(m)) => self.on_inbound(m).await,
                    Some(InboundEvent::Malformed { raw, flow, error }) => {
                        let _ = self.to_core.send(CoreEvent::Malformed { raw, flow, error }).await;
                    }
                    None => break,
                },
            }
            self.publish_active();
        }
    }

    fn publish_active(&mut self) {
        if self.published != self.active {
            self.shared_active.moved(self.published, self.active);
            self.published = self.active;
        }
        if self.published_held != self.held {
            let shared = &self.shared_active.held;
            if self.held > self.published_held {
                shared.fetch_add(self.held - self.published_held, Ordering::Relaxed);
            } else {
                shared.fetch_sub(self.published_held - self.held, Ordering::Relaxed);
            }
            self.published_held = self.held;
        }
    }

    /// Past the cap, a new request gets 503 with Retry-After, sent once, and nothing is
    /// kept: the node sheds load instead of growing without bound.
    fn refuse_when_full(&self, request: &Message, flow: &Flow) {
        let stats = self.transports.stats();
        if stats
            .transactions_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(10_000)
        {
            tracing::warn!(
                held = self.held,
                "the transaction table is full (sip.max_transactions); new requests get 503"
            );
        }
        let mut response =
            crate::stack::responses::build(request, 503, "Service Unavailable (overloaded)");
        response.push_header(tandem_sip::HeaderName::RetryAfter, "5".to_string());
        let _ = self
            .transports
            .send(&response_flow(request, flow), response.to_bytes());
    }

    fn next_id(&mut self) -> TxId {
        self.next_id += 1;
        TxId(self.next_id * MAX_SHARDS as u64 + self.shard)
    }

    async fn on_inbound(&mut self, Inbound { message, flow }: Inbound) {
        if message.is_request() {
            self.on_request(message, flow).await;
        } else {
            self.on_response(message, flow).await;
        }
    }

    async fn on_request(&mut self, request: Message, flow: Flow) {
        let Some(method) = request.method().cloned() else {
            return;
        };
        let key = match server_key(&request, key_method(&method)) {
            Ok(k) => k,
            Err(_) => {
                // Without a usable Via or dialog fields it cannot be matched; the core
                // validates it and answers 400 statelessly.
                let _ = self
                    .to_core
                    .send(CoreEvent::Request {
                        request,
                        flow,
                        tx: None,
                        cancels: None,
                    })
                    .await;
                return;
            }
        };
        if let Some(&id) = self.server_index.get(&key) {
            let mut out = Actions::new();
            let entry = self.servers.get_mut(&id).expect("index and map agree");
            let before = entry.machine.has_final();
            let mut deliver = false;
            match (&mut entry.machine, method == Method::Ack) {
                (ServerMachine::Invite(m), true) => m.on_ack(&mut out),
                (ServerMachine::Invite(m), false) => m.on_request_retransmission(&mut out),
                (ServerMachine::NonInvite(m), _) => m.on_request_retransmission(&mut out),
            }
            if out.iter().any(|a| matches!(a, Action::Deliver)) {
                deliver = true;
            } else if method != Method::Ack {
                self.transports
                    .stats()
                    .retransmissions_absorbed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.apply_server(id, before, out).await;
            if deliver {
                let _ = self
                    .to_core
                    .send(CoreEvent::Request {
                        request,
                        flow,
                        tx: Some(id),
                        cancels: None,
                    })
                    .await;
            }
            return;
        }
        if method == Method::Ack {
            // No transaction: the ACK for a 2xx. It belongs to the core, never dropped.
            let _ = self
                .to_core
                .send(CoreEvent::Request {
                    request,
                    flow,
                    tx: None,
                    cancels: None,
                })
                .await;
            return;
        }
        // A tenth more room for what ends or stops calls (CANCEL, and requests inside a
        // dialog, BYE first of all), so a full table still lets calls end.
        let ends_something = method == Method::Cancel
            || request
                .to()
                .is_ok_and(|to| to.params.value("tag").is_some());
        let cap = if ends_something {
            self.max_held + self.max_held / 10
        } else {
            self.max_held
        };
        if self.held >= cap {
            self.refuse_when_full(&request, &flow);
            return;
        }
        let cancels = if method == Method::Cancel {
            server_key(&request, Method::Invite)
                .ok()
                .and_then(|k| self.server_index.get(&k).copied())
        } else {
            None
        };
        let id = self.next_id();
        let rel = if flow.transport.is_reliable() {
            Reliability::Reliable
        } else {
            Reliability::Unreliable
        };
        let mut out = Actions::new();
        let (machine, invite) = if method == Method::Invite {
            (
                ServerMachine::Invite(ServerInvite::new(rel, &self.settings, &mut out)),
                Some(Box::new(request.clone())),
            )
        } else {
            (
                ServerMachine::NonInvite(ServerNonInvite::new(rel, &self.settings)),
                None,
            )
        };
        let entry = ServerEntry {
            key: key.clone(),
            flow: response_flow(&request, &flow),
            machine,
            invite,
        };
        self.servers.insert(id, Box::new(entry));
        self.server_index.insert(key, id);
        self.active += 1;
        self.held += 1;
        self.apply_server(id, false, out).await;
        let _ = self
            .to_core
            .send(CoreEvent::Request {
                request,
                flow,
                tx: Some(id),
                cancels,
            })
            .await;
    }

    async fn on_response(&mut self, response: Message, flow: Flow) {
        let Some(status) = response.status() else {
            return;
        };
        let id = client_key(&response)
            .ok()
            .and_then(|k| self.client_index.get(&k).copied());
        let Some(id) = id else {
            let _ = self
                .to_core
                .send(CoreEvent::StrayResponse { response, flow })
                .await;
            return;
        };
        let entry = self.clients.get_mut(&id).expect("index and map agree");
        let before = entry.machine.has_final();
        let mut out = Actions::new();
        match &mut entry.machine {
            ClientMachine::NonInvite(m) => m.on_response(status, &mut out),
            ClientMachine::Invite(m) => {
                let invite = &entry.invite;
                let ack = || {
                    invite
                        .as_ref()
                        .map(|i| ack_for(i, &response))
                        .unwrap_or_default()
                };
                m.on_response(status, ack, &mut out);
                if status >= 200 {
                    entry.invite = None;
                }
            }
        }
        self.apply_client(id, before, out, Some(response));
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Respond {
                tx,
                response,
                stateless,
            } => {
                let Some(status) = response.status() else {
                    return;
                };
                let Some(entry) = self.servers.get_mut(&tx) else {
                    tracing::debug!(status, "response for a transaction that has ended; dropped");
                    return;
                };
                let before = entry.machine.has_final();
                let bytes = response.to_bytes();
                // Answered: the machine asks for no 100 Trying of its own any more.
                entry.invite = None;
                let mut out = Actions::new();
                match &mut entry.machine {
                    ServerMachine::Invite(m) if stateless => {
                        m.on_tu_response_stateless(status, bytes, &mut out)
                    }
                    ServerMachine::Invite(m) => m.on_tu_response(status, bytes, &mut out),
                    ServerMachine::NonInvite(m) if stateless => {
                        m.on_tu_response_stateless(status, bytes, &mut out)
                    }
                    ServerMachine::NonInvite(m) => m.on_tu_response(status, bytes, &mut out),
                }
                let stats = self.transports.stats();
                stats
                    .responses_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats.count_response(status);
                self.apply_server(tx, before, out).await;
            }
            Command::Abandon { tx } => {
                let Some(entry) = self.servers.get_mut(&tx) else {
                    return;
                };
                let before = entry.machine.has_final();
                let mut out = Actions::new();
                match &mut entry.machine {
                    ServerMachine::NonInvite(m) => m.on_tu_abandon(&mut out),
                    // An INVITE always gets a final response.
                    ServerMachine::Invite(_) => {
                        tracing::warn!("an INVITE server transaction cannot be abandoned");
                        return;
                    }
                }
                self.apply_server(tx, before, out).await;
            }
            Command::SendRequest {
                request,
                flow,
                events,
            } => {
                if request.method() == Some(&Method::Ack) {
                    // An ACK for a 2xx has no transaction (RFC 3261 §17.1.1.3): send it once.
                    if self.transports.send(&flow, request.to_bytes()).is_err() {
                        events.send(ClientEvent::TransportError);
                    }
                    return;
                }
                let Ok(key) = client_key(&request) else {
                    events.send(ClientEvent::TransportError);
                    return;
                };
                let id = self.next_id();
                let rel = if flow.transport.is_reliable() {
                    Reliability::Reliable
                } else {
                    Reliability::Unreliable
                };
                let bytes = request.to_bytes();
                let mut out = Actions::new();
                let is_invite = request.method() == Some(&Method::Invite);
                let machine = if is_invite {
                    ClientMachine::Invite(ClientInvite::start(bytes, rel, &self.settings, &mut out))
                } else {
                    ClientMachine::NonInvite(ClientNonInvite::start(
                        bytes,
                        rel,
                        &self.settings,
                        &mut out,
                    ))
                };
                self.clients.insert(
                    id,
                    Box::new(ClientEntry {
                        key: key.clone(),
                        flow,
                        machine,
                        invite: is_invite.then(|| Box::new(request)),
                        events,
                    }),
                );
                self.client_index.insert(key, id);
                self.active += 1;
                self.held += 1;
                self.apply_client(id, false, out, None);
            }
        }
    }

    async fn on_timer(&mut self, id: TxId, timer: Timer) {
        let mut out = Actions::new();
        if let Some(entry) = self.servers.get_mut(&id) {
            let before = entry.machine.has_final();
            match &mut entry.machine {
                ServerMachine::Invite(m) => m.on_timer(timer, &mut out),
                ServerMachine::NonInvite(m) => m.on_timer(timer, &mut out),
            }
            self.apply_server(id, before, out).await;
        } else if let Some(entry) = self.clients.get_mut(&id) {
            let before = entry.machine.has_final();
            match &mut entry.machine {
                ClientMachine::Invite(m) => m.on_timer(timer, &mut out),
                ClientMachine::NonInvite(m) => m.on_timer(timer, &mut out),
            }
            self.apply_client(id, before, out, None);
        }
    }

    fn schedule(&mut self, id: TxId, timer: Timer, after: std::time::Duration) {
        match self.timer_keys.get(&(id, timer)) {
            Some(k) => self.timers.reset(k, after),
            None => {
                let k = self.timers.insert((id, timer), after);
                self.timer_keys.insert((id, timer), k);
            }
        }
    }

    fn cancel(&mut self, id: TxId, timer: Timer) {
        if let Some(k) = self.timer_keys.remove(&(id, timer)) {
            self.timers.remove(&k);
        }
    }

    async fn apply_server(&mut self, id: TxId, had_final: bool, actions: Actions) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(entry) = self.servers.get_mut(&id) else {
                return;
            };
            match action {
                Action::Transmit(bytes) => {
                    if let Err(e) = self.transports.send(&entry.flow, bytes) {
                        tracing::debug!(error = %e, "cannot send response");
                        let mut out = Actions::new();
                        match &mut entry.machine {
                            ServerMachine::Invite(m) => m.on_transport_error(&mut out),
                            ServerMachine::NonInvite(m) => m.on_transport_error(&mut out),
                        }
                        queue.extend(out);
                    }
                }
                Action::Schedule(t, d) => self.schedule(id, t, d),
                Action::Cancel(t) => self.cancel(id, t),
                Action::NeedTrying => {
                    if let (ServerMachine::Invite(m), Some(invite)) =
                        (&mut entry.machine, &entry.invite)
                    {
                        let mut trying = Message::response_to(invite, 100, "Trying");
                        crate::stack::responses::stamp(&mut trying);
                        let mut out = Actions::new();
                        m.on_tu_response(100, trying.to_bytes(), &mut out);
                        queue.extend(out);
                    }
                }
                // The ACK in the Accepted state is delivered by on_request; nothing else
                // reaches a server machine's Deliver.
                Action::Deliver => {}
                Action::Timeout | Action::TransportError => {
                    tracing::debug!(?action, "server transaction ended without completing");
                }
                Action::Terminated => {
                    let entry = self.servers.remove(&id).expect("present");
                    self.held -= 1;
                    if self.server_index.get(&entry.key) == Some(&id) {
                        self.server_index.remove(&entry.key);
                    }
                    // No timer is left to cancel: a machine cancels every timer it armed
                    // before it says Terminated (`ArmedTimers::cancel_all`).
                    //
                    // Counted until its first final; that final may have come in this very
                    // batch (over TCP a final ends the transaction at once), so what matters
                    // is whether it had one before the batch, not whether it has one now.
                    if !had_final {
                        self.active -= 1;
                    }
                    return;
                }
            }
        }
        if let Some(entry) = self.servers.get(&id) {
            if !had_final && entry.machine.has_final() {
                self.active -= 1;
            }
        }
    }

    fn apply_client(
        &mut self,
        id: TxId,
        had_final: bool,
        actions: Actions,
        mut message: Option<Message>,
    ) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(entry) = self.clients.get_mut(&id) else {
                return;
            };
            match action {
                Action::Transmit(bytes) => {
                    if let Err(e) = self.transports.send(&entry.flow, bytes) {
                        tracing::debug!(error = %e, "cannot send request");
                        let mut out = Actions::new();
                        match &mut entry.machine {
                            ClientMachine::Invite(m) => m.on_transport_error(&mut out),
                            ClientMachine::NonInvite(m) => m.on_transport_error(&mut out),
                        }
                        queue.extend(out);
                    }
                }
                Action::Schedule(t, d) => self.schedule(id, t, d),
                Action::Cancel(t) => self.cancel(id, t),
                Action::Deliver => {
                    if let Some(m) = message.take() {
                        entry.events.send(ClientEvent::Response(Box::new(m)));
                    }
                }
                Action::Timeout => {
                    entry.events.send(ClientEvent::Timeout);
                }
                Action::TransportError => {
                    entry.events.send(ClientEvent::TransportError);
                }
                Action::NeedTrying => {}
                Action::Terminated => {
                    let entry = self.clients.remove(&id).expect("present");
                    self.held -= 1;
                    // A newer transaction may have taken the key (a request resent with the
                    // same branch after this one ended); its index entry stays.
                    if self.client_index.get(&entry.key) == Some(&id) {
                        self.client_index.remove(&entry.key);
                    }
                    // No timer is left to cancel: a machine cancels every timer it armed
                    // before it says Terminated (`ArmedTimers::cancel_all`).
                    //
                    // Counted until its first final; that final may have come in this very
                    // batch (over TCP a final ends the transaction at once), so what matters
                    // is whether it had one before the batch, not whether it has one now.
                    if !had_final {
                        self.active -= 1;
                    }
                    return;
                }
            }
        }
        if let Some(entry) = self.clients.get(&id) {
            if !had_final && entry.machine.has_final() {
                self.active -= 1;
            }
        }
    }
}

/// The ACK a client INVITE transaction sends for a non-2xx final response (RFC 3261
/// §17.1.1.3): same Request-URI, Call-ID, From and CSeq number, the response's To, only the
/// top Via, and the request's Route set.
fn ack_for(request: &Message, response: &Message) -> Bytes {
    let Some(uri) = request.uri() else {
        return Bytes::new();
    };
    let mut ack = Message::request(Method::Ack, uri.clone());
    if let Ok(via) = request.top_via() {
        ack.push_header(HeaderName::Via, via.to_string());
    }
    for (name, value) in request.headers() {
        if matches!(
            name,
            HeaderName::Route | HeaderName::From | HeaderName::CallId
        ) {
            ack.push_header(name.clone(), Bytes::copy_from_slice(value));
        }
    }
    if let Ok(Some(to)) = response.header(&HeaderName::To) {
        ack.push_header(HeaderName::To, to.into_owned());
    }
    if let Ok(cseq) = request.cseq() {
        ack.push_header(HeaderName::CSeq, format!("{} ACK", cseq.seq));
    }
    ack.push_header(HeaderName::MaxForwards, "70");
    ack.push_header(HeaderName::ContentLength, "0");
    ack.to_bytes()
}

/// The runtime against real loopback UDP (and, for the reliable path, TCP) sockets and the
/// real `Transports`. A test plays the core through the channel and `LayerHandle`, and the
/// remote SIP element through a plain socket. Paused-time tests check the RFC 3261 timer
/// schedule exactly; real-time tests use millisecond timers and only assert orderings and
/// lower bounds, never tight upper bounds.
#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UdpSocket};
    use tokio::sync::mpsc::error::TryRecvError;
    use tokio::time::{sleep, sleep_until, timeout, Instant};
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::stack::responses;
    use crate::stack::stats::Stats;
    use crate::stack::transport::{Limits, Listeners, TransportKind};

    /// Timers small enough for real-time tests: Timer J/H/L = 64*T1 = 640 ms.
    const FAST: TimerSettings = TimerSettings {
        t1: Duration::from_millis(10),
        t2: Duration::from_millis(40),
        t4: Duration::from_millis(50),
    };

    /// How long a real-time test waits for something that should happen promptly.
    const PATIENCE: Duration = Duration::from_secs(2);

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Whether the active count reads `n` within [`PATIENCE`]. Only 0 wakes waiters, so
    /// other counts are polled.
    async fn reaches(active: &ActiveTransactions, n: usize) -> bool {
        timeout(PATIENCE, async {
            while active.get() != n {
                tokio::time::sleep(ms(2)).await;
            }
        })
        .await
        .is_ok()
    }

    /// A transaction layer on its own loopback listener, with the test as its core.
    struct Node {
        handle: LayerHandle,
        core: mpsc::Receiver<CoreEvent>,
        /// Where the layer listens (UDP or TCP, whichever the node was started with).
        addr: SocketAddr,
        stats: Arc<Stats>,
        stop: CancellationToken,
    }

    impl Drop for Node {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    /// One non-blocking loopback UDP listener, and its address.
    fn udp_listener() -> (Listeners, SocketAddr) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let listeners = Listeners {
            udp: vec![Arc::new(socket)],
            tcp: vec![],
            tls: vec![],
        };
        (listeners, addr)
    }

    fn test_limits() -> Limits {
        Limits {
            max_message_size: 65_535,
            max_connections: 16,
            max_connections_per_address: 16,
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(10),
            refused_user_agents: Vec::new(),
            flood: crate::stack::transport::flood::FloodLimit {
                rate: 0.0,
                burst: 0.0,
                ban: Duration::from_secs(1),
                exempt: Vec::new(),
            },
            max_transactions: 1_000_000,
        }
    }

    impl Node {
        async fn udp(settings: TimerSettings) -> Node {
            let (listeners, addr) = udp_listener();
            Node::start(listeners, addr, settings)
        }

        async fn tcp(settings: TimerSettings) -> Node {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let listeners = Listeners {
                udp: vec![],
                tcp: vec![listener],
                tls: vec![],
            };
            Node::start(listeners, addr, settings)
        }

        fn start(listeners: Listeners, addr: SocketAddr, settings: TimerSettings) -> Node {
            let limits = test_limits();
            let stats = Arc::new(Stats::default());
            let tracker = TaskTracker::new();
            let stop = CancellationToken::new();
            let stack = crate::stack::start(
                listeners,
                limits,
                stats.clone(),
                settings,
                &[tokio::runtime::Handle::current()],
                &tracker,
                stop.clone(),
                stop.clone(),
            );
            let handle = stack.layer;
            let core = stack.core_events.into_iter().next().expect("one shard");
            Node {
                handle,
                core,
                addr,
                stats,
                stop,
            }
        }

        /// The flow a client transaction uses to reach `remote` from this node.
        fn flow_to(&self, transport: TransportKind, remote: SocketAddr) -> Flow {
            Flow {
                transport,
                local: self.addr,
                remote,
                connection: None,
            }
        }

        /// The next event for the core, which must be a request.
        async fn next_request(&mut self) -> CoreRequest {
            let event = timeout(PATIENCE, self.core.recv())
                .await
                .expect("the core got nothing")
                .expect("the layer stopped");
            match event {
                CoreEvent::Request {
                    request,
                    flow,
                    tx,
                    cancels,
                } => CoreRequest {
                    request,
                    flow,
                    tx,
                    cancels,
                },
                other => panic!("expected a request, the core got {other:?}"),
            }
        }

        /// Waits until `LayerHandle::active` reads `n`.
        async fn active_becomes(&self, n: usize) {
            let active = self.handle.active();
            assert!(
                reaches(&active, n).await,
                "active transactions stayed at {} instead of becoming {n}",
                active.get()
            );
        }
    }

    struct CoreRequest {
        request: Message,
        flow: Flow,
        tx: Option<TxId>,
        cancels: Option<TxId>,
    }

    impl CoreRequest {
        fn method(&self) -> Method {
            self.request.method().cloned().expect("a request")
        }

        fn branch(&self) -> String {
            branch_of(&self.request)
        }
    }

    fn parse(bytes: impl Into<Bytes>) -> Message {
        Message::parse_datagram(bytes.into(), 65_535).expect("test messages parse")
    }

    fn branch_of(message: &Message) -> String {
        message
            .top_via()
            .unwrap()
            .branch()
            .expect("a branch")
            .to_owned()
    }

    fn to_tag_of(message: &Message) -> Option<String> {
        message.to().unwrap().tag().map(str::to_owned)
    }

    /// A request as a peer at `sent_by` would send it. `method` is also the CSeq method, which
    /// is right for everything here, ACK and CANCEL included.
    fn request_text(
        method: &str,
        transport: &str,
        sent_by: SocketAddr,
        branch: &str,
        call_id: &str,
        to_tag: Option<&str>,
    ) -> String {
        let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
        format!(
            "{method} sip:bob@example.com SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {sent_by};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:alice@example.com>;tag=alice1\r\n\
             To: <sip:bob@example.com>{to_tag}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 7 {method}\r\n\
             Content-Length: 0\r\n\
             \r\n"
        )
    }

    fn udp_request(
        method: &str,
        sent_by: SocketAddr,
        branch: &str,
        call_id: &str,
        to_tag: Option<&str>,
    ) -> Bytes {
        Bytes::from(request_text(
            method, "UDP", sent_by, branch, call_id, to_tag,
        ))
    }

    /// A UDP peer driven from async code, for real-time tests.
    struct Peer {
        socket: UdpSocket,
        addr: SocketAddr,
    }

    impl Peer {
        async fn new() -> Peer {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = socket.local_addr().unwrap();
            Peer { socket, addr }
        }

        async fn send(&self, to: SocketAddr, bytes: &[u8]) {
            self.socket.send_to(bytes, to).await.unwrap();
        }

        async fn try_recv_within(&self, wait: Duration) -> Option<Bytes> {
            let mut buf = vec![0u8; 65_536];
            match timeout(wait, self.socket.recv_from(&mut buf)).await {
                Ok(received) => {
                    let (n, _) = received.unwrap();
                    Some(Bytes::copy_from_slice(&buf[..n]))
                }
                Err(_) => None,
            }
        }

        async fn recv(&self) -> Bytes {
            self.try_recv_within(PATIENCE)
                .await
                .expect("the peer got nothing")
        }

        /// Reads and discards until the socket has been quiet for `quiet`.
        async fn drain(&self, quiet: Duration) -> usize {
            let mut n = 0;
            while self.try_recv_within(quiet).await.is_some() {
                n += 1;
            }
            n
        }
    }

    /// Everything already queued on a non-blocking std socket. Paused-time tests read this
    /// way because awaiting a read would let tokio jump the clock to the next timer.
    fn take_queued(socket: &std::net::UdpSocket) -> Vec<Bytes> {
        let mut buf = vec![0u8; 65_536];
        let mut out = Vec::new();
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => out.push(Bytes::copy_from_slice(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("receive failed: {e}"),
            }
        }
    }

    fn silent_peer() -> (std::net::UdpSocket, SocketAddr) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    }

    /// Drives a client transaction towards a peer that never answers, checking the number of
    /// copies sent at each checkpoint (virtual ms after the start), then the timeout at 32 s.
    async fn unanswered_client_transaction(method: &str, checkpoints: &[(u64, usize)]) {
        let node = Node::udp(TimerSettings::default()).await;
        let (peer, peer_addr) = silent_peer();
        let request = parse(udp_request(
            method,
            node.addr,
            "z9hG4bKsilent",
            "silent",
            None,
        ));
        let start = Instant::now();
        let mut events = node
            .handle
            .send_request(request, node.flow_to(TransportKind::Udp, peer_addr));

        let mut copies = Vec::new();
        for &(at, expected) in checkpoints {
            sleep_until(start + ms(at)).await;
            copies.extend(take_queued(&peer));
            assert_eq!(copies.len(), expected, "{method} copies sent by {at} ms");
        }
        let event = timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("no event within 60 s");
        let elapsed = start.elapsed();
        assert!(
            matches!(event, Some(ClientEvent::Timeout)),
            "expected a timeout, got {event:?}"
        );
        assert!(
            elapsed >= Duration::from_secs(32) && elapsed < ms(32_010),
            "timed out after {elapsed:?}, not 64*T1 = 32 s"
        );
        copies.extend(take_queued(&peer));
        let (last_checkpoint, expected) = *checkpoints.last().unwrap();
        assert_eq!(
            copies.len(),
            expected,
            "{method} copies sent between {last_checkpoint} ms and the timeout"
        );
        let first = parse(copies[0].clone());
        assert_eq!(first.method().map(Method::as_str), Some(method));
        assert!(
            copies.iter().all(|c| *c == copies[0]),
            "retransmissions repeat the request byte for byte"
        );
        assert_eq!(node.stats.sends_dropped.load(Ordering::Relaxed), 0);
        node.active_becomes(0).await;
        assert!(events.recv().await.is_none(), "nothing after the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_non_invite_is_sent_11_times_then_times_out_at_32_s() {
        // Sent at 0 and, with Timer E doubling from T1 = 0.5 s up to T2 = 4 s, at 0.5, 1.5,
        // 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5 and 31.5 s. Each checkpoint sits between two
        // sends.
        let checkpoints = [
            (250, 1),
            (1_000, 2),
            (2_500, 3),
            (5_500, 4),
            (9_500, 5),
            (13_500, 6),
            (17_500, 7),
            (21_500, 8),
            (25_500, 9),
            (29_500, 10),
            (31_750, 11),
        ];
        unanswered_client_transaction("OPTIONS", &checkpoints).await;
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_invite_is_sent_7_times_then_times_out_at_32_s() {
        // Timer A doubles without a cap: 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s.
        let checkpoints = [
            (250, 1),
            (1_000, 2),
            (2_500, 3),
            (5_500, 4),
            (11_500, 5),
            (23_500, 6),
            (31_750, 7),
        ];
        unanswered_client_transaction("INVITE", &checkpoints).await;
    }

    #[tokio::test]
    async fn non_invite_server_answers_retransmissions_itself_until_timer_j() {
        let mut node = Node::udp(FAST).await;
        let peer = Peer::new().await;
        let options = udp_request("OPTIONS", peer.addr, "z9hG4bKnist", "nist", None);
        peer.send(node.addr, &options).await;

        let first = node.next_request().await;
        assert_eq!(first.method(), Method::Options);
        assert_eq!(first.cancels, None);
        assert_eq!(first.flow.transport, TransportKind::Udp);
        assert_eq!(first.flow.remote, peer.addr);
        let tx = first.tx.expect("a request starts a server transaction");
        node.handle
            .respond(tx, responses::build(&first.request, 200, "OK"));

        let ok = peer.recv().await;
        let response = parse(ok.clone());
        assert_eq!(response.status(), Some(200));
        assert_eq!(response.call_id().unwrap(), "nist");
        assert_eq!(branch_of(&response), "z9hG4bKnist");

        // The retransmitted request is answered from the transaction, byte for byte.
        peer.send(node.addr, &options).await;
        assert_eq!(peer.recv().await, ok);
        assert_eq!(
            node.stats.retransmissions_absorbed.load(Ordering::Relaxed),
            1
        );
        // The inbound path is FIFO: if the retransmission had reached the core, it would
        // arrive before this probe.
        let probe = udp_request("OPTIONS", peer.addr, "z9hG4bKprobe", "probe", None);
        peer.send(node.addr, &probe).await;
        assert_eq!(node.next_request().await.branch(), "z9hG4bKprobe");

        // After Timer J (64*T1 = 640 ms) the transaction is gone, so the same request is new.
        sleep(FAST.transaction_timeout() + ms(200)).await;
        peer.send(node.addr, &options).await;
        let again = node.next_request().await;
        assert_eq!(again.branch(), "z9hG4bKnist");
        let again_tx = again.tx.expect("a new server transaction");
        assert_ne!(again_tx, tx, "a new transaction, not the old one");
    }

    #[tokio::test]
    async fn invite_server_sends_trying_retransmits_its_failure_and_absorbs_the_ack() {
        let mut node = Node::udp(FAST).await;
        let peer = Peer::new().await;
        let invite = udp_request("INVITE", peer.addr, "z9hG4bKist", "ist", None);
        let sent = Instant::now();
        peer.send(node.addr, &invite).await;
        let delivered = node.next_request().await;
        assert_eq!(delivered.method(), Method::Invite);
        let tx = delivered.tx.expect("an INVITE starts a server transaction");

        // The core stays silent, so the transaction answers 100 Trying after 200 ms.
        let trying = peer.recv().await;
        let waited = sent.elapsed();
        let trying_msg = parse(trying.clone());
        assert_eq!(trying_msg.status(), Some(100));
        assert_eq!(trying_msg.cseq().unwrap().method, Method::Invite);
        assert!(
            waited >= ms(200) && waited < ms(1_000),
            "100 Trying after {waited:?}, not 200 ms"
        );
        // A retransmitted INVITE gets the 100 again (and, checked below, not the core).
        peer.send(node.addr, &invite).await;
        assert_eq!(peer.recv().await, trying);

        node.handle
            .respond(tx, responses::build(&delivered.request, 486, "Busy Here"));
        let busy = peer.recv().await;
        let busy_msg = parse(busy.clone());
        assert_eq!(busy_msg.status(), Some(486));
        // Timer G: 10, 20, 40, 40 ... ms. Two retransmissions are enough to see it running.
        for _ in 0..2 {
            assert_eq!(peer.recv().await, busy, "Timer G repeats the 486 exactly");
        }

        let to_tag = to_tag_of(&busy_msg).expect("a 486 carries a To tag");
        let ack = udp_request("ACK", peer.addr, "z9hG4bKist", "ist", Some(&to_tag));
        peer.send(node.addr, &ack).await;
        // FIFO again: neither the retransmitted INVITE nor the ACK reached the core.
        let probe = udp_request("OPTIONS", peer.addr, "z9hG4bKprobe", "probe", None);
        peer.send(node.addr, &probe).await;
        assert_eq!(node.next_request().await.branch(), "z9hG4bKprobe");
        // Whatever Timer G sent before the ACK was processed is on its way; after that, the
        // 486 stops.
        peer.drain(ms(20)).await;
        let late = peer.try_recv_within(ms(250)).await;
        assert!(
            late.is_none(),
            "the 486 kept coming after the ACK: {late:?}"
        );

        // The ACK for a 2xx has its own branch, matches no transaction and goes to the core.
        let ack_2xx = udp_request("ACK", peer.addr, "z9hG4bKack2xx", "ist", Some(&to_tag));
        peer.send(node.addr, &ack_2xx).await;
        let routed = node.next_request().await;
        assert_eq!(routed.method(), Method::Ack);
        assert_eq!(routed.branch(), "z9hG4bKack2xx");
        assert_eq!(routed.tx, None);
        assert_eq!(routed.cancels, None);
    }

    #[tokio::test]
    async fn invite_client_acks_a_failure_and_delivers_it_once() {
        let node = Node::udp(FAST).await;
        let peer = Peer::new().await;
        let invite = parse(udp_request("INVITE", node.addr, "z9hG4bKcli", "cli", None));
        let mut events = node
            .handle
            .send_request(invite.clone(), node.flow_to(TransportKind::Udp, peer.addr));

        let sent = peer.recv().await;
        let received = parse(sent.clone());
        assert_eq!(received.method(), Some(&Method::Invite));
        let mut busy = Message::response_to(&received, 486, "Busy Here");
        busy.add_to_tag("peer486").unwrap();
        let busy = busy.to_bytes();
        peer.send(node.addr, &busy).await;

        // Timer A may have repeated the INVITE before the 486 arrived; skip those copies.
        let ack_bytes = loop {
            let next = peer.recv().await;
            if next != sent {
                break next;
            }
        };
        let ack = parse(ack_bytes.clone());
        assert_eq!(ack.method(), Some(&Method::Ack));
        assert_eq!(ack.uri(), invite.uri());
        assert_eq!(branch_of(&ack), "z9hG4bKcli");
        assert_eq!(ack.call_id().unwrap(), "cli");
        let cseq = ack.cseq().unwrap();
        assert_eq!((cseq.seq, cseq.method), (7, Method::Ack));
        assert_eq!(to_tag_of(&ack).as_deref(), Some("peer486"));
        assert_eq!(ack.from().unwrap().tag(), Some("alice1"));

        match timeout(PATIENCE, events.recv()).await.unwrap() {
            Some(ClientEvent::Response(r)) => assert_eq!(r.status(), Some(486)),
            other => panic!("expected the 486, got {other:?}"),
        }

        // The peer did not hear the ACK and repeats its 486: the ACK goes again, and the TU,
        // which has the response already, hears nothing. On this current-thread runtime the
        // layer finishes handling the 486 before the test runs again.
        peer.send(node.addr, &busy).await;
        assert_eq!(peer.recv().await, ack_bytes);
        assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
        // Timer A stopped with the 486: no more INVITEs (it would fire every 80+ ms by now).
        let late = peer.try_recv_within(ms(250)).await;
        assert!(late.is_none(), "sent after the ACK: {late:?}");
    }

    #[tokio::test]
    async fn active_counts_server_transactions_until_their_final_response() {
        let mut node = Node::udp(FAST).await;
        let peer = Peer::new().await;
        assert_eq!(node.handle.active().get(), 0);

        let options = udp_request("OPTIONS", peer.addr, "z9hG4bKact1", "act1", None);
        peer.send(node.addr, &options).await;
        let options = node.next_request().await;
        node.active_becomes(1).await;

        let invite = udp_request("INVITE", peer.addr, "z9hG4bKact2", "act2", None);
        peer.send(node.addr, &invite).await;
        let invite = node.next_request().await;
        node.active_becomes(2).await;

        // A provisional response leaves the INVITE waiting for its final one.
        node.handle.respond(
            invite.tx.unwrap(),
            responses::build(&invite.request, 180, "Ringing"),
        );
        let ringing = loop {
            let r = parse(peer.recv().await);
            if r.status() != Some(100) {
                break r;
            }
        };
        assert_eq!(ringing.status(), Some(180));
        assert_eq!(node.handle.active().get(), 2);

        node.handle.respond(
            options.tx.unwrap(),
            responses::build(&options.request, 200, "OK"),
        );
        node.active_becomes(1).await;
        // The INVITE transaction lives on in Completed, but it no longer counts.
        node.handle.respond(
            invite.tx.unwrap(),
            responses::build(&invite.request, 486, "Busy Here"),
        );
        node.active_becomes(0).await;
    }

    /// Over TCP a final response ends a transaction at once (no Completed state), so the
    /// final and the termination happen in one step.
    #[tokio::test]
    async fn active_returns_to_zero_when_a_reliable_transaction_ends_with_its_final_response() {
        let mut node = Node::tcp(FAST).await;
        let mut peer = TcpStream::connect(node.addr).await.unwrap();
        let peer_addr = peer.local_addr().unwrap();

        // Server side: the peer asks, the core answers.
        let options = request_text("OPTIONS", "TCP", peer_addr, "z9hG4bKtcp1", "tcp1", None);
        peer.write_all(options.as_bytes()).await.unwrap();
        let delivered = node.next_request().await;
        assert_eq!(delivered.flow.transport, TransportKind::Tcp);
        node.active_becomes(1).await;
        node.handle.respond(
            delivered.tx.unwrap(),
            responses::build(&delivered.request, 200, "OK"),
        );
        assert_eq!(read_stream_message(&mut peer).await.status(), Some(200));
        node.active_becomes(0).await;

        // Client side: the node asks over the same connection, the peer answers.
        let request = parse(request_text(
            "OPTIONS",
            "TCP",
            node.addr,
            "z9hG4bKtcp2",
            "tcp2",
            None,
        ));
        let mut events = node
            .handle
            .send_request(request, node.flow_to(TransportKind::Tcp, peer_addr));
        let received = read_stream_message(&mut peer).await;
        assert_eq!(received.method(), Some(&Method::Options));
        node.active_becomes(1).await;
        let ok = Message::response_to(&received, 200, "OK");
        peer.write_all(&ok.to_bytes()).await.unwrap();
        match timeout(PATIENCE, events.recv()).await.unwrap() {
            Some(ClientEvent::Response(r)) => assert_eq!(r.status(), Some(200)),
            other => panic!("expected the 200, got {other:?}"),
        }
        node.active_becomes(0).await;
    }

    /// Reads one body-less message from a stream.
    async fn read_stream_message(stream: &mut TcpStream) -> Message {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = timeout(PATIENCE, stream.read(&mut chunk))
                .await
                .expect("nothing read")
                .unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
        parse(buf)
    }

    #[tokio::test]
    async fn cancel_names_the_invite_transaction_it_matches() {
        let mut node = Node::udp(FAST).await;
        let peer = Peer::new().await;
        let invite = udp_request("INVITE", peer.addr, "z9hG4bKcan", "can", None);
        peer.send(node.addr, &invite).await;
        let invite = node.next_request().await;
        let invite_tx = invite.tx.unwrap();

        let cancel = udp_request("CANCEL", peer.addr, "z9hG4bKcan", "can", None);
        peer.send(node.addr, &cancel).await;
        let cancel = node.next_request().await;
        assert_eq!(cancel.method(), Method::Cancel);
        assert_eq!(cancel.cancels, Some(invite_tx));
        let cancel_tx = cancel.tx.expect("a CANCEL has its own transaction");
        assert_ne!(cancel_tx, invite_tx);

        // A CANCEL whose branch names no pending INVITE matches nothing.
        let stray = udp_request("CANCEL", peer.addr, "z9hG4bKother", "can", None);
        peer.send(node.addr, &stray).await;
        let stray = node.next_request().await;
        assert_eq!(stray.method(), Method::Cancel);
        assert_eq!(stray.cancels, None);
        assert!(stray.tx.is_some());
    }

    /// Two shards on the test's runtime: every request reaches the core of the shard its
    /// Call-ID hashes to, each answer finds its transaction through the one handle, a
    /// client transaction hears its response, and the active count covers both shards.
    #[tokio::test]
    async fn shards_split_by_call_id_and_share_one_handle() {
        let (listeners, addr) = udp_listener();
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let runtime = tokio::runtime::Handle::current();
        let mut stack = crate::stack::start(
            listeners,
            test_limits(),
            Arc::new(Stats::default()),
            FAST,
            &[runtime.clone(), runtime],
            &TaskTracker::new(),
            stop.clone(),
            stop,
        );
        let peer = Peer::new().await;
        let calls = 16;
        for i in 0..calls {
            let options = udp_request(
                "OPTIONS",
                peer.addr,
                &format!("z9hG4bKsh{i}"),
                &format!("shard-call-{i}"),
                None,
            );
            peer.send(addr, &options).await;
        }
        let mut per_shard = [0usize; 2];
        let mut requests = Vec::new();
        while requests.len() < calls {
            let mut got = false;
            for (shard, core) in stack.core_events.iter_mut().enumerate() {
                if let Ok(Some(event)) = timeout(ms(50), core.recv()).await {
                    let CoreEvent::Request { request, tx, .. } = event else {
                        panic!("expected a request, got {event:?}");
                    };
                    assert_eq!(crate::stack::shard::of_message(&request, 2), shard);
                    assert_eq!(
                        tx.unwrap().shard(),
                        shard,
                        "the transaction lives in its shard"
                    );
                    per_shard[shard] += 1;
                    requests.push((request, tx.unwrap()));
                    got = true;
                }
            }
            assert!(
                got,
                "only {} of {calls} requests reached a core",
                requests.len()
            );
        }
        assert!(per_shard.iter().all(|&n| n > 0), "{per_shard:?}");
        let active = stack.layer.active();
        assert!(
            reaches(&active, calls).await,
            "both shards count their pending requests"
        );
        for (request, tx) in &requests {
            stack
                .layer
                .respond(*tx, responses::build(request, 200, "OK"));
        }
        for _ in 0..calls {
            assert_eq!(parse(peer.recv().await).status(), Some(200));
        }
        timeout(PATIENCE, active.idle())
            .await
            .expect("every request has its final");

        // A request sent through the handle goes out from the shard its Call-ID names, so
        // the response, which the receive loops pass on by Call-ID, finds the transaction.
        for i in 0..4 {
            let options = parse(udp_request(
                "OPTIONS",
                addr,
                &format!("z9hG4bKout{i}"),
                &format!("out-{i}"),
                None,
            ));
            let flow = Flow {
                transport: TransportKind::Udp,
                local: addr,
                remote: peer.addr,
                connection: None,
            };
            let mut events = stack.layer.send_request(options, flow);
            let sent = parse(peer.recv().await);
            let answer = responses::build(&sent, 200, "OK");
            peer.send(addr, &answer.to_bytes()).await;
            let event = timeout(PATIENCE, events.recv()).await.expect("an answer");
            assert!(
                matches!(&event, Some(ClientEvent::Response(r)) if r.status() == Some(200)),
                "{event:?}"
            );
        }
    }
}
