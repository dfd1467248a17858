//! The state machine applied directly: commands change records and indexes together,
//! conditional commands are refused when their condition fails, unknown commands stop
//! the state machine, snapshots carry exactly the state, and the state survives reopening.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use tandem_raft_store::command::{
    Account, ApiToken, Binding, Command, CommandResult, Customer, EncodedCommand, HeldBinding,
    JoinToken, Lease, ProviderAccount, ProviderLease, StoredFlow, MAX_JOIN_TOKENS,
};
use tandem_raft_store::crypto::Sealed;
use tandem_raft_store::state::REMOVALS_KEPT_MS;
use tandem_raft_store::state_machine::StateMachine;
use tandem_raft_store::types::{Entry, Request};

fn entry(index: u64, commands: Vec<Command>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request {
            commands: commands.iter().map(Command::encode).collect(),
        }),
    }
}

fn binding(aor: &str, contact: &str, edge: u64, expires_at_ms: u64) -> Binding {
    Binding {
        aor: aor.into(),
        contact: contact.into(),
        expires_at_ms,
        expires_secs: 60,
        edge_node: edge,
        flow: StoredFlow {
            transport: "UDP".into(),
            remote: "192.0.2.1:5060".into(),
            local: "127.0.0.1:5060".into(),
            connection: None,
        },
        path: vec![],
        call_id: "c".into(),
        cseq: 1,
        q: 1000,
        user_agent: "ua".into(),
    }
}

fn lease(provider: &str, owner: u64, epoch: u64) -> ProviderLease {
    ProviderLease {
        provider: provider.into(),
        owner,
        epoch,
        expires_at_ms: 1000,
    }
}

/// An enabled account of customer c1 without passwords.
fn account(user: &str, domain: &str) -> Account {
    Account {
        user: user.into(),
        domain: domain.into(),
        customer: "c1".into(),
        ha1: vec![],
        enabled: true,
        max_contacts: 5,
        max_concurrent_calls: 2,
    }
}

async fn apply(sm: &mut StateMachine, index: u64, commands: Vec<Command>) -> Vec<CommandResult> {
    let mut responses = sm.apply(vec![entry(index, commands)]).await.unwrap();
    responses.remove(0).results
}

/// Installs into `sm` a snapshot of another store that holds only what `commands` write.
async fn install_from_elsewhere(sm: &mut StateMachine, index: u64, commands: Vec<Command>) {
    let other_dir = tempfile::tempdir().unwrap();
    let (_log, mut other) = tandem_raft_store::open(other_dir.path()).unwrap();
    apply(&mut other, index, commands).await;
    let snapshot = other.build_snapshot().await.unwrap();
    sm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
}

#[tokio::test]
async fn bindings_and_their_edge_index_move_together() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let alice = "sip:alice@example.com";
    apply(
        &mut sm,
        1,
        vec![
            Command::PutBinding(binding(alice, "<sip:a@192.0.2.1>", 1, 100)),
            Command::PutBinding(binding(alice, "<sip:a@192.0.2.2>", 2, 200)),
            Command::PutBinding(binding(
                "sip:alice@example.com.evil",
                "<sip:x@192.0.2.3>",
                1,
                300,
            )),
        ],
    )
    .await;
    let reader = sm.reader();
    assert_eq!(
        reader.bindings(alice).unwrap().len(),
        2,
        "a longer AOR with the same prefix is not mixed in"
    );
    assert_eq!(reader.bindings_by_edge(1).unwrap().len(), 2);
    assert_eq!(reader.bindings_by_edge(2).unwrap().len(), 1);

    // Re-registering through another node moves the binding's index entry.
    apply(
        &mut sm,
        2,
        vec![Command::PutBinding(binding(
            alice,
            "<sip:a@192.0.2.1>",
            2,
            150,
        ))],
    )
    .await;
    assert_eq!(reader.bindings_by_edge(1).unwrap().len(), 1);
    assert_eq!(reader.bindings_by_edge(2).unwrap().len(), 2);

    // The sweep uses the "now" in the command, and removes index entries too.
    let r = apply(
        &mut sm,
        3,
        vec![Command::ExpireBindings {
            now_ms: 150,
            limit: 100,
        }],
    )
    .await;
    assert_eq!(r, vec![CommandResult::Removed(1)]);
    let left = reader.bindings(alice).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].contact, "<sip:a@192.0.2.2>");
    assert_eq!(reader.bindings_by_edge(2).unwrap().len(), 1);

    let r = apply(
        &mut sm,
        4,
        vec![Command::RemoveAllBindings { aor: alice.into() }],
    )
    .await;
    assert_eq!(r, vec![CommandResult::Removed(1)]);
    assert!(reader.bindings(alice).unwrap().is_empty());
    assert!(reader.bindings_by_edge(2).unwrap().is_empty());
}

/// Keepalives walk a node's bindings page by page: every binding of that edge once, in
/// pages no larger than asked, none of another edge, and pages stay in step across a write
/// made between them.
#[tokio::test]
async fn an_edges_bindings_are_read_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let mut commands: Vec<Command> = (0..7)
        .map(|i| Command::PutBinding(binding(&format!("sip:u{i}@x"), "<sip:c@h>", 2, 100)))
        .collect();
    commands.push(Command::PutBinding(binding("sip:z@x", "<sip:c@h>", 1, 100)));
    commands.push(Command::PutBinding(binding("sip:z@x", "<sip:d@h>", 3, 100)));
    apply(&mut sm, 1, commands).await;
    let reader = sm.reader();
    assert_eq!(reader.count_bindings_by_edge(2), 7);
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<Vec<u8>>, 0);
    loop {
        let (page, next) = reader
            .bindings_by_edge_page(2, after.as_deref(), 3)
            .unwrap();
        assert!(page.len() <= 3);
        pages += 1;
        if pages == 2 {
            // A binding added behind the cursor is left for the next round; one ahead of it is met.
            apply(
                &mut sm,
                2,
                vec![
                    Command::PutBinding(binding("sip:u0@x", "<sip:late@h>", 2, 100)),
                    Command::PutBinding(binding("sip:u9@x", "<sip:c@h>", 2, 100)),
                ],
            )
            .await;
        }
        seen.extend(page.into_iter().map(|b| (b.aor, b.contact, b.edge_node)));
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    let mut expected: Vec<(String, String, u64)> = (0..7)
        .chain([9])
        .map(|i| (format!("sip:u{i}@x"), "<sip:c@h>".to_owned(), 2))
        .collect();
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
    let (all, next) = reader.bindings_by_edge_page(2, None, 100).unwrap();
    assert_eq!((all.len(), next), (9, None));
}

#[tokio::test]
async fn writes_within_one_apply_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let aor = "sip:bob@example.com";
    let r = apply(
        &mut sm,
        1,
        vec![
            Command::PutBinding(binding(aor, "<sip:b@1>", 3, 10)),
            Command::PutBinding(binding(aor, "<sip:b@2>", 3, 10)),
            Command::RemoveAllBindings { aor: aor.into() },
        ],
    )
    .await;
    assert_eq!(r[2], CommandResult::Removed(2));
    assert!(sm.reader().bindings_by_edge(3).unwrap().is_empty());
}

/// A change `user@example.com` was answered for at `held_at_ms` without a quorum: a
/// binding written then (60 s granted, so stored to lapse 120 s later), or with
/// `put == false` the binding's removal.
fn held(user: &str, contact: &str, held_at_ms: u64, put: bool, now_ms: u64) -> Command {
    let aor = format!("sip:{user}@example.com");
    Command::ReplayHeldBinding {
        held: HeldBinding {
            user: user.into(),
            domain: "example.com".into(),
            aor: aor.clone(),
            contact: contact.into(),
            held_at_ms,
            binding: put.then(|| binding(&aor, contact, 1, held_at_ms + 120_000)),
        },
        now_ms,
    }
}

fn rejected(r: &CommandResult) -> bool {
    matches!(r, CommandResult::Rejected(_))
}

#[tokio::test]
async fn a_held_change_is_replayed_only_over_what_is_older_than_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let alice = "sip:alice@example.com";
    let mut carol = account("carol", "example.com");
    carol.enabled = false;
    let t = 1_000_000;
    let now = t + 60_000;
    apply(
        &mut sm,
        1,
        vec![
            Command::PutAccount(account("alice", "example.com")),
            Command::PutAccount(account("bob", "example.com")),
            Command::PutAccount(carol),
            // Written through another node after the hold at t (written at t + 1000)...
            Command::PutBinding(binding(alice, "<sip:newer>", 2, t + 1000 + 120_000)),
            // ... and before it (written at t - 1000).
            Command::PutBinding(binding(alice, "<sip:older>", 2, t - 1000 + 120_000)),
            // Removed after the hold, one binding and all of bob's.
            Command::RemoveBindingAt {
                aor: alice.into(),
                contact: "<sip:removed>".into(),
                at_ms: t + 1000,
            },
            Command::RemoveAllBindingsAt {
                aor: "sip:bob@example.com".into(),
                at_ms: t + 1000,
            },
        ],
    )
    .await;
    let r = apply(
        &mut sm,
        2,
        vec![
            held("alice", "<sip:new>", t, true, now),
            held("alice", "<sip:newer>", t, true, now),
            held("alice", "<sip:older>", t, true, now),
            held("alice", "<sip:removed>", t, true, now),
            held("alice", "<sip:removed>", t + 2000, true, now),
            held("bob", "<sip:any>", t, true, now),
            held("carol", "<sip:c>", t, true, now),
            held("dave", "<sip:d>", t, true, now),
            held("alice", "<sip:lapsed>", t, true, t + 120_000),
        ],
    )
    .await;
    assert_eq!(r[0], CommandResult::Done, "nothing was stored: {r:?}");
    assert!(rejected(&r[1]), "a newer write stays: {r:?}");
    assert_eq!(
        r[2],
        CommandResult::Done,
        "an older write is replaced: {r:?}"
    );
    assert!(rejected(&r[3]), "a later removal stays: {r:?}");
    assert_eq!(
        r[4],
        CommandResult::Done,
        "an earlier removal does not: {r:?}"
    );
    assert!(
        rejected(&r[5]),
        "a later removal of all the AOR's stays: {r:?}"
    );
    assert!(rejected(&r[6]), "a disabled account gets none: {r:?}");
    assert!(rejected(&r[7]), "a missing account gets none: {r:?}");
    assert!(rejected(&r[8]), "a lapsed binding is not revived: {r:?}");
    let reader = sm.reader();
    let stored: Vec<(String, u64)> = reader
        .bindings(alice)
        .unwrap()
        .into_iter()
        .map(|b| (b.written_at_ms(), b.contact))
        .map(|(at, contact)| (contact, at))
        .collect();
    assert_eq!(
        stored,
        vec![
            ("<sip:new>".into(), t),
            ("<sip:newer>".into(), t + 1000),
            ("<sip:older>".into(), t),
            ("<sip:removed>".into(), t + 2000),
        ]
    );
    for user in ["bob", "carol", "dave"] {
        let aor = format!("sip:{user}@example.com");
        assert!(reader.bindings(&aor).unwrap().is_empty(), "{user}");
    }

    // A held removal goes over an older write only, and is remembered as a removal.
    let r = apply(
        &mut sm,
        3,
        vec![
            held("alice", "<sip:newer>", t, false, now),
            held("alice", "<sip:older>", t + 10, false, now),
            held("alice", "<sip:older>", t + 5, true, now),
        ],
    )
    .await;
    assert!(rejected(&r[0]), "{r:?}");
    assert_eq!(r[1], CommandResult::Removed(1), "{r:?}");
    assert!(rejected(&r[2]), "{r:?}");
    assert_eq!(
        reader.removed_at(alice, "<sip:older>").unwrap(),
        Some(t + 10)
    );

    // Removal times are kept for REMOVALS_KEPT_MS, and the sweep then forgets them; a
    // change held that long ago is not replayed at all.
    let late = t + 10 + REMOVALS_KEPT_MS;
    apply(
        &mut sm,
        4,
        vec![Command::ExpireBindings {
            now_ms: late,
            limit: 1000,
        }],
    )
    .await;
    assert_eq!(reader.removed_at(alice, "<sip:older>").unwrap(), None);
    assert_eq!(
        reader.removed_at(alice, "<sip:removed>").unwrap(),
        Some(t + 1000),
        "removed later, so kept longer"
    );
    assert!(!reader.has_lapsed_bindings(late).unwrap());
    assert!(reader
        .has_lapsed_bindings(t + 1000 + REMOVALS_KEPT_MS)
        .unwrap());
    let r = apply(&mut sm, 5, vec![held("alice", "<sip:x>", t, true, late)]).await;
    assert!(rejected(&r[0]), "{r:?}");
}

#[tokio::test]
async fn leases_are_compare_and_set_on_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let acquire = |l: ProviderLease, expected_epoch| Command::AcquireLease {
        lease: l,
        expected_epoch,
    };
    let r = apply(
        &mut sm,
        1,
        vec![
            acquire(lease("trunk", 1, 1), 0),
            acquire(lease("trunk", 2, 2), 0),
            acquire(lease("trunk", 2, 2), 1),
        ],
    )
    .await;
    assert_eq!(r[0], CommandResult::Done);
    assert!(
        matches!(r[1], CommandResult::Rejected(_)),
        "stale expected epoch: {:?}",
        r[1]
    );
    assert_eq!(r[2], CommandResult::Done);
    let reader = sm.reader();
    assert_eq!(reader.lease("trunk").unwrap().unwrap().owner, 2);
    assert!(
        reader.leases_by_owner(1).unwrap().is_empty(),
        "the old owner's index entry is gone"
    );
    assert_eq!(reader.leases_by_owner(2).unwrap().len(), 1);
    let r = apply(
        &mut sm,
        2,
        vec![Command::ReleaseLease {
            provider: "trunk".into(),
            epoch: 1,
        }],
    )
    .await;
    assert!(matches!(r[0], CommandResult::Rejected(_)));
    let r = apply(
        &mut sm,
        3,
        vec![Command::ReleaseLease {
            provider: "trunk".into(),
            epoch: 2,
        }],
    )
    .await;
    assert_eq!(r[0], CommandResult::Done);
    assert!(reader.leases_by_owner(2).unwrap().is_empty());
}

fn provider_account(customer: &str, name: &str, enabled: bool) -> ProviderAccount {
    ProviderAccount {
        customer: customer.into(),
        name: name.into(),
        registrar: "provider.example".into(),
        transport: None,
        username: "u".into(),
        auth_username: None,
        password: Sealed {
            version: 1,
            key_id: 1,
            nonce: [0; 12],
            ciphertext: vec![1],
        },
        realm: None,
        expires_secs: 300,
        enabled,
        outbound_proxy: None,
        contact_user: None,
        inbound: None,
        ca_file: None,
        instance: "urn:uuid:1".into(),
    }
}

fn grant(provider: &str, owner: u64, epoch: u64, expected_epoch: u64) -> Command {
    Command::GrantLease {
        lease: Lease {
            provider: provider.into(),
            owner,
            epoch,
            expires_at_ms: 1000,
            releasing: false,
        },
        expected_epoch,
        lapsed_by_ms: 20_000,
    }
}

/// Provider leases: granted only for an enabled account, on the expected epoch, and over
/// an owned lease only once it has lapsed (its owner's renewals included); renewed by one
/// record per owner (never a releasing lease); handed over through "releasing", which
/// freezes the expiry; ended leases keep their epoch; gone with their account.
#[tokio::test]
async fn provider_leases_are_granted_renewed_and_handed_over_by_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let r = apply(
        &mut sm,
        1,
        vec![
            grant("c/a", 1, 1, 0),
            Command::PutProviderAccount(provider_account("c", "a", true)),
            Command::PutProviderAccount(provider_account("c", "b", true)),
            Command::PutProviderAccount(provider_account("c", "off", false)),
            grant("c/a", 1, 1, 0),
            grant("c/b", 2, 1, 0),
            grant("c/off", 2, 1, 0),
            grant("c/a", 2, 2, 0),
        ],
    )
    .await;
    assert!(matches!(r[0], CommandResult::Rejected(_)), "no account yet");
    assert_eq!(r[4], CommandResult::Done);
    assert_eq!(r[5], CommandResult::Done);
    assert!(matches!(r[6], CommandResult::Rejected(_)), "disabled");
    assert!(matches!(r[7], CommandResult::Rejected(_)), "stale epoch");
    let reader = sm.reader();
    assert_eq!(reader.provider_accounts().unwrap().len(), 3);
    assert_eq!(reader.provider_account("c/a").unwrap().unwrap().name, "a");
    assert_eq!(reader.provider_leases_of(1).unwrap().len(), 1);

    // Node 1 renews: its lease runs on, node 2's does not. A grant over node 1's lease
    // decided before the renewal (lapsed by 20 s, while it now runs to 50 s) is refused.
    let generation = reader.providers_generation();
    let r = apply(
        &mut sm,
        2,
        vec![
            Command::RenewLeases {
                owner: 1,
                expires_at_ms: 50_000,
            },
            Command::RenewLeases {
                owner: 1,
                expires_at_ms: 40_000,
            },
        ],
    )
    .await;
    assert_eq!(r, vec![CommandResult::Done; 2]);
    assert_eq!(
        reader.providers_generation(),
        generation,
        "renewals change no lease record"
    );
    let r = apply(&mut sm, 20, vec![grant("c/a", 2, 2, 1)]).await;
    assert!(matches!(r[0], CommandResult::Rejected(_)), "{:?}", r[0]);
    let a = reader.provider_lease("c/a").unwrap().unwrap();
    assert_eq!(
        (a.owner, a.expires_at_ms),
        (1, 50_000),
        "renewals never go back"
    );
    assert_eq!(
        reader.provider_lease("c/b").unwrap().unwrap().expires_at_ms,
        1000
    );
    // Node 2's lapsed lease may be granted elsewhere.
    let r = apply(&mut sm, 21, vec![grant("c/b", 1, 2, 1)]).await;
    assert_eq!(r[0], CommandResult::Done);
    assert!(reader.providers_generation() > generation);

    // Hand-over: releasing freezes the expiry (renewals no longer extend it); the owner
    // drops it; the next grant moves it.
    let r = apply(
        &mut sm,
        22,
        vec![
            Command::ReleaseLeaseAsked {
                provider: "c/a".into(),
                epoch: 1,
            },
            Command::RenewLeases {
                owner: 1,
                expires_at_ms: 90_000,
            },
            Command::DropLease {
                provider: "c/a".into(),
                epoch: 0,
            },
        ],
    )
    .await;
    assert_eq!(r[0], CommandResult::Done);
    assert!(matches!(r[2], CommandResult::Rejected(_)));
    let a = reader.provider_lease("c/a").unwrap().unwrap();
    assert!(a.releasing);
    assert_eq!(a.expires_at_ms, 50_000, "a releasing lease is not renewed");
    let r = apply(
        &mut sm,
        23,
        vec![
            Command::DropLease {
                provider: "c/a".into(),
                epoch: 1,
            },
            grant("c/a", 2, 1, 1),
            grant("c/a", 2, 2, 1),
            Command::DeleteProviderAccount { id: "c/b".into() },
        ],
    )
    .await;
    assert!(
        matches!(r[1], CommandResult::Rejected(_)),
        "an ended lease keeps its epoch"
    );
    assert_eq!(
        [&r[0], &r[2], &r[3]],
        [
            &CommandResult::Done,
            &CommandResult::Done,
            &CommandResult::Done
        ]
    );
    assert!(
        reader.provider_leases_of(1).unwrap().is_empty(),
        "c/b's lease went with it"
    );
    let of_2: Vec<_> = reader
        .provider_leases_of(2)
        .unwrap()
        .into_iter()
        .map(|l| (l.provider, l.epoch))
        .collect();
    assert_eq!(of_2, vec![("c/a".to_owned(), 2)]);
    assert!(reader.provider_account("c/b").unwrap().is_none());
}

#[tokio::test]
async fn an_unknown_command_stops_apply_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let mut e = entry(1, vec![Command::SetFeatureVersion { version: 1 }]);
    if let EntryPayload::Normal(r) = &mut e.payload {
        r.commands.push(EncodedCommand {
            kind: 4242,
            version: 1,
            body: Default::default(),
        });
    }
    let err = sm.apply(vec![e]).await.unwrap_err().to_string();
    assert!(err.contains("4242"), "{err}");
    assert_eq!(
        sm.reader().feature_version().unwrap(),
        0,
        "the batch was not written"
    );
    assert_eq!(sm.applied_state().await.unwrap().0, None);
}

#[tokio::test]
async fn a_snapshot_carries_exactly_the_state() {
    let src_dir = tempfile::tempdir().unwrap();
    let (_l1, mut src) = tandem_raft_store::open(src_dir.path()).unwrap();
    apply(
        &mut src,
        1,
        vec![
            Command::PutBinding(binding("sip:a@x", "<sip:a@1>", 1, 10)),
            Command::SetFeatureVersion { version: 3 },
        ],
    )
    .await;
    let snapshot = src.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id.unwrap().index, 1);

    let dst_dir = tempfile::tempdir().unwrap();
    let (_l2, mut dst) = tandem_raft_store::open(dst_dir.path()).unwrap();
    apply(
        &mut dst,
        1,
        vec![Command::PutBinding(binding(
            "sip:stale@x",
            "<sip:s@1>",
            9,
            10,
        ))],
    )
    .await;
    dst.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    let reader = dst.reader();
    assert_eq!(reader.feature_version().unwrap(), 3);
    assert_eq!(reader.bindings("sip:a@x").unwrap().len(), 1);
    assert!(
        reader.bindings("sip:stale@x").unwrap().is_empty(),
        "state not in the snapshot is gone"
    );
    assert!(reader.bindings_by_edge(9).unwrap().is_empty());
    // The index by expiry is not in the snapshot but is built for what it holds.
    assert!(
        !reader.has_lapsed_bindings(9).unwrap(),
        "the stale one's goes"
    );
    assert!(reader.has_lapsed_bindings(10).unwrap());
    assert_eq!(
        apply(
            &mut dst,
            2,
            vec![Command::ExpireBindings {
                now_ms: 10,
                limit: 10
            }]
        )
        .await,
        [CommandResult::Removed(1)]
    );
    assert_eq!(dst.applied_state().await.unwrap().0.unwrap().index, 2);
    let current = dst.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.snapshot_id, snapshot.meta.snapshot_id);
}

/// Opens the store in `dir`, waiting for the previous opening's flusher thread to let go.
async fn reopen(dir: &std::path::Path) -> (tandem_raft_store::log_store::LogStore, StateMachine) {
    loop {
        match tandem_raft_store::open(dir) {
            Ok(x) => break x,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// The bindings an older release's sweep removes: it scans every binding in key order and
/// removes lapsed ones until `limit` are gone. Keys are the AOR, a zero byte, the contact.
fn swept_by_a_full_scan(
    model: &std::collections::BTreeMap<(String, String), u64>,
    now_ms: u64,
    limit: usize,
) -> Vec<(String, String)> {
    let mut by_key: Vec<(Vec<u8>, &(String, String), u64)> = model
        .iter()
        .map(|(k, &at)| ([k.0.as_bytes(), &[0], k.1.as_bytes()].concat(), k, at))
        .collect();
    by_key.sort();
    by_key
        .into_iter()
        .filter(|(_, _, at)| *at <= now_ms)
        .take(limit)
        .map(|(_, k, _)| k.clone())
        .collect()
}

/// The index by expiry is in memory; it is built when the store opens and when a snapshot
/// replaces the state, so the model goes on across a reopen (round 80) and onto another
/// store that installed a snapshot of this one (round 140).
#[tokio::test]
async fn the_sweep_removes_through_the_expiry_index_exactly_what_a_full_scan_would() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let mut model = std::collections::BTreeMap::new();
    let mut index = 0;
    for round in 0..200u64 {
        if round == 80 {
            drop((log, sm));
            (log, sm) = reopen(dir.path()).await;
        }
        if round == 140 {
            let snapshot = sm.build_snapshot().await.unwrap();
            let (other_log, mut other) = tandem_raft_store::open(other_dir.path()).unwrap();
            // Something of its own the snapshot replaces, lapsed and not.
            apply(
                &mut other,
                1,
                vec![
                    Command::PutBinding(binding("sip:a@x", "<sip:9>", 1, 0)),
                    Command::PutBinding(binding("sip:z@x", "<sip:9>", 1, u64::MAX)),
                ],
            )
            .await;
            other
                .install_snapshot(&snapshot.meta, snapshot.snapshot)
                .await
                .unwrap();
            (log, sm) = (other_log, other);
        }
        let reader = sm.reader();
        // A batch of registrations, refreshes (a new expiry for a contact already bound)
        // and removals, with AORs that are prefixes of each other ("a", "ab").
        let mut commands = Vec::new();
        for _ in 0..rng.gen_range(1..8) {
            let aor = ["sip:a@x", "sip:ab@x", "sip:b@x", "sip:c@y"][rng.gen_range(0..4)];
            let contact = format!("<sip:{}>", rng.gen_range(0..4));
            if rng.gen_bool(0.2) {
                model.remove(&(aor.to_owned(), contact.clone()));
                commands.push(Command::RemoveBinding {
                    aor: aor.into(),
                    contact,
                });
            } else {
                let at = round * 10 + rng.gen_range(0..300);
                model.insert((aor.to_owned(), contact.clone()), at);
                commands.push(Command::PutBinding(binding(aor, &contact, 1, at)));
            }
        }
        let now_ms = round * 10;
        let limit = rng.gen_range(1..4);
        let expected = swept_by_a_full_scan(&model, now_ms, limit);
        // The sweep shares the batch with the writes before it.
        commands.push(Command::ExpireBindings {
            now_ms,
            limit: limit as u32,
        });
        index += 1;
        let results = apply(&mut sm, index, commands).await;
        assert_eq!(
            results.last(),
            Some(&CommandResult::Removed(expected.len() as u64)),
            "round {round}"
        );
        for k in &expected {
            model.remove(k);
        }
        for at in [now_ms, now_ms + 50] {
            assert_eq!(
                reader.has_lapsed_bindings(at).unwrap(),
                model.values().any(|&e| e <= at),
                "round {round}, at {at}"
            );
        }
        let mut stored = Vec::new();
        for aor in ["sip:a@x", "sip:ab@x", "sip:b@x", "sip:c@y"] {
            for b in reader.bindings(aor).unwrap() {
                stored.push(((b.aor, b.contact), b.expires_at_ms));
            }
        }
        stored.sort();
        let wanted: Vec<_> = model.iter().map(|(k, &v)| (k.clone(), v)).collect();
        assert_eq!(stored, wanted, "round {round}");
    }
}

/// The number of bindings of each edge node, which metrics and keepalives read without a
/// scan, stays what a scan of the index by edge finds: through registrations that move a
/// binding from one edge to another, removals, sweeps, account deletions, a snapshot
/// installed elsewhere and a reopen.
#[tokio::test]
async fn each_edges_count_of_bindings_stays_what_a_scan_finds() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let (log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let agree = |reader: &tandem_raft_store::state::StateReader, when: &str| {
        for edge in 1..=3 {
            assert_eq!(
                reader.count_bindings_by_edge(edge),
                reader.bindings_by_edge(edge).unwrap().len() as u64,
                "edge {edge}, {when}"
            );
        }
    };
    apply(&mut sm, 1, vec![Command::PutAccount(account("d", "x"))]).await;
    for round in 0..150u64 {
        let mut commands = Vec::new();
        for _ in 0..rng.gen_range(1..6) {
            let aor = ["sip:a@x", "sip:ab@x", "sip:d@x"][rng.gen_range(0..3)];
            let contact = format!("<sip:{}>", rng.gen_range(0..3));
            commands.push(match rng.gen_range(0..10) {
                0 => Command::RemoveBinding {
                    aor: aor.into(),
                    contact,
                },
                1 => Command::RemoveAllBindings { aor: aor.into() },
                2 => Command::ExpireBindings {
                    now_ms: round * 10,
                    limit: 2,
                },
                3 => Command::PutAccount(account("d", "x")),
                _ => Command::PutBinding(binding(
                    aor,
                    &contact,
                    rng.gen_range(1..=3),
                    round * 10 + rng.gen_range(0..100),
                )),
            });
        }
        apply(&mut sm, round + 2, commands).await;
        agree(&sm.reader(), &format!("round {round}"));
    }
    apply(
        &mut sm,
        200,
        vec![Command::DeleteAccount {
            user: "d".into(),
            domain: "x".into(),
        }],
    )
    .await;
    agree(&sm.reader(), "after the account was deleted");
    let snapshot = sm.build_snapshot().await.unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let (_l2, mut other) = tandem_raft_store::open(other_dir.path()).unwrap();
    apply(
        &mut other,
        1,
        vec![Command::PutBinding(binding("sip:z@x", "<sip:9>", 2, 5))],
    )
    .await;
    other
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    agree(&other.reader(), "after a snapshot was installed");
    let before: Vec<u64> = (1..=3)
        .map(|e| sm.reader().count_bindings_by_edge(e))
        .collect();
    assert!(
        before.iter().sum::<u64>() > 0,
        "the test left some bindings"
    );
    drop((log, sm));
    let (_log, sm) = reopen(dir.path()).await;
    agree(&sm.reader(), "after reopening");
    let after: Vec<u64> = (1..=3)
        .map(|e| sm.reader().count_bindings_by_edge(e))
        .collect();
    assert_eq!(before, after);
}

/// Releases before the index of bindings by expiry moved to memory kept it in RocksDB
/// (tag `E`: expiry, AOR and contact), with a note of the `last_applied` it was complete
/// at. A node opening such a data dir deletes both, so that that release, run on it again,
/// builds its index afresh instead of trusting one that missed every write since; and the
/// sweep goes by the bindings, not by whatever entries the old index held.
#[tokio::test]
async fn a_data_dir_with_an_older_releases_expiry_index_is_swept_by_the_bindings() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
        apply(
            &mut sm,
            1,
            vec![
                Command::PutBinding(binding("sip:a@x", "<sip:1>", 1, 100)),
                Command::PutBinding(binding("sip:b@x", "<sip:2>", 1, 900)),
            ],
        )
        .await;
    }
    let db_dir = dir.path().join("db");
    let cfs = ["meta", "logs", "sm_data", "sm_meta"];
    let old_entry = |at: u64, aor: &str, contact: &str| {
        [
            &[b'E'][..],
            &at.to_be_bytes(),
            &[0],
            aor.as_bytes(),
            &[0],
            contact.as_bytes(),
        ]
        .concat()
    };
    // What an older release leaves: an entry per binding, one for a binding gone since
    // and one giving b's binding an expiry it no longer has, and the note. The flusher
    // thread lets the database go once it notices its channel closed.
    loop {
        match rocksdb::DB::open_cf(&rocksdb::Options::default(), &db_dir, cfs) {
            Ok(db) => {
                let data = db.cf_handle("sm_data").unwrap();
                for (at, aor, contact) in [
                    (100, "sip:a@x", "<sip:1>"),
                    (900, "sip:b@x", "<sip:2>"),
                    (50, "sip:gone@x", "<sip:3>"),
                    (60, "sip:b@x", "<sip:2>"),
                ] {
                    db.put_cf(data, old_entry(at, aor, contact), []).unwrap();
                }
                let meta = db.cf_handle("sm_meta").unwrap();
                let applied = db.get_cf(meta, b"last_applied").unwrap().unwrap();
                db.put_cf(meta, b"expiry_index", applied).unwrap();
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let (log, mut sm) = reopen(dir.path()).await;
    let reader = sm.reader();
    assert!(reader.has_lapsed_bindings(100).unwrap());
    assert!(!reader.has_lapsed_bindings(99).unwrap());
    assert_eq!(
        apply(
            &mut sm,
            2,
            vec![Command::ExpireBindings {
                now_ms: 500,
                limit: 10
            }]
        )
        .await,
        [CommandResult::Removed(1)]
    );
    assert_eq!(reader.bindings("sip:b@x").unwrap().len(), 1);
    assert!(reader.bindings("sip:a@x").unwrap().is_empty());
    drop((log, sm, reader));
    loop {
        match rocksdb::DB::open_cf(&rocksdb::Options::default(), &db_dir, cfs) {
            Ok(db) => {
                let data = db.cf_handle("sm_data").unwrap();
                let left: Vec<Vec<u8>> = db
                    .iterator_cf(data, rocksdb::IteratorMode::Start)
                    .map(|i| i.unwrap().0.to_vec())
                    .filter(|k| k[0] == b'E')
                    .collect();
                assert!(left.is_empty(), "index entries left on disk: {left:?}");
                let meta = db.cf_handle("sm_meta").unwrap();
                assert_eq!(db.get_cf(meta, b"expiry_index").unwrap(), None);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
        apply(&mut sm, 7, vec![Command::SetFeatureVersion { version: 5 }]).await;
    }
    // The flusher thread holds the database until it notices its channel closed.
    let (_log, mut sm) = reopen(dir.path()).await;
    assert_eq!(sm.reader().feature_version().unwrap(), 5);
    assert_eq!(sm.applied_state().await.unwrap().0.unwrap().index, 7);
}

#[tokio::test]
async fn api_tokens_are_revoked_alone_or_with_their_customer() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let token = |id: &str, customer: &str| ApiToken {
        id: id.into(),
        customer: customer.into(),
        label: String::new(),
        secret_sha256: [1; 32],
        created_at_ms: 5,
    };
    let customer = |id: &str| {
        Command::PutCustomer(Customer {
            id: id.into(),
            name: id.into(),
            enabled: true,
        })
    };
    let made = apply(
        &mut sm,
        1,
        vec![
            Command::PutApiToken(token("n1", "acme")),
            customer("acme"),
            customer("globex"),
            Command::PutApiToken(token("a1", "acme")),
            Command::PutApiToken(token("a2", "acme")),
            Command::PutApiToken(token("g1", "globex")),
        ],
    )
    .await;
    assert!(
        matches!(&made[0], CommandResult::Rejected(why) if why.contains("no customer")),
        "a token for a customer that does not exist was stored: {made:?}"
    );
    let reader = sm.reader();
    assert_eq!(reader.api_token("n1").unwrap(), None);
    assert_eq!(reader.api_token("a1").unwrap(), Some(token("a1", "acme")));
    let revoked = apply(
        &mut sm,
        2,
        vec![
            Command::RevokeApiToken { id: "a1".into() },
            Command::RevokeApiToken { id: "a1".into() },
        ],
    )
    .await;
    assert_eq!(
        revoked,
        vec![CommandResult::Removed(1), CommandResult::Removed(0)]
    );
    assert_eq!(reader.api_token("a1").unwrap(), None);
    // Deleting a customer takes its tokens, in the same batch as one made just before.
    apply(
        &mut sm,
        3,
        vec![
            Command::PutApiToken(token("a3", "acme")),
            Command::DeleteCustomer { id: "acme".into() },
        ],
    )
    .await;
    let left: Vec<String> = reader
        .api_tokens()
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(left, vec!["g1".to_owned()]);
}

#[tokio::test]
async fn deleting_or_disabling_an_account_removes_its_bindings_in_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let account = |user: &str, enabled: bool| Account {
        enabled,
        ..account(user, "example.com")
    };
    apply(
        &mut sm,
        1,
        vec![
            Command::PutAccount(account("alice", true)),
            Command::PutAccount(account("bob", true)),
            Command::PutBinding(binding("sip:alice@example.com", "<sip:a@1>", 1, 100)),
            Command::PutBinding(binding("sip:bob@example.com", "<sip:b@1>", 1, 100)),
            Command::PutBinding(binding("sip:bob@example.com", "<sip:b@2>", 2, 100)),
        ],
    )
    .await;
    let reader = sm.reader();
    apply(
        &mut sm,
        2,
        vec![Command::DeleteAccount {
            user: "alice".into(),
            domain: "example.com".into(),
        }],
    )
    .await;
    assert!(reader.bindings("sip:alice@example.com").unwrap().is_empty());
    assert_eq!(reader.bindings("sip:bob@example.com").unwrap().len(), 2);
    apply(&mut sm, 3, vec![Command::PutAccount(account("bob", false))]).await;
    assert!(reader.bindings("sip:bob@example.com").unwrap().is_empty());
    assert!(
        reader.bindings_by_edge(1).unwrap().is_empty(),
        "the edge index went too"
    );
    assert!(reader.bindings_by_edge(2).unwrap().is_empty());
}

#[tokio::test]
async fn served_domains_follow_account_changes_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let reader = sm.reader();
    // Asked before and after each change: a remembered answer must not outlive it.
    assert!(!reader.serves_domain("a.example").unwrap());
    apply(
        &mut sm,
        1,
        vec![Command::PutAccount(account("u1", "a.example"))],
    )
    .await;
    assert!(reader.serves_domain("a.example").unwrap());
    assert!(!reader.serves_domain("b.example").unwrap());
    apply(
        &mut sm,
        2,
        vec![Command::PutAccount(account("u2", "b.example"))],
    )
    .await;
    assert!(reader.serves_domain("b.example").unwrap());
    apply(
        &mut sm,
        3,
        vec![Command::DeleteAccount {
            user: "u1".into(),
            domain: "a.example".into(),
        }],
    )
    .await;
    assert!(!reader.serves_domain("a.example").unwrap());
    assert!(reader.serves_domain("b.example").unwrap());

    // A snapshot replaces the accounts wholesale.
    assert!(!reader.serves_domain("c.example").unwrap());
    install_from_elsewhere(
        &mut sm,
        4,
        vec![Command::PutAccount(account("u3", "c.example"))],
    )
    .await;
    assert!(reader.serves_domain("c.example").unwrap());
    assert!(!reader.serves_domain("b.example").unwrap());
}

/// Bindings are read on every REGISTER and call and kept between writes. Each kind of
/// write, and a snapshot, must show at the next read: every AOR here is read before and
/// after every change, so a kept answer that outlives its write fails the test.
#[tokio::test]
async fn kept_bindings_follow_every_write_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let reader = sm.reader();
    let (a, longer, b) = ("sip:a@x", "sip:a@x.evil", "sip:b@x");
    let contacts = |aor: &str| -> Vec<String> {
        let mut c: Vec<String> = reader
            .bindings(aor)
            .unwrap()
            .into_iter()
            .map(|b| b.contact)
            .collect();
        c.sort();
        c
    };
    let read_all = || (contacts(a), contacts(longer), contacts(b));
    assert_eq!(read_all(), (vec![], vec![], vec![]));

    apply(
        &mut sm,
        1,
        vec![
            Command::PutBinding(binding(a, "<sip:1>", 1, 100)),
            Command::PutBinding(binding(longer, "<sip:9>", 1, 100)),
        ],
    )
    .await;
    assert_eq!(contacts(a), ["<sip:1>"]);
    assert_eq!(contacts(longer), ["<sip:9>"]);
    assert!(contacts(b).is_empty());

    // A second contact, and a changed one: the kept list must be read again.
    let mut moved = binding(a, "<sip:1>", 2, 500);
    moved.cseq = 7;
    apply(
        &mut sm,
        2,
        vec![
            Command::PutBinding(binding(a, "<sip:2>", 1, 200)),
            Command::PutBinding(moved),
        ],
    )
    .await;
    assert_eq!(contacts(a), ["<sip:1>", "<sip:2>"]);
    let first = reader
        .bindings(a)
        .unwrap()
        .into_iter()
        .find(|b| b.contact == "<sip:1>")
        .unwrap();
    assert_eq!((first.cseq, first.edge_node), (7, 2));
    assert_eq!(contacts(longer), ["<sip:9>"], "a longer AOR kept apart");

    apply(
        &mut sm,
        3,
        vec![Command::RemoveBinding {
            aor: a.into(),
            contact: "<sip:2>".into(),
        }],
    )
    .await;
    assert_eq!(contacts(a), ["<sip:1>"]);

    // The sweep names no AOR; it removes what has lapsed.
    apply(
        &mut sm,
        4,
        vec![
            Command::PutBinding(binding(b, "<sip:3>", 1, 50)),
            Command::ExpireBindings {
                now_ms: 150,
                limit: 100,
            },
        ],
    )
    .await;
    assert_eq!(read_all(), (vec!["<sip:1>".into()], vec![], vec![]));

    apply(
        &mut sm,
        5,
        vec![Command::RemoveAllBindings { aor: a.into() }],
    )
    .await;
    assert_eq!(read_all(), (vec![], vec![], vec![]));

    apply(
        &mut sm,
        6,
        vec![Command::PutBinding(binding(b, "<sip:4>", 1, 900))],
    )
    .await;
    assert_eq!(contacts(b), ["<sip:4>"]);

    // A snapshot replaces everything.
    install_from_elsewhere(
        &mut sm,
        7,
        vec![Command::PutBinding(binding(a, "<sip:5>", 1, 900))],
    )
    .await;
    assert_eq!(read_all(), (vec!["<sip:5>".into()], vec![], vec![]));
}

/// Every AOR's bindings as RocksDB holds them, read through the index by edge (which
/// reads the records themselves, not the location table), sorted by contact.
fn stored_bindings(
    reader: &tandem_raft_store::state::StateReader,
) -> std::collections::BTreeMap<String, Vec<Binding>> {
    let mut all = std::collections::BTreeMap::<String, Vec<Binding>>::new();
    for edge in 1..=3 {
        for b in reader.bindings_by_edge(edge).unwrap() {
            all.entry(b.aor.clone()).or_default().push(b);
        }
    }
    for bindings in all.values_mut() {
        bindings.sort_by(|a, b| a.contact.cmp(&b.contact));
    }
    all
}

/// The location table answers every read of an AOR's bindings from memory, so it must
/// hold exactly what RocksDB holds after every kind of write, several to one AOR in one
/// apply, a snapshot, and a reopening (which loads it afresh from RocksDB).
#[tokio::test]
async fn the_location_table_holds_what_rocksdb_holds_after_every_write() {
    use rand::{Rng, SeedableRng};
    let aors = ["sip:a@x", "sip:a@x.evil", "sip:b@x", "sip:c@y", "sip:d@y"];
    let contacts = ["<sip:1>", "<sip:2>", "<sip:10>", "<sip:3;ob>"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let mut index = 0;
    for round in 0..400 {
        let commands: Vec<Command> = (0..rng.gen_range(1..=4))
            .map(|_| {
                let aor = aors[rng.gen_range(0..aors.len())];
                let contact = contacts[rng.gen_range(0..contacts.len())];
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let mut b =
                            binding(aor, contact, rng.gen_range(1..=3), rng.gen_range(100..1000));
                        b.cseq = rng.gen_range(1..1000);
                        Command::PutBinding(b)
                    }
                    6 | 7 => Command::RemoveBinding {
                        aor: aor.into(),
                        contact: contact.into(),
                    },
                    8 => Command::RemoveAllBindings { aor: aor.into() },
                    _ => Command::ExpireBindings {
                        now_ms: rng.gen_range(0..600),
                        limit: rng.gen_range(1..4),
                    },
                }
            })
            .collect();
        index += 1;
        apply(&mut sm, index, commands).await;
        let reader = sm.reader();
        let stored = stored_bindings(&reader);
        for aor in aors {
            let expected = stored.get(aor).cloned().unwrap_or_default();
            assert_eq!(
                reader.bindings(aor).unwrap(),
                expected,
                "{aor} after round {round}"
            );
            for contact in contacts {
                assert_eq!(
                    reader.binding(aor, contact).unwrap().as_ref(),
                    expected.iter().find(|b| b.contact == contact),
                    "{aor} {contact} after round {round}"
                );
            }
        }
        drop(reader);
        if round % 100 == 99 {
            drop((log, sm));
            (log, sm) = reopen(dir.path()).await;
            let reader = sm.reader();
            for aor in aors {
                assert_eq!(
                    reader.bindings(aor).unwrap(),
                    stored.get(aor).cloned().unwrap_or_default(),
                    "{aor} after reopening"
                );
            }
        }
    }
    // A snapshot from another store replaces the whole table.
    install_from_elsewhere(
        &mut sm,
        1,
        vec![Command::PutBinding(binding("sip:z@x", "<sip:5>", 2, 900))],
    )
    .await;
    let reader = sm.reader();
    for aor in aors {
        assert!(reader.bindings(aor).unwrap().is_empty(), "{aor}");
    }
    assert_eq!(reader.bindings("sip:z@x").unwrap().len(), 1);
    drop(log);
}

#[tokio::test]
async fn a_join_token_admits_one_node_once_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = tandem_raft_store::open(dir.path()).unwrap();
    let token = |id: &str, node: Option<u64>, expires_at_ms: u64| JoinToken {
        id: id.into(),
        secret_sha256: [2; 32],
        node,
        created_at_ms: 1,
        expires_at_ms,
        used_by: 0,
    };
    let put = |t: JoinToken, now_ms: u64| Command::PutJoinToken { token: t, now_ms };
    let using = |id: &str, node: u64, now_ms: u64| Command::UseJoinToken {
        id: id.into(),
        node,
        now_ms,
    };
    let rejected = |r: &CommandResult, why: &str| {
        assert!(
            matches!(r, CommandResult::Rejected(w) if w.contains(why)),
            "wanted a refusal for {why:?}: {r:?}"
        )
    };
    let r = apply(
        &mut sm,
        1,
        vec![
            put(token("any", None, 100), 10),
            put(token("for4", Some(4), 100), 10),
            put(token("short", None, 20), 10),
            // Node 3 uses "any"; node 5 cannot use it after; node 3 again may (a repeat).
            using("any", 3, 15),
            using("any", 5, 16),
            using("any", 3, 17),
            using("for4", 3, 15),
            // Expiry by the entry's clock.
            using("short", 6, 20),
            using("missing", 6, 15),
            Command::RevokeJoinToken { id: "for4".into() },
            using("for4", 4, 15),
            // A second put of an id (a replay) does not reset its use.
            put(token("any", None, 100), 18),
        ],
    )
    .await;
    assert_eq!(
        r[..4],
        [
            CommandResult::Done,
            CommandResult::Done,
            CommandResult::Done,
            CommandResult::Done
        ]
    );
    rejected(&r[4], "used by node 3");
    assert_eq!(r[5], CommandResult::Done);
    rejected(&r[6], "admits node 4, not node 3");
    rejected(&r[7], "expired");
    rejected(&r[8], "revoked");
    assert_eq!(r[9], CommandResult::Removed(1));
    rejected(&r[10], "revoked");
    rejected(&r[11], "exists");
    let reader = sm.reader();
    assert_eq!(reader.join_token("any").unwrap().unwrap().used_by, 3);
    assert_eq!(reader.join_token("short").unwrap().unwrap().used_by, 0);

    // A later put removes every expired token (used or not), by its own clock, and the
    // cluster holds at most MAX_JOIN_TOKENS unexpired ones.
    let mut many: Vec<Command> = (0..MAX_JOIN_TOKENS)
        .map(|i| put(token(&format!("m{i:03}"), None, 1_000), 200))
        .collect();
    many.push(put(token("over", None, 1_000), 200));
    let r = apply(&mut sm, 2, many).await;
    assert!(
        r[..MAX_JOIN_TOKENS]
            .iter()
            .all(|r| *r == CommandResult::Done),
        "{r:?}"
    );
    rejected(&r[MAX_JOIN_TOKENS], "the most it may");
    let ids: Vec<String> = sm
        .reader()
        .join_tokens()
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids.len(), MAX_JOIN_TOKENS, "{ids:?}");
    assert!(
        !ids.iter()
            .any(|id| ["any", "short", "over"].contains(&id.as_str())),
        "{ids:?}"
    );
}

#[tokio::test]
async fn the_commit_index_is_written_with_the_next_append_and_read_back_after_a_reopen() {
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
    let dir = tempfile::tempdir().unwrap();
    let id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
    {
        let (mut log, _sm) = tandem_raft_store::open(dir.path()).unwrap();
        log.blocking_append(vec![entry(1, vec![]), entry(2, vec![])])
            .await
            .unwrap();
        log.save_committed(Some(id(1))).await.unwrap();
        // Not written yet, but this store answers with it.
        assert_eq!(log.read_committed().await.unwrap(), Some(id(1)));
        log.blocking_append(vec![entry(3, vec![])]).await.unwrap();
        log.save_committed(Some(id(2))).await.unwrap();
    }
    // The first went to disk with the append after it; the second waits for the next
    // append, so a reopened store reads the first: a lower bound, which is all openraft
    // relies on.
    let (mut log, _sm) = reopen(dir.path()).await;
    assert_eq!(log.read_committed().await.unwrap(), Some(id(1)));
}
