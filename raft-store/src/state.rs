//! The replicated state's layout in the `sm_data` column family, how commands change it,
//! and the local read API the agents use. Reads never touch the network.
//!
//! Keys start with one byte naming the record type; composite keys separate their parts
//! with a zero byte, which never occurs in SIP URIs or ids. Secondary indexes (bindings by
//! edge node, leases by owner) are kept in the same atomic batch as the records. The
//! bindings by expiry are indexed in memory only ([`ExpiryIndex`]), built with the location
//! table when the store opens and kept by every apply.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::command::{
    account_aor, Account, ApiToken, Binding, BindingView, Command, CommandResult, Customer,
    CustomerSettings, Dialplan, EncodedCommand, HeldBinding, JoinToken, Lease, NodeRecord, Number,
    Provider, ProviderAccount, ProviderLease, Trunk, MAX_JOIN_TOKENS,
};
use crate::store::CF_SM_DATA;
use crate::types::NodeId;
use crate::Error;

mod key {
    use super::NodeId;

    pub const NODE: u8 = b'n';
    pub const FEATURE: u8 = b'f';
    /// The next release's cluster note (`Command::PutClusterNote`).
    pub const NOTE: u8 = b'x';
    pub const CUSTOMER: u8 = b'c';
    pub const ACCOUNT: u8 = b'a';
    pub const BINDING: u8 = b'b';
    pub const BINDING_BY_EDGE: u8 = b'e';
    pub const PROVIDER: u8 = b'p';
    pub const LEASE: u8 = b'l';
    pub const LEASE_BY_OWNER: u8 = b'o';
    pub const DIALPLAN: u8 = b'd';
    pub const RETIRED: u8 = b'r';
    pub const PROVIDER_ACCOUNT: u8 = b'P';
    pub const PROVIDER_LEASE: u8 = b'L';
    pub const PROVIDER_LEASE_BY_OWNER: u8 = b'O';
    pub const OWNER_RENEWAL: u8 = b'W';
    pub const NUMBER: u8 = b'N';
    pub const CUSTOMER_SETTINGS: u8 = b'R';
    pub const TRUNK: u8 = b'T';
    /// Customers' admin API tokens, by token id.
    pub const API_TOKEN: u8 = b'k';
    /// One-time join tokens, by token id.
    pub const JOIN_TOKEN: u8 = b'j';
    /// Bindings by expiry, as releases before the index moved to memory kept them: a node
    /// deletes them when it opens its store, and never writes them.
    pub const BINDING_BY_EXPIRY: u8 = b'E';
    /// When a binding was last removed (or, with an empty contact, all of an AOR's), so a
    /// change held from before is not replayed over the removal.
    pub const REMOVED: u8 = b'z';
    /// Those records by the time they may be forgotten, for the sweep.
    pub const REMOVED_BY_TIME: u8 = b'Z';

    pub fn with(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        // Sized at once: every applied binding builds several keys (a few reallocations
        // each, as it grew, were 1-3% of a node in a registration storm).
        let len = 1 + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut k = Vec::with_capacity(len);
        k.push(tag);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(0);
            }
            k.extend_from_slice(p);
        }
        k
    }

    pub fn node(id: NodeId) -> Vec<u8> {
        with(NODE, &[&id.to_be_bytes()])
    }
    pub fn retired(id: NodeId) -> Vec<u8> {
        with(RETIRED, &[&id.to_be_bytes()])
    }
    pub fn account(domain: &str, user: &str) -> Vec<u8> {
        with(ACCOUNT, &[domain.as_bytes(), user.as_bytes()])
    }
    pub fn binding(aor: &str, contact: &str) -> Vec<u8> {
        with(BINDING, &[aor.as_bytes(), contact.as_bytes()])
    }
    /// The AOR of a binding's key, or `None` for any other key.
    pub fn aor_of_binding(k: &[u8]) -> Option<&str> {
        let rest = k.strip_prefix(&[BINDING])?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }
    /// The AOR and contact of a binding's key, or `None` for any other key.
    pub fn aor_and_contact_of_binding(k: &[u8]) -> Option<(&str, &str)> {
        let aor = aor_of_binding(k)?;
        let contact = k.get(1 + aor.len() + 1..)?;
        Some((aor, std::str::from_utf8(contact).ok()?))
    }
    /// All bindings of one AOR: the AOR followed by the separator.
    pub fn bindings_of(aor: &str) -> Vec<u8> {
        let mut k = with(BINDING, &[aor.as_bytes()]);
        k.push(0);
        k
    }
    pub fn binding_by_edge(edge: NodeId, aor: &str, contact: &str) -> Vec<u8> {
        with(
            BINDING_BY_EDGE,
            &[&edge.to_be_bytes(), aor.as_bytes(), contact.as_bytes()],
        )
    }
    /// The removal record of one binding, or with an empty contact (never a contact's
    /// value) of all of an AOR's.
    pub fn removed(aor: &str, contact: &str) -> Vec<u8> {
        with(REMOVED, &[aor.as_bytes(), contact.as_bytes()])
    }
    pub fn removed_by_time(forget_at_ms: u64, aor: &str, contact: &str) -> Vec<u8> {
        with(
            REMOVED_BY_TIME,
            &[
                &forget_at_ms.to_be_bytes(),
                aor.as_bytes(),
                contact.as_bytes(),
            ],
        )
    }
    /// The end (exclusive) of the removal records to forget by `now_ms`.
    pub fn forgotten_by(now_ms: u64) -> Vec<u8> {
        match now_ms.checked_add(1) {
            Some(after) => with(REMOVED_BY_TIME, &[&after.to_be_bytes()]),
            None => vec![REMOVED_BY_TIME + 1],
        }
    }
    /// The removal record a key of [`REMOVED_BY_TIME`] points at.
    pub fn removed_of_time(k: &[u8]) -> Option<Vec<u8>> {
        let rest = k.strip_prefix(&[REMOVED_BY_TIME])?.get(8..)?;
        let parts = rest.strip_prefix(&[0])?;
        let mut removed = vec![REMOVED];
        removed.extend_from_slice(parts);
        Some(removed)
    }
    pub fn lease(provider: &str) -> Vec<u8> {
        with(LEASE, &[provider.as_bytes()])
    }
    pub fn lease_by_owner(owner: NodeId, provider: &str) -> Vec<u8> {
        with(LEASE_BY_OWNER, &[&owner.to_be_bytes(), provider.as_bytes()])
    }
    pub fn provider_account(id: &str) -> Vec<u8> {
        with(PROVIDER_ACCOUNT, &[id.as_bytes()])
    }
    pub fn number(number: &str) -> Vec<u8> {
        with(NUMBER, &[number.as_bytes()])
    }
    pub fn trunk(id: &str) -> Vec<u8> {
        with(TRUNK, &[id.as_bytes()])
    }
    pub fn api_token(id: &str) -> Vec<u8> {
        with(API_TOKEN, &[id.as_bytes()])
    }
    pub fn join_token(id: &str) -> Vec<u8> {
        with(JOIN_TOKEN, &[id.as_bytes()])
    }
    pub fn customer_settings(customer: &str) -> Vec<u8> {
        with(CUSTOMER_SETTINGS, &[customer.as_bytes()])
    }
    pub fn provider_lease(provider: &str) -> Vec<u8> {
        with(PROVIDER_LEASE, &[provider.as_bytes()])
    }
    pub fn owner_renewal(owner: NodeId) -> Vec<u8> {
        with(OWNER_RENEWAL, &[&owner.to_be_bytes()])
    }
    pub fn provider_lease_by_owner(owner: NodeId, provider: &str) -> Vec<u8> {
        with(
            PROVIDER_LEASE_BY_OWNER,
            &[&owner.to_be_bytes(), provider.as_bytes()],
        )
    }
}

/// Records added after the first release are stored as an enum of their versions, so the
/// first byte names the layout and a later release adds a variant instead of guessing
/// (raft-store/DESIGN.md, "Versioned commands and rolling upgrades").
#[derive(Serialize, serde::Deserialize)]
enum StoredProviderAccount {
    V1(ProviderAccount),
}

#[derive(Serialize, serde::Deserialize)]
enum StoredNumber {
    V1(Number),
}

#[derive(Serialize, serde::Deserialize)]
enum StoredTrunk {
    V1(Trunk),
}

#[derive(Serialize, serde::Deserialize)]
enum StoredApiToken {
    V1(ApiToken),
}

#[derive(Serialize, serde::Deserialize)]
enum StoredJoinToken {
    V1(JoinToken),
}

#[derive(Serialize, serde::Deserialize)]
enum StoredCustomerSettings {
    V1(CustomerSettings),
}

#[derive(Serialize, serde::Deserialize)]
enum StoredLease {
    V1(Lease),
}

/// Until when an owner's leases run (its last `RenewLeases`).
#[derive(Serialize, serde::Deserialize)]
enum StoredRenewal {
    V1(u64),
}

/// A lease as readers see it: an owned lease that is not releasing runs until the later
/// of its grant's expiry and its owner's renewal.
fn effective(mut l: Lease, renewed_until: u64) -> Lease {
    if l.owner != 0 && !l.releasing {
        l.expires_at_ms = l.expires_at_ms.max(renewed_until);
    }
    l
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Room for a typical record at once (twice its size in memory; none for the unit
    // values of index keys): grown from empty, a binding's encoding reallocated as it grew.
    let room = 2 * std::mem::size_of::<T>();
    postcard::to_extend(v, Vec::with_capacity(room)).expect("in-memory serialisation does not fail")
}

fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, Error> {
    postcard::from_bytes(v)
        .map_err(|e| Error::Corrupt(format!("record {:?}: {e}", String::from_utf8_lossy(key))))
}

/// A stored binding read in place.
fn view<'v>(key: &[u8], v: &'v [u8]) -> Result<BindingView<'v>, Error> {
    BindingView::of(v).ok_or_else(|| {
        Error::Corrupt(format!(
            "record {:?}: not a binding",
            String::from_utf8_lossy(key)
        ))
    })
}

/// How long a removal's time is remembered ([`Command::RemoveBindingAt`]). A held change
/// older than this (less [`REPLAY_SKEW_MARGIN_MS`]) is not replayed at all, so a removal it
/// might predate is never forgotten while it could matter.
pub const REMOVALS_KEPT_MS: u64 = 2 * 24 * 3600 * 1000;

/// How much sooner than [`REMOVALS_KEPT_MS`] a held change stops being replayed: the
/// holding node's clock and the sweeping leader's may differ by this much.
const REPLAY_SKEW_MARGIN_MS: u64 = 3600 * 1000;

/// Most domains [`StateReader::serves_domain`] remembers; past this it starts afresh, so
/// requests for made-up domains cannot grow it without bound.
const DOMAIN_CACHE_MAX: usize = 4096;

/// How many account changes [`AccountChanges`] remembers (about 1 MB; one write of more
/// accounts than this holds them all until the next); a reader further behind than that
/// derives everything again. Only a bulk import of accounts writes this many in the tenth
/// of a second between two looks of the authenticator's.
pub(crate) const ACCOUNT_CHANGES_KEPT: usize = 16_384;

/// Which accounts recent generations changed, so a reader that derived something per
/// account (the authenticator's opened logins) drops only what changed instead of all of
/// it: otherwise every account created or edited while phones register would make every
/// node read and decrypt every account again.
#[derive(Default)]
struct AccountChanges {
    /// Changes of every generation after this one are all in `log`.
    complete_after: u64,
    /// Each change's generation and its account's `domain\0user`, oldest first.
    log: std::collections::VecDeque<(u64, Box<str>)>,
}

/// What changed in the accounts after a given generation (`StateReader::account_changes_since`).
#[derive(Debug, PartialEq, Eq)]
pub enum AccountsChanged {
    /// These accounts, each as (domain, user), maybe some more than once.
    These(Vec<(String, String)>),
    /// Too many to tell, or the whole state was replaced: take every account as changed.
    All,
}

/// Whether each domain asked about has an account, valid for one generation of the
/// accounts.
#[derive(Default)]
struct DomainCache {
    generation: u64,
    served: HashMap<String, bool>,
}

/// One write's changes to an AOR's bindings: the AOR, and per contact its new encoded
/// binding, or `None` where it was removed.
pub(crate) type BindingChanges = (String, Vec<(String, Option<Vec<u8>>)>);

/// One write's change to a binding's expiry: the binding's key, and its expiry before the
/// write and after it (`None`: no binding).
pub(crate) type ExpiryChange = (Vec<u8>, Option<u64>, Option<u64>);

/// Every binding's key by its expiry: what the leader's sweep and `ExpireBindings` read to
/// find lapsed bindings. It lives in memory, not in RocksDB: an index there cost every
/// written binding a put and a delete in the batch, and their compaction, on every node
/// (BENCHMARKS.md, "A registration storm"), for a set that is derived from the bindings
/// alone. So it is built with the location table, in the same pass over the bindings,
/// when the store opens and when a snapshot replaces the state, and every apply keeps it.
/// `ExpireBindings` must remove the same bindings on every replica, so until it is built
/// it answers with an error rather than with nothing.
#[derive(Default)]
struct ExpiryIndex {
    loaded: bool,
    by_time: BTreeSet<(u64, Box<[u8]>)>,
}

impl ExpiryIndex {
    fn loaded(&self) -> Result<&Self, Error> {
        if self.loaded {
            Ok(self)
        } else {
            Err(Error::Io(
                "the index of bindings by expiry is not built yet".into(),
            ))
        }
    }

    /// The keys of the bindings that lapsed by `now_ms`, earliest first.
    fn lapsed(&self, now_ms: u64) -> Result<impl Iterator<Item = &[u8]> + '_, Error> {
        Ok(self
            .loaded()?
            .by_time
            .iter()
            .take_while(move |(at, _)| *at <= now_ms)
            .map(|(_, k)| &k[..]))
    }

    /// One key serves the removal and the insertion: no copy of it per change.
    fn change(&mut self, (k, before, after): ExpiryChange) {
        let mut entry = (before.unwrap_or(0), k.into_boxed_slice());
        if before.is_some() {
            self.by_time.remove(&entry);
        }
        if let Some(at) = after {
            entry.0 = at;
            self.by_time.insert(entry);
        }
    }
}

/// Every AOR's bindings in memory: the node's location table, which the state machine
/// keeps as it writes them, so that no REGISTER or call reads them from RocksDB. An
/// iterator over an AOR's keys cost about a tenth of a loaded node's SIP thread, and in a
/// registration storm no cache of recent reads can hold an AOR before it is read: its
/// phone's last registration went through the node that died. Kept on every node, so the
/// state machine also finds a binding's old value here instead of reading it.
///
/// An entry is an AOR's bindings (at least one) encoded as they are stored, in one
/// allocation, each naming the AOR, sorted by contact as their keys are; a decoded binding
/// is seven strings, about twice the size. Entries are keyed by a hash of the AOR under a
/// per-process random key. An AOR with no bindings has no entry, so the table must be
/// complete: it is loaded from RocksDB when the store is opened and when a snapshot
/// replaces the state, and until then answers nothing. Two AORs with bindings whose hashes
/// collide share an empty entry, which sends reads of either to RocksDB from then on.
#[derive(Default)]
struct BindingTable {
    loaded: bool,
    keys: std::hash::RandomState,
    by_aor: HashMap<u64, Box<[u8]>>,
    /// Tests make every AOR collide.
    #[cfg(test)]
    one_hash: bool,
}

/// The AOR an entry's bindings name, read from the front of its encoding (the bindings'
/// count, then the first one's AOR) without decoding them.
fn entry_aor(kept: &[u8]) -> Option<&str> {
    let (_count, rest) = postcard::take_from_bytes::<usize>(kept).ok()?;
    let (aor, _) = postcard::take_from_bytes::<&str>(rest).ok()?;
    Some(aor)
}

/// An entry's bindings read in place, in order, each with its encoding (the default:
/// none).
#[derive(Default)]
struct EntryBindings<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> EntryBindings<'a> {
    fn of(kept: &'a [u8]) -> Option<EntryBindings<'a>> {
        let (left, rest) = postcard::take_from_bytes::<usize>(kept).ok()?;
        Some(EntryBindings { rest, left })
    }
}

impl<'a> Iterator for EntryBindings<'a> {
    type Item = Option<(BindingView<'a>, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let Some((view, rest)) = BindingView::take(self.rest) else {
            self.left = 0;
            return Some(None);
        };
        let encoding = &self.rest[..self.rest.len() - rest.len()];
        self.rest = rest;
        Some(Some((view, encoding)))
    }
}

/// An entry of `items` (sorted by contact): their count as postcard writes a sequence's
/// length (LEB128), then their encodings, in one allocation of its size.
fn join_entry(items: &[(BindingView<'_>, &[u8])]) -> Box<[u8]> {
    let mut count = [0u8; 10];
    let mut n = items.len();
    let mut len = 0;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        count[len] = if n == 0 { byte } else { byte | 0x80 };
        len += 1;
        if n == 0 {
            break;
        }
    }
    let size = len + items.iter().map(|(_, e)| e.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&count[..len]);
    for (_, encoding) in items {
        out.extend_from_slice(encoding);
    }
    out.into_boxed_slice()
}

impl BindingTable {
    fn key(&self, aor: &str) -> u64 {
        #[cfg(test)]
        if self.one_hash {
            return 0;
        }
        std::hash::BuildHasher::hash_one(&self.keys, aor)
    }

    /// The bindings of `aor`, or `None` when RocksDB must be asked (the table is not
    /// loaded, or `aor` shares its entry).
    fn lookup(&self, aor: &str) -> Option<Vec<Binding>> {
        match self.kept(aor)? {
            None => Some(Vec::new()),
            Some(kept) => postcard::from_bytes(kept).ok(),
        }
    }

    /// `aor`'s entry (`Some(None)`: it has no bindings), or `None` when RocksDB must be
    /// asked.
    fn kept(&self, aor: &str) -> Option<Option<&[u8]>> {
        if !self.loaded {
            return None;
        }
        let Some(kept) = self.by_aor.get(&self.key(aor)) else {
            return Some(None);
        };
        if kept.is_empty() {
            return None;
        }
        // Another AOR's entry: had this one any bindings, the two would share it.
        if entry_aor(kept)? != aor {
            return Some(None);
        }
        Some(Some(kept))
    }

    /// Records that `aor` now has exactly `bindings`, sorted by contact.
    fn set(&mut self, aor: &str, bindings: &[Binding]) {
        let encoded = (!bindings.is_empty()).then(|| encode(&bindings).into_boxed_slice());
        self.set_encoded(aor, encoded);
    }

    /// Records that `aor` now has the bindings `encoded` as an entry is (`None`: none).
    fn set_encoded(&mut self, aor: &str, encoded: Option<Box<[u8]>>) {
        use std::collections::hash_map::Entry;
        if !self.loaded {
            return;
        }
        let key = self.key(aor);
        match self.by_aor.entry(key) {
            Entry::Vacant(slot) => {
                if let Some(encoded) = encoded {
                    slot.insert(encoded);
                }
            }
            Entry::Occupied(mut slot) => {
                let kept = slot.get();
                if kept.is_empty() {
                    return;
                }
                if entry_aor(kept) == Some(aor) {
                    match encoded {
                        None => {
                            slot.remove();
                        }
                        Some(encoded) => *slot.get_mut() = encoded,
                    }
                } else if encoded.is_some() {
                    *slot.get_mut() = Box::default();
                }
            }
        }
    }

    /// What `f` makes of `aor`'s binding of `contact`, read in place (`Some(None)`: no
    /// such binding), or `None` when RocksDB must be asked (as for [`Self::lookup`]).
    fn find<R>(
        &self,
        aor: &str,
        contact: &str,
        f: impl FnOnce(&BindingView<'_>) -> R,
    ) -> Option<Option<R>> {
        let mut found = None;
        for item in self.entry(aor)? {
            let (view, _) = item?;
            if view.contact == contact {
                found = Some(view);
                break;
            }
        }
        Some(found.as_ref().map(f))
    }

    /// `aor`'s entry as its bindings read in place, each with its encoding; `None` when
    /// RocksDB must be asked (as for [`Self::lookup`]). An item is `None` where the entry
    /// does not parse, which callers treat as RocksDB having to be asked too.
    fn entry<'t>(&'t self, aor: &str) -> Option<EntryBindings<'t>> {
        match self.kept(aor)? {
            None => Some(EntryBindings::default()),
            Some(kept) => EntryBindings::of(kept),
        }
    }

    /// Applies one write's changes of `aor`'s bindings: per contact, its new encoded
    /// binding, or `None` where it was removed. Works on the encodings: an entry is its
    /// bindings' encodings after their count, so the new one is spliced from the old one
    /// and the write's values without decoding either.
    fn change(&mut self, aor: &str, changes: &[(String, Option<Vec<u8>>)]) {
        let encoded = {
            let Some(entry) = self.entry(aor) else {
                return;
            };
            let Some(mut items) = entry.collect::<Option<Vec<_>>>() else {
                return;
            };
            for (contact, value) in changes {
                items.retain(|(b, _)| b.contact != contact);
                if let Some(value) = value.as_deref() {
                    if let Some(b) = BindingView::of(value) {
                        items.push((b, value));
                    }
                }
            }
            items.sort_by(|(a, _), (b, _)| a.contact.cmp(b.contact));
            (!items.is_empty()).then(|| join_entry(&items))
        };
        self.set_encoded(aor, encoded);
    }

    /// An empty, loaded table hashing as this one does, to fill and put in its place.
    fn fresh(&self) -> BindingTable {
        BindingTable {
            loaded: true,
            keys: self.keys.clone(),
            by_aor: HashMap::new(),
            #[cfg(test)]
            one_hash: self.one_hash,
        }
    }
}

/// Local reads of the replicated state.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
    /// Advances whenever the state machine may have changed the set of accounts.
    accounts_generation: Arc<AtomicU64>,
    /// Which accounts each recent generation changed; advancing the generation happens
    /// under this lock, so the log and the generation agree.
    account_changes: Arc<Mutex<AccountChanges>>,
    /// Advances whenever it may have changed provider accounts or leases (not renewals).
    providers_generation: Arc<AtomicU64>,
    domains: Arc<Mutex<DomainCache>>,
    bindings: Arc<Mutex<BindingTable>>,
    expiries: Arc<Mutex<ExpiryIndex>>,
    /// How many bindings each edge node holds: counted once at open and after a snapshot
    /// is installed, then kept by every `apply`, so metrics and keepalives need no scan.
    edges: Arc<Mutex<HashMap<NodeId, u64>>>,
}

impl StateReader {
    pub(crate) fn new(db: Arc<DB>) -> StateReader {
        StateReader {
            db,
            accounts_generation: Arc::default(),
            account_changes: Arc::default(),
            providers_generation: Arc::default(),
            domains: Arc::default(),
            bindings: Arc::default(),
            expiries: Arc::default(),
            edges: Arc::default(),
        }
    }

    /// Called by the state machine once a write that changed how many bindings each edge
    /// node holds (by `deltas`) is visible in RocksDB.
    pub(crate) fn edges_changed(&self, deltas: &BTreeMap<NodeId, i64>) {
        let mut counts = self.edges.lock().expect("edge counts");
        for (edge, delta) in deltas {
            let n = counts.entry(*edge).or_default();
            *n = n.saturating_add_signed(*delta);
            if *n == 0 {
                counts.remove(edge);
            }
        }
    }

    /// Called by the state machine once a write of bindings is visible in RocksDB, and
    /// before the write is reported applied, so a proposer reads its own write.
    pub(crate) fn bindings_written(&self, changes: &[BindingChanges]) {
        let mut table = self.bindings.lock().expect("binding table");
        for (aor, contacts) in changes {
            table.change(aor, contacts);
        }
    }

    /// Called by the state machine once a write that changed bindings' expiries is
    /// visible in RocksDB.
    pub(crate) fn expiries_changed(&self, changes: Vec<ExpiryChange>) {
        let mut index = self.expiries.lock().expect("expiry index");
        for change in changes {
            index.change(change);
        }
    }

    /// Loads every binding into the table, indexes them by expiry, and counts each edge
    /// node's, afresh from RocksDB in one pass: when the store is opened, and once a
    /// snapshot replaced the whole state. Returns how many there are.
    pub(crate) fn load_bindings(&self) -> Result<u64, Error> {
        let mut table = self.bindings.lock().expect("binding table").fresh();
        let mut expiries = ExpiryIndex {
            loaded: true,
            by_time: BTreeSet::new(),
        };
        let mut edges: HashMap<NodeId, u64> = HashMap::new();
        let mut count = 0;
        let mut aor_bindings: Vec<Binding> = Vec::new();
        // Keys run AOR by AOR, each AOR's in the order of its contacts.
        for item in self.prefix_iter(&[key::BINDING]) {
            let (k, v) = item.map_err(Error::db)?;
            let b: Binding = decode(&k, &v)?;
            if aor_bindings.first().is_some_and(|first| first.aor != b.aor) {
                table.set(&aor_bindings[0].aor, &aor_bindings);
                aor_bindings.clear();
            }
            *edges.entry(b.edge_node).or_default() += 1;
            expiries
                .by_time
                .insert((b.expires_at_ms, Box::from(&k[..])));
            aor_bindings.push(b);
            count += 1;
        }
        if let Some(first) = aor_bindings.first() {
            table.set(&first.aor, &aor_bindings);
        }
        *self.bindings.lock().expect("binding table") = table;
        *self.expiries.lock().expect("expiry index") = expiries;
        *self.edges.lock().expect("edge counts") = edges;
        Ok(count)
    }

    /// Called by the state machine after it wrote provider account or lease changes (or a
    /// snapshot).
    pub(crate) fn providers_changed(&self) {
        self.providers_generation.fetch_add(1, Ordering::Release);
    }

    /// Advances whenever the state machine may have changed provider accounts or their
    /// leases, owners' renewals aside: what a reader derives from them stays valid while
    /// this stands still. Read it before them.
    pub fn providers_generation(&self) -> u64 {
        self.providers_generation.load(Ordering::Acquire)
    }

    /// Until when `owner`'s renewals make its leases run (0: never renewed).
    pub fn owner_renewed_until(&self, owner: NodeId) -> Result<u64, Error> {
        Ok(self
            .get::<StoredRenewal>(&key::owner_renewal(owner))?
            .map_or(0, |StoredRenewal::V1(t)| t))
    }

    /// Called by the state machine after it wrote changes to the accounts `changed` (each
    /// as domain, user), so what was derived from them is read again.
    pub(crate) fn accounts_changed(&self, changed: &[(String, String)]) {
        let mut changes = self.account_changes.lock().expect("account changes");
        let generation = self.accounts_generation.load(Ordering::Acquire) + 1;
        for (domain, user) in changed {
            changes.log.push_back((
                generation,
                [domain.as_str(), "\0", user.as_str()]
                    .concat()
                    .into_boxed_str(),
            ));
        }
        while changes.log.len() > ACCOUNT_CHANGES_KEPT {
            if let Some((dropped, _)) = changes.log.pop_front() {
                changes.complete_after = dropped;
            }
        }
        self.accounts_generation
            .store(generation, Ordering::Release);
    }

    /// Called by the state machine after a snapshot replaced the whole state: every
    /// account may have changed.
    pub(crate) fn accounts_replaced(&self) {
        let mut changes = self.account_changes.lock().expect("account changes");
        let generation = self.accounts_generation.load(Ordering::Acquire) + 1;
        changes.log.clear();
        changes.complete_after = generation;
        self.accounts_generation
            .store(generation, Ordering::Release);
    }

    /// Whether the account `user@domain` may have changed after `generation`.
    pub fn account_changed_since(&self, generation: u64, domain: &str, user: &str) -> bool {
        let changes = self.account_changes.lock().expect("account changes");
        let now = self.accounts_generation.load(Ordering::Acquire);
        if generation < changes.complete_after || generation > now {
            return true;
        }
        changes
            .log
            .iter()
            .rev()
            .take_while(|(g, _)| *g > generation)
            .any(|(_, login)| login.split_once('\0') == Some((domain, user)))
    }

    /// The accounts generation now, and which accounts changed after `generation`, in the
    /// order they changed.
    pub fn account_changes_since(&self, generation: u64) -> (u64, AccountsChanged) {
        let changes = self.account_changes.lock().expect("account changes");
        let now = self.accounts_generation.load(Ordering::Acquire);
        if generation < changes.complete_after || generation > now {
            return (now, AccountsChanged::All);
        }
        let these = changes
            .log
            .iter()
            .skip_while(|(g, _)| *g <= generation)
            .map(|(_, login)| {
                let (domain, user) = login.split_once('\0').unwrap_or((login, ""));
                (domain.to_owned(), user.to_owned())
            })
            .collect();
        (now, AccountsChanged::These(these))
    }

    /// Advances whenever the state machine may have changed the accounts: what a reader
    /// derives from them stays valid while this stands still. Read it before the accounts.
    pub fn accounts_generation(&self) -> u64 {
        self.accounts_generation.load(Ordering::Acquire)
    }

    fn cf(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(CF_SM_DATA)
            .expect("column family created at open")
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, Error> {
        match self.db.get_cf(self.cf(), key).map_err(Error::db)? {
            Some(v) => decode(key, &v).map(Some),
            None => Ok(None),
        }
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        for item in self.prefix_iter(prefix) {
            let (k, v) = item.map_err(Error::db)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        let mut out = Vec::new();
        for item in self.prefix_iter(prefix) {
            let (k, _) = item.map_err(Error::db)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(k.to_vec());
        }
        Ok(out)
    }

    /// The records whose keys start with `prefix`. The upper bound lets RocksDB stop at
    /// the prefix's end instead of reading on past it: an AOR's bindings are read this way
    /// on every REGISTER and call (about 5% of a loaded leader's CPU with many AORs).
    fn prefix_iter(&self, prefix: &[u8]) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        self.prefix_iter_from(prefix, prefix)
    }

    /// The records whose keys start with `prefix`, from `start` (at or after `prefix`).
    fn prefix_iter_from(
        &self,
        prefix: &[u8],
        start: &[u8],
    ) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        let mut opts = ReadOptions::default();
        if let Some(end) = prefix_end(prefix) {
            opts.set_iterate_upper_bound(end);
        }
        self.db.iterator_cf_opt(
            self.cf(),
            opts,
            IteratorMode::From(start, Direction::Forward),
        )
    }

    pub fn node(&self, id: NodeId) -> Result<Option<NodeRecord>, Error> {
        self.get(&key::node(id))
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        self.scan(&[key::NODE])
    }

    pub fn feature_version(&self) -> Result<u32, Error> {
        Ok(self.get(&[key::FEATURE])?.unwrap_or(0))
    }

    /// The cluster note (`Command::PutClusterNote`, the next release's).
    pub fn cluster_note(&self) -> Result<Option<String>, Error> {
        self.get(&[key::NOTE])
    }

    /// Whether a node id was removed from the cluster, and so may never be used again.
    pub fn is_retired(&self, id: NodeId) -> Result<bool, Error> {
        Ok(self.get::<()>(&key::retired(id))?.is_some())
    }

    pub fn customers(&self) -> Result<Vec<Customer>, Error> {
        self.scan(&[key::CUSTOMER])
    }

    pub fn customer(&self, id: &str) -> Result<Option<Customer>, Error> {
        self.get(&key::with(key::CUSTOMER, &[id.as_bytes()]))
    }

    pub fn account(&self, domain: &str, user: &str) -> Result<Option<Account>, Error> {
        self.get(&key::account(domain, user))
    }

    /// Whether any account lives in `domain`: the domains this cluster serves. Every
    /// REGISTER and call asks this, so answers are kept until the accounts change.
    pub fn serves_domain(&self, domain: &str) -> Result<bool, Error> {
        let generation = self.accounts_generation.load(Ordering::Acquire);
        {
            let cache = self.domains.lock().expect("domain cache");
            if cache.generation == generation {
                if let Some(&served) = cache.served.get(domain) {
                    return Ok(served);
                }
            }
        }
        let served = self.domain_has_accounts(domain)?;
        let mut cache = self.domains.lock().expect("domain cache");
        if cache.generation != generation || cache.served.len() >= DOMAIN_CACHE_MAX {
            cache.generation = generation;
            cache.served.clear();
        }
        cache.served.insert(domain.to_owned(), served);
        Ok(served)
    }

    fn domain_has_accounts(&self, domain: &str) -> Result<bool, Error> {
        let mut prefix = key::with(key::ACCOUNT, &[domain.as_bytes()]);
        prefix.push(0);
        let first = self
            .db
            .iterator_cf(self.cf(), IteratorMode::From(&prefix, Direction::Forward))
            .next();
        match first {
            Some(item) => Ok(item.map_err(Error::db)?.0.starts_with(&prefix)),
            None => Ok(false),
        }
    }

    /// The accounts of one domain.
    pub fn accounts_in(&self, domain: &str) -> Result<Vec<Account>, Error> {
        let mut prefix = key::with(key::ACCOUNT, &[domain.as_bytes()]);
        prefix.push(0);
        self.scan(&prefix)
    }

    pub fn accounts(&self) -> Result<Vec<Account>, Error> {
        self.scan(&[key::ACCOUNT])
    }

    /// Up to `limit` accounts in key order (by domain, then user), starting after the
    /// account `after` (domain, user), or at the first: for reading every account a page
    /// at a time.
    pub fn accounts_after(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Account>, Error> {
        let mut out = Vec::new();
        let start = match after {
            Some((domain, user)) => key::account(domain, user),
            None => vec![key::ACCOUNT],
        };
        for item in self.prefix_iter_from(&[key::ACCOUNT], &start) {
            let (k, v) = item.map_err(Error::db)?;
            if *k == *start {
                continue;
            }
            out.push(decode(&k, &v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn providers(&self) -> Result<Vec<Provider>, Error> {
        self.scan(&[key::PROVIDER])
    }

    /// The bindings of `aor`, sorted by contact. Every REGISTER and call asks this; the
    /// answer comes from the location table (see [`BindingTable`]).
    pub fn bindings(&self, aor: &str) -> Result<Vec<Binding>, Error> {
        if let Some(kept) = self.bindings.lock().expect("binding table").lookup(aor) {
            return Ok(kept);
        }
        self.scan(&key::bindings_of(aor))
    }

    /// One binding of `aor`, from the location table where it can answer.
    pub fn binding(&self, aor: &str, contact: &str) -> Result<Option<Binding>, Error> {
        if let Some(kept) = self.bindings.lock().expect("binding table").lookup(aor) {
            return Ok(kept.into_iter().find(|b| b.contact == contact));
        }
        self.get(&key::binding(aor, contact))
    }

    /// The edge node and expiry of `aor`'s binding of `contact`, read in place: what the
    /// state machine needs of a binding it replaces or removes.
    fn binding_edge_and_expiry(
        &self,
        aor: &str,
        contact: &str,
    ) -> Result<Option<(NodeId, u64)>, Error> {
        let edge_and_expiry = |b: &BindingView<'_>| (b.edge_node, b.expires_at_ms);
        let table = self.bindings.lock().expect("binding table");
        if let Some(found) = table.find(aor, contact, edge_and_expiry) {
            return Ok(found);
        }
        drop(table);
        let k = key::binding(aor, contact);
        match self.db.get_pinned_cf(self.cf(), &k).map_err(Error::db)? {
            Some(v) => view(&k, &v).map(|b| Some(edge_and_expiry(&b))),
            None => Ok(None),
        }
    }

    /// Whether any binding lapsed at or before `now_ms`, or a removal record is due to be
    /// forgotten: the first of each index by time, so the leader's sweep proposes nothing
    /// while there is nothing to remove.
    pub fn has_lapsed_bindings(&self, now_ms: u64) -> Result<bool, Error> {
        if self
            .expiries
            .lock()
            .expect("expiry index")
            .lapsed(now_ms)?
            .next()
            .is_some()
        {
            return Ok(true);
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(key::forgotten_by(now_ms));
        let start = [key::REMOVED_BY_TIME];
        let first = self
            .db
            .iterator_cf_opt(
                self.cf(),
                opts,
                IteratorMode::From(&start, Direction::Forward),
            )
            .next();
        Ok(first.transpose().map_err(Error::db)?.is_some())
    }

    /// The keys of the bindings that lapsed by `now_ms` before this apply's writes,
    /// earliest expiry first.
    fn lapsed_binding_keys(&self, now_ms: u64) -> Result<Vec<Vec<u8>>, Error> {
        Ok(self
            .expiries
            .lock()
            .expect("expiry index")
            .lapsed(now_ms)?
            .map(<[u8]>::to_vec)
            .collect())
    }

    /// When the binding (`contact`), or all of the AOR's (an empty `contact`), was last
    /// removed by a command that says when, if that is still remembered.
    pub fn removed_at(&self, aor: &str, contact: &str) -> Result<Option<u64>, Error> {
        self.get(&key::removed(aor, contact))
    }

    /// Writes into `batch` the deletion of the index of bindings by expiry that releases
    /// before it moved to memory kept in RocksDB, if any of it is there.
    pub(crate) fn drop_stored_expiry_index(&self, batch: &mut WriteBatch) -> Result<bool, Error> {
        let start = [key::BINDING_BY_EXPIRY];
        let Some(first) = self.prefix_iter(&start).next() else {
            return Ok(false);
        };
        first.map_err(Error::db)?;
        let end = prefix_end(&start).expect("the tag is below 0xff");
        batch.delete_range_cf(self.cf(), start.as_slice(), end.as_slice());
        Ok(true)
    }

    /// Bindings registered through `edge`: the ones that node keeps alive and forwards to.
    pub fn bindings_by_edge(&self, edge: NodeId) -> Result<Vec<Binding>, Error> {
        self.via_index(
            &key::with(key::BINDING_BY_EDGE, &[&edge.to_be_bytes()]),
            key::BINDING,
        )
    }

    /// Up to `limit` bindings registered through `edge`, in the order of their index
    /// keys, starting after the index key `after` (none: from the first), and the key to
    /// go on after when the page is full. A node's keepalives walk its bindings this way,
    /// so they never hold them all in memory at once.
    pub fn bindings_by_edge_page(
        &self,
        edge: NodeId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<Binding>, Option<Vec<u8>>), Error> {
        let prefix = key::with(key::BINDING_BY_EDGE, &[&edge.to_be_bytes()]);
        let mut opts = ReadOptions::default();
        if let Some(end) = prefix_end(&prefix) {
            opts.set_iterate_upper_bound(end);
        }
        // A walk of the whole index every interval, read once per round: through the
        // block cache it would fill the cache to its bound and push out what the node's
        // own reads keep there.
        opts.fill_cache(false);
        let start = after.unwrap_or(&prefix);
        let keys = self.db.iterator_cf_opt(
            self.cf(),
            opts,
            IteratorMode::From(start, Direction::Forward),
        );
        let mut page = Vec::new();
        let mut last = None;
        for item in keys {
            let (k, _) = item.map_err(Error::db)?;
            if after == Some(&k[..]) {
                continue;
            }
            if page.len() == limit {
                return Ok((page, last));
            }
            // The index key is the tag, the edge and a separator, then the binding's key.
            let mut record_key = vec![key::BINDING];
            record_key.extend_from_slice(k.get(prefix.len() + 1..).unwrap_or_default());
            let record = match key::aor_and_contact_of_binding(&record_key) {
                Some((aor, contact)) => self.binding(aor, contact)?,
                None => self.get(&record_key)?,
            };
            page.extend(record);
            last = Some(k.to_vec());
        }
        Ok((page, None))
    }

    /// How many bindings `edge` holds, without reading RocksDB (see `edges`).
    pub fn count_bindings_by_edge(&self, edge: NodeId) -> u64 {
        self.edges
            .lock()
            .expect("edge counts")
            .get(&edge)
            .copied()
            .unwrap_or(0)
    }

    pub fn provider(&self, id: &str) -> Result<Option<Provider>, Error> {
        self.get(&key::with(key::PROVIDER, &[id.as_bytes()]))
    }

    pub fn lease(&self, provider: &str) -> Result<Option<ProviderLease>, Error> {
        self.get(&key::lease(provider))
    }

    pub fn leases_by_owner(&self, owner: NodeId) -> Result<Vec<ProviderLease>, Error> {
        self.via_index(
            &key::with(key::LEASE_BY_OWNER, &[&owner.to_be_bytes()]),
            key::LEASE,
        )
    }

    /// Records found through a secondary index. An index key is the index prefix, a
    /// separator, then the record key's parts, so the record key is `primary` plus
    /// that suffix.
    fn via_index<T: DeserializeOwned>(&self, prefix: &[u8], primary: u8) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        for k in self.scan_keys(prefix)? {
            let mut record_key = vec![primary];
            record_key.extend_from_slice(&k[prefix.len() + 1..]);
            if let Some(record) = self.get(&record_key)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Every provider account, in id order (customer, then name).
    pub fn provider_accounts(&self) -> Result<Vec<ProviderAccount>, Error> {
        Ok(self
            .scan::<StoredProviderAccount>(&[key::PROVIDER_ACCOUNT])?
            .into_iter()
            .map(|StoredProviderAccount::V1(p)| p)
            .collect())
    }

    /// The customer number `number` (digits; a leading `+` is ignored), if any.
    pub fn number(&self, number: &str) -> Result<Option<Number>, Error> {
        let digits = number.strip_prefix('+').unwrap_or(number);
        Ok(self
            .get::<StoredNumber>(&key::number(digits))?
            .map(|StoredNumber::V1(n)| n))
    }

    pub fn trunk(&self, id: &str) -> Result<Option<Trunk>, Error> {
        Ok(self
            .get::<StoredTrunk>(&key::trunk(id))?
            .map(|StoredTrunk::V1(t)| t))
    }

    /// Every trunk, in id order (customer, then name).
    pub fn trunks(&self) -> Result<Vec<Trunk>, Error> {
        Ok(self
            .scan::<StoredTrunk>(&[key::TRUNK])?
            .into_iter()
            .map(|StoredTrunk::V1(t)| t)
            .collect())
    }

    /// The API token `id`, if it exists and was not revoked.
    pub fn api_token(&self, id: &str) -> Result<Option<ApiToken>, Error> {
        Ok(self
            .get::<StoredApiToken>(&key::api_token(id))?
            .map(|StoredApiToken::V1(t)| t))
    }

    /// The join token `id`, if it exists (used or not, expired or not).
    pub fn join_token(&self, id: &str) -> Result<Option<JoinToken>, Error> {
        Ok(self
            .get::<StoredJoinToken>(&key::join_token(id))?
            .map(|StoredJoinToken::V1(t)| t))
    }

    /// Every join token, in id order.
    pub fn join_tokens(&self) -> Result<Vec<JoinToken>, Error> {
        Ok(self
            .scan::<StoredJoinToken>(&[key::JOIN_TOKEN])?
            .into_iter()
            .map(|StoredJoinToken::V1(t)| t)
            .collect())
    }

    /// Every API token, in id order.
    pub fn api_tokens(&self) -> Result<Vec<ApiToken>, Error> {
        Ok(self
            .scan::<StoredApiToken>(&[key::API_TOKEN])?
            .into_iter()
            .map(|StoredApiToken::V1(t)| t)
            .collect())
    }

    /// `customer`'s settings (all defaults if it has none).
    pub fn customer_settings(&self, customer: &str) -> Result<CustomerSettings, Error> {
        Ok(self
            .get::<StoredCustomerSettings>(&key::customer_settings(customer))?
            .map(|StoredCustomerSettings::V1(s)| s)
            .unwrap_or_else(|| CustomerSettings {
                customer: customer.to_owned(),
                ..CustomerSettings::default()
            }))
    }

    /// How many days `customer`'s CDRs are kept, if it has a retention of its own.
    pub fn cdr_retention(&self, customer: &str) -> Result<Option<u32>, Error> {
        Ok(Some(self.customer_settings(customer)?.cdr_retention_days).filter(|d| *d > 0))
    }

    /// Every customer number, in number order.
    pub fn numbers(&self) -> Result<Vec<Number>, Error> {
        Ok(self
            .scan::<StoredNumber>(&[key::NUMBER])?
            .into_iter()
            .map(|StoredNumber::V1(n)| n)
            .collect())
    }

    pub fn provider_account(&self, id: &str) -> Result<Option<ProviderAccount>, Error> {
        Ok(self
            .get::<StoredProviderAccount>(&key::provider_account(id))?
            .map(|StoredProviderAccount::V1(p)| p))
    }

    /// Every provider account's lease, as [`effective`]; owner 0 marks an ended one, kept
    /// for its epoch.
    pub fn provider_leases(&self) -> Result<Vec<Lease>, Error> {
        let mut renewed: HashMap<NodeId, u64> = HashMap::new();
        let mut out = Vec::new();
        for StoredLease::V1(l) in self.scan::<StoredLease>(&[key::PROVIDER_LEASE])? {
            let until = match renewed.get(&l.owner) {
                Some(t) => *t,
                None => {
                    let t = self.owner_renewed_until(l.owner)?;
                    renewed.insert(l.owner, t);
                    t
                }
            };
            out.push(effective(l, until));
        }
        Ok(out)
    }

    pub fn provider_lease(&self, provider: &str) -> Result<Option<Lease>, Error> {
        match self.get::<StoredLease>(&key::provider_lease(provider))? {
            Some(StoredLease::V1(l)) => {
                let until = self.owner_renewed_until(l.owner)?;
                Ok(Some(effective(l, until)))
            }
            None => Ok(None),
        }
    }

    /// The leases `owner` holds, through the index by owner, as [`effective`].
    pub fn provider_leases_of(&self, owner: NodeId) -> Result<Vec<Lease>, Error> {
        let until = self.owner_renewed_until(owner)?;
        Ok(self
            .via_index::<StoredLease>(
                &key::with(key::PROVIDER_LEASE_BY_OWNER, &[&owner.to_be_bytes()]),
                key::PROVIDER_LEASE,
            )?
            .into_iter()
            .map(|StoredLease::V1(l)| effective(l, until))
            .collect())
    }

    pub fn dialplan(&self, owner: &str) -> Result<Option<Dialplan>, Error> {
        self.get(&key::with(key::DIALPLAN, &[owner.as_bytes()]))
    }
}

/// The smallest key greater than every key that starts with `prefix`, or `None` when no
/// such key exists (the prefix is all 0xff bytes).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Whether `k` is derived data that snapshots leave out (the index by expiry an older
/// release kept in RocksDB): a node builds it from the records instead, so a snapshot
/// reads the same to every release.
pub(crate) fn is_derived(k: &[u8]) -> bool {
    k.first() == Some(&key::BINDING_BY_EXPIRY)
}

/// The writes of one `apply` call: reads see earlier writes of the same call.
pub(crate) struct Txn<'a> {
    reader: &'a StateReader,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// How the number of bindings of each edge node changes.
    edge_deltas: BTreeMap<NodeId, i64>,
    /// The bindings whose expiry this transaction changed, by key: their expiry before it
    /// and now (`None`: no binding).
    expiries: BTreeMap<Vec<u8>, (Option<u64>, Option<u64>)>,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(reader: &'a StateReader) -> Txn<'a> {
        Txn {
            reader,
            overlay: BTreeMap::new(),
            edge_deltas: BTreeMap::new(),
            expiries: BTreeMap::new(),
        }
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, Error> {
        match self.overlay.get(key) {
            Some(Some(v)) => decode(key, v).map(Some),
            Some(None) => Ok(None),
            None => self.reader.get(key),
        }
    }

    /// One binding as this transaction sees it.
    fn binding(&self, aor: &str, contact: &str) -> Result<Option<Binding>, Error> {
        let k = key::binding(aor, contact);
        match self.overlay.get(&k) {
            Some(Some(v)) => decode(&k, v).map(Some),
            Some(None) => Ok(None),
            None => self.reader.binding(aor, contact),
        }
    }

    /// The edge node and expiry of one binding as this transaction sees it.
    fn binding_edge_and_expiry(
        &self,
        aor: &str,
        contact: &str,
    ) -> Result<Option<(NodeId, u64)>, Error> {
        let k = key::binding(aor, contact);
        match self.overlay.get(&k) {
            Some(Some(v)) => view(&k, v).map(|b| Some((b.edge_node, b.expires_at_ms))),
            Some(None) => Ok(None),
            None => self.reader.binding_edge_and_expiry(aor, contact),
        }
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) {
        self.overlay.insert(key, Some(encode(value)));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key, None);
    }

    /// Keys under `prefix`, as the database plus this transaction's writes see them.
    fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        let mut keys: std::collections::BTreeSet<Vec<u8>> =
            self.reader.scan_keys(prefix)?.into_iter().collect();
        for (k, v) in self.overlay.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(_) => keys.insert(k.clone()),
                None => keys.remove(k),
            };
        }
        Ok(keys.into_iter().collect())
    }

    /// The first `limit` keys in `[start, end)` as this transaction sees them, reading no
    /// more of RocksDB than that needs.
    fn first_keys_in_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(end.to_vec());
        let mut keys = std::collections::BTreeSet::new();
        for item in self.reader.db.iterator_cf_opt(
            self.reader.cf(),
            opts,
            IteratorMode::From(start, Direction::Forward),
        ) {
            if keys.len() >= limit {
                break;
            }
            let k = item.map_err(Error::db)?.0.to_vec();
            if !matches!(self.overlay.get(&k), Some(None)) {
                keys.insert(k);
            }
        }
        for (k, v) in self.overlay.range(start.to_vec()..end.to_vec()) {
            if v.is_some() {
                keys.insert(k.clone());
            }
        }
        Ok(keys.into_iter().take(limit).collect())
    }

    fn count_edge(&mut self, edge: NodeId, delta: i64) {
        *self.edge_deltas.entry(edge).or_default() += delta;
    }

    /// Notes that the binding `k` expired at `before` (as this transaction saw it) and
    /// now at `after`.
    fn index_expiry(&mut self, k: &[u8], before: Option<u64>, after: Option<u64>) {
        match self.expiries.get_mut(k) {
            Some((_, now)) => *now = after,
            None => {
                self.expiries.insert(k.to_vec(), (before, after));
            }
        }
    }

    /// The keys of the bindings that lapsed by `now_ms` as this transaction sees them, in
    /// key order.
    fn lapsed_binding_keys(&self, now_ms: u64) -> Result<Vec<Vec<u8>>, Error> {
        let mut lapsed: Vec<Vec<u8>> = self
            .reader
            .lapsed_binding_keys(now_ms)?
            .into_iter()
            .filter(|k| !self.expiries.contains_key(k))
            .collect();
        lapsed.extend(
            self.expiries
                .iter()
                .filter(|(_, (_, now))| now.is_some_and(|at| at <= now_ms))
                .map(|(k, _)| k.clone()),
        );
        lapsed.sort_unstable();
        Ok(lapsed)
    }

    /// How this transaction changes bindings' expiries; take it before
    /// [`Txn::into_batch`].
    pub(crate) fn expiry_changes(&mut self) -> Vec<ExpiryChange> {
        std::mem::take(&mut self.expiries)
            .into_iter()
            .filter(|(_, (before, after))| before != after)
            .map(|(k, (before, after))| (k, before, after))
            .collect()
    }

    /// How this transaction changes the number of bindings of each edge node; take it
    /// before [`Txn::into_batch`].
    pub(crate) fn edge_deltas(&self) -> BTreeMap<NodeId, i64> {
        self.edge_deltas.clone()
    }

    /// Writes into `batch`, and returns the changes to bindings it writes, AOR by AOR.
    pub(crate) fn into_batch(
        self,
        cf: &rocksdb::ColumnFamily,
        batch: &mut WriteBatch,
    ) -> Vec<BindingChanges> {
        let mut changes: Vec<BindingChanges> = Vec::new();
        for (k, v) in self.overlay {
            match &v {
                Some(v) => batch.put_cf(cf, &k, v),
                None => batch.delete_cf(cf, &k),
            }
            if let Some((aor, contact)) = key::aor_and_contact_of_binding(&k) {
                // Keys are in order, so one AOR's bindings are next to each other.
                if changes.last().map(|(a, _)| a.as_str()) != Some(aor) {
                    changes.push((aor.to_owned(), Vec::new()));
                }
                if let Some((_, contacts)) = changes.last_mut() {
                    contacts.push((contact.to_owned(), v));
                }
            }
        }
        changes
    }

    fn remove_all_bindings(&mut self, aor: &str) -> Result<u64, Error> {
        let prefix = key::bindings_of(aor);
        let mut removed = 0;
        for k in self.keys_with_prefix(&prefix)? {
            let contact = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            removed += self.remove_binding(aor, &contact)? as u64;
        }
        Ok(removed)
    }

    fn remove_binding(&mut self, aor: &str, contact: &str) -> Result<bool, Error> {
        let k = key::binding(aor, contact);
        match self.binding_edge_and_expiry(aor, contact)? {
            Some((edge, expires_at_ms)) => {
                self.index_expiry(&k, Some(expires_at_ms), None);
                self.delete(k);
                self.count_edge(edge, -1);
                self.delete(key::binding_by_edge(edge, aor, contact));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Remembers that the binding (`contact`, or all of the AOR's for an empty one) was
    /// removed at `at_ms`, for [`REMOVALS_KEPT_MS`]; a later removal time wins.
    fn note_removal(&mut self, aor: &str, contact: &str, at_ms: u64) -> Result<(), Error> {
        let k = key::removed(aor, contact);
        if let Some(old) = self.get::<u64>(&k)? {
            if old >= at_ms {
                return Ok(());
            }
            self.delete(key::removed_by_time(
                old.saturating_add(REMOVALS_KEPT_MS),
                aor,
                contact,
            ));
        }
        self.put(
            key::removed_by_time(at_ms.saturating_add(REMOVALS_KEPT_MS), aor, contact),
            &(),
        );
        self.put(k, &at_ms);
        Ok(())
    }

    /// [`Command::ReplayHeldBinding`]: the held change, unless something since makes it
    /// stale.
    fn replay_held(&mut self, held: HeldBinding, now_ms: u64) -> Result<CommandResult, Error> {
        let stale = |why: &str| Ok(CommandResult::Rejected(why.to_owned()));
        if account_aor(&held.user, &held.domain) != held.aor
            || held
                .binding
                .as_ref()
                .is_some_and(|b| b.aor != held.aor || b.contact != held.contact)
        {
            return stale("the held change names another binding than its AOR and contact");
        }
        if now_ms
            .saturating_add(REPLAY_SKEW_MARGIN_MS)
            .saturating_sub(held.held_at_ms)
            >= REMOVALS_KEPT_MS
        {
            return stale("held for longer than removals are remembered");
        }
        let stored = self.binding(&held.aor, &held.contact)?;
        if stored
            .as_ref()
            .is_some_and(|b| b.written_at_ms() >= held.held_at_ms)
        {
            return stale("the binding was written again since");
        }
        for contact in [held.contact.as_str(), ""] {
            let removed = self.get::<u64>(&key::removed(&held.aor, contact))?;
            if removed.is_some_and(|at| at >= held.held_at_ms) {
                return stale("the binding was removed since");
            }
        }
        let Some(binding) = held.binding else {
            let removed = self.remove_binding(&held.aor, &held.contact)?;
            self.note_removal(&held.aor, &held.contact, held.held_at_ms)?;
            return Ok(CommandResult::Removed(removed as u64));
        };
        if binding.expires_at_ms <= now_ms {
            return stale("the binding has lapsed");
        }
        let account = self.get::<Account>(&key::account(&held.domain, &held.user))?;
        let Some(account) = account.filter(|a| a.enabled) else {
            return stale("the account is gone or disabled");
        };
        let customer =
            self.get::<Customer>(&key::with(key::CUSTOMER, &[account.customer.as_bytes()]))?;
        if customer.is_some_and(|c| !c.enabled) {
            return stale("the account's customer is disabled");
        }
        self.put_binding(binding)?;
        Ok(CommandResult::Done)
    }

    fn put_binding(&mut self, b: Binding) -> Result<(), Error> {
        let value = encode(&b);
        let view = BindingView::of(&value).expect("a binding's encoding reads as one");
        self.put_binding_view(&view, value.clone())
    }

    /// Stores the binding `b` reads, whose encoding is `value`.
    fn put_binding_view(&mut self, b: &BindingView<'_>, value: Vec<u8>) -> Result<(), Error> {
        let k = key::binding(b.aor, b.contact);
        let old = self.binding_edge_and_expiry(b.aor, b.contact)?;
        if let Some((edge, _)) = old {
            self.count_edge(edge, -1);
            self.delete(key::binding_by_edge(edge, b.aor, b.contact));
        }
        self.index_expiry(&k, old.map(|(_, expires)| expires), Some(b.expires_at_ms));
        self.count_edge(b.edge_node, 1);
        self.put(key::binding_by_edge(b.edge_node, b.aor, b.contact), &());
        self.overlay.insert(k, Some(value));
        Ok(())
    }

    /// Applies `encoded` without decoding it when it is a binding's write that reads in
    /// place ([`EncodedCommand::put_binding_view`]), the command a registration storm is
    /// made of; `None` for every other command, which is decoded and applied.
    pub(crate) fn apply_binding_write(
        &mut self,
        encoded: &EncodedCommand,
    ) -> Option<Result<CommandResult, Error>> {
        let view = encoded.put_binding_view()?;
        Some(
            self.put_binding_view(&view, encoded.body.to_vec())
                .map(|()| CommandResult::Done),
        )
    }

    fn set_lease(&mut self, lease: &ProviderLease) -> Result<(), Error> {
        if let Some(old) = self.get::<ProviderLease>(&key::lease(&lease.provider))? {
            self.delete(key::lease_by_owner(old.owner, &old.provider));
        }
        self.put(key::lease_by_owner(lease.owner, &lease.provider), &());
        self.put(key::lease(&lease.provider), lease);
        Ok(())
    }

    fn provider_lease(&self, provider: &str) -> Result<Option<Lease>, Error> {
        Ok(self
            .get::<StoredLease>(&key::provider_lease(provider))?
            .map(|StoredLease::V1(l)| l))
    }

    /// A lease as readers see it at this point of the transaction.
    fn effective_lease(&self, l: Lease) -> Result<Lease, Error> {
        let until = self
            .get::<StoredRenewal>(&key::owner_renewal(l.owner))?
            .map_or(0, |StoredRenewal::V1(t)| t);
        Ok(effective(l, until))
    }

    fn put_provider_lease(&mut self, lease: Lease) -> Result<(), Error> {
        if let Some(old) = self.provider_lease(&lease.provider)? {
            self.delete(key::provider_lease_by_owner(old.owner, &old.provider));
        }
        self.put(
            key::provider_lease_by_owner(lease.owner, &lease.provider),
            &(),
        );
        self.put(
            key::provider_lease(&lease.provider),
            &StoredLease::V1(lease),
        );
        Ok(())
    }

    /// Ends a lease but keeps its epoch, as a lease of owner 0 (no node has id 0), so the
    /// next grant's epoch is higher and a late command about the old one is refused.
    fn end_provider_lease(&mut self, old: Lease) -> Result<(), Error> {
        let provider = old.provider.clone();
        self.put_provider_lease(Lease {
            owner: 0,
            expires_at_ms: 0,
            releasing: false,
            ..old
        })?;
        self.delete(key::provider_lease_by_owner(0, &provider));
        Ok(())
    }

    fn apply_provider(&mut self, command: Command) -> Result<CommandResult, Error> {
        Ok(match command {
            Command::PutProviderAccount(p) => {
                self.put(
                    key::provider_account(&p.id()),
                    &StoredProviderAccount::V1(p),
                );
                CommandResult::Done
            }
            Command::DeleteProviderAccount { id } => {
                self.delete(key::provider_account(&id));
                if let Some(old) = self.provider_lease(&id)? {
                    self.delete(key::provider_lease_by_owner(old.owner, &id));
                    self.delete(key::provider_lease(&id));
                }
                CommandResult::Done
            }
            Command::ResealProviderAccount {
                id,
                expected,
                resealed,
            } => {
                let k = key::provider_account(&id);
                match self.get::<StoredProviderAccount>(&k)? {
                    Some(StoredProviderAccount::V1(mut p)) if p.password == expected => {
                        p.password = resealed;
                        self.put(k, &StoredProviderAccount::V1(p));
                        CommandResult::Done
                    }
                    Some(_) => CommandResult::Rejected(
                        "the provider's password changed since it was read".into(),
                    ),
                    None => CommandResult::Rejected("no such provider".into()),
                }
            }
            Command::GrantLease {
                lease,
                expected_epoch,
                lapsed_by_ms,
            } => {
                let current = match self.provider_lease(&lease.provider)? {
                    Some(l) => Some(self.effective_lease(l)?),
                    None => None,
                };
                let current_epoch = current.as_ref().map_or(0, |l| l.epoch);
                let account = self
                    .get::<StoredProviderAccount>(&key::provider_account(&lease.provider))?
                    .map(|StoredProviderAccount::V1(p)| p);
                if current_epoch != expected_epoch {
                    CommandResult::Rejected(format!(
                        "lease epoch is {current_epoch}, not {expected_epoch}"
                    ))
                } else if lease.epoch <= current_epoch {
                    CommandResult::Rejected(format!(
                        "new epoch {} must exceed {current_epoch}",
                        lease.epoch
                    ))
                } else if current
                    .as_ref()
                    .is_some_and(|l| l.owner != 0 && l.expires_at_ms > lapsed_by_ms)
                {
                    CommandResult::Rejected("the current owner renewed the lease".into())
                } else if !account.is_some_and(|p| p.enabled) {
                    CommandResult::Rejected("no such enabled provider".into())
                } else {
                    self.put_provider_lease(lease)?;
                    CommandResult::Done
                }
            }
            Command::RenewLeases {
                owner,
                expires_at_ms,
            } => {
                let k = key::owner_renewal(owner);
                let until = self
                    .get::<StoredRenewal>(&k)?
                    .map_or(0, |StoredRenewal::V1(t)| t);
                self.put(k, &StoredRenewal::V1(until.max(expires_at_ms)));
                CommandResult::Done
            }
            Command::ReleaseLeaseAsked { provider, epoch } => {
                match self.provider_lease(&provider)? {
                    Some(l) if l.epoch == epoch && l.owner != 0 => {
                        // Its expiry freezes where the owner's renewals had brought it.
                        let mut l = self.effective_lease(l)?;
                        l.releasing = true;
                        self.put(key::provider_lease(&provider), &StoredLease::V1(l));
                        CommandResult::Done
                    }
                    _ => CommandResult::Rejected(format!("no lease of epoch {epoch}")),
                }
            }
            Command::DropLease { provider, epoch } => match self.provider_lease(&provider)? {
                Some(l) if l.epoch == epoch && l.owner != 0 => {
                    self.end_provider_lease(l)?;
                    CommandResult::Done
                }
                _ => CommandResult::Rejected(format!("no lease of epoch {epoch}")),
            },
            other => CommandResult::Rejected(format!(
                "kind {} is not a provider command",
                other.encode().kind
            )),
        })
    }

    /// Applies one command. Deterministic: the same state and command give the same writes.
    pub(crate) fn apply(&mut self, command: Command) -> Result<CommandResult, Error> {
        Ok(match command {
            Command::PutProviderAccount(_)
            | Command::DeleteProviderAccount { .. }
            | Command::ResealProviderAccount { .. }
            | Command::GrantLease { .. }
            | Command::RenewLeases { .. }
            | Command::ReleaseLeaseAsked { .. }
            | Command::DropLease { .. } => return self.apply_provider(command),
            Command::Noop { .. } => CommandResult::Done,
            Command::PutNumber(n) => {
                self.put(key::number(&n.number), &StoredNumber::V1(n));
                CommandResult::Done
            }
            Command::DeleteNumber { number } => {
                self.delete(key::number(&number));
                CommandResult::Done
            }
            Command::PutTrunk(t) => {
                self.put(key::trunk(&t.id()), &StoredTrunk::V1(t));
                CommandResult::Done
            }
            Command::DeleteTrunk { id } => {
                self.delete(key::trunk(&id));
                CommandResult::Done
            }
            Command::PutClusterNote { text } => {
                self.put(vec![key::NOTE], &text);
                CommandResult::Done
            }
            // Checked here, not only by the API: a token made while its customer was being
            // deleted must not wait for a customer created again under the same id.
            Command::PutApiToken(t) => {
                let customer = key::with(key::CUSTOMER, &[t.customer.as_bytes()]);
                if self.get::<Customer>(&customer)?.is_none() {
                    CommandResult::Rejected(format!("no customer {:?}", t.customer))
                } else {
                    self.put(key::api_token(&t.id), &StoredApiToken::V1(t));
                    CommandResult::Done
                }
            }
            Command::RevokeApiToken { id } => {
                let k = key::api_token(&id);
                let existed = self.get::<StoredApiToken>(&k)?.is_some();
                self.delete(k);
                CommandResult::Removed(u64::from(existed))
            }
            Command::PutJoinToken { token, now_ms } => {
                // Expired ones go first, by the entry's clock, so every replica removes
                // the same records.
                let mut live = 0;
                for k in self.keys_with_prefix(&[key::JOIN_TOKEN])? {
                    match self.get::<StoredJoinToken>(&k)? {
                        Some(StoredJoinToken::V1(t)) if t.expires_at_ms > now_ms => live += 1,
                        _ => self.delete(k),
                    }
                }
                if self
                    .get::<StoredJoinToken>(&key::join_token(&token.id))?
                    .is_some()
                {
                    // 64 random bits do not collide; a second put of one id is a replay.
                    CommandResult::Rejected(format!("join token {} exists", token.id))
                } else if live >= MAX_JOIN_TOKENS {
                    CommandResult::Rejected(format!(
                        "the cluster holds {live} unexpired join tokens, the most it may; \
                         revoke unused ones or let them expire"
                    ))
                } else {
                    self.put(key::join_token(&token.id), &StoredJoinToken::V1(token));
                    CommandResult::Done
                }
            }
            Command::UseJoinToken { id, node, now_ms } => {
                let k = key::join_token(&id);
                match self.get::<StoredJoinToken>(&k)? {
                    None => CommandResult::Rejected("the join token was revoked".into()),
                    Some(StoredJoinToken::V1(t)) if t.used_by == node => {
                        CommandResult::Done // a repeated join, e.g. after a lost answer
                    }
                    Some(StoredJoinToken::V1(t)) if t.used_by != 0 => CommandResult::Rejected(
                        format!("the join token was used by node {}", t.used_by),
                    ),
                    Some(StoredJoinToken::V1(t)) if t.expires_at_ms <= now_ms => {
                        CommandResult::Rejected("the join token has expired".into())
                    }
                    Some(StoredJoinToken::V1(t)) if t.node.is_some_and(|n| n != node) => {
                        CommandResult::Rejected(format!(
                            "the join token admits node {}, not node {node}",
                            t.node.unwrap_or_default()
                        ))
                    }
                    Some(StoredJoinToken::V1(mut t)) => {
                        t.used_by = node;
                        self.put(k, &StoredJoinToken::V1(t));
                        CommandResult::Done
                    }
                }
            }
            Command::RevokeJoinToken { id } => {
                let k = key::join_token(&id);
                let existed = self.get::<StoredJoinToken>(&k)?.is_some();
                self.delete(k);
                CommandResult::Removed(u64::from(existed))
            }
            Command::PutCustomerSettings(c) => {
                let k = key::customer_settings(&c.customer);
                if c == (CustomerSettings {
                    customer: c.customer.clone(),
                    ..CustomerSettings::default()
                }) {
                    self.delete(k);
                } else {
                    self.put(k, &StoredCustomerSettings::V1(c));
                }
                CommandResult::Done
            }
            Command::PutNode(n) => {
                if self.get::<()>(&key::retired(n.id))?.is_some() {
                    CommandResult::Rejected(format!(
                        "node {} was removed; ids are never reused",
                        n.id
                    ))
                } else {
                    self.put(key::node(n.id), &n);
                    CommandResult::Done
                }
            }
            Command::RetireNode { id } => {
                self.delete(key::node(id));
                self.put(key::retired(id), &());
                CommandResult::Done
            }
            Command::SetFeatureVersion { version } => {
                let current: u32 = self.get(&[key::FEATURE])?.unwrap_or(0);
                if version < current {
                    CommandResult::Rejected(format!(
                        "feature version {version} is below the current {current}"
                    ))
                } else {
                    self.put(vec![key::FEATURE], &version);
                    CommandResult::Done
                }
            }
            Command::PutCustomer(c) => {
                self.put(key::with(key::CUSTOMER, &[c.id.as_bytes()]), &c);
                CommandResult::Done
            }
            Command::DeleteCustomer { id } => {
                // Its tokens go with it, so a customer created again under the same id
                // never inherits them. Tokens are few (the operator makes each one).
                for k in self.keys_with_prefix(&[key::API_TOKEN])? {
                    if let Some(StoredApiToken::V1(t)) = self.get::<StoredApiToken>(&k)? {
                        if t.customer == id {
                            self.delete(k);
                        }
                    }
                }
                self.delete(key::customer_settings(&id));
                self.delete(key::with(key::CUSTOMER, &[id.as_bytes()]));
                CommandResult::Done
            }
            Command::PutAccount(a) => {
                // A disabled account keeps no registrations, so no call reaches its phones.
                if !a.enabled {
                    self.remove_all_bindings(&account_aor(&a.user, &a.domain))?;
                }
                self.put(key::account(&a.domain, &a.user), &a);
                CommandResult::Done
            }
            Command::DeleteAccount { user, domain } => {
                // In the same batch, so no binding outlives its account.
                self.remove_all_bindings(&account_aor(&user, &domain))?;
                self.delete(key::account(&domain, &user));
                CommandResult::Done
            }
            Command::PutBinding(b) => {
                self.put_binding(b)?;
                CommandResult::Done
            }
            Command::RemoveBinding { aor, contact } => {
                CommandResult::Removed(self.remove_binding(&aor, &contact)? as u64)
            }
            Command::RemoveAllBindings { aor } => {
                CommandResult::Removed(self.remove_all_bindings(&aor)?)
            }
            Command::RemoveBindingAt {
                aor,
                contact,
                at_ms,
            } => {
                let removed = self.remove_binding(&aor, &contact)?;
                self.note_removal(&aor, &contact, at_ms)?;
                CommandResult::Removed(removed as u64)
            }
            Command::RemoveAllBindingsAt { aor, at_ms } => {
                let removed = self.remove_all_bindings(&aor)?;
                self.note_removal(&aor, "", at_ms)?;
                CommandResult::Removed(removed)
            }
            Command::ReplayHeldBinding { held, now_ms } => self.replay_held(held, now_ms)?,
            Command::ExpireBindings { now_ms, limit } => {
                // The lapsed bindings come from the index by expiry, but the first `limit`
                // of them in binding-key order go, as when every binding was scanned in
                // key order (an older release still does that; replicas must agree).
                let lapsed = self.lapsed_binding_keys(now_ms)?;
                let mut removed = 0u64;
                for k in lapsed {
                    if removed >= u64::from(limit) {
                        break;
                    }
                    let Some((aor, contact)) = key::aor_and_contact_of_binding(&k) else {
                        continue;
                    };
                    if let Some((_, expires_at_ms)) = self.binding_edge_and_expiry(aor, contact)? {
                        if expires_at_ms <= now_ms {
                            removed += self.remove_binding(aor, contact)? as u64;
                        }
                    }
                }
                // Removal records past their keeping, up to `limit` of them besides the
                // bindings (they exist only once every member runs a release that writes
                // them, so every replica forgets them alike).
                let forgotten = self.first_keys_in_range(
                    &[key::REMOVED_BY_TIME],
                    &key::forgotten_by(now_ms),
                    limit as usize,
                )?;
                for k in forgotten {
                    if let Some(record) = key::removed_of_time(&k) {
                        self.delete(record);
                    }
                    self.delete(k);
                }
                CommandResult::Removed(removed)
            }
            Command::PutProvider(p) => {
                self.put(key::with(key::PROVIDER, &[p.id.as_bytes()]), &p);
                CommandResult::Done
            }
            Command::DeleteProvider { id } => {
                self.delete(key::with(key::PROVIDER, &[id.as_bytes()]));
                if let Some(old) = self.get::<ProviderLease>(&key::lease(&id))? {
                    self.delete(key::lease_by_owner(old.owner, &id));
                    self.delete(key::lease(&id));
                }
                CommandResult::Done
            }
            Command::AcquireLease {
                lease,
                expected_epoch,
            } => {
                let current = self
                    .get::<ProviderLease>(&key::lease(&lease.provider))?
                    .map_or(0, |l| l.epoch);
                if current != expected_epoch {
                    CommandResult::Rejected(format!(
                        "lease epoch is {current}, not {expected_epoch}"
                    ))
                } else if lease.epoch <= current {
                    CommandResult::Rejected(format!(
                        "new epoch {} must exceed {current}",
                        lease.epoch
                    ))
                } else {
                    self.set_lease(&lease)?;
                    CommandResult::Done
                }
            }
            Command::ReleaseLease { provider, epoch } => {
                match self.get::<ProviderLease>(&key::lease(&provider))? {
                    Some(l) if l.epoch == epoch => {
                        self.delete(key::lease_by_owner(l.owner, &provider));
                        self.delete(key::lease(&provider));
                        CommandResult::Done
                    }
                    Some(l) => {
                        CommandResult::Rejected(format!("lease epoch is {}, not {epoch}", l.epoch))
                    }
                    None => CommandResult::Rejected("no lease".into()),
                }
            }
            Command::PutDialplan(d) => {
                self.put(key::with(key::DIALPLAN, &[d.owner.as_bytes()]), &d);
                CommandResult::Done
            }
            Command::ResealAccount {
                user,
                domain,
                expected,
                resealed,
            } => {
                let k = key::account(&domain, &user);
                match self.get::<Account>(&k)? {
                    Some(mut a) if a.ha1 == expected => {
                        a.ha1 = resealed;
                        self.put(k, &a);
                        CommandResult::Done
                    }
                    Some(_) => CommandResult::Rejected(
                        "the account's HA1s changed since they were read".into(),
                    ),
                    None => CommandResult::Rejected("no such account".into()),
                }
            }
            Command::ResealProvider {
                id,
                expected,
                resealed,
            } => {
                let k = key::with(key::PROVIDER, &[id.as_bytes()]);
                match self.get::<Provider>(&k)? {
                    Some(mut p) if p.password == expected => {
                        p.password = resealed;
                        self.put(k, &p);
                        CommandResult::Done
                    }
                    Some(_) => CommandResult::Rejected(
                        "the provider's password changed since it was read".into(),
                    ),
                    None => CommandResult::Rejected("no such provider".into()),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{encode, prefix_end, BindingTable};
    use crate::command::tests::sample_binding;
    use crate::command::{Binding, BindingView};

    fn binding(contact: &str) -> Binding {
        Binding {
            aor: "sip:a@x".into(),
            contact: contact.into(),
            ..sample_binding()
        }
    }

    fn loaded() -> BindingTable {
        BindingTable::default().fresh()
    }

    fn contacts(bindings: Option<Vec<Binding>>) -> Option<Vec<String>> {
        bindings.map(|b| b.into_iter().map(|b| b.contact).collect())
    }

    /// Until it is loaded the table knows nothing, so every read goes to RocksDB.
    #[test]
    fn a_table_not_yet_loaded_answers_nothing() {
        let mut table = BindingTable::default();
        table.set("sip:a@x", &[binding("<sip:1>")]);
        assert_eq!(table.lookup("sip:a@x"), None);
        assert_eq!(table.lookup("sip:b@x"), None);
    }

    /// The table is complete: an AOR without an entry, or whose hash leads to another
    /// AOR's entry, has no bindings. Changes keep an entry sorted by contact, as the keys
    /// are, and an AOR whose last binding goes leaves no entry.
    #[test]
    fn the_table_holds_each_aors_bindings_sorted_and_nothing_else() {
        let mut table = loaded();
        assert_eq!(contacts(table.lookup("sip:a@x")), Some(vec![]));
        let put = |contact: &str| (contact.to_owned(), Some(encode(&binding(contact))));
        table.change("sip:a@x", &[put("<sip:2>"), put("<sip:1>")]);
        assert_eq!(
            contacts(table.lookup("sip:a@x")),
            Some(vec!["<sip:1>".into(), "<sip:2>".into()])
        );
        assert_eq!(contacts(table.lookup("sip:b@x")), Some(vec![]));
        let mut changed = binding("<sip:1>");
        changed.cseq = 9;
        table.change("sip:a@x", &[("<sip:1>".into(), Some(encode(&changed)))]);
        let kept = table.lookup("sip:a@x").unwrap();
        assert_eq!((kept.len(), kept[0].cseq), (2, 9));
        table.change(
            "sip:a@x",
            &[("<sip:1>".into(), None), ("<sip:2>".into(), None)],
        );
        assert_eq!(contacts(table.lookup("sip:a@x")), Some(vec![]));
        assert!(
            table.by_aor.is_empty(),
            "no entry is left for an AOR with none"
        );
    }

    /// Two AORs with bindings and one hash share an empty entry, and reads of either (or
    /// of any AOR with that hash) go to RocksDB from then on, even after one leaves.
    #[test]
    fn aors_whose_hashes_collide_are_read_from_rocksdb() {
        let mut table = loaded();
        table.one_hash = true;
        let a = binding("<sip:1>");
        let z = Binding {
            aor: "sip:z@x".into(),
            ..binding("<sip:9>")
        };
        table.set("sip:a@x", std::slice::from_ref(&a));
        assert_eq!(contacts(table.lookup("sip:z@x")), Some(vec![]));
        table.set("sip:z@x", std::slice::from_ref(&z));
        assert_eq!(table.lookup("sip:a@x"), None);
        assert_eq!(table.lookup("sip:z@x"), None);
        table.set("sip:z@x", &[]);
        assert_eq!(table.lookup("sip:a@x"), None);
        assert_eq!(table.lookup("sip:other@x"), None);
        // Loading afresh keeps the way the table hashes.
        let mut again = table.fresh();
        again.set("sip:a@x", &[a]);
        again.set("sip:z@x", &[z]);
        assert_eq!(again.lookup("sip:a@x"), None);
    }

    /// A change splices encodings; the entry it leaves is byte for byte what encoding
    /// the bindings afresh gives, with a count that takes more than one byte too, and a
    /// value that is not a binding is left out as a decoded one was.
    #[test]
    fn a_spliced_entry_is_the_encoding_of_its_bindings() {
        let mut table = loaded();
        let contact = |i: usize| format!("<sip:{i:03}>");
        let puts: Vec<_> = (0..200)
            .rev()
            .map(|i| (contact(i), Some(encode(&binding(&contact(i))))))
            .collect();
        table.change("sip:a@x", &puts);
        let mut expected: Vec<Binding> = (0..200).map(|i| binding(&contact(i))).collect();
        let kept = |t: &BindingTable| t.by_aor.values().next().unwrap().to_vec();
        assert_eq!(kept(&table), encode(&expected));
        let mut changed = binding(&contact(7));
        changed.edge_node = 3;
        changed.path = vec!["<sip:edge>".into()];
        table.change(
            "sip:a@x",
            &[
                (contact(7), Some(encode(&changed))),
                (contact(150), None),
                (contact(151), Some(b"not a binding".to_vec())),
                (contact(152), None),
            ],
        );
        expected[7] = changed;
        expected.drain(150..153);
        assert_eq!(kept(&table), encode(&expected));
        assert_eq!(table.lookup("sip:a@x"), Some(expected));
        // Found in place: the changed one, none for a removed one or another AOR.
        let edge = |b: &BindingView<'_>| (b.edge_node, b.expires_at_ms);
        let at = sample_binding().expires_at_ms;
        assert_eq!(
            table.find("sip:a@x", &contact(7), edge),
            Some(Some((3, at)))
        );
        assert_eq!(
            table.find("sip:a@x", &contact(8), edge),
            Some(Some((2, at)))
        );
        assert_eq!(table.find("sip:a@x", &contact(150), edge), Some(None));
        assert_eq!(table.find("sip:b@x", &contact(8), edge), Some(None));
    }

    /// Where two AORs share an entry, a change leaves it shared and nothing is found in
    /// place: RocksDB answers for both.
    #[test]
    fn changes_of_aors_whose_hashes_collide_leave_them_to_rocksdb() {
        let mut table = loaded();
        table.one_hash = true;
        let put = |aor: &str, contact: &str| {
            let b = Binding {
                aor: aor.into(),
                ..binding(contact)
            };
            vec![(contact.to_owned(), Some(encode(&b)))]
        };
        table.change("sip:a@x", &put("sip:a@x", "<sip:1>"));
        let edge = |b: &BindingView<'_>| b.edge_node;
        assert_eq!(table.find("sip:a@x", "<sip:1>", edge), Some(Some(2)));
        assert_eq!(table.find("sip:z@x", "<sip:1>", edge), Some(None));
        table.change("sip:z@x", &put("sip:z@x", "<sip:9>"));
        assert_eq!(table.find("sip:a@x", "<sip:1>", edge), None);
        assert_eq!(table.find("sip:z@x", "<sip:9>", edge), None);
        table.change("sip:a@x", &[("<sip:1>".into(), None)]);
        assert_eq!(table.lookup("sip:z@x"), None);
        // Not loaded: nothing in place either.
        let mut unloaded = BindingTable::default();
        unloaded.change("sip:a@x", &put("sip:a@x", "<sip:1>"));
        assert_eq!(unloaded.find("sip:a@x", "<sip:1>", edge), None);
    }

    #[test]
    fn the_end_of_a_prefix_bounds_exactly_the_keys_that_start_with_it() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[7, 0xff, 0xff]), Some(vec![8]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        let end = prefix_end(&[3, 0]).unwrap();
        for key in [[3u8, 0].as_slice(), &[3, 0, 0], &[3, 0, 0xff, 0xff]] {
            assert!(key < end.as_slice(), "{key:?}");
        }
        assert!([3u8, 1].as_slice() >= end.as_slice());
    }
}
