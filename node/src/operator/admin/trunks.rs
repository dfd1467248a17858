//! `/v1/trunks`: customers' trusted trunks, a PBX or carrier whose calls are recognised by
//! their source address (and optionally transport and port) instead of digest, and are
//! made as one of the customer's accounts (agents/auth/trunks.rs).

use bytes::Bytes;
use serde::Deserialize;
use tandem_raft_store::command::{
    provider_account_id, Command, CommandResult, ProviderTransport, Trunk,
};
use warp::http::StatusCode;

use super::{
    check_customer, check_customer_account, check_id, json_reply, parse_json, put_reply, refused,
    Admin, ApiError,
};
use crate::agents::auth::trunks::widest_prefix;
use crate::config::parse_network;

/// The most sources one trunk may list.
const MAX_SOURCES: usize = 16;

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrunkInput {
    sources: Vec<String>,
    #[serde(default)]
    transport: Option<ProviderTransport>,
    #[serde(default)]
    port: Option<u16>,
    /// `user@domain`, the customer's.
    account: String,
    #[serde(default = "default_true")]
    enabled: bool,
}

fn check_sources(sources: &[String]) -> Result<(), ApiError> {
    if sources.is_empty() || sources.len() > MAX_SOURCES {
        return Err(ApiError::bad_request(format!(
            "sources must list 1 to {MAX_SOURCES} addresses or networks"
        )));
    }
    for s in sources {
        let (ip, len) = parse_network(s).map_err(ApiError::bad_request)?;
        let widest = widest_prefix(ip.is_ipv4());
        if len < widest {
            return Err(ApiError::bad_request(format!(
                "{s:?} is wider than /{widest}: anyone in it could call out as the customer"
            )));
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(ApiError::bad_request(format!(
                "{s:?} is not an address a trunk sends from"
            )));
        }
    }
    Ok(())
}

fn view(t: &Trunk) -> serde_json::Value {
    serde_json::json!({
        "customer": t.customer,
        "name": t.name,
        "sources": t.sources,
        "transport": t.transport,
        "port": t.port,
        "account": t.account,
        "enabled": t.enabled,
    })
}

impl Admin {
    pub(super) fn list_trunks(
        &self,
        customer: Option<String>,
    ) -> Result<warp::reply::Response, ApiError> {
        if let Some(c) = &customer {
            check_id("customer", c)?;
        }
        let list: Vec<serde_json::Value> = self
            .cluster
            .replica
            .reader()
            .trunks()?
            .iter()
            .filter(|t| customer.as_ref().is_none_or(|c| *c == t.customer))
            .map(view)
            .collect();
        Ok(json_reply(StatusCode::OK, &list))
    }

    pub(super) fn get_trunk(
        &self,
        customer: &str,
        name: &str,
    ) -> Result<warp::reply::Response, ApiError> {
        check_id("customer", customer)?;
        check_id("trunk name", name)?;
        match self
            .cluster
            .replica
            .reader()
            .trunk(&provider_account_id(customer, name))?
        {
            Some(t) => Ok(json_reply(StatusCode::OK, &view(&t))),
            None => Err(ApiError::not_found(format!("no trunk {customer}/{name}"))),
        }
    }

    pub(super) async fn put_trunk(
        &self,
        customer: String,
        name: String,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        check_id("customer", &customer)?;
        check_id("trunk name", &name)?;
        let input: TrunkInput = parse_json(&body)?;
        check_sources(&input.sources)?;
        if input.port == Some(0) {
            return Err(ApiError::bad_request("port must be 1 to 65535"));
        }
        let reader = self.cluster.replica.reader();
        check_customer(reader, &customer)?;
        check_customer_account(reader, &customer, &input.account, "account")?;
        let t = Trunk {
            customer,
            name,
            sources: input.sources,
            transport: input.transport,
            port: input.port,
            account: input.account,
            enabled: input.enabled,
        };
        let existed = reader.trunk(&t.id())?.is_some();
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::PutTrunk(t.clone()))
            .await?
        {
            CommandResult::Done => Ok(put_reply(!existed, &view(&t))),
            other => Err(refused(other)),
        }
    }

    pub(super) async fn delete_trunk(
        &self,
        customer: String,
        name: String,
    ) -> Result<warp::reply::Response, ApiError> {
        check_id("customer", &customer)?;
        check_id("trunk name", &name)?;
        let id = provider_account_id(&customer, &name);
        if self.cluster.replica.reader().trunk(&id)?.is_none() {
            return Err(ApiError::not_found(format!("no trunk {id}")));
        }
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::DeleteTrunk { id: id.clone() })
            .await?
        {
            CommandResult::Done => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({ "deleted": id }),
            )),
            other => Err(refused(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_must_be_narrow_real_addresses() {
        let ok = |v: &[&str]| check_sources(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["203.0.113.7", "198.51.100.0/24", "2001:db8:1::/48"]).is_ok());
        for bad in [
            &[][..],
            &["0.0.0.0/0"],
            &["10.0.0.0/8"],
            &["2001:db8::/32"],
            &["0.0.0.0"],
            &["224.0.0.1"],
            &["not-an-ip"],
            &["192.0.2.1/33"],
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
    }
}
