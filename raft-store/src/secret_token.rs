//! Bearer tokens of the form `<prefix><id>_<secret>`: a 64-bit public id (16 hex digits)
//! that names the token in lists and revocations, and a 256-bit secret (64 hex digits) of
//! which the cluster stores only the SHA-256. Customers' API tokens (`tc_`, node's admin
//! API) and join tokens (`tj_`, [`crate::join_token`]) share this shape and these checks.
//! A fast hash is enough: nobody can guess 256 random bits, so there is no dictionary to
//! slow down.

use rand::RngCore;

/// Hex digits of the public id.
pub const ID_HEX: usize = 16;
/// Hex digits of the secret.
pub const SECRET_HEX: usize = 64;

/// A freshly minted token: its text, shown once, and what is stored of it.
pub struct Minted {
    pub text: String,
    pub id: String,
    pub secret_sha256: [u8; 32],
}

/// A new token with this prefix.
pub fn mint(prefix: &str) -> Minted {
    let (id, secret) = (random_hex(ID_HEX / 2), random_hex(SECRET_HEX / 2));
    Minted {
        text: format!("{prefix}{id}_{secret}"),
        secret_sha256: sha256(&secret),
        id,
    }
}

/// `(id, secret)` of a token's text, if it has this prefix and the shape of one.
pub fn parse<'a>(prefix: &str, text: &'a str) -> Option<(&'a str, &'a str)> {
    let (id, secret) = text.strip_prefix(prefix)?.split_once('_')?;
    (is_id(id) && is_hex(secret, SECRET_HEX)).then_some((id, secret))
}

/// Whether `s` has the shape of a token id.
pub fn is_id(s: &str) -> bool {
    is_hex(s, ID_HEX)
}

/// Whether `secret` hashes to `stored`, compared in constant time.
pub fn secret_matches(stored: &[u8; 32], secret: &str) -> bool {
    sha256(secret)
        .iter()
        .zip(stored)
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
