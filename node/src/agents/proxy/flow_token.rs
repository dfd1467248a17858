//! Flow tokens (the RFC 5626 §5.3 idea): a flow — transport, our socket, the peer's
//! address and the connection — written into the user part of a Route or Record-Route URI
//! and authenticated with an HMAC under a key every cluster member derives from the master
//! key. A node that finds its own address with a token on top of a request's Route set
//! sends the request over that flow, which is how:
//!
//! - a request for a phone behind NAT reaches it through the node it registered through
//!   (its edge node), whichever node received it (node/DESIGN.md, "Edge nodes"): the
//!   receiving node puts an *edge* token for the binding's stored flow in a Route to the
//!   edge node;
//! - requests inside a dialog reach each side through the flow its dialog began on: each
//!   node's two Record-Route entries carry *dialog* tokens for the flow on their side.
//!
//! The MAC covers the token's kind, the time it was minted, the Call-ID and the caller's
//! From tag of the request it was minted for, so a token is good only within its own
//! dialog: a party to one call cannot use the tokens it sees in Record-Route to send other
//! requests down someone's flow. An edge token is good for [`EDGE_TOKEN_LIFETIME`], long
//! enough for the one request it routes; a dialog token only inside a dialog, and only
//! while the proxy's dialog table knows that dialog (or, after a restart emptied the
//! table, for [`DIALOG_TOKEN_LIFETIME`] if minted before the restart). Verification
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
/// How long an edge token routes: the request it was minted for and its retransmissions.
pub const EDGE_TOKEN_LIFETIME: u64 = 300;
/// How long a dialog token minted before this process started is honoured without the
/// dialog table knowing its dialog: calls that were up across a restart can still end.
pub const DIALOG_TOKEN_LIFETIME: u64 = 24 * 3600;
/// How far ahead of this node's clock another member's may run.
const CLOCK_SKEW: u64 = 60;

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A Route to a binding's edge node, for one request outside a dialog.
    Edge,
    /// A Record-Route entry, for requests inside the dialog.
    Dialog,
}

/// A genuine token, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub flow: Flow,
    pub kind: TokenKind,
    /// Unix seconds.
    pub minted: u64,
}

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

/// The MAC of a payload within a dialog.
fn sign(key: &hmac::Key, payload: &[u8], call_id: &str, caller_tag: &str) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(payload);
    ctx.update(b"\0");
    ctx.update(call_id.as_bytes());
    ctx.update(b"\0");
    ctx.update(caller_tag.as_bytes());
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

    /// A `kind` token for `flow` within the dialog of `call_id` and the caller's tag
    /// `caller_tag`, minted at `now` (Unix seconds): `tdm-<hex payload>-<hex mac>`, safe
    /// as a SIP URI user part.
    pub fn encode(
        &self,
        flow: &Flow,
        kind: TokenKind,
        call_id: &str,
        caller_tag: &str,
        now: u64,
    ) -> String {
        let payload = format!(
            "{}|{}|{}|{}|{}|{now:x}",
            transport_code(flow.transport),
            flow.local,
            flow.remote,
            flow.connection.map_or(0, |ConnectionId(c)| c),
            match kind {
                TokenKind::Edge => 'e',
                TokenKind::Dialog => 'd',
            }
        );
        let mac = sign(&self.keys[0], payload.as_bytes(), call_id, caller_tag);
        format!(
            "{PREFIX}{}-{}",
            hex(payload.as_bytes()),
            hex(&mac.as_ref()[..MAC_LEN])
        )
    }

    /// The token in a URI user part, if it is one, its MAC checks out under any key for
    /// call `call_id` with one of `tags` as the caller's (a request inside a dialog
    /// carries the caller's tag in From or in To, by direction), and an edge token has
    /// not outlived [`EDGE_TOKEN_LIFETIME`] at `now`.
    pub fn decode(&self, user: &str, call_id: &str, tags: [&str; 2], now: u64) -> Option<Token> {
        let rest = user.strip_prefix(PREFIX)?;
        let (payload_hex, mac_hex) = rest.split_once('-')?;
        let payload = unhex(payload_hex)?;
        let mac = unhex(mac_hex)?;
        if mac.len() != MAC_LEN {
            return None;
        }
        // Compared without an early exit, so timing tells a forger nothing.
        let genuine = self.keys.iter().any(|k| {
            tags.iter().any(|tag| {
                sign(k, &payload, call_id, tag).as_ref()[..MAC_LEN]
                    .iter()
                    .zip(&mac)
                    .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                    == 0
            })
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
        let kind = match parts.next()? {
            "e" => TokenKind::Edge,
            "d" => TokenKind::Dialog,
            _ => return None,
        };
        let minted = u64::from_str_radix(parts.next()?, 16).ok()?;
        if minted > now + CLOCK_SKEW
            || (kind == TokenKind::Edge && now.saturating_sub(minted) > EDGE_TOKEN_LIFETIME)
        {
            return None;
        }
        Some(Token {
            flow: Flow {
                transport,
                local,
                remote,
                connection,
            },
            kind,
            minted,
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

    const NOW: u64 = 1_800_000_000;

    fn dialog(tokens: &FlowTokens, flow: &Flow, call_id: &str) -> String {
        tokens.encode(flow, TokenKind::Dialog, call_id, "caller", NOW)
    }

    #[test]
    fn a_token_round_trips_and_is_a_plain_user_part() {
        let tokens = FlowTokens::new(&[[7; 32]]);
        let t = dialog(&tokens, &flow(), "c1");
        assert!(t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let got = tokens
            .decode(&t, "c1", ["caller", "callee"], NOW + 1)
            .unwrap();
        assert_eq!(
            (got.flow, got.kind, got.minted),
            (flow(), TokenKind::Dialog, NOW)
        );
        // The callee's requests carry the caller's tag in To.
        assert!(tokens.decode(&t, "c1", ["callee", "caller"], NOW).is_some());
        let udp = Flow {
            transport: TransportKind::Udp,
            connection: None,
            ..flow()
        };
        let t = tokens.encode(&udp, TokenKind::Edge, "c1", "caller", NOW);
        let got = tokens.decode(&t, "c1", ["caller", ""], NOW).unwrap();
        assert_eq!((got.flow, got.kind), (udp, TokenKind::Edge));
    }

    #[test]
    fn a_forged_foreign_or_misplaced_token_is_refused() {
        let tokens = FlowTokens::new(&[[7; 32]]);
        let t = dialog(&tokens, &flow(), "c1");
        let tags = ["caller", "callee"];
        let other = FlowTokens::new(&[[8; 32]]);
        assert_eq!(
            other.decode(&t, "c1", tags, NOW),
            None,
            "another cluster's key"
        );
        // Change one hex digit of the payload: the MAC no longer matches.
        let mut forged = t.clone().into_bytes();
        forged[6] = if forged[6] == b'0' { b'1' } else { b'0' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(tokens.decode(&forged, "c1", tags, NOW), None);
        assert_eq!(tokens.decode("alice", "c1", tags, NOW), None);
        assert_eq!(tokens.decode("tdm-zz-00", "c1", tags, NOW), None);
        assert_eq!(
            tokens.decode(&t, "c2", tags, NOW),
            None,
            "another call's token"
        );
        assert_eq!(
            tokens.decode(&t, "c1", ["mallory", "callee"], NOW),
            None,
            "another dialog of the same Call-ID"
        );
        assert_eq!(
            tokens.decode(&t, "c1", tags, NOW - 2 * CLOCK_SKEW),
            None,
            "minted in the future"
        );
    }

    #[test]
    fn an_edge_token_expires_and_a_dialog_token_is_judged_by_the_dialog_table() {
        let tokens = FlowTokens::new(&[[7; 32]]);
        let edge = tokens.encode(&flow(), TokenKind::Edge, "c1", "caller", NOW);
        let tags = ["caller", ""];
        assert!(tokens
            .decode(&edge, "c1", tags, NOW + EDGE_TOKEN_LIFETIME)
            .is_some());
        assert_eq!(
            tokens.decode(&edge, "c1", tags, NOW + EDGE_TOKEN_LIFETIME + 1),
            None
        );
        let d = dialog(&tokens, &flow(), "c1");
        assert!(tokens.decode(&d, "c1", tags, NOW + 7 * 24 * 3600).is_some());
    }

    #[test]
    fn tokens_minted_before_a_key_rotation_still_verify() {
        let old = FlowTokens::new(&[[1; 32]]);
        let t = dialog(&old, &flow(), "c1");
        let rotated = FlowTokens::new(&[[2; 32], [1; 32]]);
        let tags = ["caller", "callee"];
        assert_eq!(
            rotated.decode(&t, "c1", tags, NOW).map(|t| t.flow),
            Some(flow())
        );
        assert_ne!(
            dialog(&rotated, &flow(), "c1"),
            t,
            "new tokens use the new key"
        );
    }
}
