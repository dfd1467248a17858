//! The leader's sweep of lapsed bindings. A phone that stops refreshing leaves a binding
//! behind; the leader removes such bindings in bounded batches, so a sweep never becomes one
//! huge write, and a node that is not the leader does nothing. Every node finds the lapsed
//! bindings through the index by expiry, so a sweep costs what lapsed, not what is stored.
//! The same command forgets removal times past their keeping (raft-store's
//! `REMOVALS_KEPT_MS`), as many again at most.

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
        // Nothing lapsed (the usual case) costs a look at the first entry of the index by
        // expiry and one seek among removal records here, and nothing anywhere else: no
        // entry goes through the log.
        let now = now_ms();
        match replica.reader().has_lapsed_bindings(now) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading the index of bindings by expiry failed");
                continue;
            }
        }
        let command = Command::ExpireBindings {
            now_ms: now,
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
