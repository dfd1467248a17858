//! The dialogs this node record-routed: what lets a request inside a dialog through, what
//! drain waits for, and what counts an account's concurrent calls.
//!
//! An entry is keyed by Call-ID and the caller's tag. It is made (or joined) when the
//! proxy forwards a dialog-creating request with its Record-Route (INVITE, SUBSCRIBE,
//! REFER, NOTIFY): each such forward holds a *claim* on it until it ends. Provisional
//! responses add early callee tags, each 2xx a dialog that is up (several when the request
//! forked), and the first 2xx of a forward turns its claim into that dialog. A dialog ends
//! when a BYE through this node is answered 2xx, 481 or 408 (or times out), or a NOTIFY
//! ends its subscription; the entry goes once it has no claim and no dialog up. A request
//! inside a dialog passes only if its two tags are the caller's and one of the callee's,
//! in either order.
//!
//! An account's calls are its claims plus its dialogs up, so a call being set up counts
//! as one, and so does each leg a fork answered; one Call-ID reused for many INVITEs
//! counts each.
//!
//! A call the proxy carries to a local account from the node where it entered the cluster
//! keeps its records ([`CallRecords`]) in its entry: the caller's leg `a` and the leg to
//! the callee `b1`, rung and answered as the responses pass, and written when the entry
//! goes (its last dialog's BYE, or the failure of every forward).
//!
//! Bounded: at most `max` entries, at most half of them without an authenticated account
//! (callers from outside reaching local phones). An entry nobody used for [`MAX_IDLE`] is
//! forgotten. Entries sit in a queue by last use: the front is checked on every insert,
//! an entry used since it was queued goes to the back, and stale positions are compacted
//! away, so all of it costs O(1) amortized.
//!
//! A new entry past either bound makes room by evicting the entry used longest ago among
//! the first [`EVICT_SCAN`] live places of the queue that it may evict: one nothing holds
//! (no forward in progress, not a call the app server bridges), that nobody used for
//! `evict_idle` (`sip.dialog_evict_idle_secs`), and placed by someone of its placer's
//! standing or lower ([`Placer`]: a local account that authenticated here, then another
//! member, then a stranger). Failing that, it is refused (503). UDP loses BYEs, and an
//! overload loses many: without eviction, their dialogs would fill the table and refuse
//! every call for [`MAX_IDLE`]. An evicted dialog that was in fact still up keeps working:
//! its key is remembered (a hash, for [`MAX_IDLE`], at most `max` of them), and a request
//! inside it that carries its genuine dialog token still passes, so its BYE still reaches
//! the far side. What it loses is its place in its account's call count and in drain's,
//! and its records are written at eviction, ended when it was last used and saying so.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::agents::cdr::{Open, Recorder};
use crate::clock::now_ms;

/// A dialog with no request through this node for this long is forgotten: a call whose
/// BYE went elsewhere, or a subscription that was never refreshed.
pub const MAX_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Callee tags kept per entry, early and up (one per forked branch that answered).
const MAX_CALLEE_TAGS: usize = 8;
/// Entries the table holds by default.
pub const DEFAULT_MAX_DIALOGS: usize = 100_000;
/// By default, how long an entry must have gone unused before a full table may evict it:
/// far longer than a BYE takes (Timer F, 32 s), longer than a call with session timers
/// goes between refreshes (RFC 4028's usual 1,800 s Session-Expires is refreshed at half
/// of it), and far shorter than [`MAX_IDLE`].
pub const DEFAULT_EVICT_IDLE: Duration = Duration::from_secs(1200);
/// Live queue places a full table looks at for an entry to evict. The queue is ordered by
/// last use (roughly: an entry used since it was queued moves back only when the front
/// reaches it), so the entries used longest ago are at its front; bounding the search
/// keeps a refused request about as cheap as an admitted one.
pub const EVICT_SCAN: usize = 256;

/// Who placed a new dialog's request, which says what it counts against and what a full
/// table may evict to make room for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placer<'a> {
    /// A local account that authenticated at this node, with its `max_concurrent_calls`
    /// (0: no limit). It may evict any entry.
    Account(&'a str, u32),
    /// Another member, which handed this node the request (with an edge token) for a
    /// phone registered here; the caller was vetted, or not, where it entered the
    /// cluster. It may evict members' and strangers' entries.
    Member,
    /// Nobody: a caller from outside reaching a local phone. It may evict only other
    /// strangers' entries.
    Stranger,
}

/// [`Placer`] without the account, in the order of standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    Stranger,
    Member,
    Account,
}

impl Placer<'_> {
    fn standing(self) -> Standing {
        match self {
            Placer::Account(..) => Standing::Account,
            Placer::Member => Standing::Member,
            Placer::Stranger => Standing::Stranger,
        }
    }
}

/// Why an entry goes, for its call's records.
#[derive(Clone, Copy, Debug)]
enum Gone {
    /// Its last dialog ended, or its last forward failed.
    Ended,
    /// Nobody used it for [`MAX_IDLE`] since this moment.
    Idle(Instant),
    /// A full table evicted it; it was last used at this moment.
    Evicted(Instant),
}

/// What kind of dialog an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialogKind {
    /// INVITE: a call, which drain waits for and which counts against the caller.
    Call,
    /// SUBSCRIBE, REFER or NOTIFY.
    Subscription,
}

#[derive(Debug)]
struct Entry {
    kind: DialogKind,
    /// The local account that placed the call, if it authenticated.
    account: Option<Arc<str>>,
    /// Who placed it.
    standing: Standing,
    /// Its owner ends it ([`Dialogs::pin`]): never evicted or forgotten for idling.
    pinned: bool,
    /// Forwards in progress that have not turned into a dialog.
    claims: u32,
    /// Of those, how many no longer count toward the account's calls: the caller CANCELled
    /// before anything rang and got its 487 ([`Dialogs::stop_counting`]).
    uncounted: u32,
    /// Callee tags of provisional responses.
    early: Vec<Box<str>>,
    /// Callee tags of 2xx responses: each a dialog that is up.
    up: Vec<Box<str>>,
    last_used: Instant,
    /// When the entry took its current place in the queue.
    queued_at: Instant,
    /// Which queue position is current (an entry re-queued has a newer one).
    seq: u64,
    /// The call's records, if this node writes them.
    records: Option<Box<CallRecords>>,
}

/// The records of a call the proxy carries: the caller's leg and the leg to the callee.
/// Both ring and are answered at the same moments (the proxy relays each response as it
/// comes), but may belong to different accounts and customers.
#[derive(Debug)]
pub struct CallRecords {
    a: Open,
    b: Open,
    answered: bool,
    /// The final response that went back for the last forward that was not answered, and
    /// what it came to.
    last_final: Option<(u16, String, &'static str)>,
}

impl CallRecords {
    pub fn new(a: Open, b: Open) -> CallRecords {
        CallRecords {
            a,
            b,
            answered: false,
            last_final: None,
        }
    }

    /// The caller's record of a call refused before it was forwarded.
    pub fn refused(self, code: u16, reason: &str) -> crate::agents::cdr::Cdr {
        self.a.close(code, reason, "refused")
    }

    /// Both legs' records, ended at `end` (Unix milliseconds), for an entry that went
    /// `why`.
    fn close(self, end: u64, why: Gone) -> [crate::agents::cdr::Cdr; 2] {
        let (code, reason, outcome) = if self.answered {
            let reason = match why {
                Gone::Ended => "OK",
                Gone::Idle(_) => "OK (no BYE through this node before it was forgotten)",
                Gone::Evicted(_) => {
                    "OK (no BYE through this node before a full dialog table evicted it; \
                     ended here when last used)"
                }
            };
            (200, reason.to_owned(), "answered")
        } else {
            self.last_final
                .unwrap_or((408, "Request Timeout".to_owned(), "no answer"))
        };
        [
            self.a.close_at(end, code, &reason, outcome),
            self.b.close_at(end, code, &reason, outcome),
        ]
    }
}

impl Entry {
    fn knows_callee(&self, tag: &str) -> bool {
        self.up.iter().chain(&self.early).any(|t| &**t == tag)
    }
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<Box<str>, Entry>,
    queue: VecDeque<(Box<str>, u64)>,
    next_seq: u64,
    /// Per account: its claims plus its dialogs up.
    calls: HashMap<Arc<str>, u32>,
    /// Call dialogs up, for drain.
    calls_up: usize,
    /// Entries placed by anyone but a local account (members and strangers).
    anonymous: usize,
    /// Where calls' records go, on a node that keeps them.
    recorder: Option<Recorder>,
    /// Entries evicted to make room for new ones.
    evicted: u64,
    /// New entries refused because nothing could be evicted for them.
    refused: u64,
    /// The keys of evicted entries (hashed with `hasher`), each with when it was evicted,
    /// in that order: at most `max`, each for [`MAX_IDLE`].
    gone: HashMap<u64, Instant>,
    gone_order: VecDeque<(u64, Instant)>,
    hasher: std::collections::hash_map::RandomState,
}

/// Why a new dialog was not recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The calling account has `max_concurrent_calls` calls already.
    CallLimit,
    /// The table (or its share for callers who did not authenticate) is full, and none
    /// of the entries the caller may evict has gone unused long enough.
    Full,
}

/// The table of one node's proxy.
#[derive(Debug)]
pub struct Dialogs {
    table: Mutex<Table>,
    max: usize,
    /// How long an entry must have gone unused before a full table may evict it.
    evict_idle: Duration,
}

impl Default for Dialogs {
    fn default() -> Self {
        Dialogs::new(DEFAULT_MAX_DIALOGS)
    }
}

fn key(call_id: &str, caller_tag: &str) -> Box<str> {
    [call_id, "\n", caller_tag].concat().into_boxed_str()
}

impl Table {
    fn add_calls(&mut self, account: &Option<Arc<str>>, n: u32) {
        if let Some(a) = account {
            *self.calls.entry(a.clone()).or_insert(0) += n;
        }
    }

    fn remove_calls(&mut self, account: &Option<Arc<str>>, n: u32) {
        if let Some(a) = account {
            if let Some(c) = self.calls.get_mut(a) {
                *c = c.saturating_sub(n);
                if *c == 0 {
                    self.calls.remove(a);
                }
            }
        }
    }

    /// Forgets an entry and writes its call's records, ended now or, if it goes for want
    /// of use, when it was last used.
    fn forget(&mut self, key: &str, why: Gone) {
        let Some(e) = self.entries.remove(key) else {
            return;
        };
        if let (Some(records), Some(recorder)) = (e.records, &self.recorder) {
            let end = match why {
                Gone::Idle(last) | Gone::Evicted(last) => {
                    let ago = Instant::now().saturating_duration_since(last).as_millis();
                    now_ms().saturating_sub(u64::try_from(ago).unwrap_or(u64::MAX))
                }
                Gone::Ended => now_ms(),
            };
            for cdr in records.close(end, why) {
                recorder.record(cdr);
            }
        }
        if e.kind == DialogKind::Call {
            self.calls_up -= e.up.len();
            self.remove_calls(&e.account, e.claims + e.up.len() as u32);
        }
        if e.standing != Standing::Account {
            self.anonymous -= 1;
        }
    }

    /// Forgets the entry if nothing holds it any more.
    fn forget_if_done(&mut self, key: &str) {
        if self
            .entries
            .get(key)
            .is_some_and(|e| e.claims == 0 && e.up.is_empty())
        {
            self.forget(key, Gone::Ended);
        }
    }

    /// Works from the front of the queue: drops stale positions, forgets idle entries,
    /// and sends an entry used since it was queued to the back. The first entry left
    /// unused since it was queued and not idle ends the walk: everything behind it was
    /// queued, or used, later. Stale positions behind it are compacted away once they
    /// outnumber the entries.
    fn prune(&mut self, now: Instant) {
        while let Some((key, seq)) = self.queue.pop_front() {
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            if e.seq != seq {
                continue;
            }
            let idle = now.saturating_duration_since(e.last_used) >= MAX_IDLE;
            if idle && !e.pinned {
                let last_used = e.last_used;
                self.forget(&key, Gone::Idle(last_used));
                continue;
            }
            if idle {
                // Pinned: its owner ends it. Counted as used now, so that the walk moves
                // on past it and ends where it should.
                e.last_used = now;
            }
            if e.last_used > e.queued_at {
                // Never before its last use: a `now` read on one SIP thread just before
                // another thread used the entry is earlier than that use, and an entry
                // queued "before" its last use would be moved back on every visit, so the
                // walk, which holds the table's lock, would never end.
                e.queued_at = now.max(e.last_used);
                e.seq = self.next_seq;
                self.next_seq += 1;
                self.queue.push_back((key, e.seq));
            } else {
                self.queue.push_front((key, seq));
                break;
            }
        }
        if self.queue.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.queue
                .retain(|(k, seq)| entries.get(k).is_some_and(|e| e.seq == *seq));
        }
        while let Some(&(hash, at)) = self.gone_order.front() {
            if now.saturating_duration_since(at) < MAX_IDLE {
                break;
            }
            self.gone_order.pop_front();
            if self.gone.get(&hash) == Some(&at) {
                self.gone.remove(&hash);
            }
        }
    }

    /// Makes room for one entry by evicting the one used longest ago among the first
    /// [`EVICT_SCAN`] live places of the queue (looking at no more than four times as many
    /// places in all) that nothing holds, nobody used for `idle`, and that was placed by
    /// someone of `newcomer`'s standing or lower. Whether it found one.
    fn evict(&mut self, now: Instant, idle: Duration, newcomer: Standing, max: usize) -> bool {
        let victim = self
            .queue
            .iter()
            .take(4 * EVICT_SCAN)
            .filter_map(|(k, seq)| {
                self.entries
                    .get(k)
                    .filter(|e| e.seq == *seq)
                    .map(|e| (k, e))
            })
            .take(EVICT_SCAN)
            .filter(|(_, e)| {
                e.claims == 0
                    && !e.pinned
                    && e.standing <= newcomer
                    && now.saturating_duration_since(e.last_used) >= idle
            })
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, e)| (k.clone(), e.last_used));
        let Some((k, last_used)) = victim else {
            return false;
        };
        tracing::debug!(
            dialog = %k.replace('\n', " "),
            idle_secs = now.saturating_duration_since(last_used).as_secs(),
            "the dialog table is full: evicted the dialog unused longest"
        );
        self.forget(&k, Gone::Evicted(last_used));
        self.evicted += 1;
        let hash = self.hasher.hash_one(&*k);
        self.gone.insert(hash, now);
        self.gone_order.push_back((hash, now));
        // Bounded by its order queue, which holds a place for every key it remembered,
        // including those a BYE has since dropped.
        while self.gone_order.len() > max {
            let Some((old, at)) = self.gone_order.pop_front() else {
                break;
            };
            if self.gone.get(&old) == Some(&at) {
                self.gone.remove(&old);
            }
        }
        true
    }

    /// Whether the dialog these tags name was evicted (by either tag as the caller's).
    fn was_evicted(&self, call_id: &str, tag_a: &str, tag_b: &str) -> bool {
        !self.gone.is_empty()
            && [tag_a, tag_b].iter().any(|t| {
                self.gone
                    .contains_key(&self.hasher.hash_one(&*key(call_id, t)))
            })
    }

    /// The entry of the dialog these tags name, and which tag is the callee's.
    fn find(&self, call_id: &str, from_tag: &str, to_tag: &str) -> Option<(Box<str>, bool)> {
        let caller_sent = key(call_id, from_tag);
        if self
            .entries
            .get(&caller_sent)
            .is_some_and(|e| e.knows_callee(to_tag))
        {
            return Some((caller_sent, true));
        }
        let callee_sent = key(call_id, to_tag);
        if self
            .entries
            .get(&callee_sent)
            .is_some_and(|e| e.knows_callee(from_tag))
        {
            return Some((callee_sent, false));
        }
        None
    }
}

impl Dialogs {
    pub fn new(max: usize) -> Dialogs {
        Dialogs::with_recorder(max, DEFAULT_EVICT_IDLE, None)
    }

    /// A table of at most `max` entries, which may evict one unused for `evict_idle` to
    /// make room, and writes the records of the calls given it to `recorder`.
    pub fn with_recorder(max: usize, evict_idle: Duration, recorder: Option<Recorder>) -> Dialogs {
        Dialogs {
            table: Mutex::new(Table {
                recorder,
                ..Table::default()
            }),
            max: max.max(2),
            evict_idle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("dialog table lock")
    }

    /// Takes a claim for a dialog-creating request about to be forwarded: on a new entry,
    /// or on the one its Call-ID and caller tag already have (the same request again,
    /// spiralling back through this node, or a new INVITE reusing them). A call placed
    /// by a local account ([`Placer::Account`], with its limit; 0 is none) counts against
    /// it, and is refused at the limit. A new call entry keeps `records` (an entry that
    /// exists keeps its own). Every `Ok` must be matched by one [`Dialogs::release`].
    pub fn begin(
        &self,
        call_id: &str,
        caller_tag: &str,
        kind: DialogKind,
        placer: Placer<'_>,
        records: Option<CallRecords>,
    ) -> Result<(), Refused> {
        // The clock is read under the lock, so that no entry was used after this `now`.
        let mut t = self.lock();
        let now = Instant::now();
        t.prune(now);
        let standing = placer.standing();
        let account = match placer {
            Placer::Account(name, limit) if kind == DialogKind::Call => Some((name, limit)),
            _ => None,
        };
        if let Some((name, limit)) = account {
            let n = t.calls.get(name).copied().unwrap_or(0);
            if limit > 0 && n >= limit {
                return Err(Refused::CallLimit);
            }
        }
        let k = key(call_id, caller_tag);
        if let Some(e) = t.entries.get_mut(&k) {
            e.claims += 1;
            e.last_used = now;
            let account = e.account.clone();
            if e.kind == DialogKind::Call {
                t.add_calls(&account, 1);
            }
            return Ok(());
        }
        let anonymous = standing != Standing::Account;
        if t.entries.len() >= self.max || (anonymous && t.anonymous >= self.max / 2) {
            // Past the share of those who did not authenticate here, only one of theirs
            // makes room in it.
            let victims = if t.entries.len() >= self.max {
                standing
            } else {
                standing.min(Standing::Member)
            };
            if !t.evict(now, self.evict_idle, victims, self.max)
                || (anonymous && t.anonymous >= self.max / 2)
            {
                t.refused += 1;
                return Err(Refused::Full);
            }
        }
        let account: Option<Arc<str>> = account.map(|(name, _)| Arc::from(name));
        if kind == DialogKind::Call {
            t.add_calls(&account, 1);
        }
        if anonymous {
            t.anonymous += 1;
        }
        let seq = t.next_seq;
        t.next_seq += 1;
        t.queue.push_back((k.clone(), seq));
        t.entries.insert(
            k,
            Entry {
                kind,
                account,
                standing,
                pinned: false,
                claims: 1,
                uncounted: 0,
                early: Vec::new(),
                up: Vec::new(),
                last_used: now,
                queued_at: now,
                seq,
                records: records.filter(|_| kind == DialogKind::Call).map(Box::new),
            },
        );
        Ok(())
    }

    /// A response with a To tag to a forward holding a claim went upstream: an early
    /// dialog (101–199), or one that is up (2xx). The first 2xx of a forward turns its
    /// claim into that dialog (`converted`, the claim's own flag, says it has).
    pub fn answered(
        &self,
        call_id: &str,
        caller_tag: &str,
        callee_tag: &str,
        status: u16,
        converted: &mut bool,
    ) {
        let mut t = self.lock();
        let k = key(call_id, caller_tag);
        let Some(e) = t.entries.get_mut(&k) else {
            return;
        };
        e.last_used = Instant::now();
        if let Some(r) = e.records.as_mut() {
            if status < 200 {
                r.a.ringing();
                r.b.ringing();
            } else {
                r.a.answered();
                r.b.answered();
                r.answered = true;
            }
        }
        if status < 200 {
            if !e.knows_callee(callee_tag) && e.early.len() < MAX_CALLEE_TAGS {
                e.early.push(callee_tag.into());
            }
            return;
        }
        let new = !e.up.iter().any(|u| &**u == callee_tag) && e.up.len() < MAX_CALLEE_TAGS;
        if new {
            e.up.push(callee_tag.into());
        }
        let convert = !*converted && e.claims > 0;
        let mut counted = true;
        if convert {
            e.claims -= 1;
            *converted = true;
            if e.uncounted > 0 {
                e.uncounted -= 1;
                counted = false;
            }
        }
        let (kind, account) = (e.kind, e.account.clone());
        if kind == DialogKind::Call {
            if new {
                t.calls_up += 1;
                t.add_calls(&account, 1);
            }
            if convert && counted {
                t.remove_calls(&account, 1);
            }
        }
    }

    /// The final response that went back for a forward of a call that was not answered,
    /// and what it came to: what the call's records say if no later forward answers.
    pub fn failed(
        &self,
        call_id: &str,
        caller_tag: &str,
        code: u16,
        reason: &str,
        outcome: &'static str,
    ) {
        let mut t = self.lock();
        if let Some(r) = t
            .entries
            .get_mut(&key(call_id, caller_tag))
            .and_then(|e| e.records.as_mut())
        {
            if !r.answered {
                r.last_final = Some((code, reason.to_owned(), outcome));
            }
        }
    }

    /// A forward that held a claim ended: its claim goes, unless a 2xx turned it into a
    /// dialog; the entry goes once nothing holds it.
    pub fn release(&self, call_id: &str, caller_tag: &str, converted: bool) {
        let mut t = self.lock();
        let k = key(call_id, caller_tag);
        if !converted {
            let Some(e) = t.entries.get_mut(&k) else {
                return;
            };
            e.claims = e.claims.saturating_sub(1);
            let counted = e.uncounted == 0;
            e.uncounted = e.uncounted.saturating_sub(1);
            let (kind, account) = (e.kind, e.account.clone());
            if kind == DialogKind::Call && counted {
                t.remove_calls(&account, 1);
            }
        }
        t.forget_if_done(&k);
    }

    /// The caller gave up on a forward that has not turned into a dialog: it stops counting
    /// toward the account's calls now, though the entry stays (for a 2xx that may still
    /// come, which then counts as a call that is up) until the forward ends.
    pub fn stop_counting(&self, call_id: &str, caller_tag: &str) {
        let mut t = self.lock();
        let Some(e) = t.entries.get_mut(&key(call_id, caller_tag)) else {
            return;
        };
        if e.uncounted >= e.claims {
            return;
        }
        e.uncounted += 1;
        let (kind, account) = (e.kind, e.account.clone());
        if kind == DialogKind::Call {
            t.remove_calls(&account, 1);
        }
    }

    /// The dialog these tags name, of `kind`, ended (its BYE was answered, its
    /// subscription terminated): only that dialog, not the other legs of a fork.
    pub fn ended(&self, call_id: &str, from_tag: &str, to_tag: &str, kind: DialogKind) {
        let mut t = self.lock();
        let Some((k, caller_sent)) = t.find(call_id, from_tag, to_tag) else {
            // An evicted dialog's end: its key need not be remembered any longer.
            for tag in [from_tag, to_tag] {
                let hash = t.hasher.hash_one(&*key(call_id, tag));
                t.gone.remove(&hash);
            }
            return;
        };
        let callee = if caller_sent { to_tag } else { from_tag };
        let e = t.entries.get_mut(&k).expect("just found");
        if e.kind != kind {
            return;
        }
        e.early.retain(|c| &**c != callee);
        let before = e.up.len();
        e.up.retain(|c| &**c != callee);
        let gone = before - e.up.len();
        let account = e.account.clone();
        if kind == DialogKind::Call && gone > 0 {
            t.calls_up -= gone;
            t.remove_calls(&account, gone as u32);
        }
        t.forget_if_done(&k);
    }

    /// Whether a request with these tags belongs to a dialog this node knows, and marks
    /// it used. Before any callee tag is known, only a subscription's NOTIFY (which may
    /// overtake the SUBSCRIBE's 2xx) can match, by the subscriber's tag alone. A dialog a
    /// full table evicted is still known, by its Call-ID and either tag.
    pub fn knows(&self, call_id: &str, from_tag: &str, to_tag: &str) -> bool {
        let mut t = self.lock();
        let now = Instant::now();
        let found = t
            .find(call_id, from_tag, to_tag)
            .map(|(k, _)| k)
            .or_else(|| {
                let k = key(call_id, to_tag);
                t.entries
                    .get(&k)
                    .is_some_and(|e| {
                        e.kind == DialogKind::Subscription && e.claims > 0 && e.up.is_empty()
                    })
                    .then_some(k)
            });
        let Some(k) = found else {
            return t.was_evicted(call_id, from_tag, to_tag);
        };
        if let Some(e) = t.entries.get_mut(&k) {
            e.last_used = now;
        }
        true
    }

    /// Marks the entry its caller's Call-ID and tag name as one its owner ends itself:
    /// the app server's bridged calls, whose in-dialog requests never pass
    /// [`Dialogs::knows`] and so never mark it used. It is never evicted or forgotten for
    /// idling.
    pub fn pin(&self, call_id: &str, caller_tag: &str) {
        if let Some(e) = self.lock().entries.get_mut(&key(call_id, caller_tag)) {
            e.pinned = true;
        }
    }

    /// Calls through this node that are up, for drain.
    pub fn count(&self) -> usize {
        let mut t = self.lock();
        t.prune(Instant::now());
        t.calls_up
    }

    /// Entries in the table (calls and subscriptions, being set up or up).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Entries forgotten so far to make room for new ones.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    /// New entries refused so far because the table was full of entries their placer
    /// may not evict (whoever asked: the proxy or the app server).
    pub fn refused(&self) -> u64 {
        self.lock().refused
    }

    /// Calls `account` has through this node now.
    #[cfg(test)]
    fn calls_of(&self, account: &str) -> u32 {
        self.lock().calls.get(account).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice@example.com";

    /// One forward of a call: begin, then a 2xx from `callee`, then the forward's end.
    #[test]
    fn a_call_the_caller_gave_up_on_stops_counting_and_counts_again_if_answered_late() {
        let d = Dialogs::new(100);
        d.begin("c1", "a", DialogKind::Call, Placer::Account(ALICE, 4), None)
            .unwrap();
        d.begin("c2", "a", DialogKind::Call, Placer::Account(ALICE, 4), None)
            .unwrap();
        assert_eq!(d.calls_of(ALICE), 2);
        // c1 was CANCELled before it rang: its place goes, once however often asked.
        d.stop_counting("c1", "a");
        d.stop_counting("c1", "a");
        assert_eq!(d.calls_of(ALICE), 1);
        // Its forward ends unanswered: c2 still counts.
        d.release("c1", "a", false);
        assert_eq!(d.calls_of(ALICE), 1);
        assert!(!d.knows("c1", "a", "b"));
        // c2 too is given up on, then answered late: a call that is up counts, and the
        // dialog is known for its ACK and BYE.
        d.stop_counting("c2", "a");
        assert_eq!(d.calls_of(ALICE), 0);
        let mut converted = false;
        d.answered("c2", "a", "b", 200, &mut converted);
        d.release("c2", "a", converted);
        assert_eq!(d.calls_of(ALICE), 1);
        assert!(d.knows("c2", "a", "b"));
        d.ended("c2", "a", "b", DialogKind::Call);
        assert_eq!(d.calls_of(ALICE), 0);
    }

    fn answered_call(d: &Dialogs, call: &str, limit: u32, callee: &str) -> Result<(), Refused> {
        d.begin(
            call,
            "a",
            DialogKind::Call,
            Placer::Account(ALICE, limit),
            None,
        )?;
        let mut converted = false;
        d.answered(call, "a", callee, 180, &mut converted);
        d.answered(call, "a", callee, 200, &mut converted);
        d.release(call, "a", converted);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_is_known_by_both_tags_in_either_order_until_its_bye() {
        let d = Dialogs::new(10);
        d.begin("c1", "a", DialogKind::Call, Placer::Stranger, None)
            .unwrap();
        assert!(!d.knows("c1", "a", "b"), "no callee tag yet");
        let mut converted = false;
        d.answered("c1", "a", "b", 180, &mut converted);
        assert!(d.knows("c1", "a", "b"), "an early dialog (PRACK, UPDATE)");
        d.answered("c1", "a", "b", 200, &mut converted);
        assert!(converted);
        d.release("c1", "a", converted);
        assert!(d.knows("c1", "a", "b"));
        assert!(
            d.knows("c1", "b", "a"),
            "the callee's requests swap the tags"
        );
        assert!(!d.knows("c1", "a", "x"));
        assert!(!d.knows("c1", "x", "b"));
        assert!(!d.knows("c2", "a", "b"));
        assert_eq!(d.count(), 1);
        d.ended("c1", "b", "a", DialogKind::Call);
        assert!(!d.knows("c1", "a", "b"));
        assert_eq!((d.count(), d.len()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_accounts_calls_are_its_claims_and_its_dialogs_up() {
        let d = Dialogs::new(10);
        answered_call(&d, "c1", 2, "b").unwrap();
        d.begin("c2", "a", DialogKind::Call, Placer::Account(ALICE, 2), None)
            .unwrap();
        assert_eq!(d.calls_of(ALICE), 2, "one up, one ringing");
        assert_eq!(
            d.begin("c3", "a", DialogKind::Call, Placer::Account(ALICE, 2), None),
            Err(Refused::CallLimit)
        );
        // Reusing a live Call-ID and tag is a new call too.
        assert_eq!(
            d.begin("c1", "a", DialogKind::Call, Placer::Account(ALICE, 2), None),
            Err(Refused::CallLimit)
        );
        // c2 fails: its slot is free again.
        d.release("c2", "a", false);
        assert_eq!(d.calls_of(ALICE), 1);
        assert_eq!(d.len(), 1);
        answered_call(&d, "c3", 2, "b").unwrap();
        d.ended("c3", "a", "b", DialogKind::Call);
        d.ended("c1", "a", "b", DialogKind::Call);
        assert_eq!((d.calls_of(ALICE), d.len()), (0, 0));
        // 0 is no limit.
        for i in 0..10 {
            d.begin(
                &format!("u{i}"),
                "a",
                DialogKind::Call,
                Placer::Account("trunk@example.com", 0),
                None,
            )
            .unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_with_the_same_call_id_keeps_the_dialog_its_first_try_leaves() {
        // The first INVITE got a 407 from downstream and its forward ends later than the
        // retry's 2xx: the retry's dialog must survive the first forward's end.
        let d = Dialogs::new(10);
        d.begin("c1", "a", DialogKind::Call, Placer::Account(ALICE, 4), None)
            .unwrap();
        d.begin("c1", "a", DialogKind::Call, Placer::Account(ALICE, 4), None)
            .unwrap();
        let mut retry = false;
        d.answered("c1", "a", "b", 200, &mut retry);
        d.release("c1", "a", false);
        assert!(d.knows("c1", "a", "b"));
        d.release("c1", "a", retry);
        assert!(d.knows("c1", "a", "b"));
        assert_eq!(d.calls_of(ALICE), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_leg_of_a_fork_is_a_call_and_ends_on_its_own() {
        let d = Dialogs::new(10);
        d.begin("c1", "a", DialogKind::Call, Placer::Account(ALICE, 4), None)
            .unwrap();
        let mut converted = false;
        d.answered("c1", "a", "desk", 200, &mut converted);
        d.answered("c1", "a", "soft", 200, &mut converted);
        d.release("c1", "a", converted);
        assert_eq!((d.calls_of(ALICE), d.count()), (2, 2));
        d.ended("c1", "a", "soft", DialogKind::Call);
        assert!(d.knows("c1", "a", "desk"), "the other leg is still up");
        assert!(!d.knows("c1", "a", "soft"));
        assert_eq!((d.calls_of(ALICE), d.count()), (1, 1));
        // A NOTIFY that ends a subscription (a transfer's REFER) does not end the call.
        d.ended("c1", "desk", "a", DialogKind::Subscription);
        assert!(d.knows("c1", "a", "desk"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_calls_records_are_written_when_its_entry_goes() {
        let (recorder, written) = Recorder::for_tests();
        let d = Dialogs::with_recorder(10, DEFAULT_EVICT_IDLE, Some(recorder));
        let records = || {
            Some(CallRecords::new(
                Open::new("c", "a", "in", "c1", "alice@example.com"),
                Open::new("c", "b1", "out", "c2", "bob@example.com"),
            ))
        };
        // Busy: written when the forward ends, with what the caller was sent.
        d.begin("busy", "a", DialogKind::Call, Placer::Stranger, records())
            .unwrap();
        let mut converted = false;
        d.answered("busy", "a", "b", 180, &mut converted);
        d.failed("busy", "a", 486, "Busy Here", "busy");
        assert!(written.try_recv().is_err());
        d.release("busy", "a", converted);
        let got: Vec<_> = written.try_iter().collect();
        assert_eq!(got.len(), 2, "{got:#?}");
        assert_eq!(
            (
                got[0].leg.as_str(),
                got[0].customer.as_str(),
                got[1].leg.as_str()
            ),
            ("a", "c1", "b1")
        );
        assert!(got.iter().all(|c| c.code == 486
            && c.outcome == "busy"
            && c.ring_ms.is_some()
            && c.answer_ms.is_none()));

        // Answered: written at the BYE, whatever the forward's end said before.
        d.begin("up", "a", DialogKind::Call, Placer::Stranger, records())
            .unwrap();
        let mut converted = false;
        d.answered("up", "a", "b", 200, &mut converted);
        d.release("up", "a", converted);
        assert!(written.try_recv().is_err(), "the call is up");
        d.ended("up", "b", "a", DialogKind::Call);
        let got: Vec<_> = written.try_iter().collect();
        assert!(got
            .iter()
            .all(|c| c.code == 200 && c.outcome == "answered" && c.answer_ms.is_some()));
        assert_eq!(got.len(), 2);

        // Forgotten for want of use: ended when it was last used.
        d.begin("idle", "a", DialogKind::Call, Placer::Stranger, records())
            .unwrap();
        let mut converted = false;
        d.answered("idle", "a", "b", 200, &mut converted);
        d.release("idle", "a", converted);
        let last_used = now_ms();
        tokio::time::advance(MAX_IDLE + Duration::from_secs(1)).await;
        assert_eq!(d.count(), 0);
        let got: Vec<_> = written.try_iter().collect();
        assert_eq!(got.len(), 2);
        assert!(
            got.iter()
                .all(|c| c.end_ms.abs_diff(last_used) < 1000 && c.reason.contains("no BYE")),
            "{got:#?}"
        );

        // Subscriptions and the app server's own claims write nothing.
        d.begin(
            "sub",
            "a",
            DialogKind::Subscription,
            Placer::Stranger,
            records(),
        )
        .unwrap();
        d.release("sub", "a", false);
        d.begin("app", "a", DialogKind::Call, Placer::Stranger, None)
            .unwrap();
        d.release("app", "a", false);
        assert!(written.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_notify_may_overtake_the_subscribe_2xx() {
        let d = Dialogs::new(10);
        d.begin(
            "s1",
            "sub",
            DialogKind::Subscription,
            Placer::Stranger,
            None,
        )
        .unwrap();
        assert!(d.knows("s1", "notifier", "sub"));
        assert_eq!(d.count(), 0, "subscriptions are not calls");
        let mut converted = false;
        d.answered("s1", "sub", "notifier", 200, &mut converted);
        d.release("s1", "sub", converted);
        assert!(!d.knows("s1", "other", "sub"));
        assert!(d.knows("s1", "notifier", "sub"));
        d.ended("s1", "notifier", "sub", DialogKind::Subscription);
        assert_eq!(d.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_refuses_new_dialogs_and_keeps_half_for_callers_who_authenticated() {
        let d = Dialogs::new(4);
        for i in 0..2 {
            d.begin(
                &format!("anon{i}"),
                "a",
                DialogKind::Call,
                Placer::Stranger,
                None,
            )
            .unwrap();
        }
        assert_eq!(
            d.begin("anon2", "a", DialogKind::Call, Placer::Stranger, None),
            Err(Refused::Full),
            "outsiders get half"
        );
        for i in 0..2 {
            answered_call(&d, &format!("c{i}"), 100, "b").unwrap();
        }
        assert_eq!(answered_call(&d, "c2", 100, "b"), Err(Refused::Full));
        assert!(d.knows("c0", "a", "b"), "no live call is evicted");
        assert_eq!((d.evicted(), d.refused()), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_evicts_the_dialog_unused_longest_but_never_for_an_outsider() {
        let (recorder, written) = Recorder::for_tests();
        let d = Dialogs::with_recorder(6, DEFAULT_EVICT_IDLE, Some(recorder));
        let records = || {
            Some(CallRecords::new(
                Open::new("c", "a", "in", "c1", "alice@example.com"),
                Open::new("c", "b1", "out", "c2", "bob@example.com"),
            ))
        };
        // Two outsiders' calls being set up (a claim each), then four answered calls
        // whose BYEs never come, one a second.
        let last_used_c0 = now_ms();
        for i in 0..2 {
            d.begin(
                &format!("anon{i}"),
                "a",
                DialogKind::Call,
                Placer::Stranger,
                None,
            )
            .unwrap();
        }
        for i in 0..4 {
            d.begin(
                &format!("c{i}"),
                "a",
                DialogKind::Call,
                Placer::Account(ALICE, 0),
                records(),
            )
            .unwrap();
            let mut converted = false;
            d.answered(&format!("c{i}"), "a", "b", 200, &mut converted);
            d.release(&format!("c{i}"), "a", converted);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(d.knows("c1", "a", "b"), "c1 is used: an in-dialog request");
        // Not unused for long enough: refused, nothing evicted.
        tokio::time::advance(DEFAULT_EVICT_IDLE - Duration::from_secs(5)).await;
        assert_eq!(answered_call(&d, "new0", 0, "b"), Err(Refused::Full));
        // Now c0 and c2 have gone unused long enough (c1 was used later); c0 longest.
        tokio::time::advance(Duration::from_secs(3)).await;
        answered_call(&d, "new1", 0, "b").unwrap();
        assert_eq!((d.evicted(), d.len(), d.calls_of(ALICE)), (1, 6, 4));
        assert!(d.knows("c1", "a", "b") && d.knows("c2", "a", "b"));
        let got: Vec<_> = written.try_iter().collect();
        assert_eq!(got.len(), 2, "both legs' records: {got:#?}");
        assert!(
            got.iter().all(|c| c.code == 200
                && c.end_ms.abs_diff(last_used_c0) < 1000
                && c.reason.contains("evicted")),
            "{got:#?}"
        );
        // The evicted call may still be up: a request inside it still passes (by either
        // tag as the caller's), until its BYE is answered.
        assert!(d.knows("c0", "a", "b") && d.knows("c0", "b", "a"));
        d.ended("c0", "b", "a", DialogKind::Call);
        assert!(!d.knows("c0", "a", "b"));
        assert!(written.try_recv().is_err(), "its records were written once");
        // An outsider never makes room by evicting a customer's call, however long
        // unused; the outsiders' calls hold claims, so they stay too.
        tokio::time::advance(MAX_IDLE / 2).await;
        assert_eq!(
            d.begin("anon2", "a", DialogKind::Call, Placer::Stranger, None),
            Err(Refused::Full)
        );
        assert_eq!(d.evicted(), 1);
        // Once an outsider's call is up and unused, another outsider may take its place.
        let mut converted = false;
        d.answered("anon0", "a", "b", 200, &mut converted);
        d.release("anon0", "a", converted);
        tokio::time::advance(DEFAULT_EVICT_IDLE).await;
        d.begin("anon2", "a", DialogKind::Call, Placer::Stranger, None)
            .unwrap();
        assert!(d.knows("c2", "a", "b"));
        assert_eq!((d.evicted(), d.len()), (2, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_evicts_members_and_strangers_dialogs_and_nothing_evicts_a_pinned_one() {
        let d = Dialogs::new(6);
        let up = |call: &str, placer: Placer<'_>| {
            d.begin(call, "a", DialogKind::Call, placer, None).unwrap();
            let mut converted = false;
            d.answered(call, "a", "b", 200, &mut converted);
            d.release(call, "a", converted);
        };
        up("pinned", Placer::Account(ALICE, 0));
        d.pin("pinned", "a");
        let others = ["alice", "alice3", "member0", "stranger0", "member1"];
        up("alice", Placer::Account(ALICE, 0));
        up("alice3", Placer::Account(ALICE, 0));
        up("member0", Placer::Member);
        up("stranger0", Placer::Stranger);
        up("member1", Placer::Member);
        // All but the pinned one are used, a second apart, just before MAX_IDLE.
        tokio::time::advance(MAX_IDLE - Duration::from_secs(10)).await;
        for call in others {
            assert!(d.knows(call, "a", "b"));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(d.count(), 6, "the pinned call is not forgotten for idling");
        tokio::time::advance(DEFAULT_EVICT_IDLE).await;
        // The table is full, and so is the half of members and strangers: a stranger
        // evicts the stranger's dialog, a member the member's or stranger's unused longest.
        up("stranger2", Placer::Stranger);
        up("member2", Placer::Member);
        assert_eq!(d.evicted(), 2);
        let there = |call: &str| d.lock().entries.contains_key(&key(call, "a"));
        assert!(!there("stranger0") && !there("member0") && there("member1"));
        // Alice's next call evicts the dialog unused longest that is not pinned.
        tokio::time::advance(DEFAULT_EVICT_IDLE).await;
        up("alice2", Placer::Account(ALICE, 0));
        assert!(!there("alice") && there("alice3") && there("pinned"));
        assert_eq!(d.calls_of(ALICE), 3, "pinned, alice3 and alice2");
    }

    #[tokio::test(start_paused = true)]
    async fn remembered_keys_stay_bounded_however_many_are_evicted_and_ended() {
        let d = Dialogs::new(4);
        for i in 0..50 {
            answered_call(&d, &format!("c{i}"), 0, "b").unwrap();
            if i >= 4 {
                // The call just evicted was up after all: its BYE comes, and drops its key.
                let evicted = format!("c{}", i - 4);
                assert!(d.knows(&evicted, "a", "b"));
                d.ended(&evicted, "a", "b", DialogKind::Call);
            }
            tokio::time::advance(DEFAULT_EVICT_IDLE).await;
        }
        assert_eq!(d.evicted(), 46);
        let t = d.lock();
        assert!(
            t.gone.len() <= 4 && t.gone_order.len() <= 4,
            "{} keys, {} places",
            t.gone.len(),
            t.gone_order.len()
        );
    }

    /// Two SIP threads: one reads the clock for a new call and is preempted before it
    /// takes the table's lock; the other marks the only dialog used meanwhile. The walk
    /// that then runs with the earlier clock reading must end (it once moved that entry
    /// to the back of the queue for ever, holding the lock, and the node's proxy stopped).
    #[tokio::test(start_paused = true)]
    async fn a_walk_with_a_clock_read_before_the_entries_last_use_ends() {
        let d = Arc::new(Dialogs::new(100));
        answered_call(&d, "c1", 0, "b").unwrap();
        let before = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(d.knows("c1", "a", "b"));
        let walking = d.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            walking.lock().prune(before);
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the walk over the queue did not end"
        );
        assert!(d.knows("c1", "a", "b"));
        assert_eq!(d.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_dialogs_are_forgotten_and_the_queue_stays_small() {
        let d = Dialogs::new(1000);
        for i in 0..3 {
            answered_call(&d, &format!("c{i}"), 100, "b").unwrap();
        }
        // Used now and then, a dialog stays; unused ones go after MAX_IDLE.
        tokio::time::advance(MAX_IDLE - Duration::from_secs(1)).await;
        assert!(d.knows("c1", "a", "b"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(d.count(), 1);
        assert!(d.knows("c1", "a", "b"));
        assert_eq!(d.calls_of(ALICE), 1);
        // A long-lived dialog at the front does not let dead positions pile up behind it.
        for i in 0..10_000 {
            let call = format!("short{i}");
            d.begin(&call, "a", DialogKind::Call, Placer::Stranger, None)
                .unwrap();
            d.release(&call, "a", false);
        }
        let (queued, entries) = {
            let t = d.lock();
            (t.queue.len(), t.entries.len())
        };
        assert!(
            queued <= 2 * entries + 65,
            "{queued} queued for {entries} entries"
        );
    }
}
