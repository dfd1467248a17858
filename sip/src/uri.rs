//! URIs as SIP uses them (RFC 3261 §19.1, §25.1; RFC 3966 for `tel:`): `sip:` and `sips:`
//! with user info, IPv4/IPv6/domain hosts, parameters and headers; `tel:`; and any other
//! absolute URI kept opaque so that a request for an unknown scheme can be answered with 416.
//! User parts and parameters keep their `%HH` escapes as written; `unescape` reads them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::text::{check_escaped, is_token_char, Params};
use crate::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    Sip(SipUri),
    Tel(TelUri),
    /// Any other scheme, e.g. `urn:` or `isbn:`: kept as written.
    Other {
        scheme: String,
        rest: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SipUri {
    /// `sips:` rather than `sip:`.
    pub secure: bool,
    /// The user part, escapes kept as written.
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Params,
    /// `?name=value&...`, as written.
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelUri {
    pub number: String,
    pub params: Params,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Domain(String),
    Ip(IpAddr),
}

impl Host {
    pub fn parse(s: &str) -> Result<Self, Error> {
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or(Error::Uri("unterminated IPv6 reference"))?;
            let ip: Ipv6Addr = inner.parse().map_err(|_| Error::Uri("bad IPv6 address"))?;
            return Ok(Host::Ip(IpAddr::V6(ip)));
        }
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(ip)));
        }
        let valid = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.']);
        if valid {
            Ok(Host::Domain(s.to_owned()))
        } else {
            Err(Error::Uri("bad host"))
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Domain(_) => None,
        }
    }

    /// The host as served domains and accounts are keyed: a domain in lowercase without a
    /// trailing dot (RFC 3261 §19.1.4 compares hosts case-insensitively, and
    /// `example.com.` is the fully qualified spelling of `example.com`); an address as
    /// written.
    pub fn canonical(&self) -> String {
        match self {
            Host::Domain(d) => canonical_domain(d),
            Host::Ip(_) => self.to_string(),
        }
    }

    /// Writes the host as in a URI or Via; an IPv4 address without `core::fmt`.
    pub fn write_to<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        match self {
            Host::Domain(d) => out.write_str(d),
            Host::Ip(IpAddr::V4(ip)) => out.write_str(crate::addr::ipv4(*ip).as_str()),
            Host::Ip(IpAddr::V6(ip)) => write!(out, "[{ip}]"),
        }
    }
}

/// A domain name (or a realm naming one) as [`Host::canonical`] writes it.
pub fn canonical_domain(domain: &str) -> String {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    d.to_ascii_lowercase()
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

fn is_user_char(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'&' | b'=' | b'+' | b'$' | b',' | b';' | b'?' | b'/')
}

fn is_password_char(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'&' | b'=' | b'+' | b'$' | b',')
}

fn is_param_char(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'[' | b']' | b'/' | b':' | b'&' | b'+' | b'$')
}

fn is_header_char(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'[' | b']' | b'/' | b'?' | b':' | b'+' | b'$')
}

/// Splits `host[:port]`, where host may be an IPv6 reference.
pub(crate) fn split_host_port(s: &str) -> Result<(Host, Option<u16>), Error> {
    let (host, port) = if s.starts_with('[') {
        let close = s
            .find(']')
            .ok_or(Error::Uri("unterminated IPv6 reference"))?;
        let (h, rest) = s.split_at(close + 1);
        match rest.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if rest.is_empty() => (h, None),
            None => return Err(Error::Uri("junk after IPv6 reference")),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => Some(parse_port(p)?),
        None => None,
    };
    Ok((Host::parse(host)?, port))
}

pub(crate) fn parse_port(p: &str) -> Result<u16, Error> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Uri("bad port"));
    }
    p.parse().map_err(|_| Error::Uri("port out of range"))
}

impl Uri {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let (scheme, rest) = s.split_once(':').ok_or(Error::Uri("missing scheme"))?;
        let scheme_ok = scheme
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphabetic)
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        if !scheme_ok {
            return Err(Error::Uri("bad scheme"));
        }
        if rest.is_empty()
            || rest
                .bytes()
                .any(|b| b <= b' ' || b == 0x7f || b == b'<' || b == b'>' || b == b'"')
        {
            return Err(Error::Uri("empty, or contains whitespace or delimiters"));
        }
        if scheme.eq_ignore_ascii_case("sip") {
            SipUri::parse_rest(false, rest).map(Uri::Sip)
        } else if scheme.eq_ignore_ascii_case("sips") {
            SipUri::parse_rest(true, rest).map(Uri::Sip)
        } else if scheme.eq_ignore_ascii_case("tel") {
            TelUri::parse_rest(rest).map(Uri::Tel)
        } else {
            Ok(Uri::Other {
                scheme: scheme.to_owned(),
                rest: rest.to_owned(),
            })
        }
    }

    pub fn as_sip(&self) -> Option<&SipUri> {
        match self {
            Uri::Sip(u) => Some(u),
            _ => None,
        }
    }

    pub fn scheme(&self) -> &str {
        match self {
            Uri::Sip(u) if u.secure => "sips",
            Uri::Sip(_) => "sip",
            Uri::Tel(_) => "tel",
            Uri::Other { scheme, .. } => scheme,
        }
    }
}

impl SipUri {
    fn parse_rest(secure: bool, rest: &str) -> Result<Self, Error> {
        // The user part may hold ';' and '?', but never an unescaped '@', and nothing after
        // the host may hold '@' either: so the first '@' ends the user info.
        let (userinfo, hostpart) = match rest.split_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pw) = match u.split_once(':') {
                    Some((user, pw)) => (user, Some(pw)),
                    None => (u, None),
                };
                if user.is_empty() || !check_escaped(user, is_user_char) {
                    return Err(Error::Uri("bad user part"));
                }
                if let Some(pw) = pw {
                    if !check_escaped(pw, is_password_char) {
                        return Err(Error::Uri("bad password"));
                    }
                }
                (Some(user.to_owned()), pw.map(str::to_owned))
            }
        };
        let (before_headers, headers_text) = match hostpart.split_once('?') {
            Some((a, h)) => (a, Some(h)),
            None => (hostpart, None),
        };
        let mut pieces = before_headers.split(';');
        let hostport = pieces.next().unwrap_or_default();
        let (host, port) = split_host_port(hostport)?;
        let mut params = Params::new();
        for p in pieces {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (p, None),
            };
            if name.is_empty() || !check_escaped(name, is_param_char) {
                return Err(Error::Uri("bad URI parameter name"));
            }
            if let Some(v) = value {
                if v.is_empty() || !check_escaped(v, is_param_char) {
                    return Err(Error::Uri("bad URI parameter value"));
                }
            }
            params.push_raw(name.to_owned(), value.map(str::to_owned));
        }
        let mut headers = Vec::new();
        if let Some(h) = headers_text {
            for pair in h.split('&') {
                let (n, v) = pair
                    .split_once('=')
                    .ok_or(Error::Uri("URI header without '='"))?;
                if n.is_empty()
                    || !check_escaped(n, is_header_char)
                    || !check_escaped(v, is_header_char)
                {
                    return Err(Error::Uri("bad URI header"));
                }
                headers.push((n.to_owned(), v.to_owned()));
            }
        }
        Ok(SipUri {
            secure,
            user,
            password,
            host,
            port,
            params,
            headers,
        })
    }

    /// A plain `sip:user@host` URI.
    pub fn new(user: Option<&str>, host: Host, port: Option<u16>) -> Self {
        SipUri {
            secure: false,
            user: user.map(str::to_owned),
            password: None,
            host,
            port,
            params: Params::new(),
            headers: Vec::new(),
        }
    }

    pub fn user_unescaped(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.user.as_deref().map(crate::text::unescape)
    }

    /// The transport the URI asks for, upper-cased, defaulting per RFC 3263 to TLS for
    /// `sips:` and otherwise to none (the caller picks).
    pub fn transport_param(&self) -> Option<&str> {
        self.params.value("transport")
    }
}

impl TelUri {
    fn parse_rest(rest: &str) -> Result<Self, Error> {
        let mut pieces = rest.split(';');
        let number = pieces.next().unwrap_or_default();
        let valid = !number.is_empty()
            && number.bytes().all(|b| {
                b.is_ascii_hexdigit()
                    || matches!(
                        b,
                        b'+' | b'-' | b'.' | b'(' | b')' | b'*' | b'#' | b'p' | b'w'
                    )
            });
        if !valid {
            return Err(Error::Uri("bad telephone number"));
        }
        let mut params = Params::new();
        for p in pieces {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (p, None),
            };
            if name.is_empty() || !name.bytes().all(is_token_char) {
                return Err(Error::Uri("bad tel parameter"));
            }
            params.push_raw(name.to_owned(), value.map(str::to_owned));
        }
        Ok(TelUri {
            number: number.to_owned(),
            params,
        })
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Sip(u) => u.fmt(f),
            Uri::Tel(t) => write!(f, "tel:{}{}", t.number, t.params),
            Uri::Other { scheme, rest } => write!(f, "{scheme}:{rest}"),
        }
    }
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(user) = &self.user {
            f.write_str(user)?;
            if let Some(pw) = &self.password {
                write!(f, ":{pw}")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        write!(f, "{}", self.params)?;
        for (i, (n, v)) in self.headers.iter().enumerate() {
            write!(f, "{}{n}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sip(s: &str) -> SipUri {
        match Uri::parse(s).unwrap() {
            Uri::Sip(u) => u,
            other => panic!("not a sip uri: {other:?}"),
        }
    }

    #[test]
    fn parses_user_host_port_params_headers() {
        let u =
            sip("sip:alice:secret@example.com:5070;transport=tcp;lr?Subject=hi&Priority=urgent");
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.host, Host::Domain("example.com".into()));
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.transport_param(), Some("tcp"));
        assert!(u.params.contains("lr"));
        assert_eq!(u.headers.len(), 2);
        assert_eq!(
            u.to_string(),
            "sip:alice:secret@example.com:5070;transport=tcp;lr?Subject=hi&Priority=urgent"
        );
    }

    #[test]
    fn hosts_compare_by_their_canonical_form() {
        for spelling in ["example.com", "EXAMPLE.COM", "Example.Com.", "example.com."] {
            assert_eq!(
                sip(&format!("sip:a@{spelling}")).host.canonical(),
                "example.com"
            );
        }
        assert_eq!(sip("sip:a@127.0.0.1:5060").host.canonical(), "127.0.0.1");
        assert_eq!(sip("sip:a@[::1]").host.canonical(), "[::1]");
        assert_eq!(canonical_domain("Realm.Example."), "realm.example");
    }

    #[test]
    fn ipv6_and_ipv4_hosts() {
        let u = sip("sips:[2001:db8::10]:5061");
        assert!(u.secure);
        assert_eq!(u.host, Host::Ip("2001:db8::10".parse().unwrap()));
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.to_string(), "sips:[2001:db8::10]:5061");
        assert_eq!(
            sip("sip:1.2.3.4").host,
            Host::Ip("1.2.3.4".parse().unwrap())
        );
        assert!(Uri::parse("sip:[2001:db8::10").is_err());
        assert!(Uri::parse("sip:host:99999").is_err());
    }

    #[test]
    fn escaped_and_unusual_user_parts() {
        let u = sip("sip:user;par=u%40example.net@example.com");
        assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
        assert_eq!(u.user_unescaped().unwrap(), "user;par=u@example.net");
        let u = sip("sip:%61lice@example.com");
        assert_eq!(u.user_unescaped().unwrap(), "alice");
        assert!(Uri::parse("sip:a%4@example.com").is_err());
    }

    #[test]
    fn tel_and_other_schemes() {
        match Uri::parse("tel:+1-201-555-0123;phone-context=example.com").unwrap() {
            Uri::Tel(t) => {
                assert_eq!(t.number, "+1-201-555-0123");
                assert_eq!(t.params.value("phone-context"), Some("example.com"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Uri::parse("urn:service:sos").unwrap(),
            Uri::Other { .. }
        ));
        assert!(Uri::parse("<sip:user@example.com>").is_err());
        assert!(Uri::parse("sip:user@example.com ").is_err());
        assert!(Uri::parse("nocolon").is_err());
    }
}
