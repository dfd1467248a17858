//! The dialogs this node record-routed: what lets a request inside a dialog through, what
//! drain waits for, and what counts an account's concurrent calls.
//!
//! An entry is made when the proxy forwards a dialog-creating request with its
//! Record-Route (INVITE, SUBSCRIBE, REFER, NOTIFY), keyed by Call-ID and holding the
//! caller's tag. Provisional and 2xx responses add the callee's tags (several when the
//! request forked); a 2xx confirms it. A fork that ends without a 2xx removes its entry,
//! a BYE's final answer ends a call, and a NOTIFY that ends its subscription ends that.
//! A request inside a dialog passes only if its two tags are the caller's and one of the
//! callee's, in either order.
//!
//! Bounded: at most `max` entries, and an entry nobody used for [`MAX_IDLE`] is
//! forgotten. Entries sit in a queue by last use; the front is checked on every insert,
//! an entry used since it was queued goes to the back, so both bounds cost O(1)
//! amortized. When the table is full the least recently queued entry makes room.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A dialog with no request through this node for this long is forgotten: a call whose
/// BYE went elsewhere, or a subscription that was never refreshed.
pub const MAX_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Callee tags kept per dialog (one per forked branch that answered).
const MAX_CALLEE_TAGS: usize = 8;
/// Entries the table holds by default.
pub const DEFAULT_MAX_DIALOGS: usize = 100_000;

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
    caller_tag: Box<str>,
    callee_tags: Vec<Box<str>>,
    confirmed: bool,
    /// The local account that placed the call, counted in `calls`.
    account: Option<Arc<str>>,
    last_used: Instant,
    /// When the entry took its current place in the queue.
    queued_at: Instant,
    /// Which queue position is current (an entry re-queued has a newer one).
    seq: u64,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<Arc<str>, Entry>,
    queue: VecDeque<(Arc<str>, u64)>,
    next_seq: u64,
    /// Calls per account: pending and confirmed INVITE dialogs it placed.
    calls: HashMap<Arc<str>, u32>,
    /// Confirmed calls, for drain.
    confirmed_calls: usize,
}

/// Why a new dialog was not recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The calling account has `max_concurrent_calls` calls already.
    CallLimit,
}

/// The table of one node's proxy.
#[derive(Debug)]
pub struct Dialogs {
    table: Mutex<Table>,
    max: usize,
}

impl Default for Dialogs {
    fn default() -> Self {
        Dialogs::new(DEFAULT_MAX_DIALOGS)
    }
}

impl Table {
    fn forget(&mut self, call_id: &str) -> Option<Entry> {
        let e = self.entries.remove(call_id)?;
        if e.kind == DialogKind::Call && e.confirmed {
            self.confirmed_calls -= 1;
        }
        if let Some(account) = &e.account {
            if let Some(n) = self.calls.get_mut(account) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.calls.remove(account);
                }
            }
        }
        Some(e)
    }

    /// Works from the front of the queue: drops stale positions, forgets idle entries
    /// (and the front one while there are more than `max`), and sends an entry used
    /// since it was queued to the back. The first entry left unused since it was queued
    /// and not idle ends the walk: everything behind it was queued, or used, later.
    fn prune(&mut self, now: Instant, max: usize) {
        while let Some((call_id, seq)) = self.queue.front().cloned() {
            let Some(e) = self.entries.get(&call_id) else {
                self.queue.pop_front();
                continue;
            };
            if e.seq != seq {
                self.queue.pop_front();
                continue;
            }
            let idle = now.saturating_duration_since(e.last_used) >= MAX_IDLE;
            let used_since = e.last_used > e.queued_at;
            self.queue.pop_front();
            if self.entries.len() > max || idle {
                self.forget(&call_id);
            } else if used_since {
                let seq = self.queue_back(call_id.clone());
                let e = self.entries.get_mut(&call_id).expect("present");
                e.seq = seq;
                e.queued_at = now;
            } else {
                self.queue.push_front((call_id, seq));
                break;
            }
        }
    }

    fn queue_back(&mut self, call_id: Arc<str>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back((call_id, seq));
        seq
    }
}

impl Dialogs {
    pub fn new(max: usize) -> Dialogs {
        Dialogs {
            table: Mutex::default(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("dialog table lock")
    }

    /// Records a dialog-creating request about to be forwarded. A call placed by a local
    /// `account` (with its limit; 0 is none) counts against it, and is refused at the
    /// limit. Returns
    /// whether this request made the entry (and so must [`Dialogs::abandon`] it if it
    /// fails); an entry for the Call-ID already there (the same request spiralling back
    /// through this node) is left as it is.
    pub fn begin(
        &self,
        call_id: &str,
        caller_tag: &str,
        kind: DialogKind,
        account: Option<(&str, u32)>,
    ) -> Result<bool, Refused> {
        let now = Instant::now();
        let mut t = self.lock();
        if t.entries.contains_key(call_id) {
            return Ok(false);
        }
        let account = match account {
            Some((name, limit)) if kind == DialogKind::Call => {
                let n = t.calls.get(name).copied().unwrap_or(0);
                if limit > 0 && n >= limit {
                    return Err(Refused::CallLimit);
                }
                let name: Arc<str> = Arc::from(name);
                *t.calls.entry(name.clone()).or_insert(0) += 1;
                Some(name)
            }
            _ => None,
        };
        let key: Arc<str> = Arc::from(call_id);
        let seq = t.queue_back(key.clone());
        t.entries.insert(
            key,
            Entry {
                kind,
                caller_tag: caller_tag.into(),
                callee_tags: Vec::new(),
                confirmed: false,
                account,
                last_used: now,
                queued_at: now,
                seq,
            },
        );
        t.prune(now, self.max);
        Ok(true)
    }

    /// A response with a To tag went upstream: the callee's side of the dialog (early,
    /// or confirmed by a 2xx).
    pub fn answered(&self, call_id: &str, callee_tag: &str, confirmed: bool) {
        let mut t = self.lock();
        let Some(e) = t.entries.get_mut(call_id) else {
            return;
        };
        if !e.callee_tags.iter().any(|c| &**c == callee_tag)
            && e.callee_tags.len() < MAX_CALLEE_TAGS
        {
            e.callee_tags.push(callee_tag.into());
        }
        let newly = confirmed && !e.confirmed;
        e.confirmed |= confirmed;
        if newly && e.kind == DialogKind::Call {
            t.confirmed_calls += 1;
        }
    }

    /// The request that made the entry failed (no 2xx): forget it unless confirmed.
    pub fn abandon(&self, call_id: &str) {
        let mut t = self.lock();
        if t.entries.get(call_id).is_some_and(|e| !e.confirmed) {
            t.forget(call_id);
        }
    }

    /// The dialog ended (a BYE was answered, a subscription terminated).
    pub fn ended(&self, call_id: &str) {
        self.lock().forget(call_id);
    }

    /// Whether a request with these tags belongs to a dialog this node knows, and marks
    /// it used. Before any callee tag is known, only a subscription's NOTIFY (which may
    /// overtake the SUBSCRIBE's 2xx) can match, by the caller's tag alone.
    pub fn knows(&self, call_id: &str, from_tag: &str, to_tag: &str) -> bool {
        let now = Instant::now();
        let mut t = self.lock();
        let Some(e) = t.entries.get_mut(call_id) else {
            return false;
        };
        let callee = |tag: &str| e.callee_tags.iter().any(|c| &**c == tag);
        let matches = (&*e.caller_tag == from_tag && callee(to_tag))
            || (&*e.caller_tag == to_tag && callee(from_tag))
            || (e.kind == DialogKind::Subscription
                && e.callee_tags.is_empty()
                && &*e.caller_tag == to_tag);
        if !matches {
            return false;
        }
        e.last_used = now;
        true
    }

    /// Confirmed calls through this node that have not ended, for drain.
    pub fn count(&self) -> usize {
        let mut t = self.lock();
        t.prune(Instant::now(), self.max);
        t.confirmed_calls
    }

    /// Entries in the table (calls and subscriptions, pending or confirmed).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
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

    #[tokio::test(start_paused = true)]
    async fn a_call_is_known_by_both_tags_in_either_order_until_it_ends() {
        let d = Dialogs::new(10);
        assert_eq!(d.begin("c1", "a", DialogKind::Call, None), Ok(true));
        assert!(!d.knows("c1", "a", "b"), "no callee tag yet");
        d.answered("c1", "b", true);
        assert!(d.knows("c1", "a", "b"));
        assert!(
            d.knows("c1", "b", "a"),
            "the callee's requests swap the tags"
        );
        assert!(!d.knows("c1", "a", "x"));
        assert!(!d.knows("c2", "a", "b"));
        assert_eq!(d.count(), 1);
        d.ended("c1");
        assert!(!d.knows("c1", "a", "b"));
        assert_eq!((d.count(), d.len()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_call_is_forgotten_and_frees_its_slot() {
        let d = Dialogs::new(10);
        let alice = Some(("alice@example.com", 2));
        assert_eq!(d.begin("c1", "a", DialogKind::Call, alice), Ok(true));
        assert_eq!(d.begin("c2", "a", DialogKind::Call, alice), Ok(true));
        assert_eq!(
            d.begin("c3", "a", DialogKind::Call, alice),
            Err(Refused::CallLimit)
        );
        // A spiral of c1 is not a new call.
        assert_eq!(d.begin("c1", "a", DialogKind::Call, alice), Ok(false));
        d.answered("c1", "b", false);
        d.abandon("c1");
        assert_eq!(d.calls_of("alice@example.com"), 1);
        assert_eq!(d.begin("c3", "a", DialogKind::Call, alice), Ok(true));
        d.answered("c3", "b", true);
        d.abandon("c3");
        assert!(
            d.knows("c3", "a", "b"),
            "a confirmed call survives its fork"
        );
        d.ended("c3");
        d.ended("c2");
        assert_eq!(d.calls_of("alice@example.com"), 0);
        // 0 is no limit.
        for i in 0..10 {
            let call = format!("u{i}");
            assert_eq!(
                d.begin(&call, "a", DialogKind::Call, Some(("trunk@example.com", 0))),
                Ok(true)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_notify_may_overtake_the_subscribe_2xx() {
        let d = Dialogs::new(10);
        d.begin("s1", "sub", DialogKind::Subscription, None)
            .unwrap();
        assert!(d.knows("s1", "notifier", "sub"));
        assert_eq!(d.count(), 0, "subscriptions are not calls");
        d.answered("s1", "notifier", true);
        assert!(!d.knows("s1", "other", "sub"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_forgets_idle_dialogs() {
        let d = Dialogs::new(3);
        let account = Some(("alice@example.com", 100));
        for i in 0..5 {
            d.begin(&format!("c{i}"), "a", DialogKind::Call, account)
                .unwrap();
            d.answered(&format!("c{i}"), "b", true);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.count(), 3);
        assert_eq!(d.calls_of("alice@example.com"), 3);
        assert!(!d.knows("c0", "a", "b") && d.knows("c4", "a", "b"));
        // Used now and then, a dialog stays; unused ones go after MAX_IDLE.
        tokio::time::advance(MAX_IDLE - Duration::from_secs(1)).await;
        assert!(d.knows("c2", "a", "b"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(d.count(), 1);
        assert!(d.knows("c2", "a", "b"));
        assert_eq!(d.calls_of("alice@example.com"), 1);
        assert!(d.lock().queue.len() <= 2 * 3 + 2);
    }
}
