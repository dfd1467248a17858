//! Committed proposals per second and commit latency for 300-byte commands on an
//! in-process three-replica cluster: real RocksDB with real WAL fsyncs on every replica,
//! replicas talking through the in-process router instead of TCP. Run with
//! `./ops/bench/raft.sh`; the figures go to BENCHMARKS.md.
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a benchmark

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_raft_store::command::Command;
use tandem_raft_store::local_network::LocalCluster;
use tandem_raft_store::replica::{RaftSettings, Replica};

const PAYLOAD: usize = 300;
const RUN_FOR: Duration = Duration::from_secs(5);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn run(leader: &Replica, proposers: usize) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..proposers {
        let r = leader.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                match r
                    .propose(Command::Noop {
                        payload: vec![7u8; PAYLOAD],
                    })
                    .await
                {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => failed += 1,
                }
            }
            (latencies, failed)
        }));
    }
    tokio::time::sleep(RUN_FOR).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await.unwrap();
        all.extend(l);
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    println!(
        "{proposers:>4} proposers: {:>8.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} ops, {failed} failed)",
        all.len() as f64 / secs,
        percentile(&all, 0.50).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.len(),
    );
}

#[tokio::main]
async fn main() {
    // Under the build cache's disk, not tmpfs, so fsync is real.
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir_in(&base).unwrap())
        .collect();
    let paths: Vec<&std::path::Path> = dirs.iter().map(|d| d.path()).collect();
    let settings = RaftSettings {
        snapshot_every: 1_000_000,
        ..RaftSettings::default()
    };
    let cluster = LocalCluster::start(&paths, &settings, Duration::from_secs(10))
        .await
        .unwrap();
    let leader = cluster.leader().unwrap().clone();
    println!("in-process 3-replica cluster, {PAYLOAD}-byte commands, {RUN_FOR:?} per run");
    for proposers in [1, 16, 256] {
        let syncs_before = leader
            .log_stats()
            .wal_syncs
            .load(std::sync::atomic::Ordering::Relaxed);
        run(&leader, proposers).await;
        let syncs = leader
            .log_stats()
            .wal_syncs
            .load(std::sync::atomic::Ordering::Relaxed)
            - syncs_before;
        println!("      leader WAL fsyncs in that run: {syncs}");
    }
    cluster.shutdown().await;
}
