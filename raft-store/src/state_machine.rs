//! openraft's `RaftStateMachine` over the `sm_data` and `sm_meta` column families.
//!
//! `apply` turns a run of log entries into one atomic, unsynced write batch: the next WAL
//! sync of a log append covers it, and after a crash the entries since the last durable
//! `last_applied` are applied again. Snapshots are built from one RocksDB snapshot, so the
//! data, `last_applied` and membership in a snapshot always agree. The newest snapshot is
//! kept as a file in the data directory and replaced atomically.
//!
//! The index of bindings by expiry is derived data, left out of snapshots. Every apply
//! keeps it and records, beside `last_applied`, the log id it is complete at; when the two
//! differ at open (a data dir an older release wrote to) or after a snapshot is installed,
//! the index is built afresh from the bindings.

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
/// The `last_applied` as of which the index by expiry is complete.
const KEY_EXPIRY_INDEX: &[u8] = b"expiry_index";
const SNAPSHOT_FILE: &str = "current.snapshot";

/// What a snapshot's bytes hold.
#[derive(Serialize, Deserialize)]
struct SnapshotContent {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The snapshot file: its metadata and the bytes openraft transfers.
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

    /// Builds the index of bindings by expiry afresh unless it is complete as of
    /// `last_applied`. Runs before Raft starts.
    pub(crate) fn ensure_expiry_index(&self) -> Result<(), StorageError> {
        let meta = self.cf(CF_SM_META);
        let read = |key| {
            self.db
                .get_cf(meta, key)
                .map_err(|e| sm_err(ErrorVerb::Read, e))
        };
        let applied = read(KEY_LAST_APPLIED)?;
        if read(KEY_EXPIRY_INDEX)? == applied {
            return Ok(());
        }
        self.rebuild_expiry_index(applied)
    }

    fn rebuild_expiry_index(&self, applied: Option<Vec<u8>>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let indexed = self
            .reader
            .rebuild_expiry_index(&mut batch)
            .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        let meta = self.cf(CF_SM_META);
        match applied {
            Some(a) => batch.put_cf(meta, KEY_EXPIRY_INDEX, a),
            None => batch.delete_cf(meta, KEY_EXPIRY_INDEX),
        }
        self.db
            .write(batch)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        tracing::info!(bindings = indexed, "built the index of bindings by expiry");
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

    fn save_snapshot_file(&self, file: &SnapshotFile) -> Result<(), StorageError> {
        use std::io::Write;
        let bytes = postcard::to_stdvec(file).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let tmp = self.snapshot_dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.snapshot_path())?;
            std::fs::File::open(&self.snapshot_dir)?.sync_all()
        };
        write().map_err(|e| snap_err(ErrorVerb::Write, e))
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
        let mut records = Vec::new();
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_SM_DATA), opts, IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| snap_err(ErrorVerb::Read, e))?;
            if !is_derived(&k) {
                records.push((k.to_vec(), v.to_vec()));
            }
        }
        let content = SnapshotContent {
            last_applied,
            membership: membership.clone(),
            records,
        };
        let data = postcard::to_stdvec(&content).map_err(|e| snap_err(ErrorVerb::Write, e))?;
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
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        self.save_snapshot_file(&file)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(file.data)),
        })
    }

    fn install_snapshot_now(&self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), StorageError> {
        let content: SnapshotContent =
            postcard::from_bytes(&data).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let mut batch = WriteBatch::default();
        let cf_data = self.cf(CF_SM_DATA);
        // Everything the snapshot does not hold must go: delete the whole key space.
        batch.delete_range_cf(cf_data, [0u8].as_slice(), [0xffu8; 16].as_slice());
        for (k, v) in &content.records {
            batch.put_cf(cf_data, k, v);
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
        // The index goes with the rest of the key space; until it is built again below,
        // or at the next open if the node stops first, it is not complete.
        batch.delete_cf(cf_meta, KEY_EXPIRY_INDEX);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.rebuild_expiry_index(
            meta.last_log_id
                .map(|l| postcard::to_stdvec(&l).expect("encode log id")),
        )?;
        self.reader.accounts_changed();
        self.reader.providers_changed();
        self.reader.all_bindings_changed();
        self.save_snapshot_file(&SnapshotFile {
            meta: meta.clone(),
            data,
        })
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
        let mut accounts_changed = false;
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
                    for encoded in &request.commands {
                        // A command this binary does not know stops the state machine rather
                        // than being skipped: skipping would make replicas diverge.
                        let command = Command::decode(encoded).map_err(|e| {
                            StorageError::from(StorageIOError::apply(
                                entry.log_id,
                                AnyError::error(e.to_string()),
                            ))
                        })?;
                        accounts_changed |= matches!(
                            command,
                            Command::PutAccount(_) | Command::DeleteAccount { .. }
                        );
                        providers_changed |= matches!(
                            command,
                            Command::PutProviderAccount(_)
                                | Command::DeleteProviderAccount { .. }
                                | Command::ResealProviderAccount { .. }
                                | Command::GrantLease { .. }
                                | Command::ReleaseLeaseAsked { .. }
                                | Command::DropLease { .. }
                        );
                        let result = txn.apply(command).map_err(|e| {
                            StorageError::from(StorageIOError::apply(
                                entry.log_id,
                                AnyError::error(e.to_string()),
                            ))
                        })?;
                        results.push(result);
                    }
                    responses.push(Response { results });
                }
            }
        }
        let mut batch = WriteBatch::default();
        let aors = txn.into_batch(self.cf(CF_SM_DATA), &mut batch);
        let meta = self.cf(CF_SM_META);
        if let Some(l) = last_applied {
            let l = postcard::to_stdvec(&l).expect("encode log id");
            batch.put_cf(meta, KEY_EXPIRY_INDEX, &l);
            batch.put_cf(meta, KEY_LAST_APPLIED, l);
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
        if !aors.is_empty() {
            self.reader
                .bindings_changed(aors.iter().map(String::as_str));
        }
        if accounts_changed {
            self.reader.accounts_changed();
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
        let bytes = match std::fs::read(self.snapshot_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(snap_err(ErrorVerb::Read, e)),
        };
        let file: SnapshotFile =
            postcard::from_bytes(&bytes).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data)),
        }))
    }
}
