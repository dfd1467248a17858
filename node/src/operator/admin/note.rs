//! `/v1/cluster/note`: the admin routes of the next release's command kind
//! (`Command::PutClusterNote`), served only by a process that plays the next release for
//! the rolling-upgrade test (failover-tests t140); to this release they do not exist (404).
//! Until every member supports the next feature version the write is refused with 409 and
//! the reason.

use bytes::Bytes;
use serde::Deserialize;
use tandem_raft_store::command::{plays_next_release, Command, CommandResult};
use warp::http::StatusCode;

use super::{json_reply, parse_json, refused, Admin, ApiError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteInput {
    text: String,
}

fn this_release_has_no_note() -> Result<(), ApiError> {
    if plays_next_release() {
        Ok(())
    } else {
        Err(ApiError::not_found("no such route: /v1/cluster/note"))
    }
}

impl Admin {
    pub(super) fn get_note(&self) -> Result<warp::reply::Response, ApiError> {
        this_release_has_no_note()?;
        let note = self.cluster.replica.reader().cluster_note()?;
        Ok(json_reply(
            StatusCode::OK,
            &serde_json::json!({ "text": note }),
        ))
    }

    pub(super) async fn put_note(&self, body: Bytes) -> Result<warp::reply::Response, ApiError> {
        this_release_has_no_note()?;
        let input: NoteInput = parse_json(&body)?;
        if input.text.len() > 1024 {
            return Err(ApiError::bad_request("text must be at most 1024 bytes"));
        }
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::PutClusterNote {
                text: input.text.clone(),
            })
            .await?
        {
            CommandResult::Done => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({ "text": input.text }),
            )),
            other => Err(refused(other)),
        }
    }
}
