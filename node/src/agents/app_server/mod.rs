//! The app server: a back-to-back user agent for calls that leave the cluster. A local
//! account's call to a number that is not one of the cluster's accounts (`0301234@` its
//! own domain, or any user at a domain the cluster does not serve) runs the account's
//! dialplan (`dialplan/` crate), or without one goes out through the customer's only
//! provider account. A call to an account that has a dialplan (from anyone, or from a
//! provider to one of the customer's numbers) runs that account's dialplan. The app
//! server answers the caller itself and places new calls of its own, through the provider
//! with the provider account's identity and credentials, or to local phones
//! (node/DESIGN.md, "The app server").
//!
//! Only an authenticated local account can make the app server dial for itself: the
//! caller's INVITE is challenged (407) like any call from a local domain. Anyone else only
//! reaches an account's own dialplan, which dials on that account's behalf. Requests inside
//! its calls reach it by the Contact it gave each leg, `tdb-<token><leg>@<this node>`,
//! where the token is 128 random bits: a request naming any other token is answered 481.

pub mod bridge;
pub mod call;
pub mod callback;
pub mod dialog;
pub mod legs;
pub mod sdp;
pub mod timer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tandem_dialplan::{Limits, Sandbox};
use tandem_raft_store::command::Account;
use tandem_sip::{HeaderName, Message, Method};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agents::auth::Authenticator;
use crate::agents::reach::Reach;
use crate::agents::{Agent, Refusal, Stack};
use crate::cluster::ClusterNode;
use crate::stack::resolve::Resolver;
use crate::stack::transaction::{LayerHandle, TxId};
use crate::stack::transport::{Flow, OwnAddrs, TransportKind, Transports};

use dialog::CONTACT_PREFIX;

/// The app server's settings (`[app_server]`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a leg rings when the dial spec gives no time.
    pub ring_for: Duration,
    /// How often each leg of a connected call is asked whether it is still there.
    pub keepalive: Option<Duration>,
    /// The longest a call may last.
    pub max_call: Option<Duration>,
    /// The session interval (RFC 4028) we ask for on the legs we dial, and give a caller
    /// that supports timers without naming one, in seconds; 0: no session timers.
    pub session_expires: u32,
    /// Whether a `sip:` target in a dial spec may reach a non-public address.
    pub uri_private_targets: bool,
    /// Where calls through a provider account may go (`registration_agent.private_networks`).
    pub provider_reach: Reach,
    pub limits: Limits,
}

impl Settings {
    pub fn from_config(
        c: &crate::config::AppServerConfig,
        provider_reach: Reach,
        limits: &tandem_dialplan::Limits,
    ) -> Settings {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Settings {
            ring_for: Duration::from_secs(c.ring_secs),
            keepalive: secs(c.keepalive_secs),
            max_call: secs(c.max_call_secs),
            session_expires: c.session_expires_secs,
            uri_private_targets: c.uri_private_targets,
            provider_reach,
            limits: limits.clone(),
        }
    }
}

/// Which leg of a call a request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The caller's.
    A,
    /// The one the app server dialled.
    B,
}

/// A request inside one of our calls, for the call's task.
pub struct InDialog {
    pub request: Message,
    pub tx: Option<TxId>,
    pub side: Side,
}

/// The most calls the app server runs at once on one node; more get 503.
const MAX_CALLS: usize = 10_000;
/// Requests inside one call waiting for its task; more get 503 (the task relays one at a
/// time, and a peer that floods its own call must not hold unbounded memory).
const INBOX: usize = 16;

/// The users a call may dial: digits and letters with `+`, `*`, `.`, `-` and `_`, up to 32.
/// Anything else (a dial spec's `&`, `|`, `/`, `(`, `@` smuggled in %-escaped) is refused
/// before a dialplan sees it.
pub fn dialable(user: &str) -> bool {
    let rest = user.strip_prefix('+').unwrap_or(user);
    !rest.is_empty()
        && user.len() <= 32
        && rest
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"*.-_".contains(&c))
}

pub struct AppServer {
    cluster: ClusterNode,
    auth: Arc<Authenticator>,
    layer: LayerHandle,
    transports: Transports,
    own: OwnAddrs,
    resolver: Resolver,
    sandbox: Arc<Sandbox>,
    settings: Settings,
    /// The proxy: how to reach local accounts' phones, and its table of calls, where the
    /// app server's calls count too (against each account's `max_concurrent_calls`, and
    /// for drain).
    proxy: Arc<crate::agents::proxy::Proxy>,
    /// The task of each call's leg, by the leg's token.
    calls: Mutex<HashMap<String, (mpsc::Sender<InDialog>, Side)>>,
    /// What stops each call still ringing, by the caller's INVITE transaction.
    ringing: Mutex<HashMap<TxId, CancellationToken>>,
    /// Where the calls' records go; none if the node keeps no CDRs.
    cdrs: Option<crate::agents::cdr::Recorder>,
    /// Calls running here, by customer, against each customer's `max_calls`.
    customer_calls: Mutex<HashMap<String, u32>>,
    /// The callbacks placed here.
    callbacks: callback::Callbacks,
}

impl AppServer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster: ClusterNode,
        auth: Arc<Authenticator>,
        layer: LayerHandle,
        transports: Transports,
        own: OwnAddrs,
        resolver: Resolver,
        settings: Settings,
        proxy: Arc<crate::agents::proxy::Proxy>,
        cdrs: Option<crate::agents::cdr::Recorder>,
    ) -> AppServer {
        AppServer {
            cdrs,
            customer_calls: Mutex::new(HashMap::new()),
            callbacks: callback::Callbacks::default(),
            proxy,
            sandbox: Arc::new(Sandbox::new(settings.limits.clone())),
            cluster,
            auth,
            layer,
            transports,
            own,
            resolver,
            settings,
            calls: Mutex::new(HashMap::new()),
            ringing: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a new INVITE is for the app server: from a local domain, to a number that
    /// is not an account here.
    fn is_outbound(&self, request: &Message) -> bool {
        self.caller_claims_local(request) && self.leaves(request)
    }

    /// Whether a new INVITE's Request-URI is a number or a user that is not one of the
    /// cluster's accounts.
    fn leaves(&self, request: &Message) -> bool {
        let Some(uri) = request.uri().and_then(|u| u.as_sip()) else {
            return false;
        };
        if self.own.is_own(uri) {
            return false;
        }
        let reader = self.cluster.replica.reader();
        let host = uri.host.canonical();
        if !reader.serves_domain(&host).unwrap_or(false) {
            return true;
        }
        let Some(user) = uri.user_unescaped() else {
            return false;
        };
        reader.account(&host, &user).ok().flatten().is_none()
    }

    /// Whether every Route of a request names this node (a phone whose outbound proxy is
    /// this node sends one), and none is another node's relay of a call to a phone
    /// registered here: a Route elsewhere is the proxy's to refuse, a relayed call the
    /// proxy's to deliver.
    fn routes_only_here(&self, request: &Message) -> bool {
        !self.proxy.is_relayed(request)
            && request
                .name_addrs(&HeaderName::Route)
                .unwrap_or_default()
                .iter()
                .all(|r| r.uri.as_sip().is_some_and(|u| self.own.is_own(u)))
    }

    /// The call and leg a Request-URI of ours names, if it is one of our Contacts.
    fn addressed(&self, request: &Message) -> Option<(String, Side)> {
        let uri = request.uri()?.as_sip()?;
        if !self.own.is_own(uri) {
            return None;
        }
        let user = uri.user.as_deref()?;
        let rest = user.strip_prefix(CONTACT_PREFIX)?;
        let (token, side) = rest.split_at(rest.len().checked_sub(1)?);
        let side = match side {
            "a" => Side::A,
            "b" => Side::B,
            _ => return None,
        };
        Some((token.to_owned(), side))
    }

    /// The local account a new INVITE calls, if that account has a dialplan for calls to
    /// it.
    fn scripted_callee(&self, request: &Message) -> Option<Account> {
        let uri = request.uri()?.as_sip()?;
        self.incoming_plan_account(&uri.host.canonical(), &uri.user_unescaped()?)
    }

    /// Account `user@domain`, if it is enabled and has a dialplan for calls to it.
    pub fn incoming_plan_account(&self, domain: &str, user: &str) -> Option<Account> {
        let reader = self.cluster.replica.reader();
        let account = reader
            .account(domain, user)
            .ok()
            .flatten()
            .filter(|a| a.enabled)?;
        let owner =
            tandem_raft_store::command::incoming_dialplan_owner(&account.user, &account.domain);
        reader
            .dialplan(&owner)
            .ok()
            .flatten()
            .filter(|d| !d.script.trim().is_empty())?;
        Some(account)
    }

    /// Whether `request`'s From is in a domain this cluster serves (a caller there must
    /// prove it is that account).
    fn caller_claims_local(&self, request: &Message) -> bool {
        let reader = self.cluster.replica.reader();
        request
            .from()
            .ok()
            .and_then(|f| f.uri.as_sip().map(|u| u.host.canonical()))
            .is_some_and(|d| reader.serves_domain(&d).unwrap_or(false))
    }

    /// Whether a new INVITE from outside the served domains, for a number, may be a
    /// trusted trunk's: only then does it come here rather than to the proxy (which refuses
    /// to relay it), and [`AppServer::spawn_call`] checks the trunk against the flow.
    fn maybe_trunk(&self, request: &Message) -> bool {
        !self.caller_claims_local(request)
            && self.leaves(request)
            && self
                .cluster
                .replica
                .reader()
                .trunks()
                .is_ok_and(|t| t.iter().any(|t| t.enabled))
    }

    /// The account a call from a trusted trunk is made as, if `flow` is one of an enabled
    /// trunk's, and its account is enabled and the trunk customer's.
    fn trunk_account(&self, flow: &Flow) -> Option<Arc<Account>> {
        let reader = self.cluster.replica.reader();
        reader
            .trunks()
            .ok()?
            .into_iter()
            .filter(|t| crate::agents::auth::trunks::admits(t, flow))
            .find_map(|trunk| {
                let (user, domain) = trunk.account.split_once('@')?;
                let account = reader
                    .account(domain, user)
                    .ok()
                    .flatten()
                    .filter(|a| a.enabled && a.customer == trunk.customer)?;
                tracing::debug!(trunk = %trunk.id(), source = %flow.remote, "a call from a trusted trunk");
                Some(Arc::new(account))
            })
    }

    /// Checks a new INVITE and starts its call. Everything that refuses it (the caller's
    /// credentials first) is decided here, statelessly, before any state is kept. It waits
    /// only when credentials need this replica to catch up (`Authenticator::authenticate`).
    async fn spawn_call(self: Arc<Self>, request: Message, flow: Flow, tx: TxId) {
        // A CANCEL that comes while the caller's credentials wait finds the call here.
        let pending = Pending::new(&self, tx);
        let refuse = |r: Refusal| self.layer.respond_stateless(tx, r.response(&request));
        // A trusted trunk's call for a number, whatever its From claims (a PBX may send
        // its users' local addresses): made as the trunk's account, without digest.
        let trunk = if self.leaves(&request) {
            self.trunk_account(&flow)
        } else {
            None
        };
        if let Some(account) = trunk {
            return self.start_outbound(request, flow, tx, account, pending);
        }
        if !self.caller_claims_local(&request) && self.leaves(&request) {
            // From outside, for a number, and not from a trunk: the caller hears what
            // the proxy would have said, so that whether a cluster has trunks shows
            // nowhere.
            let host = request.uri().and_then(|u| u.as_sip()).map(|u| &u.host);
            let served = host.is_some_and(|h| {
                let reader = self.cluster.replica.reader();
                reader.serves_domain(&h.canonical()).unwrap_or(false)
            });
            let host = host.map(|h| h.to_string()).unwrap_or_default();
            return refuse(if served {
                Refusal::new(404, "Not Found")
            } else {
                Refusal::new(
                    403,
                    format!("Forbidden (relaying denied: {host} is not served here)"),
                )
            });
        }
        if !self.is_outbound(&request) {
            // A call to a local account with a dialplan. A caller claiming a local
            // account proves it, as the proxy would make it; anyone else may call.
            let Some(callee) = self.scripted_callee(&request) else {
                return refuse(Refusal::new(404, "Not Found"));
            };
            if self.caller_claims_local(&request) {
                if let Err(r) = call::authenticate(&self, &request, &flow).await {
                    return refuse(r);
                }
                if pending.token.is_cancelled() {
                    return refuse(Refusal::new(487, "Request Terminated"));
                }
            }
            return self.start_call(
                request,
                flow,
                tx,
                Arc::new(callee),
                call::Direction::Local,
                pending,
            );
        }
        let account = match call::authenticate(&self, &request, &flow).await {
            Ok(a) => a,
            Err(r) => return refuse(r),
        };
        if pending.token.is_cancelled() {
            return refuse(Refusal::new(487, "Request Terminated"));
        }
        self.start_outbound(request, flow, tx, account, pending);
    }

    /// A call out, made as `account`: the number must be plain.
    fn start_outbound(
        self: Arc<Self>,
        request: Message,
        flow: Flow,
        tx: TxId,
        account: Arc<Account>,
        pending: Pending,
    ) {
        let refuse = |r: Refusal| self.layer.respond_stateless(tx, r.response(&request));
        let user = request
            .uri()
            .and_then(|u| u.as_sip())
            .and_then(|u| u.user_unescaped())
            .map(|u| u.into_owned())
            .unwrap_or_default();
        if !dialable(&user) {
            return refuse(Refusal::new(
                484,
                "Address Incomplete (a number is up to 32 of 0-9 A-Z a-z + * . - _)",
            ));
        }
        self.start_call(
            request,
            flow,
            tx,
            account,
            call::Direction::Outbound,
            pending,
        );
    }

    /// A provider's call to one of the customer's numbers, whose account `callee` has a
    /// dialplan (`ProviderInbound` decided both): that dialplan runs.
    pub fn spawn_inbound(self: Arc<Self>, request: Message, flow: Flow, tx: TxId, callee: Account) {
        let pending = Pending::new(&self, tx);
        self.start_call(
            request,
            flow,
            tx,
            Arc::new(callee),
            call::Direction::Inbound,
            pending,
        );
    }

    /// The checks every new call passes, then its task. `account` is the one whose
    /// dialplan runs; `pending` is what a CANCEL of its INVITE has reached so far.
    fn start_call(
        self: Arc<Self>,
        request: Message,
        flow: Flow,
        tx: TxId,
        account: Arc<Account>,
        direction: call::Direction,
        pending: Pending,
    ) {
        let refuse = |r: Refusal| self.layer.respond_stateless(tx, r.response(&request));
        let reader = self.cluster.replica.reader();
        let customer_on = reader
            .customer(&account.customer)
            .ok()
            .flatten()
            .is_some_and(|c| c.enabled);
        if !customer_on {
            return refuse(Refusal::new(403, "Forbidden (the customer is disabled)"));
        }
        let one_sip_contact = matches!(
            request.contacts(),
            Ok(Some(tandem_sip::Contacts::List(list)))
                if list.len() == 1 && list[0].uri.as_sip().is_some()
        );
        if !one_sip_contact {
            return refuse(Refusal::new(
                400,
                "Bad Request (a call needs one sip: or sips: Contact)",
            ));
        }
        if request.max_forwards().ok().flatten() == Some(0) {
            return refuse(Refusal::new(483, "Too Many Hops"));
        }
        let customer_guard = match self.customer_slot(&account.customer) {
            Ok(g) => g,
            Err(r) => return refuse(r),
        };
        let (guard, a_rx, b_rx) = match self.register_call(Some(tx)) {
            Ok(t) => t,
            Err(r) => return refuse(r),
        };
        let tokens = guard.tokens.clone();
        // From here the call's guard takes the INVITE out of `ringing` when it ends.
        let cancelled = pending.hand_over();
        tokio::spawn(async move {
            let _guard = guard;
            let _customer = customer_guard;
            let start = call::Start {
                invite: request,
                flow,
                tx,
                account,
                direction,
                tokens,
            };
            call::run(_guard.app.clone(), start, cancelled, a_rx, b_rx).await;
        });
    }
}

impl AppServer {
    /// Counts a new call of `customer` against its `max_calls`, until the guard drops; a
    /// limit that cannot be read refuses the call rather than lift the limit.
    fn customer_slot(self: &Arc<Self>, customer: &str) -> Result<CustomerCall, Refusal> {
        let Ok(limit) = self
            .cluster
            .replica
            .reader()
            .customer_settings(customer)
            .map(|s| s.max_calls)
        else {
            return Err(Refusal::new(500, "Server Internal Error"));
        };
        let mut running = self.customer_calls.lock().expect("customer calls lock");
        let n = running.entry(customer.to_owned()).or_insert(0);
        if limit > 0 && *n >= limit {
            drop(running);
            tracing::info!(
                customer,
                limit,
                "call refused: the customer is at its max_calls"
            );
            return Err(Refusal::new(
                403,
                "Forbidden (too many calls in progress for this customer)",
            ));
        }
        *n += 1;
        Ok(CustomerCall {
            app: self.clone(),
            customer: customer.to_owned(),
        })
    }

    /// Tokens for a new call's two legs, with the channels their requests come on; the
    /// guard takes them out of the table when the call ends.
    #[allow(clippy::type_complexity)]
    fn register_call(
        self: &Arc<Self>,
        tx: Option<TxId>,
    ) -> Result<
        (
            CallGuard,
            mpsc::Receiver<InDialog>,
            mpsc::Receiver<InDialog>,
        ),
        Refusal,
    > {
        let mut rng = rand::thread_rng();
        let tokens = [
            format!("{:032x}", rng.gen::<u128>()),
            format!("{:032x}", rng.gen::<u128>()),
        ];
        let (a_tx, a_rx) = mpsc::channel(INBOX);
        let (b_tx, b_rx) = mpsc::channel(INBOX);
        let mut calls = self.calls.lock().expect("calls lock");
        if calls.len() >= 2 * MAX_CALLS {
            return Err(Refusal::new(503, "Service Unavailable (too many calls)"));
        }
        calls.insert(tokens[0].clone(), (a_tx, Side::A));
        calls.insert(tokens[1].clone(), (b_tx, Side::B));
        let guard = CallGuard {
            app: self.clone(),
            tokens,
            tx,
        };
        Ok((guard, a_rx, b_rx))
    }
}

/// One of a customer's calls, counted until it ends (or is refused before it starts).
struct CustomerCall {
    app: Arc<AppServer>,
    customer: String,
}

impl Drop for CustomerCall {
    fn drop(&mut self) {
        let mut running = self.app.customer_calls.lock().expect("customer calls lock");
        if let Some(n) = running.get_mut(&self.customer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.customer);
            }
        }
    }
}

/// Removes a call from the tables when its task ends, however it ends.
struct CallGuard {
    app: Arc<AppServer>,
    tokens: [String; 2],
    /// The caller's INVITE, while it may be cancelled; none for a callback.
    tx: Option<TxId>,
}

/// A new call's INVITE, in `ringing` from the moment it is taken, so that a CANCEL that
/// comes while it is checked (its credentials may wait for this replica to catch up)
/// reaches it. Taken out again if the call never starts; handed to the call if it does.
struct Pending {
    app: Arc<AppServer>,
    tx: Option<TxId>,
    token: CancellationToken,
}

impl Pending {
    fn new(app: &Arc<AppServer>, tx: TxId) -> Pending {
        let token = CancellationToken::new();
        app.ringing
            .lock()
            .expect("ringing lock")
            .insert(tx, token.clone());
        Pending {
            app: app.clone(),
            tx: Some(tx),
            token,
        }
    }

    /// The token a CANCEL sets, leaving the INVITE in `ringing` for the call's guard.
    fn hand_over(mut self) -> CancellationToken {
        self.tx = None;
        self.token.clone()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(tx) = self.tx {
            self.app.ringing.lock().expect("ringing lock").remove(&tx);
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut calls = self.app.calls.lock().expect("calls lock");
        for t in &self.tokens {
            calls.remove(t);
        }
        drop(calls);
        if let Some(tx) = self.tx {
            self.app.ringing.lock().expect("ringing lock").remove(&tx);
        }
    }
}

impl Agent for AppServer {
    fn takes(&self, request: &Message, in_transaction: bool) -> bool {
        if self.addressed(request).is_some() {
            return true;
        }
        in_transaction
            && request.method() == Some(&Method::Invite)
            && request.to().is_ok_and(|to| !to.params.contains("tag"))
            && self.routes_only_here(request)
            && (self.is_outbound(request)
                || self.scripted_callee(request).is_some()
                || self.maybe_trunk(request))
    }

    fn handle(self: Arc<Self>, request: Message, flow: Flow, tx: Option<TxId>, _stack: &Stack) {
        if let Some((token, side)) = self.addressed(&request) {
            let sender = self
                .calls
                .lock()
                .expect("calls lock")
                .get(&token)
                .filter(|(_, s)| *s == side)
                .map(|(sender, _)| sender.clone());
            let refusal = match sender {
                None => Some(Refusal::new(481, "Call/Transaction Does Not Exist")),
                Some(s) => match s.try_send(InDialog {
                    request: request.clone(),
                    tx,
                    side,
                }) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let mut r = Refusal::new(
                            503,
                            "Service Unavailable (too many requests in this call)",
                        );
                        r.headers.push((HeaderName::RetryAfter, "1".into()));
                        Some(r)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        Some(Refusal::new(481, "Call/Transaction Does Not Exist"))
                    }
                },
            };
            if let (Some(r), Some(tx)) = (refusal, tx) {
                self.layer.respond_stateless(tx, r.response(&request));
            }
            return;
        }
        if let Some(tx) = tx {
            crate::agents::run_or_spawn(self.spawn_call(request, flow, tx));
        }
    }

    fn carries_on(&self, request: &Message) -> bool {
        self.addressed(request).is_some()
    }

    fn cancel(&self, invite: TxId) {
        if let Some(c) = self.ringing.lock().expect("ringing lock").get(&invite) {
            c.cancel();
        }
    }
}

/// A Via value for a new request of ours on `flow`.
pub fn via_on(own: &OwnAddrs, flow: &Flow) -> String {
    let sent_by = own.advertised(flow.transport, flow.local);
    format!(
        "SIP/2.0/{} {sent_by};branch=z9hG4bK{:016x};rport",
        flow.transport.as_str(),
        rand::thread_rng().gen::<u64>()
    )
}

/// Our Contact for leg `side` (`a` or `b`) of call `token`, on `flow`.
pub fn contact_on(own: &OwnAddrs, flow: &Flow, token: &str, side: char) -> String {
    let addr = own.advertised(flow.transport, flow.local);
    let t = match flow.transport {
        TransportKind::Udp => "",
        TransportKind::Tcp => ";transport=tcp",
        TransportKind::Tls => ";transport=tls",
    };
    format!("sip:{CONTACT_PREFIX}{token}{side}@{addr}{t}")
}

/// Ends `leg` with a BYE.
pub fn hang_up(app: &AppServer, mut leg: dialog::Leg) {
    let flow = leg.flow;
    if let Some(bye) = leg.request(&Method::Bye, &via_on(&app.own, &flow), "", None, b"") {
        let _ = app.layer.send_request(bye, flow);
    }
}

/// Answers the 2xx responses that follow the first one to an INVITE of ours, for as long
/// as its transaction hands them on (RFC 6026 Accepted, until Timer M): a retransmission
/// of the same answer (our ACK was lost) gets the ACK again; an answer from another
/// branch of a fork (another To tag) is ACKed and ended, since only one callee can have
/// the call.
pub fn keep_acking(
    app: &Arc<AppServer>,
    mut events: mpsc::UnboundedReceiver<crate::stack::transaction::ClientEvent>,
    first: &Message,
    ack: Message,
    leg: &dialog::Leg,
) {
    let tag = |m: &Message| m.to().ok().and_then(|t| t.tag().map(str::to_owned));
    let first_tag = tag(first);
    let (app, leg) = (app.clone(), leg.clone());
    let seq = ack.cseq().map(|c| c.seq).unwrap_or(1);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let crate::stack::transaction::ClientEvent::Response(r) = event else {
                continue;
            };
            if !(200..300).contains(&r.status().unwrap_or(0)) {
                continue;
            }
            if tag(&r) == first_tag {
                let _ = app.layer.send_request(ack.clone(), leg.flow);
                continue;
            }
            // Our From and Call-ID are in the response too.
            let other = dialog::Leg::from_answer(&r, &r, leg.contact.clone(), leg.flow);
            if let Some(ack) = other.ack(seq, &via_on(&app.own, &leg.flow)) {
                let _ = app.layer.send_request(ack, leg.flow);
            }
            hang_up(&app, other);
        }
    });
}
