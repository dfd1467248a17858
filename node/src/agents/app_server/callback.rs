//! Callback: third-party call control (RFC 3725). The app server calls A, then B, on
//! behalf of an account, and connects them; started by `POST /v1/callback` or by a
//! dialplan's `callback(a, b)`. A and B are dial specs, carried out as a dialplan's dials
//! are (local accounts, providers' numbers, groups).
//!
//! The flow is RFC 3725's third (§4.3), chosen because B may ring for as long as a person
//! takes to answer:
//!
//! 1. INVITE A without an offer. A's 2xx carries offer A; the ACK answers it with a
//!    description that holds every stream without media (`sdp::black_hole_answer`), so A
//!    is connected, and silent, at once.
//! 2. INVITE B without an offer. B's 2xx carries offer B, and its ACK waits.
//! 3. re-INVITE A with offer B (under our origin). A's 2xx carries answer A'; it is ACKed,
//!    and B's ACK carries answer A'.
//! 4. The two legs are bridged as any app server call is (`call::Bridge`): requests
//!    relayed, keepalives, `max_call_secs`, BYE from either side ends both.
//!
//! A hang-up of A while B rings cancels B. A failure at any step ends every leg that was
//! answered, so nothing is left up that nobody bridges. A callback counts as a call of
//! the account (`max_concurrent_calls`) and of its customer (`max_calls`), and its legs
//! leave CDRs under the call id `callback-<id>`: `b1` is the leg to A, the next the leg
//! to B.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use serde::Serialize;
use tandem_dialplan::{DialOutcome, DialSpec};
use tandem_raft_store::command::Account;
use tandem_sip::{Message, Method};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bridge::{answer, final_response, Body, Bridge};
use super::dialog::{value, Leg};
use super::legs::{close_answered, exec, AckMode, DialContext, Dialled, LegRecords};
use super::sdp;
use super::timer::SessionTimer;
use super::{via_on, AppServer, InDialog, Side};
use crate::agents::proxy::dialogs::{DialogKind, Placer, Refused};

/// Callbacks whose state is kept for `GET /v1/callbacks/{id}`, running or ended; the
/// oldest ended ones go first.
const KEPT: usize = 10_000;
/// How long the re-INVITE that connects A to B may wait for A's answer.
/// Less than the 32 s B keeps its 2xx waiting for the ACK that this answer completes.
const CONNECT_WAIT: Duration = Duration::from_secs(20);

/// Why a callback was not started.
#[derive(Debug)]
pub enum NotStarted {
    /// The request is wrong (a dial spec that does not parse).
    Invalid(String),
    /// The account or its customer cannot call (disabled).
    Refused(String),
    /// A limit of the account, the customer or the node is reached.
    Busy(String),
}

impl std::fmt::Display for NotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotStarted::Invalid(m) | NotStarted::Refused(m) | NotStarted::Busy(m) => f.write_str(m),
        }
    }
}

/// A callback as `GET /v1/callbacks/{id}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CallbackView {
    pub id: String,
    /// The account it is made for, `user@domain`.
    pub account: String,
    pub a: String,
    pub b: String,
    /// `calling a`, `calling b`, `connecting`, `connected` or `ended`.
    pub state: &'static str,
    /// How it ended: 200 after a connected call, else the failure's code and reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix milliseconds.
    pub started_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
}

fn now_ms() -> i64 {
    crate::clock::now_ms() as i64
}

/// Callbacks one account may have running at once.
pub const RUNNING_PER_ACCOUNT: u32 = 4;
/// Callbacks an account's dialplans may start per minute.
pub const SCRIPT_CALLBACKS_PER_MINUTE: u32 = 6;
/// Accounts whose use is remembered before idle ones are forgotten.
const ACCOUNTS_KEPT: usize = 10_000;

/// The callbacks this node placed.
#[derive(Default)]
pub struct Callbacks {
    views: std::sync::Mutex<std::collections::HashMap<String, CallbackView>>,
    /// By account: callbacks running, and those its scripts started this minute.
    used: std::sync::Mutex<std::collections::HashMap<String, Use>>,
}

struct Use {
    running: u32,
    minute: tokio::time::Instant,
    started: u32,
}

/// One running callback of an account, counted until it drops.
pub struct Running {
    app: Arc<AppServer>,
    account: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut used = self.app.callbacks.used.lock().expect("callbacks lock");
        if let Some(u) = used.get_mut(&self.account) {
            u.running = u.running.saturating_sub(1);
        }
    }
}

impl Callbacks {
    /// Counts a new callback of `account`, or says which limit it is over.
    fn admit(
        &self,
        app: &Arc<AppServer>,
        account: &str,
        from_script: bool,
    ) -> Result<Running, NotStarted> {
        let now = tokio::time::Instant::now();
        let minute = Duration::from_secs(60);
        let mut used = self.used.lock().expect("callbacks lock");
        if used.len() >= ACCOUNTS_KEPT && !used.contains_key(account) {
            used.retain(|_, u| u.running > 0 || now - u.minute < minute);
            if used.len() >= ACCOUNTS_KEPT {
                return Err(NotStarted::Busy(
                    "too many accounts placing callbacks".into(),
                ));
            }
        }
        let u = used.entry(account.to_owned()).or_insert(Use {
            running: 0,
            minute: now,
            started: 0,
        });
        if now - u.minute >= minute {
            u.minute = now;
            u.started = 0;
        }
        if u.running >= RUNNING_PER_ACCOUNT {
            return Err(NotStarted::Busy(format!(
                "the account has {RUNNING_PER_ACCOUNT} callbacks running"
            )));
        }
        if from_script && u.started >= SCRIPT_CALLBACKS_PER_MINUTE {
            return Err(NotStarted::Busy(format!(
                "the account's dialplans started {SCRIPT_CALLBACKS_PER_MINUTE} callbacks this minute"
            )));
        }
        u.running += 1;
        if from_script {
            u.started += 1;
        }
        Ok(Running {
            app: app.clone(),
            account: account.to_owned(),
        })
    }

    pub fn get(&self, id: &str) -> Option<CallbackView> {
        self.views.lock().expect("callbacks lock").get(id).cloned()
    }

    fn insert(&self, view: CallbackView) {
        let mut views = self.views.lock().expect("callbacks lock");
        if views.len() >= KEPT {
            let oldest = views
                .values()
                .filter_map(|v| v.ended_ms.map(|e| (e, v.id.clone())))
                .min();
            if let Some((_, id)) = oldest {
                views.remove(&id);
            }
        }
        views.insert(view.id.clone(), view);
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut CallbackView)) {
        if let Some(v) = self.views.lock().expect("callbacks lock").get_mut(id) {
            f(v);
        }
    }
}

impl AppServer {
    /// Starts a callback for `account`: A rung first, then B, then the two connected.
    /// Returns at once with its id; [`AppServer::callback`] tells how it goes.
    ///
    /// A callback started by a dialplan (`from_script`) is held to
    /// [`SCRIPT_CALLBACKS_PER_MINUTE`] per account: a script runs for whoever calls, and
    /// each callback may cost the customer two calls through its providers.
    pub fn start_callback(
        self: &Arc<Self>,
        account: Account,
        a: &str,
        b: &str,
        from_script: bool,
    ) -> Result<CallbackView, NotStarted> {
        let parse = |which: &str, text: &str| {
            tandem_dialplan::spec::parse(text)
                .map_err(|e| NotStarted::Invalid(format!("{which}: {e}")))
        };
        let specs = (parse("a", a)?, parse("b", b)?);
        if !matches!(specs.0, DialSpec::Leg { .. }) {
            return Err(NotStarted::Invalid(
                "a: one target (an account, or number@provider), not a group".into(),
            ));
        }
        if !account.enabled {
            return Err(NotStarted::Refused("the account is disabled".into()));
        }
        let reader = self.cluster.replica.reader();
        if !reader
            .customer(&account.customer)
            .ok()
            .flatten()
            .is_some_and(|c| c.enabled)
        {
            return Err(NotStarted::Refused("the customer is disabled".into()));
        }
        let aor = format!("{}@{}", account.user, account.domain);
        let running = self.callbacks.admit(self, &aor, from_script)?;
        // Both legs are ours to dial: a callback is two of the customer's calls.
        let customer = (
            self.customer_slot(&account.customer)
                .map_err(|r| NotStarted::Busy(r.reason))?,
            self.customer_slot(&account.customer)
                .map_err(|r| NotStarted::Busy(r.reason))?,
        );
        let id = format!("{:032x}", rand::thread_rng().gen::<u128>());
        let call_id = format!("callback-{id}");
        let name = tandem_raft_store::command::account_aor(&account.user, &account.domain);
        match self.proxy.dialogs.begin(
            &call_id,
            "callback",
            DialogKind::Call,
            Placer::Account(&name, account.max_concurrent_calls),
            None,
        ) {
            // The bridge ends it; its in-dialog requests never mark it used.
            Ok(()) => self.proxy.dialogs.pin(&call_id, "callback"),
            Err(Refused::CallLimit) => {
                return Err(NotStarted::Busy(
                    "too many calls in progress for this account".into(),
                ))
            }
            Err(Refused::Full) => return Err(NotStarted::Busy("too many dialogs".into())),
        }
        let (guard, a_rx, b_rx) = match self.register_call(None) {
            Ok(t) => t,
            Err(r) => {
                self.proxy.dialogs.release(&call_id, "callback", false);
                return Err(NotStarted::Busy(r.reason));
            }
        };
        let view = CallbackView {
            id: id.clone(),
            account: format!("{}@{}", account.user, account.domain),
            a: a.to_owned(),
            b: b.to_owned(),
            state: "calling a",
            code: None,
            reason: None,
            started_ms: now_ms(),
            connected_ms: None,
            ended_ms: None,
        };
        self.callbacks.insert(view.clone());
        tracing::info!(callback = %id, account = %view.account, a, b, "callback: calling a");
        let app = self.clone();
        tokio::spawn(async move {
            let _customer = customer;
            let _running = running;
            let tokens = guard.tokens.clone();
            let mut channels = (a_rx, b_rx);
            let run = Run {
                app: app.clone(),
                id: id.clone(),
                account: Arc::new(account),
                tokens,
                cancel: CancellationToken::new(),
            };
            let ended = run.run(specs, &mut channels.0, &mut channels.1).await;
            let (code, reason) = match &ended {
                Ok(()) => (200, "OK".to_owned()),
                Err(e) => e.clone(),
            };
            tracing::info!(callback = %id, code, reason = %reason, "callback: ended");
            app.callbacks.update(&id, |v| {
                v.state = "ended";
                v.code = Some(code);
                v.reason = Some(reason);
                v.ended_ms = Some(now_ms());
            });
            if ended.is_err() {
                app.proxy.dialogs.release(&call_id, "callback", false);
            }
            super::call::refuse_late(&app, &mut channels.0, &mut channels.1);
            drop(guard);
        });
        Ok(view)
    }

    /// A callback this node placed, running or ended.
    pub fn callback(&self, id: &str) -> Option<CallbackView> {
        self.callbacks.get(id)
    }
}

/// One callback's task.
struct Run {
    app: Arc<AppServer>,
    id: String,
    account: Arc<Account>,
    tokens: [String; 2],
    cancel: CancellationToken,
}

/// Why a callback ended before its legs were connected: a code and a reason.
type Failure = (u16, String);

impl Run {
    fn context(&self, side: char, ack: AckMode, caller_from: String, session: u64) -> DialContext {
        let account = &self.account;
        let aor = format!("{}@{}", account.user, account.domain);
        let (provisional, _) = mpsc::unbounded_channel();
        DialContext {
            app: self.app.clone(),
            customer: account.customer.clone(),
            token: self.tokens[if side == 'a' { 0 } else { 1 }].clone(),
            side,
            ack,
            sdp_session: session,
            caller_from,
            caller_domain: account.domain.clone(),
            content_type: None,
            body: Bytes::new(),
            extra: String::new(),
            caller_id: None,
            provisional,
            ring_for: self.app.settings.ring_for,
            max_forwards: 70,
            records: self.app.cdrs.as_ref().map(|recorder| LegRecords {
                recorder: recorder.clone(),
                call: format!("callback-{}", self.id),
                customer: account.customer.clone(),
                account: aor.clone(),
                from: format!("sip:{aor}"),
                dialled: Arc::default(),
            }),
        }
    }

    async fn run(
        &self,
        (spec_a, spec_b): (DialSpec, DialSpec),
        a_rx: &mut mpsc::Receiver<InDialog>,
        b_rx: &mut mpsc::Receiver<InDialog>,
    ) -> Result<(), Failure> {
        let account = &self.account;
        let session: u64 = rand::thread_rng().gen::<u32>().into();
        let records = self.app.cdrs.as_ref().map(|_| Arc::default());
        let with_records = |mut ctx: DialContext| {
            if let (Some(r), Some(d)) = (&mut ctx.records, &records) {
                r.dialled = Arc::clone(d);
            }
            ctx
        };
        // A sees the account calling; B too (a provider shows its own account's number).
        let from = format!("<sip:{}@{}>", account.user, account.domain);
        let ctx_a =
            with_records(self.context('a', AckMode::Hold, format!("\"Callback\" {from}"), session));
        let (leg_a, answer_a, record_a) = {
            let dial = exec(ctx_a, spec_a, self.cancel.child_token());
            match self.wait(dial, a_rx, b_rx, None).await {
                Ok(Dialled::Answered {
                    leg,
                    answer,
                    record,
                    ..
                }) => (*leg, answer, record),
                Ok(Dialled::Failed(o)) => return Err(failure("a", &o)),
                Err(f) => return Err(f),
            }
        };
        if answer_a.body().is_empty() {
            super::hang_up(&self.app, leg_a);
            close_answered(record_a);
            return Err((488, "a answered without a session description".into()));
        }
        tracing::info!(callback = %self.id, "callback: a answered; calling b");
        self.app
            .callbacks
            .update(&self.id, |v| v.state = "calling b");
        let ctx_b = with_records(self.context('b', AckMode::Later, from, session));
        let dial = exec(ctx_b, spec_b, self.cancel.child_token());
        let (leg_b, answer_b, later, record_b) =
            match self.wait(dial, a_rx, b_rx, Some(&leg_a)).await {
                Ok(Dialled::Answered {
                    leg,
                    answer,
                    later,
                    record,
                    ..
                }) => (*leg, answer, later, record),
                Ok(Dialled::Failed(o)) => {
                    super::hang_up(&self.app, leg_a);
                    close_answered(record_a);
                    return Err(failure("b", &o));
                }
                Err(f) => {
                    close_answered(record_a);
                    return Err(f);
                }
            };
        self.app
            .callbacks
            .update(&self.id, |v| v.state = "connecting");
        let mut leg_a = leg_a;
        let connected = match later {
            Some(later) => self.connect(&mut leg_a, *later, session).await,
            None => Err((500, "b's answer could not be held".into())),
        };
        let connected = match connected {
            Ok(c) => c,
            Err(f) => {
                super::hang_up(&self.app, leg_b);
                super::hang_up(&self.app, leg_a);
                close_answered(record_a);
                close_answered(record_b);
                return Err(f);
            }
        };
        tracing::info!(callback = %self.id, "callback: connected");
        let call_id = format!("callback-{}", self.id);
        let mut converted = false;
        self.app
            .proxy
            .dialogs
            .answered(&call_id, "callback", "connected", 200, &mut converted);
        self.app.callbacks.update(&self.id, |v| {
            v.state = "connected";
            v.connected_ms = Some(now_ms());
        });
        let mut link = Bridge::new(self.app.clone(), self.tokens[1].clone(), leg_a);
        link.b = Some(leg_b);
        link.origin_a = Some(sdp::Origin {
            session,
            version: 2,
        });
        // A's timer as its last 2xx set it (the re-INVITE's, else the first).
        let a_timer = SessionTimer::for_answer(&connected.answer)
            .or_else(|| SessionTimer::for_answer(&answer_a));
        link.set_timer(Side::A, a_timer, &answer_a);
        link.set_timer(Side::B, SessionTimer::for_answer(&answer_b), &answer_b);
        link.went(Side::A, Some(connected.offer));
        link.came(Side::A, Body::of(&connected.answer));
        link.came(Side::B, Body::of(&answer_b));
        link.went(Side::B, Body::of(&connected.answer));
        link.bridge(a_rx, b_rx).await;
        close_answered(record_a);
        close_answered(record_b);
        self.app
            .proxy
            .dialogs
            .ended(&call_id, "callback", "connected", DialogKind::Call);
        if !converted {
            self.app.proxy.dialogs.release(&call_id, "callback", false);
        }
        Ok(())
    }

    /// Waits for a dial, answering the requests that come meanwhile. `up` is A's leg once
    /// it answered: its BYE cancels the dial and ends the callback.
    async fn wait(
        &self,
        mut dial: std::pin::Pin<Box<dyn std::future::Future<Output = Dialled> + Send>>,
        a_rx: &mut mpsc::Receiver<InDialog>,
        b_rx: &mut mpsc::Receiver<InDialog>,
        up: Option<&Leg>,
    ) -> Result<Dialled, Failure> {
        loop {
            tokio::select! {
                done = &mut dial => return Ok(done),
                Some(d) = a_rx.recv() => {
                    let bye = d.request.method() == Some(&Method::Bye) && d.side == Side::A;
                    let ours = up.is_some_and(|l| l.sent_by_peer(&d.request));
                    match d.request.method() {
                        Some(Method::Ack) => {}
                        _ if bye && ours => {
                            answer(&self.app, &d, 200, "OK");
                            self.cancel.cancel();
                            if let Dialled::Answered { leg, record, later, .. } = dial.await {
                                drop(later);
                                super::hang_up(&self.app, *leg);
                                close_answered(record);
                            }
                            return Err((487, "a hung up before b answered".into()));
                        }
                        Some(Method::Options) if ours => answer(&self.app, &d, 200, "OK"),
                        _ if ours => answer(&self.app, &d, 491, "Request Pending"),
                        _ => answer(&self.app, &d, 481, "Call/Transaction Does Not Exist"),
                    }
                }
                Some(d) = b_rx.recv() => {
                    if d.request.method() != Some(&Method::Ack) {
                        answer(&self.app, &d, 481, "Call/Transaction Does Not Exist");
                    }
                }
            }
        }
    }

    /// Step 3: A gets B's offer in a re-INVITE; its answer goes to B in B's ACK.
    async fn connect(
        &self,
        leg_a: &mut Leg,
        later: super::legs::AckLater,
        session: u64,
    ) -> Result<Connected, Failure> {
        let (content_type, offer) = later.offer();
        if offer.is_empty() {
            return Err((488, "b answered without a session description".into()));
        }
        let content_type = content_type.unwrap_or_else(|| "application/sdp".into());
        let origin = sdp::Origin {
            session,
            version: 2,
        };
        let offer = sdp::with_origin(offer, &origin)
            .ok_or((488, "b's session description is not text".to_owned()))?;
        let flow = leg_a.flow;
        let timer_lines = match self.app.settings.session_expires {
            0 => String::new(),
            s => super::timer::offer_lines(s),
        };
        let reinvite = leg_a
            .request(
                &Method::Invite,
                &via_on(&self.app.own, &flow),
                &timer_lines,
                Some(&content_type),
                &offer,
            )
            .ok_or((500, "the re-INVITE to a could not be built".to_owned()))?;
        let seq = leg_a.local_cseq;
        let mut events = self.app.layer.send_request(reinvite, flow);
        let answer = tokio::time::timeout(CONNECT_WAIT, final_response(&mut events))
            .await
            .ok()
            .flatten()
            .ok_or((408, "a did not answer the re-INVITE".to_owned()))?;
        let status = answer.status().unwrap_or(500);
        if !(200..300).contains(&status) {
            let reason = String::from_utf8_lossy(answer.reason().unwrap_or_default()).into_owned();
            return Err((status, format!("a refused b's session: {reason}")));
        }
        leg_a.refresh_target(&answer);
        if let Some(ack) = leg_a.ack(seq, &via_on(&self.app.own, &flow)) {
            let _ = self.app.layer.send_request(ack.clone(), flow);
            super::keep_acking(&self.app, events, &answer, ack, leg_a);
        }
        if answer.body().is_empty() {
            return Err((
                488,
                "a answered the re-INVITE without a session description".into(),
            ));
        }
        let answer_type = value(&answer, &tandem_sip::HeaderName::ContentType)
            .unwrap_or_else(|| content_type.clone());
        later.send(&answer_type, answer.body());
        Ok(Connected {
            offer: Body {
                content_type,
                bytes: offer.into(),
            },
            answer,
        })
    }
}

/// What connecting A to B left: the offer A got, and A's 2xx with its answer.
struct Connected {
    offer: Body,
    answer: Message,
}

/// The failure of dialling side `which`.
fn failure(which: &str, o: &DialOutcome) -> Failure {
    (o.code(), format!("{which}: {}", o.reason()))
}
