//! Scenario 6 of the HA proof (issue #19): a rolling upgrade under calls, from `tandem` to
//! `tandem-next`, the next release (src/bin/tandem-next.rs: version `+next`, one more
//! cluster feature version, and that version's command kind, `/v1/cluster/note`).
//!
//! Phones find the cluster through DNS SRV and keep their flows alive with STUN
//! keepalives; a caller calls them every half second through a node that is not being
//! upgraded. Each node in turn, followers first: drain (its keepalives go unanswered, so
//! its phones register through another node), stop, start the other binary, catch up.
//! Before the last node is upgraded, one upgraded node is downgraded and upgraded again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tandem_failover_tests::cluster::{add_account, http, Cluster, MemberRole};
use tandem_failover_tests::dns::DnsServer;
use tandem_failover_tests::kamailio::{
    loopback_member, put_provider_accounts, registered_by_owners, Kamailio, RegisterLog,
    SHORT_LEASES,
};
use tandem_failover_tests::srv_phone::{SrvPhone, SrvPhoneConfig};
use tandem_failover_tests::ua::Ua;
use tandem_failover_tests::{tandem_next_bin, Deadline, SetOnDrop, Wait};

const WAIT: Duration = Duration::from_secs(30);

/// One call from alice to `user` through `via`: answered (and hung up) or not.
fn call_once(via: std::net::SocketAddr, user: &str, call_id: &str) -> Result<(), String> {
    let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice");
    let to = format!("sip:{user}@example.com");
    let r = alice
        .invite_within(via, &to, call_id, Duration::from_secs(5))
        .ok_or_else(|| format!("{call_id} via {via}: no final response within 5 s"))?;
    if r.status() != Some(200) {
        return Err(format!("{call_id} via {via}: {}", r.start_line()));
    }
    let dialog = alice.dialog(&r);
    alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
    alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
    let bye = alice.expect_response("BYE", Duration::from_secs(10));
    match bye.status() {
        Some(200) => Ok(()),
        _ => Err(format!("{call_id}: BYE answered {}", bye.start_line())),
    }
}

#[test]
fn a_rolling_upgrade_under_calls_fails_no_call_and_turns_the_new_command_on_last() {
    let next = tandem_next_bin();
    // Short leases, so that each drain hands its provider accounts over within seconds.
    let cluster = Cluster::form(
        &[MemberRole::Full; 3],
        &format!("\n[registrar]\nmin_expires = 20\n{SHORT_LEASES}"),
    );
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let token = token.trim();
    for user in ["alice", "bob", "carol"] {
        let admin = cluster.member(1).admin_addr;
        add_account(admin, token, user, "example.com", &format!("pw-{user}"));
    }
    let dns = DnsServer::start();
    for id in 1..=3 {
        let addr = cluster.member(id).sip_addr();
        let host = format!("node{id}.example.com");
        dns.add_srv("_sip._udp.example.com", 10, 10, addr.port(), &host);
        let std::net::IpAddr::V4(ip) = addr.ip() else {
            unreachable!("the harness binds IPv4 loopback")
        };
        dns.add_a(&host, ip);
    }
    // Every node knows the others answer, so it hands calls to a phone's edge node.
    cluster.wait_peers_up(WAIT);
    let clock = Deadline::after(Duration::ZERO);
    let phone = |user: &str| {
        SrvPhone::start(
            SrvPhoneConfig {
                keepalive: Some(Duration::from_secs(2)),
                nat: true,
                ..SrvPhoneConfig::new(user, "example.com", dns.addr())
            },
            clock,
        )
    };
    let (bob, carol) = (phone("bob"), phone("carol"));
    Wait::new("both phones to register", WAIT)
        .showing(&cluster)
        .until(|| bob.registered_via().is_some() && carol.registered_via().is_some());

    let note = |id: u64, text: &str| {
        cluster
            .member(id)
            .request(
                "PUT",
                "/v1/cluster/note",
                Some(&format!(r#"{{"text":"{text}"}}"#)),
            )
            .expect("the admin API answers")
    };
    let feature = |id: u64| {
        cluster
            .member(id)
            .status()
            .and_then(|s| s["feature_version"].as_u64())
    };
    // Six provider accounts at Kamailio, each registered by the node holding its lease.
    let kamailio = Kamailio::start();
    put_provider_accounts(&cluster, &kamailio, "acme", 6);
    let by_owners = || registered_by_owners(&cluster, &kamailio, "acme", 6);
    Wait::new("every provider account registered once, by its owner", WAIT)
        .showing(&cluster)
        .until(by_owners);
    let register_log = RegisterLog::watch(&kamailio, clock);
    let before = feature(1).expect("node 1 reports its feature version");
    let refused = note(1, "too early");
    assert_eq!(
        refused.status, 404,
        "this release has no note: {}",
        refused.body
    );

    // The caller: every half second, bob or carol, through the first node not being
    // upgraded (as a caller's own phone would be registered elsewhere).
    let upgrading = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let outcomes: Mutex<Vec<(Duration, Result<(), String>)>> = Mutex::default();
    let upgrade = |id: u64, binary: Option<std::path::PathBuf>| {
        let m = cluster.member(id);
        upgrading.store(id, Ordering::SeqCst);
        let drain = m.request("POST", "/v1/node/drain", None).expect("drain");
        assert!(drain.status < 300, "drain node {id}: {}", drain.body);
        // Its keepalives go unanswered: its phones move within a keepalive or two.
        let moved = Wait::new(format!("the phones to leave node {id}"), WAIT).poll(|| {
            [&bob, &carol]
                .iter()
                .all(|p| p.registered_via().is_some_and(|v| v != m.sip_addr()))
        });
        if moved.is_none() {
            cluster.panic_with_logs(&format!(
                "phones still on node {id}: bob {:?}, carol {:?}",
                bob.events(),
                carol.events()
            ));
        }
        Wait::new(format!("node {id} to drain"), WAIT)
            .showing(&cluster)
            .until(|| {
                m.request("GET", "/v1/node/drain", None)
                    .is_some_and(|a| a.json()["drained"] == true)
            });
        m.sigterm();
        m.wait_exit(WAIT)
            .unwrap_or_else(|| cluster.panic_with_logs(&format!("node {id} did not stop")));
        m.set_binary(binary);
        m.start();
        m.wait_healthy();
        cluster.wait_caught_up(id, WAIT);
        upgrading.store(0, Ordering::SeqCst);
    };
    let (leader, _) = cluster.wait_for_leader(&[], WAIT);
    let mut order: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    order.push(leader);
    let (first, second, last) = (order[0], order[1], order[2]);

    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let avoid = upgrading.load(Ordering::SeqCst);
                let via = (1..=3)
                    .find(|id| *id != avoid)
                    .map(|id| cluster.member(id).sip_addr())
                    .unwrap();
                let user = if n % 2 == 0 { "bob" } else { "carol" };
                let r = call_once(via, user, &format!("upgrade-{n}"));
                outcomes.lock().unwrap().push((clock.elapsed(), r));
                n += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let stopping = SetOnDrop(&stop);

        upgrade(first, Some(next.clone()));
        // Mixed: the upgraded node has the note, but the cluster does not allow it yet.
        let early = note(first, "mixed");
        assert_eq!(early.status, 409, "{}", early.body);
        assert!(early.body.contains("feature version"), "{}", early.body);
        // A downgrade of that node, before the feature version advanced, is fine.
        upgrade(first, None);
        assert_eq!(note(first, "downgraded").status, 404);
        upgrade(first, Some(next.clone()));
        upgrade(second, Some(next.clone()));
        // Two leader rounds (every 5 s) with the last node still on this release.
        std::thread::sleep(Duration::from_secs(11));
        assert_eq!(
            feature(last),
            Some(before),
            "raised before the last upgrade"
        );
        assert_eq!(note(second, "still mixed").status, 409);
        upgrade(last, Some(next.clone()));
        drop(stopping);
    });

    // Every member runs the next release: the leader raises the feature version, and the
    // new command works and reaches every node.
    for id in 1..=3 {
        Wait::new(format!("node {id} at feature version {}", before + 1), WAIT)
            .showing(&cluster)
            .until(|| feature(id) == Some(before + 1));
    }
    // Each member's release, as the node registry has it (written once it restarted).
    Wait::new("every member to show the next release", WAIT)
        .showing(&cluster)
        .until(|| {
            let status = cluster.member(last).status().unwrap_or_default();
            let next = status["members"].as_array().is_some_and(|members| {
                members.len() == 3
                    && members.iter().all(|m| {
                        m["software_version"]
                            .as_str()
                            .is_some_and(|v| v.ends_with("+next"))
                    })
            });
            if next {
                Ok(())
            } else {
                Err(status.to_string())
            }
        });
    let done = note(last, "upgraded");
    assert_eq!(done.status, 200, "{}", done.body);
    // The new route checks its input like every admin route: a token, JSON of its own
    // shape, a bounded text; each refusal a JSON error.
    let admin = cluster.member(last).admin_addr;
    let put = |token: Option<&str>, body: &str| {
        http(admin, token, "PUT", "/v1/cluster/note", Some(body)).expect("the admin API answers")
    };
    let long = format!(r#"{{"text":"{}"}}"#, "x".repeat(2000));
    for (token, body, want) in [
        (None, r#"{"text":"no token"}"#, 401),
        (Some("not-the-token"), r#"{"text":"wrong token"}"#, 401),
        (Some(token), "{not json", 400),
        (Some(token), r#"{"text":"x","extra":1}"#, 400),
        (Some(token), r#"{"text":7}"#, 400),
        (Some(token), long.as_str(), 400),
    ] {
        let a = put(token, body);
        assert_eq!(a.status, want, "{body}: {}", a.body);
        assert!(a.body.contains("\"error\""), "{body}: {}", a.body);
    }
    for id in 1..=3 {
        Wait::new(format!("node {id} to have the note"), WAIT)
            .showing(&cluster)
            .until(|| {
                cluster
                    .member(id)
                    .get("/v1/cluster/note")
                    .is_some_and(|a| a.json()["text"] == "upgraded")
            });
    }

    // Every drain handed its accounts over: the old owner un-registered each before the
    // new one registered it, so none was ever registered from two nodes at once.
    Wait::new(
        "every provider account registered once, by its owner, after",
        WAIT,
    )
    .showing(&cluster)
    .until(by_owners);
    let held_twice = register_log.held_twice(loopback_member);
    let registers = register_log.registers();
    let moved = (0..6)
        .filter(|i| {
            let user = format!("k{i}");
            let from: std::collections::BTreeSet<&str> = registers
                .iter()
                .filter(|r| r.user == user && r.expires.is_some())
                .map(|r| r.ip.as_str())
                .collect();
            from.len() > 1
        })
        .count();
    assert!(
        held_twice.is_empty(),
        "held by two nodes at once: {held_twice:#?}"
    );
    assert!(moved > 0, "no provider account moved: {registers:#?}");

    let outcomes = outcomes.into_inner().unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    eprintln!(
        "SUMMARY rolling upgrade: nodes {first}, {second}, {last} (the leader last), node \
         {first} also downgraded and upgraded again; calls to the SRV phones {}, failed {}; \
         feature version {before} -> {} once the last node ran the next release; provider \
         accounts moved {moved} of 6, REGISTERs {}, held by two nodes at once {}",
        outcomes.len(),
        failed.len(),
        before + 1,
        registers.iter().filter(|r| r.expires.is_some()).count(),
        held_twice.len(),
    );
    assert!(
        failed.is_empty(),
        "calls failed during the upgrade: {failed:?}"
    );
    assert!(
        outcomes.len() >= 20,
        "too few calls to mean anything: {outcomes:?}"
    );

    // Going back after the version rose is not possible, and a node that tries says so
    // instead of applying what it does not understand.
    let m = cluster.member(first);
    m.sigterm();
    m.wait_exit(WAIT).expect("node stops");
    m.set_binary(None);
    m.start();
    m.wait_healthy();
    let after = note(second, "after the downgrade");
    assert_eq!(after.status, 200, "{}", after.body);
    Wait::new(
        format!("node {first} on the old release to refuse the log"),
        WAIT,
    )
    .showing(&cluster)
    .until(|| m.log().contains("command kind 32"));
    let ready = m.get("/ready").expect("the admin API still answers");
    assert_eq!(ready.status, 503, "{}", ready.body);
}
