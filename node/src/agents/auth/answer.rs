//! The client side of digest authentication: answering a registrar's or a provider's
//! 401/407 with our credentials (RFC 3261 §22, RFC 7616 and 8760), for the registration
//! agent's REGISTERs and the app server's calls through providers. Sans-IO: it reads
//! responses and writes header values.
//!
//! MD5, SHA-256 and their `-sess` forms, `qop=auth` when offered (never `auth-int`: we do
//! not hash bodies). Of several challenges, SHA-256 is preferred. A challenge is answered
//! once: the same challenge again, unless `stale=true`, means the credentials are wrong.
//! A challenge whose realm, nonce or opaque could end its quotes or the header line is not
//! answered, since those values go back verbatim.

use rand::Rng;
use tandem_sip::{AuthHeader, HeaderName, Message};

use super::digest::{self, Algorithm};

/// A challenge we have answered or will answer.
#[derive(Clone, Debug)]
struct Challenge {
    proxy: bool,
    algorithm: Algorithm,
    sess: bool,
    realm: String,
    nonce: String,
    opaque: Option<String>,
    qop_auth: bool,
    nc: u32,
    /// Whether a request with an answer to this challenge has been sent.
    answered: bool,
}

/// One set of credentials and the challenge they answer next.
#[derive(Clone, Debug)]
pub struct DigestClient {
    user: String,
    password: String,
    /// Answer only challenges for this realm; `None`: any.
    realm: Option<String>,
    challenge: Option<Challenge>,
}

impl DigestClient {
    pub fn new(user: &str, password: &str, realm: Option<&str>) -> DigestClient {
        DigestClient {
            user: user.to_owned(),
            password: password.to_owned(),
            realm: realm.map(str::to_owned),
            challenge: None,
        }
    }

    /// Forgets the challenge: the next request goes without credentials.
    pub fn forget(&mut self) {
        self.challenge = None;
    }

    /// Takes the challenge of a 401 (`proxy` false) or 407 response, to answer in the next
    /// request. An error says why it cannot or must not be answered (none we can answer,
    /// or ours was refused).
    pub fn take_challenge(&mut self, r: &Message, proxy: bool) -> Result<(), String> {
        let name = if proxy {
            HeaderName::ProxyAuthenticate
        } else {
            HeaderName::WwwAuthenticate
        };
        let offered = r
            .auth_headers(&name)
            .map_err(|e| format!("unreadable challenge: {e}"))?;
        let mut best: Option<Challenge> = None;
        for h in offered {
            let Some(c) = read_challenge(&h, proxy) else {
                continue;
            };
            if self.realm.as_ref().is_some_and(|want| *want != c.realm) {
                continue;
            }
            let better = match &best {
                None => true,
                Some(b) => c.algorithm == Algorithm::Sha256 && b.algorithm == Algorithm::Md5,
            };
            if better {
                best = Some(c);
            }
        }
        let Some(new) = best else {
            return Err(match &self.realm {
                Some(realm) => {
                    format!("no digest challenge for realm {realm:?} that we can answer")
                }
                None => "no digest challenge that we can answer".into(),
            });
        };
        let stale = r.auth_headers(&name).ok().into_iter().flatten().any(|h| {
            h.param("stale")
                .is_some_and(|s| s.eq_ignore_ascii_case("true"))
        });
        if let Some(old) = &self.challenge {
            if old.answered && old.realm == new.realm && old.proxy == new.proxy && !stale {
                return Err("the credentials were refused".into());
            }
        }
        self.challenge = Some(new);
        Ok(())
    }

    /// The header (`Authorization` or `Proxy-Authorization`) and value answering the
    /// challenge taken, for a request of `method` to `uri`; `None` before any challenge.
    pub fn answer(
        &mut self,
        method: &str,
        uri: &str,
        rng: &mut impl Rng,
    ) -> Option<(&'static str, String)> {
        let c = self.challenge.as_mut()?;
        c.nc += 1;
        c.answered = true;
        let header = if c.proxy {
            "Proxy-Authorization"
        } else {
            "Authorization"
        };
        Some((
            header,
            authorization(c, &self.user, &self.password, method, uri, rng),
        ))
    }
}

fn read_challenge(h: &AuthHeader, proxy: bool) -> Option<Challenge> {
    if !h.scheme.eq_ignore_ascii_case("Digest") {
        return None;
    }
    let (name, sess) = match h.param("algorithm") {
        None => ("MD5", false),
        Some(a) => match a.len().checked_sub(5) {
            Some(i) if a[i..].eq_ignore_ascii_case("-sess") => (&a[..i], true),
            _ => (a, false),
        },
    };
    let algorithm = Algorithm::parse(Some(name))?;
    let qop = h.param("qop");
    let qop_auth = qop.is_some_and(|q| q.split(',').any(|o| o.trim().eq_ignore_ascii_case("auth")));
    if qop.is_some() && !qop_auth {
        // auth-int only: we do not hash bodies.
        return None;
    }
    let quotable =
        |v: &str| v.len() <= 256 && !v.chars().any(|c| c == '"' || c == '\\' || c.is_control());
    let (realm, nonce) = (h.param("realm")?, h.param("nonce")?);
    let opaque = h.param("opaque");
    if !quotable(realm) || !quotable(nonce) || opaque.is_some_and(|o| !quotable(o)) {
        return None;
    }
    Some(Challenge {
        proxy,
        algorithm,
        sess,
        realm: realm.to_owned(),
        nonce: nonce.to_owned(),
        opaque: opaque.map(str::to_owned),
        qop_auth,
        nc: 0,
        answered: false,
    })
}

/// The Authorization value answering `c` (RFC 7616 §3.4).
fn authorization(
    c: &Challenge,
    user: &str,
    password: &str,
    method: &str,
    uri: &str,
    rng: &mut impl Rng,
) -> String {
    let cnonce = format!("{:016x}", rng.gen::<u64>());
    let mut ha1 = digest::ha1(c.algorithm, user, &c.realm, password);
    if c.sess {
        ha1 = c.algorithm.hex_of(&[&ha1, ":", &c.nonce, ":", &cnonce]);
    }
    let qop = c.qop_auth.then_some(("auth", c.nc, cnonce.as_str()));
    let response = digest::response(c.algorithm, &ha1, &c.nonce, qop, method, uri);
    let algorithm = format!(
        "{}{}",
        c.algorithm.name(),
        if c.sess { "-sess" } else { "" }
    );
    let mut v = format!(
        "Digest username=\"{user}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", response=\"{response}\", algorithm={algorithm}",
        c.realm, c.nonce
    );
    if let Some(o) = &c.opaque {
        v.push_str(&format!(", opaque=\"{o}\""));
    }
    if c.qop_auth || c.sess {
        v.push_str(&format!(", qop=auth, nc={:08x}, cnonce=\"{cnonce}\"", c.nc));
    }
    v
}
