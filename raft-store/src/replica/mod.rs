//! One node's replica: the openraft instance over this node's RocksDB, and the write path
//! the agents use. This is the facade the rest of Tandem sees (raft-store/DESIGN.md,
//! "openraft behind one facade").
//!
//! `propose` batches: proposals waiting at the same moment go into one log entry, and a
//! few batches may be in flight at once, so one fsync and one round of replication serve
//! many writers. Reads go to the local [`StateReader`] and never wait for the network.

mod barrier;
pub mod history;
pub mod membership;
mod queue;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, Raft, RaftMetrics, RaftNetworkFactory, ServerState, SnapshotPolicy};
use tokio::sync::{oneshot, Semaphore};

use crate::command::{Command, CommandResult, EncodedCommand};
use crate::log_store::LogStats;
use crate::state::StateReader;
use crate::types::{NodeId, NodeInfo, Request, Response, TypeConfig};
use crate::Error;
use membership::{ClusterReply, ClusterRequest};
use queue::Queue;

/// Raft timing and log-retention settings.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log after a snapshot, for followers that lag a little.
    pub keep_after_snapshot: u64,
    /// How long `propose` waits for its command to be applied.
    pub propose_timeout: Duration,
    /// Most commands in one log entry.
    pub max_batch: usize,
    /// Batches replicating at once.
    pub max_in_flight: usize,
    /// The longest a batch waits for more proposals when they arrive fast enough to fill
    /// it ([`Pace`]); zero sends every batch as soon as a slot is free.
    pub batch_linger: Duration,
    /// A witness's: it stands for election only once this long has passed without an
    /// AppendEntries from a leader (`None`: whenever its election timeout says).
    pub stand_after: Option<Duration>,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            snapshot_every: 50_000,
            keep_after_snapshot: 1_000,
            propose_timeout: Duration::from_secs(5),
            max_batch: 512,
            // Two entries in flight keep the log busy while the next batch gathers. At
            // 4,000 registrations/s, eight in flight took 3.8× the fsyncs of one for the
            // same throughput and latency (ops/bench/sip.sh): smaller batches, no gain.
            max_in_flight: 2,
            batch_linger: Duration::from_millis(5),
            stand_after: None,
        }
    }
}

/// How long one snapshot chunk may take to send (ms).
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 10_000;

impl RaftSettings {
    /// The witness votes but serves no SIP. It keeps a full node's timeouts, so it gives
    /// its vote as soon as a full node would (openraft refuses votes until the longest
    /// election timeout has passed since the leader was last heard), but stands itself
    /// only after three times that without a leader's append: a full node nearly always
    /// wins first, and the witness still stands when only it can win (raft-store/DESIGN.md,
    /// "Pair plus witness").
    pub fn for_witness(mut self) -> Self {
        self.stand_after = Some(self.election_timeout_max * 3);
        self
    }

    fn openraft_config(&self) -> Result<Config, Error> {
        let config = Config {
            cluster_name: "tandem".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            // openraft's default (200 ms per snapshot chunk of up to 3 MiB) cannot be met
            // across two sites, and a chunk that times out starts the snapshot over: a
            // follower that needs one would never catch up. A snapshot is rare, and a
            // dead peer costs one slow try.
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| Error::Raft(format!("invalid Raft settings: {e}")))
    }
}

/// Carries a follower's proposals to the leader (the Raft network's `/raft/propose`).
pub trait Forwarder: Send + Sync + 'static {
    /// The leader's response and the index of the log entry that carried the batch.
    fn forward<'a>(
        &'a self,
        leader: &'a NodeInfo,
        request: &'a Request,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(Response, u64), Error>>;

    /// Carries a membership request to the leader.
    fn cluster<'a>(
        &'a self,
        leader: &'a NodeInfo,
        request: &'a ClusterRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ClusterReply, Error>>;
}

/// The future a [`Forwarder`] returns.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Whether this node can reach a quorum: the signal behind degraded mode (node/DESIGN.md,
/// "Degraded mode") and `/ready`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumHealth {
    pub leader: Option<NodeId>,
    /// `None` when a quorum is reachable; otherwise why not, in words for operators.
    pub degraded: Option<String>,
}

impl QuorumHealth {
    /// Judges a metrics snapshot. A leader is healthy while a quorum acknowledged it within
    /// `max_ack_age`; a follower or learner while it knows a leader (a follower that stops
    /// hearing from its leader starts an election and forgets it).
    pub fn from_metrics(m: &RaftMetrics<NodeId, NodeInfo>, max_ack_age: Duration) -> QuorumHealth {
        let degraded = if m
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_none()
        {
            Some("not part of a cluster yet".to_owned())
        } else {
            match m.state {
                ServerState::Leader => match m.millis_since_quorum_ack {
                    Some(ms) if ms <= max_ack_age.as_millis() as u64 => None,
                    Some(ms) => Some(format!(
                        "leader without a quorum acknowledgement for {ms} ms"
                    )),
                    None => Some("leader without any quorum acknowledgement yet".to_owned()),
                },
                ServerState::Candidate => {
                    Some(format!("no leader: electing (term {})", m.current_term))
                }
                ServerState::Shutdown => Some("Raft has shut down".to_owned()),
                ServerState::Follower | ServerState::Learner => match m.current_leader {
                    Some(_) => None,
                    None => Some("no leader known".to_owned()),
                },
            }
        };
        QuorumHealth {
            leader: m.current_leader,
            degraded,
        }
    }
}

/// What a key rotation re-sealed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResealReport {
    pub accounts: u64,
    pub providers: u64,
}

/// Write-path figures for metrics: how many proposals, in how many log entries, and a
/// histogram of commands per entry (upper bounds 1, 2, 4 … 512, then more).
#[derive(Debug, Default)]
pub struct ProposeStats {
    pub proposals: AtomicU64,
    pub batches: AtomicU64,
    pub failed: AtomicU64,
    pub batch_size_buckets: [AtomicU64; BATCH_BUCKETS],
}

/// Buckets of [`ProposeStats::batch_size_buckets`].
pub const BATCH_BUCKETS: usize = 11;

impl ProposeStats {
    /// The upper bound of bucket `i`; the last bucket has none.
    pub fn bucket_bound(i: usize) -> Option<u64> {
        (i + 1 < BATCH_BUCKETS).then(|| 1u64 << i)
    }

    fn record_batch(&self, size: usize) {
        self.proposals.fetch_add(size as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let bucket = (0..BATCH_BUCKETS)
            .find(|&i| Self::bucket_bound(i).is_none_or(|b| size as u64 <= b))
            .unwrap_or(BATCH_BUCKETS - 1);
        self.batch_size_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

struct Proposal {
    command: EncodedCommand,
    reply: oneshot::Sender<Result<CommandResult, Error>>,
}

/// The replicas' way into the batcher's queue: when the last replica handle goes, the
/// queue closes and the batcher ends.
struct Proposer(Arc<Queue<Proposal>>);

impl Drop for Proposer {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// This node's replica of the cluster state.
#[derive(Clone)]
pub struct Replica {
    id: NodeId,
    raft: Raft<TypeConfig>,
    reader: StateReader,
    proposals: Arc<Proposer>,
    log_stats: Arc<LogStats>,
    propose_stats: Arc<ProposeStats>,
    propose_timeout: Duration,
    forwarder: Option<Arc<dyn Forwarder>>,
    /// The leader's commit index as of its latest AppendEntries, for the apply lag.
    leader_commit: Arc<AtomicU64>,
    db: Arc<rocksdb::DB>,
    /// Why this node refuses writes of its own, if it does ([`Replica::block_writes`]).
    blocked: Arc<std::sync::RwLock<Option<String>>>,
    /// The questions [`Replica::catch_up`] asks the leader.
    barrier: Arc<barrier::Barrier>,
    /// When a leader's AppendEntries was last taken: ms since `started`.
    leader_heard_ms: Arc<AtomicU64>,
    started: tokio::time::Instant,
}

/// A witness's elections (`RaftSettings::stand_after`): off while a leader's appends
/// arrive, on once none has for `after`, and on while it leads. Not openraft's
/// `current_leader`: that stays on a dead leader while this node refuses a candidate whose
/// log is shorter, the very case in which only this node can win.
async fn stand_when_leaderless(
    raft: Raft<TypeConfig>,
    heard_ms: Arc<AtomicU64>,
    started: tokio::time::Instant,
    after: Duration,
    every: Duration,
) {
    let mut standing = false;
    loop {
        tokio::time::sleep(every).await;
        let (running, leading) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.running_state.is_ok(), m.state == ServerState::Leader)
        };
        if !running {
            return;
        }
        let heard = Duration::from_millis(heard_ms.load(Ordering::Relaxed));
        let quiet = started.elapsed().saturating_sub(heard);
        let stand = leading || quiet >= after;
        if stand != standing {
            if stand && !leading {
                tracing::info!(
                    quiet_ms = quiet.as_millis() as u64,
                    "no leader's append for a while: this witness stands for election too"
                );
            }
            raft.runtime_config().elect(stand);
            standing = stand;
        }
    }
}

pub(crate) fn map_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Error::Membership(c.to_string())
        }
        RaftError::Fatal(f) => Error::Raft(f.to_string()),
    }
}

impl Replica {
    /// Opens the store under `dir` and starts Raft. The node is not part of a cluster until
    /// [`Replica::initialize`] runs on one node, or a leader adds it.
    pub async fn start<N>(
        id: NodeId,
        dir: &Path,
        settings: &RaftSettings,
        network: N,
    ) -> Result<Replica, Error>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        Self::start_with_forwarding(id, dir, settings, network, None).await
    }

    /// Like [`Replica::start`]; proposals made on a follower go to the leader through
    /// `forwarder` instead of failing with [`Error::NotLeader`].
    pub async fn start_with_forwarding<N>(
        id: NodeId,
        dir: &Path,
        settings: &RaftSettings,
        network: N,
        forwarder: Option<Arc<dyn Forwarder>>,
    ) -> Result<Replica, Error>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        let (log_store, state_machine) = crate::open(dir)?;
        let db = log_store.db_handle();
        let reader = state_machine.reader();
        let log_stats = log_store.stats_handle();
        let config = Arc::new(settings.openraft_config()?);
        let raft = Raft::new(id, config, network, log_store, state_machine)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        let queue = Arc::new(Queue::new(settings.max_batch * 4));
        let propose_stats = Arc::new(ProposeStats::default());
        let batcher = Batcher {
            stats: propose_stats.clone(),
            id,
            raft: raft.clone(),
            forwarder: forwarder.clone(),
            max_batch: settings.max_batch,
            timeout: settings.propose_timeout,
            linger: settings.batch_linger,
        };
        tokio::spawn(batcher.run(queue.clone(), settings.max_in_flight));
        let (leader_heard_ms, started) = (Arc::new(AtomicU64::new(0)), tokio::time::Instant::now());
        if let Some(after) = settings.stand_after {
            raft.runtime_config().elect(false);
            tokio::spawn(stand_when_leaderless(
                raft.clone(),
                leader_heard_ms.clone(),
                started,
                after,
                settings.heartbeat,
            ));
        }
        Ok(Replica {
            id,
            raft,
            reader,
            proposals: Arc::new(Proposer(queue)),
            log_stats,
            propose_stats,
            propose_timeout: settings.propose_timeout,
            forwarder,
            leader_commit: Arc::new(AtomicU64::new(0)),
            db,
            blocked: Arc::default(),
            barrier: Arc::default(),
            leader_heard_ms,
            started,
        })
    }

    pub(crate) fn forwarder(&self) -> Option<&Arc<dyn Forwarder>> {
        self.forwarder.as_ref()
    }

    pub fn propose_timeout(&self) -> Duration {
        self.propose_timeout
    }

    /// Records that the current leader's AppendEntries was just taken.
    pub fn note_leader_heard(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.leader_heard_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Records the commit index a leader sent with AppendEntries.
    pub fn note_leader_commit(&self, index: u64) {
        self.leader_commit.fetch_max(index, Ordering::Relaxed);
    }

    /// How many committed entries this node has yet to apply: zero on the leader; on a
    /// follower, measured against the leader's commit index from its latest AppendEntries.
    pub fn apply_lag(&self) -> u64 {
        let m = self.metrics();
        if m.state == ServerState::Leader {
            return 0;
        }
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        self.leader_commit
            .load(Ordering::Relaxed)
            .saturating_sub(applied)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The openraft handle, for the RPC server side of the network.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    pub fn log_stats(&self) -> &LogStats {
        &self.log_stats
    }

    pub fn propose_stats(&self) -> &ProposeStats {
        &self.propose_stats
    }

    /// What this node's RocksDB holds in memory (log, state and their metadata).
    pub fn store_memory(&self) -> crate::store::StoreMemory {
        let families: Vec<_> = crate::store::ALL_CFS
            .into_iter()
            .filter_map(|name| self.db.cf_handle(name))
            .collect();
        crate::store::StoreMemory::of(&self.db, &families)
    }

    pub fn metrics(&self) -> RaftMetrics<NodeId, NodeInfo> {
        self.raft.metrics().borrow().clone()
    }

    /// Whether `id` is in this node's latest membership (voter or learner), without
    /// copying the metrics: asked for every request on the cluster link.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    pub fn quorum_health(&self, max_ack_age: Duration) -> QuorumHealth {
        QuorumHealth::from_metrics(&self.raft.metrics().borrow(), max_ack_age)
    }

    /// Whether this node's state already belongs to a cluster (so it must not be
    /// initialised again).
    pub async fn is_initialized(&self) -> Result<bool, Error> {
        self.raft
            .is_initialized()
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// Makes this node a one-member cluster (`tandem cluster init`), or the given members.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), Error> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// Adds a learner and waits until it has caught up.
    pub async fn add_learner(&self, id: NodeId, node: NodeInfo) -> Result<(), Error> {
        self.raft
            .add_learner(id, node, true)
            .await
            .map(|_| ())
            .map_err(map_write_error)
    }

    /// Sets the voters; nodes dropped from the set leave the cluster.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), Error> {
        self.raft
            .change_membership(voters, false)
            .await
            .map(|_| ())
            .map_err(map_write_error)
    }

    /// Replicates one command and returns its result once it is applied locally.
    pub async fn propose(&self, command: Command) -> Result<CommandResult, Error> {
        self.propose_all(vec![command])
            .await
            .pop()
            .unwrap_or_else(|| Err(Error::Raft("the replica has stopped".into())))
    }

    /// From now on, refuses every write proposed on this node with
    /// [`Error::WritesBlocked`] and `reason`; `None` takes them again. Replication into
    /// this node goes on: only what would start here is refused, so its callers try
    /// another node instead of writing to a disk that cannot hold it.
    pub fn block_writes(&self, reason: Option<String>) {
        *self.blocked.write().expect("write block lock") = reason;
    }

    /// Why this node refuses writes of its own, if it does.
    pub fn writes_blocked(&self) -> Option<String> {
        self.blocked.read().expect("write block lock").clone()
    }

    /// Why Raft stopped on this node, if it did (a storage fault, say): the node can
    /// neither apply nor vote until it is restarted.
    pub fn fatal(&self) -> Option<String> {
        match &self.raft.metrics().borrow().running_state {
            Ok(()) => None,
            Err(f) => Some(f.to_string()),
        }
    }

    /// Replicates several commands, queued back to back so they usually share a log
    /// entry, and returns each one's result once applied. Commands that must commit in
    /// order go through separate calls: two entries may replicate side by side.
    pub async fn propose_all(&self, commands: Vec<Command>) -> Vec<Result<CommandResult, Error>> {
        let mut waiting = Vec::with_capacity(commands.len());
        // Read only for a command that needs more than the first release: this is the
        // write path of every registration.
        let mut cluster = None;
        if let Some(reason) = self.writes_blocked() {
            return commands
                .iter()
                .map(|_| Err(Error::WritesBlocked(reason.clone())))
                .collect();
        }
        for command in commands {
            // The feature gate: a kind newer than the cluster's feature version would stop
            // every member that cannot apply it, so it is refused here, before the log.
            let needs = command.since();
            if needs > 0 {
                let cluster =
                    *cluster.get_or_insert_with(|| self.reader().feature_version().unwrap_or(0));
                if needs > cluster {
                    waiting.push(Err(Error::FeatureNotEnabled {
                        kind: command.encode().kind,
                        needs,
                        cluster,
                    }));
                    continue;
                }
            }
            let (reply, rx) = oneshot::channel();
            let proposal = Proposal {
                command: command.encode(),
                reply,
            };
            waiting.push(Ok(match self.proposals.0.send(proposal).await {
                Ok(()) => Some(rx),
                Err(_) => None,
            }));
        }
        let deadline = tokio::time::Instant::now() + self.propose_timeout;
        let mut results = Vec::with_capacity(waiting.len());
        for rx in waiting {
            results.push(match rx {
                Err(refused) => Err(refused),
                Ok(None) => Err(Error::Raft("the replica has stopped".into())),
                Ok(Some(rx)) => match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(Error::Raft("the replica has stopped".into())),
                    Err(_) => Err(Error::Timeout(self.propose_timeout)),
                },
            });
        }
        results
    }

    /// Flushes memtables to SST files and syncs the WAL, so everything is in files.
    pub fn flush_to_disk(&self) -> Result<(), Error> {
        self.db.flush_wal(true).map_err(Error::db)?;
        for cf in crate::store::ALL_CFS {
            let handle = self
                .db
                .cf_handle(cf)
                .expect("column family created at open");
            self.db.flush_cf(handle).map_err(Error::db)?;
        }
        Ok(())
    }

    /// Key rotation: re-seals every sensitive field not yet under the key ring's current
    /// key, through Raft, one compare-and-set command per record. A record changed by
    /// someone else in the meantime is read again and retried.
    pub async fn reseal_all(&self, keys: &crate::crypto::KeyRing) -> Result<ResealReport, Error> {
        use crate::command::{account_record, ha1_field, provider_record, PROVIDER_PASSWORD_FIELD};
        let mut report = ResealReport::default();
        for _attempt in 0..3 {
            let mut conflicts = 0;
            for a in self.reader.accounts()? {
                let record = account_record(&a.user, &a.domain);
                let mut changed = false;
                let mut resealed = Vec::with_capacity(a.ha1.len());
                for (alg, sealed) in &a.ha1 {
                    match keys.reseal(sealed, &record, &ha1_field(alg))? {
                        Some(new) => {
                            changed = true;
                            resealed.push((alg.clone(), new));
                        }
                        None => resealed.push((alg.clone(), sealed.clone())),
                    }
                }
                if changed {
                    let cmd = Command::ResealAccount {
                        user: a.user,
                        domain: a.domain,
                        expected: a.ha1,
                        resealed,
                    };
                    match self.propose(cmd).await? {
                        CommandResult::Done => report.accounts += 1,
                        _ => conflicts += 1,
                    }
                }
            }
            for p in self.reader.providers()? {
                if let Some(new) = keys.reseal(
                    &p.password,
                    &provider_record(&p.id),
                    PROVIDER_PASSWORD_FIELD,
                )? {
                    let cmd = Command::ResealProvider {
                        id: p.id,
                        expected: p.password,
                        resealed: new,
                    };
                    match self.propose(cmd).await? {
                        CommandResult::Done => report.providers += 1,
                        _ => conflicts += 1,
                    }
                }
            }
            for p in self.reader.provider_accounts()? {
                let id = p.id();
                if let Some(new) =
                    keys.reseal(&p.password, &provider_record(&id), PROVIDER_PASSWORD_FIELD)?
                {
                    let cmd = Command::ResealProviderAccount {
                        id,
                        expected: p.password,
                        resealed: new,
                    };
                    match self.propose(cmd).await? {
                        CommandResult::Done => report.providers += 1,
                        _ => conflicts += 1,
                    }
                }
            }
            if conflicts == 0 {
                return Ok(report);
            }
        }
        Err(Error::Raft(
            "records kept changing during key rotation; run it again".into(),
        ))
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Gathers whatever proposals are waiting into one log entry, keeping up to
/// `max_in_flight` entries replicating at once. On a follower that knows the leader, the
/// batch goes to the leader instead.
///
/// Each entry costs every member a log append, an fsync and an RPC, whatever it carries,
/// several times what one command in it costs (raft-store/DESIGN.md, "One RocksDB, group
/// commit"): at a few thousand writes a second, entries sent as soon as a slot frees
/// carry two or three commands each. So a batch lingers, up to `linger`, for the proposals the recent
/// rate says are coming ([`Pace`]), and no longer than it takes them to fill it. A lone
/// write on an idle cluster does not wait at all.
struct Batcher {
    stats: Arc<ProposeStats>,
    id: NodeId,
    raft: Raft<TypeConfig>,
    forwarder: Option<Arc<dyn Forwarder>>,
    max_batch: usize,
    timeout: Duration,
    linger: Duration,
}

/// Commands a lingering batch waits for: past this, a bigger batch saves little per
/// command (the entry's fixed cost is already spread thin) and the wait only adds latency.
const LINGER_TARGET: usize = 64;

/// The recent arrival rate of proposals, from counts over windows of [`PACE_WINDOW`].
#[derive(Debug)]
struct Pace {
    window_start: tokio::time::Instant,
    in_window: u32,
    /// Proposals per second over the last whole window.
    rate: f64,
}

/// Long enough to count a few proposals at a modest rate, short enough to see a storm
/// begin and end within a few batches.
const PACE_WINDOW: Duration = Duration::from_millis(50);

impl Pace {
    fn new(now: tokio::time::Instant) -> Pace {
        Pace {
            window_start: now,
            in_window: 0,
            rate: 0.0,
        }
    }

    fn arrived(&mut self, now: tokio::time::Instant, count: usize) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= PACE_WINDOW {
            // A window that ended long ago (the node was idle) says the rate is low.
            self.rate = f64::from(self.in_window) / elapsed.as_secs_f64();
            self.window_start = now;
            self.in_window = 0;
        }
        self.in_window = self.in_window.saturating_add(count as u32);
    }

    /// How long a batch of `have` commands should wait for more: the time the recent rate
    /// takes to bring it to [`LINGER_TARGET`], at most `max`, and nothing when fewer than
    /// two more would come within `max`.
    fn linger(&self, have: usize, max: Duration) -> Option<Duration> {
        let wanted = LINGER_TARGET.saturating_sub(have);
        if wanted == 0 || self.rate * max.as_secs_f64() < 2.0 {
            return None;
        }
        Some(max.min(Duration::from_secs_f64(wanted as f64 / self.rate)))
    }
}

impl Batcher {
    async fn run(self, queue: Arc<Queue<Proposal>>, max_in_flight: usize) {
        // However this ends (a panic too), proposers then get an error instead of waiting
        // for room that no batcher makes.
        struct CloseOnExit(Arc<Queue<Proposal>>);
        impl Drop for CloseOnExit {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _close = CloseOnExit(queue.clone());
        let this = Arc::new(self);
        let in_flight = Arc::new(Semaphore::new(max_in_flight));
        let mut pace = Pace::new(tokio::time::Instant::now());
        loop {
            // A slot first: while every slot is taken, proposals wait in the queue, within
            // its bound.
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let mut batch = Vec::new();
            let Some(taken) = queue.first(&mut batch, this.max_batch).await else {
                break;
            };
            pace.arrived(tokio::time::Instant::now(), taken);
            let max = this.max_batch.min(LINGER_TARGET);
            if let Some(linger) = pace.linger(batch.len(), this.linger) {
                let deadline = tokio::time::Instant::now() + linger;
                if batch.len() < max {
                    let room = this.max_batch - batch.len();
                    let more = max - batch.len();
                    let n = queue.linger(&mut batch, room, more, deadline).await;
                    pace.arrived(tokio::time::Instant::now(), n);
                }
            }
            let this = this.clone();
            tokio::spawn(async move {
                this.stats.record_batch(batch.len());
                let (commands, replies): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|p| (p.command, p.reply)).unzip();
                let outcome = this.write(Request { commands }).await;
                match outcome {
                    Ok(response) => {
                        for (reply, result) in replies.into_iter().zip(response.results) {
                            let _ = reply.send(Ok(result));
                        }
                    }
                    Err(error) => {
                        this.stats.failed.fetch_add(1, Ordering::Relaxed);
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
                drop(permit);
            });
        }
    }

    async fn write(&self, request: Request) -> Result<Response, Error> {
        if let Some(forwarder) = &self.forwarder {
            let leader = {
                let m = self.raft.metrics();
                let m = m.borrow();
                m.current_leader
                    .filter(|&l| l != self.id)
                    .and_then(|l| Some((l, m.membership_config.membership().get_node(&l)?.clone())))
            };
            if let Some((leader_id, leader)) = leader {
                // A leader that loses its place (cut off, say) keeps the forward waiting
                // until the timeout, though the cluster may have a new leader long before:
                // give up as soon as this node sees the leader change. The write's fate
                // is then unknown, as after a timeout, and the caller tries again.
                let mut metrics = self.raft.metrics();
                let changed = async move {
                    let seen = metrics
                        .wait_for(|m| m.current_leader != Some(leader_id))
                        .await;
                    seen.map_or(None, |m| m.current_leader)
                };
                let (response, index) = tokio::select! {
                    forwarded = forwarder.forward(&leader, &request, self.timeout) => forwarded?,
                    new_leader = changed => return Err(Error::NotLeader { leader: new_leader }),
                };
                // Read your writes: the caller reads this replica next (an account right
                // after its customer), so wait until it has applied the entry. The write
                // is committed either way; a replica that lags past the timeout only
                // delays that read.
                let applied = self
                    .raft
                    .wait(Some(self.timeout))
                    .applied_index_at_least(Some(index), "a forwarded write")
                    .await;
                if applied.is_err() {
                    tracing::warn!(
                        index,
                        "a forwarded write is committed but not yet applied here"
                    );
                }
                return Ok(response);
            }
        }
        self.raft
            .client_write(request)
            .await
            .map(|r| r.data)
            .map_err(map_write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(5);

    #[test]
    fn a_lone_write_on_an_idle_node_does_not_linger() {
        let start = tokio::time::Instant::now();
        let mut pace = Pace::new(start);
        pace.arrived(start + Duration::from_secs(3), 1);
        assert_eq!(pace.linger(1, MAX), None);
        // Nor does a trickle: ten a second brings fewer than two more within 5 ms.
        let mut t = start + Duration::from_secs(3);
        for _ in 0..50 {
            t += Duration::from_millis(100);
            pace.arrived(t, 1);
        }
        assert_eq!(pace.linger(1, MAX), None, "{pace:?}");
    }

    #[test]
    fn a_storm_lingers_for_what_fills_the_batch_and_no_longer_than_the_maximum() {
        let start = tokio::time::Instant::now();
        let mut pace = Pace::new(start);
        // 2,000 a second for 200 ms.
        let mut t = start;
        for _ in 0..400 {
            t += Duration::from_micros(500);
            pace.arrived(t, 1);
        }
        assert!((1_900.0..2_100.0).contains(&pace.rate), "{pace:?}");
        assert_eq!(pace.linger(1, MAX), Some(MAX));
        // 60 already there: four more come in about 2 ms.
        let short = pace.linger(60, MAX).expect("lingers");
        assert!(
            short > Duration::from_millis(1) && short < Duration::from_millis(3),
            "{short:?}"
        );
        assert_eq!(pace.linger(LINGER_TARGET, MAX), None);
        assert_eq!(pace.linger(1, Duration::ZERO), None);
        // Once the storm is over, the next write goes at once.
        pace.arrived(t + Duration::from_secs(1), 1);
        assert_eq!(pace.linger(1, MAX), None, "{pace:?}");
    }
}
