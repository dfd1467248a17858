//! A small SIP user agent for the tests sipp cannot do: REGISTER with a chosen digest
//! algorithm (sipp 3.6 speaks MD5 only), with full control over every header. It has its
//! own digest code, independent of Tandem's, over UDP on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use md5::Digest as _;

use crate::{header_value, recv_udp, status_code};

/// One UA bound to a UDP port on 127.0.0.x.
pub struct Ua {
    pub socket: UdpSocket,
    pub user: String,
    pub domain: String,
    pub password: String,
    cseq: u32,
    call_id: String,
}

/// A final response, with its raw text for assertions.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub text: String,
}

impl Reply {
    /// Every value of header `name` (case-insensitive), in order.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or_default();
        head.split("\r\n")
            .skip(1)
            .filter_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        header_value(self.text.as_bytes(), name)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `H(data)` for a digest algorithm name ("MD5" or "SHA-256").
pub fn digest_hex(algorithm: &str, data: &str) -> String {
    match algorithm {
        "MD5" => hex(&md5::Md5::digest(data.as_bytes())),
        "SHA-256" => hex(ring::digest::digest(&ring::digest::SHA256, data.as_bytes()).as_ref()),
        other => panic!("the test UA has no digest algorithm {other}"),
    }
}

/// The value of `name=` in a challenge, quotes removed.
fn param(challenge: &str, name: &str) -> Option<String> {
    challenge.split(',').find_map(|part| {
        let part = part.trim().trim_start_matches("Digest").trim();
        let (k, v) = part.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

impl Ua {
    pub fn new(ip: &str, user: &str, domain: &str, password: &str) -> Ua {
        let socket = UdpSocket::bind((ip, 0)).expect("bind the UA's UDP socket");
        let port = socket.local_addr().unwrap().port();
        Ua {
            socket,
            user: user.into(),
            domain: domain.into(),
            password: password.into(),
            cseq: 0,
            call_id: format!("ua-{user}-{port}"),
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// The Contact this UA registers: itself.
    pub fn contact(&self) -> String {
        format!("sip:{}@{}", self.user, self.local())
    }

    /// Sends one REGISTER to `node` and waits for its final response. `contact` is the
    /// whole Contact value (or `None` for a query), `extra` more header lines.
    pub fn register_once(
        &mut self,
        node: SocketAddr,
        contact: Option<&str>,
        expires: Option<u32>,
        extra: &str,
    ) -> Reply {
        self.cseq += 1;
        let local = self.local();
        let mut text = format!(
            "REGISTER sip:{domain} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-ua-{cseq}-{port};rport\r\n\
             From: <sip:{user}@{domain}>;tag=ua{port}\r\n\
             To: <sip:{user}@{domain}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Max-Forwards: 70\r\n",
            domain = self.domain,
            user = self.user,
            cseq = self.cseq,
            port = local.port(),
            call_id = self.call_id,
        );
        if let Some(c) = contact {
            text.push_str(&format!("Contact: {c}\r\n"));
        }
        if let Some(e) = expires {
            text.push_str(&format!("Expires: {e}\r\n"));
        }
        text.push_str(extra);
        text.push_str("Content-Length: 0\r\n\r\n");
        self.transact(node, &text)
    }

    fn transact(&self, node: SocketAddr, text: &str) -> Reply {
        for _ in 0..4 {
            self.socket.send_to(text.as_bytes(), node).expect("send");
            let deadline = crate::Deadline::after(Duration::from_secs(2));
            while !deadline.expired() {
                let Some(bytes) = recv_udp(&self.socket, deadline.remaining()) else {
                    break;
                };
                match status_code(&bytes) {
                    Some(s) if s >= 200 => {
                        return Reply {
                            status: s,
                            text: String::from_utf8_lossy(&bytes).into_owned(),
                        }
                    }
                    _ => continue,
                }
            }
        }
        panic!("no final response from {node} to:\n{text}");
    }

    /// The Authorization header answering `challenge` for `method` and `uri`.
    pub fn authorization(&self, challenge: &str, method: &str, uri: &str, nc: u32) -> String {
        let algorithm = param(challenge, "algorithm").unwrap_or_else(|| "MD5".into());
        let realm = param(challenge, "realm").expect("realm in challenge");
        let nonce = param(challenge, "nonce").expect("nonce in challenge");
        let cnonce = format!("c{nc}x{}", self.local().port());
        let ha1 = digest_hex(
            &algorithm,
            &format!("{}:{realm}:{}", self.user, self.password),
        );
        let ha2 = digest_hex(&algorithm, &format!("{method}:{uri}"));
        let response = digest_hex(
            &algorithm,
            &format!("{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}"),
        );
        format!(
            "Digest username=\"{}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
             response=\"{response}\", algorithm={algorithm}, qop=auth, nc={nc:08x}, \
             cnonce=\"{cnonce}\"",
            self.user
        )
    }

    /// REGISTERs with digest: sends without credentials, answers the 401 challenge for
    /// `algorithm` (`"MD5"` or `"SHA-256"`), returns the final response.
    pub fn register(
        &mut self,
        node: SocketAddr,
        algorithm: &str,
        contact: Option<&str>,
        expires: Option<u32>,
    ) -> Reply {
        let first = self.register_once(node, contact, expires, "");
        if first.status != 401 {
            return first;
        }
        let challenge = first
            .headers("WWW-Authenticate")
            .into_iter()
            .find(|c| c.contains(&format!("algorithm={algorithm}")))
            .unwrap_or_else(|| panic!("no {algorithm} challenge in:\n{}", first.text));
        let uri = format!("sip:{}", self.domain);
        let auth = self.authorization(&challenge, "REGISTER", &uri, 1);
        self.register_once(
            node,
            contact,
            expires,
            &format!("Authorization: {auth}\r\n"),
        )
    }
}
