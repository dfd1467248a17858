//! `/v1/accounts/{domain}/{user}/dialplan`: an account's rhai dialplan for the calls it
//! makes, and `…/incoming-dialplan`: the one for calls to it (dialplan/README.md). Two
//! scripts, so that a plan written for calls out never runs for a stranger's call in. A
//! script is compiled before it is saved; one that does not compile is refused with the
//! line and column of the error, so a call never meets a script that cannot run.
//! Deleting it saves an empty script, which means "no dialplan".

use bytes::Bytes;
use serde::Deserialize;
use tandem_dialplan::{Limits, Sandbox};
use tandem_raft_store::command::{Command, CommandResult, Dialplan};
use warp::http::StatusCode;

use super::{json_reply, parse_json, put_reply, refused, Admin, ApiError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DialplanInput {
    script: String,
}

/// The owner a dialplan is stored under: the account's `user@domain` for its calls out,
/// `in:user@domain` for calls to it.
fn owner(domain: &str, user: &str, incoming: bool) -> String {
    if incoming {
        tandem_raft_store::command::incoming_dialplan_owner(user, domain)
    } else {
        format!("{user}@{domain}")
    }
}

impl Admin {
    pub(super) fn get_dialplan(
        &self,
        domain: &str,
        user: &str,
        incoming: bool,
    ) -> Result<warp::reply::Response, ApiError> {
        self.account(domain, user)?;
        let owner = owner(domain, user, incoming);
        match self.cluster.replica.reader().dialplan(&owner)? {
            Some(d) if !d.script.is_empty() => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({"account": format!("{user}@{domain}"), "incoming": incoming, "script": d.script, "version": d.version}),
            )),
            _ => Err(ApiError::not_found(format!(
                "account {user}@{domain} has no {}dialplan",
                if incoming { "incoming " } else { "" }
            ))),
        }
    }

    pub(super) async fn put_dialplan(
        &self,
        domain: String,
        user: String,
        incoming: bool,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        self.account(&domain, &user)?;
        let input: DialplanInput = parse_json(&body)?;
        if input.script.trim().is_empty() {
            return Err(ApiError::bad_request(
                "script is empty; DELETE the dialplan to remove it",
            ));
        }
        Sandbox::new(Limits::default())
            .compile(&input.script)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.save_dialplan(&domain, &user, incoming, input.script)
            .await
    }

    pub(super) async fn delete_dialplan(
        &self,
        domain: String,
        user: String,
        incoming: bool,
    ) -> Result<warp::reply::Response, ApiError> {
        self.get_dialplan(&domain, &user, incoming)?;
        self.save_dialplan(&domain, &user, incoming, String::new())
            .await?;
        Ok(json_reply(
            StatusCode::OK,
            &serde_json::json!({"deleted": format!("{user}@{domain}"), "incoming": incoming}),
        ))
    }

    async fn save_dialplan(
        &self,
        domain: &str,
        user: &str,
        incoming: bool,
        script: String,
    ) -> Result<warp::reply::Response, ApiError> {
        let owner = owner(domain, user, incoming);
        let previous = self.cluster.replica.reader().dialplan(&owner)?;
        let created = previous.as_ref().is_none_or(|d| d.script.is_empty());
        let version = previous.map_or(1, |d| d.version + 1);
        self.writable()?;
        let d = Dialplan {
            owner: owner.clone(),
            script,
            version,
        };
        match self
            .cluster
            .replica
            .propose(Command::PutDialplan(d))
            .await?
        {
            CommandResult::Done => Ok(put_reply(
                created,
                &serde_json::json!({"account": format!("{user}@{domain}"), "incoming": incoming, "version": version}),
            )),
            other => Err(refused(other)),
        }
    }
}
