//! `tandem number …` and `tandem dialplan …`: customers' numbers and accounts' dialplans,
//! through the admin API.

use std::fmt::Write as _;

use super::{call, call_with, ADMIN_TIMEOUT};
use crate::config::Config;
use crate::operator::cli::{DialplanCommand, NumberCommand};
use crate::Error;

pub async fn number(command: &NumberCommand, config: &Config) -> Result<String, Error> {
    match command {
        NumberCommand::Put {
            number,
            customer,
            account,
            ..
        } => {
            let body = serde_json::json!({ "customer": customer, "account": account });
            let n = call_with(
                config,
                reqwest::Method::PUT,
                &format!("/v1/numbers/{number}"),
                Some(body),
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!("{n:#}\n"))
        }
        NumberCommand::Show { number, .. } => {
            let path = format!("/v1/numbers/{number}");
            let n = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            Ok(format!("{n:#}\n"))
        }
        NumberCommand::List { customer, .. } => {
            let path = match customer {
                Some(c) => format!("/v1/numbers?customer={c}"),
                None => "/v1/numbers".into(),
            };
            let list = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            let mut out = String::new();
            for n in list.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}  {}  {}",
                    n["number"].as_str().unwrap_or("?"),
                    n["customer"].as_str().unwrap_or("?"),
                    n["account"].as_str().unwrap_or("?"),
                );
            }
            Ok(out)
        }
        NumberCommand::Delete { number, .. } => {
            let path = format!("/v1/numbers/{number}");
            let d = call(config, reqwest::Method::DELETE, &path, ADMIN_TIMEOUT).await?;
            Ok(format!(
                "Deleted {}.\n",
                d["deleted"].as_str().unwrap_or(number)
            ))
        }
    }
}

/// `/v1/accounts/{domain}/{user}/dialplan` (or `incoming-dialplan`) for `user@domain`.
fn dialplan_path(account: &str, incoming: bool) -> Result<String, Error> {
    let (user, domain) = account
        .split_once('@')
        .filter(|(u, d)| !u.is_empty() && !d.is_empty())
        .ok_or_else(|| Error::Admin(format!("{account:?} is not user@domain")))?;
    let which = if incoming {
        "incoming-dialplan"
    } else {
        "dialplan"
    };
    Ok(format!("/v1/accounts/{domain}/{user}/{which}"))
}

pub async fn dialplan(command: &DialplanCommand, config: &Config) -> Result<String, Error> {
    match command {
        DialplanCommand::Put {
            account,
            file,
            incoming,
            ..
        } => {
            let script = std::fs::read_to_string(file).map_err(|source| Error::Io {
                context: format!("reading the dialplan {}", file.display()),
                source,
            })?;
            let body = serde_json::json!({ "script": script });
            let d = call_with(
                config,
                reqwest::Method::PUT,
                &dialplan_path(account, *incoming)?,
                Some(body),
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!(
                "Saved the dialplan of {} (version {}).\n",
                account,
                d["version"].as_u64().unwrap_or(0)
            ))
        }
        DialplanCommand::Show {
            account, incoming, ..
        } => {
            let d = call(
                config,
                reqwest::Method::GET,
                &dialplan_path(account, *incoming)?,
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(d["script"].as_str().unwrap_or_default().to_owned())
        }
        DialplanCommand::Delete {
            account, incoming, ..
        } => {
            call(
                config,
                reqwest::Method::DELETE,
                &dialplan_path(account, *incoming)?,
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!(
                "Deleted the dialplan of {account}; its calls take the default route.\n"
            ))
        }
    }
}
