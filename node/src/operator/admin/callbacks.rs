//! `/v1/callback`: third-party calls (agents/app_server/callback.rs). A POST starts one on
//! this node for an account, ringing `a` first and then `b`, and answers at once with its
//! id; `GET /v1/callbacks/{id}` on the same node tells how it goes.

use bytes::Bytes;
use serde::Deserialize;
use warp::http::StatusCode;

use super::{json_reply, parse_json, Admin, ApiError};
use crate::agents::app_server::callback::NotStarted;
use crate::agents::auth::accounts::{check_domain, check_user};

/// The longest dial spec a callback takes, as a dialplan's `dial()` does.
const MAX_SPEC: usize = 512;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallbackInput {
    /// `user@domain`: whose call it is (its providers, its limits, its CDRs).
    account: String,
    /// Dial specs: `a` rings first; once it answers, `b`.
    a: String,
    b: String,
}

impl Admin {
    fn app_server(&self) -> Result<std::sync::Arc<crate::agents::app_server::AppServer>, ApiError> {
        self.app_server.get().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node places no calls (a witness, or its SIP stack has not started)",
            )
        })
    }

    pub(super) fn start_callback(&self, body: Bytes) -> Result<warp::reply::Response, ApiError> {
        let input: CallbackInput = parse_json(&body)?;
        let (user, domain) = input.account.split_once('@').ok_or_else(|| {
            ApiError::bad_request(format!(
                "account must be user@domain, got {:?}",
                input.account
            ))
        })?;
        check_user(user).map_err(ApiError::bad_request)?;
        check_domain(domain).map_err(ApiError::bad_request)?;
        for (name, spec) in [("a", &input.a), ("b", &input.b)] {
            if spec.trim().is_empty() || spec.len() > MAX_SPEC {
                return Err(ApiError::bad_request(format!(
                    "{name} must be a dial spec of 1 to {MAX_SPEC} bytes"
                )));
            }
        }
        let app = self.app_server()?;
        let account = self
            .cluster
            .replica
            .reader()
            .account(domain, user)?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    format!("no account {:?}", input.account),
                )
            })?;
        if self.drain.is_draining() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node is draining and starts no new calls; ask another node",
            ));
        }
        match app.start_callback(account, &input.a, &input.b, false) {
            Ok(view) => Ok(json_reply(StatusCode::ACCEPTED, &view)),
            Err(e @ NotStarted::Invalid(_)) => Err(ApiError::bad_request(e.to_string())),
            Err(e @ NotStarted::Refused(_)) => {
                Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
            }
            Err(e @ NotStarted::Busy(_)) => {
                Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()))
            }
        }
    }

    pub(super) fn get_callback(&self, id: &str) -> Result<warp::reply::Response, ApiError> {
        let app = self.app_server()?;
        match app.callback(id) {
            Some(view) => Ok(json_reply(StatusCode::OK, &view)),
            None => Err(ApiError::not_found(format!(
                "no callback {id:?} on this node (a callback is known only to the node that placed it)"
            ))),
        }
    }
}
