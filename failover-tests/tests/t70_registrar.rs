//! The registrar against real processes: digest REGISTER with MD5 (sipp) and SHA-256 (the
//! test UA), wrong passwords never registered, bindings replicated to every node with
//! their edge node, nonces from one node accepted by another, the RFC 3261 §10.3 rules a
//! phone sees (423, queries, removal), racing REGISTERs of one AOR, registrations without
//! quorum (answered, kept alive by NAT keepalives, and replayed when it returns), nonces
//! through a key rotation and a rolling restart, logins opened ahead of use (a change to
//! one account drops its own alone), a sweep of lapsed bindings that writes nothing
//! while nothing lapsed, and an account created a moment ago through another node
//! registering at once through a follower that has not applied it yet.

use std::time::Duration;

use tandem_failover_tests::cluster::{
    bindings, http, metric, wait_logins_opened, Cluster, MemberRole,
};
use tandem_failover_tests::ua::Ua;
use tandem_failover_tests::{describe, sipp_scenario, slow_disk, Node, Wait};

/// Creates customer `acme` and account `user@example.com` through the admin API.
fn add_account(admin: std::net::SocketAddr, token: &str, user: &str, password: &str) {
    tandem_failover_tests::cluster::add_account(admin, token, user, "example.com", password);
}

/// The `tandem_bindings_held` line of a node's metrics, for failure messages.
fn held_line(metrics: &str) -> String {
    metrics
        .lines()
        .find(|l| l.starts_with("tandem_bindings_held"))
        .unwrap_or("no tandem_bindings_held in /metrics")
        .to_owned()
}

/// The MD5 challenge in a 401.
fn md5_challenge(reply: &tandem_failover_tests::ua::Reply) -> String {
    reply
        .headers("WWW-Authenticate")
        .into_iter()
        .find(|c| c.contains("MD5"))
        .unwrap_or_else(|| panic!("no MD5 challenge in:\n{}", reply.text))
}

/// sipp's MD5 REGISTER scenario with these credentials; true if it got its 200.
fn sipp_register(node: std::net::SocketAddr, user: &str, password: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.csv");
    std::fs::write(&users, format!("SEQUENTIAL\n{user};example.com\n")).unwrap();
    let out = std::process::Command::new("sipp")
        .arg("-sf")
        .arg(sipp_scenario("register-md5.xml"))
        .arg("-inf")
        .arg(&users)
        .args([
            "-au",
            user,
            "-ap",
            password,
            "-m",
            "1",
            "-i",
            "127.0.0.1",
            "-p",
            "0",
        ])
        .args(["-nostdin", "-timeout", "10s", "-recv_timeout", "3000"])
        .arg(node.to_string())
        .current_dir(dir.path())
        .output()
        .expect("run sipp (install it with ./ops/setup.sh)");
    (out.status.success(), describe(&out))
}

#[test]
fn md5_and_sha256_registrations_succeed_and_wrong_passwords_never_do() {
    // SHA-256 is offered to the phones listed as answering it; this one is listed.
    let node = Node::start_ready("[registrar]\nsha256_user_agents = [\"Tandem-Test-Phone\"]");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "alice", "s3cret-A");

    // sipp, MD5.
    let (ok, log) = sipp_register(node.udp_addr(), "alice", "s3cret-A");
    assert!(ok, "sipp MD5 REGISTER failed:\n{log}");
    let b = bindings(admin, &token, "alice");
    assert_eq!(b.as_array().unwrap().len(), 1, "{b}");
    assert_eq!(b[0]["edge_node"], 1);
    assert_eq!(b[0]["transport"], "UDP");
    assert_eq!(b[0]["user_agent"], "sipp");

    // sipp with a wrong password never gets its 200.
    let (ok, log) = sipp_register(node.udp_addr(), "alice", "guess");
    assert!(!ok, "a wrong password registered:\n{log}");
    // And it failed the right way: challenged again where it wanted its 200.
    assert!(
        log.contains("while expecting '200'") && log.contains("401 Unauthorized"),
        "sipp failed for another reason:\n{log}"
    );

    // A phone not listed gets one challenge, MD5: many phones give up on a challenge
    // that offers several, or on SHA-256.
    let mut ua = Ua::new("127.0.0.1", "alice", "example.com", "s3cret-A");
    let contact = format!("<{}>", ua.contact());
    let first = ua.register_once(node.udp_addr(), Some(&contact), Some(600), "");
    let offered = first.headers("WWW-Authenticate");
    assert!(
        offered.len() == 1 && offered[0].contains("algorithm=MD5"),
        "{offered:?}"
    );
    // The listed test phone, SHA-256; each 200 lists the contact with its expiry.
    ua.agent = Some("tandem-test-phone/1.0".into());
    let r = ua.register(node.udp_addr(), "SHA-256", Some(&contact), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);
    let listed = r.headers("Contact");
    assert!(
        listed
            .iter()
            .any(|c| c.contains(&ua.contact()) && c.ends_with("expires=600")),
        "{listed:?}"
    );
    assert_eq!(
        bindings(admin, &token, "alice").as_array().unwrap().len(),
        2
    );

    // Wrong passwords with either algorithm: challenged again, never 200.
    let mut bad = Ua::new("127.0.0.1", "alice", "example.com", "wrong");
    for alg in ["SHA-256", "MD5"] {
        bad.agent = (alg == "SHA-256").then(|| "Tandem-Test-Phone".into());
        let r = bad.register(
            node.udp_addr(),
            alg,
            Some(&format!("<{}>", bad.contact())),
            None,
        );
        assert_eq!(r.status, 401, "{alg}: {}", r.text);
    }
    // An unknown user, too.
    let mut nobody = Ua::new("127.0.0.1", "mallory", "example.com", "x");
    let r = nobody.register(
        node.udp_addr(),
        "MD5",
        Some(&format!("<{}>", nobody.contact())),
        None,
    );
    assert_eq!(r.status, 401, "{}", r.text);
    // A domain this cluster does not serve.
    let mut foreign = Ua::new("127.0.0.1", "alice", "example.org", "s3cret-A");
    let r = foreign.register_once(node.udp_addr(), Some("<sip:a@127.0.0.1>"), None, "");
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(
        bindings(admin, &token, "alice").as_array().unwrap().len(),
        2
    );

    let metrics = http(admin, None, "GET", "/metrics", None).unwrap().body;
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tandem_sip_auth_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no auth failure counter:\n{metrics}"));
    assert!(
        failures >= 4,
        "only {failures} auth failures counted:\n{metrics}"
    );
    for counted in [
        "tandem_sip_requests_total{method=\"REGISTER\"} ",
        "tandem_sip_responses_total{code=\"401\"} ",
        "tandem_sip_responses_total{code=\"200\"} ",
        "tandem_sip_responses_total{code=\"403\"} ",
    ] {
        assert!(
            metrics.contains(counted),
            "/metrics lacks {counted:?}:\n{metrics}"
        );
    }
    node.assert_answers_options();
}

#[test]
fn registrar_rules_a_phone_sees() {
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "bob", "pw-bob-123");
    let mut ua = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob-123");
    let contact = format!("<{}>", ua.contact());

    let brief = ua.register(node.udp_addr(), "MD5", Some(&contact), Some(10));
    assert_eq!(brief.status, 423, "{}", brief.text);
    assert_eq!(brief.header("Min-Expires").as_deref(), Some("60"));

    let capped = ua.register(node.udp_addr(), "MD5", Some(&contact), Some(99_999));
    assert_eq!(capped.status, 200, "{}", capped.text);
    assert!(
        capped.headers("Contact")[0].ends_with("expires=3600"),
        "{}",
        capped.text
    );

    // A second contact, then a query lists both.
    let other = format!("<sip:bob@127.0.0.1:{}>", ua.local().port() + 1);
    assert_eq!(
        ua.register(node.udp_addr(), "MD5", Some(&other), Some(300))
            .status,
        200
    );
    let query = ua.register(node.udp_addr(), "MD5", None, None);
    assert_eq!(query.status, 200, "{}", query.text);
    assert_eq!(query.headers("Contact").len(), 2, "{}", query.text);

    // Expires 0 removes one; `*` with Expires 0 removes the rest.
    let gone = ua.register(node.udp_addr(), "MD5", Some(&other), Some(0));
    assert_eq!(gone.status, 200, "{}", gone.text);
    assert_eq!(gone.headers("Contact").len(), 1, "{}", gone.text);
    let all = ua.register(node.udp_addr(), "MD5", Some("*"), Some(0));
    assert_eq!(all.status, 200, "{}", all.text);
    assert!(all.headers("Contact").is_empty(), "{}", all.text);
    assert_eq!(bindings(admin, &token, "bob").as_array().unwrap().len(), 0);
    let star_without_zero = ua.register(node.udp_addr(), "MD5", Some("*"), Some(60));
    assert_eq!(star_without_zero.status, 400, "{}", star_without_zero.text);
}

#[test]
fn a_new_call_id_refreshes_and_its_cseq_still_orders_what_follows() {
    // A phone that picks a new Call-ID for a REGISTER but keeps its contact, flow and
    // interval is refreshed without a Raft write; REGISTERs that arrive out of order on
    // that Call-ID must still be refused (RFC 3261 §10.3 step 7).
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "dave", "pw-dave-123");
    let mut ua = Ua::new("127.0.0.1", "dave", "example.com", "pw-dave-123");
    let contact = format!("<{}>", ua.contact());
    let sip = node.udp_addr();
    let ok = |r: &tandem_failover_tests::ua::Reply, what: &str| {
        assert_eq!(r.status, 200, "{what}: {}", r.text);
        assert_eq!(
            r.headers("Contact"),
            vec![format!("{contact};expires=600")],
            "{what}"
        );
    };
    ok(&ua.register(sip, "MD5", Some(&contact), Some(600)), "first");
    ua.set_call("second-call-id", 10);
    ok(
        &ua.register(sip, "MD5", Some(&contact), Some(600)),
        "new Call-ID",
    );
    // CSeq 10 and 11 went out on that Call-ID; 7 arrives late, so it is refused.
    ua.set_call("second-call-id", 6);
    let late = ua.register(sip, "MD5", Some(&contact), Some(600));
    assert_eq!(late.status, 500, "{}", late.text);
    ua.set_call("second-call-id", 12);
    ok(
        &ua.register(sip, "MD5", Some(&contact), Some(600)),
        "in order again",
    );
    // The binding is stored once, as it was.
    let stored = bindings(admin, &token, "dave");
    assert_eq!(stored.as_array().map(Vec::len), Some(1), "{stored}");
    assert_eq!(stored[0]["interval_secs"], 600, "{stored}");
}

#[test]
fn racing_registrations_of_one_aor_all_land_in_order() {
    // Five phones of one account (its contact limit) register side by side, each changing
    // its binding on every REGISTER, so the registrar groups and coalesces their writes.
    // Every REGISTER must get its 200 and the bindings must end as each phone last asked.
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "erin", "pw-erin-123");
    let sip = node.udp_addr();
    let phones: Vec<_> = (0..5)
        .map(|i| {
            std::thread::spawn(move || {
                let mut ua = Ua::new("127.0.0.1", "erin", "example.com", "pw-erin-123");
                let contact = format!("<{}>", ua.contact());
                for round in 0..20u32 {
                    let expires = 300 + 60 * ((round + i) % 3);
                    let r = ua.register(sip, "MD5", Some(&contact), Some(expires));
                    assert_eq!(r.status, 200, "phone {i} round {round}: {}", r.text);
                    let listed = r.headers("Contact");
                    assert!(
                        listed.contains(&format!("{contact};expires={expires}")),
                        "phone {i} round {round} not listed as asked: {listed:?}"
                    );
                }
                // Odd phones leave at the end; even ones keep their last binding.
                if i % 2 == 1 {
                    let r = ua.register(sip, "MD5", Some(&contact), Some(0));
                    assert_eq!(r.status, 200, "phone {i} leaving: {}", r.text);
                }
                (ua.contact(), 300 + 60 * ((19 + i) % 3))
            })
        })
        .collect();
    let mut expected: Vec<(String, u64)> = Vec::new();
    for (i, phone) in phones.into_iter().enumerate() {
        let (contact, expires) = phone.join().expect("phone thread");
        if i % 2 == 0 {
            expected.push((contact, u64::from(expires)));
        }
    }
    expected.sort();
    let stored = bindings(admin, &token, "erin");
    let mut seen: Vec<(String, u64)> = stored
        .as_array()
        .expect("bindings list")
        .iter()
        .map(|b| {
            (
                b["contact"].as_str().unwrap_or_default().to_owned(),
                b["interval_secs"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen, expected, "{stored}");
}

#[test]
fn a_binding_made_through_one_node_is_on_every_node_and_a_nonce_is_good_on_its_node() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let (one, two) = (cluster.member(1), cluster.member(2));
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    add_account(one.admin_addr, &token, "carol", "pw-carol-1");
    cluster.wait_caught_up(2, Duration::from_secs(10));

    let node1: std::net::SocketAddr = format!("{}:{}", one.ip, one.sip_port).parse().unwrap();
    let node2: std::net::SocketAddr = format!("{}:{}", two.ip, two.sip_port).parse().unwrap();
    let mut ua = Ua::new("127.0.0.1", "carol", "example.com", "pw-carol-1");
    let contact = format!("<{}>", ua.contact());
    let r = ua.register(node1, "MD5", Some(&contact), Some(300));
    assert_eq!(r.status, 200, "{}", r.text);
    for m in &cluster.members {
        cluster.wait_caught_up(m.id, Duration::from_secs(10));
        let b = bindings(m.admin_addr, &token, "carol");
        assert_eq!(b.as_array().map(Vec::len), Some(1), "node {}: {b}", m.id);
        assert_eq!(b[0]["edge_node"], 1, "node {}: {b}", m.id);
    }

    // A challenge from node 1 answered to node 2: node 2 knows the nonce for this
    // cluster's but not its own, so it answers stale=true (the phone retries without
    // asking its user), and only the node that issued a nonce keeps its counts, which is
    // what makes a replay through any node fail.
    let first = ua.register_once(node1, Some(&contact), Some(300), "");
    assert_eq!(first.status, 401);
    let auth = ua.authorization(&md5_challenge(&first), "REGISTER", "sip:example.com", 1);
    let elsewhere = ua.register_once(
        node2,
        Some(&contact),
        Some(300),
        &format!("Authorization: {auth}\r\n"),
    );
    assert_eq!(elsewhere.status, 401, "{}", elsewhere.text);
    let stale = md5_challenge(&elsewhere);
    assert!(stale.contains("stale=true"), "{}", elsewhere.text);
    let auth = ua.authorization(&stale, "REGISTER", "sip:example.com", 1);
    let second = ua.register_once(
        node2,
        Some(&contact),
        Some(300),
        &format!("Authorization: {auth}\r\n"),
    );
    assert_eq!(second.status, 200, "{}", second.text);
    // The same credentials again are a replay on node 2.
    let replay = ua.register_once(
        node2,
        Some(&contact),
        Some(300),
        &format!("Authorization: {auth}\r\n"),
    );
    assert_eq!(replay.status, 401, "{}", replay.text);
}

/// An account created through the leader a moment ago registers at once through a
/// follower that has not applied it yet: the follower catches up with the leader before it
/// answers "no such account" (and before it counts a guess). The follower's disk is slowed
/// so that the moment lasts. A guess proves nothing and asks the leader nothing unless it
/// answers a nonce issued to its address, and then costs one question at most and counts
/// once toward the lockout.
#[test]
fn an_account_created_through_the_leader_registers_at_once_through_a_follower_behind_it() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let (leader, _) = cluster.wait_for_leader(&[], Duration::from_secs(10));
    let follower = cluster.member(if leader == 1 { 2 } else { 1 });
    // Under one heartbeat (100 ms), so the leader keeps it in step, a few syncs behind.
    slow_disk::restart_slowed(&cluster, follower, 80);
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let admin = cluster.member(leader).admin_addr;
    // The domain, served everywhere first: only the account is new below.
    add_account(admin, &token, "first", "pw-first");
    cluster.wait_caught_up(follower.id, Duration::from_secs(10));
    let node = follower.sip_addr();
    let questions = || {
        metric(follower.admin_addr, "tandem_raft_catch_up_questions_total").unwrap_or_else(|| {
            cluster.panic_with_logs("no tandem_raft_catch_up_questions_total in /metrics")
        })
    };
    // The phone is challenged by the follower, its account is created through the
    // leader, and its answer reaches the follower at once.
    let mut ua = Ua::new("127.0.0.1", "newcomer", "example.com", "pw-newcomer");
    let contact = format!("<{}>", ua.contact());
    let challenge = ua.register_once(node, Some(&contact), Some(300), "");
    assert_eq!(challenge.status, 401, "{}", challenge.text);
    let before = questions();
    add_account(admin, &token, "newcomer", "pw-newcomer");
    let auth = ua.authorization(&md5_challenge(&challenge), "REGISTER", "sip:example.com", 1);
    let r = ua.register_once(
        node,
        Some(&contact),
        Some(300),
        &format!("Authorization: {auth}\r\n"),
    );
    if r.status != 200 {
        cluster.panic_with_logs(&format!(
            "a REGISTER right after its account was created got:\n{}",
            r.text
        ));
    }
    assert!(
        questions() > before,
        "the follower asked the leader nothing: it had the account already, so this test \
         did not test the lag"
    );

    // A guess on a nonce nobody issued proves nothing and asks nothing.
    let mut guesser = Ua::new("127.0.0.1", "nobody", "example.com", "a-guess");
    let contact = format!("<{}>", guesser.contact());
    let before = questions();
    let forged =
        r#"Digest realm="example.com", nonce="0123456789abcdef", algorithm=MD5, qop="auth""#;
    let auth = guesser.authorization(forged, "REGISTER", "sip:example.com", 1);
    let r = guesser.register_once(
        node,
        Some(&contact),
        Some(300),
        &format!("Authorization: {auth}\r\n"),
    );
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(
        questions(),
        before,
        "a forged nonce made the follower ask the leader"
    );
    // Guesses answering real challenges: refused, one question each at most, and each
    // counted once toward the account's lockout at this address (20 guesses).
    for i in 0..20 {
        let r = guesser.register(node, "MD5", Some(&contact), Some(300));
        assert_eq!(r.status, 401, "guess {}: {}", i + 1, r.text);
    }
    let asked = questions() - before;
    assert!(
        asked <= 20.0,
        "20 guesses on real nonces asked the leader {asked} questions"
    );
    let r = guesser.register(node, "MD5", Some(&contact), Some(300));
    assert_eq!(r.status, 403, "the 21st guess: {}", r.text);
}

#[test]
fn accounts_from_the_cli_and_a_drained_node_turns_registrations_away() {
    let node = Node::start_ready("");
    let config = node.dir().join("config.toml");
    let cli = |args: &[&str]| {
        tandem_failover_tests::tandem_command()
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("TANDEM_PASSWORD", "pw-from-env-9")
            .output()
            .unwrap()
    };
    let (admin, token) = (node.admin_addr(), node.admin_token());
    http(
        admin,
        Some(&token),
        "PUT",
        "/v1/customers/acme",
        Some(r#"{"name":"Acme"}"#),
    )
    .unwrap();
    let put = cli(&[
        "account",
        "put",
        "dave@example.com",
        "--customer",
        "acme",
        "--password-from-env",
    ]);
    assert!(put.status.success(), "{}", describe(&put));
    let bad = cli(&["account", "put", "dave", "--customer", "acme"]);
    assert!(
        !bad.status.success() && describe(&bad).contains("user@domain"),
        "{}",
        describe(&bad)
    );
    let nocustomer = cli(&[
        "account",
        "put",
        "erin@example.com",
        "--customer",
        "nobody",
        "--password",
    ]);
    assert!(
        describe(&nocustomer).contains("no customer"),
        "{}",
        describe(&nocustomer)
    );
    let list = cli(&["account", "list"]);
    assert!(
        describe(&list).contains("sip:dave@example.com"),
        "{}",
        describe(&list)
    );

    // The password came from TANDEM_PASSWORD.
    let mut ua = Ua::new("127.0.0.1", "dave", "example.com", "pw-from-env-9");
    let contact = format!("<{}>", ua.contact());
    assert_eq!(
        ua.register(node.udp_addr(), "MD5", Some(&contact), Some(300))
            .status,
        200
    );

    // A password on the command line itself is refused; one from a file is taken.
    let visible = cli(&[
        "account",
        "put",
        "dave@example.com",
        "--password",
        "visible-in-ps",
        "--disable",
    ]);
    assert!(
        !visible.status.success() && describe(&visible).contains("process list"),
        "{}",
        describe(&visible)
    );
    let file = node.dir().join("password.txt");
    std::fs::write(&file, "pw-from-file-3\n").unwrap();
    let from_file = cli(&[
        "account",
        "put",
        "frank@example.com",
        "--customer",
        "acme",
        "--password-file",
        file.to_str().unwrap(),
    ]);
    assert!(from_file.status.success(), "{}", describe(&from_file));
    let mut frank = Ua::new("127.0.0.1", "frank", "example.com", "pw-from-file-3");
    let frank_contact = format!("<{}>", frank.contact());
    assert_eq!(
        frank
            .register(node.udp_addr(), "MD5", Some(&frank_contact), Some(60))
            .status,
        200
    );

    let drain = cli(&["node", "drain"]);
    assert!(drain.status.success(), "{}", describe(&drain));
    assert!(describe(&drain).contains("Drained"), "{}", describe(&drain));
    let refused = ua.register_once(node.udp_addr(), Some(&contact), Some(300), "");
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert!(refused.header("Retry-After").is_some(), "{}", refused.text);
    // The 503's transaction is counted until the layer has sent it, a moment after the
    // phone may already have it: drained follows once it is gone.
    Wait::new("the node to report itself drained", Duration::from_secs(10))
        .showing(&node)
        .until(|| {
            let state = http(admin, Some(&token), "GET", "/v1/node/drain", None)
                .unwrap()
                .json();
            if (state["draining"].clone(), state["drained"].clone()) == (true.into(), true.into()) {
                Ok(())
            } else {
                Err(state.to_string())
            }
        });

    let delete = cli(&["account", "delete", "dave@example.com"]);
    assert!(delete.status.success(), "{}", describe(&delete));
    let gone = http(
        admin,
        Some(&token),
        "GET",
        "/v1/accounts/example.com/dave",
        None,
    )
    .unwrap();
    assert_eq!(gone.status, 404);
    // Its bindings went with it: a new account of that name starts with none.
    let again = cli(&[
        "account",
        "put",
        "dave@example.com",
        "--customer",
        "acme",
        "--password",
    ]);
    assert!(again.status.success(), "{}", describe(&again));
    assert_eq!(
        bindings(admin, &token, "dave").as_array().map(Vec::len),
        Some(0)
    );
    // Changing one setting keeps the others (and the password).
    let disable = cli(&["account", "put", "dave@example.com", "--disable"]);
    assert!(disable.status.success(), "{}", describe(&disable));
    let shown = http(
        admin,
        Some(&token),
        "GET",
        "/v1/accounts/example.com/dave",
        None,
    )
    .unwrap()
    .json();
    assert_eq!(
        (shown["enabled"].clone(), shown["customer"].clone()),
        (false.into(), "acme".into())
    );
}

#[test]
fn without_quorum_registrations_still_succeed_and_nothing_is_lost_when_it_returns() {
    let cluster = Cluster::form(
        &[MemberRole::Full, MemberRole::Full, MemberRole::Full],
        "\n[registrar]\nnat_keepalive_secs = 1",
    );
    let one = cluster.member(1);
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    add_account(one.admin_addr, &token, "frank", "pw-frank-1");
    let node1: std::net::SocketAddr = format!("{}:{}", one.ip, one.sip_port).parse().unwrap();
    let mut ua = Ua::new("127.0.0.1", "frank", "example.com", "pw-frank-1");
    let contact = format!("<{}>", ua.contact());
    assert_eq!(
        ua.register(node1, "MD5", Some(&contact), Some(300)).status,
        200
    );

    cluster.member(2).sigkill();
    cluster.member(3).sigkill();
    Wait::new(
        "node 1 to notice that it lost its quorum (/ready no longer 200)",
        Duration::from_secs(10),
    )
    .showing(&cluster)
    .until(|| one.get("/ready").is_none_or(|r| r.status != 200));
    assert_eq!(
        one.get("/ready").unwrap().status,
        503,
        "node 1 never noticed"
    );

    // A refresh (inside its headroom: no write) and a new contact (held in the overlay):
    // both answered 200 at once.
    let started = tandem_failover_tests::Deadline::after(Duration::from_secs(60));
    let refresh = ua.register(node1, "MD5", Some(&contact), Some(300));
    assert_eq!(refresh.status, 200, "{}", refresh.text);
    let second = "<sip:frank@127.0.0.1:5999>";
    let added = ua.register(node1, "MD5", Some(second), Some(300));
    assert_eq!(added.status, 200, "{}", added.text);
    assert_eq!(added.headers("Contact").len(), 2, "{}", added.text);
    // Answered without waiting for a Raft proposal to time out (5 s by default). The UA
    // retransmits after 2 s, so one lost datagram may add a step: the time is reported,
    // and the bound leaves room for that step but not for a proposal timeout.
    eprintln!(
        "two degraded registrations answered in {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "degraded registrations took {:?}",
        started.elapsed()
    );
    assert_eq!(
        bindings(one.admin_addr, &token, "frank")
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let held = http(one.admin_addr, None, "GET", "/metrics", None)
        .unwrap()
        .body;
    assert!(!held.contains("tandem_bindings_held 0"), "{held}");

    // A phone that first registers while the node is degraded is held in the overlay;
    // its NAT mapping must be kept open all the same.
    let mut late = Ua::new("127.0.0.1", "frank", "example.com", "pw-frank-1");
    let late_contact = format!("<{}>", late.contact());
    let r = late.register(node1, "MD5", Some(&late_contact), Some(300));
    assert_eq!(r.status, 200, "{}", r.text);
    let keepalive = late.recv(Duration::from_millis(3500));
    assert!(
        keepalive
            .as_ref()
            .is_some_and(|m| m.text == "\r\n\r\n" && m.from == node1),
        "no keepalive for a binding held in the overlay: {keepalive:?}"
    );

    // Quorum returns: the overlay is replayed and every node has all three bindings.
    cluster.member(2).start();
    cluster.member(3).start();
    cluster.wait_for_leader(&[], Duration::from_secs(15));
    Wait::new(
        "node 1 to replay the overlay (tandem_bindings_held 0)",
        Duration::from_secs(15),
    )
    .every(Duration::from_millis(100))
    .showing(&cluster)
    .until(|| {
        let m = http(one.admin_addr, None, "GET", "/metrics", None)
            .unwrap()
            .body;
        if m.contains("tandem_bindings_held 0") {
            Ok(())
        } else {
            Err(held_line(&m))
        }
    });
    for m in &cluster.members {
        cluster.wait_caught_up(m.id, Duration::from_secs(15));
        let b = bindings(m.admin_addr, &token, "frank");
        assert_eq!(b.as_array().map(Vec::len), Some(3), "node {}: {b}", m.id);
    }
}

/// Registrations a node answered without a quorum are on its disk before the phone hears
/// 200: the node is SIGKILLed before the quorum returns, the other two go on without it,
/// and once it is back every change it answered for is on every node, unless something
/// newer happened to that binding meanwhile. Nothing is revived and nothing is created for
/// an account disabled meanwhile. Before the journal, node 1 lost all of them.
#[test]
fn registrations_answered_without_a_quorum_survive_a_crash_and_are_replayed_only_if_still_newest() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let (one, two) = (cluster.member(1), cluster.member(2));
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        add_account(one.admin_addr, &token, user, &format!("pw-{user}-1"));
    }
    Wait::new(
        "every node to support the conditional replay (feature version 4)",
        Duration::from_secs(20),
    )
    .showing(&cluster)
    .until(|| {
        cluster.members.iter().all(|m| {
            m.status()
                .and_then(|s| s["feature_version"].as_u64())
                .is_some_and(|v| v >= 4)
        })
    });
    let sip = |m: &tandem_failover_tests::cluster::Member| -> std::net::SocketAddr {
        format!("{}:{}", m.ip, m.sip_port).parse().unwrap()
    };
    let phone = |user: &str| Ua::new("127.0.0.1", user, "example.com", &format!("pw-{user}-1"));
    let register = |ua: &mut Ua, node: std::net::SocketAddr, contact: &str, expires: u32| {
        let r = ua.register(node, "MD5", Some(contact), Some(expires));
        assert_eq!(r.status, 200, "{contact}: {}", r.text);
    };
    let (mut alice, mut bob, mut carol, mut dave, mut erin) = (
        phone("alice"),
        phone("bob"),
        phone("carol"),
        phone("dave"),
        phone("erin"),
    );
    // Stored through Raft before the quorum goes.
    register(&mut bob, sip(one), "<sip:bob@127.0.0.1:5001>", 300);
    register(&mut dave, sip(one), "<sip:dave@127.0.0.1:5002>", 300);

    cluster.member(2).sigkill();
    cluster.member(3).sigkill();
    Wait::new(
        "node 1 to notice that it lost its quorum",
        Duration::from_secs(10),
    )
    .showing(&cluster)
    .until(|| one.get("/ready").is_none_or(|r| r.status != 200));
    // Answered by node 1 alone: four new bindings and one removal.
    register(&mut alice, sip(one), "<sip:alice@127.0.0.1:5003>", 300);
    register(&mut bob, sip(one), "<sip:bob@127.0.0.1:5004>", 300);
    register(&mut carol, sip(one), "<sip:carol@127.0.0.1:5005>", 300);
    register(&mut dave, sip(one), "<sip:dave@127.0.0.1:5002>", 0);
    register(&mut erin, sip(one), "<sip:erin@127.0.0.1:5006>", 300);
    // Whoever does not know the password holds nothing.
    let mut forger = Ua::new("127.0.0.1", "alice", "example.com", "not-alices-password");
    let forged = forger.register(sip(one), "MD5", Some("<sip:x@192.0.2.66:5060>"), Some(300));
    assert!(matches!(forged.status, 401 | 403), "{}", forged.text);
    assert_eq!(metric(one.admin_addr, "tandem_bindings_held"), Some(5.0));
    cluster.member(1).sigkill();

    // Nodes 2 and 3 go on without node 1: bob registers the same contact again through
    // node 2, carol's account is disabled, erin registers and then unregisters.
    cluster.member(2).start();
    cluster.member(3).start();
    cluster.wait_for_leader(&[1], Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(20));
    register(&mut bob, sip(two), "<sip:bob@127.0.0.1:5004>", 300);
    let disable = http(
        two.admin_addr,
        Some(&token),
        "PUT",
        "/v1/accounts/example.com/carol",
        Some(r#"{"customer":"acme","enabled":false}"#),
    )
    .expect("admin API answers");
    assert_eq!(disable.status, 200, "{}", disable.body);
    register(&mut erin, sip(two), "<sip:erin@127.0.0.1:5006>", 300);
    register(&mut erin, sip(two), "<sip:erin@127.0.0.1:5006>", 0);

    // Node 1 comes back with what it held, and replays it once it has the quorum again.
    cluster.member(1).start();
    Wait::new(
        "node 1 to replay what it held (tandem_bindings_held 0)",
        Duration::from_secs(30),
    )
    .every(Duration::from_millis(200))
    .showing(&cluster)
    .until(|| {
        let m = http(one.admin_addr, None, "GET", "/metrics", None)
            .map(|a| a.body)
            .unwrap_or_default();
        if m.contains("tandem_bindings_held 0") {
            Ok(())
        } else {
            Err(held_line(&m))
        }
    });
    let index = cluster
        .members
        .iter()
        .filter_map(|m| m.status()?["applied_index"].as_u64())
        .max()
        .unwrap_or(0);
    for m in &cluster.members {
        cluster.wait_applied(m.id, index, Duration::from_secs(15));
        let of = |user: &str| -> Vec<(String, u64)> {
            let mut b: Vec<(String, u64)> = bindings(m.admin_addr, &token, user)
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["contact"].as_str().unwrap().to_owned(),
                        b["edge_node"].as_u64().unwrap(),
                    )
                })
                .collect();
            b.sort();
            b
        };
        let node = m.id;
        assert_eq!(
            of("alice"),
            vec![("sip:alice@127.0.0.1:5003".into(), 1)],
            "node {node}: the binding held on node 1 is lost"
        );
        assert_eq!(
            of("bob"),
            vec![
                ("sip:bob@127.0.0.1:5001".into(), 1),
                ("sip:bob@127.0.0.1:5004".into(), 2)
            ],
            "node {node}: the newer registration through node 2 must stay"
        );
        assert_eq!(
            of("carol"),
            vec![],
            "node {node}: a disabled account got a binding"
        );
        assert_eq!(of("dave"), vec![], "node {node}: the held removal is lost");
        assert_eq!(
            of("erin"),
            vec![],
            "node {node}: a later removal was undone"
        );
    }
}

#[test]
fn a_challenge_keeps_no_transaction_so_a_retransmission_gets_a_fresh_one() {
    // The 401 is sent statelessly (RFC 3261 §8.2.7): the node holds nothing for it, and the
    // same REGISTER sent again is answered anew, with a new nonce, where a transaction
    // would have repeated its first answer byte for byte.
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "gina", "pw-gina-123");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let local = socket.local_addr().unwrap();
    let register = format!(
        "REGISTER sip:example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-stateless-{port};rport\r\n\
         From: <sip:gina@example.com>;tag=g{port}\r\n\
         To: <sip:gina@example.com>\r\n\
         Call-ID: stateless-{port}\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <sip:gina@{local}>\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n",
        port = local.port()
    );
    let mut nonces = Vec::new();
    for _ in 0..2 {
        socket
            .send_to(register.as_bytes(), node.udp_addr())
            .unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = socket.recv_from(&mut buf).expect("an answer");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(text.starts_with("SIP/2.0 401"), "{text}");
        let nonce = text
            .split("nonce=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a nonce")
            .to_owned();
        nonces.push(nonce);
    }
    assert_ne!(
        nonces[0], nonces[1],
        "the second answer was a retransmission"
    );
}

#[test]
fn a_200_keeps_no_transaction_and_the_same_register_sent_again_is_answered_again() {
    // Every answer to a REGISTER goes out statelessly (ARCHITECTURE.md), so a phone whose
    // 200 was lost sends the same REGISTER again and it comes back as a new request: its
    // nonce-count must pass again (for that request only), and its CSeq must not be taken
    // for an out-of-order one. Kept as a transaction, the 200 would be held for 32 s.
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "hana", "pw-hana-123");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = socket.local_addr().unwrap();
    let port = local.port();
    let send = |text: &str| -> String {
        socket.send_to(text.as_bytes(), node.udp_addr()).unwrap();
        let deadline = tandem_failover_tests::Deadline::after(Duration::from_secs(5));
        while let Some(d) = tandem_failover_tests::recv_udp(&socket, deadline.remaining()) {
            if tandem_failover_tests::status_code(&d).is_some_and(|s| s >= 200) {
                return String::from_utf8_lossy(&d).into_owned();
            }
        }
        node.panic_with_log(&format!("no final answer to:\n{text}"))
    };
    let register = |cseq: u32, branch: &str, auth: &str| {
        format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-{branch}-{port};rport\r\n\
             From: <sip:hana@example.com>;tag=h{port}\r\n\
             To: <sip:hana@example.com>\r\n\
             Call-ID: again-{port}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:hana@{local}>\r\n\
             Expires: 600\r\n\
             Max-Forwards: 70\r\n\
             {auth}Content-Length: 0\r\n\r\n"
        )
    };
    let challenge = send(&register(1, "first", ""));
    let challenge = challenge
        .lines()
        .find_map(|l| l.strip_prefix("WWW-Authenticate: "))
        .filter(|c| challenge.starts_with("SIP/2.0 401") && c.contains("algorithm=MD5"))
        .unwrap_or_else(|| panic!("no MD5 challenge in:\n{challenge}"))
        .to_owned();
    let auth = |nc: u32| {
        let a = tandem_failover_tests::ua::digest_authorization(
            "hana",
            "pw-hana-123",
            &challenge,
            "REGISTER",
            "sip:example.com",
            nc,
            "cn-again",
        );
        format!("Authorization: {a}\r\n")
    };
    let request = register(2, "second", &auth(1));
    let contact = format!("<sip:hana@{local}>;expires=");
    let ok = send(&request);
    node.check(
        ok.starts_with("SIP/2.0 200") && ok.contains(&contact),
        || format!("the REGISTER was not taken:\n{ok}"),
    );
    // Kept, the 200's transaction would be held until Timer J, 32 s.
    let held = "tandem_sip_transactions_held";
    tandem_failover_tests::cluster::wait_metric(&node, admin, held, 0.0, Duration::from_secs(3));
    let metric = |series: &str| tandem_failover_tests::cluster::metric(admin, series);
    let writes = metric("tandem_raft_proposals_total");
    let again = send(&request);
    node.check(
        again.starts_with("SIP/2.0 200") && again.contains(&contact),
        || format!("the same REGISTER sent again got:\n{again}"),
    );
    node.check(metric("tandem_raft_proposals_total") == writes, || {
        "the REGISTER sent again was written again".into()
    });
    // Another request on that nonce-count is a replay, whatever it copies.
    let replay = send(&register(2, "third", &auth(1)));
    node.check(replay.starts_with("SIP/2.0 401"), || {
        format!("a second request on one nonce-count got:\n{replay}")
    });
    // That try ended the count's retransmissions, the original's too: nobody may try
    // request after request for one whose 16-bit tag passes for the original's.
    let after = send(&request);
    node.check(after.starts_with("SIP/2.0 401"), || {
        format!("the REGISTER sent again after another request on its count got:\n{after}")
    });
    // A lower CSeq within the Call-ID is still out of order, on a fresh count.
    let late = send(&register(1, "fourth", &auth(2)));
    node.check(late.starts_with("SIP/2.0 500"), || {
        format!("an out-of-order REGISTER got:\n{late}")
    });
}

/// A login that checked out once is not trusted past a change to the account: a new
/// password replaces the old one at once, and a disabled account gets 403 (the node keeps
/// opened accounts only until the accounts change).
#[test]
fn a_changed_password_or_a_disabled_account_takes_effect_at_once() {
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "carol", "first-pw-1");
    let register = |password: &str| {
        let mut ua = Ua::new("127.0.0.1", "carol", "example.com", password);
        let contact = format!("<{}>", ua.contact());
        let r = ua.register(node.udp_addr(), "MD5", Some(&contact), Some(600));
        (r.status, r.text)
    };
    let update = |body: &str| {
        let put = http(
            admin,
            Some(&token),
            "PUT",
            "/v1/accounts/example.com/carol",
            Some(body),
        )
        .expect("admin API answers");
        assert_eq!(put.status, 200, "{}", put.body);
    };
    for _ in 0..2 {
        let (status, text) = register("first-pw-1");
        assert_eq!(status, 200, "{text}");
    }
    update(r#"{"password":"second-pw-2","customer":"acme"}"#);
    let (status, text) = register("first-pw-1");
    assert_eq!(status, 401, "the old password still logs in: {text}");
    let (status, text) = register("second-pw-2");
    assert_eq!(status, 200, "{text}");
    update(r#"{"password":"second-pw-2","customer":"acme","enabled":false}"#);
    let (status, text) = register("second-pw-2");
    assert_eq!(status, 403, "a disabled account logs in: {text}");
}

/// Every account's login is opened ahead of its first use, so a phone's first REGISTER
/// through a node (as in a storm, when another node died) reads no account from the store;
/// and a change to one account drops that account's opened login alone, not the others'.
#[test]
fn logins_are_opened_ahead_of_use_and_a_change_drops_only_its_own() {
    let node = Node::start_ready("");
    let (admin, token) = (node.admin_addr(), node.admin_token());
    add_account(admin, &token, "dave", "dave-pw-1");
    add_account(admin, &token, "erin", "erin-pw-1");
    wait_logins_opened(&node, admin, 2.0);
    let reads = || metric(admin, "tandem_auth_account_reads_total").expect("a /metrics series");
    let register = |user: &str, password: &str| {
        let mut ua = Ua::new("127.0.0.1", user, "example.com", password);
        let contact = format!("<{}>", ua.contact());
        let r = ua.register(node.udp_addr(), "MD5", Some(&contact), Some(600));
        assert_eq!(r.status, 200, "{user}: {}", r.text);
    };
    register("dave", "dave-pw-1");
    assert_eq!(reads(), 0.0, "dave's first REGISTER read his account");

    let put = http(
        admin,
        Some(&token),
        "PUT",
        "/v1/accounts/example.com/erin",
        Some(r#"{"password":"erin-pw-2","customer":"acme"}"#),
    )
    .expect("admin API answers");
    assert_eq!(put.status, 200, "{}", put.body);
    register("erin", "erin-pw-2");
    let before = reads();
    register("dave", "dave-pw-1");
    assert_eq!(
        reads(),
        before,
        "a change to erin's account made dave's account be read again"
    );
}

/// The leader's sweep of lapsed bindings writes nothing while nothing has lapsed: with a
/// live binding stored, no node's Raft log moves over more than one sweep interval (10 s).
/// Before the index of bindings by expiry, every sweep put an entry through the log (and
/// made every node scan every binding) whether anything had lapsed or not.
#[test]
fn the_expiry_sweep_writes_nothing_while_nothing_has_lapsed() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let one = cluster.member(1);
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    add_account(one.admin_addr, &token, "gina", "pw-gina-1");
    let mut ua = Ua::new("127.0.0.1", "gina", "example.com", "pw-gina-1");
    let contact = format!("<{}>", ua.contact());
    assert_eq!(
        ua.register(one.sip_addr(), "MD5", Some(&contact), Some(300))
            .status,
        200
    );
    let logs = || -> Vec<Option<f64>> {
        (1..=3)
            .map(|i| metric(cluster.member(i).admin_addr, "tandem_raft_last_log_index"))
            .collect()
    };
    // The writes of a new cluster's first seconds (each node's registry entry, the
    // feature version) and the registration's settle first: every node's log the same,
    // twice 1.5 s apart.
    let mut last = Vec::new();
    Wait::new(
        "every node to hold the same log, unchanged for 1.5 s",
        Duration::from_secs(15),
    )
    .every(Duration::from_millis(1500))
    .showing(&cluster)
    .until(|| {
        let l = logs();
        let settled = l[0].is_some() && l.iter().all(|x| *x == l[0]) && l == last;
        last = l;
        settled
    });
    let before = logs();
    std::thread::sleep(Duration::from_millis(12_500));
    assert_eq!(
        logs(),
        before,
        "the Raft log moved while no binding had lapsed (last log index of nodes 1-3)"
    );
    let stored = bindings(one.admin_addr, &token, "gina");
    assert_eq!(stored.as_array().map(Vec::len), Some(1), "{stored}");
}

/// A key rotation followed by a rolling restart keeps nonces good between nodes (#20). Node
/// 1 restarts with the rotated key file, holding the old and the new master key; nodes 2
/// and 3 have the file but still hold only the old key. A nonce from either side answered
/// at the other must be known for this cluster's (401 with stale=true, which a phone
/// retries at once), not taken for a forgery (a plain 401, which many phones show as a
/// wrong password).
#[test]
fn nonces_stay_good_between_nodes_through_a_key_rotation_and_a_rolling_restart() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let one = cluster.member(1);
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    add_account(one.admin_addr, &token, "ivan", "pw-ivan-1");
    cluster.wait_caught_up(2, Duration::from_secs(10));

    let rotate = one.cli(&["keys", "rotate"]);
    assert!(rotate.status.success(), "{}", describe(&rotate));
    for m in &cluster.members[1..] {
        std::fs::copy(one.dir.join("master.key"), m.dir.join("master.key")).unwrap();
    }
    one.sigterm();
    assert!(
        one.wait_exit(Duration::from_secs(20)).is_some(),
        "node 1 did not stop on SIGTERM"
    );
    one.start();
    Wait::new("node 1 to be ready again", Duration::from_secs(20))
        .showing(&cluster)
        .until(|| one.get("/ready").is_some_and(|r| r.status == 200));

    let mut ua = Ua::new("127.0.0.1", "ivan", "example.com", "pw-ivan-1");
    let contact = format!("<{}>", ua.contact());
    for (from, to) in [(1, 2), (2, 1)] {
        let (issuer, checker) = (cluster.member(from), cluster.member(to));
        let first = ua.register_once(issuer.sip_addr(), Some(&contact), Some(300), "");
        assert_eq!(first.status, 401, "{}", first.text);
        let auth = ua.authorization(&md5_challenge(&first), "REGISTER", "sip:example.com", 1);
        let elsewhere = ua.register_once(
            checker.sip_addr(),
            Some(&contact),
            Some(300),
            &format!("Authorization: {auth}\r\n"),
        );
        assert_eq!(elsewhere.status, 401, "{}", elsewhere.text);
        assert!(
            md5_challenge(&elsewhere).contains("stale=true"),
            "node {to} took node {from}'s nonce for a forgery after the rotation:\n{}",
            elsewhere.text
        );
        let retried =
            ua.authorization(&md5_challenge(&elsewhere), "REGISTER", "sip:example.com", 1);
        let ok = ua.register_once(
            checker.sip_addr(),
            Some(&contact),
            Some(300),
            &format!("Authorization: {retried}\r\n"),
        );
        assert_eq!(ok.status, 200, "{}", ok.text);
    }
}
