//! The stateful proxy against real processes, with test UAs on fixed ports:
//!
//! - a call across nodes: the callee registers through node 1 with a Contact that is not
//!   its real address (as a phone behind NAT does), the caller sends the INVITE to node 2,
//!   and every request the callee receives comes from node 1, with both nodes' Record-Route
//!   entries; ACK and BYE follow the route set;
//! - CANCEL and 486 reach the caller; an unregistered callee gets 480, an unknown one 404,
//!   a foreign domain 403, a caller with a wrong password never gets through;
//! - without quorum, calls between known bindings still connect, and the edge node being
//!   down sends the call straight to the binding's public address;
//! - drain under a running call: the call ends with BYE, new REGISTERs get 503, and the node
//!   reports drained only after the call ended;
//! - forking by q-value groups, with the other branches CANCELled on a 2xx;
//! - sipp calls (the benchmark's scenarios) through the proxy, every one completed;
//! - NAT keepalives to a UDP binding come from its edge node only;
//! - a non-INVITE the callee never answers gets no 408 (RFC 4320);
//! - the challenges of every forked branch's 401 reach the caller in one response.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tandem_failover_tests::cluster::{add_account, http, metric, Cluster, Member, MemberRole};
use tandem_failover_tests::ua::{uri_addr, Received, Ua};
use tandem_failover_tests::{free_port, sip_config, Deadline, Node, Wait};

const WAIT: Duration = Duration::from_secs(10);

fn token(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.root().join("admin.token")).unwrap()
}

/// Registers `ua` through `node` with `contact` (what the phone claims as its address).
/// A standalone node serving the accounts alice and bob of example.com.
fn node_with_alice_and_bob() -> Node {
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    add_account(admin, &token, "bob", "example.com", "pw-bob-1");
    node
}

/// A phone of alice's, and one of bob's: each call makes a new one.
fn alice_phone() -> Ua {
    Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-1")
}

fn bob_phone() -> Ua {
    Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1")
}

fn register(ua: &mut Ua, node: SocketAddr, contact: &str) {
    let r = ua.register(node, "MD5", Some(&format!("<{contact}>")), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);
}

/// Waits until `member` holds `n` bindings of `user`.
fn wait_bindings(member: &Member, token: &str, user: &str, n: usize) {
    Wait::new(
        format!("node {} to hold {n} bindings of {user}", member.id),
        WAIT,
    )
    .showing(member)
    .until(|| {
        let b = http(
            member.admin_addr,
            Some(token),
            "GET",
            &format!("/v1/accounts/example.com/{user}/bindings"),
            None,
        )
        .unwrap()
        .json();
        if b.as_array().map(Vec::len) == Some(n) {
            Ok(())
        } else {
            Err(b)
        }
    });
}

/// Waits until node 1's `/metrics` says whether node `peer` answers its SIP pings.
fn wait_peer_up(cluster: &Cluster, peer: u64, up: bool) {
    let one = cluster.member(1);
    let want = format!("tandem_sip_peer_up{{node=\"{peer}\"}} {}", u8::from(up));
    Wait::new(format!("node 1 to report {want}"), WAIT)
        .showing(cluster)
        .until(|| {
            let metrics = http(one.admin_addr, None, "GET", "/metrics", None)
                .unwrap()
                .body;
            if metrics.lines().any(|l| l == want) {
                Ok(())
            } else {
                Err(metrics
                    .lines()
                    .filter(|l| l.starts_with("tandem_sip_peer_up"))
                    .collect::<Vec<_>>()
                    .join(", "))
            }
        });
}

/// The callee's side of an answered call: rings, answers, and checks that everything it
/// receives comes from `edge` (the node it registered through). Returns the INVITE.
fn answer_call(callee: &Ua, edge: SocketAddr, contact: &str) -> Received {
    let invite = callee.expect_request("INVITE", WAIT);
    assert_eq!(
        invite.from, edge,
        "the INVITE came from elsewhere:\n{}",
        invite.text
    );
    assert_eq!(invite.request_uri(), Some(contact), "{}", invite.text);
    callee.respond(&invite, 180, "Ringing", "");
    callee.respond(&invite, 200, "OK", &format!("Contact: <{contact}>\r\n"));
    invite
}

#[test]
fn calls_across_nodes_go_through_the_callees_edge_node() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let token = token(&cluster);
    let (one, two) = (cluster.member(1), cluster.member(2));
    for (user, pw) in [
        ("alice", "pw-alice-1"),
        ("bob", "pw-bob-1"),
        ("carol", "pw-carol-1"),
    ] {
        add_account(one.admin_addr, &token, user, "example.com", pw);
    }
    let mut bob = bob_phone();
    let mut alice = alice_phone();
    // Bob claims an address nothing listens on, as a phone behind NAT claims its private
    // one: only the flow it registered over reaches it.
    let bob_contact = "sip:bob@127.0.0.99:5999";
    register(&mut bob, one.sip_addr(), bob_contact);
    let alice_contact = alice.contact();
    register(&mut alice, two.sip_addr(), &alice_contact);
    wait_bindings(two, &token, "bob", 1);
    let bob_uri = "sip:bob@example.com";

    // 1. A call: INVITE to node 2, through node 1 to Bob; ACK and BYE along the route set.
    let callee = std::thread::scope(|s| {
        let edge = one.sip_addr();
        let bob = &bob;
        let handle = s.spawn(move || {
            let invite = answer_call(bob, edge, bob_contact);
            let ack = bob.expect_request("ACK", WAIT);
            assert_eq!(ack.from, edge, "ACK:\n{}", ack.text);
            let bye = bob.expect_request("BYE", WAIT);
            assert_eq!(bye.from, edge, "BYE:\n{}", bye.text);
            assert_eq!(bye.request_uri(), Some(bob_contact));
            bob.respond(&bye, 200, "OK", "");
            invite
        });
        let ok = alice.invite(two.sip_addr(), bob_uri, "call-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        let rr = ok.headers("Record-Route");
        assert_eq!(rr.len(), 4, "two entries per node:\n{}", ok.text);
        let hops: Vec<SocketAddr> = rr.iter().map(|r| uri_addr(r)).collect();
        assert_eq!(
            hops,
            vec![
                one.sip_addr(),
                one.sip_addr(),
                two.sip_addr(),
                two.sip_addr()
            ],
            "{rr:?}"
        );
        assert_eq!(
            alice.send_in_dialog(&dialog, "ACK", dialog.cseq),
            two.sip_addr()
        );
        alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
        let bye_ok = alice.expect_response("BYE", WAIT);
        assert_eq!(bye_ok.status(), Some(200), "{}", bye_ok.text);
        handle.join().unwrap()
    });
    assert!(
        callee.text.contains("Max-Forwards: 68"),
        "two proxies on the way:\n{}",
        callee.text
    );
    assert!(
        !callee.text.contains("Proxy-Authorization"),
        "the caller's credentials reached the callee:\n{}",
        callee.text
    );
    let route_set = callee.headers("Record-Route");

    // No relaying: a request inside a dialog goes on only along a route set this cluster
    // record-routed for that very call.
    let stranger = |route: &str, call_id: &str| {
        format!(
            "BYE sip:someone@127.0.0.77:5099 SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-relay-{call_id};rport\r\n\
             From: <sip:x@example.net>;tag=a\r\nTo: <sip:y@example.net>;tag=b\r\n\
             Call-ID: {call_id}\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\n\
             Route: {route}\r\nContent-Length: 0\r\n\r\n",
            local = alice.local()
        )
    };
    for (route, why) in [
        ("<sip:127.0.0.77:5099;lr>".to_owned(), "a Route elsewhere"),
        (
            format!("{}, <sip:127.0.0.77:5099;lr>", route_set[3]),
            "another call's route set",
        ),
    ] {
        alice
            .socket
            .send_to(
                stranger(&route, &format!("relay-{}", why.len())).as_bytes(),
                two.sip_addr(),
            )
            .unwrap();
        let r = alice.expect_response("BYE", WAIT);
        assert_eq!(r.status(), Some(403), "{why}: {}", r.text);
    }

    // Node 2's metrics: bindings by edge node, no call left up, the INVITEs counted.
    let metrics = http(two.admin_addr, None, "GET", "/metrics", None)
        .unwrap()
        .body;
    for line in [
        "tandem_bindings{edge_node=\"1\"} 1",
        "tandem_bindings{edge_node=\"2\"} 1",
        "tandem_sip_calls_active 0",
        "tandem_sip_requests_total{method=\"INVITE\"} 2",
        "tandem_sip_responses_total{code=\"407\"} 1",
    ] {
        assert!(
            metrics.contains(line),
            "/metrics lacks {line:?}:\n{metrics}"
        );
    }

    // 1b. Requests both ways inside a call: Alice's INFO reaches Bob through node 1, and
    // Bob's BYE reaches Alice through node 2, the node her INVITE came in by.
    std::thread::scope(|s| {
        let edge = one.sip_addr();
        let bob = &bob;
        let handle = s.spawn(move || {
            let invite = answer_call(bob, edge, bob_contact);
            bob.expect_request("ACK", WAIT);
            let info = bob.expect_request("INFO", WAIT);
            assert_eq!(info.from, edge, "INFO:\n{}", info.text);
            bob.respond(&info, 200, "OK", "");
            let dialog = bob.callee_dialog(&invite);
            assert_eq!(
                bob.send_in_dialog(&dialog, "BYE", 1),
                edge,
                "Bob's first hop"
            );
            let ok = bob.expect_response("BYE", WAIT);
            assert_eq!(ok.status(), Some(200), "{}", ok.text);
        });
        let ok = alice.invite(two.sip_addr(), bob_uri, "call-1b", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        // The call's own route set, repeated: genuine tokens all, but a request must not
        // bounce between the two nodes until Max-Forwards runs out. Node 2 stops it at
        // once, since the rest of the set comes back to it; node 1 never sees it.
        let mut looping = dialog.clone();
        looping.route = (0..5).flat_map(|_| dialog.route.clone()).collect();
        alice.send_in_dialog(&looping, "MESSAGE", dialog.cseq + 1);
        let looped = alice.expect_response("MESSAGE", WAIT);
        assert_eq!(looped.status(), Some(482), "{}", looped.text);
        assert_eq!(looped.from, two.sip_addr(), "{}", looped.text);
        alice.send_in_dialog(&dialog, "INFO", dialog.cseq + 2);
        let info_ok = alice.expect_response("INFO", WAIT);
        assert_eq!(info_ok.status(), Some(200), "{}", info_ok.text);
        let bye = alice.expect_request("BYE", WAIT);
        assert_eq!(
            bye.from,
            two.sip_addr(),
            "Bob's BYE came from elsewhere:\n{}",
            bye.text
        );
        assert_eq!(
            bye.request_uri(),
            Some(alice_contact.as_str()),
            "{}",
            bye.text
        );
        alice.respond(&bye, 200, "OK", "");
        handle.join().unwrap();
    });
    let messages = metric(
        one.admin_addr,
        "tandem_sip_requests_total{method=\"MESSAGE\"}",
    );
    assert_eq!(messages, Some(0.0), "the looping MESSAGE reached node 1");

    // 2. Alice cancels while Bob rings: Bob gets the CANCEL from node 1 and answers 487.
    std::thread::scope(|s| {
        let edge = one.sip_addr();
        let bob = &bob;
        s.spawn(move || {
            let invite = bob.expect_request("INVITE", WAIT);
            bob.respond(&invite, 180, "Ringing", "");
            let cancel = bob.expect_request("CANCEL", WAIT);
            assert_eq!(cancel.from, edge);
            bob.respond(&cancel, 200, "OK", "");
            bob.respond(&invite, 487, "Request Terminated", "");
            let ack = bob.expect_request("ACK", WAIT);
            assert_eq!(ack.from, edge, "node 1 ACKs the 487 hop by hop");
        });
        let node = two.sip_addr();
        let r = alice.invite(node, bob_uri, "call-2", &mut |ua, _| {
            ua.cancel(node, bob_uri, "call-2", 1);
        });
        assert_eq!(r.status(), Some(487), "{}", r.text);
    });

    // 3. Bob is busy.
    std::thread::scope(|s| {
        let bob = &bob;
        s.spawn(move || {
            let invite = bob.expect_request("INVITE", WAIT);
            bob.respond(&invite, 486, "Busy Here", "");
            bob.expect_request("ACK", WAIT);
        });
        let r = alice.invite(two.sip_addr(), bob_uri, "call-3", &mut |_, _| {});
        assert_eq!(r.status(), Some(486), "{}", r.text);
    });

    // 4. Nobody to reach, or nobody at all, or not ours.
    let r = alice.invite(
        two.sip_addr(),
        "sip:carol@example.com",
        "call-4",
        &mut |_, _| {},
    );
    assert_eq!(r.status(), Some(480), "carol has no bindings: {}", r.text);
    let r = alice.invite(
        two.sip_addr(),
        "sip:nobody@example.com",
        "call-5",
        &mut |_, _| {},
    );
    assert_eq!(r.status(), Some(404), "{}", r.text);
    // A domain not served here: the app server's, and without a provider account to
    // call out through (t110 covers the calls that do go out), nobody to ring.
    let r = alice.invite(
        two.sip_addr(),
        "sip:someone@example.org",
        "call-6",
        &mut |_, _| {},
    );
    assert_eq!(r.status(), Some(404), "{}", r.text);
    assert!(r.text.contains("no provider account"), "{}", r.text);

    // 5. While node 1 drains, calls relayed through it still reach the phones registered
    // there: drain turns away new calls of its own, not another node's.
    let drain = http(one.admin_addr, Some(&token), "POST", "/v1/node/drain", None).unwrap();
    assert_eq!(drain.status, 200, "{}", drain.body);
    std::thread::scope(|s| {
        let edge = one.sip_addr();
        let bob = &bob;
        s.spawn(move || {
            answer_call(bob, edge, bob_contact);
            bob.expect_request("ACK", WAIT);
        });
        let ok = alice.invite(two.sip_addr(), bob_uri, "call-8", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
    });

    // 6. A caller with the wrong password is challenged again, never connected.
    let mut mallory = Ua::new("127.0.0.1", "alice", "example.com", "guess");
    let r = mallory.invite(two.sip_addr(), bob_uri, "call-7", &mut |_, _| {});
    assert_eq!(r.status(), Some(407), "{}", r.text);
    // Then Alice calls Bob the same way. The nodes handled Mallory's INVITEs before hers,
    // so hers is the first INVITE Bob hears: had either of Mallory's been relayed, it
    // would have come first, however slow the machine.
    std::thread::scope(|s| {
        let bob = &bob;
        s.spawn(move || {
            let invite = bob.expect_request("INVITE", WAIT);
            assert_eq!(
                invite.header("Call-ID").as_deref(),
                Some("call-9"),
                "an unauthenticated INVITE reached Bob:\n{}",
                invite.text
            );
            bob.respond(&invite, 486, "Busy Here", "");
            bob.expect_request("ACK", WAIT);
        });
        let busy = alice.invite(two.sip_addr(), bob_uri, "call-9", &mut |_, _| {});
        assert_eq!(busy.status(), Some(486), "{}", busy.text);
    });
}

#[test]
fn without_quorum_calls_between_known_bindings_still_connect() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let token = token(&cluster);
    let (one, two) = (cluster.member(1), cluster.member(2));
    add_account(one.admin_addr, &token, "alice", "example.com", "pw-alice-1");
    add_account(one.admin_addr, &token, "bob", "example.com", "pw-bob-1");
    let mut alice = alice_phone();
    let mut bob = bob_phone();
    let alice_contact = alice.contact();
    register(&mut alice, one.sip_addr(), &alice_contact);
    // Bob registers through node 2, which is about to die: node 1 must then reach him at
    // the address his flow came from. His Contact names an address he cannot be reached at,
    // as a phone behind NAT writes its private address, so a call that followed the Contact
    // instead of the flow would never reach him (a loopback address nothing listens on).
    let bob_contact = "sip:bob@127.0.0.99:5999".to_owned();
    register(&mut bob, two.sip_addr(), &bob_contact);
    wait_bindings(one, &token, "bob", 1);
    wait_peer_up(&cluster, 2, true);

    cluster.member(2).sigkill();
    cluster.member(3).sigkill();
    Wait::new(
        "node 1 to notice that it lost its quorum (/ready no longer 200)",
        WAIT,
    )
    .showing(&cluster)
    .until(|| one.get("/ready").is_none_or(|r| r.status != 200));
    // Node 1 stops counting on node 2 as Bob's edge once node 2 misses its pings.
    wait_peer_up(&cluster, 2, false);

    std::thread::scope(|s| {
        let bob = &bob;
        let contact = bob_contact.clone();
        let node1 = one.sip_addr();
        s.spawn(move || {
            answer_call(bob, node1, &contact);
            bob.expect_request("ACK", WAIT);
            let bye = bob.expect_request("BYE", WAIT);
            bob.respond(&bye, 200, "OK", "");
        });
        let ok = alice.invite(
            one.sip_addr(),
            "sip:bob@example.com",
            "degraded-1",
            &mut |_, _| {},
        );
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
        assert_eq!(alice.expect_response("BYE", WAIT).status(), Some(200));
    });
    // Refreshes are still answered.
    register(&mut bob, one.sip_addr(), &bob_contact);
    register(&mut alice, one.sip_addr(), &alice_contact);

    // Quorum returns and nothing is lost.
    cluster.member(2).start();
    cluster.member(3).start();
    cluster.wait_for_leader(&[], Duration::from_secs(15));
    for m in &cluster.members {
        cluster.wait_caught_up(m.id, Duration::from_secs(15));
        wait_bindings(m, &token, "alice", 1);
        // Bob's refresh through node 1 is a new flow: one binding, whose edge is now 1.
        wait_bindings(m, &token, "bob", 1);
    }
}

#[test]
fn drain_lets_a_running_call_end_and_turns_new_registrations_and_calls_away() {
    let node = node_with_alice_and_bob();
    let (admin, token, sip) = (node.admin_addr(), node.admin_token(), node.udp_addr());
    let (mut alice, mut bob) = (alice_phone(), bob_phone());
    let alice_contact = alice.contact();
    register(&mut alice, sip, &alice_contact);
    let bob_contact = bob.contact();
    register(&mut bob, sip, &bob_contact);

    let drain_state = || {
        http(admin, Some(&token), "GET", "/v1/node/drain", None)
            .unwrap()
            .json()
    };
    let dialog = std::thread::scope(|s| {
        let bob = &bob;
        let contact = bob_contact.clone();
        let node1 = sip;
        s.spawn(move || {
            answer_call(bob, node1, &contact);
            bob.expect_request("ACK", WAIT);
        });
        let ok = alice.invite(sip, "sip:bob@example.com", "drain-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        dialog
    });

    let started = http(admin, Some(&token), "POST", "/v1/node/drain", None).unwrap();
    assert_eq!(started.status, 200, "{}", started.body);
    let state = drain_state();
    assert_eq!(state["active_calls"], 1, "{state}");
    assert_eq!(state["drained"], false, "a call is still up: {state}");
    let metrics = http(admin, None, "GET", "/metrics", None).unwrap().body;
    assert!(metrics.contains("tandem_sip_calls_active 1"), "{metrics}");
    // New registrations and calls are turned away with Retry-After.
    let refused = bob.register_once(sip, Some(&format!("<{bob_contact}>")), Some(600), "");
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert!(refused.header("Retry-After").is_some(), "{}", refused.text);
    let new_call = alice.invite(sip, "sip:bob@example.com", "drain-2", &mut |_, _| {});
    assert_eq!(new_call.status(), Some(503), "{}", new_call.text);
    assert!(
        new_call.header("Retry-After").is_some(),
        "{}",
        new_call.text
    );

    // The call ends with BYE, through the draining node.
    std::thread::scope(|s| {
        let bob = &bob;
        s.spawn(move || {
            let bye = bob.expect_request("BYE", WAIT);
            bob.respond(&bye, 200, "OK", "");
        });
        alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
        assert_eq!(alice.expect_response("BYE", WAIT).status(), Some(200));
    });
    Wait::new(
        "the node to report itself drained once the call ended",
        WAIT,
    )
    .every(Duration::from_millis(100))
    .showing(&node)
    .until(|| {
        let state = drain_state();
        if state["drained"] == true {
            assert_eq!(state["active_calls"], 0, "{state}");
            Ok(())
        } else {
            Err(state)
        }
    });
}

#[test]
fn timer_c_cancels_a_branch_that_rings_too_long_and_the_caller_gets_408() {
    // Timer C at 2 s and T1 at 100 ms (a CANCEL unanswered for 64*T1 = 6.4 s is given
    // up), which only TANDEM_TEST_SHORT_TIMERS lets a config set.
    let node = Node::start_env(
        &sip_config(free_port(), "timer_c_secs = 2\nt1_ms = 100"),
        &[("TANDEM_TEST_SHORT_TIMERS", "1")],
    );
    node.wait_ready();
    let (admin, token, sip) = (node.admin_addr(), node.admin_token(), node.udp_addr());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    add_account(admin, &token, "bob", "example.com", "pw-bob-1");
    let (mut alice, mut bob) = (alice_phone(), bob_phone());
    let bob_contact = bob.contact();
    register(&mut bob, sip, &bob_contact);

    std::thread::scope(|s| {
        let bob = &bob;
        // Bob's phone rings and then says nothing more, not even to the CANCEL.
        let callee = s.spawn(move || {
            let invite = bob.expect_request("INVITE", WAIT);
            bob.respond(&invite, 180, "Ringing", "");
            let rang = Deadline::after(WAIT);
            let cancel = bob.expect_request("CANCEL", WAIT);
            (rang.elapsed(), invite, cancel)
        });
        let started = Deadline::after(WAIT);
        let last = alice.invite(sip, "sip:bob@example.com", "timer-c-1", &mut |_, _| {});
        let (rang_for, invite, cancel) = callee.join().unwrap();
        assert!(
            rang_for >= Duration::from_millis(1900),
            "CANCELled {rang_for:?} after the 180, before Timer C (2 s)"
        );
        assert_eq!(
            cancel.header("Call-ID"),
            invite.header("Call-ID"),
            "{}",
            cancel.text
        );
        assert_eq!(last.status(), Some(408), "{}", last.text);
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "408 after {:?}, before Timer C fired",
            started.elapsed()
        );
    });
    node.assert_answers_options();
}

/// A phone whose NAT drops the INVITE never answers, not even 100, so the proxy may not
/// CANCEL its branch (§9.1) and the branch would run until Timer B (32 s). A caller who
/// hangs up still gets 487 at once, and the abandoned call does not keep a place in its
/// account's `max_concurrent_calls` (4): six such calls in a row are each answered 487,
/// none 403. The late branch is CANCELled as soon as it rings.
#[test]
fn a_cancelled_call_that_never_rang_ends_at_once_and_frees_the_callers_place() {
    let node = node_with_alice_and_bob();
    let sip = node.udp_addr();
    let mut bob = bob_phone();
    let bob_contact = bob.contact();
    register(&mut bob, sip, &bob_contact);
    for n in 0..6 {
        let mut alice = alice_phone();
        let call_id = format!("silent-{n}");
        let started = Deadline::after(WAIT);
        let r = alice.invite_within(
            sip,
            "sip:bob@example.com",
            &call_id,
            Duration::from_millis(500),
        );
        assert!(
            r.is_none(),
            "bob never answers, yet: {:?}",
            r.map(|r| r.text)
        );
        let last = alice.expect_response("INVITE", WAIT);
        assert_eq!(last.status(), Some(487), "call {n}: {}", last.text);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "call {n}: the 487 came {:?} after the INVITE",
            started.elapsed()
        );
    }
    // The last call's INVITE reaches bob's phone at last; it rings, and the node
    // CANCELs it.
    let invite = Wait::new("an INVITE for bob", WAIT).until(|| {
        bob.recv(Duration::from_millis(200))
            .filter(|m| m.method() == Some("INVITE") && m.text.contains("silent-5"))
    });
    bob.respond(&invite, 180, "Ringing", "");
    let cancel = bob.expect_request("CANCEL", WAIT);
    assert_eq!(
        cancel.header("Call-ID"),
        invite.header("Call-ID"),
        "{}",
        cancel.text
    );
    node.assert_answers_options();
}

#[test]
fn forking_tries_q_groups_in_turn_and_cancels_the_rest_on_a_2xx() {
    let node = node_with_alice_and_bob();
    let sip = node.udp_addr();
    let mut alice = alice_phone();
    // Bob's desk phone (q=1.0) is tried first; his two softphones (q=0.5) after it, both
    // at once.
    let mut desk = bob_phone();
    let mut soft1 = bob_phone();
    let mut soft2 = bob_phone();
    for (ua, q) in [(&mut desk, "1.0"), (&mut soft1, "0.5"), (&mut soft2, "0.5")] {
        let contact = format!("<{}>;q={q}", ua.contact());
        let r = ua.register(sip, "MD5", Some(&contact), Some(600));
        assert_eq!(r.status, 200, "{}", r.text);
    }

    // When the desk phone gave up, and when each softphone first heard of the call: the
    // proxy may only try the softphones after the desk phone's final answer. Each phone
    // waits in its own thread from the start, so a softphone INVITE sent too early is
    // stamped early; a stamp is only ever late, never early, so this cannot fail a proxy
    // that waits.
    let clock = Deadline::after(WAIT);
    let desk_gave_up = Mutex::new(None::<Duration>);
    let soft_heard = Mutex::new(Vec::<Duration>::new());
    let dialog = std::thread::scope(|s| {
        let (desk, soft1, soft2) = (&desk, &soft1, &soft2);
        let (desk_gave_up, soft_heard, clock) = (&desk_gave_up, &soft_heard, &clock);
        s.spawn(move || {
            let invite = desk.expect_request("INVITE", WAIT);
            desk.respond(&invite, 180, "Ringing", "");
            // It rings for a while, as a phone does, before it gives up.
            std::thread::sleep(Duration::from_millis(300));
            *desk_gave_up.lock().unwrap() = Some(clock.elapsed());
            desk.respond(&invite, 480, "Temporarily Unavailable", "");
            desk.expect_request("ACK", WAIT);
        });
        s.spawn(move || {
            let invite = soft1.expect_request("INVITE", WAIT);
            soft_heard.lock().unwrap().push(clock.elapsed());
            soft1.respond(&invite, 180, "Ringing", "");
            std::thread::sleep(Duration::from_millis(200));
            soft1.respond(
                &invite,
                200,
                "OK",
                &format!("Contact: <{}>\r\n", soft1.contact()),
            );
            soft1.expect_request("ACK", WAIT);
        });
        s.spawn(move || {
            let invite = soft2.expect_request("INVITE", WAIT);
            soft_heard.lock().unwrap().push(clock.elapsed());
            soft2.respond(&invite, 180, "Ringing", "");
            let cancel = soft2.expect_request("CANCEL", WAIT);
            soft2.respond(&cancel, 200, "OK", "");
            soft2.respond(&invite, 487, "Request Terminated", "");
            soft2.expect_request("ACK", WAIT);
        });
        let ok = alice.invite(sip, "sip:bob@example.com", "fork-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        assert_eq!(
            ok.header("Contact").as_deref(),
            Some(format!("<{}>", soft1.contact()).as_str())
        );
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        dialog
    });
    let gave_up = desk_gave_up
        .into_inner()
        .unwrap()
        .expect("the desk phone answered");
    let heard = soft_heard.into_inner().unwrap();
    assert_eq!(heard.len(), 2);
    for at in heard {
        assert!(
            at > gave_up,
            "a softphone heard of the call {:?} before the desk phone gave up",
            gave_up - at
        );
    }
    // No second final answer reaches Alice: the 487 stayed at the proxy. The proxy had
    // the 487 before Alice hangs up (it ACKed it), so anything it sent her for it comes
    // before the answer to her BYE.
    alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
    let bye = soft1.expect_request("BYE", WAIT);
    soft1.respond(&bye, 200, "OK", "");
    let mut before_bye_ok = Vec::new();
    let deadline = Deadline::after(WAIT);
    loop {
        let m = alice
            .recv(deadline.remaining())
            .expect("Alice gets an answer to her BYE");
        if m.status().is_some() && m.header("CSeq").is_some_and(|c| c.ends_with("BYE")) {
            break;
        }
        before_bye_ok.push(m);
    }
    assert!(
        before_bye_ok
            .iter()
            .all(|m| m.status().is_none_or(|s| s < 300)),
        "{before_bye_ok:?}"
    );
}

#[test]
fn a_retransmitted_2xx_reaches_the_caller_after_the_call_is_answered() {
    // RFC 6026: a proxy forwards every 2xx upstream, retransmissions included, for as
    // long as its client transaction lasts (Timer M); the fork has long finished by then.
    let node = node_with_alice_and_bob();
    let sip = node.udp_addr();
    let (mut alice, mut bob) = (alice_phone(), bob_phone());
    let contact = format!("<{}>", bob.contact());
    let r = bob.register(sip, "MD5", Some(&contact), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);

    std::thread::scope(|s| {
        let bob = &bob;
        s.spawn(move || {
            let invite = bob.expect_request("INVITE", WAIT);
            let ok_contact = format!("Contact: <{}>\r\n", bob.contact());
            bob.respond(&invite, 200, "OK", &ok_contact);
            // No ACK yet (as if it were lost): the UAS sends its 2xx again.
            std::thread::sleep(Duration::from_millis(500));
            bob.respond(&invite, 200, "OK", &ok_contact);
        });
        let ok = alice.invite(sip, "sip:bob@example.com", "retransmit-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let again = alice
            .recv(WAIT)
            .expect("the retransmitted 200 reaches the caller");
        assert_eq!(again.status(), Some(200), "{}", again.text);
        assert_eq!(again.header("Call-ID").as_deref(), Some("retransmit-1"));
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
    });
}

/// Whether a UDP socket is bound to 127.0.0.1:`port`, by the kernel's socket table (binding
/// the port to find out could take it from the process that is about to).
fn udp_listener_on_loopback(port: &str) -> bool {
    let port: u16 = port.parse().expect("a port number");
    // The address is in host byte order: 0100007F on a little-endian machine.
    let local = [
        format!("0100007F:{port:04X}"),
        format!("7F000001:{port:04X}"),
    ];
    std::fs::read_to_string("/proc/net/udp")
        .expect("read /proc/net/udp")
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|address| local.iter().any(|l| l == address))
}

#[test]
fn sipp_calls_through_the_proxy_all_complete() {
    let node = Node::start_ready("");
    let (admin, token, sip) = (node.admin_addr(), node.admin_token(), node.udp_addr());
    add_account(admin, &token, "caller", "example.com", "pw-caller-1");
    add_account(admin, &token, "callee", "example.com", "pw-callee-1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("callee.csv"),
        "SEQUENTIAL\ncallee;example.com\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("caller.csv"),
        "SEQUENTIAL\ncaller;example.com;callee\n",
    )
    .unwrap();
    let callee_port = tandem_failover_tests::free_port().to_string();
    let sipp = |args: &[&str]| {
        let mut c = std::process::Command::new("sipp");
        c.args(args)
            .args(["-i", "127.0.0.1", "-nostdin"])
            .arg(sip.to_string())
            .current_dir(dir.path());
        c
    };
    let scenario = |name| {
        tandem_failover_tests::sipp_scenario(name)
            .to_string_lossy()
            .into_owned()
    };
    // The callee registers from the port it then answers on.
    let register = sipp(&[
        "-sf",
        &scenario("bench-register.xml"),
        "-inf",
        "callee.csv",
        "-au",
        "callee",
        "-ap",
        "pw-callee-1",
        "-p",
        &callee_port,
        "-m",
        "1",
        "-timeout",
        "10s",
    ])
    .output()
    .expect("run sipp (install it with ./ops/setup.sh)");
    assert!(
        register.status.success(),
        "{}",
        tandem_failover_tests::describe(&register)
    );
    let mut uas = sipp(&["-sf", &scenario("bench-uas.xml"), "-p", &callee_port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the sipp callee");
    Wait::new(
        format!("the sipp callee to listen on 127.0.0.1:{callee_port}"),
        WAIT,
    )
    .every(Duration::from_millis(20))
    .showing(&node)
    .until(|| {
        if let Some(status) = uas.try_wait().expect("poll the sipp callee") {
            node.panic_with_log(&format!("the sipp callee exited with {status}"));
        }
        udp_listener_on_loopback(&callee_port)
    });
    let calls = sipp(&[
        "-sf",
        &scenario("bench-uac-invite.xml"),
        "-inf",
        "caller.csv",
        "-au",
        "caller",
        "-ap",
        "pw-caller-1",
        "-p",
        "0",
        "-m",
        "20",
        "-r",
        "10",
        "-d",
        "200",
        "-nd",
        "-timeout",
        "30s",
    ])
    .output()
    .expect("run sipp");
    let _ = uas.kill();
    let _ = uas.wait();
    let out = tandem_failover_tests::describe(&calls);
    assert!(calls.status.success(), "sipp calls failed:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("Successful call")
                && l.split('|').nth(2).map(str::trim) == Some("20")),
        "not all 20 calls succeeded:\n{out}"
    );
}

#[test]
fn nat_keepalives_come_only_from_the_edge_node() {
    let cluster = Cluster::form(
        &[MemberRole::Full, MemberRole::Full, MemberRole::Full],
        "\n[registrar]\nnat_keepalive_secs = 1",
    );
    let token = token(&cluster);
    let two = cluster.member(2);
    add_account(two.admin_addr, &token, "dave", "example.com", "pw-dave-1");
    let mut dave = Ua::new("127.0.0.1", "dave", "example.com", "pw-dave-1");
    let contact = dave.contact();
    register(&mut dave, two.sip_addr(), &contact);
    for m in &cluster.members {
        wait_bindings(m, &token, "dave", 1);
    }
    // Every node knows the binding; only node 2, its edge, keeps its NAT mapping open.
    let deadline = Deadline::after(Duration::from_millis(3500));
    let mut from_edge = 0;
    while !deadline.expired() {
        let Some(m) = dave.recv(deadline.remaining()) else {
            break;
        };
        assert_eq!(m.text, "\r\n\r\n", "not a keepalive: {m:?}");
        assert_eq!(
            m.from,
            two.sip_addr(),
            "a keepalive from a node that is not the edge"
        );
        from_edge += 1;
    }
    assert!(
        from_edge >= 2,
        "only {from_edge} keepalives in 3.5 s at one a second"
    );
}

#[test]
fn a_non_invite_the_callee_never_answers_gets_no_408() {
    // RFC 4320 §4.2: a proxy sends no 408 to a non-INVITE; by the time its branch times
    // out, the client has given up too. A short T1 makes Timer F 64 × 50 ms = 3.2 s.
    let node = Node::start_ready("t1_ms = 50");
    let (admin, token, sip) = (node.admin_addr(), node.admin_token(), node.udp_addr());
    add_account(admin, &token, "carol", "example.com", "pw-carol-1");
    let mut callee = Ua::new("127.0.0.1", "carol", "example.com", "pw-carol-1");
    let contact = callee.contact();
    register(&mut callee, sip, &contact);

    // From a peer outside the served domains, so no 407 comes first.
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = peer.local_addr().unwrap();
    let message = format!(
        "MESSAGE sip:carol@example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-4320-{port};rport\r\n\
         From: <sip:peer@elsewhere.example>;tag=p{port}\r\n\
         To: <sip:carol@example.com>\r\n\
         Call-ID: rfc4320-{port}\r\n\
         CSeq: 1 MESSAGE\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: 5\r\n\r\nhello",
        port = local.port()
    );
    peer.send_to(message.as_bytes(), sip).unwrap();
    let relayed = callee.expect_request("MESSAGE", WAIT);
    assert!(relayed.text.ends_with("hello"), "{}", relayed.text);
    // The callee stays silent. Nothing final may come back, 408 least of all, until well
    // after Timer F has fired on the node.
    peer.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Deadline::after(Duration::from_secs(6));
    let mut buf = [0u8; 4096];
    while !deadline.expired() {
        if let Ok((n, _)) = peer.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(
                !text.starts_with("SIP/2.0 408") && !text.starts_with("SIP/2.0 2"),
                "the caller got an answer nobody gave:\n{text}"
            );
        }
    }
    // Nothing is left waiting for an answer, so a drain would not wait on it.
    Wait::new("no transaction to be left active", WAIT)
        .every(Duration::from_millis(200))
        .showing(&node)
        .until(|| {
            let metrics = http(admin, None, "GET", "/metrics", None).unwrap().body;
            let active = metrics
                .lines()
                .find_map(|l| l.strip_prefix("tandem_sip_transactions_active "))
                .map(|v| v.trim().to_owned());
            if active.as_deref() == Some("0") {
                Ok(())
            } else {
                Err(format!("transactions still active: {active:?}"))
            }
        });
}

#[test]
fn challenges_of_every_forked_branch_reach_the_caller() {
    // RFC 3261 §16.7 step 7: when the response chosen is a 401 or 407, the proxy adds the
    // challenges of every other 401 and 407 it received, unchanged.
    let node = node_with_alice_and_bob();
    let sip = node.udp_addr();
    let mut alice = alice_phone();
    let mut one = bob_phone();
    let mut two = bob_phone();
    for ua in [&mut one, &mut two] {
        let contact = ua.contact();
        register(ua, sip, &contact);
    }
    let challenge = |realm: &str| {
        format!(
            "WWW-Authenticate: Digest realm=\"{realm}\", nonce=\"n-{realm}\", algorithm=MD5, qop=\"auth\"\r\n"
        )
    };
    let refused = std::thread::scope(|s| {
        for (ua, realm) in [(&one, "one.example"), (&two, "two.example")] {
            let header = challenge(realm);
            s.spawn(move || {
                let invite = ua.expect_request("INVITE", WAIT);
                ua.respond(&invite, 401, "Unauthorized", &header);
                ua.expect_request("ACK", WAIT);
            });
        }
        alice.invite(sip, "sip:bob@example.com", "challenges-1", &mut |_, _| {})
    });
    assert_eq!(refused.status(), Some(401), "{}", refused.text);
    let mut realms: Vec<String> = refused
        .headers("WWW-Authenticate")
        .iter()
        .map(|c| {
            c.split("realm=\"")
                .nth(1)
                .unwrap_or("")
                .split('"')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    realms.sort();
    assert_eq!(realms, ["one.example", "two.example"], "{}", refused.text);
}
