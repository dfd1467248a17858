//! `tandem provider …`: provider accounts through the admin API. The password never goes
//! on the command line, where `ps` and shell history would show it: it comes from
//! TANDEM_PROVIDER_PASSWORD, or from the terminal without echo.

use std::fmt::Write as _;

use super::{call, call_with, ADMIN_TIMEOUT};
use crate::config::Config;
use crate::operator::cli::{ProviderCommand, TransportArg};
use crate::Error;

/// The environment variable a password is taken from before asking.
const PASSWORD_ENV: &str = "TANDEM_PROVIDER_PASSWORD";

/// Splits `customer/name`.
fn customer_name(provider: &str) -> Result<(&str, &str), Error> {
    provider
        .split_once('/')
        .filter(|(c, n)| !c.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| Error::Admin(format!("{provider:?} is not customer/name")))
}

fn read_password() -> Result<String, Error> {
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        return Ok(p);
    }
    let p = rpassword::prompt_password("Provider password: ").map_err(|e| {
        Error::Admin(format!(
            "cannot ask for the password ({e}); set {PASSWORD_ENV} instead"
        ))
    })?;
    if p.is_empty() {
        return Err(Error::Admin("an empty password was entered".into()));
    }
    Ok(p)
}

/// An optional text field: absent keeps it, "" clears it (null), else sets it.
fn text(v: &Option<String>) -> Option<serde_json::Value> {
    v.as_ref().map(|s| {
        if s.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::from(s.clone())
        }
    })
}

pub async fn run(command: &ProviderCommand, config: &Config) -> Result<String, Error> {
    match command {
        ProviderCommand::Put {
            provider,
            registrar,
            transport,
            username,
            auth_username,
            password,
            realm,
            expires,
            disable,
            enable,
            outbound_proxy,
            contact_user,
            inbound_account,
            ca_file,
            ..
        } => {
            let (customer, name) = customer_name(provider)?;
            let path = format!("/v1/providers/{customer}/{name}");
            let exists = match call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await {
                Ok(_) => true,
                Err(Error::Admin(e)) if e.contains("no provider account") => false,
                Err(e) => return Err(e),
            };
            let password = if *password || !exists {
                Some(read_password()?)
            } else {
                None
            };
            let enabled = match (disable, enable) {
                (true, _) => Some(false),
                (_, true) => Some(true),
                _ => None,
            };
            let transport = transport.map(|t| match t {
                TransportArg::Auto => serde_json::Value::Null,
                TransportArg::Udp => "udp".into(),
                TransportArg::Tcp => "tcp".into(),
                TransportArg::Tls => "tls".into(),
            });
            let inbound = inbound_account.as_ref().map(|a| {
                if a.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::json!({ "account": a })
                }
            });
            let mut body = serde_json::Map::new();
            for (key, value) in [
                ("registrar", registrar.clone().map(serde_json::Value::from)),
                ("transport", transport),
                ("username", username.clone().map(serde_json::Value::from)),
                ("auth_username", text(auth_username)),
                ("password", password.map(serde_json::Value::from)),
                ("realm", text(realm)),
                ("expires_secs", expires.map(serde_json::Value::from)),
                ("enabled", enabled.map(serde_json::Value::from)),
                ("outbound_proxy", text(outbound_proxy)),
                ("contact_user", text(contact_user)),
                ("inbound", inbound),
                ("ca_file", text(ca_file)),
            ] {
                if let Some(v) = value {
                    body.insert(key.into(), v);
                }
            }
            let p = call_with(
                config,
                reqwest::Method::PUT,
                &path,
                Some(serde_json::Value::Object(body)),
                ADMIN_TIMEOUT,
            )
            .await?;
            Ok(format!("{p:#}\n"))
        }
        ProviderCommand::Show { provider, .. } => {
            let (customer, name) = customer_name(provider)?;
            let path = format!("/v1/providers/{customer}/{name}");
            let p = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            Ok(format!("{p:#}\n"))
        }
        ProviderCommand::List { customer, .. } => {
            let path = match customer {
                Some(c) => format!("/v1/providers?customer={c}"),
                None => "/v1/providers".into(),
            };
            let list = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            let mut out = String::new();
            for p in list.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}  {}@{}  {}",
                    p["id"].as_str().unwrap_or("?"),
                    p["username"].as_str().unwrap_or("?"),
                    p["registrar"].as_str().unwrap_or("?"),
                    if p["enabled"] == true {
                        "enabled"
                    } else {
                        "disabled"
                    }
                );
            }
            Ok(out)
        }
        ProviderCommand::Delete { provider, .. } => {
            let (customer, name) = customer_name(provider)?;
            let path = format!("/v1/providers/{customer}/{name}");
            call(config, reqwest::Method::DELETE, &path, ADMIN_TIMEOUT).await?;
            Ok(format!(
                "Deleted {customer}/{name}; its owner un-registers it.\n"
            ))
        }
        ProviderCommand::Status { provider, .. } => {
            let (customer, name) = customer_name(provider)?;
            let path = format!("/v1/providers/{customer}/{name}/status");
            let s = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
            Ok(format!("{s:#}\n"))
        }
    }
}
