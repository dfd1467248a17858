//! What operators use: the command line ([`cli`]), the HTTP admin API ([`admin`]), the
//! commands that ask a running node through that API ([`control`]), and the offline
//! commands that create keys and certificates ([`provision`]).
//!
//! Operator surfaces sit on top: they may use agents and the cluster, and nothing below
//! them uses an operator surface.

pub mod admin;
pub mod cli;
pub mod control;
pub mod provision;
