//! Kamailio (Debian's package) as a VoIP provider in the tests: its registrar with digest
//! authentication (the registration agent's peer) and its proxy, which routes an
//! authenticated user's INVITE to the registered phone of the number it names (the app
//! server's peer). Configured by `fixtures/kamailio-provider.cfg`; started and stopped by
//! the test.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::Cluster;
use crate::ua::Ua;
use crate::Wait;

/// One Kamailio process, with its own directory for its pid file and log.
pub struct Kamailio {
    child: std::process::Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Kamailio {
    pub fn start() -> Kamailio {
        Kamailio::start_on("127.0.0.1", crate::free_port())
    }

    /// Kamailio on `ip:port`; `ip` is also where the test's query REGISTERs come from.
    pub fn start_on(ip: &str, port: u16) -> Kamailio {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let cfg = crate::package_dir().join("fixtures/kamailio-provider.cfg");
        let log = dir.path().join("kamailio.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new("kamailio")
            .arg("-f")
            .arg(&cfg)
            .args([
                "-l",
                &format!("udp:{addr}"),
                "-DD",
                "-E",
                "-m",
                "64",
                "-M",
                "8",
            ])
            .arg("-P")
            .arg(dir.path().join("kamailio.pid"))
            .arg("-Y")
            .arg(dir.path())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group, so that the workers it forks go with it (below).
            .process_group(0)
            .spawn()
            .expect("kamailio is installed (./ops/setup.sh installs it)");
        let k = Kamailio { child, addr, dir };
        Wait::new("kamailio to answer", Duration::from_secs(10)).until(|| {
            let mut ua = Ua::new(ip, "probe", "kamailio.test", "pw-probe");
            ua.register(k.addr, "MD5", None, None).status == 200
        });
        k
    }

    /// The contacts of `user@kamailio.test`, as a query REGISTER returns them.
    pub fn contacts(&self, user: &str) -> Vec<String> {
        let ip = self.addr.ip().to_string();
        let mut ua = Ua::new(&ip, user, "kamailio.test", &format!("pw-{user}"));
        let r = ua.register(self.addr, "MD5", None, None);
        assert_eq!(r.status, 200, "{}", r.text);
        r.headers("Contact")
    }
}

impl Drop for Kamailio {
    /// Kills the whole process group: Kamailio forks its workers, and killing only the
    /// main process left them running, holding the port, after the test.
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kamailio {
    /// Kamailio's log (its stderr): one line per REGISTER and INVITE it took.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("kamailio.log")
    }
}

/// One REGISTER Kamailio logged.
#[derive(Clone, Debug)]
pub struct Register {
    /// When the test first saw it in the log (read every 50 ms).
    pub at: Duration,
    pub user: String,
    /// The address it came from.
    pub ip: String,
    /// Its Expires header, if it had one.
    pub expires: Option<u32>,
}

/// The REGISTERs Kamailio logged, each stamped with when the test first saw it: a thread
/// reads the log every 50 ms until dropped.
pub struct RegisterLog {
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    stop: Arc<AtomicBool>,
}

impl RegisterLog {
    pub fn watch(kamailio: &Kamailio, started: crate::Deadline) -> RegisterLog {
        let path = kamailio.log_path();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, st) = (lines.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bytes of the log already read: only whole lines are taken, so a line Kamailio
            // is still writing is read once it is complete.
            let mut done = 0usize;
            while !st.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let whole = bytes[done.min(bytes.len())..]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(done, |end| done + end + 1);
                let text = String::from_utf8_lossy(&bytes[done.min(whole)..whole]);
                let now = started.elapsed();
                l.lock().unwrap().extend(
                    text.lines()
                        .filter(|t| t.contains("REGISTER "))
                        .map(|line| (now, line.to_owned())),
                );
                done = whole;
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RegisterLog { lines, stop }
    }

    /// Every REGISTER so far, in Kamailio's order.
    pub fn registers(&self) -> Vec<Register> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(at, line)| {
                // "REGISTER <user> from <ip>:<port> contact <uri> expires <n>"
                let rest = &line[line.find("REGISTER ")? + "REGISTER ".len()..];
                let mut words = rest.split(' ');
                let user = words.next()?.to_owned();
                let from = words.nth(1)?;
                let ip = from.rsplit_once(':').map_or(from, |(ip, _)| ip).to_owned();
                let expires = rest
                    .rsplit_once(" expires ")
                    .and_then(|(_, e)| e.trim().parse().ok());
                Some(Register {
                    at: *at,
                    user,
                    ip,
                    expires,
                })
            })
            .collect()
    }

    /// Every REGISTER (with an Expires header, as the registration agent's have) that
    /// registered an account from one node while another node's registration of it stood: the last REGISTER from that other node was not an
    /// un-registration (Expires 0). A live owner hands an account over by un-registering
    /// first, so in a run without killed or cut-off nodes this is empty: no account was
    /// ever held by two nodes at once. `node_of` maps a source address to its node.
    pub fn held_twice(&self, node_of: impl Fn(&str) -> Option<u64>) -> Vec<String> {
        let mut standing: std::collections::HashMap<String, (u64, Duration)> =
            std::collections::HashMap::new();
        let mut out = Vec::new();
        for r in self.registers() {
            // A REGISTER without Expires is a query (the test reading bindings), not ours.
            let (Some(node), Some(_)) = (node_of(&r.ip), r.expires) else {
                continue;
            };
            if r.expires == Some(0) {
                if standing.get(&r.user).is_some_and(|(n, _)| *n == node) {
                    standing.remove(&r.user);
                }
                continue;
            }
            if let Some((other, since)) = standing.get(&r.user) {
                if *other != node {
                    out.push(format!(
                        "{} registered from node {node} at {:?} while node {other}'s registration \
                         from {since:?} stood",
                        r.user, r.at
                    ));
                }
            }
            standing.insert(r.user.clone(), (node, r.at));
        }
        out
    }
}

impl Drop for RegisterLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Registration agent settings for tests: short leases and retries, so that hand-overs
/// and takeovers happen in seconds. `[registration_agent]` keys, to append to a config.
pub const SHORT_LEASES: &str = "\n[registration_agent]\nlease_secs = 8\nrenew_secs = 2\n\
    clock_skew_secs = 1\nstart_spread_secs = 1\nretry_min_secs = 1\nretry_max_secs = 4\n";

/// Puts provider accounts `k0`..`k<n-1>` of `customer` at `kamailio` (passwords `pw-k<i>`)
/// through member 1, once the cluster takes provider accounts.
pub fn put_provider_accounts(cluster: &Cluster, kamailio: &Kamailio, customer: &str, n: usize) {
    Wait::new(
        "the cluster to take provider accounts",
        Duration::from_secs(20),
    )
    .showing(cluster)
    .until(|| {
        cluster
            .member(1)
            .status()
            .is_some_and(|s| s["feature_version"].as_u64() >= Some(1))
    });
    for i in 0..n {
        let body = format!(
            r#"{{"registrar":"kamailio.test","outbound_proxy":"{}","transport":"udp",
                "username":"k{i}","password":"pw-k{i}","expires_secs":60}}"#,
            kamailio.addr
        );
        let a = cluster
            .member(1)
            .request(
                "PUT",
                &format!("/v1/providers/{customer}/k{i}"),
                Some(&body),
            )
            .expect("the admin API answers");
        assert_eq!(a.status, 201, "{}", a.body);
    }
}

/// The node of a loopback member address (127.0.0.<id>).
pub fn loopback_member(ip: &str) -> Option<u64> {
    ip.strip_prefix("127.0.0.")?.parse().ok()
}

/// The owner of each of `customer`'s accounts `k0`..`k<n-1>`, if each is registered at
/// `kamailio` exactly once and from the node its status names as owner.
pub fn registered_by_owners(
    cluster: &Cluster,
    kamailio: &Kamailio,
    customer: &str,
    n: usize,
) -> Option<Vec<u64>> {
    (0..n)
        .map(|i| {
            let owner = cluster
                .member(1)
                .get(&format!("/v1/providers/{customer}/k{i}/status"))
                .and_then(|a| a.json()["owner"].as_u64())?;
            match &kamailio.contacts(&format!("k{i}"))[..] {
                [one] => {
                    let host = one.split('@').nth(1)?.split(':').next()?;
                    (loopback_member(host) == Some(owner)).then_some(owner)
                }
                _ => None,
            }
        })
        .collect()
}
