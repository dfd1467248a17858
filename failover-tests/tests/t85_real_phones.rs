//! Real phones against a three-node cluster with the default configuration: baresip
//! (Debian's `baresip-core`) registers through node 1, linphone (`linphone-cli`) through
//! node 2, and each calls the other, answers, and hangs up. The phones are the judges of
//! the defaults: baresip 1.0 gives up on any challenge that offers SHA-256 at all, so a
//! default that offers it to everyone fails here. A callback then connects the two phones
//! through the app server (called without an offer, held, re-INVITEd).

use std::time::Duration;

use tandem_failover_tests::cluster::{add_account, bindings, wait_metric, Cluster, MemberRole};
use tandem_failover_tests::phones::{free_udp_port, Baresip, Linphone};
use tandem_failover_tests::Wait;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn baresip_and_linphone_register_through_different_nodes_and_call_each_other() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let (one, two) = (cluster.member(1), cluster.member(2));
    add_account(one.admin_addr, &token, "alice", "example.com", "pw-alice-1");
    add_account(one.admin_addr, &token, "bob", "example.com", "pw-bob-1");
    cluster.wait_caught_up(2, Duration::from_secs(10));

    // Alice's baresip, through node 1; it answers calls on its own.
    let bs_ip = "127.0.0.40";
    let mut alice = Baresip::start(bs_ip, free_udp_port(bs_ip), free_udp_port(bs_ip));
    let outcome = alice.add_account(&format!(
        "<sip:alice@example.com>;auth_pass=pw-alice-1;outbound=\"sip:{}\";regint=600;\
         answermode=auto",
        one.sip_addr()
    ));
    assert!(
        outcome["type"] == "REGISTER_OK",
        "baresip could not register through node 1: {outcome}\n{}",
        alice.log()
    );

    // Bob's linphone, through node 2; it answers calls on its own too.
    let lp_ip = "127.0.0.41";
    let mut bob = Linphone::start(
        lp_ip,
        free_udp_port(lp_ip),
        free_udp_port(lp_ip),
        ("bob", "example.com", "pw-bob-1"),
        two.sip_addr(),
        true,
    );
    bob.wait_registered(WAIT);
    // linphone is one of the phones offered SHA-256 by default, and answers it.
    assert!(
        bob.debug_log().contains("algorithm=SHA-256"),
        "linphone did not authenticate with SHA-256\n{}",
        bob.log()
    );

    // Each node knows both bindings before the calls.
    for m in [one, two] {
        Wait::new(format!("node {} to hold both bindings", m.id), WAIT)
            .showing(&cluster)
            .until(|| {
                let (a, b) = (
                    bindings(m.admin_addr, &token, "alice"),
                    bindings(m.admin_addr, &token, "bob"),
                );
                let n = |v: &serde_json::Value| v.as_array().map_or(0, Vec::len);
                if n(&a) == 1 && n(&b) == 1 {
                    Ok(())
                } else {
                    Err(format!("alice {a}, bob {b}"))
                }
            });
    }

    // baresip calls linphone: in at node 1, out through node 2 to Bob.
    alice.command("dial", Some("sip:bob@example.com"));
    let up = alice.wait_event(&["CALL_ESTABLISHED", "CALL_CLOSED"], WAIT);
    assert!(
        up["type"] == "CALL_ESTABLISHED",
        "baresip's call to linphone did not connect: {up}\n{}\n{}",
        alice.log(),
        bob.log()
    );
    bob.wait_line("connected", WAIT);
    alice.command("hangup", None);
    let closed = alice.wait_event(&["CALL_CLOSED"], WAIT);
    assert!(closed["type"] == "CALL_CLOSED", "{closed}");
    bob.wait_line("ended", WAIT);

    // linphone calls baresip: in at node 2, out through node 1 to Alice.
    bob.send("call sip:alice@example.com");
    let up = alice.wait_event(&["CALL_ESTABLISHED", "CALL_CLOSED"], WAIT);
    assert!(
        up["type"] == "CALL_ESTABLISHED" && up["direction"] == "incoming",
        "linphone's call to baresip did not connect: {up}\n{}\n{}",
        alice.log(),
        bob.log()
    );
    bob.wait_line("connected", WAIT);
    bob.send("terminate");
    let closed = alice.wait_event(&["CALL_CLOSED"], WAIT);
    assert!(
        closed["param"]
            .as_str()
            .is_some_and(|p| p.contains("reset by peer")),
        "baresip did not hear linphone hang up: {closed}"
    );

    // A callback (RFC 3725) from node 1: baresip is called without an offer, answers with
    // its own and is held; then linphone, through node 2; then baresip is re-INVITEd
    // with linphone's session. Both phones must accept each step for the call to connect.
    let started = one
        .request(
            "POST",
            "/v1/callback",
            Some(r#"{"account":"alice@example.com","a":"alice","b":"bob"}"#),
        )
        .unwrap();
    assert_eq!(started.status, 202, "{}", started.body);
    let id = started.json()["id"].as_str().unwrap().to_owned();
    let up = alice.wait_event(&["CALL_ESTABLISHED", "CALL_CLOSED"], WAIT);
    assert!(
        up["type"] == "CALL_ESTABLISHED",
        "baresip did not take the callback: {up}\n{}",
        alice.log()
    );
    bob.wait_line("connected", WAIT);
    let state = |want: &str| {
        Wait::new(format!("callback {id} {want}"), WAIT)
            .showing(&cluster)
            .until(|| {
                let v = one.get(&format!("/v1/callbacks/{id}"))?.json();
                (v["state"] == want).then_some(v)
            })
    };
    state("connected");
    bob.send("terminate");
    let closed = alice.wait_event(&["CALL_CLOSED"], WAIT);
    assert!(closed["type"] == "CALL_CLOSED", "{closed}");
    let ended = state("ended");
    assert_eq!(ended["code"], 200, "{ended:#}");

    // Neither call is left up on any node.
    for m in &cluster.members {
        wait_metric(&cluster, m.admin_addr, "tandem_sip_calls_active", 0.0, WAIT);
    }
}
