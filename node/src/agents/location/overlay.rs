//! The degraded-mode binding overlay (node/DESIGN.md, "Degraded mode"). Without a quorum a
//! node cannot write bindings through Raft, but a registration must never fail only because
//! the cluster is unhealthy. The registrar then keeps the writes here, on disk before the
//! phone is answered (the [`Journal`]), and reads its bindings through the overlay; once a
//! quorum returns the overlay is replayed through Raft, oldest first, each change applied
//! only if nothing newer happened to its binding meanwhile, and emptied.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tandem_raft_store::command::{Binding, Command, CommandResult, HeldBinding};
use tandem_raft_store::replica::Replica;
use tokio_util::sync::CancellationToken;

use super::journal::{self, Journal};
use crate::clock::now_ms;
use crate::Error;

/// How often the overlay tries to replay once the node is healthy again.
const REPLAY_EVERY: Duration = Duration::from_millis(500);

/// Most binding changes held at once. Past it a REGISTER that needs a new one is refused
/// with 503 and a Retry-After: the phone tries again, perhaps through another node, and
/// what is held stays bounded in memory and on disk.
pub const MAX_HELD: usize = 100_000;

/// Most changes held for one AOR. An account's phones have at most `max_contacts` live
/// bindings, but a phone that registers new contacts and removes them again would leave
/// one held removal each: past this bound the oldest held removals of the AOR are
/// forgotten (the bindings they removed lapse on their own), and held new bindings that
/// have lapsed are dropped, so one account cannot fill [`MAX_HELD`].
const MAX_HELD_PER_AOR: usize = 16;

/// Held changes replayed per proposal.
const REPLAY_BATCH: usize = 256;

/// The cluster feature version from which held changes are replayed conditionally
/// (`Command::ReplayHeldBinding`); before it, as plain writes.
const CONDITIONAL_REPLAY: u32 = 4;

/// Why a change could not be held.
#[derive(Debug)]
pub enum HoldRefused {
    /// [`MAX_HELD`] changes are held already, or [`MAX_HELD_PER_AOR`] live new bindings
    /// of the AOR.
    Full,
    /// The journal could not be written.
    Disk(String),
    /// Only binding writes are held.
    NotABinding,
}

impl std::fmt::Display for HoldRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HoldRefused::Full => write!(f, "the overlay, or the AOR's share of it, is full"),
            HoldRefused::Disk(e) => write!(f, "the held-bindings journal: {e}"),
            HoldRefused::NotABinding => write!(f, "not a binding write"),
        }
    }
}

#[derive(Debug)]
struct Held {
    /// The order changes were held in.
    stamp: u64,
    change: HeldBinding,
}

#[derive(Debug, Default)]
struct Entries {
    by_binding: BTreeMap<(String, String), Held>,
    next: u64,
    /// Records appended to the journal since it was last rewritten.
    appended: usize,
}

/// Binding writes held back while this node has no quorum, by (AOR, contact), in order,
/// and on disk in the [`Journal`] when the overlay has one.
pub struct BindingOverlay {
    entries: Mutex<Entries>,
    journal: Option<Journal>,
    /// Set when entries were dropped that the journal still holds.
    stale_journal: AtomicBool,
    /// [`MAX_HELD`], but for tests.
    max_held: usize,
}

/// An overlay in memory only, for tests.
impl Default for BindingOverlay {
    fn default() -> BindingOverlay {
        BindingOverlay {
            entries: Mutex::default(),
            journal: None,
            stale_journal: AtomicBool::new(false),
            max_held: MAX_HELD,
        }
    }
}

impl BindingOverlay {
    /// The overlay of a node whose data dir is `data_dir`, with the changes its journal
    /// held when the node stopped.
    pub fn open(data_dir: &Path) -> Result<BindingOverlay, Error> {
        let (journal, records) = Journal::open(data_dir)?;
        let mut entries = Entries::default();
        let read = records.len();
        for change in records {
            entries.next += 1;
            let stamp = entries.next;
            entries.by_binding.insert(
                (change.aor.clone(), change.contact.clone()),
                Held { stamp, change },
            );
        }
        entries.appended = read;
        if !entries.by_binding.is_empty() {
            tracing::info!(
                held = entries.by_binding.len(),
                "binding changes answered without a quorum before the node stopped are held again, to be replayed"
            );
        }
        Ok(BindingOverlay {
            entries: Mutex::new(entries),
            journal: Some(journal),
            stale_journal: AtomicBool::new(read > 0),
            max_held: MAX_HELD,
        })
    }

    /// Holds a binding write back (a put or a removal, answered at `held_at_ms`), on disk
    /// before it returns when the overlay has a journal.
    pub async fn hold(&self, command: &Command, held_at_ms: u64) -> Result<(), HoldRefused> {
        let (aor, contact, binding) = match command {
            Command::PutBinding(b) => (&b.aor, &b.contact, Some(b.clone())),
            Command::RemoveBinding { aor, contact } => (aor, contact, None),
            _ => return Err(HoldRefused::NotABinding),
        };
        let Some((user, domain)) = tandem_raft_store::command::account_of_aor(aor) else {
            return Err(HoldRefused::NotABinding);
        };
        let change = HeldBinding {
            user: user.to_owned(),
            domain: domain.to_owned(),
            aor: aor.clone(),
            contact: contact.clone(),
            held_at_ms,
            binding,
        };
        let key = (aor.clone(), contact.clone());
        let (stamp, previous, synced) = {
            let mut entries = self.entries.lock().expect("overlay lock");
            if !entries.by_binding.contains_key(&key) {
                self.make_room_for(&mut entries, aor)?;
            }
            // Queued under the lock, so a rewrite (also queued under it) never drops it.
            let synced = self.journal.as_ref().map(|j| {
                entries.appended += 1;
                j.append(journal::encode(&change))
            });
            entries.next += 1;
            let stamp = entries.next;
            let previous = entries
                .by_binding
                .insert(key.clone(), Held { stamp, change });
            (stamp, previous, synced)
        };
        let Some(synced) = synced else {
            return Ok(());
        };
        let written = synced
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the journal stopped")));
        if let Err(e) = written {
            // Not answered, so not kept: the phone is refused and tries again. What was
            // held for the binding before stays held, and the journal is rewritten from
            // memory before anything more is acknowledged.
            let mut entries = self.entries.lock().expect("overlay lock");
            if entries.by_binding.get(&key).map(|h| h.stamp) == Some(stamp) {
                match previous {
                    Some(p) => entries.by_binding.insert(key, p),
                    None => entries.by_binding.remove(&key),
                };
            }
            self.stale_journal.store(true, Ordering::Relaxed);
            return Err(HoldRefused::Disk(e.to_string()));
        }
        let mut entries = self.entries.lock().expect("overlay lock");
        if entries.appended > 2 * entries.by_binding.len() + 1024 {
            self.rewrite_journal(&mut entries);
        }
        Ok(())
    }

    /// Makes room for one more change of `aor`: drops its held new bindings that have
    /// lapsed and, past [`MAX_HELD_PER_AOR`], its oldest held removals; refuses when the
    /// AOR or the overlay is still full.
    fn make_room_for(&self, entries: &mut Entries, aor: &str) -> Result<(), HoldRefused> {
        let now = now_ms();
        let of_aor = |entries: &Entries| -> Vec<((String, String), u64, Option<bool>)> {
            entries
                .by_binding
                .range((aor.to_owned(), String::new())..)
                .take_while(|((a, _), _)| a == aor)
                .map(|(k, h)| {
                    // Some(lapsed) for a new binding, None for a removal.
                    let lapsed = h.change.binding.as_ref().map(|b| b.expires_at_ms <= now);
                    (k.clone(), h.stamp, lapsed)
                })
                .collect()
        };
        let held = of_aor(entries);
        if held.len() >= MAX_HELD_PER_AOR {
            let mut removals: Vec<(u64, (String, String))> = Vec::new();
            for (k, stamp, lapsed) in held {
                match lapsed {
                    Some(true) => {
                        entries.by_binding.remove(&k);
                    }
                    Some(false) => {}
                    None => removals.push((stamp, k)),
                }
            }
            removals.sort();
            let excess = (of_aor(entries).len() + 1).saturating_sub(MAX_HELD_PER_AOR);
            for (_, k) in removals.into_iter().take(excess) {
                entries.by_binding.remove(&k);
            }
            self.stale_journal.store(true, Ordering::Relaxed);
            if of_aor(entries).len() >= MAX_HELD_PER_AOR {
                return Err(HoldRefused::Full);
            }
        }
        if entries.by_binding.len() >= self.max_held {
            return Err(HoldRefused::Full);
        }
        Ok(())
    }

    /// Drops what is held for the binding `command` writes (after a direct write of it).
    pub fn forget(&self, command: &Command) {
        let mut entries = self.entries.lock().expect("overlay lock");
        let before = entries.by_binding.len();
        match command {
            Command::PutBinding(b) => {
                entries
                    .by_binding
                    .remove(&(b.aor.clone(), b.contact.clone()));
            }
            Command::RemoveBinding { aor, contact } => {
                entries.by_binding.remove(&(aor.clone(), contact.clone()));
            }
            Command::RemoveAllBindings { aor } => entries.by_binding.retain(|(a, _), _| a != aor),
            _ => {}
        }
        if entries.by_binding.len() != before {
            self.stale_journal.store(true, Ordering::Relaxed);
        }
    }

    /// Rewrites the journal with what is held now, if entries were dropped since.
    fn tidy_journal(&self) {
        if self.stale_journal.swap(false, Ordering::Relaxed) {
            let mut entries = self.entries.lock().expect("overlay lock");
            self.rewrite_journal(&mut entries);
        }
    }

    fn rewrite_journal(&self, entries: &mut Entries) {
        if let Some(j) = &self.journal {
            let mut held: Vec<&Held> = entries.by_binding.values().collect();
            held.sort_by_key(|h| h.stamp);
            j.rewrite(held.iter().map(|h| journal::encode(&h.change)).collect());
            entries.appended = held.len();
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("overlay lock").by_binding.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `stored` (an AOR's bindings in the replica) with this node's held-back changes.
    pub fn apply(&self, aor: &str, stored: Vec<Binding>) -> Vec<Binding> {
        self.merge(stored, |b| b.aor == aor)
    }

    /// The held new values of bindings whose edge is `edge`. With [`Self::without_held`]
    /// applied to each page of the replica's bindings of that edge, they are what NAT
    /// keepalives go to while registrations are held here.
    pub fn held_for_edge(&self, edge: u64) -> Vec<Binding> {
        self.held(|b| b.edge_node == edge)
    }

    /// `stored` without the bindings a held change replaces.
    pub fn without_held(&self, stored: Vec<Binding>) -> Vec<Binding> {
        let entries = self.entries.lock().expect("overlay lock");
        if entries.by_binding.is_empty() {
            return stored;
        }
        stored
            .into_iter()
            .filter(|b| {
                !entries
                    .by_binding
                    .contains_key(&(b.aor.clone(), b.contact.clone()))
            })
            .collect()
    }

    fn held(&self, belongs: impl Fn(&Binding) -> bool) -> Vec<Binding> {
        let entries = self.entries.lock().expect("overlay lock");
        entries
            .by_binding
            .values()
            .filter_map(|h| h.change.binding.as_ref())
            .filter(|b| belongs(b))
            .cloned()
            .collect()
    }

    /// `stored` without the bindings held changes replace, plus the held new values that
    /// `belongs` to the same selection.
    fn merge(&self, stored: Vec<Binding>, belongs: impl Fn(&Binding) -> bool) -> Vec<Binding> {
        let mut out = self.without_held(stored);
        out.extend(self.held(belongs));
        out
    }

    /// Replays everything held back through Raft, oldest first, and rewrites the journal
    /// with what is left. Once every member runs a release that can, each change goes as a
    /// `ReplayHeldBinding`, which the state machine applies only if nothing newer happened
    /// to that binding meanwhile, the binding has not lapsed and its account is still
    /// enabled; a change it refuses is done with too. An entry changed again while its
    /// replay was in flight stays for the next round, and so does one whose write fails;
    /// the first error is returned after every entry was tried.
    pub async fn replay(&self, replica: &Replica) -> Result<usize, tandem_raft_store::Error> {
        let conditional = replica.reader().feature_version()? >= CONDITIONAL_REPLAY;
        let mut held: Vec<(u64, HeldBinding)> = self
            .entries
            .lock()
            .expect("overlay lock")
            .by_binding
            .values()
            .map(|h| (h.stamp, h.change.clone()))
            .collect();
        held.sort_by_key(|(stamp, _)| *stamp);
        let mut first_error = None;
        let mut done = 0;
        for batch in held.chunks(REPLAY_BATCH) {
            let now = now_ms();
            let commands = batch
                .iter()
                .map(|(_, h)| replay_command(h, conditional, now))
                .collect();
            let results = replica.propose_all(commands).await;
            let mut entries = self.entries.lock().expect("overlay lock");
            for ((stamp, h), result) in batch.iter().zip(results) {
                match result {
                    Err(e) => {
                        first_error.get_or_insert(e);
                        continue;
                    }
                    Ok(CommandResult::Rejected(why)) => {
                        tracing::info!(aor = %h.aor, contact = %h.contact, held_at_ms = h.held_at_ms, %why, "a held binding change was not replayed");
                    }
                    Ok(_) => {}
                }
                let key = (h.aor.clone(), h.contact.clone());
                if entries.by_binding.get(&key).map(|e| e.stamp) == Some(*stamp) {
                    entries.by_binding.remove(&key);
                    self.stale_journal.store(true, Ordering::Relaxed);
                }
                done += 1;
            }
        }
        self.tidy_journal();
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }
}

/// The command that replays `held`: conditional once the cluster can apply it.
fn replay_command(held: &HeldBinding, conditional: bool, now_ms: u64) -> Command {
    if conditional {
        return Command::ReplayHeldBinding {
            held: held.clone(),
            now_ms,
        };
    }
    match &held.binding {
        Some(b) => Command::PutBinding(b.clone()),
        None => Command::RemoveBinding {
            aor: held.aor.clone(),
            contact: held.contact.clone(),
        },
    }
}

/// Replays the overlay whenever the node is healthy and the overlay is not empty.
pub async fn replay_when_healthy(
    overlay: std::sync::Arc<BindingOverlay>,
    replica: Replica,
    quorum_timeout: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REPLAY_EVERY) => {}
        }
        if overlay.is_empty() || replica.quorum_health(quorum_timeout).degraded.is_some() {
            overlay.tidy_journal();
            continue;
        }
        let replayed = tokio::select! {
            _ = stop.cancelled() => return,
            r = overlay.replay(&replica) => r,
        };
        match replayed {
            Ok(n) => tracing::info!(
                bindings = n,
                "quorum is back: replayed the degraded-mode binding overlay"
            ),
            Err(e) => {
                tracing::warn!(error = %e, left = overlay.len(), "overlay replay failed; will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_raft_store::command::StoredFlow;

    fn binding(contact: &str, cseq: u32) -> Binding {
        Binding {
            aor: "sip:a@example.com".into(),
            contact: contact.into(),
            expires_at_ms: 10,
            expires_secs: 60,
            edge_node: 1,
            flow: StoredFlow {
                transport: "UDP".into(),
                remote: "192.0.2.1:5060".into(),
                local: "127.0.0.1:5060".into(),
                connection: None,
            },
            path: vec![],
            call_id: "c".into(),
            cseq,
            q: 1000,
            user_agent: String::new(),
        }
    }

    /// What a degraded node holds in these tests: a refresh of x, y removed, a new z.
    async fn hold_degraded_changes(o: &BindingOverlay) {
        assert!(o
            .hold(&Command::PutBinding(binding("sip:x@h", 2)), 1)
            .await
            .is_ok());
        assert!(o
            .hold(
                &Command::RemoveBinding {
                    aor: "sip:a@example.com".into(),
                    contact: "sip:y@h".into()
                },
                1
            )
            .await
            .is_ok());
        assert!(o
            .hold(&Command::PutBinding(binding("sip:z@h", 1)), 1)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn held_changes_shadow_the_replica() {
        let o = BindingOverlay::default();
        let stored = vec![binding("sip:x@h", 1), binding("sip:y@h", 1)];
        hold_degraded_changes(&o).await;
        assert!(o.hold(&Command::Noop { payload: vec![] }, 1).await.is_err());
        let seen = o.apply("sip:a@example.com", stored);
        let mut view: Vec<(String, u32)> =
            seen.iter().map(|b| (b.contact.clone(), b.cseq)).collect();
        view.sort();
        assert_eq!(view, vec![("sip:x@h".into(), 2), ("sip:z@h".into(), 1)]);
        assert_eq!(o.apply("sip:other@example.com", vec![]).len(), 0);
        assert_eq!(o.len(), 3);
    }

    #[tokio::test]
    async fn keepalives_see_held_bindings_of_their_edge_only() {
        let o = BindingOverlay::default();
        let stored = vec![binding("sip:x@h", 1), binding("sip:y@h", 1)];
        let for_edge = |stored: Vec<Binding>| {
            let mut seen = o.without_held(stored);
            seen.extend(o.held_for_edge(1));
            seen
        };
        assert_eq!(for_edge(stored.clone()), stored);
        // Held while degraded: a refresh of x, y gone, and a new z; plus a new w whose
        // edge is another node.
        hold_degraded_changes(&o).await;
        let mut elsewhere = binding("sip:w@h", 1);
        elsewhere.edge_node = 2;
        assert!(o.hold(&Command::PutBinding(elsewhere), 1).await.is_ok());
        let mut seen: Vec<(String, u32)> = for_edge(stored)
            .iter()
            .map(|b| (b.contact.clone(), b.cseq))
            .collect();
        seen.sort();
        assert_eq!(seen, vec![("sip:x@h".into(), 2), ("sip:z@h".into(), 1)]);
    }

    #[tokio::test]
    async fn at_its_bound_the_overlay_takes_changes_to_what_it_holds_and_nothing_new() {
        let o = BindingOverlay {
            max_held: 2,
            ..BindingOverlay::default()
        };
        for contact in ["sip:x@h", "sip:y@h"] {
            o.hold(&Command::PutBinding(binding(contact, 1)), 1)
                .await
                .unwrap();
        }
        let new = o.hold(&Command::PutBinding(binding("sip:z@h", 1)), 2).await;
        assert!(matches!(new, Err(HoldRefused::Full)), "{new:?}");
        o.hold(&Command::PutBinding(binding("sip:x@h", 2)), 3)
            .await
            .unwrap();
        assert_eq!(o.len(), 2);
    }

    #[tokio::test]
    async fn one_aor_cannot_fill_the_overlay_with_removals_or_lapsed_bindings() {
        let o = BindingOverlay::default();
        let now = now_ms();
        // A phone that registers a new contact and removes it, over and over.
        for i in 0..3 * MAX_HELD_PER_AOR {
            let gone = Command::RemoveBinding {
                aor: "sip:a@example.com".into(),
                contact: format!("sip:{i}@h"),
            };
            o.hold(&gone, now).await.unwrap();
        }
        assert!(o.len() <= MAX_HELD_PER_AOR, "{}", o.len());
        // Lapsed new bindings make room too; live ones do not.
        for i in 0..MAX_HELD_PER_AOR {
            let mut b = binding(&format!("sip:l{i}@h"), 1);
            b.expires_at_ms = now - 1;
            o.hold(&Command::PutBinding(b), now).await.unwrap();
        }
        for i in 0..MAX_HELD_PER_AOR {
            let mut b = binding(&format!("sip:live{i}@h"), 1);
            b.expires_at_ms = now + 600_000;
            o.hold(&Command::PutBinding(b), now).await.unwrap();
        }
        let mut b = binding("sip:one-too-many@h", 1);
        b.expires_at_ms = now + 600_000;
        let refused = o.hold(&Command::PutBinding(b), now).await;
        assert!(matches!(refused, Err(HoldRefused::Full)), "{refused:?}");
        // Another AOR is not affected.
        let mut other = binding("sip:x@h", 1);
        other.aor = "sip:b@example.com".into();
        o.hold(&Command::PutBinding(other), now).await.unwrap();
    }

    #[tokio::test]
    async fn what_is_held_survives_reopening_until_it_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let o = BindingOverlay::open(dir.path()).unwrap();
        o.hold(&Command::PutBinding(binding("sip:x@h", 2)), 5)
            .await
            .unwrap();
        o.hold(&Command::PutBinding(binding("sip:z@h", 1)), 6)
            .await
            .unwrap();
        let gone = Command::RemoveBinding {
            aor: "sip:a@example.com".into(),
            contact: "sip:y@h".into(),
        };
        o.hold(&gone, 7).await.unwrap();
        drop(o);
        let o = BindingOverlay::open(dir.path()).unwrap();
        assert_eq!(o.len(), 3);
        let seen = o.apply("sip:a@example.com", vec![binding("sip:y@h", 1)]);
        let mut view: Vec<(String, u32)> =
            seen.iter().map(|b| (b.contact.clone(), b.cseq)).collect();
        view.sort();
        assert_eq!(view, vec![("sip:x@h".into(), 2), ("sip:z@h".into(), 1)]);
        // A direct write supersedes what was held; the journal forgets it at its next tidy.
        o.forget(&Command::PutBinding(binding("sip:x@h", 3)));
        o.tidy_journal();
        o.hold(&Command::PutBinding(binding("sip:w@h", 1)), 8)
            .await
            .unwrap();
        drop(o);
        let o = BindingOverlay::open(dir.path()).unwrap();
        let mut held: Vec<(String, u64)> = o
            .entries
            .lock()
            .unwrap()
            .by_binding
            .values()
            .map(|h| (h.change.contact.clone(), h.change.held_at_ms))
            .collect();
        held.sort();
        assert_eq!(
            held,
            vec![
                ("sip:w@h".into(), 8),
                ("sip:y@h".into(), 7),
                ("sip:z@h".into(), 6)
            ]
        );
    }
}
