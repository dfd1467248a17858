//! SIP digest authentication (RFC 3261 §22, RFC 8760), without I/O.
//!
//! - Passwords exist only as per-algorithm HA1 values, `H(user:realm:password)`.
//! - Nonces are stateless (node/DESIGN.md, "Stateless nonces"):
//!   `<issued-at>.<node>.<random>.<HMAC>` under a key every node derives from the cluster's
//!   master key, so any node can tell a nonce of this cluster from a forgery. Only the node
//!   that issued a nonce accepts credentials on it; the others, and the issuer once it is
//!   past its lifetime, answer `stale=true`, and the client simply retries on a new nonce.
//! - MD5 and SHA-256 are offered in the configured order (clients take the first they
//!   support; many phones fail on SHA-256 when it comes first), always with `qop="auth"`.
//! - Replays are refused: a nonce-count must grow for each nonce, and since a nonce is
//!   only good on the node that issued it, that node's record of the counts it has seen
//!   covers every use. Past the record's capacity, a nonce issued before the newest one
//!   forgotten is answered `stale=true` rather than trusted with any count.

use crate::hex::encode as hex;
use std::collections::{HashMap, VecDeque};

use md5::Digest as _;
use ring::hmac;
use tandem_sip::headers::AuthHeader;

/// A digest algorithm Tandem speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    /// Every algorithm, strongest first (the configured order decides what is offered).
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Md5];

    /// The name in `algorithm=` and the key of a sealed HA1.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// `algorithm=` as a client writes it; absent means MD5 (RFC 2617).
    pub fn parse(s: Option<&str>) -> Option<Algorithm> {
        match s {
            None => Some(Algorithm::Md5),
            Some(s) if s.eq_ignore_ascii_case("MD5") => Some(Algorithm::Md5),
            Some(s) if s.eq_ignore_ascii_case("SHA-256") => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    /// The lowercase hex digest of `data`.
    pub fn hex(self, data: &str) -> String {
        self.hex_of(&[data])
    }

    /// The lowercase hex digest of `parts` one after another, hashed as they are rather
    /// than joined into a string first.
    pub fn hex_of(self, parts: &[&str]) -> String {
        match self {
            Algorithm::Md5 => {
                let mut h = md5::Md5::new();
                for p in parts {
                    h.update(p.as_bytes());
                }
                hex(&h.finalize())
            }
            Algorithm::Sha256 => {
                let mut h = ring::digest::Context::new(&ring::digest::SHA256);
                for p in parts {
                    h.update(p.as_bytes());
                }
                hex(h.finish().as_ref())
            }
        }
    }
}

/// `H(user:realm:password)`, what an account stores instead of its password.
pub fn ha1(algorithm: Algorithm, user: &str, realm: &str, password: &str) -> String {
    algorithm.hex(&format!("{user}:{realm}:{password}"))
}

/// Whether a nonce is ours and how old.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceCheck {
    /// Issued by this node, at this second, within its lifetime.
    Fresh(u64),
    /// This cluster's, but past its lifetime or issued by another node: the client should
    /// retry with a new one (`stale=true`).
    Stale,
    /// Not issued by this cluster for this realm.
    Invalid,
}

/// Issues and checks stateless nonces.
pub struct NonceKey {
    keys: std::sync::RwLock<NonceKeys>,
    lifetime_secs: u64,
    /// This node's id, written into every nonce it issues.
    node: String,
}

/// The keys nonces are signed and checked with, each derived from one master key.
struct NonceKeys {
    /// The id of the master key new nonces are signed under.
    issue_id: u32,
    /// Every key the node holds, by master key id, newest first: a nonce signed under
    /// any of them is this cluster's.
    all: Vec<(u32, hmac::Key)>,
}

impl NonceKeys {
    fn new(secrets: &[(u32, [u8; 32])], issue_id: u32) -> NonceKeys {
        let all: Vec<(u32, hmac::Key)> = secrets
            .iter()
            .map(|(id, secret)| (*id, hmac::Key::new(hmac::HMAC_SHA256, secret)))
            .collect();
        let issue_id = if all.iter().any(|(id, _)| *id == issue_id) {
            issue_id
        } else {
            all.first().map_or(0, |(id, _)| *id)
        };
        NonceKeys { issue_id, all }
    }
}

impl NonceKey {
    /// `secrets` (by master key id, newest first; at least one) are shared by every node
    /// holding those keys (derived from the master keys); new nonces are signed under
    /// `issue_id`'s. `node` is this node's id.
    pub fn new(
        secrets: &[(u32, [u8; 32])],
        issue_id: u32,
        lifetime_secs: u64,
        node: u64,
    ) -> NonceKey {
        NonceKey {
            keys: std::sync::RwLock::new(NonceKeys::new(secrets, issue_id)),
            lifetime_secs,
            node: format!("{node:x}"),
        }
    }

    /// Replaces the keys, after the key file was loaded again or the nodes agreed on
    /// another key to sign under (see `Authenticator::agree_on_nonce_keys`).
    pub fn set_keys(&self, secrets: &[(u32, [u8; 32])], issue_id: u32) {
        *self.keys.write().expect("nonce keys") = NonceKeys::new(secrets, issue_id);
    }

    /// The id of the master key new nonces are signed under.
    pub fn issue_id(&self) -> u32 {
        self.keys.read().expect("nonce keys").issue_id
    }

    fn mac(key: &hmac::Key, issued: &str, node: &str, salt: &str, realm: &str) -> String {
        let mut mac = hmac::Context::with_key(key);
        for part in [issued, ".", node, ".", salt, ".", realm] {
            mac.update(part.as_bytes());
        }
        hex(&mac.sign().as_ref()[..16])
    }

    /// A new nonce: `<issued-at>.<node>.<random>.<MAC>`. The random part makes every
    /// challenge's nonce unique, so nonce-counts of different clients never collide.
    pub fn issue(&self, realm: &str, now_secs: u64) -> String {
        use rand::RngCore;
        let mut salt = [0u8; 8];
        // A CSPRNG seeded from the OS, without a system call per challenge.
        rand::thread_rng().fill_bytes(&mut salt);
        let (issued, salt) = (format!("{now_secs:x}"), hex(&salt));
        let mac = {
            let keys = self.keys.read().expect("nonce keys");
            let key = keys
                .all
                .iter()
                .find(|(id, _)| *id == keys.issue_id)
                .map(|(_, k)| k)
                .expect("the key to issue under is one of the keys");
            Self::mac(key, &issued, &self.node, &salt, realm)
        };
        format!("{issued}.{}.{salt}.{mac}", self.node)
    }

    /// When `nonce` was issued, if this cluster issued it for `realm` (any node, any
    /// age, its MAC checked): proof that whoever holds it received it at the address the
    /// realm scope names.
    pub fn issued_at(&self, nonce: &str, realm: &str, now_secs: u64) -> Option<u64> {
        match self.check(nonce, realm, now_secs) {
            NonceCheck::Invalid => None,
            _ => u64::from_str_radix(nonce.split('.').next()?, 16).ok(),
        }
    }

    pub fn check(&self, nonce: &str, realm: &str, now_secs: u64) -> NonceCheck {
        let mut parts = nonce.splitn(4, '.');
        let (Some(issued_hex), Some(node), Some(salt), Some(mac)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return NonceCheck::Invalid;
        };
        let Ok(issued) = u64::from_str_radix(issued_hex, 16) else {
            return NonceCheck::Invalid;
        };
        // Any key the node holds: during a key rotation, nodes sign under the key they all
        // hold, and a nonce signed under an older key stays good for its lifetime.
        let signed = self
            .keys
            .read()
            .expect("nonce keys")
            .all
            .iter()
            .any(|(_, key)| {
                same(
                    mac.as_bytes(),
                    Self::mac(key, issued_hex, node, salt, realm).as_bytes(),
                )
            });
        if !signed {
            return NonceCheck::Invalid;
        }
        // A nonce from the future (another node's clock ahead) is accepted within a minute.
        if issued > now_secs + 60 {
            return NonceCheck::Invalid;
        }
        if node != self.node || now_secs.saturating_sub(issued) > self.lifetime_secs {
            NonceCheck::Stale
        } else {
            NonceCheck::Fresh(issued)
        }
    }
}

/// Compares without leaking where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `WWW-Authenticate` (or `Proxy-Authenticate`) value of a challenge for `algorithm`.
pub fn challenge(algorithm: Algorithm, realm: &str, nonce: &str, stale: bool) -> String {
    format!(
        "Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{}",
        algorithm.name(),
        if stale { ", stale=true" } else { "" }
    )
}

/// The parameters of an `Authorization` header that digest needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Algorithm,
    /// `(qop, nc, cnonce)` when the client used qop=auth.
    pub qop: Option<(String, u32, String)>,
}

impl Credentials {
    /// Reads digest credentials, taking their values out of `h` rather than copying them
    /// (this runs on every authenticated REGISTER and call); `Err` says what is missing or
    /// wrong.
    pub fn from_header(mut h: AuthHeader) -> Result<Credentials, String> {
        if !h.scheme.eq_ignore_ascii_case("Digest") {
            return Err(format!("unsupported scheme {}", h.scheme));
        }
        let mut take = |name: &str| {
            h.params
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| std::mem::take(v))
        };
        let algorithm_param = take("algorithm");
        let algorithm = Algorithm::parse(algorithm_param.as_deref())
            .ok_or_else(|| format!("unsupported algorithm {algorithm_param:?}"))?;
        let mut need = |name: &str| take(name).ok_or(format!("no {name}"));
        let qop = match need("qop").ok() {
            None => None,
            Some(q) if q.eq_ignore_ascii_case("auth") => {
                let nc = u32::from_str_radix(&need("nc")?, 16).map_err(|_| "bad nc".to_owned())?;
                Some(("auth".to_owned(), nc, need("cnonce")?))
            }
            Some(q) => return Err(format!("unsupported qop {q}")),
        };
        Ok(Credentials {
            username: need("username")?,
            realm: need("realm")?,
            nonce: need("nonce")?,
            uri: need("uri")?,
            response: need("response")?,
            algorithm,
            qop,
        })
    }

    /// Whether `response` is right for `ha1` (hex, this algorithm) and `method`.
    pub fn verify(&self, ha1: &str, method: &str) -> bool {
        let expected = response(
            self.algorithm,
            ha1,
            &self.nonce,
            self.qop
                .as_ref()
                .map(|(q, nc, c)| (q.as_str(), *nc, c.as_str())),
            method,
            &self.uri,
        );
        same(
            expected.as_bytes(),
            self.response.to_ascii_lowercase().as_bytes(),
        )
    }
}

/// The digest `response` a client computes (RFC 2617 §3.2.2.1, RFC 8760).
pub fn response(
    algorithm: Algorithm,
    ha1: &str,
    nonce: &str,
    qop: Option<(&str, u32, &str)>,
    method: &str,
    uri: &str,
) -> String {
    let ha2 = algorithm.hex_of(&[method, ":", uri]);
    match qop {
        Some((qop, nc, cnonce)) => {
            // nc as eight hex digits, as the client wrote it (RFC 2617 §3.2.2).
            let nc = hex(&nc.to_be_bytes());
            algorithm.hex_of(&[ha1, ":", nonce, ":", &nc, ":", cnonce, ":", qop, ":", &ha2])
        }
        None => algorithm.hex_of(&[ha1, ":", nonce, ":", &ha2]),
    }
}

/// What the replay guard says about a nonce-count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Never used with this count or a higher one: accepted, and recorded.
    Fresh,
    /// The request that last used this count, sent again within the client's
    /// retransmission window (see [`ReplayGuard::accept`]): accepted as that request.
    Retransmission,
    /// Used before with this count or a higher one.
    Replayed,
    /// Not on record, but issued no later than a nonce the guard has had to forget, so
    /// it may have been used: the client must take a new nonce (`stale=true`).
    Forgotten,
}

/// The replay bound of the node that issued the nonces: for each nonce seen, the highest
/// nonce-count used with it, and which request used it and when. A nonce-count that does
/// not grow is a replay, unless it is that same request retransmitted. Past `capacity`
/// nonces, the one first seen longest ago is forgotten, and the guard remembers the
/// newest issue time it has forgotten: a nonce issued no later than that and not on
/// record is `Forgotten`, never trusted afresh. So the record covers every nonce for its
/// whole lifetime, whatever the rate of logins. A nonce past its lifetime is refused as
/// stale before the guard is asked, so its record is dropped then, and the tables shrink
/// once a load has passed.
///
/// The guard is full for the whole lifetime of the nonces a load used (five minutes by
/// default), so its size per nonce is what a node keeps after a load peak. It is laid out
/// for that: the records sit in a ring in the order first seen (16 bytes each), found
/// through an open-addressed index of 4-byte slots that name a record's place in the ring
/// and carry 12 more bits of the nonce's hash; 100,000 nonces take about 2.1 MB (a
/// `HashMap` and an order queue took 4.3 MB). Both grow by doubling up to `capacity`, and
/// once three quarters are empty shrink to twice what they hold.
pub struct ReplayGuard {
    /// The ring, first seen at `head`, `len` records from there (wrapping). Its length is
    /// its room; `Vec::new()` when the guard is empty.
    records: Vec<NonceRecord>,
    head: usize,
    len: usize,
    /// Linear probing, a power of two long, 0 for an empty slot, otherwise
    /// `tag << INDEX_PLACE_BITS | (place in the ring + 1)`, where `tag` is 12 bits of the
    /// hash that [`NonceRecord::key`] does not hold. A slot's home is its record's `key`.
    index: Vec<u32>,
    capacity: usize,
    lifetime_secs: u64,
    forgotten_upto: Option<u64>,
    /// Keyed per process, so nobody can aim for a collision of nonces. 44 bits of the hash
    /// are compared (2^-44 per pair of live nonces); two nonces that did collide would
    /// share one record, which mostly costs a client one more challenge, but could let a
    /// count used on one of them be used again once the other's record went.
    hasher: std::collections::hash_map::RandomState,
}

/// One nonce: 32 bits of its keyed hash, when it was issued, and its last use (the count,
/// a tag of the request that used it, how many seconds after issue, and whether its
/// retransmissions are still taken). Times are Unix seconds (they fit 32 bits until 2106).
///
/// The request tag is 16 bits of a keyed hash. It tells a client's own retransmission from
/// a second request on the same count; it is no defence against an eavesdropper, who can
/// copy the request's identifiers as they are. So that nobody can find a request that
/// passes for the retransmission by trying many (one in 65,536 each), the first request on
/// the same count that is not taken as the retransmission ends the retransmissions of that
/// count: one try, then the client itself is challenged afresh if it retransmits.
///
/// The last use is kept to 32,767 s after issue (a longer nonce lifetime is allowed): a
/// later use is recorded as then, which only shortens a retransmission's window, and a
/// clock that has gone back since the last use closes the window.
#[derive(Clone, Copy, Default)]
struct NonceRecord {
    key: u32,
    issued: u32,
    nc: u32,
    /// The request's tag in the high 16 bits; [`RETRANSMISSIONS_ENDED`], and seconds from
    /// issue to last use, in the low.
    last_use: u32,
}

/// The bit of [`NonceRecord::last_use`] that says the count's retransmissions are over.
const RETRANSMISSIONS_ENDED: u32 = 0x8000;
/// The most seconds from issue to last use a record holds.
const SINCE_ISSUE_MAX: u64 = 0x7fff;

impl NonceRecord {
    fn request(&self) -> u16 {
        (self.last_use >> 16) as u16
    }

    /// When it was last used, in Unix seconds.
    fn used_at(&self) -> u64 {
        u64::from(self.issued) + u64::from(self.last_use & SINCE_ISSUE_MAX as u32)
    }

    /// Whether `request` at `now` is the last use sent again within the window.
    fn retransmitted(&self, nc: u32, request: u16, now: u64) -> bool {
        nc == self.nc
            && request == self.request()
            && self.last_use & RETRANSMISSIONS_ENDED == 0
            && now
                .checked_sub(self.used_at())
                .is_some_and(|d| d <= RETRANSMISSION_WINDOW_SECS)
    }

    fn use_now(&mut self, nc: u32, request: u16, now: u64) {
        let since = now
            .saturating_sub(u64::from(self.issued))
            .min(SINCE_ISSUE_MAX) as u32;
        self.nc = nc;
        self.last_use = u32::from(request) << 16 | since;
    }
}

/// How long after a request the same request may come again as a retransmission: a UDP
/// client retransmits a non-INVITE request until its Timer F, 64*T1 (32 s with RFC 3261's
/// T1 of 500 ms).
pub const RETRANSMISSION_WINDOW_SECS: u64 = 32;

/// Bits of an index slot that hold a place in the ring (plus one); the rest is a tag.
const INDEX_PLACE_BITS: u32 = 20;
const INDEX_PLACE_MASK: u32 = (1 << INDEX_PLACE_BITS) - 1;
/// The most nonces a guard can hold: every place plus one must fit its bits.
const MAX_NONCES: usize = INDEX_PLACE_MASK as usize - 1;
/// The smallest ring a guard that holds anything keeps.
const MIN_RING: usize = 64;

impl ReplayGuard {
    /// A guard for up to `capacity` nonces (at most about a million) that live
    /// `lifetime_secs`.
    pub fn new(capacity: usize, lifetime_secs: u64) -> ReplayGuard {
        ReplayGuard {
            records: Vec::new(),
            head: 0,
            len: 0,
            index: Vec::new(),
            capacity: capacity.clamp(1, MAX_NONCES),
            lifetime_secs,
            forgotten_upto: None,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Nonces it remembers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Checks and records `(nonce, nc)` for a nonce issued at `issued`, used at `now`
    /// (both in seconds) by `request`: whatever names one request among its
    /// retransmissions (RFC 3261 §17.2.3: the top Via's branch and sent-by, with the
    /// Call-ID and CSeq). The count of the nonce's last use is accepted again only for
    /// that same request within [`RETRANSMISSION_WINDOW_SECS`], and only until another
    /// request has tried that count: the registrar answers its 200 without keeping a
    /// transaction, so a REGISTER whose 200 was lost comes back here as it was sent.
    pub fn accept(
        &mut self,
        nonce: &str,
        issued: u64,
        nc: u32,
        request: impl std::hash::Hash,
        now: u64,
    ) -> Replay {
        self.drop_dead(now);
        let hash = self.hash(nonce);
        let request = self.request_tag(request);
        match self.find(hash) {
            Some(place) => {
                let last = &mut self.records[place];
                if last.retransmitted(nc, request, now) {
                    Replay::Retransmission
                } else if nc <= last.nc {
                    if nc == last.nc {
                        last.last_use |= RETRANSMISSIONS_ENDED;
                    }
                    Replay::Replayed
                } else {
                    last.use_now(nc, request, now);
                    Replay::Fresh
                }
            }
            None if self.forgotten_upto.is_some_and(|f| issued <= f) => Replay::Forgotten,
            None => {
                if self.len == self.records.len() {
                    if self.len < self.capacity {
                        self.resize((self.len * 2).max(MIN_RING).min(self.capacity));
                    } else {
                        let gone = u64::from(self.records[self.head].issued);
                        self.pop_oldest();
                        self.forgotten_upto = self.forgotten_upto.max(Some(gone));
                    }
                }
                let mut record = NonceRecord {
                    key: hash as u32,
                    issued: issued as u32,
                    ..NonceRecord::default()
                };
                record.use_now(nc, request, now);
                let place = (self.head + self.len) % self.records.len();
                self.records[place] = record;
                self.len += 1;
                self.index_insert(tag_of(hash), place);
                Replay::Fresh
            }
        }
    }

    fn hash(&self, nonce: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(nonce)
    }

    fn request_tag(&self, request: impl std::hash::Hash) -> u16 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(request) as u16
    }

    /// The ring place of the nonce with this hash.
    fn find(&self, hash: u64) -> Option<usize> {
        if self.index.is_empty() {
            return None;
        }
        let mask = self.index.len() - 1;
        let (key, tag) = (hash as u32, tag_of(hash));
        let mut slot = key as usize & mask;
        loop {
            let entry = self.index[slot];
            if entry == 0 {
                return None;
            }
            let place = place_of(entry);
            if entry >> INDEX_PLACE_BITS == tag && self.records[place].key == key {
                return Some(place);
            }
            slot = (slot + 1) & mask;
        }
    }

    fn index_insert(&mut self, tag: u32, place: usize) {
        let mask = self.index.len() - 1;
        let mut slot = self.records[place].key as usize & mask;
        while self.index[slot] != 0 {
            slot = (slot + 1) & mask;
        }
        self.index[slot] = tag << INDEX_PLACE_BITS | (place as u32 + 1);
    }

    /// Empties an index slot, moving back the entries after it that its being taken had
    /// pushed along (deletion without tombstones, so lookups never slow down with age).
    fn index_remove(&mut self, mut hole: usize) {
        let mask = self.index.len() - 1;
        let mut slot = hole;
        loop {
            slot = (slot + 1) & mask;
            let entry = self.index[slot];
            if entry == 0 {
                break;
            }
            let home = self.records[place_of(entry)].key as usize & mask;
            // The entry may fill the hole if the hole lies on its way from its home.
            if slot.wrapping_sub(home) & mask >= slot.wrapping_sub(hole) & mask {
                self.index[hole] = entry;
                hole = slot;
            }
        }
        self.index[hole] = 0;
    }

    /// Forgets the record first seen longest ago.
    fn pop_oldest(&mut self) {
        let place = self.head;
        let mask = self.index.len() - 1;
        let mut slot = self.records[place].key as usize & mask;
        // Its slot lies between its home and the next empty one; the search stops there
        // in any case, so a broken index could never keep it going with the lock held.
        while self.index[slot] != 0 && place_of(self.index[slot]) != place {
            slot = (slot + 1) & mask;
        }
        debug_assert_ne!(self.index[slot], 0, "a record missing from the index");
        if self.index[slot] != 0 {
            self.index_remove(slot);
        }
        self.head = (self.head + 1) % self.records.len();
        self.len -= 1;
    }

    /// Moves the records, in order, into a ring of `room` places and a new index.
    fn resize(&mut self, room: usize) {
        debug_assert!(room >= self.len);
        let ring = self.records.len();
        let mut records = vec![NonceRecord::default(); room];
        for (i, record) in records.iter_mut().enumerate().take(self.len) {
            *record = self.records[(self.head + i) % ring];
        }
        let old = std::mem::replace(&mut self.index, vec![0; index_len(room)]);
        self.records = records;
        let head = self.head;
        self.head = 0;
        for entry in old.into_iter().filter(|&e| e != 0) {
            let place = (place_of(entry) + ring - head) % ring;
            self.index_insert(entry >> INDEX_PLACE_BITS, place);
        }
    }

    /// Drops the records of nonces first seen longest ago while they are past their
    /// lifetime (the nonce check refuses those as stale before asking here), and gives
    /// the tables' room back once they are mostly empty.
    fn drop_dead(&mut self, now: u64) {
        while self.len > 0
            && now.saturating_sub(u64::from(self.records[self.head].issued)) > self.lifetime_secs
        {
            self.pop_oldest();
        }
        if self.len == 0 && !self.records.is_empty() {
            (self.records, self.index, self.head) = (Vec::new(), Vec::new(), 0);
        } else if self.records.len() > MIN_RING && self.len < self.records.len() / 4 {
            self.resize((self.len * 2).max(MIN_RING));
        }
    }
}

/// The 12 bits of a nonce's hash its index slot holds (the record holds the low 32).
fn tag_of(hash: u64) -> u32 {
    (hash >> (64 - (32 - INDEX_PLACE_BITS))) as u32
}

/// The ring place an occupied index slot names.
fn place_of(entry: u32) -> usize {
    ((entry & INDEX_PLACE_MASK) as usize).wrapping_sub(1)
}

/// An index for a ring of `room` places: at most seven eighths full.
fn index_len(room: usize) -> usize {
    (room + room / 7 + 1).next_power_of_two()
}

/// Online password guessing is bounded per key (a client address, or an address and the
/// account it tries): after `max_failures` failed attempts within `window`, the key is
/// refused without a credential check until `lockout` has passed. Only failures that prove
/// a round trip are recorded (see `Authenticator::authenticate`), so nobody can lock out
/// an address they cannot receive at. Time comes in as an argument (tokio's clock in the
/// node).
///
/// The table holds at most `capacity` keys; past that, the key first recorded longest ago
/// is forgotten (O(1): a queue in recording order, each entry tagged so a key recorded
/// again is not forgotten by its old place in the queue).
pub struct FailureLimiter<K> {
    max_failures: u32,
    window: std::time::Duration,
    lockout: std::time::Duration,
    seen: HashMap<K, Failures>,
    order: VecDeque<(K, u64)>,
    next_tag: u64,
    capacity: usize,
}

/// One key's failures in its current window, when that window began, the end of a
/// lockout if one is running, and its tag in the recording queue.
struct Failures {
    count: u32,
    since: tokio::time::Instant,
    until: Option<tokio::time::Instant>,
    tag: u64,
}

impl<K: std::hash::Hash + Eq + Clone> FailureLimiter<K> {
    pub fn new(
        max_failures: u32,
        window: std::time::Duration,
        lockout: std::time::Duration,
        capacity: usize,
    ) -> Self {
        FailureLimiter {
            max_failures,
            window,
            lockout,
            seen: HashMap::new(),
            order: VecDeque::new(),
            next_tag: 0,
            capacity: capacity.max(1),
        }
    }

    /// Whether `key` is locked out at `now`.
    pub fn locked(&self, key: &K, now: tokio::time::Instant) -> bool {
        self.seen
            .get(key)
            .is_some_and(|f| f.until.is_some_and(|u| now < u))
    }

    /// Keys in the table.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Records a failure; true if it starts a lockout.
    pub fn failed(&mut self, key: &K, now: tokio::time::Instant) -> bool {
        if !self.seen.contains_key(key) {
            while self.seen.len() >= self.capacity {
                let Some((old, tag)) = self.order.pop_front() else {
                    break;
                };
                if self.seen.get(&old).is_some_and(|f| f.tag == tag) {
                    self.seen.remove(&old);
                }
            }
            let tag = self.next_tag;
            self.next_tag += 1;
            self.order.push_back((key.clone(), tag));
            self.seen.insert(
                key.clone(),
                Failures {
                    count: 0,
                    since: now,
                    until: None,
                    tag,
                },
            );
        }
        let f = self.seen.get_mut(key).expect("inserted above");
        if now.duration_since(f.since) >= self.window || f.until.is_some_and(|u| now >= u) {
            (f.count, f.since, f.until) = (0, now, None);
        }
        f.count += 1;
        if f.count >= self.max_failures && f.until.is_none() {
            f.until = Some(now + self.lockout);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_the_config_accepts_is_one_digest_knows() {
        let known: Vec<Algorithm> = crate::config::DIGEST_ALGORITHMS
            .iter()
            .map(|name| Algorithm::parse(Some(name)).expect(name))
            .collect();
        assert_eq!(known, vec![Algorithm::Md5, Algorithm::Sha256]);
        for name in crate::config::DIGEST_ALGORITHMS {
            let lower = name.to_ascii_lowercase();
            assert!(Algorithm::parse(Some(&lower)).is_some(), "{lower}");
        }
        assert_eq!(Algorithm::parse(Some("SHA-512")), None);
    }

    #[test]
    fn rfc_2617_example_response() {
        // RFC 2617 §3.5: Mufasa / "Circle Of Life".
        let ha1 = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        let r = response(
            Algorithm::Md5,
            &ha1,
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            Some(("auth", 1, "0a4f113b")),
            "GET",
            "/dir/index.html",
        );
        assert_eq!(r, "6629fae49393a05397450978507c4ef1");
    }

    #[test]
    fn rfc_7616_sha256_example_response() {
        // RFC 7616 §3.9.1, the SHA-256 variant of the same exchange.
        let ha1 = ha1(
            Algorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        let r = response(
            Algorithm::Sha256,
            &ha1,
            "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            Some(("auth", 1, "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")),
            "GET",
            "/dir/index.html",
        );
        assert_eq!(
            r,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn nonces_verify_on_any_node_with_the_secret_and_go_stale() {
        let a = NonceKey::new(&[(1, [7; 32])], 1, 300, 1);
        let b = NonceKey::new(&[(1, [7; 32])], 1, 300, 2);
        let other = NonceKey::new(&[(1, [8; 32])], 1, 300, 1);
        let n = a.issue("example.com", 1_000);
        assert_ne!(
            n,
            a.issue("example.com", 1_000),
            "every challenge gets its own nonce"
        );
        assert_eq!(a.check(&n, "example.com", 1_100), NonceCheck::Fresh(1_000));
        assert_eq!(a.check(&n, "example.com", 1_301), NonceCheck::Stale);
        // Another node of the cluster knows it for one of ours, issued elsewhere.
        assert_eq!(b.check(&n, "example.com", 1_100), NonceCheck::Stale);
        assert_eq!(a.check(&n, "example.org", 1_100), NonceCheck::Invalid);
        assert_eq!(other.check(&n, "example.com", 1_100), NonceCheck::Invalid);
        assert_eq!(
            a.check("garbage", "example.com", 1_100),
            NonceCheck::Invalid
        );
        // A clock may run a little behind the one that issued, not minutes.
        assert_eq!(a.check(&n, "example.com", 950), NonceCheck::Fresh(1_000));
        assert_eq!(a.check(&n, "example.com", 900), NonceCheck::Invalid);
        let tampered = n.replacen(char::is_alphanumeric, "f", 1);
        assert!(!matches!(
            a.check(&tampered, "example.com", 1_100),
            NonceCheck::Fresh(_)
        ));
        // The node part is under the MAC: claiming another node breaks it.
        let mut parts: Vec<&str> = n.split('.').collect();
        parts[1] = "2";
        assert_eq!(
            b.check(&parts.join("."), "example.com", 1_100),
            NonceCheck::Invalid
        );
    }

    /// Through a key rotation: a node that holds the new key as well signs under the one
    /// it was told every node holds, and takes nonces signed under either; once signing
    /// moves to the new key, nonces under the old one stay good until they go stale.
    #[test]
    fn nonces_survive_a_key_rotation_between_nodes() {
        let (old, new) = ((1, [7; 32]), (2, [9; 32]));
        let rotated = NonceKey::new(&[new, old], 1, 300, 1);
        let not_yet = NonceKey::new(&[old], 1, 300, 2);
        assert_eq!(rotated.issue_id(), 1);
        let from_rotated = rotated.issue("example.com", 1_000);
        let from_not_yet = not_yet.issue("example.com", 1_000);
        assert_eq!(
            not_yet.check(&from_rotated, "example.com", 1_100),
            NonceCheck::Stale
        );
        assert_eq!(
            rotated.check(&from_not_yet, "example.com", 1_100),
            NonceCheck::Stale
        );
        // Every node holds the new key now: signing moves to it.
        not_yet.set_keys(&[new, old], 2);
        rotated.set_keys(&[new, old], 2);
        let signed_new = rotated.issue("example.com", 1_200);
        assert_eq!(
            not_yet.check(&signed_new, "example.com", 1_250),
            NonceCheck::Stale
        );
        assert_eq!(
            rotated.check(&from_rotated, "example.com", 1_250),
            NonceCheck::Fresh(1_000)
        );
        // Without the old key, only its nonces fail.
        rotated.set_keys(&[new], 2);
        assert_eq!(
            rotated.check(&from_rotated, "example.com", 1_250),
            NonceCheck::Invalid
        );
        assert_eq!(
            rotated.check(&signed_new, "example.com", 1_250),
            NonceCheck::Fresh(1_200)
        );
        // An id the node does not hold falls back to its newest key.
        rotated.set_keys(&[new, old], 5);
        assert_eq!(rotated.issue_id(), 2);
    }

    #[test]
    fn a_challenge_names_its_algorithm_and_asks_for_qop_auth() {
        let c = challenge(Algorithm::Sha256, "example.com", "n1", true);
        assert!(c.contains("algorithm=SHA-256") && c.contains("qop=\"auth\""));
        assert!(c.ends_with("stale=true"));
        let c = challenge(Algorithm::Md5, "example.com", "n1", false);
        assert!(c.contains("algorithm=MD5") && !c.contains("stale"));
    }

    #[test]
    fn credentials_parse_and_verify() {
        let ha1 = ha1(Algorithm::Md5, "alice", "example.com", "secret");
        let resp = response(
            Algorithm::Md5,
            &ha1,
            "n1",
            Some(("auth", 1, "c1")),
            "REGISTER",
            "sip:example.com",
        );
        let header = AuthHeader::parse(
            &format!(
                "Digest username=\"alice\", realm=\"example.com\", nonce=\"n1\", \
                 uri=\"sip:example.com\", response=\"{resp}\", qop=auth, nc=00000001, \
                 cnonce=\"c1\", algorithm=MD5"
            ),
            "Authorization",
        )
        .unwrap();
        let c = Credentials::from_header(header).unwrap();
        assert!(c.verify(&ha1, "REGISTER"));
        assert!(!c.verify(&ha1, "INVITE"));
        let wrong = super::ha1(Algorithm::Md5, "alice", "example.com", "guess");
        assert!(!c.verify(&wrong, "REGISTER"));

        let basic = AuthHeader::parse("Basic abc=1", "Authorization").unwrap();
        assert!(Credentials::from_header(basic).is_err());
    }

    #[test]
    fn repeated_failures_lock_a_key_out_for_a_while() {
        use std::time::Duration;
        let limiter =
            || FailureLimiter::new(3, Duration::from_secs(60), Duration::from_secs(300), 10);
        let mut l = limiter();
        let (ip, other): (std::net::IpAddr, std::net::IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = tokio::time::Instant::now();
        assert!(!l.failed(&ip, t0));
        assert!(!l.failed(&ip, t0 + Duration::from_secs(1)));
        assert!(!l.locked(&ip, t0 + Duration::from_secs(2)));
        assert!(l.failed(&ip, t0 + Duration::from_secs(2)));
        assert!(l.locked(&ip, t0 + Duration::from_secs(100)));
        assert!(!l.locked(&other, t0 + Duration::from_secs(100)));
        assert!(!l.locked(&ip, t0 + Duration::from_secs(303)));
        // Failures spread wider than the window never lock.
        let mut slow = limiter();
        for i in 0..10 {
            assert!(!slow.failed(&ip, t0 + Duration::from_secs(61 * i)));
        }
    }

    #[test]
    fn the_failure_table_forgets_the_oldest_key_past_its_capacity() {
        use std::time::Duration;
        let mut l = FailureLimiter::new(2, Duration::from_secs(60), Duration::from_secs(300), 3);
        let t0 = tokio::time::Instant::now();
        for k in 0..3u32 {
            l.failed(&k, t0);
        }
        // Key 0 is recorded again: its place in the queue is its first one, still.
        assert!(l.failed(&0, t0));
        assert!(l.locked(&0, t0));
        l.failed(&3, t0);
        assert_eq!(l.len(), 3);
        assert!(!l.locked(&0, t0), "the oldest key went, locked or not");
        for k in 4..1000u32 {
            l.failed(&k, t0);
            assert!(l.len() <= 3);
        }
    }

    /// The guard's ring and index against a model of its rules on plain tables (a map from
    /// nonce to its record and a queue in the order first seen, as the guard was first
    /// built), over a random mix of new nonces, reuses, retransmissions, time passing and
    /// going back, nonces issued ahead of the clock, and the capacity filling, at
    /// capacities from one to past the smallest ring: every answer and what it holds must
    /// be the same, and the index must name every record once, each where a lookup from
    /// its home finds it.
    #[test]
    fn the_guard_answers_as_a_plain_map_and_queue_would() {
        for capacity in [1, 2, 63, 65, 300] {
            let steps = if capacity == 300 { 200_000 } else { 30_000 };
            let (most, shrunk, answers) = guard_against_model(capacity, steps);
            assert_eq!(most, capacity, "the ring grew to the capacity");
            if capacity == 300 {
                assert!(shrunk, "and gave its room back once its nonces died");
                assert!(
                    answers.iter().all(|&n| n > 100),
                    "every answer came up: {answers:?}"
                );
            }
        }
    }

    /// Runs `steps` random uses through a guard of `capacity` and the model; returns the
    /// largest ring, whether it shrank while it held something, and the count of each answer.
    fn guard_against_model(capacity: usize, steps: u32) -> (usize, bool, [u32; 4]) {
        /// Issue time, count, request tag, last use, retransmissions ended.
        type Record = (u64, u32, u16, u64, bool);
        let lifetime = 60;
        let mut g = ReplayGuard::new(capacity, lifetime);
        let mut seen: HashMap<String, Record> = HashMap::new();
        let mut order: VecDeque<String> = VecDeque::new();
        let mut forgotten_upto: Option<u64> = None;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ capacity as u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = 1_000u64;
        let mut nonces: Vec<(String, u64)> = Vec::new();
        let (mut most, mut shrunk) = (0, false);
        let mut answers = [0u32; 4];
        for step in 0..steps {
            match next(1000) {
                0..=9 => now += next(5),
                10 => now += lifetime / 2,
                11 => now = now.saturating_sub(next(40)),
                _ => {}
            }
            let (nonce, issued) = if nonces.is_empty() || next(3) == 0 {
                // Mostly issued just before now; now and then ahead of the clock.
                let issued = if next(50) == 0 {
                    now + next(70)
                } else {
                    now - next(3)
                };
                let n = (format!("n{step}"), issued);
                nonces.push(n.clone());
                if nonces.len() > 2_000 {
                    nonces.drain(..1_000);
                }
                n
            } else {
                nonces[nonces.len() - 1 - next(nonces.len().min(400) as u64) as usize].clone()
            };
            let nc = 1 + next(4) as u32;
            let request = next(3);
            let tag = g.request_tag(request);
            let got = g.accept(&nonce, issued, nc, request, now);
            // The model: the same rules on the plain tables.
            while let Some(oldest) = order.front() {
                if now.saturating_sub(seen[oldest].0) <= lifetime {
                    break;
                }
                seen.remove(oldest);
                order.pop_front();
            }
            let last_use = |issued: u64| issued + now.saturating_sub(issued).min(0x7fff);
            let want = match seen.get_mut(&nonce) {
                Some(r)
                    if nc == r.1
                        && tag == r.2
                        && !r.4
                        && now.checked_sub(r.3).is_some_and(|d| d <= 32) =>
                {
                    Replay::Retransmission
                }
                Some(r) if nc <= r.1 => {
                    r.4 |= nc == r.1;
                    Replay::Replayed
                }
                Some(r) => {
                    *r = (r.0, nc, tag, last_use(r.0), false);
                    Replay::Fresh
                }
                None if forgotten_upto.is_some_and(|f| issued <= f) => Replay::Forgotten,
                None => {
                    if seen.len() == capacity {
                        let old = order.pop_front().unwrap();
                        let gone = seen.remove(&old).unwrap().0;
                        forgotten_upto = forgotten_upto.max(Some(gone));
                    }
                    seen.insert(nonce.clone(), (issued, nc, tag, last_use(issued), false));
                    order.push_back(nonce.clone());
                    Replay::Fresh
                }
            };
            assert_eq!(
                got, want,
                "capacity {capacity}, step {step}: {nonce} issued {issued}, nc {nc}, at {now}"
            );
            answers[got as usize] += 1;
            assert_eq!(g.len(), seen.len(), "capacity {capacity}, step {step}");
            let mask = g.index.len().wrapping_sub(1);
            let mut places = Vec::new();
            for (slot, &e) in g.index.iter().enumerate().filter(|(_, &e)| e != 0) {
                let place = place_of(e);
                let from_head = (place + g.records.len() - g.head) % g.records.len();
                assert!(
                    from_head < g.len(),
                    "step {step}: a slot names a place with no record"
                );
                // Linear probing: no empty slot between a record's home and its slot.
                let mut at = g.records[place].key as usize & mask;
                while at != slot {
                    assert_ne!(
                        g.index[at], 0,
                        "step {step}: a slot its lookup cannot reach"
                    );
                    at = (at + 1) & mask;
                }
                places.push(place);
            }
            places.sort_unstable();
            places.dedup();
            assert_eq!(
                places.len(),
                g.len(),
                "step {step}: the index names every record once"
            );
            most = most.max(g.records.len());
            shrunk |= g.len() > 0 && g.records.len() < most / 2;
        }
        (most, shrunk, answers)
    }

    #[test]
    fn a_nonce_count_must_grow_and_a_forgotten_nonce_is_never_trusted() {
        let mut g = ReplayGuard::new(2, 300);
        let t = 100;
        assert_eq!(g.accept("n1", 10, 1, "a", t), Replay::Fresh);
        assert_eq!(g.accept("n1", 10, 1, "b", t), Replay::Replayed);
        assert_eq!(g.accept("n1", 10, 2, "b", t), Replay::Fresh);
        assert_eq!(g.accept("n2", 11, 1, "c", t), Replay::Fresh);
        assert_eq!(g.accept("n3", 12, 1, "d", t), Replay::Fresh); // forgets n1, issued at 10
        assert_eq!(g.len(), 2);
        // n1 again, at a count it already used: not on record, but issued no later than
        // a forgotten nonce, so not trusted.
        assert_eq!(g.accept("n1", 10, 1, "a", t), Replay::Forgotten);
        assert_eq!(g.accept("n0", 9, 1, "e", t), Replay::Forgotten);
        // A nonce issued after everything forgotten is new.
        assert_eq!(g.accept("n4", 13, 1, "f", t), Replay::Fresh);
    }

    /// A nonce past its lifetime needs no record (it is refused as stale before the guard
    /// is asked): its record goes, and a load's worth of records is given back.
    #[test]
    fn records_of_nonces_past_their_lifetime_are_dropped_and_their_room_given_back() {
        let mut g = ReplayGuard::new(100_000, 300);
        for i in 0..50_000u32 {
            assert_eq!(
                g.accept(&format!("n{i}"), 1_000, 1, i, 1_000),
                Replay::Fresh
            );
        }
        let full = g.records.len();
        assert!(full >= 50_000);
        // Still alive at the end of its lifetime...
        assert_eq!(g.accept("m", 1_300, 1, 0, 1_300), Replay::Fresh);
        assert_eq!(g.len(), 50_001);
        // ...and dropped just past it, without counting as forgotten.
        assert_eq!(g.accept("m2", 1_301, 1, 0, 1_301), Replay::Fresh);
        assert_eq!(g.len(), 2);
        assert!(g.records.len() < full / 4, "{}", g.records.len());
        assert_eq!(g.accept("m", 1_300, 1, 7, 1_302), Replay::Replayed);
        assert_eq!(g.accept("late", 1_200, 1, 0, 1_302), Replay::Fresh);
    }

    /// The request that last used a count may come again while its client retransmits,
    /// and only that request, only at that count and only within the window.
    #[test]
    fn the_last_request_on_a_nonce_count_may_be_retransmitted_within_the_window() {
        let mut g = ReplayGuard::new(10, 300);
        let t = 1_000;
        assert_eq!(g.accept("n1", t, 1, "reg-1", t), Replay::Fresh);
        assert_eq!(g.accept("n1", t, 1, "reg-1", t + 1), Replay::Retransmission);
        let last = t + RETRANSMISSION_WINDOW_SECS;
        assert_eq!(g.accept("n1", t, 1, "reg-1", last), Replay::Retransmission);
        // Another request on the same count is a replay, however soon.
        assert_eq!(g.accept("n1", t, 1, "reg-2", t + 1), Replay::Replayed);
        // Past the window, the same request is a replay too.
        assert_eq!(g.accept("n1", t, 1, "reg-1", last + 1), Replay::Replayed);
        // Once the count has moved on, the earlier request is a replay at once.
        assert_eq!(g.accept("n2", t, 1, "reg-3", t), Replay::Fresh);
        assert_eq!(g.accept("n2", t, 2, "reg-4", t + 1), Replay::Fresh);
        assert_eq!(g.accept("n2", t, 1, "reg-3", t + 1), Replay::Replayed);
        assert_eq!(g.accept("n2", t, 2, "reg-4", t + 2), Replay::Retransmission);
    }
}
