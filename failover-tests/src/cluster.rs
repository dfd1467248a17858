//! Real clusters for failover tests: every member is a `tandem run` process on its own
//! loopback address (127.0.0.1, .2, .3 …), or in its own network namespace of a
//! [`Lab`] (10.99.0.11, .12, … with fixed ports), formed the way an operator forms one, with
//! `tandem cert`, `tandem keygen`, `tandem cluster init` and `tandem cluster join`. Members
//! can be killed and restarted on the same data dir. The admin API is reached with a
//! small blocking HTTP/1.1 client, so a test needs no async runtime.
//!
//! Every failure in a test that formed a cluster shows the tail of every member's log: a
//! [`Wait`] that times out or [`crate::fail`] puts them in its panic message, and for any
//! other panic (a plain `assert!`) the cluster's drop guard prints them.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::netns::{member_ip, Lab};
use crate::{
    describe, fail, fail_if_a_sip_thread_stalled, show_logs_if_failing, tandem_bin, tandem_command,
    Deadline, LogFile, Logs, Wait,
};

/// The admin token every member shares.
const TOKEN: &str = "failover-test-token-0123456789abcdef";
/// How long a member may take to answer /health after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A port free for UDP and TCP on `ip` right now (see [`crate::free_port`]).
pub fn free_port_on(ip: &str) -> u16 {
    free_ports_on(ip, 1)[0]
}

/// `n` distinct ports, each free for UDP and TCP on `ip` right now. The sockets that
/// prove a port free stay bound until all `n` are found, so the kernel cannot hand the
/// same port out twice (releasing each at once let two of one member's listeners share
/// a port now and then).
pub fn free_ports_on(ip: &str, n: usize) -> Vec<u16> {
    let mut held = Vec::with_capacity(n);
    let mut tries = 0;
    while held.len() < n {
        tries += 1;
        assert!(
            tries <= 20 * n,
            "no {n} ports on {ip} are free for both UDP and TCP after {tries} tries"
        );
        let Ok(udp) = UdpSocket::bind((ip, 0)) else {
            continue;
        };
        let Ok(addr) = udp.local_addr() else {
            continue;
        };
        if let Ok(tcp) = TcpListener::bind(addr) {
            held.push((addr.port(), udp, tcp));
        }
    }
    held.into_iter().map(|(port, _, _)| port).collect()
}

/// A member's role in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    Full,
    Witness,
}

/// One member process of a [`Cluster`].
pub struct Member {
    pub id: u64,
    pub role: MemberRole,
    pub ip: String,
    pub sip_port: u16,
    pub raft_addr: String,
    pub admin_addr: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The lab namespace the member runs in, if any.
    ns: Option<String>,
    log_path: PathBuf,
    /// Every member's log, this one's included: what a failure involving it shows.
    cluster_logs: Arc<[LogFile]>,
    child: Mutex<Option<Child>>,
    starts: Mutex<u32>,
    /// The binary it runs, when not the `tandem` under test.
    binary: Mutex<Option<PathBuf>>,
}

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

impl Member {
    fn new(
        root: &Path,
        id: u64,
        role: MemberRole,
        extra_cluster: &str,
        cluster_logs: Arc<[LogFile]>,
        lab: Option<&Lab>,
    ) -> Member {
        let dir = member_dir(root, id);
        std::fs::create_dir_all(&dir).expect("member dir");
        // A namespace of its own has every port free.
        let (ip, sip_port, raft_port, admin_port) = match lab {
            Some(_) => (member_ip(id), 5060, 7000, 8000),
            None => {
                let ip = format!("127.0.0.{id}");
                let ports = free_ports_on(&ip, 3);
                (ip, ports[0], ports[1], ports[2])
            }
        };
        let raft_addr = format!("{ip}:{raft_port}");
        let admin_addr: SocketAddr = format!("{ip}:{admin_port}").parse().unwrap();
        let certs = root.join("certs");
        let run = tandem_command()
            .args(["cert", "node", "--ca"])
            .arg(root.join("ca"))
            .args(["--name", &format!("node{id}"), "--id", &id.to_string()])
            .args(["--san", &ip, "--out"])
            .arg(&certs)
            .output()
            .expect("run tandem cert node");
        assert!(run.status.success(), "tandem cert node: {}", describe(&run));
        let (role_name, sip) = match role {
            MemberRole::Full => (
                "full",
                format!("udp = [\"{ip}:{sip_port}\"]\ntcp = [\"{ip}:{sip_port}\"]"),
            ),
            // Listed like a full node's, so a test can check that a witness ignores them.
            MemberRole::Witness => (
                "witness",
                format!("udp = [\"{ip}:{sip_port}\"]\ntcp = [\"{ip}:{sip_port}\"]"),
            ),
        };
        // Each node keeps its own copy of the cluster's key file, as on real hosts.
        std::fs::copy(root.join("master.key"), dir.join("master.key")).expect("copy key file");
        let q = |p: PathBuf| format!("{:?}", p.display().to_string());
        // Off loopback (a network namespace of its own) the admin API must speak HTTPS: it
        // presents the node's certificate, which names its IP, and `http` checks it.
        let admin_tls = if admin_addr.ip().is_loopback() {
            String::new()
        } else {
            let ca = std::fs::read(certs.join("ca.crt")).expect("read the cluster CA");
            ADMIN_CAS.lock().unwrap().push((admin_addr, ca));
            format!(
                "certificate = {}\nprivate_key = {}\n",
                q(certs.join(format!("node{id}.crt"))),
                q(certs.join(format!("node{id}.key")))
            )
        };
        // Two SIP threads where the default is one, so that every test's messages also
        // cross between the shards of a node.
        let extra_cluster = crate::reaching_test_providers(extra_cluster);
        let config = format!(
            "[node]\nid = {id}\ndata_dir = {data}\nrole = \"{role_name}\"\nmaster_key = {key}\n\
             sip_threads = 2\n\n\
             [sip]\n{sip}\n\n\
             [cluster]\nlisten = \"{raft_addr}\"\nca_certificate = {ca}\ncertificate = {cert}\n\
             private_key = {pkey}\n{extra_cluster}\n\n\
             [admin]\nlisten = \"{admin_addr}\"\ntoken_file = {token}\n{admin_tls}",
            data = q(member_data_dir(root, id)),
            key = q(dir.join("master.key")),
            ca = q(certs.join("ca.crt")),
            cert = q(certs.join(format!("node{id}.crt"))),
            pkey = q(certs.join(format!("node{id}.key"))),
            token = q(root.join("admin.token")),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("write member config");
        Member {
            id,
            role,
            ip,
            sip_port,
            raft_addr,
            admin_addr,
            log_path: dir.join("node.log"),
            cluster_logs,
            dir,
            config: config_path,
            ns: lab.map(|l| l.ns_name(Some(id))),
            child: Mutex::new(None),
            starts: Mutex::new(0),
            binary: Mutex::new(None),
        }
    }

    /// Runs `binary` instead of the `tandem` under test from the next start on (another
    /// release, for upgrade tests).
    pub fn set_binary(&self, binary: Option<PathBuf>) {
        *self.binary.lock().unwrap() = binary;
    }

    /// A `tandem` command that runs where this member runs (in its lab namespace, if any).
    fn command(&self) -> std::process::Command {
        let binary = self.binary.lock().unwrap().clone();
        match &self.ns {
            None => {
                let mut c = tandem_command();
                if let Some(b) = binary {
                    c = std::process::Command::new(b);
                    c.env("NO_COLOR", "1");
                }
                c
            }
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(binary.unwrap_or_else(tandem_bin))
                    .env("NO_COLOR", "1");
                c
            }
        }
    }

    /// Runs `tandem <args> --config <this member's config>` to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run tandem")
    }

    /// Starts `tandem run` (again) on this member's config and data dir.
    pub fn start(&self) {
        self.start_env(&[]);
    }

    /// [`Member::start`] with these variables in the node's environment.
    pub fn start_env(&self, env: &[(&str, &str)]) {
        let mut starts = self.starts.lock().unwrap();
        *starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open member log");
        let _ = writeln!(log, "===== start {} of node {} =====", *starts, self.id);
        let child = self
            .command()
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start tandem run");
        *self.child.lock().unwrap() = Some(child);
    }

    /// Waits until the admin API answers /health. Panics with the logs otherwise.
    #[track_caller]
    pub fn wait_healthy(&self) {
        Wait::new(
            format!("node {} to answer /health with 200", self.id),
            START_TIMEOUT,
        )
        .showing(self)
        .until(|| {
            if let Some(status) = self.exit_status() {
                self.panic_with_log(&format!("node {} exited with {status}", self.id));
            }
            self.get("/health").is_some_and(|a| a.status == 200)
        });
    }

    /// The running process's id, if it was started.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.lock().unwrap().is_some() && self.exit_status().is_none()
    }

    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|c| c.try_wait().expect("poll member"))
    }

    pub fn sigkill(&self) {
        if let Some(c) = self.child.lock().unwrap().as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets but answers nothing, and its
    /// log falls behind, until [`Member::sigcont`].
    pub fn sigstop(&self) {
        self.signal("STOP");
    }

    pub fn sigcont(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        if let Some(c) = self.child.lock().unwrap().as_ref() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{name}"), &c.id().to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        Wait::new(format!("node {} to exit", self.id), timeout)
            .every(Duration::from_millis(20))
            .poll(|| self.exit_status())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Panics with `message` and the tail of every member's log.
    #[track_caller]
    pub fn panic_with_log(&self, message: &str) -> ! {
        fail(self, message)
    }

    /// One admin API request; `None` if the node cannot be reached.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Option<Answer> {
        http(self.admin_addr, Some(TOKEN), method, path, body)
    }

    pub fn get(&self, path: &str) -> Option<Answer> {
        self.request("GET", path, None)
    }

    /// The member's SIP address (UDP and TCP share it).
    pub fn sip_addr(&self) -> SocketAddr {
        format!("{}:{}", self.ip, self.sip_port)
            .parse()
            .expect("a numeric SIP address")
    }

    /// `GET /v1/cluster/status`, if the node answers it.
    pub fn status(&self) -> Option<Value> {
        self.get("/v1/cluster/status")
            .filter(|a| a.status == 200)
            .map(|a| a.json())
    }

    /// `PUT /v1/customers/<id>`: the status code, or `None` when unreachable.
    pub fn put_customer(&self, id: &str) -> Option<u16> {
        let body = format!("{{\"name\":\"customer {id}\"}}");
        self.request("PUT", &format!("/v1/customers/{id}"), Some(&body))
            .map(|a| a.status)
    }

    /// Every customer id in this node's local replica.
    pub fn customer_ids(&self) -> Option<Vec<String>> {
        let answer = self.get("/v1/customers").filter(|a| a.status == 200)?;
        Some(
            answer
                .json()
                .as_array()?
                .iter()
                .filter_map(|c| c["id"].as_str().map(str::to_owned))
                .collect(),
        )
    }
}

impl Logs for Member {
    fn log_files(&self) -> Vec<LogFile> {
        self.cluster_logs.to_vec()
    }
}

/// The directory of member `id` under a cluster's root.
fn member_dir(root: &Path, id: u64) -> PathBuf {
    root.join(format!("node{id}"))
}

/// Member `id`'s data directory in the cluster whose temp dir is `root`.
pub fn member_data_dir(root: &Path, id: u64) -> PathBuf {
    member_dir(root, id).join("data")
}

impl Drop for Member {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// The bindings the node at `admin` stores for `user@example.com`, as its admin API lists
/// them.
pub fn bindings(admin: SocketAddr, token: &str, user: &str) -> Value {
    let a = http(
        admin,
        Some(token),
        "GET",
        &format!("/v1/accounts/example.com/{user}/bindings"),
        None,
    )
    .expect("admin API answers");
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
}

/// The value of one series in a node's `/metrics` (its name with any labels, e.g.
/// `tandem_sip_peer_up{node="2"}`), or None if the admin API does not answer or lacks it.
pub fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let body = http(admin, None, "GET", "/metrics", None)?.body;
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Waits until the node at `admin` holds `count` logins opened ahead of use
/// (`tandem_auth_logins_opened`), showing `logs` if it never does.
pub fn wait_logins_opened(logs: &dyn Logs, admin: SocketAddr, count: f64) {
    wait_metric(
        logs,
        admin,
        "tandem_auth_logins_opened",
        count,
        Duration::from_secs(10),
    );
}

/// Waits up to `timeout` until `series` in the `/metrics` of the node at `admin` reads
/// `want`, showing `logs` if it never does.
pub fn wait_metric(logs: &dyn Logs, admin: SocketAddr, series: &str, want: f64, timeout: Duration) {
    Wait::new(format!("{series} to read {want}"), timeout)
        .showing(logs)
        .until(|| {
            let seen = metric(admin, series);
            if seen == Some(want) {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        })
}

/// A minimal blocking HTTP/1.1 client: one request per connection, with the bearer
/// `token` if given. `None` when the server cannot be reached or answers garbage.
pub fn http(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<Answer> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    // A node speaks plain HTTP on loopback only; elsewhere (the network namespaces of the
    // netns tests) its API is HTTPS under the CA its cluster registered for the address.
    let mut stream: Box<dyn ReadWrite> = match admin_ca(addr) {
        None => Box::new(tcp),
        Some(ca) => Box::new(https(tcp, addr, &ca)?),
    };
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The CA certificate (PEM) each admin address that speaks HTTPS is checked against.
static ADMIN_CAS: Mutex<Vec<(SocketAddr, Vec<u8>)>> = Mutex::new(Vec::new());

fn admin_ca(addr: SocketAddr) -> Option<Vec<u8>> {
    let cas = ADMIN_CAS.lock().unwrap();
    cas.iter()
        .rev()
        .find(|(a, _)| *a == addr)
        .map(|(_, ca)| ca.clone())
}

/// A TLS client over `tcp` that checks the server's certificate against `ca_pem` for
/// `addr`'s IP.
pub fn https(
    tcp: TcpStream,
    addr: SocketAddr,
    ca_pem: &[u8],
) -> Option<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.ok()?).ok()?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    Some(rustls::StreamOwned::new(connection, tcp))
}

/// The environment of each member: `(cluster root, member id)` to variables.
pub type MemberEnv<'a> = dyn Fn(&Path, u64) -> Vec<(String, String)> + 'a;

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A cluster of real processes sharing one temp dir: CA, certificates, master key and
/// admin token at its root, one directory per member.
pub struct Cluster {
    pub members: Vec<Member>,
    logs: Arc<[LogFile]>,
    root: TempDir,
}

impl Cluster {
    /// Forms a cluster with one member per role (ids 1, 2, …): init on node 1, join the
    /// others through it, and wait until every member is a voter. `extra_cluster` adds
    /// `[cluster]` keys to every member's config.
    pub fn form(roles: &[MemberRole], extra_cluster: &str) -> Cluster {
        Cluster::form_env(roles, extra_cluster, &[])
    }

    /// [`Cluster::form`], with these variables in every member's environment (for
    /// example a member playing an older release with `TANDEM_TEST_FEATURES`).
    pub fn form_env(roles: &[MemberRole], extra_cluster: &str, env: &[(&str, &str)]) -> Cluster {
        Cluster::form_at(None, roles, extra_cluster, env)
    }

    /// [`Cluster::form`] with member `id` in `lab`'s namespace for it.
    pub fn form_in(lab: &Lab, roles: &[MemberRole], extra_cluster: &str) -> Cluster {
        Cluster::form_at(Some(lab), roles, extra_cluster, &[])
    }

    /// [`Cluster::form`] with `env(root, id)` in member `id`'s environment (`root`: the
    /// cluster's temp dir, for files the variables name).
    pub fn form_env_each(roles: &[MemberRole], extra_cluster: &str, env: &MemberEnv) -> Cluster {
        Cluster::form_each(None, roles, extra_cluster, env, roles.len())
    }

    /// [`Cluster::form`] of the first `joined` members only: the others have their
    /// certificates, configs and data dirs, and have neither joined nor started.
    pub fn form_joining(roles: &[MemberRole], extra_cluster: &str, joined: usize) -> Cluster {
        Cluster::form_each(None, roles, extra_cluster, &|_, _| Vec::new(), joined)
    }

    fn form_at(
        lab: Option<&Lab>,
        roles: &[MemberRole],
        extra_cluster: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        let same: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Cluster::form_each(lab, roles, extra_cluster, &|_, _| same.clone(), roles.len())
    }

    fn form_each(
        lab: Option<&Lab>,
        roles: &[MemberRole],
        extra_cluster: &str,
        env: &MemberEnv<'_>,
        joined: usize,
    ) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("tandem-cluster-")
            .tempdir()
            .expect("cluster temp dir");
        let run = tandem_command()
            .args(["cert", "ca", "--out"])
            .arg(root.path().join("ca"))
            .output()
            .expect("run tandem cert ca");
        assert!(run.status.success(), "tandem cert ca: {}", describe(&run));
        let run = tandem_command()
            .args(["keygen", "--out"])
            .arg(root.path().join("master.key"))
            .output()
            .expect("run tandem keygen");
        assert!(run.status.success(), "tandem keygen: {}", describe(&run));
        let token = root.path().join("admin.token");
        std::fs::write(&token, TOKEN).expect("write token");
        // A node refuses a token file others may read.
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("token file mode");
        let ids = 1..=roles.len() as u64;
        let logs: Arc<[LogFile]> = ids
            .clone()
            .map(|id| LogFile {
                name: format!("node {id}"),
                path: member_dir(root.path(), id).join("node.log"),
            })
            .collect();
        let members: Vec<Member> = ids
            .zip(roles)
            .map(|(id, role)| Member::new(root.path(), id, *role, extra_cluster, logs.clone(), lab))
            .collect();
        let cluster = Cluster {
            members,
            logs,
            root,
        };
        let env_of = |m: &Member| env(cluster.root(), m.id);
        let first = &cluster.members[0];
        let init = first.cli(&["cluster", "init"]);
        assert!(init.status.success(), "cluster init: {}", describe(&init));
        first.start_env(&pairs(&env_of(first)));
        first.wait_healthy();
        cluster.wait_for_leader(&[], Duration::from_secs(10));
        for (i, m) in cluster.members.iter().enumerate().take(joined).skip(1) {
            let join = match cluster.mint_join_token(m.id) {
                Some(token) => m.cli(&[
                    "cluster",
                    "join",
                    "--peer",
                    &first.raft_addr,
                    "--token-file",
                    &token.to_string_lossy(),
                ]),
                None => m.cli(&["cluster", "join", "--peer", &first.raft_addr]),
            };
            if !join.status.success() {
                cluster.panic_with_logs(&format!("cluster join: {}", describe(&join)));
            }
            m.start_env(&pairs(&env_of(m)));
            m.wait_healthy();
            cluster.wait_for_voters(i + 1, Duration::from_secs(20));
        }
        cluster
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// A join token for node `id`, minted through node 1's CLI, in a new file under the
    /// root; none if node 1 plays a release before join tokens (`TANDEM_TEST_FEATURES`),
    /// which admits a node without one. Node 1 raises the cluster's feature version a
    /// moment after it starts, so a refusal for the feature version is tried again.
    pub fn mint_join_token(&self, id: u64) -> Option<PathBuf> {
        let first = &self.members[0];
        let path = self.root().join(format!("join-{id}.token"));
        let mut last = None;
        for _ in 0..50 {
            let _ = std::fs::remove_file(&path);
            let run = first.cli(&[
                "cluster",
                "join-token",
                "create",
                "--node-id",
                &id.to_string(),
                "--out",
                &path.to_string_lossy(),
            ]);
            if run.status.success() {
                return Some(path);
            }
            let supported = first
                .status()
                .and_then(|s| s["supported_features"].as_u64())
                .unwrap_or(0);
            if supported < 5 {
                return None;
            }
            last = Some(describe(&run));
            std::thread::sleep(Duration::from_millis(200));
        }
        self.panic_with_logs(&format!("cluster join-token create: {last:?}"))
    }

    pub fn member(&self, id: u64) -> &Member {
        &self.members[(id - 1) as usize]
    }

    /// Waits until a running member, not in `excluding`, reports itself leader with a
    /// quorum. Returns its id and how long that took.
    #[track_caller]
    pub fn wait_for_leader(&self, excluding: &[u64], timeout: Duration) -> (u64, Duration) {
        let started = Deadline::after(timeout);
        let what = if excluding.is_empty() {
            "a leader with a quorum".to_owned()
        } else {
            format!("a leader with a quorum other than node {excluding:?}")
        };
        let leader = Wait::new(what, timeout)
            .every(Duration::from_millis(20))
            .showing(self)
            .until(|| self.leader(excluding));
        (leader, started.elapsed())
    }

    /// A running member, not in `excluding`, that reports itself leader with a quorum.
    fn leader(&self, excluding: &[u64]) -> Option<u64> {
        self.members
            .iter()
            .filter(|m| !excluding.contains(&m.id) && m.is_running())
            .find(|m| {
                m.status()
                    .is_some_and(|s| s["state"] == "leader" && s["quorum"] == "ok")
            })
            .map(|m| m.id)
    }

    /// Waits until the leader counts `n` voters, and so does each of them.
    #[track_caller]
    pub fn wait_for_voters(&self, n: usize, timeout: Duration) {
        // Every voter must count them too: the leader's view includes a change it has only
        // appended, and a node killed before the others have the change's last entry
        // leaves them in the joint configuration, which needs the old majority.
        let voters_of = |status: &Value| -> Vec<u64> {
            status["members"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .filter(|m| m["voter"] == true)
                        .filter_map(|m| m["id"].as_u64())
                        .collect()
                })
                .unwrap_or_default()
        };
        Wait::new(format!("every voter to count {n} voters"), timeout)
            .showing(self)
            .until(|| {
                let leader = self.leader(&[]).ok_or("no leader")?;
                let status = self
                    .member(leader)
                    .status()
                    .ok_or("no status from the leader")?;
                let voters = voters_of(&status);
                if voters.len() != n {
                    return Err(format!("node {leader} leads {} voters", voters.len()));
                }
                for id in voters {
                    let own = self
                        .member(id)
                        .status()
                        .ok_or(format!("no status from node {id}"))?;
                    if voters_of(&own).len() != n {
                        return Err(format!("node {id} does not count {n} voters yet"));
                    }
                }
                Ok(())
            });
    }

    /// Waits until every full member's peer monitor sees each of the others answer its
    /// pings (`tandem_sip_peer_up`), so calls to phones registered through another node
    /// go through that node.
    #[track_caller]
    pub fn wait_peers_up(&self, timeout: Duration) {
        let full: Vec<&Member> = self
            .members
            .iter()
            .filter(|m| m.role == MemberRole::Full)
            .collect();
        for m in &full {
            for peer in full.iter().filter(|p| p.id != m.id) {
                let series = format!("tandem_sip_peer_up{{node=\"{}\"}}", peer.id);
                wait_metric(self, m.admin_addr, &series, 1.0, timeout);
            }
        }
    }

    /// Waits until member `id` has applied everything the current leader has in its log.
    #[track_caller]
    pub fn wait_caught_up(&self, id: u64, timeout: Duration) {
        let (leader, _) = self.wait_for_leader(&[], timeout);
        let target = self
            .member(leader)
            .status()
            .map_or(0, |s| s["last_log_index"].as_u64().unwrap_or(0));
        self.wait_applied(id, target, timeout);
    }

    /// Waits until member `id` has applied at least `index`.
    #[track_caller]
    pub fn wait_applied(&self, id: u64, index: u64, timeout: Duration) {
        Wait::new(format!("node {id} to apply index {index}"), timeout)
            .showing(self)
            .until(|| {
                let status = self.member(id).status().ok_or("no status")?;
                match status["applied_index"].as_u64().unwrap_or(0) {
                    applied if applied >= index => Ok(()),
                    applied => Err(format!("applied index {applied}")),
                }
            });
    }

    /// Panics with `message` and the tail of every member's log.
    #[track_caller]
    pub fn panic_with_logs(&self, message: &str) -> ! {
        fail(self, message)
    }
}

impl Logs for Cluster {
    fn log_files(&self) -> Vec<LogFile> {
        self.logs.to_vec()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        show_logs_if_failing(self);
        fail_if_a_sip_thread_stalled(self);
    }
}

/// How long [`write_customers`] keeps retrying one write.
const WRITE_RETRY_FOR: Duration = Duration::from_secs(15);

/// Writes `count` customers `prefix-0 …`, `threads` at a time, and returns the ids that
/// were acknowledged with 200. Each write goes to the first of `targets` that
/// acknowledges it, and is retried (writes are idempotent) for up to 15 s, so a test can
/// write through a failover; one that is never acknowledged is left out. For a test about
/// eventual success; [`write_customers_logged`] says how long writes were refused.
pub fn write_customers(
    targets: &[&Member],
    prefix: &str,
    count: usize,
    threads: usize,
) -> Vec<String> {
    write_customers_logged(targets, prefix, count, threads).acked
}

/// What [`write_customers_logged`] saw.
#[derive(Debug, Default)]
pub struct Writes {
    /// The ids acknowledged with 200, in no particular order.
    pub acked: Vec<String>,
    /// When each acknowledgement came, from the start of the writes.
    pub acked_at: Vec<Duration>,
    /// Answers other than 200 (or none at all), before a write was acknowledged.
    pub refusals: usize,
}

impl Writes {
    /// The longest stretch with no write acknowledged, from the start to the last
    /// acknowledgement: how long the cluster was unavailable to writers.
    pub fn longest_gap(&self) -> Duration {
        let mut at = self.acked_at.clone();
        at.sort_unstable();
        let mut previous = Duration::ZERO;
        let mut longest = Duration::ZERO;
        for t in at {
            longest = longest.max(t.saturating_sub(previous));
            previous = t;
        }
        longest
    }
}

/// [`write_customers`], counting refusals and timing every acknowledgement.
pub fn write_customers_logged(
    targets: &[&Member],
    prefix: &str,
    count: usize,
    threads: usize,
) -> Writes {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let log = Mutex::new(Writes::default());
    let started = crate::Deadline::after(Duration::from_secs(24 * 3600));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let id = format!("{prefix}-{i}");
                let mut refusals = 0;
                let acknowledged =
                    Wait::new(format!("a 200 to the write of {id}"), WRITE_RETRY_FOR).poll(|| {
                        targets.iter().any(|t| {
                            let ok = t.put_customer(&id) == Some(200);
                            refusals += usize::from(!ok);
                            ok
                        })
                    });
                let mut log = log.lock().unwrap();
                log.refusals += refusals;
                if acknowledged.is_some() {
                    log.acked.push(id);
                    log.acked_at.push(started.elapsed());
                }
            });
        }
    });
    log.into_inner().unwrap()
}

/// Creates customer `acme` (if missing) and account `user@domain` through the admin API.
pub fn add_account(admin: SocketAddr, token: &str, user: &str, domain: &str, password: &str) {
    let c = http(
        admin,
        Some(token),
        "PUT",
        "/v1/customers/acme",
        Some(r#"{"name":"Acme"}"#),
    )
    .expect("admin API answers");
    assert_eq!(c.status, 200, "{}", c.body);
    let body = format!(r#"{{"password":"{password}","customer":"acme"}}"#);
    let a = http(
        admin,
        Some(token),
        "PUT",
        &format!("/v1/accounts/{domain}/{user}"),
        Some(&body),
    )
    .expect("admin API answers");
    assert!(a.status == 201 || a.status == 200, "{}", a.body);
    assert!(
        !a.body.contains(password),
        "the API echoed the password: {}",
        a.body
    );
}
