//! An in-process Raft network for tests and benchmarks: replicas in one process call each
//! other directly, through a router that injects faults. Links can be cut in either
//! direction (partitions, isolated nodes), delayed, or made to lose every n-th message, the
//! way TiKV's transport filters do. Production uses the mutual-TLS network instead.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Raft;

use crate::types::{NodeId, NodeInfo, TypeConfig};

#[derive(Default)]
struct Faults {
    /// Directed links that deliver nothing.
    cut: HashSet<(NodeId, NodeId)>,
    delay: Duration,
    /// Lose one message in this many (0: none).
    drop_one_in: u64,
}

/// Connects the replicas of one process.
#[derive(Default)]
pub struct LocalRouter {
    nodes: Mutex<HashMap<NodeId, Raft<TypeConfig>>>,
    faults: Mutex<Faults>,
    sent: AtomicU64,
}

impl LocalRouter {
    pub fn new() -> Arc<LocalRouter> {
        Arc::new(LocalRouter::default())
    }

    /// The network factory a replica with id `from` is started with.
    pub fn network(self: &Arc<Self>, from: NodeId) -> LocalNetwork {
        LocalNetwork {
            from,
            router: self.clone(),
        }
    }

    pub fn register(&self, id: NodeId, raft: Raft<TypeConfig>) {
        self.nodes.lock().expect("router lock").insert(id, raft);
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: NodeId, all: &[NodeId]) {
        let others: Vec<NodeId> = all.iter().copied().filter(|&o| o != id).collect();
        self.partition(&[id], &others);
    }

    /// Cuts every link between the two sides.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut f = self.faults.lock().expect("router lock");
        for &x in a {
            for &y in b {
                f.cut.insert((x, y));
                f.cut.insert((y, x));
            }
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.faults.lock().expect("router lock").delay = delay;
    }

    pub fn drop_one_in(&self, n: u64) {
        self.faults.lock().expect("router lock").drop_one_in = n;
    }

    /// Removes every fault.
    pub fn heal(&self) {
        *self.faults.lock().expect("router lock") = Faults::default();
    }

    /// Decides a message's fate: `Err` if it is lost, else the delay before delivery.
    fn route(
        &self,
        from: NodeId,
        to: NodeId,
    ) -> Result<(Raft<TypeConfig>, Duration), std::io::Error> {
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let f = self.faults.lock().expect("router lock");
        if f.cut.contains(&(from, to)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("link {from}->{to} is cut"),
            ));
        }
        if f.drop_one_in > 0 && n.is_multiple_of(f.drop_one_in) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("message {n} {from}->{to} lost"),
            ));
        }
        let delay = f.delay;
        drop(f);
        let raft = self.nodes.lock().expect("router lock").get(&to).cloned();
        raft.map(|r| (r, delay)).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("node {to} is down"),
            )
        })
    }
}

/// The factory handed to one replica.
#[derive(Clone)]
pub struct LocalNetwork {
    from: NodeId,
    router: Arc<LocalRouter>,
}

pub struct LocalClient {
    from: NodeId,
    to: NodeId,
    router: Arc<LocalRouter>,
}

impl RaftNetworkFactory<TypeConfig> for LocalNetwork {
    type Network = LocalClient;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> LocalClient {
        LocalClient {
            from: self.from,
            to: target,
            router: self.router.clone(),
        }
    }
}

impl LocalClient {
    async fn target<E: std::error::Error>(
        &self,
    ) -> Result<Raft<TypeConfig>, RPCError<NodeId, NodeInfo, E>> {
        let (raft, delay) = self.router.route(self.from, self.to).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                RPCError::Network(NetworkError::new(&e))
            } else {
                RPCError::Unreachable(Unreachable::new(&e))
            }
        })?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(raft)
    }
}

impl RaftNetwork<TypeConfig> for LocalClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        let raft = self.target().await?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let raft = self.target().await?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        let raft = self.target().await?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

/// Replicas with ids `1..=n` in one process, one per directory, joined into one cluster.
pub struct LocalCluster {
    pub router: Arc<LocalRouter>,
    pub replicas: Vec<crate::replica::Replica>,
}

impl LocalCluster {
    /// Starts one replica per directory, makes them all voters and waits up to `timeout`
    /// for a leader.
    pub async fn start(
        dirs: &[&std::path::Path],
        settings: &crate::replica::RaftSettings,
        timeout: Duration,
    ) -> Result<LocalCluster, crate::Error> {
        let router = LocalRouter::new();
        let mut replicas = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let id = i as NodeId + 1;
            let r = crate::replica::Replica::start(id, dir, settings, router.network(id)).await?;
            router.register(id, r.raft().clone());
            replicas.push(r);
        }
        let members = (1..=dirs.len() as NodeId)
            .map(|id| {
                (
                    id,
                    NodeInfo {
                        raft_addr: format!("local-{id}"),
                    },
                )
            })
            .collect();
        replicas[0].initialize(members).await?;
        let cluster = LocalCluster { router, replicas };
        let deadline = tokio::time::Instant::now() + timeout;
        while cluster.leader().is_none() {
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::Error::Raft(format!("no leader within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(cluster)
    }

    /// The replica the first replica believes is leader.
    pub fn leader(&self) -> Option<&crate::replica::Replica> {
        let id = self.replicas[0].metrics().current_leader?;
        self.replicas.iter().find(|r| r.id() == id)
    }

    pub async fn shutdown(&self) {
        for r in &self.replicas {
            r.shutdown().await;
        }
    }
}
