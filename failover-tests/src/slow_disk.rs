//! A slow disk for one node: a small shared library, built here with the system's C
//! compiler and loaded into that node with `LD_PRELOAD`, that holds every `fsync` and
//! `fdatasync` for a fixed time before doing it. It slows what a node waits on when it
//! makes a write durable (RocksDB syncs its WAL with them) and nothing else, as a busy or
//! slow disk would, without root or a device of its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cluster::{Cluster, Member};
use crate::describe;

const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

static void hold(void) {
    const char *ms = getenv("TANDEM_TEST_SYNC_DELAY_MS");
    if (ms) usleep((useconds_t)atoi(ms) * 1000);
}

int fsync(int fd) {
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    hold();
    return real(fd);
}

int fdatasync(int fd) {
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    hold();
    return real(fd);
}
"#;

/// Builds the library in `dir` and returns the environment that makes a node started with
/// it ([`crate::cluster::Member::start_env`]) wait `delay_ms` before each sync.
pub fn environment(dir: &Path, delay_ms: u64) -> Vec<(String, String)> {
    let source = dir.join("slow-sync.c");
    let library: PathBuf = dir.join("slow-sync.so");
    std::fs::write(&source, SOURCE).expect("write the slow-sync source");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("run cc, the C compiler RocksDB's build needs too");
    assert!(
        built.status.success(),
        "building the slow-sync library: {}",
        describe(&built)
    );
    vec![
        ("LD_PRELOAD".into(), library.display().to_string()),
        ("TANDEM_TEST_SYNC_DELAY_MS".into(), delay_ms.to_string()),
    ]
}

/// Stops `member` of `cluster` (SIGTERM) and starts it again with a disk that waits
/// `delay_ms` before each sync ([`environment`]), until it answers.
pub fn restart_slowed(cluster: &Cluster, member: &Member, delay_ms: u64) {
    member.sigterm();
    if member.wait_exit(Duration::from_secs(10)).is_none() {
        cluster.panic_with_logs(&format!("node {} did not stop on SIGTERM", member.id));
    }
    let env = environment(&member.dir, delay_ms);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    member.start_env(&env);
    member.wait_healthy();
}
