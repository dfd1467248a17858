//! Who a request is from, and `/v1/tokens`: the operator's token (a file on each node) and
//! customers' tokens (replicated, hashed, revocable), and what each may reach
//! (node/DESIGN.md, "Who may do what on the admin port").

use bytes::Bytes;
use serde::Deserialize;
use tandem_raft_store::command::{ApiToken, Command, CommandResult};
use tandem_raft_store::secret_token::{self, ID_HEX};
use warp::http::StatusCode;

use super::{check_customer, check_id, json_reply, parse_json, refused, same_secret, Admin};
use super::{customer_query, ApiError};

/// What a customer token starts with; the rest is `<id>_<secret>` (`secret_token`).
const PREFIX: &str = "tc_";
/// Tokens one customer may hold: enough for every portal and script it runs, and few
/// enough that deleting a customer reads them all in one apply.
pub(super) const MAX_TOKENS_PER_CUSTOMER: usize = 100;
const MAX_LABEL: usize = 128;

/// Whom a request's bearer token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The token in `admin.token_file`: everything.
    Operator,
    /// A customer's token: that customer's accounts and what hangs off them, nothing of
    /// the cluster's or of other customers'.
    Customer(String),
}

impl Scope {
    /// Whether this token may see customer `customer`'s records.
    pub(super) fn sees(&self, customer: &str) -> bool {
        match self {
            Scope::Operator => true,
            Scope::Customer(c) => c == customer,
        }
    }

    /// The customer whose records a list may show: a customer token's own, whatever it
    /// asked for (asking for another's is refused), or the operator's choice.
    pub(super) fn list_filter(
        &self,
        q: &std::collections::HashMap<String, String>,
    ) -> Result<Option<String>, ApiError> {
        let asked = customer_query(q)?;
        match self {
            Scope::Operator => Ok(asked),
            Scope::Customer(own) => match asked {
                Some(c) if c != *own => Err(other_customer(own, &c)),
                _ => Ok(Some(own.clone())),
            },
        }
    }

    /// Refuses a path that names another customer than a customer token's own.
    pub(super) fn check_path_customer(&self, customer: &str) -> Result<(), ApiError> {
        match self {
            Scope::Customer(own) if own != customer => Err(other_customer(own, customer)),
            _ => Ok(()),
        }
    }
}

pub(super) fn other_customer(own: &str, asked: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!("this token is customer {own:?}'s; it reaches nothing of customer {asked:?}"),
    )
}

/// The refusal of an operator's endpoint to a customer token.
pub(super) fn operator_only() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "this needs the operator token: a customer token reaches only its customer's \
         accounts, bindings, dialplans, providers, numbers, trunks, settings and CDRs, \
         and changes only its accounts, dialplans and providers",
    )
}

/// `(id, secret)` of a customer token's text, if it has the shape of one.
fn parse(token: &str) -> Option<(&str, &str)> {
    secret_token::parse(PREFIX, token)
}

fn wrong_token() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "the bearer token is wrong or was revoked",
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    customer: String,
    #[serde(default)]
    label: String,
}

fn token_json(t: &ApiToken) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "customer": t.customer,
        "label": t.label,
        "created_at_ms": t.created_at_ms,
    })
}

impl Admin {
    /// Whom the `Authorization` header names: 401 without a token or with a wrong or
    /// revoked one, 403 for a disabled customer's.
    pub(super) fn authorize(&self, header: Option<String>) -> Result<Scope, ApiError> {
        let presented = header.as_deref().and_then(|h| {
            let (scheme, token) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let Some(presented) = presented else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "send `Authorization: Bearer <token>` (see admin.token_file)",
            ));
        };
        if same_secret(presented.as_bytes(), self.token.as_bytes()) {
            return Ok(Scope::Operator);
        }
        let (id, secret) = parse(presented).ok_or_else(wrong_token)?;
        let reader = self.cluster.replica.reader();
        let token = reader.api_token(id)?.ok_or_else(wrong_token)?;
        if !secret_token::secret_matches(&token.secret_sha256, secret) {
            return Err(wrong_token());
        }
        match reader.customer(&token.customer)? {
            Some(c) if c.enabled => Ok(Scope::Customer(token.customer)),
            Some(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("customer {:?} is disabled", token.customer),
            )),
            // Deleting a customer deletes its tokens in the same entry; this is only a
            // reader between the two.
            None => Err(wrong_token()),
        }
    }

    /// `POST /v1/tokens`: a new token for a customer, shown this once.
    pub(super) async fn create_token(
        &self,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        let b: TokenBody = parse_json(&body)?;
        check_id("customer", &b.customer)?;
        if b.label.chars().count() > MAX_LABEL || b.label.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "label must be at most {MAX_LABEL} characters without control characters"
            )));
        }
        let reader = self.cluster.replica.reader();
        check_customer(reader, &b.customer)?;
        let held = reader
            .api_tokens()?
            .iter()
            .filter(|t| t.customer == b.customer)
            .count();
        if held >= MAX_TOKENS_PER_CUSTOMER {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "customer {:?} has {held} tokens, the most it may have; revoke one first",
                    b.customer
                ),
            ));
        }
        self.writable()?;
        let minted = secret_token::mint(PREFIX);
        let token = ApiToken {
            id: minted.id,
            customer: b.customer,
            label: b.label,
            secret_sha256: minted.secret_sha256,
            created_at_ms: crate::clock::now_ms(),
        };
        match self
            .cluster
            .replica
            .propose(Command::PutApiToken(token.clone()))
            .await?
        {
            CommandResult::Done => {
                let mut view = token_json(&token);
                view["token"] = minted.text.into();
                view["note"] = "the token is shown this once; only its hash is stored".into();
                Ok(json_reply(StatusCode::CREATED, &view))
            }
            other => Err(refused(other)),
        }
    }

    /// `GET /v1/tokens[?customer=]`: ids and labels, never secrets.
    pub(super) fn list_tokens(
        &self,
        customer: Option<String>,
    ) -> Result<warp::reply::Response, ApiError> {
        if let Some(c) = &customer {
            check_id("customer", c)?;
        }
        let list: Vec<_> = self
            .cluster
            .replica
            .reader()
            .api_tokens()?
            .iter()
            .filter(|t| customer.as_ref().is_none_or(|c| *c == t.customer))
            .map(token_json)
            .collect();
        Ok(json_reply(StatusCode::OK, &list))
    }

    /// `DELETE /v1/tokens/{id}`: every node refuses the token once it applies this.
    pub(super) async fn revoke_token(&self, id: String) -> Result<warp::reply::Response, ApiError> {
        if !secret_token::is_id(&id) {
            return Err(ApiError::bad_request(format!(
                "a token is named by its id, {ID_HEX} hex digits; got {id:?}"
            )));
        }
        let Some(token) = self.cluster.replica.reader().api_token(&id)? else {
            return Err(ApiError::not_found(format!("no token {id}")));
        };
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::RevokeApiToken { id: id.clone() })
            .await?
        {
            CommandResult::Removed(_) => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({"revoked": id, "customer": token.customer}),
            )),
            other => Err(refused(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_shape_of_a_customer_token_is_parsed() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        assert_eq!(
            parse(&format!("tc_{id}_{secret}")),
            Some((id, secret.as_str()))
        );
        for bad in [
            format!("tc_{id}{secret}"),
            format!("tc_{}_{secret}", &id[1..]),
            format!("tc_{id}_{}", &secret[1..]),
            format!("tc_{id}_{}", secret.to_uppercase()),
            format!("tx_{id}_{secret}"),
            format!("tc_{id}_{secret}_"),
            String::new(),
        ] {
            assert_eq!(parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_scope_sees_its_own_customer_and_lists_only_it() {
        let acme = Scope::Customer("acme".into());
        assert!(acme.sees("acme") && !acme.sees("globex"));
        assert!(Scope::Operator.sees("globex"));
        let q = |c: Option<&str>| {
            c.map(|c| [("customer".to_owned(), c.to_owned())].into())
                .unwrap_or_default()
        };
        assert_eq!(acme.list_filter(&q(None)).unwrap(), Some("acme".into()));
        assert_eq!(
            acme.list_filter(&q(Some("acme"))).unwrap(),
            Some("acme".into())
        );
        assert!(acme.list_filter(&q(Some("globex"))).is_err());
        assert_eq!(Scope::Operator.list_filter(&q(None)).unwrap(), None);
        assert!(acme.check_path_customer("globex").is_err());
        assert!(acme.check_path_customer("acme").is_ok());
    }
}
