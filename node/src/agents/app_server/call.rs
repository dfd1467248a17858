//! One back-to-back call, on a task of its own: the caller's INVITE authenticated, the
//! account's dialplan run (or the default route), its dials carried out, the caller told
//! of ringing and of the answer, and once connected every request inside the call relayed
//! from one leg to the other until a BYE ends it.
//!
//! The dialplan runs on a blocking thread (`dialplan` waits in `dial()`); its dials come
//! here over a channel, and this task answers each with the outcome. A dial that answers
//! connects the caller here, before the script hears of it, so the answer never waits
//! for the script.

use std::sync::Arc;

use bytes::Bytes;
use rand::Rng;
use tandem_dialplan::{Call as Facts, DialOutcome, DialRequest, Ending, Host, Run};
use tandem_raft_store::command::Account;
use tandem_sip::{HeaderName, Message, Method};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::bridge::{copy_body, Body, Bridge, Unacked};
use super::dialog::{value, Leg};
use super::legs::{close_answered, exec, DialContext, Dialled, LegRecords};
use super::timer::SessionTimer;
use super::{contact_on, hang_up, AppServer, InDialog, Side};
use crate::agents::auth::{Authenticated, Challenge};
use crate::agents::cdr::{Open, Recorder};
use crate::agents::proxy::dialogs::{DialogKind, Placer, Refused};
use crate::agents::Refusal;
use crate::stack::transaction::TxId;
use crate::stack::transport::Flow;

/// What the call is dialling now, and who waits for the outcome.
type Dialling = (
    std::pin::Pin<Box<dyn std::future::Future<Output = Dialled> + Send>>,
    Option<oneshot::Sender<DialOutcome>>,
);

/// The dialplan's way to dial: hand the request to the call's task and wait.
struct BlockingHost {
    dials: mpsc::UnboundedSender<(DialRequest, oneshot::Sender<DialOutcome>)>,
    /// For `callback()`: the app server, and the account whose dialplan runs (the
    /// callback is its call).
    app: Arc<AppServer>,
    account: Account,
}

impl Host for BlockingHost {
    fn dial(&self, request: DialRequest) -> DialOutcome {
        let (tx, rx) = oneshot::channel();
        if self.dials.send((request, tx)).is_err() {
            return DialOutcome::CallerGone;
        }
        rx.blocking_recv().unwrap_or(DialOutcome::CallerGone)
    }

    fn callback(&self, a: &str, b: &str) -> Result<String, String> {
        let started = self.app.start_callback(self.account.clone(), a, b, true);
        match &started {
            Ok(v) => {
                tracing::info!(account = %v.account, callback = %v.id, "dialplan: callback started")
            }
            Err(e) => {
                tracing::info!(account = %self.account.user, error = %e, "dialplan: callback not started")
            }
        }
        started.map(|v| v.id).map_err(|e| e.to_string())
    }
}

struct Call {
    app: Arc<AppServer>,
    token: String,
    invite: Message,
    a_tx: TxId,
    link: Bridge,
    caller_gone: bool,
    answered: bool,
    /// The record of the caller's leg, and of the dialled leg once it answered.
    record: Option<(Open, Recorder)>,
    b_record: Option<super::legs::LegRecord>,
}

/// Whose call it is, and so whose dialplan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A local account calls out: the caller's dialplan, or the default route.
    Outbound,
    /// A provider calls one of the customer's numbers: the number's account's dialplan.
    Inbound,
    /// Anyone calls a local account that has a dialplan: that account's.
    Local,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Local => "local",
        }
    }
}

/// A new call, checked and authenticated by the agent.
pub struct Start {
    pub invite: Message,
    pub flow: Flow,
    pub tx: TxId,
    /// The account whose dialplan runs and whose call it counts as: the caller for an
    /// outbound call, the callee otherwise.
    pub account: Arc<Account>,
    pub direction: Direction,
    /// The tokens of the caller's leg and of the dialled side.
    pub tokens: [String; 2],
}

/// Serves a new INVITE the app server took, to its end.
pub async fn run(
    app: Arc<AppServer>,
    start: Start,
    cancelled: CancellationToken,
    mut a_rx: mpsc::Receiver<InDialog>,
    mut b_rx: mpsc::Receiver<InDialog>,
) {
    serve(&app, start, cancelled, &mut a_rx, &mut b_rx).await;
    refuse_late(&app, &mut a_rx, &mut b_rx);
}

/// Answers the requests that came in too late for a call, so no server transaction is
/// left waiting.
pub(super) fn refuse_late(
    app: &AppServer,
    a_rx: &mut mpsc::Receiver<InDialog>,
    b_rx: &mut mpsc::Receiver<InDialog>,
) {
    for rx in [a_rx, b_rx] {
        rx.close();
        while let Ok(d) = rx.try_recv() {
            if let Some(tx) = d.tx {
                let r = Refusal::new(481, "Call/Transaction Does Not Exist");
                app.layer.respond_stateless(tx, r.response(&d.request));
            }
        }
    }
}

async fn serve(
    app: &Arc<AppServer>,
    start: Start,
    cancelled: CancellationToken,
    a_rx: &mut mpsc::Receiver<InDialog>,
    b_rx: &mut mpsc::Receiver<InDialog>,
) {
    let Start {
        invite,
        flow,
        tx,
        account,
        direction,
        tokens,
    } = start;
    // The call counts against the account's limit, with the proxy's calls.
    let caller_tag = invite
        .from()
        .ok()
        .and_then(|f| f.tag().map(str::to_owned))
        .unwrap_or_default();
    let call_id = invite.call_id().map(|c| c.into_owned()).unwrap_or_default();
    let name = tandem_raft_store::command::account_aor(&account.user, &account.domain);
    let aor = format!("{}@{}", account.user, account.domain);
    let mut record = app.cdrs.as_ref().map(|r| {
        let from = invite.from().map(|f| f.uri.to_string()).unwrap_or_default();
        let to = invite.uri().map(|u| u.to_string()).unwrap_or_default();
        let open = Open::new(&call_id, "a", "in", &account.customer, &aor).with_parties(&from, &to);
        (open, r.clone())
    });
    let refused = |record: &mut Option<(Open, Recorder)>, r: &Refusal| {
        if let Some((open, recorder)) = record.take() {
            recorder.record(open.close(r.status, &r.reason, "refused"));
        }
    };
    match app.proxy.dialogs.begin(
        &call_id,
        &caller_tag,
        DialogKind::Call,
        Placer::Account(&name, account.max_concurrent_calls),
        None,
    ) {
        // The bridge ends it; its in-dialog requests never mark it used.
        Ok(()) => app.proxy.dialogs.pin(&call_id, &caller_tag),
        Err(Refused::CallLimit) => {
            tracing::info!(account = %name, limit = account.max_concurrent_calls, "call refused: the account is at its max_concurrent_calls");
            let r = Refusal::new(
                403,
                "Forbidden (too many calls in progress for this account)",
            );
            refused(&mut record, &r);
            app.layer.respond_stateless(tx, r.response(&invite));
            return;
        }
        Err(Refused::Full) => {
            let r = Refusal::new(503, "Service Unavailable (too many dialogs)");
            refused(&mut record, &r);
            app.layer.respond_stateless(tx, r.response(&invite));
            return;
        }
    }
    let mut trying = Message::response_to(&invite, 100, "Trying");
    crate::stack::responses::stamp(&mut trying);
    app.layer.respond(tx, trying);
    let our_tag = format!("{:016x}", rand::thread_rng().gen::<u64>());
    let a = Leg::from_invite(
        &invite,
        &our_tag,
        contact_on(&app.own, &flow, &tokens[0], 'a'),
        flow,
    );
    let mut call = Call {
        app: app.clone(),
        token: tokens[1].clone(),
        invite,
        a_tx: tx,
        link: Bridge::new(app.clone(), tokens[1].clone(), a),
        caller_gone: false,
        answered: false,
        record,
        b_record: None,
    };
    let result = call
        .route(&account, &aor, direction, &cancelled, a_rx, b_rx)
        .await;
    if !call.answered {
        let (code, reason, outcome) = if call.caller_gone {
            (487, "Request Terminated".to_owned(), "cancelled")
        } else {
            let (code, reason) = call.fail(result);
            (code, reason, crate::agents::cdr::outcome_of(code))
        };
        if let Some((open, recorder)) = call.record.take() {
            recorder.record(open.close(code, &reason, outcome));
        }
        app.proxy.dialogs.release(&call_id, &caller_tag, false);
        return;
    }
    let mut converted = false;
    app.proxy
        .dialogs
        .answered(&call_id, &caller_tag, &our_tag, 200, &mut converted);
    call.link.bridge(a_rx, b_rx).await;
    if let Some((open, recorder)) = call.record.take() {
        recorder.record(open.close(200, "OK", "answered"));
    }
    close_answered(call.b_record.take());
    app.proxy
        .dialogs
        .ended(&call_id, &caller_tag, &our_tag, DialogKind::Call);
    if !converted {
        app.proxy.dialogs.release(&call_id, &caller_tag, false);
    }
}

/// The local account placing `invite`, or the answer that challenges or refuses it.
pub async fn authenticate(
    app: &AppServer,
    invite: &Message,
    flow: &Flow,
) -> Result<Arc<Account>, Refusal> {
    let from = invite
        .from()
        .ok()
        .and_then(|f| f.uri.as_sip().cloned())
        .ok_or_else(|| Refusal::new(403, "Forbidden (relaying denied)"))?;
    let domain = from.host.canonical();
    let user = from.user_unescaped().unwrap_or_default().into_owned();
    match app
        .auth
        .authenticate(invite, flow.remote.ip(), &user, &domain, Challenge::Proxy)
        .await
    {
        Authenticated::Account(a) => Ok(a),
        Authenticated::Refused(r) => Err(r),
    }
}

impl Call {
    /// Runs the dialplan (or the default route) until the call is connected or refused;
    /// `Err` is the refusal for the caller.
    async fn route(
        &mut self,
        account: &Account,
        aor: &str,
        direction: Direction,
        cancelled: &CancellationToken,
        a_rx: &mut mpsc::Receiver<InDialog>,
        b_rx: &mut mpsc::Receiver<InDialog>,
    ) -> Result<(), Refusal> {
        let reader = self.app.cluster.replica.reader();
        // Why a script failed is the account's business: its own caller hears it, a
        // stranger calling it hears only that it failed (the log has it all).
        let shown = |why: &str| match direction {
            Direction::Outbound => why.to_owned(),
            Direction::Inbound | Direction::Local => "the account's dialplan failed".to_owned(),
        };
        let owner = match direction {
            Direction::Outbound => aor.to_owned(),
            Direction::Inbound | Direction::Local => {
                tandem_raft_store::command::incoming_dialplan_owner(&account.user, &account.domain)
            }
        };
        let script = reader
            .dialplan(&owner)
            .ok()
            .flatten()
            .filter(|d| !d.script.trim().is_empty());
        let user = self
            .invite
            .uri()
            .and_then(|u| u.as_sip())
            .and_then(|u| u.user_unescaped())
            .map(|u| u.into_owned())
            .unwrap_or_default();
        let (prov_tx, mut prov_rx) = mpsc::unbounded_channel();
        let caller_from = self
            .invite
            .from()
            .map(|f| {
                let display = f
                    .display
                    .as_ref()
                    .filter(|d| !d.contains(['"', '\\']))
                    .map(|d| format!("\"{d}\" "))
                    .unwrap_or_default();
                format!("{display}<{}>", f.uri)
            })
            .unwrap_or_default();
        let ctx = DialContext {
            app: self.app.clone(),
            caller_from,
            caller_domain: account.domain.clone(),
            customer: account.customer.clone(),
            token: self.token.clone(),
            side: 'b',
            // A caller that sent no offer (late offer) gets the callee's in our 2xx, and
            // its ACK brings the answer the callee's ACK waits for.
            ack: if self.invite.body().is_empty() {
                super::legs::AckMode::Later
            } else {
                super::legs::AckMode::Plain
            },
            sdp_session: rand::thread_rng().gen::<u32>().into(),
            content_type: value(&self.invite, &HeaderName::ContentType),
            body: Bytes::copy_from_slice(self.invite.body()),
            extra: String::new(),
            caller_id: None,
            provisional: prov_tx,
            ring_for: self.app.settings.ring_for,
            records: self.app.cdrs.as_ref().map(|recorder| LegRecords {
                recorder: recorder.clone(),
                call: self
                    .invite
                    .call_id()
                    .map(|c| c.into_owned())
                    .unwrap_or_default(),
                customer: account.customer.clone(),
                account: aor.to_owned(),
                from: self
                    .invite
                    .from()
                    .map(|f| f.uri.to_string())
                    .unwrap_or_default(),
                dialled: Arc::default(),
            }),
            max_forwards: self
                .invite
                .max_forwards()
                .ok()
                .flatten()
                .map_or(69, |n| u32::from(n).saturating_sub(1)),
        };
        let dial_cancel = cancelled.child_token();
        let (dial_tx, mut dial_rx) = mpsc::unbounded_channel();
        let mut current: Option<Dialling> = None;
        let mut run: Option<tokio::task::JoinHandle<Run>> = None;
        match script {
            Some(d) => {
                let compiled = self.app.sandbox.compile(&d.script).map_err(|e| {
                    tracing::warn!(account = aor, error = %e, "dialplan: the saved script does not compile");
                    dialplan_refusal(&shown(&e.to_string()))
                })?;
                let mut facts = facts(&self.invite, &self.link.a.flow, aor, account, direction);
                facts.time_zone = reader
                    .customer_settings(&account.customer)
                    .map(|s| s.time_zone)
                    .unwrap_or_default();
                let sandbox = self.app.sandbox.clone();
                let host: Arc<dyn Host> = Arc::new(BlockingHost {
                    dials: dial_tx,
                    app: self.app.clone(),
                    account: account.clone(),
                });
                run = Some(tokio::task::spawn_blocking(move || {
                    sandbox.run(&compiled, facts, host)
                }));
            }
            None => {
                let spec = match direction {
                    Direction::Outbound => default_spec(&self.app, &account.customer, &user)?,
                    // The dialplan went between the agent's look and now: ring the
                    // account, as the proxy would have.
                    Direction::Inbound | Direction::Local => account.user.clone(),
                };
                let parsed = tandem_dialplan::spec::parse(&spec)
                    .map_err(|_| Refusal::new(484, "Address Incomplete"))?;
                current = Some((exec(ctx.clone(), parsed, dial_cancel.child_token()), None));
                drop(dial_tx);
            }
        }
        let mut last: Option<DialOutcome>;
        loop {
            tokio::select! {
                Some(p) = prov_rx.recv() => self.provisional(p),
                // Once connected, requests inside the call wait for the bridge (the
                // caller may ACK and hang up before the script has finished).
                Some(d) = a_rx.recv(), if !self.answered => self.early_request(d, &dial_cancel),
                Some(d) = b_rx.recv(), if !self.answered => self.early_request(d, &dial_cancel),
                _ = dial_cancel.cancelled(), if !self.caller_gone && !self.answered => {
                    self.caller_gone = true;
                    self.respond_a(487, "Request Terminated", None);
                }
                done = async { current.as_mut().expect("guarded").0.as_mut().await }, if current.is_some() => {
                    let (_, reply) = current.take().expect("guarded");
                    let outcome = match done {
                        Dialled::Answered { leg, answer, target, record, later } => {
                            if self.caller_gone {
                                // The caller left as the callee answered: end it there.
                                drop(later);
                                hang_up(&self.app, *leg);
                                close_answered(record);
                                DialOutcome::CallerGone
                            } else {
                                self.link.ack_later = later;
                                self.connect(*leg, &answer);
                                self.b_record = record;
                                DialOutcome::Answered { target }
                            }
                        }
                        Dialled::Failed(o) => o,
                    };
                    last = Some(outcome.clone());
                    match reply {
                        Some(r) => { let _ = r.send(outcome); }
                        None => break,
                    }
                }
                Some((request, reply)) = dial_rx.recv(), if current.is_none() => {
                    if self.caller_gone || self.answered {
                        let _ = reply.send(if self.answered { DialOutcome::Failed { code: 409, reason: "the call is already answered".into() } } else { DialOutcome::CallerGone });
                        continue;
                    }
                    let mut leg_ctx = ctx.clone();
                    leg_ctx.extra = request
                        .headers
                        .iter()
                        .map(|(n, v)| format!("{n}: {v}\r\n"))
                        .collect();
                    leg_ctx.caller_id = request.caller_id.map(|c| (c.number, c.name));
                    tracing::info!(account = aor, spec = %request.text, "dialplan: dial");
                    current = Some((exec(leg_ctx, request.spec, dial_cancel.child_token()), Some(reply)));
                }
                finished = async { run.as_mut().expect("guarded").await }, if run.is_some() && current.is_none() => {
                    let finished = finished.map_err(|_| dialplan_refusal("the run stopped"))?;
                    for line in &finished.trace {
                        tracing::info!(account = aor, "dialplan: {line}");
                    }
                    return match finished.result {
                        Ok(Ending::Connected { .. }) | Ok(Ending::CallerGone) => Ok(()),
                        Ok(Ending::Responded { code, reason }) => Err(Refusal::new(code, if reason.is_empty() { default_reason(code).to_owned() } else { reason })),
                        Ok(Ending::Ended { last_dial }) => Err(refusal_for(last_dial.as_ref())),
                        Err(tandem_dialplan::Error::Busy { .. } | tandem_dialplan::Error::NodeBusy { .. }) => {
                            let mut r = Refusal::new(503, "Service Unavailable (too many dialplan runs at once)");
                            r.headers.push((HeaderName::RetryAfter, "5".into()));
                            Err(r)
                        }
                        Err(e @ tandem_dialplan::Error::OverBudget { .. }) => {
                            tracing::info!(account = aor, error = %e, "dialplan: run refused");
                            let mut r = Refusal::new(503, "Service Unavailable (the account's dialplans used their script time for now)");
                            r.headers.push((HeaderName::RetryAfter, "1".into()));
                            Err(r)
                        }
                        Err(e) => {
                            tracing::warn!(account = aor, error = %e, "dialplan: the run failed");
                            Err(dialplan_refusal(&shown(&e.to_string())))
                        }
                    };
                }
            }
        }
        // The default route ended.
        if self.answered {
            Ok(())
        } else {
            Err(refusal_for(last.as_ref()))
        }
    }

    /// A request inside the call before it is connected: the caller's BYE ends the
    /// attempt (RFC 3261 §15), anything else waits for nothing and is answered at once.
    fn early_request(&mut self, d: InDialog, dial_cancel: &CancellationToken) {
        let Some(tx) = d.tx else {
            return;
        };
        let (status, reason) = match (d.request.method(), d.side) {
            (Some(Method::Bye), Side::A) => {
                dial_cancel.cancel();
                (200, "OK")
            }
            (Some(Method::Bye), Side::B) => (481, "Call/Transaction Does Not Exist"),
            _ => (491, "Request Pending"),
        };
        let mut r = Message::response_to(&d.request, status, reason);
        crate::stack::responses::stamp(&mut r);
        self.app.layer.respond(tx, r);
    }

    /// Tells the caller the callee rings (18x), with its session description if any.
    fn provisional(&mut self, p: Message) {
        if self.answered || self.caller_gone {
            return;
        }
        let status = p.status().unwrap_or(180);
        let reason = String::from_utf8_lossy(p.reason().unwrap_or_default()).into_owned();
        self.respond_a(status, &reason, Some(&p));
    }

    /// A final or provisional response to the caller's INVITE, carrying `from`'s body.
    fn respond_a(&mut self, status: u16, reason: &str, from: Option<&Message>) {
        let mut r = Message::response_to(&self.invite, status, reason);
        let tag = self
            .link
            .a
            .local
            .rsplit_once(";tag=")
            .map(|(_, t)| t.to_owned());
        if status > 100 {
            if let Some(tag) = tag {
                let _ = r.add_to_tag(&tag);
            }
        }
        if (101..300).contains(&status) {
            r.push_header(HeaderName::Contact, format!("<{}>", self.link.a.contact));
        }
        if (200..300).contains(&status) {
            for (name, value) in self.link.response_headers(Side::A) {
                r.push_header(name, value);
            }
        }
        if let Some(m) = from {
            copy_body(m, &mut r);
        }
        crate::stack::responses::stamp(&mut r);
        if let Some((open, _)) = &mut self.record {
            match status {
                101..=199 => open.ringing(),
                200..=299 => open.answered(),
                _ => {}
            }
        }
        if (200..300).contains(&status) {
            self.link.unacked = Some(Unacked::new(
                Side::A,
                self.a_tx,
                r.clone(),
                &self.link.a.flow,
            ));
        }
        self.app.layer.respond(self.a_tx, r);
    }

    /// The dialled leg answered: the caller gets the 2xx with its session description.
    fn connect(&mut self, leg: Leg, answer: &Message) {
        self.link.b = Some(leg);
        self.answered = true;
        let ours = self.app.settings.session_expires;
        self.link.set_timer(
            Side::A,
            SessionTimer::for_request(&self.invite, ours),
            &self.invite,
        );
        self.link
            .set_timer(Side::B, SessionTimer::for_answer(answer), answer);
        let (offer, reply) = (Body::of(&self.invite), Body::of(answer));
        self.link.came(Side::A, offer.clone());
        self.link.went(Side::B, offer);
        self.link.came(Side::B, reply.clone());
        self.link.went(Side::A, reply);
        self.respond_a(200, "OK", Some(answer));
    }

    /// The call ends before it was connected: the caller gets `result`'s refusal, whose
    /// status and reason this returns.
    fn fail(&mut self, result: Result<(), Refusal>) -> (u16, String) {
        let refusal = result
            .err()
            .unwrap_or_else(|| Refusal::new(500, "Server Internal Error"));
        let said = (refusal.status, refusal.reason.clone());
        let mut r = refusal.response(&self.invite);
        if let Some((_, tag)) = self.link.a.local.rsplit_once(";tag=") {
            let _ = r.add_to_tag(tag);
        }
        crate::stack::responses::stamp(&mut r);
        self.app.layer.respond(self.a_tx, r);
        said
    }
}

/// The route of a call without a dialplan: the number dialled through the customer's
/// provider, if it has exactly one enabled provider account.
fn default_spec(app: &AppServer, customer: &str, user: &str) -> Result<String, Refusal> {
    match super::legs::only_provider(app, customer) {
        Ok(p) if !user.is_empty() => Ok(format!("{user}@{}", p.name)),
        Ok(_) | Err(super::legs::NoProvider::None) => Err(Refusal::new(
            404,
            "Not Found (no dialplan, and the customer has no provider account to call out through)",
        )),
        Err(super::legs::NoProvider::Several) => Err(Refusal::new(
            404,
            "Not Found (no dialplan, and the customer has several provider accounts: a dialplan must choose)",
        )),
    }
}

/// What the caller hears when the last dial of a route failed.
fn refusal_for(last: Option<&DialOutcome>) -> Refusal {
    match last {
        None => Refusal::new(404, "Not Found (the dialplan dialled nothing)"),
        Some(DialOutcome::Busy { code, reason }) => Refusal::new(*code, reason.clone()),
        Some(DialOutcome::NoAnswer) => Refusal::new(480, "Temporarily Unavailable (no answer)"),
        // A provider's challenge cannot be the caller's to answer, and a 503 would tell
        // the caller this node is down (RFC 3261 §16.7 turns it into 500).
        Some(DialOutcome::Failed {
            code: 401 | 407, ..
        }) => Refusal::new(403, "Forbidden (the provider refused the call)"),
        Some(DialOutcome::Failed { code: 503, .. }) => {
            Refusal::new(500, "Server Internal Error (no provider took the call)")
        }
        Some(DialOutcome::Failed { code, reason }) if (400..700).contains(code) => {
            Refusal::new(*code, reason.clone())
        }
        Some(_) => Refusal::new(500, "Server Internal Error"),
    }
}

/// 500 with a Reason header naming the dialplan's failure (RFC 3326).
fn dialplan_refusal(why: &str) -> Refusal {
    let text: String = why
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .take(120)
        .collect();
    let mut r = Refusal::new(500, "Server Internal Error (dialplan failed)");
    r.headers.push((
        HeaderName::from("Reason"),
        format!("SIP;cause=500;text=\"dialplan: {text}\""),
    ));
    r
}

fn default_reason(code: u16) -> &'static str {
    match code {
        403 => "Forbidden",
        404 => "Not Found",
        480 => "Temporarily Unavailable",
        486 => "Busy Here",
        503 => "Service Unavailable",
        603 => "Decline",
        _ => "Refused",
    }
}

/// The facts a dialplan reads about this call.
fn facts(
    invite: &Message,
    flow: &Flow,
    aor: &str,
    account: &Account,
    direction: Direction,
) -> Facts {
    let uri = invite.uri().and_then(|u| u.as_sip());
    let from = invite.from().ok();
    let to = invite.to().ok();
    let user_of = |n: Option<&tandem_sip::NameAddr>| {
        n.and_then(|n| n.uri.as_sip())
            .and_then(|u| u.user_unescaped())
            .map(|u| u.into_owned())
            .unwrap_or_default()
    };
    Facts {
        from: from.map(|f| f.uri.to_string()).unwrap_or_default(),
        from_user: user_of(from),
        from_name: from.and_then(|f| f.display.clone()).unwrap_or_default(),
        to: to.map(|t| t.uri.to_string()).unwrap_or_default(),
        to_user: user_of(to),
        ruri: invite.uri().map(|u| u.to_string()).unwrap_or_default(),
        user: uri
            .and_then(|u| u.user_unescaped())
            .map(|u| u.into_owned())
            .unwrap_or_default(),
        host: uri.map(|u| u.host.to_string()).unwrap_or_default(),
        source: flow.remote.to_string(),
        source_ip: flow.remote.ip().to_string(),
        account: aor.to_owned(),
        customer: account.customer.clone(),
        direction: direction.as_str().into(),
        headers: invite
            .headers()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
        time_zone: String::new(),
        now_ms: crate::clock::now_ms() as i64,
    }
}
