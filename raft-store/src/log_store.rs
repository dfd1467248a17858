//! The Raft log and vote in RocksDB (raft-store/DESIGN.md, "One RocksDB, group commit"),
//! implementing openraft's `RaftLogStorage` (storage-v2).
//!
//! Log entries live in the `logs` column family under their index as a big-endian u64, so
//! key order is log order, with postcard-encoded values. Appends are group-committed:
//! `append` writes the batch without syncing and hands openraft's completion callback to
//! one flusher thread, which fsyncs the WAL once for everything queued since its last
//! sync and then completes the callbacks in order. The vote is synced before `save_vote`
//! returns. Truncation and purging are atomic batches.
//!
//! The newest entries are also kept in memory ([`LogCache`], a few MiB): replication to
//! each follower and applying read back what was just appended, and serving those reads
//! from RocksDB cost the leader more than the append itself.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use crate::store::{CF_LOGS, CF_META};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Group-commit figures, for metrics and benchmarks: appends, WAL fsyncs, and how long
/// the fsyncs took, in total and as a histogram. Every write waits for its entry's fsync,
/// on the leader and on a majority, so a slow fsync is latency every caller of the write
/// path sees; the total alone cannot tell a steady 2 ms from a 200 ms stall behind a
/// memtable flush.
#[derive(Debug, Default)]
pub struct LogStats {
    pub appends: AtomicU64,
    pub wal_syncs: AtomicU64,
    pub sync_nanos_total: AtomicU64,
    pub sync_buckets: [AtomicU64; SYNC_BUCKETS],
}

/// Buckets of [`LogStats::sync_buckets`].
pub const SYNC_BUCKETS: usize = 13;

impl LogStats {
    /// The upper bound of bucket `i` in microseconds: 250 µs doubling to 512 ms, then the
    /// last bucket, which has none.
    pub fn sync_bucket_bound_micros(i: usize) -> Option<u64> {
        (i + 1 < SYNC_BUCKETS).then(|| 250u64 << i)
    }

    fn record_sync(&self, nanos: u64) {
        self.sync_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        self.wal_syncs.fetch_add(1, Ordering::Relaxed);
        let bucket = (0..SYNC_BUCKETS)
            .find(|&i| Self::sync_bucket_bound_micros(i).is_none_or(|b| nanos <= b * 1_000))
            .unwrap_or(SYNC_BUCKETS - 1);
        self.sync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// Bytes of encoded entries the [`LogCache`] holds at most. It serves the leader's reads
/// of what it has just appended, to replicate; a follower that lags further back reads
/// RocksDB, where recent entries are still in the memtable. Every snapshot's purge empties
/// most of it and it fills again, so the node's memory rides on a saw-tooth of about twice
/// this (entries decoded): 4 MiB moved a follower's memory by 9-10 MB between snapshots in
/// a soak at 180 writes a second. A binding's write encodes to a few hundred bytes, so 1
/// MiB still holds thousands of writes: more than half a second of a storm at 6,000 a
/// second.
const CACHE_BYTES: usize = 1 << 20;

/// The newest log entries, by index, with their encoded sizes. Always a contiguous run
/// that ends at the last appended entry (or empty), so any range that starts inside it
/// is wholly inside it.
#[derive(Default)]
pub struct LogCache {
    entries: BTreeMap<u64, (Entry, usize)>,
    bytes: usize,
}

impl LogCache {
    /// Records appended entries: `first` is the index of the first of them.
    fn appended(&mut self, first: u64, entries: Vec<(Entry, usize)>) {
        let follows = self
            .entries
            .last_key_value()
            .is_some_and(|(&last, _)| last + 1 >= first);
        if !follows {
            self.clear();
        }
        self.remove_from(first);
        for (entry, size) in entries {
            self.bytes += size;
            self.entries.insert(entry.log_id.index, (entry, size));
        }
        while self.bytes > CACHE_BYTES {
            match self.entries.pop_first() {
                Some((_, (_, size))) => self.bytes -= size,
                None => break,
            }
        }
    }

    /// Drops the entries at `index` and after (a truncation).
    fn remove_from(&mut self, index: u64) {
        for (_, (_, size)) in self.entries.split_off(&index) {
            self.bytes -= size;
        }
    }

    /// Drops the entries up to and including `index` (a purge).
    fn remove_through(&mut self, index: u64) {
        let kept = self.entries.split_off(&(index + 1));
        let dropped = std::mem::replace(&mut self.entries, kept);
        for (_, (_, size)) in dropped {
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries of `range` if the cache holds its start, else `None`.
    fn get<RB: RangeBounds<u64>>(&self, start: u64, range: &RB) -> Option<Vec<Entry>> {
        let (&first, _) = self.entries.first_key_value()?;
        if start < first {
            return None;
        }
        Some(
            self.entries
                .range(start..)
                .take_while(|(i, _)| range.contains(*i))
                .map(|(_, (e, _))| e.clone())
                .collect(),
        )
    }
}

/// The log store. Cloning is cheap; clones share the database and the flusher.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: Arc<Flusher>,
    stats: Arc<LogStats>,
    cache: Arc<Mutex<LogCache>>,
    /// The newest committed log id not yet written: it goes into the next append's batch
    /// (see `save_committed`).
    committed: Arc<Mutex<Option<Option<LogId>>>>,
}

fn io_err(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> LogStore {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let stats = Arc::new(LogStats::default());
        // The flusher must not keep the database open: RocksDB has to be closed before the
        // process exits, and a thread parked in `recv` would keep it alive forever.
        let flusher_db = Arc::downgrade(&db);
        let flusher_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || flush_loop(flusher_db, rx, flusher_stats))
            .expect("spawning the log flusher thread");
        LogStore {
            db,
            flusher: Arc::new(Flusher {
                queue: Some(tx),
                thread: Some(thread),
            }),
            stats,
            cache: Arc::default(),
            committed: Arc::default(),
        }
    }

    /// Adds the committed log id that `save_committed` left for later to `batch`.
    fn take_committed_into(&self, batch: &mut WriteBatch) {
        if let Some(committed) = self.committed.lock().expect("committed").take() {
            batch.put_cf(
                self.cf(CF_META),
                KEY_COMMITTED,
                postcard::to_stdvec(&committed).expect("encode log id"),
            );
        }
    }

    pub(crate) fn db_handle(&self) -> Arc<DB> {
        self.db.clone()
    }

    pub(crate) fn stats_handle(&self) -> Arc<LogStats> {
        self.stats.clone()
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let raw = self
            .db
            .get_cf(self.cf(CF_META), key)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        raw.map(|v| {
            postcard::from_bytes(&v).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))
        })
        .transpose()
    }

    fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut it = self.db.iterator_cf(self.cf(CF_LOGS), IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) =
                    item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let entry: Entry = postcard::from_bytes(&value)
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Ok(Some(entry.log_id))
            }
        }
    }

    fn write_synced(
        &self,
        batch: WriteBatch,
        subject: ErrorSubject<u64>,
    ) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))
    }
}

/// One WAL fsync for every append queued since the last one, then the callbacks in order.
/// The flusher thread and its queue, shared by a log store's clones. When the last clone
/// goes, the queue closes and the thread is waited for: a flush it is still doing holds
/// the database, and RocksDB must be closed before the process exits: a database closed
/// by another thread while the process runs its exit handlers aborts it ("pthread lock:
/// Invalid argument"), after a command such as `tandem cluster init` has done its work.
struct Flusher {
    queue: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // Never the flusher waiting for itself (a callback that dropped the last clone).
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

fn flush_loop(
    db: std::sync::Weak<DB>,
    rx: mpsc::Receiver<LogFlushed<TypeConfig>>,
    stats: Arc<LogStats>,
) {
    while let Ok(first) = rx.recv() {
        let mut pending = vec![first];
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let Some(db) = db.upgrade() else {
            for callback in pending {
                callback.log_io_completed(Err(std::io::Error::other("the log store is closed")));
            }
            return;
        };
        #[allow(clippy::disallowed_types)] // measuring fsync latency on a plain thread
        let started = std::time::Instant::now();
        let result = db.flush_wal(true);
        stats.record_sync(started.elapsed().as_nanos() as u64);
        // Let go of the database before anyone hears the sync is done: whoever closes the
        // store next must not find this thread holding it.
        drop(db);
        for callback in pending {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            callback.log_io_completed(r);
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&n) => n,
            Bound::Excluded(&n) => n + 1,
            Bound::Unbounded => 0,
        };
        if let Some(cached) = self.cache.lock().expect("log cache").get(start, &range) {
            return Ok(cached);
        }
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_LOGS),
            IteratorMode::From(&index_key(start), Direction::Forward),
        );
        for item in it {
            let (key, value) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let index = u64::from_be_bytes(key.as_ref().try_into().map_err(|_| {
                StorageError::from(StorageIOError::read_logs(AnyError::error(
                    "log key is not 8 bytes",
                )))
            })?);
            if !range.contains(&index) {
                break;
            }
            out.push(
                postcard::from_bytes(&value)
                    .map_err(|e| io_err(ErrorSubject::LogIndex(index), ErrorVerb::Read, e))?,
            );
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META),
            KEY_VOTE,
            postcard::to_stdvec(vote).expect("encode vote"),
        );
        self.write_synced(batch, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Written with the next append rather than on its own: openraft saves it after
        // every commit, and a write of its own cost a WAL record and a system call each
        // time (about 1% of the leader's CPU in a profile of a registration storm). It is
        // a lower bound that openraft uses only at startup, to apply what was committed
        // before the stop without waiting for a leader; one older by a few entries, or
        // lost with a crash, only means those entries are applied once a leader's commit
        // index arrives.
        *self.committed.lock().expect("committed") = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        if let Some(pending) = *self.committed.lock().expect("committed") {
            return Ok(pending);
        }
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        self.take_committed_into(&mut batch);
        let cf = self.cf(CF_LOGS);
        let mut cached = Vec::new();
        for entry in entries {
            let value = postcard::to_stdvec(&entry)
                .map_err(|e| io_err(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
            batch.put_cf(cf, index_key(entry.log_id.index), &value);
            cached.push((entry, value.len()));
        }
        let first = cached.first().map(|(e, _)| e.log_id.index);
        let written = self.db.write(batch);
        let mut cache = self.cache.lock().expect("log cache");
        match (&written, first) {
            (Ok(()), Some(first)) => cache.appended(first, cached),
            // Whatever RocksDB holds now, the cache must not claim otherwise.
            (Err(_), _) => cache.clear(),
            (Ok(()), None) => {}
        }
        drop(cache);
        written.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        let sent = match &self.flusher.queue {
            Some(queue) => queue.send(callback),
            None => Err(mpsc::SendError(callback)),
        };
        if let Err(mpsc::SendError(callback)) = sent {
            callback.log_io_completed(Err(std::io::Error::other("log flusher has stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOGS), index_key(log_id.index), [0xff; 8]);
        self.cache
            .lock()
            .expect("log cache")
            .remove_from(log_id.index);
        self.write_synced(batch, ErrorSubject::Logs)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META),
            KEY_LAST_PURGED,
            postcard::to_stdvec(&log_id).expect("encode log id"),
        );
        batch.delete_range_cf(self.cf(CF_LOGS), index_key(0), index_key(log_id.index + 1));
        self.cache
            .lock()
            .expect("log cache")
            .remove_through(log_id.index);
        self.write_synced(batch, ErrorSubject::Logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> (Entry, usize) {
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        };
        (e, CACHE_BYTES / 4)
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn the_cache_holds_a_bounded_contiguous_suffix_of_the_log() {
        let mut c = LogCache::default();
        c.appended(1, vec![entry(1), entry(2)]);
        c.appended(3, vec![entry(3)]);
        assert_eq!(indexes(c.get(2, &(2..))), Some(vec![2, 3]));
        assert_eq!(indexes(c.get(1, &(1..3))), Some(vec![1, 2]));
        // Past the byte bound the oldest go; a range starting before the cache is a miss.
        c.appended(4, vec![entry(4), entry(5)]);
        assert_eq!(c.bytes, CACHE_BYTES);
        assert_eq!(indexes(c.get(1, &(1..))), None);
        assert_eq!(indexes(c.get(2, &(2..))), Some(vec![2, 3, 4, 5]));
        // A truncation drops the tail; an append over it replaces what was there.
        c.remove_from(4);
        assert_eq!(indexes(c.get(2, &(2..))), Some(vec![2, 3]));
        c.appended(3, vec![entry(3), entry(4)]);
        assert_eq!(indexes(c.get(2, &(2..))), Some(vec![2, 3, 4]));
        // A purge drops the head.
        c.remove_through(3);
        assert_eq!(indexes(c.get(3, &(3..))), None);
        assert_eq!(indexes(c.get(4, &(4..))), Some(vec![4]));
        // An append that leaves a gap starts the cache afresh, so it stays contiguous.
        c.appended(9, vec![entry(9)]);
        assert_eq!(indexes(c.get(4, &(4..))), None);
        assert_eq!(indexes(c.get(9, &(9..))), Some(vec![9]));
        assert_eq!(c.bytes, CACHE_BYTES / 4);
    }

    #[test]
    fn an_fsync_is_counted_in_the_first_bucket_its_time_fits() {
        let stats = LogStats::default();
        for micros in [1, 250, 251, 3_000, 512_000, 512_001, 10_000_000] {
            stats.record_sync(micros * 1_000);
        }
        let counts: Vec<u64> = stats
            .sync_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        // 250 µs, 500 µs, … 4 ms (bucket 4), … 512 ms (bucket 11), then the rest.
        assert_eq!(counts, [2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(stats.wal_syncs.load(Ordering::Relaxed), 7);
        assert_eq!(LogStats::sync_bucket_bound_micros(11), Some(512_000));
        assert_eq!(LogStats::sync_bucket_bound_micros(12), None);
    }
}
