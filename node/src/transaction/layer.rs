//! The transaction layer's runtime: one task that owns every transaction, matches incoming
//! messages to them (RFC 3261 §17.1.3 and §17.2.3), drives the sans-IO machines, runs their
//! timers on tokio time and carries out what they ask for. Requests that start a server
//! transaction, ACKs for 2xx responses and responses that match nothing go to the core.

use std::collections::HashMap;
use std::future::poll_fn;

use bytes::Bytes;
use tandem_sip::{HeaderName, Message, Method};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use super::{
    Action, Actions, ClientInvite, ClientNonInvite, Reliability, ServerInvite, ServerNonInvite,
    Timer, TimerSettings,
};
use crate::transport::{response_flow, Flow, Inbound, InboundEvent, Transports};

/// Names one transaction for the lifetime of the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxId(u64);

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
// Messages travel by value on purpose: boxing would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ClientEvent {
    Response(Message),
    Timeout,
    TransportError,
}

enum Command {
    Respond {
        tx: TxId,
        response: Message,
    },
    SendRequest {
        request: Message,
        flow: Flow,
        events: mpsc::UnboundedSender<ClientEvent>,
    },
}

/// The core's way to answer requests and send new ones.
#[derive(Clone)]
pub struct LayerHandle {
    commands: mpsc::UnboundedSender<Command>,
    active: watch::Receiver<usize>,
}

impl LayerHandle {
    /// Sends a response through a server transaction. Responses for a transaction that
    /// has already ended are dropped, as RFC 3261 requires.
    pub fn respond(&self, tx: TxId, response: Message) {
        let _ = self.commands.send(Command::Respond { tx, response });
    }

    /// Starts a client transaction. The request must carry its top Via with a branch.
    pub fn send_request(
        &self,
        request: Message,
        flow: Flow,
    ) -> mpsc::UnboundedReceiver<ClientEvent> {
        let (events, rx) = mpsc::unbounded_channel();
        let _ = self.commands.send(Command::SendRequest {
            request,
            flow,
            events,
        });
        rx
    }

    /// Transactions still waiting for a final response; shutdown waits for this to reach 0.
    pub fn active(&self) -> watch::Receiver<usize> {
        self.active.clone()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ServerKey {
    /// RFC 3261 §17.2.3: branch, sent-by and method (ACK counted as INVITE).
    Branch {
        branch: String,
        sent_by: String,
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
            sent_by: format!("{}:{}", via.host, via.port.unwrap_or(0)),
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
    /// Kept for INVITEs only, to build a 100 Trying if the core is slow.
    invite: Option<Message>,
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
    request: Message,
    events: mpsc::UnboundedSender<ClientEvent>,
}

/// The layer's state, owned by its task.
pub struct TransactionLayer {
    settings: TimerSettings,
    transports: Transports,
    to_core: mpsc::Sender<CoreEvent>,
    servers: HashMap<TxId, ServerEntry>,
    server_index: HashMap<ServerKey, TxId>,
    clients: HashMap<TxId, ClientEntry>,
    client_index: HashMap<(String, Method), TxId>,
    timers: DelayQueue<(TxId, Timer)>,
    timer_keys: HashMap<(TxId, Timer), delay_queue::Key>,
    next_id: u64,
    active: usize,
    active_tx: watch::Sender<usize>,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl TransactionLayer {
    pub fn new(
        settings: TimerSettings,
        transports: Transports,
        to_core: mpsc::Sender<CoreEvent>,
    ) -> (TransactionLayer, LayerHandle) {
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (active_tx, active) = watch::channel(0);
        let layer = TransactionLayer {
            settings,
            transports,
            to_core,
            servers: HashMap::new(),
            server_index: HashMap::new(),
            clients: HashMap::new(),
            client_index: HashMap::new(),
            timers: DelayQueue::new(),
            timer_keys: HashMap::new(),
            next_id: 1,
            active: 0,
            active_tx,
            commands,
        };
        (
            layer,
            LayerHandle {
                commands: commands_tx,
                active,
            },
        )
    }

    /// Runs until `stop` is cancelled or every input has closed.
    pub async fn run(mut self, mut inbound: mpsc::Receiver<InboundEvent>, stop: CancellationToken) {
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

    fn publish_active(&self) {
        if *self.active_tx.borrow() != self.active {
            self.active_tx.send_replace(self.active);
        }
    }

    fn next_id(&mut self) -> TxId {
        self.next_id += 1;
        TxId(self.next_id)
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
                Some(request.clone()),
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
        self.servers.insert(id, entry);
        self.server_index.insert(key, id);
        self.active += 1;
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
                let request = &entry.request;
                m.on_response(status, || ack_for(request, &response), &mut out)
            }
        }
        self.apply_client(id, before, out, Some(response));
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Respond { tx, response } => {
                let Some(status) = response.status() else {
                    return;
                };
                let Some(entry) = self.servers.get_mut(&tx) else {
                    tracing::debug!(status, "response for a transaction that has ended; dropped");
                    return;
                };
                let before = entry.machine.has_final();
                let bytes = response.to_bytes();
                let mut out = Actions::new();
                match &mut entry.machine {
                    ServerMachine::Invite(m) => m.on_tu_response(status, bytes, &mut out),
                    ServerMachine::NonInvite(m) => m.on_tu_response(status, bytes, &mut out),
                }
                self.transports
                    .stats()
                    .responses_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.apply_server(tx, before, out).await;
            }
            Command::SendRequest {
                request,
                flow,
                events,
            } => {
                let Ok(key) = client_key(&request) else {
                    let _ = events.send(ClientEvent::TransportError);
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
                let machine = if request.method() == Some(&Method::Invite) {
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
                    ClientEntry {
                        key: key.clone(),
                        flow,
                        machine,
                        request,
                        events,
                    },
                );
                self.client_index.insert(key, id);
                self.active += 1;
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

    fn cancel_all(&mut self, id: TxId) {
        use Timer::*;
        for t in [A, B, D, E, F, G, H, I, J, K, L, M, Trying] {
            self.cancel(id, t);
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
                        crate::responses::stamp(&mut trying);
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
                    self.server_index.remove(&entry.key);
                    self.cancel_all(id);
                    if !entry.machine.has_final() {
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
                        let _ = entry.events.send(ClientEvent::Response(m));
                    }
                }
                Action::Timeout => {
                    let _ = entry.events.send(ClientEvent::Timeout);
                }
                Action::TransportError => {
                    let _ = entry.events.send(ClientEvent::TransportError);
                }
                Action::NeedTrying => {}
                Action::Terminated => {
                    let entry = self.clients.remove(&id).expect("present");
                    self.client_index.remove(&entry.key);
                    self.cancel_all(id);
                    if !entry.machine.has_final() {
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
