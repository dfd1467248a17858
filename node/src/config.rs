//! The node's configuration: one serde tree with a sub-struct per subsystem, embedded
//! defaults that start a working single node on loopback, and `validate()`, which names
//! the key and the problem for everything it refuses. `ops/tandem.example.toml` documents
//! every key; a test parses it and compares it with these defaults.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub sip: SipConfig,
    pub registrar: RegistrarConfig,
    pub registration_agent: RegistrationAgentConfig,
    pub app_server: AppServerConfig,
    pub cdr: CdrConfig,
    pub dialplan: DialplanConfig,
    /// Absent: a standalone node, a cluster of one with no internal listener.
    pub cluster: Option<ClusterConfig>,
    pub admin: AdminConfig,
    pub log: LogConfig,
}

pub use tandem_raft_store::command::Role;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Cluster-unique node id, never reused.
    pub id: u64,
    /// Where this node keeps its state.
    pub data_dir: PathBuf,
    pub role: Role,
    /// The master key file for field encryption; `None` means `<data_dir>/master.key`.
    pub master_key: Option<PathBuf>,
    /// Threads of the async runtime that runs Raft, HTTP, TCP/TLS accept loops and the
    /// node's periodic work; 0 means one per core. One is the default: every hop between
    /// its tasks that lands on another thread is a wake-up (BENCHMARKS.md). RocksDB's
    /// fsyncs and snapshot builds run on threads of their own.
    pub runtime_threads: u16,
    /// Threads for the SIP stack, each running its own share of the transaction layer and
    /// core; a call's messages all go to the thread its Call-ID hashes to. 0 means one per
    /// core. One is the default: on two cores shared with the load generator, one SIP
    /// thread beside the runtime passed every step to 13,661 registrations/s where two,
    /// handing half the messages to each other, reached 11,261 (BENCHMARKS.md). More pay
    /// off only where cores are free.
    pub sip_threads: u16,
    /// Free space (MiB) the data dir's file system must keep: below it the node refuses
    /// writes of its own and says so on `/ready`, before RocksDB runs out of room
    /// (node/DESIGN.md, "A full disk"). 0 turns the check off.
    pub min_free_disk_mib: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            data_dir: PathBuf::from("./data"),
            role: Role::Full,
            master_key: None,
            runtime_threads: 1,
            sip_threads: 1,
            min_free_disk_mib: 128,
        }
    }
}

impl NodeConfig {
    /// How many SIP threads to start: `sip_threads`, or one per core (`ShardThreads`
    /// starts at most `MAX_SIP_THREADS`).
    pub fn sip_thread_count(&self) -> usize {
        match self.sip_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => usize::from(n),
        }
    }

    pub fn master_key_path(&self) -> PathBuf {
        self.master_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }
}

/// Most runtime threads `node.runtime_threads` accepts.
pub const MAX_RUNTIME_THREADS: u16 = 256;
/// The most SIP threads (`node.sip_threads`) a node runs: each has its own transaction
/// tables, and a transaction id carries its thread in its low bits.
pub const MAX_SIP_THREADS: u16 = 64;
/// The digest algorithms `registrar.digest_algorithms` may name (RFC 3261, RFC 8760);
/// case does not matter.
pub const DIGEST_ALGORITHMS: [&str; 2] = ["MD5", "SHA-256"];

/// `"10.0.0.0/8"`, `"192.0.2.7"` or `"2001:db8::/32"` as (network, prefix length).
pub fn parse_network(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address or network"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?} has a prefix length outside 0..={max}"))?,
    };
    Ok((ip, len))
}

/// The phones offered a SHA-256 challenge by default: those seen to answer one. linphone
/// (belle-sip: the desktop, mobile and command-line clients all say "Linphone") does, and
/// the black-box suite registers and calls with it.
pub const SHA256_USER_AGENTS: [&str; 1] = ["linphone"];

/// The highest `cluster.batch_linger_ms`: a tenth of the 100 ms a registration or call
/// setup step may take at the 99th percentile.
const MAX_BATCH_LINGER_MS: u64 = 10;

/// The internal listener and Raft timing of a clustered node.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The internal mutual-TLS listener for Raft RPCs and membership requests.
    pub listen: SocketAddr,
    /// `host:port` other nodes reach the listener at; `None` means `listen`.
    pub advertise: Option<String>,
    /// The cluster CA's certificate, PEM.
    pub ca_certificate: PathBuf,
    /// This node's certificate from the cluster CA, PEM.
    pub certificate: PathBuf,
    /// This node's private key, PEM.
    pub private_key: PathBuf,
    pub heartbeat_ms: u64,
    /// The shortest election timeout; the longest is twice this. A witness stands only
    /// after three times the longest without a leader.
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many log entries.
    pub snapshot_every: u64,
    /// How long a write waits to be committed before it fails.
    pub propose_timeout_ms: u64,
    /// A leader without a quorum acknowledgement for this long is degraded.
    pub quorum_timeout_ms: u64,
    /// `/ready` fails while more committed entries than this are not yet applied here.
    pub max_apply_lag: u64,
    /// The longest a log entry waits for more writes while they arrive fast enough to
    /// fill it (a registration storm); 0 never waits. Each entry costs every node an
    /// fsync and an RPC, so under load this trades a few ms of latency for CPU.
    pub batch_linger_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: "127.0.0.1:7060".parse().expect("literal address"),
            advertise: None,
            ca_certificate: PathBuf::new(),
            certificate: PathBuf::new(),
            private_key: PathBuf::new(),
            heartbeat_ms: 100,
            election_timeout_ms: 300,
            snapshot_every: 50_000,
            propose_timeout_ms: 5_000,
            quorum_timeout_ms: 1_500,
            max_apply_lag: 1_000,
            batch_linger_ms: 5,
        }
    }
}

impl ClusterConfig {
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The internal listener's mutual-TLS configuration.
    pub fn tls(&self) -> Result<tandem_raft_store::tls::ClusterTls, Error> {
        Ok(tandem_raft_store::tls::ClusterTls::load(
            &self.ca_certificate,
            &self.certificate,
            &self.private_key,
        )?)
    }

    /// The fingerprint of the cluster CA, which a data dir records.
    pub fn ca_fingerprint(&self) -> Result<String, Error> {
        Ok(tandem_raft_store::tls::ca_fingerprint(
            &self.ca_certificate,
        )?)
    }
}

/// The HTTP admin API: status, membership, accounts, health and metrics.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token file; `None` means `<data_dir>/admin.token`, created on first start.
    pub token_file: Option<PathBuf>,
    /// Whether `/metrics` needs the bearer token too (a scraper then sends it); off by
    /// default, as Prometheus scrapes without one.
    pub metrics_need_token: bool,
    /// The most provider accounts a customer's own token may create for its customer
    /// (each makes the nodes send REGISTERs to a host of the customer's choosing); the
    /// operator's token may create more.
    pub customer_provider_accounts: u32,
    /// The PEM certificate (chain) the API presents over HTTPS, with `private_key`; a
    /// node's cluster certificate serves (`tandem cert node`). Without them the API
    /// speaks plain HTTP, which only a loopback `listen` may.
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// The CA certificate the CLI checks the API's certificate against; unset, the
    /// cluster's (`cluster.ca_certificate`).
    pub ca_certificate: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:8060".parse().expect("literal address"),
            token_file: None,
            metrics_need_token: false,
            customer_provider_accounts: 20,
            certificate: None,
            private_key: None,
            ca_certificate: None,
        }
    }
}

impl Config {
    /// The CA certificate the CLI checks the admin API's certificate against, when the API
    /// speaks HTTPS.
    pub fn admin_ca_path(&self) -> Option<PathBuf> {
        self.admin.certificate.as_ref()?;
        self.admin
            .ca_certificate
            .clone()
            .or_else(|| self.cluster.as_ref().map(|c| c.ca_certificate.clone()))
    }

    pub fn token_path(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("admin.token"))
    }

    /// Raft timing from `[cluster]`, or the defaults for a standalone node.
    pub fn raft_settings(&self) -> tandem_raft_store::replica::RaftSettings {
        let c = self.cluster.clone().unwrap_or_default();
        let settings = tandem_raft_store::replica::RaftSettings {
            heartbeat: Duration::from_millis(c.heartbeat_ms),
            election_timeout_min: Duration::from_millis(c.election_timeout_ms),
            election_timeout_max: Duration::from_millis(c.election_timeout_ms.saturating_mul(2)),
            snapshot_every: c.snapshot_every,
            propose_timeout: Duration::from_millis(c.propose_timeout_ms),
            batch_linger: Duration::from_millis(c.batch_linger_ms),
            ..Default::default()
        };
        match self.node.role {
            Role::Full => settings,
            Role::Witness => settings.for_witness(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
    /// PEM certificate chain for the TLS listeners.
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key for the TLS listeners.
    pub tls_private_key: Option<PathBuf>,
    /// Largest message accepted on any transport, in bytes.
    pub max_message_size: usize,
    /// Open TCP plus TLS connections beyond which new ones are refused, TLS handshakes in
    /// progress included.
    pub max_connections: usize,
    /// Connections from one IP address beyond which new ones from it are refused.
    pub max_connections_per_address: usize,
    /// A connection with no traffic for this many seconds is closed.
    pub connection_idle_timeout_secs: u64,
    /// A write to a connection that does not complete in this many seconds (a peer that
    /// stopped reading) closes the connection.
    pub connection_write_timeout_secs: u64,
    /// Requests whose User-Agent contains one of these (case-insensitive) are dropped
    /// unanswered: the tools that scan SIP ports for open relays and weak passwords.
    pub refused_user_agents: Vec<String>,
    /// Transactions the node holds at most, completed ones (kept to absorb
    /// retransmissions) included; past it, new requests get 503 with Retry-After.
    pub max_transactions: usize,
    /// Requests per second one source address may send, sustained; past that (and its
    /// burst) the address is banned for `flood_ban_secs`. 0 turns the limit off.
    pub flood_requests_per_sec: u32,
    /// Requests one address may send at once above the sustained rate.
    pub flood_burst: u32,
    /// How long an address that exceeded the limit loses its unproven requests, in
    /// seconds (requests that show a round trip, such as credentials on a nonce issued
    /// to that address, still pass).
    pub flood_ban_secs: u64,
    /// Addresses or networks (`"192.0.2.10"`, `"10.0.0.0/8"`) never limited: trusted
    /// trunks and PBXs that send more. Cluster members are always exempt.
    pub flood_exempt: Vec<String>,
    /// RFC 3261 timer T1 (round-trip estimate), in milliseconds.
    pub t1_ms: u64,
    /// RFC 3261 timer T2 (maximum retransmit interval), in milliseconds.
    pub t2_ms: u64,
    /// RFC 3261 timer T4 (maximum time a message stays in the network), in milliseconds.
    pub t4_ms: u64,
    /// On SIGTERM, how long running transactions may take to finish, in seconds.
    pub shutdown_grace_secs: u64,
    /// Retry-After sent with 503 while shutting down, in seconds.
    pub retry_after_secs: u32,
    /// RFC 3261 Timer C: how long a forwarded INVITE may ring before the proxy cancels
    /// it, in seconds (at least 181; tests may go lower, see `validate`).
    pub timer_c_secs: u64,
    /// While draining, how long running calls get to end before the node reports itself
    /// drained anyway, in seconds.
    pub drain_call_wait_secs: u64,
    /// Dialogs (calls and subscriptions) the proxy tracks at most; at most half of them
    /// for callers who did not authenticate.
    pub max_dialogs: usize,
    /// A full dialog table makes room for a new dialog by evicting one unused longest,
    /// if nobody used it for this many seconds (its BYE was most likely lost); otherwise
    /// the new dialog gets 503. Strangers evict only strangers' dialogs.
    pub dialog_evict_idle_secs: u64,
    /// DNS servers (`ip:port`) for RFC 3263 lookups of providers and other outside
    /// servers; empty: the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// The public IP address of a node behind 1:1 NAT (a cloud VM): put in Via,
    /// Record-Route and Contact instead of the listeners' addresses, with their ports.
    pub advertise: Option<IpAddr>,
}

/// The User-Agents of common SIP scanners (SIPVicious and its forks, sipsak-based and
/// commercial scanning tools), which no phone sends.
pub const DEFAULT_REFUSED_USER_AGENTS: [&str; 6] = [
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "vaxsipuseragent",
    "pplsip",
];

impl Default for SipConfig {
    fn default() -> Self {
        let local: SocketAddr = "127.0.0.1:5060".parse().expect("literal address");
        SipConfig {
            udp: vec![local],
            tcp: vec![local],
            tls: Vec::new(),
            tls_certificate: None,
            tls_private_key: None,
            max_message_size: tandem_sip::DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: 4096,
            max_connections_per_address: 256,
            connection_idle_timeout_secs: 600,
            connection_write_timeout_secs: 10,
            refused_user_agents: DEFAULT_REFUSED_USER_AGENTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_transactions: 500_000,
            flood_requests_per_sec: 100,
            flood_burst: 400,
            flood_ban_secs: 60,
            flood_exempt: Vec::new(),
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
            shutdown_grace_secs: 32,
            retry_after_secs: 30,
            timer_c_secs: 181,
            drain_call_wait_secs: 3600,
            max_dialogs: 100_000,
            dialog_evict_idle_secs: 1200,
            dns_servers: Vec::new(),
            advertise: None,
        }
    }
}

/// Registrar limits and digest authentication.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrarConfig {
    /// Shortest registration accepted, in seconds; shorter ones get 423 with Min-Expires.
    pub min_expires: u32,
    /// Longest registration granted, in seconds; longer requests are capped.
    pub max_expires: u32,
    /// Granted when a REGISTER names no expiry, in seconds.
    pub default_expires: u32,
    /// How long a digest nonce stays fresh, in seconds; then `stale=true`.
    pub nonce_lifetime_secs: u64,
    /// Digest algorithms accepted, in order of preference. Each challenge offers one:
    /// the first of these the phone is known to answer (SHA-256 only to
    /// `sha256_user_agents`, or to everyone when MD5 is not listed).
    pub digest_algorithms: Vec<String>,
    /// User-Agent fragments (any case) of phones known to answer a SHA-256 challenge.
    pub sha256_user_agents: Vec<String>,
    /// Seconds between the CRLFCRLF keepalives a node sends to the UDP bindings that
    /// registered through it, to keep NAT mappings open; 0 turns them off.
    pub nat_keepalive_secs: u64,
    /// Most logins a node keeps opened (HA1 decrypted, about 154 bytes each); past it a
    /// login is opened on every use (node/DESIGN.md, "Logins opened ahead of use").
    pub opened_logins_max: usize,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            nonce_lifetime_secs: 300,
            digest_algorithms: vec!["SHA-256".into(), "MD5".into()],
            sha256_user_agents: SHA256_USER_AGENTS.iter().map(|a| a.to_string()).collect(),
            nat_keepalive_secs: 20,
            opened_logins_max: 200_000,
        }
    }
}

/// The registration agent: leases on customers' provider accounts and retries.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationAgentConfig {
    /// How long a lease lets its owner register without renewing, in seconds: after a node
    /// dies, its accounts are registered elsewhere within about this long.
    pub lease_secs: u64,
    /// Seconds between an owner's renewals of all its leases (one Raft entry each time).
    pub renew_secs: u64,
    /// Seconds the leader waits after a lease lapsed before granting it elsewhere, for
    /// clocks that disagree; the owner stops this long before the lapse, too.
    pub clock_skew_secs: u64,
    /// A node spreads its first REGISTERs after start or takeover over up to this many
    /// seconds, so a provider never sees a burst.
    pub start_spread_secs: u64,
    /// The first wait after a timeout, DNS failure or 5xx, in seconds; it doubles per
    /// failure in a row up to `retry_max_secs`.
    pub retry_min_secs: u64,
    pub retry_max_secs: u64,
    /// The first wait after the provider refused the credentials (or 403/404), doubling up
    /// to `auth_retry_max_secs`, so a wrong password never floods the provider.
    pub auth_retry_min_secs: u64,
    pub auth_retry_max_secs: u64,
    /// Networks outside the public internet (`"10.20.0.0/16"`, `"192.0.2.7"`) that
    /// provider accounts may reach, with their REGISTERs and the calls placed through
    /// them: a carrier on the operator's own network. Empty: only public addresses, so a
    /// customer's provider account cannot make the nodes send SIP inside their network.
    pub private_networks: Vec<String>,
}

impl Default for RegistrationAgentConfig {
    fn default() -> Self {
        RegistrationAgentConfig {
            lease_secs: 20,
            renew_secs: 5,
            clock_skew_secs: 2,
            start_spread_secs: 10,
            retry_min_secs: 5,
            retry_max_secs: 300,
            auth_retry_min_secs: 300,
            auth_retry_max_secs: 3600,
            private_networks: Vec::new(),
        }
    }
}

/// The app server: calls out through providers and dialplans.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AppServerConfig {
    /// How long a dialled leg rings when its dial spec gives no time, in seconds.
    pub ring_secs: u64,
    /// Seconds between the in-dialog OPTIONS each leg of a connected call is asked: a leg
    /// that answers 481 or 408 or nothing has gone, and the call is ended on both sides,
    /// so a phone or provider that vanished does not leave the other leg up. 0: never.
    pub keepalive_secs: u64,
    /// The longest a call may last, in seconds; then both legs get a BYE. 0: no limit.
    pub max_call_secs: u64,
    /// The session interval (RFC 4028) asked for on each leg the app server dials, and
    /// given to a caller that supports session timers without naming an interval, in
    /// seconds: a leg whose refresher stops refreshing ends the call within it. 0: off.
    pub session_expires_secs: u32,
    /// Whether a `sip:` URI in a dial spec may reach loopback, private, link-local or
    /// unique-local addresses (a customer's PBX on the provider's own network). Off: a
    /// dialplan, which runs for whoever calls, reaches only what the public can.
    pub uri_private_targets: bool,
}

impl Default for AppServerConfig {
    fn default() -> Self {
        AppServerConfig {
            ring_secs: 60,
            keepalive_secs: 60,
            max_call_secs: 4 * 3600,
            session_expires_secs: 1800,
            uri_private_targets: false,
        }
    }
}

/// The dialplan sandbox's limits that operators tune (dialplan/README.md, "Limits"); the
/// others are fixed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DialplanConfig {
    /// rhai operations per run.
    pub max_operations: u64,
    /// Milliseconds of script time per run (ringing inside `dial()` does not count).
    pub max_run_time_ms: u64,
    /// KiB a run may hold at once.
    pub max_memory_kib: u32,
    /// Runs of one account at once; more calls get 503 with Retry-After.
    pub max_runs_per_account: u32,
    /// Milliseconds of script time one account's runs may use per second on this node
    /// (0: no bound); past it, its calls get 503 with Retry-After until it is back within.
    pub max_run_time_per_second_ms: u64,
    /// Runs on the node at once.
    pub max_runs: u32,
}

impl Default for DialplanConfig {
    fn default() -> Self {
        let l = tandem_dialplan::Limits::default();
        DialplanConfig {
            max_operations: l.max_operations,
            max_run_time_ms: l.max_run_time.as_millis() as u64,
            max_memory_kib: (l.max_memory_bytes / 1024) as u32,
            max_runs_per_account: l.max_runs_per_account,
            max_run_time_per_second_ms: l.run_time_per_second.as_millis() as u64,
            max_runs: l.max_runs,
        }
    }
}

impl DialplanConfig {
    /// The sandbox's limits: these keys over the defaults.
    pub fn limits(&self) -> tandem_dialplan::Limits {
        tandem_dialplan::Limits {
            max_operations: self.max_operations,
            max_run_time: Duration::from_millis(self.max_run_time_ms),
            max_memory_bytes: i64::from(self.max_memory_kib) * 1024,
            max_runs_per_account: self.max_runs_per_account,
            run_time_per_second: Duration::from_millis(self.max_run_time_per_second_ms),
            max_runs: self.max_runs,
            ..tandem_dialplan::Limits::default()
        }
    }
}

/// Call detail records (node/DESIGN.md, "CDRs").
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CdrConfig {
    /// Days a customer's CDRs are kept unless the customer has a retention of its own.
    pub retention_days: u32,
    /// The most CDRs one purge step looks at (removes, or passes over as not yet due).
    pub purge_batch: u32,
    /// Milliseconds between purge steps: the room left for everything else.
    pub purge_every_ms: u64,
    /// Whether calls the proxy carries to local accounts get records (the app server's
    /// calls always do).
    pub proxied_calls: bool,
}

impl Default for CdrConfig {
    fn default() -> Self {
        CdrConfig {
            retention_days: 90,
            purge_batch: 1000,
            purge_every_ms: 100,
            proxied_calls: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing env-filter directive; the RUST_LOG environment variable overrides it.
    pub filter: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info,openraft=warn".into(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Reads and parses a TOML file. Syntax errors and unknown keys name the key.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            key: "-".into(),
            problem: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, Error> {
        toml::from_str(text).map_err(|e| Error::Config {
            key: e
                .span()
                .map(|s| key_at(text, s.start))
                .unwrap_or_else(|| "-".into()),
            problem: e.message().to_owned(),
        })
    }

    /// Every problem with the values, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<Error>> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: String| {
            problems.push(Error::Config {
                key: key.into(),
                problem,
            })
        };
        if self.node.id == 0 {
            bad("node.id", "must be at least 1".into());
        }
        if self.node.data_dir.as_os_str().is_empty() {
            bad("node.data_dir", "must not be empty".into());
        }
        if self.node.sip_threads > MAX_SIP_THREADS {
            bad(
                "node.sip_threads",
                format!("must be at most {} (0 means one per core)", MAX_SIP_THREADS),
            );
        }
        if self.node.min_free_disk_mib > 1 << 20 {
            bad(
                "node.min_free_disk_mib",
                "must be at most 1048576 (1 TiB; 0 turns the check off)".into(),
            );
        }
        if self.node.runtime_threads > MAX_RUNTIME_THREADS {
            bad(
                "node.runtime_threads",
                format!("must be at most {MAX_RUNTIME_THREADS} (0 means one per core)"),
            );
        }
        let sip = &self.sip;
        if self.node.role == Role::Full
            && sip.udp.is_empty()
            && sip.tcp.is_empty()
            && sip.tls.is_empty()
        {
            bad(
                "sip",
                "a full node needs at least one of sip.udp, sip.tcp, sip.tls".into(),
            );
        }
        for (key, addrs) in [
            ("sip.udp", &sip.udp),
            ("sip.tcp", &sip.tcp),
            ("sip.tls", &sip.tls),
        ] {
            let mut seen = HashSet::new();
            for a in addrs {
                if !seen.insert(a) {
                    bad(key, format!("{a} is listed twice"));
                }
            }
        }
        for (key, addrs) in [
            ("sip.udp", &sip.udp),
            ("sip.tcp", &sip.tcp),
            ("sip.tls", &sip.tls),
        ] {
            for a in addrs.iter().filter(|a| a.ip().is_unspecified()) {
                bad(
                    key,
                    format!(
                        "{a} listens on every address, but the node must name one address \
                         in Via and Record-Route: list each address to listen on"
                    ),
                );
            }
        }
        // RFC 3261 wants Timer C above three minutes; a test that watches it fire sets
        // TANDEM_TEST_SHORT_TIMERS=1 in the node's environment to allow any value from 1 s.
        let min_timer_c = if std::env::var_os("TANDEM_TEST_SHORT_TIMERS").is_some() {
            1
        } else {
            181
        };
        if !(min_timer_c..=86_400).contains(&sip.timer_c_secs) {
            bad(
                "sip.timer_c_secs",
                format!(
                    "must be at least {min_timer_c} (RFC 3261 §16.6: more than three minutes) \
                     and at most 86400"
                ),
            );
        }
        if !(100..=10_000_000).contains(&sip.max_dialogs) {
            bad("sip.max_dialogs", "must be 100 to 10000000".into());
        }
        // A dialog's BYE may take 32 s (Timer F) to get through; a test that watches a
        // full table evict sets TANDEM_TEST_SHORT_TIMERS=1 to allow any value from 1 s.
        let min_evict_idle = if std::env::var_os("TANDEM_TEST_SHORT_TIMERS").is_some() {
            1
        } else {
            60
        };
        if !(min_evict_idle..=43_200).contains(&sip.dialog_evict_idle_secs) {
            bad(
                "sip.dialog_evict_idle_secs",
                format!(
                    "must be at least {min_evict_idle} and at most 43200 (12 h, when an \
                     unused dialog is forgotten anyway)"
                ),
            );
        }
        if sip.drain_call_wait_secs > 7 * 86_400 {
            bad(
                "sip.drain_call_wait_secs",
                "must be at most 604800 (a week)".into(),
            );
        }
        for a in &sip.tls {
            if sip.tcp.contains(a) {
                bad("sip.tls", format!("{a} is also a TCP listener"));
            }
        }
        if !sip.tls.is_empty() {
            for (key, path) in [
                ("sip.tls_certificate", &sip.tls_certificate),
                ("sip.tls_private_key", &sip.tls_private_key),
            ] {
                match path {
                    None => bad(key, "required when sip.tls lists a listener".into()),
                    Some(p) if !p.is_file() => {
                        bad(key, format!("{} is not a readable file", p.display()))
                    }
                    Some(_) => {}
                }
            }
        }
        if !(1024..=1 << 20).contains(&sip.max_message_size) {
            bad(
                "sip.max_message_size",
                "must be between 1024 and 1048576 bytes".into(),
            );
        }
        if sip.max_connections == 0 {
            bad("sip.max_connections", "must be at least 1".into());
        }
        if sip.max_connections_per_address == 0 {
            bad(
                "sip.max_connections_per_address",
                "must be at least 1".into(),
            );
        }
        if let Some(empty) = sip.refused_user_agents.iter().find(|a| a.trim().is_empty()) {
            bad(
                "sip.refused_user_agents",
                format!("{empty:?} would match every User-Agent"),
            );
        }
        if !(1_000..=10_000_000).contains(&sip.max_transactions) {
            bad("sip.max_transactions", "must be 1000 to 10000000".into());
        }
        if sip.flood_requests_per_sec > 1_000_000 {
            bad(
                "sip.flood_requests_per_sec",
                "must be at most 1000000 (0 turns the limit off)".into(),
            );
        }
        if sip.flood_requests_per_sec > 0 && sip.flood_burst == 0 {
            bad(
                "sip.flood_burst",
                "must be at least 1 while sip.flood_requests_per_sec is on".into(),
            );
        }
        if !(1..=86_400).contains(&sip.flood_ban_secs) {
            bad("sip.flood_ban_secs", "must be 1 to 86400".into());
        }
        for net in &sip.flood_exempt {
            if let Err(e) = parse_network(net) {
                bad("sip.flood_exempt", e);
            }
        }
        if sip.connection_write_timeout_secs == 0 {
            bad(
                "sip.connection_write_timeout_secs",
                "must be at least 1".into(),
            );
        }
        if sip.connection_idle_timeout_secs == 0 {
            bad(
                "sip.connection_idle_timeout_secs",
                "must be at least 1".into(),
            );
        }
        if sip.t1_ms == 0 {
            bad("sip.t1_ms", "must be at least 1".into());
        }
        if sip.t2_ms < sip.t1_ms {
            bad(
                "sip.t2_ms",
                format!("must not be below sip.t1_ms ({})", sip.t1_ms),
            );
        }
        if sip.t4_ms == 0 {
            bad("sip.t4_ms", "must be at least 1".into());
        }
        if sip.retry_after_secs == 0 {
            bad("sip.retry_after_secs", "must be at least 1".into());
        }
        if self.node.role == Role::Witness && self.cluster.is_none() {
            bad(
                "node.role",
                "a witness only makes sense in a cluster: add a [cluster] section".into(),
            );
        }
        if let Some(c) = &self.cluster {
            for (key, path) in [
                ("cluster.ca_certificate", &c.ca_certificate),
                ("cluster.certificate", &c.certificate),
                ("cluster.private_key", &c.private_key),
            ] {
                if path.as_os_str().is_empty() {
                    bad(key, "required in a [cluster] section".into());
                } else if !path.is_file() {
                    bad(key, format!("{} is not a readable file", path.display()));
                }
            }
            match &c.advertise {
                Some(a) if !tandem_raft_store::membership::is_host_port(a) => {
                    bad("cluster.advertise", format!("{a:?} is not host:port"))
                }
                None if c.listen.ip().is_unspecified() => bad(
                    "cluster.advertise",
                    format!(
                        "required when cluster.listen is {}: other nodes need an address \
                         they can reach",
                        c.listen
                    ),
                ),
                _ => {}
            }
            if c.heartbeat_ms == 0 {
                bad("cluster.heartbeat_ms", "must be at least 1".into());
            }
            if c.election_timeout_ms < 3 * c.heartbeat_ms {
                bad(
                    "cluster.election_timeout_ms",
                    format!("must be at least 3 heartbeats ({} ms)", 3 * c.heartbeat_ms),
                );
            }
            if c.snapshot_every < 100 {
                bad("cluster.snapshot_every", "must be at least 100".into());
            }
            if c.propose_timeout_ms < 100 {
                bad("cluster.propose_timeout_ms", "must be at least 100".into());
            }
            if c.batch_linger_ms > MAX_BATCH_LINGER_MS {
                bad(
                    "cluster.batch_linger_ms",
                    format!(
                        "must be at most {MAX_BATCH_LINGER_MS}: every write under load \
                         may wait this long"
                    ),
                );
            }
            if c.quorum_timeout_ms < c.heartbeat_ms {
                bad(
                    "cluster.quorum_timeout_ms",
                    format!(
                        "must not be below cluster.heartbeat_ms ({})",
                        c.heartbeat_ms
                    ),
                );
            }
            let sip_ports: Vec<&SocketAddr> =
                sip.udp.iter().chain(&sip.tcp).chain(&sip.tls).collect();
            if sip_ports.contains(&&c.listen) || self.admin.listen == c.listen {
                bad(
                    "cluster.listen",
                    format!("{} is also a SIP or admin listener", c.listen),
                );
            }
        }
        match (&self.admin.certificate, &self.admin.private_key) {
            (Some(_), None) => bad(
                "admin.private_key",
                "admin.certificate is set without it".into(),
            ),
            (None, Some(_)) => bad(
                "admin.certificate",
                "admin.private_key is set without it".into(),
            ),
            (None, None) if !self.admin.listen.ip().is_loopback() => bad(
                "admin.listen",
                format!(
                    "{} is not a loopback address, and the admin API speaks plain HTTP only \
                     on loopback: set admin.certificate and admin.private_key for HTTPS",
                    self.admin.listen
                ),
            ),
            _ => {}
        }
        if sip.tcp.contains(&self.admin.listen) || sip.tls.contains(&self.admin.listen) {
            bad(
                "admin.listen",
                format!("{} is also a SIP listener", self.admin.listen),
            );
        }
        let r = &self.registrar;
        if r.min_expires == 0 {
            bad("registrar.min_expires", "must be at least 1".into());
        }
        if r.max_expires < r.min_expires {
            bad(
                "registrar.max_expires",
                format!(
                    "must not be below registrar.min_expires ({})",
                    r.min_expires
                ),
            );
        }
        if !(r.min_expires..=r.max_expires).contains(&r.default_expires) {
            bad(
                "registrar.default_expires",
                "must lie between registrar.min_expires and registrar.max_expires".into(),
            );
        }
        if !(10..=86_400).contains(&r.nonce_lifetime_secs) {
            bad(
                "registrar.nonce_lifetime_secs",
                "must be 10 to 86400".into(),
            );
        }
        if !(1..=10_000_000).contains(&r.opened_logins_max) {
            bad(
                "registrar.opened_logins_max",
                "must be 1 to 10000000".into(),
            );
        }
        if r.nat_keepalive_secs > 3600 {
            bad(
                "registrar.nat_keepalive_secs",
                "must be at most 3600 (0 turns keepalives off)".into(),
            );
        }
        if r.digest_algorithms.is_empty() {
            bad(
                "registrar.digest_algorithms",
                "must name at least one".into(),
            );
        }
        if r.sha256_user_agents.iter().any(|a| a.trim().is_empty()) {
            bad(
                "registrar.sha256_user_agents",
                "an empty fragment would match every phone".into(),
            );
        }
        for a in &r.digest_algorithms {
            if !DIGEST_ALGORITHMS.iter().any(|d| d.eq_ignore_ascii_case(a)) {
                bad(
                    "registrar.digest_algorithms",
                    format!("{a:?} is not \"MD5\" or \"SHA-256\""),
                );
            }
        }
        if let Some(ip) = sip.advertise {
            if ip.is_unspecified() || ip.is_multicast() {
                bad(
                    "sip.advertise",
                    format!("{ip} is not an address others can send to"),
                );
            }
        }
        let a = &self.registration_agent;
        if !(3..=3600).contains(&a.lease_secs) {
            bad("registration_agent.lease_secs", "must be 3 to 3600".into());
        }
        if a.renew_secs == 0 || a.renew_secs.saturating_mul(2) > a.lease_secs {
            bad(
                "registration_agent.renew_secs",
                format!(
                    "must be at least 1 and at most half of registration_agent.lease_secs ({})",
                    a.lease_secs
                ),
            );
        }
        if a.clock_skew_secs.saturating_mul(2) >= a.lease_secs {
            bad(
                "registration_agent.clock_skew_secs",
                "must be under half of registration_agent.lease_secs".into(),
            );
        }
        if a.start_spread_secs > 3600 {
            bad(
                "registration_agent.start_spread_secs",
                "must be at most 3600".into(),
            );
        }
        for (key, min, max) in [
            ("retry", a.retry_min_secs, a.retry_max_secs),
            ("auth_retry", a.auth_retry_min_secs, a.auth_retry_max_secs),
        ] {
            if min == 0 {
                bad(
                    &format!("registration_agent.{key}_min_secs"),
                    "must be at least 1".into(),
                );
            }
            if max < min || max > 86_400 {
                bad(
                    &format!("registration_agent.{key}_max_secs"),
                    format!("must be from registration_agent.{key}_min_secs ({min}) to 86400"),
                );
            }
        }
        for net in &a.private_networks {
            if let Err(e) = parse_network(net) {
                bad("registration_agent.private_networks", e);
            }
        }
        let app = &self.app_server;
        if !(1..=300).contains(&app.ring_secs) {
            bad("app_server.ring_secs", "must be 1 to 300".into());
        }
        if app.keepalive_secs > 3600 {
            bad(
                "app_server.keepalive_secs",
                "must be at most 3600 (0: never)".into(),
            );
        }
        if app.session_expires_secs != 0 && !(90..=86_400).contains(&app.session_expires_secs) {
            bad(
                "app_server.session_expires_secs",
                "must be 90 to 86400 (RFC 4028's minimum is 90; 0: no session timers)".into(),
            );
        }
        if app.max_call_secs > 7 * 86_400 {
            bad(
                "app_server.max_call_secs",
                "must be at most 604800 (0: no limit)".into(),
            );
        }
        let d = &self.dialplan;
        if !(1_000..=100_000_000).contains(&d.max_operations) {
            bad(
                "dialplan.max_operations",
                "must be 1000 to 100000000".into(),
            );
        }
        if !(1..=10_000).contains(&d.max_run_time_ms) {
            bad("dialplan.max_run_time_ms", "must be 1 to 10000".into());
        }
        if !(64..=65_536).contains(&d.max_memory_kib) {
            bad("dialplan.max_memory_kib", "must be 64 to 65536".into());
        }
        if !(1..=1_000).contains(&d.max_runs_per_account) {
            bad("dialplan.max_runs_per_account", "must be 1 to 1000".into());
        }
        if d.max_run_time_per_second_ms > 100_000 {
            bad(
                "dialplan.max_run_time_per_second_ms",
                "must be at most 100000 (0: no bound)".into(),
            );
        }
        if !(1..=10_000).contains(&d.max_runs) || d.max_runs < d.max_runs_per_account {
            bad(
                "dialplan.max_runs",
                "must be 1 to 10000, and at least dialplan.max_runs_per_account".into(),
            );
        }
        let cdr = &self.cdr;
        if !(1..=3650).contains(&cdr.retention_days) {
            bad("cdr.retention_days", "must be 1 to 3650".into());
        }
        if !(1..=100_000).contains(&cdr.purge_batch) {
            bad("cdr.purge_batch", "must be 1 to 100000".into());
        }
        if !(1..=60_000).contains(&cdr.purge_every_ms) {
            bad("cdr.purge_every_ms", "must be 1 to 60000".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            bad("log.filter", format!("not a valid filter: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// The dotted key path of the table entry around byte `offset`, for error messages.
fn key_at(text: &str, offset: usize) -> String {
    let mut table = String::new();
    let mut key = String::new();
    for line in text[..offset.min(text.len())].lines() {
        let l = line.trim();
        if l.starts_with('[') {
            table = l.trim_matches(['[', ']']).trim().to_owned();
            key.clear();
        } else if let Some((k, _)) = l.split_once('=') {
            key = k.trim().to_owned();
        }
    }
    let line = text[offset.min(text.len())..]
        .lines()
        .next()
        .unwrap_or_default();
    if let Some((k, _)) = line.split_once('=') {
        key = k.trim().to_owned();
    }
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../../ops/tandem.example.toml");
        let parsed = Config::parse(text).unwrap();
        assert_eq!(
            parsed,
            Config::default(),
            "ops/tandem.example.toml drifted from the defaults"
        );
        // Every key in the example carries a comment right above it.
        let mut previous = "";
        for line in text.lines() {
            let l = line.trim();
            if !l.starts_with('#') && !l.starts_with('[') && l.contains('=') {
                assert!(
                    previous.trim_start().starts_with('#'),
                    "no comment above `{l}`"
                );
            }
            previous = line;
        }
    }

    #[test]
    fn errors_name_the_key() {
        let err = Config::parse("[sip]\nt1_ms = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sip.t1_ms"), "{err}");
        let err = Config::parse("[sip]\nudpp = []\n").unwrap_err().to_string();
        assert!(err.contains("udpp"), "{err}");
        let err = Config::parse("[sip]\nudp = [\"not-an-address\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sip.udp"), "{err}");

        let mut c = Config::default();
        c.sip.t2_ms = 10;
        c.sip.tls = vec!["127.0.0.1:5061".parse().unwrap()];
        c.node.id = 0;
        c.node.runtime_threads = MAX_RUNTIME_THREADS + 1;
        c.node.sip_threads = MAX_SIP_THREADS + 1;
        c.sip.max_dialogs = 10;
        c.sip.dialog_evict_idle_secs = 5;
        c.registrar.opened_logins_max = 0;
        let problems: Vec<String> = c
            .validate()
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            problems.iter().any(|p| p.contains("sip.t2_ms")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("sip.tls_certificate")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("node.id")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("registrar.opened_logins_max")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("node.sip_threads")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("node.runtime_threads")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("sip.max_dialogs")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("sip.dialog_evict_idle_secs")),
            "{problems:?}"
        );
    }
}
