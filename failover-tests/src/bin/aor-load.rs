//! Fills a node with registered AORs and reports its resident memory, for
//! `ops/bench/aor-memory.sh`: creates COUNT accounts `u<n>@bench.example` through the admin
//! API, then registers each one over UDP with MD5 digest (REGISTER, 401, REGISTER with
//! credentials, 200) and refreshes it once, WORKERS at a time, and prints the node's
//! resident memory before, after the accounts and after the registrations, and the growth
//! per AOR.
//!
//! Usage: aor-load [--no-refresh] ADMIN_ADDR TOKEN_FILE SIP_ADDR NODE_PID COUNT
//!                 [WORKERS [CPU_PIDS]]
//!        aor-load --register-only SIP_ADDR COUNT [WORKERS [PASSWORD [CPU_PIDS]]]
//!        aor-load --storm SIP_ADDR COUNT RATE [PASSWORD [CPU_PIDS]]
//! CPU_PIDS (comma-separated) also prints each of those processes' CPU time per
//! registration during the registration phase, for `ops/bench/registrations.sh`.
//! The second form only registers (the accounts exist already, or the registrar is the
//! reference peer), for `ops/bench/registrations.sh`. `--accounts-only` makes the first
//! form stop once the accounts exist (SIP_ADDR and NODE_PID are then unused but for the
//! memory reading). `--no-refresh` makes the first form
//! register each AOR once without the refresh, so that it offers the same load as the
//! second form does to the reference peer. Rates, latencies and CPU per registration count
//! only registrations that got their 200.
//!
//! The third form, for `ops/bench/storm.sh`, registers u0..u<COUNT> once each as phones
//! re-registering after their node died: each AOR's Contact is the same every time
//! (`sip:u<n>@127.0.0.1:<port of n>`, a phone's own address behind NAT), but it comes from
//! a new socket, a new flow, so the registrar must store it again. RATE registrations a
//! second are started on schedule whatever the answers (an open loop, by up to 1,024
//! workers), and each one's latency counts from when it was due, so a server that falls
//! behind shows it in the p99 and in the achieved rate. RATE 0 registers them as fast as
//! 64 closed-loop workers go instead (to put the AORs in place before a storm).
// clippy.toml bans std's Instant so that in-process timers can run on tokio's paused clock;
// this tool measures other processes on the wall clock.
#![allow(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_failover_tests::keepalive::Connection;
use tandem_failover_tests::percentile_ms;
use tandem_failover_tests::ua::Ua;

const DOMAIN: &str = "bench.example";
const PASSWORD: &str = "bench-password-1";

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// User plus system CPU time of a process (all its threads), in microseconds. Linux
/// reports it in USER_HZ ticks, which are 1/100 s on every architecture.
fn cpu_micros(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (fields[11] + fields[12]) * 10_000
}

/// The comma-separated process ids of an optional CPU_PIDS argument.
fn pids(arg: Option<&String>) -> Vec<u32> {
    arg.map_or_else(Vec::new, |s| {
        s.split(',')
            .map(|p| p.parse().expect("CPU_PIDS are numbers"))
            .collect()
    })
}

fn cpu_of(pids: &[u32]) -> Vec<u64> {
    pids.iter().map(|&p| cpu_micros(p)).collect()
}

/// Prints each process's CPU time per successful registration since `before`.
fn report_cpu(pids: &[u32], before: &[u64], count: u64) {
    if pids.is_empty() || count == 0 {
        return;
    }
    let per: Vec<f64> = pids
        .iter()
        .zip(before)
        .map(|(&p, &b)| (cpu_micros(p) - b) as f64 / count as f64)
        .collect();
    let each: Vec<String> = per.iter().map(|us| format!("{us:.0}")).collect();
    println!(
        "CPU per registration (us) of processes {pids:?}: {} (sum {:.0})",
        each.join(", "),
        per.iter().sum::<f64>()
    );
}

/// Runs `job(i)` for i in 0..count on `workers` threads; prints progress every 10%.
fn in_parallel(
    what: &'static str,
    count: u64,
    workers: u64,
    job: impl Fn(u64, &mut Option<Connection>) -> bool + Send + Sync + 'static,
) -> (u64, f64) {
    let job = Arc::new(job);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let (job, done, failed) = (job.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                let mut i = w;
                while i < count {
                    if !job(i, &mut conn) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n % (count / 10).max(1) == 0 {
                        eprintln!("{what}: {n} of {count}");
                    }
                    i += workers;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread");
    }
    (
        failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    )
}

/// Registers u0..u<count> once each over UDP from 127.0.0.1, `workers` at a time, each
/// worker one registration after another; prints the rate and the latency of a whole
/// registration (REGISTER, 401, REGISTER with credentials, 200). With `refresh`, each
/// phone then refreshes its binding once, as phones do: the refresh writes nothing, but
/// the node reads the AOR's bindings and keeps them in memory, which is then measured too.
/// Returns how many got their 200 (with `refresh`, both of them).
fn register_all(
    sip: SocketAddr,
    count: u64,
    workers: u64,
    password: &'static str,
    refresh: bool,
) -> u64 {
    // A registration that fails panics in the test UA; it is counted, not printed.
    std::panic::set_hook(Box::new(|_| {}));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count as usize)));
    let lat = latencies.clone();
    let (failed, secs) = in_parallel("registrations", count, workers, move |i, _| {
        let started = Instant::now();
        let mut ua = Ua::new("127.0.0.1", &format!("u{i}"), DOMAIN, password);
        let contact = format!("<{}>", ua.contact());
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ua.register(sip, "MD5", Some(&contact), Some(3600)).status == 200
                && (!refresh || ua.register(sip, "MD5", Some(&contact), Some(3600)).status == 200)
        }))
        .unwrap_or(false);
        if ok {
            lat.lock()
                .unwrap()
                .push(started.elapsed().as_micros() as u64);
        }
        ok
    });
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let ok = count - failed;
    println!(
        "registrations{}: {ok} of {count} in {secs:.1} s ({:.0}/s succeeded), {failed} failed, p50 {:.1} ms, p99 {:.1} ms",
        if refresh { " (each with one refresh)" } else { "" },
        ok as f64 / secs,
        percentile_ms(&lat, 0.50),
        percentile_ms(&lat, 0.99)
    );
    ok
}

/// The Contact of AOR `i` in the storm form: the same for every registration of it.
fn storm_contact(i: u64) -> String {
    format!("<sip:u{i}@127.0.0.1:{}>", 10_000 + i % 50_000)
}

/// The storm form: registers u0..u<count> once each with their fixed Contacts, from a new
/// socket each, `rate` a second on schedule (0: as fast as 64 closed-loop workers go).
/// Prints the offered and achieved rates, the p50 and p99 latency from when each was due,
/// and how many started over 10 ms late for want of a free worker; on stderr, each
/// second's p99 and worst. Returns how many got their 200.
fn storm(sip: SocketAddr, count: u64, rate: u64, password: &'static str) -> u64 {
    std::panic::set_hook(Box::new(|_| {}));
    let workers: u64 = if rate == 0 { 64 } else { 1_024 };
    let next = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count as usize)));
    let last_done = Arc::new(std::sync::Mutex::new(Instant::now()));
    // Every worker is ready before the first registration is due; closed-loop workers
    // (rate 0) start at once, and the time counts from then.
    let start = Instant::now() + Duration::from_millis(if rate == 0 { 0 } else { 500 });
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (next, late, failed) = (next.clone(), late.clone(), failed.clone());
            let (latencies, last_done) = (latencies.clone(), last_done.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let due = (i * 1_000_000_000)
                        .checked_div(rate)
                        .map_or_else(Instant::now, |n| start + Duration::from_nanos(n));
                    let now = Instant::now();
                    if now < due {
                        std::thread::sleep(due - now);
                    } else if now - due > Duration::from_millis(10) {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut ua = Ua::new("127.0.0.1", &format!("u{i}"), DOMAIN, password);
                    let contact = storm_contact(i);
                    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        ua.register(sip, "MD5", Some(&contact), Some(3600)).status == 200
                    }))
                    .unwrap_or(false);
                    let done = Instant::now();
                    if ok {
                        let second = due.saturating_duration_since(start).as_secs();
                        latencies
                            .lock()
                            .unwrap()
                            .push((second, (done - due).as_micros() as u64));
                        let mut last = last_done.lock().unwrap();
                        *last = (*last).max(done);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    let n = i + 1;
                    if n % (count / 10).max(1) == 0 {
                        eprintln!("storm: {n} of {count} started");
                    }
                })
                .expect("spawn a worker")
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread");
    }
    let by_second = latencies.lock().unwrap().clone();
    // Where the tail comes from: each second's p99 and worst, by when registrations were
    // due, to set beside the nodes' logs.
    let mut seconds: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(second, us) in &by_second {
        seconds.entry(second).or_default().push(us);
    }
    for (second, mut lat) in seconds {
        lat.sort_unstable();
        eprintln!(
            "storm: second {second}: {} registered, p99 {:.1} ms, worst {:.1} ms",
            lat.len(),
            percentile_ms(&lat, 0.99),
            percentile_ms(&lat, 1.0)
        );
    }
    let mut lat: Vec<u64> = by_second.iter().map(|&(_, us)| us).collect();
    lat.sort_unstable();
    let failed = failed.load(Ordering::Relaxed);
    let ok = count - failed;
    let secs = last_done
        .lock()
        .unwrap()
        .saturating_duration_since(start)
        .as_secs_f64();
    let offered = if rate == 0 {
        "as fast as 64 workers go".to_owned()
    } else {
        format!("{rate}/s offered")
    };
    println!(
        "storm: {ok} of {count} registered in {secs:.1} s ({offered}, {:.0}/s achieved), {failed} failed, p50 {:.1} ms, p99 {:.1} ms, {} started over 10 ms late",
        ok as f64 / secs.max(1e-9),
        percentile_ms(&lat, 0.50),
        percentile_ms(&lat, 0.99),
        late.load(Ordering::Relaxed)
    );
    ok
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--storm") {
        if args.len() < 5 {
            eprintln!("usage: aor-load --storm SIP_ADDR COUNT RATE [PASSWORD [CPU_PIDS]]");
            std::process::exit(64);
        }
        let sip: SocketAddr = args[2].parse().expect("SIP_ADDR is ip:port");
        let count: u64 = args[3].parse().expect("COUNT is a number");
        let rate: u64 = args[4].parse().expect("RATE is a number");
        let password: &'static str = args
            .get(5)
            .map_or(PASSWORD, |p| Box::leak(p.clone().into_boxed_str()));
        let cpu_pids = pids(args.get(6));
        let cpu_before = cpu_of(&cpu_pids);
        let ok = storm(sip, count, rate, password);
        report_cpu(&cpu_pids, &cpu_before, ok);
        return;
    }
    if args.get(1).map(String::as_str) == Some("--register-only") {
        // Against any registrar that knows u<n>@bench.example with PASSWORD (the
        // reference peer in ops/bench/registrations.sh).
        if args.len() < 4 {
            eprintln!(
                "usage: aor-load --register-only SIP_ADDR COUNT [WORKERS [PASSWORD [CPU_PIDS]]]"
            );
            std::process::exit(64);
        }
        let sip: SocketAddr = args[2].parse().expect("SIP_ADDR is ip:port");
        let count: u64 = args[3].parse().expect("COUNT is a number");
        let workers: u64 = args.get(4).map_or(64, |s| s.parse().expect("WORKERS"));
        let password: &'static str = args
            .get(5)
            .map_or(PASSWORD, |p| Box::leak(p.clone().into_boxed_str()));
        let cpu_pids = pids(args.get(6));
        let cpu_before = cpu_of(&cpu_pids);
        let ok = register_all(sip, count, workers, password, false);
        report_cpu(&cpu_pids, &cpu_before, ok);
        return;
    }
    let mut args = args;
    let refresh = if args.get(1).map(String::as_str) == Some("--no-refresh") {
        args.remove(1);
        false
    } else {
        true
    };
    let accounts_only = if args.get(1).map(String::as_str) == Some("--accounts-only") {
        args.remove(1);
        true
    } else {
        false
    };
    if args.len() < 6 {
        eprintln!(
            "usage: aor-load [--no-refresh | --accounts-only] ADMIN_ADDR TOKEN_FILE SIP_ADDR NODE_PID COUNT [WORKERS [CPU_PIDS]]"
        );
        std::process::exit(64);
    }
    let admin: SocketAddr = args[1].parse().expect("ADMIN_ADDR is ip:port");
    let token = std::fs::read_to_string(&args[2])
        .expect("read TOKEN_FILE")
        .trim()
        .to_owned();
    let sip: SocketAddr = args[3].parse().expect("SIP_ADDR is ip:port");
    let pid: u32 = args[4].parse().expect("NODE_PID is a number");
    let count: u64 = args[5].parse().expect("COUNT is a number");
    let workers: u64 = args.get(6).map_or(64, |s| s.parse().expect("WORKERS"));
    let cpu_pids = pids(args.get(7));

    let before = rss_kib(pid);
    let mut conn = Connection::open(admin).expect("connect to the admin API");
    let status = conn
        .put("/v1/customers/bench", &token, r#"{"name":"Bench"}"#)
        .expect("create the customer");
    assert_eq!(status, 200, "creating the customer");
    let body = format!(r#"{{"password":"{PASSWORD}","customer":"bench"}}"#);
    let token2 = token.clone();
    let (failed, secs) = in_parallel("accounts", count, workers, move |i, conn| {
        if conn.is_none() {
            *conn = Connection::open(admin).ok();
        }
        let Some(c) = conn.as_mut() else {
            return false;
        };
        match c.put(&format!("/v1/accounts/{DOMAIN}/u{i}"), &token2, &body) {
            Ok(s) => s == 200 || s == 201,
            Err(_) => {
                *conn = None;
                false
            }
        }
    });
    let with_accounts = rss_kib(pid);
    println!(
        "accounts: {count} in {secs:.1} s ({:.0}/s), {failed} failed",
        count as f64 / secs
    );
    if accounts_only {
        return;
    }
    let cpu_before = cpu_of(&cpu_pids);
    let ok = register_all(sip, count, workers, PASSWORD, refresh);
    report_cpu(&cpu_pids, &cpu_before, ok);
    // Let the node settle (sweeps, memtable flushes) before reading its memory.
    std::thread::sleep(Duration::from_secs(5));
    let after = rss_kib(pid);
    println!(
        "resident memory: {before} KiB before, {with_accounts} KiB with accounts, {after} KiB with bindings"
    );
    println!(
        "per registered AOR (account + binding): {:.0} bytes; binding alone: {:.0} bytes",
        (after.saturating_sub(before) * 1024) as f64 / count as f64,
        (after.saturating_sub(with_accounts) * 1024) as f64 / count as f64
    );
}
