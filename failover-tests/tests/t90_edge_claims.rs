//! t90: what the edge of a node promises, checked from outside with real sockets:
//!
//! - an address that keeps failing digest authentication is locked out (today: 20 failed
//!   round trips within a minute lock the source address out, for every account, for five
//!   minutes), while the same account still registers from another address;
//! - a request that comes back to the node unchanged (a loop, RFC 3261 §16.3 step 4) gets
//!   482, which reaches the caller, while a spiral (back with a new Request-URI) passes;
//! - a phone registered over TCP or TLS is called over the very connection it registered
//!   on (the only way to reach a phone behind NAT): INVITE, ACK and BYE all arrive there,
//!   and the node never connects to the address the phone's Contact names.

mod common;

use common::self_signed_for_localhost;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tandem_failover_tests::cluster::add_account;
use tandem_failover_tests::ua::{
    digest_authorization, response_text, uri_addr, Received, Reply, Ua,
};
use tandem_failover_tests::{Deadline, Node, SetOnDrop, Wait};

const WAIT: Duration = Duration::from_secs(10);

/// A standalone node serving the accounts alice and bob of example.com, started on
/// whatever `make` writes for a free port.
fn node_with_alice_and_bob(make: impl Fn(u16) -> String) -> Node {
    let node = Node::start_ready_with(make);
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "example.com", "pw-alice-1");
    add_account(admin, &token, "bob", "example.com", "pw-bob-1");
    node
}

/// The bindings the node stores for `user@example.com`.
fn bindings(node: &Node, user: &str) -> serde_json::Value {
    tandem_failover_tests::cluster::bindings(node.admin_addr(), &node.admin_token(), user)
}

/// An MD5 `Authorization` value for `user` with `password`, answering `challenge`.
fn md5_authorization(
    user: &str,
    password: &str,
    challenge: &str,
    method: &str,
    uri: &str,
    cnonce: &str,
) -> String {
    digest_authorization(user, password, challenge, method, uri, 1, cnonce)
}

/// The MD5 challenge of a 401 (one naming no algorithm means MD5).
fn md5_challenge(reply: &Reply) -> String {
    reply
        .headers("WWW-Authenticate")
        .into_iter()
        .find(|c| c.contains("algorithm=MD5") || !c.contains("algorithm="))
        .unwrap_or_else(|| panic!("no MD5 challenge in:\n{}", reply.text))
}

#[test]
fn an_account_that_keeps_failing_is_locked_out_at_that_address_only() {
    // What the README promises: an account is locked out at an address for five minutes
    // after 20 failed logins from there in a minute. Precisely, as asserted here: each of
    // 20 full round trips from 127.0.0.50 (a REGISTER, its 401, the challenge answered
    // with a wrong password) is challenged again, never refused early; after the 20th,
    // alice gets 403 there for her right password on a nonce the node itself issued, and
    // for a REGISTER without credentials (no nonce is handed out any more). Bob, who
    // never failed, registers from the same address (an office's phones share one), and
    // alice registers from 127.0.0.51 at once.
    let node = node_with_alice_and_bob(|port| tandem_failover_tests::sip_config(port, ""));
    let sip = node.udp_addr();
    let uri = "sip:example.com";
    let mut guesser = Ua::new("127.0.0.50", "alice", "example.com", "not-her-password");
    let contact = format!("<{}>", guesser.contact());

    let mut last_challenge = String::new();
    for round in 1..=20 {
        let asked = guesser.register_once(sip, Some(&contact), Some(600), "");
        assert_eq!(
            asked.status, 401,
            "round {round}: a REGISTER without credentials was not challenged:\n{}",
            asked.text
        );
        let challenge = md5_challenge(&asked);
        let wrong = md5_authorization(
            "alice",
            "not-her-password",
            &challenge,
            "REGISTER",
            uri,
            &format!("guess{round}"),
        );
        let answered = guesser.register_once(
            sip,
            Some(&contact),
            Some(600),
            &format!("Authorization: {wrong}\r\n"),
        );
        assert_eq!(
            answered.status, 401,
            "round {round}: a wrong password was not challenged again:\n{}",
            answered.text
        );
        // A fresh challenge, not a stale one: the node checked the answer and refused it.
        last_challenge = md5_challenge(&answered);
        assert!(
            !last_challenge.contains("stale=true"),
            "round {round}: {last_challenge}"
        );
    }

    // The right password, on the nonce the node issued with its 20th refusal.
    let right = md5_authorization(
        "alice",
        "pw-alice-1",
        &last_challenge,
        "REGISTER",
        uri,
        "right1",
    );
    let locked = guesser.register_once(
        sip,
        Some(&contact),
        Some(600),
        &format!("Authorization: {right}\r\n"),
    );
    let refused_for_good = |reply: &Reply, what: &str| {
        node.check(reply.status == 403, || {
            format!(
                "{what} from the locked address got {} instead of 403:\n{}",
                reply.status, reply.text
            )
        });
        node.check(reply.headers("WWW-Authenticate").is_empty(), || {
            format!(
                "{what}: a locked address is still challenged:\n{}",
                reply.text
            )
        });
    };
    refused_for_good(&locked, "alice's right password");
    node.check(locked.text.contains("too many failed attempts"), || {
        format!("the 403 does not say why:\n{}", locked.text)
    });
    refused_for_good(
        &guesser.register_once(sip, Some(&contact), Some(600), ""),
        "a REGISTER without credentials",
    );
    // Another account from the same address, with its right password: the lock is on
    // alice at this address, not on the address.
    let mut bob_there = Ua::new("127.0.0.50", "bob", "example.com", "pw-bob-1");
    let bob_contact = format!("<{}>", bob_there.contact());
    let bob_ok = bob_there.register(sip, "MD5", Some(&bob_contact), Some(600));
    node.check(bob_ok.status == 200, || {
        format!(
            "bob, who never failed, got {} from alice's locked address:\n{}",
            bob_ok.status, bob_ok.text
        )
    });
    assert_eq!(bindings(&node, "alice").as_array().map(Vec::len), Some(0));
    assert_eq!(bindings(&node, "bob").as_array().map(Vec::len), Some(1));

    // The same account from another address registers at once.
    let mut elsewhere = Ua::new("127.0.0.51", "alice", "example.com", "pw-alice-1");
    let elsewhere_contact = format!("<{}>", elsewhere.contact());
    let ok = elsewhere.register(sip, "MD5", Some(&elsewhere_contact), Some(600));
    node.check(ok.status == 200, || {
        format!(
            "alice from 127.0.0.51 got {} instead of 200:\n{}",
            ok.status, ok.text
        )
    });
    let stored = bindings(&node, "alice");
    assert_eq!(stored.as_array().map(Vec::len), Some(1), "{stored}");
    assert!(
        stored[0]["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.51:")),
        "{stored}"
    );
}

#[test]
fn guesses_on_a_stale_nonce_count_too_so_stale_true_is_no_password_oracle() {
    // A nonce issued to this address but no longer fresh (old, or another node's) still
    // proves a round trip. Wrong passwords on it must count toward the lockout: the node
    // answers the right password on a stale nonce with stale=true and a wrong one
    // without, so uncounted guesses would tell a guesser when it had the password.
    let node = node_with_alice_and_bob(|port| {
        tandem_failover_tests::sip_config(port, "[registrar]\nnonce_lifetime_secs = 10")
    });
    let sip = node.udp_addr();
    let uri = "sip:example.com";
    let mut guesser = Ua::new("127.0.0.55", "alice", "example.com", "x");
    let contact = format!("<{}>", guesser.contact());
    let asked = guesser.register_once(sip, Some(&contact), Some(600), "");
    assert_eq!(asked.status, 401, "{}", asked.text);
    let challenge = md5_challenge(&asked);
    std::thread::sleep(Duration::from_secs(11));
    for round in 1..=20 {
        let wrong = md5_authorization(
            "alice",
            "guess",
            &challenge,
            "REGISTER",
            uri,
            &format!("s{round}"),
        );
        let r = guesser.register_once(
            sip,
            Some(&contact),
            Some(600),
            &format!("Authorization: {wrong}\r\n"),
        );
        node.check(r.status == 401, || {
            format!("guess {round} got:\n{}", r.text)
        });
    }
    let right = md5_authorization("alice", "pw-alice-1", &challenge, "REGISTER", uri, "right");
    let r = guesser.register_once(
        sip,
        Some(&contact),
        Some(600),
        &format!("Authorization: {right}\r\n"),
    );
    node.check(r.status == 403 && !r.text.contains("stale=true"), || {
        format!(
            "after 20 guesses on a stale nonce, the right password got:\n{}",
            r.text
        )
    });
}

#[test]
fn failures_that_prove_no_round_trip_never_lock_anyone_out() {
    // From a spoofed source an attacker cannot read the node's challenges, so all it can
    // send are credentials on a nonce it made up, or on an old or foreign one, or without
    // qop. Sent 25 times for alice "from" 127.0.0.52, none of it may lock alice (or the
    // address) out: her phone there then registers at once.
    let node = node_with_alice_and_bob(|port| tandem_failover_tests::sip_config(port, ""));
    let sip = node.udp_addr();
    let uri = "sip:example.com";
    let mut spoofer = Ua::new("127.0.0.52", "alice", "example.com", "whatever");
    let contact = format!("<{}>", spoofer.contact());
    let asked = spoofer.register_once(sip, Some(&contact), Some(600), "");
    let genuine = md5_challenge(&asked);
    let forged = genuine.replace(
        &genuine[genuine.find("nonce=\"").unwrap() + 7..][..8],
        "00000000",
    );
    for round in 1..=25 {
        // A nonce that this cluster never issued.
        let made_up = md5_authorization("alice", "guess", &forged, "REGISTER", uri, "f");
        // A genuine nonce, but no qop (RFC 2069 style).
        let no_qop = md5_authorization("alice", "guess", &genuine, "REGISTER", uri, "q")
            .split(", ")
            .filter(|p| {
                !p.starts_with("qop=") && !p.starts_with("nc=") && !p.starts_with("cnonce=")
            })
            .collect::<Vec<_>>()
            .join(", ");
        for auth in [made_up, no_qop] {
            let r = spoofer.register_once(
                sip,
                Some(&contact),
                Some(600),
                &format!("Authorization: {auth}\r\n"),
            );
            node.check(r.status == 401, || {
                format!(
                    "round {round}: unverifiable credentials got {}:\n{}",
                    r.status, r.text
                )
            });
        }
    }
    let mut alice = Ua::new("127.0.0.52", "alice", "example.com", "pw-alice-1");
    let contact = format!("<{}>", alice.contact());
    let ok = alice.register(sip, "MD5", Some(&contact), Some(600));
    node.check(ok.status == 200, || {
        format!(
            "alice's right password from 127.0.0.52 got {} after 50 unverifiable failures:\n{}",
            ok.status, ok.text
        )
    });
}

#[test]
fn an_address_guessing_many_accounts_is_locked_out_as_a_whole() {
    // A scanner tries one guess each for 60 accounts (none of which exists) from
    // 127.0.0.53, each a full round trip: the address is then locked out for every
    // account, bob's right password included, while bob registers from 127.0.0.54.
    let node = node_with_alice_and_bob(|port| tandem_failover_tests::sip_config(port, ""));
    let sip = node.udp_addr();
    let uri = "sip:example.com";
    let mut last_challenge = String::new();
    for i in 1..=60 {
        let user = format!("user{i}");
        let mut scanner = Ua::new("127.0.0.53", &user, "example.com", "123456");
        let contact = format!("<{}>", scanner.contact());
        let asked = scanner.register_once(sip, Some(&contact), Some(600), "");
        node.check(asked.status == 401, || {
            format!("guess {i} was not challenged:\n{}", asked.text)
        });
        last_challenge = md5_challenge(&asked);
        let auth = md5_authorization(&user, "123456", &last_challenge, "REGISTER", uri, "s");
        let r = scanner.register_once(
            sip,
            Some(&contact),
            Some(600),
            &format!("Authorization: {auth}\r\n"),
        );
        node.check(r.status == 401, || {
            format!("guess {i} got {}:\n{}", r.status, r.text)
        });
    }
    let mut bob_there = Ua::new("127.0.0.53", "bob", "example.com", "pw-bob-1");
    let contact = format!("<{}>", bob_there.contact());
    let locked = bob_there.register(sip, "MD5", Some(&contact), Some(600));
    node.check(
        locked.status == 403 && locked.text.contains("too many failed attempts"),
        || format!("bob from the scanning address got:\n{}", locked.text),
    );
    let mut bob = Ua::new("127.0.0.54", "bob", "example.com", "pw-bob-1");
    let contact = format!("<{}>", bob.contact());
    let ok = bob.register(sip, "MD5", Some(&contact), Some(600));
    node.check(ok.status == 200, || {
        format!("bob from 127.0.0.54 got {}:\n{}", ok.status, ok.text)
    });

    // The scanner floods too, and is banned. Its guesses carry a nonce the node issued to
    // its address, which would prove a round trip; but it is a proven guesser, so under
    // the ban they get nothing, not a 403 each at whatever rate it sends them.
    let flooder = UdpSocket::bind("127.0.0.53:0").unwrap();
    let local = flooder.local_addr().unwrap();
    for i in 0..2000 {
        let probe = tandem_failover_tests::options_request(
            "UDP",
            local,
            sip,
            &format!("z9hG4bK-flood-{i}"),
        );
        let _ = flooder.send_to(probe.as_bytes(), sip);
    }
    tandem_failover_tests::cluster::wait_metric(
        &node,
        node.admin_addr(),
        "tandem_sip_flood_bans_total",
        1.0,
        Duration::from_secs(10),
    );
    let guesser = UdpSocket::bind("127.0.0.53:0").unwrap();
    let local = guesser.local_addr().unwrap();
    let auth = md5_authorization("user60", "654321", &last_challenge, "REGISTER", uri, "t");
    let guess = format!(
        "REGISTER {uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-guess;rport\r\n\
         From: <sip:user60@example.com>;tag=g1\r\nTo: <sip:user60@example.com>\r\n\
         Call-ID: guess-under-ban\r\nCSeq: 1 REGISTER\r\nMax-Forwards: 70\r\n\
         Contact: <sip:user60@{local}>\r\nAuthorization: {auth}\r\nContent-Length: 0\r\n\r\n"
    );
    guesser.send_to(guess.as_bytes(), sip).unwrap();
    // The fence: a CANCEL of the same call (a ban lets CANCEL through), answered 481
    // after whatever the guess would have got.
    let cancel = guess
        .replacen("REGISTER", "CANCEL", 1)
        .replace("z9hG4bK-guess", "z9hG4bK-guess-fence")
        .replace("1 REGISTER", "1 CANCEL");
    guesser.send_to(cancel.as_bytes(), sip).unwrap();
    let fenced = tandem_failover_tests::nothing_before_fence(
        &guesser,
        Duration::from_secs(10),
        "z9hG4bK-guess-fence",
    );
    node.check(fenced.is_ok(), || {
        format!("a banned, locked-out guesser: {fenced:?}")
    });
}

/// The `Via` values of a message, top first.
fn vias(text: &str) -> Vec<String> {
    Received {
        text: text.to_owned(),
        from: "127.0.0.1:0".parse().unwrap(),
    }
    .headers("Via")
}

/// The sent-by address of a Via value: `SIP/2.0/UDP 127.0.0.1:5060;branch=…`.
fn via_addr(via: &str) -> SocketAddr {
    let sent_by = via
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("no sent-by in Via {via}"));
    sent_by
        .parse()
        .unwrap_or_else(|_| panic!("not a numeric sent-by: {via}"))
}

fn via_branch(via: &str) -> String {
    via.split(';')
        .find_map(|p| p.trim().strip_prefix("branch="))
        .unwrap_or_default()
        .to_owned()
}

/// Only loopback may ever be sent to.
fn loopback(addr: SocketAddr) -> SocketAddr {
    assert!(addr.ip().is_loopback(), "refusing to send to {addr}");
    addr
}

/// The Call-ID of the INVITE that [`stateless_forwarder`] takes as the end of the test.
const FENCE_CALL: &str = "fence-after-the-loop";

/// The value of the first header line called `name` (long form, case-insensitive).
fn header_line<'a>(lines: &[&'a str], name: &str) -> Option<&'a str> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// What a stateless forwarder in the phone's place does (RFC 3261 §16.11), on `socket`:
/// each INVITE (and the ACK for its non-2xx) goes on to its Request-URI with a Via of
/// the forwarder's own on top and Max-Forwards one lower; each response goes back to the
/// Via below the forwarder's. A retransmission (same branch, same Max-Forwards) goes on
/// with the branch its first copy got. Every distinct INVITE received is recorded in
/// `invites`; at most 100 are forwarded, so a loop the node does not catch ends at
/// Max-Forwards in any case. An INVITE with Call-ID `FENCE_CALL` is not forwarded: it
/// sets `fenced` and the forwarder stops, as it does when `stop` is set.
fn stateless_forwarder(
    socket: &UdpSocket,
    stop: &AtomicBool,
    fenced: &AtomicBool,
    invites: &Mutex<Vec<String>>,
) {
    let local = socket.local_addr().unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // The branch given to each INVITE, by the branch and Max-Forwards it arrived with.
    let mut branches: HashMap<(String, String), String> = HashMap::new();
    // The branch given to the last INVITE that arrived with a branch, for its ACK.
    let mut ack_branches: HashMap<String, String> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, _)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.trim().is_empty() {
            continue; // a NAT keepalive
        }
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let lines: Vec<&str> = head.split("\r\n").collect();
        let is_via = |l: &&str| {
            let name = l.split(':').next().unwrap_or_default().trim();
            name.eq_ignore_ascii_case("via") || name.eq_ignore_ascii_case("v")
        };
        if lines[0].starts_with("SIP/2.0 ") {
            // A response: remove our Via, send it to the next one.
            let Some(ours) = lines.iter().position(is_via) else {
                continue;
            };
            let rest: Vec<&str> = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != ours)
                .map(|(_, l)| *l)
                .collect();
            let Some(next) = rest.iter().find(|l| is_via(l)) else {
                continue;
            };
            let next = via_addr(next.split_once(':').unwrap().1.trim());
            let out = format!("{}\r\n\r\n{body}", rest.join("\r\n"));
            socket.send_to(out.as_bytes(), loopback(next)).unwrap();
            continue;
        }
        let method = lines[0].split(' ').next().unwrap_or_default().to_owned();
        if method == "INVITE" && header_line(&lines, "call-id") == Some(FENCE_CALL) {
            fenced.store(true, Ordering::Relaxed);
            return;
        }
        let incoming = vias(&text)
            .first()
            .map(|v| via_branch(v))
            .unwrap_or_default();
        let branch = match method.as_str() {
            "INVITE" => {
                let hops = header_line(&lines, "max-forwards")
                    .unwrap_or_default()
                    .to_owned();
                let b = match branches.get(&(incoming.clone(), hops.clone())) {
                    Some(b) => b.clone(),
                    None => {
                        let mut seen = invites.lock().unwrap();
                        seen.push(text.clone());
                        if seen.len() > 100 {
                            continue;
                        }
                        let b = format!("z9hG4bKfwd{}x{}", seen.len(), local.port());
                        branches.insert((incoming.clone(), hops), b.clone());
                        b
                    }
                };
                ack_branches.insert(incoming, b.clone());
                b
            }
            "ACK" | "CANCEL" => match ack_branches.get(&incoming) {
                Some(b) => b.clone(),
                None => continue,
            },
            _ => continue,
        };
        let target = uri_addr(lines[0].split(' ').nth(1).unwrap_or_default());
        let mut out = vec![lines[0].to_owned()];
        out.push(format!("Via: SIP/2.0/UDP {local};branch={branch};rport"));
        for l in &lines[1..] {
            match l.split_once(':') {
                Some((name, value)) if name.trim().eq_ignore_ascii_case("max-forwards") => {
                    let hops: u32 = value.trim().parse().unwrap_or(70);
                    out.push(format!("Max-Forwards: {}", hops.saturating_sub(1)));
                }
                _ => out.push((*l).to_owned()),
            }
        }
        let out = format!("{}\r\n\r\n{body}", out.join("\r\n"));
        socket.send_to(out.as_bytes(), loopback(target)).unwrap();
    }
}

#[test]
fn a_request_that_loops_back_gets_482() {
    // Bob's phone registers a Contact that names the node itself (a misconfigured phone,
    // or a gateway that forwards whatever it gets to its Request-URI). A call to
    // bob@example.com reaches the phone over its flow with the Request-URI retargeted to
    // that Contact; the phone forwards it to its Request-URI, the node. That second pass
    // is a spiral (a new Request-URI), so the node forwards it again, to the phone, which
    // sends it back once more. Now the request is the one the node already forwarded, its
    // Via with the node's loop branch on it: 482 Loop Detected (RFC 3261 §16.3 step 4),
    // and that 482 is the best response the caller gets (§16.7).
    let node = node_with_alice_and_bob(|port| tandem_failover_tests::sip_config(port, ""));
    let sip = node.udp_addr();
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-1");
    let contact_uri = format!("sip:bob@{sip}");
    let r = bob.register(sip, "MD5", Some(&format!("<{contact_uri}>")), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);

    let (stop, fenced) = (AtomicBool::new(false), AtomicBool::new(false));
    let invites = Mutex::new(Vec::new());
    // From a peer outside the served domains, so no 407 comes first.
    let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = caller.local_addr().unwrap();
    let port = local.port();
    let head = |method: &str, to: &str| {
        format!(
            "{method} sip:bob@example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-loop-{port};rport\r\n\
             From: <sip:peer@elsewhere.example>;tag=p{port}\r\n\
             To: {to}\r\n\
             Call-ID: loop-{port}\r\n\
             CSeq: 1 {method}\r\n\
             Max-Forwards: 70\r\n"
        )
    };
    let final_response = std::thread::scope(|s| {
        let (socket, stop_ref, fenced_ref, invites_ref) = (&bob.socket, &stop, &fenced, &invites);
        s.spawn(move || stateless_forwarder(socket, stop_ref, fenced_ref, invites_ref));
        let stopping = SetOnDrop(&stop);
        let invite = format!(
            "{}Contact: <sip:peer@{local}>\r\nContent-Length: 0\r\n\r\n",
            head("INVITE", "<sip:bob@example.com>")
        );
        caller.send_to(invite.as_bytes(), sip).unwrap();
        let deadline = Deadline::after(WAIT);
        let mut buf = vec![0u8; 65_536];
        let mut answer = None;
        caller
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while answer.is_none() && !deadline.expired() {
            if let Ok((n, _)) = caller.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let reply = Reply {
                    status: tandem_failover_tests::status_code(text.as_bytes()).unwrap_or(0),
                    text,
                };
                if reply.status >= 200 {
                    answer = Some(reply);
                }
            }
        }
        if let Some(reply) = &answer {
            if reply.status >= 300 {
                let to = reply.header("To").unwrap_or_default();
                let ack = format!("{}Content-Length: 0\r\n\r\n", head("ACK", &to));
                caller.send_to(ack.as_bytes(), sip).unwrap();
            }
        }
        // Nothing more goes round once the caller has its answer. The fence: one more
        // call to Bob, on a fresh Call-ID. The node forwards it after everything it had
        // forwarded before, and the forwarder handles what it receives in order, so an
        // INVITE still going round would be recorded before the fence arrives.
        if answer.is_some() {
            let fence = head("INVITE", "<sip:bob@example.com>")
                .replace(
                    &format!("Call-ID: loop-{port}"),
                    &format!("Call-ID: {FENCE_CALL}"),
                )
                .replace(
                    &format!("z9hG4bK-loop-{port}"),
                    &format!("z9hG4bK-fence-{port}"),
                );
            let fence = format!("{fence}Content-Length: 0\r\n\r\n");
            caller.send_to(fence.as_bytes(), sip).unwrap();
            Wait::new("the fence INVITE to reach the phone", WAIT)
                .showing(&node)
                .until(|| fenced.load(Ordering::Relaxed));
        }
        drop(stopping);
        answer
    });
    let invites = invites.into_inner().unwrap();
    let seen = || {
        let mut out = format!(
            "the phone's side received {} distinct INVITEs",
            invites.len()
        );
        for (i, text) in invites.iter().enumerate() {
            out.push_str(&format!("\n--- INVITE {} ---\n{text}", i + 1));
        }
        out
    };
    let Some(answer) = final_response else {
        node.panic_with_log(&format!(
            "no final response reached the caller within {WAIT:?}; {}",
            seen()
        ));
    };
    node.check(answer.status == 482, || {
        format!(
            "the caller got {} instead of 482:\n{}\n{}",
            answer.status,
            answer.text,
            seen()
        )
    });
    node.check(answer.text.starts_with("SIP/2.0 482 Loop Detected"), || {
        answer.text.clone()
    });
    // The spiral went through (a second INVITE reached the phone, with the node's Via on
    // it twice), and the loop was stopped the first time it came back: no third INVITE.
    node.check(invites.len() == 2, || {
        format!(
            "want 2 INVITEs at the phone (the first pass, then the spiral), and no third (the \
             loop); {}",
            seen()
        )
    });
    let own_vias = vias(&invites[1])
        .iter()
        .filter(|v| via_addr(v) == sip)
        .count();
    node.check(own_vias == 2, || {
        format!("the spiral does not carry the node's Via twice; {}", seen())
    });
    node.check(
        invites[1].starts_with(&format!("INVITE {contact_uri} SIP/2.0")),
        seen,
    );
    node.assert_answers_options();
}

/// The byte stream a phone keeps to the node: a TCP connection, or TLS over one.
trait Wire: Read + Write {
    fn socket(&self) -> &TcpStream;
}

impl Wire for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl Wire for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn socket(&self) -> &TcpStream {
        &self.sock
    }
}

/// A phone on one TCP or TLS connection to the node, as phones behind NAT keep one: it
/// registers with MD5 digest, then receives and answers everything on that connection.
/// Messages are framed by Content-Length.
struct StreamPhone<S: Wire> {
    wire: S,
    buf: Vec<u8>,
    /// `TCP` or `TLS`, for the Via.
    transport: &'static str,
    local: SocketAddr,
    node: SocketAddr,
    cseq: u32,
}

impl<S: Wire> StreamPhone<S> {
    fn new(wire: S, transport: &'static str) -> StreamPhone<S> {
        let local = wire.socket().local_addr().unwrap();
        let node = wire.socket().peer_addr().unwrap();
        StreamPhone {
            wire,
            buf: Vec::new(),
            transport,
            local,
            node,
            cseq: 0,
        }
    }

    fn send(&mut self, text: &str) {
        self.wire
            .write_all(text.as_bytes())
            .and_then(|()| self.wire.flush())
            .unwrap_or_else(|e| panic!("send on the phone's {} connection: {e}", self.transport));
    }

    /// Where a complete message ends in the buffer (leading CRLFs, keepalive pongs, are
    /// dropped first).
    fn framed(&mut self) -> Option<String> {
        while self.buf.starts_with(b"\r\n") {
            self.buf.drain(..2);
        }
        let end = tandem_failover_tests::message_end(&self.buf)?;
        let message: Vec<u8> = self.buf.drain(..end).collect();
        Some(String::from_utf8_lossy(&message).into_owned())
    }

    /// The next message on the connection within `timeout`; `None` if none came. Panics
    /// if the node closed the connection.
    fn read_message(&mut self, timeout: Duration) -> Option<Received> {
        let deadline = Deadline::after(timeout);
        loop {
            if let Some(text) = self.framed() {
                return Some(Received {
                    text,
                    from: self.node,
                });
            }
            if deadline.expired() {
                return None;
            }
            self.wire
                .socket()
                .set_read_timeout(Some(deadline.remaining()))
                .unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.wire.read(&mut chunk) {
                Ok(0) => panic!("the node closed the phone's {} connection", self.transport),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("read on the phone's {} connection: {e}", self.transport),
            }
        }
    }

    /// The next request with `method` on the connection within `timeout`.
    fn next_request(&mut self, method: &str, timeout: Duration) -> Option<Received> {
        let deadline = Deadline::after(timeout);
        while let Some(m) = self.read_message(deadline.remaining()) {
            if m.method() == Some(method) {
                return Some(m);
            }
            if deadline.expired() {
                break;
            }
        }
        None
    }

    fn register_once(&mut self, contact: &str, extra: &str) -> Received {
        self.cseq += 1;
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {local};branch=z9hG4bK-reg-{cseq}-{port};rport\r\n\
             From: <sip:bob@example.com>;tag=reg{port}\r\n\
             To: <sip:bob@example.com>\r\n\
             Call-ID: reg-{port}@phone\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Max-Forwards: 70\r\n\
             Contact: <{contact}>\r\n\
             Expires: 600\r\n\
             {extra}Content-Length: 0\r\n\r\n",
            transport = self.transport,
            local = self.local,
            cseq = self.cseq,
            port = self.local.port(),
        );
        self.send(&text);
        let deadline = Deadline::after(WAIT);
        while let Some(m) = self.read_message(deadline.remaining()) {
            if m.status().is_some_and(|s| s >= 200) {
                return m;
            }
        }
        panic!("no final response to a REGISTER over {}", self.transport);
    }

    /// Registers bob's `contact` with MD5 digest through this connection.
    fn register(&mut self, contact: &str) -> Received {
        let first = self.register_once(contact, "");
        if first.status() != Some(401) {
            return first;
        }
        let challenge = first
            .headers("WWW-Authenticate")
            .into_iter()
            .find(|c| c.contains("algorithm=MD5") || !c.contains("algorithm="))
            .unwrap_or_else(|| panic!("no MD5 challenge in:\n{}", first.text));
        let auth = md5_authorization(
            "bob",
            "pw-bob-1",
            &challenge,
            "REGISTER",
            "sip:example.com",
            &format!("tcp{}", self.local.port()),
        );
        self.register_once(contact, &format!("Authorization: {auth}\r\n"))
    }

    /// Answers `request` on the connection, with a To tag and, for a 1xx/2xx to an
    /// INVITE, its Record-Route set.
    fn respond(&mut self, request: &Received, status: u16, reason: &str, extra: &str) {
        let tag = format!("phone{}", self.local.port());
        let text = response_text(request, status, reason, &tag, extra);
        self.send(&text);
    }
}

/// The whole call, with bob's phone on `phone`: it registers `contact` (which names
/// `listener`, a socket the node must never connect to), alice calls bob over UDP, and
/// the INVITE, the ACK and alice's BYE all arrive on the phone's registered connection.
fn call_over_the_registered_connection<S: Wire>(
    node: &Node,
    mut phone: StreamPhone<S>,
    listener: &TcpListener,
) {
    let transport = phone.transport;
    let contact = format!(
        "sip:bob@{};transport={}",
        listener.local_addr().unwrap(),
        transport.to_ascii_lowercase()
    );
    let r = phone.register(&contact);
    node.check(r.status() == Some(200), || {
        format!("REGISTER over {transport}: {}", r.text)
    });
    let stored = bindings(node, "bob");
    // One binding, whose flow is this connection.
    node.check(
        stored.as_array().map(Vec::len) == Some(1)
            && stored[0]["transport"] == transport
            && stored[0]["remote"] == phone.local.to_string(),
        || {
            format!(
                "bob's binding is not one {transport} binding over {}: {stored}",
                phone.local
            )
        },
    );

    // Alice calls from her own thread, so that a call that never reaches the phone fails
    // at the phone's wait below, not after the caller's own timeouts.
    let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-1");
    let sip = node.udp_addr();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ok = alice.invite(sip, "sip:bob@example.com", "edge-call-1", &mut |_, _| {});
        let _ = done_tx.send((alice, ok));
    });

    // The node must reach the phone over its registered connection, never by connecting to
    // the address its Contact names (unreachable behind NAT).
    let connected_to_contact = || match listener.accept() {
        Ok((_, from)) => Some(from),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept on the Contact's listener: {e}"),
    };
    listener.set_nonblocking(true).unwrap();
    let expect = |phone: &mut StreamPhone<S>, method: &str| {
        phone.next_request(method, WAIT).unwrap_or_else(|| {
            let elsewhere = match connected_to_contact() {
                Some(from) => format!(
                    "; the node opened a connection to the Contact's address instead (from {from})"
                ),
                None => String::new(),
            };
            node.panic_with_log(&format!(
                "no {method} arrived on the phone's registered {transport} connection within \
                 {WAIT:?}{elsewhere}"
            ))
        })
    };

    let invite = expect(&mut phone, "INVITE");
    node.check(invite.request_uri() == Some(contact.as_str()), || {
        format!("the INVITE is not for bob's Contact:\n{}", invite.text)
    });
    let top_via = invite.header("Via").unwrap_or_default();
    node.check(
        top_via.starts_with(&format!("SIP/2.0/{transport} ")),
        || format!("the node's Via is not {transport}:\n{}", invite.text),
    );
    phone.respond(&invite, 180, "Ringing", "");
    phone.respond(&invite, 200, "OK", &format!("Contact: <{contact}>\r\n"));

    let (alice, ok) = done_rx
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| node.panic_with_log("alice's INVITE got no final response"));
    node.check(ok.status() == Some(200), || {
        format!("alice got no 200:\n{}", ok.text)
    });
    let dialog = alice.dialog(&ok);
    alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
    let ack = expect(&mut phone, "ACK");
    node.check(
        ack.header("Call-ID").as_deref() == Some("edge-call-1"),
        || ack.text.clone(),
    );

    // Alice hangs up; the BYE reaches the phone on its connection too.
    alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
    let bye = expect(&mut phone, "BYE");
    phone.respond(&bye, 200, "OK", "");
    let bye_ok = alice.expect_response("BYE", WAIT);
    node.check(bye_ok.status() == Some(200), || bye_ok.text.clone());

    // The node never connected to the address the Contact names: every message came over
    // the phone's own connection.
    if let Some(from) = connected_to_contact() {
        node.panic_with_log(&format!(
            "the node opened a connection to the phone's Contact address (from {from}) \
             besides the registered {transport} connection"
        ));
    }
}

#[test]
fn register_and_call_over_tcp_end_to_end() {
    let node = node_with_alice_and_bob(|port| tandem_failover_tests::sip_config(port, ""));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect_timeout(&node.tcp_addr(), WAIT).unwrap();
    stream.set_nodelay(true).unwrap();
    call_over_the_registered_connection(&node, StreamPhone::new(stream, "TCP"), &listener);
}

#[test]
fn register_and_call_over_tls_end_to_end() {
    let tls = self_signed_for_localhost();
    // UDP (for the readiness probe and alice) and TLS share one port number.
    let node = node_with_alice_and_bob(|port| tls.sip_config(port));
    let config = tls.client_config();
    let remote = node.tls_addr();
    let name = rustls::pki_types::ServerName::IpAddress(remote.ip().into());
    let connection = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = TcpStream::connect_timeout(&remote, WAIT).unwrap();
    tcp.set_nodelay(true).unwrap();
    // A plain TCP listener where the Contact points: a node that tried to open a new
    // connection to the phone would have to connect here first.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    call_over_the_registered_connection(
        &node,
        StreamPhone::new(rustls::StreamOwned::new(connection, tcp), "TLS"),
        &listener,
    );
}
