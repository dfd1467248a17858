//! `tandem trunk …`: customers' trusted trunks, through the admin API.

use std::fmt::Write as _;

use super::{call, call_with, ADMIN_TIMEOUT};
use crate::config::Config;
use crate::operator::cli::{TransportArg, TrunkCommand};
use crate::Error;

/// `/v1/trunks/{customer}/{name}` for `customer/name`.
fn trunk_path(trunk: &str) -> Result<String, Error> {
    let (c, n) = trunk
        .split_once('/')
        .filter(|(c, n)| !c.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| Error::Admin(format!("{trunk:?} is not customer/name")))?;
    Ok(format!("/v1/trunks/{c}/{n}"))
}

fn line(t: &serde_json::Value) -> String {
    let sources: Vec<&str> = t["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str())
        .collect();
    format!(
        "{}/{}  {}  {}{}  as {}{}\n",
        t["customer"].as_str().unwrap_or("?"),
        t["name"].as_str().unwrap_or("?"),
        sources.join(","),
        t["transport"].as_str().unwrap_or("any transport"),
        t["port"]
            .as_u64()
            .map(|p| format!(" port {p}"))
            .unwrap_or_default(),
        t["account"].as_str().unwrap_or("?"),
        if t["enabled"].as_bool() == Some(false) {
            "  (disabled)"
        } else {
            ""
        },
    )
}

pub async fn run(command: &TrunkCommand, config: &Config) -> Result<String, Error> {
    match command {
        TrunkCommand::Put {
            trunk,
            sources,
            transport,
            port,
            account,
            disabled,
            ..
        } => {
            let transport = match transport {
                TransportArg::Auto => serde_json::Value::Null,
                TransportArg::Udp => "udp".into(),
                TransportArg::Tcp => "tcp".into(),
                TransportArg::Tls => "tls".into(),
            };
            let body = serde_json::json!({
                "sources": sources,
                "transport": transport,
                "port": port,
                "account": account,
                "enabled": !disabled,
            });
            let t = call_with(
                config,
                reqwest::Method::PUT,
                &trunk_path(trunk)?,
                Some(body),
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(line(&t))
        }
        TrunkCommand::Show { trunk, .. } => {
            let t = call(
                config,
                reqwest::Method::GET,
                &trunk_path(trunk)?,
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(line(&t))
        }
        TrunkCommand::List { customer, .. } => {
            let path = match customer {
                Some(c) => format!("/v1/trunks?customer={c}"),
                None => "/v1/trunks".into(),
            };
            let list = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            let mut out = String::new();
            for t in list.as_array().into_iter().flatten() {
                let _ = write!(out, "{}", line(t));
            }
            Ok(out)
        }
        TrunkCommand::Delete { trunk, .. } => {
            let d = call(
                config,
                reqwest::Method::DELETE,
                &trunk_path(trunk)?,
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!(
                "Deleted {}.\n",
                d["deleted"].as_str().unwrap_or(trunk)
            ))
        }
    }
}
