//! The registrar (RFC 3261 §10.3) with digest authentication (node/DESIGN.md, "Bindings
//! are written when they change" and "Stateless nonces").
//!
//! - [`plan`] is the binding logic without I/O: contacts and their expiry, `*`, Call-ID and
//!   CSeq ordering, the per-account limit, and which writes must go through Raft. A refresh
//!   that changes nothing calls are routed by (only the Call-ID or CSeq) is answered
//!   without a write while the stored expiry still has one interval of headroom
//!   (node/DESIGN.md, "Bindings are written when they change"); [`UnwrittenRefreshes`]
//!   keeps its Call-ID and CSeq for ordering.
//! - [`Registrar`] authenticates against the local replica (a nonce is good on the node
//!   that issued it; the others answer `stale=true`), proposes the planned writes and
//!   answers.
//! - The REGISTERs of one AOR are planned in arrival order, one group at a time: those that
//!   arrive while the AOR's write is committing wait, then are planned together against
//!   the bindings that write leaves, and their writes are [`coalesce`]d into one. An AOR
//!   thus has at most one write in flight on this node, so its writes reach the log in
//!   order, and a busy AOR costs one write per commit rather than one per REGISTER.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tandem_raft_store::command::{Binding, Command, StoredFlow, BINDING_HEADROOM_INTERVALS};
use tandem_raft_store::replica::Replica;
use tandem_sip::{Contacts, HeaderName, Message, Method, Uri};
use tokio::sync::oneshot;

use crate::agents::auth::accounts::aor;
use crate::agents::auth::digest::Algorithm;
use crate::agents::auth::{Authenticated, Authenticator, Challenge};
use crate::agents::location::overlay::{BindingOverlay, HoldRefused};
use crate::agents::location::refreshes::UnwrittenRefreshes;
use crate::agents::{run_or_spawn, Agent, Refusal, Stack};
use crate::clock::now_ms;
use crate::cluster::ClusterNode;
use crate::stack::transaction::TxId;
use crate::stack::transport::{response_flow, ConnectionId, Flow};

/// Registrar limits, in seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrarSettings {
    pub min_expires: u32,
    pub max_expires: u32,
    pub default_expires: u32,
    pub nonce_lifetime_secs: u64,
    /// Accepted, and offered one per challenge in this order.
    pub algorithms: Vec<Algorithm>,
    /// Lowercase User-Agent fragments of phones that are offered SHA-256.
    pub sha256_user_agents: Vec<String>,
    /// Most logins the authenticator keeps opened.
    pub opened_logins_max: usize,
}

impl RegistrarSettings {
    /// The settings the `[registrar]` section gives; a digest algorithm name that
    /// `Config::validate` would refuse is left out.
    pub fn from_config(c: &crate::config::RegistrarConfig) -> RegistrarSettings {
        RegistrarSettings {
            min_expires: c.min_expires,
            max_expires: c.max_expires,
            default_expires: c.default_expires,
            nonce_lifetime_secs: c.nonce_lifetime_secs,
            algorithms: c
                .digest_algorithms
                .iter()
                .filter_map(|a| Algorithm::parse(Some(a)))
                .collect(),
            sha256_user_agents: c
                .sha256_user_agents
                .iter()
                .map(|a| a.to_ascii_lowercase())
                .collect(),
            opened_logins_max: c.opened_logins_max,
        }
    }
}

impl Default for RegistrarSettings {
    fn default() -> Self {
        RegistrarSettings::from_config(&crate::config::RegistrarConfig::default())
    }
}

/// One contact of a REGISTER, as the plan needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactRequest {
    pub uri: String,
    /// The contact's own `expires` parameter.
    pub expires: Option<u32>,
    /// q-value in thousandths.
    pub q: u16,
}

/// What a REGISTER asks for, read from the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterRequest {
    pub aor: String,
    /// `None` is `Contact: *`; an empty list is a query.
    pub contacts: Option<Vec<ContactRequest>>,
    pub expires_header: Option<u32>,
    pub call_id: String,
    pub cseq: u32,
    pub path: Vec<String>,
    pub user_agent: String,
}

/// The outcome of [`plan`]: what to write, and every binding the 200 lists with the
/// expiry to advertise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub writes: Vec<Command>,
    pub bindings: Vec<(String, u32)>,
    /// Stored bindings this REGISTER refreshed without a write, with its Call-ID and CSeq.
    pub refreshed: Vec<Binding>,
}

fn q_thousandths(q: Option<&str>) -> Result<u16, ()> {
    let Some(q) = q else { return Ok(1000) };
    let v: f64 = q.parse().map_err(|_| ())?;
    if !(0.0..=1.0).contains(&v) {
        return Err(());
    }
    Ok((v * 1000.0).round() as u16)
}

impl RegisterRequest {
    /// The user and (lower-case) domain of the AOR a REGISTER is for, from its To.
    /// `Err` is the 400 to answer.
    pub fn aor_parts(request: &Message) -> Result<(String, String), Refusal> {
        let bad = |why: &str| Refusal::new(400, format!("Bad Request ({why})"));
        let to = request.to().map_err(|_| bad("unreadable To"))?;
        let Uri::Sip(to_uri) = &to.uri else {
            return Err(bad("To is not a SIP URI"));
        };
        let Some(user) = &to_uri.user else {
            return Err(bad("To has no user part"));
        };
        Ok((user.clone(), to_uri.host.canonical()))
    }

    /// Reads a REGISTER for the AOR of `user` and `domain` (from [`Self::aor_parts`]).
    /// `Err` is the 400 to answer.
    pub fn read(request: &Message, user: &str, domain: &str) -> Result<RegisterRequest, Refusal> {
        let bad = |why: &str| Refusal::new(400, format!("Bad Request ({why})"));
        let contacts = match request.contacts().map_err(|_| bad("unreadable Contact"))? {
            None => Some(Vec::new()),
            Some(Contacts::Star) => None,
            Some(Contacts::List(list)) => {
                let mut out = Vec::with_capacity(list.len());
                for c in list {
                    let expires = match c.params.value("expires") {
                        Some(v) => Some(v.parse().map_err(|_| bad("bad expires parameter"))?),
                        None => None,
                    };
                    let q = q_thousandths(c.params.value("q")).map_err(|_| bad("bad q value"))?;
                    out.push(ContactRequest {
                        uri: c.uri.to_string(),
                        expires,
                        q,
                    });
                }
                Some(out)
            }
        };
        Ok(RegisterRequest {
            aor: aor(user, domain),
            contacts,
            expires_header: request.expires().map_err(|_| bad("bad Expires"))?,
            call_id: request
                .call_id()
                .map_err(|_| bad("unreadable Call-ID"))?
                .into_owned(),
            cseq: request.cseq().map_err(|_| bad("unreadable CSeq"))?.seq,
            path: request
                .name_addrs(&HeaderName::Path)
                .map_err(|_| bad("unreadable Path"))?
                .iter()
                .map(|p| format!("<{}>", p.uri))
                .collect(),
            user_agent: request
                .header(&HeaderName::UserAgent)
                .ok()
                .flatten()
                .map(|u| u.chars().take(128).collect())
                .unwrap_or_default(),
        })
    }
}

/// The binding changes a REGISTER makes (RFC 3261 §10.3 steps 6–8), and the contacts the
/// 200 lists. `existing` is the AOR's current bindings; lapsed ones count as absent.
pub fn plan(
    req: &RegisterRequest,
    existing: &[Binding],
    max_contacts: u32,
    settings: &RegistrarSettings,
    now_ms: u64,
    edge: u64,
    flow: &StoredFlow,
) -> Result<Plan, Refusal> {
    let live: Vec<&Binding> = existing
        .iter()
        .filter(|b| b.expires_at_ms > now_ms)
        .collect();
    // RFC 3261 §10.3 step 7 refuses a CSeq that does not grow within a Call-ID. An equal
    // one is this very request again: its 200 is sent without a transaction to absorb
    // retransmissions (ARCHITECTURE.md, "REGISTER is answered statelessly"), so a client
    // whose 200 was lost sends it again, and it changes nothing it has not changed.
    let out_of_order = |b: &Binding| b.call_id == req.call_id && req.cseq < b.cseq;
    let same_request = |b: &Binding| b.call_id == req.call_id && req.cseq == b.cseq;
    let mut plan = Plan::default();
    let Some(contacts) = &req.contacts else {
        // Contact: * removes every binding, and only with Expires: 0.
        if req.expires_header != Some(0) {
            return Err(Refusal::new(
                400,
                "Bad Request (Contact: * needs Expires: 0)",
            ));
        }
        if live.iter().any(|b| out_of_order(b)) {
            return Err(Refusal::new(
                500,
                "Server Internal Error (out-of-order REGISTER)",
            ));
        }
        if !existing.is_empty() {
            plan.writes.push(Command::RemoveAllBindings {
                aor: req.aor.clone(),
            });
        }
        return Ok(plan);
    };
    let mut granted: Vec<(String, u32)> = Vec::new();
    for c in contacts {
        let asked = c
            .expires
            .or(req.expires_header)
            .unwrap_or(settings.default_expires);
        if asked > 0 && asked < settings.min_expires {
            let mut a = Refusal::new(423, "Interval Too Brief");
            a.headers
                .push((HeaderName::MinExpires, settings.min_expires.to_string()));
            return Err(a);
        }
        let current = live.iter().find(|b| b.contact == c.uri);
        if current.is_some_and(|b| out_of_order(b)) {
            return Err(Refusal::new(
                500,
                "Server Internal Error (out-of-order REGISTER)",
            ));
        }
        if asked == 0 {
            if current.is_some() {
                plan.writes.push(Command::RemoveBinding {
                    aor: req.aor.clone(),
                    contact: c.uri.clone(),
                });
            }
            granted.retain(|(u, _)| *u != c.uri);
            continue;
        }
        let expires = asked.min(settings.max_expires);
        let interval_ms = u64::from(expires) * 1000;
        // The Call-ID and CSeq only order REGISTERs; they do not route calls.
        let unchanged = current.filter(|b| {
            same_request(b)
                || (b.flow == *flow
                    && b.edge_node == edge
                    && b.q == c.q
                    && b.path == req.path
                    && b.expires_secs == expires
                    && b.expires_at_ms.saturating_sub(now_ms) >= interval_ms)
        });
        if let Some(b) = unchanged {
            if b.call_id != req.call_id || b.cseq != req.cseq {
                plan.refreshed.push(Binding {
                    call_id: req.call_id.clone(),
                    cseq: req.cseq,
                    ..(*b).clone()
                });
            }
        } else {
            plan.writes.push(Command::PutBinding(Binding {
                aor: req.aor.clone(),
                contact: c.uri.clone(),
                // One interval of headroom: the next refresh need not be written.
                expires_at_ms: now_ms + BINDING_HEADROOM_INTERVALS * interval_ms,
                expires_secs: expires,
                edge_node: edge,
                flow: flow.clone(),
                path: req.path.clone(),
                call_id: req.call_id.clone(),
                cseq: req.cseq,
                q: c.q,
                user_agent: req.user_agent.clone(),
            }));
        }
        granted.retain(|(u, _)| *u != c.uri);
        granted.push((c.uri.clone(), expires));
    }
    let removed = |uri: &str| {
        contacts
            .iter()
            .any(|c| c.uri == uri && !granted.iter().any(|(g, _)| g == uri))
    };
    let mut listed: Vec<(String, u32)> = live
        .iter()
        .filter(|b| !removed(&b.contact) && !granted.iter().any(|(g, _)| *g == b.contact))
        .map(|b| {
            // Rounded up: a listed contact with expires=0 reads as removed to a phone.
            let left = b.expires_at_ms.saturating_sub(now_ms).div_ceil(1000) as u32;
            (b.contact.clone(), left.clamp(1, b.expires_secs.max(1)))
        })
        .collect();
    listed.extend(granted);
    if listed.len() > max_contacts as usize {
        return Err(Refusal::new(
            403,
            format!("Forbidden (more than {max_contacts} contacts for this account)"),
        ));
    }
    plan.bindings = listed;
    Ok(plan)
}

/// `writes` as proposed: once every member can apply them, removals say when they were
/// made, so that a change another node held from before them is not replayed over them
/// (node/DESIGN.md, "Degraded mode").
fn with_removal_times(replica: &Replica, writes: &[Command], now: u64) -> Vec<Command> {
    let removes = |w: &Command| {
        matches!(
            w,
            Command::RemoveBinding { .. } | Command::RemoveAllBindings { .. }
        )
    };
    // Read only when there is a removal: this is the write path of every registration.
    let timed = writes.iter().any(removes)
        && replica
            .reader()
            .feature_version()
            .is_ok_and(|v| v >= REMOVALS_WITH_TIMES);
    writes
        .iter()
        .map(|w| match w {
            Command::RemoveBinding { aor, contact } if timed => Command::RemoveBindingAt {
                aor: aor.clone(),
                contact: contact.clone(),
                at_ms: now,
            },
            Command::RemoveAllBindings { aor } if timed => Command::RemoveAllBindingsAt {
                aor: aor.clone(),
                at_ms: now,
            },
            other => other.clone(),
        })
        .collect()
}

/// The cluster feature version from which removals carry their time.
const REMOVALS_WITH_TIMES: u32 = 4;

/// `view` (an AOR's bindings) as it will be once `plan` is carried out.
pub fn apply_to_view(view: &mut Vec<Binding>, plan: &Plan) {
    for r in &plan.refreshed {
        if let Some(v) = view.iter_mut().find(|v| v.contact == r.contact) {
            v.clone_from(r);
        }
    }
    for w in &plan.writes {
        match w {
            Command::PutBinding(b) => {
                view.retain(|v| v.contact != b.contact);
                view.push(b.clone());
            }
            Command::RemoveBinding { contact, .. } => view.retain(|v| v.contact != *contact),
            Command::RemoveAllBindings { .. } => view.clear(),
            _ => {}
        }
    }
}

/// One AOR's binding writes, in order, reduced to the same net effect: a later write of a
/// contact replaces an earlier one, and a removal of every binding drops all before it.
pub fn coalesce(writes: Vec<Command>) -> Vec<Command> {
    let contact = |c: &Command| match c {
        Command::PutBinding(b) => Some(b.contact.clone()),
        Command::RemoveBinding { contact, .. } => Some(contact.clone()),
        _ => None,
    };
    let mut out: Vec<Command> = Vec::with_capacity(writes.len());
    for w in writes {
        match contact(&w) {
            Some(c) => out.retain(|o| contact(o).as_deref() != Some(&c)),
            None if matches!(w, Command::RemoveAllBindings { .. }) => out.clear(),
            None => {}
        }
        out.push(w);
    }
    out
}

/// A REGISTER waiting for its AOR's next group.
struct Job {
    req: RegisterRequest,
    max_contacts: u32,
    flow: StoredFlow,
    /// The contacts for the 200, or the answer instead of it.
    done: oneshot::Sender<Result<Vec<(String, u32)>, Refusal>>,
}

/// The REGISTERs waiting per AOR. An AOR has an entry exactly while a writer task runs
/// for it.
type Queues = Mutex<HashMap<String, Vec<Job>>>;

/// Removes the AOR's entry if its writer ends early (a panic), so the REGISTERs waiting
/// there are answered with an error and the next one starts a new writer.
struct WriterGuard<'a> {
    queues: &'a Queues,
    aor: &'a str,
    armed: bool,
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut q) = self.queues.lock() {
                q.remove(self.aor);
            }
        }
    }
}

/// The registrar of one node.
pub struct Registrar {
    cluster: ClusterNode,
    queues: Queues,
    overlay: Arc<BindingOverlay>,
    refreshes: UnwrittenRefreshes,
    settings: RegistrarSettings,
    auth: Arc<Authenticator>,
}

/// Whether the first Path entry names the address the REGISTER came from.
fn path_from_sender(path: &[String], flow: &Flow) -> bool {
    let Some(uri) = path
        .first()
        .and_then(|p| tandem_sip::NameAddr::parse(p, "Path").ok())
        .and_then(|n| n.uri.as_sip().cloned())
    else {
        return false;
    };
    // A connection's source port is ephemeral, so over TCP and TLS the address decides.
    let (kind, host, port) = crate::stack::transport::next_hop(&uri);
    host.ip() == Some(flow.remote.ip())
        && (flow.transport.is_reliable() || (port == flow.remote.port() && kind == flow.transport))
}

/// The flow as a binding stores it.
pub fn stored_flow(flow: &Flow) -> StoredFlow {
    StoredFlow {
        transport: flow.transport.as_str().to_owned(),
        remote: tandem_sip::addr::socket_addr_string(flow.remote),
        local: tandem_sip::addr::socket_addr_string(flow.local),
        connection: flow.connection.map(|ConnectionId(id)| id),
    }
}

impl Registrar {
    pub fn new(
        cluster: ClusterNode,
        overlay: Arc<BindingOverlay>,
        settings: RegistrarSettings,
        auth: Arc<Authenticator>,
    ) -> Registrar {
        Registrar {
            cluster,
            queues: Mutex::default(),
            overlay,
            refreshes: UnwrittenRefreshes::default(),
            settings,
            auth,
        }
    }

    /// Queues a REGISTER behind its AOR's write in flight, starting the AOR's writer if
    /// none runs, and waits for its group's outcome. With no writer running, nothing is in
    /// flight that the REGISTER must be planned after, so it is planned at once, and if it
    /// needs no write (a refresh inside its headroom, the usual REGISTER) it is answered
    /// without queueing, a task or Raft.
    async fn submit(
        self: &Arc<Self>,
        req: RegisterRequest,
        max_contacts: u32,
        flow: StoredFlow,
    ) -> Result<Vec<(String, u32)>, Refusal> {
        let (outcome, start) = {
            let mut queues = self.queues.lock().expect("registrar queues");
            if let Some(waiting) = queues.get_mut(&req.aor) {
                let (done, outcome) = oneshot::channel();
                waiting.push(Job {
                    req,
                    max_contacts,
                    flow,
                    done,
                });
                (outcome, None)
            } else {
                // Planned under the lock, so no other REGISTER of this AOR starts a writer
                // between this plan and the refresh it notes.
                let now = now_ms();
                let view = self.current_bindings(&req.aor, &[&req.call_id]);
                let node = self.cluster.identity.node_id;
                match plan(&req, &view, max_contacts, &self.settings, now, node, &flow) {
                    Err(answer) => return Err(answer),
                    Ok(p) if p.writes.is_empty() => {
                        for r in &p.refreshed {
                            self.refreshes.note(r, now);
                        }
                        return Ok(p.bindings);
                    }
                    // The writer plans it again, against the same bindings.
                    Ok(_) => {
                        let (done, outcome) = oneshot::channel();
                        let aor = req.aor.clone();
                        let job = Job {
                            req,
                            max_contacts,
                            flow,
                            done,
                        };
                        queues.insert(aor.clone(), vec![job]);
                        (outcome, Some(aor))
                    }
                }
            }
        };
        if let Some(aor) = start {
            let this = self.clone();
            tokio::spawn(async move { this.run_writer(&aor).await });
        }
        outcome.await.unwrap_or_else(|_| {
            Err(Refusal::new(
                500,
                "Server Internal Error (the registration was not completed)",
            ))
        })
    }

    /// One AOR's writer: plans and writes the waiting REGISTERs group by group until none
    /// is left.
    async fn run_writer(&self, aor: &str) {
        let mut guard = WriterGuard {
            queues: &self.queues,
            aor,
            armed: true,
        };
        loop {
            let jobs = {
                let mut queues = self.queues.lock().expect("registrar queues");
                let Some(waiting) = queues.get_mut(aor) else {
                    break;
                };
                if waiting.is_empty() {
                    queues.remove(aor);
                    break;
                }
                std::mem::take(waiting)
            };
            self.write_group(aor, jobs).await;
        }
        guard.armed = false;
    }

    /// The AOR's bindings as this node knows them: the replica's, with what the overlay
    /// holds back and the refreshes answered without a write. A binding's Call-ID is only
    /// right where it is one of `call_ids` (see [`UnwrittenRefreshes::apply`]), and only
    /// compared with them.
    fn current_bindings(&self, aor: &str, call_ids: &[&str]) -> Vec<Binding> {
        let stored = self
            .cluster
            .replica
            .reader()
            .bindings(aor)
            .unwrap_or_default();
        self.refreshes
            .apply(self.overlay.apply(aor, stored), call_ids)
    }

    /// Plans a group of one AOR's REGISTERs in order, each against the bindings the ones
    /// before it leave, writes their coalesced changes and answers them.
    async fn write_group(&self, aor: &str, jobs: Vec<Job>) {
        let mut view = {
            let call_ids: Vec<&str> = jobs.iter().map(|j| j.req.call_id.as_str()).collect();
            self.current_bindings(aor, &call_ids)
        };
        let now = now_ms();
        let mut writes = Vec::new();
        let mut accepted = Vec::with_capacity(jobs.len());
        let mut refreshed = Vec::new();
        for job in jobs {
            let planned = plan(
                &job.req,
                &view,
                job.max_contacts,
                &self.settings,
                now,
                self.cluster.identity.node_id,
                &job.flow,
            );
            match planned {
                Ok(p) => {
                    apply_to_view(&mut view, &p);
                    writes.extend(p.writes);
                    refreshed.extend(p.refreshed);
                    accepted.push((job.done, p.bindings));
                }
                Err(answer) => {
                    let _ = job.done.send(Err(answer));
                }
            }
        }
        let written = self.write(aor, coalesce(writes)).await;
        if written.is_ok() {
            // A refresh of a contact that the group also wrote amends a binding that is
            // no longer stored, so its entry never matches.
            for r in &refreshed {
                self.refreshes.note(r, now);
            }
        }
        for (done, bindings) in accepted {
            let _ = done.send(written.clone().map(|()| bindings));
        }
    }

    /// Writes the planned binding changes through Raft or, without a quorum, into the
    /// overlay (node/DESIGN.md, "Degraded mode"), so the phone is answered either way. A
    /// removal of every binding, which [`coalesce`] leaves only first, is committed before
    /// the rest; the rest name one contact each, so they are proposed together.
    async fn write(&self, aor: &str, mut writes: Vec<Command>) -> Result<(), Refusal> {
        if writes.is_empty() {
            return Ok(());
        }
        let rest = match writes.first() {
            Some(Command::RemoveAllBindings { .. }) => writes.split_off(1),
            _ => Vec::new(),
        };
        for batch in [writes, rest] {
            if !batch.is_empty() {
                self.write_together(aor, batch).await?;
            }
        }
        Ok(())
    }

    async fn write_together(&self, aor: &str, writes: Vec<Command>) -> Result<(), Refusal> {
        let degraded = self.cluster.health().degraded;
        let now = now_ms();
        let results = match degraded {
            None => {
                let proposed = with_removal_times(&self.cluster.replica, &writes, now);
                self.cluster.replica.propose_all(proposed).await
            }
            Some(_) => Vec::new(),
        };
        for (i, command) in writes.into_iter().enumerate() {
            match results.get(i) {
                Some(Ok(_)) => {
                    // A newer direct write supersedes whatever was held for that key.
                    self.overlay.forget(&command);
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(%aor, error = %e, "binding write failed; holding it locally")
                }
                None => {}
            }
            let to_hold = match &command {
                Command::RemoveAllBindings { aor } => self
                    .current_bindings(aor, &[])
                    .iter()
                    .map(|b| Command::RemoveBinding {
                        aor: b.aor.clone(),
                        contact: b.contact.clone(),
                    })
                    .collect(),
                other => vec![other.clone()],
            };
            for change in &to_hold {
                // A new binding was answered at the time its expiry counts from.
                let held_at = match change {
                    Command::PutBinding(b) => b.written_at_ms(),
                    _ => now,
                };
                if let Err(refused) = self.overlay.hold(change, held_at).await {
                    tracing::warn!(%aor, %refused, "cannot hold a binding change locally; refusing the REGISTER");
                    let mut a = match refused {
                        HoldRefused::Full => Refusal::new(
                            503,
                            "Service Unavailable (too many registrations wait for the cluster)",
                        ),
                        _ => Refusal::new(500, "Server Internal Error (cannot store the binding)"),
                    };
                    a.headers.push((HeaderName::RetryAfter, "5".into()));
                    return Err(a);
                }
            }
            if let Some(reason) = &degraded {
                tracing::info!(%aor, %reason, held = self.overlay.len(), "degraded: binding held in the local overlay");
            }
        }
        Ok(())
    }

    /// Handles one REGISTER: the final response to send.
    pub async fn register(self: &Arc<Self>, request: &Message, flow: &Flow) -> Message {
        match self.try_register(request, flow).await {
            Ok(r) | Err(r) => r,
        }
    }

    async fn try_register(
        self: &Arc<Self>,
        request: &Message,
        flow: &Flow,
    ) -> Result<Message, Message> {
        let reply = |refusal: Refusal| refusal.response(request);
        // RFC 3261 §10.3: authenticate (steps 2–3) before reading the bindings asked for.
        let (user, domain) = RegisterRequest::aor_parts(request).map_err(reply)?;
        let reader = self.cluster.replica.reader();
        if !reader.serves_domain(&domain).unwrap_or(false) {
            return Err(reply(Refusal::new(
                403,
                format!("Forbidden ({domain} is not a domain served here)"),
            )));
        }
        let account = match self
            .auth
            .authenticate(
                request,
                flow.remote.ip(),
                &user,
                &domain,
                Challenge::Registrar,
            )
            .await
        {
            Authenticated::Account(a) => a,
            Authenticated::Refused(a) => return Err(reply(a)),
        };
        let req = RegisterRequest::read(request, &user, &domain).map_err(reply)?;
        // RFC 3327: Path is added by the proxies on the way. Only a Path whose first hop
        // is the element that sent this REGISTER is believed; otherwise a phone could
        // name any host for the calls it receives to be sent through.
        let mut req = req;
        if !req.path.is_empty() && !path_from_sender(&req.path, flow) {
            tracing::info!(aor = %req.aor, remote = %flow.remote, "Path not from the sender of the REGISTER; ignored");
            req.path.clear();
        }
        let path = req.path.clone();
        let bindings = self
            .submit(req, account.max_contacts, stored_flow(flow))
            .await
            .map_err(reply)?;
        let mut ok = crate::stack::responses::build(request, 200, "OK");
        for (contact, expires) in &bindings {
            ok.push_header(
                HeaderName::Contact,
                format!("<{contact}>;expires={expires}"),
            );
        }
        for p in path {
            ok.push_header(HeaderName::Path, p);
        }
        Ok(ok)
    }
}

/// Whether a request is the registrar's: every REGISTER that passed the dispatcher's
/// checks, whatever its Request-URI.
pub fn takes(request: &Message) -> bool {
    request.method() == Some(&Method::Register)
}

impl Agent for Registrar {
    fn takes(&self, request: &Message, _in_transaction: bool) -> bool {
        takes(request)
    }

    /// Writes wait for Raft, so the dispatcher goes on with the next request meanwhile; a
    /// refresh, which never waits, is answered at once.
    fn handle(self: Arc<Self>, request: Message, flow: Flow, tx: Option<TxId>, stack: &Stack) {
        let stack = stack.clone();
        run_or_spawn(async move {
            let response = self.register(&request, &flow).await;
            match tx {
                // No answer holds state (ARCHITECTURE.md, "REGISTER is answered
                // statelessly"): a retransmitted REGISTER is answered again, a challenge
                // with a new nonce, a 200 from the bindings as they are then, and a spoofed
                // source gets one answer per request.
                Some(tx) => stack.layer.respond_stateless(tx, response),
                None => {
                    stack.stats.count_response(response.status().unwrap_or(0));
                    let _ = stack
                        .transports
                        .send(&response_flow(&request, &flow), response.to_bytes());
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> StoredFlow {
        StoredFlow {
            transport: "UDP".into(),
            remote: "192.0.2.10:5060".into(),
            local: "127.0.0.1:5060".into(),
            connection: None,
        }
    }

    fn req(
        contacts: Option<Vec<(&str, Option<u32>)>>,
        expires: Option<u32>,
        cseq: u32,
    ) -> RegisterRequest {
        RegisterRequest {
            aor: "sip:alice@example.com".into(),
            contacts: contacts.map(|cs| {
                cs.into_iter()
                    .map(|(uri, e)| ContactRequest {
                        uri: uri.into(),
                        expires: e,
                        q: 1000,
                    })
                    .collect()
            }),
            expires_header: expires,
            call_id: "call-1".into(),
            cseq,
            path: vec![],
            user_agent: "test".into(),
        }
    }

    const NOW: u64 = 1_000_000;

    fn run(r: &RegisterRequest, existing: &[Binding]) -> Result<Plan, Refusal> {
        plan(
            r,
            existing,
            3,
            &RegistrarSettings::default(),
            NOW,
            1,
            &flow(),
        )
    }

    fn stored(p: &Plan) -> Vec<Binding> {
        p.writes
            .iter()
            .filter_map(|w| match w {
                Command::PutBinding(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_group_is_planned_in_order_and_coalesced_to_its_net_effect() {
        let mut view = Vec::new();
        let mut writes = Vec::new();
        let mut group = |r: RegisterRequest, view: &mut Vec<Binding>| {
            let p = run(&r, view);
            if let Ok(p) = &p {
                apply_to_view(view, p);
                writes.extend(p.writes.clone());
            }
            p
        };
        let contact = "sip:a@192.0.2.10";
        let register = |call_id: &str, cseq| {
            let mut r = req(Some(vec![(contact, None)]), Some(600), cseq);
            r.call_id = call_id.into();
            r
        };
        let first = group(register("call-1", 1), &mut view).unwrap();
        assert_eq!(first.writes.len(), 1);
        // A new Call-ID from the same flow routes calls no differently: not written,
        // but planned against, so a stale CSeq of that Call-ID is refused.
        let p = group(register("call-2", 1), &mut view).unwrap();
        assert!(p.writes.is_empty(), "{p:?}");
        assert_eq!(p.bindings, vec![(contact.to_owned(), 600)]);
        // The same request again changes nothing; an older CSeq is out of order.
        assert!(group(register("call-2", 1), &mut view)
            .unwrap()
            .writes
            .is_empty());
        assert_eq!(
            group(register("call-2", 0), &mut view).unwrap_err().status,
            500
        );
        assert!(group(register("call-2", 2), &mut view)
            .unwrap()
            .writes
            .is_empty());
        // An interval the stored binding does not have is written, with the newest order.
        let mut longer = register("call-2", 3);
        longer.expires_header = Some(900);
        group(longer, &mut view).unwrap();
        let net = coalesce(writes);
        assert_eq!(net.len(), 1);
        let Command::PutBinding(b) = &net[0] else {
            panic!("expected a put, got {net:?}");
        };
        assert_eq!(
            (b.call_id.as_str(), b.cseq, b.expires_secs),
            ("call-2", 3, 900)
        );
        assert_eq!(view, vec![b.clone()]);
    }

    #[test]
    fn a_refresh_without_a_write_reports_its_call_id_and_cseq() {
        let existing =
            stored(&run(&req(Some(vec![("sip:a@h", None)]), Some(600), 1), &[]).unwrap());
        let mut again = req(Some(vec![("sip:a@h", None)]), Some(600), 1);
        again.call_id = "call-2".into();
        let p = run(&again, &existing).unwrap();
        assert!(p.writes.is_empty());
        let mut expected = existing[0].clone();
        expected.call_id = "call-2".into();
        assert_eq!(p.refreshed, vec![expected]);
        // The stored Call-ID at the stored CSeq is that request again: nothing changes.
        let same = run(&req(Some(vec![("sip:a@h", None)]), Some(600), 1), &existing).unwrap();
        assert!(
            same.writes.is_empty() && same.refreshed.is_empty(),
            "{same:?}"
        );
        // At a lower CSeq it is out of order.
        let older = run(&req(Some(vec![("sip:a@h", None)]), Some(600), 0), &existing);
        assert_eq!(older.unwrap_err().status, 500);
        let next = run(&req(Some(vec![("sip:a@h", None)]), Some(600), 2), &existing).unwrap();
        assert_eq!(next.refreshed[0].cseq, 2);
    }

    #[test]
    fn coalescing_keeps_the_last_write_of_each_contact_after_the_last_remove_all() {
        let put = |c: &str, cseq| {
            let r = req(Some(vec![(c, None)]), Some(600), cseq);
            run(&r, &[]).unwrap().writes.remove(0)
        };
        let remove = |c: &str| Command::RemoveBinding {
            aor: "sip:alice@example.com".into(),
            contact: c.into(),
        };
        let all = Command::RemoveAllBindings {
            aor: "sip:alice@example.com".into(),
        };
        assert_eq!(
            coalesce(vec![put("sip:x@h", 1), remove("sip:x@h")]),
            vec![remove("sip:x@h")]
        );
        assert_eq!(
            coalesce(vec![put("sip:x@h", 1), all.clone(), put("sip:y@h", 2)]),
            vec![all.clone(), put("sip:y@h", 2)]
        );
        assert_eq!(
            coalesce(vec![
                put("sip:x@h", 1),
                put("sip:y@h", 2),
                put("sip:x@h", 3)
            ]),
            vec![put("sip:y@h", 2), put("sip:x@h", 3)]
        );
        let mut view = vec![];
        apply_to_view(
            &mut view,
            &Plan {
                writes: vec![put("sip:x@h", 1), put("sip:y@h", 2), all],
                ..Plan::default()
            },
        );
        assert!(view.is_empty());
    }

    #[test]
    fn a_new_contact_is_stored_with_headroom_and_listed() {
        let p = run(
            &req(Some(vec![("sip:a@192.0.2.10", None)]), Some(600), 1),
            &[],
        )
        .unwrap();
        let b = &stored(&p)[0];
        assert_eq!(b.expires_secs, 600);
        assert_eq!(b.expires_at_ms, NOW + 1_200_000);
        assert_eq!(b.edge_node, 1);
        assert_eq!(p.bindings, vec![("sip:a@192.0.2.10".to_owned(), 600)]);
    }

    #[test]
    fn expiry_is_bounded_and_too_brief_gets_423_with_min_expires() {
        let p = run(&req(Some(vec![("sip:a@h", Some(99_999))]), None, 1), &[]).unwrap();
        assert_eq!(p.bindings[0].1, 3600);
        let e = run(&req(Some(vec![("sip:a@h", Some(10))]), None, 1), &[]).unwrap_err();
        assert_eq!(e.status, 423);
        assert_eq!(e.headers, vec![(HeaderName::MinExpires, "60".into())]);
        // Without any expiry, the default applies.
        let p = run(&req(Some(vec![("sip:a@h", None)]), None, 1), &[]).unwrap();
        assert_eq!(p.bindings[0].1, 3600);
    }

    #[test]
    fn a_refresh_inside_the_headroom_writes_nothing_and_a_late_one_writes() {
        let first = run(&req(Some(vec![("sip:a@h", None)]), Some(600), 1), &[]).unwrap();
        let existing = stored(&first);
        let refresh = req(Some(vec![("sip:a@h", None)]), Some(600), 2);
        let p = plan(
            &refresh,
            &existing,
            3,
            &RegistrarSettings::default(),
            NOW + 300_000,
            1,
            &flow(),
        )
        .unwrap();
        assert!(p.writes.is_empty(), "{p:?}");
        assert_eq!(p.bindings, vec![("sip:a@h".to_owned(), 600)]);
        let late = plan(
            &refresh,
            &existing,
            3,
            &RegistrarSettings::default(),
            NOW + 700_000,
            1,
            &flow(),
        )
        .unwrap();
        assert_eq!(stored(&late).len(), 1);
        // A new NAT mapping is always written.
        let mut moved = flow();
        moved.remote = "192.0.2.10:40000".into();
        let p = plan(
            &refresh,
            &existing,
            3,
            &RegistrarSettings::default(),
            NOW + 300_000,
            1,
            &moved,
        )
        .unwrap();
        assert_eq!(stored(&p)[0].flow, moved);
    }

    #[test]
    fn call_id_and_cseq_ordering() {
        let existing = stored(&run(&req(Some(vec![("sip:a@h", None)]), None, 5), &[]).unwrap());
        let stale = run(&req(Some(vec![("sip:a@h", None)]), None, 4), &existing).unwrap_err();
        assert_eq!(stale.status, 500);
        // The request that made the binding, sent again, lists it and writes nothing,
        // even with a flow the binding no longer has.
        let mut moved = flow();
        moved.remote = "192.0.2.10:40000".into();
        let again = plan(
            &req(Some(vec![("sip:a@h", None)]), None, 5),
            &existing,
            3,
            &RegistrarSettings::default(),
            NOW,
            1,
            &moved,
        )
        .unwrap();
        assert!(again.writes.is_empty(), "{again:?}");
        assert_eq!(again.bindings.len(), 1);
        let mut other_call = req(Some(vec![("sip:a@h", None)]), None, 1);
        other_call.call_id = "call-2".into();
        assert!(run(&other_call, &existing).is_ok());
    }

    #[test]
    fn zero_expires_removes_and_star_removes_all() {
        let existing = stored(
            &run(
                &req(Some(vec![("sip:a@h", None), ("sip:b@h", None)]), None, 1),
                &[],
            )
            .unwrap(),
        );
        let p = run(&req(Some(vec![("sip:a@h", Some(0))]), None, 2), &existing).unwrap();
        assert_eq!(
            p.writes,
            vec![Command::RemoveBinding {
                aor: "sip:alice@example.com".into(),
                contact: "sip:a@h".into()
            }]
        );
        assert_eq!(p.bindings.len(), 1);
        assert_eq!(p.bindings[0].0, "sip:b@h");

        let all = run(&req(None, Some(0), 3), &existing).unwrap();
        assert_eq!(
            all.writes,
            vec![Command::RemoveAllBindings {
                aor: "sip:alice@example.com".into()
            }]
        );
        assert_eq!(
            run(&req(None, Some(60), 3), &existing).unwrap_err().status,
            400
        );
        assert_eq!(
            run(&req(None, Some(0), 0), &existing).unwrap_err().status,
            500
        );
    }

    #[test]
    fn a_query_lists_and_the_contact_limit_holds() {
        let existing =
            stored(&run(&req(Some(vec![("sip:a@h", None)]), Some(600), 1), &[]).unwrap());
        let q = run(&req(Some(vec![]), None, 2), &existing).unwrap();
        assert!(q.writes.is_empty());
        assert_eq!(q.bindings, vec![("sip:a@h".to_owned(), 600)]);
        let four = req(
            Some(vec![
                ("sip:b@h", None),
                ("sip:c@h", None),
                ("sip:d@h", None),
            ]),
            None,
            2,
        );
        assert_eq!(run(&four, &existing).unwrap_err().status, 403);
        // Lapsed bindings do not count.
        let later = plan(
            &four,
            &existing,
            3,
            &RegistrarSettings::default(),
            NOW + 1_300_000,
            1,
            &flow(),
        );
        assert!(later.is_ok());
    }

    #[test]
    fn q_values_parse_to_thousandths() {
        assert_eq!(q_thousandths(Some("0.5")), Ok(500));
        assert_eq!(q_thousandths(None), Ok(1000));
        assert!(q_thousandths(Some("2")).is_err());
    }
}
