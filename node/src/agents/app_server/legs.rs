//! Legs the app server dials, and dial specs carried out over them. A leg is one INVITE
//! client of ours, on a task of its own: it sends the INVITE, answers the callee side's
//! 401/407 with the provider account's credentials, reports provisional responses, and
//! ends with the callee's answer (ACKed at once) or a failure. A leg that is cancelled
//! sends CANCEL and reports at once; it stays to ACK and BYE a 2xx that crosses the
//! CANCEL, so no call is left up that nobody bridges.
//!
//! A spec is carried out as its grammar says (dialplan/src/spec.rs): a parallel group
//! starts every member and takes the first answer, cancelling the rest; a serial group
//! tries its members in turn; a ringing time bounds its leg or group.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tandem_dialplan::{DialOutcome, DialSpec, Mode, Target};
use tandem_raft_store::command::ProviderAccount;
use tandem_sip::{Message, SipUri, Uri};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dialog::Leg;
use super::AppServer;
use crate::agents::auth::answer::DigestClient;
use crate::agents::cdr::{Open, Recorder};
use crate::agents::reach::PUBLIC_ONLY;
use crate::stack::transaction::ClientEvent;
use crate::stack::transport::{Flow, TransportKind};

/// How long a target may stay silent (not even a 100) before the next one is tried.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(4);
/// How long a cancelled leg waits for the final answer that may still be a 2xx.
const CANCEL_LINGER: Duration = Duration::from_secs(32);
/// Challenges answered per leg before its credentials count as refused.
const MAX_CHALLENGES: u32 = 2;

/// What every leg of one dial shares.
#[derive(Clone)]
pub struct DialContext {
    pub app: Arc<AppServer>,
    /// The customer whose providers the legs may use.
    pub customer: String,
    /// The call's token: our Contact on the dialled side is `tdb-<token>b`.
    pub token: String,
    /// The letter of the side the legs are on: `b`, or `a` for the first leg of a
    /// callback (the app server calls both sides).
    pub side: char,
    /// How a leg ACKs the 2xx that answers it.
    pub ack: AckMode,
    /// The session id of our SDP origin in the answers [`AckMode::Hold`] and
    /// [`AckMode::Later`] make (version 1); a later offer in the same session takes the
    /// next version.
    pub sdp_session: u64,
    /// The caller's From (name-addr, without tag): local legs show it.
    pub caller_from: String,
    /// The caller's domain: a bare user in a dial spec is an account there.
    pub caller_domain: String,
    /// The caller's session description, passed through unchanged.
    pub content_type: Option<String>,
    pub body: Bytes,
    /// Extra header lines for every leg (from the dialplan), each ending in CRLF.
    pub extra: String,
    /// A caller ID the dialplan set: number and display name.
    pub caller_id: Option<(String, Option<String>)>,
    /// Where legs report provisional responses, for the caller.
    pub provisional: mpsc::UnboundedSender<Message>,
    /// The default ringing time of a leg without one.
    pub ring_for: Duration,
    /// The caller's Max-Forwards less one: a call that comes back through a provider to
    /// this cluster runs out of hops rather than looping.
    pub max_forwards: u32,
    /// Where each leg's record goes, if the node keeps CDRs.
    pub records: Option<LegRecords>,
}

/// How a leg ACKs the 2xx that answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// At once, without a body: our INVITE carried the offer.
    Plain,
    /// At once, with an answer that holds the 2xx's offer without media (our INVITE had
    /// none; the session is connected later by a re-INVITE).
    Hold,
    /// When the dialler has the answer ([`AckLater`]): our INVITE had no offer, and the
    /// answer comes from the other side of the call.
    Later,
}

/// The ACK of an answered leg whose 2xx carried the offer, sent with the answer when the
/// dialler has it. Dropped unsent, it ACKs with an answer that holds the session without
/// media, so the 2xx is never left unacknowledged.
pub struct AckLater {
    app: Arc<AppServer>,
    leg: Leg,
    seq: u32,
    first: Message,
    events: Option<mpsc::UnboundedReceiver<ClientEvent>>,
    hold: Option<Vec<u8>>,
}

impl AckLater {
    /// The offer the 2xx carried, and its Content-Type.
    pub fn offer(&self) -> (Option<String>, &[u8]) {
        (
            super::dialog::value(&self.first, &tandem_sip::HeaderName::ContentType),
            self.first.body(),
        )
    }

    /// ACKs with `answer`, and every retransmission of the 2xx with the same.
    pub fn send(mut self, content_type: &str, answer: &[u8]) {
        self.ack(Some((content_type, answer)));
    }

    fn ack(&mut self, body: Option<(&str, &[u8])>) {
        let Some(events) = self.events.take() else {
            return;
        };
        let via = super::via_on(&self.app.own, &self.leg.flow);
        let ack = match body {
            Some((t, b)) => self.leg.ack_with(self.seq, &via, t, b),
            None => self.leg.ack(self.seq, &via),
        };
        if let Some(ack) = ack {
            let _ = self.app.layer.send_request(ack.clone(), self.leg.flow);
            super::keep_acking(&self.app, events, &self.first, ack, &self.leg);
        }
    }
}

impl Drop for AckLater {
    fn drop(&mut self) {
        let hold = self.hold.take();
        self.ack(hold.as_deref().map(|h| ("application/sdp", h)));
    }
}

/// What the records of a call's dialled legs share.
#[derive(Clone)]
pub struct LegRecords {
    pub recorder: Recorder,
    /// The caller's Call-ID: the call the legs belong to.
    pub call: String,
    pub customer: String,
    pub account: String,
    /// The caller as the legs present it.
    pub from: String,
    /// Legs dialled so far, for their names (`b1`, `b2`, ...).
    pub dialled: Arc<std::sync::atomic::AtomicU32>,
}

impl LegRecords {
    fn open(&self, to: &str, provider: Option<&str>) -> (Open, Recorder) {
        let n = self
            .dialled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut open = Open::new(
            &self.call,
            &format!("b{n}"),
            "out",
            &self.customer,
            &self.account,
        )
        .with_parties(&self.from, to);
        if let Some(p) = provider {
            open = open.via_provider(p);
        }
        (open, self.recorder.clone())
    }
}

/// A leg's record closed as `outcome` says it ended.
pub fn close_failed(open: Open, outcome: &DialOutcome) -> crate::agents::cdr::Cdr {
    match outcome {
        DialOutcome::Busy { code, reason } => open.close(*code, reason, "busy"),
        DialOutcome::NoAnswer => open.close(487, "Request Terminated", "no answer"),
        DialOutcome::CallerGone => open.close(487, "Request Terminated", "cancelled"),
        DialOutcome::Failed { code, reason } => open.close(*code, reason, "failed"),
        DialOutcome::Answered { .. } => open.close(200, "OK", "answered"),
    }
}

/// An answered leg's open record and where it goes when closed.
pub type LegRecord = Box<(Open, Recorder)>;

/// A connected leg's record, closed as the call on it ends.
pub fn close_answered(record: Option<LegRecord>) {
    if let Some(r) = record {
        let (open, recorder) = *r;
        recorder.record(open.close(200, "OK", "answered"));
    }
}

/// Where a leg reports how it ended (once), closing its record as it does.
struct Report {
    app: Arc<AppServer>,
    done: Option<oneshot::Sender<Dialled>>,
    record: Option<(Open, Recorder)>,
}

impl Report {
    fn waiting(&self) -> bool {
        self.done.is_some()
    }

    fn ringing(&mut self) {
        if let Some((open, _)) = &mut self.record {
            open.ringing();
        }
    }

    /// Reports a failure, if nothing was reported yet.
    fn failed(&mut self, outcome: DialOutcome) {
        if let Some(d) = self.done.take() {
            if let Some((open, recorder)) = self.record.take() {
                recorder.record(close_failed(open, &outcome));
            }
            let _ = d.send(Dialled::Failed(outcome));
        }
    }

    /// Reports `what`: a failure as [`Report::failed`] does.
    fn send(&mut self, what: Dialled) {
        match what {
            Dialled::Failed(o) => self.failed(o),
            Dialled::Answered {
                leg,
                answer,
                target,
                later,
                ..
            } => {
                if let Err(leg) = self.answered(leg, answer, target, later) {
                    super::hang_up(&self.app, *leg);
                }
            }
        }
    }

    /// Reports an answer; `Err` gives the leg back when nobody waits for it any more.
    fn answered(
        &mut self,
        leg: Box<Leg>,
        answer: Box<Message>,
        target: String,
        later: Option<Box<AckLater>>,
    ) -> Result<(), Box<Leg>> {
        let mut record = self.record.take().map(Box::new);
        if let Some(r) = &mut record {
            r.0.answered();
        }
        let Some(d) = self.done.take() else {
            close_answered(record);
            drop(later);
            return Err(leg);
        };
        match d.send(Dialled::Answered {
            leg,
            answer,
            target,
            record,
            later,
        }) {
            Ok(()) => Ok(()),
            Err(Dialled::Answered {
                leg, record, later, ..
            }) => {
                close_answered(record);
                drop(later);
                Err(leg)
            }
            Err(Dialled::Failed(_)) => unreachable!("an answer was sent"),
        }
    }
}

impl Drop for Report {
    /// A leg that ends without reporting (its task failed) still leaves its record.
    fn drop(&mut self) {
        if let Some((open, recorder)) = self.record.take() {
            recorder.record(open.close(500, "Server Internal Error", "failed"));
        }
    }
}

/// How a leg or a group ended.
pub enum Dialled {
    /// Answered: the dialled leg's dialog, the 2xx, and what was dialled.
    Answered {
        leg: Box<Leg>,
        answer: Box<Message>,
        target: String,
        /// The leg's record, open until the call on it ends.
        record: Option<LegRecord>,
        /// The ACK still to send, if the leg was dialled with [`AckMode::Later`].
        later: Option<Box<AckLater>>,
    },
    Failed(DialOutcome),
}

/// Carries out `spec`, stopping (and cancelling what rings) when `cancel` fires.
pub fn exec(
    ctx: DialContext,
    spec: DialSpec,
    cancel: CancellationToken,
) -> Pin<Box<dyn Future<Output = Dialled> + Send>> {
    Box::pin(async move {
        match spec {
            DialSpec::Leg {
                target,
                timeout_secs,
            } => {
                let ring = timeout_secs
                    .map(|s| Duration::from_secs(u64::from(s)))
                    .unwrap_or(ctx.ring_for);
                dial_leg(&ctx, &target, Instant::now() + ring, cancel).await
            }
            DialSpec::Group {
                mode,
                members,
                timeout_secs,
            } => {
                let group = async {
                    match mode {
                        Mode::Serial => serial(&ctx, members, &cancel).await,
                        Mode::Parallel => parallel(&ctx, members, &cancel).await,
                    }
                };
                match timeout_secs {
                    None => group.await,
                    Some(s) => {
                        match tokio::time::timeout(Duration::from_secs(u64::from(s)), group).await {
                            Ok(d) => d,
                            Err(_) => {
                                cancel.cancel();
                                Dialled::Failed(DialOutcome::NoAnswer)
                            }
                        }
                    }
                }
            }
        }
    })
}

async fn serial(ctx: &DialContext, members: Vec<DialSpec>, cancel: &CancellationToken) -> Dialled {
    let mut failures = Vec::new();
    for m in members {
        if cancel.is_cancelled() {
            break;
        }
        match exec(ctx.clone(), m, cancel.child_token()).await {
            a @ Dialled::Answered { .. } => return a,
            Dialled::Failed(o) => {
                let stop = matches!(
                    o,
                    DialOutcome::Failed {
                        code: 600..=699,
                        ..
                    }
                );
                failures.push(o);
                if stop {
                    break;
                }
            }
        }
    }
    Dialled::Failed(best_failure(failures))
}

async fn parallel(
    ctx: &DialContext,
    members: Vec<DialSpec>,
    cancel: &CancellationToken,
) -> Dialled {
    let mut running = tokio::task::JoinSet::new();
    let tokens: Vec<CancellationToken> = members.iter().map(|_| cancel.child_token()).collect();
    for (m, token) in members.into_iter().zip(tokens.iter().cloned()) {
        running.spawn(exec(ctx.clone(), m, token));
    }
    first_answer(&ctx.app, running, &tokens).await
}

/// Waits for the members of a group that ring at once (each with its token in `tokens`):
/// the first answer wins, the others stop ringing and any that answers too is ended;
/// without an answer, the failure that says most.
async fn first_answer(
    app: &Arc<AppServer>,
    mut running: tokio::task::JoinSet<Dialled>,
    tokens: &[CancellationToken],
) -> Dialled {
    let mut failures = Vec::new();
    while let Some(done) = running.join_next().await {
        match done {
            Ok(a @ Dialled::Answered { .. }) => {
                for t in tokens {
                    t.cancel();
                }
                reap(app, running);
                return a;
            }
            Ok(Dialled::Failed(o)) => failures.push(o),
            Err(_) => failures.push(DialOutcome::Failed {
                code: 500,
                reason: "Server Internal Error".into(),
            }),
        }
    }
    Dialled::Failed(best_failure(failures))
}

/// Waits, on a task of its own, for the members of a group that lost to another's answer,
/// and ends any of them that answered as well.
fn reap(app: &Arc<AppServer>, mut running: tokio::task::JoinSet<Dialled>) {
    let app = app.clone();
    tokio::spawn(async move {
        while let Some(done) = running.join_next().await {
            if let Ok(Dialled::Answered {
                leg, record, later, ..
            }) = done
            {
                drop(later);
                super::hang_up(&app, *leg);
                close_answered(record);
            }
        }
    });
}

/// The outcome that says most of several failures: a 6xx, then busy, then any other
/// failure, then no answer.
fn best_failure(failures: Vec<DialOutcome>) -> DialOutcome {
    let rank = |o: &DialOutcome| match o {
        DialOutcome::Failed {
            code: 600..=699, ..
        } => 0,
        DialOutcome::Busy { .. } => 1,
        DialOutcome::Failed { .. } => 2,
        DialOutcome::CallerGone => 3,
        DialOutcome::NoAnswer => 4,
        DialOutcome::Answered { .. } => 5,
    };
    failures
        .into_iter()
        .min_by_key(rank)
        .unwrap_or(DialOutcome::NoAnswer)
}

fn failed(code: u16, reason: impl Into<String>) -> Dialled {
    Dialled::Failed(DialOutcome::Failed {
        code,
        reason: reason.into(),
    })
}

/// One leg to `target`, ringing until `until`.
async fn dial_leg(
    ctx: &DialContext,
    target: &Target,
    until: Instant,
    cancel: CancellationToken,
) -> Dialled {
    let reader = ctx.app.cluster.replica.reader();
    let (number, provider) = match target {
        Target::Named { user, at: None } => {
            return dial_local(ctx, target, user, &ctx.caller_domain, until, cancel).await;
        }
        Target::Named {
            user,
            at: Some(name),
        } => {
            if reader.serves_domain(name).unwrap_or(false) {
                return dial_local(ctx, target, user, name, until, cancel).await;
            }
            let id = tandem_raft_store::command::provider_account_id(&ctx.customer, name);
            match reader.provider_account(&id).ok().flatten() {
                Some(p) if p.enabled => (user.clone(), p),
                Some(_) => return failed(403, format!("Forbidden (provider {name} is disabled)")),
                None => return failed(404, format!("Not Found (no provider named {name})")),
            }
        }
        Target::Uri(text) => {
            if text
                .get(..4)
                .is_some_and(|s| s.eq_ignore_ascii_case("tel:"))
            {
                // A telephone number: through the customer's only provider, as a call
                // without a dialplan goes.
                let number = text[4..].split(';').next().unwrap_or_default();
                if !super::dialable(number) {
                    return failed(
                        484,
                        format!("Address Incomplete ({text} is not a plain number)"),
                    );
                }
                match only_provider(&ctx.app, &ctx.customer) {
                    Ok(p) => (number.to_owned(), p),
                    Err(NoProvider::None) => {
                        return failed(
                            404,
                            format!("Not Found ({text}: the customer has no provider account)"),
                        );
                    }
                    Err(NoProvider::Several) => {
                        return failed(404, format!("Not Found ({text}: the customer has several provider accounts; write number@provider)"));
                    }
                }
            } else {
                let uri = match parse_sip(text) {
                    Ok(u) if u.headers.is_empty() => u,
                    _ => {
                        return failed(
                            400,
                            format!("Bad Request ({text} is not a SIP URI without headers)"),
                        )
                    }
                };
                let host = uri.host.canonical();
                if reader.serves_domain(&host).unwrap_or(false) {
                    let Some(user) = uri.user_unescaped() else {
                        return failed(404, format!("Not Found ({text} names no account)"));
                    };
                    return dial_local(ctx, target, &user, &host, until, cancel).await;
                }
                let (done_tx, done_rx) = oneshot::channel();
                let leg = OutLeg::uri(ctx, text, uri);
                tokio::spawn(leg.run(ctx.clone(), target.to_string(), until, cancel, done_tx));
                return done_rx
                    .await
                    .unwrap_or_else(|_| failed(500, "Server Internal Error"));
            }
        }
    };
    let (done_tx, done_rx) = oneshot::channel();
    let leg = OutLeg::provider(ctx, &number, provider);
    let label = target.to_string();
    match leg {
        Ok(leg) => {
            tokio::spawn(leg.run(ctx.clone(), label, until, cancel, done_tx));
        }
        Err(e) => {
            tracing::warn!(error = %e, "app server: cannot dial through the provider");
            return failed(503, format!("Service Unavailable ({e})"));
        }
    }
    done_rx
        .await
        .unwrap_or_else(|_| failed(500, "Server Internal Error"))
}

/// A local account: its phones rung the way the proxy would reach them (through their
/// edge nodes), the q-groups in turn and the phones of a group at once; the first to
/// answer wins and the others are cancelled.
async fn dial_local(
    ctx: &DialContext,
    target: &Target,
    user: &str,
    domain: &str,
    until: Instant,
    cancel: CancellationToken,
) -> Dialled {
    let (call_id, from_tag) = {
        let mut rng = rand::thread_rng();
        (
            format!("{:032x}@tandem", rng.gen::<u128>()),
            format!("{:016x}", rng.gen::<u64>()),
        )
    };
    let groups = match ctx.app.proxy.reach(user, domain, &call_id, &from_tag).await {
        Ok(g) => g,
        Err(r) => return failed(r.status, r.reason),
    };
    let label = target.to_string();
    let mut failures = Vec::new();
    for group in groups {
        if cancel.is_cancelled() {
            break;
        }
        let mut running = tokio::task::JoinSet::new();
        let tokens: Vec<CancellationToken> = group.iter().map(|_| cancel.child_token()).collect();
        for (reach, token) in group.into_iter().zip(tokens.iter().cloned()) {
            let leg = OutLeg::local(ctx, user, domain, &call_id, &from_tag, &reach);
            let (ctx, label) = (ctx.clone(), label.clone());
            running.spawn(async move {
                let (done_tx, done_rx) = oneshot::channel();
                tokio::spawn(leg.run_on(ctx, label, reach.flow, until, token, done_tx));
                done_rx
                    .await
                    .unwrap_or_else(|_| failed(500, "Server Internal Error"))
            });
        }
        match first_answer(&ctx.app, running, &tokens).await {
            a @ Dialled::Answered { .. } => return a,
            Dialled::Failed(o) => failures.push(o),
        }
    }
    Dialled::Failed(best_failure(failures))
}

/// One INVITE of ours: through a customer's provider account (answering its challenges),
/// or to a local account's phone.
struct OutLeg {
    /// The provider account, for a call through a provider.
    account: Option<ProviderAccount>,
    digest: Option<DigestClient>,
    request_uri: String,
    /// The URI resolved for the first hop: the outbound proxy's, or the registrar's.
    next_hop: Option<SipUri>,
    routes: Vec<String>,
    from: String,
    to: String,
    call_id: String,
    cseq: u32,
    record: Option<(Open, Recorder)>,
    /// The session interval our INVITE asks for (RFC 4028); 0: none. A 422 raises it.
    session_expires: u32,
}

impl OutLeg {
    fn provider(ctx: &DialContext, number: &str, a: ProviderAccount) -> Result<OutLeg, String> {
        let password = crate::agents::registration_agent::accounts::open_password(
            &ctx.app.cluster.keys(),
            &a,
        )?;
        let transport = a
            .transport
            .map(|t| format!(";transport={}", t.as_str()))
            .unwrap_or_default();
        let registrar = parse_sip(&format!("sip:{}{transport}", a.registrar))?;
        let domain = registrar.host.canonical();
        // `#` (in service codes like *31#) is not a URI user character: escaped.
        let number = number.replace('#', "%23");
        let request_uri = format!("sip:{number}@{}{transport}", a.registrar);
        let (next_hop, routes) = match &a.outbound_proxy {
            Some(p) => {
                let proxy = format!("sip:{p}{transport}");
                (parse_sip(&proxy)?, vec![format!("<{proxy};lr>")])
            }
            None => (parse_sip(&request_uri)?, Vec::new()),
        };
        let mut rng = rand::thread_rng();
        let display = ctx
            .caller_id
            .as_ref()
            .and_then(|(_, name)| name.as_ref())
            .map(|n| format!("\"{n}\" "))
            .unwrap_or_default();
        let auth_user = a
            .auth_username
            .clone()
            .unwrap_or_else(|| a.username.clone());
        // Only the provider's own realm is answered: a callee behind the provider that
        // challenges with a realm of its own must not get a digest of our password.
        let realm = a.realm.clone().unwrap_or_else(|| domain.clone());
        Ok(OutLeg {
            digest: Some(DigestClient::new(&auth_user, &password, Some(&realm))),
            from: format!(
                "{display}<sip:{}@{domain}>;tag={:016x}",
                a.username,
                rng.gen::<u64>()
            ),
            to: format!("<sip:{number}@{domain}>"),
            call_id: format!("{:032x}@tandem", rng.gen::<u128>()),
            cseq: 0,
            session_expires: ctx.app.settings.session_expires,
            request_uri,
            next_hop: Some(next_hop),
            routes,
            record: ctx
                .records
                .as_ref()
                .map(|r| r.open(&format!("{number}@{}", a.name), Some(&a.name))),
            account: Some(a),
        })
    }

    /// A leg to a SIP URI a dial spec names, outside the cluster: no credentials, the
    /// caller shown as the caller, the next hop found by RFC 3263 from the URI.
    fn uri(ctx: &DialContext, text: &str, uri: SipUri) -> OutLeg {
        let mut rng = rand::thread_rng();
        OutLeg {
            account: None,
            digest: None,
            request_uri: text.to_owned(),
            next_hop: Some(uri),
            routes: Vec::new(),
            from: format!("{};tag={:016x}", ctx.caller_from, rng.gen::<u64>()),
            to: format!("<{text}>"),
            call_id: format!("{:032x}@tandem", rng.gen::<u128>()),
            cseq: 0,
            record: ctx.records.as_ref().map(|r| r.open(text, None)),
            session_expires: ctx.app.settings.session_expires,
        }
    }

    /// A leg to one phone of the local account `user@domain`, reached as `reach` says;
    /// `call_id` and `from_tag` are shared by the phones of one account, as in a fork.
    fn local(
        ctx: &DialContext,
        user: &str,
        domain: &str,
        call_id: &str,
        from_tag: &str,
        reach: &crate::agents::proxy::Reach,
    ) -> OutLeg {
        OutLeg {
            account: None,
            digest: None,
            request_uri: reach.contact.to_string(),
            next_hop: None,
            routes: reach.routes.clone(),
            from: format!("{};tag={from_tag}", ctx.caller_from),
            to: format!("<sip:{user}@{domain}>"),
            call_id: call_id.to_owned(),
            cseq: 0,
            session_expires: ctx.app.settings.session_expires,
            record: ctx
                .records
                .as_ref()
                .map(|r| r.open(&format!("{user}@{domain}"), None)),
        }
    }

    /// Where this leg reports, with its record.
    fn report(&mut self, ctx: &DialContext, done: oneshot::Sender<Dialled>) -> Report {
        Report {
            app: ctx.app.clone(),
            done: Some(done),
            record: self.record.take(),
        }
    }

    /// Dials over `flow` alone (a local phone). Reports once on `done`.
    async fn run_on(
        mut self,
        ctx: DialContext,
        label: String,
        flow: Flow,
        until: Instant,
        cancel: CancellationToken,
        done: oneshot::Sender<Dialled>,
    ) {
        let mut report = self.report(&ctx, done);
        if let Some(f) = self
            .exchange(&ctx, &label, flow, until, &cancel, &mut report)
            .await
        {
            report.send(f);
        }
    }

    /// The next INVITE of this leg (CSeq one higher, credentials if challenged).
    fn invite(&mut self, ctx: &DialContext, flow: &Flow) -> Message {
        let mut rng = rand::thread_rng();
        self.cseq += 1;
        let sent_by = ctx.app.own.advertised(flow.transport, flow.local);
        let via = format!(
            "SIP/2.0/{} {sent_by};branch=z9hG4bK{:016x};rport",
            flow.transport.as_str(),
            rng.gen::<u64>()
        );
        let mut text = format!(
            "INVITE {} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: {}\r\n",
            self.request_uri, ctx.max_forwards
        );
        for r in &self.routes {
            text.push_str(&format!("Route: {r}\r\n"));
        }
        text.push_str(&format!(
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} INVITE\r\nContact: <{}>\r\n\
             Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE\r\nUser-Agent: {}\r\n",
            self.from,
            self.to,
            self.call_id,
            self.cseq,
            contact_uri(ctx, flow),
            crate::stack::responses::SERVER,
        ));
        if let (Some((number, name)), Some(_)) = (&ctx.caller_id, &self.account) {
            let display = name
                .as_ref()
                .map(|n| format!("\"{n}\" "))
                .unwrap_or_default();
            let domain = self.next_domain();
            text.push_str(&format!(
                "P-Preferred-Identity: {display}<sip:{number}@{domain}>\r\n"
            ));
        }
        if self.session_expires > 0 {
            text.push_str(&super::timer::offer_lines(self.session_expires));
        }
        text.push_str(&ctx.extra);
        let answer = self
            .digest
            .as_mut()
            .and_then(|d| d.answer("INVITE", &self.request_uri, &mut rng));
        if let Some((header, value)) = answer {
            text.push_str(&format!("{header}: {value}\r\n"));
        }
        if let Some(t) = &ctx.content_type {
            text.push_str(&format!("Content-Type: {t}\r\n"));
        }
        text.push_str(&format!("Content-Length: {}\r\n\r\n", ctx.body.len()));
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(&ctx.body);
        Message::parse_datagram(Bytes::from(bytes), usize::MAX)
            .expect("an INVITE built from validated fields parses")
    }

    fn next_domain(&self) -> String {
        self.account
            .as_ref()
            .and_then(|a| parse_sip(&format!("sip:{}", a.registrar)).ok())
            .map(|u| u.host.canonical())
            .unwrap_or_default()
    }

    /// Dials: each target of the provider's name in turn until one answers, then the
    /// exchange there until a final answer. Reports once on `done`.
    async fn run(
        mut self,
        ctx: DialContext,
        label: String,
        until: Instant,
        cancel: CancellationToken,
        done: oneshot::Sender<Dialled>,
    ) {
        let mut report = self.report(&ctx, done);
        let Some(next_hop) = self.next_hop.clone() else {
            report.send(failed(500, "Server Internal Error"));
            return;
        };
        // A URI from a dial spec, or a provider account, may name any host: unless the
        // operator allows it, never one inside the network (loopback, private,
        // link-local), where a customer must not reach what the public cannot
        // (agents::reach).
        let settings = &ctx.app.settings;
        let guard = match &self.account {
            Some(_) => Some((
                &settings.provider_reach,
                "registration_agent.private_networks",
            )),
            None if !settings.uri_private_targets => {
                Some((&PUBLIC_ONLY, "app_server.uri_private_targets"))
            }
            None => None,
        };
        let targets = match ctx.app.resolver.targets(&next_hop).await {
            Ok(mut t) if !t.is_empty() && guard.is_some() => {
                let (reach, key) = guard.expect("just checked");
                t.retain(|t| reach.allows(t.addr.ip()));
                if t.is_empty() {
                    report.send(failed(
                        403,
                        format!(
                            "Forbidden ({} is not a public address; see {key})",
                            next_hop.host
                        ),
                    ));
                    return;
                }
                t
            }
            Ok(t) if !t.is_empty() => t,
            Ok(_) => {
                report.send(failed(503, "Service Unavailable (no usable target)"));
                return;
            }
            Err(e) => {
                report.send(failed(503, format!("Service Unavailable ({e})")));
                return;
            }
        };
        let mut last = failed(408, "Request Timeout");
        for target in targets {
            let flow = if target.transport == TransportKind::Tls {
                let name = next_hop.host.canonical();
                let ca = self
                    .account
                    .as_ref()
                    .and_then(|a| a.ca_file.as_deref())
                    .map(std::path::Path::new);
                ctx.app
                    .transports
                    .flow_to_tls(target.addr, name.trim_end_matches('.'), ca)
                    .await
            } else {
                ctx.app
                    .transports
                    .flow_to(target.transport, target.addr)
                    .await
            };
            let Ok(flow) = flow else {
                last = failed(
                    503,
                    format!("Service Unavailable (cannot reach {})", target.addr),
                );
                continue;
            };
            match self
                .exchange(&ctx, &label, flow, until, &cancel, &mut report)
                .await
            {
                Some(next) => last = next,
                None => return,
            }
        }
        report.send(last);
    }

    /// INVITEs to one target until a final answer. `Some(failure)`: the next target may be
    /// tried (no answer at all, or 503); `None`: reported, done.
    async fn exchange(
        &mut self,
        ctx: &DialContext,
        label: &str,
        flow: Flow,
        until: Instant,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> Option<Dialled> {
        let mut challenges = 0;
        let mut raised = false;
        'invite: loop {
            let invite = self.invite(ctx, &flow);
            let mut events = ctx.app.layer.send_request(invite.clone(), flow);
            let mut heard = false;
            let mut cancelled_at: Option<Instant> = None;
            let first_wait = Instant::now() + FIRST_ANSWER_WAIT;
            loop {
                let wake = match cancelled_at {
                    Some(at) => at + CANCEL_LINGER,
                    None if !heard => first_wait.min(until),
                    None => until,
                };
                tokio::select! {
                    event = events.recv() => {
                        let Some(event) = event else {
                            return Some(failed(500, "Server Internal Error"));
                        };
                        let response = match event {
                            ClientEvent::Response(r) => *r,
                            ClientEvent::Timeout if !heard => return Some(failed(408, "Request Timeout")),
                            ClientEvent::Timeout => {
                                report.failed(DialOutcome::NoAnswer);
                                return None;
                            }
                            ClientEvent::TransportError => {
                                return Some(failed(503, "Service Unavailable (connection failed)"));
                            }
                        };
                        heard = true;
                        let status = response.status().unwrap_or(500);
                        match status {
                            100 => {}
                            101..=199 => {
                                if cancelled_at.is_none() {
                                    report.ringing();
                                    let _ = ctx.provisional.send(response);
                                }
                            }
                            200..=299 => {
                                let leg = Leg::from_answer(&invite, &response, contact_uri(ctx, &flow), flow);
                                let hold = match ctx.ack {
                                    AckMode::Plain => None,
                                    AckMode::Hold | AckMode::Later => {
                                        let origin = super::sdp::Origin { session: ctx.sdp_session, version: 1 };
                                        super::sdp::black_hole_answer(response.body(), &origin)
                                    }
                                };
                                // Held at once, the offer must be one we can hold; answered
                                // later, the dialler judges it.
                                let unusable = ctx.ack == AckMode::Hold && hold.is_none();
                                let later = AckLater {
                                    app: ctx.app.clone(),
                                    leg: leg.clone(),
                                    seq: self.cseq,
                                    first: response.clone(),
                                    events: Some(events),
                                    hold,
                                };
                                if unusable {
                                    // An offer we cannot answer (none, encrypted media, not
                                    // SDP): the dialog ends at once, and nothing more is
                                    // dialled for it.
                                    drop(later);
                                    super::hang_up(&ctx.app, leg);
                                    report.failed(DialOutcome::Failed {
                                        code: 488,
                                        reason: "Not Acceptable Here (the answer carries no session description we can use)".into(),
                                    });
                                    return None;
                                }
                                // Plain and Hold ACK here (dropped); Later waits for the dialler.
                                let later = (ctx.ack == AckMode::Later).then(|| Box::new(later));
                                if cancelled_at.is_some() || !report.waiting() {
                                    // Answered after we gave up: end it at once.
                                    drop(later);
                                    super::hang_up(&ctx.app, leg);
                                    report.failed(DialOutcome::NoAnswer);
                                    return None;
                                }
                                // Nobody waits any more (a group's ringing time ran out as
                                // it answered): end it rather than leave it up.
                                if let Err(leg) = report.answered(Box::new(leg), Box::new(response), label.to_owned(), later) {
                                    super::hang_up(&ctx.app, *leg);
                                }
                                return None;
                            }
                            401 | 407 if cancelled_at.is_none() && challenges < MAX_CHALLENGES => {
                                challenges += 1;
                                let taken = match self.digest.as_mut() {
                                    Some(d) => d.take_challenge(&response, status == 407),
                                    None => Err("a phone challenged the app server".into()),
                                };
                                match taken {
                                    Ok(()) => continue 'invite,
                                    Err(e) => {
                                        tracing::warn!(target_name = label, error = %e, "app server: a challenge was not answered");
                                        report.send(failed(status, reason_of(&response)));
                                        return None;
                                    }
                                }
                            }
                            // Our session interval is too small for the callee: once more with its
                            // minimum (RFC 4028 §7.4).
                            422 if cancelled_at.is_none() && !raised => {
                                match super::timer::min_se(&response) {
                                    Some(min) if min > self.session_expires => {
                                        raised = true;
                                        self.session_expires = min;
                                        continue 'invite;
                                    }
                                    _ => {
                                        report.send(failed(422, reason_of(&response)));
                                        return None;
                                    }
                                }
                            }
                            503 if cancelled_at.is_none() => return Some(failed(503, reason_of(&response))),
                            _ => {
                                let outcome = match status {
                                    486 | 600 => DialOutcome::Busy { code: status, reason: reason_of(&response) },
                                    408 | 480 => DialOutcome::NoAnswer,
                                    487 if cancelled_at.is_some() => DialOutcome::NoAnswer,
                                    _ => DialOutcome::Failed { code: status, reason: reason_of(&response) },
                                };
                                report.failed(outcome);
                                return None;
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(wake) => {
                        if cancelled_at.is_some() {
                            return None;
                        }
                        if !heard && Instant::now() < until && !cancel.is_cancelled() {
                            // Not even a 100 from this target: the next one.
                            return Some(failed(408, "Request Timeout"));
                        }
                        self.send_cancel(ctx, &invite, flow);
                        cancelled_at = Some(Instant::now());
                        report.failed(DialOutcome::NoAnswer);
                    }
                    _ = cancel.cancelled(), if cancelled_at.is_none() => {
                        self.send_cancel(ctx, &invite, flow);
                        cancelled_at = Some(Instant::now());
                        report.failed(DialOutcome::CallerGone);
                    }
                }
            }
        }
    }

    /// Cancels `invite` at the next hop.
    fn send_cancel(&self, ctx: &DialContext, invite: &Message, flow: Flow) {
        if let Some(cancel) = crate::stack::transaction::cancel_for(invite) {
            let _ = ctx.app.layer.send_request(cancel, flow);
        }
    }
}

/// Why a customer has no single provider account to call out through.
pub enum NoProvider {
    None,
    Several,
}

/// The customer's only enabled provider account: where a number goes when nothing names
/// a provider (a call without a dialplan, a `tel:` target).
pub fn only_provider(app: &AppServer, customer: &str) -> Result<ProviderAccount, NoProvider> {
    let mut enabled = app
        .cluster
        .replica
        .reader()
        .provider_accounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.customer == customer && p.enabled);
    match (enabled.next(), enabled.next()) {
        (Some(p), None) => Ok(p),
        (None, _) => Err(NoProvider::None),
        (Some(_), Some(_)) => Err(NoProvider::Several),
    }
}

fn reason_of(m: &Message) -> String {
    String::from_utf8_lossy(m.reason().unwrap_or_default()).into_owned()
}

fn parse_sip(s: &str) -> Result<SipUri, String> {
    Uri::parse(s)
        .ok()
        .and_then(|u| u.as_sip().cloned())
        .ok_or_else(|| format!("{s:?} is not a SIP URI"))
}

/// Our Contact on the dialled side of the call, on `flow`.
fn contact_uri(ctx: &DialContext, flow: &Flow) -> String {
    super::contact_on(&ctx.app.own, flow, &ctx.token, ctx.side)
}
