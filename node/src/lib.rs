//! A Tandem node. The folders are its layers, and imports only point down:
//!
//! - [`config`], [`clock`], [`hex`] and [`error`]: used by every layer, using none;
//! - `stack/`: the SIP stack (transport, transactions, SIP threads), naming no agent;
//! - `cluster/`: the node's place in the cluster (replica, joining, peer health);
//! - `agents/`: what the node does with requests (dispatcher, registrar, proxy, and the
//!   bindings and digest accounts they share);
//! - `operator/`: the command line, the admin API and the offline commands;
//! - [`server`]: builds a node from its config, runs it, and drains it.
//!
//! The `tandem` binary (`main.rs`) is a thin shell over what this file exports.
//! ARCHITECTURE.md has the map; node/DESIGN.md the reasons.
#![forbid(unsafe_code)]

/// The release this process is: the package version, marked `+next` in the process that
/// plays the next release for the rolling-upgrade test
/// (`tandem_raft_store::command::play_next_release`).
pub fn version() -> &'static str {
    if tandem_raft_store::command::plays_next_release() {
        concat!(env!("CARGO_PKG_VERSION"), "+next")
    } else {
        env!("CARGO_PKG_VERSION")
    }
}

mod agents;
mod clock;
mod cluster;
mod config;
mod error;
mod hex;
mod operator;
mod server;
mod stack;
mod telemetry;

pub use config::Config;
pub use error::Error;
pub use operator::cli::{Cli, Command};
pub use operator::control::run as run_operator_command;
pub use operator::provision::{cert, keygen};
pub use server::run_until_signal;
pub use telemetry::init as init_logging;

/// The exit code for an invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// Loads the configuration (the embedded defaults when `path` is `None`) and validates it.
pub fn load_config(path: Option<&std::path::Path>) -> Result<Config, Vec<Error>> {
    let config = match path {
        Some(p) => Config::load(p).map_err(|e| vec![e])?,
        None => Config::default(),
    };
    config.validate()?;
    Ok(config)
}
