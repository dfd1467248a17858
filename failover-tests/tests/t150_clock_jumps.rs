//! Scenario 9 of the HA proof (issue #19): clocks that jump. Every member runs under
//! libfaketime (Debian `faketime`, installed by `./ops/setup.sh`) with an offset file of its
//! own, so the test steps one node's wall clock while the node runs; the monotonic clock is
//! left alone, as a real step (NTP, a resumed VM) leaves it. What must hold: the leader's
//! sweep removes no binding that has not lapsed, a binding written through a node whose
//! clock is off lapses when it should, and digest nonces keep working.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tandem_failover_tests::cluster::{add_account, bindings, metric, Cluster, MemberRole};
use tandem_failover_tests::kamailio::{
    loopback_member, put_provider_accounts, registered_by_owners, Kamailio, RegisterLog,
    SHORT_LEASES,
};
use tandem_failover_tests::ua::Ua;
use tandem_failover_tests::{Deadline, Wait};

const WAIT: Duration = Duration::from_secs(30);
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn clock_file(root: &Path, id: u64) -> PathBuf {
    root.join(format!("clock-{id}"))
}

/// Sets member `id`'s clock offset (libfaketime's syntax: "+600" is ten minutes ahead).
fn set_clock(cluster: &Cluster, id: u64, offset: &str) {
    std::fs::write(clock_file(cluster.root(), id), offset).expect("write the clock file");
}

/// `user`'s binding as `node` has it: seconds left, from its `expires_in_secs`.
fn expires_in(cluster: &Cluster, token: &str, node: u64, user: &str) -> Option<i64> {
    let b: Value = bindings(cluster.member(node).admin_addr, token, user);
    b.as_array()?.first()?["expires_in_secs"].as_i64()
}

/// Registers a new phone of `user` through `node` for 120 s.
fn register(cluster: &Cluster, node: u64, user: &str) -> Ua {
    let mut ua = Ua::new("127.0.0.1", user, "example.com", &format!("pw-{user}"));
    let contact = format!("<{}>", ua.contact());
    let r = ua.register(
        cluster.member(node).sip_addr(),
        "MD5",
        Some(&contact),
        Some(120),
    );
    assert_eq!(r.status, 200, "{user} through node {node}: {}", r.text);
    ua
}

#[test]
fn a_clock_ten_minutes_off_either_way_changes_no_expiry_and_no_nonce() {
    assert!(
        Path::new(LIBFAKETIME).is_file(),
        "{LIBFAKETIME} is missing: run ./ops/setup.sh (Debian package faketime)"
    );
    let env = |root: &Path, id: u64| {
        std::fs::write(clock_file(root, id), "+0").expect("clock file");
        vec![
            ("LD_PRELOAD".to_owned(), LIBFAKETIME.to_owned()),
            (
                "FAKETIME_TIMESTAMP_FILE".to_owned(),
                clock_file(root, id).display().to_string(),
            ),
            // Read the file again every second; leave CLOCK_MONOTONIC alone.
            ("FAKETIME_CACHE_DURATION".to_owned(), "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        ]
    };
    let cluster = Cluster::form_env_each(&[MemberRole::Full; 3], SHORT_LEASES, &env);
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let token = token.trim();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        add_account(
            cluster.member(1).admin_addr,
            token,
            user,
            "example.com",
            &format!("pw-{user}"),
        );
    }
    // Every node knows the others answer: their clocks are sampled.
    cluster.wait_peers_up(WAIT);
    // Provider accounts at Kamailio: none may be registered from two nodes at once when
    // clocks step (a leader ten minutes ahead would think every lease lapsed).
    let kamailio = Kamailio::start();
    put_provider_accounts(&cluster, &kamailio, "acme", 6);
    let owners = Wait::new("every provider account registered once, by its owner", WAIT)
        .showing(&cluster)
        .until(|| registered_by_owners(&cluster, &kamailio, "acme", 6));
    let register_log = RegisterLog::watch(&kamailio, Deadline::after(Duration::ZERO));
    let (leader, _) = cluster.wait_for_leader(&[], WAIT);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let steady = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    // Phones registered for 120 s before any jump: each has less than ten minutes left.
    let _alice = register(&cluster, leader, "alice");
    let _bob = register(&cluster, follower, "bob");

    // The leader's clock jumps ten minutes ahead, a follower's ten minutes back.
    set_clock(&cluster, leader, "+600");
    set_clock(&cluster, follower, "-600");
    for id in [leader, follower] {
        Wait::new(format!("node {id} to keep to its peers' clock"), WAIT)
            .showing(&cluster)
            .until(|| {
                let c = metric(cluster.member(id).admin_addr, "tandem_clock_correction_ms");
                c.is_some_and(|c| (590_000.0..=610_000.0).contains(&c))
            });
    }
    // New registrations through both, with digest (nonces issued and checked on the
    // stepped clocks).
    let _carol = register(&cluster, leader, "carol");
    let _dave = register(&cluster, follower, "dave");
    // One of the leader's sweeps (every 10 s).
    std::thread::sleep(Duration::from_secs(11));
    let mut seen = Vec::new();
    for user in ["alice", "bob", "carol", "dave"] {
        let left = expires_in(&cluster, token, steady, user);
        seen.push(format!("{user} {left:?}"));
        assert!(
            left.is_some_and(|s| (60..=260).contains(&s)),
            "{user}'s binding on node {steady} after the jumps: {left:?} s left (registered \
             for 120 s, with up to one interval of headroom)"
        );
    }

    // And back: both clocks return to the right time.
    set_clock(&cluster, leader, "+0");
    set_clock(&cluster, follower, "+0");
    for id in [leader, follower] {
        Wait::new(format!("node {id} to need no correction again"), WAIT)
            .showing(&cluster)
            .until(|| {
                metric(cluster.member(id).admin_addr, "tandem_clock_correction_ms") == Some(0.0)
            });
    }
    let _erin = register(&cluster, leader, "erin");
    let _frank = register(&cluster, follower, "frank");
    std::thread::sleep(Duration::from_secs(11));
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let left = expires_in(&cluster, token, steady, user);
        seen.push(format!("{user} {left:?}"));
        assert!(
            left.is_some_and(|s| (40..=260).contains(&s)),
            "{user}'s binding on node {steady} after the clocks went back: {left:?} s left"
        );
    }
    // A lease judged lapsed on a stepped clock would show as an account registered from
    // a new owner while the old owner's registration stood.
    let held_twice = register_log.held_twice(loopback_member);
    assert!(
        held_twice.is_empty(),
        "held by two nodes at once: {held_twice:#?}"
    );
    let after = Wait::new("every provider account registered once, by its owner", WAIT)
        .showing(&cluster)
        .until(|| registered_by_owners(&cluster, &kamailio, "acme", 6));
    eprintln!(
        "SUMMARY clock jumps: leader {leader} +10 min, follower {follower} -10 min, then both \
         back; seconds left on node {steady}: {}; provider accounts: owners {owners:?} \
         before, {after:?} after, {} REGISTERs, none held by two nodes at once",
        seen.join(", "),
        register_log
            .registers()
            .iter()
            .filter(|r| r.expires.is_some())
            .count(),
    );
}
