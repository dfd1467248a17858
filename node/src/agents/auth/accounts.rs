//! SIP accounts as operators write them: validation of users, domains and passwords, and
//! the record that goes into Raft. A password never leaves the proposing node: it becomes
//! one HA1 per digest algorithm, realm = the account's domain, each sealed under the master
//! key before it is proposed (node/DESIGN.md, "Stateless nonces";
//! raft-store/DESIGN.md, "Secrets are sealed before the log").

use serde::{Deserialize, Serialize};
use tandem_raft_store::command::{account_record, ha1_field, Account};
use tandem_raft_store::crypto::KeyRing;

use crate::agents::auth::digest::{ha1, Algorithm};

/// Contacts per AOR when the operator does not say.
pub const DEFAULT_MAX_CONTACTS: u32 = 5;
/// Concurrent calls per account when the operator does not say; 0 means no limit (a
/// trunk, or a benchmark's single caller).
pub const DEFAULT_MAX_CALLS: u32 = 4;

/// What an operator sends to create or change an account. A field left out keeps its
/// current value (or, for a new account, its default); `password` and `customer` are
/// required for a new account.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountInput {
    pub password: Option<String>,
    pub customer: Option<String>,
    pub enabled: Option<bool>,
    pub max_contacts: Option<u32>,
    pub max_concurrent_calls: Option<u32>,
}

/// An account as the API shows it: everything but the sealed HA1s.
#[derive(Clone, Debug, Serialize)]
pub struct AccountView {
    pub user: String,
    pub domain: String,
    pub aor: String,
    pub customer: String,
    pub enabled: bool,
    pub max_contacts: u32,
    pub max_concurrent_calls: u32,
    pub algorithms: Vec<String>,
}

impl From<&Account> for AccountView {
    fn from(a: &Account) -> Self {
        AccountView {
            user: a.user.clone(),
            domain: a.domain.clone(),
            aor: aor(&a.user, &a.domain),
            customer: a.customer.clone(),
            enabled: a.enabled,
            max_contacts: a.max_contacts,
            max_concurrent_calls: a.max_concurrent_calls,
            algorithms: a.ha1.iter().map(|(alg, _)| alg.clone()).collect(),
        }
    }
}

pub use tandem_raft_store::command::account_aor as aor;

/// A SIP user part Tandem accepts for an account: letters, digits and `-_.+`, so that it
/// needs no escaping anywhere (URIs, digest, file names).
pub fn check_user(user: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&user.len())
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "user must be 1 to 64 letters, digits, '-', '_', '.' or '+', got {user:?}"
        ))
    }
}

/// A domain: a DNS name in lowercase (the realm of its accounts).
pub fn check_domain(domain: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() <= 253 && domain.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "domain must be a DNS name in lowercase (labels of letters, digits and '-'), got {domain:?}"
        ))
    }
}

fn check_password(p: &str) -> Result<(), String> {
    if (1..=128).contains(&p.chars().count()) && !p.chars().any(char::is_control) {
        Ok(())
    } else {
        Err("password must be 1 to 128 characters without control characters".into())
    }
}

/// Builds the record to propose: new HA1s sealed under the current key when a password
/// is given, else the existing account's.
pub fn build(
    keys: &KeyRing,
    user: &str,
    domain: &str,
    input: AccountInput,
    existing: Option<Account>,
) -> Result<Account, String> {
    check_user(user)?;
    check_domain(domain)?;
    let customer = input
        .customer
        .clone()
        .or_else(|| existing.as_ref().map(|a| a.customer.clone()))
        .ok_or("customer is required for a new account")?;
    let enabled = input
        .enabled
        .or(existing.as_ref().map(|a| a.enabled))
        .unwrap_or(true);
    let max_contacts = input
        .max_contacts
        .or(existing.as_ref().map(|a| a.max_contacts))
        .unwrap_or(DEFAULT_MAX_CONTACTS);
    let max_concurrent_calls = input
        .max_concurrent_calls
        .or(existing.as_ref().map(|a| a.max_concurrent_calls))
        .unwrap_or(DEFAULT_MAX_CALLS);
    if !(1..=100).contains(&max_contacts) {
        return Err("max_contacts must be 1 to 100".into());
    }
    if max_concurrent_calls > 1000 {
        return Err("max_concurrent_calls must be at most 1000 (0: no limit)".into());
    }
    let record = account_record(user, domain);
    let ha1s = match (&input.password, existing) {
        (Some(p), _) => {
            check_password(p)?;
            Algorithm::ALL
                .iter()
                .map(|alg| {
                    let value = ha1(*alg, user, domain, p);
                    let sealed = keys.seal(&record, &ha1_field(alg.name()), value.as_bytes());
                    (alg.name().to_owned(), sealed)
                })
                .collect()
        }
        (None, Some(a)) => a.ha1,
        (None, None) => return Err("password is required for a new account".into()),
    };
    Ok(Account {
        user: user.to_owned(),
        domain: domain.to_owned(),
        customer,
        ha1: ha1s,
        enabled,
        max_contacts,
        max_concurrent_calls,
    })
}

/// The account's HA1 (hex) for `algorithm`, unsealed.
pub fn open_ha1(keys: &KeyRing, account: &Account, algorithm: Algorithm) -> Option<String> {
    let (_, sealed) = account.ha1.iter().find(|(a, _)| a == algorithm.name())?;
    let bytes = keys
        .open(
            sealed,
            &account_record(&account.user, &account.domain),
            &ha1_field(algorithm.name()),
        )
        .ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(password: Option<&str>) -> AccountInput {
        AccountInput {
            password: password.map(str::to_owned),
            customer: Some("c1".into()),
            ..AccountInput::default()
        }
    }

    #[test]
    fn a_password_becomes_sealed_ha1s_that_open_to_the_digest_values() {
        let keys = KeyRing::generate();
        let a = build(&keys, "alice", "example.com", input(Some("s3cret")), None).unwrap();
        assert_eq!(a.ha1.len(), 2);
        for (_, sealed) in &a.ha1 {
            assert!(!sealed.ciphertext.windows(6).any(|w| w == b"s3cret"));
        }
        assert_eq!(
            open_ha1(&keys, &a, Algorithm::Md5).unwrap(),
            ha1(Algorithm::Md5, "alice", "example.com", "s3cret")
        );
        assert_eq!(
            open_ha1(&keys, &a, Algorithm::Sha256).unwrap(),
            ha1(Algorithm::Sha256, "alice", "example.com", "s3cret")
        );
        // An update without a password keeps the HA1s; fields left out keep their values.
        let disabled = AccountInput {
            enabled: Some(false),
            max_contacts: Some(9),
            ..AccountInput::default()
        };
        let b = build(&keys, "alice", "example.com", disabled, Some(a.clone())).unwrap();
        assert_eq!(
            (a.ha1.clone(), false, 9),
            (b.ha1.clone(), b.enabled, b.max_contacts)
        );
        let c = build(
            &keys,
            "alice",
            "example.com",
            AccountInput::default(),
            Some(b.clone()),
        );
        assert_eq!(c.unwrap(), b);
    }

    #[test]
    fn bad_input_is_named() {
        let keys = KeyRing::generate();
        let e = build(&keys, "al ice", "example.com", input(Some("x")), None).unwrap_err();
        assert!(e.contains("user"), "{e}");
        let e = build(&keys, "alice", "Example.com", input(Some("x")), None).unwrap_err();
        assert!(e.contains("domain"), "{e}");
        let e = build(&keys, "alice", "example.com", input(None), None).unwrap_err();
        assert!(e.contains("password is required"), "{e}");
        let e = build(&keys, "alice", "example.com", input(Some("a\nb")), None).unwrap_err();
        assert!(e.contains("password"), "{e}");
    }
}
