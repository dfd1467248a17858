//! Write load through a node's admin API, for `ops/bench/raft-cluster.sh`: N workers, each
//! with one keep-alive HTTP/1.1 connection, put customers with a name sized so that each
//! replicated command is about `--command-bytes` long, for `--seconds`. Prints one line
//! with committed writes per second and the latency of each write (sent → 200), which is
//! the commit latency plus one loopback HTTP round trip.
//!
//! Usage: admin-load ADDR TOKEN_FILE CONCURRENCY SECONDS [COMMAND_BYTES]
// clippy.toml bans std's Instant so that in-process timers can run on tokio's paused clock;
// this tool measures other processes on the wall clock.
#![allow(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_failover_tests::keepalive::Connection;
use tandem_failover_tests::percentile_ms;

/// Bytes of a PutCustomer command besides the id and name: kind, version, three length
/// prefixes and the enabled flag.
const COMMAND_OVERHEAD: usize = 8;
/// The longest name the admin API accepts.
const MAX_NAME: usize = 256;
/// Ids are `<prefix>-<worker>-<n>`; the prefix pads them so that the command reaches its size.
const ID_DIGITS: usize = 12;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: admin-load ADDR TOKEN_FILE CONCURRENCY SECONDS [COMMAND_BYTES]");
        std::process::exit(64);
    }
    let addr: SocketAddr = args[1].parse().expect("ADDR is ip:port");
    let token = std::fs::read_to_string(&args[2])
        .expect("read TOKEN_FILE")
        .trim()
        .to_owned();
    let concurrency: usize = args[3].parse().expect("CONCURRENCY is a number");
    let seconds: u64 = args[4].parse().expect("SECONDS is a number");
    let command_bytes: usize = args
        .get(5)
        .map_or(300, |s| s.parse().expect("COMMAND_BYTES"));
    let room = command_bytes.saturating_sub(COMMAND_OVERHEAD);
    let name = "n".repeat(room.clamp(1, MAX_NAME));
    let prefix = "l".repeat(room.saturating_sub(MAX_NAME + ID_DIGITS).clamp(1, 50));
    let body = format!("{{\"name\":\"{name}\"}}");

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (stop, errors, latencies) = (stop.clone(), errors.clone(), latencies.clone());
            let (token, body, prefix) = (token.clone(), body.clone(), prefix.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let mut conn = Connection::open(addr).expect("connect to the admin API");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let path = format!("/v1/customers/{prefix}-{w:04}-{n:06}");
                    n += 1;
                    match conn.put(&path, &token, &body) {
                        Ok(200) => mine.push(t.elapsed().as_micros() as u64),
                        Ok(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            match Connection::open(addr) {
                                Ok(c) => conn = c,
                                Err(_) => std::thread::sleep(Duration::from_millis(10)),
                            }
                        }
                    }
                }
                latencies.lock().unwrap().extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    println!(
        "concurrency={concurrency} writes={} seconds={elapsed:.1} writes_per_s={:.0} p50_ms={:.2} p99_ms={:.2} errors={}",
        lat.len(),
        lat.len() as f64 / elapsed,
        percentile_ms(&lat, 0.50),
        percentile_ms(&lat, 0.99),
        errors.load(Ordering::Relaxed)
    );
}
