//! The SIP port as an attacker sees it (#16): requests crafted to make a node relay,
//! reflect or skip authentication, against real `tandem` processes. Each test sends what a
//! scanner or a fraudster would and checks that the node refuses it, without harming the
//! legitimate phones around it.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tandem_failover_tests::cluster::{
    add_account, metric, wait_logins_opened, wait_metric, Cluster, MemberRole,
};
use tandem_failover_tests::ua::{Received, Ua};
use tandem_failover_tests::{recv_udp, status_code, Deadline, Node, SetOnDrop, Wait};

const WAIT: Duration = Duration::from_secs(10);

/// A standalone node serving alice and bob of example.com, with bob registered from
/// `bob`'s socket.
fn node_with_bob_registered(extra_sip: &str, bob: &mut Ua) -> Node {
    let node = Node::start_ready(extra_sip);
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    add_account(admin, &token, "bob", "example.com", "pw-bob-1");
    let contact = format!("<{}>", bob.contact());
    let r = bob.register(node.udp_addr(), "MD5", Some(&contact), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);
    node
}

/// Runs `call` while Bob's phone answers 486 to every INVITE it gets (and ACKs nothing:
/// the proxy ACKs the 486 hop by hop). Returns what `call` returned and every INVITE Bob
/// received.
fn while_bob_is_busy<T>(bob: &Ua, call: impl FnOnce() -> T) -> (T, Vec<Received>) {
    let stop = AtomicBool::new(false);
    let seen = Mutex::new(Vec::new());
    let out = std::thread::scope(|s| {
        let (stop, seen) = (&stop, &seen);
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(m) = bob.recv(Duration::from_millis(50)) else {
                    continue;
                };
                if m.method() == Some("INVITE") {
                    bob.respond(&m, 486, "Busy Here", "");
                    seen.lock().unwrap().push(m);
                }
            }
        });
        let stopping = SetOnDrop(stop);
        let out = call();
        drop(stopping);
        out
    });
    (out, seen.into_inner().unwrap())
}

#[test]
fn a_local_domain_in_any_case_or_with_a_trailing_dot_is_still_challenged() {
    // RFC 3261 §19.1.4: hosts compare case-insensitively, and a trailing dot names the
    // same domain. A caller writing the served domain differently is still a caller
    // claiming a local account, and must prove it.
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let node = node_with_bob_registered("", &mut bob);
    for domain in ["EXAMPLE.COM", "Example.Com", "example.com."] {
        let mut mallory = Ua::new("127.0.0.1", "alice", domain, "not-her-password");
        let (answer, reached_bob) = while_bob_is_busy(&bob, || {
            mallory.invite(
                node.udp_addr(),
                "sip:bob@example.com",
                &format!("case-{domain}"),
                &mut |_, _| {},
            )
        });
        node.check(
            answer.status() == Some(407) && reached_bob.is_empty(),
            || {
                format!(
                    "From alice@{domain} with a wrong password got {:?}, and {} INVITEs reached \
                 Bob:\n{}",
                    answer.status(),
                    reached_bob.len(),
                    answer.text
                )
            },
        );
        // With her password, the same spelling authenticates: the account is found.
        let mut alice = Ua::new("127.0.0.1", "alice", domain, "pw-alice-1");
        let (answer, reached_bob) = while_bob_is_busy(&bob, || {
            alice.invite(
                node.udp_addr(),
                "sip:bob@example.com",
                &format!("case-ok-{domain}"),
                &mut |_, _| {},
            )
        });
        node.check(
            answer.status() == Some(486) && reached_bob.len() == 1,
            || {
                format!(
                    "From alice@{domain} with her password got {:?}; {} INVITEs reached Bob",
                    answer.status(),
                    reached_bob.len()
                )
            },
        );
    }
}

/// A call from alice to bob through `node`, answered: returns Alice's dialog and the
/// INVITE as Bob received it.
fn answered_call(node: &Node, bob: &Ua, call_id: &str) -> tandem_failover_tests::ua::Dialog {
    let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-1");
    std::thread::scope(|s| {
        s.spawn(move || {
            let invite = bob.expect_request("INVITE", WAIT);
            bob.respond(
                &invite,
                200,
                "OK",
                &format!("Contact: <{}>\r\n", bob.contact()),
            );
            bob.expect_request("ACK", WAIT);
        });
        let ok = alice.invite(
            node.udp_addr(),
            "sip:bob@example.com",
            call_id,
            &mut |_, _| {},
        );
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        dialog
    })
}

#[test]
fn a_route_set_through_a_node_never_leads_outside_the_dialog() {
    // Mallory saw the Record-Route of a call (as anyone the call passed through, or any
    // caller who once reached a phone, does). He sends an in-dialog request from his own
    // socket, with the node's Route entries and then one of his choice: the node must not
    // send it there, or it relays anything anywhere from its own address.
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let node = node_with_bob_registered("", &mut bob);
    let dialog = answered_call(&node, &bob, "relay-1");
    assert!(!dialog.route.is_empty(), "the node record-routes calls");
    let victim = UdpSocket::bind("127.0.0.99:0").unwrap();
    let victim_addr = victim.local_addr().unwrap();
    let mallory = UdpSocket::bind("127.0.0.66:0").unwrap();
    let local = mallory.local_addr().unwrap();
    let mut request = format!(
        "MESSAGE sip:toll-fraud@{victim_addr} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-relay-{port};rport\r\n\
         From: <sip:bob@example.com>;tag=spoofed\r\n\
         To: {to}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 77 MESSAGE\r\n\
         Max-Forwards: 70\r\n",
        port = local.port(),
        to = dialog.to,
        call_id = dialog.call_id,
    );
    for r in &dialog.route {
        request.push_str(&format!("Route: {r}\r\n"));
    }
    request.push_str(&format!("Route: <sip:{victim_addr};lr>\r\n"));
    // An ACK with the same route set goes first: an ACK is never answered, so only what
    // reaches the victim tells. The MESSAGE after it (same call, so handled after it)
    // is the fence.
    // It carries Alice's real tag, as a party to the call appending a Route would.
    let ack = request
        .replacen("MESSAGE", "ACK", 1)
        .replace("77 MESSAGE", "1 ACK")
        .replace("z9hG4bK-relay-", "z9hG4bK-relay-ack-")
        .replace(
            "From: <sip:bob@example.com>;tag=spoofed",
            &format!("From: <sip:alice@example.com>;tag={}", dialog.from_tag),
        )
        + "Content-Length: 0\r\n\r\n";
    mallory.send_to(ack.as_bytes(), node.udp_addr()).unwrap();
    request.push_str("Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello");
    // The node may refuse it, or send it on along the dialog, to Bob (who answers): never
    // to the Route of Mallory's choosing.
    let answer = std::thread::scope(|s| {
        let bob = &bob;
        s.spawn(move || {
            if let Some(m) = bob.recv(WAIT).filter(|m| m.method() == Some("MESSAGE")) {
                bob.respond(&m, 200, "OK", "");
            }
        });
        mallory
            .send_to(request.as_bytes(), node.udp_addr())
            .unwrap();
        let deadline = Deadline::after(WAIT);
        let mut answer = None;
        while let Some(d) = recv_udp(&mallory, deadline.remaining()) {
            if status_code(&d).is_some_and(|s| s >= 200) {
                answer = Some(d);
                break;
            }
        }
        answer
    });
    // A proxy sends a request to one place before the answer comes back from there, so
    // once Mallory has his answer, anything sent to the victim is already in its socket.
    let at_victim = recv_udp(&victim, Duration::from_millis(1));
    node.check(at_victim.is_none(), || {
        format!(
            "the node relayed Mallory's requests to {victim_addr}:\n{}",
            String::from_utf8_lossy(at_victim.as_deref().unwrap_or_default())
        )
    });
    let status = answer.as_deref().and_then(status_code);
    node.check(status.is_some(), || {
        "Mallory got no final answer: the request went somewhere that did not answer".into()
    });
}

#[test]
fn refusals_of_unauthenticated_invites_are_sent_once_and_keep_no_state() {
    // A spoofed INVITE names a victim's address as its source, and the victim never
    // ACKs. Answered through an INVITE server transaction, the refusal would be
    // retransmitted about 11 times over 32 s: a reflection amplifier. Answered
    // statelessly, one INVITE gets one response and the node keeps no transaction for
    // it.
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    let victim = UdpSocket::bind("127.0.0.98:0").unwrap();
    let local = victim.local_addr().unwrap();
    let cases = [
        // A caller claiming a local account, without credentials: 407.
        ("sip:bob@example.com", "sip:alice@example.com", 407),
        // A domain the node does not serve: 403.
        (
            "sip:+15550100@elsewhere.example",
            "sip:x@elsewhere.example",
            403,
        ),
        // A served domain, an unknown user: 404.
        ("sip:nobody@example.com", "sip:x@elsewhere.example", 404),
    ];
    for (i, (to, from, want)) in cases.into_iter().enumerate() {
        let invite = stranger_invite(local, to, from, &format!("reflect-{i}"));
        victim.send_to(invite.as_bytes(), node.udp_addr()).unwrap();
        let deadline = Deadline::after(WAIT);
        let mut status = None;
        while let Some(d) = recv_udp(&victim, deadline.remaining()) {
            if let Some(s) = status_code(&d).filter(|&s| s >= 200) {
                status = Some(s);
                break;
            }
        }
        node.check(status == Some(want), || {
            format!("INVITE to {to} from {from}: got {status:?}, want {want}")
        });
        // No transaction is left to retransmit it. Kept, it would stay until Timer H
        // (64*T1, 32 s) gave up on the ACK.
        let held = "tandem_sip_transactions_held";
        wait_metric(&node, node.admin_addr(), held, 0.0, WAIT);
    }
}

/// An INVITE without credentials from `from` at `local` to `to`; `name` makes its branch,
/// tag and Call-ID (`<name>-<port>`) its own.
fn stranger_invite(local: std::net::SocketAddr, to: &str, from: &str, name: &str) -> String {
    let port = local.port();
    format!(
        "INVITE {to} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-{name}-{port}\r\n\
         From: <{from}>;tag={name}\r\n\
         To: <{to}>\r\n\
         Call-ID: {name}-{port}\r\n\
         CSeq: 1 INVITE\r\n\
         Max-Forwards: 70\r\n\
         Contact: <sip:x@{local}>\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// An INVITE from alice (from `socket`) to `to` through `node`, with `auth` if given.
fn raw_invite(socket: &UdpSocket, to: &str, call_id: &str, branch: &str, auth: &str) -> String {
    let local = socket.local_addr().unwrap();
    format!(
        "INVITE {to} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
         From: <sip:alice@example.com>;tag=a-{call_id}\r\n\
         To: <{to}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Max-Forwards: 70\r\n\
         Contact: <sip:alice@{local}>\r\n\
         {auth}Content-Length: 0\r\n\r\n"
    )
}

/// The first final response on `socket` within WAIT, as text.
fn final_response(socket: &UdpSocket) -> Option<String> {
    let deadline = Deadline::after(WAIT);
    while let Some(d) = recv_udp(socket, deadline.remaining()) {
        if status_code(&d).is_some_and(|s| s >= 200) {
            return Some(String::from_utf8_lossy(&d).into_owned());
        }
    }
    None
}

/// The `Proxy-Authenticate` challenge (MD5) of a 407's text.
fn proxy_challenge(text: &str) -> String {
    text.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case("Proxy-Authenticate"))
        .map(|(_, v)| v.trim().to_owned())
        .find(|c| c.contains("algorithm=MD5"))
        .unwrap_or_else(|| panic!("no MD5 challenge in:\n{text}"))
}

#[test]
fn a_captured_invite_cannot_be_replayed_through_any_node_or_to_another_number() {
    // Mallory captured alice's authenticated INVITE to Bob (on her network, say). He sends
    // it again from her address, as UDP lets him: to the node that challenged her, to
    // another node of the cluster, and with the Request-URI changed to the number he
    // wants to call. None of it may reach anyone.
    use tandem_failover_tests::cluster::{Cluster, MemberRole};
    use tandem_failover_tests::ua::digest_authorization;
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let (one, two) = (cluster.member(1), cluster.member(2));
    for (user, pw) in [
        ("alice", "pw-alice-1"),
        ("bob", "pw-bob-1"),
        ("carol", "pw-carol-1"),
    ] {
        add_account(one.admin_addr, &token, user, "example.com", pw);
    }
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let mut carol = Ua::new("127.0.0.1", "carol", "example.com", "pw-carol-1");
    for ua in [&mut bob, &mut carol] {
        let contact = format!("<{}>", ua.contact());
        let r = ua.register(one.sip_addr(), "MD5", Some(&contact), Some(600));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    Wait::new("node 2 to hold both bindings", WAIT)
        .showing(&cluster)
        .until(|| {
            ["bob", "carol"].iter().all(|u| {
                tandem_failover_tests::cluster::http(
                    two.admin_addr,
                    Some(&token),
                    "GET",
                    &format!("/v1/accounts/example.com/{u}/bindings"),
                    None,
                )
                .is_some_and(|r| r.json().as_array().is_some_and(|a| !a.is_empty()))
            })
        });

    // Alice's call, as she made it: 407, then the INVITE with her credentials.
    let alice = UdpSocket::bind("127.0.0.1:0").unwrap();
    let bob_uri = "sip:bob@example.com";
    alice
        .send_to(
            raw_invite(&alice, bob_uri, "c1", "z9hG4bK-c1-a", "").as_bytes(),
            one.sip_addr(),
        )
        .unwrap();
    let challenge = final_response(&alice).expect("a 407");
    assert!(challenge.starts_with("SIP/2.0 407"), "{challenge}");
    let auth = digest_authorization(
        "alice",
        "pw-alice-1",
        &proxy_challenge(&challenge),
        "INVITE",
        bob_uri,
        1,
        "c1",
    );
    let auth = format!("Proxy-Authorization: {auth}\r\n");
    let (answer, reached) = while_bob_is_busy(&bob, || {
        alice
            .send_to(
                raw_invite(&alice, bob_uri, "c1", "z9hG4bK-c1-b", &auth).as_bytes(),
                one.sip_addr(),
            )
            .unwrap();
        final_response(&alice)
    });
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("SIP/2.0 486"))
            && reached.len() == 1,
        "alice's own call did not reach Bob: {answer:?}"
    );

    // The replays, each a new transaction and a new call from alice's address.
    let mallory = UdpSocket::bind("127.0.0.1:0").unwrap();
    let replays = [
        (
            "to the node that challenged her",
            one.sip_addr(),
            bob_uri,
            "r1",
        ),
        ("to another node", two.sip_addr(), bob_uri, "r2"),
        (
            "to another number",
            one.sip_addr(),
            "sip:carol@example.com",
            "r3",
        ),
        (
            "to another number, through another node",
            two.sip_addr(),
            "sip:carol@example.com",
            "r4",
        ),
    ];
    for (what, node, to, call) in replays {
        let stop = AtomicBool::new(false);
        let (answer, reached) = std::thread::scope(|s| {
            let carol_heard = s.spawn(|| {
                let mut heard = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(m) = carol.recv(Duration::from_millis(50)) {
                        if m.method() == Some("INVITE") {
                            carol.respond(&m, 486, "Busy Here", "");
                            heard.push(m);
                        }
                    }
                }
                heard
            });
            let stopping = SetOnDrop(&stop);
            let (answer, mut reached) = while_bob_is_busy(&bob, || {
                let replay = raw_invite(&mallory, to, call, &format!("z9hG4bK-{call}"), &auth);
                mallory.send_to(replay.as_bytes(), node).unwrap();
                final_response(&mallory)
            });
            drop(stopping);
            reached.extend(carol_heard.join().unwrap());
            (answer, reached)
        });
        let status = answer.as_deref().and_then(|a| status_code(a.as_bytes()));
        if status != Some(407) || !reached.is_empty() {
            cluster.panic_with_logs(&format!(
                "the replayed INVITE {what} got {status:?} and reached {} phones:\n{}",
                reached.len(),
                answer.unwrap_or_default()
            ));
        }
    }
}

#[test]
fn credentials_computed_for_another_request_uri_are_refused() {
    // RFC 3261 §22.4: the digest `uri` is the Request-URI. Credentials computed for one
    // are not good for another.
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-1");
    let contact = format!("<{}>", alice.contact());
    let asked = alice.register_once(node.udp_addr(), Some(&contact), Some(600), "");
    assert_eq!(asked.status, 401, "{}", asked.text);
    let challenge = asked
        .headers("WWW-Authenticate")
        .into_iter()
        .find(|c| c.contains("algorithm=MD5"))
        .expect("an MD5 challenge");
    let auth = tandem_failover_tests::ua::digest_authorization(
        "alice",
        "pw-alice-1",
        &challenge,
        "REGISTER",
        "sip:elsewhere.example",
        1,
        "x",
    );
    let r = alice.register_once(
        node.udp_addr(),
        Some(&contact),
        Some(600),
        &format!("Authorization: {auth}\r\n"),
    );
    node.check(r.status == 401, || {
        format!(
            "credentials for sip:elsewhere.example registered at sip:example.com:\n{}",
            r.text
        )
    });
}

#[test]
fn a_forged_answer_from_a_dead_nodes_address_does_not_bring_it_back() {
    // Node 2 dies. Mallory sends node 1 "200 OK" answers to its pings in node 2's name,
    // from node 2's very address (free now), guessing at what the pings carried: were
    // node 1 to believe them, it would keep sending calls through a dead node instead of
    // straight to the phones.
    use tandem_failover_tests::cluster::{Cluster, MemberRole};
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let (one, two) = (cluster.member(1), cluster.member(2));
    let series = "tandem_sip_peer_up{node=\"2\"}";
    let peer_up = || metric(one.admin_addr, series);
    let wait_for = |want: f64| wait_metric(&cluster, one.admin_addr, series, want, WAIT);
    wait_for(1.0);
    let addr = two.sip_addr();
    two.sigkill();
    assert!(two.wait_exit(WAIT).is_some(), "node 2 did not die");
    wait_for(0.0);

    let mallory = UdpSocket::bind(addr).expect("node 2's address is free once it died");
    let node1 = one.sip_addr();
    for guess in 0..2_000u64 {
        let forged = format!(
            "SIP/2.0 200 OK\r\n\
             Via: SIP/2.0/UDP {node1};branch=z9hG4bKtdmping.2.{guess};rport\r\n\
             From: <sip:node1@{node1}>;tag=ping1\r\n\
             To: <sip:{addr}>;tag=forged\r\n\
             Call-ID: tandem-ping-1-2-{guess}\r\n\
             CSeq: {guess} OPTIONS\r\n\
             Content-Length: 0\r\n\r\n"
        );
        mallory.send_to(forged.as_bytes(), node1).unwrap();
    }
    // The fence: node 1 handles this socket's datagrams in order, so once it has answered
    // an OPTIONS sent after the forgeries, it has seen every one of them.
    let probe = tandem_failover_tests::options_request("UDP", addr, node1, "z9hG4bK-fence-1");
    mallory.send_to(probe.as_bytes(), node1).unwrap();
    let (_, fence) = tandem_failover_tests::recv_udp_until(&mallory, WAIT, |d| {
        String::from_utf8_lossy(d).contains("z9hG4bK-fence-1") && status_code(d).is_some()
    });
    assert!(fence.is_some(), "node 1 did not answer the fence OPTIONS");
    let seen = peer_up();
    if seen != Some(0.0) {
        cluster.panic_with_logs(&format!(
            "forged answers brought node 2 back up in node 1's eyes: peer_up {seen:?}"
        ));
    }
}

/// The Date of a ping answer moves a node's clock (node/DESIGN.md, "Clocks"), so forged
/// answers must not. Nodes 2 and 3 die; Mallory takes both their addresses and answers
/// node 1's pings in their names with a Date an hour ahead, guessing at the tokens: two
/// peers agreeing would be enough to move node 1's clock, were it to believe them.
#[test]
fn forged_ping_answers_do_not_move_a_nodes_clock() {
    use tandem_failover_tests::cluster::{Cluster, MemberRole};
    let cluster = Cluster::form(&[MemberRole::Full; 3], "");
    let one = cluster.member(1);
    cluster.wait_peers_up(WAIT);
    let node1 = one.sip_addr();
    let mut mallory = Vec::new();
    for id in [2, 3] {
        let m = cluster.member(id);
        let addr = m.sip_addr();
        m.sigkill();
        assert!(m.wait_exit(WAIT).is_some(), "node {id} did not die");
        mallory.push((
            id,
            UdpSocket::bind(addr).expect("a dead node's address is free"),
        ));
    }
    let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
    let date = httpdate::fmt_http_date(ahead);
    for guess in 0..2_000u64 {
        for (id, socket) in &mallory {
            let addr = socket.local_addr().unwrap();
            let forged = format!(
                "SIP/2.0 200 OK\r\n\
                 Via: SIP/2.0/UDP {node1};branch=z9hG4bKtdmping.{id}.{guess:x};rport\r\n\
                 From: <sip:node1@{node1}>;tag=ping1\r\n\
                 To: <sip:{addr}>;tag=forged\r\n\
                 Call-ID: tandem-ping-1-{id}-{guess}\r\n\
                 CSeq: {guess} OPTIONS\r\n\
                 Date: {date}\r\n\
                 Content-Length: 0\r\n\r\n"
            );
            socket.send_to(forged.as_bytes(), node1).unwrap();
        }
    }
    // The fence, from each address: once node 1 has answered an OPTIONS sent after the
    // forgeries, it has seen every one of them.
    for (id, socket) in &mallory {
        let addr = socket.local_addr().unwrap();
        let branch = format!("z9hG4bK-clock-fence-{id}");
        let probe = tandem_failover_tests::options_request("UDP", addr, node1, &branch);
        socket.send_to(probe.as_bytes(), node1).unwrap();
        let (_, fence) = tandem_failover_tests::recv_udp_until(socket, WAIT, |d| {
            String::from_utf8_lossy(d).contains(&branch) && status_code(d).is_some()
        });
        assert!(fence.is_some(), "node 1 did not answer the fence OPTIONS");
    }
    let correction = metric(one.admin_addr, "tandem_clock_correction_ms");
    if correction != Some(0.0) {
        cluster.panic_with_logs(&format!(
            "forged ping answers moved node 1's clock: tandem_clock_correction_ms {correction:?}"
        ));
    }
}

#[test]
fn one_address_cannot_take_every_connection_and_a_peer_that_never_reads_is_dropped() {
    // Slot exhaustion over TCP: one address opening connection after connection, and a
    // peer that sends requests but never reads the answers (its window full, the node's
    // write would wait for ever and hold the slot and its task).
    use tandem_failover_tests::SipTcp;
    // The flood limit off: it would ban the slow peer long before its window filled,
    // and this test is about what the write deadline does on its own.
    let node = Node::start_ready(
        "max_connections = 16\nmax_connections_per_address = 4\nconnection_write_timeout_secs = 1\n\
         flood_requests_per_sec = 0",
    );
    let series = "tandem_sip_connections_open";
    let wait_open = |want: f64| wait_metric(&node, node.admin_addr(), series, want, WAIT);
    let tcp = node.tcp_addr();
    let mut held: Vec<SipTcp> = (0..4)
        .map(|_| SipTcp::connect_from("127.0.0.60", tcp))
        .collect();
    for c in &mut held {
        assert_eq!(c.options(WAIT), Some(200));
    }
    // The fifth from the same address is closed at once, unanswered.
    let mut fifth = SipTcp::connect_from("127.0.0.60", tcp);
    let (before, answer) = fifth.fence(WAIT);
    node.check(answer.is_none() && before.is_empty(), || {
        format!(
            "a fifth connection from one address was served: {:?}",
            answer.map(|a| String::from_utf8_lossy(&a).into_owned())
        )
    });
    // Another address is served meanwhile.
    let mut other = SipTcp::connect_from("127.0.0.61", tcp);
    node.check(other.options(WAIT) == Some(200), || {
        "another address was refused while one held its share".into()
    });
    drop((held, fifth, other));
    wait_open(0.0);

    // A peer that sends and never reads.
    let mut slow = SipTcp::connect_from("127.0.0.62", tcp);
    slow.stream()
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let local = slow.local_addr();
    let mut sent = 0;
    for i in 0..400_000 {
        let request =
            tandem_failover_tests::options_request("TCP", local, tcp, &format!("z9hG4bK-slow-{i}"));
        if slow.send(request.as_bytes()).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(
        sent < 400_000,
        "the node kept reading {sent} requests although nothing read its answers"
    );
    // The node's write to it is stuck: within its write timeout the connection goes.
    wait_open(0.0);
    // And a new connection is served.
    let mut after = SipTcp::connect_from("127.0.0.62", tcp);
    node.check(after.options(WAIT) == Some(200), || {
        "no answer after the slow peer was dropped".into()
    });
}

#[test]
fn known_scanners_get_no_answer_at_all() {
    // SIPVicious and its kind announce themselves in User-Agent. They get nothing back,
    // not even a 403 that would tell them a SIP server listens here, over UDP or TCP.
    let node = Node::start_ready("");
    let scanner = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = scanner.local_addr().unwrap();
    for (i, agent) in ["friendly-scanner", "SIPVicious 0.3.4", "sipcli/v1.8"]
        .into_iter()
        .enumerate()
    {
        let probe = tandem_failover_tests::options_request(
            "UDP",
            local,
            node.udp_addr(),
            &format!("z9hG4bK-scan-{i}"),
        )
        .replace(
            "Content-Length: 0\r\n",
            &format!("User-Agent: {agent}\r\nContent-Length: 0\r\n"),
        );
        scanner.send_to(probe.as_bytes(), node.udp_addr()).unwrap();
    }
    // The fence: an ordinary OPTIONS from the same socket, answered in order after them.
    let plain =
        tandem_failover_tests::options_request("UDP", local, node.udp_addr(), "z9hG4bK-plain");
    scanner.send_to(plain.as_bytes(), node.udp_addr()).unwrap();
    let fenced = tandem_failover_tests::nothing_before_fence(&scanner, WAIT, "z9hG4bK-plain");
    node.check(fenced.is_ok(), || format!("scanners: {fenced:?}"));
    // Over TCP too: the scanner's request gets nothing, the next one its 200.
    let mut conn = tandem_failover_tests::SipTcp::connect(node.tcp_addr());
    let local = conn.local_addr();
    let probe =
        tandem_failover_tests::options_request("TCP", local, node.tcp_addr(), "z9hG4bK-scan-tcp")
            .replace(
                "Content-Length: 0\r\n",
                "User-Agent: friendly-scanner\r\nContent-Length: 0\r\n",
            );
    conn.send(probe.as_bytes()).unwrap();
    let (before, answer) = conn.fence(WAIT);
    node.check(answer.is_some() && before.is_empty(), || {
        format!(
            "a scanner was answered over TCP: {:?}",
            String::from_utf8_lossy(&before)
        )
    });
    let dropped = metric(node.admin_addr(), "tandem_sip_scanners_dropped_total");
    node.check(dropped == Some(4.0), || {
        format!("tandem_sip_scanners_dropped_total {dropped:?}")
    });
}

#[test]
fn a_flood_bans_its_source_address_but_never_a_phone_that_proved_it_is_there() {
    // A scanner floods from an office's address (spoofed over UDP, or really sharing its
    // NAT). The address is banned, and its requests that prove nothing go unanswered; but
    // alice's phone there, which the node challenged before, still registers with her
    // nonce, and phones at other addresses never notice.
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    add_account(admin, &token, "bob", "example.com", "pw-bob-1");
    let office = "127.0.0.66";
    let mut alice = Ua::new(office, "alice", "example.com", "pw-alice-1");
    let contact = format!("<{}>", alice.contact());
    let first = alice.register_once(node.udp_addr(), Some(&contact), Some(600), "");
    assert_eq!(first.status, 401, "{}", first.text);
    let challenge = first.header("WWW-Authenticate").expect("a challenge");
    let answer = |alice: &Ua, nc| {
        format!(
            "Authorization: {}\r\n",
            alice.authorization(&challenge, "REGISTER", "sip:example.com", nc)
        )
    };
    let registered = alice.register_once(
        node.udp_addr(),
        Some(&contact),
        Some(600),
        &answer(&alice, 1),
    );
    assert_eq!(registered.status, 200, "{}", registered.text);

    // The flood: far more OPTIONS than the default burst (400) and rate (100/s) allow.
    let flooder = UdpSocket::bind((office, 0)).unwrap();
    let local = flooder.local_addr().unwrap();
    for i in 0..2000 {
        let probe = tandem_failover_tests::options_request(
            "UDP",
            local,
            node.udp_addr(),
            &format!("z9hG4bK-flood-{i}"),
        );
        let _ = flooder.send_to(probe.as_bytes(), node.udp_addr());
    }
    wait_metric(&node, admin, "tandem_sip_flood_bans_total", 1.0, WAIT);

    // An unproven request from the banned address gets nothing. The fence: a CANCEL of
    // the same call (CANCEL passes a ban so that a caller there can still stop a ringing
    // call), answered 481 after whatever the OPTIONS would have got.
    let probe_socket = UdpSocket::bind((office, 0)).unwrap();
    let local = probe_socket.local_addr().unwrap();
    let probe =
        tandem_failover_tests::options_request("UDP", local, node.udp_addr(), "z9hG4bK-banned");
    probe_socket
        .send_to(probe.as_bytes(), node.udp_addr())
        .unwrap();
    let cancel = probe
        .replace("OPTIONS sip:", "CANCEL sip:")
        .replace("z9hG4bK-banned", "z9hG4bK-fence")
        .replace(" OPTIONS\r\n", " CANCEL\r\n");
    probe_socket
        .send_to(cancel.as_bytes(), node.udp_addr())
        .unwrap();
    let fenced = tandem_failover_tests::nothing_before_fence(&probe_socket, WAIT, "z9hG4bK-fence");
    node.check(fenced.is_ok(), || format!("the banned address: {fenced:?}"));

    // Alice's phone proves it is there: her credentials answer a nonce issued to this
    // address. A phone elsewhere registers as always.
    let refreshed = alice.register_once(
        node.udp_addr(),
        Some(&contact),
        Some(600),
        &answer(&alice, 2),
    );
    node.check(refreshed.status == 200, || {
        format!(
            "alice at the banned address could not refresh:\n{}",
            refreshed.text
        )
    });
    let mut bob = Ua::new("127.0.0.67", "bob", "example.com", "pw-bob-1");
    let bob_contact = format!("<{}>", bob.contact());
    let r = bob.register(node.udp_addr(), "MD5", Some(&bob_contact), Some(600));
    node.check(r.status == 200, || format!("bob elsewhere: {}", r.text));
    let dropped = metric(admin, "tandem_sip_flood_dropped_total").unwrap_or(0.0);
    node.check(dropped >= 1.0, || {
        format!("tandem_sip_flood_dropped_total {dropped}")
    });
}

/// Sends `request` from `socket` to `node` and returns the first final response.
fn final_answer(socket: &UdpSocket, node: std::net::SocketAddr, request: &str) -> Option<String> {
    socket.send_to(request.as_bytes(), node).unwrap();
    let deadline = Deadline::after(WAIT);
    while let Some(d) = recv_udp(socket, deadline.remaining()) {
        if status_code(&d).is_some_and(|s| s >= 200) {
            return Some(String::from_utf8_lossy(&d).into_owned());
        }
    }
    None
}

/// A request inside `dialog` as Alice would send it, with `to` as its To value.
fn in_dialog(
    dialog: &tandem_failover_tests::ua::Dialog,
    local: std::net::SocketAddr,
    method: &str,
    cseq: u32,
    to: &str,
) -> String {
    tandem_failover_tests::ua::in_dialog_request(
        ("alice", "example.com"),
        dialog,
        local,
        method,
        cseq,
        to,
    )
}

#[test]
fn a_route_set_opens_only_its_own_dialog_and_only_while_the_call_is_up() {
    // Whoever saw a call's Record-Route (either party, or anyone on its path) holds
    // tokens that name Bob's flow. They must open nothing but that very dialog, and only
    // until it ends: not another dialog of the same Call-ID, and not Bob's phone after
    // the BYE, or anyone could reach it without a 407 for ever.
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let node = node_with_bob_registered("", &mut bob);
    let dialog = answered_call(&node, &bob, "token-life-1");
    let mallory = UdpSocket::bind("127.0.0.66:0").unwrap();
    let local = mallory.local_addr().unwrap();

    // Another dialog of the same call: Alice's tag, but a To tag Bob never gave.
    let forged_to = "<sip:bob@example.com>;tag=not-bobs";
    let answer = final_answer(
        &mallory,
        node.udp_addr(),
        &in_dialog(&dialog, local, "MESSAGE", 5, forged_to),
    );
    node.check(
        answer.as_deref().and_then(|a| status_code(a.as_bytes())) == Some(481),
        || format!("a request for a dialog Bob never made was answered {answer:?}"),
    );

    // The call ends: Alice's BYE reaches Bob through the node, without the credentials
    // for the node's realm that phones put on it (baresip and linphone do).
    let bye = std::thread::scope(|s| {
        let bob = &bob;
        let seen = s.spawn(move || {
            let bye = bob.expect_request("BYE", WAIT);
            bob.respond(&bye, 200, "OK", "");
            bye
        });
        let with_credentials = in_dialog(&dialog, local, "BYE", 6, &dialog.to).replace(
            "Content-Length: 0\r\n",
            "Proxy-Authorization: Digest username=\"alice\", realm=\"example.com\", \
             nonce=\"n\", uri=\"sip:bob@example.com\", response=\"00\"\r\n\
             Content-Length: 0\r\n",
        );
        let answer = final_answer(&mallory, node.udp_addr(), &with_credentials);
        let seen = seen.join().unwrap();
        assert!(
            !seen.text.contains("Proxy-Authorization"),
            "the caller's credentials reached Bob:\n{}",
            seen.text
        );
        answer
    });
    node.check(
        bye.as_deref().and_then(|a| status_code(a.as_bytes())) == Some(200),
        || format!("the BYE was answered {bye:?}"),
    );

    // After the BYE, the same route set opens nothing: the node answers 481 itself, and
    // Bob hears nothing (a proxy sends a request on before any answer comes back, so
    // anything forwarded would be in Bob's socket by now).
    let after = final_answer(
        &mallory,
        node.udp_addr(),
        &in_dialog(&dialog, local, "INVITE", 7, &dialog.to),
    );
    let at_bob = bob.recv(Duration::from_millis(1));
    node.check(
        after.as_deref().and_then(|a| status_code(a.as_bytes())) == Some(481) && at_bob.is_none(),
        || {
            format!(
                "after the call, its route set was answered {after:?}, and Bob got {:?}",
                at_bob.map(|m| m.text)
            )
        },
    );
    let dialogs = metric(node.admin_addr(), "tandem_proxy_dialogs");
    node.check(dialogs == Some(0.0), || {
        format!("tandem_proxy_dialogs {dialogs:?}")
    });
}

#[test]
fn an_account_places_no_more_calls_than_its_limit_allows() {
    // Stolen credentials are used for toll fraud in bulk: as many calls at once as the
    // attacker can place. An account's max_concurrent_calls caps that.
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let node = node_with_bob_registered("", &mut bob);
    let (admin, token) = (node.admin_addr(), node.admin_token());
    let set = tandem_failover_tests::cluster::http(
        admin,
        Some(&token),
        "PUT",
        "/v1/accounts/example.com/alice",
        Some(r#"{"max_concurrent_calls":2}"#),
    );
    assert_eq!(set.map(|a| a.status), Some(200));
    let first = answered_call(&node, &bob, "limit-1");
    let _second = answered_call(&node, &bob, "limit-2");
    // The third, while two are up: refused by the node, Bob never rings.
    let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-1");
    let (third, reached_bob) = while_bob_is_busy(&bob, || {
        alice.invite(
            node.udp_addr(),
            "sip:bob@example.com",
            "limit-3",
            &mut |_, _| {},
        )
    });
    node.check(
        third.status() == Some(403) && reached_bob.is_empty(),
        || {
            format!(
                "a third call with a limit of two got {:?}, and {} INVITEs reached Bob:\n{}",
                third.status(),
                reached_bob.len(),
                third.text
            )
        },
    );
    let refused = metric(admin, "tandem_proxy_call_limit_refusals_total");
    node.check(refused == Some(1.0), || {
        format!("tandem_proxy_call_limit_refusals_total {refused:?}")
    });
    // One call ends; a new one goes through.
    std::thread::scope(|s| {
        let bob = &bob;
        s.spawn(move || {
            let bye = bob.expect_request("BYE", WAIT);
            bob.respond(&bye, 200, "OK", "");
        });
        let ok = final_answer(
            &alice.socket,
            node.udp_addr(),
            &in_dialog(&first, alice.local(), "BYE", 9, &first.to),
        );
        assert_eq!(
            ok.as_deref().and_then(|a| status_code(a.as_bytes())),
            Some(200)
        );
    });
    let _fourth = answered_call(&node, &bob, "limit-4");
}

#[test]
fn a_full_transaction_table_sheds_new_requests_with_503_instead_of_growing() {
    // A MESSAGE from outside to bob is relayed to his phone, which never answers: its
    // server transaction waits for the relay's Timer F (32 s), then absorbs the
    // sender's retransmissions until Timer J. With the table capped at 1,000, a sender
    // (exempt from the flood limit, so it is the cap that stops it) gets 503 with
    // Retry-After for what comes past the cap, and nothing is kept for it.
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let node = node_with_bob_registered(
        "max_transactions = 1000\nflood_exempt = [\"127.0.0.88\"]",
        &mut bob,
    );
    let admin = node.admin_addr();
    let sender = UdpSocket::bind("127.0.0.88:0").unwrap();
    let local = sender.local_addr().unwrap();
    let port = local.port();
    let mut statuses = std::collections::BTreeMap::new();
    let mut refusal = None;
    let mut tally = |d: &[u8]| {
        if let Some(s) = status_code(d) {
            *statuses.entry(s).or_insert(0u32) += 1;
            if s == 503 && refusal.is_none() {
                refusal = Some(String::from_utf8_lossy(d).into_owned());
            }
        }
    };
    for i in 0..1300 {
        let message = format!(
            "MESSAGE sip:bob@example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-full-{i}-{port}\r\n\
             From: <sip:x@elsewhere.example>;tag=full-{i}\r\n\
             To: <sip:bob@example.com>\r\n\
             Call-ID: full-{i}-{port}\r\n\
             CSeq: 1 MESSAGE\r\n\
             Max-Forwards: 70\r\n\
             Content-Type: text/plain\r\n\
             Content-Length: 2\r\n\r\nhi"
        );
        sender.send_to(message.as_bytes(), node.udp_addr()).unwrap();
        // Paced a little, so no socket buffer overflows on the way.
        if i % 50 == 49 {
            while let Some(d) = recv_udp(&sender, Duration::from_millis(20)) {
                tally(&d);
            }
        }
    }
    while let Some(d) = recv_udp(&sender, Duration::from_secs(1)) {
        tally(&d);
    }
    let held = metric(admin, "tandem_sip_transactions_held").unwrap_or(-1.0);
    let refused = metric(admin, "tandem_sip_transactions_refused_total").unwrap_or(0.0);
    node.check((900.0..=1000.0).contains(&held) && refused >= 1.0, || {
        format!("held {held}, refused {refused}; answers {statuses:?}")
    });
    node.check(
        refusal
            .as_deref()
            .is_some_and(|r| r.starts_with("SIP/2.0 503") && r.contains("Retry-After: 5")),
        || format!("no 503 with Retry-After: answers {statuses:?}, first 503 {refusal:?}"),
    );
}

/// An overload loses BYEs (UDP drops them, callers give up), and each lost BYE leaves a
/// dialog nobody uses again. With the table capped at 100 and dialogs unused for 2 s
/// evictable, a hundred answered calls whose BYEs never come fill it:
/// - a new call at once gets 503, and no call is forgotten for it (each is in use as far
///   as the node can tell);
/// - 2 s later a stranger's call to Bob still gets 503, never reaching Bob: traffic
///   nobody vouched for never evicts a customer's call;
/// - Alice's next call goes through, in the place of the call unused longest; that call
///   may still be up, so its BYE still reaches Bob (and after it, nothing more passes).
#[test]
fn a_full_dialog_table_makes_room_from_dialogs_long_unused_but_never_for_a_stranger() {
    let node = Node::start_env(
        &tandem_failover_tests::sip_config(
            tandem_failover_tests::free_port(),
            "max_dialogs = 100\ndialog_evict_idle_secs = 2\nflood_exempt = [\"127.0.0.1\"]",
        ),
        &[("TANDEM_TEST_SHORT_TIMERS", "1")],
    );
    node.wait_ready();
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    add_account(admin, &token, "bob", "example.com", "pw-bob-1");
    let unlimited = tandem_failover_tests::cluster::http(
        admin,
        Some(&token),
        "PUT",
        "/v1/accounts/example.com/alice",
        Some(r#"{"max_concurrent_calls":0}"#),
    );
    assert_eq!(unlimited.map(|a| a.status), Some(200));
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let contact = format!("<{}>", bob.contact());
    let r = bob.register(node.udp_addr(), "MD5", Some(&contact), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);

    let lost: Vec<_> = (0..100)
        .map(|i| answered_call(&node, &bob, &format!("lost-bye-{i}")))
        .collect();
    let dialogs = metric(admin, "tandem_proxy_dialogs");
    node.check(dialogs == Some(100.0), || {
        format!("tandem_proxy_dialogs {dialogs:?} after 100 answered calls")
    });
    let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-1");
    let (at_once, reached_bob) = while_bob_is_busy(&bob, || {
        alice.invite(
            node.udp_addr(),
            "sip:bob@example.com",
            "fresh-0",
            &mut |_, _| {},
        )
    });
    node.check(
        at_once.status() == Some(503) && reached_bob.is_empty(),
        || {
            format!(
                "a call into a full table of dialogs used a moment ago got {:?} ({} INVITEs \
                 reached Bob):\n{}",
                at_once.status(),
                reached_bob.len(),
                at_once.text
            )
        },
    );

    std::thread::sleep(Duration::from_millis(2500));
    let stranger = UdpSocket::bind("127.0.0.66:0").unwrap();
    // The stranger's INVITE to Bob (branch, tag and Call-ID made of `name`), and its final answer.
    let stranger_calls = |name: &str| {
        final_answer(
            &stranger,
            node.udp_addr(),
            &stranger_invite(
                stranger.local_addr().unwrap(),
                "sip:bob@example.com",
                "sip:someone@elsewhere.example",
                name,
            ),
        )
    };
    let (strangers, reached_bob) = while_bob_is_busy(&bob, || stranger_calls("stranger"));
    node.check(
        strangers
            .as_deref()
            .is_some_and(|a| a.starts_with("SIP/2.0 503"))
            && reached_bob.is_empty(),
        || {
            format!(
                "a stranger's call into a table full of Alice's calls got {strangers:?}, and \
                 {} INVITEs reached Bob",
                reached_bob.len()
            )
        },
    );
    // A stranger who keeps asking gets 503 every time, and the node's log a line a second
    // at most, not one per request.
    let flood_started = Deadline::after(Duration::ZERO);
    for i in 0..30 {
        let answer = stranger_calls(&format!("stranger-flood-{i}"));
        node.check(
            answer
                .as_deref()
                .is_some_and(|a| a.starts_with("SIP/2.0 503")),
            || format!("stranger INVITE {i} into a full table got {answer:?}"),
        );
    }
    let flood_secs = flood_started.elapsed().as_secs();
    let lines = node
        .log()
        .matches("the dialog table is full of dialogs in use")
        .count() as u64;
    // One for Alice's refusal, one for the stranger's first, then one a second.
    node.check(lines <= 3 + flood_secs, || {
        format!("{lines} log lines for 32 refusals, 30 of them in {flood_secs} s")
    });
    let (evicted, refused) = (
        metric(admin, "tandem_proxy_dialogs_evicted_total"),
        metric(admin, "tandem_proxy_dialogs_refused_total"),
    );
    node.check(evicted == Some(0.0) && refused == Some(32.0), || {
        format!("evicted {evicted:?}, refused {refused:?} after 32 refusals")
    });

    let _fresh = answered_call(&node, &bob, "fresh-1");
    let evicted = metric(admin, "tandem_proxy_dialogs_evicted_total");
    node.check(evicted == Some(1.0), || {
        format!("tandem_proxy_dialogs_evicted_total {evicted:?} after a call made room")
    });
    // Each from a socket of its own: the branch is made of the CSeq and the port.
    let bye = |dialog: &tandem_failover_tests::ua::Dialog, cseq: u32| {
        let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
        final_answer(
            &caller,
            node.udp_addr(),
            &in_dialog(
                dialog,
                caller.local_addr().unwrap(),
                "BYE",
                cseq,
                &dialog.to,
            ),
        )
    };
    // The evicted call may have been up all along: its BYE still reaches Bob, and so
    // does that of a call that kept its place.
    for (n, what) in [(0, "the evicted call"), (1, "a call that kept its place")] {
        std::thread::scope(|s| {
            let bob = &bob;
            s.spawn(move || {
                let bye = bob.expect_request("BYE", WAIT);
                bob.respond(&bye, 200, "OK", "");
            });
            let answer = bye(&lost[n], lost[n].cseq + 1);
            node.check(
                answer
                    .as_deref()
                    .is_some_and(|a| a.starts_with("SIP/2.0 200")),
                || format!("the BYE of {what} got {answer:?}"),
            );
        });
    }
    // Once that BYE was answered, the evicted call is over: nothing more passes in it.
    let after = bye(&lost[0], lost[0].cseq + 2);
    node.check(
        after
            .as_deref()
            .is_some_and(|a| a.starts_with("SIP/2.0 481")),
        || format!("a request in the evicted call after its BYE got {after:?}"),
    );
}

use tandem_failover_tests::srv_phone::stun_binding_request as stun_request;

/// RFC 5626 §4.4.2 keepalives on the SIP port: a phone's STUN Binding request gets the
/// address it was seen from, so the phone knows its flow is alive. What a scanner would
/// send instead gets nothing: other STUN methods, comprehension-required attributes
/// (never echoed back in a 420), lengths that lie, and a flood from one address, which is
/// banned like a SIP flood so a forged source cannot turn the node into a reflector.
#[test]
fn stun_keepalives_are_answered_and_nothing_else_that_looks_like_stun_is() {
    let node = Node::start_ready("");
    let admin = node.admin_addr();
    let phone = UdpSocket::bind("127.0.0.71:0").unwrap();
    let local = phone.local_addr().unwrap();
    phone
        .send_to(&stun_request(b"keepalive-01", &[]), node.udp_addr())
        .unwrap();
    let answer = recv_udp(&phone, WAIT).expect("an answer to a STUN Binding request");
    node.check(answer.len() == 32 && answer[0..2] == [0x01, 0x01], || {
        format!("not a Binding success response: {answer:x?}")
    });
    node.check(&answer[8..20] == b"keepalive-01", || {
        format!("another transaction id: {answer:x?}")
    });
    // XOR-MAPPED-ADDRESS: the phone's own address, xored with the magic cookie.
    let port = u16::from_be_bytes([answer[26], answer[27]]) ^ 0x2112;
    let ip = u32::from_be_bytes([answer[28], answer[29], answer[30], answer[31]]) ^ 0x2112_A442;
    node.check(
        port == local.port()
            && std::net::Ipv4Addr::from(ip) == std::net::Ipv4Addr::new(127, 0, 0, 71),
        || {
            format!(
                "mapped {}:{port}, sent from {local}",
                std::net::Ipv4Addr::from(ip)
            )
        },
    );

    // What gets nothing. The fence: one more good request, whose answer must be the
    // first thing back.
    let software = [0x80, 0x22, 0x00, 0x04, b't', b'e', b's', b't'];
    let username = [0x00, 0x06, 0x00, 0x04, b'e', b'v', b'i', b'l'];
    let mut allocate = stun_request(b"allocate-001", &[]);
    allocate[1] = 0x03;
    let mut lying = stun_request(b"lying-length", &software);
    lying[3] = 0x40;
    for bad in [
        stun_request(b"needs-user-1", &username),
        allocate,
        lying,
        stun_request(b"truncated-01", &[])[..19].to_vec(),
    ] {
        phone.send_to(&bad, node.udp_addr()).unwrap();
    }
    phone
        .send_to(&stun_request(b"fence-000001", &software), node.udp_addr())
        .unwrap();
    let next = recv_udp(&phone, WAIT).expect("an answer to the fence");
    node.check(&next[8..20] == b"fence-000001", || {
        format!("something else was answered first: {next:x?}")
    });

    // A flood of keepalives from one address is banned like any other flood.
    let flooder = UdpSocket::bind("127.0.0.72:0").unwrap();
    for i in 0..2000u32 {
        let mut id = *b"flood-000000";
        id[8..12].copy_from_slice(&i.to_be_bytes());
        let _ = flooder.send_to(&stun_request(&id, &[]), node.udp_addr());
    }
    wait_metric(&node, admin, "tandem_sip_flood_bans_total", 1.0, WAIT);
    let mut answered = 0;
    while recv_udp(&flooder, Duration::from_millis(300)).is_some() {
        answered += 1;
    }
    node.check(answered < 1000, || {
        format!("{answered} of 2000 flooded keepalives were answered")
    });
    flooder
        .send_to(&stun_request(b"after-ban-01", &[]), node.udp_addr())
        .unwrap();
    node.check(recv_udp(&flooder, Duration::from_secs(1)).is_none(), || {
        "a banned address still gets keepalive answers".into()
    });
    // The phone elsewhere is still answered, and the node counts what it answered.
    phone
        .send_to(&stun_request(b"still-there1", &[]), node.udp_addr())
        .unwrap();
    node.check(recv_udp(&phone, WAIT).is_some(), || {
        "the phone's keepalive went unanswered after the flood".into()
    });
    let answered = metric(admin, "tandem_sip_keepalives_received_total").unwrap_or(0.0);
    node.check(answered >= 3.0, || {
        format!("tandem_sip_keepalives_received_total {answered}")
    });
    node.assert_answers_options();
}

#[test]
fn strangers_calling_an_offline_phone_cost_the_leader_a_question_per_round_trip_not_per_call() {
    // Before it answers 480 a follower asks the leader how far it has applied, since the
    // phone may have just registered through another node. A stranger calling an offline
    // phone hundreds of times at once (no credentials: the caller is not local) must not
    // turn into hundreds of questions to the leader, nor leave a call unanswered.
    let cluster = Cluster::form(&[MemberRole::Full; 3], "");
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    add_account(
        cluster.member(1).admin_addr,
        token.trim(),
        "carol",
        "example.com",
        "pw-carol-1",
    );
    let (leader, _) = cluster.wait_for_leader(&[], WAIT);
    let follower = cluster.member(if leader == 1 { 2 } else { 1 });
    cluster.wait_caught_up(follower.id, WAIT);
    let series = "tandem_raft_catch_up_questions_total";
    let asked_before = metric(follower.admin_addr, series).expect("the metric");
    let stranger = UdpSocket::bind("127.0.0.77:0").unwrap();
    let local = stranger.local_addr().unwrap();
    const CALLS: usize = 300;
    let invites: Vec<String> = (0..CALLS)
        .map(|i| {
            stranger_invite(
                local,
                "sip:carol@example.com",
                "sip:x@elsewhere.example",
                &format!("offline-{i}"),
            )
        })
        .collect();
    // All at once; then, as a UDP caller would (Timer A), again every 500 ms for those
    // not answered yet, since a burst this size may overrun a socket buffer.
    let mut answered = std::collections::BTreeMap::new();
    let deadline = Deadline::after(WAIT);
    while answered.len() < CALLS && !deadline.expired() {
        for (i, invite) in invites.iter().enumerate() {
            if !answered.contains_key(&i) {
                let _ = stranger.send_to(invite.as_bytes(), follower.sip_addr());
            }
        }
        let round = Deadline::after(Duration::from_millis(500));
        while let Some(d) = recv_udp(&stranger, round.remaining()) {
            let text = String::from_utf8_lossy(&d);
            let call = text
                .split("Call-ID: offline-")
                .nth(1)
                .and_then(|rest| rest.split('-').next())
                .and_then(|n| n.parse::<usize>().ok());
            if let (Some(call), Some(s)) = (call, status_code(&d).filter(|&s| s >= 200)) {
                answered.insert(call, s);
            }
            if round.expired() {
                break;
            }
        }
    }
    let mut statuses = std::collections::BTreeMap::new();
    for s in answered.values() {
        *statuses.entry(*s).or_insert(0) += 1;
    }
    let asked = metric(follower.admin_addr, series).expect("the metric") - asked_before;
    eprintln!("{CALLS} calls to an offline phone: answers {statuses:?}, questions {asked}");
    assert_eq!(
        statuses.get(&480).copied(),
        Some(CALLS),
        "every call gets its 480: {statuses:?}"
    );
    assert!(asked >= 1.0, "the follower never asked the leader");
    assert!(
        asked <= 30.0,
        "{asked} questions to the leader for {CALLS} calls at once"
    );
}

/// Whoever sends credentials for accounts whose logins are not kept (wrong ones, from a
/// nonce of its own challenge) makes the node read those accounts, but never pushes out
/// the logins it keeps: past `registrar.opened_logins_max` a login is opened for its use
/// alone. Were the kept logins emptied to make room, anyone could undo the opening ahead
/// of use that carries a registration storm.
#[test]
fn credentials_past_the_opened_logins_cap_push_no_kept_login_out() {
    let node = Node::start_ready("\n[registrar]\nopened_logins_max = 2\n");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    for user in ["u1", "u2"] {
        add_account(admin, &token, user, "example.com", &format!("pw-{user}-1"));
    }
    wait_logins_opened(&node, admin, 2.0);
    // Past the cap: not opened ahead.
    for user in ["u3", "u4"] {
        add_account(admin, &token, user, "example.com", &format!("pw-{user}-1"));
    }
    let reads = || metric(admin, "tandem_auth_account_reads_total").expect("a /metrics series");
    let register = |ua: &mut Ua| {
        let contact = format!("<{}>", ua.contact());
        ua.register(node.udp_addr(), "MD5", Some(&contact), Some(600))
    };
    let mut u1 = Ua::new("127.0.0.1", "u1", "example.com", "pw-u1-1");
    let r = register(&mut u1);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(reads(), 0.0, "u1's login was not opened ahead");

    for user in ["u3", "u4", "u3", "u4"] {
        let mut guesser = Ua::new("127.0.0.7", user, "example.com", "a-wrong-guess");
        let r = register(&mut guesser);
        assert_ne!(
            r.status, 200,
            "a wrong password registered {user}: {}",
            r.text
        );
    }
    let after_guesses = reads();
    assert!(
        after_guesses >= 4.0,
        "the guesses read {after_guesses} accounts"
    );
    assert_eq!(
        metric(admin, "tandem_auth_logins_opened"),
        Some(2.0),
        "logins past the cap were kept"
    );
    let r = register(&mut u1);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        reads(),
        after_guesses,
        "the guesses pushed u1's opened login out"
    );
}
