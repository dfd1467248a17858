//! The data disk's free space, watched: below `node.min_free_disk_mib` the node refuses
//! writes of its own (`Replica::block_writes`) and `/ready` says why, until the space is
//! back (node/DESIGN.md, "A full disk").
//!
//! RocksDB that runs out of room mid-write stops Raft on this node for good (a storage
//! fault is fatal to openraft) and may leave a flush half done; a node that stops short
//! of that keeps applying what the leader sends into the room it kept, and its callers
//! (admin clients, phones through their DNS SRV list) go to another node meanwhile.

use std::path::PathBuf;
use std::time::Duration;

use tandem_raft_store::replica::Replica;
use tokio_util::sync::CancellationToken;

/// How often the free space is read (one `statvfs`).
const EVERY: Duration = Duration::from_secs(1);

/// Free bytes for an unprivileged writer on the file system that holds `dir`.
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Blocks and unblocks this node's writes as the free space under `dir` crosses
/// `min_free_mib`, until `stop`.
pub async fn watch(replica: Replica, dir: PathBuf, min_free_mib: u64, stop: CancellationToken) {
    let min = min_free_mib.saturating_mul(1 << 20);
    let mut blocked = false;
    loop {
        match free_bytes(&dir) {
            Ok(free) if free < min && !blocked => {
                let reason = format!(
                    "the data disk has {} MiB free, under node.min_free_disk_mib ({min_free_mib}): \
                     this node takes no writes until there is room",
                    free >> 20
                );
                tracing::error!(dir = %dir.display(), free_mib = free >> 20, "{reason}");
                replica.block_writes(Some(reason));
                blocked = true;
            }
            Ok(free) if free >= min && blocked => {
                tracing::warn!(dir = %dir.display(), free_mib = free >> 20, "the data disk has room again: taking writes");
                replica.block_writes(None);
                blocked = false;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the data disk's free space")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
