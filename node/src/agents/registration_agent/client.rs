//! The REGISTER client of one provider account, sans-IO: it builds each REGISTER, reads
//! each response and says what to do next; the agent (`mod.rs`) sends, resolves and keeps
//! time. Tested here without sockets or clocks.
//!
//! - Digest (RFC 3261 §22, RFC 7616/8760): MD5, SHA-256 and their `-sess` forms, with
//!   `qop=auth` when offered; 401 and 407 alike. A challenge is answered once: the same
//!   challenge again, unless `stale=true`, means the credentials are wrong.
//! - 423 raises the interval to Min-Expires and asks again.
//! - Every failure has a class, and each class its own exponential backoff with jitter
//!   ([`RetryPolicy`]). None disables the account: a DNS failure, a timeout or a failed
//!   connection is always retried, and wrong credentials are retried too, only rarely.
//! - The Contact carries the account's `+sip.instance` and `reg-id=1` (RFC 5626), so at a
//!   registrar that supports it a new owner's contact replaces the old owner's.

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tandem_sip::{HeaderName, Message};

use crate::agents::auth::answer::DigestClient;

/// Why an attempt failed; each class backs off on its own terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// The provider refused the credentials (or offered a challenge we cannot answer).
    AuthFailed,
    /// 403, 404 and other final refusals other than authentication.
    Rejected,
    /// 5xx, 6xx.
    ServerError,
    /// No response.
    Timeout,
    /// The connection could not be opened (refused, or a TLS handshake or certificate
    /// failure), or failed.
    Connection,
    /// The registrar's name did not resolve.
    Dns,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::AuthFailed => "auth failed",
            FailureClass::Rejected => "rejected",
            FailureClass::ServerError => "server error",
            FailureClass::Timeout => "timeout",
            FailureClass::Connection => "connection failed",
            FailureClass::Dns => "dns failure",
        }
    }
}

/// How long to wait after failures of each class: the first wait, doubled per failure in a
/// row, up to the cap, then scaled by a random factor in [0.5, 1] so that many accounts
/// failing together do not retry together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub transient_min: Duration,
    pub transient_max: Duration,
    pub auth_min: Duration,
    pub auth_max: Duration,
}

impl RetryPolicy {
    fn bounds(&self, class: FailureClass) -> (Duration, Duration) {
        match class {
            FailureClass::Timeout
            | FailureClass::Connection
            | FailureClass::Dns
            | FailureClass::ServerError => (self.transient_min, self.transient_max),
            FailureClass::AuthFailed | FailureClass::Rejected => (self.auth_min, self.auth_max),
        }
    }

    /// The wait after the `failures`-th failure in a row (1 for the first).
    pub fn delay(&self, class: FailureClass, failures: u32, rng: &mut impl Rng) -> Duration {
        let (min, max) = self.bounds(class);
        let doubled = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        doubled.min(max).mul_f64(rng.gen_range(0.5..=1.0))
    }
}

/// What the client needs to know about itself and the account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `sip:user@domain`, in From and To.
    pub aor: String,
    /// The REGISTER's Request-URI: the registrar's domain.
    pub request_uri: String,
    /// `Route` values for an outbound proxy, in order.
    pub routes: Vec<String>,
    /// The contact URI, without brackets or parameters.
    pub contact_uri: String,
    pub instance: String,
    /// The digest username.
    pub auth_user: String,
    pub password: String,
    /// Answer only challenges for this realm; `None`: any.
    pub realm: Option<String>,
    /// The interval asked for.
    pub expires: u32,
    pub user_agent: String,
}

/// The transport details of one REGISTER, from the flow it goes out on.
pub struct Hop<'a> {
    /// `UDP`, `TCP` or `TLS`.
    pub transport: &'a str,
    /// Our address as the registrar should see it (`sip.advertise`, or the socket's).
    pub sent_by: &'a str,
    pub branch: &'a str,
}

/// What to do after a response or a timeout.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Build and send the next REGISTER now (a challenge to answer, or 423).
    SendAgain,
    /// Registered until `expires` seconds from now; refresh after `refresh_in`.
    Registered {
        expires: u32,
        refresh_in: Duration,
        contacts: usize,
    },
    /// The contact was removed (an Expires 0 REGISTER succeeded).
    Unregistered,
    /// Try again after `retry_in`. `failover` says another target of the same name may be
    /// tried at once instead (RFC 3263 §4.3: a timeout or a 503).
    Failed {
        class: FailureClass,
        status: Option<u16>,
        reason: String,
        retry_in: Duration,
        failover: bool,
    },
}

/// The REGISTER client of one account: one Call-ID and a rising CSeq for as long as one
/// owner keeps it registered (RFC 3261 §10.2.4).
pub struct RegisterClient {
    id: Identity,
    call_id: String,
    from_tag: String,
    cseq: u32,
    expires: u32,
    /// Asking to remove the contact rather than to refresh it.
    removing: bool,
    digest: DigestClient,
    /// Challenges answered since the last success; more than a few means a loop.
    rounds: u32,
    failures: u32,
    last_class: Option<FailureClass>,
    policy: RetryPolicy,
}

fn random_token(rng: &mut impl Rng) -> String {
    format!("{:016x}", rng.gen::<u64>())
}

impl RegisterClient {
    pub fn new(id: Identity, policy: RetryPolicy, rng: &mut impl Rng) -> RegisterClient {
        RegisterClient {
            expires: id.expires,
            digest: DigestClient::new(&id.auth_user, &id.password, id.realm.as_deref()),
            id,
            call_id: format!("{}@tandem", random_token(rng)),
            from_tag: random_token(rng),
            cseq: 0,
            removing: false,
            rounds: 0,
            failures: 0,
            last_class: None,
            policy,
        }
    }

    /// Changes the account's details (the operator edited it); the next REGISTER uses them.
    pub fn update(&mut self, id: Identity) {
        if id.auth_user != self.id.auth_user
            || id.password != self.id.password
            || id.realm != self.id.realm
        {
            self.digest = DigestClient::new(&id.auth_user, &id.password, id.realm.as_deref());
        }
        self.expires = id.expires;
        self.id = id;
    }

    pub fn identity(&self) -> &Identity {
        &self.id
    }

    /// Whether REGISTERs now remove the contact.
    pub fn is_removing(&self) -> bool {
        self.removing
    }

    /// From now on, REGISTERs remove the contact (Expires 0).
    pub fn remove(&mut self) {
        self.removing = true;
        self.rounds = 0;
    }

    /// The next REGISTER, over `hop`.
    pub fn build(&mut self, hop: &Hop<'_>, rng: &mut impl Rng) -> Message {
        self.cseq += 1;
        let expires = if self.removing { 0 } else { self.expires };
        let mut m = format!(
            "REGISTER {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/{t} {sent_by};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n",
            ruri = self.id.request_uri,
            t = hop.transport,
            sent_by = hop.sent_by,
            branch = hop.branch,
        );
        for r in &self.id.routes {
            m.push_str(&format!("Route: {r}\r\n"));
        }
        m.push_str(&format!(
            "From: <{aor}>;tag={tag}\r\n\
             To: <{aor}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <{contact}>;+sip.instance=\"<{instance}>\";reg-id=1\r\n\
             Expires: {expires}\r\n\
             Supported: outbound, path\r\n\
             Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n\
             User-Agent: {ua}\r\n",
            aor = self.id.aor,
            tag = self.from_tag,
            call_id = self.call_id,
            cseq = self.cseq,
            contact = self.id.contact_uri,
            instance = self.id.instance,
            ua = self.id.user_agent,
        ));
        if let Some((header, value)) = self.digest.answer("REGISTER", &self.id.request_uri, rng) {
            m.push_str(&format!("{header}: {value}\r\n"));
        }
        m.push_str("Content-Length: 0\r\n\r\n");
        Message::parse_datagram(Bytes::from(m), usize::MAX)
            .expect("a REGISTER built from validated fields parses")
    }

    /// What the response to the last REGISTER means.
    pub fn on_response(&mut self, r: &Message, rng: &mut impl Rng) -> Next {
        let status = r.status().unwrap_or(500);
        let reason = String::from_utf8_lossy(r.reason().unwrap_or_default()).into_owned();
        match status {
            100..=199 => Next::SendAgain,
            200..=299 => {
                self.rounds = 0;
                self.failures = 0;
                self.last_class = None;
                if self.removing {
                    return Next::Unregistered;
                }
                let (expires, contacts) = self.granted(r);
                if expires == 0 {
                    return self.fail(
                        FailureClass::Rejected,
                        Some(status),
                        "the registrar kept no binding for our contact".into(),
                        None,
                        rng,
                    );
                }
                Next::Registered {
                    expires,
                    refresh_in: refresh_after(expires, rng),
                    contacts,
                }
            }
            401 | 407 => match self.take_challenge(r, status == 407) {
                Ok(()) => {
                    self.rounds += 1;
                    if self.rounds > 3 {
                        self.digest.forget();
                        self.fail(
                            FailureClass::AuthFailed,
                            Some(status),
                            "challenged again and again".into(),
                            None,
                            rng,
                        )
                    } else {
                        Next::SendAgain
                    }
                }
                Err(why) => self.fail(FailureClass::AuthFailed, Some(status), why, None, rng),
            },
            423 => {
                let min = r.delta_seconds(HeaderName::MinExpires).ok().flatten();
                match min {
                    Some(min) if min > self.expires && min <= 86_400 && !self.removing => {
                        self.expires = min;
                        Next::SendAgain
                    }
                    _ => self.fail(
                        FailureClass::Rejected,
                        Some(status),
                        format!("{status} {reason} without a usable Min-Expires"),
                        None,
                        rng,
                    ),
                }
            }
            500..=699 => {
                let retry_after = r.delta_seconds(HeaderName::RetryAfter).ok().flatten();
                self.fail(
                    FailureClass::ServerError,
                    Some(status),
                    format!("{status} {reason}"),
                    retry_after.map(|s| Duration::from_secs(u64::from(s))),
                    rng,
                )
            }
            _ => self.fail(
                FailureClass::Rejected,
                Some(status),
                format!("{status} {reason}"),
                None,
                rng,
            ),
        }
    }

    /// No response (Timer F), the connection failed, or the name did not resolve.
    pub fn on_failure(&mut self, class: FailureClass, reason: String, rng: &mut impl Rng) -> Next {
        self.fail(class, None, reason, None, rng)
    }

    fn fail(
        &mut self,
        class: FailureClass,
        status: Option<u16>,
        reason: String,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Next {
        if self.last_class != Some(class) {
            self.failures = 0;
        }
        self.failures += 1;
        self.last_class = Some(class);
        self.rounds = 0;
        if class == FailureClass::AuthFailed {
            // The next attempt starts afresh and answers the next challenge once.
            self.digest.forget();
        }
        let backoff = self.policy.delay(class, self.failures, rng);
        let retry_in = match retry_after {
            // The provider said when; honoured, within the class's cap.
            Some(after) => after.min(self.policy.bounds(class).1).max(backoff / 4),
            None => backoff,
        };
        Next::Failed {
            class,
            status,
            reason,
            retry_in,
            failover: matches!(class, FailureClass::Timeout | FailureClass::Connection)
                || status == Some(503),
        }
    }

    /// Our binding's interval from a 2xx: the `expires` of our contact in the Contact list,
    /// else the Expires header, else what we asked for; and how many contacts the AOR has.
    fn granted(&self, r: &Message) -> (u32, usize) {
        let header = r.expires().ok().flatten();
        let list = match r.contacts() {
            Ok(Some(tandem_sip::Contacts::List(list))) => list,
            _ => return (header.unwrap_or(self.expires).min(self.expires), 0),
        };
        let ours = list.iter().find(|c| {
            c.params.value("+sip.instance").is_some_and(|i| {
                i.trim_matches(|ch| ch == '"' || ch == '<' || ch == '>') == self.id.instance
            }) || same_uri(&c.uri.to_string(), &self.id.contact_uri)
        });
        let expires: u32 = ours
            .and_then(|c| c.params.value("expires"))
            .and_then(|e| e.parse().ok())
            .or(header)
            .unwrap_or(self.expires);
        // A registrar may shorten the interval, not lengthen it (RFC 3261 §10.3): a longer
        // grant is refreshed on our own interval anyway.
        (expires.min(self.expires), list.len())
    }

    fn take_challenge(&mut self, r: &Message, proxy: bool) -> Result<(), String> {
        self.digest.take_challenge(r, proxy)
    }
}

/// When to refresh a binding of `expires` seconds: at 55 to 80% of it, so refreshes of
/// many accounts spread out and each lands well before the binding lapses.
pub fn refresh_after(expires: u32, rng: &mut impl Rng) -> Duration {
    let secs = f64::from(expires) * rng.gen_range(0.55..=0.8);
    Duration::from_secs_f64(secs.max(1.0))
}

fn same_uri(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.trim_matches(|c| c == '<' || c == '>')
            .split(';')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::auth::digest::{self, Algorithm};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn identity() -> Identity {
        Identity {
            aor: "sip:4930@provider.example".into(),
            request_uri: "sip:provider.example".into(),
            routes: vec![],
            contact_uri: "sip:4930@192.0.2.10:5060".into(),
            instance: "urn:uuid:0f0e0d0c-0000-4000-8000-000000000001".into(),
            auth_user: "auth4930".into(),
            password: "secret".into(),
            realm: None,
            expires: 600,
            user_agent: "Tandem".into(),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            transient_min: Duration::from_secs(5),
            transient_max: Duration::from_secs(300),
            auth_min: Duration::from_secs(300),
            auth_max: Duration::from_secs(3600),
        }
    }

    fn hop() -> Hop<'static> {
        Hop {
            transport: "UDP",
            sent_by: "192.0.2.10:5060",
            branch: "z9hG4bK-1",
        }
    }

    fn reply(req: &Message, status: u16, extra: &[(&str, &str)]) -> Message {
        let mut text = format!("SIP/2.0 {status} Whatever\r\n");
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            let v = req.header(&HeaderName::from(name)).unwrap().unwrap();
            text.push_str(&format!("{name}: {v}\r\n"));
        }
        for (n, v) in extra {
            text.push_str(&format!("{n}: {v}\r\n"));
        }
        text.push_str("Content-Length: 0\r\n\r\n");
        Message::parse_datagram(Bytes::from(text), usize::MAX).unwrap()
    }

    fn auth_param(m: &Message, name: &str, param: &str) -> Option<String> {
        m.auth_headers(&HeaderName::from(name)).unwrap()[0]
            .param(param)
            .map(str::to_owned)
    }

    /// The answer to a challenge is one a registrar holding the password accepts, for each
    /// algorithm, with and without qop, and in the -sess forms.
    #[test]
    fn challenges_are_answered_with_digests_a_registrar_accepts() {
        let mut r = rng();
        for (algorithm, qop) in [
            ("MD5", true),
            ("MD5", false),
            ("SHA-256", true),
            ("MD5-sess", true),
            ("SHA-256-sess", true),
        ] {
            let mut c = RegisterClient::new(identity(), policy(), &mut r);
            let first = c.build(&hop(), &mut r);
            assert!(!first.has_header(&HeaderName::Authorization));
            let qop_param = if qop { ", qop=\"auth,auth-int\"" } else { "" };
            let challenge = format!(
                "Digest realm=\"provider.example\", nonce=\"n1\", opaque=\"op\", algorithm={algorithm}{qop_param}"
            );
            let next = c.on_response(
                &reply(&first, 401, &[("WWW-Authenticate", &challenge)]),
                &mut r,
            );
            assert_eq!(next, Next::SendAgain);
            let second = c.build(&hop(), &mut r);
            assert_eq!(second.cseq().unwrap().seq, first.cseq().unwrap().seq + 1);
            assert_eq!(second.call_id().unwrap(), first.call_id().unwrap());
            let a = |p| auth_param(&second, "Authorization", p);
            assert_eq!(a("username").as_deref(), Some("auth4930"));
            assert_eq!(a("opaque").as_deref(), Some("op"));
            assert_eq!(a("algorithm").as_deref(), Some(algorithm));
            let alg = Algorithm::parse(Some(algorithm.trim_end_matches("-sess"))).unwrap();
            let mut ha1 = digest::ha1(alg, "auth4930", "provider.example", "secret");
            let cnonce = a("cnonce");
            if algorithm.ends_with("-sess") {
                ha1 = alg.hex_of(&[&ha1, ":n1:", cnonce.as_deref().unwrap()]);
            }
            let qop = cnonce.as_deref().map(|cn| ("auth", 1, cn));
            if algorithm.ends_with("-sess") {
                let expected =
                    digest::response(alg, &ha1, "n1", qop, "REGISTER", "sip:provider.example");
                assert_eq!(a("response"), Some(expected), "{algorithm}");
            } else {
                // Checked the way Tandem's own registrar checks a phone's answer.
                let header = second.auth_headers(&HeaderName::Authorization).unwrap();
                let creds = digest::Credentials::from_header(header[0].clone()).unwrap();
                assert!(creds.verify(&ha1, "REGISTER"), "{algorithm} qop={qop:?}");
                let wrong = digest::ha1(alg, "auth4930", "provider.example", "other");
                assert!(!creds.verify(&wrong, "REGISTER"));
            }
            assert_eq!(a("nc").is_some(), qop.is_some());
        }
    }

    #[test]
    fn sha256_is_preferred_a_proxy_challenge_gets_proxy_authorization_and_realm_is_respected() {
        let mut r = rng();
        let mut c = RegisterClient::new(identity(), policy(), &mut r);
        let first = c.build(&hop(), &mut r);
        let resp = reply(
            &first,
            407,
            &[
                (
                    "Proxy-Authenticate",
                    "Digest realm=\"p\", nonce=\"a\", algorithm=MD5",
                ),
                (
                    "Proxy-Authenticate",
                    "Digest realm=\"p\", nonce=\"b\", algorithm=SHA-256",
                ),
            ],
        );
        assert_eq!(c.on_response(&resp, &mut r), Next::SendAgain);
        let second = c.build(&hop(), &mut r);
        assert_eq!(
            auth_param(&second, "Proxy-Authorization", "algorithm").as_deref(),
            Some("SHA-256")
        );
        let mut c = RegisterClient::new(
            Identity {
                realm: Some("other".into()),
                ..identity()
            },
            policy(),
            &mut r,
        );
        let first = c.build(&hop(), &mut r);
        let resp = reply(
            &first,
            401,
            &[("WWW-Authenticate", "Digest realm=\"p\", nonce=\"a\"")],
        );
        assert!(matches!(
            c.on_response(&resp, &mut r),
            Next::Failed {
                class: FailureClass::AuthFailed,
                ..
            }
        ));
    }

    /// The same challenge after an answer means wrong credentials; `stale=true` does not.
    #[test]
    fn a_second_challenge_is_auth_failed_unless_stale() {
        let mut r = rng();
        let mut c = RegisterClient::new(identity(), policy(), &mut r);
        let ch = [(
            "WWW-Authenticate",
            "Digest realm=\"p\", nonce=\"a\", qop=\"auth\"",
        )];
        let m = c.build(&hop(), &mut r);
        assert_eq!(c.on_response(&reply(&m, 401, &ch), &mut r), Next::SendAgain);
        let m = c.build(&hop(), &mut r);
        let stale = [(
            "WWW-Authenticate",
            "Digest realm=\"p\", nonce=\"b\", qop=\"auth\", stale=true",
        )];
        assert_eq!(
            c.on_response(&reply(&m, 401, &stale), &mut r),
            Next::SendAgain
        );
        let m = c.build(&hop(), &mut r);
        match c.on_response(&reply(&m, 401, &ch), &mut r) {
            Next::Failed {
                class, retry_in, ..
            } => {
                assert_eq!(class, FailureClass::AuthFailed);
                assert!(retry_in >= Duration::from_secs(150), "{retry_in:?}");
            }
            other => panic!("{other:?}"),
        }
        // After the wait, the next attempt answers a fresh challenge once more.
        let m = c.build(&hop(), &mut r);
        assert!(!m.has_header(&HeaderName::Authorization));
        assert_eq!(c.on_response(&reply(&m, 401, &ch), &mut r), Next::SendAgain);
    }

    /// A challenge whose values could break out of their quotes is not answered: the
    /// account fails with "auth failed", and nothing panics.
    #[test]
    fn a_challenge_with_unquotable_values_is_refused() {
        let mut r = rng();
        for bad in [
            r#"Digest realm="a\"b", nonce="n""#,
            r#"Digest realm="p", nonce="n\\x""#,
            r#"Digest realm="p", nonce="n", opaque="o\"p""#,
        ] {
            let mut c = RegisterClient::new(identity(), policy(), &mut r);
            let m = c.build(&hop(), &mut r);
            let next = c.on_response(&reply(&m, 401, &[("WWW-Authenticate", bad)]), &mut r);
            assert!(
                matches!(
                    next,
                    Next::Failed {
                        class: FailureClass::AuthFailed,
                        ..
                    }
                ),
                "{bad}: {next:?}"
            );
            c.build(&hop(), &mut r);
        }
    }

    #[test]
    fn a_200_gives_our_contacts_interval_and_423_raises_the_ask() {
        let mut r = rng();
        let mut c = RegisterClient::new(identity(), policy(), &mut r);
        let m = c.build(&hop(), &mut r);
        assert_eq!(
            c.on_response(&reply(&m, 423, &[("Min-Expires", "1800")]), &mut r),
            Next::SendAgain
        );
        let m = c.build(&hop(), &mut r);
        assert_eq!(m.expires().unwrap(), Some(1800));
        let ok = reply(
            &m,
            200,
            &[
                ("Contact", "<sip:other@198.51.100.1>;expires=3600"),
                ("Contact", "<sip:4930@192.0.2.10:5060>;expires=1700;+sip.instance=\"<urn:uuid:0f0e0d0c-0000-4000-8000-000000000001>\""),
                ("Expires", "99"),
            ],
        );
        match c.on_response(&ok, &mut r) {
            Next::Registered {
                expires,
                refresh_in,
                contacts,
            } => {
                assert_eq!((expires, contacts), (1700, 2));
                assert!(
                    refresh_in >= Duration::from_secs(935)
                        && refresh_in <= Duration::from_secs(1360)
                );
            }
            other => panic!("{other:?}"),
        }
        // A grant longer than asked is refreshed on our interval.
        let m = c.build(&hop(), &mut r);
        let long = reply(&m, 200, &[("Expires", "4294967295")]);
        assert!(matches!(
            c.on_response(&long, &mut r),
            Next::Registered { expires: 1800, .. }
        ));
        c.remove();
        let m = c.build(&hop(), &mut r);
        assert_eq!(m.expires().unwrap(), Some(0));
        assert_eq!(
            c.on_response(&reply(&m, 200, &[]), &mut r),
            Next::Unregistered
        );
    }

    /// Each class backs off exponentially within its bounds; Retry-After is honoured; a
    /// timeout and a 503 allow failing over to the next target.
    #[test]
    fn failures_back_off_by_class() {
        let mut r = rng();
        let mut c = RegisterClient::new(identity(), policy(), &mut r);
        let mut waits = vec![];
        for _ in 0..12 {
            match c.on_failure(FailureClass::Dns, "no such name".into(), &mut r) {
                Next::Failed {
                    retry_in, failover, ..
                } => {
                    assert!(!failover);
                    waits.push(retry_in.as_secs_f64());
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(waits[0] >= 2.5 && waits[0] <= 5.0, "{waits:?}");
        assert!(waits[3] >= 20.0 && waits[3] <= 40.0, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= 300.0), "{waits:?}");
        assert!(waits[11] >= 150.0, "{waits:?}");
        let m = c.build(&hop(), &mut r);
        match c.on_response(&reply(&m, 503, &[("Retry-After", "120")]), &mut r) {
            Next::Failed {
                class,
                retry_in,
                failover,
                ..
            } => {
                assert_eq!((class, failover), (FailureClass::ServerError, true));
                assert_eq!(retry_in, Duration::from_secs(120));
            }
            other => panic!("{other:?}"),
        }
        let m = c.build(&hop(), &mut r);
        assert!(matches!(
            c.on_response(&reply(&m, 403, &[]), &mut r),
            Next::Failed {
                class: FailureClass::Rejected,
                failover: false,
                ..
            }
        ));
        assert!(matches!(
            c.on_failure(FailureClass::Timeout, "Timer F".into(), &mut r),
            Next::Failed { failover: true, .. }
        ));
    }

    #[test]
    fn the_register_carries_instance_reg_id_and_routes() {
        let mut r = rng();
        let mut c = RegisterClient::new(
            Identity {
                routes: vec!["<sip:proxy.provider.example;lr>".into()],
                ..identity()
            },
            policy(),
            &mut r,
        );
        let m = c.build(&hop(), &mut r);
        let text = String::from_utf8(m.to_bytes().to_vec()).unwrap();
        assert!(
            text.starts_with("REGISTER sip:provider.example SIP/2.0\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Route: <sip:proxy.provider.example;lr>\r\n"),
            "{text}"
        );
        assert!(
            text.contains(
                ";+sip.instance=\"<urn:uuid:0f0e0d0c-0000-4000-8000-000000000001>\";reg-id=1"
            ),
            "{text}"
        );
        assert!(text.contains("Expires: 600\r\n"), "{text}");
    }
}
