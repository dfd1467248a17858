//! Opening the node's one RocksDB (raft-store/DESIGN.md, "One RocksDB, group commit"):
//! column families for Raft metadata (vote, committed, last purged), the log, and the state
//! machine's data and metadata, plus the directory for snapshot files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::Error;

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_LOGS: &str = "logs";
pub(crate) const CF_SM_DATA: &str = "sm_data";
pub(crate) const CF_SM_META: &str = "sm_meta";
pub(crate) const ALL_CFS: [&str; 4] = [CF_META, CF_LOGS, CF_SM_DATA, CF_SM_META];

/// Bytes all memtables together may hold before RocksDB flushes the largest. A memtable
/// fills and empties over and over, so this budget is the saw-tooth a node's resident
/// memory rides on under a steady write load; it is kept small against the node's state
/// (tens of MB at 100,000 AORs) so that memory stays flat while the load does. A flush
/// of a smaller memtable writes a smaller file, and compactions come more often but each
/// rewrites as little.
const MEMTABLE_BUDGET: usize = 12 << 20;
/// Bytes one memtable of the state's column families may hold before it is flushed.
const STATE_MEMTABLE: usize = 8 << 20;
/// Bytes the log's memtable may hold. Log entries are read back only by a follower that
/// lags (the newest come from the log cache) and are deleted by the purge that follows
/// each snapshot, so holding them in memory buys little: a small memtable keeps them from
/// filling the budget the state's reads gain from.
const LOG_MEMTABLE: usize = 4 << 20;
/// Bytes of the one block cache every column family shares.
const BLOCK_CACHE: usize = 16 << 20;

/// What a RocksDB instance holds in memory, by its own estimates: its memtables, the
/// readers of its table files (their index and filter blocks, unless the block cache holds
/// them) and its block cache. Reported in the metrics, so a node's memory can be told
/// apart from what its stores hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreMemory {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
}

impl StoreMemory {
    /// Summed over `families` (none: the default family), the block cache counted once,
    /// as the families share it.
    pub fn of(db: &DB, families: &[&rocksdb::ColumnFamily]) -> StoreMemory {
        let mut m = StoreMemory::default();
        let mut add = |read: &dyn Fn(&str) -> Option<u64>| {
            m.memtables += read("rocksdb.cur-size-all-mem-tables").unwrap_or(0);
            m.table_readers += read("rocksdb.estimate-table-readers-mem").unwrap_or(0);
            m.block_cache = m
                .block_cache
                .max(read("rocksdb.block-cache-usage").unwrap_or(0));
        };
        if families.is_empty() {
            add(&|name| db.property_int_value(name).ok().flatten());
        }
        for cf in families {
            add(&|name| db.property_int_value_cf(*cf, name).ok().flatten());
        }
        m
    }
}

/// Opens (creating if needed) RocksDB in `dir/db` with every column family, and the
/// directory `dir/snapshots` for the newest snapshot, which it returns.
pub(crate) fn open_db(dir: &Path) -> Result<(Arc<DB>, PathBuf), Error> {
    let db_dir = dir.join("db");
    let snapshot_dir = dir.join("snapshots");
    std::fs::create_dir_all(&snapshot_dir)
        .map_err(|e| Error::Io(format!("creating {}: {e}", snapshot_dir.display())))?;
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Small state, few files: keep RocksDB's own log and file handles modest.
    options.set_keep_log_file_num(4);
    options.set_max_open_files(256);
    // Memory is budgeted, not left to per-family defaults (64 MiB of memtable and a block
    // cache per column family): every memtable together stays under MEMTABLE_BUDGET (the
    // largest is flushed first), and one block cache serves every family. A node's
    // resident memory then grows with its state, not with its write history.
    options.set_db_write_buffer_size(MEMTABLE_BUDGET);
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE);
    let family_options = |name: &str| {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        let mut o = Options::default();
        o.set_block_based_table_factory(&table);
        o.set_write_buffer_size(if name == CF_LOGS {
            LOG_MEMTABLE
        } else {
            STATE_MEMTABLE
        });
        o
    };
    let families = ALL_CFS
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, family_options(name)));
    let db = DB::open_cf_descriptors(&options, &db_dir, families)
        .map_err(|e| Error::Db(format!("opening {}: {e}", db_dir.display())))?;
    Ok((Arc::new(db), snapshot_dir))
}
