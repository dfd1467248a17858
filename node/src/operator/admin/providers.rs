//! `/v1/providers`: customers' provider accounts, and each one's registration status as its
//! lease owner reports it (asked over the cluster link when that is another node).

use bytes::Bytes;
use tandem_raft_store::command::{
    provider_account_id, Command, CommandResult, InboundTarget, ProviderAccount,
};
use warp::http::StatusCode;

use super::{
    check_customer, check_customer_account, check_id, json_reply, parse_json, put_reply, refused,
    Admin, ApiError, Scope,
};
use crate::agents::registration_agent::accounts::{self, ProviderInput, ProviderView};
use crate::agents::registration_agent::AccountStatus;

impl Admin {
    fn provider(&self, customer: &str, name: &str) -> Result<ProviderAccount, ApiError> {
        check_id("customer", customer)?;
        check_id("provider name", name)?;
        let id = provider_account_id(customer, name);
        self.cluster
            .replica
            .reader()
            .provider_account(&id)?
            .ok_or_else(|| ApiError::not_found(format!("no provider account {id}")))
    }

    pub(super) fn get_provider(
        &self,
        customer: &str,
        name: &str,
    ) -> Result<warp::reply::Response, ApiError> {
        let p = self.provider(customer, name)?;
        Ok(json_reply(StatusCode::OK, &ProviderView::from(&p)))
    }

    pub(super) fn list_providers(
        &self,
        customer: Option<String>,
    ) -> Result<warp::reply::Response, ApiError> {
        if let Some(c) = &customer {
            check_id("customer", c)?;
        }
        let list: Vec<ProviderView> = self
            .cluster
            .replica
            .reader()
            .provider_accounts()?
            .iter()
            .filter(|p| customer.as_ref().is_none_or(|c| *c == p.customer))
            .map(ProviderView::from)
            .collect();
        Ok(json_reply(StatusCode::OK, &list))
    }

    pub(super) async fn put_provider(
        &self,
        scope: &Scope,
        customer: String,
        name: String,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        check_id("customer", &customer)?;
        check_id("provider name", &name)?;
        let input: ProviderInput = parse_json(&body)?;
        // ca_file names a file on the nodes: whether it can be read there is not a
        // customer's to learn.
        if *scope != Scope::Operator && input.ca_file.is_some() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "ca_file is the operator's to set",
            ));
        }
        let reader = self.cluster.replica.reader();
        check_customer(reader, &customer)?;
        let id = provider_account_id(&customer, &name);
        let existing = reader.provider_account(&id)?;
        let created = existing.is_none();
        // Each provider account makes the nodes send REGISTERs to a host the customer
        // chose: a customer's token creates a bounded number; the operator, any.
        if created && *scope != Scope::Operator {
            let cap = self.customer_provider_accounts as usize;
            let held = reader
                .provider_accounts()?
                .iter()
                .filter(|p| p.customer == customer)
                .count();
            if held >= cap {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "customer {customer:?} has {held} provider accounts, the most its own \
                         token may create (admin.customer_provider_accounts); ask the operator"
                    ),
                ));
            }
        }
        let account = accounts::build(&self.cluster.keys(), &customer, &name, input, existing)
            .map_err(ApiError::bad_request)?;
        // A customer token hears one answer whether another customer's account exists
        // or not.
        let hide = |e: ApiError| match scope {
            Scope::Operator => e,
            Scope::Customer(own) => ApiError::new(
                StatusCode::CONFLICT,
                format!("the inbound target must be an account of customer {own:?}"),
            ),
        };
        match &account.inbound {
            Some(InboundTarget::Account(target)) => {
                check_customer_account(reader, &customer, target, "inbound account")
                    .map_err(hide)?;
            }
            // A customer's provider runs only that customer's dialplans.
            Some(InboundTarget::Dialplan(owner)) if *scope != Scope::Operator => {
                let target = owner.strip_prefix("in:").unwrap_or(owner);
                check_customer_account(reader, &customer, target, "inbound dialplan's account")
                    .map_err(hide)?;
            }
            _ => {}
        }
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::PutProviderAccount(account.clone()))
            .await?
        {
            CommandResult::Done => Ok(put_reply(created, &ProviderView::from(&account))),
            other => Err(refused(other)),
        }
    }

    pub(super) async fn delete_provider(
        &self,
        customer: String,
        name: String,
    ) -> Result<warp::reply::Response, ApiError> {
        let p = self.provider(&customer, &name)?;
        self.writable()?;
        // Its owner sees the account gone and un-registers it.
        match self
            .cluster
            .replica
            .propose(Command::DeleteProviderAccount { id: p.id() })
            .await?
        {
            CommandResult::Done => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({"deleted": p.id()}),
            )),
            other => Err(refused(other)),
        }
    }

    /// The lease from the replicated state, and the registration as its owner reports it.
    pub(super) async fn provider_status(
        &self,
        customer: String,
        name: String,
    ) -> Result<warp::reply::Response, ApiError> {
        let p = self.provider(&customer, &name)?;
        let id = p.id();
        let now = crate::clock::now_ms();
        let lease = self
            .cluster
            .replica
            .reader()
            .provider_lease(&id)?
            .filter(|l| l.owner != 0);
        let live = lease.as_ref().filter(|l| l.expires_at_ms > now);
        let reported: Option<AccountStatus> = match live {
            Some(l) => self
                .cluster
                .ask_agent(l.owner, &format!("status {id}"))
                .await
                .and_then(|answer| serde_json::from_str(&answer).ok())
                .flatten(),
            None => None,
        };
        let state = match (&reported, live, p.enabled) {
            (Some(r), _, _) => r.state.clone(),
            (None, Some(_), _) => "owner not answering".into(),
            (None, None, false) => "disabled".into(),
            (None, None, true) => "unassigned".into(),
        };
        Ok(json_reply(
            StatusCode::OK,
            &serde_json::json!({
                "id": id,
                "enabled": p.enabled,
                "state": state,
                "owner": live.map(|l| l.owner),
                "lease": lease.map(|l| serde_json::json!({
                    "owner": l.owner,
                    "epoch": l.epoch,
                    "expires_in_ms": l.expires_at_ms as i64 - now as i64,
                    "releasing": l.releasing,
                })),
                "registration": reported,
            }),
        ))
    }
}
