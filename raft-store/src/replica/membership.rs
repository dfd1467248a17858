//! Cluster membership as operators change it: a node joins as a learner, the leader makes
//! it a voter once it has caught up, and a removed node's id is retired for good. These
//! requests must run on the leader; a follower forwards them over the internal link, so
//! an operator can send them to any member.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};

use super::Replica;
use crate::command::{Command, CommandResult, JoinToken};
use crate::join_token;
use crate::types::{NodeId, NodeInfo};
use crate::Error;

/// The cluster feature version from which a node joins only with a join token.
pub const JOIN_TOKENS_FROM: u32 = 5;

/// Wall-clock milliseconds, for the expiry of join tokens (the leader's clock decides).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A learner within this many entries of the leader's log counts as caught up.
const CAUGHT_UP_SLACK: u64 = 64;
/// How long a forwarded membership request may take: a change is two log entries (joint,
/// then uniform configuration) plus the id's retirement.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// A membership request, as it travels between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterRequest {
    /// Add a node as a learner; the leader promotes it once it has caught up.
    Join { id: NodeId, raft_addr: String },
    /// Remove a node for good; its id is retired.
    Remove { id: NodeId },
    /// The leader's view of every member's replication progress.
    Replication,
    /// The ids in the answering node's key file (not forwarded: asked of each member).
    KeyIds,
    /// Drop the answering node's history through this log index from its files, after a
    /// key rotation (not forwarded: asked of each member).
    DropHistory { upto: u64 },
    /// The highest cluster feature version the answering node supports (not forwarded:
    /// asked of each member by the leader before it raises the cluster's).
    Features,
    /// A question for the answering node's SIP agents (not forwarded): text in, text out,
    /// so this crate needs to know nothing of them. A node from before this variant existed
    /// answers with an error, which the asker takes as "no agent here".
    Agent(String),
    /// The index a follower must apply to have seen every write acknowledged so far: the
    /// leader's last log index (not forwarded: a follower asks the node it takes for the
    /// leader, for [`Replica::catch_up`], and a node that does not lead refuses). A node
    /// from before this variant existed answers with an error, and the asker goes on
    /// without waiting.
    Applied,
    /// Add a node as a learner on presenting a one-time join token (`tj_…`, see
    /// [`crate::join_token`]). From cluster feature version 5 this is the only way in: a
    /// CA-signed certificate alone no longer admits a node. A node from before this
    /// variant existed cannot decode it and answers with an error.
    JoinWithToken {
        id: NodeId,
        raft_addr: String,
        token: TokenText,
    },
    /// The answering node's latest membership (not forwarded: asked of each member), so a
    /// node can learn whether a sender it has not heard of is a member (see
    /// `http_network::senders`). A node from before this variant existed cannot decode it and
    /// answers with an error.
    Members,
}

/// A join token's text as it travels; its `Debug` shows only the public id, so logging a
/// request never logs a secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenText(pub String);

impl From<String> for TokenText {
    fn from(text: String) -> TokenText {
        TokenText(text)
    }
}

impl std::fmt::Debug for TokenText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match join_token::parse(&self.0) {
            Some((id, _)) => write!(f, "{}{id}_…", join_token::PREFIX),
            None => f.write_str("(not a join token)"),
        }
    }
}

impl ClusterRequest {
    /// Whether the request is about the node that receives it, rather than for the leader.
    pub fn is_per_member(&self) -> bool {
        matches!(
            self,
            ClusterRequest::KeyIds
                | ClusterRequest::DropHistory { .. }
                | ClusterRequest::Features
                | ClusterRequest::Agent(_)
                | ClusterRequest::Applied
                | ClusterRequest::Members
        )
    }
}

/// The answer to a [`ClusterRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterReply {
    Joined,
    Removed,
    Replication(ReplicationView),
    KeyIds(Vec<u32>),
    HistoryDropped(super::history::DroppedHistory),
    Features(u32),
    Agent(String),
    Applied(u64),
    Members(Vec<Member>),
}

/// What the leader knows about replication to each member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationView {
    pub leader: NodeId,
    pub last_log_index: u64,
    /// Member id → the highest log index known to be on that member.
    pub matched: BTreeMap<NodeId, Option<u64>>,
}

/// One member of the Raft configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub raft_addr: String,
    pub voter: bool,
}

impl Replica {
    /// The members in this node's latest membership configuration, voters first.
    pub fn members(&self) -> Vec<Member> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut members: Vec<Member> = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                raft_addr: node.raft_addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        members.sort_by_key(|m| (!m.voter, m.id));
        members
    }

    /// Runs a membership request on the leader, forwarding it there if this node is not.
    pub async fn cluster_request(&self, request: ClusterRequest) -> Result<ClusterReply, Error> {
        let m = self.metrics();
        if m.state == ServerState::Leader {
            return self.lead_cluster_request(request).await;
        }
        if request.is_per_member() {
            return Err(per_member(&request));
        }
        let leader = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        match (leader, self.forwarder()) {
            (Some(leader), Some(forwarder)) => {
                forwarder
                    .cluster(&leader, &request, MEMBERSHIP_TIMEOUT)
                    .await
            }
            _ => Err(Error::NotLeader {
                leader: m.current_leader,
            }),
        }
    }

    /// Runs a membership request that must be handled here, on the leader; a node that is
    /// not the leader (any more) answers NotLeader instead of forwarding again, so a request
    /// never bounces between nodes with stale views of who leads.
    pub async fn lead_cluster_request(
        &self,
        request: ClusterRequest,
    ) -> Result<ClusterReply, Error> {
        if !self.is_leader() {
            return Err(Error::NotLeader {
                leader: self.metrics().current_leader,
            });
        }
        match request {
            ClusterRequest::Join { id, raft_addr } => {
                if self.reader().feature_version()? >= JOIN_TOKENS_FROM {
                    return Err(Error::Membership(
                        "this cluster admits a node only with a join token: mint one with \
                         `tandem cluster join-token` and pass it to `tandem cluster join \
                         --token-file`"
                            .into(),
                    ));
                }
                self.join(id, raft_addr, None)
                    .await
                    .map(|()| ClusterReply::Joined)
            }
            ClusterRequest::JoinWithToken {
                id,
                raft_addr,
                token,
            } => self
                .join(id, raft_addr, Some(&token.0))
                .await
                .map(|()| ClusterReply::Joined),
            ClusterRequest::Remove { id } => self.remove(id).await.map(|()| ClusterReply::Removed),
            ClusterRequest::Replication => Ok(ClusterReply::Replication(self.replication_view()?)),
            ClusterRequest::KeyIds
            | ClusterRequest::DropHistory { .. }
            | ClusterRequest::Features
            | ClusterRequest::Agent(_)
            | ClusterRequest::Applied
            | ClusterRequest::Members => Err(per_member(&request)),
        }
    }
}

fn per_member(request: &ClusterRequest) -> Error {
    Error::Membership(format!(
        "{request:?} is asked of each member, not of the leader"
    ))
}

impl Replica {
    /// Adds `id` as a learner. With a join token, the token's secret is checked here and
    /// the token marked used through Raft (which refuses a used, expired or revoked one,
    /// or one for another id) before the node is added; a repeated join of a member at
    /// the same address needs the token it joined with.
    async fn join(&self, id: NodeId, raft_addr: String, token: Option<&str>) -> Result<(), Error> {
        // Checked first, so a caller without the secret learns nothing of the cluster.
        let token = match token {
            Some(text) => Some(self.check_join_token(text, id)?),
            None => None,
        };
        if id == 0 {
            return Err(Error::Membership("node id 0 is not allowed".into()));
        }
        if !is_host_port(&raft_addr) {
            return Err(Error::Membership(format!(
                "{raft_addr:?} is not a host:port address"
            )));
        }
        let members = self.members();
        if let Some(other) = members
            .iter()
            .find(|m| m.id != id && m.raft_addr == raft_addr)
        {
            return Err(Error::Membership(format!(
                "{raft_addr} is already node {}'s address; two ids at one address would \
                 count one machine's vote twice",
                other.id
            )));
        }
        if let Some(existing) = members.into_iter().find(|m| m.id == id) {
            if existing.raft_addr == raft_addr {
                // A repeated join, e.g. after a lost answer: harmless, and answered with any
                // token that admits this id (the one it used may have expired or been
                // removed since); the token is not used up.
                return Ok(());
            }
            return Err(Error::Membership(format!(
                "node id {id} is already a member, at {}; every node needs its own id",
                existing.raft_addr
            )));
        }
        if self.reader().is_retired(id)? {
            return Err(Error::Membership(format!(
                "node id {id} was removed from this cluster and ids are never reused; \
                 give the new node another id"
            )));
        }
        if let Some(t) = token {
            let using = Command::UseJoinToken {
                id: t.id,
                node: id,
                now_ms: now_ms(),
            };
            if let CommandResult::Rejected(why) = self.propose(using).await? {
                return Err(Error::Membership(why));
            }
        }
        let node = NodeInfo { raft_addr };
        waiting_for_earlier_changes(|| self.raft().add_learner(id, node.clone(), false)).await
    }

    /// The stored join token `text` names, if its secret is right and it admits `id`
    /// (whether it is still unused and unexpired is decided when it is marked used).
    fn check_join_token(&self, text: &str, id: NodeId) -> Result<JoinToken, Error> {
        let refused = || {
            Error::Membership(
                "the join token is not one this cluster issued, or was revoked; mint a new \
                 one with `tandem cluster join-token`"
                    .into(),
            )
        };
        let (token_id, secret) = join_token::parse(text.trim()).ok_or_else(refused)?;
        let stored = self.reader().join_token(token_id)?.ok_or_else(refused)?;
        if !join_token::secret_matches(&stored, secret) {
            return Err(refused());
        }
        match stored.node {
            Some(n) if n != id => Err(Error::Membership(format!(
                "this join token admits node {n}, not node {id}"
            ))),
            _ => Ok(stored),
        }
    }

    /// Retires the id first, while the node still receives the log, so it learns it was
    /// removed and its id can never come back; then changes the membership. A removal that
    /// was cut short (say the leader removed itself) is finished by asking again.
    async fn remove(&self, id: NodeId) -> Result<(), Error> {
        let members = self.members();
        let Some(member) = members.iter().find(|m| m.id == id) else {
            if self.reader().is_retired(id)? {
                return Ok(());
            }
            return Err(Error::Membership(format!(
                "node {id} is not a member of this cluster"
            )));
        };
        let change = if member.voter {
            if members.iter().filter(|m| m.voter).count() == 1 {
                return Err(Error::Membership(format!(
                    "node {id} is the only voter; a cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.propose(Command::RetireNode { id }).await?;
        waiting_for_earlier_changes(|| self.raft().change_membership(change.clone(), false)).await
    }

    /// The leader's replication progress per member. Fails on a non-leader.
    pub fn replication_view(&self) -> Result<ReplicationView, Error> {
        let m = self.metrics();
        let Some(replication) = (m.state == ServerState::Leader)
            .then_some(m.replication.as_ref())
            .flatten()
        else {
            return Err(Error::NotLeader {
                leader: m.current_leader,
            });
        };
        let last = m.last_log_index.unwrap_or(0);
        let mut matched: BTreeMap<NodeId, Option<u64>> = replication
            .iter()
            .map(|(id, log_id)| (*id, log_id.map(|l| l.index)))
            .collect();
        matched.insert(self.id(), Some(last));
        Ok(ReplicationView {
            leader: self.id(),
            last_log_index: last,
            matched,
        })
    }

    /// On the leader, makes every learner that has caught up a voter. Returns the ids
    /// promoted. Every member of a Tandem cluster is a voter; learners exist only while a
    /// node joins.
    pub async fn promote_caught_up_learners(&self) -> Result<Vec<NodeId>, Error> {
        let Ok(view) = self.replication_view() else {
            return Ok(Vec::new());
        };
        let ready: BTreeSet<NodeId> = self
            .members()
            .into_iter()
            .filter(|m| !m.voter)
            .filter(|m| {
                matches!(view.matched.get(&m.id), Some(Some(i))
                    if i + CAUGHT_UP_SLACK >= view.last_log_index)
            })
            .map(|m| m.id)
            .collect();
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        waiting_for_earlier_changes(|| {
            self.raft()
                .change_membership(ChangeMembers::AddVoterIds(ready.clone()), false)
        })
        .await?;
        Ok(ready.into_iter().collect())
    }
}

/// Runs a membership change, waiting (up to [`MEMBERSHIP_TIMEOUT`]) while an earlier one is
/// still being committed: openraft refuses a change while another is in progress, and a
/// join right after another node's promotion would otherwise fail for no reason an
/// operator could act on.
async fn waiting_for_earlier_changes<F, Fut, T>(mut change: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
        Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>,
    >,
{
    let deadline = tokio::time::Instant::now() + MEMBERSHIP_TIMEOUT;
    loop {
        match change().await {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(super::map_write_error(e)),
        }
    }
}

/// Whether `addr` looks like `host:port` with a non-zero port.
pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}
