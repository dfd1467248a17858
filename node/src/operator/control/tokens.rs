//! `tandem token …`: customers' admin API tokens, through the admin API.

use std::fmt::Write as _;
use std::io::Write as _;

use super::{call, call_with, ADMIN_TIMEOUT};
use crate::config::Config;
use crate::operator::cli::TokenCommand;
use crate::Error;

pub async fn run(command: &TokenCommand, config: &Config) -> Result<String, Error> {
    match command {
        TokenCommand::Create {
            customer,
            label,
            out,
            ..
        } => {
            // Refuse an existing file before a token is made that nobody would see.
            if let Some(path) = out {
                if path.exists() {
                    return Err(Error::Admin(format!(
                        "{} exists; the token is written only to a new file",
                        path.display()
                    )));
                }
            }
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
            let write = || -> std::io::Result<()> {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                f.write_all(format!("{token}\n").as_bytes())
            };
            write().map_err(|source| Error::Io {
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
