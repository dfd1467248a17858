//! `tandem token …` (customers' admin API tokens) and `tandem cluster join-token …`
//! (one-time join tokens), through the admin API.

use std::fmt::Write as _;
use std::io::Write as _;

use super::{call, call_with, ADMIN_TIMEOUT};
use crate::config::Config;
use crate::operator::cli::{JoinTokenCommand, TokenCommand};
use crate::Error;

/// Writes a token shown once to a new file of mode 0600 (never over an existing one).
pub(super) fn write_secret(path: &std::path::Path, token: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{token}\n").as_bytes())
}

/// Refuses an existing file before a token is made that nobody would see.
pub(super) fn check_new_file(out: Option<&std::path::Path>) -> Result<(), Error> {
    match out {
        Some(path) if path.exists() => Err(Error::Admin(format!(
            "{} exists; the token is written only to a new file",
            path.display()
        ))),
        _ => Ok(()),
    }
}

pub async fn run(command: &TokenCommand, config: &Config) -> Result<String, Error> {
    match command {
        TokenCommand::Create {
            customer,
            label,
            out,
            ..
        } => {
            check_new_file(out.as_deref())?;
            let body = serde_json::json!({ "customer": customer, "label": label });
            let t = call_with(
                config,
                reqwest::Method::POST,
                "/v1/tokens",
                Some(body),
                ADMIN_TIMEOUT,
            )
            .await?;
            let (Some(id), Some(token)) = (t["id"].as_str(), t["token"].as_str()) else {
                return Err(Error::Admin(format!("unexpected answer {t}")));
            };
            let Some(path) = out else {
                return Ok(format!(
                    "{token}\nToken {id} of customer {customer}: shown this once; revoke it \
                     with `tandem token revoke {id}`.\n"
                ));
            };
            write_secret(path, token).map_err(|source| Error::Io {
                context: format!(
                    "writing token {id} to {} (it exists: revoke it with `tandem token \
                     revoke {id}`)",
                    path.display()
                ),
                source,
            })?;
            Ok(format!(
                "Token {id} of customer {customer} is in {} (mode 0600).\n",
                path.display()
            ))
        }
        TokenCommand::List { customer, .. } => {
            let path = match customer {
                Some(c) => format!("/v1/tokens?customer={c}"),
                None => "/v1/tokens".into(),
            };
            let list = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            let mut out = String::new();
            for t in list.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}  {}  {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["customer"].as_str().unwrap_or("?"),
                    t["label"].as_str().unwrap_or(""),
                );
            }
            Ok(out)
        }
        TokenCommand::Revoke { id, .. } => {
            let path = format!("/v1/tokens/{id}");
            let r = call(config, reqwest::Method::DELETE, &path, ADMIN_TIMEOUT).await?;
            Ok(format!(
                "Revoked token {id} of customer {}.\n",
                r["customer"].as_str().unwrap_or("?")
            ))
        }
    }
}

/// `tandem cluster join-token …`: one-time join tokens, through the admin API.
pub async fn join_tokens(command: &JoinTokenCommand, config: &Config) -> Result<String, Error> {
    match command {
        JoinTokenCommand::Create {
            node_id,
            expires_secs,
            out,
            ..
        } => {
            check_new_file(out.as_deref())?;
            let body = serde_json::json!({ "node_id": node_id, "expires_secs": expires_secs });
            let t = call_with(
                config,
                reqwest::Method::POST,
                "/v1/cluster/join-tokens",
                Some(body),
                ADMIN_TIMEOUT,
            )
            .await?;
            let (Some(id), Some(token)) = (t["id"].as_str(), t["token"].as_str()) else {
                return Err(Error::Admin(format!("unexpected answer {t}")));
            };
            let whom = node_id.map_or("any node id".to_owned(), |n| format!("node {n}"));
            let how = format!(
                "It admits one join of {whom} within {expires_secs} s: on the new node run \
                 `tandem cluster join --config FILE --peer HOST:PORT --token-file FILE`."
            );
            let Some(path) = out else {
                return Ok(format!(
                    "{token}\nJoin token {id}, shown this once. {how}\n"
                ));
            };
            write_secret(path, token).map_err(|source| Error::Io {
                context: format!(
                    "writing join token {id} to {} (revoke it with `tandem cluster \
                     join-token revoke {id}`)",
                    path.display()
                ),
                source,
            })?;
            Ok(format!(
                "Join token {id} is in {} (mode 0600). {how}\n",
                path.display()
            ))
        }
        JoinTokenCommand::List { .. } => {
            let list = call(
                config,
                reqwest::Method::GET,
                "/v1/cluster/join-tokens",
                ADMIN_TIMEOUT,
            )
            .await?;
            let mut out = String::new();
            for t in list.as_array().into_iter().flatten() {
                let whom = t["node_id"]
                    .as_u64()
                    .map_or("any node".to_owned(), |n| format!("node {n}"));
                let state = match (t["used_by"].as_u64(), t["expired"].as_bool()) {
                    (Some(n), _) => format!("used by node {n}"),
                    (None, Some(true)) => "expired".to_owned(),
                    _ => "unused".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "{}  admits {whom}  {state}",
                    t["id"].as_str().unwrap_or("?")
                );
            }
            Ok(out)
        }
        JoinTokenCommand::Revoke { id, .. } => {
            let path = format!("/v1/cluster/join-tokens/{id}");
            call(config, reqwest::Method::DELETE, &path, ADMIN_TIMEOUT).await?;
            Ok(format!("Revoked join token {id}.\n"))
        }
    }
}
