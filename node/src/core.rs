//! The core: what a node does with each request once the transaction layer has matched it.
//! Today that is the behaviour every SIP element owes its peers (RFC 3261 §8.2, §11,
//! §16.3): validation with 400/505, 416 for schemes it cannot route, 483 when Max-Forwards
//! is exhausted, 420 for extensions it lacks, OPTIONS answered with its capabilities, and
//! 405/501 for methods it does not serve. The registrar, proxy and app server plug in here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tandem_sip::{HeaderName, Message, Method, Uri};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::responses;
use crate::stats::Stats;
use crate::transaction::{CoreEvent, LayerHandle, TxId};
use crate::transport::{response_flow, Flow, Transports};

/// Methods this node serves.
pub const ALLOW: &str = "OPTIONS, ACK, CANCEL";
/// Option tags this node supports (none yet: Path and outbound come with the registrar).
const SUPPORTED: &[&str] = &[];

pub struct Core {
    pub layer: LayerHandle,
    pub transports: Transports,
    pub stats: Arc<Stats>,
    /// Set when shutdown begins: new requests get 503 so phones move to another node.
    pub draining: Arc<AtomicBool>,
    pub retry_after_secs: u32,
}

impl Core {
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
                    self.stats
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
        let log = self.stats.log_malformed();
        match answer {
            Some(mut response) => {
                self.stats
                    .malformed_answered
                    .fetch_add(1, Ordering::Relaxed);
                responses::stamp(&mut response);
                if log {
                    tracing::warn!(remote = %flow.remote, transport = %flow.transport, %error, status, "malformed request answered");
                }
                let _ = self.transports.send(flow, response.to_bytes());
            }
            None => {
                self.stats.malformed_dropped.fetch_add(1, Ordering::Relaxed);
                if log {
                    tracing::warn!(remote = %flow.remote, transport = %flow.transport, %error, bytes = raw.len(), "malformed message dropped");
                }
            }
        }
    }

    fn on_request(&self, request: Message, flow: Flow, tx: Option<TxId>, cancels: Option<TxId>) {
        self.stats.requests_received.fetch_add(1, Ordering::Relaxed);
        let Some(method) = request.method().cloned() else {
            return;
        };
        if method == Method::Ack {
            // ACKs are never answered. One for a 2xx belongs to a dialog this node does not
            // hold yet; the proxy will route it by its Route set.
            tracing::debug!(remote = %flow.remote, "ACK outside any transaction");
            return;
        }
        let outcome = self.decide(&request, &method, cancels);
        let mut response = responses::build(&request, outcome.status, &outcome.reason);
        for (name, value) in outcome.headers {
            response.push_header(name, value);
        }
        tracing::debug!(%method, status = outcome.status, remote = %flow.remote, "answered");
        match tx {
            Some(tx) => self.layer.respond(tx, response),
            None => {
                // The request could not be matched to a transaction (its Via or dialog
                // fields are broken), so it is answered statelessly if it can be routed.
                if request.top_via().is_ok() {
                    let _ = self
                        .transports
                        .send(&response_flow(&request, &flow), response.to_bytes());
                } else {
                    self.stats.malformed_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn decide(&self, request: &Message, method: &Method, cancels: Option<TxId>) -> Outcome {
        if let Err(error) = request.validate_request() {
            let (status, reason) = responses::status_for(&error);
            self.stats
                .malformed_answered
                .fetch_add(1, Ordering::Relaxed);
            if self.stats.log_malformed() {
                tracing::warn!(%error, status, "invalid request rejected");
            }
            return Outcome::new(status, reason);
        }
        if self.draining.load(Ordering::Relaxed) && *method != Method::Cancel {
            return Outcome::new(503, "Service Unavailable (shutting down)")
                .with(HeaderName::RetryAfter, self.retry_after_secs.to_string());
        }
        if matches!(request.uri(), Some(Uri::Other { .. })) {
            return Outcome::new(416, "Unsupported URI Scheme");
        }
        // RFC 3261 §16.3 step 3; an OPTIONS with Max-Forwards 0 may be answered by the
        // element itself (§11), which is how probes ask "are you there?".
        if request.max_forwards().ok().flatten() == Some(0) && *method != Method::Options {
            return Outcome::new(483, "Too Many Hops");
        }
        if *method != Method::Cancel {
            let mut unsupported: Vec<String> =
                request.tokens(&HeaderName::Require).unwrap_or_default();
            unsupported.extend(
                request
                    .tokens(&HeaderName::ProxyRequire)
                    .unwrap_or_default(),
            );
            unsupported.retain(|t| !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)));
            if !unsupported.is_empty() {
                return Outcome::new(420, "Bad Extension")
                    .with(HeaderName::Unsupported, unsupported.join(", "));
            }
        }
        match method {
            Method::Options => Outcome::new(200, "OK")
                .with(HeaderName::Allow, ALLOW.into())
                .with(HeaderName::Accept, "application/sdp".into())
                .with(HeaderName::AcceptEncoding, "identity".into())
                .with(HeaderName::AcceptLanguage, "en".into())
                .with(HeaderName::Supported, SUPPORTED.join(", ")),
            Method::Cancel => match cancels {
                // The INVITE it names already has its final response from this node.
                Some(_) => Outcome::new(200, "OK"),
                None => Outcome::new(481, "Call/Transaction Does Not Exist"),
            },
            Method::Other(_) => {
                Outcome::new(501, "Not Implemented").with(HeaderName::Allow, ALLOW.into())
            }
            _ => Outcome::new(405, "Method Not Allowed").with(HeaderName::Allow, ALLOW.into()),
        }
    }
}

struct Outcome {
    status: u16,
    reason: String,
    headers: Vec<(HeaderName, String)>,
}

impl Outcome {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Outcome {
            status,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }

    fn with(mut self, name: HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}
