//! The leader's sweep of lapsed bindings. A phone that stops refreshing leaves a binding
//! behind; the leader removes such bindings in bounded batches, so a sweep never becomes one
//! huge write, and a node that is not the leader does nothing.

use std::time::Duration;

use tandem_raft_store::command::{Command, CommandResult};
use tandem_raft_store::replica::Replica;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;

/// On the leader, removes lapsed bindings in batches of `batch`, every `every`.
pub async fn sweep_bindings(
    replica: Replica,
    every: Duration,
    batch: u32,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if !replica.is_leader() {
            continue;
        }
        let command = Command::ExpireBindings {
            now_ms: now_ms(),
            limit: batch,
        };
        let swept = tokio::select! {
            _ = stop.cancelled() => return,
            r = replica.propose(command) => r,
        };
        match swept {
            Ok(CommandResult::Removed(n)) if n > 0 => {
                tracing::debug!(removed = n, "lapsed bindings removed")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "binding sweep failed; will retry"),
        }
    }
}
