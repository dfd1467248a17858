//! One-time join tokens (raft-store/DESIGN.md, "Joining"): their text, `tj_<id>_<secret>`
//! (the shape of [`crate::secret_token`]), minting and checking. A CA-signed certificate proves a machine was given one by the
//! operator at some time; a join token proves the operator wants this node in the cluster
//! now. The record ([`JoinToken`]) holds only the secret's SHA-256, as with customers' API
//! tokens, and the leader marks it used through Raft before it adds the node.

use crate::command::JoinToken;
use crate::secret_token;
use crate::types::NodeId;

/// What every join token's text starts with.
pub const PREFIX: &str = "tj_";

/// A new token admitting `node` (any node if none) until `expires_at_ms`: its text, shown
/// once, and the record to store.
pub fn mint(node: Option<NodeId>, created_at_ms: u64, expires_at_ms: u64) -> (String, JoinToken) {
    let minted = secret_token::mint(PREFIX);
    let token = JoinToken {
        id: minted.id,
        secret_sha256: minted.secret_sha256,
        node,
        created_at_ms,
        expires_at_ms,
        used_by: 0,
    };
    (minted.text, token)
}

/// `(id, secret)` of a join token's text, if it has the shape of one.
pub fn parse(text: &str) -> Option<(&str, &str)> {
    secret_token::parse(PREFIX, text)
}

/// Whether `secret` is the stored token's, compared in constant time.
pub fn secret_matches(token: &JoinToken, secret: &str) -> bool {
    secret_token::secret_matches(&token.secret_sha256, secret)
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
