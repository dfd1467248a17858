//! `/v1/customers/{id}/settings`: what a customer may change about how its calls are
//! handled: how long its call records are kept, how many calls through the app server it
//! may have at once, and the time zone of its dialplans. A PUT changes the fields it names
//! and keeps the others.

use bytes::Bytes;
use serde::Deserialize;
use tandem_raft_store::command::{Command, CommandResult, CustomerSettings};
use warp::http::StatusCode;

use super::{check_customer, check_id, json_reply, parse_json, refused, Admin, ApiError};

/// The longest retention a customer may have, in days (ten years).
const MAX_RETENTION_DAYS: u32 = 3650;
/// The highest call limit a customer may have.
const MAX_CALLS: u32 = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsInput {
    /// Days; 0: the node's `cdr.retention_days`.
    cdr_retention_days: Option<u32>,
    /// 0: no limit.
    max_calls: Option<u32>,
    /// An IANA name (`Europe/Berlin`); empty: UTC.
    time_zone: Option<String>,
}

impl Admin {
    fn settings_view(&self, s: &CustomerSettings) -> serde_json::Value {
        serde_json::json!({
            "customer": s.customer,
            "cdr_retention_days": s.cdr_retention_days,
            "cdr_retention_days_in_effect": if s.cdr_retention_days > 0 { s.cdr_retention_days } else { self.default_retention_days },
            "max_calls": s.max_calls,
            "time_zone": s.time_zone,
        })
    }

    pub(super) fn get_settings(&self, customer: &str) -> Result<warp::reply::Response, ApiError> {
        check_id("customer", customer)?;
        let reader = self.cluster.replica.reader();
        if reader.customer(customer)?.is_none() {
            return Err(ApiError::not_found(format!("no customer {customer:?}")));
        }
        let s = reader.customer_settings(customer)?;
        Ok(json_reply(StatusCode::OK, &self.settings_view(&s)))
    }

    pub(super) async fn put_settings(
        &self,
        customer: String,
        body: Bytes,
    ) -> Result<warp::reply::Response, ApiError> {
        check_id("customer", &customer)?;
        let input: SettingsInput = parse_json(&body)?;
        if let Some(d) = input.cdr_retention_days.filter(|d| *d > MAX_RETENTION_DAYS) {
            return Err(ApiError::bad_request(format!(
                "cdr_retention_days must be 0 (the node's default) to {MAX_RETENTION_DAYS}, got {d}"
            )));
        }
        if let Some(n) = input.max_calls.filter(|n| *n > MAX_CALLS) {
            return Err(ApiError::bad_request(format!(
                "max_calls must be 0 (no limit) to {MAX_CALLS}, got {n}"
            )));
        }
        if let Some(tz) = input.time_zone.as_deref().filter(|t| !t.is_empty()) {
            if tz.len() > 64 || jiff::tz::TimeZone::get(tz).is_err() {
                return Err(ApiError::bad_request(format!(
                    "time_zone must be an IANA time zone like Europe/Berlin (or empty for UTC), got {tz:?}"
                )));
            }
        }
        let reader = self.cluster.replica.reader();
        check_customer(reader, &customer)?;
        let mut s = reader.customer_settings(&customer)?;
        if let Some(d) = input.cdr_retention_days {
            s.cdr_retention_days = d;
        }
        if let Some(n) = input.max_calls {
            s.max_calls = n;
        }
        if let Some(tz) = input.time_zone {
            s.time_zone = tz;
        }
        self.writable()?;
        match self
            .cluster
            .replica
            .propose(Command::PutCustomerSettings(s.clone()))
            .await?
        {
            CommandResult::Done => Ok(json_reply(StatusCode::OK, &self.settings_view(&s))),
            other => Err(refused(other)),
        }
    }
}
