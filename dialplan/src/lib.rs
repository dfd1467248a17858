//! Tandem's dialplan sandbox: each account's rhai script runs with hard limits on
//! operations, memory, time and concurrency, and without any I/O (dialplan/DESIGN.md,
//! "Scripts run in a sandbox"). It returns routing decisions; the node carries them out.
//!
//! This crate is a skeleton today: the dialplan issue fills it. Its error type is fixed.
#![forbid(unsafe_code)]

/// The crate's one error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The script did not compile.
    #[error("script does not compile: {0}")]
    Compile(String),
    /// A limit (operations, memory, time, concurrency) stopped the script.
    #[error("script exceeded its {limit} limit")]
    Limit { limit: &'static str },
}
