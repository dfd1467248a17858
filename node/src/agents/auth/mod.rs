//! Digest authentication of requests against the local replica (RFC 3261 §22, RFC 8760),
//! shared by the registrar (401, WWW-Authenticate, Authorization) and the proxy (407,
//! Proxy-Authenticate, Proxy-Authorization). One [`Authenticator`] per node holds the
//! nonce keys (derived from the master keys, so any node knows the cluster's nonces, though
//! only the issuing node accepts credentials on one; through a key rotation the nodes sign
//! under the newest key they all hold, see [`Authenticator::agree_on_nonce_keys`]), the
//! bound on nonce-count replays,
//! the lockout of accounts (and addresses) that keep guessing from one address, counting
//! only guesses that prove a round trip, and every account's login opened ahead of use
//! (its HA1 decrypted), each kept until its account changes.

pub mod accounts;
pub mod answer;
pub mod digest;
pub mod trunks;

use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_raft_store::command::Account;
use tandem_raft_store::state::{AccountsChanged, StateReader};
use tandem_sip::{HeaderName, Message, Method, Uri};

use crate::agents::auth::accounts::open_ha1;
use crate::agents::auth::digest::{
    challenge, Algorithm, Credentials, FailureLimiter, NonceCheck, NonceKey, Replay, ReplayGuard,
};
use crate::agents::Refusal;
use crate::clock::now_ms;
use crate::cluster::ClusterNode;
use crate::stack::stats::Stats;
use crate::stack::transport::{user_agent_matches, OwnAddrs};

/// How old a nonce may be and still prove, under a flood ban, that its holder is at the
/// address it was issued to: a phone that reuses the nonce of its last registration does
/// so one registration interval later (at most `registrar.max_expires`, an hour by
/// default), and older proof would let one nonce open a ban for good.
const PROOF_MAX_AGE_SECS: u64 = 2 * 3600;

/// Failed logins to one account from one address within [`GUESS_WINDOW`] that lock that
/// account out at that address for [`LOCKOUT`]: SIP scanners guess passwords all day.
/// Only failures that prove a round trip count (see [`Authenticator::authenticate`]).
const GUESSES_BEFORE_LOCKOUT: u32 = 20;
const GUESS_WINDOW: Duration = Duration::from_secs(60);
const LOCKOUT: Duration = Duration::from_secs(300);
/// Failed logins from one address, over every account, within [`GUESS_WINDOW`] that lock
/// the whole address out for [`ADDRESS_LOCKOUT`]: a scanner trying many accounts. Higher
/// and shorter than the per-account lock, since an office's phones share one address.
const ADDRESS_GUESSES_BEFORE_LOCKOUT: u32 = 60;
const ADDRESS_LOCKOUT: Duration = Duration::from_secs(60);
/// Keys each failure table holds at most.
const FAILURE_TABLE_MAX: usize = 100_000;

/// How soon [`Authenticator::keep_logins_open`] opens an account created or changed. Often
/// enough that a bulk import (16,000 accounts a second through the admin API) stays within
/// the changes the state machine remembers, which would otherwise make it open them all
/// again.
const LOGINS_OPENED_EVERY: Duration = Duration::from_millis(100);
/// Accounts it reads at a time when it opens them all.
const OPEN_PAGE: usize = 500;

/// What the nonce keys are derived from each master key with.
const NONCE_LABEL: &str = "tandem digest nonces";
/// How often a node asks the others which master keys they hold, to sign nonces under the
/// newest key they all hold.
const NONCE_KEYS_EVERY: Duration = Duration::from_secs(30);

/// The nonce secret of each master key in `ring`, by key id, newest first.
fn nonce_secrets(ring: &tandem_raft_store::crypto::KeyRing) -> Vec<(u32, [u8; 32])> {
    ring.ids()
        .into_iter()
        .rev()
        .zip(ring.derive_all(NONCE_LABEL))
        .collect()
}

/// The master key to sign nonces under: the newest of `own` that every other member that
/// answered (`peers`, the ids each holds) holds too, so any node can check any nonce; with
/// none in common, the oldest of `own`, which a node that has not yet loaded a rotated key
/// file still holds.
pub fn nonce_key_to_issue(own: &[u32], peers: &[Vec<u32>]) -> u32 {
    own.iter()
        .filter(|id| peers.iter().all(|held| held.contains(id)))
        .max()
        .or_else(|| own.iter().min())
        .copied()
        .unwrap_or_default()
}

/// Who is asking for credentials: a registrar (the UAS itself) or a proxy on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// 401, WWW-Authenticate, Authorization.
    Registrar,
    /// 407, Proxy-Authenticate, Proxy-Authorization.
    Proxy,
}

impl Challenge {
    fn status(self) -> (u16, &'static str) {
        match self {
            Challenge::Registrar => (401, "Unauthorized"),
            Challenge::Proxy => (407, "Proxy Authentication Required"),
        }
    }

    fn challenge_header(self) -> HeaderName {
        match self {
            Challenge::Registrar => HeaderName::WwwAuthenticate,
            Challenge::Proxy => HeaderName::ProxyAuthenticate,
        }
    }

    fn credentials_header(self) -> HeaderName {
        match self {
            Challenge::Registrar => HeaderName::Authorization,
            Challenge::Proxy => HeaderName::ProxyAuthorization,
        }
    }
}

/// How a request authenticated.
#[derive(Debug)]
pub enum Authenticated {
    /// The account whose credentials checked out.
    Account(Arc<Account>),
    /// Not (yet): the answer to send (401/407 with challenges, or 403).
    Refused(Refusal),
}

/// Which check of one request [`Authenticator::attempt`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// The first: a failure this replica's lag could explain is counted and sent to catch up.
    First,
    /// After catching up: answers, counting no failure again.
    CaughtUp,
}

/// What a nonce is bound to: the realm and the client's IP address, so a nonce (and the
/// credentials computed with it) is useless from any other address.
fn nonce_scope(realm: &str, client: IpAddr) -> String {
    [realm, "|", &tandem_sip::addr::ip_string(client)].concat()
}

/// Whether the digest `uri` names the request's Request-URI: the same text, or the same
/// user, host (compared canonically) and port, since some phones rewrite parameters. Also
/// accepted: a URI naming this node itself, which sipp (the load tool of the benchmarks)
/// sends by default. Such credentials are not bound to the call's target, but a captured
/// copy is still refused everywhere as a replay (nonce-counts), so only a man in the
/// middle who also blocks the original could redirect it.
fn digest_uri_matches(digest_uri: &str, request_uri: Option<&Uri>, own: &OwnAddrs) -> bool {
    let Some(request_uri) = request_uri else {
        return false;
    };
    if request_uri.to_string() == digest_uri {
        return true;
    }
    let parsed = Uri::parse(digest_uri);
    if let Ok(Uri::Sip(u)) = &parsed {
        if u.user.is_none() && own.is_own(u) {
            return true;
        }
    }
    match (parsed, request_uri) {
        (Ok(Uri::Sip(a)), Uri::Sip(b)) => {
            let port =
                |u: &tandem_sip::SipUri| u.port.unwrap_or(if u.secure { 5061 } else { 5060 });
            a.secure == b.secure
                && a.user == b.user
                && a.host.canonical() == b.host.canonical()
                && port(&a) == port(b)
        }
        _ => false,
    }
}

/// Domain and user of a login in one allocation (domain, NUL, user: a served domain holds
/// no NUL), and its algorithm. It hashes as the domain, the user and the algorithm, each
/// hashed on its own, which is how a [`LoginRef`] hashes.
#[derive(PartialEq, Eq)]
struct LoginKey {
    login: Box<str>,
    algorithm: Algorithm,
}

impl LoginKey {
    fn new(domain: &str, user: &str, algorithm: Algorithm) -> LoginKey {
        LoginKey {
            login: [domain, "\0", user].concat().into_boxed_str(),
            algorithm,
        }
    }
}

impl std::hash::Hash for LoginKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (domain, user) = self.login.split_once('\0').unwrap_or((&self.login, ""));
        domain.hash(state);
        user.hash(state);
        self.algorithm.hash(state);
    }
}

/// A login as it is looked up, borrowed from the request: it hashes as the `LoginKey` it
/// equals, so a lookup that finds its account copies nothing.
#[derive(Hash)]
struct LoginRef<'a>(&'a str, &'a str, Algorithm);

impl hashbrown::Equivalent<LoginKey> for LoginRef<'_> {
    fn equivalent(&self, key: &LoginKey) -> bool {
        let (domain, user) = (self.0, self.1);
        self.2 == key.algorithm
            && key.login.len() == domain.len() + 1 + user.len()
            && key.login.starts_with(domain)
            && key.login.as_bytes()[domain.len()] == 0
            && key.login.ends_with(user)
            && !domain.contains('\0')
    }
}

/// What authentication needs of an opened account: its HA1 for the login's algorithm, and
/// the fields the agents read once it has authenticated (user and domain are the login's).
/// Kept this small, 154 bytes a login with its key as measured at 100,000 (BENCHMARKS.md,
/// "Resident memory per registered AOR"), because the cache holds one per login the node
/// has seen, up to every account a registration storm brings; the `Account` the agents
/// take is built again on each hit (four small allocations, against a RocksDB read and a
/// decryption on a miss).
struct OpenedLogin {
    customer: Arc<str>,
    ha1: Arc<str>,
    max_contacts: u32,
    max_concurrent_calls: u32,
    enabled: bool,
}

impl OpenedLogin {
    fn new(account: &Account, customer: Arc<str>, ha1: Arc<str>) -> OpenedLogin {
        OpenedLogin {
            customer,
            ha1,
            max_contacts: account.max_contacts,
            max_concurrent_calls: account.max_concurrent_calls,
            enabled: account.enabled,
        }
    }

    /// The account as the agents see it: without its sealed HA1s.
    fn account(&self, domain: &str, user: &str) -> Arc<Account> {
        Arc::new(Account {
            user: user.to_owned(),
            domain: domain.to_owned(),
            customer: self.customer.to_string(),
            ha1: Vec::new(),
            enabled: self.enabled,
            max_contacts: self.max_contacts,
            max_concurrent_calls: self.max_concurrent_calls,
        })
    }
}

/// Accounts with their HA1 opened, per algorithm, as of one generation of the accounts
/// (`StateReader::accounts_generation`): every REGISTER and call would otherwise read the
/// account and decrypt its HA1 again. When the accounts move on, only the logins of the
/// accounts that changed are dropped (`StateReader::account_changes_since`).
#[derive(Default)]
struct Opened {
    generation: u64,
    accounts: hashbrown::HashMap<LoginKey, OpenedLogin, RandomState>,
    /// Customer ids, each kept once however many of its accounts are opened.
    customers: hashbrown::HashSet<Arc<str>, RandomState>,
}

impl Opened {
    /// Drops what changed since this set's generation, and moves it to the reader's.
    /// Whether it had to.
    fn catch_up(&mut self, reader: &StateReader) -> bool {
        if reader.accounts_generation() == self.generation {
            return false;
        }
        let (now, changed) = reader.account_changes_since(self.generation);
        match changed {
            AccountsChanged::All => self.clear(),
            AccountsChanged::These(logins) => {
                for (domain, user) in &logins {
                    for algorithm in Algorithm::ALL {
                        self.accounts.remove(&LoginRef(domain, user, algorithm));
                    }
                }
            }
        }
        self.generation = now;
        true
    }

    fn clear(&mut self) {
        self.accounts.clear();
        self.customers.clear();
    }

    /// Keeps `account`'s `ha1` for `algorithm`, and gives back the account as the agents
    /// see it.
    fn insert(&mut self, account: &Account, algorithm: Algorithm, ha1: Arc<str>) -> Arc<Account> {
        let customer = match self.customers.get(account.customer.as_str()) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::<str>::from(account.customer.as_str());
                self.customers.insert(c.clone());
                c
            }
        };
        let login = OpenedLogin::new(account, customer, ha1);
        let shared = login.account(&account.domain, &account.user);
        self.accounts.insert(
            LoginKey::new(&account.domain, &account.user, algorithm),
            login,
        );
        shared
    }
}

/// What looking up an account for a login found.
enum Lookup {
    Ready(Arc<Account>, Arc<str>),
    /// The account exists, but its HA1 for this algorithm does not open.
    Sealed,
    Missing,
}

/// The node's digest authenticator.
pub struct Authenticator {
    cluster: ClusterNode,
    /// Accepted, and offered one at a time in this order (see [`Authenticator::offer`]).
    algorithms: Vec<Algorithm>,
    /// User-Agent fragments (lowercase) of phones known to answer a SHA-256 challenge.
    sha256_agents: Vec<String>,
    nonces: NonceKey,
    replays: Mutex<ReplayGuard>,
    /// Verified failures per (address, `user@domain`), and per address.
    failures: Mutex<FailureLimiter<(IpAddr, String)>>,
    address_failures: Mutex<FailureLimiter<IpAddr>>,
    opened: Mutex<Opened>,
    /// Most logins kept opened (`registrar.opened_logins_max`, about 31 MB at its default
    /// of 200,000): room for every account of a cluster that size, since when a node dies
    /// all of its phones register through the others within a minute.
    opened_max: usize,
    stats: Arc<Stats>,
    /// This node's addresses, which a digest `uri` may name instead of the Request-URI.
    own: OwnAddrs,
}

impl Authenticator {
    /// `algorithms` are accepted and offered in that order; `sha256_agents` (lowercase
    /// User-Agent fragments) are the phones offered SHA-256.
    pub fn new(
        cluster: ClusterNode,
        algorithms: Vec<Algorithm>,
        sha256_agents: Vec<String>,
        nonce_lifetime_secs: u64,
        opened_max: usize,
        stats: Arc<Stats>,
        own: OwnAddrs,
    ) -> Authenticator {
        let ring = cluster.keys();
        let node = cluster.identity.node_id;
        // Until the others have said which keys they hold (see `agree_on_nonce_keys`),
        // the oldest key: a node restarted with a rotated key file holds the new key, and
        // the others may not yet.
        let oldest = ring.ids().first().copied().unwrap_or_default();
        Authenticator {
            cluster,
            algorithms,
            sha256_agents,
            nonces: NonceKey::new(&nonce_secrets(&ring), oldest, nonce_lifetime_secs, node),
            replays: Mutex::new(ReplayGuard::new(100_000, nonce_lifetime_secs)),
            failures: Mutex::new(FailureLimiter::new(
                GUESSES_BEFORE_LOCKOUT,
                GUESS_WINDOW,
                LOCKOUT,
                FAILURE_TABLE_MAX,
            )),
            address_failures: Mutex::new(FailureLimiter::new(
                ADDRESS_GUESSES_BEFORE_LOCKOUT,
                GUESS_WINDOW,
                ADDRESS_LOCKOUT,
                FAILURE_TABLE_MAX,
            )),
            opened: Mutex::default(),
            opened_max,
            stats,
            own,
        }
    }

    /// Keeps the nonce keys in step with the key ring and with the other nodes: every
    /// [`NONCE_KEYS_EVERY`], asks each member which master keys it holds and signs new
    /// nonces under the newest one they all hold ([`nonce_key_to_issue`]), checking nonces
    /// against every key this node holds. So a rolling restart after a key rotation, with
    /// some nodes holding the new key and some not yet, leaves every node able to check
    /// every other node's nonces; a member that does not answer is left out until it does.
    pub async fn agree_on_nonce_keys(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let me = self.cluster.identity.node_id;
        loop {
            let ring = self.cluster.keys();
            let (mut peers, mut asked) = (Vec::new(), 0);
            for member in self.cluster.replica.members() {
                if member.id == me {
                    continue;
                }
                asked += 1;
                let answer = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = self.cluster.ask_agent(member.id, crate::cluster::KEYS_QUESTION) => a,
                };
                if let Some(held) = answer.as_deref().and_then(crate::cluster::parse_key_ids) {
                    peers.push(held);
                }
            }
            let before = self.nonces.issue_id();
            // Nobody answered: nothing new is known about the others.
            let issue = if asked > 0 && peers.is_empty() {
                before
            } else {
                nonce_key_to_issue(&ring.ids(), &peers)
            };
            self.nonces.set_keys(&nonce_secrets(&ring), issue);
            if before != issue {
                tracing::info!(
                    key = issue,
                    was = before,
                    "nonces are now signed under another master key"
                );
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(NONCE_KEYS_EVERY) => {}
            }
        }
    }

    /// The one algorithm `request` is challenged with: the first of `algorithms` that
    /// its sender is known to support. Every phone answers MD5; many give up on the whole
    /// challenge when one of several offered is SHA-256 (baresip does), so SHA-256 goes
    /// only to the User-Agents listed as answering it, or to everyone when MD5 is not
    /// offered at all.
    fn offer(&self, request: &Message) -> Algorithm {
        self.offer_to(user_agent_matches(request, &self.sha256_agents))
    }

    /// The algorithm offered to a phone that is, or is not, known to answer SHA-256.
    fn offer_to(&self, knows_sha256: bool) -> Algorithm {
        self.algorithms
            .iter()
            .copied()
            .find(|a| *a != Algorithm::Sha256 || knows_sha256)
            .or(self.algorithms.first().copied())
            .unwrap_or(Algorithm::Md5)
    }

    /// A 401/407 with one challenge carrying a new nonce for `scope` (see
    /// [`nonce_scope`]).
    fn challenge(
        &self,
        request: &Message,
        kind: Challenge,
        realm: &str,
        scope: &str,
        stale: bool,
    ) -> Refusal {
        let nonce = self.nonces.issue(scope, now_ms() / 1000);
        let (status, reason) = kind.status();
        let mut a = Refusal::new(status, reason);
        let value = challenge(self.offer(request), realm, &nonce, stale);
        a.headers.push((kind.challenge_header(), value));
        a
    }

    /// Whether `request` carries credentials on a nonce this cluster issued to `ip` (by any
    /// node, within [`PROOF_MAX_AGE_SECS`]): proof that the sender heard from the cluster
    /// at that address, which the flood limit lets through a ban.
    ///
    /// Not from an address, or for a login, that is locked out for guessing: there the
    /// proof is a real guesser's, whose next guess would only get a 403, and a flood of
    /// guesses must be dropped unanswered like any other.
    pub fn answers_nonce_issued_to(&self, request: &Message, ip: IpAddr) -> bool {
        let now = now_ms() / 1000;
        let instant = tokio::time::Instant::now();
        if self
            .address_failures
            .lock()
            .expect("failure limiter")
            .locked(&ip, instant)
        {
            return false;
        }
        [HeaderName::Authorization, HeaderName::ProxyAuthorization]
            .iter()
            .flat_map(|name| request.auth_headers(name).unwrap_or_default())
            // A phone sends one or two; a long list is someone making each cost an HMAC.
            .take(4)
            .any(|h| {
                let (Some(realm), Some(nonce), Some(user)) =
                    (h.param("realm"), h.param("nonce"), h.param("username"))
                else {
                    return false;
                };
                let scope = nonce_scope(realm, ip);
                let login = (ip, [user, "@", realm].concat());
                self.nonces
                    .issued_at(nonce, &scope, now)
                    .is_some_and(|issued| now.saturating_sub(issued) <= PROOF_MAX_AGE_SECS)
                    && !self
                        .failures
                        .lock()
                        .expect("failure limiter")
                        .locked(&login, instant)
            })
    }

    /// `user@domain`'s account and its HA1 for `algorithm`: opened before, unless the
    /// account changed since, or read and opened now. An HA1 that does not open is not
    /// kept, so a fixed key file takes effect at once.
    fn lookup(&self, domain: &str, user: &str, algorithm: Algorithm) -> Lookup {
        let reader = self.cluster.replica.reader();
        {
            let mut opened = self.opened.lock().expect("opened accounts");
            if opened.catch_up(reader) {
                self.count_opened(&opened);
            }
            if let Some(login) = opened.accounts.get(&LoginRef(domain, user, algorithm)) {
                return Lookup::Ready(login.account(domain, user), login.ha1.clone());
            }
        }
        self.stats
            .auth_account_reads
            .fetch_add(1, Ordering::Relaxed);
        self.read_and_open(reader, domain, user, algorithm)
    }

    /// Reads `user@domain`'s account from the store and opens its login (see
    /// [`Authenticator::open`]).
    fn read_and_open(
        &self,
        reader: &StateReader,
        domain: &str,
        user: &str,
        algorithm: Algorithm,
    ) -> Lookup {
        // Read before the account: a change after this keeps the login from being kept.
        let generation = reader.accounts_generation();
        let Some(account) = reader.account(domain, user).ok().flatten() else {
            return Lookup::Missing;
        };
        self.open(account, algorithm, generation, reader)
    }

    fn count_opened(&self, opened: &Opened) {
        self.stats
            .auth_logins_opened
            .store(opened.accounts.len() as u64, Ordering::Relaxed);
    }

    /// Opens `account`'s HA1 for `algorithm` and keeps the login, unless the account
    /// changed after `generation` (read before `account` was), or `registrar.opened_logins_max` logins
    /// are kept already. A full set is never emptied to make room: a login in use past
    /// the cap is opened on every use, and nobody, with credentials or without, can push
    /// the logins of others out.
    fn open(
        &self,
        account: Account,
        algorithm: Algorithm,
        generation: u64,
        reader: &StateReader,
    ) -> Lookup {
        let Some(ha1) = open_ha1(&self.cluster.keys(), &account, algorithm) else {
            return Lookup::Sealed;
        };
        let ha1 = Arc::<str>::from(ha1);
        let mut opened = self.opened.lock().expect("opened accounts");
        if opened.catch_up(reader) {
            self.count_opened(&opened);
        }
        let changed_since_read = opened.generation != generation
            && reader.account_changed_since(generation, &account.domain, &account.user);
        if changed_since_read || opened.accounts.len() >= self.opened_max {
            drop(opened);
            let account = Account {
                ha1: Vec::new(),
                ..account
            };
            return Lookup::Ready(Arc::new(account), ha1);
        }
        let account = opened.insert(&account, algorithm, ha1.clone());
        self.count_opened(&opened);
        Lookup::Ready(account, ha1)
    }

    /// The algorithm a phone not known to answer SHA-256 is challenged with: the one whose
    /// logins [`Authenticator::keep_logins_open`] opens ahead of use.
    fn default_offer(&self) -> Algorithm {
        self.offer_to(false)
    }

    /// Keeps every account's login opened ahead of its first use, for the algorithm most
    /// phones are challenged with ([`Authenticator::default_offer`]): all of them when the
    /// node starts (and after a snapshot replaced the accounts), then each account created
    /// or changed, within [`LOGINS_OPENED_EVERY`]. A registration storm, when a node dies
    /// and its phones register through the others, then finds every login opened on the
    /// node it reaches instead of reading each account from RocksDB and decrypting its
    /// HA1 (BENCHMARKS.md, the storm profile). Stops adding at `registrar.opened_logins_max`; the logins
    /// past it are opened on every use, and none kept is pushed out for them.
    pub async fn keep_logins_open(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let algorithm = self.default_offer();
        // The generation up to which every account was opened; none yet.
        let mut done: Option<u64> = None;
        let mut failed = false;
        let mut every = tokio::time::interval(LOGINS_OPENED_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let reader = self.cluster.replica.reader();
            let (now, todo) = match done {
                _ if failed => {
                    failed = false;
                    (reader.accounts_generation(), AccountsChanged::All)
                }
                Some(g) if g == reader.accounts_generation() => continue,
                Some(g) => reader.account_changes_since(g),
                None => (reader.accounts_generation(), AccountsChanged::All),
            };
            match todo {
                AccountsChanged::These(logins) => {
                    for (i, (domain, user)) in logins.iter().enumerate() {
                        self.read_and_open(reader, domain, user, algorithm);
                        if i % OPEN_PAGE == OPEN_PAGE - 1 {
                            if stop.is_cancelled() {
                                return;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                }
                AccountsChanged::All => {
                    let started = tokio::time::Instant::now();
                    let mut count = 0usize;
                    let mut after: Option<(String, String)> = None;
                    loop {
                        if stop.is_cancelled() {
                            return;
                        }
                        if self.opened_count(reader) >= self.opened_max {
                            break;
                        }
                        let generation = reader.accounts_generation();
                        let page = match reader.accounts_after(
                            after.as_ref().map(|(d, u)| (d.as_str(), u.as_str())),
                            OPEN_PAGE,
                        ) {
                            Ok(page) => page,
                            Err(e) => {
                                // Tried again from the start at the next look.
                                tracing::warn!(error = %e, "reading accounts to open their logins");
                                failed = true;
                                break;
                            }
                        };
                        let Some(last) = page.last() else { break };
                        after = Some((last.domain.clone(), last.user.clone()));
                        count += page.len();
                        for account in page {
                            self.open(account, algorithm, generation, reader);
                        }
                        // Other tasks of this runtime thread go between pages.
                        tokio::task::yield_now().await;
                    }
                    if !failed {
                        tracing::info!(
                            accounts = count,
                            millis = started.elapsed().as_millis() as u64,
                            algorithm = algorithm.name(),
                            "opened every account's login ahead of use"
                        );
                    }
                }
            }
            if !failed {
                done = Some(now);
            }
        }
    }

    /// How many logins are kept, once those of accounts changed since were dropped.
    fn opened_count(&self, reader: &StateReader) -> usize {
        let mut opened = self.opened.lock().expect("opened accounts");
        if opened.catch_up(reader) {
            self.count_opened(&opened);
        }
        opened.accounts.len()
    }

    /// Digest authentication of `request` as the account `user@domain`: a challenge while
    /// credentials are missing, stale, replayed or wrong; 403 when they are right but may
    /// not act as that account, or it is disabled, or when that account (or the whole
    /// address) is locked out at this address.
    ///
    /// Only a failure that proves a round trip counts toward a lockout: credentials
    /// answering a nonce this cluster issued to this very address, still fresh, that name
    /// no account or do not check out. Anything else (a forged or foreign nonce, one
    /// without qop, an old one) needs no answer from the node to be sent, so from a
    /// spoofed source it would let anyone lock out any office; it only gets a challenge.
    ///
    /// Such a failure may also be this replica's lag: an account created (or its password
    /// changed) through another node a moment ago reaches a follower a heartbeat later,
    /// and a phone set up right then would be refused. So before it is answered, a
    /// follower catches up with the leader (`Replica::catch_up`) and checks once more.
    /// Only a sender that proved a round trip can cause that; questions to the leader are
    /// shared by every request that waits meanwhile, so a scanner guessing names costs
    /// the leader at most one question per round trip. The failure counts toward the
    /// lockout before the wait, so a burst of guesses is locked out as fast as without
    /// it (a phone caught by the lag spends one of its twenty).
    pub async fn authenticate(
        &self,
        request: &Message,
        ip: IpAddr,
        user: &str,
        domain: &str,
        kind: Challenge,
    ) -> Authenticated {
        if let Some(answer) = self.attempt(request, ip, user, domain, kind, Pass::First) {
            return answer;
        }
        // Asked again whatever came of it: the second pass answers in any case.
        let _ = self.cluster.catch_up_for_sip().await;
        self.attempt(request, ip, user, domain, kind, Pass::CaughtUp)
            .unwrap_or_else(|| {
                Authenticated::Refused(self.challenge(
                    request,
                    kind,
                    domain,
                    &nonce_scope(domain, ip),
                    false,
                ))
            })
    }

    /// One check of [`Authenticator::authenticate`] against this replica as it is. On a
    /// follower's first pass, credentials on a nonce that proves a round trip that name
    /// no account here or do not check out are counted as a failure and give `None`: the
    /// caller catches up and asks again with [`Pass::CaughtUp`], which always answers and
    /// does not count that failure a second time.
    fn attempt(
        &self,
        request: &Message,
        ip: IpAddr,
        user: &str,
        domain: &str,
        kind: Challenge,
        pass: Pass,
    ) -> Option<Authenticated> {
        let now = tokio::time::Instant::now();
        let login = (ip, [user, "@", domain].concat());
        // Checked once per request: the second pass comes after this request's own
        // failure was counted, which must not turn its answer into the lockout's.
        let locked = pass == Pass::First
            && (self
                .address_failures
                .lock()
                .expect("failure limiter")
                .locked(&ip, now)
                || self
                    .failures
                    .lock()
                    .expect("failure limiter")
                    .locked(&login, now));
        if locked {
            self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            return Some(Authenticated::Refused(Refusal::new(
                403,
                "Forbidden (too many failed attempts; try again later)",
            )));
        }
        // A refusal that proves nothing about the sender: counted in the metrics only.
        let refuse = |a: Refusal| {
            self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            Authenticated::Refused(a)
        };
        // Wrong credentials on a fresh nonce issued to this address: a real guess.
        let count_guess = || {
            {
                let mut failures = self.failures.lock().expect("failure limiter");
                if failures.failed(&login, now) {
                    tracing::warn!(%ip, account = %login.1, "too many failed logins: the account is locked out at this address for {LOCKOUT:?}");
                }
                let keys = failures.len() as u64;
                self.stats.auth_lockout_keys.store(keys, Ordering::Relaxed);
            }
            let mut failures = self.address_failures.lock().expect("failure limiter");
            if failures.failed(&ip, now) {
                tracing::warn!(%ip, "too many failed logins: the address is locked out for {ADDRESS_LOCKOUT:?}");
            }
            let keys = failures.len() as u64;
            self.stats.auth_address_keys.store(keys, Ordering::Relaxed);
        };
        let guessed = |a: Refusal| {
            count_guess();
            refuse(a)
        };
        let scope = nonce_scope(domain, ip);
        let headers = request
            .auth_headers(&kind.credentials_header())
            .unwrap_or_default();
        let Some(creds) = headers
            .into_iter()
            .filter_map(|h| Credentials::from_header(h).ok())
            .find(|c| c.realm == domain && self.algorithms.contains(&c.algorithm))
        else {
            return Some(Authenticated::Refused(
                self.challenge(request, kind, domain, &scope, false),
            ));
        };
        // One clock reading for the nonce's lifetime and its replay record: read twice, a
        // nonce found alive at the end of its last second could have its record dropped as
        // dead a moment later, and a replay of it would then count as its first use.
        let now = now_ms() / 1000;
        let nonce = self.nonces.check(&creds.nonce, &scope, now);
        if nonce == NonceCheck::Invalid {
            return Some(refuse(self.challenge(request, kind, domain, &scope, false)));
        }
        let Some((_, nc, _)) = &creds.qop else {
            return Some(refuse(self.challenge(request, kind, domain, &scope, false)));
        };
        // The credentials are for this request, not another one they were captured from
        // (RFC 3261 §22.4: `uri` is the Request-URI): else a captured INVITE's answer
        // would place a call to any number.
        if !digest_uri_matches(&creds.uri, request.uri(), &self.own) {
            tracing::info!(user = %creds.username, %domain, uri = %creds.uri, "authentication failed: digest uri is not the Request-URI");
            return Some(refuse(self.challenge(request, kind, domain, &scope, false)));
        }
        // A stale nonce (old, or another node's) issued to this address proves a round
        // trip too. Not counting wrong credentials on one would leave a password oracle
        // without a lockout: stale=true answers only the right password.
        let proven = matches!(nonce, NonceCheck::Fresh(_) | NonceCheck::Stale);
        let wrong = |a: Refusal| match (proven, pass) {
            (true, Pass::First) => guessed(a),
            // Counted on the first pass already.
            (true, Pass::CaughtUp) | (false, _) => refuse(a),
        };
        let method = request.method().map(Method::as_str).unwrap_or_default();
        // A refusal this replica's lag could explain is counted, then asked again once
        // caught up (see `authenticate`); the leader is never behind.
        let catch_up_first = pass == Pass::First && proven && !self.cluster.replica.is_leader();
        let (account, ha1) = match self.lookup(domain, &creds.username, creds.algorithm) {
            Lookup::Ready(account, ha1) => (account, ha1),
            Lookup::Sealed => {
                // The account exists but its HA1 does not open: a key file without the key
                // it was sealed with. Every login of this account fails until that is fixed.
                tracing::error!(user = %creds.username, %domain, algorithm = creds.algorithm.name(),
                    "cannot open the account's HA1: is every key in this node's key file?");
                return Some(refuse(self.challenge(request, kind, domain, &scope, false)));
            }
            Lookup::Missing if catch_up_first => {
                count_guess();
                return None;
            }
            Lookup::Missing => {
                tracing::info!(user = %creds.username, %domain, "authentication failed: no such account");
                return Some(wrong(self.challenge(request, kind, domain, &scope, false)));
            }
        };
        if !creds.verify(&ha1, method) {
            if catch_up_first {
                count_guess();
                return None;
            }
            tracing::info!(user = %creds.username, %domain, "authentication failed: wrong password");
            return Some(wrong(self.challenge(request, kind, domain, &scope, false)));
        }
        // stale=true only for right credentials on a nonce this node will not take (RFC
        // 7616 §3.3): an old one, another node's, or one it can no longer vouch for.
        let NonceCheck::Fresh(issued) = nonce else {
            return Some(Authenticated::Refused(
                self.challenge(request, kind, domain, &scope, true),
            ));
        };
        // What tells this request from another one on the same count: the transaction's
        // key (RFC 3261 §17.2.3) with the Call-ID and CSeq.
        let via = request.top_via().ok();
        let same_request = (
            via.as_ref().and_then(|v| v.branch()),
            via.as_ref().map(|v| (&v.host, v.port)),
            request.call_id().ok(),
            request.cseq().ok().map(|c| c.seq),
            method,
        );
        let count = {
            let mut replays = self.replays.lock().expect("replay guard lock");
            let count = replays.accept(&creds.nonce, issued, *nc, same_request, now);
            let nonces = replays.len() as u64;
            self.stats
                .auth_replay_nonces
                .store(nonces, Ordering::Relaxed);
            count
        };
        match count {
            Replay::Fresh => {}
            // Only REGISTER is answered without a transaction (ARCHITECTURE.md, "REGISTER is
            // answered statelessly"); any other request sent again is its transaction's to
            // absorb, and a copy that outlived it is a replay.
            Replay::Retransmission if kind == Challenge::Registrar => {}
            Replay::Forgotten => {
                return Some(Authenticated::Refused(
                    self.challenge(request, kind, domain, &scope, true),
                ));
            }
            Replay::Replayed | Replay::Retransmission => {
                tracing::info!(user = %creds.username, %domain, "authentication failed: replayed nonce count");
                return Some(refuse(self.challenge(request, kind, domain, &scope, false)));
            }
        }
        if creds.username != user {
            let verb = match kind {
                Challenge::Registrar => "register",
                Challenge::Proxy => "send as",
            };
            return Some(refuse(Refusal::new(
                403,
                format!("Forbidden ({} may not {verb} {user})", creds.username),
            )));
        }
        if !account.enabled {
            return Some(refuse(Refusal::new(403, "Forbidden (account disabled)")));
        }
        Some(Authenticated::Account(account))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through a rotation and the removal of the old key afterwards, the key nonces are
    /// signed under is one every node that answered holds.
    #[test]
    fn nonces_are_signed_under_the_newest_key_every_node_holds() {
        // Rotated here, not yet elsewhere; then everywhere; then the old key dropped here
        // while another node still holds both.
        assert_eq!(nonce_key_to_issue(&[1, 2], &[vec![1], vec![1, 2]]), 1);
        assert_eq!(nonce_key_to_issue(&[1, 2], &[vec![1, 2], vec![1, 2]]), 2);
        assert_eq!(nonce_key_to_issue(&[2], &[vec![1, 2], vec![1, 2]]), 2);
        assert_eq!(nonce_key_to_issue(&[1, 2], &[vec![2]]), 2);
        // Alone: the newest. Nothing in common: the oldest key held here.
        assert_eq!(nonce_key_to_issue(&[1, 2], &[]), 2);
        assert_eq!(nonce_key_to_issue(&[1, 2], &[vec![3]]), 1);
        // What nodes answer, and what a node from before the question answers.
        assert_eq!(crate::cluster::parse_key_ids("1 2"), Some(vec![1, 2]));
        assert_eq!(crate::cluster::parse_key_ids("unknown question"), None);
        assert_eq!(crate::cluster::parse_key_ids(""), None);
    }

    #[test]
    fn the_digest_uri_must_name_the_request_uri_or_this_node() {
        let own = OwnAddrs {
            udp: vec!["192.0.2.10:5060".parse().unwrap()],
            ..OwnAddrs::default()
        };
        let uri = |s: &str| Uri::parse(s).unwrap();
        let bob = uri("sip:bob@example.com");
        let matches = |digest: &str, r: &Uri| digest_uri_matches(digest, Some(r), &own);
        assert!(matches("sip:bob@example.com", &bob));
        assert!(matches("sip:bob@EXAMPLE.com:5060", &bob));
        assert!(matches("sip:bob@example.com;transport=udp", &bob));
        assert!(!matches("sip:carol@example.com", &bob));
        assert!(!matches("sip:bob@example.org", &bob));
        assert!(!matches("sip:bob@example.com:5070", &bob));
        assert!(!matches("sips:bob@example.com", &bob));
        assert!(!matches("not a uri", &bob));
        // This node's own address (sipp's default), but no other address.
        assert!(matches("sip:192.0.2.10:5060", &bob));
        assert!(matches("sip:192.0.2.10", &bob));
        assert!(!matches("sip:192.0.2.11:5060", &bob));
        assert!(!matches("sip:bob@192.0.2.10:5060", &bob));
        assert!(!digest_uri_matches("sip:bob@example.com", None, &own));
    }

    /// An opened login gives back the account it was opened from, all but its sealed HA1s:
    /// the agents see the same account whether the cache held it or not.
    #[test]
    fn an_opened_login_gives_back_its_account() {
        let account = Account {
            user: "alice".into(),
            domain: "example.com".into(),
            customer: "acme".into(),
            ha1: Vec::new(),
            enabled: false,
            max_contacts: 3,
            max_concurrent_calls: 7,
        };
        let login = OpenedLogin::new(&account, Arc::from("acme"), Arc::from("00ff"));
        assert_eq!(*login.account("example.com", "alice"), account);
        assert_eq!(&*login.ha1, "00ff");
    }

    /// A borrowed login finds the owned key it equals, and only that one: were the two to
    /// hash apart, every login would miss and open its account again.
    #[test]
    fn a_borrowed_login_finds_its_owned_key() {
        let mut map: hashbrown::HashMap<LoginKey, u8, RandomState> = Default::default();
        map.insert(LoginKey::new("example.com", "alice", Algorithm::Md5), 1);
        map.insert(LoginKey::new("example.com", "alice", Algorithm::Sha256), 2);
        map.insert(LoginKey::new("example.com", "a\0b", Algorithm::Md5), 3);
        let get = |d, u, a| map.get(&LoginRef(d, u, a)).copied();
        assert_eq!(get("example.com", "alice", Algorithm::Md5), Some(1));
        assert_eq!(get("example.com", "alice", Algorithm::Sha256), Some(2));
        assert_eq!(get("example.com", "bob", Algorithm::Md5), None);
        assert_eq!(get("example.org", "alice", Algorithm::Md5), None);
        // The boundary between domain and user counts.
        assert_eq!(get("example.coma", "lice", Algorithm::Md5), None);
        // A user may hold a NUL (escaped in its URI); the domain never does.
        assert_eq!(get("example.com", "a\0b", Algorithm::Md5), Some(3));
        assert_eq!(get("example.com\0a", "b", Algorithm::Md5), None);
    }
}
