//! One-time join tokens (raft-store/DESIGN.md, "Joining"): their text, `tj_<id>_<secret>`,
//! minting and checking. A CA-signed certificate proves a machine was given one by the
//! operator at some time; a join token proves the operator wants this node in the cluster
//! now. The record ([`JoinToken`]) holds only the secret's SHA-256, as with customers' API
//! tokens, and the leader marks it used through Raft before it adds the node.

use rand::RngCore;

use crate::command::JoinToken;
use crate::types::NodeId;

/// What every join token's text starts with.
pub const PREFIX: &str = "tj_";
/// Hex digits of the public id (64 bits) and of the secret (256 bits).
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// A new token admitting `node` (any node if none) until `expires_at_ms`: its text, shown
/// once, and the record to store.
pub fn mint(node: Option<NodeId>, created_at_ms: u64, expires_at_ms: u64) -> (String, JoinToken) {
    let (id, secret) = (random_hex(ID_HEX / 2), random_hex(SECRET_HEX / 2));
    let text = format!("{PREFIX}{id}_{secret}");
    let token = JoinToken {
        id,
        secret_sha256: sha256(&secret),
        node,
        created_at_ms,
        expires_at_ms,
        used_by: 0,
    };
    (text, token)
}

/// `(id, secret)` of a join token's text, if it has the shape of one.
pub fn parse(text: &str) -> Option<(&str, &str)> {
    let (id, secret) = text.strip_prefix(PREFIX)?.split_once('_')?;
    (is_hex(id, ID_HEX) && is_hex(secret, SECRET_HEX)).then_some((id, secret))
}

/// Whether `secret` is the stored token's, compared in constant time.
pub fn secret_matches(token: &JoinToken, secret: &str) -> bool {
    sha256(secret)
        .iter()
        .zip(token.secret_sha256)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn sha256(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_parses_and_matches_only_its_own_secret() {
        let (text, token) = mint(Some(4), 1, 2);
        let (id, secret) = parse(&text).expect("a minted token parses");
        assert_eq!(id, token.id);
        assert!(secret_matches(&token, secret));
        let (other, _) = mint(Some(4), 1, 2);
        let (_, other_secret) = parse(&other).unwrap();
        assert!(!secret_matches(&token, other_secret));
        assert_eq!(token.used_by, 0);
        for bad in [
            "",
            "tj_",
            "tc_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
            "tj_0123456789ABCDEF_0000000000000000000000000000000000000000000000000000000000000000",
            "tj_0123456789abcdef_000",
            "tj_0123456789abcdef",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
