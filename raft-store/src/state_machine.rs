//! openraft's `RaftStateMachine` over the `sm_data` and `sm_meta` column families.
//!
//! `apply` turns a run of log entries into one atomic, unsynced write batch: the next WAL
//! sync of a log append covers it, and after a crash the entries since the last durable
//! `last_applied` are applied again. Snapshots are built from one RocksDB snapshot, so the
//! data, `last_applied` and membership in a snapshot always agree. The newest snapshot is
//! kept as a file in the data directory and replaced atomically.
//!
//! The index of bindings by expiry lives in memory (`state.rs`, `ExpiryIndex`). Releases
//! before it moved there kept it in RocksDB, beside `last_applied` the log id it was
//! complete at, and left it out of snapshots; a node deletes both when it opens a data dir
//! such a release wrote, so that release, run again on it, finds its index incomplete and
//! builds it afresh.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::state::{is_derived, StateReader, Txn};
use crate::store::{CF_SM_DATA, CF_SM_META};
use crate::types::{
    Entry, LogId, Response, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
/// The `last_applied` as of which an older release's index by expiry was complete.
const KEY_EXPIRY_INDEX: &[u8] = b"expiry_index";
const SNAPSHOT_FILE: &str = "current.snapshot";

/// What a snapshot's bytes hold, as read (borrowed from them) when one is installed.
/// `build_snapshot_now` writes the same encoding piece by piece.
#[derive(Serialize, Deserialize)]
struct SnapshotContent<'a> {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    #[serde(borrow)]
    records: Vec<(&'a [u8], &'a [u8])>,
}

/// The snapshot file's layout: its metadata and the bytes openraft transfers. It is
/// written and read in pieces (`save_snapshot_file`, `read_snapshot_file`), never whole;
/// the tests hold those pieces to this type, which earlier releases wrote whole.
#[cfg(test)]
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

fn decode<T: serde::de::DeserializeOwned>(v: Option<Vec<u8>>) -> Result<Option<T>, StorageError> {
    v.map(|v| postcard::from_bytes(&v).map_err(|e| snap_err(ErrorVerb::Read, e)))
        .transpose()
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    reader: StateReader,
    snapshot_dir: PathBuf,
}

impl StateMachine {
    pub(crate) fn new(db: Arc<DB>, snapshot_dir: PathBuf) -> StateMachine {
        StateMachine {
            reader: StateReader::new(db.clone()),
            db,
            snapshot_dir,
        }
    }

    /// Deletes the index of bindings by expiry an older release kept in RocksDB, and its
    /// note of when it was complete, if they are there. Runs before Raft starts.
    pub(crate) fn drop_stored_expiry_index(&self) -> Result<(), StorageError> {
        let meta = self.cf(CF_SM_META);
        let noted = self
            .db
            .get_cf(meta, KEY_EXPIRY_INDEX)
            .map_err(|e| sm_err(ErrorVerb::Read, e))?
            .is_some();
        let mut batch = WriteBatch::default();
        let stored = self
            .reader
            .drop_stored_expiry_index(&mut batch)
            .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        if !noted && !stored {
            return Ok(());
        }
        batch.delete_cf(meta, KEY_EXPIRY_INDEX);
        self.db
            .write(batch)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        tracing::info!("dropped the index of bindings by expiry an older release kept on disk");
        Ok(())
    }

    /// Local reads of the replicated state.
    pub fn reader(&self) -> StateReader {
        self.reader.clone()
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self
            .db
            .get_cf(self.cf(CF_SM_META), key)
            .map_err(|e| sm_err(ErrorVerb::Read, e))?
        {
            Some(v) => postcard::from_bytes(&v)
                .map(Some)
                .map_err(|e| sm_err(ErrorVerb::Read, e)),
            None => Ok(None),
        }
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snapshot_dir.join(SNAPSHOT_FILE)
    }

    /// Writes the snapshot file, an encoded [`SnapshotFile`], without holding its bytes in
    /// memory: the header, then `write_data`, which must write exactly `data_len` bytes.
    /// The file replaces the previous one atomically.
    fn save_snapshot_file(
        &self,
        meta: &SnapshotMeta,
        data_len: usize,
        write_data: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(), StorageError> {
        use std::io::Write;
        let encode = |e: postcard::Error| std::io::Error::other(e);
        let tmp = self.snapshot_dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let file = SyncedEvery::new(std::fs::File::create(&tmp)?);
            let mut f = Counted::new(std::io::BufWriter::new(file));
            // A postcard `Vec<u8>` is its length, then its bytes.
            f.write_all(&postcard::to_stdvec(meta).map_err(encode)?)?;
            f.write_all(&postcard::to_stdvec(&data_len).map_err(encode)?)?;
            let header = f.written;
            write_data(&mut f)?;
            if f.written - header != data_len {
                return Err(std::io::Error::other(format!(
                    "the snapshot's data came to {} bytes, not the {data_len} announced",
                    f.written - header
                )));
            }
            let file = f.inner.into_inner().map_err(|e| e.into_error())?.file;
            file.sync_all()?;
            std::fs::rename(&tmp, self.snapshot_path())?;
            std::fs::File::open(&self.snapshot_dir)?.sync_all()
        };
        write().map_err(|e| snap_err(ErrorVerb::Write, e))
    }

    /// The newest snapshot's metadata and data, read from its file: one copy of the data
    /// in memory, the header cut off in place.
    fn read_snapshot_file(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let mut bytes = match std::fs::read(self.snapshot_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(snap_err(ErrorVerb::Read, e)),
        };
        let bad = |e: postcard::Error| snap_err(ErrorVerb::Read, e);
        let (meta, rest) = postcard::take_from_bytes::<SnapshotMeta>(&bytes).map_err(bad)?;
        let (len, rest) = postcard::take_from_bytes::<usize>(rest).map_err(bad)?;
        if rest.len() != len {
            return Err(snap_err(
                ErrorVerb::Read,
                format!(
                    "the snapshot file holds {} bytes of data, not {len}",
                    rest.len()
                ),
            ));
        }
        let header = bytes.len() - len;
        bytes.drain(..header);
        Ok(Some((meta, bytes)))
    }
}

/// A file that is synced after every [`SYNC_EVERY`] bytes written to it, so that a
/// snapshot's megabytes reach the disk a little at a time: one fsync of them all at the end
/// can hold up the log's own fsyncs behind it (a journaling filesystem such as ext4 flushes
/// the data written before a commit with it), and with them every write the cluster
/// acknowledges.
struct SyncedEvery {
    file: std::fs::File,
    unsynced: usize,
}

/// See [`SyncedEvery`].
const SYNC_EVERY: usize = 1 << 20;

impl SyncedEvery {
    fn new(file: std::fs::File) -> SyncedEvery {
        SyncedEvery { file, unsynced: 0 }
    }
}

impl std::io::Write for SyncedEvery {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Keeps a snapshot build to about a quarter of one core: after each [`PACE_WORK`] of work
/// it sleeps [`PACE_REST`]. A snapshot is background work that nothing waits for, but at
/// full speed it takes a busy node's cores from the SIP thread for a second or two, and the
/// requests queued meanwhile wait that long (BENCHMARKS.md, the soak of 2026-12-07).
struct Pacer {
    slice_start: tokio::time::Instant,
}

const PACE_WORK: std::time::Duration = std::time::Duration::from_millis(5);
const PACE_REST: std::time::Duration = std::time::Duration::from_millis(15);

impl Pacer {
    fn new() -> Pacer {
        Pacer {
            slice_start: tokio::time::Instant::now(),
        }
    }

    /// Called once per record: rests if this slice of work is used up.
    fn tick(&mut self) {
        if self.slice_start.elapsed() >= PACE_WORK {
            std::thread::sleep(PACE_REST);
            self.slice_start = tokio::time::Instant::now();
        }
    }
}

/// A writer that counts the bytes written through it.
struct Counted<W> {
    inner: W,
    written: usize,
}

impl<W> Counted<W> {
    fn new(inner: W) -> Counted<W> {
        Counted { inner, written: 0 }
    }
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Runs a long, blocking store job (reading or writing every record) on tokio's blocking
/// pool, so that a node with one runtime thread goes on serving SIP meanwhile.
async fn off_runtime<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let this = self.clone();
        off_runtime(move || this.build_snapshot_now()).await
    }
}

impl StateMachine {
    fn build_snapshot_now(&self) -> Result<Snapshot, StorageError> {
        let snap = self.db.snapshot();
        let read = |cf: &str, key: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            snap.get_cf(self.cf(cf), key)
                .map_err(|e| snap_err(ErrorVerb::Read, e))
        };
        let last_applied: Option<LogId> = decode(read(CF_SM_META, KEY_LAST_APPLIED)?)?;
        let membership: StoredMembership =
            decode(read(CF_SM_META, KEY_MEMBERSHIP)?)?.unwrap_or_default();
        // The records are encoded straight into the file, in two passes over the same
        // RocksDB snapshot: the first sizes them, since the file announces the data's
        // length before the data. The whole state is never held in memory at once.
        let records = || {
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&snap);
            // A scan of everything, read once: caching its blocks would evict what the
            // node's own reads keep there, and fill the whole block cache at the first
            // snapshot on a node whose own reads need little of it (a follower), a
            // step in its memory minutes into a steady load.
            opts.fill_cache(false);
            self.db
                .iterator_cf_opt(self.cf(CF_SM_DATA), opts, IteratorMode::Start)
                .filter(|item| !item.as_ref().is_ok_and(|(k, _)| is_derived(k)))
        };
        let encode = |e: postcard::Error| snap_err(ErrorVerb::Write, e);
        let (mut count, mut records_len) = (0usize, 0usize);
        let mut pacer = Pacer::new();
        for item in records() {
            pacer.tick();
            let (k, v) = item.map_err(|e| snap_err(ErrorVerb::Read, e))?;
            count += 1;
            records_len += postcard::experimental::serialized_size(&(&*k, &*v)).map_err(encode)?;
        }
        // Encoded as a `SnapshotContent`: its fields in order, the records as a sequence.
        let head = postcard::to_stdvec(&(&last_applied, &membership)).map_err(encode)?;
        let count_bytes = postcard::to_stdvec(&count).map_err(encode)?;
        let data_len = head.len() + count_bytes.len() + records_len;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{stamp:x}", l.leader_id, l.index),
            None => format!("none-{stamp:x}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save_snapshot_file(&meta, data_len, |out| {
            out.write_all(&head)?;
            out.write_all(&count_bytes)?;
            for item in records() {
                pacer.tick();
                let (k, v) = item.map_err(std::io::Error::other)?;
                postcard::to_io(&(&*k, &*v), &mut *out).map_err(std::io::Error::other)?;
            }
            Ok(())
        })?;
        // openraft 0.9 keeps only the metadata of a snapshot it had built; the data goes
        // to whoever calls with this, read back as one copy.
        let (_, data) = self
            .read_snapshot_file()?
            .ok_or_else(|| snap_err(ErrorVerb::Read, "the snapshot just written is gone"))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    fn install_snapshot_now(&self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), StorageError> {
        // Borrowed from `data`: the records are copied only into the write batch.
        let content: SnapshotContent<'_> =
            postcard::from_bytes(&data).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let mut batch = WriteBatch::default();
        let cf_data = self.cf(CF_SM_DATA);
        // Everything the snapshot does not hold must go: delete the whole key space.
        batch.delete_range_cf(cf_data, [0u8].as_slice(), [0xffu8; 16].as_slice());
        for (k, v) in &content.records {
            if !is_derived(k) {
                batch.put_cf(cf_data, k, v);
            }
        }
        let cf_meta = self.cf(CF_SM_META);
        match meta.last_log_id {
            Some(l) => batch.put_cf(
                cf_meta,
                KEY_LAST_APPLIED,
                postcard::to_stdvec(&l).expect("encode log id"),
            ),
            None => batch.delete_cf(cf_meta, KEY_LAST_APPLIED),
        }
        batch.put_cf(
            cf_meta,
            KEY_MEMBERSHIP,
            postcard::to_stdvec(&meta.last_membership).expect("encode membership"),
        );
        // An older release's note that its index on disk was complete goes with the index.
        batch.delete_cf(cf_meta, KEY_EXPIRY_INDEX);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        // At once: until then a reader would go on trusting what it derived from the
        // accounts and providers the snapshot replaced (a login whose password it changed).
        self.reader.accounts_replaced();
        self.reader.providers_changed();
        self.reader
            .load_bindings()
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        self.save_snapshot_file(meta, data.len(), |out| out.write_all(&data))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((
            self.meta(KEY_LAST_APPLIED)?,
            self.meta(KEY_MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut txn = Txn::new(&self.reader);
        let mut responses = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        let mut accounts_changed: Vec<(String, String)> = Vec::new();
        let mut providers_changed = false;
        for entry in entries {
            last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::default()),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    responses.push(Response::default());
                }
                EntryPayload::Normal(request) => {
                    let mut results = Vec::with_capacity(request.commands.len());
                    let failed = |e: crate::Error| {
                        StorageError::from(StorageIOError::apply(
                            entry.log_id,
                            AnyError::error(e.to_string()),
                        ))
                    };
                    for encoded in &request.commands {
                        if let Some(result) = txn.apply_binding_write(encoded) {
                            results.push(result.map_err(failed)?);
                            continue;
                        }
                        // A command this binary does not know stops the state machine rather
                        // than being skipped: skipping would make replicas diverge.
                        let command = Command::decode(encoded).map_err(failed)?;
                        match &command {
                            Command::PutAccount(a) => {
                                accounts_changed.push((a.domain.clone(), a.user.clone()));
                            }
                            Command::DeleteAccount { user, domain } => {
                                accounts_changed.push((domain.clone(), user.clone()));
                            }
                            _ => {}
                        }
                        providers_changed |= matches!(
                            command,
                            Command::PutProviderAccount(_)
                                | Command::DeleteProviderAccount { .. }
                                | Command::ResealProviderAccount { .. }
                                | Command::GrantLease { .. }
                                | Command::ReleaseLeaseAsked { .. }
                                | Command::DropLease { .. }
                        );
                        let result = txn.apply(command).map_err(failed)?;
                        results.push(result);
                    }
                    responses.push(Response { results });
                }
            }
        }
        let mut batch = WriteBatch::default();
        let edge_deltas = txn.edge_deltas();
        let expiry_changes = txn.expiry_changes();
        let binding_changes = txn.into_batch(self.cf(CF_SM_DATA), &mut batch);
        let meta = self.cf(CF_SM_META);
        if let Some(l) = last_applied {
            batch.put_cf(
                meta,
                KEY_LAST_APPLIED,
                postcard::to_stdvec(&l).expect("encode log id"),
            );
        }
        if let Some(m) = membership {
            batch.put_cf(
                meta,
                KEY_MEMBERSHIP,
                postcard::to_stdvec(&m).expect("encode membership"),
            );
        }
        self.db
            .write(batch)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        if !binding_changes.is_empty() {
            self.reader.bindings_written(&binding_changes);
        }
        if !expiry_changes.is_empty() {
            self.reader.expiries_changed(expiry_changes);
        }
        if !edge_deltas.is_empty() {
            self.reader.edges_changed(&edge_deltas);
        }
        if !accounts_changed.is_empty() {
            self.reader.accounts_changed(&accounts_changed);
        }
        if providers_changed {
            self.reader.providers_changed();
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let (this, meta) = (self.clone(), meta.clone());
        off_runtime(move || this.install_snapshot_now(&meta, snapshot.into_inner())).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.read_snapshot_file()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Account, Command};
    use crate::state::AccountsChanged;
    use crate::types::Request;
    use openraft::{CommittedLeaderId, LogId as RaftLogId};

    /// An account of customer c1 at example.com.
    fn account(user: String) -> Command {
        Command::PutAccount(Account {
            user,
            domain: "example.com".into(),
            customer: "c1".into(),
            ha1: vec![],
            enabled: true,
            max_contacts: 5,
            max_concurrent_calls: 2,
        })
    }

    /// A store holding 5,000 accounts in a table file (out of the memtable), so that a
    /// read goes through the block cache; and the bytes of those records.
    async fn accounts_in_a_table_file() -> (
        tempfile::TempDir,
        crate::log_store::LogStore,
        StateMachine,
        u64,
    ) {
        let commands = (0..5_000)
            .map(|i| account(format!("user-with-a-longish-name-{i}")).encode())
            .collect();
        let (dir, log, sm) = in_a_table_file(commands).await;
        let bytes = scan(&sm, false);
        (dir, log, sm, bytes)
    }

    /// A new store with `commands` applied as one entry and flushed to a table file.
    async fn in_a_table_file(
        commands: Vec<crate::command::EncodedCommand>,
    ) -> (tempfile::TempDir, crate::log_store::LogStore, StateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = crate::open(dir.path()).unwrap();
        let entry = Entry {
            log_id: RaftLogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Request { commands }),
        };
        sm.apply(vec![entry]).await.unwrap();
        sm.db.flush_cf(sm.cf(CF_SM_DATA)).unwrap();
        (dir, log, sm)
    }

    /// Reads every record, through the block cache if `cache`; the bytes read.
    fn scan(sm: &StateMachine, cache: bool) -> u64 {
        let mut opts = ReadOptions::default();
        opts.fill_cache(cache);
        sm.db
            .iterator_cf_opt(sm.cf(CF_SM_DATA), opts, IteratorMode::Start)
            .map(|item| item.unwrap().1.len() as u64)
            .sum()
    }

    fn block_cache(sm: &StateMachine) -> u64 {
        crate::StoreMemory::of(&sm.db, &[sm.cf(CF_SM_DATA)]).block_cache
    }

    /// A snapshot build reads the whole state once; it must not leave it in the block
    /// cache, which is the node's for its own reads (a follower's stood nearly empty
    /// until the first snapshot filled it, a step in its memory).
    #[tokio::test]
    async fn a_snapshot_build_leaves_the_block_cache_as_it_found_it() {
        // What a scan through the cache leaves there, so the test measures what it means to.
        let (_dir, _log, sm, bytes) = accounts_in_a_table_file().await;
        let before = block_cache(&sm);
        scan(&sm, true);
        assert!(
            block_cache(&sm) > before + bytes / 2,
            "a scan of {bytes} bytes took the block cache from {before} to {} bytes",
            block_cache(&sm)
        );
        let (_dir, _log, mut sm, _) = accounts_in_a_table_file().await;
        let before = block_cache(&sm);
        sm.build_snapshot().await.unwrap();
        let after = block_cache(&sm);
        assert!(
            after < before + bytes / 10,
            "a snapshot build of {bytes} bytes took the block cache from {before} to {after} bytes"
        );
    }

    /// An edge node's keepalives walk all of its bindings every interval (20 s by
    /// default); that walk must not fill the block cache either. It did: the node that
    /// took a soak's registrations filled its cache to the bound over 15 minutes, three
    /// quarters of its block reads being this walk's, a rise in memory the others did not
    /// have.
    #[tokio::test]
    async fn the_keepalive_walk_leaves_the_block_cache_as_it_found_it() {
        let commands = (0..5_000)
            .map(|i| {
                Command::PutBinding(crate::command::Binding {
                    aor: format!("sip:user-with-a-longish-name-{i}@example.com"),
                    contact: format!("<sip:u{i}@192.0.2.1:5060>"),
                    edge_node: 1,
                    ..crate::command::tests::sample_binding()
                })
                .encode()
            })
            .collect();
        let (_dir, _log, sm) = in_a_table_file(commands).await;
        let reader = sm.reader();
        let before = block_cache(&sm);
        let (mut after, mut walked) = (None, 0);
        loop {
            let (page, next) = reader
                .bindings_by_edge_page(1, after.as_deref(), 500)
                .unwrap();
            walked += page.len();
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(walked, 5_000);
        let grown = block_cache(&sm) - before;
        // The index alone is about 5,000 keys of 80 bytes: 400 KB through the cache.
        assert!(
            grown < 40_000,
            "walking 5,000 bindings took {grown} bytes of block cache"
        );
    }

    /// The snapshot written piece by piece is byte for byte what encoding it whole gave,
    /// so files written by earlier releases still read and the two can be mixed.
    #[tokio::test]
    async fn a_snapshot_is_streamed_in_the_layout_it_had_when_encoded_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = crate::open(dir.path()).unwrap();
        let commands: Vec<Command> = (0..300).map(|i| account(format!("u{i}"))).collect();
        let entry = Entry {
            log_id: RaftLogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Request {
                commands: commands.iter().map(Command::encode).collect(),
            }),
        };
        sm.apply(vec![entry]).await.unwrap();
        let built = sm.build_snapshot().await.unwrap();
        let file = std::fs::read(sm.snapshot_path()).unwrap();

        let mut records = Vec::new();
        for item in sm.db.iterator_cf(sm.cf(CF_SM_DATA), IteratorMode::Start) {
            let (k, v) = item.unwrap();
            if !is_derived(&k) {
                records.push((k.to_vec(), v.to_vec()));
            }
        }
        assert!(records.len() >= 300);
        let whole = SnapshotFile {
            meta: built.meta.clone(),
            data: postcard::to_stdvec(&SnapshotContent {
                last_applied: built.meta.last_log_id,
                membership: built.meta.last_membership.clone(),
                records: records.iter().map(|(k, v)| (&k[..], &v[..])).collect(),
            })
            .unwrap(),
        };
        assert_eq!(file, postcard::to_stdvec(&whole).unwrap());
        assert_eq!(built.snapshot.into_inner(), whole.data);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, whole.meta);
        assert_eq!(current.snapshot.into_inner(), whole.data);
    }

    fn entry(index: u64, commands: &[Command]) -> Entry {
        Entry {
            log_id: RaftLogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request {
                commands: commands.iter().map(Command::encode).collect(),
            }),
        }
    }

    /// A reader that derived something per account learns which accounts changed, and
    /// that it must take them all as changed when it fell too far behind or a snapshot
    /// replaced the state: the authenticator's opened logins depend on it.
    #[tokio::test]
    async fn the_reader_tells_which_accounts_changed_since_a_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = crate::open(dir.path()).unwrap();
        let reader = sm.reader();
        assert_eq!(
            reader.account_changes_since(0),
            (0, AccountsChanged::These(vec![]))
        );
        let deleted = Command::DeleteAccount {
            user: "b".into(),
            domain: "example.com".into(),
        };
        sm.apply(vec![entry(1, &[account("a".into()), deleted])])
            .await
            .unwrap();
        let (after_first, changed) = reader.account_changes_since(0);
        let AccountsChanged::These(mut changed) = changed else {
            panic!("{changed:?}")
        };
        changed.sort();
        assert_eq!(
            changed,
            [
                ("example.com".into(), "a".into()),
                ("example.com".into(), "b".into())
            ]
        );
        assert_eq!(after_first, reader.accounts_generation());
        assert!(reader.account_changed_since(0, "example.com", "a"));
        assert!(!reader.account_changed_since(0, "example.com", "c"));
        assert!(!reader.account_changed_since(after_first, "example.com", "a"));

        // More changes than are kept: a reader from before them must take all.
        let kept = crate::state::ACCOUNT_CHANGES_KEPT;
        let many: Vec<Command> = (0..kept + 10).map(|i| account(format!("u{i}"))).collect();
        sm.apply(vec![entry(2, &many)]).await.unwrap();
        let (now, changed) = reader.account_changes_since(after_first);
        assert_eq!(changed, AccountsChanged::All);
        assert!(reader.account_changed_since(after_first, "example.com", "a"));
        assert_eq!(
            reader.account_changes_since(now),
            (now, AccountsChanged::These(vec![]))
        );
        sm.apply(vec![entry(3, &[account("c".into())])])
            .await
            .unwrap();
        let (later, changed) = reader.account_changes_since(now);
        assert_eq!(
            changed,
            AccountsChanged::These(vec![("example.com".into(), "c".into())])
        );

        let built = sm.build_snapshot().await.unwrap();
        sm.install_snapshot(&built.meta, built.snapshot)
            .await
            .unwrap();
        assert_eq!(reader.account_changes_since(later).1, AccountsChanged::All);

        // Every account, a page at a time, each once, in key order.
        let mut seen = Vec::new();
        let mut after: Option<(String, String)> = None;
        loop {
            let page = reader
                .accounts_after(after.as_ref().map(|(d, u)| (d.as_str(), u.as_str())), 700)
                .unwrap();
            let Some(last) = page.last() else { break };
            after = Some((last.domain.clone(), last.user.clone()));
            seen.extend(page.into_iter().map(|a| a.user));
        }
        let mut expected: Vec<String> = (0..kept + 10).map(|i| format!("u{i}")).collect();
        expected.extend(["a".to_string(), "c".to_string()]);
        expected.sort();
        assert_eq!(seen, expected);
    }
}
