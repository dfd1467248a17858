//! `/v1/numbers`: customers' telephone numbers (DIDs). A call from one of the customer's
//! providers whose Request-URI or To names the number rings the account it maps to
//! (agents/mod.rs, `ProviderInbound`). A number belongs to one customer at a time.

use bytes::Bytes;
use serde::Deserialize;
use tandem_raft_store::command::{Command, CommandResult, Number};
use warp::http::StatusCode;

use super::{
    check_customer, check_customer_account, check_id, json_reply, parse_json, put_reply, refused,
    Admin, ApiError, Scope,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NumberInput {
    customer: String,
    /// `user@domain`.
    account: String,
}

/// The digits of a number as the API takes it: an optional `+`, then 3 to 20 digits.
fn digits(number: &str) -> Result<String, ApiError> {
    let d = number.strip_prefix('+').unwrap_or(number);
    if (3..=20).contains(&d.len()) && d.bytes().all(|c| c.is_ascii_digit()) {
        Ok(d.to_owned())
    } else {
        Err(ApiError::bad_request(format!(
            "a number is an optional '+' and 3 to 20 digits, got {number:?}"
        )))
    }
}

fn view(n: &Number) -> serde_json::Value {
    serde_json::json!({"number": format!("+{}", n.number), "customer": n.customer, "account": n.account})
}

impl Admin {
    /// Removes the numbers that ring `user@domain` and its dialplans: for an account about
    /// to be deleted.
    pub(super) async fn forget_account_routes(
        &self,
        domain: &str,
        user: &str,
    ) -> Result<(), ApiError> {
        let account = format!("{user}@{domain}");
        let reader = self.cluster.replica.reader();
        let numbers: Vec<String> = reader
            .numbers()?
            .into_iter()
            .filter(|n| n.account == account)
            .map(|n| n.number)
            .collect();
        for number in numbers {
            match self
                .cluster
                .replica
                .propose(Command::DeleteNumber { number })
                .await?
            {
                CommandResult::Done => {}
                other => return Err(refused(other)),
            }
        }
        let owners = [
            account.clone(),
            tandem_raft_store::command::incoming_dialplan_owner(user, domain),
        ];
        for d in owners
            .iter()
            .filter_map(|o| reader.dialplan(o).transpose())
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|d| !d.script.is_empty())
        {
            let cleared = tandem_raft_store::command::Dialplan {
                owner: d.owner,
                script: String::new(),
                version: d.version + 1,
            };
            match self
                .cluster
                .replica
                .propose(Command::PutDialplan(cleared))
                .await?
            {
                CommandResult::Done => {}
                other => return Err(refused(other)),
            }
        }
        Ok(())
    }

    /// One number, if `scope` may see its customer's records.
    pub(super) fn get_number(
        &self,
        scope: &Scope,
        number: &str,
    ) -> Result<warp::reply::Response, ApiError> {
        let d = digits(number)?;
        match self.cluster.replica.reader().number(&d)? {
            Some(n) if scope.sees(&n.customer) => Ok(json_reply(StatusCode::OK, &view(&n))),
            _ => Err(ApiError::not_found(format!("no number +{d}"))),
        }
    }

    pub(super) fn list_numbers(
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
            .numbers()?
            .iter()
            .filter(|n| customer.as_ref().is_none_or(|c| *c == n.customer))
            .map(view)
            .collect();
        Ok(json_reply(StatusCode::OK, &list))
    }

    pub(super) async fn put_number(
        &self,
        number: String,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        let d = digits(&number)?;
        let input: NumberInput = parse_json(&body)?;
        check_id("customer", &input.customer)?;
        let reader = self.cluster.replica.reader();
        check_customer(reader, &input.customer)?;
        check_customer_account(reader, &input.customer, &input.account, "account")?;
        let existing = reader.number(&d)?;
        if let Some(n) = &existing {
            if n.customer != input.customer {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "+{d} belongs to customer {}; delete it there first",
                        n.customer
                    ),
                ));
            }
        }
        let n = Number {
            number: d,
            customer: input.customer,
            account: input.account,
        };
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::PutNumber(n.clone()))
            .await?
        {
            CommandResult::Done => Ok(put_reply(existing.is_none(), &view(&n))),
            other => Err(refused(other)),
        }
    }

    pub(super) async fn delete_number(
        &self,
        number: String,
    ) -> Result<warp::reply::Response, ApiError> {
        let d = digits(&number)?;
        if self.cluster.replica.reader().number(&d)?.is_none() {
            return Err(ApiError::not_found(format!("no number +{d}")));
        }
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::DeleteNumber { number: d.clone() })
            .await?
        {
            CommandResult::Done => Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({"deleted": format!("+{d}")}),
            )),
            other => Err(refused(other)),
        }
    }
}
