//! The registration agent: keeps customers' accounts at third-party VoIP providers
//! registered, each from exactly one node at a time (node/DESIGN.md, "The registration
//! agent"; raft-store/DESIGN.md, "Provider leases").
//!
//! - [`accounts`]: provider accounts as operators write them (validation, sealing).
//! - [`leases`]: the leader's assignment of leases, sans-IO; [`spawn_assigner`] runs it
//!   on whichever node leads, witnesses included.
//! - [`client`]: the REGISTER client of one account, sans-IO.
//! - This module: the agent on each full node. Once a second it compares the leases its
//!   replica shows in its name with the accounts it registers, starts a task per account
//!   it owns, tells a task to un-register when its lease is released or its account
//!   disabled or deleted, and stops a task quietly when its lease lapses or moves. Every
//!   `renew_secs` it renews all its leases in one command.
//! - [`Board`]: each account's status and the agent's counters, read by the admin API here
//!   and by other nodes over the cluster link.

pub mod accounts;
pub mod client;
pub mod leases;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_raft_store::command::{Command, InboundTarget, NodeId, ProviderAccount, Role};
use tandem_raft_store::state::StateReader;
use tandem_sip::{SipUri, Uri};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::reach::Reach;
use crate::clock::now_ms;
use crate::cluster::ClusterNode;
use crate::config::RegistrationAgentConfig;
use crate::stack::resolve::{Resolver, Target};
use crate::stack::transaction::{ClientEvent, LayerHandle};
use crate::stack::transport::{OwnAddrs, TransportKind, Transports};

use client::{FailureClass, Hop, Identity, Next, RegisterClient, RetryPolicy};

/// How often the agent compares its leases with what it registers.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How often the leader assigns leases.
const ASSIGN_EVERY: Duration = Duration::from_secs(1);
/// Challenges and 423s answered in one attempt before it counts as failed.
const MAX_ROUNDS: usize = 6;
/// The Contact parameter that names the account a provider's request is for.
const INBOUND_PARAM: &str = "pa";
/// How long an un-registration may take before the lease is dropped anyway.
const UNREGISTER_WITHIN: Duration = Duration::from_secs(40);
/// How long a draining node waits for another node to take each account it gave up
/// before it counts as drained anyway: when no other node may own (all others down, or
/// witnesses), nobody will, and the node must still be able to stop.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// The agent's settings, from `[registration_agent]`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub lease: Duration,
    pub renew: Duration,
    pub skew: Duration,
    pub start_spread: Duration,
    pub policy: RetryPolicy,
    /// Where REGISTERs may go (`private_networks`; agents::reach).
    pub reach: Reach,
}

impl Settings {
    pub fn from_config(c: &RegistrationAgentConfig) -> Settings {
        Settings {
            lease: Duration::from_secs(c.lease_secs),
            renew: Duration::from_secs(c.renew_secs),
            skew: Duration::from_secs(c.clock_skew_secs),
            start_spread: Duration::from_secs(c.start_spread_secs),
            policy: RetryPolicy {
                transient_min: Duration::from_secs(c.retry_min_secs),
                transient_max: Duration::from_secs(c.retry_max_secs),
                auth_min: Duration::from_secs(c.auth_retry_min_secs),
                auth_max: Duration::from_secs(c.auth_retry_max_secs),
            },
            reach: Reach::from_config(&c.private_networks),
        }
    }
}

/// One account's registration as its owner sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountStatus {
    /// "starting", "registering", "registered", "failing", "auth failed", "rejected",
    /// "unregistering" or "unregistered".
    pub state: String,
    pub node: NodeId,
    pub epoch: u64,
    /// Where the last REGISTER went, as `transport:address`.
    pub target: Option<String>,
    pub last_attempt_ms: Option<u64>,
    /// The status line of the last final response.
    pub last_response: Option<String>,
    pub last_error: Option<String>,
    pub next_attempt_ms: Option<u64>,
    /// The contact registered, and until when the provider keeps it.
    pub contact: Option<String>,
    pub expires_at_ms: Option<u64>,
    /// How many contacts the provider reported for the account in its last 200.
    pub provider_contacts: Option<usize>,
    pub registers_sent: u64,
}

/// The agent's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub registers_sent: AtomicU64,
    /// Final responses by class: 1xx (unused), 2xx … 6xx.
    pub responses: [AtomicU64; 6],
    pub timeouts: AtomicU64,
    pub dns_failures: AtomicU64,
    /// Attempts not made because the registrar resolved only to addresses a provider may
    /// not reach (agents::reach).
    pub refused_targets: AtomicU64,
    /// Leases granted or asked to move by this node while it led.
    pub lease_grants: AtomicU64,
    pub lease_moves: AtomicU64,
}

/// Where calls to one of our registered contacts may go: the customer's numbers (DIDs),
/// else the local account the provider account names.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub customer: String,
    /// `sip:user@domain`.
    pub account: Option<String>,
}

/// Every account's status on this node, and the agent's counters.
#[derive(Debug)]
pub struct Board {
    accounts: Mutex<HashMap<String, AccountStatus>>,
    /// Whose calls come to each contact this node registered, by the contact's `pa`
    /// parameter.
    inbound: Mutex<HashMap<String, Inbound>>,
    pub counters: Counters,
    /// Whether this node's agent runs (and so may be given leases).
    running: AtomicBool,
    /// The node drains: it hands its leases over.
    draining: Arc<AtomicBool>,
    /// Accounts this node gave up while draining, and when: a drain is a hand-over, done
    /// once another node holds each (see [`Board::handovers_pending`]).
    given_up: Mutex<HashMap<String, Instant>>,
}

impl Board {
    /// A board for a node whose drain flag is `draining`.
    pub fn new(draining: Arc<AtomicBool>) -> Board {
        Board {
            accounts: Mutex::default(),
            inbound: Mutex::default(),
            counters: Counters::default(),
            running: AtomicBool::new(false),
            draining,
            given_up: Mutex::default(),
        }
    }

    /// What a drain still waits for before the node may go: the leases it holds, and the
    /// accounts it gave up that no other node has taken yet (each for at most
    /// [`HANDOVER_WAIT`]). Without the second, a node that drains and restarts within the
    /// leader's round of assignment is given its accounts straight back: nothing moved, and
    /// the accounts stayed unregistered while it restarted.
    pub fn handovers_pending(&self, reader: &StateReader, me: NodeId) -> Result<usize, String> {
        let held = reader
            .provider_leases_of(me)
            .map_err(|e| e.to_string())?
            .len();
        let mut given_up = self.given_up.lock().expect("board");
        let mut waiting = std::collections::HashSet::new();
        for (id, since) in given_up.iter() {
            if since.elapsed() >= HANDOVER_WAIT {
                continue;
            }
            let account = reader.provider_account(id).map_err(|e| e.to_string())?;
            if !account.is_some_and(|a| a.enabled) {
                continue; // deleted or disabled meanwhile: nobody is to take it
            }
            let lease = reader.provider_lease(id).map_err(|e| e.to_string())?;
            let taken = lease.is_some_and(|l| l.owner != 0 && l.owner != me && !l.releasing);
            if !taken {
                waiting.insert(id.clone());
            }
        }
        given_up.retain(|id, _| waiting.contains(id));
        Ok(held + waiting.len())
    }

    pub fn status(&self, id: &str) -> Option<AccountStatus> {
        self.accounts.lock().expect("board").get(id).cloned()
    }

    fn set(&self, id: &str, change: impl FnOnce(&mut AccountStatus)) {
        let mut all = self.accounts.lock().expect("board");
        change(all.entry(id.to_owned()).or_default());
    }

    fn remove(&self, id: &str) {
        self.accounts.lock().expect("board").remove(id);
    }

    /// Whose calls a request to one of our registered contacts carries: found by the
    /// contact's `pa` parameter, which providers send back in the Request-URI. Never by
    /// the user part alone: that is often a public number, which any scanner can send to
    /// our address.
    pub fn inbound_target(&self, uri: &SipUri) -> Option<Inbound> {
        let token = uri.params.value(INBOUND_PARAM)?;
        self.inbound.lock().expect("board").get(token).cloned()
    }

    /// Accounts this node registers, by state: (registered, failing, other).
    pub fn counts(&self) -> (usize, usize, usize) {
        let all = self.accounts.lock().expect("board");
        let registered = all.values().filter(|s| s.state == "registered").count();
        let failing = all
            .values()
            .filter(|s| matches!(s.state.as_str(), "failing" | "auth failed" | "rejected"))
            .count();
        (registered, failing, all.len() - registered - failing)
    }

    /// Answers another node's question (`ClusterRequest::Agent`): `ready` (`yes`,
    /// `draining` or `no`: whether this node's agent runs and takes leases) or
    /// `status <account id>` (JSON, or `null`).
    pub fn answer(&self, question: &str) -> String {
        match question.split_once(' ') {
            None if question == "ready" => {
                if !self.running.load(Ordering::Acquire) {
                    "no".into()
                } else if self.draining.load(Ordering::Acquire) {
                    "draining".into()
                } else {
                    "yes".into()
                }
            }
            Some(("status", id)) => {
                serde_json::to_string(&self.status(id)).unwrap_or_else(|_| "null".into())
            }
            _ => "unknown question".into(),
        }
    }
}

/// What the agent wants an account's task to do.
#[derive(Clone, Debug, PartialEq)]
enum Desired {
    Register(Box<ProviderAccount>),
    /// Remove the contact, then drop the lease of this epoch (if any). `until_ms`: when the
    /// lease lapses, less the skew allowance; past it another node may be registering the
    /// same instance, so nothing more is sent (none: the account was deleted, nobody else
    /// will register it).
    Unregister {
        drop_epoch: Option<u64>,
        until_ms: Option<u64>,
    },
    /// End quietly: the lease lapsed or moved, and another node may be registering.
    Stop,
}

/// This node's leases and their accounts as last read, for one providers generation.
#[derive(Default)]
struct OwnView {
    generation: Option<u64>,
    leases: Vec<tandem_raft_store::command::Lease>,
    accounts: HashMap<String, ProviderAccount>,
    /// Accounts with a task here but no lease in our name: (id, deleted).
    gone: Vec<(String, bool)>,
}

struct Owned {
    epoch: u64,
    desired: watch::Sender<Desired>,
    task: tokio::task::JoinHandle<()>,
}

/// The registration agent of one full node.
pub struct RegistrationAgent {
    me: NodeId,
    cluster: ClusterNode,
    layer: LayerHandle,
    transports: Transports,
    own: OwnAddrs,
    resolver: Resolver,
    settings: Settings,
    board: Arc<Board>,
    started: Instant,
}

impl RegistrationAgent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: NodeId,
        cluster: ClusterNode,
        layer: LayerHandle,
        transports: Transports,
        own: OwnAddrs,
        resolver: Resolver,
        settings: Settings,
        board: Arc<Board>,
    ) -> Arc<RegistrationAgent> {
        Arc::new(RegistrationAgent {
            me,
            cluster,
            layer,
            transports,
            own,
            resolver,
            settings,
            board,
            started: Instant::now(),
        })
    }

    /// Runs until `stop`: reconciles every second and renews every `renew`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let board = self.board.clone();
        self.cluster.answer_agent_questions(
            &["ready", "status"],
            Arc::new(move |q: &str| board.answer(q)),
        );
        self.board.running.store(true, Ordering::Release);
        let mut owned: HashMap<String, Owned> = HashMap::new();
        let mut view = OwnView::default();
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_renewal = Instant::now();
        let renewing = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.reconcile(&mut owned, &mut view) {
                tracing::warn!(error = %e, "registration agent: reading the replica failed");
            }
            // Only a node with leases renews: an idle cluster writes nothing.
            let holds = !view.leases.is_empty();
            if holds && Instant::now() >= next_renewal && !renewing.swap(true, Ordering::AcqRel) {
                next_renewal = Instant::now() + self.settings.renew;
                let agent = self.clone();
                let renewing = renewing.clone();
                tokio::spawn(async move {
                    agent.renew().await;
                    renewing.store(false, Ordering::Release);
                });
            }
        }
        self.board.running.store(false, Ordering::Release);
        for (_, o) in owned {
            let _ = o.desired.send(Desired::Stop);
            o.task.abort();
        }
    }

    /// Brings the account tasks in line with the leases this replica shows in our name.
    /// The leases and accounts are read again only when the state machine changed them
    /// (`providers_generation`); between changes, only this node's renewal is read, so
    /// a second's round over thousands of accounts costs no database reads.
    fn reconcile(
        self: &Arc<Self>,
        owned: &mut HashMap<String, Owned>,
        view: &mut OwnView,
    ) -> Result<(), String> {
        let now = now_ms();
        let skew = self.settings.skew.as_millis() as u64;
        let reader = self.cluster.replica.reader();
        let generation = reader.providers_generation();
        let refreshed = view.generation != Some(generation);
        if refreshed {
            let leases = reader
                .provider_leases_of(self.me)
                .map_err(|e| e.to_string())?;
            let mut accounts = HashMap::with_capacity(leases.len());
            for l in &leases {
                if let Some(a) = reader
                    .provider_account(&l.provider)
                    .map_err(|e| e.to_string())?
                {
                    accounts.insert(l.provider.clone(), a);
                }
            }
            let mut gone = Vec::new();
            for id in owned.keys() {
                if !leases.iter().any(|l| &l.provider == id) {
                    let deleted = reader
                        .provider_account(id)
                        .map_err(|e| e.to_string())?
                        .is_none();
                    gone.push((id.clone(), deleted));
                }
            }
            *view = OwnView {
                generation: Some(generation),
                leases,
                accounts,
                gone,
            };
        }
        let renewed = reader
            .owner_renewed_until(self.me)
            .map_err(|e| e.to_string())?;
        owned.retain(|_, o| !o.task.is_finished());
        for lease in &view.leases {
            let id = &lease.provider;
            let expires = if lease.releasing {
                lease.expires_at_ms
            } else {
                lease.expires_at_ms.max(renewed)
            };
            let live = expires > now + skew;
            let account = view.accounts.get(id);
            let register = account.is_some_and(|a| a.enabled) && !lease.releasing && live;
            let want = |account: Option<&ProviderAccount>| match account {
                Some(a) if register => Desired::Register(Box::new(a.clone())),
                Some(_) if lease.releasing || live => Desired::Unregister {
                    drop_epoch: Some(lease.epoch),
                    until_ms: Some(expires.saturating_sub(skew)),
                },
                _ => Desired::Stop,
            };
            match owned.get(id) {
                // Still registering, and the account unchanged since the last round: the
                // common case, decided without copying anything.
                Some(o)
                    if o.epoch == lease.epoch
                        && register
                        && !refreshed
                        && matches!(*o.desired.borrow(), Desired::Register(_)) => {}
                Some(o) if o.epoch == lease.epoch => {
                    let desired = want(account);
                    o.desired.send_if_modified(|d| {
                        // Once told to un-register or stop, a task does not go back.
                        let change = *d != desired && matches!(d, Desired::Register(_));
                        if change {
                            *d = desired;
                        }
                        change
                    });
                }
                other => {
                    if let Some(old) = other {
                        let _ = old.desired.send(Desired::Stop);
                    }
                    if register {
                        owned.insert(
                            id.clone(),
                            self.start(id.clone(), lease.epoch, want(account)),
                        );
                    }
                }
            }
        }
        // Leases no longer ours: the account was deleted (un-register it, there is no
        // lease to drop), or the lease moved or ended (stop quietly).
        for (id, deleted) in &view.gone {
            let Some(o) = owned.get(id) else {
                continue;
            };
            let desired = if *deleted {
                Desired::Unregister {
                    drop_epoch: None,
                    until_ms: None,
                }
            } else {
                Desired::Stop
            };
            o.desired.send_if_modified(|d| {
                let change = matches!(d, Desired::Register(_));
                if change {
                    *d = desired.clone();
                }
                change
            });
        }
        Ok(())
    }

    fn start(self: &Arc<Self>, id: String, epoch: u64, desired: Desired) -> Owned {
        let (tx, rx) = watch::channel(desired);
        // Spread first attempts: widely just after start, briefly on a takeover.
        let since_start = self.started.elapsed();
        let spread = if since_start < self.settings.start_spread {
            self.settings.start_spread
        } else {
            self.settings.start_spread.min(Duration::from_secs(2))
        };
        let delay = spread.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
        self.board.set(&id, |s| {
            *s = AccountStatus {
                state: "starting".into(),
                node: self.me,
                epoch,
                next_attempt_ms: Some(now_ms() + delay.as_millis() as u64),
                ..AccountStatus::default()
            }
        });
        tracing::info!(account = %id, epoch, "registration agent: lease taken");
        let task = tokio::spawn(self.clone().account_task(id, epoch, rx, delay));
        Owned {
            epoch,
            desired: tx,
            task,
        }
    }

    /// Renews every lease this node holds: one record for the node, however many.
    async fn renew(&self) {
        let command = Command::RenewLeases {
            owner: self.me,
            expires_at_ms: now_ms() + self.settings.lease.as_millis() as u64,
        };
        if let Err(e) = self.cluster.replica.propose(command).await {
            tracing::warn!(error = %e, "registration agent: renewing leases failed");
        }
    }

    /// One account, for as long as this node owns it.
    async fn account_task(
        self: Arc<Self>,
        id: String,
        epoch: u64,
        mut desired: watch::Receiver<Desired>,
        first_delay: Duration,
    ) {
        let mut rng = StdRng::from_entropy();
        let mut session: Option<Session> = None;
        let mut wait = first_delay;
        loop {
            let deadline = Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    changed = desired.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let now = desired.borrow_and_update().clone();
                        match (&now, &session) {
                            // Edited: register with the new details at once.
                            (Desired::Register(a), Some(s)) if **a != s.account => break,
                            (Desired::Register(_), _) => {}
                            _ => break,
                        }
                    }
                }
            }
            let now = desired.borrow().clone();
            match now {
                Desired::Stop => {
                    tracing::info!(account = %id, "registration agent: lease gone; stopping");
                    self.board.remove(&id);
                    if let Some(s) = &session {
                        self.board.inbound.lock().expect("board").remove(&s.token);
                    }
                    return;
                }
                Desired::Unregister {
                    drop_epoch,
                    until_ms,
                } => {
                    if let Some(s) = &session {
                        self.board.inbound.lock().expect("board").remove(&s.token);
                    }
                    let within = match until_ms {
                        Some(until) => UNREGISTER_WITHIN
                            .min(Duration::from_millis(until.saturating_sub(now_ms()))),
                        None => UNREGISTER_WITHIN,
                    };
                    self.unregister(&id, session.take(), within, &mut rng).await;
                    if let Some(epoch) = drop_epoch {
                        // Noted before the drop is proposed: once it applies, the node holds
                        // no lease, and a drain must not look done before another node
                        // holds the account (nor when the proposal's answer is lost).
                        if self.board.draining.load(Ordering::Acquire) {
                            self.board
                                .given_up
                                .lock()
                                .expect("board")
                                .insert(id.clone(), Instant::now());
                        }
                        let drop = Command::DropLease {
                            provider: id.clone(),
                            epoch,
                        };
                        if let Err(e) = self.cluster.replica.propose(drop).await {
                            tracing::warn!(account = %id, error = %e, "dropping a released lease failed; it will lapse");
                        }
                    }
                    self.board.remove(&id);
                    return;
                }
                Desired::Register(account) => {
                    wait = self
                        .attempt(&id, epoch, &account, &mut session, &mut rng)
                        .await;
                }
            }
        }
    }

    /// One REGISTER exchange (with its challenges, and failover between targets); returns
    /// how long to wait before the next.
    async fn attempt(
        &self,
        id: &str,
        epoch: u64,
        account: &ProviderAccount,
        session: &mut Option<Session>,
        rng: &mut StdRng,
    ) -> Duration {
        if session.as_ref().is_none_or(|s| s.account != *account) {
            match Session::new(&self.cluster, account, self.settings.policy, rng) {
                Ok(s) => *session = Some(s),
                Err(e) => {
                    self.board.set(id, |s| {
                        s.state = "failing".into();
                        s.last_error = Some(e.clone());
                    });
                    tracing::warn!(account = %id, error = %e, "registration agent: cannot register");
                    return self.settings.policy.auth_max;
                }
            }
        }
        let s = session.as_mut().expect("set above");
        self.board.set(id, |st| {
            st.state = if st.state == "registered" {
                "registered".into()
            } else {
                "registering".into()
            };
            st.node = self.me;
            st.epoch = epoch;
            st.last_attempt_ms = Some(now_ms());
        });
        let targets = match self.resolver.targets(&s.next_hop).await {
            Ok(mut t) => {
                // The server that answered last comes first (RFC 3263 §4.3 keeps it).
                if let Some(pos) = s.sticky.and_then(|k| t.iter().position(|x| *x == k)) {
                    let k = t.remove(pos);
                    t.insert(0, k);
                }
                t
            }
            Err(e) => {
                self.board
                    .counters
                    .dns_failures
                    .fetch_add(1, Ordering::Relaxed);
                let next = s.client.on_failure(FailureClass::Dns, e, rng);
                return self.failed(id, next, None);
            }
        };
        if targets.is_empty() {
            let next = s.client.on_failure(
                FailureClass::Dns,
                "no target over a transport this node can open".into(),
                rng,
            );
            return self.failed(id, next, None);
        }
        // The registrar is a host of the customer's choosing: never one inside the network
        // unless the operator listed it (agents::reach). Judged on what DNS gave, so a
        // name that resolves inside is refused too; the account waits as after a refusal.
        let (targets, inside): (Vec<Target>, Vec<Target>) = targets
            .into_iter()
            .partition(|t| self.settings.reach.allows(t.addr.ip()));
        if targets.is_empty() {
            self.board
                .counters
                .refused_targets
                .fetch_add(1, Ordering::Relaxed);
            let next = s.client.on_failure(
                FailureClass::Rejected,
                {
                    let (host, ip) = (s.next_hop.host.to_string(), inside[0].addr.ip());
                    let resolved = if host == ip.to_string() {
                        String::new()
                    } else {
                        format!(" ({ip})")
                    };
                    format!(
                        "{host}{resolved} is not a public address; a provider reaches only \
                         public addresses unless registration_agent.private_networks lists \
                         the network"
                    )
                },
                rng,
            );
            return self.failed(id, next, None);
        }
        let mut last = None;
        for target in targets {
            match self.exchange(id, s, target, rng).await {
                Next::Registered {
                    expires,
                    refresh_in,
                    contacts,
                } => {
                    s.sticky = Some(target);
                    let contact = s.client.identity().contact_uri.clone();
                    self.board.set(id, |st| {
                        st.state = "registered".into();
                        st.last_error = None;
                        st.contact = Some(contact);
                        st.expires_at_ms = Some(now_ms() + u64::from(expires) * 1000);
                        st.next_attempt_ms = Some(now_ms() + refresh_in.as_millis() as u64);
                        st.provider_contacts = Some(contacts);
                    });
                    return refresh_in;
                }
                failed @ Next::Failed { failover: true, .. } => {
                    s.sticky = None;
                    last = Some((failed, target));
                }
                other => return self.failed(id, other, Some(target)),
            }
        }
        let (next, target) = last.expect("at least one target was tried");
        self.failed(id, next, Some(target))
    }

    /// Records a failed attempt; returns the wait before the next.
    fn failed(&self, id: &str, next: Next, target: Option<Target>) -> Duration {
        let Next::Failed {
            class,
            reason,
            retry_in,
            ..
        } = next
        else {
            return self.settings.policy.transient_min;
        };
        tracing::info!(account = %id, class = class.as_str(), %reason, retry_in_secs = retry_in.as_secs(), "registration agent: attempt failed");
        self.board.set(id, |st| {
            st.state = match class {
                FailureClass::AuthFailed => "auth failed",
                FailureClass::Rejected => "rejected",
                _ => "failing",
            }
            .into();
            st.last_error = Some(format!("{}: {reason}", class.as_str()));
            st.next_attempt_ms = Some(now_ms() + retry_in.as_millis() as u64);
            if let Some(t) = target {
                st.target = Some(format!("{}:{}", t.transport.as_str(), t.addr));
            }
        });
        retry_in
    }

    /// Sends REGISTERs to `target` until one gets a final answer that is not a challenge.
    async fn exchange(&self, id: &str, s: &mut Session, target: Target, rng: &mut StdRng) -> Next {
        let flow = if target.transport == TransportKind::Tls {
            // The certificate must name the host we meant (RFC 5922), not the SRV target.
            let name = s.next_hop.host.canonical();
            let ca_file = s.account.ca_file.as_deref().map(std::path::Path::new);
            self.transports
                .flow_to_tls(target.addr, name.trim_end_matches('.'), ca_file)
                .await
        } else {
            self.transports.flow_to(target.transport, target.addr).await
        };
        let flow = match flow {
            Ok(f) => f,
            Err(e) => {
                return s
                    .client
                    .on_failure(FailureClass::Timeout, e.to_string(), rng)
            }
        };
        let sent_by = self.own.advertised(flow.transport, flow.local);
        let mut identity = s.client.identity().clone();
        identity.contact_uri = s.contact_uri(sent_by, flow.transport);
        s.client.update(identity);
        // Calls to the contact are taken from the moment it is offered: the provider may
        // send one as soon as it has stored the binding, before its 200 reaches us.
        if !s.client.is_removing() {
            let account = match s.account.inbound.as_ref() {
                Some(InboundTarget::Account(a)) => Some(format!("sip:{a}")),
                _ => None,
            };
            self.board.inbound.lock().expect("board").insert(
                s.token.clone(),
                Inbound {
                    customer: s.account.customer.clone(),
                    account,
                },
            );
        }
        for _ in 0..MAX_ROUNDS {
            let branch = format!("z9hG4bK{:016x}", rng.gen::<u64>());
            let sent_by = sent_by.to_string();
            let request = s.client.build(
                &Hop {
                    transport: flow.transport.as_str(),
                    sent_by: &sent_by,
                    branch: &branch,
                },
                rng,
            );
            self.board
                .counters
                .registers_sent
                .fetch_add(1, Ordering::Relaxed);
            self.board.set(id, |st| {
                st.registers_sent += 1;
                st.target = Some(format!("{}:{}", target.transport.as_str(), target.addr));
            });
            let next = match self.send(request, flow).await {
                Ok(response) => {
                    let class = usize::from(response.status().unwrap_or(500) / 100).clamp(1, 6) - 1;
                    self.board.counters.responses[class].fetch_add(1, Ordering::Relaxed);
                    let line = format!(
                        "{} {}",
                        response.status().unwrap_or(0),
                        String::from_utf8_lossy(response.reason().unwrap_or_default())
                    );
                    self.board.set(id, |st| st.last_response = Some(line));
                    s.client.on_response(&response, rng)
                }
                Err((class, why)) => {
                    self.board.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    s.client.on_failure(class, why, rng)
                }
            };
            if next != Next::SendAgain {
                return next;
            }
        }
        s.client.on_failure(
            FailureClass::AuthFailed,
            "too many challenges in a row".into(),
            rng,
        )
    }

    /// Sends one request in a client transaction and waits for its final response.
    async fn send(
        &self,
        request: tandem_sip::Message,
        flow: crate::stack::transport::Flow,
    ) -> Result<tandem_sip::Message, (FailureClass, String)> {
        let mut events = self.layer.send_request(request, flow);
        while let Some(event) = events.recv().await {
            match event {
                ClientEvent::Response(r) if r.status().unwrap_or(0) >= 200 => return Ok(*r),
                ClientEvent::Response(_) => {}
                ClientEvent::Timeout => return Err((FailureClass::Timeout, "no answer".into())),
                ClientEvent::TransportError => {
                    return Err((FailureClass::Connection, "the connection failed".into()))
                }
            }
        }
        Err((
            FailureClass::Timeout,
            "the transaction layer stopped".into(),
        ))
    }

    /// Removes our contact at the provider, if we registered one.
    async fn unregister(
        &self,
        id: &str,
        session: Option<Session>,
        within: Duration,
        rng: &mut StdRng,
    ) {
        let Some(mut s) = session else {
            return;
        };
        let Some(target) = s.sticky else {
            return;
        };
        self.board.set(id, |st| st.state = "unregistering".into());
        s.client.remove();
        let result = tokio::time::timeout(within, self.exchange(id, &mut s, target, rng)).await;
        match result {
            Ok(Next::Unregistered) => {
                tracing::info!(account = %id, "registration agent: un-registered");
            }
            Ok(other) => {
                tracing::warn!(account = %id, outcome = ?other, "registration agent: un-registering failed");
            }
            Err(_) => tracing::warn!(account = %id, "registration agent: un-registering timed out"),
        }
    }
}

/// What one account's task keeps between attempts.
struct Session {
    account: ProviderAccount,
    client: RegisterClient,
    /// The URI resolved for each attempt: the outbound proxy's, or the registrar's.
    next_hop: SipUri,
    /// The target that answered last, tried first next time.
    sticky: Option<Target>,
    /// The account's `pa` Contact parameter: 12 hex digits of a hash of its instance.
    token: String,
}

impl Session {
    fn new(
        cluster: &ClusterNode,
        a: &ProviderAccount,
        policy: RetryPolicy,
        rng: &mut StdRng,
    ) -> Result<Session, String> {
        let password = accounts::open_password(&cluster.keys(), a)?;
        let transport = a
            .transport
            .map(|t| format!(";transport={}", t.as_str()))
            .unwrap_or_default();
        // `sip:` with `transport=tls` rather than `sips:`: TLS to the provider, without
        // claiming TLS on every hop beyond it, which a provider's own network rarely has.
        let scheme = "sip";
        let registrar = format!("{scheme}:{}{transport}", a.registrar);
        let registrar_uri = parse_sip(&registrar)?;
        let domain = registrar_uri.host.canonical();
        let (next_hop, routes) = match &a.outbound_proxy {
            Some(p) => {
                let proxy = format!("{scheme}:{p}{transport}");
                (parse_sip(&proxy)?, vec![format!("<{proxy};lr>")])
            }
            None => (registrar_uri, Vec::new()),
        };
        let identity = Identity {
            aor: format!("{scheme}:{}@{domain}", a.username),
            request_uri: registrar.clone(),
            routes,
            contact_uri: String::new(),
            instance: a.instance.clone(),
            auth_user: a
                .auth_username
                .clone()
                .unwrap_or_else(|| a.username.clone()),
            password,
            realm: a.realm.clone(),
            expires: a.expires_secs,
            user_agent: format!("Tandem/{}", crate::version()),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, a.instance.as_bytes());
        Ok(Session {
            account: a.clone(),
            client: RegisterClient::new(identity, policy, rng),
            next_hop,
            sticky: None,
            token: crate::hex::encode(&digest.as_ref()[..6]),
        })
    }

    fn contact_user(&self) -> &str {
        self.account
            .contact_user
            .as_deref()
            .unwrap_or(&self.account.username)
    }

    fn contact_uri(&self, addr: std::net::SocketAddr, transport: TransportKind) -> String {
        let user = self.contact_user();
        let t = match transport {
            TransportKind::Udp => "",
            TransportKind::Tcp => ";transport=tcp",
            TransportKind::Tls => ";transport=tls",
        };
        let host = match addr {
            std::net::SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
            v4 => v4.to_string(),
        };
        format!("sip:{user}@{host}{t};{INBOUND_PARAM}={}", self.token)
    }
}

fn parse_sip(s: &str) -> Result<SipUri, String> {
    Uri::parse(s)
        .ok()
        .and_then(|u| u.as_sip().cloned())
        .ok_or_else(|| format!("{s:?} is not a SIP URI"))
}

/// Runs the leader's assignment on this node (any role: a witness may lead) until
/// `stop`. It acts only while this node leads and the cluster has provider accounts.
pub fn spawn_assigner(
    cluster: ClusterNode,
    settings: Settings,
    board: Arc<Board>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(ASSIGN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cache = AssignCache::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if cluster.replica.is_leader() {
                if let Err(e) = assign_once(&cluster, &settings, &board, &mut cache).await {
                    tracing::warn!(error = %e, "assigning provider leases failed; will retry");
                }
            }
        }
    });
}

/// The accounts and leases the leader last read, for one providers generation: between
/// changes only the owners' renewals are read again.
#[derive(Default)]
struct AssignCache {
    generation: Option<u64>,
    accounts: Vec<ProviderAccount>,
    leases: Vec<tandem_raft_store::command::Lease>,
}

async fn assign_once(
    cluster: &ClusterNode,
    settings: &Settings,
    board: &Board,
    cache: &mut AssignCache,
) -> Result<(), String> {
    let reader = cluster.replica.reader();
    let generation = reader.providers_generation();
    if cache.generation != Some(generation) {
        *cache = AssignCache {
            generation: Some(generation),
            accounts: reader.provider_accounts().map_err(|e| e.to_string())?,
            leases: reader.provider_leases().map_err(|e| e.to_string())?,
        };
    }
    if cache.accounts.is_empty() {
        return Ok(());
    }
    let accounts = &cache.accounts;
    let nodes = reader.nodes().map_err(|e| e.to_string())?;
    // Renewals move no lease record: each owner's is read afresh.
    let mut renewed: HashMap<NodeId, u64> = HashMap::new();
    for n in &nodes {
        renewed.insert(
            n.id,
            reader
                .owner_renewed_until(n.id)
                .map_err(|e| e.to_string())?,
        );
    }
    let leases: Vec<_> = cache
        .leases
        .iter()
        .map(|l| {
            let mut l = l.clone();
            if l.owner != 0 && !l.releasing {
                l.expires_at_ms = l
                    .expires_at_ms
                    .max(renewed.get(&l.owner).copied().unwrap_or(0));
            }
            l
        })
        .collect();
    // Which full nodes run an agent: asked of each, at once.
    let mut asks = tokio::task::JoinSet::new();
    for n in nodes.iter().filter(|n| n.role == Role::Full) {
        let (cluster, id) = (cluster.clone(), n.id);
        asks.spawn(async move { (id, cluster.ask_agent(id, "ready").await) });
    }
    let (mut up, mut draining) = (BTreeSet::new(), BTreeSet::new());
    while let Some(answer) = asks.join_next().await {
        match answer {
            Ok((id, Some(a))) if a == "yes" => {
                up.insert(id);
            }
            Ok((id, Some(a))) if a == "draining" => {
                draining.insert(id);
            }
            _ => {}
        }
    }
    let commands = leases::assign(&leases::View {
        now_ms: now_ms(),
        nodes: &nodes,
        up: &up,
        draining: &draining,
        accounts,
        leases: &leases,
        lease_ms: settings.lease.as_millis() as u64,
        grace_ms: settings.skew.as_millis() as u64,
    });
    if commands.is_empty() {
        return Ok(());
    }
    let grants = commands
        .iter()
        .filter(|c| matches!(c, Command::GrantLease { .. }))
        .count() as u64;
    let moves = commands.len() as u64 - grants;
    board
        .counters
        .lease_grants
        .fetch_add(grants, Ordering::Relaxed);
    board
        .counters
        .lease_moves
        .fetch_add(moves, Ordering::Relaxed);
    tracing::info!(grants, moves, "assigning provider leases");
    for r in cluster.replica.propose_all(commands).await {
        if let Err(e) = r {
            return Err(e.to_string());
        }
    }
    Ok(())
}
