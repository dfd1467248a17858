//! The `tandem` command line. Parsing only; `main.rs` dispatches.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tandem", version, about = "Highly available SIP service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node. Without --config, the embedded defaults: one node on 127.0.0.1:5060.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit: 0 when valid, 64 when not.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the version.
    Version,
}
