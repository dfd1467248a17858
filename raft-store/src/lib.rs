//! Tandem's replicated cluster state (DECISIONS §3, §4, §9): openraft 0.9 behind one facade,
//! a RocksDB log store and state machine in one database with column families, the Raft
//! network over mutual TLS, and field encryption applied before anything enters the log.
//!
//! This crate is a skeleton today: the raft-store issue fills it. What it already fixes is
//! its error type, so that the node can depend on its shape.
#![forbid(unsafe_code)]

/// The crate's one error type, split as openraft splits its own: errors a caller can act on
/// (not the leader, no quorum) and fatal storage errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The write must go to the leader, if one is known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// No quorum is reachable; the node is in degraded mode.
    #[error("no quorum")]
    NoQuorum,
}
