//! Dropping a replica's history from its files (raft-store/DESIGN.md, "Rotating keys leaves
//! nothing behind"). After a key rotation the state holds only values sealed under the new
//! key, but the old values are still in the log entries that wrote them, in the snapshot
//! file, and in RocksDB files until compaction rewrites them. [`Replica::drop_history`]
//! makes a snapshot that covers the rotation, purges the log through it and has RocksDB
//! rewrite every file, so those bytes leave the data directory.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Replica;
use crate::Error;

/// How long a member asked over the network may take: waiting for the rotation to be
/// applied, one snapshot and a full compaction of a small state. The asker waits longer.
pub const DROP_HISTORY_WITHIN: Duration = Duration::from_secs(300);

/// How often the snapshot is asked for again while none covers the target: openraft
/// ignores a request that arrives while it is already building one.
const RETRIGGER: Duration = Duration::from_secs(1);

/// What [`Replica::drop_history`] left on this replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedHistory {
    /// The index of the snapshot that now stands in for the log.
    pub snapshot_index: u64,
    /// The log is purged through this index.
    pub purged_index: u64,
}

impl Replica {
    /// Leaves nothing in this replica's files that was written at or before log index
    /// `upto` and is no longer part of the state: waits until `upto` is applied, builds a
    /// snapshot covering it (replacing the older snapshot file), purges the log through
    /// it, then flushes and compacts every column family down to the last level, which
    /// drops overwritten values and deleted log entries from the SST files and retires
    /// the WAL files that held them.
    ///
    /// Followers that lag behind `upto` afterwards catch up from the snapshot instead of
    /// the log, which is why this runs only when asked (after a key rotation).
    pub async fn drop_history(&self, upto: u64, within: Duration) -> Result<DroppedHistory, Error> {
        let deadline = tokio::time::Instant::now() + within;
        let mut metrics = self.raft.metrics();
        let mut asked = None::<tokio::time::Instant>;
        let (snapshot_index, purged_index) = loop {
            let (applied, snapshot, purged) = {
                let m = metrics.borrow_and_update();
                (
                    m.last_applied.map_or(0, |l| l.index),
                    m.snapshot.map_or(0, |l| l.index),
                    m.purged.map_or(0, |l| l.index),
                )
            };
            if snapshot >= upto && purged >= upto {
                break (snapshot, purged);
            }
            let now = tokio::time::Instant::now();
            if applied >= upto && asked.is_none_or(|at| now >= at + RETRIGGER) {
                let trigger = self.raft.trigger();
                if snapshot < upto {
                    trigger.snapshot().await
                } else {
                    trigger.purge_log(snapshot).await
                }
                .map_err(|e| Error::Raft(e.to_string()))?;
                asked = Some(now);
            }
            let wait = deadline.saturating_duration_since(now).min(RETRIGGER);
            if wait.is_zero() {
                return Err(Error::Timeout(within));
            }
            // A timeout only means "look again"; a closed channel means Raft stopped.
            if let Ok(Err(_)) = tokio::time::timeout(wait, metrics.changed()).await {
                return Err(Error::Raft("Raft has shut down".into()));
            }
        };
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || compact_everything(&db))
            .await
            .map_err(|e| Error::Raft(format!("compaction task failed: {e}")))??;
        Ok(DroppedHistory {
            snapshot_index,
            purged_index,
        })
    }
}

/// Flushes every memtable and rewrites every column family into its last level. With
/// bottommost compaction forced, RocksDB rewrites even files already at the last level,
/// so a value's older versions and the log's range deletions are dropped rather than kept
/// in a file nobody compacts again.
fn compact_everything(db: &rocksdb::DB) -> Result<(), Error> {
    db.flush_wal(true).map_err(Error::db)?;
    let mut options = rocksdb::CompactOptions::default();
    options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
    options.set_exclusive_manual_compaction(true);
    for cf in crate::store::ALL_CFS {
        let handle = db.cf_handle(cf).expect("column family created at open");
        db.flush_cf(handle).map_err(Error::db)?;
        db.compact_range_cf_opt(handle, None::<&[u8]>, None::<&[u8]>, &options);
    }
    Ok(())
}
