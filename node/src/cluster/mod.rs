//! This node's place in the cluster: its data directory, master key, replica and internal
//! listener, and the duties that keep membership tidy (promote caught-up learners, keep
//! the node registry current). The offline `tandem cluster init` and `join` are in
//! [`join`]; which other nodes answer SIP right now is [`peers`].
//!
//! Without a `[cluster]` section the node is standalone: a one-member cluster with no
//! internal listener, created on first start, so `tandem run` with the embedded defaults
//! just works.

mod disk;
mod join;
pub mod peers;

pub use join::{init, join};

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tandem_raft_store::command::{Command, CommandResult, NodeId, NodeRecord};
use tandem_raft_store::crypto::KeyRing;
use tandem_raft_store::data_dir::{self, Identity};
use tandem_raft_store::http_network::{self, AgentHook, HttpNetwork, ServeContext};
use tandem_raft_store::local_network::LocalRouter;
use tandem_raft_store::membership::{ClusterReply, ClusterRequest, ReplicationView};
use tandem_raft_store::replica::history::{DroppedHistory, DROP_HISTORY_WITHIN};
use tandem_raft_store::replica::{Forwarder, QuorumHealth, Replica};
use tandem_raft_store::types::NodeInfo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClusterConfig, Config, Role};
use crate::Error;

/// The raft address a standalone node records for itself: it has no internal listener.
const STANDALONE_ADDR: &str = "standalone";
/// How often the leader looks for learners to promote.
const PROMOTE_EVERY: Duration = Duration::from_millis(300);
/// How long a member may take to answer a status or key question.
const PEER_QUESTION_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a SIP request that this replica's lag could explain (no binding for a call,
/// no account for credentials) waits for the replica to catch up with the leader before
/// it is answered: a round trip and an apply, with room for a slow link.
const CATCH_UP_WITHIN: Duration = Duration::from_millis(500);

/// How much longer than a member's own bound the asker waits for it to drop its history.
const DROP_HISTORY_SLACK: Duration = Duration::from_secs(30);

/// A running node's replica and what it needs to answer for it.
#[derive(Clone)]
pub struct ClusterNode {
    pub replica: Replica,
    pub identity: Identity,
    role: Role,
    keys: Arc<RwLock<KeyRing>>,
    key_path: std::path::PathBuf,
    network: Option<HttpNetwork>,
    quorum_timeout: Duration,
    max_apply_lag: u64,
    /// Who answers other nodes' questions for this node's agents (`ask_agent`), by the
    /// question's first word.
    agent_topics: Arc<RwLock<HashMap<&'static str, AgentAnswer>>>,
}

/// What answers other nodes' questions on one topic.
pub type AgentAnswer = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The question a node's cluster layer answers with the ids of the master keys it holds in
/// memory (not re-reading its key file), as space-separated numbers: what nonces are
/// signed under through a key rotation (`Authenticator::agree_on_nonce_keys`). A node from
/// before this question answers "unknown question", which [`parse_key_ids`] refuses.
pub const KEYS_QUESTION: &str = "keys";

/// The key ids in an answer to [`KEYS_QUESTION`], or `None` if it is not one.
pub fn parse_key_ids(answer: &str) -> Option<Vec<u32>> {
    let ids: Option<Vec<u32>> = answer.split_whitespace().map(|w| w.parse().ok()).collect();
    ids.filter(|ids| !ids.is_empty())
}

/// How often the leader asks the members which feature version they support.
const FEATURES_EVERY: Duration = Duration::from_secs(5);

/// The highest cluster feature version this binary supports. Tests of rolling upgrades
/// make a node claim another with `TANDEM_TEST_FEATURES`, as a newer or older binary would.
pub fn supported_features() -> u32 {
    std::env::var("TANDEM_TEST_FEATURES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(tandem_raft_store::command::supported_features)
}

/// `GET /v1/cluster/status` and `tandem cluster status`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub node_id: u64,
    pub role: &'static str,
    pub standalone: bool,
    pub state: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub apply_lag: u64,
    /// The cluster feature version (what may be proposed), and what this node supports.
    pub feature_version: u32,
    pub supported_features: u32,
    pub quorum: &'static str,
    pub degraded_reason: Option<String>,
    pub members: Vec<MemberStatus>,
    /// Why per-member lag is missing, when it is.
    pub replication_note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemberStatus {
    pub id: u64,
    pub raft_addr: String,
    pub voter: bool,
    /// From the node registry: "full" or "witness", once the member has registered.
    pub role: Option<&'static str>,
    pub software_version: Option<String>,
    pub matched_index: Option<u64>,
    pub lag: Option<u64>,
}

/// Loads the key ring, or for a standalone node creates it on first start.
pub(super) fn load_or_create_keys(path: &Path, create: bool) -> Result<KeyRing, Error> {
    if create && !path.exists() {
        let ring = KeyRing::generate();
        ring.save(path)?;
        tracing::warn!(path = %path.display(), "created a master key file; back it up, \
            and move it off the data disk by setting node.master_key");
        return Ok(ring);
    }
    if !path.exists() {
        return Err(Error::Config {
            key: "node.master_key".into(),
            problem: format!(
                "{} does not exist; create it once with `tandem keygen --out FILE` and give \
                 every node of the cluster a copy of the same file",
                path.display()
            ),
        });
    }
    Ok(KeyRing::load(path)?)
}

pub(super) fn cluster_section(config: &Config) -> Result<&ClusterConfig, Error> {
    config.cluster.as_ref().ok_or_else(|| Error::Config {
        key: "cluster".into(),
        problem: "this command needs a [cluster] section in the config file".into(),
    })
}

impl ClusterNode {
    /// Opens this node's data directory and starts its replica (and, clustered, the
    /// internal listener) with tasks tracked by `tracker` until `stop`.
    pub async fn start(
        config: &Config,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<ClusterNode, Error> {
        let dir = &config.node.data_dir;
        let id = config.node.id;
        let standalone = config.cluster.is_none();
        if standalone {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                context: format!("creating node.data_dir {}", dir.display()),
                source,
            })?;
            if data_dir::open(dir, id, None).is_err() {
                // A new standalone node claims its directory; anything else is refused
                // by `open` below with the reason.
                let _ = data_dir::claim(dir, &Identity::new_cluster(id));
            }
        }
        let ca = match &config.cluster {
            Some(c) => Some(c.ca_fingerprint()?),
            None => None,
        };
        let identity = data_dir::open(dir, id, ca.as_deref())?;
        let key_path = config.node.master_key_path();
        let keys = load_or_create_keys(&key_path, standalone)?;
        let settings = config.raft_settings();
        let raft_dir = data_dir::raft_dir(dir);

        let keys = Arc::new(RwLock::new(keys));
        let agent_hook = AgentHook::default();
        let agent_topics: Arc<RwLock<HashMap<&'static str, AgentAnswer>>> = Arc::default();
        {
            let ring = keys.clone();
            let held: AgentAnswer = Arc::new(move |_: &str| {
                let ids = ring.read().expect("key ring lock").ids();
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            });
            agent_topics
                .write()
                .expect("agent topics")
                .insert(KEYS_QUESTION, held);
        }
        {
            let topics = agent_topics.clone();
            let _ = agent_hook.set(Arc::new(move |q: &str| {
                let topic = q.split(' ').next().unwrap_or_default();
                let answer = topics.read().ok().and_then(|t| t.get(topic).cloned());
                match answer {
                    Some(answer) => answer(q),
                    None => "unknown question".into(),
                }
            }));
        }
        let (replica, network) = match &config.cluster {
            None => {
                let router = LocalRouter::new();
                let replica = Replica::start(id, &raft_dir, &settings, router.network(id)).await?;
                if !replica.is_initialized().await? {
                    let me = NodeInfo {
                        raft_addr: STANDALONE_ADDR.into(),
                    };
                    replica.initialize([(id, me)].into()).await?;
                }
                (replica, None)
            }
            Some(c) => {
                let tls = tandem_raft_store::tls::ClusterTls::load(
                    &c.ca_certificate,
                    &c.certificate,
                    &c.private_key,
                )?;
                check_certificate_id(&tls, id, &c.certificate)?;
                let listener = tokio::net::TcpListener::bind(c.listen)
                    .await
                    .map_err(|source| Error::Bind {
                        transport: "cluster",
                        addr: c.listen,
                        source,
                    })?;
                let network = HttpNetwork::new(&tls)?;
                let forwarder: Arc<dyn Forwarder> = Arc::new(network.clone());
                let replica = Replica::start_with_forwarding(
                    id,
                    &raft_dir,
                    &settings,
                    network.clone(),
                    Some(forwarder),
                )
                .await?;
                // A removed node's certificate stops working on this node's link.
                tls.revoke_removed(&replica);
                let (key_file, ring) = (key_path.clone(), keys.clone());
                let context = ServeContext {
                    agent: agent_hook.clone(),
                    network: network.clone(),
                    join_members: identity.join_members.clone(),
                    cluster_id: identity.cluster_id.clone(),
                    features: supported_features(),
                    // Reloads the key file, so the answer is the keys this node now uses.
                    key_ids: Arc::new(move || {
                        let fresh = KeyRing::load(&key_file)?;
                        let ids = fresh.ids();
                        *ring.write().expect("key ring lock") = fresh;
                        Ok(ids)
                    }),
                };
                let served = replica.clone();
                let stop = stop.clone();
                tracker.spawn(async move {
                    http_network::serve(listener, &tls, served, context, stop.cancelled_owned())
                        .await
                });
                (replica, Some(network))
            }
        };
        let c = config.cluster.clone().unwrap_or_default();
        let node = ClusterNode {
            replica,
            identity,
            role: config.node.role,
            keys,
            key_path,
            network,
            quorum_timeout: Duration::from_millis(c.quorum_timeout_ms),
            max_apply_lag: c.max_apply_lag,
            agent_topics,
        };
        if let Some(c) = &config.cluster {
            let recorded = node.replica.members().into_iter().find(|m| m.id == id);
            if let Some(m) = recorded.filter(|m| m.raft_addr != c.advertise_addr()) {
                tracing::warn!(
                    recorded = %m.raft_addr,
                    configured = %c.advertise_addr(),
                    "the cluster knows this node by another address than cluster.advertise \
                     (or listen); other nodes will keep using the recorded one"
                );
            }
        }
        if config.node.min_free_disk_mib > 0 {
            tracker.spawn(disk::watch(
                node.replica.clone(),
                config.node.data_dir.clone(),
                config.node.min_free_disk_mib,
                stop.clone(),
            ));
        }
        tracker.spawn(node.clone().promote_learners(stop.clone()));
        tracker.spawn(node.clone().raise_features(stop.clone()));
        tracker.spawn(node.clone().register(config.clone(), stop));
        Ok(node)
    }

    /// Sets what answers other nodes' questions for this node's agents whose first word
    /// is one of `topics` (the agents call it when they start).
    pub fn answer_agent_questions(&self, topics: &[&'static str], answer: AgentAnswer) {
        if let Ok(mut t) = self.agent_topics.write() {
            for topic in topics {
                t.insert(topic, answer.clone());
            }
        }
    }

    /// Asks node `id`'s agents `question`; this node's own agents answer directly. `None`
    /// when the node is unknown, does not answer in time, or runs no agents.
    pub async fn ask_agent(&self, id: NodeId, question: &str) -> Option<String> {
        if id == self.identity.node_id {
            let topic = question.split(' ').next().unwrap_or_default();
            let answer = self.agent_topics.read().ok()?.get(topic).cloned()?;
            return Some(answer(question));
        }
        let network = self.network.as_ref()?;
        let member = self.replica.members().into_iter().find(|m| m.id == id)?;
        match network
            .cluster(
                &member.raft_addr,
                &ClusterRequest::Agent(question.to_owned()),
                PEER_QUESTION_TIMEOUT,
            )
            .await
        {
            Ok((_, ClusterReply::Agent(answer))) => Some(answer),
            _ => None,
        }
    }

    /// Whether this node is in its own latest membership configuration and not retired.
    pub fn is_member(&self) -> bool {
        let id = self.identity.node_id;
        self.replica.members().iter().any(|m| m.id == id)
            && !self.replica.reader().is_retired(id).unwrap_or(false)
    }

    /// How recently a quorum must have answered for this node to count as healthy.
    pub fn quorum_timeout(&self) -> Duration {
        self.quorum_timeout
    }

    pub fn is_standalone(&self) -> bool {
        self.network.is_none()
    }

    /// The key ring as of the last (re)load.
    pub fn keys(&self) -> KeyRing {
        self.keys.read().expect("key ring lock").clone()
    }

    /// For a SIP answer this replica's lag could explain: waits, for up to
    /// [`CATCH_UP_WITHIN`], until it has applied what the leader had
    /// (`Replica::catch_up`). Not in degraded mode, where no leader answers. Whether it
    /// caught up, so that a second look can tell more than the first.
    pub async fn catch_up_for_sip(&self) -> bool {
        self.health().degraded.is_none() && self.replica.catch_up(CATCH_UP_WITHIN).await
    }

    pub fn health(&self) -> QuorumHealth {
        self.replica.quorum_health(self.quorum_timeout)
    }

    /// `Ok` when this node can serve writes and its replica is current; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.is_member() {
            return Err("not a member of the cluster: removed, or not joined yet".into());
        }
        if let Some(reason) = self.replica.fatal() {
            return Err(format!("Raft stopped (restart the node): {reason}"));
        }
        if let Some(reason) = self.replica.writes_blocked() {
            return Err(reason);
        }
        if let Some(reason) = self.health().degraded {
            return Err(format!("degraded: {reason}"));
        }
        let lag = self.replica.apply_lag();
        if lag > self.max_apply_lag {
            return Err(format!(
                "catching up: {lag} committed entries not applied yet"
            ));
        }
        Ok(())
    }

    /// The leader makes learners that have caught up voters. Every member of a Tandem
    /// cluster votes; a learner is a node part-way through joining.
    async fn promote_learners(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PROMOTE_EVERY) => {}
            }
            let promoted = tokio::select! {
                _ = stop.cancelled() => return,
                p = self.replica.promote_caught_up_learners() => p,
            };
            match promoted {
                Ok(ids) if !ids.is_empty() => {
                    tracing::info!(?ids, "caught-up learners are voters now")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "promoting learners failed; will retry"),
            }
        }
    }

    /// On the leader: raises the cluster feature version to the highest one every member
    /// supports, once they all say so (raft-store/DESIGN.md, "Versioned commands and
    /// rolling upgrades"). A member that does not answer (down, or a Tandem from before
    /// this question existed) holds the version where it is.
    async fn raise_features(self, stop: CancellationToken) {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            // Every second while the cluster is behind this binary (a new cluster reaches
            // its first members' version within a second of its first election), every
            // FEATURES_EVERY once it has caught up.
            let behind =
                self.replica.reader().feature_version().unwrap_or(0) < supported_features();
            wait = if behind {
                Duration::from_secs(1)
            } else {
                FEATURES_EVERY
            };
            if !self.replica.is_leader() {
                continue;
            }
            let Some(supported) = self.features_of_every_member().await else {
                continue;
            };
            let current = self.replica.reader().feature_version().unwrap_or(0);
            if supported <= current {
                continue;
            }
            let raised = self
                .replica
                .propose(Command::SetFeatureVersion { version: supported })
                .await;
            match raised {
                Ok(_) => tracing::info!(
                    from = current,
                    to = supported,
                    "every member supports a newer feature version: the cluster's is raised"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "raising the feature version failed; will retry")
                }
            }
        }
    }

    /// The highest feature version every member supports, or `None` if one did not say.
    async fn features_of_every_member(&self) -> Option<u32> {
        let mut lowest = supported_features();
        for member in self.replica.members() {
            if member.id == self.identity.node_id {
                continue;
            }
            let network = self.network.as_ref()?;
            let answer = network
                .cluster(
                    &member.raft_addr,
                    &ClusterRequest::Features,
                    PEER_QUESTION_TIMEOUT,
                )
                .await;
            match answer {
                Ok((_, ClusterReply::Features(v))) => lowest = lowest.min(v),
                _ => return None,
            }
        }
        Some(lowest)
    }

    /// Keeps this node's entry in the node registry current (addresses, role, version),
    /// once a leader is known. Warns when this node has been removed from the cluster.
    async fn register(self, config: Config, stop: CancellationToken) {
        let record = NodeRecord {
            id: config.node.id,
            sip_addrs: match config.node.role {
                Role::Full => config
                    .sip
                    .udp
                    .iter()
                    .map(|a| format!("udp:{a}"))
                    .chain(config.sip.tcp.iter().map(|a| format!("tcp:{a}")))
                    .chain(config.sip.tls.iter().map(|a| format!("tls:{a}")))
                    .collect(),
                Role::Witness => Vec::new(),
            },
            raft_addr: config
                .cluster
                .as_ref()
                .map(|c| c.advertise_addr())
                .unwrap_or_else(|| STANDALONE_ADDR.into()),
            role: config.node.role,
            software_version: crate::version().into(),
            draining: false,
        };
        loop {
            let current = self.replica.reader().node(record.id).ok().flatten();
            // The drain flag belongs to `tandem node drain`, not to this task.
            let wanted = NodeRecord {
                draining: current.as_ref().is_some_and(|c| c.draining),
                ..record.clone()
            };
            let is_member = self.replica.members().iter().any(|m| m.id == record.id);
            if self.replica.reader().is_retired(record.id).unwrap_or(false) {
                tracing::error!(
                    node = record.id,
                    "this node was removed from the cluster; stop it and wipe its data dir"
                );
                return;
            }
            if current.as_ref() == Some(&wanted) {
                // Registered; look again later in case someone else changed it.
            } else if is_member && self.health().degraded.is_none() {
                let put = tokio::select! {
                    _ = stop.cancelled() => return,
                    put = self.replica.propose(Command::PutNode(wanted)) => put,
                };
                match put {
                    Ok(CommandResult::Done) => {
                        tracing::info!(node = record.id, "registered in the node registry")
                    }
                    Ok(other) => tracing::warn!(?other, "node registry refused this node"),
                    Err(e) => tracing::debug!(error = %e, "node registry update failed; retrying"),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// A membership request, run on the leader wherever it is.
    pub async fn cluster_request(&self, request: ClusterRequest) -> Result<ClusterReply, Error> {
        if self.is_standalone() {
            if let ClusterRequest::Join { .. }
            | ClusterRequest::JoinWithToken { .. }
            | ClusterRequest::Remove { .. } = request
            {
                return Err(Error::Config {
                    key: "cluster".into(),
                    problem: "this node is standalone; membership needs a [cluster] section".into(),
                });
            }
        }
        Ok(self.replica.cluster_request(request).await?)
    }

    pub async fn status(&self) -> ClusterStatus {
        let m = self.replica.metrics();
        let health = self.health();
        let registry = self.replica.reader().nodes().unwrap_or_default();
        let (view, replication_note): (Option<ReplicationView>, Option<String>) =
            match self.replica.replication_view() {
                Ok(v) => (Some(v), None),
                Err(_) => match tokio::time::timeout(
                    PEER_QUESTION_TIMEOUT,
                    self.replica.cluster_request(ClusterRequest::Replication),
                )
                .await
                {
                    Ok(Ok(ClusterReply::Replication(v))) => (Some(v), None),
                    Ok(Ok(other)) => (None, Some(format!("unexpected answer {other:?}"))),
                    Ok(Err(e)) => (None, Some(format!("the leader did not answer: {e}"))),
                    Err(_) => (None, Some("the leader did not answer in time".into())),
                },
            };
        let members = self
            .replica
            .members()
            .into_iter()
            .map(|member| {
                let entry = registry.iter().find(|n| n.id == member.id);
                let matched = view
                    .as_ref()
                    .and_then(|v| v.matched.get(&member.id).copied().flatten());
                MemberStatus {
                    lag: view
                        .as_ref()
                        .map(|v| v.last_log_index.saturating_sub(matched.unwrap_or(0))),
                    matched_index: matched,
                    role: entry.map(|n| n.role.as_str()),
                    software_version: entry.map(|n| n.software_version.clone()),
                    id: member.id,
                    raft_addr: member.raft_addr,
                    voter: member.voter,
                }
            })
            .collect();
        ClusterStatus {
            cluster_id: self.identity.cluster_id.clone(),
            node_id: self.identity.node_id,
            role: self.role.as_str(),
            standalone: self.is_standalone(),
            state: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            feature_version: self.replica.reader().feature_version().unwrap_or(0),
            supported_features: supported_features(),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            apply_lag: self.replica.apply_lag(),
            quorum: if health.degraded.is_none() {
                "ok"
            } else {
                "degraded"
            },
            degraded_reason: health.degraded,
            members,
            replication_note,
        }
    }

    /// Key rotation, step two: reloads the key file, checks that every member's key file
    /// holds the current key, re-seals every sensitive field under it, then asks every
    /// member to drop its history through the re-seal (raft-store/DESIGN.md, "Rotating
    /// keys leaves nothing behind"), so no value sealed under an older key stays on any
    /// disk. Running it again re-seals nothing and asks the members again, which is how a
    /// member that was down the first time is brought in line.
    pub async fn reseal(&self) -> Result<Rotation, Error> {
        let ring = KeyRing::load(&self.key_path)?;
        let current = ring.current_id();
        if let Some(network) = &self.network {
            for member in self.replica.members() {
                if member.id == self.identity.node_id {
                    continue;
                }
                let answer = network
                    .cluster(
                        &member.raft_addr,
                        &ClusterRequest::KeyIds,
                        PEER_QUESTION_TIMEOUT,
                    )
                    .await;
                match answer {
                    Ok((_, ClusterReply::KeyIds(ids))) if ids.contains(&current) => {}
                    Ok((_, ClusterReply::KeyIds(_))) => {
                        return Err(Error::Rotation(format!(
                            "node {} does not have key {current} in its key file yet; copy \
                             this node's key file to every node, then run this again",
                            member.id
                        )))
                    }
                    Ok((_, other)) => {
                        return Err(Error::Rotation(format!(
                            "node {} gave an unexpected answer: {other:?}",
                            member.id
                        )))
                    }
                    Err(e) => {
                        return Err(Error::Rotation(format!(
                            "cannot confirm that node {} has key {current}: {e}",
                            member.id
                        )))
                    }
                }
            }
        }
        *self.keys.write().expect("key ring lock") = ring.clone();
        let resealed = self.replica.reseal_all(&ring).await?;
        // The leader's last index covers every re-seal: each was applied there before
        // its proposal returned.
        let upto = match self
            .replica
            .cluster_request(ClusterRequest::Replication)
            .await?
        {
            ClusterReply::Replication(view) => view.last_log_index,
            other => {
                return Err(Error::Rotation(format!(
                    "the leader gave an unexpected answer: {other:?}"
                )))
            }
        };
        let mut members = Vec::new();
        for member in self.replica.members() {
            let outcome = if member.id == self.identity.node_id {
                self.replica
                    .drop_history(upto, DROP_HISTORY_WITHIN)
                    .await
                    .map_err(|e| e.to_string())
            } else if let Some(network) = &self.network {
                let request = ClusterRequest::DropHistory { upto };
                match network
                    .cluster(
                        &member.raft_addr,
                        &request,
                        DROP_HISTORY_WITHIN + DROP_HISTORY_SLACK,
                    )
                    .await
                {
                    Ok((_, ClusterReply::HistoryDropped(dropped))) => Ok(dropped),
                    Ok((_, other)) => Err(format!("unexpected answer: {other:?}")),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                Err("no cluster network to reach it".to_owned())
            };
            match &outcome {
                Ok(d) => tracing::info!(
                    node = member.id,
                    snapshot_index = d.snapshot_index,
                    purged_index = d.purged_index,
                    "member dropped its history after the key rotation"
                ),
                Err(e) => tracing::warn!(
                    node = member.id,
                    error = %e,
                    "member could not drop its history after the key rotation"
                ),
            }
            members.push(MemberHistory {
                node: member.id,
                dropped: outcome.as_ref().ok().cloned(),
                error: outcome.err(),
            });
        }
        Ok(Rotation {
            key_id: current,
            accounts: resealed.accounts,
            providers: resealed.providers,
            upto,
            complete: members.iter().all(|m| m.error.is_none()),
            members,
        })
    }

    pub async fn shutdown(&self) {
        self.replica.shutdown().await;
    }
}

/// What `tandem keys reseal` did (`POST /v1/keys/reseal`).
#[derive(Clone, Debug, Serialize)]
pub struct Rotation {
    /// The key every sensitive field is now sealed with.
    pub key_id: u32,
    pub accounts: u64,
    pub providers: u64,
    /// The log index through which every member was asked to drop its history.
    pub upto: u64,
    /// Whether every member did: only then is nothing sealed under an older key on disk.
    pub complete: bool,
    pub members: Vec<MemberHistory>,
}

/// One member's answer to dropping its history after a rotation.
#[derive(Clone, Debug, Serialize)]
pub struct MemberHistory {
    pub node: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<DroppedHistory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What [`ClusterNode::write_check`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct WriteCheck {
    pub proposers: usize,
    pub command_bytes: usize,
    pub seconds: f64,
    pub writes: u64,
    pub writes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

impl ClusterNode {
    /// Measures the replicated write path the agents use, from inside this node:
    /// `proposers` concurrent writers each propose no-op commands of `command_bytes` (they
    /// go through the log, fsync and replication, and change no state) for `duration`.
    /// Operators use it to check a cluster's disks and links; `ops/bench` to measure Raft.
    pub async fn write_check(
        &self,
        proposers: usize,
        command_bytes: usize,
        duration: Duration,
    ) -> WriteCheck {
        // A Noop's encoding adds a kind, a version and two length prefixes to its payload.
        let payload = vec![0x5a; command_bytes.saturating_sub(6)];
        let start = tokio::time::Instant::now();
        let end = start + duration;
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..proposers {
            let (replica, payload) = (self.replica.clone(), payload.clone());
            workers.spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                while tokio::time::Instant::now() < end {
                    let t = tokio::time::Instant::now();
                    let command = Command::Noop {
                        payload: payload.clone(),
                    };
                    match replica.propose(command).await {
                        Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            });
        }
        let (mut all, mut errors) = (Vec::new(), 0);
        while let Some(done) = workers.join_next().await {
            if let Ok((latencies, e)) = done {
                all.extend(latencies);
                errors += e;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len().max(1) - 1) as f64 * p).round() as usize)
                .map_or(0.0, |&us| us as f64 / 1000.0)
        };
        WriteCheck {
            proposers,
            command_bytes,
            seconds,
            writes: all.len() as u64,
            writes_per_s: all.len() as f64 / seconds,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            errors,
        }
    }
}

/// Refuses to run on a certificate issued for another node id, or for none: peers accept
/// a certificate only as the node it names.
pub(crate) fn check_certificate_id(
    tls: &tandem_raft_store::tls::ClusterTls,
    id: u64,
    path: &std::path::Path,
) -> Result<(), Error> {
    match tls.node_id() {
        Some(named) if named == id => Ok(()),
        named => Err(Error::Config {
            key: "cluster.certificate".into(),
            problem: format!(
                "{} is {}, and this node is node {id}; issue this node one with `tandem cert node \
                 --id {id}`",
                path.display(),
                named.map_or("a certificate without a node id".into(), |n| format!(
                    "node {n}'s certificate"
                )),
            ),
        }),
    }
}
