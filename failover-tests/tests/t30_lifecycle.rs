//! t30: what an operator sees. Configuration errors exit 64 and name the key, the example
//! config is valid, SIGTERM and SIGINT stop the node promptly, connection limits and idle
//! timeouts hold, and a port already in use fails start-up with the address in the message.

use std::net::{TcpListener, UdpSocket};
use std::process::Output;
use std::time::Duration;

use tandem_failover_tests::{
    describe, free_port, sip_config, tandem_command, Deadline, Node, SipTcp, Wait,
};

/// EX_USAGE, what `tandem` exits with when its configuration is invalid.
const EXIT_CONFIG: i32 = 64;

fn check_config(toml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tandem.toml");
    std::fs::write(&path, toml).unwrap();
    tandem_command()
        .arg("check-config")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .expect("run tandem check-config")
}

/// `tandem check-config` on `toml` exits 64 and names `key` on stderr.
fn assert_refused_naming(toml: &str, key: &str) {
    let output = check_config(toml);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        describe(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(key),
        "{}",
        describe(&output)
    );
}

#[test]
fn check_config_rejects_a_bad_value_and_names_its_key() {
    assert_refused_naming("[sip]\nt1_ms = \"fast\"\n", "sip.t1_ms");
}

#[test]
fn check_config_rejects_an_unknown_key_and_names_it() {
    assert_refused_naming(
        "[sip]\nudp = [\"127.0.0.1:5060\"]\nmax_conections = 10\n",
        "max_conections",
    );
}

#[test]
fn check_config_rejects_values_that_parse_but_do_not_validate() {
    assert_refused_naming("[sip]\nt1_ms = 1000\nt2_ms = 10\n", "sip.t2_ms");
    assert_refused_naming(
        "[dialplan]\nmax_runs_per_account = 20\nmax_runs = 10\n",
        "dialplan.max_runs",
    );
    assert_refused_naming(
        "[dialplan]\nmax_run_time_ms = 0\n",
        "dialplan.max_run_time_ms",
    );
    assert_refused_naming("[cdr]\npurge_batch = 0\n", "cdr.purge_batch");
    assert_refused_naming(
        "[node]\nmin_free_disk_mib = 2000000\n",
        "node.min_free_disk_mib",
    );
    assert_refused_naming(
        "[dialplan]\nmax_run_time_per_second_ms = 100001\n",
        "dialplan.max_run_time_per_second_ms",
    );
    assert_refused_naming("[cdr]\nproxied_calls = \"yes\"\n", "cdr.proxied_calls");
    assert_refused_naming(
        "[app_server]\nsession_expires_secs = 30\n",
        "app_server.session_expires_secs",
    );
    assert_refused_naming(
        "[registration_agent]\nprivate_networks = [\"10.0.0.0/33\"]\n",
        "registration_agent.private_networks",
    );
}

#[test]
fn run_with_an_invalid_config_exits_64() {
    let port = free_port();
    let node = Node::start(&sip_config(port, "max_connections = 0"));
    let status = node
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| node.panic_with_log("tandem run kept running on an invalid config"));
    node.check(status.code() == Some(EXIT_CONFIG), || {
        format!("exit {status}")
    });
    node.check(node.log().contains("sip.max_connections"), || {
        "the error does not name sip.max_connections".into()
    });
}

#[test]
fn the_example_config_is_valid() {
    let example = tandem_failover_tests::package_dir().join("../ops/tandem.example.toml");
    let output = tandem_command()
        .arg("check-config")
        .arg(&example)
        .output()
        .expect("run tandem check-config");
    assert!(output.status.success(), "{}", describe(&output));
}

#[test]
fn sigterm_stops_the_node_with_exit_0() {
    let node = Node::start_ready("");
    let deadline = Deadline::after(Duration::from_secs(5));
    node.sigterm();
    let status = node
        .wait_exit(deadline.remaining())
        .unwrap_or_else(|| node.panic_with_log("still running 5 s after SIGTERM"));
    node.check(status.success(), || format!("exit after SIGTERM: {status}"));
    node.check(node.log().contains("tandem node stopped"), || {
        "no orderly stop in the log".into()
    });
    // The ports are free again: a new node can take them at once.
    let again = Node::start(&sip_config(node.udp_addr().port(), ""));
    again.wait_ready();
}

#[test]
fn sigint_stops_the_node_within_2s() {
    let node = Node::start_ready("");
    // An open connection must not hold up a fast stop.
    let _conn = SipTcp::connect(node.tcp_addr());
    node.sigint();
    let status = node
        .wait_exit(Duration::from_secs(2))
        .unwrap_or_else(|| node.panic_with_log("still running 2 s after SIGINT"));
    node.check(status.success(), || format!("exit after SIGINT: {status}"));
}

#[test]
fn after_sigkill_a_node_restarts_on_the_same_ports_and_data_dir() {
    use std::os::unix::process::ExitStatusExt;

    let node = Node::start_ready("");
    let data_dir = node.dir().join("data");
    node.sigkill();
    let status = node
        .wait_exit(Duration::from_secs(2))
        .unwrap_or_else(|| node.panic_with_log("still running after SIGKILL"));
    assert_eq!(status.signal(), Some(9), "{status}");
    // A crash leaves nothing behind that blocks a restart: not the ports, not the data.
    let again = Node::start(&format!(
        "[node]\ndata_dir = {:?}\n\n{}",
        data_dir.display().to_string(),
        sip_config(node.udp_addr().port(), "")
    ));
    again.wait_ready();
}

#[test]
fn idle_tcp_connections_are_closed_and_busy_ones_kept() {
    let node = Node::start_ready("connection_idle_timeout_secs = 1");
    let mut idle = SipTcp::connect(node.tcp_addr());
    let mut busy = SipTcp::connect(node.tcp_addr());
    let deadline = Deadline::after(Duration::from_secs(3));
    // Traffic every 400 ms keeps `busy` open well past the 1 s timeout.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        if busy.options(Duration::from_secs(1)) != Some(200) {
            node.panic_with_log("a connection with traffic was not served");
        }
    }
    if !idle.wait_closed(deadline.remaining()) {
        node.panic_with_log("an idle connection was still open after 3 s");
    }
    // And it went when the idle timer said so, not at once.
    let mut fresh = SipTcp::connect(node.tcp_addr());
    let started = Deadline::after(Duration::from_secs(3));
    if !fresh.wait_closed(started.remaining()) {
        node.panic_with_log("an idle connection was still open after 3 s");
    }
    node.check(started.elapsed() >= Duration::from_millis(800), || {
        format!(
            "closed after {:?}, before the 1 s idle timeout",
            started.elapsed()
        )
    });
}

#[test]
fn connections_beyond_max_connections_are_refused() {
    let node = Node::start_ready("max_connections = 2");
    let mut first = SipTcp::connect(node.tcp_addr());
    let mut second = SipTcp::connect(node.tcp_addr());
    let served = |conn: &mut SipTcp, which: &str| {
        let status = conn.options(Duration::from_secs(2));
        node.check(status == Some(200), || {
            format!("{which} connection got {status:?}")
        });
    };
    // Both are served, so both are registered before the third arrives.
    served(&mut first, "first");
    served(&mut second, "second");

    let mut third = SipTcp::connect(node.tcp_addr());
    let answered = third.options(Duration::from_secs(2));
    node.check(answered.is_none(), || {
        format!("the third connection was served: {answered:?}")
    });
    if !third.wait_closed(Duration::from_secs(2)) {
        node.panic_with_log("the third connection was neither served nor closed");
    }
    node.check(node.log().contains("connection limit reached"), || {
        "the refusal is not logged".into()
    });
    served(&mut first, "first");
    served(&mut second, "second");

    // Closing one frees its slot.
    drop(first);
    Wait::new(
        "a closed connection's slot to be freed for a new one",
        Duration::from_secs(3),
    )
    // Each look waits up to 500 ms for its answer.
    .every(Duration::ZERO)
    .showing(&node)
    .until(|| SipTcp::connect(node.tcp_addr()).options(Duration::from_millis(500)) == Some(200));
}

#[test]
fn a_port_in_use_fails_start_up_naming_the_address() {
    let port = free_port();
    let taken = UdpSocket::bind(("127.0.0.1", port)).expect("take the UDP port");
    let node = Node::start(&sip_config(port, ""));
    let status = node
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| node.panic_with_log("tandem run kept running on a port in use"));
    node.check(!status.success(), || format!("exit {status}"));
    node.check(node.log().contains(&format!("127.0.0.1:{port}")), || {
        "the error does not name the address".into()
    });
    drop(taken);

    // Same for TCP.
    let port = free_port();
    let _taken = TcpListener::bind(("127.0.0.1", port)).expect("take the TCP port");
    let node = Node::start(&sip_config(port, ""));
    let status = node
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| node.panic_with_log("tandem run kept running on a port in use"));
    node.check(!status.success(), || format!("exit {status}"));
    node.check(
        node.log()
            .contains(&format!("TCP listener on 127.0.0.1:{port}")),
        || "the error does not name the TCP address".into(),
    );
}

/// Makes a directory read-only, even for root (`chattr +i`), and undoes it on drop.
struct ReadOnly(std::path::PathBuf, bool);

impl ReadOnly {
    /// The guard, or a failure when this machine cannot make `dir` read-only: root on a
    /// file system without `chattr +i`. `ops/test.sh` finds that out first and leaves the
    /// test out, so the runner reports it as skipped rather than passed.
    fn make(dir: &std::path::Path) -> ReadOnly {
        let uid = std::process::Command::new("id")
            .arg("-u")
            .output()
            .expect("run id -u");
        let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        let ok = if root {
            std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success())
        } else {
            std::process::Command::new("chmod")
                .arg("0555")
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(
            ok,
            "cannot make {} read-only here (root: {root}; chattr needs ext4 or similar); \
             leave this test out with -E 'not test(a_data_dir_that_is_not_writable)', as \
             ops/test.sh does on such a machine",
            dir.display()
        );
        ReadOnly(dir.to_owned(), root)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let (cmd, arg) = if self.1 {
            ("chattr", "-i")
        } else {
            ("chmod", "0755")
        };
        let _ = std::process::Command::new(cmd)
            .arg(arg)
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_data_dir_that_is_not_writable_is_refused_with_its_path() {
    let node = Node::start_ready("");
    node.sigterm();
    node.wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| node.panic_with_log("still running after SIGTERM"));
    let data = node.dir().join("data");
    let _guard = ReadOnly::make(&data);
    let out = tandem_command()
        .arg("run")
        .arg("--config")
        .arg(node.dir().join("config.toml"))
        .output()
        .expect("run tandem");
    let text = describe(&out);
    assert!(!out.status.success(), "ran on a read-only data dir: {text}");
    assert!(
        text.contains("not writable") && text.contains(&data.display().to_string()),
        "{text}"
    );
}
