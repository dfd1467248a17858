//! A connected call's two legs, and the task that keeps them connected: every request
//! inside the call relayed from one leg to the other until a BYE, each leg's session timer
//! (RFC 4028, `timer.rs`) kept, each leg asked now and then whether it is still there,
//! and the call ended at `max_call_secs`.
//!
//! A refresh of one leg's session (an UPDATE without a body, or a re-INVITE that offers
//! the description the leg last sent) is answered on that leg and goes no further; any
//! other INVITE or UPDATE is relayed, and its 2xx refreshes both legs. When we are a
//! leg's refresher we send UPDATE if the peer allows it, else a re-INVITE that offers
//! again the description we last sent it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_sip::{HeaderName, Message, Method};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::dialog::{value, Leg};
use super::timer::{Refresher, SessionTimer};
use super::{hang_up, via_on, AppServer, InDialog, Side};
use crate::stack::transaction::{ClientEvent, TxId};
use crate::stack::transport::Flow;

/// How long the sender of a 2xx to an INVITE has to ACK it before the call is ended
/// (64 × T1).
const ACK_WAIT: Duration = Duration::from_secs(32);
/// How long a request relayed inside a call may wait for its answer.
const RELAY_WAIT: Duration = Duration::from_secs(32);
/// How long a caller's request waits for the caller's ACK while the callee waits for its
/// own (see [`Bridge::after_callers_ack`]).
const ACK_GRACE: Duration = Duration::from_secs(1);
/// How soon a refresh of ours that failed (other than 408 or 481) is tried again.
const REFRESH_RETRY: Duration = Duration::from_secs(10);

/// A session description and its Content-Type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Body {
    pub content_type: String,
    pub bytes: Bytes,
}

impl Body {
    /// The body of `m`, if it has one.
    pub fn of(m: &Message) -> Option<Body> {
        (!m.body().is_empty()).then(|| Body {
            content_type: value(m, &HeaderName::ContentType)
                .unwrap_or_else(|| "application/sdp".into()),
            bytes: Bytes::copy_from_slice(m.body()),
        })
    }
}

/// One leg's session timer and when it is next due.
#[derive(Clone, Copy, Debug)]
struct LegTimer {
    timer: SessionTimer,
    due: Instant,
    /// Whether the peer listed UPDATE in its Allow: our refreshes use it.
    allows_update: bool,
    /// A refresh of ours is waiting for its answer.
    busy: bool,
}

/// How a refresh of ours ended.
enum Refreshed {
    Answer(Box<Message>),
    /// No answer, or the connection failed.
    Gone,
}

fn idx(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

/// A call's two legs, and what relaying requests between them needs.
pub(super) struct Bridge {
    pub app: Arc<AppServer>,
    /// The call's token, for the log.
    pub token: String,
    pub a: Leg,
    pub b: Option<Leg>,
    /// The 2xx to an INVITE (the first, or a re-INVITE) that its sender has not ACKed yet.
    pub unacked: Option<Unacked>,
    /// Each leg's session timer, A first.
    timers: [Option<LegTimer>; 2],
    /// The last session description each leg sent us, and the last we sent it, A first.
    sdp_from: [Option<Body>; 2],
    sdp_to: [Option<Body>; 2],
    /// A callback's origin for what A is sent: every description from B reaches A under
    /// it, with a higher version each time (RFC 3264 §8). None in other calls, whose
    /// descriptions pass unchanged.
    pub origin_a: Option<super::sdp::Origin>,
    /// The callee's ACK, waiting for the answer the caller's ACK brings (a caller that
    /// sent no offer got the callee's in our 2xx).
    pub ack_later: Option<Box<super::legs::AckLater>>,
}

/// A 2xx we sent to an INVITE, retransmitted over UDP until its ACK (RFC 3261 §13.3.1.4:
/// the UAS core does this, not the transaction).
pub(super) struct Unacked {
    side: Side,
    tx: TxId,
    response: Message,
    udp: bool,
    next: Instant,
    every: Duration,
    give_up: Instant,
}

impl Unacked {
    pub fn new(side: Side, tx: TxId, response: Message, flow: &Flow) -> Unacked {
        let every = Duration::from_millis(500);
        Unacked {
            side,
            tx,
            response,
            udp: flow.transport == crate::stack::transport::TransportKind::Udp,
            next: Instant::now() + every,
            every,
            give_up: Instant::now() + ACK_WAIT,
        }
    }
}

impl Bridge {
    pub fn new(app: Arc<AppServer>, token: String, a: Leg) -> Bridge {
        Bridge {
            app,
            token,
            a,
            b: None,
            unacked: None,
            timers: [None, None],
            sdp_from: [None, None],
            sdp_to: [None, None],
            origin_a: None,
            ack_later: None,
        }
    }

    /// A body on its way to leg `side`: re-stamped with A's origin in a callback.
    fn outgoing(&mut self, side: Side, content_type: Option<&str>, body: &[u8]) -> Bytes {
        let sdp = content_type.is_none_or(|t| t.eq_ignore_ascii_case("application/sdp"));
        match (&mut self.origin_a, side) {
            (Some(origin), Side::A) if sdp && !body.is_empty() => {
                origin.version += 1;
                match super::sdp::with_origin(body, origin) {
                    Some(b) => b.into(),
                    None => Bytes::copy_from_slice(body),
                }
            }
            _ => Bytes::copy_from_slice(body),
        }
    }

    /// Starts leg `side`'s session timer, if it negotiated one; `peer` is the peer's
    /// message that listed what it allows (its INVITE, or its 2xx).
    pub fn set_timer(&mut self, side: Side, timer: Option<SessionTimer>, peer: &Message) {
        self.timers[idx(side)] = timer.map(|timer| LegTimer {
            timer,
            due: Instant::now() + timer.due_after(),
            allows_update: allows(peer, &Method::Update),
            busy: false,
        });
    }

    /// Notes the session description leg `side` sent us.
    pub fn came(&mut self, side: Side, body: Option<Body>) {
        if body.is_some() {
            self.sdp_from[idx(side)] = body;
        }
    }

    /// Notes the session description we sent leg `side`.
    pub fn went(&mut self, side: Side, body: Option<Body>) {
        if body.is_some() {
            self.sdp_to[idx(side)] = body;
        }
    }

    /// The session timer headers of a 2xx of ours to leg `side`'s INVITE.
    pub fn response_headers(&self, side: Side) -> Vec<(HeaderName, String)> {
        self.timers[idx(side)]
            .map(|t| t.timer.response_headers())
            .unwrap_or_default()
    }

    fn leg(&self, side: Side) -> Option<&Leg> {
        match side {
            Side::A => Some(&self.a),
            Side::B => self.b.as_ref(),
        }
    }

    fn leg_mut(&mut self, side: Side) -> Option<&mut Leg> {
        match side {
            Side::A => Some(&mut self.a),
            Side::B => self.b.as_mut(),
        }
    }

    /// When the next session timer is due, if a leg has one that is not waiting.
    fn next_due(&self) -> Option<Instant> {
        self.timers
            .iter()
            .flatten()
            .filter(|t| !t.busy)
            .map(|t| t.due)
            .min()
    }

    /// A refresh of leg `side`'s session happened now.
    fn refreshed_now(&mut self, side: Side) {
        if let Some(t) = &mut self.timers[idx(side)] {
            t.due = Instant::now() + t.timer.due_after();
        }
    }

    /// Relays requests between the legs until a BYE.
    pub(super) async fn bridge(
        &mut self,
        a_rx: &mut mpsc::Receiver<InDialog>,
        b_rx: &mut mpsc::Receiver<InDialog>,
    ) {
        let settings = self.app.settings.clone();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let ends_at = settings.max_call.map_or(far, |m| Instant::now() + m);
        let mut next_probe = settings.keepalive.map_or(far, |k| Instant::now() + k);
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(Side, bool)>();
        let (refresh_tx, mut refresh_rx) = mpsc::unbounded_channel::<(Side, Refreshed)>();
        loop {
            let resend_at = self.unacked.as_ref().map_or(far, |u| u.next);
            let timer_at = self.next_due();
            tokio::select! {
                _ = tokio::time::sleep_until(ends_at) => {
                    tracing::info!(call = %self.token, "app server: the call reached app_server.max_call_secs; ending it");
                    self.end_both().await;
                    return;
                }
                _ = tokio::time::sleep_until(timer_at.unwrap_or(far)), if timer_at.is_some() => {
                    if self.timers_due(&refresh_tx) {
                        self.end_both().await;
                        return;
                    }
                }
                Some((side, r)) = refresh_rx.recv() => {
                    if self.refresh_answered(side, r) {
                        self.end_both().await;
                        return;
                    }
                }
                _ = tokio::time::sleep_until(next_probe) => {
                    next_probe = Instant::now() + settings.keepalive.unwrap_or(Duration::from_secs(60));
                    self.probe(Side::A, &probe_tx);
                    self.probe(Side::B, &probe_tx);
                }
                Some((side, alive)) = probe_rx.recv() => {
                    if !alive {
                        tracing::info!(call = %self.token, ?side, "app server: a leg of the call is gone; ending the call");
                        self.end_both().await;
                        return;
                    }
                }
                got = a_rx.recv() => {
                    let Some(d) = got else { return };
                    for d in self.after_callers_ack(d, a_rx).await {
                        if self.relay(d).await {
                            return;
                        }
                    }
                }
                got = b_rx.recv() => {
                    let Some(d) = got else { return };
                    if self.relay(d).await {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(resend_at), if self.unacked.is_some() => {
                    let Some(u) = self.unacked.as_mut() else { continue };
                    if Instant::now() >= u.give_up {
                        tracing::info!(call = %self.token, side = ?u.side, "app server: an answer was never ACKed; ending the call");
                        self.end_both().await;
                        return;
                    }
                    if u.udp {
                        self.app.layer.respond(u.tx, u.response.clone());
                    }
                    u.every = (u.every * 2).min(Duration::from_secs(4));
                    u.next = Instant::now() + u.every;
                }
            }
        }
    }

    /// The caller's requests in the order they must be relayed. While the callee waits
    /// for its ACK (a late offer), a request of the caller's that came before the caller's
    /// ACK waits up to [`ACK_GRACE`] for it: the two are sent back to back, but may be
    /// handed to this task the other way round, and a callee that gets a re-INVITE or BYE
    /// before its ACK may refuse it or never ACK its answer.
    async fn after_callers_ack(
        &mut self,
        first: InDialog,
        a_rx: &mut mpsc::Receiver<InDialog>,
    ) -> Vec<InDialog> {
        let is_ack = |d: &InDialog| d.request.method() == Some(&Method::Ack);
        if self.ack_later.is_none() || is_ack(&first) {
            return vec![first];
        }
        let mut held = vec![first];
        let deadline = Instant::now() + ACK_GRACE;
        while self.ack_later.is_some() {
            match tokio::time::timeout_at(deadline, a_rx.recv()).await {
                Ok(Some(d)) if is_ack(&d) => {
                    self.relay(d).await;
                }
                Ok(Some(d)) => held.push(d),
                Ok(None) | Err(_) => break,
            }
        }
        held
    }

    /// Acts on the session timers that are due: refreshes the legs we refresh; true if a
    /// leg whose peer refreshes let its session expire (the call must end).
    fn timers_due(&mut self, report: &mpsc::UnboundedSender<(Side, Refreshed)>) -> bool {
        let now = Instant::now();
        for side in [Side::A, Side::B] {
            let Some(t) = self.timers[idx(side)] else {
                continue;
            };
            if t.busy || t.due > now {
                continue;
            }
            match t.timer.refresher {
                Refresher::Peer => {
                    tracing::info!(call = %self.token, ?side, interval = t.timer.interval, "app server: a leg's session expired without a refresh; ending the call");
                    return true;
                }
                Refresher::Us => self.refresh(side, report),
            }
        }
        false
    }

    /// Sends a refresh of leg `side`'s session; the answer comes back on `report`.
    fn refresh(&mut self, side: Side, report: &mpsc::UnboundedSender<(Side, Refreshed)>) {
        let i = idx(side);
        let Some(t) = self.timers[i] else {
            return;
        };
        let body = if t.allows_update {
            None
        } else {
            self.sdp_to[i].clone()
        };
        let method = if body.is_some() {
            Method::Invite
        } else {
            Method::Update
        };
        let app = self.app.clone();
        let Some(leg) = self.leg_mut(side) else {
            return;
        };
        let flow = leg.flow;
        let request = leg.request(
            &method,
            &via_on(&app.own, &flow),
            &t.timer.request_lines(),
            body.as_ref().map(|b| b.content_type.as_str()),
            body.as_ref().map_or(&b""[..], |b| &b.bytes[..]),
        );
        let Some(request) = request else {
            // Nothing to send it to (a peer whose 2xx had no usable Contact): try again
            // later rather than at once, and let the session lapse if the peer lets it.
            if let Some(t) = &mut self.timers[i] {
                t.due = Instant::now() + REFRESH_RETRY;
            }
            return;
        };
        let (seq, leg) = (leg.local_cseq, leg.clone());
        if let Some(t) = &mut self.timers[i] {
            t.busy = true;
        }
        let mut events = app.layer.send_request(request, flow);
        let report = report.clone();
        tokio::spawn(async move {
            let outcome = match final_response(&mut events).await {
                Some(r) => Refreshed::Answer(Box::new(r)),
                None => Refreshed::Gone,
            };
            if let Refreshed::Answer(r) = &outcome {
                let ok = (200..300).contains(&r.status().unwrap_or(0));
                if method == Method::Invite && ok {
                    if let Some(ack) = leg.ack(seq, &via_on(&app.own, &flow)) {
                        let _ = app.layer.send_request(ack.clone(), flow);
                        super::keep_acking(&app, events, r, ack, &leg);
                    }
                }
            }
            let _ = report.send((side, outcome));
        });
    }

    /// A refresh of ours was answered; true if the leg has gone (408, 481, no answer).
    fn refresh_answered(&mut self, side: Side, outcome: Refreshed) -> bool {
        let i = idx(side);
        let Some(mut t) = self.timers[i] else {
            return false;
        };
        t.busy = false;
        let now = Instant::now();
        let gone = match outcome {
            Refreshed::Gone => true,
            Refreshed::Answer(r) => match r.status().unwrap_or(500) {
                200..=299 => {
                    if let Some(new) = SessionTimer::for_answer(&r) {
                        t.timer = new;
                    }
                    t.due = now + t.timer.due_after();
                    self.sdp_from[i] = Body::of(&r).or(self.sdp_from[i].take());
                    false
                }
                408 | 481 => true,
                // The peer does not take UPDATE after all: a re-INVITE, at once.
                405 | 501 if t.allows_update => {
                    t.allows_update = false;
                    t.due = now;
                    false
                }
                // The session goes on; the peer ends it if it must (RFC 4028 §10).
                _ => {
                    t.due = now + REFRESH_RETRY.min(t.timer.due_after());
                    false
                }
            },
        };
        if gone {
            tracing::info!(call = %self.token, ?side, "app server: a session refresh found the leg gone; ending the call");
        }
        self.timers[i] = Some(t);
        gone
    }

    /// Whether `request` from leg `side` only refreshes that leg's session.
    fn is_refresh(&self, side: Side, method: &Method, request: &Message) -> bool {
        let i = idx(side);
        if self.timers[i].is_none() {
            return false;
        }
        match method {
            Method::Update => request.body().is_empty(),
            Method::Invite => {
                !request.body().is_empty()
                    && self.sdp_to[i].is_some()
                    && self.sdp_from[i]
                        .as_ref()
                        .is_some_and(|b| b.bytes[..] == *request.body())
            }
            _ => false,
        }
    }

    /// Answers a refresh of leg `side`'s session on that leg: 200 with the timer's
    /// headers (and, to a re-INVITE, the description we last sent it).
    fn answer_refresh(&mut self, d: &InDialog, method: &Method) {
        let i = idx(d.side);
        let Some(tx) = d.tx else {
            return;
        };
        // A refresh that no longer asks for timers turns them off on this leg (RFC 4028 §9).
        let timer = SessionTimer::for_request(&d.request, self.app.settings.session_expires);
        match (timer, &mut self.timers[i]) {
            (Some(new), Some(t)) => {
                t.timer = new;
                t.due = Instant::now() + new.due_after();
            }
            (None, t) => *t = None,
            (Some(_), None) => {}
        }
        let Some(leg) = self.leg(d.side) else {
            return;
        };
        let (contact, flow) = (leg.contact.clone(), leg.flow);
        let mut r = Message::response_to(&d.request, 200, "OK");
        r.push_header(HeaderName::Contact, format!("<{contact}>"));
        if let Some(t) = timer {
            for (name, value) in t.response_headers() {
                r.push_header(name, value);
            }
        }
        if *method == Method::Invite {
            if let Some(b) = &self.sdp_to[i] {
                r.set_header(HeaderName::ContentType, b.content_type.clone());
                r.set_body(b.bytes.clone());
            }
        }
        crate::stack::responses::stamp(&mut r);
        if *method == Method::Invite {
            self.unacked = Some(Unacked::new(d.side, tx, r.clone(), &flow));
        }
        self.app.layer.respond(tx, r);
    }

    /// Relays one request from a leg to the other; true once the call has ended.
    async fn relay(&mut self, d: InDialog) -> bool {
        let Some(method) = d.request.method().cloned() else {
            return false;
        };
        if method == Method::Ack {
            if self.unacked.as_ref().is_some_and(|u| u.side == d.side) {
                self.unacked = None;
            }
            if d.side == Side::A && self.a.sent_by_peer(&d.request) {
                if let Some(later) = self.ack_later.take() {
                    // The caller's answer to the callee's offer: on to the callee. An ACK
                    // without one leaves the callee held (the drop sends that).
                    if let Some(answer) = Body::of(&d.request) {
                        later.send(&answer.content_type, &answer.bytes);
                        self.came(Side::A, Some(answer.clone()));
                        self.went(Side::B, Some(answer));
                    }
                }
            }
            return false;
        }
        // The token names the leg; the request must be that leg's peer's too.
        let same_call = self.leg(d.side).is_some_and(|l| l.sent_by_peer(&d.request));
        if self.b.is_none() || !same_call {
            answer(&self.app, &d, 481, "Call/Transaction Does Not Exist");
            return false;
        }
        if matches!(method, Method::Invite | Method::Update) {
            if let Some(l) = self.leg_mut(d.side) {
                l.refresh_target(&d.request);
            }
            if self.is_refresh(d.side, &method, &d.request) {
                self.answer_refresh(&d, &method);
                return false;
            }
        }
        if method == Method::Bye {
            // A callee still waiting for its ACK gets it (held) before the BYE.
            drop(self.ack_later.take());
        }
        let (src_side, dst_side) = (d.side, other(d.side));
        let dst_timer = self.timers[idx(dst_side)].map(|t| t.timer);
        let ctype = value(&d.request, &HeaderName::ContentType);
        let offer = self.outgoing(dst_side, ctype.as_deref(), d.request.body());
        let Some(mut b) = self.b.take() else {
            return false;
        };
        let (src, dst) = match d.side {
            Side::A => (&mut self.a, &mut b),
            Side::B => (&mut b, &mut self.a),
        };
        let flow = dst.flow;
        let via = via_on(&self.app.own, &flow);
        let mut extra: String = RELAYED
            .iter()
            .flat_map(|name| {
                let n = HeaderName::from(*name);
                d.request
                    .headers()
                    .filter(move |(h, _)| **h == n)
                    .map(|(_, v)| format!("{name}: {}\r\n", String::from_utf8_lossy(v)))
                    .collect::<Vec<_>>()
            })
            .collect();
        let session_change = matches!(method, Method::Invite | Method::Update);
        if let (true, Some(t)) = (session_change, dst_timer) {
            extra.push_str(&t.request_lines());
        }
        let out = dst.request(&method, &via, &extra, ctype.as_deref(), &offer);
        let seq = dst.local_cseq;
        let Some(out) = out else {
            self.b = Some(b);
            answer(&self.app, &d, 500, "Server Internal Error");
            return method == Method::Bye;
        };
        let mut events = self.app.layer.send_request(out, flow);
        let answer = tokio::time::timeout(RELAY_WAIT, final_response(&mut events))
            .await
            .ok()
            .flatten();
        let ok = answer
            .as_ref()
            .is_some_and(|r| (200..300).contains(&r.status().unwrap_or(0)));
        if let (Some(r), true) = (&answer, ok) {
            if method == Method::Invite {
                dst.refresh_target(r);
                if let Some(ack) = dst.ack(seq, &via_on(&self.app.own, &flow)) {
                    let _ = self.app.layer.send_request(ack.clone(), flow);
                    super::keep_acking(&self.app, events, r, ack, dst);
                }
            }
        }
        let contact = src.contact.clone();
        let src_flow = src.flow;
        self.b = Some(b);
        if session_change && ok {
            // The 2xx of a relayed session change refreshes both legs; one without
            // Session-Expires turns off the timer of the leg that sent it (RFC 4028 §7.2).
            let new = answer.as_ref().and_then(SessionTimer::for_answer);
            match (new, &mut self.timers[idx(dst_side)]) {
                (Some(new), Some(t)) => t.timer = new,
                (None, t) => *t = None,
                (Some(_), None) => {}
            }
            self.refreshed_now(src_side);
            self.refreshed_now(dst_side);
            self.came(src_side, Body::of(&d.request));
            self.went(
                dst_side,
                (!offer.is_empty()).then(|| Body {
                    content_type: ctype.clone().unwrap_or_else(|| "application/sdp".into()),
                    bytes: offer.clone(),
                }),
            );
            self.came(dst_side, answer.as_ref().and_then(Body::of));
        }
        // The answer's body as src gets it (under A's origin in a callback).
        let reply = answer.as_ref().and_then(Body::of).map(|b| Body {
            bytes: self.outgoing(src_side, Some(&b.content_type), &b.bytes),
            content_type: b.content_type,
        });
        if session_change && ok {
            self.went(src_side, reply.clone());
        }
        if let Some(tx) = d.tx {
            let (status, reason) = match &answer {
                Some(r) => (
                    r.status().unwrap_or(500),
                    String::from_utf8_lossy(r.reason().unwrap_or_default()).into_owned(),
                ),
                // A BYE ends the call whether or not the other side answered it.
                None if method == Method::Bye => (200, "OK".to_owned()),
                None => (408, "Request Timeout".to_owned()),
            };
            let mut response = Message::response_to(&d.request, status, &reason);
            if session_change && (200..300).contains(&status) {
                response.push_header(HeaderName::Contact, format!("<{contact}>"));
                let ours = self.app.settings.session_expires;
                let timer = SessionTimer::for_request(&d.request, ours);
                match (timer, &mut self.timers[idx(src_side)]) {
                    (Some(new), Some(t)) => {
                        t.timer = new;
                        t.due = Instant::now() + new.due_after();
                        for (name, value) in new.response_headers() {
                            response.push_header(name, value);
                        }
                    }
                    (None, t) => *t = None,
                    (Some(_), None) => {}
                }
            }
            if let Some(b) = &reply {
                response.set_header(HeaderName::ContentType, b.content_type.clone());
                response.set_body(b.bytes.clone());
            }
            crate::stack::responses::stamp(&mut response);
            if method == Method::Invite && (200..300).contains(&status) {
                self.unacked = Some(Unacked::new(d.side, tx, response.clone(), &src_flow));
            }
            self.app.layer.respond(tx, response);
        }
        method == Method::Bye
    }

    /// Asks leg `side` with an in-dialog OPTIONS whether it is still there, on a task of
    /// its own; the answer comes back on `report`: gone on 481, 408 or no answer (RFC
    /// 4028 §10 and RFC 3261 §12.2.1.2 treat those as the dialog's end).
    fn probe(&mut self, side: Side, report: &mpsc::UnboundedSender<(Side, bool)>) {
        let app = self.app.clone();
        let Some(leg) = self.leg_mut(side) else {
            return;
        };
        let flow = leg.flow;
        let Some(options) = leg.request(&Method::Options, &via_on(&app.own, &flow), "", None, b"")
        else {
            return;
        };
        let mut events = app.layer.send_request(options, flow);
        let report = report.clone();
        tokio::spawn(async move {
            let alive = loop {
                match events.recv().await {
                    Some(ClientEvent::Response(r)) => match r.status().unwrap_or(0) {
                        0..=199 => continue,
                        408 | 481 => break false,
                        _ => break true,
                    },
                    Some(ClientEvent::Timeout | ClientEvent::TransportError) | None => break false,
                }
            };
            let _ = report.send((side, alive));
        });
    }

    /// Sends BYE on both legs (the caller never ACKed, or the node gives up the call).
    pub(super) async fn end_both(&mut self) {
        // A callee still waiting for its ACK gets it (held) before the BYE.
        drop(self.ack_later.take());
        // The dialled side first: that is the call being paid for.
        if let Some(b) = self.b.take() {
            hang_up(&self.app, b);
        }
        hang_up(&self.app, self.a.clone());
    }
}

/// The final response to a request of ours, from its client transaction's events; none if
/// it timed out or its connection failed.
pub(super) async fn final_response(
    events: &mut mpsc::UnboundedReceiver<ClientEvent>,
) -> Option<Message> {
    while let Some(e) = events.recv().await {
        match e {
            ClientEvent::Response(r) if r.status().unwrap_or(0) >= 200 => return Some(*r),
            ClientEvent::Response(_) => {}
            ClientEvent::Timeout | ClientEvent::TransportError => return None,
        }
    }
    None
}

/// Whether `m` lists `method` in its Allow.
fn allows(m: &Message, method: &Method) -> bool {
    let name = method.to_string();
    m.tokens(&HeaderName::Allow)
        .unwrap_or_default()
        .iter()
        .any(|t| t.eq_ignore_ascii_case(&name))
}

/// Headers a request inside the call keeps when relayed to the other leg, beside its
/// body and Content-Type: what BYE, REFER, NOTIFY and INFO need. Session timers are each
/// leg's own (`timer.rs`), so Session-Expires and Min-SE are not among them.
const RELAYED: &[&str] = &[
    "Reason",
    "Event",
    "Subscription-State",
    "Refer-To",
    "Referred-By",
    "Replaces",
    "Info-Package",
    "Content-Disposition",
];

/// Answers a request inside a call with `status`.
pub(super) fn answer(app: &AppServer, d: &InDialog, status: u16, reason: &str) {
    if let Some(tx) = d.tx {
        let mut r = Message::response_to(&d.request, status, reason);
        crate::stack::responses::stamp(&mut r);
        app.layer.respond(tx, r);
    }
}

/// Copies the body and its Content-Type from `from` to `to`.
pub(super) fn copy_body(from: &Message, to: &mut Message) {
    if from.body().is_empty() {
        return;
    }
    if let Some(t) = value(from, &HeaderName::ContentType) {
        to.set_header(HeaderName::ContentType, t);
    }
    to.set_body(Bytes::copy_from_slice(from.body()));
}
