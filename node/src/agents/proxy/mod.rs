//! The stateful, record-routing proxy (RFC 3261 §16) and inter-node forwarding
//! (node/DESIGN.md, "Edge nodes").
//!
//! - **Route set first.** Route entries naming this node are removed (§16.4). If the last
//!   one carries a flow token ([`crate::agents::proxy::flow_token`]), the request goes out
//!   over that flow: that is how another node hands over a call for a phone registered
//!   through this one, and how requests inside a dialog reach a phone behind NAT. Any other
//!   Route left on top is the next hop only if it is another member (and the rest of the
//!   set does not come back here, which would be a loop); otherwise an in-dialog request
//!   goes over the token's flow to the dialog's peer, never to a Route someone added.
//! - **Refusals are stateless.** Every answer the proxy gives before forwarding (407,
//!   403, 404, 480, 482) is sent once, with no transaction kept to retransmit it, since
//!   its source may be spoofed.
//! - **Domains compare canonically** (lowercase, no trailing dot), so `alice@EXAMPLE.COM`
//!   is a local caller who must authenticate like `alice@example.com`.
//! - **New requests from local accounts** are authenticated with 407 (§22.3). A request
//!   for a local domain looks up the AOR's bindings in the local replica (through the
//!   degraded-mode overlay): an unknown user gets 404, one without bindings 480, but only
//!   once a follower has caught up with the leader (`Replica::catch_up`), since a phone
//!   that has just registered through another node may not have reached it yet. A request
//!   for a domain not served here gets 403 until the dialplan can route it.
//! - **Forking.** Bindings are tried by q-value group, each group's contacts in parallel.
//!   A 2xx is forwarded at once and the other branches are CANCELled; a 6xx ends the
//!   search; otherwise the best final response of §16.7 goes back once every branch has
//!   answered. Timer C (§16.8) CANCELs a branch that rings too long. After the caller's
//!   CANCEL, if no branch has rung, the caller gets its 487 at once and the call's place in
//!   its account's limit goes ([`Fork::answer_cancel_now`]); a silent branch is CANCELled if
//!   it rings later.
//! - **A binding whose edge node is another node** is reached through that node, with a
//!   Route carrying a token for the binding's stored flow. If the edge node does not answer
//!   its peers ([`crate::cluster::peers`]), the request goes straight to the binding's public
//!   address.
//! - **Record-Route.** Each node adds two entries, one per side, each with a token for
//!   its side's flow (RFC 5658 double record-routing, RFC 5626 §5.3 flow tokens). Requests
//!   later in the dialog therefore take the same path and the same flows.
//! - **Only known dialogs.** A request inside a dialog passes only if the node's
//!   [`dialogs`] table knows the dialog by Call-ID and both tags (after a restart, also a
//!   dialog whose tokens were minted before it; after the table evicted it, by Call-ID and
//!   either tag); otherwise 481. The same table counts each
//!   local account's calls through this node against its `max_concurrent_calls`.
//! - **ACK for a 2xx** is forwarded statelessly along its Route set; an ACK for any other
//!   final response is handled hop by hop by the transaction layer.
//!
//! The decisions that need no I/O are in [`route`].

pub mod dialogs;
pub mod flow_token;
pub mod route;

pub use dialogs::Dialogs;

pub use route::takes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_raft_store::command::{Account, Binding};
use tandem_raft_store::tls::RefusalLog;
use tandem_raft_store::types::NodeId;
use tandem_sip::{canonical_domain, HeaderName, Host, Message, Method, NameAddr, SipUri, Uri};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::agents::auth::{Authenticated, Authenticator, Challenge};
use crate::agents::cdr::{Open, Recorder};
use crate::agents::location::flow_of_stored;
use crate::agents::location::overlay::BindingOverlay;
use crate::agents::proxy::dialogs::{CallRecords, DialogKind, Placer, Refused};
use crate::agents::proxy::flow_token::{FlowTokens, Token, TokenKind, DIALOG_TOKEN_LIFETIME};
use crate::agents::{Agent, Refusal, Stack};
use crate::clock::now_ms;
use crate::cluster::peers::{sip_addr, PeerMonitor};
use crate::cluster::ClusterNode;
use crate::stack::transaction::{ClientEvent, EventSink, LayerHandle, TxId};
use crate::stack::transport::{next_hop, transport_param, OwnAddrs};
use crate::stack::transport::{Flow, TransportKind, Transports};

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Timer C (§16.8): how long a branch may ring before it is CANCELled.
    pub timer_c: Duration,
    /// How long a CANCELled branch may stay without a final response before the proxy
    /// gives up on it (§9.1: 64*T1).
    pub cancel_give_up: Duration,
    /// The dialog table's size (`sip.max_dialogs`).
    pub max_dialogs: usize,
    /// How long a dialog must go unused before a full table may evict it.
    pub dialog_evict_idle: Duration,
}

/// Where one branch goes.
#[derive(Clone, Debug)]
struct Target {
    /// The new Request-URI, if it changes.
    uri: Option<Uri>,
    /// Route entries to put on top (an edge node's token Route, or a binding's Path).
    routes: Vec<String>,
    hop: Hop,
}

impl Target {
    /// The one branch of a request forwarded as it is, to `hop`.
    fn only(hop: Hop) -> Vec<Vec<Target>> {
        vec![vec![Target {
            uri: None,
            routes: Vec::new(),
            hop,
        }]]
    }
}

/// The local account placing a new request.
#[derive(Clone, Debug)]
struct Caller {
    /// Its name in the dialog table (its AOR URI).
    name: String,
    account: Arc<Account>,
}

/// An account's AOR as call records name it: `user@domain`.
fn record_name(a: &Account) -> String {
    format!("{}@{}", a.user, a.domain)
}

/// One way to reach a phone, for a request of the app server's own: the contact as
/// Request-URI, Route entries to put on top, and the flow to send on.
#[derive(Clone, Debug)]
pub struct Reach {
    pub contact: Uri,
    pub routes: Vec<String>,
    pub flow: Flow,
}

#[derive(Clone, Debug)]
enum Hop {
    /// A known flow (a binding's, or a token's).
    Flow(Flow),
    /// Resolve this URI (a Route entry, or a Request-URI).
    Uri(SipUri),
}

/// The proxy of one node.
pub struct Proxy {
    cluster: ClusterNode,
    overlay: Arc<BindingOverlay>,
    auth: Arc<Authenticator>,
    layer: LayerHandle,
    transports: Transports,
    tokens: FlowTokens,
    own: OwnAddrs,
    peers: Arc<PeerMonitor>,
    settings: ProxySettings,
    /// Running INVITE forwards by server transaction, for CANCEL.
    invites: Mutex<HashMap<TxId, mpsc::UnboundedSender<()>>>,
    pub dialogs: Arc<Dialogs>,
    /// Where the records of the calls this node carries go, on a node that keeps them.
    cdrs: Option<Recorder>,
    /// When this process started (Unix seconds): dialog tokens minted before it may
    /// belong to dialogs that its dialog table, empty at start, cannot know.
    started: u64,
}

/// The tags of a request: From's and To's (empty when absent).
fn tags(request: &Message) -> (String, String) {
    let tag = |h: Result<&NameAddr, tandem_sip::Error>| {
        h.ok()
            .and_then(|n| n.params.value("tag").map(str::to_owned))
            .unwrap_or_default()
    };
    (tag(request.from()), tag(request.to()))
}

/// Unix seconds now.
fn now_secs() -> u64 {
    now_ms() / 1000
}

/// The SIP URI of the topmost Route entry.
fn top_route(request: &Message) -> Option<SipUri> {
    request
        .name_addrs(&HeaderName::Route)
        .ok()?
        .into_iter()
        .next()?
        .uri
        .as_sip()
        .cloned()
}

fn sip_uri_of(value: &str) -> Option<SipUri> {
    NameAddr::parse(value, "Route")
        .ok()
        .and_then(|n| n.uri.as_sip().cloned())
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster: ClusterNode,
        overlay: Arc<BindingOverlay>,
        auth: Arc<Authenticator>,
        layer: LayerHandle,
        transports: Transports,
        own: OwnAddrs,
        peers: Arc<PeerMonitor>,
        settings: ProxySettings,
        cdrs: Option<Recorder>,
    ) -> Proxy {
        let tokens = FlowTokens::new(
            &cluster
                .keys()
                .derive_all(crate::agents::proxy::flow_token::KEY_LABEL),
        );
        let dialogs = Arc::new(Dialogs::with_recorder(
            settings.max_dialogs,
            settings.dialog_evict_idle,
            cdrs.clone(),
        ));
        Proxy {
            cluster,
            overlay,
            auth,
            layer,
            transports,
            tokens,
            own,
            peers,
            settings,
            invites: Mutex::default(),
            dialogs,
            cdrs,
            started: now_secs(),
        }
    }

    fn me(&self) -> NodeId {
        self.cluster.identity.node_id
    }

    /// A CANCEL matched the INVITE server transaction `invite`: stop its branches.
    pub fn cancel(&self, invite: TxId) {
        if let Some(signal) = self.invites.lock().expect("invite table lock").get(&invite) {
            let _ = signal.send(());
        }
    }

    /// Handles a request the dispatcher routes here. `tx` is `None` only for an ACK that matched
    /// no transaction (the ACK for a 2xx).
    pub fn handle(self: &Arc<Self>, request: Message, flow: Flow, tx: Option<TxId>) {
        let proxy = self.clone();
        // The CANCEL channel exists before the task runs, so a CANCEL handled by the dispatcher
        // right after this INVITE always finds it.
        let cancels = match tx {
            Some(tx) if request.method() == Some(&Method::Invite) => {
                let (signal, cancels) = mpsc::unbounded_channel();
                self.invites
                    .lock()
                    .expect("invite table lock")
                    .insert(tx, signal);
                Some(cancels)
            }
            _ => None,
        };
        tokio::spawn(async move {
            match tx {
                Some(tx) => {
                    proxy.clone().route(request, flow, tx, cancels).await;
                    proxy.invites.lock().expect("invite table lock").remove(&tx);
                }
                None => proxy.forward_ack(request, flow).await,
            }
        });
    }

    /// Whether a request's top Route is this node's with a genuine token: a request
    /// another node relays to a phone registered here, which drain must not refuse.
    pub fn is_relayed(&self, request: &Message) -> bool {
        top_route(request).is_some_and(|u| self.own.is_own(&u) && self.top_token(request, &u))
    }

    /// Whether `uri`, a Route entry of `request`, carries a genuine token of its dialog.
    fn top_token(&self, request: &Message, uri: &SipUri) -> bool {
        let call_id = request.call_id().unwrap_or_default();
        let (from_tag, to_tag) = tags(request);
        uri.user.as_deref().is_some_and(|user| {
            self.tokens
                .decode(user, &call_id, [&from_tag, &to_tag], now_secs())
                .is_some()
        })
    }

    /// Whether `request`'s top Route carries a genuine flow token of its own call: a
    /// request inside a dialog this cluster record-routed, whose sender saw our
    /// Record-Route, which the flood limit lets through a ban.
    ///
    /// Only a dialog token, only for a dialog this node knows (or whose tokens predate
    /// this process), and only from the address the token's flow names: the top Route of
    /// a request inside a dialog is this node's entry on the sender's side, so it names
    /// the sender's own flow, and a spoofer sending from elsewhere proves nothing.
    pub fn carries_own_token(&self, request: &Message, ip: std::net::IpAddr) -> bool {
        let Some(uri) = top_route(request) else {
            return false;
        };
        let call_id = request.call_id().unwrap_or_default();
        let (from_tag, to_tag) = tags(request);
        let now = now_secs();
        let Some(token) = uri.user.as_deref().and_then(|user| {
            self.tokens
                .decode(user, &call_id, [&from_tag, &to_tag], now)
        }) else {
            return false;
        };
        let before_start = token.minted < self.started
            && now.saturating_sub(token.minted) <= DIALOG_TOKEN_LIFETIME;
        token.kind == TokenKind::Dialog
            && token.flow.remote.ip() == ip
            && (before_start || self.dialogs.knows(&call_id, &from_tag, &to_tag))
    }

    /// The proxy's own refusals (407 and every other answer before anything is forwarded)
    /// are computed afresh for every copy of a request, and go out statelessly: the
    /// source of a request nobody has authenticated may be spoofed, and a refusal kept
    /// for retransmission until an ACK that never comes would be a reflection amplifier.
    fn answer(&self, tx: TxId, request: &Message, refusal: Refusal) {
        tracing::debug!(status = refusal.status, reason = %refusal.reason, "proxy answered");
        self.layer.respond_stateless(tx, refusal.response(request));
    }

    /// Removes the Route entries that name this node (§16.4): its addresses, or a domain
    /// it serves without a user part. Returns what the popped entries' tokens said.
    fn pop_own_routes(&self, request: &mut Message, (from_tag, to_tag): (&str, &str)) -> OwnRoutes {
        let call_id = request
            .call_id()
            .map(|c| c.into_owned())
            .unwrap_or_default();
        let now = now_secs();
        let routes = request.name_addrs(&HeaderName::Route).unwrap_or_default();
        let reader = self.cluster.replica.reader();
        let mut own = OwnRoutes::default();
        for uri in routes.iter().map_while(|r| r.uri.as_sip()) {
            let ours = self.own.is_own(uri)
                || (uri.user.is_none()
                    && reader.serves_domain(&uri.host.canonical()).unwrap_or(false));
            if !ours {
                break;
            }
            own.popped += 1;
            own.token = uri
                .user
                .as_deref()
                .and_then(|u| self.tokens.decode(u, &call_id, [from_tag, to_tag], now));
            if let Some(t) = own.token.filter(|t| t.kind == TokenKind::Dialog) {
                own.dialog_tokens += 1;
                if t.minted < self.started && now.saturating_sub(t.minted) <= DIALOG_TOKEN_LIFETIME
                {
                    own.minted_before_start += 1;
                }
            }
        }
        for _ in 0..own.popped {
            let _ = request.pop_first_value(&HeaderName::Route);
        }
        own
    }

    /// Removes the credentials this node checked: they are for its realms, and the callee
    /// has no business seeing them (§22.3).
    fn strip_own_credentials(&self, request: &mut Message) {
        let Ok(all) = request.auth_headers(&HeaderName::ProxyAuthorization) else {
            return;
        };
        if all.is_empty() {
            return;
        }
        let reader = self.cluster.replica.reader();
        request.remove_header(&HeaderName::ProxyAuthorization);
        for h in all {
            let ours = h
                .param("realm")
                .is_some_and(|r| reader.serves_domain(&canonical_domain(r)).unwrap_or(false));
            if !ours {
                request.push_header(HeaderName::ProxyAuthorization, h.to_string());
            }
        }
    }

    async fn route(
        self: Arc<Self>,
        mut request: Message,
        flow: Flow,
        tx: TxId,
        cancels: Option<mpsc::UnboundedReceiver<()>>,
    ) {
        let Some(method) = request.method().cloned() else {
            return;
        };
        let hash = route::loop_hash(&request);
        if route::is_loop(&request, &self.own, &hash) {
            self.answer(tx, &request, Refusal::new(482, "Loop Detected"));
            return;
        }
        let (from_tag, to_tag) = tags(&request);
        let own = self.pop_own_routes(&mut request, (&from_tag, &to_tag));
        let in_dialog = request
            .to()
            .is_ok_and(|to| to.params.value("tag").is_some());
        let call_id = request
            .call_id()
            .map(|c| c.into_owned())
            .unwrap_or_default();
        let next_route = top_route(&request);
        // The local account placing a new request, and the one a new request is for.
        let mut caller: Option<Caller> = None;
        let mut callee: Option<Account> = None;
        let decided: Result<Vec<Vec<Target>>, Refusal> = if in_dialog {
            // Inside a dialog only along a route set this node record-routed (genuine
            // dialog tokens), only for a dialog it knows, and only to another member or
            // to the dialog's peer on the far side (the flow the token names, which is
            // where the next Route of a genuine route set leads). Otherwise anyone who saw
            // a Record-Route could send anything anywhere from the cluster's address.
            let known = || {
                self.dialogs.knows(&call_id, &from_tag, &to_tag)
                    || own.minted_before_start == own.dialog_tokens
            };
            if own.dialog_tokens == 0 {
                Err(match next_route {
                    Some(_) => Refusal::new(403, "Forbidden (no route set through this node)"),
                    None => Refusal::new(404, "Not Here (no route set through this node)"),
                })
            } else if !known() {
                Err(Refusal::new(
                    481,
                    "Call/Transaction Does Not Exist (no such dialog through this node)",
                ))
            } else if let Some(next) = next_route {
                if self.names_member(&next) {
                    if self.routes_back_here(&request) {
                        Err(Refusal::new(
                            482,
                            "Loop Detected (the route set comes back to this node)",
                        ))
                    } else {
                        Ok(Target::only(Hop::Uri(next)))
                    }
                } else if let Some(flow) = own.dialog_flow() {
                    Ok(Target::only(Hop::Flow(flow)))
                } else {
                    Err(Refusal::new(
                        403,
                        "Forbidden (the route set leads outside the dialog)",
                    ))
                }
            } else if let Some(flow) = own.dialog_flow() {
                Ok(Target::only(Hop::Flow(flow)))
            } else {
                Err(Refusal::new(
                    404,
                    "Not Here (no route set through this node)",
                ))
            }
        } else if let Some(next) = next_route {
            // Loose routing to the next hop (§16.6 step 6), for a new request only to
            // another member and only after authenticating. A Route of the caller's
            // choosing elsewhere would make the cluster a relay for anyone with an
            // account, past its dialplans and its provider accounts' rules.
            if self.names_member(&next) {
                self.authorize_outbound(&request, &flow)
                    .await
                    .map(|account| {
                        caller = account;
                        Target::only(Hop::Uri(next))
                    })
            } else {
                Err(Refusal::new(
                    403,
                    "Forbidden (a new request may not be routed through this node to another host)",
                ))
            }
        } else if let Some(flow) = own.edge_flow() {
            Ok(Target::only(Hop::Flow(flow)))
        } else {
            self.initial_targets(&request, &flow)
                .await
                .map(|(groups, account, to)| {
                    caller = account;
                    callee = Some(to);
                    groups
                })
        };
        let groups = match decided {
            Ok(g) => g,
            Err(r) => {
                self.answer(tx, &request, r);
                return;
            }
        };
        // 100 Trying only for an INVITE that goes on: a refusal (407 first of all, for
        // every new call) is final at once, and the transaction sends a 100 of its own if
        // ever the answer takes 200 ms (RFC 3261 §17.2.1).
        if method == Method::Invite {
            let mut trying = Message::response_to(&request, 100, "Trying");
            crate::stack::responses::stamp(&mut trying);
            self.layer.respond(tx, trying);
        }
        // Phones put their credentials on ACK and BYE too (baresip and linphone do).
        self.strip_own_credentials(&mut request);
        let record_route = !in_dialog
            && matches!(
                method,
                Method::Invite | Method::Subscribe | Method::Refer | Method::Notify
            );
        let mut claim = None;
        if record_route {
            let kind = match method {
                Method::Invite => DialogKind::Call,
                _ => DialogKind::Subscription,
            };
            let placer = match &caller {
                Some(c) => Placer::Account(c.name.as_str(), c.account.max_concurrent_calls),
                None if own.edge_flow().is_some() => Placer::Member,
                None => Placer::Stranger,
            };
            // The call's records are written where it entered the cluster: the node that
            // found the callee's bindings (the edge node it is handed to does not).
            let records = match (&self.cdrs, &callee) {
                (Some(_), Some(to)) if kind == DialogKind::Call => {
                    Some(self.open_records(&request, &call_id, caller.as_ref(), to))
                }
                _ => None,
            };
            match self
                .dialogs
                .begin(&call_id, &from_tag, kind, placer, records)
            {
                Ok(()) => {
                    claim = Some(DialogClaim {
                        dialogs: self.dialogs.clone(),
                        call_id: call_id.clone(),
                        caller_tag: from_tag.clone(),
                        converted: false,
                    })
                }
                Err(Refused::Full) => {
                    // Strangers can fill their share of the table and then ask on and on:
                    // a line a second at most, counting those left out.
                    static FULL: RefusalLog = RefusalLog::new();
                    if let Some(more) = FULL.may_log() {
                        tracing::warn!(
                            refused_since_last_line = more,
                            "the dialog table is full of dialogs in use (sip.max_dialogs); \
                             a new dialog gets 503"
                        );
                    }
                    self.answer(
                        tx,
                        &request,
                        Refusal::new(503, "Service Unavailable (too many dialogs)"),
                    );
                    return;
                }
                Err(Refused::CallLimit) => {
                    let refusal = Refusal::new(
                        403,
                        "Forbidden (too many calls in progress for this account)",
                    );
                    if let (Some(recorder), Some(to)) = (&self.cdrs, &callee) {
                        let records = self.open_records(&request, &call_id, caller.as_ref(), to);
                        recorder.record(records.refused(refusal.status, &refusal.reason));
                    }
                    let (account, limit) = caller
                        .map(|c| (c.name, c.account.max_concurrent_calls))
                        .unwrap_or_default();
                    tracing::info!(%account, limit, "call refused: the account is at its max_concurrent_calls");
                    self.transports
                        .stats()
                        .call_limit_refusals
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.answer(tx, &request, refusal);
                    return;
                }
            }
        }
        let fork = Fork {
            call_id,
            claim,
            proxy: self.clone(),
            is_invite: method == Method::Invite,
            request,
            in_flow: flow,
            tx,
            hash,
            record_route,
            branches: Vec::new(),
            best: None,
            challenges: Vec::new(),
            answered: false,
            finished: false,
            cancelled: false,
        };
        self.forward(fork, groups, cancels).await;
    }

    /// The records of a new call to the local account `callee`: the caller's leg under
    /// the caller's account if it is local (else the callee's), the leg to the callee
    /// under the callee's.
    fn open_records(
        &self,
        request: &Message,
        call_id: &str,
        caller: Option<&Caller>,
        callee: &Account,
    ) -> CallRecords {
        let from = request
            .from()
            .map(|f| f.uri.to_string())
            .unwrap_or_default();
        let to = request.uri().map(|u| u.to_string()).unwrap_or_default();
        let calling = caller.map_or(callee, |c| &c.account);
        let (a, b) = (record_name(calling), record_name(callee));
        CallRecords::new(
            Open::new(call_id, "a", "in", &calling.customer, &a).with_parties(&from, &to),
            Open::new(call_id, "b1", "out", &callee.customer, &b).with_parties(&from, &to),
        )
    }

    /// Whether `uri` is another cluster member's SIP address, by the node registry.
    fn names_member(&self, uri: &SipUri) -> bool {
        let (kind, host, port) = next_hop(uri);
        let Some(ip) = host.ip() else {
            return false;
        };
        let addr = SocketAddr::new(ip, port);
        let nodes = self.cluster.replica.reader().nodes().unwrap_or_default();
        nodes
            .iter()
            .any(|n| n.id != self.me() && sip_addr(n, kind) == Some(addr))
    }

    /// Whether the Route set left after this node's own entries names this node again: a
    /// genuine route set passes each node once, so a request sent on from here would
    /// only bounce between members until Max-Forwards ran out.
    fn routes_back_here(&self, request: &Message) -> bool {
        request
            .name_addrs(&HeaderName::Route)
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.uri.as_sip())
            .any(|u| self.own.is_own(u))
    }

    /// A new request with a route of its own to another member: allowed for local accounts
    /// that authenticate.
    async fn authorize_outbound(
        &self,
        request: &Message,
        flow: &Flow,
    ) -> Result<Option<Caller>, Refusal> {
        let from = request.from().ok().and_then(|f| f.uri.as_sip().cloned());
        let Some(from) = from else {
            return Err(Refusal::new(403, "Forbidden (relaying denied)"));
        };
        let domain = from.host.canonical();
        let reader = self.cluster.replica.reader();
        if !reader.serves_domain(&domain).unwrap_or(false) {
            return Err(Refusal::new(403, "Forbidden (relaying denied)"));
        }
        self.authenticate_caller(request, flow, &from, &domain)
            .await
            .map(Some)
    }

    async fn authenticate_caller(
        &self,
        request: &Message,
        flow: &Flow,
        from: &SipUri,
        domain: &str,
    ) -> Result<Caller, Refusal> {
        let user = from.user_unescaped().unwrap_or_default().into_owned();
        match self
            .auth
            .authenticate(request, flow.remote.ip(), &user, domain, Challenge::Proxy)
            .await
        {
            Authenticated::Account(a) => Ok(Caller {
                name: tandem_raft_store::command::account_aor(&a.user, &a.domain),
                account: a,
            }),
            Authenticated::Refused(refusal) => Err(refusal),
        }
    }

    /// The local domain and user a Request-URI names: its own host if this cluster serves
    /// it; for a URI with this node's address as host, the To header's domain.
    fn local_target(&self, request: &Message) -> Option<(String, String)> {
        let uri = request.uri()?.as_sip()?;
        let user = uri.user_unescaped()?.into_owned();
        let reader = self.cluster.replica.reader();
        let host = uri.host.canonical();
        if reader.serves_domain(&host).unwrap_or(false) {
            return Some((user, host));
        }
        if self.own.is_own(uri) {
            let to = request.to().ok()?;
            let domain = to.uri.as_sip()?.host.canonical();
            if reader.serves_domain(&domain).unwrap_or(false) {
                return Some((user, domain));
            }
        }
        None
    }

    /// The branches of a new request for a local domain, the local account that placed
    /// it (authenticated), if any, and the account it is for.
    #[allow(clippy::type_complexity)]
    async fn initial_targets(
        &self,
        request: &Message,
        flow: &Flow,
    ) -> Result<(Vec<Vec<Target>>, Option<Caller>, Account), Refusal> {
        let method = request.method().cloned().unwrap_or(Method::Options);
        let from = request.from().ok().and_then(|f| f.uri.as_sip().cloned());
        let reader = self.cluster.replica.reader();
        let mut caller = None;
        // Callers claiming a local account prove it (§22.3); ACK and CANCEL cannot be
        // challenged, and never reach here (they are hop by hop or matched).
        if let Some(from) = &from {
            let domain = from.host.canonical();
            if reader.serves_domain(&domain).unwrap_or(false) && method != Method::Ack {
                caller = Some(
                    self.authenticate_caller(request, flow, from, &domain)
                        .await?,
                );
            }
        }
        let Some((user, domain)) = self.local_target(request) else {
            let host = request
                .uri()
                .and_then(Uri::as_sip)
                .map(|u| u.host.to_string())
                .unwrap_or_default();
            return Err(Refusal::new(
                403,
                format!("Forbidden (relaying denied: {host} is not served here)"),
            ));
        };
        let call_id = request.call_id().unwrap_or_default();
        let (from_tag, _) = tags(request);
        let (groups, callee) = self
            .binding_groups(&user, &domain, &call_id, &from_tag)
            .await?;
        Ok((groups, caller, callee))
    }

    /// The branches to every live binding of `user@domain`, grouped by q (highest first),
    /// for a request of `call_id` from `from_tag`, and the account; the refusal when
    /// there are none. Finding none, a follower first catches up with the leader
    /// (`Replica::catch_up`) and looks again: a phone that has just registered through
    /// another node reaches this replica a heartbeat and a one-way trip later, which
    /// between two sites is a few hundred milliseconds.
    async fn binding_groups(
        &self,
        user: &str,
        domain: &str,
        call_id: &str,
        from_tag: &str,
    ) -> Result<(Vec<Vec<Target>>, Account), Refusal> {
        let mut found = self.binding_groups_now(user, domain, call_id, from_tag);
        if matches!(found, Err(None)) && self.cluster.catch_up_for_sip().await {
            found = self.binding_groups_now(user, domain, call_id, from_tag);
        }
        found.map_err(|r| r.unwrap_or_else(|| Refusal::new(480, "Temporarily Unavailable")))
    }

    /// [`Proxy::binding_groups`] from what this replica holds now; `Err(None)` for an
    /// enabled account without a live binding, the case another node may know better.
    fn binding_groups_now(
        &self,
        user: &str,
        domain: &str,
        call_id: &str,
        from_tag: &str,
    ) -> Result<(Vec<Vec<Target>>, Account), Option<Refusal>> {
        let reader = self.cluster.replica.reader();
        let account = reader.account(domain, user).ok().flatten();
        let Some(account) = account else {
            return Err(Some(Refusal::new(404, "Not Found")));
        };
        if !account.enabled {
            return Err(Some(Refusal::new(480, "Temporarily Unavailable")));
        }
        let aor = tandem_raft_store::command::account_aor(&account.user, &account.domain);
        let now = now_ms();
        let bindings: Vec<Binding> = self
            .overlay
            .apply(&aor, reader.bindings(&aor).unwrap_or_default())
            .into_iter()
            .filter(|b| b.expires_at_ms > now)
            .collect();
        if bindings.is_empty() {
            return Err(None);
        }
        let targets: Vec<(u16, Target)> = bindings
            .iter()
            .filter_map(|b| Some((b.q, self.binding_target(b, call_id, from_tag)?)))
            .collect();
        if targets.is_empty() {
            return Err(Some(Refusal::new(
                480,
                "Temporarily Unavailable (no usable contact)",
            )));
        }
        Ok((route::q_groups(targets), account))
    }

    /// How to reach each phone of the local account `user@domain` for a new call of
    /// `call_id` from `from_tag`, grouped by q (highest first): for the app server, which
    /// rings local accounts with calls of its own along the same paths the proxy takes
    /// (node/DESIGN.md, "Edge nodes"). Phones that cannot be reached now are left out.
    pub async fn reach(
        &self,
        user: &str,
        domain: &str,
        call_id: &str,
        from_tag: &str,
    ) -> Result<Vec<Vec<Reach>>, Refusal> {
        let mut out = Vec::new();
        for group in self
            .binding_groups(user, domain, call_id, from_tag)
            .await?
            .0
        {
            let mut reach = Vec::new();
            for t in group {
                let (Some(contact), Ok(flow)) = (t.uri.clone(), self.resolve(&t.hop).await) else {
                    continue;
                };
                reach.push(Reach {
                    contact,
                    routes: t.routes,
                    flow,
                });
            }
            if !reach.is_empty() {
                out.push(reach);
            }
        }
        if out.is_empty() {
            return Err(Refusal::new(
                480,
                "Temporarily Unavailable (no usable contact)",
            ));
        }
        Ok(out)
    }

    /// How to reach one binding (node/DESIGN.md, "Edge nodes"): through its Path; over its
    /// flow if this node is its edge; through its edge node if that node answers; else
    /// straight to its public address.
    fn binding_target(&self, b: &Binding, call_id: &str, from_tag: &str) -> Option<Target> {
        let uri = Uri::parse(&b.contact).ok()?;
        if let Some(first) = b.path.first() {
            return Some(Target {
                uri: Some(uri),
                routes: b.path.clone(),
                hop: Hop::Uri(sip_uri_of(first)?),
            });
        }
        let stored = flow_of_stored(&b.flow)?;
        if b.edge_node == self.me() {
            return Some(Target {
                uri: Some(uri),
                routes: Vec::new(),
                hop: Hop::Flow(stored),
            });
        }
        let edge = self
            .cluster
            .replica
            .reader()
            .node(b.edge_node)
            .ok()
            .flatten();
        if let Some(edge_addr) = edge
            .as_ref()
            .and_then(|e| sip_addr(e, TransportKind::Udp))
            .filter(|_| self.peers.is_up(b.edge_node))
        {
            let route = format!(
                "<sip:{}@{edge_addr};lr>",
                self.tokens
                    .encode(&stored, TokenKind::Edge, call_id, from_tag, now_secs())
            );
            return Some(Target {
                uri: Some(uri),
                routes: vec![route],
                hop: Hop::Uri(SipUri::new(
                    None,
                    Host::Ip(edge_addr.ip()),
                    Some(edge_addr.port()),
                )),
            });
        }
        tracing::debug!(edge = b.edge_node, contact = %b.contact, "edge node not answering: sending to the binding's public address");
        let mut uri_direct = SipUri::new(
            None,
            Host::Ip(stored.remote.ip()),
            Some(stored.remote.port()),
        );
        if stored.transport != TransportKind::Udp {
            uri_direct.params.set(
                "transport",
                Some(&stored.transport.as_str().to_ascii_lowercase()),
            );
        }
        Some(Target {
            uri: Some(uri),
            routes: Vec::new(),
            hop: Hop::Uri(uri_direct),
        })
    }

    /// A flow for a hop: a known one, or the URI's transport and numeric (or resolved)
    /// address.
    async fn resolve(&self, hop: &Hop) -> Result<Flow, String> {
        match hop {
            Hop::Flow(f) => Ok(*f),
            Hop::Uri(uri) => {
                let (kind, host, port) = next_hop(uri);
                let addr: SocketAddr = match host {
                    Host::Ip(ip) => SocketAddr::new(ip, port),
                    Host::Domain(name) => tokio::net::lookup_host((name.as_str(), port))
                        .await
                        .map_err(|e| format!("cannot resolve {name}: {e}"))?
                        .next()
                        .ok_or_else(|| format!("{name} has no address"))?,
                };
                self.transports
                    .flow_to(kind, addr)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn record_route(&self, flow: &Flow, call_id: &str, caller_tag: &str, now: u64) -> String {
        let addr = self.own.advertised(flow.transport, flow.local);
        format!(
            "<sip:{}@{addr}{};lr>",
            self.tokens
                .encode(flow, TokenKind::Dialog, call_id, caller_tag, now),
            transport_param(flow.transport)
        )
    }

    /// Builds branch `index` of `request` for `target` over `out`.
    fn branch_request(
        &self,
        request: &Message,
        in_flow: &Flow,
        target: &Target,
        out: &Flow,
        branch: &str,
        record_route: bool,
    ) -> Message {
        let mut m = request.clone();
        if let Some(uri) = &target.uri {
            m.set_uri(uri.clone());
        }
        for r in target.routes.iter().rev() {
            m.prepend_header(HeaderName::Route, Bytes::from(r.clone()));
        }
        let hops = request
            .max_forwards()
            .ok()
            .flatten()
            .map_or(70, |n| n.saturating_sub(1));
        m.set_header(HeaderName::MaxForwards, hops.to_string());
        if record_route {
            let call_id = request.call_id().unwrap_or_default();
            let (from_tag, _) = tags(request);
            let now = now_secs();
            let (inner, outer) = (
                self.record_route(in_flow, &call_id, &from_tag, now),
                self.record_route(out, &call_id, &from_tag, now),
            );
            m.prepend_header(HeaderName::RecordRoute, inner);
            m.prepend_header(HeaderName::RecordRoute, outer);
        }
        set_content_length(&mut m);
        let via = self.own.advertised(out.transport, out.local);
        m.prepend_header(
            HeaderName::Via,
            format!(
                "SIP/2.0/{} {via};branch={branch};rport",
                out.transport.as_str()
            ),
        );
        m
    }

    /// Forwards statefully: the branches of each group in parallel, groups in turn, and
    /// the responses back through `tx` (§16.6–§16.8).
    async fn forward(
        self: Arc<Self>,
        mut fork: Fork,
        groups: Vec<Vec<Target>>,
        cancels: Option<mpsc::UnboundedReceiver<()>>,
    ) {
        let (_never, idle) = mpsc::unbounded_channel();
        let mut cancel_rx = cancels.unwrap_or(idle);
        if cancel_rx.try_recv().is_ok() {
            // Cancelled before a single branch started.
            let r = crate::stack::responses::build(&fork.request, 487, "Request Terminated");
            self.layer.respond(fork.tx, r);
            return;
        }
        let (events_tx, mut events) = mpsc::unbounded_channel::<(usize, ClientEvent)>();
        let mut spawner = Some(events_tx);
        let mut groups = groups.into_iter();
        let mut group_end = 0;
        if let (Some(first), Some(s)) = (groups.next(), spawner.as_ref()) {
            fork.start_group(first, s).await;
            group_end = fork.branches.len();
        }
        loop {
            if fork.finished && fork.branches.iter().all(|b| b.done) {
                break;
            }
            // Start the next group, or give the final answer, once a group has finished.
            if !fork.finished && fork.branches[..group_end].iter().all(|b| b.done) {
                let next = (!fork.answered && !fork.cancelled && !fork.six_hundred())
                    .then(|| groups.next())
                    .flatten();
                match (next, spawner.as_ref()) {
                    (Some(group), Some(s)) => {
                        fork.start_group(group, s).await;
                        group_end = fork.branches.len();
                        continue;
                    }
                    _ => {
                        fork.finish();
                        spawner = None;
                        // Every branch is done: the fork ends now, not at the next event
                        // (its client transactions' end, up to 32 s later), which would
                        // hold the call's claim, and so a place in the caller's
                        // `max_concurrent_calls`, that long after the call failed.
                        continue;
                    }
                }
            }
            if fork.answered && spawner.is_some() {
                spawner = None;
            }
            let timer_c = fork
                .branches
                .iter()
                .filter(|b| !b.done)
                .filter_map(|b| if b.cancel_sent { b.give_up } else { b.timer_c })
                .min();
            tokio::select! {
                Some(()) = cancel_rx.recv(), if !fork.cancelled => {
                    fork.cancelled = true;
                    fork.cancel_pending();
                    fork.answer_cancel_now();
                }
                event = events.recv() => match event {
                    Some((i, ev)) => fork.on_event(i, ev),
                    None => break,
                },
                _ = tokio::time::sleep_until(timer_c.unwrap_or_else(Instant::now)), if timer_c.is_some() => {
                    let now = Instant::now();
                    for i in 0..fork.branches.len() {
                        let b = &fork.branches[i];
                        if b.done {
                            continue;
                        }
                        if !b.cancel_sent && b.timer_c.is_some_and(|t| t <= now) {
                            tracing::debug!(branch = i, "Timer C fired: cancelling the branch");
                            fork.send_cancel(i);
                        } else if b.cancel_sent && b.give_up.is_some_and(|t| t <= now) {
                            // §9.1: no final response 64*T1 after the CANCEL; give up on it.
                            tracing::debug!(branch = i, "no answer to CANCEL: giving up on the branch");
                            fork.give_up(i);
                        }
                    }
                }
            }
        }
        if !fork.finished {
            fork.finish();
            return;
        }
        // The final response has gone upstream and every branch has its own. Until the
        // client transactions end (Timer M, 32 s after a 2xx) only retransmitted 2xx can
        // still come, and they go upstream as they are (RFC 6026). Nothing else of the
        // fork is needed, so a small task of its own relays them, and this one, which
        // holds the whole request's state (4.5 KB), ends now.
        let (layer, tx) = (fork.proxy.layer.clone(), fork.tx);
        drop(fork);
        // The channel ends once every branch's client transaction has ended: this one
        // sends nothing.
        drop(spawner);
        tokio::spawn(relay_retransmitted_2xx(layer, tx, events));
    }

    /// The ACK for a 2xx: forwarded statelessly along its Route set (§16.11).
    async fn forward_ack(self: Arc<Self>, mut request: Message, _flow: Flow) {
        let (from_tag, to_tag) = tags(&request);
        let own = self.pop_own_routes(&mut request, (&from_tag, &to_tag));
        if own.dialog_tokens == 0 {
            // Only along a route set this node record-routed, or it would relay anything.
            tracing::debug!("ACK with no route set through this node; dropped");
            return;
        }
        let call_id = request.call_id().unwrap_or_default();
        if !self.dialogs.knows(&call_id, &from_tag, &to_tag)
            && own.minted_before_start != own.dialog_tokens
        {
            tracing::debug!("ACK for a dialog this node does not know; dropped");
            return;
        }
        // As for any request inside a dialog: the next Route only if it is another
        // member (and does not come back here), else the dialog's peer over the token's
        // flow, never a Route someone appended.
        let hop = match (top_route(&request), own.dialog_flow()) {
            (Some(uri), _) if self.names_member(&uri) && !self.routes_back_here(&request) => {
                Hop::Uri(uri)
            }
            (_, Some(flow)) => Hop::Flow(flow),
            _ => {
                tracing::debug!("ACK whose route set leads outside the dialog; dropped");
                return;
            }
        };
        if request.max_forwards().ok().flatten() == Some(0) {
            return;
        }
        self.strip_own_credentials(&mut request);
        let out = match self.resolve(&hop).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "cannot forward ACK");
                return;
            }
        };
        let incoming = request
            .top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_owned))
            .unwrap_or_default();
        let branch = route::branch(&route::loop_hash(&request), fnv(&incoming) as usize);
        let target = Target {
            uri: None,
            routes: Vec::new(),
            hop,
        };
        let m = self.branch_request(&request, &out, &target, &out, &branch, false);
        let _ = self.transports.send(&out, m.to_bytes());
    }
}

/// Relays the 2xx retransmissions of an answered fork's branches upstream until every
/// branch's client transaction has ended.
async fn relay_retransmitted_2xx(
    layer: LayerHandle,
    tx: TxId,
    mut events: mpsc::UnboundedReceiver<(usize, ClientEvent)>,
) {
    while let Some((_, event)) = events.recv().await {
        if let ClientEvent::Response(r) = event {
            if r.status().is_some_and(|s| (200..300).contains(&s)) {
                relay_upstream(&layer, tx, *r);
            }
        }
    }
}

/// Sends a response upstream through the server transaction `tx`, without this node's
/// Via.
fn relay_upstream(layer: &LayerHandle, tx: TxId, mut response: Message) {
    let _ = response.pop_first_value(&HeaderName::Via);
    set_content_length(&mut response);
    layer.respond(tx, response);
}

/// Content-Length as the body really is: a message that came over UDP without one may
/// leave over a stream, where framing depends on it.
fn set_content_length(m: &mut Message) {
    let len = m.body().len().to_string();
    if m.header(&HeaderName::ContentLength)
        .ok()
        .flatten()
        .as_deref()
        != Some(len.as_str())
    {
        m.set_header(HeaderName::ContentLength, len);
    }
}

/// Whether a NOTIFY ends its subscription (RFC 6665 §4.1.3: Subscription-State
/// terminated).
fn terminates(notify: &Message) -> bool {
    notify
        .headers()
        .find(|(n, _)| n.as_str().eq_ignore_ascii_case("Subscription-State"))
        .is_some_and(|(_, v)| v.len() >= 10 && v[..10].eq_ignore_ascii_case(b"terminated"))
}

/// A small stable hash, for the stateless ACK branch.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// One branch of a forwarded request.
struct Branch {
    request: Message,
    flow: Flow,
    provisional: bool,
    done: bool,
    cancel_wanted: bool,
    cancel_sent: bool,
    timer_c: Option<Instant>,
    /// Once CANCELled: when to stop waiting for its final response.
    give_up: Option<Instant>,
}

/// What the Route entries naming this node said.
#[derive(Debug, Default)]
struct OwnRoutes {
    popped: usize,
    /// The last one's token, if it had a genuine one.
    token: Option<Token>,
    /// How many had a genuine dialog token: a route set this node record-routed.
    dialog_tokens: usize,
    /// How many of those were minted before this process started, within their
    /// lifetime: dialogs the table, empty at start, cannot know.
    minted_before_start: usize,
}

impl OwnRoutes {
    /// The flow of the last entry's edge token: another node hands over a request for a
    /// phone registered here.
    fn edge_flow(&self) -> Option<Flow> {
        self.token
            .filter(|t| t.kind == TokenKind::Edge)
            .map(|t| t.flow)
    }

    /// The flow of the last entry's dialog token: the dialog's peer on the far side.
    fn dialog_flow(&self) -> Option<Flow> {
        self.token
            .filter(|t| t.kind == TokenKind::Dialog)
            .map(|t| t.flow)
    }
}

/// A fork's claim on its dialog entry (see [`dialogs`]), given back when the fork ends.
struct DialogClaim {
    dialogs: Arc<Dialogs>,
    call_id: String,
    caller_tag: String,
    /// A 2xx turned the claim into a dialog that is up.
    converted: bool,
}

impl Drop for DialogClaim {
    fn drop(&mut self) {
        self.dialogs
            .release(&self.call_id, &self.caller_tag, self.converted);
    }
}

/// The state of one forwarded request: its branches and the best answer so far.
struct Fork {
    proxy: Arc<Proxy>,
    call_id: String,
    /// Its claim on the dialog entry, for a request this node record-routes.
    claim: Option<DialogClaim>,
    request: Message,
    in_flow: Flow,
    tx: TxId,
    hash: String,
    record_route: bool,
    is_invite: bool,
    branches: Vec<Branch>,
    /// The best final response so far, and whether this node made it up (a stand-in
    /// for a branch that timed out or could not be reached), built from the request as
    /// it arrived and so without a Via of ours to remove.
    best: Option<(Message, bool)>,
    /// Every challenge (WWW-Authenticate, Proxy-Authenticate) of the 401 and 407
    /// responses received, as they came, for the one that goes back (§16.7 step 7).
    challenges: Vec<(HeaderName, bytes::Bytes)>,
    /// A 2xx went back.
    answered: bool,
    /// The final response has gone back (or a 2xx has).
    finished: bool,
    cancelled: bool,
}

impl Fork {
    fn six_hundred(&self) -> bool {
        self.best
            .as_ref()
            .and_then(|(m, _)| m.status())
            .is_some_and(|s| s >= 600)
    }

    async fn start_group(
        &mut self,
        group: Vec<Target>,
        events: &mpsc::UnboundedSender<(usize, ClientEvent)>,
    ) {
        // Next hops are found side by side, so one slow DNS answer or TCP connect does not
        // hold up the group's other contacts.
        let lookups: Vec<_> = group
            .iter()
            .map(|t| {
                let (proxy, hop) = (self.proxy.clone(), t.hop.clone());
                tokio::spawn(async move { proxy.resolve(&hop).await })
            })
            .collect();
        for (target, lookup) in group.into_iter().zip(lookups) {
            let index = self.branches.len();
            let branch = route::branch(&self.hash, index);
            let resolved = lookup
                .await
                .unwrap_or_else(|e| Err(format!("next-hop lookup failed: {e}")));
            let out = match resolved {
                Ok(f) => f,
                Err(e) => {
                    tracing::info!(error = %e, "cannot reach a branch's next hop");
                    let stand_in = crate::stack::responses::build(
                        &self.request,
                        503,
                        "Service Unavailable (next hop unreachable)",
                    );
                    self.branches.push(Branch {
                        request: self.request.clone(),
                        flow: self.in_flow,
                        provisional: false,
                        done: true,
                        cancel_wanted: false,
                        cancel_sent: false,
                        timer_c: None,
                        give_up: None,
                    });
                    self.consider(stand_in, true);
                    continue;
                }
            };
            let m = self.proxy.branch_request(
                &self.request,
                &self.in_flow,
                &target,
                &out,
                &branch,
                self.record_route,
            );
            self.proxy.layer.send_request_to(
                m.clone(),
                out,
                EventSink::Tagged(events.clone(), index),
            );
            self.branches.push(Branch {
                request: m,
                flow: out,
                provisional: false,
                done: false,
                cancel_wanted: self.cancelled,
                cancel_sent: false,
                timer_c: None,
                give_up: None,
            });
        }
    }

    /// Sends a response upstream, without this node's Via.
    fn relay(&self, response: Message) {
        relay_upstream(&self.proxy.layer, self.tx, response);
    }

    /// Keeps a final response if it is the best so far.
    fn consider(&mut self, response: Message, stand_in: bool) {
        let status = response.status().unwrap_or(500);
        if !stand_in && matches!(status, 401 | 407) {
            for (name, value) in response.headers() {
                if matches!(
                    name,
                    HeaderName::WwwAuthenticate | HeaderName::ProxyAuthenticate
                ) {
                    self.challenges
                        .push((name.clone(), bytes::Bytes::copy_from_slice(value)));
                }
            }
        }
        if route::better(status, self.best.as_ref().and_then(|(m, _)| m.status())) {
            self.best = Some((response, stand_in));
        }
    }

    /// Keeps the dialog table current as finals go upstream: a BYE answered 2xx, 481 or
    /// 408 (or timed out) ends its dialog; a NOTIFY answered 2xx that terminates its
    /// subscription ends that. Other answers to a BYE (a 401 from downstream, say) leave
    /// the call up: the BYE will come again.
    fn track_dialog(&self, status: u16) {
        let (from_tag, to_tag) = tags(&self.request);
        let dialogs = &self.proxy.dialogs;
        match self.request.method() {
            Some(Method::Bye) if (200..300).contains(&status) || matches!(status, 408 | 481) => {
                dialogs.ended(&self.call_id, &from_tag, &to_tag, DialogKind::Call)
            }
            Some(Method::Notify) if (200..300).contains(&status) && terminates(&self.request) => {
                dialogs.ended(&self.call_id, &from_tag, &to_tag, DialogKind::Subscription)
            }
            _ => {}
        }
    }

    /// A response with a To tag to a request this node record-routed: the callee's
    /// side of the dialog, recorded before the response goes on, so the ACK or PRACK
    /// that answers it finds the dialog.
    fn note_callee(&mut self, response: &Message, status: u16) {
        let Some(claim) = self.claim.as_mut() else {
            return;
        };
        if !(101..300).contains(&status) {
            return;
        }
        let (_, to_tag) = tags(response);
        if !to_tag.is_empty() {
            let DialogClaim {
                dialogs,
                call_id,
                caller_tag,
                converted,
            } = claim;
            dialogs.answered(call_id, caller_tag, &to_tag, status, converted);
        }
    }

    fn on_event(&mut self, i: usize, event: ClientEvent) {
        match event {
            ClientEvent::Response(r) => {
                let r = *r;
                let status = r.status().unwrap_or(0);
                let b = &mut self.branches[i];
                if status < 200 {
                    b.provisional = true;
                    if self.is_invite {
                        b.timer_c = Some(Instant::now() + self.proxy.settings.timer_c);
                    }
                    if b.cancel_wanted && !b.cancel_sent {
                        self.send_cancel(i);
                    }
                    if status > 100 && !self.finished {
                        self.note_callee(&r, status);
                        self.relay(r);
                    }
                } else if status < 300 {
                    // Every 2xx goes upstream, retransmissions included (RFC 6026).
                    let first = !b.done;
                    b.done = true;
                    self.note_callee(&r, status);
                    if first && !self.answered {
                        self.track_dialog(status);
                    }
                    self.relay(r);
                    if first && !self.answered {
                        self.answered = true;
                        self.finished = true;
                        for j in 0..self.branches.len() {
                            if !self.branches[j].done {
                                self.branches[j].cancel_wanted = true;
                                if self.branches[j].provisional {
                                    self.send_cancel(j);
                                }
                            }
                        }
                    }
                } else if !b.done {
                    b.done = true;
                    self.consider(r, false);
                    if status >= 600 && self.is_invite {
                        self.cancel_pending();
                    }
                }
            }
            ClientEvent::Timeout | ClientEvent::TransportError => {
                let b = &mut self.branches[i];
                if !b.done {
                    b.done = true;
                    let (status, reason) = match event {
                        ClientEvent::Timeout => (408, "Request Timeout"),
                        _ => (503, "Service Unavailable (next hop unreachable)"),
                    };
                    self.consider(
                        crate::stack::responses::build(&self.request, status, reason),
                        true,
                    );
                }
            }
        }
    }

    /// CANCELs every branch still ringing, now or as soon as it has rung (§9.1).
    fn cancel_pending(&mut self) {
        for i in 0..self.branches.len() {
            if !self.branches[i].done {
                self.branches[i].cancel_wanted = true;
                if self.branches[i].provisional {
                    self.send_cancel(i);
                }
            }
        }
    }

    /// After the caller's CANCEL: if no branch still running has rung, none can be
    /// CANCELled yet (§9.1), and one that never answers (a phone whose NAT dropped the
    /// INVITE, a dead next hop) holds the fork until Timer B, 32 s. The caller is not
    /// kept waiting that long, nor is its call's place in `max_concurrent_calls` held:
    /// it gets its 487 now (as Kamailio's tm does by default), and the fork stays only to
    /// CANCEL a branch that rings late. A 2xx that still comes goes upstream (RFC 6026)
    /// for the caller to ACK and BYE; the claim stays, so the dialog is known for those,
    /// and it counts as a call again while it is up.
    fn answer_cancel_now(&mut self) {
        let ringing = self.branches.iter().any(|b| !b.done && b.provisional);
        if self.finished || !self.is_invite || ringing {
            return;
        }
        self.finish();
        if let Some(c) = &self.claim {
            c.dialogs.stop_counting(&c.call_id, &c.caller_tag);
        }
    }

    fn send_cancel(&mut self, i: usize) {
        let b = &mut self.branches[i];
        if b.cancel_sent || !self.is_invite {
            return;
        }
        b.cancel_sent = true;
        b.give_up = Some(Instant::now() + self.proxy.settings.cancel_give_up);
        let Some(cancel) = crate::stack::transaction::cancel_for(&b.request) else {
            return;
        };
        // The CANCEL's own answer matters to nobody; the INVITE branch answers 487.
        let _ = self.proxy.layer.send_request(cancel, b.flow);
    }

    /// Ends a branch that never answered its CANCEL.
    fn give_up(&mut self, i: usize) {
        self.branches[i].done = true;
        let (status, reason) = if self.cancelled {
            (487, "Request Terminated")
        } else {
            (408, "Request Timeout")
        };
        self.consider(
            crate::stack::responses::build(&self.request, status, reason),
            true,
        );
    }

    /// Tells the call's records (if it has any) how this forward failed: what the caller
    /// is sent for `best` (see [`Fork::finish`]).
    fn note_failure(&self, best: &Message) {
        let Some(claim) = self.claim.as_ref().filter(|_| self.is_invite) else {
            return;
        };
        let status = best.status().unwrap_or(500);
        let (code, reason, outcome) = if self.cancelled {
            (487, "Request Terminated".to_owned(), "cancelled")
        } else if status == 503 {
            (
                500,
                "Server Internal Error (next hop unavailable)".to_owned(),
                "failed",
            )
        } else {
            let reason = String::from_utf8_lossy(best.reason().unwrap_or_default()).into_owned();
            (status, reason, crate::agents::cdr::outcome_of(status))
        };
        claim
            .dialogs
            .failed(&claim.call_id, &claim.caller_tag, code, &reason, outcome);
    }

    /// Sends the best final response upstream unless a 2xx already went.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let best = self.best.take();
        let timed_out = match &best {
            None => true,
            Some((b, stand_in)) => *stand_in && b.status() == Some(408),
        };
        if timed_out && self.request.method() != Some(&Method::Invite) {
            // RFC 4320 §4.2: no 408 for a non-INVITE; the client has timed out already.
            self.track_dialog(408);
            self.proxy.layer.abandon(self.tx);
            return;
        }
        let Some((best, stand_in)) = best else {
            let r = if self.cancelled {
                crate::stack::responses::build(&self.request, 487, "Request Terminated")
            } else {
                crate::stack::responses::build(&self.request, 408, "Request Timeout")
            };
            self.track_dialog(408);
            self.note_failure(&r);
            self.proxy.layer.respond(self.tx, r);
            return;
        };
        let status = best.status().unwrap_or(500);
        self.track_dialog(status);
        self.note_failure(&best);
        if self.cancelled && status != 487 && self.is_invite {
            // The caller asked to stop: whatever its branches said, the call was
            // terminated at its request.
            let r = crate::stack::responses::build(&self.request, 487, "Request Terminated");
            self.proxy.layer.respond(self.tx, r);
        } else if status == 503 {
            // §16.7 step 6: a 503 from downstream must not make the caller think this
            // node is unavailable.
            let r = crate::stack::responses::build(
                &self.request,
                500,
                "Server Internal Error (next hop unavailable)",
            );
            self.proxy.layer.respond(self.tx, r);
        } else if stand_in {
            self.proxy.layer.respond(self.tx, best);
        } else {
            let mut best = best;
            if matches!(status, 401 | 407) {
                // §16.7 step 7: the caller must see every branch's challenges, unchanged,
                // so it can answer each realm at once.
                for (name, value) in std::mem::take(&mut self.challenges) {
                    let present = best.headers().any(|(n, v)| *n == name && v == &value[..]);
                    if !present {
                        best.push_header(name, value);
                    }
                }
            }
            self.relay(best);
        }
    }
}

impl Agent for Proxy {
    fn takes(&self, request: &Message, in_transaction: bool) -> bool {
        takes(request, in_transaction)
    }

    fn handle(self: Arc<Self>, request: Message, flow: Flow, tx: Option<TxId>, _stack: &Stack) {
        Proxy::handle(&self, request, flow, tx);
    }

    fn cancel(&self, invite: TxId) {
        Proxy::cancel(self, invite);
    }

    fn carries_on(&self, request: &Message) -> bool {
        self.is_relayed(request)
    }
}
