//! Who registers which provider account: the leader's assignment of leases, sans-IO
//! (raft-store/DESIGN.md, "Provider leases"). [`assign`] reads the replicated state and
//! the leader's view of which nodes are up, and returns the commands that move it towards
//! one live lease per enabled account, spread evenly over the nodes that may own.
//!
//! - A node may own when it is a full node (witnesses own nothing) whose agent runs and
//!   is not draining, as the node itself answers when the leader asks.
//! - An account without a live lease is granted to the node with the fewest leases. A
//!   lease whose owner stopped renewing is granted elsewhere only once it has lapsed by
//!   the leader's clock plus a grace for clock skew: until then the old owner may still
//!   be registering.
//! - A live owner that should give a lease up (it drains, or holds more than its share) is
//!   asked to release it: it un-registers first, then drops the lease, and only then is
//!   the account granted elsewhere, so the provider never sees two owners' contacts.
//! - Rebalancing moves at most a tenth of the accounts per round, so a node that joins
//!   does not make every account re-register at once.

use std::collections::{BTreeMap, BTreeSet};

use tandem_raft_store::command::{Command, Lease, NodeRecord, ProviderAccount, Role};

use tandem_raft_store::command::NodeId;

/// The leader's view for one round.
pub struct View<'a> {
    pub now_ms: u64,
    pub nodes: &'a [NodeRecord],
    /// Nodes whose agent runs and takes leases (the leader included, if it is one).
    pub up: &'a BTreeSet<NodeId>,
    /// Nodes whose agent runs but drains: they hand their leases over.
    pub draining: &'a BTreeSet<NodeId>,
    pub accounts: &'a [ProviderAccount],
    pub leases: &'a [Lease],
    pub lease_ms: u64,
    /// How long after a lapse the leader waits before granting the account elsewhere.
    pub grace_ms: u64,
}

/// The commands of one round of assignment.
pub fn assign(v: &View<'_>) -> Vec<Command> {
    let eligible: BTreeSet<NodeId> = v
        .nodes
        .iter()
        .filter(|n| n.role == Role::Full && v.up.contains(&n.id))
        .map(|n| n.id)
        .collect();
    let leases: BTreeMap<&str, &Lease> =
        v.leases.iter().map(|l| (l.provider.as_str(), l)).collect();
    let live = |l: &Lease| l.owner != 0 && l.expires_at_ms > v.now_ms;
    let lapsed_long_enough =
        |l: &Lease| l.owner == 0 || l.expires_at_ms.saturating_add(v.grace_ms) <= v.now_ms;

    // Leases each eligible node holds and keeps (not releasing), and those this round
    // grants it.
    let mut load: BTreeMap<NodeId, Vec<&Lease>> =
        eligible.iter().map(|&n| (n, Vec::new())).collect();
    let mut granted: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut out = Vec::new();
    let mut unowned = Vec::new();
    for p in v.accounts.iter().filter(|p| p.enabled) {
        let id = p.id();
        match leases.get(id.as_str()) {
            Some(l) if live(l) => {
                if l.releasing {
                    continue;
                }
                match load.get_mut(&l.owner) {
                    Some(held) => held.push(l),
                    None if v.draining.contains(&l.owner) => out.push(Command::ReleaseLeaseAsked {
                        provider: id,
                        epoch: l.epoch,
                    }),
                    // Down, removed or a witness: it lapses, then moves.
                    None => {}
                }
            }
            Some(l) if !lapsed_long_enough(l) => {}
            other => unowned.push((id, other.copied())),
        }
    }
    if eligible.is_empty() {
        return out;
    }

    // Grants go to the least loaded node.
    for (id, old) in unowned {
        let (&node, _) = load
            .iter()
            .min_by_key(|(n, held)| (held.len() + granted.get(*n).copied().unwrap_or(0), **n))
            .expect("eligible is not empty");
        let expected_epoch = old.map_or(0, |l| l.epoch);
        out.push(Command::GrantLease {
            lease: Lease {
                provider: id,
                owner: node,
                epoch: (expected_epoch + 1).max(v.now_ms),
                expires_at_ms: v.now_ms + v.lease_ms,
                releasing: false,
            },
            expected_epoch,
            // Refused if the old owner renewed after this view was read.
            lapsed_by_ms: v.now_ms.saturating_sub(v.grace_ms),
        });
        *granted.entry(node).or_default() += 1;
    }

    // Rebalance: a node above its share gives up the excess of what it already held (never
    // what it was just granted), a tenth of all at most.
    let total: usize = load.values().map(Vec::len).sum::<usize>() + granted.values().sum::<usize>();
    let share = total.div_ceil(load.len());
    let mut budget = (total / 10).max(1);
    for held in load.values() {
        for l in held.iter().skip(share) {
            if budget == 0 {
                break;
            }
            budget -= 1;
            out.push(Command::ReleaseLeaseAsked {
                provider: l.provider.clone(),
                epoch: l.epoch,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_raft_store::command::ProviderTransport;
    use tandem_raft_store::crypto::Sealed;

    fn node(id: NodeId, role: Role) -> NodeRecord {
        NodeRecord {
            id,
            sip_addrs: vec![],
            raft_addr: String::new(),
            role,
            software_version: String::new(),
            draining: false,
        }
    }

    fn account(i: usize, enabled: bool) -> ProviderAccount {
        ProviderAccount {
            customer: "c".into(),
            name: format!("p{i:04}"),
            registrar: "127.0.0.1".into(),
            transport: Some(ProviderTransport::Udp),
            username: "u".into(),
            auth_username: None,
            password: Sealed {
                version: 1,
                key_id: 1,
                nonce: [0; 12],
                ciphertext: vec![],
            },
            realm: None,
            expires_secs: 600,
            enabled,
            outbound_proxy: None,
            contact_user: None,
            inbound: None,
            ca_file: None,
            instance: String::new(),
        }
    }

    /// Applies a round's commands to `leases` as the state machine would, with owners
    /// that release at once when asked.
    fn apply(leases: &mut BTreeMap<String, Lease>, commands: Vec<Command>) {
        for c in commands {
            match c {
                Command::GrantLease {
                    lease,
                    expected_epoch,
                    ..
                } => {
                    let current = leases.get(&lease.provider).map_or(0, |l| l.epoch);
                    assert_eq!(current, expected_epoch);
                    assert!(lease.epoch > current);
                    leases.insert(lease.provider.clone(), lease);
                }
                Command::ReleaseLeaseAsked { provider, epoch } => {
                    let l = leases.get_mut(&provider).unwrap();
                    assert_eq!(l.epoch, epoch);
                    l.owner = 0;
                    l.expires_at_ms = 0;
                }
                other => panic!("{other:?}"),
            }
        }
    }

    struct World {
        nodes: Vec<NodeRecord>,
        up: BTreeSet<NodeId>,
        draining: BTreeSet<NodeId>,
        accounts: Vec<ProviderAccount>,
        leases: BTreeMap<String, Lease>,
        now_ms: u64,
    }

    impl World {
        fn round(&mut self) -> usize {
            let leases: Vec<Lease> = self.leases.values().cloned().collect();
            let commands = assign(&View {
                now_ms: self.now_ms,
                nodes: &self.nodes,
                up: &self.up,
                draining: &self.draining,
                accounts: &self.accounts,
                leases: &leases,
                lease_ms: 30_000,
                grace_ms: 2_000,
            });
            let n = commands.len();
            apply(&mut self.leases, commands);
            // Every live owner renews.
            for l in self.leases.values_mut() {
                if l.owner != 0 && self.up.contains(&l.owner) && l.expires_at_ms > self.now_ms {
                    l.expires_at_ms = self.now_ms + 30_000;
                }
            }
            self.now_ms += 1_000;
            n
        }

        fn settle(&mut self) {
            for _ in 0..200 {
                if self.round() == 0 {
                    return;
                }
            }
            panic!("assignment never settled");
        }

        fn counts(&self) -> BTreeMap<NodeId, usize> {
            let mut c = BTreeMap::new();
            for l in self.leases.values() {
                if l.owner != 0 && l.expires_at_ms > self.now_ms {
                    *c.entry(l.owner).or_default() += 1;
                }
            }
            c
        }
    }

    fn within_20_percent(counts: &BTreeMap<NodeId, usize>, nodes: usize, total: usize) {
        assert_eq!(counts.len(), nodes, "{counts:?}");
        assert_eq!(counts.values().sum::<usize>(), total, "{counts:?}");
        let even = total as f64 / nodes as f64;
        for (n, c) in counts {
            assert!(
                (*c as f64 - even).abs() <= even * 0.2,
                "node {n} holds {c} of {total}: {counts:?}"
            );
        }
    }

    #[test]
    fn a_thousand_accounts_spread_evenly_and_again_after_a_node_leaves_and_rejoins() {
        let mut w = World {
            nodes: vec![
                node(1, Role::Full),
                node(2, Role::Full),
                node(3, Role::Full),
                node(4, Role::Witness),
            ],
            up: [1, 2, 3].into(),
            draining: BTreeSet::new(),
            accounts: (0..1000).map(|i| account(i, i % 100 != 0)).collect(),
            leases: BTreeMap::new(),
            now_ms: 1_000_000,
        };
        w.settle();
        within_20_percent(&w.counts(), 3, 990);
        assert!(!w.counts().contains_key(&4), "a witness owns nothing");
        w.up.insert(4);
        assert_eq!(w.round(), 0, "not even when it says it is up");

        // Node 3 dies: its leases move only after they lapse, then spread over 1 and 2.
        w.up.remove(&3);
        w.round();
        assert!(
            w.counts().get(&3).copied().unwrap_or(0) > 0,
            "a dead owner's leases stay until they lapse"
        );
        for _ in 0..40 {
            w.round();
        }
        within_20_percent(&w.counts(), 2, 990);

        // It comes back: rebalancing brings it to its share, a tenth at a time.
        w.up.insert(3);
        let moved = w.round();
        assert!(moved <= 99, "{moved}");
        w.settle();
        within_20_percent(&w.counts(), 3, 990);

        // Node 2 drains: it is asked to release everything, and others take over.
        w.up.remove(&2);
        w.draining.insert(2);
        w.settle();
        within_20_percent(&w.counts(), 2, 990);
        assert!(!w.counts().contains_key(&2));
    }

    #[test]
    fn a_lapsed_lease_moves_only_after_the_grace_and_with_a_higher_epoch() {
        let lease = Lease {
            provider: "c/p0001".into(),
            owner: 2,
            epoch: 7,
            expires_at_ms: 10_000,
            releasing: false,
        };
        let nodes = [node(1, Role::Full), node(2, Role::Full)];
        let up: BTreeSet<NodeId> = [1].into();
        let draining = BTreeSet::new();
        let accounts = [account(1, true)];
        let at = |now_ms| {
            assign(&View {
                now_ms,
                nodes: &nodes,
                up: &up,
                draining: &draining,
                accounts: &accounts,
                leases: std::slice::from_ref(&lease),
                lease_ms: 30_000,
                grace_ms: 2_000,
            })
        };
        assert!(at(9_000).is_empty(), "still live");
        assert!(at(11_000).is_empty(), "lapsed, but within the grace");
        match &at(12_000)[..] {
            [Command::GrantLease {
                lease: new,
                expected_epoch: 7,
                lapsed_by_ms: 10_000,
            }] => {
                assert_eq!(new.owner, 1);
                assert!(new.epoch > 7);
                assert_eq!(new.expires_at_ms, 42_000);
            }
            other => panic!("{other:?}"),
        }
    }
}
