//! The Call-ID and CSeq of the refreshes this node answered without a Raft write.
//!
//! A refresh that changes nothing a call is routed by (contact, flow, edge node, q, Path,
//! interval) is not written while the stored expiry has headroom (node/DESIGN.md, "Bindings
//! are written when they change"), even when it carries a new Call-ID: some phones pick a
//! new one for every REGISTER, although RFC 3261 §10.2.4 says they should not, and writing
//! each would cost a commit per refresh. RFC 3261 §10.3 step 7 still needs the newest
//! Call-ID and CSeq to refuse a REGISTER that arrives out of order, so this node remembers
//! them here, per binding, and the registrar reads bindings through it.
//!
//! An entry names the stored binding it amends by its expiry instant: once any node
//! rewrites the binding, the entry no longer matches and is ignored. Entries are dropped
//! once their binding has lapsed. Another node, which never saw these refreshes, orders
//! against the stored values; that is no worse than before the refresh, and a phone
//! moving to another node is written anyway, because its edge node changes.
//!
//! A node keeps an entry for nearly every binding it serves, so an entry is small: the
//! Call-ID is kept as a hash under the same per-process key. The registrar only ever asks
//! whether a request's Call-ID is the newest one, so [`UnwrittenRefreshes::apply`] is given
//! the Call-IDs about to be compared and restores the one that matches; a binding whose
//! newest Call-ID is none of them gets an empty Call-ID, which no request carries
//! (`tandem_sip` refuses an empty Call-ID).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use tandem_raft_store::command::Binding;

/// How often lapsed entries are dropped, at most.
const PRUNE_EVERY_MS: u64 = 30_000;

#[derive(Debug)]
struct Refresh {
    /// The `expires_at_ms` of the stored binding this refresh amends.
    stored_expiry_ms: u64,
    /// The refresh's Call-ID, hashed as [`UnwrittenRefreshes::key`] hashes.
    call_id: u64,
    cseq: u32,
}

#[derive(Debug, Default)]
struct Entries {
    /// Keyed by a hash of (AOR, contact) under a per-process random key, so a phone
    /// cannot aim its bindings at another's entry.
    by_binding: HashMap<u64, Refresh>,
    pruned_at_ms: u64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct UnwrittenRefreshes {
    keys: RandomState,
    entries: Mutex<Entries>,
}

impl UnwrittenRefreshes {
    fn key(&self, aor: &str, contact: &str) -> u64 {
        self.keys.hash_one((aor, contact))
    }

    fn call_id_hash(&self, call_id: &str) -> u64 {
        self.keys.hash_one(call_id)
    }

    /// Remembers that `refreshed` (a stored binding with the refresh's Call-ID and CSeq)
    /// was answered without being written.
    pub fn note(&self, refreshed: &Binding, now_ms: u64) {
        let key = self.key(&refreshed.aor, &refreshed.contact);
        let mut entries = self.entries.lock().expect("refresh entries");
        if now_ms.saturating_sub(entries.pruned_at_ms) >= PRUNE_EVERY_MS {
            entries
                .by_binding
                .retain(|_, r| r.stored_expiry_ms > now_ms);
            entries.pruned_at_ms = now_ms;
        }
        entries.by_binding.insert(
            key,
            Refresh {
                stored_expiry_ms: refreshed.expires_at_ms,
                call_id: self.call_id_hash(&refreshed.call_id),
                cseq: refreshed.cseq,
            },
        );
    }

    /// `bindings` with the CSeq of the unwritten refreshes that amend them, and their
    /// Call-ID if it is one of `call_ids` (the Call-IDs of the requests about to be planned
    /// against them), else an empty one.
    pub fn apply(&self, mut bindings: Vec<Binding>, call_ids: &[&str]) -> Vec<Binding> {
        let entries = self.entries.lock().expect("refresh entries");
        if entries.by_binding.is_empty() {
            return bindings;
        }
        for b in &mut bindings {
            if let Some(r) = entries.by_binding.get(&self.key(&b.aor, &b.contact)) {
                if r.stored_expiry_ms == b.expires_at_ms {
                    b.call_id = call_ids
                        .iter()
                        .find(|c| self.call_id_hash(c) == r.call_id)
                        .map_or_else(String::new, |c| (*c).to_owned());
                    b.cseq = r.cseq;
                }
            }
        }
        bindings
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries
            .lock()
            .expect("refresh entries")
            .by_binding
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_raft_store::command::StoredFlow;

    fn binding(contact: &str, expires_at_ms: u64, call_id: &str, cseq: u32) -> Binding {
        Binding {
            aor: "sip:alice@example.com".into(),
            contact: contact.into(),
            expires_at_ms,
            expires_secs: 600,
            edge_node: 1,
            flow: StoredFlow {
                transport: "UDP".into(),
                remote: "192.0.2.10:5060".into(),
                local: "127.0.0.1:5060".into(),
                connection: None,
            },
            path: vec![],
            call_id: call_id.into(),
            cseq,
            q: 1000,
            user_agent: String::new(),
        }
    }

    #[test]
    fn a_refresh_amends_only_the_stored_binding_it_was_answered_against() {
        let refreshes = UnwrittenRefreshes::default();
        let stored = binding("sip:a@h", 5_000, "call-1", 1);
        refreshes.note(&binding("sip:a@h", 5_000, "call-2", 7), 1_000);
        let both = vec![stored.clone(), binding("sip:b@h", 5_000, "x", 1)];
        let seen = refreshes.apply(both.clone(), &["call-1", "call-2"]);
        assert_eq!((seen[0].call_id.as_str(), seen[0].cseq), ("call-2", 7));
        assert_eq!((seen[1].call_id.as_str(), seen[1].cseq), ("x", 1));
        // Asked about another Call-ID only (even the stored one), the refresh's is not it.
        let seen = refreshes.apply(both, &["call-1"]);
        assert_eq!((seen[0].call_id.as_str(), seen[0].cseq), ("", 7));
        assert_eq!((seen[1].call_id.as_str(), seen[1].cseq), ("x", 1));
        // Rewritten since (by any node): the stored values win.
        let rewritten = binding("sip:a@h", 9_000, "call-3", 1);
        assert_eq!(
            refreshes.apply(vec![rewritten.clone()], &["call-2"]),
            vec![rewritten]
        );
    }

    #[test]
    fn lapsed_entries_are_dropped() {
        let refreshes = UnwrittenRefreshes::default();
        refreshes.note(&binding("sip:a@h", 5_000, "call-2", 7), 1_000);
        refreshes.note(&binding("sip:b@h", 90_000, "call-2", 7), 2_000);
        assert_eq!(refreshes.len(), 2);
        refreshes.note(&binding("sip:c@h", 90_000, "call-2", 7), 40_000);
        assert_eq!(refreshes.len(), 2, "the lapsed sip:a@h entry is gone");
    }
}
