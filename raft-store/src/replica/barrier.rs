//! A read barrier for a follower ([`Replica::catch_up`]): waits until this replica has
//! applied everything in the leader's log when asked. A follower's state trails the
//! leader's by up to a heartbeat and a one-way trip, so a lookup that finds nothing (a
//! phone with no binding here) may only be early: the binding may be committed through
//! another node and not yet applied on this one. On a LAN that window is a millisecond or
//! two; between two sites it is a few hundred.
//!
//! Callers at the same moment share one question to the leader, asked one at a time. A
//! caller may use an answer only if its question started after the caller arrived, so that
//! it covers every write acknowledged before the caller asked: each caller waits for its
//! turn and then either takes the latest answer, if that question is new enough, or asks
//! itself. A burst of lookups, or a stranger calling an offline phone over and over, costs
//! the leader at most one question per round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::Replica;
use crate::membership::{ClusterReply, ClusterRequest};

/// The questions to the leader.
#[derive(Default)]
pub(crate) struct Barrier {
    /// Held while a question is out: one at a time.
    turn: tokio::sync::Mutex<()>,
    /// How many questions have been started.
    started: AtomicU64,
    /// The latest question answered, by its number, and the leader's last log index it
    /// brought (`None` when no answer came).
    latest: Mutex<(u64, Option<u64>)>,
}

impl Replica {
    /// Waits, for up to `within`, until this replica has applied everything in the
    /// leader's log when asked; every write acknowledged before the call, through any
    /// node, is then visible here. At once on the leader. False if there is no leader to ask, it did
    /// not answer, or this replica did not get there in time: the caller goes on with what
    /// it has.
    pub async fn catch_up(&self, within: Duration) -> bool {
        if self.is_leader() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + within;
        let b = &self.barrier;
        let arrived = b.started.load(Ordering::SeqCst);
        let Ok(turn) = tokio::time::timeout_at(deadline, b.turn.lock()).await else {
            return false;
        };
        let (number, answer) = *b.latest.lock().expect("barrier lock");
        let index = if number > arrived {
            answer
        } else {
            let number = b.started.fetch_add(1, Ordering::SeqCst) + 1;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let answer = self.leaders_applied(left).await;
            *b.latest.lock().expect("barrier lock") = (number, answer);
            answer
        };
        drop(turn);
        let Some(index) = index else {
            return false;
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "a read barrier")
            .await
            .is_ok()
    }

    /// How many questions [`Replica::catch_up`] has asked the leader.
    pub fn catch_up_questions(&self) -> u64 {
        self.barrier.started.load(Ordering::Relaxed)
    }

    /// The leader's last log index, by its own answer.
    async fn leaders_applied(&self, within: Duration) -> Option<u64> {
        let forwarder = self.forwarder()?;
        let leader = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let id = m.current_leader?;
            if id == self.id {
                return m.last_log_index;
            }
            m.membership_config.membership().get_node(&id)?.clone()
        };
        match forwarder
            .cluster(&leader, &ClusterRequest::Applied, within)
            .await
        {
            Ok(ClusterReply::Applied(index)) => Some(index),
            _ => None,
        }
    }
}
