//! `/v1/cluster/join-tokens`: the operator mints one-time join tokens, lists and revokes
//! them (raft-store/DESIGN.md, "Joining"). A token's text is shown once; the cluster
//! stores only its hash. `POST /v1/cluster/members` mints one for the node it adds.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tandem_raft_store::command::{Command, CommandResult, JoinToken};
use tandem_raft_store::join_token;
use tandem_raft_store::membership::ClusterRequest;
use tandem_raft_store::secret_token;
use warp::http::StatusCode;

use super::{json_reply, parse_json, refused, Admin, ApiError};

/// How long a token admits a node unless the operator says otherwise.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest lifetime an operator may ask for: a token is for a join about to happen.
const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The lifetime of the token `POST /v1/cluster/members` mints for its own join: the join
/// follows at once, but the leader's clock decides expiry, and this node's may be behind.
const OWN_JOIN_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    #[serde(default)]
    node_id: Option<u64>,
    #[serde(default)]
    expires_secs: Option<u64>,
}

fn token_json(t: &JoinToken, now_ms: u64) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "node_id": t.node,
        "created_at_ms": t.created_at_ms,
        "expires_at_ms": t.expires_at_ms,
        "used_by": (t.used_by != 0).then_some(t.used_by),
        "expired": t.expires_at_ms <= now_ms,
    })
}

impl Admin {
    /// `POST /v1/cluster/join-tokens`: a token admitting one join (of `node_id`, if
    /// given), shown this once.
    pub(super) async fn mint_join_token(
        &self,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        let b: MintBody = if body.is_empty() {
            MintBody {
                node_id: None,
                expires_secs: None,
            }
        } else {
            parse_json(&body)?
        };
        self.check_clustered()?;
        let lifetime = match b.expires_secs {
            None => DEFAULT_LIFETIME,
            Some(s) if (1..=MAX_LIFETIME.as_secs()).contains(&s) => Duration::from_secs(s),
            Some(s) => {
                return Err(ApiError::bad_request(format!(
                    "expires_secs must be 1 to {}, got {s}",
                    MAX_LIFETIME.as_secs()
                )))
            }
        };
        if let Some(id) = b.node_id {
            self.check_joinable(id)?;
        }
        let (text, token) = self.propose_join_token(b.node_id, lifetime).await?;
        let mut view = token_json(&token, crate::clock::now_ms());
        view["token"] = text.into();
        view["note"] = "the token is shown this once and admits one join; only its hash is \
            stored"
            .into();
        Ok(json_reply(StatusCode::CREATED, &view))
    }

    /// Refuses minting on a standalone node, which nothing can join.
    fn check_clustered(&self) -> Result<(), ApiError> {
        if self.cluster.is_standalone() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "this node is standalone; membership needs a [cluster] section",
            ));
        }
        Ok(())
    }

    /// Refuses, before a token is made, an id that could never join.
    fn check_joinable(&self, id: u64) -> Result<(), ApiError> {
        if id == 0 {
            return Err(ApiError::bad_request("node_id must be at least 1"));
        }
        if self.cluster.replica.members().iter().any(|m| m.id == id) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("node {id} is already a member"),
            ));
        }
        if self.cluster.replica.reader().is_retired(id)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("node id {id} was removed from this cluster and is never used again"),
            ));
        }
        Ok(())
    }

    async fn propose_join_token(
        &self,
        node: Option<u64>,
        lifetime: Duration,
    ) -> Result<(String, JoinToken), ApiError> {
        self.writable()?;
        let now = crate::clock::now_ms();
        let (text, token) = join_token::mint(node, now, now + lifetime.as_millis() as u64);
        let put = Command::PutJoinToken {
            token: token.clone(),
            now_ms: now,
        };
        match self.cluster.replica.propose(put).await? {
            CommandResult::Done => Ok((text, token)),
            other => Err(refused(other)),
        }
    }

    /// `GET /v1/cluster/join-tokens`: ids, whom they admit, until when, and who used them;
    /// never secrets.
    pub(super) fn list_join_tokens(&self) -> Result<warp::reply::Response, ApiError> {
        let now = crate::clock::now_ms();
        let list: Vec<_> = self
            .cluster
            .replica
            .reader()
            .join_tokens()?
            .iter()
            .map(|t| token_json(t, now))
            .collect();
        Ok(json_reply(StatusCode::OK, &list))
    }

    /// `DELETE /v1/cluster/join-tokens/{id}`: the token admits nobody from then on.
    pub(super) async fn revoke_join_token(
        &self,
        id: String,
    ) -> Result<warp::reply::Response, ApiError> {
        if !secret_token::is_id(&id) {
            return Err(ApiError::bad_request(format!(
                "a join token is named by its id, {} hex digits; got {id:?}",
                secret_token::ID_HEX
            )));
        }
        if self.cluster.replica.reader().join_token(&id)?.is_none() {
            return Err(ApiError::not_found(format!("no join token {id}")));
        }
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::RevokeJoinToken { id: id.clone() })
            .await?
        {
            CommandResult::Removed(_) => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({ "revoked": id }),
            )),
            other => Err(refused(other)),
        }
    }

    /// The request that adds node `id` for `POST /v1/cluster/members`: the operator's
    /// token authorised it, so the API mints the join token itself. A cluster below the
    /// feature version of join tokens (mid-upgrade) takes the plain join.
    pub(super) async fn join_request(
        &self,
        id: u64,
        raft_addr: String,
    ) -> Result<ClusterRequest, ApiError> {
        self.check_clustered()?;
        let feature = self.cluster.replica.reader().feature_version()?;
        if feature < tandem_raft_store::membership::JOIN_TOKENS_FROM {
            return Ok(ClusterRequest::Join { id, raft_addr });
        }
        let (token, _) = self.propose_join_token(Some(id), OWN_JOIN_LIFETIME).await?;
        Ok(ClusterRequest::JoinWithToken {
            id,
            raft_addr,
            token: token.into(),
        })
    }
}
