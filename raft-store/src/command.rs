//! Replicated commands and the records they write (raft-store/DESIGN.md, "Versioned commands and
//! rolling upgrades").
//!
//! In the log, every command is an [`EncodedCommand`]: a kind, a version and a postcard
//! body. A node decodes the kinds and versions it knows and refuses, with an error that
//! names them, a command it does not, instead of guessing. Kind numbers are never reused.
//! Commands carry every value `apply` needs (absolute expiry times, lease epochs, "now"
//! for expiry sweeps), because `apply` reads no clock and draws no random numbers.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::crypto::Sealed;
use crate::Error;

/// A node's id in the cluster: assigned once, never reused.
pub type NodeId = u64;

/// A command as it is stored in the log.
///
/// The body is shared, not owned: openraft clones every entry it replicates or keeps in
/// the log cache, and a batch holds tens of bodies. It is encoded as a byte string, which in
/// postcard is exactly what a `Vec<u8>` was (a length, then the bytes), so the log on disk
/// and the RPCs between releases stay the same; only the work of reading and writing them
/// changes, from a call per byte to one copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedCommand {
    pub kind: u16,
    pub version: u16,
    #[serde(with = "byte_string")]
    pub body: Bytes,
}

/// Serde for a body as a byte string: written with `serialize_bytes`, read from bytes or,
/// for a format that writes a byte string as a sequence, from a sequence of bytes.
mod byte_string {
    use bytes::Bytes;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(body)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct Body;
        impl<'de> Visitor<'de> for Body {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a command body (bytes)")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes::from(v))
            }
        }
        d.deserialize_byte_buf(Body)
    }
}

/// The outcome of one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Done,
    /// How many records a sweep removed.
    Removed(u64),
    /// A conditional command whose condition did not hold (e.g. a stale lease epoch).
    Rejected(String),
}

/// What a node runs (raft-store/DESIGN.md, "Pair plus witness"). Also the `node.role` config value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs every SIP agent and holds a full replica.
    #[default]
    Full,
    /// A Raft voter only: no SIP listeners.
    Witness,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Full => "full",
            Role::Witness => "witness",
        }
    }
}

/// A member of the cluster as the agents see it (the node registry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub sip_addrs: Vec<String>,
    pub raft_addr: String,
    pub role: Role,
    pub software_version: String,
    pub draining: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub enabled: bool,
}

/// What a customer may change about how its calls are handled; zero or empty means the
/// node's default (or no limit).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerSettings {
    pub customer: String,
    /// Days its CDRs are kept (0: the node's `cdr.retention_days`).
    pub cdr_retention_days: u32,
    /// The most calls through the app server at once, over all its accounts (0: none).
    pub max_calls: u32,
    /// The IANA time zone its dialplans' time helpers use (empty: UTC).
    pub time_zone: String,
}

/// The address-of-record of an account: what its bindings are keyed by.
pub fn account_aor(user: &str, domain: &str) -> String {
    format!("sip:{user}@{domain}")
}

/// The user and domain of an AOR that [`account_aor`] made, if `aor` is one.
pub fn account_of_aor(aor: &str) -> Option<(&str, &str)> {
    aor.strip_prefix("sip:")?.rsplit_once('@')
}

/// The owner an account's dialplan for calls *to* it is stored under (its dialplan for the
/// calls it makes is stored under `user@domain`).
pub fn incoming_dialplan_owner(user: &str, domain: &str) -> String {
    format!("in:{user}@{domain}")
}

/// The record id a sealed account field is bound to (see `crypto`).
pub fn account_record(user: &str, domain: &str) -> String {
    format!("account/{user}@{domain}")
}

/// The record id a sealed provider field is bound to.
pub fn provider_record(id: &str) -> String {
    format!("provider/{id}")
}

/// The field name of an account's sealed HA1 for one algorithm.
pub fn ha1_field(algorithm: &str) -> String {
    format!("ha1.{algorithm}")
}

/// The field name of a provider's sealed password.
pub const PROVIDER_PASSWORD_FIELD: &str = "password";

/// A SIP account. Passwords exist only as per-algorithm HA1 values, sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user: String,
    pub domain: String,
    pub customer: String,
    /// (algorithm name, sealed HA1), e.g. ("MD5", ..), ("SHA-256", ..).
    pub ha1: Vec<(String, Sealed)>,
    pub enabled: bool,
    pub max_contacts: u32,
    pub max_concurrent_calls: u32,
}

/// How a binding's contact is reached: the connection or address it registered from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFlow {
    /// "UDP", "TCP" or "TLS".
    pub transport: String,
    pub remote: String,
    pub local: String,
    pub connection: Option<u64>,
}

/// A registrar binding (RFC 3261 §10).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub aor: String,
    pub contact: String,
    /// When the binding lapses (Unix ms). The registrar adds one interval of headroom, so
    /// refreshes need not all go through Raft (node/DESIGN.md, "Bindings are written when
    /// they change").
    pub expires_at_ms: u64,
    /// The interval granted to the phone, in seconds.
    pub expires_secs: u32,
    pub edge_node: NodeId,
    pub flow: StoredFlow,
    pub path: Vec<String>,
    pub call_id: String,
    pub cseq: u32,
    /// q-value in thousandths (1000 = 1.0).
    pub q: u16,
    pub user_agent: String,
}

/// A [`Binding`] read in place from its encoding: the same fields in the same order, so
/// the same bytes, with the strings borrowed. The location table and the state machine
/// walk an AOR's encoded bindings for a contact, an edge node or an expiry on every
/// replicated write; a decoded binding allocates seven strings for what they throw away.
/// (A test below keeps the two in step: a field added to one and not the other fails it.)
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // every field is read past, in order; the callers use a few of them
pub(crate) struct BindingView<'a> {
    pub aor: &'a str,
    pub contact: &'a str,
    pub expires_at_ms: u64,
    pub expires_secs: u32,
    pub edge_node: NodeId,
    #[serde(borrow)]
    pub flow: (&'a str, &'a str, &'a str, Option<u64>),
    #[serde(borrow)]
    pub path: Vec<&'a str>,
    pub call_id: &'a str,
    pub cseq: u32,
    pub q: u16,
    pub user_agent: &'a str,
}

impl<'a> BindingView<'a> {
    /// The binding at the front of `bytes`, and what follows it.
    pub(crate) fn take(bytes: &'a [u8]) -> Option<(BindingView<'a>, &'a [u8])> {
        postcard::take_from_bytes(bytes).ok()
    }

    /// `bytes`, when they are one whole binding.
    pub(crate) fn of(bytes: &'a [u8]) -> Option<BindingView<'a>> {
        Self::take(bytes).and_then(|(view, rest)| rest.is_empty().then_some(view))
    }
}

/// How many intervals a binding is stored to last: the registrar stores an expiry of
/// twice the interval it grants, so that refreshes inside the second need no write
/// (node/DESIGN.md, "Bindings are written when they change").
pub const BINDING_HEADROOM_INTERVALS: u64 = 2;

impl Binding {
    /// When the binding was written (Unix ms, the proposer's clock), from its expiry less
    /// its headroom.
    pub fn written_at_ms(&self) -> u64 {
        self.expires_at_ms
            .saturating_sub(BINDING_HEADROOM_INTERVALS * u64::from(self.expires_secs) * 1000)
    }
}

/// A binding change a node answered a phone for without a quorum, kept on its disk and
/// replayed through Raft once it has one ([`Command::ReplayHeldBinding`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBinding {
    /// The account the AOR is of.
    pub user: String,
    pub domain: String,
    pub aor: String,
    pub contact: String,
    /// When the holding node answered the phone (its clock, Unix ms).
    pub held_at_ms: u64,
    /// The binding written, or `None` for its removal.
    pub binding: Option<Binding>,
}

/// A customer's account at a third-party provider, kept registered by the registration agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    pub id: String,
    pub customer: String,
    pub registrar: String,
    pub username: String,
    pub password: Sealed,
    pub expires_secs: u32,
    pub enabled: bool,
}

/// Who registers a provider account, until when (raft-store/DESIGN.md, "Provider leases").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderLease {
    pub provider: String,
    pub owner: NodeId,
    pub epoch: u64,
    pub expires_at_ms: u64,
}

/// The transport the registration agent uses towards a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderTransport {
    Udp,
    Tcp,
    Tls,
}

impl ProviderTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderTransport::Udp => "udp",
            ProviderTransport::Tcp => "tcp",
            ProviderTransport::Tls => "tls",
        }
    }
}

/// Where a call from a provider goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundTarget {
    /// A local account, `user@domain`: its phones ring.
    Account(String),
    /// A dialplan, by its owner.
    Dialplan(String),
}

/// The id of a customer's provider account: `customer/name`. Both parts are admin-API ids,
/// which never contain `/`.
pub fn provider_account_id(customer: &str, name: &str) -> String {
    format!("{customer}/{name}")
}

/// A customer's account at a third-party provider, kept registered by the registration
/// agent (feature version 1; the record of the first release, [`Provider`], is never
/// written by this release).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderAccount {
    pub customer: String,
    pub name: String,
    /// `host[:port]`, or a domain resolved by RFC 3263.
    pub registrar: String,
    /// `None`: RFC 3263 chooses.
    pub transport: Option<ProviderTransport>,
    /// The user part of the AOR registered (To and From).
    pub username: String,
    /// The digest username, when it differs from `username`.
    pub auth_username: Option<String>,
    /// Sealed for [`provider_record`] of [`ProviderAccount::id`], field
    /// [`PROVIDER_PASSWORD_FIELD`].
    pub password: Sealed,
    /// The digest realm to answer; `None`: whatever the provider's challenge names.
    pub realm: Option<String>,
    pub expires_secs: u32,
    pub enabled: bool,
    /// `host[:port]` every request to the provider goes through.
    pub outbound_proxy: Option<String>,
    /// The user part of the Contact registered; `None`: `username`.
    pub contact_user: Option<String>,
    pub inbound: Option<InboundTarget>,
    /// A PEM file of CAs trusted for this provider's TLS certificate, on every node, in
    /// addition to the system's roots.
    pub ca_file: Option<String>,
    /// The `+sip.instance` URN every owner registers with (RFC 5626), fixed when the account
    /// is created, so a new owner's contact replaces the old one at registrars that
    /// support it.
    pub instance: String,
}

impl ProviderAccount {
    pub fn id(&self) -> String {
        provider_account_id(&self.customer, &self.name)
    }
}

/// A customer's PBX or carrier that places calls from known addresses instead of
/// answering digest challenges, as Kamailio's address table does (feature version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trunk {
    pub customer: String,
    pub name: String,
    /// Where its calls come from: addresses or networks (`203.0.113.7`, `2001:db8::/48`).
    pub sources: Vec<String>,
    /// Only over this transport; `None`: any.
    pub transport: Option<ProviderTransport>,
    /// Only from this source port; `None`: any.
    pub port: Option<u16>,
    /// The customer's local account (`user@domain`) the trunk's calls are made as: its
    /// dialplan runs and its limits apply.
    pub account: String,
    pub enabled: bool,
}

impl Trunk {
    pub fn id(&self) -> String {
        provider_account_id(&self.customer, &self.name)
    }
}

/// A customer's admin API token (feature version 4): it sees and changes only that
/// customer's records (node/DESIGN.md, "Who may do what on the admin port"). The token is
/// `tc_<id>_<secret>`; only the SHA-256 of the secret is stored, so the log, snapshots and
/// data directories never hold what a client presents. The secret is 256 random bits, so a
/// fast hash is enough: there is nothing to guess a dictionary for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// 16 lowercase hex digits, public: it names the token in lists and revocations.
    pub id: String,
    pub customer: String,
    /// The operator's note on what the token is for.
    pub label: String,
    pub secret_sha256: [u8; 32],
    pub created_at_ms: u64,
}

/// A one-time token that lets a node join the cluster (feature version 5; raft-store/DESIGN.md,
/// "Joining"). As with [`ApiToken`], only the secret's SHA-256 is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// 16 lowercase hex digits, public: it names the token in lists and revocations.
    pub id: String,
    pub secret_sha256: [u8; 32],
    /// The node id it admits, if the operator named one; any id otherwise.
    pub node: Option<NodeId>,
    pub created_at_ms: u64,
    /// After this (by the leader's clock) it admits nobody; the record is then removed by
    /// the next [`Command::PutJoinToken`].
    pub expires_at_ms: u64,
    /// The node that joined with it; 0 while unused.
    pub used_by: NodeId,
}

/// Which node registers a provider account, until when (raft-store/DESIGN.md, "Provider
/// leases"). Feature version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The provider account's id.
    pub provider: String,
    pub owner: NodeId,
    /// Rises with every grant, so a command about an older grant is refused.
    pub epoch: u64,
    /// Unix ms, by the clock of the node that granted it; the owner's renewals
    /// (`RenewLeases`, one record per node) extend it, and readers see the later of the
    /// two (`StateReader::provider_lease`).
    pub expires_at_ms: u64,
    /// The leader moves the account: the owner un-registers it and then drops the lease.
    /// A releasing lease is not renewed.
    pub releasing: bool,
}

/// A customer's telephone number (a DID): calls from the customer's providers to it
/// ring the account it names (feature version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Number {
    /// The number's digits, as providers send it in a Request-URI or To (a leading `+` is
    /// not part of it: `+4930123` and `4930123` are one number).
    pub number: String,
    pub customer: String,
    /// The local account its calls ring, `user@domain`.
    pub account: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dialplan {
    /// The account (`user@domain`) or customer the script belongs to.
    pub owner: String,
    pub script: String,
    pub version: u64,
}

/// Every command Tandem replicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Writes nothing; for tests and benchmarks of the write path.
    Noop {
        payload: Vec<u8>,
    },
    PutNode(NodeRecord),
    /// A node left the cluster for good: its registry record goes, and its id is never
    /// accepted again.
    RetireNode {
        id: NodeId,
    },
    /// Switches on command kinds every member understands (raft-store/DESIGN.md, "Versioned
    /// commands and rolling upgrades").
    SetFeatureVersion {
        version: u32,
    },
    PutCustomer(Customer),
    DeleteCustomer {
        id: String,
    },
    PutAccount(Account),
    DeleteAccount {
        user: String,
        domain: String,
    },
    PutBinding(Binding),
    RemoveBinding {
        aor: String,
        contact: String,
    },
    RemoveAllBindings {
        aor: String,
    },
    /// Removes every binding that expired at or before `now_ms` (the leader's clock).
    ExpireBindings {
        now_ms: u64,
        limit: u32,
    },
    PutProvider(Provider),
    DeleteProvider {
        id: String,
    },
    /// Grants or renews a lease if `expected_epoch` matches the current one (0 = none).
    AcquireLease {
        lease: ProviderLease,
        expected_epoch: u64,
    },
    ReleaseLease {
        provider: String,
        epoch: u64,
    },
    PutDialplan(Dialplan),
    /// Key rotation: replaces an account's sealed HA1s if they are still `expected`.
    ResealAccount {
        user: String,
        domain: String,
        expected: Vec<(String, Sealed)>,
        resealed: Vec<(String, Sealed)>,
    },
    /// Key rotation: replaces a provider's sealed password if it is still `expected`.
    ResealProvider {
        id: String,
        expected: Sealed,
        resealed: Sealed,
    },
    /// Creates or replaces a provider account. Disabling one keeps its lease, so its owner
    /// can un-register it first.
    PutNumber(Number),
    DeleteNumber {
        number: String,
    },
    /// Creates or replaces a customer's settings.
    PutCustomerSettings(CustomerSettings),
    PutTrunk(Trunk),
    DeleteTrunk {
        id: String,
    },
    /// Creates a customer's API token (feature version 4).
    PutApiToken(ApiToken),
    /// Revokes an API token: every node refuses it from the entry on (feature version 4).
    RevokeApiToken {
        id: String,
    },
    /// Stores a join token, first removing every one expired by `now_ms` (the leader's
    /// clock); rejected when [`MAX_JOIN_TOKENS`] unexpired ones exist (feature version 5).
    PutJoinToken {
        token: JoinToken,
        now_ms: u64,
    },
    /// Marks join token `id` used by `node`: rejected if it does not exist, expired by
    /// `now_ms`, admits another node id, or was used by another node. The leader proposes
    /// it only after checking the secret, and adds the node only once it applied: so two
    /// nodes racing with one token cannot both join (feature version 5).
    UseJoinToken {
        id: String,
        node: NodeId,
        now_ms: u64,
    },
    /// Removes a join token, used or not (feature version 5).
    RevokeJoinToken {
        id: String,
    },
    PutProviderAccount(ProviderAccount),
    /// Deletes a provider account and its lease.
    DeleteProviderAccount {
        id: String,
    },
    /// Key rotation: replaces a provider account's sealed password if it is still `expected`.
    ResealProviderAccount {
        id: String,
        expected: Sealed,
        resealed: Sealed,
    },
    /// The leader grants `lease` if the current epoch is `expected_epoch` (0 = no lease),
    /// the new epoch is higher, the account exists and is enabled, and a current lease
    /// that still has an owner had lapsed by `lapsed_by_ms` (the leader's clock less the
    /// skew allowance), its owner's renewals included: a renewal that lands first wins.
    GrantLease {
        lease: Lease,
        expected_epoch: u64,
        lapsed_by_ms: u64,
    },
    /// An owner renews every lease it holds, in one record per node: each of its leases
    /// that is not releasing runs until at least `expires_at_ms`.
    RenewLeases {
        owner: NodeId,
        expires_at_ms: u64,
    },
    /// The leader asks the owner of `epoch` to hand the account over.
    ReleaseLeaseAsked {
        provider: String,
        epoch: u64,
    },
    /// The lease of `epoch` ends (its owner un-registered, or gave it up). Its epoch stays,
    /// as a lease of owner 0, so the next grant's is higher.
    DropLease {
        provider: String,
        epoch: u64,
    },
    /// Removes one binding, as [`Command::RemoveBinding`] does, and remembers when it was
    /// removed (`at_ms`, the proposer's clock), so a change held from before then is not
    /// replayed over the removal (feature version 4).
    RemoveBindingAt {
        aor: String,
        contact: String,
        at_ms: u64,
    },
    /// Removes every binding of an AOR and remembers when (feature version 4).
    RemoveAllBindingsAt {
        aor: String,
        at_ms: u64,
    },
    /// A binding change a node answered without a quorum, replayed once it has one
    /// (node/DESIGN.md, "Degraded mode"; feature version 4). `now_ms` is the replaying
    /// node's clock. It is applied only if no write or removal of that binding since
    /// `held.held_at_ms` is stored, the binding has not lapsed by `now_ms`, and, for a new
    /// binding, its account and customer still exist and are enabled; otherwise the
    /// result is `Rejected`, saying why.
    ReplayHeldBinding {
        held: HeldBinding,
        now_ms: u64,
    },
    /// The command kind of the next release, which this one does not know: decoded only
    /// by a process that plays the next release ([`play_next_release`]), as the
    /// rolling-upgrade test's newer binary does (raft-store/DESIGN.md, "Versioned commands
    /// and rolling upgrades").
    PutClusterNote {
        text: String,
    },
}

macro_rules! kinds {
    ($($kind:expr => $variant:ident),* $(,)?) => {
        impl Command {
            fn kind(&self) -> u16 {
                match self { $( Command::$variant { .. } => $kind, )* }
            }
        }
    };
}

kinds! {
    1 => Noop, 2 => PutNode, 3 => SetFeatureVersion, 4 => PutCustomer, 5 => DeleteCustomer,
    6 => PutAccount, 7 => DeleteAccount, PUT_BINDING_KIND => PutBinding, 9 => RemoveBinding,
    10 => RemoveAllBindings, 11 => ExpireBindings, 12 => PutProvider, 13 => DeleteProvider,
    14 => AcquireLease, 15 => ReleaseLease, 16 => PutDialplan, 17 => ResealAccount,
    18 => ResealProvider, 19 => RetireNode, 20 => PutProviderAccount,
    21 => DeleteProviderAccount, 22 => ResealProviderAccount, 23 => GrantLease,
    24 => RenewLeases, 25 => ReleaseLeaseAsked, 26 => DropLease, 27 => PutNumber,
    28 => DeleteNumber, 29 => PutCustomerSettings, 30 => PutTrunk, 31 => DeleteTrunk,
    // The upgrade test's stand-in for a later release's kind: 32 is never used for
    // anything else.
    32 => PutClusterNote,
    33 => RemoveBindingAt, 34 => RemoveAllBindingsAt, 35 => ReplayHeldBinding,
    36 => PutApiToken, 37 => RevokeApiToken, 38 => PutJoinToken, 39 => UseJoinToken,
    40 => RevokeJoinToken,
}

/// [`Command::PutBinding`]'s kind, named because the state machine reads it without
/// decoding the command ([`EncodedCommand::put_binding_view`]).
const PUT_BINDING_KIND: u16 = 8;

impl EncodedCommand {
    /// The binding a [`Command::PutBinding`] writes, read in place from the body, which is
    /// the binding's encoding as [`Command::encode`] wrote it; `None` for any other
    /// command, a version this binary does not read, or a body that is not one whole
    /// binding (decoding then decides, as for every other command). The state machine
    /// stores such a body as it is: the bytes encoding the decoded binding would give,
    /// without its seven strings decoded and encoded again.
    pub(crate) fn put_binding_view(&self) -> Option<BindingView<'_>> {
        if self.kind != PUT_BINDING_KIND || self.version == 0 || self.version > VERSION {
            return None;
        }
        BindingView::of(&self.body)
    }
}

/// Unexpired join tokens the cluster holds at most: minting is for operators, and a
/// bound keeps a leaked operator script from filling the state.
pub const MAX_JOIN_TOKENS: usize = 100;

/// The command version this binary writes; it reads every version up to it.
const VERSION: u16 = 1;

/// The highest cluster feature version this binary supports (raft-store/DESIGN.md,
/// "Versioned commands and rolling upgrades"). Kinds 1 to 19 exist since version 0, the
/// first release; a kind or body version added later names the feature version that
/// introduced it in [`Command::since`], and this constant rises with it.
///
/// | version | brings |
/// |---|---|
/// | 1 | provider accounts and their leases (kinds 20 to 26) |
/// | 2 | customers' numbers (kinds 27 and 28) |
/// | 3 | customer settings: CDR retention, call limit, time zone (kind 29); trunks (30, 31) |
/// | 4 | removals that leave their time, and held registrations replayed conditionally (kinds 33 to 35); customers' API tokens (36, 37) |
/// | 5 | one-time join tokens (kinds 38 to 40); from this version a join without one is refused |
pub const FEATURES: u32 = 5;

/// Set once, before anything else runs, by a process that plays the next release.
static NEXT_RELEASE: AtomicBool = AtomicBool::new(false);

/// Makes this process the next release for the rolling-upgrade test (failover-tests,
/// `tandem-next`): it supports feature version [`FEATURES`] + 1 and knows that version's
/// command kind ([`Command::PutClusterNote`]), which this release refuses to decode like
/// any kind it does not know. Two binaries that differ in exactly what two releases differ
/// in, without compiling the node twice for the test. Nothing else calls it.
pub fn play_next_release() {
    NEXT_RELEASE.store(true, Ordering::SeqCst);
}

/// Whether this process plays the next release (see [`play_next_release`]).
pub fn plays_next_release() -> bool {
    NEXT_RELEASE.load(Ordering::Relaxed)
}

/// The highest cluster feature version this process supports.
pub fn supported_features() -> u32 {
    FEATURES + u32::from(plays_next_release())
}

impl Command {
    /// The cluster feature version from which this command may be proposed: only once
    /// every member can apply it.
    pub fn since(&self) -> u32 {
        match self {
            Command::PutProviderAccount(_)
            | Command::DeleteProviderAccount { .. }
            | Command::ResealProviderAccount { .. }
            | Command::GrantLease { .. }
            | Command::RenewLeases { .. }
            | Command::ReleaseLeaseAsked { .. }
            | Command::DropLease { .. } => 1,
            Command::PutNumber(_) | Command::DeleteNumber { .. } => 2,
            Command::PutCustomerSettings(_)
            | Command::PutTrunk(_)
            | Command::DeleteTrunk { .. } => 3,
            Command::RemoveBindingAt { .. }
            | Command::RemoveAllBindingsAt { .. }
            | Command::ReplayHeldBinding { .. }
            | Command::PutApiToken(_)
            | Command::RevokeApiToken { .. } => 4,
            Command::PutJoinToken { .. }
            | Command::UseJoinToken { .. }
            | Command::RevokeJoinToken { .. } => 5,
            Command::PutClusterNote { .. } => FEATURES + 1,
            _ => 0,
        }
    }
}

/// Bodies of commands whose payload is several fields.
#[derive(Serialize, Deserialize)]
struct ResealAccountBody {
    user: String,
    domain: String,
    expected: Vec<(String, Sealed)>,
    resealed: Vec<(String, Sealed)>,
}

#[derive(Serialize, Deserialize)]
struct GrantLeaseBody {
    lease: Lease,
    expected_epoch: u64,
    lapsed_by_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct AcquireLeaseBody {
    lease: ProviderLease,
    expected_epoch: u64,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("in-memory serialisation does not fail")
}

impl Command {
    pub fn encode(&self) -> EncodedCommand {
        let body = match self {
            Command::Noop { payload } => enc(payload),
            Command::PutNode(n) => enc(n),
            Command::RetireNode { id } => enc(id),
            Command::SetFeatureVersion { version } => enc(version),
            Command::PutCustomer(c) => enc(c),
            Command::DeleteCustomer { id } => enc(id),
            Command::PutAccount(a) => enc(a),
            Command::DeleteAccount { user, domain } => enc(&(user, domain)),
            Command::PutBinding(b) => enc(b),
            Command::RemoveBinding { aor, contact } => enc(&(aor, contact)),
            Command::RemoveAllBindings { aor } => enc(aor),
            Command::ExpireBindings { now_ms, limit } => enc(&(now_ms, limit)),
            Command::PutProvider(p) => enc(p),
            Command::DeleteProvider { id } => enc(id),
            Command::AcquireLease {
                lease,
                expected_epoch,
            } => enc(&AcquireLeaseBody {
                lease: lease.clone(),
                expected_epoch: *expected_epoch,
            }),
            Command::ReleaseLease { provider, epoch } => enc(&(provider, epoch)),
            Command::PutDialplan(d) => enc(d),
            Command::ResealAccount {
                user,
                domain,
                expected,
                resealed,
            } => enc(&ResealAccountBody {
                user: user.clone(),
                domain: domain.clone(),
                expected: expected.clone(),
                resealed: resealed.clone(),
            }),
            Command::ResealProvider {
                id,
                expected,
                resealed,
            } => enc(&(id, expected, resealed)),
            Command::PutNumber(n) => enc(n),
            Command::DeleteNumber { number } => enc(number),
            Command::PutCustomerSettings(c) => enc(c),
            Command::PutTrunk(t) => enc(t),
            Command::DeleteTrunk { id } => enc(id),
            Command::PutApiToken(t) => enc(t),
            Command::RevokeApiToken { id } => enc(id),
            Command::PutJoinToken { token, now_ms } => enc(&(token, now_ms)),
            Command::UseJoinToken { id, node, now_ms } => enc(&(id, node, now_ms)),
            Command::RevokeJoinToken { id } => enc(id),
            Command::PutClusterNote { text } => enc(text),
            Command::RemoveBindingAt {
                aor,
                contact,
                at_ms,
            } => enc(&(aor, contact, at_ms)),
            Command::RemoveAllBindingsAt { aor, at_ms } => enc(&(aor, at_ms)),
            Command::ReplayHeldBinding { held, now_ms } => enc(&(held, now_ms)),
            Command::PutProviderAccount(p) => enc(p),
            Command::DeleteProviderAccount { id } => enc(id),
            Command::ResealProviderAccount {
                id,
                expected,
                resealed,
            } => enc(&(id, expected, resealed)),
            Command::GrantLease {
                lease,
                expected_epoch,
                lapsed_by_ms,
            } => enc(&GrantLeaseBody {
                lease: lease.clone(),
                expected_epoch: *expected_epoch,
                lapsed_by_ms: *lapsed_by_ms,
            }),
            Command::RenewLeases {
                owner,
                expires_at_ms,
            } => enc(&(owner, expires_at_ms)),
            Command::ReleaseLeaseAsked { provider, epoch }
            | Command::DropLease { provider, epoch } => enc(&(provider, epoch)),
        };
        EncodedCommand {
            kind: self.kind(),
            version: VERSION,
            body: Bytes::from(body),
        }
    }

    pub fn decode(e: &EncodedCommand) -> Result<Command, Error> {
        if e.version == 0 || e.version > VERSION {
            return Err(Error::UnknownCommand {
                kind: e.kind,
                version: e.version,
            });
        }
        let b = &e.body[..];
        let bad = |_| {
            Error::Corrupt(format!(
                "command kind {} version {} does not decode",
                e.kind, e.version
            ))
        };
        Ok(match e.kind {
            1 => Command::Noop {
                payload: postcard::from_bytes(b).map_err(bad)?,
            },
            2 => Command::PutNode(postcard::from_bytes(b).map_err(bad)?),
            19 => Command::RetireNode {
                id: postcard::from_bytes(b).map_err(bad)?,
            },
            3 => Command::SetFeatureVersion {
                version: postcard::from_bytes(b).map_err(bad)?,
            },
            4 => Command::PutCustomer(postcard::from_bytes(b).map_err(bad)?),
            5 => Command::DeleteCustomer {
                id: postcard::from_bytes(b).map_err(bad)?,
            },
            6 => Command::PutAccount(postcard::from_bytes(b).map_err(bad)?),
            7 => {
                let (user, domain) = postcard::from_bytes(b).map_err(bad)?;
                Command::DeleteAccount { user, domain }
            }
            PUT_BINDING_KIND => Command::PutBinding(postcard::from_bytes(b).map_err(bad)?),
            9 => {
                let (aor, contact) = postcard::from_bytes(b).map_err(bad)?;
                Command::RemoveBinding { aor, contact }
            }
            10 => Command::RemoveAllBindings {
                aor: postcard::from_bytes(b).map_err(bad)?,
            },
            11 => {
                let (now_ms, limit) = postcard::from_bytes(b).map_err(bad)?;
                Command::ExpireBindings { now_ms, limit }
            }
            12 => Command::PutProvider(postcard::from_bytes(b).map_err(bad)?),
            13 => Command::DeleteProvider {
                id: postcard::from_bytes(b).map_err(bad)?,
            },
            14 => {
                let body: AcquireLeaseBody = postcard::from_bytes(b).map_err(bad)?;
                Command::AcquireLease {
                    lease: body.lease,
                    expected_epoch: body.expected_epoch,
                }
            }
            15 => {
                let (provider, epoch) = postcard::from_bytes(b).map_err(bad)?;
                Command::ReleaseLease { provider, epoch }
            }
            16 => Command::PutDialplan(postcard::from_bytes(b).map_err(bad)?),
            17 => {
                let r: ResealAccountBody = postcard::from_bytes(b).map_err(bad)?;
                Command::ResealAccount {
                    user: r.user,
                    domain: r.domain,
                    expected: r.expected,
                    resealed: r.resealed,
                }
            }
            18 => {
                let (id, expected, resealed) = postcard::from_bytes(b).map_err(bad)?;
                Command::ResealProvider {
                    id,
                    expected,
                    resealed,
                }
            }
            27 => Command::PutNumber(postcard::from_bytes(b).map_err(bad)?),
            28 => Command::DeleteNumber {
                number: postcard::from_bytes(b).map_err(bad)?,
            },
            29 => Command::PutCustomerSettings(postcard::from_bytes(b).map_err(bad)?),
            30 => Command::PutTrunk(postcard::from_bytes(b).map_err(bad)?),
            31 => Command::DeleteTrunk {
                id: postcard::from_bytes(b).map_err(bad)?,
            },
            33 => {
                let (aor, contact, at_ms) = postcard::from_bytes(b).map_err(bad)?;
                Command::RemoveBindingAt {
                    aor,
                    contact,
                    at_ms,
                }
            }
            34 => {
                let (aor, at_ms) = postcard::from_bytes(b).map_err(bad)?;
                Command::RemoveAllBindingsAt { aor, at_ms }
            }
            35 => {
                let (held, now_ms) = postcard::from_bytes(b).map_err(bad)?;
                Command::ReplayHeldBinding { held, now_ms }
            }
            36 => Command::PutApiToken(postcard::from_bytes(b).map_err(bad)?),
            37 => Command::RevokeApiToken {
                id: postcard::from_bytes(b).map_err(bad)?,
            },
            38 => {
                let (token, now_ms) = postcard::from_bytes(b).map_err(bad)?;
                Command::PutJoinToken { token, now_ms }
            }
            39 => {
                let (id, node, now_ms) = postcard::from_bytes(b).map_err(bad)?;
                Command::UseJoinToken { id, node, now_ms }
            }
            40 => Command::RevokeJoinToken {
                id: postcard::from_bytes(b).map_err(bad)?,
            },
            32 if plays_next_release() => Command::PutClusterNote {
                text: postcard::from_bytes(b).map_err(bad)?,
            },
            20 => Command::PutProviderAccount(postcard::from_bytes(b).map_err(bad)?),
            21 => Command::DeleteProviderAccount {
                id: postcard::from_bytes(b).map_err(bad)?,
            },
            22 => {
                let (id, expected, resealed) = postcard::from_bytes(b).map_err(bad)?;
                Command::ResealProviderAccount {
                    id,
                    expected,
                    resealed,
                }
            }
            23 => {
                let body: GrantLeaseBody = postcard::from_bytes(b).map_err(bad)?;
                Command::GrantLease {
                    lease: body.lease,
                    expected_epoch: body.expected_epoch,
                    lapsed_by_ms: body.lapsed_by_ms,
                }
            }
            24 => {
                let (owner, expires_at_ms) = postcard::from_bytes(b).map_err(bad)?;
                Command::RenewLeases {
                    owner,
                    expires_at_ms,
                }
            }
            25 => {
                let (provider, epoch) = postcard::from_bytes(b).map_err(bad)?;
                Command::ReleaseLeaseAsked { provider, epoch }
            }
            26 => {
                let (provider, epoch) = postcard::from_bytes(b).map_err(bad)?;
                Command::DropLease { provider, epoch }
            }
            kind => {
                return Err(Error::UnknownCommand {
                    kind,
                    version: e.version,
                })
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A binding for tests of this crate.
    pub(crate) fn sample_binding() -> Binding {
        Binding {
            aor: "sip:alice@example.com".into(),
            contact: "<sip:alice@192.0.2.1:5060>".into(),
            expires_secs: 60,
            expires_at_ms: 1_800_000_000_000,
            edge_node: 2,
            flow: StoredFlow {
                transport: "UDP".into(),
                remote: "192.0.2.1:5060".into(),
                local: "127.0.0.1:5060".into(),
                connection: None,
            },
            path: vec![],
            call_id: "c1".into(),
            cseq: 7,
            q: 1000,
            user_agent: "phone".into(),
        }
    }

    #[test]
    fn a_binding_view_reads_every_field_of_a_bindings_encoding() {
        let b = Binding {
            flow: StoredFlow {
                connection: Some(9),
                ..sample_binding().flow
            },
            path: vec!["<sip:edge1>".into(), "<sip:edge2>".into()],
            ..sample_binding()
        };
        let bytes = postcard::to_allocvec(&b).unwrap();
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let (view, rest) = BindingView::take(&two).unwrap();
        assert_eq!(rest, &bytes[..], "the view reads exactly one binding");
        let BindingView {
            aor,
            contact,
            expires_at_ms,
            expires_secs,
            edge_node,
            flow,
            path,
            call_id,
            cseq,
            q,
            user_agent,
        } = view;
        let read = Binding {
            aor: aor.into(),
            contact: contact.into(),
            expires_at_ms,
            expires_secs,
            edge_node,
            flow: StoredFlow {
                transport: flow.0.into(),
                remote: flow.1.into(),
                local: flow.2.into(),
                connection: flow.3,
            },
            path: path.into_iter().map(String::from).collect(),
            call_id: call_id.into(),
            cseq,
            q,
            user_agent: user_agent.into(),
        };
        assert_eq!(read, b);
        assert!(BindingView::of(&bytes).is_some());
        assert!(BindingView::of(&two).is_none());
        assert!(BindingView::of(&bytes[..bytes.len() - 1]).is_none());
    }

    #[test]
    fn a_binding_write_is_read_in_place_only_when_its_body_is_one_whole_binding() {
        let b = sample_binding();
        let put = Command::PutBinding(b.clone()).encode();
        assert_eq!(put.kind, PUT_BINDING_KIND);
        let view = put.put_binding_view().expect("a binding's write");
        assert_eq!((view.aor, view.contact), (&b.aor[..], &b.contact[..]));
        assert_eq!(
            &put.body[..],
            &postcard::to_allocvec(&b).unwrap()[..],
            "the body is the binding's encoding, as the state machine stores it"
        );
        let with_body = |body: &[u8], version: u16| EncodedCommand {
            kind: PUT_BINDING_KIND,
            version,
            body: Bytes::copy_from_slice(body),
        };
        let mut longer = put.body.to_vec();
        longer.push(0);
        assert!(with_body(&longer, 1).put_binding_view().is_none());
        assert!(with_body(&put.body[..put.body.len() - 1], 1)
            .put_binding_view()
            .is_none());
        assert!(with_body(&put.body, 0).put_binding_view().is_none());
        assert!(with_body(&put.body, VERSION + 1)
            .put_binding_view()
            .is_none());
        let remove = Command::RemoveBinding {
            aor: b.aor,
            contact: b.contact,
        };
        assert!(remove.encode().put_binding_view().is_none());
    }

    /// A provider account for tests of this crate.
    pub(crate) fn sample_provider_account() -> ProviderAccount {
        ProviderAccount {
            customer: "c".into(),
            name: "p".into(),
            registrar: "sip.provider.example".into(),
            transport: Some(ProviderTransport::Tcp),
            username: "4930123".into(),
            auth_username: None,
            password: Sealed {
                version: 1,
                key_id: 1,
                nonce: [0; 12],
                ciphertext: vec![1, 2, 3],
            },
            realm: None,
            expires_secs: 600,
            enabled: true,
            outbound_proxy: None,
            contact_user: None,
            inbound: Some(InboundTarget::Account("alice@example.com".into())),
            ca_file: None,
            instance: "urn:uuid:00000000-0000-4000-8000-000000000000".into(),
        }
    }

    #[test]
    fn commands_round_trip_through_their_encoding() {
        let commands = vec![
            Command::Noop {
                payload: vec![1, 2, 3],
            },
            Command::PutBinding(sample_binding()),
            Command::RemoveBinding {
                aor: "a".into(),
                contact: "c".into(),
            },
            Command::ExpireBindings {
                now_ms: 5,
                limit: 100,
            },
            Command::RemoveBindingAt {
                aor: "a".into(),
                contact: "c".into(),
                at_ms: 7,
            },
            Command::RemoveAllBindingsAt {
                aor: "a".into(),
                at_ms: 8,
            },
            Command::ReplayHeldBinding {
                held: HeldBinding {
                    user: "alice".into(),
                    domain: "example.com".into(),
                    aor: "sip:alice@example.com".into(),
                    contact: "<sip:a@192.0.2.1>".into(),
                    held_at_ms: 4,
                    binding: Some(sample_binding()),
                },
                now_ms: 9,
            },
            Command::AcquireLease {
                lease: ProviderLease {
                    provider: "p".into(),
                    owner: 3,
                    epoch: 4,
                    expires_at_ms: 9,
                },
                expected_epoch: 3,
            },
            Command::SetFeatureVersion { version: 2 },
            Command::PutProviderAccount(sample_provider_account()),
            Command::PutNumber(Number {
                number: "4930123".into(),
                customer: "c".into(),
                account: "alice@example.com".into(),
            }),
            Command::DeleteNumber {
                number: "4930123".into(),
            },
            Command::PutApiToken(ApiToken {
                id: "0123456789abcdef".into(),
                customer: "c".into(),
                label: "portal".into(),
                secret_sha256: [7; 32],
                created_at_ms: 11,
            }),
            Command::RevokeApiToken {
                id: "0123456789abcdef".into(),
            },
            Command::PutJoinToken {
                token: JoinToken {
                    id: "fedcba9876543210".into(),
                    secret_sha256: [9; 32],
                    node: Some(4),
                    created_at_ms: 12,
                    expires_at_ms: 13,
                    used_by: 0,
                },
                now_ms: 12,
            },
            Command::UseJoinToken {
                id: "fedcba9876543210".into(),
                node: 4,
                now_ms: 12,
            },
            Command::RevokeJoinToken {
                id: "fedcba9876543210".into(),
            },
            Command::PutCustomerSettings(CustomerSettings {
                customer: "c".into(),
                cdr_retention_days: 30,
                max_calls: 4,
                time_zone: "Europe/Berlin".into(),
            }),
            Command::PutTrunk(Trunk {
                customer: "c".into(),
                name: "pbx".into(),
                sources: vec!["192.0.2.0/24".into()],
                transport: Some(ProviderTransport::Tcp),
                port: Some(5060),
                account: "pbx@example.com".into(),
                enabled: true,
            }),
            Command::DeleteTrunk { id: "c/pbx".into() },
            Command::GrantLease {
                lease: Lease {
                    provider: "c/p".into(),
                    owner: 2,
                    epoch: 5,
                    expires_at_ms: 9,
                    releasing: false,
                },
                expected_epoch: 4,
                lapsed_by_ms: 3,
            },
            Command::RenewLeases {
                owner: 2,
                expires_at_ms: 10,
            },
            Command::ReleaseLeaseAsked {
                provider: "c/p".into(),
                epoch: 5,
            },
            Command::DropLease {
                provider: "c/p".into(),
                epoch: 5,
            },
        ];
        for c in commands {
            assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        }
    }

    #[test]
    fn a_body_is_written_and_read_as_the_vec_of_bytes_it_was() {
        // The log on disk and the RPCs of every release before this one held bodies as a
        // `Vec<u8>`; both must read the same bytes the same way.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct AsBefore {
            kind: u16,
            version: u16,
            body: Vec<u8>,
        }
        let long = Command::RemoveBinding {
            aor: format!("sip:{}@example.com", "u".repeat(300)),
            contact: "<sip:u@192.0.2.1>".into(),
        };
        let commands = [
            Command::Noop { payload: vec![] },
            Command::PutBinding(sample_binding()),
            long,
        ];
        for c in commands {
            let now = c.encode();
            let before = AsBefore {
                kind: now.kind,
                version: now.version,
                body: now.body.to_vec(),
            };
            let bytes = postcard::to_stdvec(&now).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&before).unwrap());
            assert_eq!(postcard::from_bytes::<AsBefore>(&bytes).unwrap(), before);
            assert_eq!(postcard::from_bytes::<EncodedCommand>(&bytes).unwrap(), now);
            assert_eq!(Command::decode(&now).unwrap(), c);
        }
    }

    #[test]
    fn unknown_kinds_and_versions_are_refused_by_name() {
        let future = EncodedCommand {
            kind: 999,
            version: 1,
            body: Bytes::new(),
        };
        assert_eq!(
            Command::decode(&future).unwrap_err().to_string(),
            Error::UnknownCommand {
                kind: 999,
                version: 1
            }
            .to_string()
        );
        let newer = EncodedCommand {
            version: VERSION + 1,
            ..Command::Noop { payload: vec![] }.encode()
        };
        assert!(matches!(
            Command::decode(&newer),
            Err(Error::UnknownCommand { kind: 1, .. })
        ));
        let garbage = EncodedCommand {
            kind: 8,
            version: 1,
            body: Bytes::from(vec![0xff; 3]),
        };
        assert!(matches!(Command::decode(&garbage), Err(Error::Corrupt(_))));
    }

    #[test]
    fn the_next_releases_kind_is_unknown_to_this_release_and_waits_for_its_feature() {
        // This process plays this release (only tandem-next plays the next one).
        let note = Command::PutClusterNote { text: "n".into() };
        assert_eq!(supported_features(), FEATURES);
        assert_eq!(note.since(), FEATURES + 1);
        assert!(matches!(
            Command::decode(&note.encode()),
            Err(Error::UnknownCommand {
                kind: 32,
                version: 1
            })
        ));
    }
}
