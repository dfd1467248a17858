//! The Raft network between nodes (raft-store/DESIGN.md, "The Raft network"): HTTPS with
//! mutual TLS on the internal listener. A warp server answers the RPCs; an HTTP client with
//! a connection pool calls them, with openraft's per-RPC timeouts. Bodies are postcard: the
//! request type on the way in, `Result<response, RaftError>` on the way out, so a remote
//! Raft error arrives as the same typed error openraft would have returned locally.
//!
//! Routes: `POST /raft/append`, `/raft/vote`, `/raft/snapshot` (one chunk of a snapshot),
//! `/raft/propose` (a follower forwarding a batch of commands to the leader) and
//! `/raft/cluster` (membership requests, and questions one member asks another). Only a
//! holder of a certificate from the cluster CA that names a node id gets past the
//! handshake. Each connection is then served knowing that id, and a request counts only
//! as from it: a Raft message must name it as its sender, and proposals and membership
//! requests other than a node's own join come only from members.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use warp::Filter;

use crate::membership::{ClusterReply, ClusterRequest};
use crate::replica::history::DROP_HISTORY_WITHIN;
use crate::replica::{BoxFuture, Forwarder, Replica};
use crate::tls::ClusterTls;
use crate::types::{NodeId, NodeInfo, Request, Response, TypeConfig};
use crate::Error;
use senders::Senders;

pub mod senders;

/// Largest RPC body accepted: a snapshot chunk or a large append.
const MAX_BODY: u64 = 64 * 1024 * 1024;
/// A peer that does not finish its TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The client side: a factory of per-peer clients sharing one connection pool.
#[derive(Clone)]
pub struct HttpNetwork {
    client: reqwest::Client,
    /// Per peer, how many RPCs go on in the background after openraft gave up on them.
    late: Arc<std::sync::Mutex<std::collections::HashMap<NodeId, Arc<AtomicUsize>>>>,
}

impl HttpNetwork {
    pub fn new(tls: &ClusterTls) -> Result<HttpNetwork, Error> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls.client.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::Tls(format!("building the Raft HTTP client: {e}")))?;
        Ok(HttpNetwork {
            client,
            late: Arc::default(),
        })
    }

    /// Sends a batch of commands to the leader at `leader` and returns its response and
    /// the index of the log entry that carried them.
    pub async fn forward(
        &self,
        leader: &NodeInfo,
        request: &Request,
        timeout: Duration,
    ) -> Result<(Response, u64), Error> {
        let what = "forwarding to the leader";
        let result: Result<(Response, u64), String> = self
            .post(&leader.raft_addr, "/raft/propose", request, timeout, what)
            .await?;
        result.map_err(Error::Raft)
    }

    /// POSTs `request` (postcard) to `https://<addr><path>` and decodes the postcard answer.
    /// `what` starts the error messages.
    async fn post<Req: Serialize, T: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        request: &Req,
        timeout: Duration,
        what: &str,
    ) -> Result<T, Error> {
        let body = postcard::to_stdvec(request).map_err(|e| Error::Corrupt(e.to_string()))?;
        let mut reply = self
            .client
            .post(format!("https://{addr}{path}"))
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let late = if e.is_timeout() {
                    format!(" (no answer within {timeout:?})")
                } else {
                    String::new()
                };
                Error::Unreachable(format!("{what} at {addr}: {}{late}", chain(&e)))
            })?;
        if !reply.status().is_success() {
            let status = reply.status();
            // The reason a refusal gives (a 403's): the first chunk only, cut short.
            let reason = match reply.chunk().await {
                Ok(Some(b)) => String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned(),
                _ => String::new(),
            };
            return Err(Error::Raft(format!(
                "{what}: {addr} answered HTTP {status}: {reason}"
            )));
        }
        let bytes = reply
            .bytes()
            .await
            .map_err(|e| Error::Raft(format!("{what}: reading the answer from {addr}: {e}")))?;
        postcard::from_bytes(&bytes)
            .map_err(|e| Error::Corrupt(format!("{what}: the answer from {addr}: {e}")))
    }
}

impl HttpNetwork {
    /// Sends a membership request to the member at `raft_addr`. Returns the answering
    /// member's cluster id with its reply.
    pub async fn cluster(
        &self,
        raft_addr: &str,
        request: &ClusterRequest,
        timeout: Duration,
    ) -> Result<(String, ClusterReply), Error> {
        self.cluster_call(raft_addr, request, false, timeout).await
    }

    /// Sends a membership request on to the leader at `raft_addr`. The leader handles it
    /// or refuses; it never forwards again.
    pub async fn cluster_to_leader(
        &self,
        raft_addr: &str,
        request: &ClusterRequest,
        timeout: Duration,
    ) -> Result<(String, ClusterReply), Error> {
        self.cluster_call(raft_addr, request, true, timeout).await
    }

    async fn cluster_call(
        &self,
        raft_addr: &str,
        request: &ClusterRequest,
        forwarded: bool,
        timeout: Duration,
    ) -> Result<(String, ClusterReply), Error> {
        let what = "asking the member";
        let result: Result<(String, ClusterReply), Error> = self
            .post(
                raft_addr,
                "/raft/cluster",
                &(request, forwarded),
                timeout,
                what,
            )
            .await?;
        result
    }
}

/// An error with its causes, which is where reqwest puts the reason (refused, TLS...).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What the serving side needs besides the replica.
#[derive(Clone)]
pub struct ServeContext {
    /// Sent with every `/raft/cluster` answer, so a joining node learns which cluster it
    /// joined.
    pub cluster_id: String,
    /// The ids in this node's key file, read when asked.
    pub key_ids: Arc<dyn Fn() -> Result<Vec<u32>, Error> + Send + Sync>,
    /// The highest cluster feature version this node supports.
    pub features: u32,
    /// Answers [`ClusterRequest::Agent`] questions; set once the agents run.
    pub agent: AgentHook,
    /// Asks members whether a Raft sender this node has not heard of is one of them.
    pub network: HttpNetwork,
    /// The members the node's join recorded ([`crate::data_dir::Identity::join_members`]).
    pub join_members: Vec<String>,
}

/// Where questions for a node's agents go: empty until the agents start, and on a node
/// without them.
pub type AgentHook = Arc<std::sync::OnceLock<Arc<dyn Fn(&str) -> String + Send + Sync>>>;

/// The client for one peer.
pub struct HttpPeer {
    target: NodeId,
    base: String,
    client: reqwest::Client,
    /// RPCs to this peer going on after openraft gave up on them.
    late: Arc<AtomicUsize>,
}

/// The Raft network is how a follower reaches its leader.
impl Forwarder for HttpNetwork {
    fn forward<'a>(
        &'a self,
        leader: &'a NodeInfo,
        request: &'a Request,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(Response, u64), Error>> {
        Box::pin(HttpNetwork::forward(self, leader, request, timeout))
    }

    fn cluster<'a>(
        &'a self,
        leader: &'a NodeInfo,
        request: &'a ClusterRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ClusterReply, Error>> {
        Box::pin(async move {
            self.cluster_to_leader(&leader.raft_addr, request, timeout)
                .await
                .map(|(_cluster_id, reply)| reply)
        })
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = HttpPeer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> HttpPeer {
        let late = self
            .late
            .lock()
            .expect("late RPC table")
            .entry(target)
            .or_default()
            .clone();
        HttpPeer {
            target,
            base: format!("https://{}", node.raft_addr),
            client: self.client.clone(),
            late,
        }
    }
}

impl HttpPeer {
    /// Sends one RPC. The request runs in a task of its own, so that when openraft gives up
    /// on it (an append gets one heartbeat interval) it still completes in the background,
    /// up to `LATE_RPC_LIMIT`, and its connection goes back to the pool; one such RPC per
    /// peer at a time ([`Pending`]), the others are dropped as before. Over HTTP/1.1 a
    /// request dropped in flight closes its connection; on a link whose round trip is close
    /// to the heartbeat, the next request would then need a TCP and a TLS handshake (three
    /// round trips) within the same budget, time out the same way, and the node would
    /// never again hold a connection to that peer. A request that completes after its
    /// budget is counted ([`late_rpcs`]) and logged, naming the setting to raise.
    async fn call<Req, T, E>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body =
            postcard::to_stdvec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let (target, budget, rpc) = (self.target, option.hard_ttl(), path.to_owned());
        let sending = self
            .client
            .post(format!("{}{path}", self.base))
            .timeout(budget.max(LATE_RPC_LIMIT))
            .body(body);
        let state = Arc::new(std::sync::Mutex::new(Late::Running));
        let (task_state, late) = (state.clone(), self.late.clone());
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let outcome = match sending.send().await {
                Err(e) if e.is_connect() => Err(Failure::Unreachable(e)),
                Err(e) => Err(Failure::Network(e)),
                Ok(reply) if !reply.status().is_success() => Err(Failure::Status(reply.status())),
                Ok(reply) => reply.bytes().await.map_err(Failure::Network),
            };
            let took = started.elapsed();
            if took > budget && outcome.is_ok() {
                note_late_rpc(target, &rpc, took, budget);
            }
            let mut state = task_state.lock().expect("late RPC state");
            if *state == Late::Detached {
                late.fetch_sub(1, Ordering::Relaxed);
            }
            *state = Late::Done;
            drop(state);
            outcome
        });
        let mut pending = Pending {
            task: Some(task),
            state,
            late: self.late.clone(),
        };
        let joined = pending.task.as_mut().expect("just set").await;
        pending.task = None;
        let bytes = match joined {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(Failure::Unreachable(e))) => {
                return Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(Failure::Network(e))) => return Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Err(Failure::Status(status))) => {
                let e = std::io::Error::other(format!("{path} answered {status}"));
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let result: Result<T, RaftError<NodeId, E>> =
            postcard::from_bytes(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Where an RPC's task stands, for [`Pending`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Late {
    Running,
    /// Going on after openraft gave up on it, counted in its peer's `late`.
    Detached,
    Done,
}

/// At most this many RPCs to one peer go on after openraft gave up on them: one keeps a
/// connection; more would only pile up while a peer is silent (a heartbeat apart, each
/// holding its append for up to `LATE_RPC_LIMIT`).
const MAX_LATE_PER_PEER: usize = 1;

/// An RPC's task while its caller waits. Dropped before the task ends (openraft gave up),
/// it leaves the task running if its peer has room for one more late RPC, else aborts it.
struct Pending<T> {
    task: Option<tokio::task::JoinHandle<T>>,
    state: Arc<std::sync::Mutex<Late>>,
    late: Arc<AtomicUsize>,
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        let mut state = self.state.lock().expect("late RPC state");
        if *state != Late::Running {
            return;
        }
        if self.late.load(Ordering::Relaxed) < MAX_LATE_PER_PEER {
            self.late.fetch_add(1, Ordering::Relaxed);
            *state = Late::Detached;
        } else {
            task.abort();
            *state = Late::Done;
        }
    }
}

/// How an RPC failed before an answer could be decoded.
enum Failure {
    /// No connection could be made: openraft backs off from the peer.
    Unreachable(reqwest::Error),
    Network(reqwest::Error),
    Status(reqwest::StatusCode),
}

/// How long an RPC may go on in the background after openraft gave up on it.
const LATE_RPC_LIMIT: Duration = Duration::from_secs(10);

/// RPCs that completed after openraft had given up on them.
static LATE_RPCS: AtomicU64 = AtomicU64::new(0);

/// When a late RPC was last logged, for appends and snapshots and for votes: ms since the
/// first late one, plus one; 0 for never.
static LATE_LOGGED_MS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The number of Raft RPCs from this process that answered after openraft had given up on
/// them: on a healthy link, none.
pub fn late_rpcs() -> u64 {
    LATE_RPCS.load(Ordering::Relaxed)
}

/// Counts a late RPC (to `path`) and, at most once a minute for votes and once for the
/// rest, says what it means and which setting to raise.
fn note_late_rpc(target: NodeId, path: &str, took: Duration, budget: Duration) {
    static SINCE: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    LATE_RPCS.fetch_add(1, Ordering::Relaxed);
    let vote = path == "/raft/vote";
    let logged = &LATE_LOGGED_MS[usize::from(vote)];
    let now_ms = SINCE
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1;
    let last = logged.load(Ordering::Relaxed);
    if !((last == 0 || now_ms.saturating_sub(last) >= 60_000)
        && logged
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
    {
        return;
    }
    let (took_ms, allowed_ms) = (took.as_millis() as u64, budget.as_millis() as u64);
    if vote {
        // openraft gives a vote request the shortest election timeout, and the peer syncs
        // its vote to disk before it answers: a disk slower than that (a busy or slow one)
        // keeps this node from ever collecting the vote, and an election from succeeding.
        tracing::warn!(
            peer = target,
            took_ms,
            allowed_ms,
            "a vote request answered after openraft gave up on it: a peer must sync its vote \
             to disk and answer within cluster.election_timeout_ms, and this peer's disk or \
             the link to it is too slow for that; elections fail while it lasts. Raise \
             cluster.election_timeout_ms above the peer's slowest disk sync plus the round \
             trip (README, \"Two sites\")"
        );
    } else {
        tracing::warn!(
            peer = target,
            took_ms,
            allowed_ms,
            "a Raft RPC answered after openraft gave up on it: the link to this peer is too \
             slow for cluster.heartbeat_ms (an append must complete within one heartbeat); \
             raise cluster.heartbeat_ms to twice the round trip or more, and \
             cluster.election_timeout_ms with it (README, \"Two sites\")"
        );
    }
}

impl RaftNetwork<TypeConfig> for HttpPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call("/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call("/raft/vote", &rpc, &option).await
    }
}

fn reply<T: Serialize>(value: &T) -> warp::http::Response<Vec<u8>> {
    let body = postcard::to_stdvec(value).expect("in-memory serialisation does not fail");
    warp::http::Response::builder()
        .header("content-type", "application/octet-stream")
        .body(body)
        .expect("static response parts")
}

fn bad_request(e: impl std::fmt::Display) -> warp::http::Response<Vec<u8>> {
    warp::http::Response::builder()
        .status(400)
        .body(format!("undecodable RPC body: {e}").into_bytes())
        .expect("static response parts")
}

fn forbidden(name: &str, why: &str) -> warp::http::Response<Vec<u8>> {
    static REFUSALS: crate::tls::RefusalLog = crate::tls::RefusalLog::new();
    if let Some(more) = REFUSALS.may_log() {
        tracing::warn!(
            rpc = name,
            refused_since_last_line = more,
            "refused a cluster RPC: {why}"
        );
    }
    warp::http::Response::builder()
        .status(403)
        .body(why.as_bytes().to_vec())
        .expect("static response parts")
}

/// `POST /raft/<name>`: decodes the body as `Req`, asks `permit` whether the connection's
/// peer may send it and, for a Raft message (`sender` given), whether the peer is a member
/// (403 with the reason if not), calls `handle`, encodes its result.
fn rpc_route<Req, Fut, Out>(
    name: &'static str,
    replica: Replica,
    sender: Option<(Arc<Senders>, Option<NodeId>)>,
    permit: impl Fn(&Replica, &Req) -> Result<(), String> + Clone + Send + Sync + 'static,
    handle: impl Fn(Replica, Req) -> Fut + Clone + Send + Sync + 'static,
) -> impl Filter<Extract = (warp::http::Response<Vec<u8>>,), Error = warp::Rejection> + Clone
where
    Req: DeserializeOwned + Send + 'static,
    Fut: Future<Output = Out> + Send,
    Out: Serialize,
{
    warp::post()
        .and(warp::path("raft"))
        .and(warp::path(name))
        .and(warp::path::end())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .then(move |body: Bytes| {
            let replica = replica.clone();
            let (permit, handle, sender) = (permit.clone(), handle.clone(), sender.clone());
            async move {
                let request = match postcard::from_bytes::<Req>(&body) {
                    Ok(request) => request,
                    Err(e) => return bad_request(e),
                };
                if let Err(why) = permit(&replica, &request) {
                    return forbidden(name, &why);
                }
                if let Some((senders, Some(peer))) = &sender {
                    if let Err(why) = senders.check(&replica, *peer).await {
                        return forbidden(name, &why);
                    }
                }
                reply(&handle(replica, request).await)
            }
        })
}

/// Whether a Raft message's claimed sender (`claimed`) is the connection's peer: a
/// member's certificate speaks only for its own node id.
fn sent_as(peer: Option<NodeId>, claimed: Option<NodeId>) -> Result<(), String> {
    match (peer, claimed) {
        (Some(p), Some(c)) if p == c => Ok(()),
        _ => Err(format!(
            "the message claims to come from node {claimed:?}, but the connection's \
             certificate is node {peer:?}'s"
        )),
    }
}

/// Whether the connection's peer is a member (voter or learner) as this node knows it.
fn from_member(replica: &Replica, peer: Option<NodeId>) -> Result<(), String> {
    match peer {
        Some(p) if replica.is_member(p) => Ok(()),
        _ => Err(format!(
            "node {peer:?} is not a member; only a join may come from outside the cluster"
        )),
    }
}

/// Serves the Raft RPCs on `listener` with mutual TLS until `stop` completes. Peers whose
/// certificate the cluster CA did not sign fail the handshake and are logged.
pub async fn serve(
    listener: TcpListener,
    tls: &ClusterTls,
    replica: Replica,
    context: ServeContext,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let senders = Arc::new(Senders::new(
        replica.id(),
        context.cluster_id.clone(),
        context.network.clone(),
        context.join_members.clone(),
    ));
    let (incoming, accept_loop) =
        crate::tls::accept_tls(listener, acceptor, HANDSHAKE_TIMEOUT, "Raft listener");
    // Each connection is served on its own, so its routes know whose certificate it
    // carries; on stop each finishes the request it is on, then closes.
    crate::tls::serve_each(incoming, accept_loop, stop, |admitted, stopped| {
        let (stream, slot) = admitted.into_parts();
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| crate::certs::node_id_of(cert));
        let service = warp::service(routes(
            replica.clone(),
            context.clone(),
            senders.clone(),
            peer,
        ));
        let connection = tls.ended_on_removal(stream);
        async move {
            // The connection's place among the listener's, until it closes.
            let _slot = slot;
            let served = hyper::server::conn::Http::new()
                .http1_only(true)
                .serve_connection(connection, service);
            crate::tls::until_stopped(served, |c| c.graceful_shutdown(), stopped).await;
        }
    })
    .await;
}

/// The routes of one connection, whose certificate names node `peer`.
fn routes(
    replica: Replica,
    context: ServeContext,
    senders: Arc<Senders>,
    peer: Option<NodeId>,
) -> warp::filters::BoxedFilter<(warp::http::Response<Vec<u8>>,)> {
    let append = rpc_route(
        "append",
        replica.clone(),
        Some((senders.clone(), peer)),
        move |_, rpc: &AppendEntriesRequest<TypeConfig>| {
            sent_as(peer, rpc.vote.leader_id().voted_for())
        },
        |replica, rpc: AppendEntriesRequest<TypeConfig>| async move {
            if let Some(commit) = rpc.leader_commit {
                replica.note_leader_commit(commit.index);
            }
            let answer = replica.raft().append_entries(rpc).await;
            // Any answer but "a higher vote" came from the current leader.
            if matches!(&answer, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                replica.note_leader_heard();
            }
            answer
        },
    );
    let vote = rpc_route(
        "vote",
        replica.clone(),
        Some((senders.clone(), peer)),
        move |_, rpc: &VoteRequest<NodeId>| sent_as(peer, rpc.vote.leader_id().voted_for()),
        |replica, rpc: VoteRequest<NodeId>| async move { replica.raft().vote(rpc).await },
    );
    let snapshot = rpc_route(
        "snapshot",
        replica.clone(),
        Some((senders, peer)),
        move |_, rpc: &InstallSnapshotRequest<TypeConfig>| {
            sent_as(peer, rpc.vote.leader_id().voted_for())
        },
        |replica, rpc: InstallSnapshotRequest<TypeConfig>| async move {
            replica.raft().install_snapshot(rpc).await
        },
    );
    let propose = rpc_route(
        "propose",
        replica.clone(),
        None,
        move |replica, _: &Request| from_member(replica, peer),
        |replica, request: Request| async move {
            replica
                .raft()
                .client_write(request)
                .await
                .map(|r| (r.data, r.log_id.index))
                .map_err(|e| e.to_string())
        },
    );
    let cluster = rpc_route(
        "cluster",
        replica,
        None,
        // A node asks to join in its own name; everything else, a forwarded join included
        // (the member that forwards it checked the joiner's name), comes from members.
        move |replica, (request, forwarded): &(ClusterRequest, bool)| match request {
            ClusterRequest::Join { id, .. } | ClusterRequest::JoinWithToken { id, .. }
                if !forwarded =>
            {
                sent_as(peer, Some(*id))
            }
            _ => from_member(replica, peer),
        },
        move |replica, (request, forwarded): (ClusterRequest, bool)| {
            let context = context.clone();
            async move {
                let reply = match request {
                    ClusterRequest::KeyIds => (context.key_ids)().map(ClusterReply::KeyIds),
                    ClusterRequest::Features => Ok(ClusterReply::Features(context.features)),
                    ClusterRequest::Members => Ok(ClusterReply::Members(replica.members())),
                    // Only the leader's log says what has been acknowledged: its last
                    // index covers every write acknowledged before the question (and, for
                    // a new leader, the first entry of its term, which commits them all).
                    ClusterRequest::Applied => {
                        let m = replica.metrics();
                        if m.state == openraft::ServerState::Leader {
                            Ok(ClusterReply::Applied(m.last_log_index.unwrap_or(0)))
                        } else {
                            Err(Error::NotLeader {
                                leader: m.current_leader,
                            })
                        }
                    }
                    ClusterRequest::Agent(question) => match context.agent.get() {
                        Some(answer) => Ok(ClusterReply::Agent(answer(&question))),
                        None => Err(Error::Unreachable("no agents run on this node".into())),
                    },
                    ClusterRequest::DropHistory { upto } => replica
                        .drop_history(upto, DROP_HISTORY_WITHIN)
                        .await
                        .map(ClusterReply::HistoryDropped),
                    other if forwarded => replica.lead_cluster_request(other).await,
                    other => replica.cluster_request(other).await,
                };
                reply.map(|r| (context.cluster_id.clone(), r))
            }
        },
    );
    append
        .or(vote)
        .unify()
        .or(snapshot)
        .unify()
        .or(propose)
        .unify()
        .or(cluster)
        .unify()
        .boxed()
}
