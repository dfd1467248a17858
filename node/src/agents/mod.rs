//! The SIP agents: what a node does with a request once the stack has matched it to a
//! transaction. The [`dispatcher`] runs the checks every request passes and hands each
//! request to the agent that serves it; the agents share [`auth`] (digest accounts and
//! nonces) and [`location`] (bindings).
//!
//! | agent | serves |
//! |---|---|
//! | [`registrar`] | REGISTER (RFC 3261 §10.3) |
//! | [`ProviderInbound`] | new requests from a provider to a contact the [`registration_agent`] registered: to the account of the customer's number (DID) in the Request-URI or To, else the account the provider account names, through the proxy |
//! | [`app_server`] | local accounts' calls to numbers that are not accounts here: their dialplan, or out through their provider (a B2BUA), and the requests inside those calls |
//! | [`proxy`] | every request for someone else, and requests inside dialogs (RFC 3261 §16) |
//! | [`registration_agent`] | serves no request: keeps customers' provider accounts registered |
//! | [`cdr`] | serves no request: stores the app server's call records, copies them to the peers, purges old ones |
//!
//! Agents sit above the stack and the cluster, never below: nothing in `stack/` or
//! `cluster/` names an agent.

pub mod app_server;
pub mod auth;
pub mod cdr;
pub mod dispatcher;
pub mod drain;
pub mod location;
pub mod proxy;
pub mod reach;
pub mod registrar;
pub mod registration_agent;
pub mod vouch;

use std::sync::Arc;
use std::time::Duration;

use tandem_sip::{HeaderName, Message, Method};

use crate::cluster::peers::PeerMonitor;
use crate::cluster::ClusterNode;
use crate::config::Config;
use crate::stack::stats::Stats;
use crate::stack::transaction::{LayerHandle, TimerSettings, TxId};
use crate::stack::transport::{Flow, OwnAddrs, Transports};

use auth::Authenticator;
use location::overlay::BindingOverlay;
use proxy::{Dialogs, Proxy, ProxySettings};
use registrar::{Registrar, RegistrarSettings};
use registration_agent::Board;

/// A SIP agent, as the dispatcher sees it. The dispatcher offers every request that passed
/// its own checks to the agents in order ([`Agents::serving`]), and the first that takes
/// it serves it; a request no agent takes is answered by the dispatcher (405, 501, or 200
/// to an OPTIONS for the node itself).
pub trait Agent: Send + Sync + 'static {
    /// Whether this agent serves `request`. `in_transaction` is false when the request
    /// matched no server transaction: an ACK for a 2xx, or a request whose Via is too
    /// broken to match. Asked for every request, so it must be cheap and do no I/O.
    fn takes(&self, request: &Message, in_transaction: bool) -> bool;

    /// Serves a request it took, answering through `tx` (or, without one, statelessly
    /// through `stack`). It must not wait: work that waits goes on a task of its own.
    fn handle(self: Arc<Self>, request: Message, flow: Flow, tx: Option<TxId>, stack: &Stack);

    /// A CANCEL matched the INVITE server transaction `invite`: an agent serving it stops.
    /// Every agent hears of every CANCEL, and ignores those it knows nothing of.
    fn cancel(&self, _invite: TxId) {}

    /// Whether `request` carries on work that another node started through this one (a
    /// call relayed to a phone registered here), which drain must let through.
    fn carries_on(&self, _request: &Message) -> bool {
        false
    }
}

/// The parts of the stack an agent answers and sends through.
#[derive(Clone)]
pub struct Stack {
    pub layer: LayerHandle,
    pub transports: Transports,
    pub stats: Arc<Stats>,
}

/// An answer other than success, from any agent or the authenticator: status, reason and
/// extra headers. It becomes a response in one place, [`Refusal::response`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(HeaderName, String)>,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }

    /// The response to `request` that carries this refusal.
    pub fn response(self, request: &Message) -> Message {
        let mut response = crate::stack::responses::build(request, self.status, &self.reason);
        for (name, value) in self.headers {
            response.push_header(name, value);
        }
        response
    }
}

/// Every agent of a full node, built once and shared by the dispatchers of all SIP
/// threads.
#[derive(Clone)]
pub struct Agents {
    /// Asked in this order. A new agent is a folder beside the others and one line in
    /// [`Agents::build`] that puts it here.
    pub serving: Arc<[Arc<dyn Agent>]>,
    /// The calls the proxy record-routed and that have not ended, which drain waits for.
    pub dialogs: Arc<Dialogs>,
}

impl Agents {
    /// Builds the agents over the cluster and a started stack, and returns the app server
    /// too (the admin API starts callbacks on it) and the authenticator (whose nonce keys a
    /// task keeps in step with the other nodes). The authenticator (one nonce key, one
    /// replay bound and one lockout per node) is shared by the registrar's 401s and the
    /// proxy's 407s.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        config: &Config,
        cluster: &ClusterNode,
        overlay: &Arc<BindingOverlay>,
        peers: &Arc<PeerMonitor>,
        layer: &LayerHandle,
        transports: &Transports,
        own: OwnAddrs,
        stats: &Arc<Stats>,
        board: &Arc<Board>,
        resolver: &crate::stack::resolve::Resolver,
        cdrs: Option<cdr::Recorder>,
    ) -> (Agents, Arc<app_server::AppServer>, Arc<Authenticator>) {
        let settings = RegistrarSettings::from_config(&config.registrar);
        let auth = Arc::new(Authenticator::new(
            cluster.clone(),
            settings.algorithms.clone(),
            settings.sha256_user_agents.clone(),
            settings.nonce_lifetime_secs,
            settings.opened_logins_max,
            stats.clone(),
            own.clone(),
        ));
        let proxy = Arc::new(Proxy::new(
            cluster.clone(),
            overlay.clone(),
            auth.clone(),
            layer.clone(),
            transports.clone(),
            own.clone(),
            peers.clone(),
            ProxySettings {
                timer_c: Duration::from_secs(config.sip.timer_c_secs),
                cancel_give_up: 64 * TimerSettings::from_config(&config.sip).t1,
                max_dialogs: config.sip.max_dialogs,
                dialog_evict_idle: Duration::from_secs(config.sip.dialog_evict_idle_secs),
            },
            cdrs.clone().filter(|_| config.cdr.proxied_calls),
        ));
        transports.set_vouch(Arc::new(vouch::EdgeVouch::new(
            cluster.clone(),
            auth.clone(),
            proxy.clone(),
            own.clone(),
        )));
        let app_server = Arc::new(app_server::AppServer::new(
            cluster.clone(),
            auth.clone(),
            layer.clone(),
            transports.clone(),
            own.clone(),
            resolver.clone(),
            app_server::Settings::from_config(
                &config.app_server,
                reach::Reach::from_config(&config.registration_agent.private_networks),
                &config.dialplan.limits(),
            ),
            proxy.clone(),
            cdrs,
        ));
        let registrar = Arc::new(Registrar::new(
            cluster.clone(),
            overlay.clone(),
            settings,
            auth.clone(),
        ));
        let inbound = Arc::new(ProviderInbound {
            board: board.clone(),
            own: own.clone(),
            proxy: proxy.clone(),
            app_server: app_server.clone(),
            cluster: cluster.clone(),
        });
        let dialogs = proxy.dialogs.clone();
        // REGISTER, calls from providers and calls out through them before the proxy:
        // the proxy takes every request for someone else.
        let serving: Vec<Arc<dyn Agent>> = vec![registrar, inbound, app_server.clone(), proxy];
        let agents = Agents {
            serving: serving.into(),
            dialogs,
        };
        (agents, app_server, auth)
    }

    /// The first agent that takes `request`.
    pub fn taker(&self, request: &Message, in_transaction: bool) -> Option<&Arc<dyn Agent>> {
        self.serving
            .iter()
            .find(|a| a.takes(request, in_transaction))
    }
}

/// New requests from a provider to a contact this node registered for one of its accounts
/// (`registration_agent`): the Request-URI becomes the local account the provider account
/// names, and the proxy takes it from there, as it would a call to that account from
/// anywhere. Only ever a local account: a request to our contact can reach that account's
/// phones and nothing else, so it relays nothing.
struct ProviderInbound {
    board: Arc<Board>,
    own: OwnAddrs,
    proxy: Arc<Proxy>,
    /// Takes a call to a number whose account has an incoming dialplan.
    app_server: Arc<app_server::AppServer>,
    cluster: ClusterNode,
}

impl ProviderInbound {
    /// The local AOR a request from a provider goes to: the account of the customer's
    /// number (DID) its Request-URI or To names, else the provider account's inbound
    /// account.
    fn target(&self, request: &Message) -> Option<String> {
        let uri = request.uri()?.as_sip()?;
        if !self.own.is_own(uri) {
            return None;
        }
        let inbound = self.board.inbound_target(uri)?;
        let to = request.to().ok().and_then(|t| t.uri.as_sip().cloned());
        let reader = self.cluster.replica.reader();
        let numbered = [Some(uri), to.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|u| u.user_unescaped())
            .filter(|user| {
                let digits = user.strip_prefix('+').unwrap_or(user);
                !digits.is_empty()
                    && digits.len() <= 20
                    && digits.bytes().all(|c| c.is_ascii_digit())
            })
            .find_map(|user| {
                reader
                    .number(&user)
                    .ok()
                    .flatten()
                    .filter(|n| n.customer == inbound.customer)
            });
        match numbered {
            Some(n) => Some(format!("sip:{}", n.account)),
            None => inbound.account,
        }
    }
}

impl Agent for ProviderInbound {
    fn takes(&self, request: &Message, in_transaction: bool) -> bool {
        let new_request = in_transaction
            && !matches!(
                request.method(),
                Some(Method::Register | Method::Ack | Method::Cancel) | None
            )
            && request.to().is_ok_and(|to| !to.params.contains("tag"));
        new_request && self.target(request).is_some()
    }

    fn handle(self: Arc<Self>, mut request: Message, flow: Flow, tx: Option<TxId>, stack: &Stack) {
        let target = self
            .target(&request)
            .and_then(|aor| tandem_sip::Uri::parse(&aor).ok());
        match target {
            Some(uri) => {
                // A call to an account with an incoming dialplan runs it, with the request
                // as the provider sent it (the script sees the number it named).
                let invite = request.method() == Some(&Method::Invite);
                if let (true, Some(tx)) = (invite, tx) {
                    let callee = uri.as_sip().and_then(|u| {
                        self.app_server
                            .incoming_plan_account(&u.host.canonical(), &u.user_unescaped()?)
                    });
                    if let Some(callee) = callee {
                        self.app_server
                            .clone()
                            .spawn_inbound(request, flow, tx, callee);
                        return;
                    }
                }
                request.set_uri(uri);
                self.proxy.clone().handle(request, flow, tx, stack);
            }
            // Unregistered between `takes` and now.
            None => {
                if let Some(tx) = tx {
                    let r = Refusal::new(404, "Not Found").response(&request);
                    stack.layer.respond_stateless(tx, r);
                }
            }
        }
    }
}

/// Runs `work` to its end here if it never has to wait, and spawns it as a task
/// otherwise. Most REGISTERs are refreshes answered without waiting for anything, and a
/// task costs more than such an answer. A panic in `work` ends only `work`, as it would
/// end only its task.
pub fn run_or_spawn(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let mut work = Box::pin(work);
    // A future registers the waker of each poll; the task's first poll replaces this one.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let polled =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.as_mut().poll(&mut cx)));
    match polled {
        Ok(std::task::Poll::Ready(())) => {}
        Ok(std::task::Poll::Pending) => {
            tokio::spawn(work);
        }
        Err(_) => tracing::error!("a request handler panicked; its request is dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// An agent that takes what `wants` says and does nothing with it.
    struct Stub(fn(&Message, bool) -> bool);

    impl Agent for Stub {
        fn takes(&self, request: &Message, in_transaction: bool) -> bool {
            (self.0)(request, in_transaction)
        }

        fn handle(self: Arc<Self>, _: Message, _: Flow, _: Option<TxId>, _: &Stack) {}
    }

    fn request(method: &str) -> Message {
        let text = format!(
            "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c\r\n\
             CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse_datagram(bytes::Bytes::from(text), 65535).unwrap()
    }

    #[test]
    fn the_first_agent_that_takes_a_request_serves_it() {
        let registers: Arc<dyn Agent> = Arc::new(Stub(|r, _| registrar::takes(r)));
        let in_transaction: Arc<dyn Agent> = Arc::new(Stub(|_, tx| tx));
        let agents = Agents {
            serving: vec![registers.clone(), in_transaction.clone()].into(),
            dialogs: Arc::default(),
        };
        let taker = |method: &str, tx: bool| agents.taker(&request(method), tx).cloned();
        let is = |a: Option<Arc<dyn Agent>>, b: &Arc<dyn Agent>| {
            a.is_some_and(|a| std::ptr::addr_eq(Arc::as_ptr(&a), Arc::as_ptr(b)))
        };
        assert!(
            is(taker("REGISTER", true), &registers),
            "the first in order wins"
        );
        assert!(is(taker("REGISTER", false), &registers));
        assert!(
            is(taker("INVITE", true), &in_transaction),
            "the next is asked"
        );
        assert!(taker("INVITE", false).is_none(), "nobody takes it");
    }

    #[tokio::test]
    async fn work_that_never_waits_runs_inline_and_the_rest_on_a_task() {
        use std::sync::atomic::AtomicUsize;
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        run_or_spawn(async move {
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "finished before run_or_spawn returned"
        );

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = done.clone();
        run_or_spawn(async move {
            let _ = rx.await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(done.load(Ordering::SeqCst), 1, "still waiting");
        tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while done.load(Ordering::SeqCst) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the spawned task was woken and finished");

        // A panic ends only the work.
        run_or_spawn(async { panic!("handler bug") });
    }
}
