//! A Tandem node: SIP transports, the transaction layer and the core that the SIP agents
//! plug into, plus configuration and lifecycle. The `tandem` binary is a thin shell over
//! [`server::run_until_signal`] and the offline commands in [`provision`]. See
//! ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod core;
pub mod digest;
pub mod drain;
mod error;
pub mod flow_token;
pub mod keepalive;
pub mod overlay;
pub mod peers;
pub mod provision;
pub mod proxy;
pub mod refreshes;
pub mod registrar;
pub mod responses;
pub mod server;
pub mod shard;
pub mod stats;
pub mod telemetry;
pub mod transaction;
pub mod transport;

pub use error::Error;

/// The exit code for an invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// Loads the configuration (the embedded defaults when `path` is `None`) and validates it.
pub fn load_config(path: Option<&std::path::Path>) -> Result<config::Config, Vec<Error>> {
    let config = match path {
        Some(p) => config::Config::load(p).map_err(|e| vec![e])?,
        None => config::Config::default(),
    };
    config.validate()?;
    Ok(config)
}
