//! Who may send this node Raft messages: votes, appends and snapshot chunks.
//!
//! The cluster link's mutual TLS proves which node id a peer holds a certificate for
//! (signed by the cluster CA, not revoked), and each message must name that id as its
//! sender. That alone would still let a certificate the CA signed for a node that never
//! joined speak Raft in its own name: a vote with a later term makes a leader step down,
//! and an append posing as the leader of a later term overwrites a follower's log. Raft
//! trusts its peers, so a message counts only from a member.
//!
//! "A member" cannot simply mean one in this node's own membership: a node that was down
//! while another joined must take that newcomer's appends if it leads now, and a node
//! that has just joined knows no membership at all until its first append. So a sender
//! this node has not heard of is accepted once a member it knows vouches for it: the node
//! asks the members of its own membership, one after another, for theirs
//! ([`ClusterRequest::Members`]); a node with no membership yet asks the members its join
//! recorded in the data dir ([`crate::data_dir::Identity::join_members`]). Whoever made
//! the newcomer a member did so through a majority of the old configuration, so some
//! member this node knows has it in its log.
//!
//! A yes is remembered for a minute; a no for a second, and one round of questions runs
//! at a time, so a stranger sending a flood costs the members at most one round a second.
//! A node with no membership and no recorded join members (one joined by a release that
//! did not record them) takes any sender, as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::HttpNetwork;
use crate::membership::{ClusterReply, ClusterRequest};
use crate::replica::Replica;
use crate::types::NodeId;

/// How long a member's word that a sender is a member holds.
const VOUCHED_FOR: Duration = Duration::from_secs(60);
/// How long a sender no member vouched for is refused without asking again.
const REFUSED_FOR: Duration = Duration::from_secs(1);
/// How long one member may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Senders remembered at most; beyond it the oldest answer is forgotten.
const REMEMBERED: usize = 64;

/// Decides whether a peer's Raft messages are taken (see the module docs).
pub struct Senders {
    me: NodeId,
    cluster_id: String,
    network: HttpNetwork,
    join_members: Vec<String>,
    answers: Mutex<HashMap<NodeId, (Instant, bool)>>,
    round: tokio::sync::Mutex<()>,
}

impl Senders {
    pub fn new(
        me: NodeId,
        cluster_id: String,
        network: HttpNetwork,
        join_members: Vec<String>,
    ) -> Senders {
        Senders {
            me,
            cluster_id,
            network,
            join_members,
            answers: Mutex::new(HashMap::new()),
            round: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether node `peer` may send this node Raft messages; the reason if not.
    pub async fn check(&self, replica: &Replica, peer: NodeId) -> Result<(), String> {
        if replica.is_member(peer) {
            return Ok(());
        }
        if let Some(answer) = self.remembered(peer) {
            return answer;
        }
        let _round = self.round.lock().await;
        // Another request may have asked while this one waited.
        if replica.is_member(peer) {
            return Ok(());
        }
        if let Some(answer) = self.remembered(peer) {
            return answer;
        }
        let members = replica.members();
        let ask: Vec<String> = if members.is_empty() {
            if self.join_members.is_empty() {
                return Ok(());
            }
            self.join_members.clone()
        } else {
            members
                .into_iter()
                .filter(|m| m.id != self.me && m.id != peer)
                .map(|m| m.raft_addr)
                .collect()
        };
        let vouched = self.ask(&ask, peer).await;
        self.remember(peer, vouched);
        if vouched {
            tracing::info!(
                peer,
                "a member vouched for a sender this node had not heard of"
            );
        }
        verdict(peer, vouched)
    }

    fn remembered(&self, peer: NodeId) -> Option<Result<(), String>> {
        let answers = self.answers.lock().expect("senders lock");
        let &(at, vouched) = answers.get(&peer)?;
        let lasts = if vouched { VOUCHED_FOR } else { REFUSED_FOR };
        (at.elapsed() < lasts).then(|| verdict(peer, vouched))
    }

    fn remember(&self, peer: NodeId, vouched: bool) {
        let mut answers = self.answers.lock().expect("senders lock");
        if answers.len() >= REMEMBERED && !answers.contains_key(&peer) {
            if let Some(oldest) = answers
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(id, _)| *id)
            {
                answers.remove(&oldest);
            }
        }
        answers.insert(peer, (Instant::now(), vouched));
    }

    /// Whether any of the members at `addrs` has `peer` in its membership. A member from
    /// before [`ClusterRequest::Members`] is asked for the leader's replication view
    /// instead, which names every member.
    async fn ask(&self, addrs: &[String], peer: NodeId) -> bool {
        for addr in addrs {
            let answer = match self
                .network
                .cluster(addr, &ClusterRequest::Members, ASK_TIMEOUT)
                .await
            {
                Ok(answer) => Ok(answer),
                Err(_) => {
                    self.network
                        .cluster(addr, &ClusterRequest::Replication, ASK_TIMEOUT)
                        .await
                }
            };
            let knows = match answer {
                Ok((cluster, _)) if cluster != self.cluster_id => false,
                Ok((_, ClusterReply::Members(members))) => members.iter().any(|m| m.id == peer),
                Ok((_, ClusterReply::Replication(view))) => {
                    view.leader == peer || view.matched.contains_key(&peer)
                }
                Ok(_) | Err(_) => false,
            };
            if knows {
                return true;
            }
        }
        false
    }
}

fn verdict(peer: NodeId, vouched: bool) -> Result<(), String> {
    if vouched {
        Ok(())
    } else {
        Err(format!(
            "node {peer} is not a member, and no member this node knows vouched for it; \
             only members send Raft messages"
        ))
    }
}
