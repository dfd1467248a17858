//! `/v1/cdrs`: call detail records, a page at a time, as JSON or CSV. Every full node
//! holds every node's records once they have shipped (agents/cdr), so any node answers for
//! the whole cluster.

use std::collections::HashMap;

use warp::http::StatusCode;

use super::{check_id, json_reply, Admin, ApiError};
use crate::agents::cdr::store::{CdrStore, Query};
use crate::agents::cdr::CSV_HEADER;
use crate::hex;

/// Records in a page unless `limit` says otherwise, and the most it may say.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A time in a query: Unix milliseconds, or RFC 3339 (`2026-12-05T10:00:00Z`).
fn time_param(name: &str, v: &str) -> Result<u64, ApiError> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{name} is out of range: {v:?}")));
    }
    v.parse::<jiff::Timestamp>()
        .ok()
        .and_then(|t| u64::try_from(t.as_millisecond()).ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} must be Unix milliseconds or an RFC 3339 time like \
                 2026-12-05T10:00:00Z, got {v:?}"
            ))
        })
}

/// The query `/v1/cdrs` was given, checked; and whether CSV was asked for.
fn parse_query(q: &HashMap<String, String>) -> Result<(Query, bool), ApiError> {
    const KNOWN: [&str; 7] = [
        "customer", "account", "from", "to", "limit", "after", "format",
    ];
    if let Some(k) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter {k:?}; known: {}",
            KNOWN.join(", ")
        )));
    }
    let customer = q.get("customer").cloned();
    if let Some(c) = &customer {
        check_id("customer", c)?;
    }
    let account = q.get("account").cloned();
    if let Some(a) = &account {
        if a.split_once('@')
            .is_none_or(|(u, d)| u.is_empty() || d.is_empty())
        {
            return Err(ApiError::bad_request(format!(
                "account must be user@domain, got {a:?}"
            )));
        }
    }
    let from_ms = q
        .get("from")
        .map(|v| time_param("from", v))
        .transpose()?
        .unwrap_or(0);
    let to_ms = q
        .get("to")
        .map(|v| time_param("to", v))
        .transpose()?
        .unwrap_or(u64::MAX);
    if to_ms <= from_ms {
        return Err(ApiError::bad_request("to must be later than from"));
    }
    let limit = match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be 1 to {MAX_LIMIT}, got {l:?}"))
            })?,
    };
    let after = match q.get("after") {
        None => None,
        Some(a) => Some(
            hex::decode(a)
                .filter(|k| k.len() <= 256 && CdrStore::is_cursor(k))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "after must be the `next` of a previous page, got {a:?}"
                    ))
                })?,
        ),
    };
    if let (Some(a), Some(c)) = (&after, &customer) {
        if !CdrStore::cursor_of(a, c) {
            return Err(ApiError::bad_request(
                "after is the cursor of another customer's page",
            ));
        }
    }
    let csv = match q.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(f) => {
            return Err(ApiError::bad_request(format!(
                "format must be json or csv, got {f:?}"
            )))
        }
    };
    Ok((
        Query {
            customer,
            account,
            from_ms,
            to_ms,
            after,
            limit,
        },
        csv,
    ))
}

impl Admin {
    pub(super) async fn list_cdrs(
        &self,
        q: HashMap<String, String>,
    ) -> Result<warp::reply::Response, ApiError> {
        let (query, csv) = parse_query(&q)?;
        let Some((store, _)) = self.cdrs.clone() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "this node keeps no CDRs (a witness); ask a full node",
            ));
        };
        let page = tokio::task::spawn_blocking(move || store.query(&query))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        let next = page.next.as_deref().map(hex::encode);
        if csv {
            let mut text = String::with_capacity(64 + page.records.len() * 200);
            text.push_str(CSV_HEADER);
            text.push_str("\r\n");
            for r in &page.records {
                text.push_str(&r.csv());
                text.push_str("\r\n");
            }
            let mut builder = warp::http::Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/csv; charset=utf-8");
            if let Some(n) = &next {
                builder = builder.header("x-next-cursor", n.as_str());
            }
            return Ok(builder.body(text.into()).expect("static response parts"));
        }
        Ok(json_reply(
            StatusCode::OK,
            &serde_json::json!({"records": page.records, "next": next}),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn queries_are_checked_and_times_take_two_forms() {
        let (query, csv) = parse_query(&q(&[
            ("customer", "acme"),
            ("from", "2026-12-05T10:00:00Z"),
            ("to", "1796480000000"),
            ("format", "csv"),
        ]))
        .unwrap();
        assert!(csv);
        assert_eq!(query.from_ms, 1_796_464_800_000);
        assert_eq!(query.to_ms, 1_796_480_000_000);
        assert_eq!(query.limit, DEFAULT_LIMIT);
        for bad in [
            vec![("customer", "a b")],
            vec![("from", "yesterday")],
            vec![("from", "5"), ("to", "5")],
            vec![("limit", "0")],
            vec![("limit", "1001")],
            vec![("after", "zz")],
            vec![("after", "6f01")],
            vec![("format", "xml")],
            vec![("account", "nobody")],
            vec![("sort", "asc")],
        ] {
            let e = parse_query(&q(&bad)).expect_err("refused");
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }
}
