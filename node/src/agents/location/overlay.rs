//! The degraded-mode binding overlay (node/DESIGN.md, "Degraded mode"). Without a quorum a
//! node cannot write bindings through Raft, but a registration must never fail only because
//! the cluster is unhealthy. The registrar then keeps the writes here, answers the phone,
//! and reads its bindings through the overlay; once a quorum returns the overlay is
//! replayed through Raft, oldest first, and emptied.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tandem_raft_store::command::{Binding, Command};
use tandem_raft_store::replica::Replica;
use tokio_util::sync::CancellationToken;

/// How often the overlay tries to replay once the node is healthy again.
const REPLAY_EVERY: Duration = Duration::from_millis(500);

/// A pending binding change: a new value, or a removal.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pending {
    Put(Box<Binding>),
    Removed,
}

/// Binding writes held back while this node has no quorum, by (AOR, contact), in order.
#[derive(Debug, Default)]
pub struct BindingOverlay {
    pending: Mutex<BTreeMap<(String, String), (u64, Pending)>>,
    next: Mutex<u64>,
}

impl BindingOverlay {
    /// Holds a binding write back; only binding commands are accepted.
    pub fn hold(&self, command: &Command) -> bool {
        let (key, change) = match command {
            Command::PutBinding(b) => (
                (b.aor.clone(), b.contact.clone()),
                Pending::Put(Box::new(b.clone())),
            ),
            Command::RemoveBinding { aor, contact } => {
                ((aor.clone(), contact.clone()), Pending::Removed)
            }
            _ => return false,
        };
        let mut pending = self.pending.lock().expect("overlay lock");
        let mut next = self.next.lock().expect("overlay lock");
        *next += 1;
        pending.insert(key, (*next, change));
        true
    }

    /// Drops what is held for the binding `command` writes (after a direct write of it).
    pub fn forget(&self, command: &Command) {
        let mut pending = self.pending.lock().expect("overlay lock");
        match command {
            Command::PutBinding(b) => {
                pending.remove(&(b.aor.clone(), b.contact.clone()));
            }
            Command::RemoveBinding { aor, contact } => {
                pending.remove(&(aor.clone(), contact.clone()));
            }
            Command::RemoveAllBindings { aor } => pending.retain(|(a, _), _| a != aor),
            _ => {}
        }
    }

    pub fn len(&self) -> usize {
        self.pending.lock().expect("overlay lock").len()
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
        let pending = self.pending.lock().expect("overlay lock");
        if pending.is_empty() {
            return stored;
        }
        stored
            .into_iter()
            .filter(|b| !pending.contains_key(&(b.aor.clone(), b.contact.clone())))
            .collect()
    }

    fn held(&self, belongs: impl Fn(&Binding) -> bool) -> Vec<Binding> {
        let pending = self.pending.lock().expect("overlay lock");
        let mut out = Vec::new();
        for (_, change) in pending.values() {
            if let Pending::Put(b) = change {
                if belongs(b) {
                    out.push((**b).clone());
                }
            }
        }
        out
    }

    /// `stored` without the bindings held changes replace, plus the held new values that
    /// `belongs` to the same selection.
    fn merge(&self, stored: Vec<Binding>, belongs: impl Fn(&Binding) -> bool) -> Vec<Binding> {
        let mut out = self.without_held(stored);
        out.extend(self.held(belongs));
        out
    }

    /// Replays everything held back through Raft, oldest first. An entry changed again
    /// while its replay was in flight stays for the next round, and so does one whose
    /// write fails; the first error is returned after every entry was tried.
    pub async fn replay(&self, replica: &Replica) -> Result<usize, tandem_raft_store::Error> {
        let mut first_error = None;
        let mut entries: Vec<((String, String), (u64, Pending))> = self
            .pending
            .lock()
            .expect("overlay lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        entries.sort_by_key(|(_, (stamp, _))| *stamp);
        let mut done = 0;
        for ((aor, contact), (stamp, change)) in entries {
            let command = match change {
                Pending::Put(b) => Command::PutBinding(*b),
                Pending::Removed => Command::RemoveBinding {
                    aor: aor.clone(),
                    contact: contact.clone(),
                },
            };
            if let Err(e) = replica.propose(command).await {
                first_error.get_or_insert(e);
                continue;
            }
            let mut pending = self.pending.lock().expect("overlay lock");
            if pending
                .get(&(aor.clone(), contact.clone()))
                .map(|(s, _)| *s)
                == Some(stamp)
            {
                pending.remove(&(aor, contact));
            }
            done += 1;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
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

    #[test]
    fn held_changes_shadow_the_replica() {
        let o = BindingOverlay::default();
        let stored = vec![binding("sip:x@h", 1), binding("sip:y@h", 1)];
        assert!(o.hold(&Command::PutBinding(binding("sip:x@h", 2))));
        assert!(o.hold(&Command::RemoveBinding {
            aor: "sip:a@example.com".into(),
            contact: "sip:y@h".into()
        }));
        assert!(o.hold(&Command::PutBinding(binding("sip:z@h", 1))));
        assert!(!o.hold(&Command::Noop { payload: vec![] }));
        let seen = o.apply("sip:a@example.com", stored);
        let mut view: Vec<(String, u32)> =
            seen.iter().map(|b| (b.contact.clone(), b.cseq)).collect();
        view.sort();
        assert_eq!(view, vec![("sip:x@h".into(), 2), ("sip:z@h".into(), 1)]);
        assert_eq!(o.apply("sip:other@example.com", vec![]).len(), 0);
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn keepalives_see_held_bindings_of_their_edge_only() {
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
        assert!(o.hold(&Command::PutBinding(binding("sip:x@h", 2))));
        assert!(o.hold(&Command::RemoveBinding {
            aor: "sip:a@example.com".into(),
            contact: "sip:y@h".into()
        }));
        assert!(o.hold(&Command::PutBinding(binding("sip:z@h", 1))));
        let mut elsewhere = binding("sip:w@h", 1);
        elsewhere.edge_node = 2;
        assert!(o.hold(&Command::PutBinding(elsewhere)));
        let mut seen: Vec<(String, u32)> = for_edge(stored)
            .iter()
            .map(|b| (b.contact.clone(), b.cseq))
            .collect();
        seen.sort();
        assert_eq!(seen, vec![("sip:x@h".into(), 2), ("sip:z@h".into(), 1)]);
    }
}
