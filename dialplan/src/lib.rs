//! Tandem's dialplan sandbox: each account's rhai script runs with hard limits on
//! operations, sizes, time and concurrency, and without any I/O (dialplan/DESIGN.md).
//! The node hands a run the facts of a call and a [`Host`] that carries out its dials;
//! the run returns how the call should end. The script API is in dialplan/README.md.
// The memory meter (meter.rs) implements GlobalAlloc, which is unsafe by definition; it
// allows unsafe code there and nowhere else.
#![deny(unsafe_code)]

pub mod call;
pub mod clock;
pub mod limits;
pub mod meter;
pub mod sandbox;
pub mod spec;

pub use call::{Call, CallerId, DialOutcome, DialRequest, Ending, Host};
pub use limits::Limits;
pub use meter::Metered;
pub use sandbox::{Run, Sandbox, Script};
pub use spec::{DialSpec, Mode, Target};

/// The crate's one error type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The script did not compile (line and column are 1-based; 0 when unknown).
    #[error("script does not compile at line {line}, column {column}: {message}")]
    Compile {
        line: usize,
        column: usize,
        message: String,
    },
    /// The script failed while it ran.
    #[error("script error at line {line}, column {column}: {message}")]
    Script {
        line: usize,
        column: usize,
        message: String,
    },
    /// A limit (operations, time, call depth, a size) stopped the script.
    #[error("script exceeded its {limit} limit")]
    Limit { limit: &'static str },
    /// The account already has its limit of runs going.
    #[error("account {account} already has {limit} dialplan runs going")]
    Busy { account: String, limit: u32 },
    /// The account's runs used their script time for now ([`Limits::run_time_per_second`]).
    #[error("account {account} used its {per_second_ms} ms a second of dialplan time")]
    OverBudget { account: String, per_second_ms: u64 },
    /// The node already has its limit of runs going.
    #[error("the node already has {limit} dialplan runs going")]
    NodeBusy { limit: u32 },
    /// The interpreter failed in a way no script should be able to cause.
    #[error("internal dialplan error: {0}")]
    Internal(String),
}
