//! `tandem-next`: the next release, for the rolling-upgrade test (t140). It is the `tandem`
//! binary, its `main.rs` compiled in as it is, in a process that first declares itself
//! the next release (`tandem_raft_store::command::play_next_release`): version `+next`,
//! one more cluster feature version, and that version's command kind, which `tandem`
//! refuses to decode as it would any kind from a release after its own.
//!
//! Why not a second compilation of the node with a cargo feature: it costs three minutes
//! of a CI run that must stay under twenty, and the two binaries would differ in nothing
//! more than these do.

#[path = "../../../node/src/main.rs"]
mod tandem;

fn main() -> std::process::ExitCode {
    tandem_raft_store::command::play_next_release();
    tandem::main()
}
