//! The registration agent: keeps customers' accounts at third-party VoIP providers
//! registered, each from exactly one node at a time (node/DESIGN.md, "The registration
//! agent"; raft-store/DESIGN.md, "Provider leases").

pub mod accounts;
pub mod client;
pub mod leases;
