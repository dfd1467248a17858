//! Provider accounts as operators write them: validation of every field, and the record
//! that goes into Raft. The password is sealed by the node the operator's request reaches
//! and never enters the log in the clear (raft-store/DESIGN.md, "Secrets are sealed before
//! the log"); unlike an account's, it is kept whole, since the provider's realm and
//! algorithm are only known from its challenge.

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize};
use tandem_raft_store::command::{
    provider_record, InboundTarget, ProviderAccount, ProviderTransport, PROVIDER_PASSWORD_FIELD,
};
use tandem_raft_store::crypto::KeyRing;
use tandem_sip::{Host, Uri};

/// The registration interval asked for when the operator does not say.
pub const DEFAULT_EXPIRES_SECS: u32 = 600;
/// The shortest and longest interval an operator may ask for.
pub const EXPIRES_RANGE: std::ops::RangeInclusive<u32> = 60..=86_400;

/// What an operator sends to create or change a provider account. A field left out keeps
/// its current value (or, for a new account, its default); `null` clears an optional one.
/// `registrar`, `username` and `password` are required for a new account.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderInput {
    pub registrar: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub transport: Option<Option<ProviderTransport>>,
    pub username: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub auth_username: Option<Option<String>>,
    pub password: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub realm: Option<Option<String>>,
    pub expires_secs: Option<u32>,
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub outbound_proxy: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub contact_user: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub inbound: Option<Option<InboundTarget>>,
    #[serde(default, deserialize_with = "present")]
    pub ca_file: Option<Option<String>>,
}

/// A field that is present, even as `null`, is `Some`; an absent one is `None` (serde's
/// `default`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A provider account as the API shows it: everything but the sealed password.
#[derive(Clone, Debug, Serialize)]
pub struct ProviderView {
    pub id: String,
    pub customer: String,
    pub name: String,
    pub registrar: String,
    pub transport: Option<ProviderTransport>,
    pub username: String,
    pub auth_username: Option<String>,
    pub realm: Option<String>,
    pub expires_secs: u32,
    pub enabled: bool,
    pub outbound_proxy: Option<String>,
    pub contact_user: Option<String>,
    pub inbound: Option<InboundTarget>,
    pub ca_file: Option<String>,
    pub instance: String,
}

impl From<&ProviderAccount> for ProviderView {
    fn from(p: &ProviderAccount) -> Self {
        ProviderView {
            id: p.id(),
            customer: p.customer.clone(),
            name: p.name.clone(),
            registrar: p.registrar.clone(),
            transport: p.transport,
            username: p.username.clone(),
            auth_username: p.auth_username.clone(),
            realm: p.realm.clone(),
            expires_secs: p.expires_secs,
            enabled: p.enabled,
            outbound_proxy: p.outbound_proxy.clone(),
            contact_user: p.contact_user.clone(),
            inbound: p.inbound.clone(),
            ca_file: p.ca_file.clone(),
            instance: p.instance.clone(),
        }
    }
}

/// `host[:port]`: a DNS name, an IPv4 address or a bracketed IPv6 address, and an optional
/// port; nothing else (no user, no parameters), so it is exactly what RFC 3263 resolves.
pub fn check_host_port(what: &str, value: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{what} must be host[:port] (a DNS name or an IP address, and a port), got {value:?}"
        )
    };
    if value.is_empty()
        || value.len() > 255
        || value.contains(['@', ';', '?', '/', ' ', '<', '>', '"'])
    {
        return Err(bad());
    }
    let uri = Uri::parse(&format!("sip:{value}")).map_err(|_| bad())?;
    let sip = uri.as_sip().ok_or_else(bad)?;
    if sip.port == Some(0) {
        return Err(bad());
    }
    if let Host::Domain(name) = &sip.host {
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !name.trim_end_matches('.').split('.').all(label_ok) {
            return Err(bad());
        }
    }
    Ok(())
}

/// A SIP user part written without escapes: RFC 3261's unreserved and user-unreserved
/// characters.
fn check_sip_user(what: &str, value: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.!~*'()&=+$,;?/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} must be 1 to 128 letters, digits or -_.!~*'()&=+$,;?/, got {value:?}"
        ))
    }
}

/// Text that goes into a quoted digest parameter: printable, without `"` or `\`.
fn check_quoted(what: &str, value: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&value.len())
        && value
            .chars()
            .all(|c| !c.is_control() && c != '"' && c != '\\');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} must be 1 to 128 printable characters without '\"' or '\\', got {value:?}"
        ))
    }
}

fn check_password(p: &str) -> Result<(), String> {
    if (1..=256).contains(&p.chars().count()) && !p.chars().any(char::is_control) {
        Ok(())
    } else {
        Err("password must be 1 to 256 characters without control characters".into())
    }
}

fn check_ca_file(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("ca_file must be an absolute path, got {path:?}"));
    }
    let pem = std::fs::read(path)
        .map_err(|e| format!("ca_file {path:?} cannot be read on this node: {e}"))?;
    let mut reader = std::io::BufReader::new(&pem[..]);
    let certs: Vec<_> = rustls_pemfile::certs(&mut reader)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("ca_file {path:?} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("ca_file {path:?} holds no certificate"));
    }
    Ok(())
}

/// A fresh RFC 5626 instance id (a random UUID URN, RFC 4122 version 4).
fn new_instance() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::hex::encode(&b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Builds the record to propose from the operator's input and the existing record, with
/// the password sealed under the current key when one is given. Checks every field; the
/// caller checks what needs the replicated state (the customer and the inbound account).
pub fn build(
    keys: &KeyRing,
    customer: &str,
    name: &str,
    input: ProviderInput,
    existing: Option<ProviderAccount>,
) -> Result<ProviderAccount, String> {
    let old = existing.as_ref();
    let registrar = input
        .registrar
        .or_else(|| old.map(|p| p.registrar.clone()))
        .ok_or("registrar is required for a new provider account")?;
    check_host_port("registrar", &registrar)?;
    let username = input
        .username
        .or_else(|| old.map(|p| p.username.clone()))
        .ok_or("username is required for a new provider account")?;
    check_sip_user("username", &username)?;
    let pick = |new: Option<Option<String>>, old: Option<String>| match new {
        Some(v) => v.filter(|s| !s.is_empty()),
        None => old,
    };
    let auth_username = pick(
        input.auth_username,
        old.and_then(|p| p.auth_username.clone()),
    );
    if let Some(a) = &auth_username {
        check_quoted("auth_username", a)?;
    }
    let realm = pick(input.realm, old.and_then(|p| p.realm.clone()));
    if let Some(r) = &realm {
        check_quoted("realm", r)?;
    }
    let outbound_proxy = pick(
        input.outbound_proxy,
        old.and_then(|p| p.outbound_proxy.clone()),
    );
    if let Some(o) = &outbound_proxy {
        check_host_port("outbound_proxy", o)?;
    }
    let contact_user = pick(input.contact_user, old.and_then(|p| p.contact_user.clone()));
    if let Some(c) = &contact_user {
        check_sip_user("contact_user", c)?;
    }
    let ca_file = pick(input.ca_file, old.and_then(|p| p.ca_file.clone()));
    if let Some(f) = &ca_file {
        check_ca_file(f)?;
    }
    let transport = match input.transport {
        Some(t) => t,
        None => old.and_then(|p| p.transport),
    };
    let inbound = match input.inbound {
        Some(t) => t,
        None => old.and_then(|p| p.inbound.clone()),
    };
    if let Some(InboundTarget::Dialplan(_)) = inbound {
        return Err("inbound dialplans are not supported yet: name an account".into());
    }
    let expires_secs = input
        .expires_secs
        .or(old.map(|p| p.expires_secs))
        .unwrap_or(DEFAULT_EXPIRES_SECS);
    if !EXPIRES_RANGE.contains(&expires_secs) {
        return Err(format!(
            "expires_secs must be {} to {}, got {expires_secs}",
            EXPIRES_RANGE.start(),
            EXPIRES_RANGE.end()
        ));
    }
    let enabled = input.enabled.or(old.map(|p| p.enabled)).unwrap_or(true);
    let record = provider_record(&tandem_raft_store::command::provider_account_id(
        customer, name,
    ));
    let password = match (input.password, old) {
        (Some(p), _) => {
            check_password(&p)?;
            keys.seal(&record, PROVIDER_PASSWORD_FIELD, p.as_bytes())
        }
        (None, Some(o)) => o.password.clone(),
        (None, None) => return Err("password is required for a new provider account".into()),
    };
    Ok(ProviderAccount {
        customer: customer.to_owned(),
        name: name.to_owned(),
        registrar,
        transport,
        username,
        auth_username,
        password,
        realm,
        expires_secs,
        enabled,
        outbound_proxy,
        contact_user,
        inbound,
        ca_file,
        instance: old.map_or_else(new_instance, |p| p.instance.clone()),
    })
}

/// The provider account's password, unsealed.
pub fn open_password(keys: &KeyRing, p: &ProviderAccount) -> Result<String, String> {
    let bytes = keys
        .open(
            &p.password,
            &provider_record(&p.id()),
            PROVIDER_PASSWORD_FIELD,
        )
        .map_err(|e| format!("the password of {} does not open: {e}", p.id()))?;
    String::from_utf8(bytes).map_err(|_| format!("the password of {} is not UTF-8", p.id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> ProviderInput {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_new_account_needs_registrar_username_and_password_and_seals_the_password() {
        let keys = KeyRing::generate();
        let e = build(
            &keys,
            "c",
            "p",
            input(r#"{"username":"u","password":"x"}"#),
            None,
        );
        assert!(e.unwrap_err().contains("registrar is required"));
        let p = build(
            &keys,
            "c",
            "p",
            input(r#"{"registrar":"sip.example.net:5080","username":"4930","password":"s3cret!"}"#),
            None,
        )
        .unwrap();
        assert!(!p.password.ciphertext.windows(7).any(|w| w == b"s3cret!"));
        assert_eq!(open_password(&keys, &p).unwrap(), "s3cret!");
        assert_eq!((p.expires_secs, p.enabled), (DEFAULT_EXPIRES_SECS, true));
        assert!(p.instance.starts_with("urn:uuid:") && p.instance.len() == 45);

        // Fields left out keep their values, null clears, the instance never changes.
        let q = build(
            &keys,
            "c",
            "p",
            input(r#"{"realm":"example.net","transport":"tcp","enabled":false}"#),
            Some(p.clone()),
        )
        .unwrap();
        assert_eq!(q.realm.as_deref(), Some("example.net"));
        assert_eq!(q.transport, Some(ProviderTransport::Tcp));
        assert_eq!(
            (q.password.clone(), q.instance.clone()),
            (p.password.clone(), p.instance.clone())
        );
        let r = build(
            &keys,
            "c",
            "p",
            input(r#"{"realm":null,"transport":null}"#),
            Some(q),
        )
        .unwrap();
        assert_eq!((r.realm, r.transport, r.enabled), (None, None, false));
    }

    #[test]
    fn bad_fields_are_named() {
        let keys = KeyRing::generate();
        let base = r#""username":"u","password":"x""#;
        for (json, named) in [
            (format!(r#"{{"registrar":"a b",{base}}}"#), "registrar"),
            (format!(r#"{{"registrar":"u@host",{base}}}"#), "registrar"),
            (format!(r#"{{"registrar":"host:0",{base}}}"#), "registrar"),
            (
                format!(r#"{{"registrar":"host:99999",{base}}}"#),
                "registrar",
            ),
            (
                format!(r#"{{"registrar":"-bad-.example",{base}}}"#),
                "registrar",
            ),
            (
                format!(r#"{{"registrar":"h","outbound_proxy":"x;lr",{base}}}"#),
                "outbound_proxy",
            ),
            (
                r#"{"registrar":"h","username":"a b","password":"x"}"#.into(),
                "username",
            ),
            (
                r#"{"registrar":"h","username":"u","password":"a\nb"}"#.into(),
                "password",
            ),
            (
                format!(r#"{{"registrar":"h","realm":"a\"b",{base}}}"#),
                "realm",
            ),
            (
                format!(r#"{{"registrar":"h","expires_secs":5,{base}}}"#),
                "expires_secs",
            ),
            (
                format!(r#"{{"registrar":"h","ca_file":"rel.pem",{base}}}"#),
                "ca_file",
            ),
            (
                format!(r#"{{"registrar":"h","ca_file":"/nonexistent.pem",{base}}}"#),
                "ca_file",
            ),
            (
                format!(r#"{{"registrar":"h","inbound":{{"dialplan":"x"}},{base}}}"#),
                "dialplan",
            ),
        ] {
            let e = build(&keys, "c", "p", input(&json), None).unwrap_err();
            assert!(e.contains(named), "{json}: {e}");
        }
        for ok in [
            "127.0.0.1:5060",
            "[::1]:5070",
            "sip.example.net",
            "provider.example.",
        ] {
            check_host_port("registrar", ok).unwrap();
        }
        assert!(serde_json::from_str::<ProviderInput>(r#"{"transport":"sctp"}"#).is_err());
        assert!(serde_json::from_str::<ProviderInput>(r#"{"pasword":"x"}"#).is_err());
    }
}
