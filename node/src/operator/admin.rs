//! The HTTP admin API (warp): cluster status and membership, a write check, key rotation
//! and customers under `/v1` with a bearer token; `/health`, `/ready` and `/metrics`
//! without one, for probes and Prometheus. Every answer is JSON except `/metrics`; every
//! error is `{"error": "..."}` with a fitting status code, decided in [`ApiError::status`].

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tandem_raft_store::command::{Command, CommandResult, Customer};
use tandem_raft_store::log_store::{LogStats, SYNC_BUCKETS};
use tandem_raft_store::membership::{ClusterReply, ClusterRequest};
use tandem_raft_store::replica::{ProposeStats, BATCH_BUCKETS};
use tandem_raft_store::state::StateReader;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::agents::auth::accounts::{self, check_domain, check_user, AccountInput, AccountView};
use crate::agents::cdr::{store::CdrStore, CdrStats};
use crate::agents::drain::Drain;
use crate::agents::location::overlay::BindingOverlay;
use crate::agents::registration_agent::Board;

mod callbacks;
mod cdrs;
mod dialplans;
mod join_tokens;
mod note;
mod numbers;
mod providers;
mod settings;
mod tokens;
mod trunks;
use crate::cluster::peers::PeerMonitor;
use crate::cluster::ClusterNode;
use crate::stack::stats::Stats;
use crate::Error;
pub use tokens::Scope;

/// Largest request body the API accepts.
const MAX_BODY: u64 = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct Admin {
    pub cluster: ClusterNode,
    pub stats: Arc<Stats>,
    pub drain: Arc<Drain>,
    /// Binding writes held while this node has no quorum: reported, never written here.
    pub overlay: Arc<BindingOverlay>,
    /// Which other nodes answer SIP, as the proxy sees them.
    pub peers: Arc<PeerMonitor>,
    /// The registration agent's status of the provider accounts this node registers.
    pub board: Arc<Board>,
    /// The CDR store and its counts; none on a witness.
    pub cdrs: Option<(Arc<CdrStore>, Arc<CdrStats>)>,
    /// `cdr.retention_days`: a customer's retention unless it has its own.
    pub default_retention_days: u32,
    /// The app server, once the SIP stack runs (never on a witness): callbacks.
    pub app_server: AppServerSlot,
    /// `admin.metrics_need_token`.
    pub metrics_need_token: bool,
    /// `admin.customer_provider_accounts`.
    pub customer_provider_accounts: u32,
    token: Arc<str>,
}

/// Where the node puts its app server when the SIP stack starts, after the admin API.
pub type AppServerSlot = Arc<std::sync::OnceLock<Arc<crate::agents::app_server::AppServer>>>;

/// An API error: its status and a message for the operator.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// The one place node errors become HTTP statuses.
    fn status(e: &Error) -> StatusCode {
        use tandem_raft_store::Error as S;
        match e {
            Error::Store(S::NotLeader { .. } | S::NoQuorum | S::Unreachable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Store(S::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            Error::Store(S::WritesBlocked(_)) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Store(S::Membership(_) | S::FeatureNotEnabled { .. }) | Error::Rotation(_) => {
                StatusCode::CONFLICT
            }
            Error::Config { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::new(ApiError::status(&e), e.to_string())
    }
}

impl From<tandem_raft_store::Error> for ApiError {
    fn from(e: tandem_raft_store::Error) -> ApiError {
        Error::Store(e).into()
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn json_reply(status: StatusCode, value: &impl Serialize) -> warp::reply::Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

/// The answer to a PUT that was applied: 201 if it created the record, else 200.
fn put_reply(created: bool, value: &impl Serialize) -> warp::reply::Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json_reply(status, value)
}

fn answer(result: Result<warp::reply::Response, ApiError>) -> warp::reply::Response {
    match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(status = %e.status, error = %e.message, "admin API request failed");
            }
            let mut r = json_reply(e.status, &ErrorBody { error: &e.message });
            if e.status == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    "www-authenticate",
                    warp::http::HeaderValue::from_static("Bearer"),
                );
            }
            r
        }
    }
}

/// Reads the bearer token, creating it (random, mode 0600) on first start.
pub fn load_or_create_token(path: &Path) -> Result<String, Error> {
    let io = |source| Error::Io {
        context: format!("admin token file {}", path.display()),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            // Whoever can read the token owns the cluster: a file others on the host can
            // read is refused, not used.
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(Error::Config {
                    key: "admin.token_file".into(),
                    problem: format!(
                        "{} may be read by others than its owner (mode {mode:o}); \
                         `chmod 600` it",
                        path.display()
                    ),
                });
            }
            let token = text.trim().to_owned();
            if token.len() < 16 {
                return Err(Error::Config {
                    key: "admin.token_file".into(),
                    problem: format!("{} holds fewer than 16 characters", path.display()),
                });
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore;
            use std::os::unix::fs::OpenOptionsExt;
            let mut bytes = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
            tracing::info!(path = %path.display(), "created the admin API token file");
            Ok(token)
        }
        Err(e) => Err(io(e)),
    }
}

/// Compares without leaking where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Admin {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster: ClusterNode,
        stats: Arc<Stats>,
        drain: Arc<Drain>,
        overlay: Arc<BindingOverlay>,
        peers: Arc<PeerMonitor>,
        board: Arc<Board>,
        cdrs: Option<(Arc<CdrStore>, Arc<CdrStats>)>,
        default_retention_days: u32,
        app_server: AppServerSlot,
        token: String,
    ) -> Admin {
        Admin {
            cluster,
            stats,
            drain,
            overlay,
            peers,
            board,
            cdrs,
            default_retention_days,
            app_server,
            metrics_need_token: false,
            customer_provider_accounts: crate::config::AdminConfig::default()
                .customer_provider_accounts,
            token: token.into(),
        }
    }

    fn drain_state(&self) -> warp::reply::Response {
        let reader = self.cluster.replica.reader();
        let me = self.cluster.identity.node_id;
        let leases = reader.provider_leases_of(me).map_or(0, |l| l.len());
        // A read that fails counts as one still pending: the node must not look drained.
        let handovers = self.board.handovers_pending(reader, me).unwrap_or(1);
        json_reply(
            StatusCode::OK,
            &serde_json::json!({
                "draining": self.drain.is_draining(),
                "active_transactions": self.drain.active_transactions(),
                "active_calls": self.drain.active_calls(),
                "held_bindings": self.overlay.len(),
                "provider_leases": leases,
                "provider_handovers_pending": handovers,
                // Held bindings must reach Raft, and provider accounts be handed over
                // (un-registered here first, then taken by another node), before the
                // node may go.
                "drained": self.drain.is_drained() && self.overlay.is_empty() && handovers == 0,
            }),
        )
    }

    /// Starts draining (idempotent) and records it in the node registry, best effort.
    async fn start_drain(&self) -> warp::reply::Response {
        if self.drain.start() {
            tracing::warn!("draining: new INVITEs and REGISTERs get 503; running calls finish");
            let id = self.cluster.identity.node_id;
            if let Ok(Some(mut record)) = self.cluster.replica.reader().node(id) {
                record.draining = true;
                if let Err(e) = self.cluster.replica.propose(Command::PutNode(record)).await {
                    tracing::warn!(error = %e, "could not record the drain in the node registry");
                }
            }
        }
        self.drain_state()
    }

    /// Writes are refused at once, with the reason, while the cluster has no quorum.
    fn writable(&self) -> Result<(), ApiError> {
        match self.cluster.health().degraded {
            None => Ok(()),
            Some(reason) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the cluster has no quorum ({reason}); changes are refused until it returns"
                ),
            )),
        }
    }
}

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The `customer=` filter of a list, the only query parameter lists take.
fn customer_query(
    q: &std::collections::HashMap<String, String>,
) -> Result<Option<String>, ApiError> {
    match q.keys().find(|k| *k != "customer") {
        Some(k) => Err(ApiError::bad_request(format!(
            "unknown query parameter {k:?}; only customer= is known"
        ))),
        None => Ok(q.get("customer").cloned()),
    }
}

/// Checks that customer `customer` exists (409 otherwise: create it first).
fn check_customer(reader: &StateReader, customer: &str) -> Result<(), ApiError> {
    if reader.customer(customer)?.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("no customer {customer:?}; create it first"),
        ));
    }
    Ok(())
}

/// Checks that `target` (`user@domain`, named as `what`) is an account of `customer`:
/// 400 if it is not `user@domain`, 409 if it does not exist or is another customer's.
fn check_customer_account(
    reader: &StateReader,
    customer: &str,
    target: &str,
    what: &str,
) -> Result<(), ApiError> {
    let (user, domain) = target.split_once('@').ok_or_else(|| {
        ApiError::bad_request(format!("{what} must be user@domain, got {target:?}"))
    })?;
    check_user(user).map_err(ApiError::bad_request)?;
    check_domain(domain).map_err(ApiError::bad_request)?;
    match reader.account(domain, user)? {
        Some(a) if a.customer == customer => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("account {target} belongs to another customer"),
        )),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("no account {target}; create it first"),
        )),
    }
}

/// What a customer token may do to an account: change its own accounts' password and
/// whether they are enabled, and create accounts only in a domain the operator gave the
/// customer (one where it has accounts and no other customer has any), so it can neither
/// take a name in another customer's domain nor raise the limits the operator set.
fn check_customer_put_account(
    reader: &StateReader,
    own: &str,
    domain: &str,
    input: &AccountInput,
    existing: Option<&tandem_raft_store::command::Account>,
) -> Result<(), ApiError> {
    let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, m);
    if input.customer.as_deref().is_some_and(|c| c != own) {
        return Err(forbidden(
            "a customer token cannot give an account to another customer".into(),
        ));
    }
    if input.max_contacts.is_some() || input.max_concurrent_calls.is_some() {
        return Err(forbidden(
            "max_contacts and max_concurrent_calls are the operator's to set".into(),
        ));
    }
    if existing.is_some_and(|a| a.customer == own) {
        return Ok(());
    }
    let in_domain = reader.accounts_in(domain)?;
    let given =
        in_domain.iter().any(|a| a.customer == own) && in_domain.iter().all(|a| a.customer == own);
    if given {
        Ok(())
    } else {
        Err(forbidden(format!(
            "a customer token creates accounts only in domains where its customer has \
             accounts and no other customer has any; ask the operator for the first \
             account in {domain}"
        )))
    }
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what} must be 1 to 64 letters, digits, '-', '_' or '.', got {id:?}"
        )))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    id: u64,
    raft_addr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteCheckBody {
    proposers: usize,
    seconds: u64,
    #[serde(default = "default_command_bytes")]
    command_bytes: usize,
}

fn default_command_bytes() -> usize {
    300
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerBody {
    name: String,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

impl Admin {
    async fn ready(&self) -> warp::reply::Response {
        match self.cluster.readiness() {
            Ok(()) => json_reply(StatusCode::OK, &serde_json::json!({"ready": true})),
            Err(reason) => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"ready": false, "reason": reason}),
            ),
        }
    }

    async fn join(&self, body: Bytes) -> Result<warp::reply::Response, ApiError> {
        let b: JoinBody = parse_json(&body)?;
        if b.id == 0 {
            return Err(ApiError::bad_request("id must be at least 1"));
        }
        if !tandem_raft_store::membership::is_host_port(&b.raft_addr) {
            return Err(ApiError::bad_request(format!(
                "raft_addr must be host:port, got {:?}",
                b.raft_addr
            )));
        }
        self.writable()?;
        let request = self.join_request(b.id, b.raft_addr).await?;
        self.cluster.cluster_request(request).await?;
        Ok(json_reply(
            StatusCode::ACCEPTED,
            &serde_json::json!({"joined": b.id, "voter": false,
                "note": "a learner until it runs and has caught up; then a voter"}),
        ))
    }

    async fn remove(&self, id: u64) -> Result<warp::reply::Response, ApiError> {
        self.writable()?;
        match self
            .cluster
            .cluster_request(ClusterRequest::Remove { id })
            .await?
        {
            ClusterReply::Removed => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({"removed": id}),
            )),
            other => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("unexpected answer {other:?}"),
            )),
        }
    }

    async fn write_check(&self, body: Bytes) -> Result<warp::reply::Response, ApiError> {
        let b: WriteCheckBody = parse_json(&body)?;
        if !(1..=4096).contains(&b.proposers) {
            return Err(ApiError::bad_request("proposers must be 1 to 4096"));
        }
        if !(1..=120).contains(&b.seconds) {
            return Err(ApiError::bad_request("seconds must be 1 to 120"));
        }
        if !(8..=65536).contains(&b.command_bytes) {
            return Err(ApiError::bad_request("command_bytes must be 8 to 65536"));
        }
        self.writable()?;
        let report = self
            .cluster
            .write_check(
                b.proposers,
                b.command_bytes,
                std::time::Duration::from_secs(b.seconds),
            )
            .await;
        Ok(json_reply(StatusCode::OK, &report))
    }

    async fn reseal(&self) -> Result<warp::reply::Response, ApiError> {
        self.writable()?;
        let rotation = self.cluster.reseal().await?;
        Ok(json_reply(StatusCode::OK, &rotation))
    }

    async fn put_customer(
        &self,
        id: String,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        check_id("customer id", &id)?;
        let b: CustomerBody = parse_json(&body)?;
        if b.name.trim().is_empty()
            || b.name.chars().count() > 256
            || b.name.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(
                "name must be 1 to 256 characters without control characters",
            ));
        }
        self.writable()?;
        let customer = Customer {
            id,
            name: b.name,
            enabled: b.enabled,
        };
        match self
            .cluster
            .replica
            .propose(Command::PutCustomer(customer.clone()))
            .await?
        {
            CommandResult::Done => Ok(json_reply(StatusCode::OK, &customer_json(&customer))),
            other => Err(refused(other)),
        }
    }

    async fn put_account(
        &self,
        scope: &Scope,
        domain: String,
        user: String,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        let mut input: AccountInput = parse_json(&body)?;
        let reader = self.cluster.replica.reader();
        // Before anything that says whether another customer exists.
        if let (Scope::Customer(own), Some(c)) = (scope, &input.customer) {
            if c != own {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "a customer token cannot give an account to another customer",
                ));
            }
        }
        if let Some(customer) = &input.customer {
            check_id("customer", customer)?;
            if reader.customer(customer)?.is_none() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("no customer {customer:?}; create it first"),
                ));
            }
        }
        let existing = match (check_user(&user), check_domain(&domain)) {
            (Ok(()), Ok(())) => reader.account(&domain, &user)?,
            (Err(e), _) | (_, Err(e)) => return Err(ApiError::bad_request(e)),
        };
        if let Scope::Customer(own) = scope {
            check_customer_put_account(reader, own, &domain, &input, existing.as_ref())?;
            input.customer = Some(own.clone());
        }
        let created = existing.is_none();
        let account = accounts::build(&self.cluster.keys(), &user, &domain, input, existing)
            .map_err(ApiError::bad_request)?;
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::PutAccount(account.clone()))
            .await?
        {
            CommandResult::Done => Ok(put_reply(created, &AccountView::from(&account))),
            other => Err(refused(other)),
        }
    }

    /// The account `user@domain` if this token may see it; another customer's is "no
    /// account" too, so a customer token learns nothing of other customers' names.
    fn account_for(
        &self,
        scope: &Scope,
        domain: &str,
        user: &str,
    ) -> Result<tandem_raft_store::command::Account, ApiError> {
        let a = self.account(domain, user)?;
        if scope.sees(&a.customer) {
            Ok(a)
        } else {
            Err(ApiError::not_found(format!("no account {user}@{domain}")))
        }
    }

    fn account(
        &self,
        domain: &str,
        user: &str,
    ) -> Result<tandem_raft_store::command::Account, ApiError> {
        check_user(user).map_err(ApiError::bad_request)?;
        check_domain(domain).map_err(ApiError::bad_request)?;
        self.cluster
            .replica
            .reader()
            .account(domain, user)?
            .ok_or_else(|| ApiError::not_found(format!("no account {user}@{domain}")))
    }

    async fn delete_account(
        &self,
        domain: String,
        user: String,
    ) -> Result<warp::reply::Response, ApiError> {
        self.account(&domain, &user)?;
        self.writable()?;
        // Its dialplan and the numbers that ring it go first, so that an account created
        // again under the same name never inherits them.
        self.forget_account_routes(&domain, &user).await?;
        // The state machine removes the bindings in the same batch.
        let command = Command::DeleteAccount {
            user: user.clone(),
            domain: domain.clone(),
        };
        match self.cluster.replica.propose(command).await? {
            CommandResult::Done => {}
            other => return Err(refused(other)),
        }
        Ok(json_reply(
            StatusCode::OK,
            &serde_json::json!({"deleted": accounts::aor(&user, &domain)}),
        ))
    }

    fn bindings(&self, domain: &str, user: &str) -> Result<warp::reply::Response, ApiError> {
        self.account(domain, user)?;
        let now = crate::clock::now_ms();
        let aor = accounts::aor(user, domain);
        let stored = self.cluster.replica.reader().bindings(&aor)?;
        let list: Vec<_> = self
            .overlay
            .apply(&aor, stored)
            .into_iter()
            .filter(|b| b.expires_at_ms > now)
            .map(|b| {
                serde_json::json!({
                    "contact": b.contact,
                    // Until the binding lapses, headroom included (node/DESIGN.md,
                    // "Bindings are written when they change").
                    "expires_in_secs": (b.expires_at_ms - now) / 1000,
                    "interval_secs": b.expires_secs,
                    "edge_node": b.edge_node,
                    "transport": b.flow.transport,
                    "remote": b.flow.remote,
                    "q": f64::from(b.q) / 1000.0,
                    "path": b.path,
                    "user_agent": b.user_agent,
                })
            })
            .collect();
        Ok(json_reply(StatusCode::OK, &list))
    }

    async fn delete_customer(&self, id: String) -> Result<warp::reply::Response, ApiError> {
        check_id("customer id", &id)?;
        let reader = self.cluster.replica.reader();
        if reader.customer(&id)?.is_none() {
            return Err(ApiError::not_found(format!("no customer {id:?}")));
        }
        // Refused while anything of the customer's is left, so that nothing is left
        // without a customer (and inherited by one created again under the same id).
        let owned = |n: usize, one: &str, many: &str| match n {
            0 => None,
            1 => Some(format!("1 {one}")),
            n => Some(format!("{n} {many}")),
        };
        let left: Vec<String> = [
            owned(
                reader
                    .accounts()?
                    .iter()
                    .filter(|a| a.customer == id)
                    .count(),
                "account",
                "accounts",
            ),
            owned(
                reader
                    .provider_accounts()?
                    .iter()
                    .filter(|p| p.customer == id)
                    .count(),
                "provider account",
                "provider accounts",
            ),
            owned(
                reader
                    .numbers()?
                    .iter()
                    .filter(|n| n.customer == id)
                    .count(),
                "number",
                "numbers",
            ),
            owned(
                reader.trunks()?.iter().filter(|t| t.customer == id).count(),
                "trunk",
                "trunks",
            ),
            owned(
                usize::from(reader.dialplan(&id)?.is_some()),
                "dialplan",
                "dialplans",
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !left.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "customer {id:?} still has {}: delete them first",
                    left.join(", ")
                ),
            ));
        }
        self.writable()?;
        self.cluster
            .replica
            .propose(Command::DeleteCustomer { id: id.clone() })
            .await?;
        Ok(json_reply(
            StatusCode::OK,
            &serde_json::json!({"deleted": id}),
        ))
    }

    fn customer(&self, id: String) -> Result<warp::reply::Response, ApiError> {
        check_id("customer id", &id)?;
        match self.cluster.replica.reader().customer(&id)? {
            Some(c) => Ok(json_reply(StatusCode::OK, &customer_json(&c))),
            None => Err(ApiError::not_found(format!("no customer {id:?}"))),
        }
    }

    fn customers(&self) -> Result<warp::reply::Response, ApiError> {
        let list: Vec<_> = self
            .cluster
            .replica
            .reader()
            .customers()?
            .iter()
            .map(customer_json)
            .collect();
        Ok(json_reply(StatusCode::OK, &list))
    }

    /// Prometheus text format.
    fn metrics(&self) -> String {
        let replica = &self.cluster.replica;
        let m = replica.metrics();
        let health = self.cluster.health();
        let p: &ProposeStats = replica.propose_stats();
        let log = replica.log_stats();
        let s = &self.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        // (name, help, type, value): the single-valued metrics.
        let simple: [(&str, &str, &str, u64); 44] = [
            ("tandem_ready", "1 while /ready says this node is ready; 0 with the reason on /ready (no quorum, a full disk, Raft stopped on a storage error, catching up).", "gauge", u64::from(self.cluster.readiness().is_ok())),
            ("tandem_raft_term", "Current Raft term.", "gauge", m.current_term),
            ("tandem_raft_is_leader", "1 while this node is the Raft leader.", "gauge", u64::from(replica.is_leader())),
            ("tandem_raft_quorum_ok", "1 while this node reaches a quorum; 0 in degraded mode.", "gauge", u64::from(health.degraded.is_none())),
            ("tandem_raft_last_log_index", "Index of the last entry in this node's log.", "gauge", m.last_log_index.unwrap_or(0)),
            ("tandem_raft_applied_index", "Index of the last entry applied to this node's state.", "gauge", m.last_applied.map(|l| l.index).unwrap_or(0)),
            ("tandem_raft_snapshot_index", "Index the latest snapshot covers.", "gauge", m.snapshot.map(|l| l.index).unwrap_or(0)),
            ("tandem_raft_apply_lag", "Committed entries not yet applied on this node.", "gauge", replica.apply_lag()),
            ("tandem_raft_members", "Members in this node's membership configuration.", "gauge", replica.members().len() as u64),
            ("tandem_bindings_held", "Binding writes held in the degraded-mode overlay, to replay when a quorum returns.", "gauge", self.overlay.len() as u64),
            ("tandem_raft_proposals_total", "Commands proposed through this node.", "counter", load(&p.proposals)),
            ("tandem_raft_proposal_batches_failed_total", "Batches of proposals that failed (no leader, timeout).", "counter", load(&p.failed)),
            ("tandem_log_appends_total", "Log appends written to RocksDB.", "counter", load(&log.appends)),
            ("tandem_log_wal_syncs_total", "WAL fsyncs; appends per sync is the group-commit factor.", "counter", load(&log.wal_syncs)),
            ("tandem_raft_catch_up_questions_total", "Questions this node asked the leader before answering a call 480 (how far it has applied), shared by the calls that arrived meanwhile.", "counter", replica.catch_up_questions()),
            ("tandem_raft_rpcs_late_total", "Raft RPCs to peers that answered after openraft had given up on them (an append gets one cluster.heartbeat_ms): a link too slow for the heartbeat.", "counter", tandem_raft_store::http_network::late_rpcs()),
            ("tandem_sip_requests_received_total", "SIP requests received.", "counter", load(&s.requests_received)),
            ("tandem_sip_malformed_answered_total", "Malformed SIP messages answered with 400.", "counter", load(&s.malformed_answered)),
            ("tandem_sip_auth_failures_total", "Requests refused by digest authentication (not counting first challenges).", "counter", load(&s.auth_failures)),
            ("tandem_sip_malformed_dropped_total", "Malformed SIP messages dropped.", "counter", load(&s.malformed_dropped)),
            ("tandem_sip_transactions_active", "SIP transactions (server and client) still waiting for a final response.", "gauge", self.drain.active_transactions() as u64),
            ("tandem_sip_transactions_held", "SIP transactions in the transaction tables, completed ones kept to absorb retransmissions included.", "gauge", self.drain.held_transactions() as u64),
            ("tandem_sip_connections_open", "TCP and TLS connections open now.", "gauge", load(&s.connections_open)),
            ("tandem_runtime_tasks_alive", "Tasks alive in the node's async runtime: flat on an idle node, so a rise there is a task that never ends.", "gauge", tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_alive_tasks() as u64)),
            ("tandem_sip_transactions_refused_total", "New requests answered 503 because the transaction table was full (sip.max_transactions).", "counter", load(&s.transactions_refused)),
            ("tandem_proxy_dialogs", "Dialogs in the proxy's table (at most sip.max_dialogs): calls and subscriptions this node record-routed, set up or being set up.", "gauge", self.drain.tracked_dialogs() as u64),
            ("tandem_proxy_dialogs_evicted_total", "Dialogs the full table evicted to make room for new ones, each unused for sip.dialog_evict_idle_secs (most likely their BYE was lost).", "counter", self.drain.evicted_dialogs()),
            ("tandem_proxy_dialogs_refused_total", "Calls and subscriptions answered 503 (by the proxy or the app server) because the dialog table was full of dialogs their placer may not evict.", "counter", self.drain.refused_dialogs()),
            ("tandem_sip_connections_refused_total", "TCP and TLS connections refused by the node-wide or per-address limit.", "counter", load(&s.connections_refused)),
            ("tandem_sip_thread_stalls_total", "SIP threads found not running for 5 s (a bug: the calls of such a thread get no answer while it lasts; the log names it).", "counter", load(&s.sip_thread_stalls)),
            ("tandem_sip_scanners_dropped_total", "Requests from known scanner User-Agents, dropped unanswered.", "counter", load(&s.scanners_dropped)),
            ("tandem_sip_flood_addresses", "Source addresses the flood limit tracks: buckets (at most 100000) plus bans (at most 100000).", "gauge", load(&s.flood_addresses)),
            ("tandem_sip_flood_bans_total", "Bans the flood limit started: an address sent more than sip.flood_requests_per_sec.", "counter", load(&s.flood_bans)),
            ("tandem_proxy_call_limit_refusals_total", "New calls refused because the calling account had max_concurrent_calls calls through this node.", "counter", load(&s.call_limit_refusals)),
            ("tandem_sip_flood_dropped_total", "Requests from banned addresses dropped unanswered for want of proof of a round trip.", "counter", load(&s.flood_dropped)),
            ("tandem_auth_lockout_keys", "(address, account) pairs with failed logins on record (bounded).", "gauge", load(&s.auth_lockout_keys)),
            ("tandem_auth_address_keys", "Addresses with failed logins on record (bounded).", "gauge", load(&s.auth_address_keys)),
            ("tandem_auth_replay_nonces", "Nonces whose nonce-count this node remembers (bounded).", "gauge", load(&s.auth_replay_nonces)),
            ("tandem_auth_logins_opened", "Logins this node holds opened, their HA1 decrypted: every account's, opened ahead of use (at most 200000).", "gauge", load(&s.auth_logins_opened)),
            ("tandem_auth_account_reads_total", "Requests whose login was not opened ahead, so authentication read its account from the store.", "counter", load(&s.auth_account_reads)),
            ("tandem_clock_correction_ms", "How far (ms) this node's system clock is from the time it keeps, its peers' (node/DESIGN.md, \"Clocks\"); 0 normally.", "gauge", crate::clock::correction_ms().unsigned_abs()),
            ("tandem_sip_keepalives_received_total", "Keepalives received from phones: CRLF pings on UDP and TCP/TLS, and STUN Binding requests answered on UDP (RFC 5626).", "counter", load(&s.keepalives)),
            ("tandem_sip_keepalives_sent_total", "NAT keepalives sent to UDP bindings that registered through this node.", "counter", load(&s.keepalives_sent)),
            ("tandem_sip_calls_active", "Calls this node record-routed that have not ended.", "gauge", self.drain.active_calls() as u64),
        ];
        for (name, help, kind, value) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let b = &self.board.counters;
        let (registered, failing, other) = self.board.counts();
        let agent: [(&str, &str, &str, u64); 10] = [
            ("tandem_providers_registered", "Provider accounts this node keeps registered now.", "gauge", registered as u64),
            ("tandem_providers_failing", "Provider accounts this node owns whose last attempt failed (backing off).", "gauge", failing as u64),
            ("tandem_providers_pending", "Provider accounts this node owns that are starting, registering or un-registering.", "gauge", other as u64),
            ("tandem_provider_registers_sent_total", "REGISTER requests the registration agent sent (challenged retries included).", "counter", load(&b.registers_sent)),
            ("tandem_provider_timeouts_total", "REGISTERs to providers that got no final response (no answer, or the connection failed).", "counter", load(&b.timeouts)),
            ("tandem_provider_dns_failures_total", "Attempts that failed because the provider's name did not resolve.", "counter", load(&b.dns_failures)),
            ("tandem_provider_refused_targets_total", "Attempts not made because the provider's registrar is not a public address and registration_agent.private_networks does not list it.", "counter", load(&b.refused_targets)),
            ("tandem_provider_lease_grants_total", "Provider leases this node granted while it led.", "counter", load(&b.lease_grants)),
            ("tandem_provider_lease_moves_total", "Provider leases this node asked an owner to hand over while it led.", "counter", load(&b.lease_moves)),
            ("tandem_provider_leases_held", "Provider leases this node holds in the replicated state.", "gauge", replica.reader().provider_leases_of(self.cluster.identity.node_id).map_or(0, |l| l.len() as u64)),
        ];
        for (name, help, kind, value) in agent {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        if let Some((store, c)) = &self.cdrs {
            let cdr: [(&str, &str, &str, u64); 5] = [
                (
                    "tandem_cdr_written_total",
                    "Call records this node wrote (fsynced).",
                    "counter",
                    load(&c.written),
                ),
                (
                    "tandem_cdr_dropped_total",
                    "Call records lost because the CDR writer's queue was full or it had stopped.",
                    "counter",
                    load(c.dropped.as_ref()),
                ),
                (
                    "tandem_cdr_received_total",
                    "Call records peers shipped to this node.",
                    "counter",
                    load(&c.received),
                ),
                (
                    "tandem_cdr_purged_total",
                    "Call records removed as older than their customer's retention.",
                    "counter",
                    load(&c.purged),
                ),
                (
                    "tandem_cdr_last_seq",
                    "The number of this node's latest call record.",
                    "counter",
                    store.last_seq(),
                ),
            ];
            for (name, help, kind, value) in cdr {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
                );
            }
        }
        let name = "tandem_store_memory_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} What RocksDB holds in memory by its own estimate, per store (the replicated state, the call records) and kind: memtables, table readers (index and filter blocks outside the block cache), block cache.\n# TYPE {name} gauge"
        );
        let stores = [("raft", replica.store_memory())]
            .into_iter()
            .chain(self.cdrs.iter().map(|(store, _)| ("cdr", store.memory())));
        for (store, m) in stores {
            for (kind, bytes) in [
                ("memtables", m.memtables),
                ("table_readers", m.table_readers),
                ("block_cache", m.block_cache),
            ] {
                let _ = writeln!(out, "{name}{{store=\"{store}\",kind=\"{kind}\"}} {bytes}");
            }
        }
        let name = "tandem_provider_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} Final responses to the registration agent's REGISTERs, by class.\n# TYPE {name} counter"
        );
        for (i, count) in b.responses.iter().enumerate().skip(1) {
            let _ = writeln!(out, "{name}{{class=\"{}xx\"}} {}", i + 1, load(count));
        }
        let name = "tandem_sip_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} SIP requests received, by method.\n# TYPE {name} counter"
        );
        for (i, count) in s.requests_by_method.0.iter().enumerate() {
            let method = crate::stack::stats::METHODS
                .get(i)
                .copied()
                .unwrap_or("OTHER");
            let _ = writeln!(
                out,
                "{name}{{method=\"{method}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let name = "tandem_sip_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} SIP responses sent, by status code.\n# TYPE {name} counter"
        );
        for (i, count) in s.responses_by_status.0.iter().enumerate() {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "{name}{{code=\"{}\"}} {n}", i + 100);
            }
        }
        let name = "tandem_bindings";
        let _ = writeln!(
            out,
            "# HELP {name} Registrar bindings in the replicated state, by the node they registered through.\n# TYPE {name} gauge"
        );
        let reader = replica.reader();
        for node in reader.nodes().unwrap_or_default() {
            let n = reader.count_bindings_by_edge(node.id);
            let _ = writeln!(out, "{name}{{edge_node=\"{}\"}} {n}", node.id);
        }
        let name = "tandem_sip_peer_up";
        let _ = writeln!(
            out,
            "# HELP {name} 1 while the node answers this node's SIP pings. A call for a phone that registered through a node at 0 goes straight to the phone's public address.\n# TYPE {name} gauge"
        );
        for (node, up) in self.peers.peers() {
            let _ = writeln!(out, "{name}{{node=\"{node}\"}} {}", u8::from(up));
        }
        // Histograms, written out by hand.
        let name = "tandem_raft_batch_size";
        let _ = writeln!(
            out,
            "# HELP {name} Commands per log entry.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for i in 0..BATCH_BUCKETS {
            cumulative += p.batch_size_buckets[i].load(Ordering::Relaxed);
            let le = ProposeStats::bucket_bound(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {}",
            p.proposals.load(Ordering::Relaxed),
            p.batches.load(Ordering::Relaxed)
        );
        let name = "tandem_log_fsync_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} WAL fsyncs by how long they took; every write waits for one.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for i in 0..SYNC_BUCKETS {
            cumulative += log.sync_buckets[i].load(Ordering::Relaxed);
            let le = LogStats::sync_bucket_bound_micros(i)
                .map_or("+Inf".to_owned(), |b| (b as f64 / 1e6).to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_sum {:.6}\n{name}_count {cumulative}",
            log.sync_nanos_total.load(Ordering::Relaxed) as f64 / 1e9,
        );
        out
    }
}

/// A command the state machine refused (its condition did not hold).
fn refused(result: CommandResult) -> ApiError {
    let why = match result {
        CommandResult::Rejected(why) => why,
        other => format!("unexpected result {other:?}"),
    };
    ApiError::new(StatusCode::CONFLICT, why)
}

fn customer_json(c: &Customer) -> serde_json::Value {
    serde_json::json!({"id": c.id, "name": c.name, "enabled": c.enabled})
}

impl warp::reject::Reject for ApiError {}

async fn recover(r: Rejection) -> Result<warp::reply::Response, Infallible> {
    if let Some(e) = r.find::<ApiError>() {
        return Ok(answer(Err(ApiError::new(e.status, e.message.clone()))));
    }
    let (status, message) = if r.is_not_found() {
        (StatusCode::NOT_FOUND, "no such endpoint".to_owned())
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed here".to_owned(),
        )
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("bodies are limited to {MAX_BODY} bytes"),
        )
    } else if r.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "send a Content-Length".to_owned(),
        )
    } else {
        (StatusCode::BAD_REQUEST, format!("bad request: {r:?}"))
    };
    Ok(json_reply(status, &ErrorBody { error: &message }))
}

type Route = warp::filters::BoxedFilter<(warp::reply::Response,)>;

/// Binds the admin listener and serves until `stop` completes.
/// Serves the API on `addr`: over HTTPS with `tls`, else plain HTTP (which config
/// validation allows on loopback only).
pub fn serve(
    admin: Admin,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>, Error> {
    // warp clones the whole filter tree for every request; an Arc keeps that to one
    // reference count per route instead of a deep clone of the replica handles.
    let admin = Arc::new(admin);
    let state = warp::any().map(move || admin.clone());
    let auth = warp::header::optional::<String>("authorization");
    let body = warp::body::content_length_limit(MAX_BODY).and(warp::body::bytes());

    let health = warp::path!("health")
        .and(warp::get())
        .and(state.clone())
        .map(|a: Arc<Admin>| {
            json_reply(
                StatusCode::OK,
                &serde_json::json!({"status": "alive", "node": a.cluster.identity.node_id}),
            )
        });
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(state.clone())
        .then(|a: Arc<Admin>| async move { a.ready().await });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(state.clone())
        .and(auth)
        .and_then(|a: Arc<Admin>, header: Option<String>| async move {
            if a.metrics_need_token {
                match a.authorize(header).map_err(warp::reject::custom)? {
                    Scope::Operator => {}
                    Scope::Customer(_) => {
                        return Err(warp::reject::custom(tokens::operator_only()))
                    }
                }
            }
            Ok::<_, warp::Rejection>(
                warp::reply::with_header(a.metrics(), "content-type", "text/plain; version=0.0.4")
                    .into_response(),
            )
        });

    // Routes under /v1 match their path and method first, then check the token, so an
    // unknown path is a 404 whatever the token. `scoped` routes take any valid token and
    // check what it may reach; `operator` routes refuse a customer's token.
    let scoped = state
        .clone()
        .and(auth)
        .and_then(|a: Arc<Admin>, header: Option<String>| async move {
            match a.authorize(header) {
                Ok(scope) => Ok((a, scope)),
                Err(e) => Err(warp::reject::custom(e)),
            }
        })
        .untuple_one()
        .boxed();
    let operator = scoped
        .clone()
        .and_then(|a: Arc<Admin>, scope: Scope| async move {
            match scope {
                Scope::Operator => Ok(a),
                Scope::Customer(_) => Err(warp::reject::custom(tokens::operator_only())),
            }
        })
        .boxed();
    let status = warp::path!("v1" / "cluster" / "status")
        .and(warp::get())
        .and(operator.clone())
        .then(|a: Arc<Admin>| async move {
            answer(Ok(json_reply(StatusCode::OK, &a.cluster.status().await)))
        });
    let join = warp::path!("v1" / "cluster" / "members")
        .and(warp::post())
        .and(operator.clone())
        .and(body)
        .then(|a: Arc<Admin>, b| async move { answer(a.join(b).await) });
    let remove = warp::path!("v1" / "cluster" / "members" / String)
        .and(warp::delete())
        .and(operator.clone())
        .then(|id: String, a: Arc<Admin>| async move {
            answer(match id.parse::<u64>() {
                Ok(id) => a.remove(id).await,
                Err(_) => Err(ApiError::bad_request(format!(
                    "a member is named by its node id, a number; got {id:?}"
                ))),
            })
        });
    let write_check = warp::path!("v1" / "cluster" / "write-check")
        .and(warp::post())
        .and(operator.clone())
        .and(body)
        .then(|a: Arc<Admin>, b| async move { answer(a.write_check(b).await) });
    let reseal = warp::path!("v1" / "keys" / "reseal")
        .and(warp::post())
        .and(operator.clone())
        .then(|a: Arc<Admin>| async move { answer(a.reseal().await) });
    let customers = warp::path!("v1" / "customers")
        .and(warp::get())
        .and(operator.clone())
        .map(|a: Arc<Admin>| answer(a.customers()));
    let customer = warp::path!("v1" / "customers" / String)
        .and(warp::get())
        .and(scoped.clone())
        .map(|id: String, a: Arc<Admin>, s: Scope| {
            answer(if s.sees(&id) {
                a.customer(id)
            } else {
                Err(ApiError::not_found(format!("no customer {id:?}")))
            })
        });
    let put_customer = warp::path!("v1" / "customers" / String)
        .and(warp::put())
        .and(operator.clone())
        .and(body)
        .then(|id, a: Arc<Admin>, b| async move { answer(a.put_customer(id, b).await) });
    let accounts = warp::path!("v1" / "accounts")
        .and(warp::get())
        .and(scoped.clone())
        .map(|a: Arc<Admin>, s: Scope| {
            answer((|| {
                let list: Vec<AccountView> = a
                    .cluster
                    .replica
                    .reader()
                    .accounts()?
                    .iter()
                    .filter(|acc| s.sees(&acc.customer))
                    .map(AccountView::from)
                    .collect();
                Ok(json_reply(StatusCode::OK, &list))
            })())
        });
    let account = warp::path!("v1" / "accounts" / String / String)
        .and(warp::get())
        .and(scoped.clone())
        .map(|d: String, u: String, a: Arc<Admin>, s: Scope| {
            answer(
                a.account_for(&s, &d, &u)
                    .map(|acc| json_reply(StatusCode::OK, &AccountView::from(&acc))),
            )
        });
    let put_account = warp::path!("v1" / "accounts" / String / String)
        .and(warp::put())
        .and(scoped.clone())
        .and(body)
        .then(|d, u, a: Arc<Admin>, s: Scope, b| async move {
            answer(a.put_account(&s, d, u, b).await)
        });
    let delete_account = warp::path!("v1" / "accounts" / String / String)
        .and(warp::delete())
        .and(scoped.clone())
        .then(|d: String, u: String, a: Arc<Admin>, s: Scope| async move {
            answer(match a.account_for(&s, &d, &u) {
                Ok(_) => a.delete_account(d, u).await,
                Err(e) => Err(e),
            })
        });
    let bindings = warp::path!("v1" / "accounts" / String / String / "bindings")
        .and(warp::get())
        .and(scoped.clone())
        .map(|d: String, u: String, a: Arc<Admin>, s: Scope| {
            answer(a.account_for(&s, &d, &u).and_then(|_| a.bindings(&d, &u)))
        });
    // `dialplan` (calls the account makes) or `incoming-dialplan` (calls to it).
    let which = || {
        warp::path::param::<String>().and_then(|p: String| async move {
            match p.as_str() {
                "dialplan" => Ok(false),
                "incoming-dialplan" => Ok(true),
                _ => Err(warp::reject::not_found()),
            }
        })
    };
    let dialplan = warp::path!("v1" / "accounts" / String / String / ..)
        .and(which())
        .and(warp::path::end())
        .and(warp::get())
        .and(scoped.clone())
        .map(|d: String, u: String, i: bool, a: Arc<Admin>, s: Scope| {
            answer(
                a.account_for(&s, &d, &u)
                    .and_then(|_| a.get_dialplan(&d, &u, i)),
            )
        });
    let put_dialplan = warp::path!("v1" / "accounts" / String / String / ..)
        .and(which())
        .and(warp::path::end())
        .and(warp::put())
        .and(scoped.clone())
        .and(body)
        .then(
            |d: String, u: String, i, a: Arc<Admin>, s: Scope, b| async move {
                answer(match a.account_for(&s, &d, &u) {
                    Ok(_) => a.put_dialplan(d, u, i, b).await,
                    Err(e) => Err(e),
                })
            },
        );
    let delete_dialplan = warp::path!("v1" / "accounts" / String / String / ..)
        .and(which())
        .and(warp::path::end())
        .and(warp::delete())
        .and(scoped.clone())
        .then(
            |d: String, u: String, i, a: Arc<Admin>, s: Scope| async move {
                answer(match a.account_for(&s, &d, &u) {
                    Ok(_) => a.delete_dialplan(d, u, i).await,
                    Err(e) => Err(e),
                })
            },
        );
    let numbers = warp::path!("v1" / "numbers")
        .and(warp::get())
        .and(scoped.clone())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .map(
            |a: Arc<Admin>, s: Scope, q: std::collections::HashMap<String, String>| {
                answer(s.list_filter(&q).and_then(|c| a.list_numbers(c)))
            },
        );
    let number = warp::path!("v1" / "numbers" / String)
        .and(warp::get())
        .and(scoped.clone())
        .map(|n: String, a: Arc<Admin>, s: Scope| answer(a.get_number(&s, &n)));
    let put_number = warp::path!("v1" / "numbers" / String)
        .and(warp::put())
        .and(operator.clone())
        .and(body)
        .then(|n, a: Arc<Admin>, b| async move { answer(a.put_number(n, b).await) });
    let delete_number = warp::path!("v1" / "numbers" / String)
        .and(warp::delete())
        .and(operator.clone())
        .then(|n, a: Arc<Admin>| async move { answer(a.delete_number(n).await) });
    let trunks = warp::path!("v1" / "trunks")
        .and(warp::get())
        .and(scoped.clone())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .map(
            |a: Arc<Admin>, s: Scope, q: std::collections::HashMap<String, String>| {
                answer(s.list_filter(&q).and_then(|c| a.list_trunks(c)))
            },
        );
    let trunk = warp::path!("v1" / "trunks" / String / String)
        .and(warp::get())
        .and(scoped.clone())
        .map(|c: String, n: String, a: Arc<Admin>, s: Scope| {
            answer(s.check_path_customer(&c).and_then(|()| a.get_trunk(&c, &n)))
        });
    let put_trunk = warp::path!("v1" / "trunks" / String / String)
        .and(warp::put())
        .and(operator.clone())
        .and(body)
        .then(|c, n, a: Arc<Admin>, b| async move { answer(a.put_trunk(c, n, b).await) });
    let delete_trunk = warp::path!("v1" / "trunks" / String / String)
        .and(warp::delete())
        .and(operator.clone())
        .then(|c, n, a: Arc<Admin>| async move { answer(a.delete_trunk(c, n).await) });
    let cdr_list = warp::path!("v1" / "cdrs")
        .and(warp::get())
        .and(scoped.clone())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .then(
            |a: Arc<Admin>, s: Scope, mut q: std::collections::HashMap<String, String>| async move {
                // A customer token reads its own customer's records, and only those.
                if let Scope::Customer(own) = &s {
                    match q.get("customer") {
                        Some(c) if c != own => return answer(Err(tokens::other_customer(own, c))),
                        _ => q.insert("customer".into(), own.clone()),
                    };
                }
                answer(a.list_cdrs(q).await)
            },
        );
    let settings = warp::path!("v1" / "customers" / String / "settings")
        .and(warp::get())
        .and(scoped.clone())
        .map(|c: String, a: Arc<Admin>, s: Scope| {
            answer(s.check_path_customer(&c).and_then(|()| a.get_settings(&c)))
        });
    let put_settings = warp::path!("v1" / "customers" / String / "settings")
        .and(warp::put())
        .and(operator.clone())
        .and(body)
        .then(|c, a: Arc<Admin>, b| async move { answer(a.put_settings(c, b).await) });
    let drain_state = warp::path!("v1" / "node" / "drain")
        .and(warp::get())
        .and(operator.clone())
        .map(|a: Arc<Admin>| a.drain_state());
    let start_drain = warp::path!("v1" / "node" / "drain")
        .and(warp::post())
        .and(operator.clone())
        .then(|a: Arc<Admin>| async move { a.start_drain().await });
    let providers = warp::path!("v1" / "providers")
        .and(warp::get())
        .and(scoped.clone())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .map(
            |a: Arc<Admin>, s: Scope, q: std::collections::HashMap<String, String>| {
                answer(s.list_filter(&q).and_then(|c| a.list_providers(c)))
            },
        );
    let provider = warp::path!("v1" / "providers" / String / String)
        .and(warp::get())
        .and(scoped.clone())
        .map(|c: String, n: String, a: Arc<Admin>, s: Scope| {
            answer(
                s.check_path_customer(&c)
                    .and_then(|()| a.get_provider(&c, &n)),
            )
        });
    let put_provider = warp::path!("v1" / "providers" / String / String)
        .and(warp::put())
        .and(scoped.clone())
        .and(body)
        .then(|c: String, n, a: Arc<Admin>, s: Scope, b| async move {
            answer(match s.check_path_customer(&c) {
                Ok(()) => a.put_provider(&s, c, n, b).await,
                Err(e) => Err(e),
            })
        });
    let delete_provider = warp::path!("v1" / "providers" / String / String)
        .and(warp::delete())
        .and(scoped.clone())
        .then(|c: String, n, a: Arc<Admin>, s: Scope| async move {
            answer(match s.check_path_customer(&c) {
                Ok(()) => a.delete_provider(c, n).await,
                Err(e) => Err(e),
            })
        });
    let provider_status = warp::path!("v1" / "providers" / String / String / "status")
        .and(warp::get())
        .and(scoped.clone())
        .then(|c: String, n, a: Arc<Admin>, s: Scope| async move {
            answer(match s.check_path_customer(&c) {
                Ok(()) => a.provider_status(c, n).await,
                Err(e) => Err(e),
            })
        });
    let start_callback = warp::path!("v1" / "callback")
        .and(warp::post())
        .and(operator.clone())
        .and(body)
        .map(|a: Arc<Admin>, b| answer(a.start_callback(b)));
    let callback = warp::path!("v1" / "callbacks" / String)
        .and(warp::get())
        .and(operator.clone())
        .map(|id: String, a: Arc<Admin>| answer(a.get_callback(&id)));
    let get_note = warp::path!("v1" / "cluster" / "note")
        .and(warp::get())
        .and(operator.clone())
        .map(|a: Arc<Admin>| answer(a.get_note()));
    let put_note = warp::path!("v1" / "cluster" / "note")
        .and(warp::put())
        .and(operator.clone())
        .and(body)
        .then(|a: Arc<Admin>, b| async move { answer(a.put_note(b).await) });
    let mint_join_token = warp::path!("v1" / "cluster" / "join-tokens")
        .and(warp::post())
        .and(operator.clone())
        .and(body)
        .then(|a: Arc<Admin>, b| async move { answer(a.mint_join_token(b).await) });
    let list_join_tokens = warp::path!("v1" / "cluster" / "join-tokens")
        .and(warp::get())
        .and(operator.clone())
        .map(|a: Arc<Admin>| answer(a.list_join_tokens()));
    let revoke_join_token = warp::path!("v1" / "cluster" / "join-tokens" / String)
        .and(warp::delete())
        .and(operator.clone())
        .then(|id, a: Arc<Admin>| async move { answer(a.revoke_join_token(id).await) });
    let create_token = warp::path!("v1" / "tokens")
        .and(warp::post())
        .and(operator.clone())
        .and(body)
        .then(|a: Arc<Admin>, b| async move { answer(a.create_token(b).await) });
    let list_tokens = warp::path!("v1" / "tokens")
        .and(warp::get())
        .and(operator.clone())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .map(
            |a: Arc<Admin>, q: std::collections::HashMap<String, String>| {
                answer(customer_query(&q).and_then(|c| a.list_tokens(c)))
            },
        );
    let revoke_token = warp::path!("v1" / "tokens" / String)
        .and(warp::delete())
        .and(operator.clone())
        .then(|id, a: Arc<Admin>| async move { answer(a.revoke_token(id).await) });
    let delete_customer = warp::path!("v1" / "customers" / String)
        .and(warp::delete())
        .and(operator)
        .then(|id, a: Arc<Admin>| async move { answer(a.delete_customer(id).await) });

    // Each route is boxed before they are combined: a chain of `or`s over unboxed filters
    // makes a type that takes rustc many minutes to compile.
    let all: Vec<Route> = vec![
        health.boxed(),
        ready.boxed(),
        metrics.boxed(),
        status.boxed(),
        join.boxed(),
        remove.boxed(),
        reseal.boxed(),
        write_check.boxed(),
        customers.boxed(),
        customer.boxed(),
        put_customer.boxed(),
        delete_customer.boxed(),
        accounts.boxed(),
        account.boxed(),
        put_account.boxed(),
        delete_account.boxed(),
        bindings.boxed(),
        dialplan.boxed(),
        put_dialplan.boxed(),
        delete_dialplan.boxed(),
        numbers.boxed(),
        number.boxed(),
        put_number.boxed(),
        delete_number.boxed(),
        trunks.boxed(),
        trunk.boxed(),
        put_trunk.boxed(),
        delete_trunk.boxed(),
        cdr_list.boxed(),
        settings.boxed(),
        put_settings.boxed(),
        drain_state.boxed(),
        start_drain.boxed(),
        providers.boxed(),
        provider.boxed(),
        put_provider.boxed(),
        delete_provider.boxed(),
        provider_status.boxed(),
        start_callback.boxed(),
        callback.boxed(),
        get_note.boxed(),
        put_note.boxed(),
        create_token.boxed(),
        list_tokens.boxed(),
        mint_join_token.boxed(),
        list_join_tokens.boxed(),
        revoke_join_token.boxed(),
        revoke_token.boxed(),
    ];
    let routes = all
        .into_iter()
        .reduce(|a, b| a.or(b).unify().boxed())
        .expect("at least one route")
        .recover(recover)
        .unify();
    let Some(acceptor) = tls else {
        let (_, server) = warp::serve(routes)
            .try_bind_with_graceful_shutdown(addr, stop)
            .map_err(|e| Error::Bind {
                transport: "admin HTTP",
                addr,
                source: std::io::Error::other(e.to_string()),
            })?;
        return Ok(Box::pin(server));
    };
    let bind = |source| Error::Bind {
        transport: "admin HTTPS",
        addr,
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind)?;
    Ok(Box::pin(async move {
        let (incoming, accept_loop) =
            tandem_raft_store::tls::accept_tls(listener, acceptor, HANDSHAKE_TIMEOUT, "admin API");
        let service = warp::service(routes);
        // Each connection is served on its own, so that each gets a deadline for its
        // request headers: anyone can complete a handshake here and then send nothing, and
        // such a connection would otherwise keep its place among the listener's
        // established ones (`tandem_raft_store::tls::MAX_ESTABLISHED`) for ever. On stop
        // each finishes the request it is on, then closes.
        tandem_raft_store::tls::serve_each(incoming, accept_loop, stop, |admitted, stopped| {
            let served = hyper::server::conn::Http::new()
                .http1_only(true)
                .http1_header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(admitted, service.clone());
            tandem_raft_store::tls::until_stopped(served, |c| c.graceful_shutdown(), stopped)
        })
        .await;
    }))
}

/// How long a client may take over its TLS handshake with the admin API.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an admin HTTPS connection may go without a request's headers: from when it is
/// established, and from each response to the next request on a kept-alive connection.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
