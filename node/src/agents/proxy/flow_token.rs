//! Flow tokens (the RFC 5626 §5.3 idea): a flow — transport, our socket, the peer's
//! address and the connection — written into the user part of a Route or Record-Route URI
//! and authenticated with an HMAC under a key every cluster member derives from the master
//! key. A node that finds its own address with a token on top of a request's Route set
//! sends the request over that flow, which is how:
//!
//! - a request for a phone behind NAT reaches it through the node it registered through
//!   (its edge node), whichever node received the call (node/DESIGN.md, "Edge nodes"): the
//!   receiving node puts a token for the binding's stored flow in a Route to the edge node;
//! - requests inside a dialog reach each side through the flow its dialog began on: each
//!   node's two Record-Route entries carry the flow on their side.
//!
//! The MAC also covers the Call-ID of the request the token was minted for, so a token is
//! good only within its own call: a party to one dialog cannot use the tokens it sees in
//! Record-Route to send other requests down someone's flow. Tokens do not expire, because
//! dialogs last as long as they like, and only a cluster member can mint one. Verification
//! accepts every key in the key file, so a key rotation does not break calls that are up.

use std::net::SocketAddr;

use ring::hmac;

use crate::hex::{decode as unhex, encode as hex};
use crate::stack::transport::{ConnectionId, Flow, TransportKind};

/// The user-part prefix that marks a token.
const PREFIX: &str = "tdm-";
/// Bytes of HMAC-SHA256 kept: 80 bits is plenty against forgery of a routing hint.
const MAC_LEN: usize = 10;
/// The label the token key is derived with.
pub const KEY_LABEL: &str = "tandem flow tokens";

/// Mints and checks flow tokens.
#[derive(Clone)]
pub struct FlowTokens {
    /// Newest first; the first one signs.
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for FlowTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlowTokens({} keys)", self.keys.len())
    }
}

fn transport_code(kind: TransportKind) -> char {
    match kind {
        TransportKind::Udp => 'u',
        TransportKind::Tcp => 't',
        TransportKind::Tls => 's',
    }
}

/// The MAC of a payload within a call.
fn sign(key: &hmac::Key, payload: &[u8], call_id: &str) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(payload);
    ctx.update(b"\0");
    ctx.update(call_id.as_bytes());
    ctx.sign()
}

impl FlowTokens {
    /// `secrets` newest first (see `KeyRing::derive_all`); never empty.
    pub fn new(secrets: &[[u8; 32]]) -> FlowTokens {
        assert!(!secrets.is_empty(), "flow tokens need a key");
        FlowTokens {
            keys: secrets
                .iter()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s))
                .collect(),
        }
    }

    /// The token for `flow` within call `call_id`: `tdm-<hex payload>-<hex mac>`, safe as
    /// a SIP URI user part.
    pub fn encode(&self, flow: &Flow, call_id: &str) -> String {
        let payload = format!(
            "{}|{}|{}|{}",
            transport_code(flow.transport),
            flow.local,
            flow.remote,
            flow.connection.map_or(0, |ConnectionId(c)| c)
        );
        let mac = sign(&self.keys[0], payload.as_bytes(), call_id);
        format!(
            "{PREFIX}{}-{}",
            hex(payload.as_bytes()),
            hex(&mac.as_ref()[..MAC_LEN])
        )
    }

    /// The flow a token names, if it is one and its MAC checks out under any key for
    /// call `call_id`.
    pub fn decode(&self, user: &str, call_id: &str) -> Option<Flow> {
        let rest = user.strip_prefix(PREFIX)?;
        let (payload_hex, mac_hex) = rest.split_once('-')?;
        let payload = unhex(payload_hex)?;
        let mac = unhex(mac_hex)?;
        if mac.len() != MAC_LEN {
            return None;
        }
        // Compared without an early exit, so timing tells a forger nothing.
        let genuine = self.keys.iter().any(|k| {
            sign(k, &payload, call_id).as_ref()[..MAC_LEN]
                .iter()
                .zip(&mac)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
        });
        if !genuine {
            return None;
        }
        let text = std::str::from_utf8(&payload).ok()?;
        let mut parts = text.split('|');
        let transport = match parts.next()? {
            "u" => TransportKind::Udp,
            "t" => TransportKind::Tcp,
            "s" => TransportKind::Tls,
            _ => return None,
        };
        let local: SocketAddr = parts.next()?.parse().ok()?;
        let remote: SocketAddr = parts.next()?.parse().ok()?;
        let connection = match parts.next()?.parse::<u64>().ok()? {
            0 => None,
            c => Some(ConnectionId(c)),
        };
        Some(Flow {
            transport,
            local,
            remote,
            connection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            transport: TransportKind::Tcp,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: "[::1]:40000".parse().unwrap(),
            connection: Some(ConnectionId(42)),
        }
    }

    #[test]
    fn a_token_round_trips_and_is_a_plain_user_part() {
        let tokens = FlowTokens::new(&[[7; 32]]);
        let t = tokens.encode(&flow(), "c1");
        assert!(t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_eq!(tokens.decode(&t, "c1"), Some(flow()));
        let udp = Flow {
            transport: TransportKind::Udp,
            connection: None,
            ..flow()
        };
        assert_eq!(tokens.decode(&tokens.encode(&udp, "c1"), "c1"), Some(udp));
    }

    #[test]
    fn a_forged_or_foreign_token_is_refused() {
        let tokens = FlowTokens::new(&[[7; 32]]);
        let t = tokens.encode(&flow(), "c1");
        let other = FlowTokens::new(&[[8; 32]]);
        assert_eq!(other.decode(&t, "c1"), None, "another cluster's key");
        // Change one hex digit of the payload: the MAC no longer matches.
        let mut forged = t.clone().into_bytes();
        forged[6] = if forged[6] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            tokens.decode(std::str::from_utf8(&forged).unwrap(), "c1"),
            None
        );
        assert_eq!(tokens.decode("alice", "c1"), None);
        assert_eq!(tokens.decode("tdm-zz-00", "c1"), None);
        assert_eq!(tokens.decode(&t, "c2"), None, "another call's token");
    }

    #[test]
    fn tokens_minted_before_a_key_rotation_still_verify() {
        let old = FlowTokens::new(&[[1; 32]]);
        let t = old.encode(&flow(), "c1");
        let rotated = FlowTokens::new(&[[2; 32], [1; 32]]);
        assert_eq!(rotated.decode(&t, "c1"), Some(flow()));
        assert_ne!(
            rotated.encode(&flow(), "c1"),
            t,
            "new tokens use the new key"
        );
    }
}
