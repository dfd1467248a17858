//! Field encryption at rest (raft-store/DESIGN.md, "Secrets are sealed before the log").
//! Sensitive fields (HA1 values, provider passwords, API token secrets) are sealed by the
//! proposing node before they enter the Raft log, so plaintext never reaches the log, the
//! WAL, SSTs, snapshots or RPCs.
//!
//! A [`Sealed`] value is `{version, key_id, nonce, ciphertext}`: AES-256-GCM with a random
//! 96-bit nonce, and associated data binding it to its key id, record id and field name,
//! so a sealed value moved to another record or field does not open. Master keys live in
//! a key file outside the data directory's Raft state; a key ring holds every key still
//! needed to open old values, and seals with the newest.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::Error;

const ENVELOPE_VERSION: u8 = 1;
const FILE_HEADER: &str = "# Tandem master keys. Keep this file secret and backed up; without it";

/// An encrypted field value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub version: u8,
    pub key_id: u32,
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sealed(key {}, {} bytes)",
            self.key_id,
            self.ciphertext.len()
        )
    }
}

/// The master keys, by id. Seals with the highest id.
#[derive(Clone)]
pub struct KeyRing {
    keys: BTreeMap<u32, [u8; 32]>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRing(ids {:?})", self.keys.keys().collect::<Vec<_>>())
    }
}

fn associated_data(key_id: u32, record: &str, field: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(4 + record.len() + 1 + field.len());
    ad.extend_from_slice(&key_id.to_be_bytes());
    ad.extend_from_slice(record.as_bytes());
    ad.push(0);
    ad.extend_from_slice(field.as_bytes());
    ad
}

impl KeyRing {
    /// A ring with one fresh random key, id 1.
    pub fn generate() -> KeyRing {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        KeyRing {
            keys: BTreeMap::from([(1, key)]),
        }
    }

    /// Adds a fresh key with the next id; new values are sealed with it.
    pub fn rotate(&mut self) -> u32 {
        let id = self.current_id() + 1;
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        self.keys.insert(id, key);
        id
    }

    /// A secret for another purpose (say, digest nonces), derived from the current key
    /// with `label`, so that every node holding the key file derives the same one.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.keys[&self.current_id()]);
        let tag = ring::hmac::sign(&key, label.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// [`derive`](Self::derive) with every key in the ring, newest first: what a node
    /// verifies against, so values derived before a key rotation (a long call's route
    /// set, say) still check out after it.
    pub fn derive_all(&self, label: &str) -> Vec<[u8; 32]> {
        self.keys
            .values()
            .rev()
            .map(|k| {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
                let mut out = [0u8; 32];
                out.copy_from_slice(ring::hmac::sign(&key, label.as_bytes()).as_ref());
                out
            })
            .collect()
    }

    /// Every key id in the ring, oldest first.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    pub fn current_id(&self) -> u32 {
        *self
            .keys
            .keys()
            .next_back()
            .expect("a key ring is never empty")
    }

    pub fn seal(&self, record: &str, field: &str, plaintext: &[u8]) -> Sealed {
        let key_id = self.current_id();
        let cipher = Aes256Gcm::new_from_slice(&self.keys[&key_id]).expect("32-byte key");
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = associated_data(key_id, record, field);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer does not fail");
        Sealed {
            version: ENVELOPE_VERSION,
            key_id,
            nonce,
            ciphertext,
        }
    }

    /// Re-seals a value under the current key, or `None` if it already uses it.
    pub fn reseal(
        &self,
        sealed: &Sealed,
        record: &str,
        field: &str,
    ) -> Result<Option<Sealed>, Error> {
        if sealed.key_id == self.current_id() {
            return Ok(None);
        }
        Ok(Some(self.seal(
            record,
            field,
            &self.open(sealed, record, field)?,
        )))
    }

    pub fn open(&self, sealed: &Sealed, record: &str, field: &str) -> Result<Vec<u8>, Error> {
        if sealed.version != ENVELOPE_VERSION {
            return Err(Error::Crypto(format!(
                "unknown envelope version {}",
                sealed.version
            )));
        }
        let key = self.keys.get(&sealed.key_id).ok_or_else(|| {
            Error::Crypto(format!("key {} is not in the key file", sealed.key_id))
        })?;
        let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte key");
        let aad = associated_data(sealed.key_id, record, field);
        cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                Error::Crypto(format!(
                    "{record}/{field} does not decrypt: wrong key, or moved"
                ))
            })
    }

    /// Writes the key file, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut text =
            format!("{FILE_HEADER}\n# the encrypted fields of this cluster cannot be read.\n");
        for (id, key) in &self.keys {
            text.push_str(&format!("{id}:{}\n", hex(key)));
        }
        let io = |e: std::io::Error| Error::Io(format!("writing key file {}: {e}", path.display()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(path).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Replaces the key file atomically (write a temporary file, sync, rename), for
    /// rotation. The old file's keys must all still be in this ring.
    pub fn save_replacing(&self, path: &Path) -> Result<(), Error> {
        let old = KeyRing::load(path)?;
        if let Some(missing) = old.keys.keys().find(|id| !self.keys.contains_key(id)) {
            return Err(Error::Crypto(format!(
                "refusing to drop key {missing} from {}",
                path.display()
            )));
        }
        let tmp = path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        self.save(&tmp)?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::Io(format!("replacing key file {}: {e}", path.display())))
    }

    pub fn load(path: &Path) -> Result<KeyRing, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io(format!("reading key file {}: {e}", path.display())))?;
        let mut keys = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                Error::Crypto(format!(
                    "{} line {}: expected `<id>:<64 hex digits>`",
                    path.display(),
                    n + 1
                ))
            };
            let (id, key) = line.split_once(':').ok_or_else(bad)?;
            let id: u32 = id.parse().map_err(|_| bad())?;
            let key = unhex(key).ok_or_else(bad)?;
            keys.insert(id, key);
        }
        if keys.is_empty() {
            return Err(Error::Crypto(format!("{} holds no keys", path.display())));
        }
        Ok(KeyRing { keys })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_in_place() {
        let ring = KeyRing::generate();
        let s = ring.seal("account/alice@example.com", "ha1.MD5", b"secret-ha1");
        assert!(!s.ciphertext.windows(10).any(|w| w == b"secret-ha1"));
        assert_eq!(
            ring.open(&s, "account/alice@example.com", "ha1.MD5")
                .unwrap(),
            b"secret-ha1"
        );
        assert!(
            ring.open(&s, "account/bob@example.com", "ha1.MD5").is_err(),
            "moved to another record"
        );
        assert!(
            ring.open(&s, "account/alice@example.com", "ha1.SHA-256")
                .is_err(),
            "moved to another field"
        );
        let other = KeyRing::generate();
        assert!(other
            .open(&s, "account/alice@example.com", "ha1.MD5")
            .is_err());
        let again = ring.seal("account/alice@example.com", "ha1.MD5", b"secret-ha1");
        assert_ne!(again.nonce, s.nonce, "fresh nonce every time");
    }

    #[test]
    fn rotation_keeps_old_values_readable() {
        let mut ring = KeyRing::generate();
        let old = ring.seal("r", "f", b"x");
        assert_eq!(ring.rotate(), 2);
        let new = ring.seal("r", "f", b"y");
        assert_eq!((old.key_id, new.key_id), (1, 2));
        assert_eq!(ring.open(&old, "r", "f").unwrap(), b"x");
        assert_eq!(ring.open(&new, "r", "f").unwrap(), b"y");
    }

    #[test]
    fn key_file_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let mut ring = KeyRing::generate();
        ring.rotate();
        ring.save(&path).unwrap();
        assert!(ring.save(&path).is_err(), "never overwrites a key file");
        let loaded = KeyRing::load(&path).unwrap();
        let s = ring.seal("r", "f", b"v");
        assert_eq!(loaded.open(&s, "r", "f").unwrap(), b"v");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        std::fs::write(dir.path().join("bad.key"), "1:zz\n").unwrap();
        let err = KeyRing::load(&dir.path().join("bad.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
