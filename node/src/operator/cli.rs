//! The `tandem` command line. Parsing only; `main.rs` dispatches.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tandem", version, about = "Highly available SIP service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node. Without --config, the embedded defaults: one node on 127.0.0.1:5060.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit: 0 when valid, 64 when not.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Write a new master key file for field encryption (mode 0600; never overwrites).
    Keygen {
        /// The key file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Create the cluster CA, or issue node certificates for the internal mutual-TLS listener.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Create, grow, shrink and inspect a cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Master key rotation.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// SIP accounts, through the running node of --config.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Customers' accounts at third-party providers, which the registration agent keeps
    /// registered; through the running node of --config.
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// Customers' telephone numbers (DIDs): calls from their providers to a number ring
    /// the account it maps to; through the running node of --config.
    #[command(subcommand)]
    Number(NumberCommand),
    /// Accounts' dialplans (rhai scripts, dialplan/README.md); through the running node
    /// of --config.
    #[command(subcommand)]
    Dialplan(DialplanCommand),
    /// Call detail records and how long they are kept.
    #[command(subcommand)]
    Cdr(CdrCommand),
    /// Customers' trusted trunks: a PBX or carrier recognised by its address.
    #[command(subcommand)]
    Trunk(TrunkCommand),
    /// Customers' admin API tokens: each sees and changes only its customer's records.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Call A, then B, and connect them (RFC 3725 third-party call control), as an
    /// account's call; follows the call until it ends.
    Callback(CallbackCommand),
    /// This node's own lifecycle.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create a new cluster with this node as its only member (offline; run once, on the
    /// first node). Creates the master key file if it does not exist.
    Init {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Add this node to a running cluster through any member's internal address (offline;
    /// run once, before this node's first start). It becomes a voter once it has caught up.
    /// Needs a join token (`tandem cluster join-token create` on a member): from
    /// --token-file, or the TANDEM_JOIN_TOKEN environment variable.
    Join {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The internal `host:port` ([cluster] advertise) of any member.
        #[arg(long, value_name = "HOST:PORT")]
        peer: String,
        /// A file holding the join token.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// One-time join tokens: a node joins only with one that an operator minted.
    #[command(subcommand)]
    JoinToken(JoinTokenCommand),
    /// Remove a node from the cluster for good; its id is never used again. Asks the
    /// running node of --config.
    Remove {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The id of the node to remove.
        #[arg(value_name = "NODE_ID")]
        node: u64,
    },
    /// Members, roles, leader, term, log indexes, lag per member and quorum state, as the
    /// running node of --config sees them.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print the JSON the admin API returns.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Step 1: add a new master key to this node's key file (offline). New values are
    /// sealed with it once every node has the file; copy it to every node.
    Rotate {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Step 2: re-encrypt every sensitive field under the newest key, through Raft. Checks
    /// first that every member's key file holds that key.
    Reseal {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a new cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600). Never overwrites.
    Ca {
        /// The directory to write into; created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Named in the CA's subject, to tell clusters' CAs apart.
        #[arg(long, value_name = "NAME", default_value = "tandem")]
        cluster: String,
    },
    /// Issue a node certificate from the CA in --ca: OUT/NODE.crt, OUT/NODE.key (mode 0600),
    /// and OUT/ca.crt if missing. Never overwrites.
    Node {
        /// The directory holding ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The node's name: its certificate's common name and its files' names.
        #[arg(long, value_name = "NODE", value_parser = node_name)]
        name: String,
        /// The node's id (`node.id` in its config): the cluster link accepts the
        /// certificate only as this node, and refuses it once the node is removed.
        #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// An IP address or DNS name other nodes reach this node by; repeat for each.
        #[arg(long = "san", value_name = "ADDR", required = true, value_parser = subject_alt_name)]
        sans: Vec<String>,
        /// The directory to write into; created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// A node name becomes file names, so it must not be a path, hidden, or clash with the
/// CA's own files.
fn node_name(name: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) || name.starts_with('.') {
        return Err(
            "use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'".to_owned(),
        );
    }
    if name == "ca" {
        return Err("`ca` is reserved for the CA's own files".to_owned());
    }
    Ok(name.to_owned())
}

/// The same check a TLS client makes on the name it connects to, so a typo is a usage
/// error rather than a certificate no peer can match.
fn subject_alt_name(san: &str) -> Result<String, String> {
    rustls::pki_types::ServerName::try_from(san)
        .map(|_| san.to_owned())
        .map_err(|_| "not an IP address or a DNS name".to_owned())
}

impl Command {
    /// The config file of an operator command (`cluster`, `keys`, `account`, `node`).
    pub fn config_file(&self) -> Option<PathBuf> {
        match self {
            Command::Cluster(c) => Some(c.config()),
            Command::Keys(c) => Some(c.config()),
            Command::Account(c) => Some(c.config()),
            Command::Node(c) => Some(c.config()),
            Command::Provider(c) => Some(c.config()),
            Command::Number(c) => Some(c.config()),
            Command::Dialplan(c) => Some(c.config()),
            Command::Cdr(c) => Some(c.config()),
            Command::Trunk(c) => Some(c.config()),
            Command::Token(c) => Some(c.config()),
            Command::Callback(c) => Some(c.config.clone()),
            _ => None,
        }
    }
}

impl ClusterCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            ClusterCommand::Init { config }
            | ClusterCommand::Join { config, .. }
            | ClusterCommand::Remove { config, .. }
            | ClusterCommand::Status { config, .. } => config.clone(),
            ClusterCommand::JoinToken(c) => c.config(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Mint a token that admits one join. It is shown this once (only its hash is
    /// stored): on stdout, or written to a new file of mode 0600 with --out. Asks the
    /// running node of --config.
    Create {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Admit only this node id.
        #[arg(long, value_name = "ID")]
        node_id: Option<u64>,
        /// How long the token admits a node.
        #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
        expires_secs: u64,
        /// Write the token to FILE (created with mode 0600; never overwritten) instead of
        /// printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List join tokens (ids, whom they admit, expiry, who used them; never the tokens).
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Revoke a join token: it admits nobody from then on.
    Revoke {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The token's id (what `list` shows).
        id: String,
    },
}

impl JoinTokenCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            JoinTokenCommand::Create { config, .. }
            | JoinTokenCommand::List { config }
            | JoinTokenCommand::Revoke { config, .. } => config.clone(),
        }
    }
}

impl KeysCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            KeysCommand::Rotate { config } | KeysCommand::Reseal { config } => config.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Create an account, or change one: options left out keep their current values.
    Put {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// `user@domain`.
        #[arg(value_name = "USER@DOMAIN")]
        account: String,
        /// Required for a new account.
        #[arg(long)]
        customer: Option<String>,
        /// Set the password (required for a new account; leave it out to keep the current
        /// one): from TANDEM_PASSWORD if set, else asked for without echo. A value after
        /// --password is refused: the process list and shell history would show it.
        #[arg(long, num_args = 0..=1, value_name = "NONE")]
        password: Option<Option<String>>,
        /// Set the password to the first line of FILE.
        #[arg(long, value_name = "FILE", conflicts_with = "password")]
        password_file: Option<PathBuf>,
        /// Set the password from TANDEM_PASSWORD, which must be set (for scripts).
        #[arg(long, conflicts_with_all = ["password", "password_file"])]
        password_from_env: bool,
        /// Disable the account (its registrations and calls are refused).
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Enable a disabled account.
        #[arg(long)]
        enable: bool,
        /// Contacts per AOR (default for a new account: 5).
        #[arg(long)]
        max_contacts: Option<u32>,
        /// Concurrent calls it may place through one node (default for a new account: 4;
        /// 0: no limit).
        #[arg(long)]
        max_calls: Option<u32>,
    },
    /// Show one account and its current bindings.
    Show {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "USER@DOMAIN")]
        account: String,
    },
    /// List every account.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Delete an account and its bindings.
    Delete {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "USER@DOMAIN")]
        account: String,
    },
}

impl AccountCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            AccountCommand::Put { config, .. }
            | AccountCommand::Show { config, .. }
            | AccountCommand::List { config }
            | AccountCommand::Delete { config, .. } => config.clone(),
        }
    }
}

/// How the registration agent reaches a provider (`auto`: RFC 3263 decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    Auto,
    Udp,
    Tcp,
    Tls,
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Create a provider account, or change one: options left out keep their current
    /// values. The password is read from TANDEM_PROVIDER_PASSWORD if set, else asked for
    /// (never echoed); it is asked only for a new account or with --password.
    Put {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// `customer/name`.
        #[arg(value_name = "CUSTOMER/NAME")]
        provider: String,
        /// The provider's registrar: `host[:port]`, or a domain resolved by RFC 3263.
        #[arg(long)]
        registrar: Option<String>,
        #[arg(long, value_enum)]
        transport: Option<TransportArg>,
        /// The user part of the AOR registered.
        #[arg(long)]
        username: Option<String>,
        /// The digest username, when it differs from --username ("" clears it).
        #[arg(long)]
        auth_username: Option<String>,
        /// Set a new password (from TANDEM_PROVIDER_PASSWORD, or asked for).
        #[arg(long)]
        password: bool,
        /// The digest realm to answer ("" clears it: any).
        #[arg(long)]
        realm: Option<String>,
        /// The registration interval asked for, in seconds (default for a new account: 600).
        #[arg(long)]
        expires: Option<u32>,
        /// Disable the account: its owner un-registers it.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        enable: bool,
        /// `host[:port]` every request to the provider goes through ("" clears it).
        #[arg(long)]
        outbound_proxy: Option<String>,
        /// The user part of the Contact registered ("" clears it: the username).
        #[arg(long)]
        contact_user: Option<String>,
        /// The local account (`user@domain`) whose phones calls from the provider ring.
        #[arg(long)]
        inbound_account: Option<String>,
        /// A PEM file of CAs for the provider's TLS certificate, on every node ("" clears).
        #[arg(long)]
        ca_file: Option<String>,
    },
    /// Show one provider account.
    Show {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "CUSTOMER/NAME")]
        provider: String,
    },
    /// List provider accounts.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Delete a provider account; its owner un-registers it.
    Delete {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "CUSTOMER/NAME")]
        provider: String,
    },
    /// The account's registration as the node that holds its lease reports it.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "CUSTOMER/NAME")]
        provider: String,
    },
}

impl ProviderCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            ProviderCommand::Put { config, .. }
            | ProviderCommand::Show { config, .. }
            | ProviderCommand::List { config, .. }
            | ProviderCommand::Delete { config, .. }
            | ProviderCommand::Status { config, .. } => config.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Stop taking new calls and registrations (503 + Retry-After) and wait until running
    /// transactions have finished.
    Drain {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Start draining and return at once.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
}

impl NodeCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            NodeCommand::Drain { config, .. } => config.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum NumberCommand {
    /// Map a number to a local account of the customer (create or change).
    Put {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// An optional `+` and 3 to 20 digits.
        number: String,
        #[arg(long)]
        customer: String,
        /// The local account its calls ring, `user@domain`.
        #[arg(long)]
        account: String,
    },
    /// Show one number.
    Show {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        number: String,
    },
    /// List numbers.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Delete a number.
    Delete {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        number: String,
    },
}

impl NumberCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            NumberCommand::Put { config, .. }
            | NumberCommand::Show { config, .. }
            | NumberCommand::List { config, .. }
            | NumberCommand::Delete { config, .. } => config.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CallbackCommand {
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Whose call it is, `user@domain`: its customer's providers, its limits, its CDRs.
    #[arg(value_name = "ACCOUNT")]
    pub account: String,
    /// The dial spec rung first (dialplan/README.md): an account, or `number@provider`.
    #[arg(value_name = "A")]
    pub a: String,
    /// The dial spec rung once A answers.
    #[arg(value_name = "B")]
    pub b: String,
    /// Print the callback's id and return at once.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum TrunkCommand {
    /// Create or replace a trunk: calls from its sources go out as --account, with that
    /// account's dialplan and limits, and without digest.
    Put {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "CUSTOMER/NAME")]
        trunk: String,
        /// An address or network its calls come from (repeat for more; at most /16 wide
        /// for IPv4, /48 for IPv6).
        #[arg(long = "source", required = true)]
        sources: Vec<String>,
        /// Only over this transport (`auto`: any). UDP sources can be forged: prefer tcp
        /// or tls.
        #[arg(long, value_enum, default_value = "auto")]
        transport: TransportArg,
        /// Only from this source port.
        #[arg(long)]
        port: Option<u16>,
        /// The customer's account its calls are made as, `user@domain`.
        #[arg(long)]
        account: String,
        /// Keep the trunk but refuse its calls.
        #[arg(long)]
        disabled: bool,
    },
    /// Show one trunk.
    Show {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "CUSTOMER/NAME")]
        trunk: String,
    },
    /// List trunks.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Delete a trunk.
    Delete {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "CUSTOMER/NAME")]
        trunk: String,
    },
}

impl TrunkCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            TrunkCommand::Put { config, .. }
            | TrunkCommand::Show { config, .. }
            | TrunkCommand::List { config, .. }
            | TrunkCommand::Delete { config, .. } => config.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for a customer. The token is shown this once (only its hash is
    /// stored): on stdout, or written to a new file of mode 0600 with --out.
    Create {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        customer: String,
        /// What the token is for, shown in lists.
        #[arg(long, default_value = "")]
        label: String,
        /// Write the token to FILE (created with mode 0600; never overwritten) instead
        /// of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List tokens (ids, customers and labels; never the tokens).
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Revoke a token: every node refuses it from then on.
    Revoke {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The token's id (what `list` shows).
        id: String,
    },
}

impl TokenCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            TokenCommand::Create { config, .. }
            | TokenCommand::List { config, .. }
            | TokenCommand::Revoke { config, .. } => config.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CdrCommand {
    /// List call records, oldest first, a page at a time (or all with --all).
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
        /// Only this account's, `user@domain`.
        #[arg(long)]
        account: Option<String>,
        /// Calls that started at or after this time: RFC 3339 or Unix milliseconds.
        #[arg(long)]
        from: Option<String>,
        /// Calls that started before this time.
        #[arg(long)]
        to: Option<String>,
        /// Records per page (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Go on from where a previous page ended (the cursor it printed).
        #[arg(long)]
        after: Option<String>,
        /// Every page, not just the first; progress goes to standard error.
        #[arg(long)]
        all: bool,
        /// CSV (with a header line) instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// For benchmarks and tests: write synthetic old records straight into a stopped
    /// node's CDR store (kept on that node only, never shipped).
    Seed {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        customer: String,
        #[arg(long)]
        count: u64,
        /// How old the records are, in days.
        #[arg(long)]
        age_days: u32,
    },
    /// Show a customer's CDR retention, or set it with --days (0: the node's default).
    Retention {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        customer: String,
        #[arg(long)]
        days: Option<u32>,
    },
}

impl CdrCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            CdrCommand::List { config, .. }
            | CdrCommand::Seed { config, .. }
            | CdrCommand::Retention { config, .. } => config.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DialplanCommand {
    /// Set an account's dialplan from a file; it is compiled first, and one that does not
    /// compile is refused with the line and column of the error.
    Put {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// `user@domain`.
        account: String,
        /// The rhai script.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// The dialplan for calls to the account, not the one for calls it makes.
        #[arg(long)]
        incoming: bool,
    },
    /// Print an account's dialplan.
    Show {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        account: String,
        #[arg(long)]
        incoming: bool,
    },
    /// Remove an account's dialplan: its calls take the default route again (calls to it
    /// ring its phones, with --incoming).
    Delete {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        account: String,
        #[arg(long)]
        incoming: bool,
    },
}

impl DialplanCommand {
    pub fn config(&self) -> PathBuf {
        match self {
            DialplanCommand::Put { config, .. }
            | DialplanCommand::Show { config, .. }
            | DialplanCommand::Delete { config, .. } => config.clone(),
        }
    }
}
