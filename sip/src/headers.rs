//! Typed values of the headers Tandem's agents interpret: Via, name-addr headers (From, To,
//! Contact, Route, Record-Route, Path), CSeq and the four digest authentication headers.
//! Each parses from one unfolded list element and writes itself back in canonical form.

use std::fmt;

use crate::name::Method;
use crate::text::{is_token_char, is_ws, skip_quoted, unquote, Cursor, Params};
use crate::uri::{parse_port, Host, Uri};
use crate::Error;

/// The magic cookie that marks an RFC 3261 branch (§8.1.1.7).
pub const BRANCH_COOKIE: &str = "z9hG4bK";

/// One Via value: `SIP/2.0/UDP host:port;params`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Via {
    /// Transport token as written, e.g. `UDP`, `TCP`, `TLS`.
    pub transport: String,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Params,
}

impl Via {
    pub fn parse(s: &str) -> Result<Via, Error> {
        let bad = |why| Error::Header {
            name: "Via",
            reason: why,
        };
        let mut c = Cursor::new(s);
        let protocol = c
            .token("missing protocol")
            .map_err(|_| bad("missing protocol name"))?;
        if !c.sep(b'/') {
            return Err(bad("expected '/' after protocol name"));
        }
        let version = c
            .token("missing version")
            .map_err(|_| bad("missing protocol version"))?;
        if !c.sep(b'/') {
            return Err(bad("expected '/' after protocol version"));
        }
        let transport = c
            .token("missing transport")
            .map_err(|_| bad("missing transport"))?;
        if !protocol.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return Err(bad("protocol is not SIP/2.0"));
        }
        if !c.ws() {
            return Err(bad("expected whitespace before sent-by"));
        }
        let host = if c.peek() == Some(b'[') {
            let end = c
                .rest()
                .find(']')
                .ok_or(bad("unterminated IPv6 reference"))?;
            let h = &c.rest()[..=end];
            c.pos += end + 1;
            h
        } else {
            c.take_while(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        let host = Host::parse(host).map_err(|_| bad("bad sent-by host"))?;
        let port = if c.sep(b':') {
            let p = c.take_while(|b| b.is_ascii_digit());
            Some(parse_port(p).map_err(|_| bad("bad sent-by port"))?)
        } else {
            None
        };
        let params = Params::parse_header_params(&mut c).map_err(|_| bad("bad parameters"))?;
        Ok(Via {
            transport: transport.to_ascii_uppercase(),
            host,
            port,
            params,
        })
    }

    pub fn branch(&self) -> Option<&str> {
        self.params.value("branch")
    }

    pub fn received(&self) -> Option<&str> {
        self.params.value("received")
    }

    /// `None`: no rport; `Some(None)`: rport requested (RFC 3581); `Some(Some(p))`: filled in.
    pub fn rport(&self) -> Option<Option<u16>> {
        self.params
            .get("rport")
            .map(|v| v.and_then(|p| p.parse().ok()))
    }

    /// Whether the branch carries the RFC 3261 magic cookie.
    pub fn is_rfc3261_branch(&self) -> bool {
        self.branch().is_some_and(|b| b.starts_with(BRANCH_COOKIE))
    }
}

impl Via {
    /// Writes the Via as on the wire, with `write_str` only (no `core::fmt` formatting):
    /// the transport stamps `received`/`rport` into the top Via of most requests.
    pub fn write_to<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        out.write_str("SIP/2.0/")?;
        out.write_str(&self.transport)?;
        out.write_str(" ")?;
        self.host.write_to(out)?;
        if let Some(p) = self.port {
            out.write_str(":")?;
            out.write_str(crate::addr::decimal(p.into()).as_str())?;
        }
        self.params.write_to(out)
    }

    /// The Via as [`Via::write_to`] writes it.
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(64);
        let _ = self.write_to(&mut out);
        out
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

/// A `name-addr` or `addr-spec` with header parameters: From, To, Contact, Route,
/// Record-Route, Path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameAddr {
    /// Display name, unquoted.
    pub display: Option<String>,
    pub uri: Uri,
    pub params: Params,
}

impl NameAddr {
    pub fn new(uri: Uri) -> Self {
        NameAddr {
            display: None,
            uri,
            params: Params::new(),
        }
    }

    pub fn parse(s: &str, header: &'static str) -> Result<NameAddr, Error> {
        let bad = |why| Error::Header {
            name: header,
            reason: why,
        };
        let bytes = s.as_bytes();
        let (display, uri_text, after) = if bytes.first() == Some(&b'"') {
            let end = skip_quoted(bytes, 0).map_err(|_| bad("unterminated quoted display name"))?;
            let display = unquote(&s[..end]);
            let rest = s[end..].trim_start_matches([' ', '\t']);
            let inner = rest
                .strip_prefix('<')
                .ok_or(bad("display name without <URI>"))?;
            let close = inner.find('>').ok_or(bad("missing '>'"))?;
            (Some(display), &inner[..close], &inner[close + 1..])
        } else if let Some(open) = s.find('<') {
            let name = s[..open].trim_matches([' ', '\t']);
            if !name.bytes().all(|b| is_token_char(b) || is_ws(b)) {
                return Err(bad("display name has characters that need quoting"));
            }
            let close = s[open..].find('>').ok_or(bad("missing '>'"))? + open;
            let display = (!name.is_empty()).then(|| name.to_owned());
            (display, &s[open + 1..close], &s[close + 1..])
        } else {
            // addr-spec: the URI ends where the header parameters begin, and must not hold
            // the characters that would need brackets (RFC 3261 §20.10).
            let end = s.find(';').unwrap_or(s.len());
            let uri = s[..end].trim_end_matches([' ', '\t']);
            if uri.contains(['?', ',']) {
                return Err(bad("a URI with '?' or ',' must be enclosed in <>"));
            }
            (None, uri, &s[end..])
        };
        let uri = Uri::parse(uri_text).map_err(|e| match e {
            Error::Uri(why) => bad(why),
            other => other,
        })?;
        let params = Params::parse_header_params(&mut Cursor::new(after))
            .map_err(|_| bad("bad parameters"))?;
        Ok(NameAddr {
            display,
            uri,
            params,
        })
    }

    pub fn tag(&self) -> Option<&str> {
        self.params.value("tag")
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            f.write_str("\"")?;
            for c in d.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\" ")?;
        }
        write!(f, "<{}>{}", self.uri, self.params)
    }
}

/// The Contact header: either `*` (remove all bindings) or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Contacts {
    Star,
    List(Vec<NameAddr>),
}

/// `CSeq: 4711 INVITE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    pub fn parse(s: &str) -> Result<CSeq, Error> {
        let bad = |why| Error::Header {
            name: "CSeq",
            reason: why,
        };
        let (num, method) = s
            .split_once([' ', '\t'])
            .ok_or(bad("expected number and method"))?;
        let method = method.trim_start_matches([' ', '\t']);
        if num.is_empty() || num.len() > 10 || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("sequence number is not a 32-bit number"));
        }
        let seq: u64 = num.parse().map_err(|_| bad("bad sequence number"))?;
        // RFC 3261 §8.1.1.5: the sequence number MUST be less than 2**31.
        if seq >= 1 << 31 {
            return Err(bad("sequence number is not below 2^31"));
        }
        let method = Method::parse(method).ok_or(bad("bad method"))?;
        Ok(CSeq {
            seq: seq as u32,
            method,
        })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

/// A challenge (`WWW-Authenticate`, `Proxy-Authenticate`) or credentials
/// (`Authorization`, `Proxy-Authorization`): a scheme and comma-separated `name=value`
/// parameters. Quoted values are stored unquoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHeader {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl AuthHeader {
    pub fn parse(s: &str, header: &'static str) -> Result<AuthHeader, Error> {
        let bad = |why| Error::Header {
            name: header,
            reason: why,
        };
        let mut c = Cursor::new(s);
        let scheme = c
            .token("missing scheme")
            .map_err(|_| bad("missing scheme"))?
            .to_owned();
        let mut params = Vec::new();
        c.ws();
        while !c.at_end() {
            let name = c
                .token("param")
                .map_err(|_| bad("bad parameter name"))?
                .to_owned();
            if !c.sep(b'=') {
                return Err(bad("parameter without '='"));
            }
            let value = if c.peek() == Some(b'"') {
                let start = c.pos;
                c.pos = skip_quoted(s.as_bytes(), start)
                    .map_err(|_| bad("unterminated quoted value"))?;
                unquote(&s[start..c.pos])
            } else {
                let v =
                    c.take_while(|b| is_token_char(b) || matches!(b, b'/' | b':' | b'=' | b'@'));
                v.to_owned()
            };
            params.push((name, value));
            if !c.at_end() && !c.sep(b',') {
                return Err(bad("expected ',' between parameters"));
            }
        }
        Ok(AuthHeader { scheme, params })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for AuthHeader {
    /// Writes every parameter quoted except the ones RFC 7616 says are tokens, and those
    /// only while their value is a token: anything else is quoted, so what a proxy passes
    /// on parses to what it received.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme)?;
        for (i, (n, v)) in self.params.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            let token = ["algorithm", "nc", "stale", "qop"]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(n))
                && !v.is_empty()
                && v.bytes().all(is_token_char);
            if token {
                write!(f, "{sep}{n}={v}")?;
            } else {
                write!(
                    f,
                    "{sep}{n}=\"{}\"",
                    v.replace('\\', "\\\\").replace('"', "\\\"")
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_with_whitespace_everywhere() {
        let v = Via::parse("SIP  /   2.0 /UDP 192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.branch(), Some("390skdjuw"));
        let v =
            Via::parse("SIP  / 2.0  / TCP     spindle.example.com   ; branch  =   z9hG4bK9ikj8")
                .unwrap();
        assert_eq!(v.host, Host::Domain("spindle.example.com".into()));
        assert!(v.is_rfc3261_branch());
        let v = Via::parse("SIP/2.0/TLS [2001:db8::9]:5061;rport;received=192.0.2.1").unwrap();
        assert_eq!(v.port, Some(5061));
        assert_eq!(v.rport(), Some(None));
        assert_eq!(
            v.to_string(),
            "SIP/2.0/TLS [2001:db8::9]:5061;rport;received=192.0.2.1"
        );
        assert!(Via::parse("SIP/2.0/UDP 192.0.2.15;;").is_err());
        assert!(Via::parse("SIP/3.0/UDP host").is_err());
        assert!(Via::parse("SIP/2.0/UDP").is_err());
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(
            r#""J Rosenberg \\\"" <sip:jdrosen@example.com> ;  tag = 98asjd8"#,
            "From",
        )
        .unwrap();
        assert_eq!(n.display.as_deref(), Some(r#"J Rosenberg \""#));
        assert_eq!(n.tag(), Some("98asjd8"));
        let n = NameAddr::parse("caller<sip:caller@example.com>;tag=323", "From").unwrap();
        assert_eq!(n.display.as_deref(), Some("caller"));
        let n = NameAddr::parse("sip:user@example.com;tag=abc", "To").unwrap();
        assert_eq!(n.uri.to_string(), "sip:user@example.com");
        assert_eq!(n.tag(), Some("abc"));
        assert!(NameAddr::parse(r#""Mr. J. User <sip:j.user@example.com>"#, "From").is_err());
        assert!(NameAddr::parse("< sip:t.watson@ieee.org >", "To").is_err());
        assert!(NameAddr::parse("sip:user@example.com?Route=%3Csip:x%3E", "Contact").is_err());
        assert!(NameAddr::parse("Bell, Alexander <sip:a@b>", "From").is_err());
    }

    #[test]
    fn cseq_bounds() {
        assert_eq!(
            CSeq::parse("0009 INVITE").unwrap(),
            CSeq {
                seq: 9,
                method: Method::Invite
            }
        );
        assert!(CSeq::parse("36893488147419103232 REGISTER").is_err());
        assert!(CSeq::parse("2147483648 INVITE").is_err());
        assert!(CSeq::parse("-1 INVITE").is_err());
        assert!(CSeq::parse("1").is_err());
    }

    #[test]
    fn a_digest_header_written_back_parses_to_what_was_read() {
        // Found by the fuzzer: a token-type parameter whose value is not a token (here
        // qop, quoted, with control characters) was written unquoted and no longer parsed.
        for text in [
            "Digest realm=\"example.com\", qop=\"\u{2}\0th\", stale=true",
            "Digest realm=\"a\\\"b\", algorithm=\"MD5, SHA-256\", nc=\"\"",
        ] {
            let h = AuthHeader::parse(text, "Authorization").unwrap();
            let again = AuthHeader::parse(&h.to_string(), "Authorization").unwrap();
            assert_eq!(again.params, h.params, "{text:?} -> {h}");
        }
    }

    #[test]
    fn digest_credentials() {
        let a = AuthHeader::parse(
            r#"Digest username="alice", realm="example.com", nonce="abc,def", uri="sip:example.com", response="0123", algorithm=SHA-256, qop=auth, nc=00000001, cnonce="xyz""#,
            "Authorization",
        )
        .unwrap();
        assert_eq!(a.scheme, "Digest");
        assert_eq!(a.param("nonce"), Some("abc,def"));
        assert_eq!(a.param("ALGORITHM"), Some("SHA-256"));
        assert_eq!(a.param("nc"), Some("00000001"));
        let again = AuthHeader::parse(&a.to_string(), "Authorization").unwrap();
        assert_eq!(again, a);
        let c = AuthHeader::parse(
            r#"Digest realm="x", qop="auth,auth-int", nonce="n""#,
            "WWW-Authenticate",
        )
        .unwrap();
        assert_eq!(c.param("qop"), Some("auth,auth-int"));
        assert!(AuthHeader::parse("Digest realm", "Authorization").is_err());
    }
}
