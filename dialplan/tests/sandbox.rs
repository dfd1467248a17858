//! The sandbox as a hostile customer would try it: scripts that loop, allocate, recurse,
//! catch their way out, reach for I/O, forge headers or flood one account with runs; and
//! the script API as a normal one uses it.

mod common;

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use tandem_dialplan::{
    Call, DialOutcome, DialRequest, Ending, Error, Host, Limits, Run, Sandbox, Target,
};
use tokio::time::Instant;

/// The memory meter, as the node installs it around its allocator.
#[global_allocator]
static ALLOCATOR: tandem_dialplan::Metered<std::alloc::System> =
    tandem_dialplan::Metered(std::alloc::System);

/// A host that answers each dial from a list of (target text, outcome), recording every
/// request; a dial it has no answer for fails with 404.
#[derive(Default)]
struct Scripted {
    answers: Vec<(String, DialOutcome)>,
    seen: Mutex<Vec<DialRequest>>,
}

impl Host for Scripted {
    fn dial(&self, request: DialRequest) -> DialOutcome {
        let first = request.spec.targets()[0].to_string();
        self.seen.lock().unwrap().push(request);
        self.answers
            .iter()
            .find(|(t, _)| *t == first)
            .map(|(_, o)| o.clone())
            .unwrap_or(DialOutcome::Failed {
                code: 404,
                reason: "Not Found".into(),
            })
    }
}

fn call() -> Call {
    Call {
        headers: vec![("X-Tag".into(), "blue".into())],
        ..common::facts()
    }
}

fn run_with(sandbox: &Sandbox, source: &str, host: Arc<Scripted>) -> Run {
    let script = sandbox
        .compile(source)
        .unwrap_or_else(|e| panic!("{source}: {e}"));
    sandbox.run(&script, call(), host)
}

fn run(source: &str) -> Run {
    run_with(
        &Sandbox::new(Limits::default()),
        source,
        Arc::new(Scripted::default()),
    )
}

fn limit_of(r: &Run) -> &'static str {
    match &r.result {
        Err(Error::Limit { limit }) => limit,
        other => panic!("expected a limit, got {other:?} (trace {:?})", r.trace),
    }
}

#[test]
fn an_endless_loop_stops_at_the_time_limit_even_inside_try() {
    let limits = Limits {
        max_operations: u64::MAX / 2,
        max_run_time: Duration::from_millis(50),
        ..Limits::default()
    };
    let sandbox = Sandbox::new(limits);
    for source in [
        "loop {}",
        "while true { let x = 1; }",
        "loop { try { loop {} } catch (e) { log(e); } }",
        "fn f() { loop {} } f();",
    ] {
        let started = Instant::now();
        let r = run_with(&sandbox, source, Arc::default());
        let took = started.elapsed();
        assert_eq!(limit_of(&r), "time", "{source}");
        assert!(took < Duration::from_secs(2), "{source} ran {took:?}");
        assert!(
            r.trace.last().unwrap().contains("time limit"),
            "{:?}",
            r.trace
        );
    }
    // With the default limits, the operation count stops it first.
    assert_eq!(limit_of(&run("loop {}")), "operations");
}

#[test]
fn growing_strings_arrays_and_maps_stop_at_their_limits() {
    assert!(tandem_dialplan::meter::installed());
    for (source, limit) in [
        (r#"let s = "x"; loop { s += s; }"#, "string size"),
        ("let a = []; loop { a.push(1); }", "array size"),
        ("let a = [1]; loop { a = [a, a]; }", "array size"),
        (
            r#"let a = []; loop { a.push("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"); }"#,
            "string size",
        ),
        // rhai checks a map grown one index at a time only when it is next used: the
        // memory meter stops it.
        (
            r#"let s = "x"; s.pad(4000, "y"); let m = #{}; let i = 0;
               loop { m[`k${i}`] = s + i; i += 1; }"#,
            "memory",
        ),
        (
            "let m = #{}; let i = 0; for i in 0..1000 { m[`k${i}`] = i; } m.len()",
            "map size",
        ),
        ("let m = #{a: 1}; loop { m = #{a: m, b: m}; }", "map size"),
        ("fn f(x) { f(x + 1) } f(0);", "call depth"),
    ] {
        let r = run(source);
        assert_eq!(limit_of(&r), limit, "{source}: {:?}", r.result);
    }
}

#[test]
fn no_eval_no_import_no_clock_and_errors_say_where() {
    let sandbox = Sandbox::new(Limits::default());
    match sandbox.compile("let x = 1;\nlet y = eval(\"x\");") {
        Err(Error::Compile { line, .. }) => assert_eq!(line, 2),
        other => panic!("eval compiled: {other:?}"),
    }
    assert!(matches!(
        sandbox.compile("import \"/etc/passwd\" as p;"),
        Err(Error::Compile { .. })
    ));
    match sandbox.compile("let a = 1;\n  let b = ;") {
        Err(Error::Compile { line, column, .. }) => assert_eq!((line, column), (2, 11)),
        other => panic!("{other:?}"),
    }
    // Strict variables: a misspelt variable is found before the script is saved.
    assert!(matches!(
        sandbox.compile("log(cal.user);"),
        Err(Error::Compile { .. })
    ));
    let r = run("let t = timestamp();");
    assert!(
        matches!(&r.result, Err(Error::Script { line: 1, .. })),
        "{:?}",
        r.result
    );
    let r = run("let a = [1];\nlet b = a[5];");
    match &r.result {
        Err(Error::Script { line, message, .. }) => {
            assert_eq!(*line, 2);
            assert!(message.contains("out of bounds"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let big = "log(1);\n".repeat(10_000);
    assert!(matches!(sandbox.compile(&big), Err(Error::Compile { .. })));
}

#[test]
fn respond_ends_the_run_and_cannot_be_caught() {
    let r = run(r#"try { respond(486, "Busy Here"); } catch { log("caught"); } log("after");"#);
    assert_eq!(
        r.result,
        Ok(Ending::Responded {
            code: 486,
            reason: "Busy Here".into()
        })
    );
    assert!(r.trace.is_empty(), "{:?}", r.trace);
    for bad in [
        "respond(200)",
        "respond(99)",
        r#"respond(500, "a\r\nVia: x")"#,
    ] {
        assert!(
            matches!(run(bad).result, Err(Error::Script { .. })),
            "{bad}"
        );
    }
}

#[test]
fn dial_returns_outcomes_and_an_answer_ends_the_run() {
    let host = Arc::new(Scripted {
        answers: vec![
            (
                "alice".into(),
                DialOutcome::Busy {
                    code: 486,
                    reason: "Busy Here".into(),
                },
            ),
            (
                "0301234@myprovider".into(),
                DialOutcome::Answered {
                    target: "0301234@myprovider".into(),
                },
            ),
        ],
        ..Scripted::default()
    });
    let sandbox = Sandbox::new(Limits::default());
    let r = run_with(
        &sandbox,
        r#"
        set_caller_id("+4930999", "Acme Sales");
        set_header("X-Account", invite.account);
        let r = dial("alice/20");
        log(`alice: ${r.result} ${r.code}`);
        if r.result == "busy" {
            dial("0301234@myprovider & bob");
        }
        log("never");
        "#,
        host.clone(),
    );
    assert_eq!(
        r.result,
        Ok(Ending::Connected {
            target: "0301234@myprovider".into()
        })
    );
    assert!(
        r.trace.iter().any(|l| l == "alice: busy 486"),
        "{:?}",
        r.trace
    );
    assert!(!r.trace.iter().any(|l| l == "never"));
    let seen = host.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].text, "alice/20");
    assert_eq!(
        seen[1].spec.targets(),
        vec![
            &Target::Named {
                user: "0301234".into(),
                at: Some("myprovider".into())
            },
            &Target::Named {
                user: "bob".into(),
                at: None
            }
        ]
    );
    for request in seen.iter() {
        assert_eq!(
            request.headers,
            vec![("X-Account".to_owned(), "alice@example.com".to_owned())]
        );
        let id = request.caller_id.as_ref().unwrap();
        assert_eq!(
            (id.number.as_str(), id.name.as_deref()),
            ("+4930999", Some("Acme Sales"))
        );
    }
    drop(seen);

    // A run that ends without an answer reports its last dial; a bad spec is a script
    // error with its line.
    let r = run_with(&sandbox, r#"dial("alice");"#, host.clone());
    assert!(matches!(
        r.result,
        Ok(Ending::Ended {
            last_dial: Some(DialOutcome::Busy { code: 486, .. })
        })
    ));
    let r = run_with(&sandbox, "let x = 1;\ndial(\"alice &\");", host.clone());
    match &r.result {
        Err(Error::Script { line, message, .. }) => {
            assert_eq!(*line, 2);
            assert!(message.contains("expected a target"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let r = run_with(&sandbox, r#"loop { dial("alice"); }"#, host);
    assert!(
        matches!(&r.result, Err(Error::Script { message, .. }) if message.contains("at most 8 dials")),
        "{:?}",
        r.result
    );
}

#[test]
fn headers_and_caller_ids_that_would_forge_signalling_are_refused() {
    for bad in [
        r#"set_header("Via", "SIP/2.0/UDP evil")"#,
        r#"set_header("route", "<sip:evil>")"#,
        r#"set_header("v", "x")"#,
        r#"set_header("X-A", "a\r\nVia: x")"#,
        r#"set_header("X A", "b")"#,
        r#"set_header("", "b")"#,
        r#"set_caller_id("123\r\n")"#,
        r#"set_caller_id("<sip:x>")"#,
        r#"set_caller_id("123", "a\"b")"#,
    ] {
        assert!(
            matches!(run(bad).result, Err(Error::Script { .. })),
            "{bad}: {:?}",
            run(bad).result
        );
    }
}

#[test]
fn the_facts_headers_time_and_trace() {
    let r = run(r#"
        log(invite.from_user + " -> " + invite.user + " at " + invite.host + " from " + invite.source_ip);
        log(header("x-tag") + "|" + header("missing") + "|" + has_header("X-TAG"));
        log(`${weekday()} ${day_of_week()} ${hour()}:${minute()} ${date()} ${is_weekend()}`);
        log(`${time_between("08:00", "18:00")} ${time_between("22:00", "06:00")}`);
        print("printed");
        debug("debugged");
        log(#{ a: 1 });
        "#);
    assert_eq!(r.result, Ok(Ending::Ended { last_dial: None }));
    assert_eq!(
        r.trace[..5],
        [
            "alice -> 0301234 at example.com from 192.0.2.7",
            "blue||true",
            "mon 1 9:30 2026-07-06 false",
            "true false",
            "printed",
        ]
    );
    assert!(r.trace[5].starts_with("\"debugged\""), "{:?}", r.trace);
    assert_eq!(r.trace[6], r#"#{"a": 1}"#);
    // The trace is bounded, in lines and per line.
    let r = run(r#"for i in 0..200 { log(i); }"#);
    assert_eq!(r.trace.len(), 65);
    assert!(r.trace[64].contains("136 more lines"), "{}", r.trace[64]);
    let r = run(r#"let s = "x"; for i in 0..9 { s += s; } log(s);"#);
    assert!(r.trace[0].len() < 310, "{}", r.trace[0].len());
    assert!(matches!(
        run(r#"time_between("8", "18:00")"#).result,
        Err(Error::Script { .. })
    ));
}

#[test]
fn an_account_that_used_its_script_time_is_refused_runs_until_it_is_back_within() {
    let limits = Limits {
        max_operations: u64::MAX / 2,
        max_run_time: Duration::from_millis(40),
        run_time_per_second: Duration::from_millis(100),
        ..Limits::default()
    };
    let sandbox = Sandbox::new(limits);
    let endless = sandbox.compile("loop {}").unwrap();
    let quick = sandbox.compile("log(1);").unwrap();
    // Runs to the time limit, 40 ms each: a few use up the second's 100 ms, however slowly
    // the machine runs them (the bucket refills by 4 ms per 40 ms of wall time).
    let mut spun = 0;
    let refused = loop {
        let r = sandbox.run(&endless, call(), Arc::new(Scripted::default()));
        if r.result.is_ok() || matches!(r.result, Err(Error::Limit { .. })) {
            assert_eq!(limit_of(&r), "time");
            spun += 1;
            assert!(spun <= 10, "never refused");
            continue;
        }
        break r;
    };
    assert!(spun >= 3, "refused after {spun} runs");
    assert_eq!(
        refused.result,
        Err(Error::OverBudget {
            account: "alice@example.com".into(),
            per_second_ms: 100
        })
    );
    assert_eq!(
        refused.result.unwrap_err().to_string(),
        "account alice@example.com used its 100 ms a second of dialplan time"
    );
    assert!(sandbox
        .run(&quick, call(), Arc::new(Scripted::default()))
        .result
        .is_err());
    // Another account is not affected.
    let mut other = call();
    other.account = "bob@example.com".into();
    assert!(sandbox
        .run(&quick, other, Arc::new(Scripted::default()))
        .result
        .is_ok());
    // The budget refills at 100 ms a second: back above zero within half a second.
    std::thread::sleep(Duration::from_millis(500));
    assert!(sandbox
        .run(&quick, call(), Arc::new(Scripted::default()))
        .result
        .is_ok());
    // No budget: never refused.
    let unbounded = Sandbox::new(Limits {
        run_time_per_second: Duration::ZERO,
        max_operations: u64::MAX / 2,
        max_run_time: Duration::from_millis(40),
        ..Limits::default()
    });
    let endless = unbounded.compile("loop {}").unwrap();
    for _ in 0..4 {
        let r = unbounded.run(&endless, call(), Arc::new(Scripted::default()));
        assert_eq!(limit_of(&r), "time");
    }
}

/// A host whose dials wait until the test lets them go.
struct Gate {
    barrier: Barrier,
}

impl Host for Gate {
    fn dial(&self, _: DialRequest) -> DialOutcome {
        self.barrier.wait();
        DialOutcome::NoAnswer
    }
}

#[test]
fn runs_over_the_accounts_limit_are_refused_and_time_in_dial_does_not_count() {
    let limits = Limits {
        max_runs_per_account: 3,
        max_run_time: Duration::from_millis(20),
        ..Limits::default()
    };
    let sandbox = Arc::new(Sandbox::new(limits));
    let script = sandbox.compile(r#"dial("alice/30");"#).unwrap();
    let gate = Arc::new(Gate {
        barrier: Barrier::new(4),
    });
    let runners: Vec<_> = (0..3)
        .map(|_| {
            let (sandbox, script, gate) = (sandbox.clone(), script.clone(), gate.clone());
            std::thread::spawn(move || sandbox.run(&script, call(), gate))
        })
        .collect();
    while sandbox.running("alice@example.com").1 < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let refused = sandbox.run(&script, call(), gate.clone());
    assert_eq!(
        refused.result,
        Err(Error::Busy {
            account: "alice@example.com".into(),
            limit: 3
        })
    );
    assert_eq!(
        refused.result.unwrap_err().to_string(),
        "account alice@example.com already has 3 dialplan runs going"
    );
    // Another account is not affected.
    let mut other = call();
    other.account = "bob@example.com".into();
    let ok = sandbox.run(&sandbox.compile("log(1);").unwrap(), other, gate.clone());
    assert!(ok.result.is_ok());
    // The dials wait longer than the run time limit; the runs still end well.
    std::thread::sleep(Duration::from_millis(60));
    gate.barrier.wait();
    for r in runners {
        let r = r.join().unwrap();
        assert!(
            matches!(
                r.result,
                Ok(Ending::Ended {
                    last_dial: Some(DialOutcome::NoAnswer)
                })
            ),
            "{:?}",
            r.result
        );
    }
    assert_eq!(sandbox.running("alice@example.com"), (0, 0));
}

#[test]
fn compiled_scripts_are_cached_by_content() {
    let sandbox = Sandbox::new(Limits::default());
    let a = sandbox.compile("log(1);").unwrap();
    let b = sandbox.compile("log(1);").unwrap();
    let c = sandbox.compile("log(2);").unwrap();
    assert_eq!(a.hash, b.hash);
    assert_ne!(a.hash, c.hash);
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
fn memory_stays_flat_across_a_hundred_thousand_runs() {
    // One account's hundred thousand runs in a few seconds: more script time than its
    // budget allows, which is not what this test is about.
    let sandbox = Sandbox::new(Limits {
        run_time_per_second: Duration::ZERO,
        ..Limits::default()
    });
    let host = Arc::new(Scripted::default());
    let script = sandbox
        .compile(
            r#"
            let digits = invite.user;
            let m = #{ a: [1, 2, 3], s: "x".pad(100, "y") };
            if digits.starts_with("0") { log(`national ${digits}`); }
            let r = dial(`${digits}@myprovider`);
            if r.result != "answered" { respond(503, "All Routes Busy"); }
            "#,
        )
        .unwrap();
    let mut samples = Vec::new();
    for i in 0..100_000 {
        let r = sandbox.run(&script, call(), host.clone());
        assert!(matches!(r.result, Ok(Ending::Responded { code: 503, .. })));
        if i % 1000 == 999 {
            host.seen.lock().unwrap().clear();
        }
        if i == 10_000 || i == 99_999 {
            samples.push(rss_kib());
        }
    }
    let (early, late) = (samples[0], samples[1]);
    eprintln!("resident after 10,000 runs: {early} KiB; after 100,000: {late} KiB");
    assert!(
        late <= early + early / 10,
        "resident memory grew from {early} KiB to {late} KiB"
    );
}
