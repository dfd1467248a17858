//! `tandem callback …`: a third-party call through the admin API. By default it follows
//! the callback and prints each step as it happens, until the call ends.

use std::io::Write as _;
use std::time::Duration;

use super::{call, call_with, ADMIN_TIMEOUT};
use crate::config::Config;
use crate::operator::cli::CallbackCommand;
use crate::Error;

/// How often a followed callback is asked how it goes.
const POLL: Duration = Duration::from_millis(500);

fn step(v: &serde_json::Value) -> String {
    match v["state"].as_str().unwrap_or("?") {
        "ended" => format!(
            "ended: {} {}",
            v["code"],
            v["reason"].as_str().unwrap_or_default()
        ),
        state => state.to_owned(),
    }
}

pub async fn run(command: &CallbackCommand, config: &Config) -> Result<String, Error> {
    let CallbackCommand {
        account,
        a,
        b,
        no_wait,
        ..
    } = command;
    let body = serde_json::json!({ "account": account, "a": a, "b": b });
    let started = call_with(
        config,
        reqwest::Method::POST,
        "/v1/callback",
        Some(body),
        ADMIN_TIMEOUT,
    )
    .await?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    if *no_wait {
        return Ok(format!(
            "Callback {id} started: {}. Follow it with GET /v1/callbacks/{id} on this node.\n",
            step(&started)
        ));
    }
    let mut out = std::io::stdout().lock();
    let mut said = step(&started);
    let _ = writeln!(out, "callback {id}: {said}");
    loop {
        tokio::time::sleep(POLL).await;
        let now = call(
            config,
            reqwest::Method::GET,
            &format!("/v1/callbacks/{id}"),
            ADMIN_TIMEOUT,
        )
        .await?;
        let s = step(&now);
        if s != said {
            let _ = writeln!(out, "callback {id}: {s}");
            said = s;
        }
        if now["state"] == "ended" {
            return match now["code"].as_u64() {
                Some(200) => Ok(String::new()),
                _ => Err(Error::Admin(format!(
                    "the callback did not connect: {said}"
                ))),
            };
        }
    }
}
