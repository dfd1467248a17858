//! What a registration storm's writes cost one replica's state machine to apply: COUNT
//! AORs each registered once, then PASSES passes in which every AOR's binding is replaced
//! (a new flow through another edge node, as when its phone re-registers after its node
//! died), 50 commands to a log entry as a storm batches them. Real RocksDB in a temporary
//! directory; applying does not sync. Prints µs per replaced binding for each pass. Time
//! is noisy on a shared machine; `ops/bench/apply.sh` also counts instructions.
//!
//! Usage: `apply [COUNT] [PASSES] [build-only]` (defaults 50000 and 4). With `build-only`
//! the passes' commands are built and encoded but not applied, for subtracting that.
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a benchmark

use std::time::Instant;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use tandem_raft_store::command::{Binding, Command, StoredFlow};
use tandem_raft_store::types::{Entry, Request};

const PER_ENTRY: usize = 50;

fn binding(i: usize, pass: usize) -> Command {
    Command::PutBinding(Binding {
        aor: format!("sip:u{i}@bench.example"),
        contact: format!("<sip:u{i}@127.0.0.1:{}>", 20_000 + i % 30_000),
        expires_at_ms: 1_900_000_000_000 + (pass * 3_600_000 + i) as u64,
        expires_secs: 3600,
        edge_node: 1 + (pass % 2) as u64,
        flow: StoredFlow {
            transport: "UDP".into(),
            remote: format!("127.0.0.1:{}", 10_000 + pass),
            local: "127.0.0.1:5060".into(),
            connection: None,
        },
        path: vec![],
        call_id: format!("call-{i}-{pass}"),
        cseq: 2,
        q: 1000,
        user_agent: "aor-load".into(),
    })
}

/// One pass's log entries, numbered on from `index`.
fn entries(count: usize, pass: usize, index: &mut u64) -> Vec<Entry> {
    (0..count)
        .step_by(PER_ENTRY)
        .map(|first| {
            *index += 1;
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), *index),
                payload: EntryPayload::Normal(Request {
                    commands: (first..(first + PER_ENTRY).min(count))
                        .map(|i| binding(i, pass).encode())
                        .collect(),
                }),
            }
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map_or(50_000, |a| a.parse().expect("COUNT"));
    let passes: usize = args.next().map_or(4, |a| a.parse().expect("PASSES"));
    let apply = match args.next().as_deref() {
        None => true,
        Some("build-only") => false,
        Some(other) => panic!("unknown argument {other:?}: expected build-only"),
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).expect("a new store");
    let mut index = 0;
    for e in entries(count, 0, &mut index) {
        sm.apply(vec![e]).await.expect("applied");
    }
    println!("{count} AORs registered once; each pass replaces every binding");
    let batches: Vec<Vec<Entry>> = (1..=passes)
        .map(|pass| entries(count, pass, &mut index))
        .collect();
    if !apply {
        return;
    }
    for (pass, batch) in (1..).zip(batches) {
        let started = Instant::now();
        for e in batch {
            sm.apply(vec![e]).await.expect("applied");
        }
        println!(
            "pass {pass}: {:.2} µs per binding applied",
            started.elapsed().as_secs_f64() * 1e6 / count as f64
        );
    }
}
