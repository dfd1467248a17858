//! The operator commands that act on a running cluster: `tandem cluster …`, `tandem keys …`,
//! `tandem account …`, `tandem provider …` (in `providers`), `tandem number …` and
//! `tandem dialplan …` (in `numbers`), `tandem cdr …` (in `cdrs`), `tandem trunk …` (in `trunks`), `tandem token …` (in
//! `tokens`), `tandem callback` (in `callbacks`), and `tandem node …`.
//! `init`, `join` and `keys rotate` work offline on this node's files; the others ask the
//! running node named by the config file, through its admin API with its bearer token.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use tandem_raft_store::crypto::KeyRing;

use crate::config::Config;
use crate::operator::cli::{AccountCommand, ClusterCommand, Command, KeysCommand, NodeCommand};
use crate::Error;

mod callbacks;
mod cdrs;
mod numbers;
mod providers;
mod tokens;
mod trunks;

/// How long an admin request may take; re-sealing proposes one write per record, so it
/// gets longer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
const RESEAL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Runs an operator command and returns what to print.
pub async fn run(command: &Command, config: &Config) -> Result<String, Error> {
    match command {
        Command::Cluster(c) => cluster(c, config).await,
        Command::Keys(c) => keys(c, config).await,
        Command::Account(c) => account(c, config).await,
        Command::Node(c) => node(c, config).await,
        Command::Provider(c) => providers::run(c, config).await,
        Command::Number(c) => numbers::number(c, config).await,
        Command::Dialplan(c) => numbers::dialplan(c, config).await,
        Command::Cdr(c) => cdrs::run(c, config).await,
        Command::Trunk(c) => trunks::run(c, config).await,
        Command::Token(c) => tokens::run(c, config).await,
        Command::Callback(c) => callbacks::run(c, config).await,
        other => Err(Error::Admin(format!(
            "{other:?} is not an operator command"
        ))),
    }
}

/// Runs one `tandem cluster` command and returns what to print.
pub async fn cluster(command: &ClusterCommand, config: &Config) -> Result<String, Error> {
    match command {
        ClusterCommand::Init { .. } => crate::cluster::init(config).await,
        ClusterCommand::Join {
            peer, token_file, ..
        } => crate::cluster::join(config, peer, token_file.as_deref()).await,
        ClusterCommand::JoinToken(c) => tokens::join_tokens(c, config).await,
        ClusterCommand::Remove { node, .. } => {
            call(
                config,
                reqwest::Method::DELETE,
                &format!("/v1/cluster/members/{node}"),
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!(
                "Node {node} is removed and its id retired. Stop it and wipe its data dir.\n"
            ))
        }
        ClusterCommand::Status { json, .. } => {
            let body = call(
                config,
                reqwest::Method::GET,
                "/v1/cluster/status",
                ADMIN_TIMEOUT,
            )
            .await?;
            if *json {
                return Ok(format!("{body:#}\n"));
            }
            Ok(render_status(&body))
        }
    }
}

/// Runs one `tandem keys` command and returns what to print.
pub async fn keys(command: &KeysCommand, config: &Config) -> Result<String, Error> {
    match command {
        KeysCommand::Rotate { .. } => {
            let path = config.node.master_key_path();
            let mut ring = KeyRing::load(&path)?;
            let id = ring.rotate();
            ring.save_replacing(&path)?;
            Ok(format!(
                "Added key {id} to {}.\nNext: copy this file to every node, then run \
                 `tandem keys reseal --config FILE` on any one of them.\n",
                path.display()
            ))
        }
        KeysCommand::Reseal { .. } => {
            let body = call(
                config,
                reqwest::Method::POST,
                "/v1/keys/reseal",
                RESEAL_TIMEOUT,
            )
            .await?;
            render_rotation(&body)
        }
    }
}

/// The report of `tandem keys reseal`: an error, naming the members, unless every member
/// dropped its history, because only then may the old key go.
fn render_rotation(body: &serde_json::Value) -> Result<String, Error> {
    let mut text = format!(
        "Every sensitive field is now sealed with key {}: re-sealed {} accounts and {} \
         provider accounts.\n",
        body["key_id"], body["accounts"], body["providers"]
    );
    let members = body["members"].as_array().cloned().unwrap_or_default();
    for m in &members {
        match (m.get("dropped"), m.get("error")) {
            (Some(d), _) => text.push_str(&format!(
                "Node {}: log purged through index {}, snapshot at {}, files compacted.\n",
                m["node"], d["purged_index"], d["snapshot_index"]
            )),
            (None, e) => text.push_str(&format!(
                "Node {}: its files still hold values sealed under older keys: {}\n",
                m["node"],
                e.and_then(|e| e.as_str()).unwrap_or("no answer")
            )),
        }
    }
    if body["complete"].as_bool() == Some(true) && !members.is_empty() {
        text.push_str(
            "No data directory holds a value sealed under an older key any more; older keys \
             may now be removed from every key file.\n",
        );
        Ok(text)
    } else {
        text.push_str(
            "Keep the older keys. Run `tandem keys reseal` again once every node is up: it \
             re-seals nothing new and asks each node again.",
        );
        Err(Error::Rotation(text))
    }
}

/// Splits `user@domain`.
fn user_at_domain(account: &str) -> Result<(&str, &str), Error> {
    account
        .split_once('@')
        .filter(|(u, d)| !u.is_empty() && !d.is_empty())
        .ok_or_else(|| Error::Admin(format!("{account:?} is not user@domain")))
}

/// The environment variable an account's password is taken from.
const ACCOUNT_PASSWORD_ENV: &str = "TANDEM_PASSWORD";

/// The new password `tandem account put` was given, if any: never from the command line
/// itself, where the process list and shell history would show it.
fn account_password(
    flag: &Option<Option<String>>,
    file: Option<&Path>,
    from_env: bool,
) -> Result<Option<String>, Error> {
    let from_env_var = || {
        std::env::var(ACCOUNT_PASSWORD_ENV)
            .ok()
            .filter(|p| !p.is_empty())
    };
    let password = match (flag, file, from_env) {
        (Some(Some(_)), _, _) => {
            return Err(Error::Admin(format!(
                "a password after --password is refused: the process list and shell history \
                 would show it; set {ACCOUNT_PASSWORD_ENV}, give --password-file FILE, or give \
                 --password alone to be asked"
            )))
        }
        (Some(None), _, _) => match from_env_var() {
            Some(p) => p,
            None => rpassword::prompt_password("Account password: ").map_err(|e| {
                Error::Admin(format!(
                    "cannot ask for the password ({e}); set {ACCOUNT_PASSWORD_ENV} or give \
                     --password-file FILE"
                ))
            })?,
        },
        (None, Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                context: format!("reading the password file {}", path.display()),
                source,
            })?;
            text.lines().next().unwrap_or_default().to_owned()
        }
        (None, None, true) => from_env_var().ok_or_else(|| {
            Error::Admin(format!(
                "--password-from-env: {ACCOUNT_PASSWORD_ENV} is not set"
            ))
        })?,
        (None, None, false) => return Ok(None),
    };
    if password.is_empty() {
        return Err(Error::Admin("the password is empty".into()));
    }
    Ok(Some(password))
}

/// Runs one `tandem account` command and returns what to print.
pub async fn account(command: &AccountCommand, config: &Config) -> Result<String, Error> {
    match command {
        AccountCommand::Put {
            account,
            customer,
            password,
            password_file,
            password_from_env,
            disable,
            enable,
            max_contacts,
            max_calls,
            ..
        } => {
            let (user, domain) = user_at_domain(account)?;
            let password =
                account_password(password, password_file.as_deref(), *password_from_env)?;
            let enabled = match (disable, enable) {
                (true, _) => Some(false),
                (_, true) => Some(true),
                _ => None,
            };
            let mut body = serde_json::Map::new();
            for (key, value) in [
                ("password", password.map(serde_json::Value::from)),
                ("customer", customer.clone().map(serde_json::Value::from)),
                ("enabled", enabled.map(serde_json::Value::from)),
                ("max_contacts", max_contacts.map(serde_json::Value::from)),
                (
                    "max_concurrent_calls",
                    max_calls.map(serde_json::Value::from),
                ),
            ] {
                if let Some(v) = value {
                    body.insert(key.into(), v);
                }
            }
            let body = serde_json::Value::Object(body);
            let path = format!("/v1/accounts/{domain}/{user}");
            let a = call_with(
                config,
                reqwest::Method::PUT,
                &path,
                Some(body),
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!("{a:#}\n"))
        }
        AccountCommand::Show { account, .. } => {
            let (user, domain) = user_at_domain(account)?;
            let path = format!("/v1/accounts/{domain}/{user}");
            let a = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            let b = call(
                config,
                reqwest::Method::GET,
                &format!("{path}/bindings"),
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!("{a:#}\nbindings: {b:#}\n"))
        }
        AccountCommand::List { .. } => {
            let list = call(config, reqwest::Method::GET, "/v1/accounts", ADMIN_TIMEOUT).await?;
            let mut out = String::new();
            for a in list.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}  customer {}  {}",
                    a["aor"].as_str().unwrap_or("?"),
                    a["customer"].as_str().unwrap_or("?"),
                    if a["enabled"] == true {
                        "enabled"
                    } else {
                        "disabled"
                    }
                );
            }
            Ok(out)
        }
        AccountCommand::Delete { account, .. } => {
            let (user, domain) = user_at_domain(account)?;
            let path = format!("/v1/accounts/{domain}/{user}");
            call(config, reqwest::Method::DELETE, &path, ADMIN_TIMEOUT).await?;
            Ok(format!("Deleted {user}@{domain} and its bindings.\n"))
        }
    }
}

/// Runs one `tandem node` command and returns what to print.
pub async fn node(command: &NodeCommand, config: &Config) -> Result<String, Error> {
    match command {
        NodeCommand::Drain {
            no_wait,
            timeout_secs,
            ..
        } => {
            let mut state = call(
                config,
                reqwest::Method::POST,
                "/v1/node/drain",
                ADMIN_TIMEOUT,
            )
            .await?;
            if *no_wait {
                return Ok("Draining: new calls and registrations get 503.\n".into());
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(*timeout_secs);
            let mut last = None;
            while state["drained"] != true {
                let active = state["active_transactions"].as_u64().unwrap_or(0);
                let calls = state["active_calls"].as_u64().unwrap_or(0);
                // A node of an older release reports only the leases it holds.
                let leases = state["provider_handovers_pending"]
                    .as_u64()
                    .or(state["provider_leases"].as_u64())
                    .unwrap_or(0);
                if last != Some((active, calls, leases)) {
                    eprintln!(
                        "draining: {calls} calls and {active} transactions still running, \
                         {leases} provider accounts still to hand over"
                    );
                    last = Some((active, calls, leases));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Admin(format!(
                        "still {calls} calls, {active} transactions and {leases} provider \
                         accounts after {timeout_secs} s; the node keeps draining"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                state = call(
                    config,
                    reqwest::Method::GET,
                    "/v1/node/drain",
                    ADMIN_TIMEOUT,
                )
                .await?;
            }
            Ok(
                "Drained: no calls or transactions left. The node can be stopped or upgraded.\n"
                    .into(),
            )
        }
    }
}

/// Calls the admin API of the node `config` describes and returns its JSON answer, or its
/// JSON error as an [`Error::Admin`].
async fn call(
    config: &Config,
    method: reqwest::Method,
    path: &str,
    timeout: Duration,
) -> Result<serde_json::Value, Error> {
    call_with(config, method, path, None, timeout).await
}

/// Like [`call`], with a JSON body.
async fn call_with(
    config: &Config,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<serde_json::Value, Error> {
    let token_path = config.token_path();
    let token = std::fs::read_to_string(&token_path).map_err(|source| Error::Io {
        context: format!(
            "reading the admin token {} (is the node running, and is this its config?)",
            token_path.display()
        ),
        source,
    })?;
    // Over HTTPS when the node's API speaks it, trusting the CA named in the config only.
    let mut client = reqwest::Client::builder().timeout(timeout);
    let scheme = match config.admin_ca_path() {
        Some(ca) => {
            let pem = std::fs::read(&ca).map_err(|source| Error::Io {
                context: format!(
                    "reading the CA certificate {} the admin API's certificate is checked against \
                     (admin.ca_certificate, else cluster.ca_certificate)",
                    ca.display()
                ),
                source,
            })?;
            let root = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Error::Admin(format!("{}: {e}", ca.display())))?;
            client = client.use_rustls_tls().add_root_certificate(root);
            "https"
        }
        None if config.admin.certificate.is_some() => {
            return Err(Error::Config {
                key: "admin.ca_certificate".into(),
                problem: "the admin API speaks HTTPS, and the config names no CA to check \
                          its certificate against (admin.ca_certificate or \
                          cluster.ca_certificate)"
                    .into(),
            })
        }
        None => "http",
    };
    let url = format!("{scheme}://{}{path}", config.admin.listen);
    let client = client
        .build()
        .map_err(|e| Error::Admin(format!("building an HTTP client: {e}")))?;
    let mut request = client.request(method, &url).bearer_auth(token.trim());
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let reply = request.send().await.map_err(|e| {
        // reqwest's own message hides the cause (a refused connection, a certificate
        // that does not check out): name every cause.
        let cause = tandem_raft_store::http_network::chain(&e);
        Error::Admin(format!(
            "cannot reach the node's admin API at {url}: {cause}; is the node running?"
        ))
    })?;
    let status = reply.status();
    let text = reply
        .text()
        .await
        .map_err(|e| Error::Admin(format!("reading the answer from {url}: {e}")))?;
    let body: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Admin(format!("{url} answered {status} with non-JSON: {e}")))?;
    if !status.is_success() {
        let message = body["error"].as_str().unwrap_or(&text).to_owned();
        return Err(Error::Admin(format!("{message} (HTTP {status})")));
    }
    Ok(body)
}

/// The status as a short report and a table of members.
fn render_status(s: &serde_json::Value) -> String {
    let num = |v: &serde_json::Value| {
        v.as_u64()
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}  node {} ({}{})",
        s["cluster_id"].as_str().unwrap_or("?"),
        num(&s["node_id"]),
        s["role"].as_str().unwrap_or("?"),
        if s["standalone"] == true {
            ", standalone"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "state {}  term {}  leader {}",
        s["state"].as_str().unwrap_or("?"),
        num(&s["term"]),
        num(&s["leader"])
    );
    let _ = writeln!(
        out,
        "log {}  applied {}  snapshot {}  purged {}  apply lag {}",
        num(&s["last_log_index"]),
        num(&s["applied_index"]),
        num(&s["snapshot_index"]),
        num(&s["purged_index"]),
        num(&s["apply_lag"])
    );
    match s["degraded_reason"].as_str() {
        None => {
            let _ = writeln!(out, "quorum ok");
        }
        Some(reason) => {
            let _ = writeln!(out, "quorum DEGRADED: {reason}");
        }
    }
    let _ = writeln!(
        out,
        "\n{:>4}  {:<8} {:<6} {:<22} {:>8} {:>6}  VERSION",
        "ID", "ROLE", "VOTER", "RAFT ADDRESS", "MATCHED", "LAG"
    );
    for m in s["members"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:>4}  {:<8} {:<6} {:<22} {:>8} {:>6}  {}",
            num(&m["id"]),
            m["role"].as_str().unwrap_or("?"),
            if m["voter"] == true { "yes" } else { "no" },
            m["raft_addr"].as_str().unwrap_or("?"),
            num(&m["matched_index"]),
            num(&m["lag"]),
            m["software_version"].as_str().unwrap_or("?"),
        );
    }
    if let Some(note) = s["replication_note"].as_str() {
        let _ = writeln!(out, "(no per-member lag: {note})");
    }
    out
}
