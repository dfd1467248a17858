//! Real softphones as Debian packages them, driven the way a test needs: baresip
//! (`baresip-core`, through its `ctrl_tcp` module) and linphone (`linphone-cli`'s
//! `linphonec`, through its standard input). Each runs as a child process with its own
//! config and home in a temp dir, on a loopback address of its own, and is killed when
//! dropped. `./ops/setup.sh` installs both.
//!
//! What the phones need to run headless on loopback, learnt the hard way:
//! - baresip 1.0's `ausine` source works only at 48 kHz stereo, so the config says so, or
//!   every call closes with "Operation not supported" right after its 200;
//! - baresip's `ctrl_tcp` speaks netstrings (`<length>:<json>,`), takes one client at a
//!   time, and may send an event before the response to the command that caused it;
//! - linphonec never opens a SIP socket unless `$HOME/.local/share/linphone` exists (its
//!   database fails to open), and rewrites its config file on exit;
//! - baresip puts the address of the default route's interface in its SDP unless
//!   `net_interface` names its own address, and linphone then sends its media checks
//!   there; with it, and linphonec's NAT policy naming no STUN server, every packet either
//!   phone sends goes to a loopback address (checked with strace: linphonec also
//!   `connect`s a UDP socket to a public address to learn its default route, which sends
//!   nothing).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::{Deadline, Wait};

/// Whether `program` can be run (it is on `PATH`).
fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Panics with how to install `program` if it is missing.
fn require(program: &str, package: &str) {
    assert!(
        installed(program),
        "{program} is not installed: run ./ops/setup.sh (Debian package {package})"
    );
}

/// A baresip process and its control connection.
pub struct Baresip {
    child: Child,
    ctrl: TcpStream,
    buf: Vec<u8>,
    /// Events read while waiting for something else, oldest first.
    events: Vec<Value>,
    next_token: u64,
    _dir: TempDir,
}

impl Baresip {
    /// Starts baresip with SIP on `ip:sip_port` (UDP) and its control port on
    /// `ip:ctrl_port`, and no account yet.
    pub fn start(ip: &str, sip_port: u16, ctrl_port: u16) -> Baresip {
        Baresip::start_with(ip, sip_port, ctrl_port, "")
    }

    /// [`Baresip::start`] with more config lines (e.g. `dns_server 127.0.0.1:5353`, for
    /// a phone that finds its servers through the test's DNS server).
    pub fn start_with(ip: &str, sip_port: u16, ctrl_port: u16, more_config: &str) -> Baresip {
        require("baresip", "baresip-core");
        let dir = tempfile::Builder::new()
            .prefix("tandem-baresip-")
            .tempdir()
            .expect("baresip temp dir");
        let config = format!(
            "poll_method\t\tepoll\n\
             net_interface\t\t{ip}\n\
             sip_listen\t\t{ip}:{sip_port}\n\
             sip_trans_def\t\tudp\n\
             audio_player\t\taubridge,nil\n\
             audio_source\t\tausine,440\n\
             audio_alert\t\taubridge,nil\n\
             ausrc_srate\t\t48000\n\
             ausrc_channels\t\t2\n\
             module_path\t\t/usr/lib/baresip/modules\n\
             module\t\t\tg711.so\n\
             module\t\t\tausine.so\n\
             module\t\t\taubridge.so\n\
             module_app\t\taccount.so\n\
             module_app\t\tmenu.so\n\
             module_app\t\tctrl_tcp.so\n\
             ctrl_tcp_listen\t\t{ip}:{ctrl_port}\n\
             {more_config}\n"
        );
        std::fs::write(dir.path().join("config"), config).expect("baresip config");
        std::fs::write(dir.path().join("accounts"), "").expect("baresip accounts");
        let log = std::fs::File::create(dir.path().join("baresip.log")).expect("baresip log");
        let mut child = Command::new("baresip")
            .arg("-f")
            .arg(dir.path())
            .arg("-s")
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start baresip");
        let ctrl_addr: SocketAddr = format!("{ip}:{ctrl_port}").parse().expect("ctrl address");
        let ctrl = Wait::new("baresip's control port", Duration::from_secs(10))
            .poll(|| TcpStream::connect(ctrl_addr).map_err(|e| e.to_string()));
        let Some(ctrl) = ctrl else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("baresip.log")).unwrap_or_default();
            panic!("baresip's control port {ctrl_addr} never opened:\n{log}");
        };
        Baresip {
            child,
            ctrl,
            buf: Vec::new(),
            events: Vec::new(),
            next_token: 0,
            _dir: dir,
        }
    }

    /// baresip's SIP trace and log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("baresip.log")).unwrap_or_default()
    }

    /// Reads the next netstring message within `timeout`.
    fn read(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Deadline::after(timeout);
        loop {
            if let Some(colon) = self.buf.iter().position(|&b| b == b':') {
                let len: usize = std::str::from_utf8(&self.buf[..colon])
                    .ok()
                    .and_then(|l| l.parse().ok())
                    .expect("a netstring length from baresip");
                if self.buf.len() > colon + len + 1 {
                    assert_eq!(self.buf[colon + len + 1], b',', "a netstring from baresip");
                    let body = self.buf[colon + 1..colon + 1 + len].to_vec();
                    self.buf.drain(..colon + len + 2);
                    return Some(serde_json::from_slice(&body).expect("JSON from baresip"));
                }
            }
            if deadline.expired() {
                return None;
            }
            self.ctrl
                .set_read_timeout(Some(deadline.remaining().max(Duration::from_millis(1))))
                .expect("ctrl read timeout");
            let mut chunk = [0u8; 4096];
            match self.ctrl.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// Sends a command and returns its response's `data`; events that arrive meanwhile
    /// are kept for [`Baresip::wait_event`].
    pub fn command(&mut self, command: &str, params: Option<&str>) -> String {
        self.next_token += 1;
        let token = format!("t{}", self.next_token);
        let mut msg = serde_json::json!({ "command": command, "token": token });
        if let Some(p) = params {
            msg["params"] = Value::String(p.into());
        }
        let body = msg.to_string();
        let frame = format!("{}:{body},", body.len());
        self.ctrl
            .write_all(frame.as_bytes())
            .expect("write to baresip");
        let deadline = Deadline::after(Duration::from_secs(10));
        while let Some(m) = self.read(deadline.remaining()) {
            if m["response"] == true && m["token"] == token.as_str() {
                assert!(
                    m["ok"] == true,
                    "baresip refused {command}: {m}\n{}",
                    self.log()
                );
                return m["data"].as_str().unwrap_or_default().to_owned();
            }
            if m["event"] == true {
                self.events.push(m);
            }
        }
        panic!("baresip did not answer {command}:\n{}", self.log());
    }

    /// Waits for an event of one of `types` and returns it; panics on timeout.
    pub fn wait_event(&mut self, types: &[&str], timeout: Duration) -> Value {
        let is_wanted = |m: &Value| types.iter().any(|t| m["type"] == *t);
        if let Some(i) = self.events.iter().position(is_wanted) {
            return self.events.remove(i);
        }
        let deadline = Deadline::after(timeout);
        while let Some(m) = self.read(deadline.remaining()) {
            if m["event"] == true && is_wanted(&m) {
                return m;
            }
            if m["event"] == true {
                self.events.push(m);
            }
        }
        panic!(
            "baresip: none of {types:?} within {timeout:?}; events: {:?}\n{}",
            self.events,
            self.log()
        );
    }

    /// Adds an account (a baresip account line) and waits for its registration's outcome:
    /// the REGISTER_OK or REGISTER_FAIL event.
    pub fn add_account(&mut self, line: &str) -> Value {
        self.command("uanew", Some(line));
        self.wait_event(&["REGISTER_OK", "REGISTER_FAIL"], Duration::from_secs(15))
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A linphonec process, fed commands on its standard input.
pub struct Linphone {
    child: Child,
    stdin: ChildStdin,
    /// Every line it printed so far.
    out: Arc<Mutex<Vec<String>>>,
    /// How many lines of `out` earlier waits consumed.
    seen: usize,
    _dir: TempDir,
}

impl Linphone {
    /// Starts linphonec on `ip:sip_port` (UDP), with RTP on `rtp_port`, registering
    /// `user@domain` with `password` through `proxy` over UDP. `auto_answer` answers every
    /// incoming call.
    pub fn start(
        ip: &str,
        sip_port: u16,
        rtp_port: u16,
        (user, domain, password): (&str, &str, &str),
        proxy: SocketAddr,
        auto_answer: bool,
    ) -> Linphone {
        require("linphonec", "linphone-cli");
        let dir = tempfile::Builder::new()
            .prefix("tandem-linphone-")
            .tempdir()
            .expect("linphone temp dir");
        std::fs::create_dir_all(dir.path().join(".local/share/linphone"))
            .expect("linphone data dir");
        let rc = format!(
            "[sip]\nbind_address={ip}\nsip_port={sip_port}\nsip_tcp_port=0\nsip_tls_port=0\n\
             ipv6=0\ndefault_proxy=0\nguess_hostname=0\ncontact=sip:{user}@{ip}:{sip_port}\n\
             register_only_when_network_is_up=0\nauto_net_state_mon=0\n\n\
             [net]\nstun_server=\nfirewall_policy=0\n\n\
             [rtp]\naudio_rtp_port={rtp_port}\n\n\
             [video]\ndisplay=0\ncapture=0\n\n\
             [proxy_0]\nreg_proxy=<sip:{proxy};transport=udp>\n\
             reg_route=<sip:{proxy};transport=udp;lr>\nreg_identity=sip:{user}@{domain}\n\
             reg_expires=600\nreg_sendregister=1\npublish=0\n\n\
             [auth_info_0]\nusername={user}\npasswd={password}\nrealm={domain}\ndomain={domain}\n"
        );
        let rc_path = dir.path().join("rc");
        std::fs::write(&rc_path, rc).expect("linphone rc");
        let mut command = Command::new("linphonec");
        if auto_answer {
            command.arg("-a");
        }
        let mut child = command
            .arg("-c")
            .arg(&rc_path)
            .args(["-d", "6", "-l"])
            .arg(dir.path().join("linphone.log"))
            .env("HOME", dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start linphonec");
        let stdin = child.stdin.take().expect("linphonec stdin");
        let stdout = child.stdout.take().expect("linphonec stdout");
        let out = Arc::new(Mutex::new(Vec::new()));
        let lines = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Linphone {
            child,
            stdin,
            out,
            seen: 0,
            _dir: dir,
        }
    }

    /// Types a command.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to linphonec");
        self.stdin.flush().expect("flush linphonec's input");
    }

    /// What it printed, and its SIP log.
    pub fn log(&self) -> String {
        let printed = self.out.lock().unwrap().join("\n");
        let sip = std::fs::read_to_string(self._dir.path().join("linphone.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("belle-sip") || l.contains("error"))
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        format!("--- linphonec output ---\n{printed}\n--- its log, last SIP lines ---\n{sip}")
    }

    /// Its whole debug log, SIP messages included.
    pub fn debug_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("linphone.log")).unwrap_or_default()
    }

    /// Waits for a printed line (after those earlier waits consumed) containing `text`.
    pub fn wait_line(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = Deadline::after(timeout);
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = out[self.seen..].iter().position(|l| l.contains(text)) {
                    self.seen += i + 1;
                    return out[self.seen - 1].clone();
                }
            }
            assert!(
                !deadline.expired(),
                "linphonec never printed {text:?} within {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `status register` until it reports the registration.
    pub fn wait_registered(&mut self, timeout: Duration) {
        let deadline = Deadline::after(timeout);
        while !deadline.expired() {
            self.send("status register");
            std::thread::sleep(Duration::from_millis(200));
            let out = self.out.lock().unwrap();
            if let Some(i) = out[self.seen..]
                .iter()
                .position(|l| l.starts_with("registered, identity"))
            {
                self.seen += i + 1;
                return;
            }
        }
        panic!(
            "linphonec did not register within {timeout:?}\n{}",
            self.log()
        );
    }
}

impl Drop for Linphone {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "unregister");
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = Deadline::after(Duration::from_secs(3));
        while !deadline.expired() {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free UDP port on `ip` for a phone's SIP or RTP.
pub fn free_udp_port(ip: &str) -> u16 {
    let s = std::net::UdpSocket::bind((ip, 0)).expect("bind for a free port");
    s.local_addr().expect("local address").port()
}
