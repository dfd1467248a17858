//! The dispatcher: what a node does with each request once the transaction layer has
//! matched it. It owes every peer what any SIP element does (RFC 3261 §8.2, §11, §16.3):
//! validation with 400/505, 416 for schemes it cannot route, 483 when Max-Forwards is
//! exhausted, 420 for extensions it lacks, OPTIONS answered with its capabilities, and
//! 405/501 for methods it does not serve. Everything else goes to an agent: [`decide`]
//! says which, without I/O, and [`Dispatcher::on_request`] hands it over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tandem_sip::{HeaderName, Message, Method, Uri};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agents::{Agents, Stack};
use crate::cluster::peers::PeerMonitor;
use crate::stack::responses;
use crate::stack::transaction::{CoreEvent, TxId};
use crate::stack::transport::{response_flow, Flow};

/// Methods this node serves: as a registrar, and as a proxy for everything else.
pub const ALLOW: &str =
    "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, INFO, UPDATE, REFER, SUBSCRIBE, NOTIFY, PRACK";
/// Option tags this node supports.
const SUPPORTED: &[&str] = &["path"];

/// One per SIP thread, all sharing the same agents.
#[derive(Clone)]
pub struct Dispatcher {
    pub stack: Stack,
    /// Set when shutdown begins: new requests get 503 so phones move to another node.
    pub draining: Arc<AtomicBool>,
    pub retry_after_secs: u32,
    pub agents: Agents,
    /// Answers to this node's pings arrive as responses that match no transaction.
    pub peers: Arc<PeerMonitor>,
}

impl Dispatcher {
    pub async fn run(self, mut events: mpsc::Receiver<CoreEvent>, stop: CancellationToken) {
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                e = events.recv() => match e { Some(e) => e, None => break },
            };
            match event {
                CoreEvent::Request {
                    request,
                    flow,
                    tx,
                    cancels,
                } => self.on_request(request, flow, tx, cancels),
                CoreEvent::Malformed { raw, flow, error } => self.on_malformed(&raw, &flow, &error),
                CoreEvent::StrayResponse { response, flow } => {
                    if self.peers.on_response(&response, flow.remote) {
                        continue;
                    }
                    self.stack
                        .stats
                        .responses_received
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(status = response.status(), remote = %flow.remote, "response matched no transaction; dropped");
                }
            }
        }
    }

    fn on_malformed(&self, raw: &bytes::Bytes, flow: &Flow, error: &tandem_sip::Error) {
        let (status, reason) = responses::status_for(error);
        let answer = Message::error_response_for_unparseable(raw, status, &reason);
        let log = self.stack.stats.log_malformed();
        match answer {
            Some(mut response) => {
                self.stack
                    .stats
                    .malformed_answered
                    .fetch_add(1, Ordering::Relaxed);
                // The salvaged headers hold what the tag derives from (RFC 3261 §8.2.6.2).
                let _ = response.add_to_tag(&responses::to_tag(&response));
                responses::stamp(&mut response);
                self.stack.stats.count_response(status);
                if log {
                    tracing::warn!(remote = %flow.remote, transport = %flow.transport, %error, status, "malformed request answered");
                }
                let _ = self.stack.transports.send(flow, response.to_bytes());
            }
            None => {
                self.stack
                    .stats
                    .malformed_dropped
                    .fetch_add(1, Ordering::Relaxed);
                if log {
                    tracing::warn!(remote = %flow.remote, transport = %flow.transport, %error, bytes = raw.len(), "malformed message dropped");
                }
            }
        }
    }

    fn on_request(&self, request: Message, flow: Flow, tx: Option<TxId>, cancels: Option<TxId>) {
        self.stack
            .stats
            .requests_received
            .fetch_add(1, Ordering::Relaxed);
        let Some(method) = request.method().cloned() else {
            return;
        };
        self.stack.stats.count_request(method.as_str());
        if method == Method::Ack {
            // ACKs are never answered. One outside any transaction is for a 2xx: the
            // proxy routes it by its Route set.
            let taker = match request.validate_request() {
                Ok(()) => self.agents.taker(&request, false).cloned(),
                Err(_) => None,
            };
            match taker {
                Some(agent) => agent.handle(request, flow, None, &self.stack),
                None => tracing::debug!(remote = %flow.remote, "ACK outside any transaction"),
            }
            return;
        }
        // A call another node relays to a phone registered here is not a new call of
        // this node's: drain lets it through, or the phone could not be reached at all.
        let draining = self.draining.load(Ordering::Relaxed)
            && !self.agents.serving.iter().any(|a| a.carries_on(&request));
        if let Some(invite) = cancels {
            for agent in self.agents.serving.iter() {
                agent.cancel(invite);
            }
        }
        let outcome = match decide(&request, cancels.is_some(), draining, self.retry_after_secs) {
            Decision::Answer(outcome) => outcome,
            Decision::Agents => match self.agents.taker(&request, tx.is_some()) {
                Some(agent) => {
                    agent.clone().handle(request, flow, tx, &self.stack);
                    return;
                }
                None => by_method(&method, false),
            },
        };
        if let Some(error) = &outcome.invalid {
            self.stack
                .stats
                .malformed_answered
                .fetch_add(1, Ordering::Relaxed);
            if self.stack.stats.log_malformed() {
                tracing::warn!(%error, status = outcome.status, remote = %flow.remote, "invalid request rejected");
            }
        }
        let mut response = responses::build(&request, outcome.status, &outcome.reason);
        for (name, value) in outcome.headers {
            response.push_header(name, value);
        }
        tracing::debug!(%method, status = outcome.status, remote = %flow.remote, "answered");
        match tx {
            // Every answer here is computed afresh from the request, so none is kept to
            // be retransmitted: a spoofed source gets one response per request it is
            // named in, never more (see `LayerHandle::respond_stateless`).
            Some(tx) => self.stack.layer.respond_stateless(tx, response),
            None => {
                self.stack.stats.count_response(outcome.status);
                // The request could not be matched to a transaction (its Via or dialog
                // fields are broken), so it is answered statelessly. An unreadable Via
                // still leaves a route: the flow it arrived on, which `response_flow`
                // falls back to (RFC 4475 badinv01 and badvers expect 400 and 505).
                let _ = self
                    .stack
                    .transports
                    .send(&response_flow(&request, &flow), response.to_bytes());
            }
        }
    }
}

/// Who answers a request.
#[derive(Debug)]
pub enum Decision {
    /// The dispatcher itself, with this.
    Answer(Outcome),
    /// The first agent that takes it; the dispatcher answers by method if none does.
    Agents,
}

/// What the dispatcher answers to a request, decided without I/O: validation first (400/505),
/// then 503 while draining, then the proxy checks of RFC 3261 §16.3 (416, 483, 420), then
/// the method. `cancel_matched` says whether a CANCEL found the INVITE it names.
pub fn decide(
    request: &Message,
    cancel_matched: bool,
    draining: bool,
    retry_after_secs: u32,
) -> Decision {
    let Some(method) = request.method() else {
        return Decision::Answer(Outcome::new(400, "Bad Request (not a request)"));
    };
    if let Some(refusal) = refuse(request, method, draining, retry_after_secs) {
        return Decision::Answer(refusal);
    }
    if *method == Method::Cancel {
        return Decision::Answer(by_method(method, cancel_matched));
    }
    Decision::Agents
}

/// The checks every request passes before anyone acts on it; `Some` is the refusal.
fn refuse(
    request: &Message,
    method: &Method,
    draining: bool,
    retry_after_secs: u32,
) -> Option<Outcome> {
    if let Err(error) = request.validate_request() {
        let (status, reason) = responses::status_for(&error);
        let mut outcome = Outcome::new(status, reason);
        outcome.invalid = Some(error);
        return Some(outcome);
    }
    // Draining refuses what would start something new; requests inside a dialog (a To
    // tag) keep flowing, so running calls can end with their BYE.
    // (To is parsed only while draining: typed To is costly on the hot path.)
    let starts_something = || {
        *method == Method::Register
            || !request
                .to()
                .is_ok_and(|to| to.params.value("tag").is_some())
    };
    if draining && *method != Method::Cancel && starts_something() {
        return Some(
            Outcome::new(503, "Service Unavailable (shutting down)")
                .with(HeaderName::RetryAfter, retry_after_secs.to_string()),
        );
    }
    if matches!(request.uri(), Some(Uri::Other { .. })) {
        return Some(Outcome::new(416, "Unsupported URI Scheme"));
    }
    // RFC 3261 §16.3 step 3. An OPTIONS addressed to the node itself (no user part, as
    // monitoring probes send it) is answered by the node even at Max-Forwards 0 (§11);
    // anything that would have to be forwarded gets 483.
    let to_this_node = *method == Method::Options
        && request
            .uri()
            .and_then(Uri::as_sip)
            .is_some_and(|u| u.user.is_none());
    if request.max_forwards().ok().flatten() == Some(0) && !to_this_node {
        return Some(Outcome::new(483, "Too Many Hops"));
    }
    if *method != Method::Cancel {
        let mut unsupported: Vec<String> = request.tokens(&HeaderName::Require).unwrap_or_default();
        unsupported.extend(
            request
                .tokens(&HeaderName::ProxyRequire)
                .unwrap_or_default(),
        );
        unsupported.retain(|t| !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)));
        if !unsupported.is_empty() {
            return Some(
                Outcome::new(420, "Bad Extension")
                    .with(HeaderName::Unsupported, unsupported.join(", ")),
            );
        }
    }
    None
}

/// The dispatcher's own answer to a request that passed [`refuse`] and that no agent took.
pub fn by_method(method: &Method, cancel_matched: bool) -> Outcome {
    match method {
        Method::Options => Outcome::new(200, "OK")
            .with(HeaderName::Allow, ALLOW.into())
            .with(HeaderName::Accept, "application/sdp".into())
            .with(HeaderName::AcceptEncoding, "identity".into())
            .with(HeaderName::AcceptLanguage, "en".into())
            .with(HeaderName::Supported, SUPPORTED.join(", ")),
        // A CANCEL that found its INVITE: that INVITE already has its final response.
        Method::Cancel if cancel_matched => Outcome::new(200, "OK"),
        Method::Cancel => Outcome::new(481, "Call/Transaction Does Not Exist"),
        Method::Other(_) => {
            Outcome::new(501, "Not Implemented").with(HeaderName::Allow, ALLOW.into())
        }
        _ => Outcome::new(405, "Method Not Allowed").with(HeaderName::Allow, ALLOW.into()),
    }
}

/// A decided answer: status, reason, extra headers, and the validation error behind a
/// 400 or 505, if that is what it is.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(HeaderName, String)>,
    pub invalid: Option<tandem_sip::Error>,
}

impl Outcome {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Outcome {
            status,
            reason: reason.into(),
            headers: Vec::new(),
            invalid: None,
        }
    }

    fn with(mut self, name: HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(start: &str, extra: &str) -> Message {
        let method = start.split(' ').next().unwrap();
        let cseq_method = if method.contains('%') {
            "INVITE"
        } else {
            method
        };
        let text = format!(
            "{start}\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\nFrom: <sip:a@example.com>;tag=1\r\n\
             To: <sip:b@example.com>\r\nCall-ID: c1\r\nCSeq: 1 {cseq_method}\r\nMax-Forwards: 70\r\n{extra}\r\n"
        );
        Message::parse_datagram(Bytes::from(text), 65535).unwrap()
    }

    /// Who serves a request on a full node: `Ok` with the dispatcher's own answer, or
    /// `Err` naming the agent that takes it, asked in the order `Agents::build` uses.
    fn routed(
        request: &Message,
        cancel: bool,
        draining: bool,
        retry: u32,
    ) -> Result<Outcome, &'static str> {
        match decide(request, cancel, draining, retry) {
            Decision::Answer(o) => Ok(o),
            Decision::Agents if crate::agents::registrar::takes(request) => Err("registrar"),
            Decision::Agents if crate::agents::proxy::takes(request, true) => Err("proxy"),
            Decision::Agents => Ok(by_method(request.method().unwrap(), false)),
        }
    }

    fn decided(request: &Message, cancel: bool, draining: bool, retry: u32) -> Outcome {
        routed(request, cancel, draining, retry)
            .unwrap_or_else(|agent| panic!("the request went to the {agent}"))
    }

    fn answer(start: &str, extra: &str) -> Outcome {
        decided(&request(start, extra), false, false, 30)
    }

    #[test]
    fn register_goes_to_the_registrar_once_it_passes_the_checks() {
        let r = request("REGISTER sip:example.com SIP/2.0", "");
        assert_eq!(routed(&r, false, false, 30).err(), Some("registrar"));
        assert_eq!(decided(&r, false, true, 30).status, 503);
        let unsupported = request("REGISTER sip:example.com SIP/2.0", "Require: foo\r\n");
        assert_eq!(decided(&unsupported, false, false, 30).status, 420);
        let path = request("REGISTER sip:example.com SIP/2.0", "Require: path\r\n");
        assert_eq!(routed(&path, false, false, 30).err(), Some("registrar"));
    }

    fn header(o: &Outcome, name: HeaderName) -> Option<&str> {
        o.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn options_lists_capabilities() {
        let o = answer("OPTIONS sip:example.com SIP/2.0", "");
        assert_eq!(o.status, 200);
        assert_eq!(header(&o, HeaderName::Allow), Some(ALLOW));
        assert_eq!(header(&o, HeaderName::Accept), Some("application/sdp"));
        assert!(header(&o, HeaderName::Supported).is_some());
    }

    #[test]
    fn methods_it_does_not_serve_itself() {
        let o = answer("INVITE sip:example.com SIP/2.0", "");
        assert_eq!(
            (o.status, header(&o, HeaderName::Allow)),
            (405, Some(ALLOW))
        );
        assert_eq!(answer("FROBNICATE sip:example.com SIP/2.0", "").status, 501);
    }

    #[test]
    fn requests_for_users_routes_and_dialogs_go_to_the_proxy() {
        let proxied = |start: &str, extra: &str| {
            routed(&request(start, extra), false, false, 30).err() == Some("proxy")
        };
        assert!(proxied("INVITE sip:b@example.com SIP/2.0", ""));
        assert!(proxied("FROBNICATE sip:b@example.com SIP/2.0", ""));
        assert!(proxied("OPTIONS sip:b@example.com SIP/2.0", ""));
        assert!(proxied(
            "BYE sip:example.com SIP/2.0",
            "Route: <sip:192.0.2.9;lr>\r\n"
        ));
        assert!(!proxied("OPTIONS sip:example.com SIP/2.0", ""));
        assert!(!proxied("CANCEL sip:b@example.com SIP/2.0", ""));
    }

    #[test]
    fn proxy_checks_in_rfc_order() {
        assert_eq!(answer("INVITE urn:service:sos SIP/2.0", "").status, 416);
        assert_eq!(
            answer("INVITE sip:b@example.com SIP/2.0", "Max-Forwards: 0\r\n").status,
            400,
            "two Max-Forwards"
        );
        let zero = request("INVITE sip:b@example.com SIP/2.0", "").to_bytes();
        let zero = String::from_utf8(zero.to_vec())
            .unwrap()
            .replace("Max-Forwards: 70", "Max-Forwards: 0");
        let zero = Message::parse_datagram(Bytes::from(zero), 65535).unwrap();
        assert_eq!(decided(&zero, false, false, 30).status, 483);
        let options = String::from_utf8(zero.to_bytes().to_vec())
            .unwrap()
            .replace("INVITE", "OPTIONS");
        let for_user = Message::parse_datagram(Bytes::from(options.clone()), 65535).unwrap();
        assert_eq!(
            decided(&for_user, false, false, 30).status,
            483,
            "an OPTIONS for a user would have to be forwarded"
        );
        let probe = options.replacen("sip:b@example.com", "sip:192.0.2.9:5060", 1);
        let probe = Message::parse_datagram(Bytes::from(probe), 65535).unwrap();
        assert_eq!(
            decided(&probe, false, false, 30).status,
            200,
            "a probe of the node itself is answered at Max-Forwards 0"
        );
        let o = answer(
            "OPTIONS sip:b@example.com SIP/2.0",
            "Require: foo, bar\r\nProxy-Require: baz\r\n",
        );
        assert_eq!(
            (o.status, header(&o, HeaderName::Unsupported)),
            (420, Some("foo, bar, baz"))
        );
    }

    #[test]
    fn invalid_requests_carry_their_error() {
        let o = answer(
            "OPTIONS sip:b@example.com SIP/2.0",
            "Date: Fri, 01 Jan 2010 16:00:00 EST\r\n",
        );
        assert_eq!(o.status, 400);
        assert!(o.invalid.is_some());
        assert!(o.reason.contains("Date"), "{}", o.reason);
        let v = String::from_utf8(
            request("OPTIONS sip:b@example.com SIP/2.0", "")
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        let v = Message::parse_datagram(
            Bytes::from(v.replacen("SIP/2.0\r\n", "SIP/3.0\r\n", 1)),
            65535,
        )
        .unwrap();
        assert_eq!(decided(&v, false, false, 30).status, 505);
    }

    #[test]
    fn draining_turns_new_requests_away_but_not_cancels() {
        let o = decided(
            &request("OPTIONS sip:b@example.com SIP/2.0", ""),
            false,
            true,
            17,
        );
        assert_eq!(
            (o.status, header(&o, HeaderName::RetryAfter)),
            (503, Some("17"))
        );
        // Inside a dialog (To tag), requests still flow so calls can end.
        let bye = Message::parse_datagram(
            Bytes::from(
                "BYE sip:b@192.0.2.2 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK2\r\n\
                 From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n\
                 Call-ID: c1\r\nCSeq: 2 BYE\r\nMax-Forwards: 70\r\n\r\n",
            ),
            65535,
        )
        .unwrap();
        assert_eq!(routed(&bye, false, true, 17).err(), Some("proxy"));
        let cancel = request("CANCEL sip:b@example.com SIP/2.0", "");
        assert_eq!(decided(&cancel, true, true, 17).status, 200);
        assert_eq!(decided(&cancel, false, false, 17).status, 481);
    }
}
