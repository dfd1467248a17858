//! The harness for Tandem's black-box tests: it starts the real `tandem` binary as a child
//! process with its config and data in a fresh temp dir, waits for it to answer OPTIONS,
//! signals or kills it, and talks SIP to it over real loopback sockets (127.0.0.0/8 only),
//! either by hand (UDP datagrams, TCP streams) or with sipp, the way an operator would,
//! or, for partitions, between network namespaces the test creates ([`netns`]).
//!
//! Every wait is a [`Wait`]: it has a deadline, and one that runs out panics naming what it
//! waited for and showing the tail of every log involved. Any other failure in a test that
//! started processes (a plain `assert!` too) prints their log tails as well, from the drop
//! guards of [`Node`] and [`cluster::Cluster`], so a failure in CI says what the nodes were
//! doing. Tests run in parallel processes (nextest), so ports come from the kernel
//! ([`free_port`]) and never from a fixed list.
// One call has no safe form in std: setns(2), which moves a test thread into a lab's
// network namespace (netns.rs allows it there, and only there).
#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;

pub use clock::Deadline;

pub mod cluster;
pub mod dns;
pub mod kamailio;
pub mod keepalive;
pub mod netns;
pub mod phones;
pub mod relay;
pub mod slow_disk;
pub mod srv_phone;
pub mod ua;

/// How long [`Node::wait_ready`] waits for the first 200 to an OPTIONS.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many lines of each log a failure shows: `$TANDEM_TEST_LOG_LINES`, or 200, enough to
/// cover a cluster's start-up and the seconds before most failures.
pub fn log_tail_lines() -> usize {
    std::env::var("TANDEM_TEST_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

mod clock {
    // clippy.toml bans std's Instant so that in-process timers can run on tokio's paused
    // clock. The node under test here is another process on the real clock, so wall-clock
    // time is the only honest measure.
    #![allow(clippy::disallowed_types)]

    use std::time::{Duration, Instant};

    /// A wall-clock deadline that also remembers when it was set.
    #[derive(Clone, Copy, Debug)]
    pub struct Deadline {
        start: Instant,
        end: Instant,
    }

    impl Deadline {
        pub fn after(timeout: Duration) -> Deadline {
            let start = Instant::now();
            Deadline {
                start,
                end: start + timeout,
            }
        }

        pub fn expired(&self) -> bool {
            Instant::now() >= self.end
        }

        /// Time left, never zero (socket timeouts refuse zero).
        pub fn remaining(&self) -> Duration {
            self.end
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        }

        /// Time since the deadline was set.
        pub fn elapsed(&self) -> Duration {
            self.start.elapsed()
        }
    }
}

/// Sets its flag when dropped, on unwind too. Helper threads in a `thread::scope` that loop
/// until a stop flag is set would otherwise keep looping when the scope's own body panics,
/// and the scope, and with it the test, would wait for them until the harness kills it
/// instead of failing with the panic's message.
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A wait for something the processes under test are to do. It looks at the condition with
/// a probe (every 50 ms unless told otherwise) until the probe reports success or the
/// timeout passes. Every wait for a condition in this crate and its tests is one of these;
/// reading a socket until a message arrives ([`SipTcp::read_message`],
/// [`ua::Ua::expect_request`]) is a receive with a timeout, not a wait of this kind.
///
/// [`Wait::until`] panics on timeout with a message naming what it waited for, for how long
/// and what the probe saw last, followed by the tail of every log it is [`Wait::showing`].
/// [`Wait::poll`] returns `None` instead, for waits whose timeout is an outcome the caller
/// judges (a process that may or may not exit, a write that may never be acknowledged).
///
/// The probe returns an [`Outcome`]: a `bool`, an `Option` (its value is what the wait
/// returns), or a `Result` whose error says what it saw instead.
///
/// ```no_run
/// # use std::time::Duration;
/// # use tandem_failover_tests::{Node, Wait};
/// let node = Node::start_ready("");
/// Wait::new("the node to log that it is ready", Duration::from_secs(5))
///     .showing(&node)
///     .until(|| node.log().contains("tandem node ready"));
/// ```
#[must_use = "a Wait does nothing until `until` or `poll` runs it"]
pub struct Wait<'a> {
    what: String,
    timeout: Duration,
    every: Duration,
    logs: Option<&'a dyn Logs>,
}

impl<'a> Wait<'a> {
    /// A wait for `what`, worded to follow "waiting for" ("node 2 to apply index 7"), that
    /// gives up after `timeout`.
    pub fn new(what: impl Into<String>, timeout: Duration) -> Wait<'a> {
        Wait {
            what: what.into(),
            timeout,
            every: Duration::from_millis(50),
            logs: None,
        }
    }

    /// Looks every `interval` instead of every 50 ms. Zero looks again at once, for probes
    /// that themselves wait for an answer.
    pub fn every(mut self, interval: Duration) -> Wait<'a> {
        self.every = interval;
        self
    }

    /// On timeout, shows the tail of these logs: a [`Node`]'s, or every member's of a
    /// [`cluster::Cluster`] (a [`cluster::Member`] shows its whole cluster's too).
    pub fn showing(mut self, logs: &'a dyn Logs) -> Wait<'a> {
        self.logs = Some(logs);
        self
    }

    /// Polls until `probe` succeeds and returns its value. Panics on timeout.
    #[track_caller]
    pub fn until<O: Outcome>(self, probe: impl FnMut() -> O) -> O::Value {
        match self.run(probe) {
            Ok(value) => value,
            Err(seen) => {
                let seen = seen
                    .map(|s| format!("; last seen: {s}"))
                    .unwrap_or_default();
                let message = format!(
                    "timed out after {:?} waiting for {}{seen}",
                    self.timeout, self.what
                );
                match self.logs {
                    Some(logs) => fail(logs, &message),
                    None => panic!("{message}"),
                }
            }
        }
    }

    /// Polls until `probe` succeeds and returns its value; `None` if the time runs out.
    pub fn poll<O: Outcome>(self, probe: impl FnMut() -> O) -> Option<O::Value> {
        self.run(probe).ok()
    }

    /// The loop itself: looks at least once, and once more when the time is up.
    fn run<O: Outcome>(&self, mut probe: impl FnMut() -> O) -> Result<O::Value, Option<String>> {
        let deadline = Deadline::after(self.timeout);
        loop {
            match probe().outcome() {
                Ok(value) => return Ok(value),
                Err(seen) if deadline.expired() => return Err(seen),
                Err(_) => {}
            }
            if !self.every.is_zero() {
                std::thread::sleep(self.every.min(deadline.remaining()));
            }
        }
    }
}

/// What one look of a [`Wait`]'s probe found: done, with a value, or not yet, with what it
/// saw instead (for the timeout message).
pub trait Outcome {
    type Value;
    fn outcome(self) -> Result<Self::Value, Option<String>>;
}

impl Outcome for bool {
    type Value = ();
    fn outcome(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn outcome(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: std::fmt::Display> Outcome for Result<T, E> {
    type Value = T;
    fn outcome(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// One process's log, as a failure shows it.
#[derive(Clone, Debug)]
pub struct LogFile {
    /// Whose log it is: `node 2`, `node (pid 4242)`.
    pub name: String,
    pub path: PathBuf,
}

impl LogFile {
    /// The last [`log_tail_lines`] lines under a heading that names the log and its file.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_else(|e| format!("(no log: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(log_tail_lines());
        format!(
            "--- {} log, last {} of {} lines ({}) ---\n{}\n",
            self.name,
            lines.len() - start,
            lines.len(),
            self.path.display(),
            lines[start..].join("\n")
        )
    }
}

/// Whatever a failure shows the logs of: a [`Node`], a [`cluster::Cluster`] (every member),
/// or a [`cluster::Member`] (every member of its cluster, since a failure in a cluster
/// often shows on a node other than the one that was asked).
pub trait Logs {
    fn log_files(&self) -> Vec<LogFile>;
}

/// Logs whose tails a panic message has shown already, so that the drop guards do not print
/// them a second time.
static SHOWN: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn shown() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    SHOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The tail of each log, one after another.
fn tails(files: &[LogFile]) -> String {
    let mut text: String = files.iter().map(LogFile::tail).collect();
    text.push_str("--- end of logs ---");
    text
}

/// Panics with `message` followed by the tail of every log in `logs`. Every failure that the
/// harness reports itself ends here.
#[track_caller]
pub fn fail(logs: &dyn Logs, message: &str) -> ! {
    let files = logs.log_files();
    shown().extend(files.iter().map(|f| f.path.clone()));
    panic!("{message}\n{}", tails(&files));
}

/// For drop guards: while the thread unwinds from a failure, prints the tails of the logs
/// in `logs` that the panic message did not show, so that a plain `assert!` (or a panic in
/// the test UA) shows them too.
fn show_logs_if_failing(logs: &dyn Logs) {
    if !std::thread::panicking() {
        return;
    }
    let files: Vec<LogFile> = {
        let mut shown = shown();
        logs.log_files()
            .into_iter()
            .filter(|f| shown.insert(f.path.clone()))
            .collect()
    };
    if !files.is_empty() {
        // Never panic here: a panic while unwinding aborts the test binary.
        let _ = writeln!(
            std::io::stderr(),
            "the test failed; the logs of the nodes it started:\n{}",
            tails(&files)
        );
    }
}

/// What a node logs when one of its SIP threads stopped running (node/src/stack/shard.rs).
/// That is a bug wherever it shows, and the calls it stops may not be the ones a test
/// checks, so the drop guards fail a test whose nodes logged it.
const STALLED_THREAD_LINE: &str = "a SIP thread has not run for";

/// For drop guards of a test that has not failed otherwise: fails it if one of the nodes
/// in `logs` logged a stalled SIP thread.
fn fail_if_a_sip_thread_stalled(logs: &dyn Logs) {
    if std::thread::panicking() {
        return;
    }
    for file in logs.log_files() {
        let text = std::fs::read_to_string(&file.path).unwrap_or_default();
        if text.contains(STALLED_THREAD_LINE) {
            fail(
                logs,
                &format!(
                    "{} logged a stalled SIP thread (\"{STALLED_THREAD_LINE} …\"): the calls \
                     of that thread got no answer while it lasted",
                    file.name
                ),
            );
        }
    }
}

/// The `tandem` binary under test: `$TANDEM_BIN`, else `tandem` in the target directory
/// this test executable was built into (`<target>/debug/deps/<test>` → `<target>/debug/tandem`).
pub fn tandem_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TANDEM_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TANDEM_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("tandem"))
        .expect("test executable lives in <target>/<profile>/deps");
    assert!(
        path.is_file(),
        "{} not found: build it first with `cargo build -p tandem-node --bin tandem` \
         (or point TANDEM_BIN at a tandem binary)",
        path.display()
    );
    path
}

/// `tandem-next`, the next release for the rolling-upgrade test (src/bin/tandem-next.rs),
/// beside the `tandem` under test.
pub fn tandem_next_bin() -> PathBuf {
    let path = tandem_bin().with_file_name("tandem-next");
    assert!(
        path.is_file(),
        "{} not found: build it with `cargo build -p tandem-failover-tests --bin tandem-next` \
         (./ops/test.sh builds every target)",
        path.display()
    );
    path
}

/// A `tandem` command with colours off, so logs stay readable in files.
pub fn tandem_command() -> Command {
    let mut c = Command::new(tandem_bin());
    c.env("NO_COLOR", "1");
    c
}

/// A port on 127.0.0.1 that is free for both UDP and TCP right now. Another process may
/// still take it before the node binds it; the window is small and the kernel hands out
/// ephemeral ports in random order, so parallel tests do not collide in practice.
pub fn free_port() -> u16 {
    cluster::free_port_on("127.0.0.1")
}

/// Whether a node's log says it could not start because a port it was given was taken.
fn port_clash(log: &str) -> bool {
    log.contains("cannot bind") || log.contains("is also a SIP")
}

/// A `[sip]` table with UDP and TCP listeners on `127.0.0.1:port`, followed by `extra`
/// lines (more `[sip]` keys, or further tables).
pub fn sip_config(port: u16, extra: &str) -> String {
    format!("[sip]\nudp = [\"127.0.0.1:{port}\"]\ntcp = [\"127.0.0.1:{port}\"]\n{extra}\n")
}

/// The tests' providers are Kamailio on loopback or at a lab's address, which a node's
/// default (providers reach only public addresses) refuses: the nodes tests start list
/// those networks in `registration_agent.private_networks`, unless the config sets the key.
pub fn reaching_test_providers(extra: &str) -> String {
    const KEY: &str = "private_networks = [\"127.0.0.0/8\", \"10.99.0.0/24\"]\n";
    if extra.contains("private_networks") {
        extra.to_owned()
    } else if extra.contains("[registration_agent]\n") {
        extra.replacen(
            "[registration_agent]\n",
            &format!("[registration_agent]\n{KEY}"),
            1,
        )
    } else {
        format!("{extra}\n\n[registration_agent]\n{KEY}")
    }
}

/// One running `tandem run` process with its own temp dir. Dropping it kills the process.
pub struct Node {
    // Behind a mutex so that every method, including polling for exit, takes &self.
    child: Mutex<Child>,
    pid: u32,
    dir: TempDir,
    log_path: PathBuf,
    udp: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

impl Node {
    /// Writes `toml` to `config.toml` in a fresh temp dir (with `node.data_dir` pointing
    /// inside it unless the config sets one) and starts `tandem run --config` on it, with
    /// stdout and stderr going to `node.log` there. Does not wait for readiness.
    pub fn start(toml: &str) -> Node {
        Node::start_env(toml, &[])
    }

    /// [`Node::start`], with these variables added to the node's environment.
    pub fn start_env(toml: &str, env: &[(&str, &str)]) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("tandem-node-")
            .tempdir()
            .expect("temp dir for the node");
        let config = with_admin_port(&with_data_dir(
            &reaching_test_providers(toml),
            &dir.path().join("data"),
        ));
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, &config).expect("write config.toml");
        let log_path = dir.path().join("node.log");
        let log = File::create(&log_path).expect("create node.log");
        let child = tandem_command()
            .envs(env.iter().copied())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tandem_bin().display()));
        Node {
            pid: child.id(),
            child: Mutex::new(child),
            dir,
            log_path,
            udp: first_listener(&config, "udp"),
            tcp: first_listener(&config, "tcp"),
            tls: first_listener(&config, "tls"),
            admin: address_in(&config, "[admin]", "listen"),
        }
    }

    /// Starts a node with UDP and TCP on one free port plus `extra` `[sip]` keys, and waits
    /// until it answers.
    #[track_caller]
    pub fn start_ready(extra_sip: &str) -> Node {
        Node::start_ready_with(|port| sip_config(port, extra_sip))
    }

    /// Starts a node on the config `make` writes for a free port, and waits until it
    /// answers. Another process can take the port between [`free_port`] and the node's
    /// bind, and the admin port, picked separately, can come out equal to it; in either
    /// case this tries again on new ports.
    #[track_caller]
    pub fn start_ready_with(make: impl Fn(u16) -> String) -> Node {
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let node = Node::start(&make(free_port()));
            match node.poll_ready() {
                Ok(()) => return node,
                Err(_) if attempt < ATTEMPTS && port_clash(&node.log()) => {
                    eprintln!(
                        "port taken before the node bound it; retrying:\n{}",
                        node.log()
                    );
                }
                Err(status) => node.panic_with_log(&not_ready(status)),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Polls OPTIONS over UDP until a 200 comes back. Panics, showing the log, if the
    /// node exits or does not answer within [`READY_TIMEOUT`].
    #[track_caller]
    pub fn wait_ready(&self) {
        if let Err(status) = self.poll_ready() {
            self.panic_with_log(&not_ready(status));
        }
    }

    /// `Ok` once the node answers an OPTIONS with 200, `Err` if it exits first; panics if
    /// it does neither within [`READY_TIMEOUT`].
    #[track_caller]
    fn poll_ready(&self) -> Result<(), ExitStatus> {
        let target = self
            .udp
            .expect("waiting for readiness needs a UDP listener in the node's [sip] config");
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP client");
        let mut attempt = 0u32;
        Wait::new(
            format!("the node to answer OPTIONS on {target} with 200"),
            READY_TIMEOUT,
        )
        // Each look waits up to 200 ms for its answer.
        .every(Duration::ZERO)
        .showing(self)
        .until(|| {
            if let Some(status) = self.exit_status() {
                return Some(Err(status));
            }
            attempt += 1;
            let request = options_request(
                "UDP",
                socket.local_addr().expect("local address"),
                target,
                &format!("z9hG4bKready{attempt}"),
            );
            let response = send_udp_and_recv(
                &socket,
                target,
                request.as_bytes(),
                Duration::from_millis(200),
            )?;
            (status_code(&response) == Some(200)).then_some(Ok(()))
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The first UDP listener in the node's config.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp.expect("the node's config has a UDP listener")
    }

    /// The first TCP listener in the node's config.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp.expect("the node's config has a TCP listener")
    }

    /// The first TLS listener in the node's config.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls.expect("the node's config has a TLS listener")
    }

    /// The admin API's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("the node's config has an admin listener")
    }

    /// The admin token the node created in its data dir on first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir().join("data/admin.token"))
            .expect("the node wrote data/admin.token")
            .trim()
            .to_owned()
    }

    /// The node's temp dir (config, log, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn sigint(&self) {
        self.signal("INT");
    }

    pub fn sigkill(&self) {
        let _ = self.child().kill();
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid()
        );
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child().try_wait().expect("poll tandem's exit status")
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        Wait::new(format!("node (pid {}) to exit", self.pid()), timeout)
            .every(Duration::from_millis(10))
            .poll(|| self.exit_status())
    }

    /// Everything the node wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Panics with `message` and the tail of the node's log.
    #[track_caller]
    pub fn panic_with_log(&self, message: &str) -> ! {
        fail(self, message)
    }

    /// Like `assert!`, but the failure message holds the tail of the node's log.
    #[track_caller]
    pub fn check(&self, condition: bool, message: impl FnOnce() -> String) {
        if !condition {
            self.panic_with_log(&message());
        }
    }

    /// Asserts that the node still answers OPTIONS over UDP with 200.
    #[track_caller]
    pub fn assert_answers_options(&self) {
        let target = self.udp_addr();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP client");
        let local = socket.local_addr().expect("local address");
        for attempt in 0..5 {
            let request = options_request("UDP", local, target, &format!("z9hG4bKhealth{attempt}"));
            let response =
                send_udp_and_recv(&socket, target, request.as_bytes(), Duration::from_secs(1));
            if response.as_deref().and_then(status_code) == Some(200) {
                return;
            }
        }
        self.panic_with_log(&format!(
            "node on {target} no longer answers OPTIONS with 200"
        ));
    }
}

impl Logs for Node {
    fn log_files(&self) -> Vec<LogFile> {
        vec![LogFile {
            name: format!("node (pid {})", self.pid),
            path: self.log_path.clone(),
        }]
    }
}

fn not_ready(status: ExitStatus) -> String {
    format!("node exited with {status} before it was ready")
}

impl Drop for Node {
    fn drop(&mut self) {
        show_logs_if_failing(self);
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        fail_if_a_sip_thread_stalled(self);
    }
}

/// Gives the admin API a free port unless the config has an `[admin]` table, so nodes
/// started in parallel do not fight over the default one.
fn with_admin_port(toml: &str) -> String {
    if toml.lines().any(|l| l.trim() == "[admin]") {
        return toml.to_owned();
    }
    format!(
        "{toml}
[admin]
listen = \"127.0.0.1:{}\"\n",
        free_port()
    )
}

/// Adds `data_dir` to the `[node]` table (creating it) unless the config already sets one.
fn with_data_dir(toml: &str, data_dir: &Path) -> String {
    if toml.lines().any(|l| l.trim_start().starts_with("data_dir")) {
        return toml.to_owned();
    }
    // Debug formatting quotes and escapes the path the way a TOML basic string wants.
    let line = format!("data_dir = {:?}", data_dir.display().to_string());
    let mut out = String::new();
    let mut placed = false;
    for l in toml.lines() {
        out.push_str(l);
        out.push('\n');
        if !placed && l.trim() == "[node]" {
            out.push_str(&line);
            out.push('\n');
            placed = true;
        }
    }
    if placed {
        out
    } else {
        format!("[node]\n{line}\n\n{out}")
    }
}

/// The first address in `key = ["ip:port", ...]` within the `[sip]` table.
fn first_listener(toml: &str, key: &str) -> Option<SocketAddr> {
    address_in(toml, "[sip]", key)
}

/// The first quoted address under `key` in `table`.
fn address_in(toml: &str, wanted: &str, key: &str) -> Option<SocketAddr> {
    let mut table = "";
    for line in toml.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            table = l;
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            continue;
        };
        if table == wanted && k.trim() == key {
            let start = v.find('"')? + 1;
            let end = start + v[start..].find('"')?;
            return v[start..end].parse().ok();
        }
    }
    None
}

static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

/// A complete OPTIONS request from `local` to `remote`, with `;rport` in its Via.
pub fn options_request(
    transport: &str,
    local: SocketAddr,
    remote: SocketAddr,
    branch: &str,
) -> String {
    let call = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!(
        "OPTIONS sip:{remote} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};rport;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@{local}>;tag=t{pid}x{call}\r\n\
         To: <sip:{remote}>\r\n\
         Call-ID: c{pid}x{call}@failover-tests\r\n\
         CSeq: {call} OPTIONS\r\n\
         Accept: application/sdp\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// Sends one datagram from `socket` and returns the first datagram that comes back
/// within `timeout`, or `None`.
pub fn send_udp_and_recv(
    socket: &UdpSocket,
    to: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    socket.send_to(bytes, to).expect("UDP send");
    recv_udp(socket, timeout)
}

/// Datagrams on `socket` until one that `is_last` accepts: returns the ones before it,
/// and it (None if it did not come within `timeout`). A fence for "nothing else arrives":
/// make the node send something that it can only send after whatever must not arrive
/// would have been sent, and wait for that instead of for a quiet interval.
pub fn recv_udp_until(
    socket: &UdpSocket,
    timeout: Duration,
    mut is_last: impl FnMut(&[u8]) -> bool,
) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
    let deadline = Deadline::after(timeout);
    let mut before = Vec::new();
    while !deadline.expired() {
        match recv_udp(socket, deadline.remaining()) {
            Some(d) if is_last(&d) => return (before, Some(d)),
            Some(d) => before.push(d),
            None => break,
        }
    }
    (before, None)
}

/// [`recv_udp_until`] for the datagram containing `fence` (a branch the test sent after
/// whatever must go unanswered): `Ok` when the fence came and nothing before it, else what
/// did arrive, for the failure message.
pub fn nothing_before_fence(
    socket: &UdpSocket,
    timeout: Duration,
    fence: &str,
) -> Result<(), String> {
    let (before, answer) = recv_udp_until(socket, timeout, |d| {
        String::from_utf8_lossy(d).contains(fence)
    });
    if answer.is_some() && before.is_empty() {
        return Ok(());
    }
    Err(format!(
        "answered {:?} before the fence ({})",
        before
            .iter()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .collect::<Vec<_>>(),
        if answer.is_some() {
            "which came"
        } else {
            "which never came"
        }
    ))
}

/// The next datagram on `socket` within `timeout`.
pub fn recv_udp(socket: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    socket
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .expect("set UDP read timeout");
    let mut buf = vec![0u8; 65_536];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}

/// The status code of a response's first line (`SIP/2.0 200 OK`).
pub fn status_code(message: &[u8]) -> Option<u16> {
    let line = message.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if parts.next()? != "SIP/2.0" {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// The value of the first header called `name` (case-insensitive, long form only).
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next()?;
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Where a complete SIP message ends in `buf`, framed by Content-Length (`l` compact).
pub fn message_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let length = head
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| {
            let n = n.trim();
            n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("l")
        })
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some(head_end + length)
}

/// What came back on a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamRead {
    /// One complete SIP message (from [`SipTcp::read_at_least`]: the octets asked for).
    Message(Vec<u8>),
    /// The peer closed (or reset) the connection; holds any bytes that came first.
    Closed(Vec<u8>),
    /// Nothing complete within the timeout; holds any partial bytes.
    TimedOut(Vec<u8>),
}

/// A blocking TCP client connection that frames SIP messages by Content-Length.
pub struct SipTcp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl SipTcp {
    pub fn connect(addr: SocketAddr) -> SipTcp {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        SipTcp {
            stream,
            buf: Vec::new(),
        }
    }

    /// A connection to `addr` from `ip` (any address in 127.0.0.0/8), as from another
    /// host.
    pub fn connect_from(ip: &str, addr: SocketAddr) -> SipTcp {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to connect with");
        let stream = runtime
            .block_on(async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(format!("{ip}:0").parse().expect("an IPv4 address"))?;
                tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??
                    .into_std()
            })
            .unwrap_or_else(|e| panic!("TCP connect from {ip} to {addr}: {e}"));
        stream.set_nonblocking(false).expect("blocking mode");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        SipTcp {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes all of `bytes`. Errors are returned, since a node that closed the
    /// connection makes writes fail, and some tests expect exactly that.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends an OPTIONS and returns the status of the response, if one came in time.
    pub fn options(&mut self, timeout: Duration) -> Option<u16> {
        let request = options_request(
            "TCP",
            self.local_addr(),
            self.stream.peer_addr().ok()?,
            &format!("z9hG4bKtcp{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed)),
        );
        self.send(request.as_bytes()).ok()?;
        match self.read_message(timeout) {
            StreamRead::Message(m) => status_code(&m),
            _ => None,
        }
    }

    /// A fence for "nothing else arrives": sends an OPTIONS with a branch of its own and
    /// reads until its answer. Returns every byte that arrived before that answer, and the
    /// answer (None if none came within `timeout`). A node answers a connection's
    /// messages in order, so whatever it would have sent for anything earlier on this
    /// connection is in the first part, however slowly the machine runs: no time window
    /// decides it.
    pub fn fence(&mut self, timeout: Duration) -> (Vec<u8>, Option<Vec<u8>>) {
        let branch = format!("z9hG4bKfence{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed));
        let Ok(peer) = self.stream.peer_addr() else {
            return (std::mem::take(&mut self.buf), None);
        };
        let request = options_request("TCP", self.local_addr(), peer, &branch);
        if self.send(request.as_bytes()).is_err() {
            return (std::mem::take(&mut self.buf), None);
        }
        let deadline = Deadline::after(timeout);
        let mut before = Vec::new();
        loop {
            match self.read_message(deadline.remaining()) {
                StreamRead::Message(m) => {
                    let is_answer = String::from_utf8_lossy(&m).contains(&branch);
                    match m.windows(8).position(|w| w == b"SIP/2.0 ") {
                        Some(start) if is_answer => {
                            before.extend_from_slice(&m[..start]);
                            return (before, Some(m[start..].to_vec()));
                        }
                        _ => before.extend_from_slice(&m),
                    }
                }
                StreamRead::Closed(rest) | StreamRead::TimedOut(rest) => {
                    before.extend_from_slice(&rest);
                    return (before, None);
                }
            }
        }
    }

    /// Reads until one complete message is buffered, the peer closes, or `timeout`.
    pub fn read_message(&mut self, timeout: Duration) -> StreamRead {
        let deadline = Deadline::after(timeout);
        loop {
            if let Some(end) = message_end(&self.buf) {
                let rest = self.buf.split_off(end);
                return StreamRead::Message(std::mem::replace(&mut self.buf, rest));
            }
            match self.read_some(&deadline) {
                Some(true) => {}
                Some(false) => return StreamRead::Closed(std::mem::take(&mut self.buf)),
                None => return StreamRead::TimedOut(std::mem::take(&mut self.buf)),
            }
        }
    }

    /// Everything that arrives within `timeout` (stops early if the peer closes).
    pub fn read_for(&mut self, timeout: Duration) -> StreamRead {
        let deadline = Deadline::after(timeout);
        loop {
            match self.read_some(&deadline) {
                Some(true) => {}
                Some(false) => return StreamRead::Closed(std::mem::take(&mut self.buf)),
                None => return StreamRead::TimedOut(std::mem::take(&mut self.buf)),
            }
        }
    }

    /// Returns as soon as at least `n` octets have arrived (as `Message`, unframed), or
    /// what came before the peer closed or `timeout` passed.
    pub fn read_at_least(&mut self, n: usize, timeout: Duration) -> StreamRead {
        let deadline = Deadline::after(timeout);
        loop {
            if self.buf.len() >= n {
                return StreamRead::Message(std::mem::take(&mut self.buf));
            }
            match self.read_some(&deadline) {
                Some(true) => {}
                Some(false) => return StreamRead::Closed(std::mem::take(&mut self.buf)),
                None => return StreamRead::TimedOut(std::mem::take(&mut self.buf)),
            }
        }
    }

    /// Waits until the peer closes the connection, discarding what arrives. True if it
    /// closed within `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        matches!(self.read_for(timeout), StreamRead::Closed(_))
    }

    /// One read: `Some(true)` got bytes, `Some(false)` closed or reset, `None` timed out.
    fn read_some(&mut self, deadline: &Deadline) -> Option<bool> {
        if deadline.expired() {
            return None;
        }
        self.stream
            .set_read_timeout(Some(deadline.remaining()))
            .expect("set TCP read timeout");
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Some(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Some(true),
            Err(_) => Some(false),
        }
    }
}

/// This package's directory. Read at run time: the target dir is shared between checkouts
/// at different paths, and a binary built in one must not look for files in another.
pub fn package_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .into()
}

/// The `p` quantile (0 to 1) of latencies in microseconds, sorted, in milliseconds; NaN
/// when there are none. For the load tools.
pub fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

/// The path of one of the sipp scenarios in `ops/sipp/`.
pub fn sipp_scenario(name: &str) -> PathBuf {
    package_dir().join("../ops/sipp").join(name)
}

/// How a sipp run ended.
#[derive(Debug)]
pub struct SippOutcome {
    /// sipp exits 0 only when every call succeeded.
    pub status: ExitStatus,
    pub successful: u64,
    pub failed: u64,
    /// sipp's final screens and its stderr, for assertion messages.
    pub output: String,
}

impl SippOutcome {
    pub fn all_succeeded(&self, calls: u32) -> bool {
        self.status.success() && self.successful == u64::from(calls) && self.failed == 0
    }
}

/// Calls per second sipp places.
const SIPP_RATE: u32 = 200;

/// Runs `calls` calls of `scenario` against `target` with sipp over `transport` (`u1` for
/// UDP, `t1` for one TCP connection), from 127.0.0.1 on a free port. sipp gives up after
/// 30 s. Counts come from its `-trace_stat` CSV.
pub fn sipp(scenario: &Path, transport: &str, target: SocketAddr, calls: u32) -> SippOutcome {
    assert!(
        matches!(transport, "u1" | "t1"),
        "transport {transport}: use u1 or t1"
    );
    let dir = tempfile::Builder::new()
        .prefix("tandem-sipp-")
        .tempdir()
        .expect("temp dir for sipp");
    let stats = dir.path().join("stats.csv");
    let output = Command::new("sipp")
        .arg("-sf")
        .arg(scenario)
        .args(["-m", &calls.to_string()])
        .args(["-r", &SIPP_RATE.to_string()])
        .args(["-t", transport])
        .args(["-i", "127.0.0.1"])
        .args(["-p", &free_port().to_string()])
        .arg("-nostdin")
        .args(["-timeout", "30s", "-timeout_error"])
        .arg("-trace_stat")
        .arg("-stf")
        .arg(&stats)
        .arg(target.to_string())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run sipp (is sip-tester installed?): {e}"));
    let text = format!(
        "{}\n--- sipp stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let csv = std::fs::read_to_string(&stats).unwrap_or_default();
    let (successful, failed) = sipp_counts(&csv).unwrap_or_else(|| {
        panic!(
            "sipp wrote no usable statistics to {} (exit {}):\n{text}",
            stats.display(),
            output.status
        )
    });
    SippOutcome {
        status: output.status,
        successful,
        failed,
        output: text,
    }
}

/// Cumulative successful and failed calls from the last row of a sipp `-trace_stat` CSV.
fn sipp_counts(csv: &str) -> Option<(u64, u64)> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split(';').collect();
    let last: Vec<&str> = lines.next_back()?.split(';').collect();
    let column = |name: &str| -> Option<u64> {
        let i = header.iter().position(|h| *h == name)?;
        last.get(i)?.trim().parse().ok()
    };
    Some((column("SuccessfulCall(C)")?, column("FailedCall(C)")?))
}

/// Exit status and both output streams of a finished command, for assertion messages.
pub fn describe(output: &std::process::Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_goes_into_the_node_table() {
        let dir = Path::new("/tmp/x");
        let added = with_data_dir("[sip]\nudp = []\n", dir);
        assert_eq!(added, "[node]\ndata_dir = \"/tmp/x\"\n\n[sip]\nudp = []\n");
        let added = with_data_dir("[node]\nid = 2\n[sip]\n", dir);
        assert_eq!(added, "[node]\ndata_dir = \"/tmp/x\"\nid = 2\n[sip]\n");
        let kept = with_data_dir("[node]\ndata_dir = \"/d\"\n", dir);
        assert_eq!(kept, "[node]\ndata_dir = \"/d\"\n");
    }

    #[test]
    fn listeners_are_read_from_the_sip_table() {
        let toml = sip_config(5070, "tls = [\"127.0.0.1:5071\"]");
        assert_eq!(
            first_listener(&toml, "udp"),
            Some("127.0.0.1:5070".parse().unwrap())
        );
        assert_eq!(
            first_listener(&toml, "tls"),
            Some("127.0.0.1:5071".parse().unwrap())
        );
        assert_eq!(first_listener("[node]\nudp = [\"1.2.3.4:5\"]", "udp"), None);
    }

    #[test]
    fn responses_and_frames_are_read() {
        let m = b"SIP/2.0 200 OK\r\nServer: Tandem/0.1\r\nl: 3\r\n\r\nabcSIP";
        assert_eq!(status_code(m), Some(200));
        assert_eq!(header_value(m, "server").as_deref(), Some("Tandem/0.1"));
        assert_eq!(message_end(m), Some(m.len() - 3));
        assert_eq!(
            message_end(b"SIP/2.0 200 OK\r\nContent-Length: 9\r\n\r\nab"),
            None
        );
        assert_eq!(status_code(b"OPTIONS sip:x SIP/2.0\r\n"), None);
    }

    #[test]
    fn sipp_counts_come_from_the_last_row() {
        let csv = "A;SuccessfulCall(C);FailedCall(C)\nx;1;0\ny;199;1\n";
        assert_eq!(sipp_counts(csv), Some((199, 1)));
        assert_eq!(sipp_counts(""), None);
    }
}
