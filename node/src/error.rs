//! The node crate's one error type. Configuration problems name their key; I/O errors say
//! what the node was doing. SIP-level problems become status codes in
//! `stack::responses::status_for`, not here.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config key `{key}`: {problem}")]
    Config { key: String, problem: String },
    #[error("cannot bind {transport} listener on {addr}: {source}")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("no route to send over {transport} to {addr}")]
    NoRoute {
        transport: &'static str,
        addr: SocketAddr,
    },
    #[error(transparent)]
    Sip(#[from] tandem_sip::Error),
    /// From the replicated store, its key file or its certificates.
    #[error(transparent)]
    Store(#[from] tandem_raft_store::Error),
    /// A running node's admin API refused or could not be reached.
    #[error("{0}")]
    Admin(String),
    /// Key rotation cannot go ahead safely.
    #[error("key rotation: {0}")]
    Rotation(String),
    /// The CDR store cannot be opened, read or written.
    #[error("CDR store: {0}")]
    Cdr(String),
    /// An offline provisioning command (`keygen`, `cert`) cannot do what it was asked.
    #[error("{}: {problem}", path.display())]
    Provision { path: PathBuf, problem: String },
}
