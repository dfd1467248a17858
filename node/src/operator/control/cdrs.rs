//! `tandem cdr …`: call detail records through the admin API, as a table or CSV, one page
//! or all of them; and a customer's retention.

use std::fmt::Write as _;
use std::io::Write as _;

use super::{call, call_with, ADMIN_TIMEOUT};
use crate::agents::cdr::store::CdrStore;
use crate::agents::cdr::{Cdr, CSV_HEADER};
use crate::config::Config;
use crate::operator::cli::CdrCommand;
use crate::Error;

/// A query parameter, percent-encoded (an RFC 3339 time carries `+` and `:`).
fn param(out: &mut String, name: &str, value: &str) {
    out.push(if out.contains('?') { '&' } else { '?' });
    out.push_str(name);
    out.push('=');
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn time(ms: Option<u64>) -> String {
    ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms as i64).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn row(c: &Cdr) -> String {
    format!(
        "{}  {:<3} {:<3} {:<24} {:<24} {:<16} {:>3} {:>6}s  {}\n",
        time(Some(c.start_ms)),
        c.leg,
        c.direction,
        c.account,
        c.to,
        c.outcome,
        c.code,
        c.duration_s,
        c.provider,
    )
}

pub async fn run(command: &CdrCommand, config: &Config) -> Result<String, Error> {
    match command {
        CdrCommand::List {
            customer,
            account,
            from,
            to,
            limit,
            after,
            all,
            csv,
            ..
        } => {
            let mut base = "/v1/cdrs".to_owned();
            for (name, value) in [
                ("customer", customer),
                ("account", account),
                ("from", from),
                ("to", to),
            ] {
                if let Some(v) = value {
                    param(&mut base, name, v);
                }
            }
            param(&mut base, "limit", &limit.to_string());
            let mut cursor = after.clone();
            let mut stdout = std::io::stdout().lock();
            let mut fetched = 0usize;
            let print = |out: &mut std::io::StdoutLock, text: &str| {
                out.write_all(text.as_bytes()).map_err(|source| Error::Io {
                    context: "writing to standard output".into(),
                    source,
                })
            };
            print(
                &mut stdout,
                &if *csv {
                    format!("{CSV_HEADER}\r\n")
                } else {
                    "start                leg dir account                  to                       outcome          code duration provider\n".into()
                },
            )?;
            loop {
                let mut path = base.clone();
                if let Some(c) = &cursor {
                    param(&mut path, "after", c);
                }
                let page = call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?;
                let records: Vec<Cdr> =
                    serde_json::from_value(page["records"].clone()).map_err(|e| {
                        Error::Admin(format!("the node sent records this CLI cannot read: {e}"))
                    })?;
                fetched += records.len();
                let mut text = String::new();
                for r in &records {
                    if *csv {
                        text.push_str(&r.csv());
                        text.push_str("\r\n");
                    } else {
                        text.push_str(&row(r));
                    }
                }
                print(&mut stdout, &text)?;
                cursor = page["next"].as_str().map(str::to_owned);
                match (&cursor, all) {
                    (None, _) => break,
                    (Some(_), true) => eprintln!("{fetched} records so far…"),
                    (Some(c), false) => {
                        eprintln!("More records follow: add --after {c} (or --all).");
                        break;
                    }
                }
            }
            if *all {
                eprintln!("{fetched} records.");
            }
            Ok(String::new())
        }
        CdrCommand::Seed {
            customer,
            count,
            age_days,
            ..
        } => seed(config, customer, *count, *age_days),
        CdrCommand::Retention { customer, days, .. } => {
            let path = format!("/v1/customers/{customer}/settings");
            let r = match days {
                Some(d) => {
                    let body = serde_json::json!({ "cdr_retention_days": d });
                    call_with(
                        config,
                        reqwest::Method::PUT,
                        &path,
                        Some(body),
                        ADMIN_TIMEOUT,
                    )
                    .await?
                }
                None => call(config, reqwest::Method::GET, &path, ADMIN_TIMEOUT).await?,
            };
            let own = if r["cdr_retention_days"].as_u64().unwrap_or(0) > 0 {
                ""
            } else {
                " (the nodes' default)"
            };
            Ok(format!(
                "Customer {customer}'s call records are kept {} days{own}.\n",
                r["cdr_retention_days_in_effect"].as_u64().unwrap_or(0)
            ))
        }
    }
}

/// Writes `count` synthetic records of `customer`, `age_days` old, into the stopped node's
/// CDR store, in fsynced groups, with progress on standard error.
fn seed(config: &Config, customer: &str, count: u64, age_days: u32) -> Result<String, Error> {
    const GROUP: u64 = 10_000;
    let dir = config.node.data_dir.join("cdr");
    let store = CdrStore::open(&dir, config.node.id).map_err(|e| {
        Error::Cdr(format!(
            "{e} (a running node holds its store: stop it first)"
        ))
    })?;
    let start = crate::clock::now_ms().saturating_sub(u64::from(age_days) * 86_400_000);
    let mut written = 0;
    while written < count {
        let n = GROUP.min(count - written);
        let mut records: Vec<Cdr> = (written..written + n)
            .map(|i| Cdr {
                call: format!("seed-{i}"),
                leg: "a".into(),
                direction: "in".into(),
                customer: customer.to_owned(),
                account: format!("seed@{customer}.invalid"),
                from: "sip:seed@seed.invalid".into(),
                to: "sip:0000@seed.invalid".into(),
                start_ms: start + i,
                end_ms: start + i + 1000,
                code: 200,
                reason: "OK".into(),
                outcome: "synthetic".into(),
                ..Cdr::default()
            })
            .collect();
        store.write_local(&mut records, false)?;
        written += n;
        if written % 100_000 == 0 || written == count {
            eprintln!("{written} of {count} records written…");
        }
    }
    eprintln!("compacting…");
    store.compact();
    Ok(format!(
        "Wrote {count} records of customer {customer}, {age_days} days old, into {}.\n",
        dir.display()
    ))
}
