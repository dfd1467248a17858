//! A network lab for fault tests: every cluster member in its own network namespace, the
//! test's own clients (phones, the provider's registrar, the admin API client) in another,
//! all joined by veth pairs to one bridge in a hub namespace. Nothing is added to the
//! namespace the test started in: no interface, no address, no route, so a lab cannot
//! send a packet anywhere but between the namespaces it created.
//!
//! Faults are nftables rules in the receiving member's namespace that drop what comes
//! from a peer: the sender's `send` succeeds and the packet vanishes, as on a real cut
//! link (a rule on the sending side would fail the `send` with EPERM instead, which no
//! real partition does). A one-way cut drops in one direction only.
//!
//! Creating namespaces needs root. CI runs as root; `ops/test.sh` leaves the lab's tests
//! out by name (their names start with `netns_`) and says so when it is not root, and a
//! lab test started by hand without root fails with that reason rather than passing.
//!
//! The thread that creates a [`Lab`] moves into the clients' namespace, so every socket
//! it (and every thread or process it starts later) opens is there; dropping the lab
//! moves it back and deletes the namespaces. Namespaces left behind by a test process
//! that was killed are deleted by the next lab.
//!
//! A WAN lab ([`Lab::wan`]) has no bridge: each namespace's `eth0` is a TUN device served
//! by a relay in the test process (`relay.rs`), which can hold every packet between two
//! members for a chosen time, as a long-distance link would.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::relay::{self, Relay};

/// The clients' address in every lab: phones, registrars and the admin client bind here.
pub const CLIENT_IP: &str = "10.99.0.2";

/// How many addresses the clients' namespace has: [`CLIENT_IP`] and the next ones, for
/// phones that must not look like one address to a node's flood limit.
pub const CLIENT_IPS: u8 = 8;

/// The clients' address `n` (0 is [`CLIENT_IP`]), for `n` below [`CLIENT_IPS`].
pub fn client_ip(n: u8) -> String {
    assert!(
        n < CLIENT_IPS,
        "the lab's clients have {CLIENT_IPS} addresses"
    );
    format!("10.99.0.{}", 2 + n)
}

/// The address of member `id` (1, 2, …) in a lab.
pub fn member_ip(id: u64) -> String {
    format!("10.99.0.{}", 10 + id)
}

/// The member whose lab address is `ip`, if any.
pub fn member_of(ip: &str) -> Option<u64> {
    let last: u64 = ip.strip_prefix("10.99.0.")?.parse().ok()?;
    (11..=250).contains(&last).then(|| last - 10)
}

/// The host (0 for the clients, else a member's id) whose lab address is `ip`, if any.
fn host_of(ip: Ipv4Addr) -> Option<u64> {
    // Per packet, so octets rather than strings.
    let [10, 99, 0, last] = ip.octets() else {
        return None;
    };
    match u64::from(last) {
        n if (2..2 + u64::from(CLIENT_IPS)).contains(&n) => Some(0),
        n if (11..=250).contains(&n) => Some(n - 10),
        _ => None,
    }
}

/// Every lab namespace's name starts with this, then the test process's id.
const PREFIX: &str = "tndlab";

/// Namespaces, links and cuts of one lab. Hosts are numbered: 0 is the clients, `id` is
/// member `id`.
pub struct Lab {
    tag: String,
    members: u64,
    /// Directed cuts (from, to): what `from` sends, `to` never receives.
    cuts: Mutex<BTreeSet<(u64, u64)>>,
    /// The namespace the creating thread was in, to go back to.
    home: File,
    /// A WAN lab's links.
    relay: Option<Relay>,
}

impl Lab {
    /// Creates the hub with its bridge, the clients' namespace and one namespace per
    /// member (ids 1..=members), links them all, and moves this thread into the clients'
    /// namespace. Panics with the reason if this process is not root or a tool is
    /// missing.
    pub fn new(members: u64) -> Lab {
        Lab::build(members, false)
    }

    /// A lab like [`Lab::new`] whose links go through a relay in this process instead of
    /// a bridge, so that [`Lab::set_delay`] can put a distance between the members.
    pub fn wan(members: u64) -> Lab {
        Lab::build(members, true)
    }

    fn build(members: u64, wan: bool) -> Lab {
        require_root();
        for tool in ["ip", "nft"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "the network lab needs `{tool}` (./ops/setup.sh installs it: iproute2, nftables)"
            );
        }
        remove_stale();
        let home = File::open("/proc/thread-self/ns/net").expect("open this thread's netns");
        let mut lab = Lab {
            tag: format!("{PREFIX}{}", std::process::id()),
            members,
            cuts: Mutex::new(BTreeSet::new()),
            home,
            relay: None,
        };
        let hub = lab.ns_name(None);
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        if !wan {
            ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", &hub, "link", "set", "br0", "up"]);
        }
        let mut tuns = Vec::new();
        for host in 0..=members {
            let ns = lab.ns_name(Some(host));
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            if wan {
                // A TUN device is created in the namespace of the thread that opens it.
                lab.enter(Some(host));
                tuns.push(relay::open_tun("eth0"));
                lab.enter(None);
            } else {
                let port = format!("h{host}");
                ip(&[
                    "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ]);
                ip(&["-n", &hub, "link", "set", &port, "master", "br0"]);
                ip(&["-n", &hub, "link", "set", &port, "up"]);
            }
            let addrs = if host == 0 {
                (0..CLIENT_IPS).map(client_ip).collect()
            } else {
                vec![member_ip(host)]
            };
            for addr in addrs {
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ]);
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            lab.apply_rules(host, &BTreeSet::new());
        }
        if wan {
            lab.relay = Some(Relay::start(tuns, host_of));
        }
        lab.enter(Some(0));
        lab
    }

    /// From now on every packet between two members of this WAN lab waits `one_way`
    /// (each way). Panics for a lab with a bridge.
    pub fn set_delay(&self, one_way: Duration) {
        self.relay
            .as_ref()
            .expect("only a WAN lab (Lab::wan) has a delay")
            .set_delay(one_way);
    }

    /// Packets a WAN lab's relay has delivered (0 for a lab with a bridge).
    pub fn relayed(&self) -> u64 {
        self.relay.as_ref().map_or(0, Relay::relayed)
    }

    /// The namespace of host `host` (0 = clients), or the hub's for `None`.
    pub fn ns_name(&self, host: Option<u64>) -> String {
        match host {
            None => format!("{}hub", self.tag),
            Some(0) => format!("{}c", self.tag),
            Some(id) => format!("{}n{id}", self.tag),
        }
    }

    /// A command that runs `program` inside member `id`'s namespace.
    pub fn command_in(&self, id: u64, program: impl Into<PathBuf>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns_name(Some(id))])
            .arg(program.into());
        c
    }

    /// From now on `from` reaches nothing of `to`'s (one way; `to` still reaches `from`).
    pub fn cut_one_way(&self, from: u64, to: u64) {
        let mut cuts = self.cuts.lock().unwrap();
        cuts.insert((from, to));
        self.apply_rules(to, &cuts);
    }

    /// Cuts `a` off from each of `others`, both ways.
    pub fn partition(&self, a: u64, others: &[u64]) {
        for &b in others {
            self.cut_one_way(a, b);
            self.cut_one_way(b, a);
        }
    }

    /// Removes every cut.
    pub fn heal(&self) {
        let mut cuts = self.cuts.lock().unwrap();
        let hosts: BTreeSet<u64> = cuts.iter().map(|(_, to)| *to).collect();
        cuts.clear();
        for host in hosts {
            self.apply_rules(host, &cuts);
        }
    }

    /// Rewrites host `host`'s table so that it drops exactly what the cuts into it say,
    /// atomically (one `nft -f` transaction).
    fn apply_rules(&self, host: u64, cuts: &BTreeSet<(u64, u64)>) {
        let mut script = String::from(
            "table inet lab {}\nflush table inet lab\ntable inet lab {\n  chain input {\n    \
             type filter hook input priority 0; policy accept;\n",
        );
        for (from, _) in cuts.iter().filter(|(_, to)| *to == host) {
            let from = if *from == 0 {
                // Every address of the clients' namespace.
                format!("{}-{}", client_ip(0), client_ip(CLIENT_IPS - 1))
            } else {
                member_ip(*from)
            };
            script.push_str(&format!("    ip saddr {from} drop\n"));
        }
        script.push_str("  }\n}\n");
        let ns = self.ns_name(Some(host));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("nft's stdin")
            .write_all(script.as_bytes())
            .expect("write nft rules");
        let status = child.wait().expect("wait for nft");
        assert!(status.success(), "nft -f failed in {ns} for:\n{script}");
    }

    /// Moves this thread into host `host`'s namespace (`None`: back where it started).
    fn enter(&self, host: Option<u64>) {
        let file;
        let fd = match host {
            Some(h) => {
                file = File::open(format!("/run/netns/{}", self.ns_name(Some(h))))
                    .expect("open the lab namespace");
                file.as_raw_fd()
            }
            None => self.home.as_raw_fd(),
        };
        #[allow(unsafe_code)]
        // SAFETY: `fd` is an open namespace file that outlives the call, and setns with
        // CLONE_NEWNET changes nothing but this thread's network namespace.
        let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The relay's devices go with it, before their namespaces.
        self.relay = None;
        self.enter(None);
        for host in (0..=self.members).map(Some).chain([None]) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns_name(host)])
                .status();
        }
    }
}

/// Panics unless this process is root, naming what the caller should do instead.
pub fn require_root() {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    let euid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    assert_eq!(
        euid, 0,
        "this test builds network namespaces or mounts file systems and needs root (CI runs \
         as root); ./ops/test.sh leaves tests named netns_* and root_* out when it is not root"
    );
}

/// Deletes the namespaces of labs whose test process is gone.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Runs `ip args…`, panicking with its output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
