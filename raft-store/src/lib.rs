//! Tandem's replicated cluster state (raft-store/DESIGN.md): openraft 0.9 with its
//! storage-v2 traits implemented over one RocksDB, versioned binary commands, the records
//! they write with their indexes, and field encryption applied before anything enters
//! the log.
//!
//! Everything outside this crate sees openraft only through the types re-exported here,
//! so the move to openraft 0.10 stays inside this crate.
#![forbid(unsafe_code)]
// openraft's storage traits fix `StorageError` (224 bytes) as the error type; the helpers
// that feed them return it too.
#![allow(clippy::result_large_err)]

pub mod certs;
pub mod command;
pub mod crypto;
pub mod data_dir;
pub mod http_network;
pub mod join_token;
pub mod local_network;
pub mod log_store;
pub mod replica;
pub mod secret_token;
pub mod state;
pub mod state_machine;
mod store;
pub mod tls;
pub mod types;

pub use replica::membership;
pub use store::StoreMemory;

/// Opens (creating if needed) the store under `dir`: the Raft log and the state machine
/// over one RocksDB in `dir/db`, with snapshot files in `dir/snapshots`.
pub fn open(
    dir: &std::path::Path,
) -> Result<(log_store::LogStore, state_machine::StateMachine), Error> {
    let (db, snapshot_dir) = store::open_db(dir)?;
    let state_machine = state_machine::StateMachine::new(db.clone(), snapshot_dir);
    state_machine
        .drop_stored_expiry_index()
        .map_err(|e| Error::Db(e.to_string()))?;
    let bindings = state_machine.reader().load_bindings()?;
    tracing::info!(bindings, "loaded the location table");
    Ok((log_store::LogStore::new(db), state_machine))
}

/// The crate's one error type. The first variants are ones a caller can act on; the rest
/// are storage faults. It travels between nodes (postcard, which encodes a variant by its
/// position), so new variants go at the end and none is ever removed or reordered.
#[derive(Clone, Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// The write must go to the leader, if one is known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// No quorum is reachable; the node is in degraded mode.
    #[error("no quorum")]
    NoQuorum,
    /// The command was not applied within the proposal timeout; it may still be later.
    #[error("not applied within {0:?}")]
    Timeout(std::time::Duration),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("Raft: {0}")]
    Raft(String),
    /// A command the cluster cannot take yet: some member runs a Tandem too old to apply
    /// it. Nothing was proposed.
    #[error("command kind {kind} needs cluster feature version {needs}, and the cluster is at {cluster}: upgrade every node first")]
    FeatureNotEnabled { kind: u16, needs: u32, cluster: u32 },
    /// A command from a newer Tandem; this node must be upgraded to apply it.
    #[error("command kind {kind} version {version} is unknown to this Tandem version; upgrade this node")]
    UnknownCommand { kind: u16, version: u16 },
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("encryption: {0}")]
    Crypto(String),
    #[error("{0}")]
    Io(String),
    #[error("RocksDB: {0}")]
    Db(String),
    #[error("TLS: {0}")]
    Tls(String),
    /// Another member could not be reached or did not answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// This node refuses writes of its own for now (its data disk is nearly full, say);
    /// another node can take them.
    #[error("this node takes no writes: {0}")]
    WritesBlocked(String),
}

impl Error {
    pub(crate) fn db(e: rocksdb::Error) -> Error {
        Error::Db(e.to_string())
    }
}
