//! Dialplan runs per second on one core (issue: at least 20,000 for a simple dialplan).
//! Run with `./ops/bench/dialplan.sh`; it prints one line per script. Each run is a whole
//! run as the node makes it: a run slot taken, the facts put in scope, the script run to
//! its ending (its dials answered at once by the host, so ringing time is not measured),
//! the trace returned.
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a benchmark

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_dialplan::{DialOutcome, DialRequest, Host, Limits, Metered, Sandbox};

/// As in the node: every run is metered.
#[global_allocator]
static ALLOCATOR: Metered<std::alloc::System> = Metered(std::alloc::System);

/// Answers every dial busy, so that scripts take their fallback paths.
struct Busy;

impl Host for Busy {
    fn dial(&self, _: DialRequest) -> DialOutcome {
        DialOutcome::Busy {
            code: 486,
            reason: "Busy Here".into(),
        }
    }
}

const SCRIPTS: &[(&str, &str)] = &[
    (
        "one dial through a provider",
        r#"dial(invite.user + "@myprovider");"#,
    ),
    (
        "office hours, fallback, caller ID",
        r#"
        if invite.user.starts_with("0900") { respond(403, "Premium Numbers Blocked"); }
        set_caller_id("+4930999000", "Acme");
        if !is_weekend() && time_between("08:00", "18:00") {
            let r = dial("(alice & bob)/25");
            if r.result == "busy" { dial("015112345@myprovider/30"); }
        }
        respond(480, "Office Closed");
        "#,
    ),
];

#[path = "../tests/common/mod.rs"]
mod common;
use common::facts;

fn main() {
    // Every run is one account's, which the per-account budget of script time would hold
    // to a fifth of a core: this measures what a run costs, so it has none.
    let sandbox = Sandbox::new(Limits {
        run_time_per_second: Duration::ZERO,
        ..Limits::default()
    });
    let host: Arc<dyn Host> = Arc::new(Busy);
    for (name, source) in SCRIPTS {
        let script = sandbox
            .compile(source)
            .expect("the benchmark's script compiles");
        // Warm up, then run for 3 s.
        for _ in 0..10_000 {
            let _ = sandbox.run(&script, facts(), host.clone());
        }
        let started = Instant::now();
        let mut runs = 0u64;
        while started.elapsed() < Duration::from_secs(3) {
            for _ in 0..1000 {
                let r = sandbox.run(&script, facts(), host.clone());
                assert!(r.result.is_ok(), "{:?}", r.result);
            }
            runs += 1000;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name}: {:.0} runs/s ({:.1} µs per run)",
            runs as f64 / secs,
            secs * 1e6 / runs as f64
        );
    }
}
