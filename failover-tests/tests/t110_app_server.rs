//! The app server against a real provider: a standalone `tandem` node plays the provider
//! (its domain `provider.test`, where our provider account `u0` and the "telephone
//! number" `0301234` are accounts, the number's phone a test UA registered there). A
//! local account calls the number at its own domain; the app server challenges it, runs
//! its dialplan or the default route, and places its own call through the provider,
//! answering the provider's 407 with the provider account's credentials.

use std::time::Duration;

use serde_json::Value;
use tandem_failover_tests::cluster::{add_account, http, metric, Cluster, MemberRole};
use tandem_failover_tests::kamailio::Kamailio;
use tandem_failover_tests::ua::{Received, Ua};
use tandem_failover_tests::{slow_disk, Deadline, Node, Wait};

/// The provider: a standalone node serving `provider.test`.
struct Provider {
    node: Node,
    token: String,
}

impl Provider {
    fn start() -> Provider {
        let node = Node::start_ready("");
        let token = node.admin_token();
        let p = Provider { node, token };
        add_account(p.node.admin_addr(), &p.token, "u0", "provider.test", "pw0");
        add_account(
            p.node.admin_addr(),
            &p.token,
            "0301234",
            "provider.test",
            "pw-num",
        );
        p
    }

    /// The number's phone, registered at the provider.
    fn phone(&self) -> Ua {
        let mut ua = Ua::new("127.0.0.1", "0301234", "provider.test", "pw-num");
        let contact = ua.contact();
        let r = ua.register(
            self.node.udp_addr(),
            "MD5",
            Some(&format!("<{contact}>")),
            Some(600),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        ua
    }
}

/// The provider account p0: u0 at the provider, through its address as outbound proxy.
fn provider_account(provider: &Provider) -> String {
    format!(
        r#"{{"registrar":"provider.test","outbound_proxy":"{}","transport":"udp",
            "username":"u0","password":"pw0","expires_secs":600}}"#,
        provider.node.udp_addr()
    )
}

/// A cluster of one with customer c1, account alice@example.com and the provider account
/// p0 (u0 at the provider, through its address as outbound proxy).
fn form(provider: &Provider) -> Cluster {
    form_with(&provider_account(provider))
}

/// [`form`] with the provider account p0 that `body` describes.
fn form_with(provider_account: &str) -> Cluster {
    form_with_config(provider_account, "")
}

/// [`form_with`], with `extra` tables in the node's config.
fn form_with_config(provider_account: &str, extra: &str) -> Cluster {
    form_members(&[MemberRole::Full], provider_account, extra)
}

/// [`form_with_config`] with these members.
fn form_members(roles: &[MemberRole], provider_account: &str, extra: &str) -> Cluster {
    let cluster = Cluster::form(roles, extra);
    Wait::new("feature version 1", Duration::from_secs(15))
        .showing(&cluster)
        .until(|| {
            cluster
                .member(1)
                .status()
                .is_some_and(|s| s["feature_version"].as_u64() >= Some(1))
        });
    let m = cluster.member(1);
    assert_eq!(m.put_customer("c1"), Some(200));
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let a = http(
        m.admin_addr,
        Some(token.trim()),
        "PUT",
        "/v1/accounts/example.com/alice",
        Some(r#"{"password":"pw-alice","customer":"c1"}"#),
    )
    .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    let p = m
        .request("PUT", "/v1/providers/c1/p0", Some(provider_account))
        .unwrap();
    assert_eq!(p.status, 201, "{}", p.body);
    cluster
}

/// What most tests start with: the provider with the number's phone registered there,
/// and a cluster of one set up by [`form`], with its SIP address.
struct Fixture {
    provider: Provider,
    phone: Ua,
    cluster: Cluster,
    node: std::net::SocketAddr,
}

fn fixture() -> Fixture {
    let provider = Provider::start();
    let phone = provider.phone();
    let cluster = form(&provider);
    let node = cluster.member(1).sip_addr();
    Fixture {
        provider,
        phone,
        cluster,
        node,
    }
}

/// The call records node `id` holds for customer c1, once it holds `n`.
fn wait_cdrs(cluster: &Cluster, id: u64, n: usize) -> Vec<Value> {
    let m = cluster.member(id);
    Wait::new(format!("{n} CDRs on node {id}"), Duration::from_secs(15))
        .showing(cluster)
        .until(|| {
            let records = m
                .get("/v1/cdrs?customer=c1")
                .and_then(|a| a.json()["records"].as_array().cloned())
                .unwrap_or_default();
            (records.len() >= n).then_some(records)
        })
}

/// The record of leg `name` (`a`, `b1`, ...).
fn leg<'a>(records: &'a [Value], name: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["leg"] == name)
        .unwrap_or_else(|| panic!("no record of leg {name}: {records:#?}"))
}

/// Checks the times of an answered leg's record: in order, and a duration that matches.
/// Ringing is optional: a 180 that reaches the app server with the 200 is not passed on
/// (the caller never heard it ring).
fn check_answered_times(r: &Value) {
    let t = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing: {r:#}"))
    };
    let (start, answer, end) = (t("start_ms"), t("answer_ms"), t("end_ms"));
    let ring = r["ring_ms"].as_u64().unwrap_or(start);
    assert!(start <= ring && ring <= answer && answer <= end, "{r:#}");
    assert_eq!(
        r["duration_s"].as_u64(),
        Some((end - answer) / 1000),
        "{r:#}"
    );
}

/// Account `user@example.com` of customer c1, password `pw-<user>`.
fn c1_account(cluster: &Cluster, user: &str) {
    let a = cluster
        .member(1)
        .request(
            "PUT",
            &format!("/v1/accounts/example.com/{user}"),
            Some(&format!(r#"{{"password":"pw-{user}","customer":"c1"}}"#)),
        )
        .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
}

/// A phone of `user@example.com` registered through `node`.
fn registered_phone(user: &str, node: std::net::SocketAddr) -> Ua {
    let mut ua = Ua::new("127.0.0.1", user, "example.com", &format!("pw-{user}"));
    let contact = ua.contact();
    let r = ua.register(node, "MD5", Some(&format!("<{contact}>")), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);
    ua
}

fn alice() -> Ua {
    Ua::new("127.0.0.1", "alice", "example.com", "pw-alice")
}

fn put_dialplan(cluster: &Cluster, script: &str) -> (u16, Value) {
    let body = serde_json::json!({ "script": script }).to_string();
    let a = cluster
        .member(1)
        .request(
            "PUT",
            "/v1/accounts/example.com/alice/dialplan",
            Some(&body),
        )
        .unwrap();
    (a.status, a.json())
}

/// The phone at the provider answers the next INVITE with `status`, after a 180.
fn answer_next(phone: &Ua, status: u16, reason: &str) -> Received {
    let invite = phone.expect_request("INVITE", Duration::from_secs(20));
    phone.respond(&invite, 180, "Ringing", "");
    let contact = phone.contact();
    phone.respond(
        &invite,
        status,
        reason,
        &format!("Contact: <{contact}>\r\n"),
    );
    if status >= 300 {
        phone.expect_request("ACK", Duration::from_secs(5));
    }
    invite
}

/// The caller's side of an answered call: ACK, then BYE, answered 200.
fn ack_and_hang_up(caller: &Ua, ok: &Received) {
    let dialog = caller.dialog(ok);
    caller.send_in_dialog(&dialog, "ACK", dialog.cseq);
    caller.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
    let bye_ok = caller.expect_response("BYE", Duration::from_secs(20));
    assert_eq!(bye_ok.status(), Some(200), "{}", bye_ok.text);
}

/// `caller` calls the number; the phone at the provider answers; `caller` hangs up.
fn answered_call(caller: &mut Ua, node: std::net::SocketAddr, phone: &Ua, call_id: &str) {
    std::thread::scope(|s| {
        let callee = s.spawn(move || {
            answer_next(phone, 200, "OK");
            wait_for_bye(phone);
        });
        let ok = caller.invite(node, "sip:0301234@example.com", call_id, &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        ack_and_hang_up(caller, &ok);
        callee.join().unwrap();
    });
}

/// The phone's side of an answered call: the ACK, then the BYE, answered 200.
fn wait_for_bye(phone: &Ua) {
    phone.expect_request("ACK", Duration::from_secs(10));
    let bye = phone.expect_request("BYE", Duration::from_secs(20));
    phone.respond(&bye, 200, "OK", "");
}

#[test]
fn a_local_account_calls_a_number_out_through_its_provider_and_hangs_up() {
    let Fixture {
        provider: _provider,
        phone,
        cluster: _cluster,
        node,
    } = fixture();
    let mut alice = alice();
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            let invite = answer_next(phone, 200, "OK");
            // The provider saw our provider account calling, authenticated.
            assert!(
                invite.text.contains("sip:u0@provider.test"),
                "{}",
                invite.text
            );
            wait_for_bye(phone);
            invite
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "out-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let contact = ok.header("Contact").unwrap();
        assert!(
            contact.contains("tdb-"),
            "the app server answers itself: {contact}"
        );
        ack_and_hang_up(&alice, &ok);
        let invite = callee.join().unwrap();
        // A call of the app server's own: not the caller's Call-ID.
        assert_ne!(invite.header("Call-ID").as_deref(), Some("out-1"));
    });
    // One record per leg: the caller's into the node, and the one the node placed.
    let records = wait_cdrs(&_cluster, 1, 2);
    assert_eq!(records.len(), 2, "{records:#?}");
    let a = leg(&records, "a");
    assert_eq!(a["call"], "out-1");
    assert_eq!(a["direction"], "in");
    assert_eq!(a["account"], "alice@example.com");
    assert_eq!(a["customer"], "c1");
    assert_eq!(a["code"], 200);
    assert_eq!(a["outcome"], "answered");
    assert!(a["to"].as_str().unwrap().contains("0301234"), "{a:#}");
    check_answered_times(a);
    let b = leg(&records, "b1");
    assert_eq!(b["call"], "out-1", "both legs name the caller's call");
    assert_eq!(b["direction"], "out");
    assert_eq!(b["provider"], "p0");
    assert_eq!(b["to"], "0301234@p0");
    assert_eq!(b["code"], 200);
    assert_eq!(b["outcome"], "answered");
    check_answered_times(b);
}

#[test]
fn nobody_but_an_authenticated_local_account_makes_it_dial() {
    let Fixture {
        provider: _provider,
        phone,
        cluster: _cluster,
        node,
    } = fixture();

    // No credentials, wrong credentials, a foreign caller, a forged call token.
    let probe = |from: &str, target: &str, auth: &str| -> u16 {
        let ua = Ua::new("127.0.0.1", "x", "elsewhere.test", "x");
        let local = ua.local();
        let text = format!(
            "INVITE {target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-probe{};rport\r\n\
             From: <{from}>;tag=p1\r\nTo: <{target}>\r\nCall-ID: probe-{}\r\nCSeq: 1 INVITE\r\n\
             Max-Forwards: 70\r\nContact: <sip:x@{local}>\r\n{auth}Content-Length: 0\r\n\r\n",
            local.port(),
            local.port(),
        );
        ua.socket.send_to(text.as_bytes(), node).unwrap();
        loop {
            let r = ua.expect_response("INVITE", Duration::from_secs(10));
            let status = r.status().unwrap();
            if status >= 200 {
                return status;
            }
        }
    };
    assert_eq!(
        probe("sip:alice@example.com", "sip:0301234@example.com", ""),
        407,
        "no credentials"
    );
    let forged = "Proxy-Authorization: Digest username=\"alice\", realm=\"example.com\", \
                  nonce=\"0000\", uri=\"sip:0301234@example.com\", response=\"00000000000000000000000000000000\"\r\n";
    assert!(
        [403, 407].contains(&probe(
            "sip:alice@example.com",
            "sip:0301234@example.com",
            forged
        )),
        "forged credentials"
    );
    assert_eq!(
        probe("sip:evil@elsewhere.test", "sip:0301234@provider.test", ""),
        403,
        "a caller from a domain not served here"
    );
    let bye = |token: &str| {
        let ua = Ua::new("127.0.0.1", "x", "elsewhere.test", "x");
        let local = ua.local();
        let text = format!(
            "BYE sip:tdb-{token}a@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-bye{};rport\r\n\
             From: <sip:x@elsewhere.test>;tag=p1\r\nTo: <sip:y@example.com>;tag=p2\r\nCall-ID: forged\r\n\
             CSeq: 2 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            local.port()
        );
        ua.socket.send_to(text.as_bytes(), node).unwrap();
        ua.expect_response("BYE", Duration::from_secs(10))
            .status()
            .unwrap()
    };
    assert_eq!(bye(&"0".repeat(32)), 481, "a call token nobody was given");

    // None of that reached the provider: the first INVITE the number's phone sees is
    // the genuine call placed now.
    let mut alice = alice();
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || answer_next(phone, 486, "Busy Here"));
        let r = alice.invite(node, "sip:0301234@example.com", "genuine-1", &mut |_, _| {});
        assert_eq!(r.status(), Some(486), "{}", r.text);
        let seen = callee.join().unwrap();
        assert!(seen.text.contains("u0@provider.test"), "{}", seen.text);
    });
}

#[test]
fn the_dialplan_routes_refuses_and_fails_cleanly() {
    let Fixture {
        provider: _provider,
        phone,
        cluster,
        node,
    } = fixture();

    // A script that does not compile is refused with where the error is.
    let (code, json) = put_dialplan(&cluster, "let x = 1;\nlet y = ;");
    assert_eq!(code, 400, "{json}");
    assert!(json["error"].as_str().unwrap().contains("line 2"), "{json}");

    let (code, json) = put_dialplan(
        &cluster,
        r#"
        if invite.user.starts_with("0900") { respond(403, "Premium Numbers Blocked"); }
        log(`calling ${invite.user}`);
        dial("0301234@nope | " + invite.user + "@p0/20");
        "#,
    );
    assert_eq!(code, 201, "{json}");
    let mut alice = alice();
    let r = alice.invite(
        node,
        "sip:09001234@example.com",
        "premium-1",
        &mut |_, _| {},
    );
    assert_eq!(r.status(), Some(403), "{}", r.text);
    assert!(r.text.contains("Premium Numbers Blocked"), "{}", r.text);

    // The first target names no provider; the serial group goes on to p0.
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            answer_next(phone, 200, "OK");
            wait_for_bye(phone);
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "planned-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        ack_and_hang_up(&alice, &ok);
        callee.join().unwrap();
    });

    // A script that never ends: the caller gets a clean 500 naming the dialplan, well
    // within a second of script time.
    let (code, json) = put_dialplan(&cluster, "loop { }");
    assert_eq!(code, 200, "{json}");
    let started = Deadline::after(Duration::ZERO);
    let r = alice.invite(node, "sip:0301234@example.com", "loop-1", &mut |_, _| {});
    let took = started.elapsed();
    assert_eq!(r.status(), Some(500), "{}", r.text);
    let reason = r.header("Reason").unwrap_or_default();
    assert!(reason.contains("dialplan"), "{}", r.text);
    eprintln!("an endless dialplan was answered in {took:?}: {reason}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Deleting the dialplan brings back the default route.
    let d = cluster
        .member(1)
        .request("DELETE", "/v1/accounts/example.com/alice/dialplan", None)
        .unwrap();
    assert_eq!(d.status, 200, "{}", d.body);
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || answer_next(phone, 486, "Busy Here"));
        let r = alice.invite(node, "sip:0301234@example.com", "default-1", &mut |_, _| {});
        assert_eq!(r.status(), Some(486), "{}", r.text);
        callee.join().unwrap();
    });
}

#[test]
fn the_callers_cancel_reaches_the_number_and_ends_in_487() {
    let Fixture {
        provider: _provider,
        phone,
        cluster: _cluster,
        node,
    } = fixture();
    let mut alice = alice();
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            let invite = phone.expect_request("INVITE", Duration::from_secs(20));
            phone.respond(&invite, 180, "Ringing", "");
            let cancel = phone.expect_request("CANCEL", Duration::from_secs(20));
            phone.respond(&cancel, 200, "OK", "");
            phone.respond(&invite, 487, "Request Terminated", "");
            phone.expect_request("ACK", Duration::from_secs(5));
        });
        let target = "sip:0301234@example.com";
        let r = alice.invite(node, target, "cancel-1", &mut |ua, _| {
            // The second INVITE (after the 407) is attempt 1.
            ua.cancel(node, target, "cancel-1", 1);
        });
        assert_eq!(r.status(), Some(487), "{}", r.text);
        callee.join().unwrap();
    });
}

/// A CANCEL that comes while the caller's credentials wait for a follower to catch up
/// with the leader (the caller's password was changed through the leader a moment ago, so
/// the follower's copy refuses it until then) ends the call there: 487, and no call goes
/// out to the provider. The follower's disk is slowed so that the wait lasts. The fence: a
/// call placed after the 487 is the first the provider's phone hears of.
#[test]
fn a_cancel_while_the_callers_credentials_wait_for_the_leader_ends_the_call() {
    let provider = Provider::start();
    let phone = provider.phone();
    let cluster = form_members(
        &[MemberRole::Full, MemberRole::Full, MemberRole::Full],
        &provider_account(&provider),
        "",
    );
    let (leader, _) = cluster.wait_for_leader(&[], Duration::from_secs(10));
    let follower = cluster.member(if leader == 1 { 2 } else { 1 });
    slow_disk::restart_slowed(&cluster, follower, 80);
    cluster.wait_caught_up(follower.id, Duration::from_secs(10));
    let node = follower.sip_addr();
    let questions = || {
        metric(follower.admin_addr, "tandem_raft_catch_up_questions_total").unwrap_or_else(|| {
            cluster.panic_with_logs("no tandem_raft_catch_up_questions_total in /metrics")
        })
    };
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let target = "sip:0301234@example.com";
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            answer_next(phone, 200, "OK");
            let heard = Deadline::after(Duration::ZERO);
            wait_for_bye(phone);
            heard
        });
        let before = questions();
        let changed = http(
            cluster.member(leader).admin_addr,
            Some(token.trim()),
            "PUT",
            "/v1/accounts/example.com/alice",
            Some(r#"{"password":"pw-alice-2","customer":"c1"}"#),
        )
        .unwrap();
        assert_eq!(changed.status, 200, "{}", changed.body);
        let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-2");
        let last = alice.invite_cancelled_at_once(node, target, "cancel-wait");
        if last.status() != Some(487) {
            cluster.panic_with_logs(&format!(
                "the cancelled INVITE was answered:\n{}",
                last.text
            ));
        }
        assert!(
            questions() > before,
            "the follower asked the leader nothing: its copy of the password was new already, \
             so this test did not test the wait"
        );
        let fence = Deadline::after(Duration::ZERO);
        let mut again = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice-2");
        let ok = again.invite(node, target, "after-cancel", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        ack_and_hang_up(&again, &ok);
        let heard = callee.join().unwrap();
        assert!(
            heard.elapsed() < fence.elapsed(),
            "the provider's phone heard of a call before the one placed after the 487"
        );
    });
}

/// Provider A answers 503: the serial group goes on to provider B, where the call is
/// answered. Provider A is a bare socket that answers every INVITE with 503.
#[test]
fn a_provider_answering_503_is_passed_over_for_the_next_in_a_serial_group() {
    let Fixture {
        provider: _provider,
        phone,
        cluster,
        node,
    } = fixture();
    let broken = Ua::new("127.0.0.1", "broken", "broken.test", "x");
    let body = format!(
        r#"{{"registrar":"broken.test","outbound_proxy":"{}","transport":"udp",
            "username":"ua","password":"pa","expires_secs":600,"enabled":true}}"#,
        broken.local()
    );
    let p = cluster
        .member(1)
        .request("PUT", "/v1/providers/c1/pa", Some(&body))
        .unwrap();
    assert_eq!(p.status, 201, "{}", p.body);
    let (code, json) = put_dialplan(
        &cluster,
        r#"dial(`${invite.user}@pa | ${invite.user}@p0`);"#,
    );
    assert_eq!(code, 201, "{json}");
    let mut alice = alice();
    std::thread::scope(|s| {
        let broken = &broken;
        let refuser = s.spawn(move || loop {
            // Answers INVITEs only (the registration agent's REGISTERs get 503 too).
            let Some(r) = broken.recv(Duration::from_secs(20)) else {
                panic!("provider A never got the INVITE");
            };
            if r.method() == Some("INVITE") {
                broken.respond(&r, 503, "Service Unavailable", "");
                return r;
            }
            if r.method() == Some("REGISTER") {
                broken.respond(&r, 503, "Service Unavailable", "");
            }
        });
        let phone = &phone;
        let callee = s.spawn(move || answer_next(phone, 486, "Busy Here"));
        let r = alice.invite(
            node,
            "sip:0301234@example.com",
            "fallback-1",
            &mut |_, _| {},
        );
        assert_eq!(r.status(), Some(486), "provider B's answer: {}", r.text);
        let at_a = refuser.join().unwrap();
        assert!(
            at_a.text.contains("sip:0301234@broken.test"),
            "{}",
            at_a.text
        );
        callee.join().unwrap();
    });
    let records = wait_cdrs(&cluster, 1, 3);
    let a = leg(&records, "a");
    assert_eq!(
        (&a["code"], &a["outcome"]),
        (&486.into(), &"busy".into()),
        "{a:#}"
    );
    assert!(a["answer_ms"].is_null(), "{a:#}");
    let b1 = leg(&records, "b1");
    assert_eq!(
        (&b1["provider"], &b1["code"], &b1["outcome"]),
        (&"pa".into(), &503.into(), &"failed".into()),
        "{b1:#}"
    );
    let b2 = leg(&records, "b2");
    assert_eq!(
        (&b2["provider"], &b2["code"], &b2["outcome"]),
        (&"p0".into(), &486.into(), &"busy".into()),
        "{b2:#}"
    );
    assert!(
        b2["ring_ms"].is_u64(),
        "the phone rang before it refused: {b2:#}"
    );
}

/// An account at its `max_concurrent_calls` gets 403 for one more call out, with a
/// reason; the calls it has are not disturbed.
#[test]
fn max_concurrent_calls_refuses_the_call_over_the_limit() {
    let Fixture {
        provider: _provider,
        phone,
        cluster,
        node,
    } = fixture();
    let a = cluster
        .member(1)
        .request(
            "PUT",
            "/v1/accounts/example.com/alice",
            Some(r#"{"max_concurrent_calls":1}"#),
        )
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    let mut first = alice();
    let mut second = alice();
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            let invite = answer_next(phone, 200, "OK");
            wait_for_bye(phone);
            invite
        });
        let ok = first.invite(node, "sip:0301234@example.com", "limit-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = first.dialog(&ok);
        first.send_in_dialog(&dialog, "ACK", dialog.cseq);
        let refused = second.invite(node, "sip:0301234@example.com", "limit-2", &mut |_, _| {});
        assert_eq!(refused.status(), Some(403), "{}", refused.text);
        assert!(refused.text.contains("too many calls"), "{}", refused.text);
        first.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
        assert_eq!(
            first
                .expect_response("BYE", Duration::from_secs(20))
                .status(),
            Some(200)
        );
        callee.join().unwrap();
    });
}

/// A dialplan rings two local phones at once: the first to answer gets the call, the
/// other is cancelled; the caller is connected to the one that answered.
#[test]
fn a_parallel_dial_of_two_local_phones_connects_the_first_to_answer_and_cancels_the_other() {
    let provider = Provider::start();
    let cluster = form(&provider);
    let node = cluster.member(1).sip_addr();
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let mut phones = Vec::new();
    for user in ["bob", "carol"] {
        let a = http(
            cluster.member(1).admin_addr,
            Some(token.trim()),
            "PUT",
            &format!("/v1/accounts/example.com/{user}"),
            Some(&format!(r#"{{"password":"pw-{user}","customer":"c1"}}"#)),
        )
        .unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
        let mut ua = Ua::new("127.0.0.1", user, "example.com", &format!("pw-{user}"));
        let contact = ua.contact();
        let r = ua.register(node, "MD5", Some(&format!("<{contact}>")), Some(600));
        assert_eq!(r.status, 200, "{}", r.text);
        phones.push(ua);
    }
    let (code, json) = put_dialplan(&cluster, r#"dial("bob & carol/20");"#);
    assert_eq!(code, 201, "{json}");
    let mut alice = alice();
    std::thread::scope(|s| {
        let (bob, carol) = (&phones[0], &phones[1]);
        let bob_side = s.spawn(move || {
            let invite = bob.expect_request("INVITE", Duration::from_secs(20));
            assert!(
                invite.text.contains("sip:alice@example.com"),
                "{}",
                invite.text
            );
            bob.respond(&invite, 180, "Ringing", "");
            // Answer only once carol rings too, so both are ringing when bob answers.
            std::thread::sleep(Duration::from_millis(300));
            let contact = bob.contact();
            bob.respond(&invite, 200, "OK", &format!("Contact: <{contact}>\r\n"));
            bob.expect_request("ACK", Duration::from_secs(10));
            let bye = bob.expect_request("BYE", Duration::from_secs(20));
            bob.respond(&bye, 200, "OK", "");
        });
        let carol_side = s.spawn(move || {
            let invite = carol.expect_request("INVITE", Duration::from_secs(20));
            carol.respond(&invite, 180, "Ringing", "");
            let cancel = carol.expect_request("CANCEL", Duration::from_secs(20));
            carol.respond(&cancel, 200, "OK", "");
            carol.respond(&invite, 487, "Request Terminated", "");
            carol.expect_request("ACK", Duration::from_secs(5));
        });
        let ok = alice.invite(node, "sip:ringall@example.com", "fork-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        carol_side.join().unwrap();
        alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
        assert_eq!(
            alice
                .expect_response("BYE", Duration::from_secs(20))
                .status(),
            Some(200)
        );
        bob_side.join().unwrap();
    });
}

/// Sends `text` (with `{local}` standing for the socket's own address) from a fresh
/// socket to `node`, and returns the first final response to `method`.
fn final_status(node: std::net::SocketAddr, method: &str, text: &str) -> (u16, String) {
    let ua = Ua::new("127.0.0.1", "x", "elsewhere.test", "x");
    let text = text.replace("{local}", &ua.local().to_string());
    ua.socket.send_to(text.as_bytes(), node).unwrap();
    loop {
        let r = ua.expect_response(method, Duration::from_secs(10));
        if r.status().unwrap() >= 200 {
            return (r.status().unwrap(), r.text);
        }
    }
}

/// What an authenticated caller could try to get more than a call: dial-spec syntax
/// %-escaped into the number, a Route to a host of its choosing, no Contact; and requests
/// inside its own call naming the other leg, or sent while it rings. Each gets a clear
/// answer, and none reaches the provider.
#[test]
fn a_caller_cannot_smuggle_routes_or_spec_syntax_or_reach_the_other_leg() {
    let Fixture {
        provider: _provider,
        phone,
        cluster: _cluster,
        node,
    } = fixture();
    let mut alice = alice();
    for (target, want) in [
        ("sip:1%7C0900666@example.com", 484),
        ("sip:0900%26x@example.com", 484),
        ("sip:a%40p0@example.com", 484),
    ] {
        let r = alice.invite(
            node,
            target,
            &format!("smuggle-{want}-{}", target.len()),
            &mut |_, _| {},
        );
        assert_eq!(r.status(), Some(want), "{target}: {}", r.text);
    }
    // A Route elsewhere: the proxy refuses to relay it even for an account that
    // authenticates (the first INVITE gets 407; the answer with credentials gets 403).
    let victim = std::net::UdpSocket::bind("127.0.0.99:0").unwrap();
    let challenge = final_status(
        node,
        "INVITE",
        &format!(
            "INVITE sip:0301234@provider.test SIP/2.0\r\nVia: SIP/2.0/UDP {{local}};branch=z9hG4bK-route1;rport\r\n\
             Route: <sip:{};lr>\r\nFrom: <sip:alice@example.com>;tag=r1\r\nTo: <sip:0301234@provider.test>\r\n\
             Call-ID: route-1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContact: <sip:alice@{{local}}>\r\n\
             Content-Length: 0\r\n\r\n",
            victim.local_addr().unwrap()
        ),
    );
    assert!(
        [403, 407].contains(&challenge.0),
        "a Route elsewhere: {}",
        challenge.1
    );
    victim
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        victim.recv_from(&mut buf).is_err(),
        "the Route's host got a request"
    );

    // While the call rings, a request inside it is answered at once; the other leg's
    // Contact with this leg's token is nobody's.
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            let invite = phone.expect_request("INVITE", Duration::from_secs(20));
            phone.respond(&invite, 180, "Ringing", "");
            std::thread::sleep(Duration::from_millis(500));
            let contact = phone.contact();
            phone.respond(&invite, 200, "OK", &format!("Contact: <{contact}>\r\n"));
            wait_for_bye(phone);
        });
        let mut ringing_contact = None;
        let ok = alice.invite(node, "sip:0301234@example.com", "hostile-1", &mut |_, r| {
            ringing_contact = r.header("Contact");
        });
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let contact = ringing_contact.expect("the 180 carries the app server's Contact");
        let uri = contact.trim_matches(|c| c == '<' || c == '>').to_owned();
        assert!(uri.contains("tdb-") && uri.contains("a@"), "{uri}");
        let other_leg = uri.replacen("a@", "b@", 1);
        let (status, text) = final_status(
            node,
            "BYE",
            &format!(
                "BYE {other_leg} SIP/2.0\r\nVia: SIP/2.0/UDP {{local}};branch=z9hG4bK-otherleg;rport\r\n\
                 From: <sip:alice@example.com>;tag=x\r\nTo: <sip:0301234@example.com>;tag=y\r\n\
                 Call-ID: hostile-1\r\nCSeq: 9 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ),
        );
        assert_eq!(
            status, 481,
            "the other leg's Contact with this leg's token: {text}"
        );
        ack_and_hang_up(&alice, &ok);
        callee.join().unwrap();
    });
}

/// The same call with Kamailio as the provider: it challenges our INVITE (digest with
/// qop=auth, its realm the provider's domain), routes it to the number's phone registered
/// there, and record-routes the rest of the call.
#[test]
fn a_call_goes_out_through_kamailio_as_the_provider() {
    let kamailio = Kamailio::start();
    let mut phone = Ua::new("127.0.0.1", "0301234", "kamailio.test", "pw-0301234");
    let contact = phone.contact();
    let r = phone.register(
        kamailio.addr,
        "MD5",
        Some(&format!("<{contact}>")),
        Some(30),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let cluster = form_with(&format!(
        r#"{{"registrar":"kamailio.test","outbound_proxy":"{}","transport":"udp",
            "username":"k0","password":"pw-k0","expires_secs":60}}"#,
        kamailio.addr
    ));
    let node = cluster.member(1).sip_addr();
    let mut alice = alice();
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            let invite = answer_next(phone, 200, "OK");
            assert!(
                invite.text.contains("sip:k0@kamailio.test"),
                "{}",
                invite.text
            );
            wait_for_bye(phone);
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "kam-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        ack_and_hang_up(&alice, &ok);
        callee.join().unwrap();
    });
    let log = std::fs::read_to_string(kamailio.log_path()).unwrap();
    assert!(
        log.contains("INVITE 0301234 from k0"),
        "Kamailio took no authenticated INVITE:\n{log}"
    );
    let records = wait_cdrs(&cluster, 1, 2);
    for name in ["a", "b1"] {
        let r = leg(&records, name);
        assert_eq!(
            (&r["code"], &r["outcome"]),
            (&200.into(), &"answered".into()),
            "{r:#}"
        );
        check_answered_times(r);
    }
    assert_eq!(leg(&records, "b1")["provider"], "p0");
}

/// Fifty calls of one account at once, each running a dialplan that waits in `dial()`: the
/// account's first ten runs go on (their phone rings), the runs over its limit are refused
/// at once with 503 and Retry-After, and nothing else is disturbed.
#[test]
fn fifty_runs_at_once_for_one_account_are_held_to_its_limit() {
    let provider = Provider::start();
    let cluster = form(&provider);
    let node = cluster.member(1).sip_addr();
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let a = http(
        cluster.member(1).admin_addr,
        Some(token.trim()),
        "PUT",
        "/v1/accounts/example.com/alice",
        Some(r#"{"max_concurrent_calls":100}"#),
    )
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    let b = http(
        cluster.member(1).admin_addr,
        Some(token.trim()),
        "PUT",
        "/v1/accounts/example.com/bob",
        Some(r#"{"password":"pw-bob","customer":"c1","max_contacts":1}"#),
    )
    .unwrap();
    assert_eq!(b.status, 201, "{}", b.body);
    // Bob's phone never answers: each run waits in dial() until its leg gives up.
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob");
    let contact = bob.contact();
    let r = bob.register(node, "MD5", Some(&format!("<{contact}>")), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);
    let (code, json) = put_dialplan(&cluster, r#"dial("bob/20");"#);
    assert_eq!(code, 201, "{json}");
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let callers: Vec<_> = (0..50)
            .map(|i| {
                s.spawn(move || {
                    let mut ua = alice();
                    let r = ua.invite(
                        node,
                        "sip:slow@example.com",
                        &format!("slow-{i}"),
                        &mut |_, _| {},
                    );
                    (r.status().unwrap_or(0), r.text)
                })
            })
            .collect();
        callers.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let refused: Vec<&(u16, String)> = statuses
        .iter()
        .filter(|(s, t)| *s == 503 && t.contains("dialplan runs") && t.contains("Retry-After"))
        .collect();
    let ran = statuses.len() - refused.len();
    eprintln!(
        "of 50 calls at once, {ran} ran their dialplan and {} were refused",
        refused.len()
    );
    assert!(
        ran <= 10,
        "more than the account's 10 runs at once: {statuses:?}"
    );
    assert!(refused.len() >= 40, "{statuses:?}");
    // The runs that went on rang bob, and ended when his phone stayed silent.
    let mut rung = 0;
    while bob.recv(Duration::from_millis(200)).is_some() {
        rung += 1;
    }
    assert!(rung >= 1, "no run reached bob");
}

/// A customer's number (DID): a call from the customer's provider whose To names it rings
/// the account the number maps to, through the node that phone registered with; the
/// same call to a number of nobody's, or after the number is deleted, rings nobody.
#[test]
fn a_call_from_the_provider_to_a_customers_number_rings_the_account_it_maps_to() {
    let provider = Provider::start();
    add_account(
        provider.node.admin_addr(),
        &provider.token,
        "carol",
        "provider.test",
        "pw-carol",
    );
    let cluster = form(&provider);
    let m = cluster.member(1);
    Wait::new("feature version 2 (numbers)", Duration::from_secs(15))
        .showing(&cluster)
        .until(|| {
            m.status()
                .is_some_and(|s| s["feature_version"].as_u64() >= Some(2))
        });
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let b = http(
        m.admin_addr,
        Some(token.trim()),
        "PUT",
        "/v1/accounts/example.com/bob",
        Some(r#"{"password":"pw-bob","customer":"c1"}"#),
    )
    .unwrap();
    assert_eq!(b.status, 201, "{}", b.body);
    // Numbers are validated: digits only, an existing account of the same customer.
    for (number, body, want) in [
        (
            "+49x",
            r#"{"customer":"c1","account":"bob@example.com"}"#,
            400,
        ),
        (
            "+4930222",
            r#"{"customer":"c1","account":"nobody@example.com"}"#,
            409,
        ),
        (
            "+4930222",
            r#"{"customer":"c9","account":"bob@example.com"}"#,
            409,
        ),
    ] {
        let r = m
            .request("PUT", &format!("/v1/numbers/{number}"), Some(body))
            .unwrap();
        assert_eq!(r.status, want, "{number} {body}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{}", r.body);
    }
    let r = m
        .request(
            "PUT",
            "/v1/numbers/+4930222",
            Some(r#"{"customer":"c1","account":"bob@example.com"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    // The CLI sees it, and manages dialplans too.
    let out = m.cli(&["number", "list", "--customer", "c1"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && listed.contains("+4930222  c1  bob@example.com"),
        "{listed}"
    );
    let script = cluster.root().join("bad.rhai");
    std::fs::write(&script, "let x = 1;\nlet y = ;").unwrap();
    let out = m.cli(&[
        "dialplan",
        "put",
        "alice@example.com",
        "--file",
        script.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && said.contains("line 2"), "{said}");
    std::fs::write(&script, "respond(486, \"Busy\");").unwrap();
    let out = m.cli(&[
        "dialplan",
        "put",
        "alice@example.com",
        "--file",
        script.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = m.cli(&["dialplan", "show", "alice@example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "respond(486, \"Busy\");"
    );
    let out = m.cli(&["dialplan", "delete", "alice@example.com"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bob = Ua::new("127.0.0.1", "bob", "example.com", "pw-bob");
    let contact = bob.contact();
    let r = bob.register(
        m.sip_addr(),
        "MD5",
        Some(&format!("<{contact}>")),
        Some(600),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    // p0 registered at the provider: calls to u0 reach us.
    Wait::new(
        "p0 to be registered at the provider",
        Duration::from_secs(20),
    )
    .showing(&cluster)
    .until(|| {
        let a = http(
            provider.node.admin_addr(),
            Some(&provider.token),
            "GET",
            "/v1/accounts/provider.test/u0/bindings",
            None,
        )
        .unwrap();
        a.json().as_array().is_some_and(|b| !b.is_empty())
    });
    // Carol, at the provider, calls the provider account with the number in To.
    let call = |number: &str, call_id: &str| -> u16 {
        let carol = Ua::new("127.0.0.1", "carol", "provider.test", "pw-carol");
        let local = carol.local();
        let invite = |cseq: u32, auth: &str| {
            format!(
                "INVITE sip:u0@provider.test SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-did-{call_id}-{cseq};rport\r\n\
                 From: <sip:carol@provider.test>;tag=carol\r\nTo: <sip:{number}@provider.test>\r\n\
                 Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nMax-Forwards: 70\r\nContact: <sip:carol@{local}>\r\n\
                 {auth}Content-Length: 0\r\n\r\n"
            )
        };
        let target = provider.node.udp_addr();
        carol
            .socket
            .send_to(invite(1, "").as_bytes(), target)
            .unwrap();
        let challenge = loop {
            let r = carol.expect_response("INVITE", Duration::from_secs(10));
            if r.status().unwrap() >= 200 {
                break r;
            }
        };
        assert_eq!(challenge.status(), Some(407), "{}", challenge.text);
        let header = challenge.headers("Proxy-Authenticate").remove(0);
        let auth = format!(
            "Proxy-Authorization: {}\r\n",
            carol.authorization(&header, "INVITE", "sip:u0@provider.test", 1)
        );
        carol
            .socket
            .send_to(invite(2, &auth).as_bytes(), target)
            .unwrap();
        loop {
            let r = carol.expect_response("INVITE", Duration::from_secs(20));
            if r.status().unwrap() >= 200 {
                return r.status().unwrap();
            }
        }
    };
    std::thread::scope(|s| {
        let bob = &bob;
        let phone = s.spawn(move || {
            let invite = bob.expect_request("INVITE", Duration::from_secs(20));
            assert!(
                invite.text.contains("carol@provider.test"),
                "{}",
                invite.text
            );
            bob.respond(&invite, 486, "Busy Here", "");
            bob.expect_request("ACK", Duration::from_secs(5));
        });
        assert_eq!(call("+4930222", "did-1"), 486, "bob's phone answered busy");
        phone.join().unwrap();
    });
    // A number nobody has, and the number once deleted: not bob's call.
    assert_ne!(call("4930999", "did-2"), 486);
    let d = m.request("DELETE", "/v1/numbers/4930222", None).unwrap();
    assert_eq!(d.status, 200, "{}", d.body);
    assert_ne!(call("4930222", "did-3"), 486);
    assert!(
        bob.recv(Duration::from_millis(300)).is_none(),
        "bob's phone rang"
    );

    // Deleting an account takes its numbers and dialplan with it: an account created
    // again under the same name starts with neither.
    let r = m
        .request(
            "PUT",
            "/v1/numbers/4930222",
            Some(r#"{"customer":"c1","account":"bob@example.com"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    // With a dialplan for calls to him, bob's number runs it: an inbound call that names
    // the number in To. His plan for calls he makes does not run.
    let script = r#"
        if invite.direction == "inbound" && invite.to_user == "4930222" { respond(486, "Busy by script"); }
        respond(500);
    "#;
    for (path, script) in [
        ("dialplan", r#"respond(500, "the plan for calls out ran");"#),
        ("incoming-dialplan", script),
    ] {
        let body = serde_json::json!({ "script": script }).to_string();
        let r = m
            .request(
                "PUT",
                &format!("/v1/accounts/example.com/bob/{path}"),
                Some(&body),
            )
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_eq!(call("4930222", "did-4"), 486, "bob's dialplan answered");
    assert!(
        bob.recv(Duration::from_millis(300)).is_none(),
        "bob's phone did not ring"
    );
    let records = wait_cdrs(&cluster, 1, 1);
    let a = leg(&records, "a");
    assert_eq!(
        (&a["account"], &a["code"]),
        (&"bob@example.com".into(), &486.into()),
        "{a:#}"
    );
    let r = m
        .request("DELETE", "/v1/accounts/example.com/bob", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = m
        .request(
            "PUT",
            "/v1/accounts/example.com/bob",
            Some(r#"{"password":"pw-bob","customer":"c1"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(m.get("/v1/numbers/4930222").unwrap().status, 404);
    for path in ["dialplan", "incoming-dialplan"] {
        let a = m
            .get(&format!("/v1/accounts/example.com/bob/{path}"))
            .unwrap();
        assert_eq!(a.status, 404, "{path}: {}", a.body);
    }
}

/// A connected call whose far side has gone (it answers the app server's in-dialog OPTIONS
/// with 481) is ended: the caller gets a BYE, so no leg is left up.
#[test]
fn a_call_whose_far_side_has_gone_is_ended_on_both_sides() {
    let provider = Provider::start();
    let phone = provider.phone();
    let body = provider_account(&provider);
    let cluster = form_with_config(&body, "\n[app_server]\nkeepalive_secs = 1\n");
    let node = cluster.member(1).sip_addr();
    let mut alice = alice();
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            answer_next(phone, 200, "OK");
            phone.expect_request("ACK", Duration::from_secs(10));
            // The phone has forgotten the call: its answer to the probe says so.
            let probe = phone.expect_request("OPTIONS", Duration::from_secs(10));
            phone.respond(&probe, 481, "Call/Transaction Does Not Exist", "");
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "gone-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        callee.join().unwrap();
        let bye = alice.expect_request("BYE", Duration::from_secs(10));
        assert!(bye.text.contains("gone-1"), "{}", bye.text);
    });
}

/// A provider that did not get our ACK sends its 2xx again: it gets the ACK again (RFC
/// 3261 §13.2.2.4), or it would end the call after 32 s.
#[test]
fn a_retransmitted_answer_from_the_provider_is_acked_again() {
    let provider = Provider::start();
    let cluster = form(&provider);
    let node = cluster.member(1).sip_addr();
    let far = Ua::new("127.0.0.1", "far", "far.test", "x");
    let body = format!(
        r#"{{"registrar":"far.test","outbound_proxy":"{}","transport":"udp",
            "username":"uf","password":"pf","expires_secs":600}}"#,
        far.local()
    );
    let p = cluster
        .member(1)
        .request("PUT", "/v1/providers/c1/far", Some(&body))
        .unwrap();
    assert_eq!(p.status, 201, "{}", p.body);
    let (code, json) = put_dialplan(&cluster, r#"dial(`${invite.user}@far`);"#);
    assert_eq!(code, 201, "{json}");
    let mut alice = alice();
    std::thread::scope(|s| {
        let far = &far;
        let provider_side = s.spawn(move || {
            // The far side: answers the INVITE (REGISTERs get 503), sends the same 200
            // again once ACKed, and wants a second ACK for it.
            let invite = loop {
                let r = far.recv(Duration::from_secs(20)).expect("an INVITE");
                match r.method() {
                    Some("INVITE") => break r,
                    Some("REGISTER") => far.respond(&r, 503, "Service Unavailable", ""),
                    _ => {}
                }
            };
            let contact = format!("sip:far@{}", far.local());
            let ok = tandem_failover_tests::ua::response_text(
                &invite,
                200,
                "OK",
                "callee-far",
                &format!("Contact: <{contact}>\r\n"),
            );
            far.socket.send_to(ok.as_bytes(), invite.from).unwrap();
            far.expect_request("ACK", Duration::from_secs(10));
            far.socket.send_to(ok.as_bytes(), invite.from).unwrap();
            far.expect_request("ACK", Duration::from_secs(5));
            let bye = far.expect_request("BYE", Duration::from_secs(20));
            far.respond(&bye, 200, "OK", "");
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "reack-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        // Hang up only once the far side had its second ACK.
        std::thread::sleep(Duration::from_millis(500));
        ack_and_hang_up(&alice, &ok);
        provider_side.join().unwrap();
    });
}

/// A re-INVITE inside the call is relayed to the far side, and its 2xx is retransmitted
/// to the caller until the caller ACKs it (RFC 3261 §13.3.1.4), as the first one was.
#[test]
fn the_answer_to_a_re_invite_is_relayed_and_retransmitted_until_acked() {
    let Fixture {
        provider: _provider,
        phone,
        cluster: _cluster,
        node,
    } = fixture();
    let mut alice = alice();
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            answer_next(phone, 200, "OK");
            phone.expect_request("ACK", Duration::from_secs(10));
            let reinvite = phone.expect_request("INVITE", Duration::from_secs(10));
            let contact = phone.contact();
            phone.respond(&reinvite, 200, "OK", &format!("Contact: <{contact}>\r\n"));
            phone.expect_request("ACK", Duration::from_secs(10));
            let bye = phone.expect_request("BYE", Duration::from_secs(20));
            phone.respond(&bye, 200, "OK", "");
        });
        let ok = alice.invite(
            node,
            "sip:0301234@example.com",
            "reinvite-1",
            &mut |_, _| {},
        );
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        alice.send_in_dialog(&dialog, "INVITE", dialog.cseq + 1);
        let first = alice.expect_response("INVITE", Duration::from_secs(10));
        assert_eq!(first.status(), Some(200), "{}", first.text);
        // Not ACKed yet: the same 2xx comes again.
        let again = alice.expect_response("INVITE", Duration::from_secs(5));
        assert_eq!(again.status(), Some(200), "{}", again.text);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq + 1);
        alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 2);
        assert_eq!(
            alice
                .expect_response("BYE", Duration::from_secs(20))
                .status(),
            Some(200)
        );
        callee.join().unwrap();
    });
}

/// In a cluster of three, the records of a call are on every full node within seconds, a
/// node that was down when they were written gets them once it is back, and the node that
/// wrote them may then die without taking them along. The API and the CLI page through
/// them, export CSV, and refuse bad queries with JSON errors; a customer's retention is
/// set and shown through both.
#[test]
fn call_records_reach_every_node_and_outlive_the_node_that_wrote_them() {
    let provider = Provider::start();
    let phone = provider.phone();
    let body = provider_account(&provider);
    let cluster = form_members(&[MemberRole::Full; 3], &body, "");
    let node = cluster.member(1).sip_addr();
    // Node 3 is down while the calls happen.
    cluster.member(3).sigkill();
    let mut alice = alice();
    for i in 0..3 {
        answered_call(&mut alice, node, &phone, &format!("ship-{i}"));
    }
    let on_2 = wait_cdrs(&cluster, 2, 6);
    assert_eq!(on_2.len(), 6, "{on_2:#?}");
    assert!(
        on_2.iter().all(|r| r["node"] == 1),
        "written by node 1: {on_2:#?}"
    );
    cluster.member(3).start();
    cluster.member(3).wait_healthy();
    let on_3 = wait_cdrs(&cluster, 3, 6);
    assert_eq!(on_3, on_2, "node 3 got node 1's records after its restart");
    // The writer dies; its records stay with the others.
    cluster.member(1).sigkill();
    assert_eq!(wait_cdrs(&cluster, 2, 6), on_2);

    // Paging: two at a time, in order, and nothing twice.
    let m = cluster.member(2);
    let mut seen = Vec::new();
    let mut path = "/v1/cdrs?customer=c1&limit=2".to_owned();
    for _ in 0..10 {
        let page = m.get(&path).unwrap().json();
        seen.extend(page["records"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(n) => path = format!("/v1/cdrs?customer=c1&limit=2&after={n}"),
            None => break,
        }
    }
    assert_eq!(seen, on_2);
    let by_account = m
        .get("/v1/cdrs?account=alice@example.com&from=2000-01-01T00:00:00Z")
        .unwrap();
    assert_eq!(by_account.json()["records"].as_array().unwrap().len(), 6);
    let none = m.get("/v1/cdrs?account=bob@example.com").unwrap();
    assert_eq!(none.json()["records"].as_array().unwrap().len(), 0);
    let future = m.get("/v1/cdrs?from=2100-01-01T00:00:00Z").unwrap();
    assert_eq!(future.json()["records"].as_array().unwrap().len(), 0);
    for bad in [
        "/v1/cdrs?from=yesterday",
        "/v1/cdrs?limit=0",
        "/v1/cdrs?after=not-hex",
        "/v1/cdrs?format=xml",
        "/v1/cdrs?customer=c1%20x",
        "/v1/cdrs?order=desc",
    ] {
        let a = m.get(bad).unwrap();
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
        assert!(a.json()["error"].is_string(), "{bad}: {}", a.body);
    }
    let csv = m.get("/v1/cdrs?customer=c1&format=csv").unwrap();
    assert_eq!(csv.status, 200);
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(lines.len(), 7, "{}", csv.body);
    assert!(lines[0].starts_with("node,seq,call,leg,"), "{}", lines[0]);

    // The CLI: every page as CSV (progress on stderr), and as a table.
    let out = m.cli(&[
        "cdr",
        "list",
        "--customer",
        "c1",
        "--limit",
        "4",
        "--all",
        "--csv",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 7, "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("6 records."));
    let out = m.cli(&[
        "cdr",
        "list",
        "--account",
        "alice@example.com",
        "--limit",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.matches("answered").count(), 4, "{table}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--after"),
        "it says how to go on"
    );

    // Retention: the default, then the customer's own, through the API and the CLI (once
    // the two left have a leader again).
    cluster.wait_for_leader(&[1], Duration::from_secs(20));
    let r = m.get("/v1/customers/c1/settings").unwrap();
    assert_eq!(r.json()["cdr_retention_days_in_effect"], 90, "{}", r.body);
    assert_eq!(r.json()["cdr_retention_days"], 0);
    let out = m.cli(&["cdr", "retention", "c1", "--days", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept 30 days."));
    Wait::new("the retention on node 3", Duration::from_secs(10))
        .showing(&cluster)
        .until(|| {
            cluster
                .member(3)
                .get("/v1/customers/c1/settings")
                .is_some_and(|a| a.json()["cdr_retention_days"] == 30)
        });
    for body in [
        r#"{"cdr_retention_days":3651}"#,
        r#"{"cdr_retention_days":-1}"#,
        r#"{"weeks":2}"#,
        r#"{"max_calls":100001}"#,
        r#"{"time_zone":"Mars/Olympus_Mons"}"#,
        "not json",
    ] {
        let a = m
            .request("PUT", "/v1/customers/c1/settings", Some(body))
            .unwrap();
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        assert!(a.json()["error"].is_string(), "{body}: {}", a.body);
    }
    let a = m
        .request(
            "PUT",
            "/v1/customers/nobody/settings",
            Some(r#"{"max_calls":5}"#),
        )
        .unwrap();
    assert_eq!(a.status, 409, "{}", a.body);
}

/// Records older than their customer's retention go, a step of at most `purge_batch` at a
/// time, while a customer with a longer retention of its own keeps theirs; the purge shows
/// in /metrics.
#[test]
fn old_call_records_are_purged_by_each_customers_retention() {
    let cluster = Cluster::form(
        &[MemberRole::Full],
        "\n[cdr]\nretention_days = 90\npurge_batch = 500\npurge_every_ms = 50",
    );
    let m = cluster.member(1);
    Wait::new("feature version 3", Duration::from_secs(15))
        .showing(&cluster)
        .until(|| {
            m.status()
                .is_some_and(|s| s["feature_version"].as_u64() >= Some(3))
        });
    for c in ["c1", "c2"] {
        assert_eq!(m.put_customer(c), Some(200));
    }
    let a = m
        .request(
            "PUT",
            "/v1/customers/c2/settings",
            Some(r#"{"cdr_retention_days":500}"#),
        )
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    m.sigterm();
    assert!(
        m.wait_exit(Duration::from_secs(20)).is_some(),
        "the node stops"
    );
    for (customer, count, age) in [
        ("c1", "3000", "400"),
        ("c2", "2000", "400"),
        ("c1", "700", "10"),
    ] {
        let out = m.cli(&[
            "cdr",
            "seed",
            "--customer",
            customer,
            "--count",
            count,
            "--age-days",
            age,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    m.start();
    m.wait_healthy();
    tandem_failover_tests::cluster::wait_metric(
        &cluster,
        m.admin_addr,
        "tandem_cdr_purged_total",
        3000.0,
        Duration::from_secs(20),
    );
    let count = |customer: &str| {
        let mut n = 0;
        let mut path = format!("/v1/cdrs?customer={customer}&limit=1000");
        loop {
            let page = m.get(&path).unwrap().json();
            n += page["records"].as_array().unwrap().len();
            match page["next"].as_str() {
                Some(next) => {
                    path = format!("/v1/cdrs?customer={customer}&limit=1000&after={next}")
                }
                None => return n,
            }
        }
    };
    assert_eq!(count("c1"), 700, "only c1's recent records are left");
    assert_eq!(count("c2"), 2000, "c2 keeps 500 days");
    let log = m.log();
    assert!(!log.contains("CDR purge step failed"), "{log}");
}

/// A call to an account with a dialplan runs that account's dialplan: bob's rings his
/// phone for two seconds, then forwards the call through his customer's provider to the
/// number. A caller from outside runs it too (bob's script turns it away), and a caller
/// claiming a local account without proving it is challenged before any script runs.
#[test]
fn a_call_to_an_account_with_a_dialplan_runs_that_accounts_dialplan() {
    let Fixture {
        provider: _provider,
        phone,
        cluster,
        node,
    } = fixture();
    let m = cluster.member(1);
    c1_account(&cluster, "bob");
    let bob = registered_phone("bob", node);
    let script = r#"
        if invite.direction != "local" { respond(500, "Wrong direction " + invite.direction); }
        if !invite.from.ends_with("@example.com") { respond(403, "Colleagues only"); }
        dial("bob/2");
        dial("0301234@p0");
    "#;
    let body = serde_json::json!({ "script": script }).to_string();
    // As bob's plan for calls he makes, it never runs for calls to him.
    let a = m
        .request("PUT", "/v1/accounts/example.com/bob/dialplan", Some(&body))
        .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    let a = m
        .request(
            "PUT",
            "/v1/accounts/example.com/bob/incoming-dialplan",
            Some(&body),
        )
        .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json()["incoming"], true);

    let mut alice = alice();
    std::thread::scope(|s| {
        let bob = &bob;
        let bob_side = s.spawn(move || {
            let invite = bob.expect_request("INVITE", Duration::from_secs(20));
            assert!(
                invite.text.contains("sip:alice@example.com"),
                "{}",
                invite.text
            );
            bob.respond(&invite, 180, "Ringing", "");
            let cancel = bob.expect_request("CANCEL", Duration::from_secs(10));
            bob.respond(&cancel, 200, "OK", "");
            bob.respond(&invite, 487, "Request Terminated", "");
            bob.expect_request("ACK", Duration::from_secs(5));
        });
        let phone = &phone;
        let forwarded = s.spawn(move || {
            let invite = answer_next(phone, 200, "OK");
            assert!(
                invite.text.contains("sip:u0@provider.test"),
                "{}",
                invite.text
            );
            wait_for_bye(phone);
        });
        let ok = alice.invite(node, "sip:bob@example.com", "fwd-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        assert!(
            ok.header("Contact").unwrap().contains("tdb-"),
            "{}",
            ok.text
        );
        bob_side.join().unwrap();
        ack_and_hang_up(&alice, &ok);
        forwarded.join().unwrap();
    });
    let records = wait_cdrs(&cluster, 1, 3);
    let a = leg(&records, "a");
    assert_eq!(a["account"], "bob@example.com", "the call is bob's: {a:#}");
    assert_eq!(a["outcome"], "answered");
    let b1 = leg(&records, "b1");
    assert_eq!(
        (&b1["to"], &b1["outcome"]),
        (&"bob@example.com".into(), &"no answer".into()),
        "{b1:#}"
    );
    let b2 = leg(&records, "b2");
    assert_eq!(
        (&b2["provider"], &b2["outcome"]),
        (&"p0".into(), &"answered".into()),
        "{b2:#}"
    );

    // From outside: no credentials asked, and bob's script answers.
    let mut stranger = Ua::new("127.0.0.1", "eve", "elsewhere.test", "x");
    let r = stranger.invite(node, "sip:bob@example.com", "fwd-2", &mut |_, _| {});
    assert_eq!(r.status(), Some(403), "{}", r.text);
    assert!(r.text.contains("Colleagues only"), "{}", r.text);
    // A script that fails tells a stranger only that it failed.
    let body = serde_json::json!({ "script": r#"throw "the secret routing table";"# }).to_string();
    let a = m
        .request(
            "PUT",
            "/v1/accounts/example.com/bob/incoming-dialplan",
            Some(&body),
        )
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    let r = stranger.invite(node, "sip:bob@example.com", "fwd-2b", &mut |_, _| {});
    assert_eq!(r.status(), Some(500), "{}", r.text);
    assert!(r.text.contains("dialplan failed"), "{}", r.text);
    assert!(!r.text.contains("secret"), "{}", r.text);
    // Claiming to be alice without her password: challenged, then refused; bob's phone
    // never rings.
    let mut fake = Ua::new("127.0.0.1", "alice", "example.com", "wrong");
    let r = fake.invite(node, "sip:bob@example.com", "fwd-3", &mut |_, _| {});
    assert!(matches!(r.status(), Some(403 | 407)), "{}", r.text);
    assert!(
        bob.recv(Duration::from_millis(500)).is_none(),
        "bob's phone stays quiet"
    );
}

/// A customer's settings reach its calls: `max_calls` refuses a second call of any of its
/// accounts while the first is up, with a reason; its time zone is the dialplan's.
#[test]
fn a_customers_call_limit_and_time_zone_apply_to_its_calls() {
    let Fixture {
        provider: _provider,
        phone,
        cluster,
        node,
    } = fixture();
    let m = cluster.member(1);
    c1_account(&cluster, "dave");
    let a = m
        .request(
            "PUT",
            "/v1/customers/c1/settings",
            Some(r#"{"max_calls":1,"time_zone":"Etc/GMT-14"}"#),
        )
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["time_zone"], "Etc/GMT-14");
    let mut alice = alice();
    let mut dave = Ua::new("127.0.0.1", "dave", "example.com", "pw-dave");
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            answer_next(phone, 200, "OK");
            wait_for_bye(phone);
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "cust-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        let refused = dave.invite(node, "sip:0301234@example.com", "cust-2", &mut |_, _| {});
        assert_eq!(refused.status(), Some(403), "{}", refused.text);
        assert!(
            refused.text.contains("for this customer"),
            "{}",
            refused.text
        );
        alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
        let bye = alice.expect_response("BYE", Duration::from_secs(20));
        assert_eq!(bye.status(), Some(200));
        callee.join().unwrap();
    });
    // The call has ended: dave may call, and his dialplan tells the hour in UTC+14.
    let body = serde_json::json!({ "script": r#"respond(480, "hour " + hour());"# }).to_string();
    let a = m
        .request("PUT", "/v1/accounts/example.com/dave/dialplan", Some(&body))
        .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    let utc_hour = || {
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 3600)
            % 24
    };
    let before = utc_hour();
    let r = dave.invite(node, "sip:0301234@example.com", "cust-3", &mut |_, _| {});
    let after = utc_hour();
    assert_eq!(r.status(), Some(480), "{}", r.text);
    let hours: Vec<String> = [before, after]
        .iter()
        .map(|h| format!("hour {}", (h + 14) % 24))
        .collect();
    assert!(
        hours
            .iter()
            .any(|h| r.text.contains(&format!("480 {h}\r\n"))),
        "expected one of {hours:?}: {}",
        r.text
    );
}

/// A customer's PBX as a trusted trunk: its calls from its address go out through the
/// customer's provider without digest, as the trunk's account; the same INVITE from any
/// other address, over a transport the trunk does not allow, or once the trunk is disabled
/// is refused as relaying. The API refuses trunks that would be open.
#[test]
fn a_trusted_trunk_calls_out_without_digest_from_its_address_and_no_other() {
    let Fixture {
        provider: _provider,
        phone,
        cluster,
        node,
    } = fixture();
    let m = cluster.member(1);
    let put = |body: &str| m.request("PUT", "/v1/trunks/c1/pbx", Some(body)).unwrap();
    for (body, status) in [
        (
            r#"{"sources":["0.0.0.0/0"],"account":"alice@example.com"}"#,
            400,
        ),
        (
            r#"{"sources":["10.0.0.0/8"],"account":"alice@example.com"}"#,
            400,
        ),
        (r#"{"sources":[],"account":"alice@example.com"}"#, 400),
        (
            r#"{"sources":["127.0.0.5"],"account":"alice@example.com","port":0}"#,
            400,
        ),
        (
            r#"{"sources":["127.0.0.5"],"account":"nobody@example.com"}"#,
            409,
        ),
        (
            r#"{"sources":["127.0.0.5"],"account":"alice@example.com","transport":"sctp"}"#,
            400,
        ),
    ] {
        let a = put(body);
        assert_eq!(a.status, status, "{body}: {}", a.body);
        assert!(a.json()["error"].is_string(), "{body}: {}", a.body);
    }
    let out = m.cli(&[
        "trunk",
        "put",
        "c1/pbx",
        "--source",
        "127.0.0.5",
        "--account",
        "alice@example.com",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(m.cli(&["trunk", "list", "--customer", "c1"]).stdout).unwrap();
    assert!(
        listed.contains("c1/pbx  127.0.0.5  any transport  as alice@example.com"),
        "{listed}"
    );

    let mut pbx = Ua::new("127.0.0.5", "100", "pbx.invalid", "unused");
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            let invite = answer_next(phone, 200, "OK");
            assert!(
                invite.text.contains("sip:u0@provider.test"),
                "{}",
                invite.text
            );
            wait_for_bye(phone);
        });
        let ok = pbx.invite(node, "sip:0301234@example.com", "trunk-1", &mut |_, _| {});
        assert_eq!(
            ok.status(),
            Some(200),
            "no challenge for the trunk: {}",
            ok.text
        );
        ack_and_hang_up(&pbx, &ok);
        callee.join().unwrap();
    });
    let records = wait_cdrs(&cluster, 1, 2);
    assert_eq!(leg(&records, "a")["account"], "alice@example.com");
    // A PBX that puts its users' local addresses in From is still the trunk: no challenge.
    let mut pbx_user = Ua::new("127.0.0.5", "alice", "example.com", "not-her-password");
    answered_call(&mut pbx_user, node, &phone, "trunk-1b");

    // The same calls from another address get what they would get with no trunk at all:
    // no such user here, or relaying denied; and the number never rings.
    let mut stranger = Ua::new("127.0.0.6", "100", "pbx.invalid", "unused");
    let r = stranger.invite(node, "sip:0301234@example.com", "trunk-2", &mut |_, _| {});
    assert_eq!(r.status(), Some(404), "{}", r.text);
    let r = stranger.invite(
        node,
        "sip:0301234@elsewhere.test",
        "trunk-2b",
        &mut |_, _| {},
    );
    assert_eq!(r.status(), Some(403), "{}", r.text);
    assert!(r.text.contains("relaying denied"), "{}", r.text);
    // Over UDP when the trunk takes TCP only, and once it is disabled.
    for body in [
        r#"{"sources":["127.0.0.5"],"account":"alice@example.com","transport":"tcp"}"#,
        r#"{"sources":["127.0.0.5"],"account":"alice@example.com","enabled":false}"#,
    ] {
        assert_eq!(put(body).status, 200, "{body}");
        let r = pbx.invite(node, "sip:0301234@example.com", "trunk-3", &mut |_, _| {});
        assert_eq!(r.status(), Some(404), "{body}: {}", r.text);
    }
    assert!(
        phone
            .recv(Duration::from_millis(300))
            .filter(|r| r.method() == Some("INVITE"))
            .is_none(),
        "the number rang for a refused call"
    );
    let out = m.cli(&["trunk", "delete", "c1/pbx"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(m.get("/v1/trunks/c1/pbx").unwrap().status, 404);
}

/// The node's `[dialplan]` section sets the limits of every run: with 1,000 operations, a
/// script counting to 5,000 is stopped (500 naming the dialplan) and one counting to 100
/// runs to its end.
#[test]
fn the_dialplan_section_of_the_config_sets_the_limits_of_every_run() {
    let provider = Provider::start();
    let body = provider_account(&provider);
    let cluster = form_with_config(&body, "\n[dialplan]\nmax_operations = 1000\n");
    let node = cluster.member(1).sip_addr();
    let mut alice = alice();
    for (count, status) in [(5000, 500), (100, 486)] {
        let script =
            format!("let n = 0; for i in 0..{count} {{ n += 1; }} respond(486, `counted ${{n}}`);");
        let (code, json) = put_dialplan(&cluster, &script);
        assert!(matches!(code, 200 | 201), "{json}");
        let r = alice.invite(
            node,
            "sip:0301234@example.com",
            &format!("limits-{count}"),
            &mut |_, _| {},
        );
        assert_eq!(r.status(), Some(status), "{}", r.text);
        if status == 500 {
            let reason = r.header("Reason").unwrap_or_default();
            assert!(reason.contains("dialplan"), "{}", r.text);
        } else {
            assert!(r.text.contains("486 counted 100"), "{}", r.text);
        }
    }
}

#[test]
fn an_account_whose_dialplan_loops_is_held_to_its_script_time_per_second() {
    let provider = Provider::start();
    let body = provider_account(&provider);
    let cluster = form_with_config(
        &body,
        "\n[dialplan]\nmax_operations = 100000000\nmax_run_time_ms = 60\n\
         max_run_time_per_second_ms = 50\n",
    );
    let node = cluster.member(1).sip_addr();
    let (code, json) = put_dialplan(&cluster, "loop {}");
    assert!(matches!(code, 200 | 201), "{json}");
    let mut alice = alice();
    let mut call = |n: u32| {
        let r = alice.invite(
            node,
            "sip:0301234@example.com",
            &format!("spin-{n}"),
            &mut |_, _| {},
        );
        (r.status().unwrap_or(0), r.header("Retry-After"), r.text)
    };
    // The first run spins to its time limit: 60 ms, more than the second's 50.
    let (status, _, text) = call(0);
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("time limit"), "{text}");
    // The next, at once: refused before it runs.
    let (status, retry, text) = call(1);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("script time"), "{text}");
    assert_eq!(retry.as_deref(), Some("1"), "{text}");
    // A second later the budget is back: the script runs (and spins) again.
    std::thread::sleep(Duration::from_millis(1200));
    let (status, _, text) = call(2);
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("time limit"), "{text}");
}

/// Bob's offer when called without one, and his answer to carol's offer.
const BOB_OFFER: &str = "v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
    t=0 0\r\nm=audio 40000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";
const BOB_ANSWER: &str = "v=0\r\no=bob 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
    t=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";
const CAROL_OFFER: &str = "v=0\r\no=carol 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
    t=0 0\r\nm=audio 50000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

/// A cluster of one (customer c1, alice) with bob and carol registered through it.
fn bob_and_carol() -> (Provider, Cluster, Ua, Ua) {
    let provider = Provider::start();
    let cluster = form(&provider);
    let node = cluster.member(1).sip_addr();
    c1_account(&cluster, "bob");
    c1_account(&cluster, "carol");
    let bob = registered_phone("bob", node);
    let carol = registered_phone("carol", node);
    (provider, cluster, bob, carol)
}

/// The callback `id` on node 1, once `ready` says it is as expected.
fn wait_callback(cluster: &Cluster, id: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let m = cluster.member(1);
    Wait::new(format!("callback {id}"), Duration::from_secs(20))
        .showing(cluster)
        .until(|| {
            let v = m.get(&format!("/v1/callbacks/{id}"))?.json();
            ready(&v).then_some(v)
        })
}

/// Bob answers an INVITE without an offer with his own, and checks that the ACK holds
/// the session without media (RFC 3725's black hole). Returns the INVITE.
fn answer_without_offer(bob: &Ua) -> Received {
    let invite = bob.expect_request("INVITE", Duration::from_secs(30));
    assert!(
        invite.body().is_empty(),
        "called without an offer: {}",
        invite.text
    );
    bob.respond(&invite, 180, "Ringing", "");
    let contact = bob.contact();
    bob.respond_sdp(
        &invite,
        200,
        "OK",
        &format!("Contact: <{contact}>\r\n"),
        BOB_OFFER,
    );
    let ack = bob.expect_request("ACK", Duration::from_secs(10));
    let held = ack.body();
    assert!(
        held.contains("c=IN IP4 0.0.0.0") && held.contains("a=inactive"),
        "the ACK answers with a held session: {}",
        ack.text
    );
    assert!(held.contains("m=audio 9 RTP/AVP 0 8"), "{}", ack.text);
    invite
}

#[test]
fn a_callback_rings_a_then_b_and_connects_them_with_a_re_invite() {
    let (_provider, cluster, bob, carol) = bob_and_carol();
    let m = cluster.member(1);
    for (body, status, says) in [
        (
            r#"{"account":"alice@example.com","a":"bob"}"#,
            400,
            "missing field `b`",
        ),
        (
            r#"{"account":"alice@example.com","a":"bob","b":"carol &"}"#,
            400,
            "b: ",
        ),
        (
            r#"{"account":"nobody@example.com","a":"bob","b":"carol"}"#,
            409,
            "no account",
        ),
        (
            r#"{"account":"alice","a":"bob","b":"carol"}"#,
            400,
            "user@domain",
        ),
        (
            r#"{"account":"alice@example.com","a":"bob & carol","b":"carol"}"#,
            400,
            "a: one target",
        ),
        (
            r#"{"account":"alice@example.com","a":"bob","b":"carol","via":"x"}"#,
            400,
            "unknown field",
        ),
    ] {
        let r = m.request("POST", "/v1/callback", Some(body)).unwrap();
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.body.contains(says), "{body}: {}", r.body);
    }
    let anonymous = http(
        m.admin_addr,
        None,
        "POST",
        "/v1/callback",
        Some(r#"{"account":"alice@example.com","a":"bob","b":"carol"}"#),
    )
    .unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert!(
        m.get("/v1/callbacks/0123").unwrap().status == 404,
        "an unknown callback is 404"
    );

    let started = m
        .request(
            "POST",
            "/v1/callback",
            Some(r#"{"account":"alice@example.com","a":"bob","b":"carol"}"#),
        )
        .unwrap();
    assert_eq!(started.status, 202, "{}", started.body);
    let id = started.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(started.json()["state"], "calling a", "{}", started.body);
    std::thread::scope(|s| {
        let carol_side = s.spawn(|| {
            let invite = carol.expect_request("INVITE", Duration::from_secs(30));
            assert!(invite.body().is_empty(), "{}", invite.text);
            assert!(
                invite.text.contains("sip:alice@example.com"),
                "b sees the account calling: {}",
                invite.text
            );
            carol.respond(&invite, 180, "Ringing", "");
            let contact = carol.contact();
            carol.respond_sdp(
                &invite,
                200,
                "OK",
                &format!("Contact: <{contact}>\r\n"),
                CAROL_OFFER,
            );
            let ack = carol.expect_request("ACK", Duration::from_secs(10));
            assert!(
                ack.body().contains("m=audio 40000 RTP/AVP 0"),
                "carol's ACK carries bob's answer: {}",
                ack.text
            );
            let bye = carol.expect_request("BYE", Duration::from_secs(20));
            carol.respond(&bye, 200, "OK", "");
        });
        let invite = answer_without_offer(&bob);
        let reinvite = bob.expect_request("INVITE", Duration::from_secs(30));
        assert_eq!(reinvite.header("Call-ID"), invite.header("Call-ID"));
        let offer = reinvite.body();
        assert!(
            offer.contains("m=audio 50000") && offer.contains("o=tandem "),
            "bob is offered carol's session under one origin: {}",
            reinvite.text
        );
        assert!(!offer.contains("o=carol"), "{}", reinvite.text);
        let contact = bob.contact();
        bob.respond_sdp(
            &reinvite,
            200,
            "OK",
            &format!("Contact: <{contact}>\r\n"),
            BOB_ANSWER,
        );
        bob.expect_request("ACK", Duration::from_secs(10));
        wait_callback(&cluster, &id, |v| v["state"] == "connected");
        // Bob hangs up: carol gets the BYE, and bob its 200.
        let dialog = bob.callee_dialog(&invite);
        bob.send_in_dialog(&dialog, "BYE", 1);
        let ok = bob.expect_response("BYE", Duration::from_secs(20));
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        carol_side.join().unwrap();
    });
    let ended = wait_callback(&cluster, &id, |v| v["state"] == "ended");
    assert_eq!(ended["code"], 200, "{ended:#}");
    let records = wait_cdrs(&cluster, 1, 2);
    for (name, to) in [("b1", "bob@example.com"), ("b2", "carol@example.com")] {
        let r = leg(&records, name);
        assert_eq!(r["call"], format!("callback-{id}"), "{r:#}");
        assert_eq!(r["to"], to, "{r:#}");
        assert_eq!(r["outcome"], "answered", "{r:#}");
        check_answered_times(r);
    }
}

#[test]
fn a_callback_ends_a_when_b_fails_and_a_dialplan_can_start_one() {
    let (_provider, cluster, bob, carol) = bob_and_carol();
    let m = cluster.member(1);
    // Through the CLI, which follows the callback step by step.
    let out = std::thread::scope(|s| {
        let cli = s.spawn(|| m.cli(&["callback", "alice@example.com", "bob", "carol"]));
        let carol_side = s.spawn(|| {
            let invite = carol.expect_request("INVITE", Duration::from_secs(30));
            carol.respond(&invite, 486, "Busy Here", "");
            carol.expect_request("ACK", Duration::from_secs(5));
        });
        answer_without_offer(&bob);
        let bye = bob.expect_request("BYE", Duration::from_secs(20));
        bob.respond(&bye, 200, "OK", "");
        carol_side.join().unwrap();
        cli.join().unwrap()
    });
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    // The steps between are polled, and this one is quicker than a poll.
    for step in ["calling a", "ended: 486 b: Busy Here"] {
        assert!(stdout.contains(step), "no {step:?} in {stdout}{stderr}");
    }
    assert!(stderr.contains("did not connect"), "{stdout}{stderr}");

    // A's hang-up while B rings cancels B.
    let started = m
        .request(
            "POST",
            "/v1/callback",
            Some(r#"{"account":"alice@example.com","a":"bob","b":"carol"}"#),
        )
        .unwrap();
    let id = started.json()["id"].as_str().unwrap().to_owned();
    std::thread::scope(|s| {
        let carol_side = s.spawn(|| {
            let invite = carol.expect_request("INVITE", Duration::from_secs(30));
            carol.respond(&invite, 180, "Ringing", "");
            let cancel = carol.expect_request("CANCEL", Duration::from_secs(20));
            carol.respond(&cancel, 200, "OK", "");
            carol.respond(&invite, 487, "Request Terminated", "");
            carol.expect_request("ACK", Duration::from_secs(5));
        });
        let invite = answer_without_offer(&bob);
        wait_callback(&cluster, &id, |v| v["state"] == "calling b");
        std::thread::sleep(Duration::from_millis(300));
        let dialog = bob.callee_dialog(&invite);
        bob.send_in_dialog(&dialog, "BYE", 1);
        let ok = bob.expect_response("BYE", Duration::from_secs(20));
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        carol_side.join().unwrap();
    });
    let ended = wait_callback(&cluster, &id, |v| v["state"] == "ended");
    assert_eq!(ended["code"], 487, "{ended:#}");

    // A dialplan's callback(): the caller is declined, then bob is called back.
    let (code, json) = put_dialplan(
        &cluster,
        r#"let r = callback("bob", "carol"); if !r.started { respond(500, r.reason); } respond(603, "Call Back");"#,
    );
    assert_eq!(code, 201, "{json}");
    let mut alice = alice();
    let declined = alice.invite(
        m.sip_addr(),
        "sip:0301234@example.com",
        "cb-plan-1",
        &mut |_, _| {},
    );
    assert_eq!(declined.status(), Some(603), "{}", declined.text);
    let invite = bob.expect_request("INVITE", Duration::from_secs(30));
    assert!(invite.body().is_empty(), "{}", invite.text);
    bob.respond(&invite, 480, "Temporarily Unavailable", "");
    bob.expect_request("ACK", Duration::from_secs(5));

    // A stranger who calls again and again starts at most six a minute.
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let bob_side = s.spawn(|| {
            for _ in 0..5 {
                let invite = bob.expect_request("INVITE", Duration::from_secs(30));
                bob.respond(&invite, 480, "Temporarily Unavailable", "");
            }
        });
        let statuses = (2..8)
            .map(|i| {
                let r = alice.invite(
                    m.sip_addr(),
                    "sip:0301234@example.com",
                    &format!("cb-plan-{i}"),
                    &mut |_, _| {},
                );
                (r.status().unwrap(), r.start_line().to_owned())
            })
            .collect();
        bob_side.join().unwrap();
        statuses
    });
    let codes: Vec<u16> = statuses.iter().map(|(c, _)| *c).collect();
    assert_eq!(codes, [603, 603, 603, 603, 603, 500], "{statuses:?}");
    assert!(
        statuses[5].1.contains("callbacks this minute"),
        "{statuses:?}"
    );
}

/// Sends `method` inside `dialog` with `extra` header lines; returns its final response.
fn in_dialog_with(
    ua: &Ua,
    dialog: &tandem_failover_tests::ua::Dialog,
    method: &str,
    cseq: u32,
    extra: &str,
) -> Received {
    let text = tandem_failover_tests::ua::in_dialog_request(
        (&ua.user, &ua.domain),
        dialog,
        ua.local(),
        method,
        cseq,
        &dialog.to,
    )
    .replace(
        "Content-Length: 0\r\n",
        &format!("{extra}Content-Length: 0\r\n"),
    );
    let to =
        tandem_failover_tests::ua::uri_addr(dialog.route.first().unwrap_or(&dialog.remote_target));
    ua.socket.send_to(text.as_bytes(), to).unwrap();
    ua.expect_response(method, Duration::from_secs(10))
}

/// RFC 4028 on each leg of a call: the callee's 422 raises our interval; the caller's
/// refresh is answered on its own leg and never reaches the callee; we refresh the callee
/// by UPDATE when its 2xx makes us the refresher; and when the caller stops refreshing,
/// the call is ended on both legs once its session expires (90 s, less 30).
#[test]
fn session_timers_are_kept_per_leg_and_end_a_call_whose_refresher_went_silent() {
    let provider = Provider::start();
    let cluster = form_with_config(
        &provider_account(&provider),
        "[app_server]\nkeepalive_secs = 0\n",
    );
    let node = cluster.member(1).sip_addr();
    c1_account(&cluster, "bob");
    let bob = registered_phone("bob", node);
    let (code, json) = put_dialplan(&cluster, r#"dial("bob");"#);
    assert_eq!(code, 201, "{json}");
    let mut alice = alice();
    alice.invite_extra = "Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n".into();
    std::thread::scope(|s| {
        let bob_side = s.spawn(|| {
            let first = bob.expect_request("INVITE", Duration::from_secs(20));
            assert!(
                first.text.contains("Session-Expires: 1800\r\n")
                    && first.text.contains("Supported: timer\r\n")
                    && first.text.contains("Min-SE: 90\r\n"),
                "the leg we dial asks for timers: {}",
                first.text
            );
            bob.respond(
                &first,
                422,
                "Session Interval Too Small",
                "Min-SE: 1900\r\n",
            );
            bob.expect_request("ACK", Duration::from_secs(5));
            let invite = bob.expect_request("INVITE", Duration::from_secs(10));
            assert!(
                invite.text.contains("Session-Expires: 1900\r\n"),
                "the 422's Min-SE is taken: {}",
                invite.text
            );
            let contact = bob.contact();
            bob.respond(
                &invite,
                200,
                "OK",
                &format!(
                    "Contact: <{contact}>\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n\
                     Session-Expires: 90;refresher=uac\r\nRequire: timer\r\n"
                ),
            );
            bob.expect_request("ACK", Duration::from_secs(10));
            let answered = Deadline::after(Duration::ZERO);
            // The next request bob sees is our refresh, at half the interval: the
            // caller's refresh at 2 s was not passed on.
            let update = bob.expect_request("UPDATE", Duration::from_secs(60));
            let after = answered.elapsed();
            assert!(
                (Duration::from_secs(40)..Duration::from_secs(50)).contains(&after),
                "refreshed after {after:?}: {}",
                update.text
            );
            assert!(
                update
                    .text
                    .contains("Session-Expires: 90;refresher=uac\r\n"),
                "{}",
                update.text
            );
            bob.respond(
                &update,
                200,
                "OK",
                "Session-Expires: 90;refresher=uac\r\nRequire: timer\r\n",
            );
            let bye = bob.expect_request("BYE", Duration::from_secs(40));
            bob.respond(&bye, 200, "OK", "");
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "timers-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        assert_eq!(
            ok.header("Session-Expires").as_deref(),
            Some("90;refresher=uac"),
            "{}",
            ok.text
        );
        assert!(
            ok.headers("Require").iter().any(|r| r == "timer"),
            "{}",
            ok.text
        );
        let dialog = alice.dialog(&ok);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq);
        std::thread::sleep(Duration::from_secs(2));
        let refreshed = in_dialog_with(
            &alice,
            &dialog,
            "UPDATE",
            dialog.cseq + 1,
            "Supported: timer\r\nSession-Expires: 90;refresher=uac\r\n",
        );
        assert_eq!(refreshed.status(), Some(200), "{}", refreshed.text);
        assert_eq!(
            refreshed.header("Session-Expires").as_deref(),
            Some("90;refresher=uac"),
            "{}",
            refreshed.text
        );
        let since = Deadline::after(Duration::ZERO);
        // Alice refreshes no more: 60 s later the call is ended on both legs.
        let bye = alice.expect_request("BYE", Duration::from_secs(75));
        let after = since.elapsed();
        assert!(
            (Duration::from_secs(55)..Duration::from_secs(66)).contains(&after),
            "ended after {after:?}"
        );
        alice.respond(&bye, 200, "OK", "");
        bob_side.join().unwrap();
    });
}

/// Dial specs that name URIs: a `sip:` URI outside the served domains is called
/// directly, and one in a served domain rings that account; `tel:` goes through the
/// customer's only provider. Without `app_server.uri_private_targets`, a URI whose host
/// is a loopback address is refused with 403 and nothing is sent to it; without
/// `registration_agent.private_networks`, so is a call through a provider at one.
#[test]
fn a_dialplan_dials_sip_and_tel_uris_and_no_private_address_unless_allowed() {
    let provider = Provider::start();
    let phone = provider.phone();
    let carol = Ua::new("127.0.0.1", "carol", "elsewhere.test", "x");
    let carol_uri = format!("sip:carol@{}", carol.local());
    let script = format!(
        r#"if invite.user == "1" {{ dial("{carol_uri}"); }}
           else if invite.user == "2" {{ dial("tel:0301234"); }}
           else {{ dial("sip:bob@example.com"); }}"#
    );
    let cluster = form_with_config(
        &provider_account(&provider),
        "[app_server]\nuri_private_targets = true\n",
    );
    let node = cluster.member(1).sip_addr();
    c1_account(&cluster, "bob");
    let bob = registered_phone("bob", node);
    let (code, json) = put_dialplan(&cluster, &script);
    assert_eq!(code, 201, "{json}");
    let mut alice = alice();
    for (number, callee, request_uri) in [
        ("1", &carol, carol_uri.clone()),
        ("2", &phone, String::new()),
        ("3", &bob, bob.contact()),
    ] {
        std::thread::scope(|s| {
            let callee_side = s.spawn(|| {
                let invite = answer_next(callee, 200, "OK");
                if !request_uri.is_empty() {
                    assert_eq!(
                        invite.request_uri(),
                        Some(request_uri.as_str()),
                        "{}",
                        invite.text
                    );
                } else {
                    assert!(
                        invite.request_uri().unwrap().starts_with("sip:0301234@"),
                        "{}",
                        invite.text
                    );
                }
                // Through the provider, the call is the provider account's (u0).
                let shown = if number == "2" {
                    "sip:u0@"
                } else {
                    "sip:alice@example.com"
                };
                assert!(
                    invite.text.contains(shown),
                    "the callee sees {shown}: {}",
                    invite.text
                );
                wait_for_bye(callee);
            });
            let ok = alice.invite(
                node,
                &format!("sip:{number}@example.com"),
                &format!("uri-{number}"),
                &mut |_, _| {},
            );
            assert_eq!(ok.status(), Some(200), "{number}: {}", ok.text);
            ack_and_hang_up(&alice, &ok);
            callee_side.join().unwrap();
        });
    }
    drop(cluster);

    // The default: a dialplan reaches only public addresses.
    let cluster = form(&provider);
    let node = cluster.member(1).sip_addr();
    let (code, json) = put_dialplan(&cluster, &format!(r#"dial("{carol_uri}");"#));
    assert_eq!(code, 201, "{json}");
    let refused = alice.invite(node, "sip:1@example.com", "uri-private", &mut |_, _| {});
    assert_eq!(refused.status(), Some(403), "{}", refused.text);
    assert!(
        refused.text.contains("not a public address"),
        "{}",
        refused.text
    );
    assert!(
        carol.recv(Duration::from_millis(500)).is_none(),
        "nothing reaches the private address"
    );
    drop(cluster);

    // A provider account names hosts of the customer's choosing too: with the node's
    // default (no private network listed), a call through a provider at a loopback
    // address is refused the same way, and the provider's phone gets nothing.
    let cluster = form_with_config(
        &provider_account(&provider),
        "\n[registration_agent]\nprivate_networks = []\n",
    );
    let node = cluster.member(1).sip_addr();
    let (code, json) = put_dialplan(&cluster, r#"dial("tel:0301234");"#);
    assert_eq!(code, 201, "{json}");
    let refused = alice.invite(
        node,
        "sip:2@example.com",
        "provider-private",
        &mut |_, _| {},
    );
    assert_eq!(refused.status(), Some(403), "{}", refused.text);
    assert!(
        refused.text.contains("registration_agent.private_networks"),
        "{}",
        refused.text
    );
    assert!(
        phone.recv(Duration::from_millis(500)).is_none(),
        "nothing reaches the provider at a private address"
    );
}

/// A caller that sends no offer (late offer, RFC 3261 §13.2.1): the callee's 2xx offer
/// reaches the caller in our 2xx, and the callee's ACK waits for the answer in the
/// caller's ACK, and carries it. A re-INVITE of the caller's that arrives just before its
/// ACK (as two requests sent back to back can be handed over) reaches the callee after
/// the callee's ACK, not before.
#[test]
fn a_call_without_an_offer_gets_the_callees_offer_and_its_ack_carries_the_answer() {
    let Fixture {
        provider: _provider,
        phone,
        cluster: _cluster,
        node,
    } = fixture();
    let mut alice = alice();
    const ALICE_ANSWER: &str = "v=0\r\no=alice 5 5 IN IP4 127.0.0.1\r\ns=-\r\n\
        c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 41000 RTP/AVP 0\r\n";
    std::thread::scope(|s| {
        let phone = &phone;
        let callee = s.spawn(move || {
            let invite = phone.expect_request("INVITE", Duration::from_secs(20));
            assert!(
                invite.body().is_empty(),
                "no offer to pass on: {}",
                invite.text
            );
            let contact = phone.contact();
            phone.respond_sdp(
                &invite,
                200,
                "OK",
                &format!("Contact: <{contact}>\r\n"),
                CAROL_OFFER,
            );
            // The first request the callee sees after its 200 is its ACK.
            let first = phone
                .recv(Duration::from_secs(10))
                .expect("the callee's ACK");
            assert_eq!(first.method(), Some("ACK"), "{}", first.text);
            assert!(
                first.body().contains("m=audio 41000"),
                "the callee's ACK carries the caller's answer: {}",
                first.text
            );
            let reinvite = phone.expect_request("INVITE", Duration::from_secs(10));
            let contact = phone.contact();
            phone.respond(&reinvite, 200, "OK", &format!("Contact: <{contact}>\r\n"));
            phone.expect_request("ACK", Duration::from_secs(10));
            wait_bye_only(phone);
        });
        let ok = alice.invite(node, "sip:0301234@example.com", "late-1", &mut |_, _| {});
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        assert!(ok.body().contains("m=audio 50000"), "{}", ok.text);
        let dialog = alice.dialog(&ok);
        // The re-INVITE first, the ACK 200 ms later.
        alice.send_in_dialog(&dialog, "INVITE", dialog.cseq + 1);
        std::thread::sleep(Duration::from_millis(200));
        let ack = tandem_failover_tests::ua::in_dialog_request(
            (&alice.user, &alice.domain),
            &dialog,
            alice.local(),
            "ACK",
            dialog.cseq,
            &dialog.to,
        )
        .replace(
            "Content-Length: 0\r\n\r\n",
            &format!(
                "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{ALICE_ANSWER}",
                ALICE_ANSWER.len()
            ),
        );
        let to = tandem_failover_tests::ua::uri_addr(
            dialog.route.first().unwrap_or(&dialog.remote_target),
        );
        alice.socket.send_to(ack.as_bytes(), to).unwrap();
        let reinvited = alice.expect_response("INVITE", Duration::from_secs(10));
        assert_eq!(reinvited.status(), Some(200), "{}", reinvited.text);
        alice.send_in_dialog(&dialog, "ACK", dialog.cseq + 1);
        alice.send_in_dialog(&dialog, "BYE", dialog.cseq + 2);
        let bye_ok = alice.expect_response("BYE", Duration::from_secs(20));
        assert_eq!(bye_ok.status(), Some(200), "{}", bye_ok.text);
        callee.join().unwrap();
    });
}

/// The callee's side after its ACK: the BYE, answered 200.
fn wait_bye_only(phone: &Ua) {
    let bye = phone.expect_request("BYE", Duration::from_secs(20));
    phone.respond(&bye, 200, "OK", "");
}

/// The call records node `id` holds for `customer`, once it holds `n`.
fn wait_customer_cdrs(cluster: &Cluster, id: u64, customer: &str, n: usize) -> Vec<Value> {
    let m = cluster.member(id);
    Wait::new(
        format!("{n} CDRs of {customer} on node {id}"),
        Duration::from_secs(15),
    )
    .showing(cluster)
    .until(|| {
        let records = m
            .get(&format!("/v1/cdrs?customer={customer}"))
            .and_then(|a| a.json()["records"].as_array().cloned())
            .unwrap_or_default();
        (records.len() >= n).then_some(records)
    })
}

/// The record of leg `name` of call `call`.
fn call_leg<'a>(records: &'a [Value], call: &str, name: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["call"] == call && r["leg"] == name)
        .unwrap_or_else(|| panic!("no record of {call} leg {name}: {records:#?}"))
}

#[test]
fn the_proxy_records_calls_between_local_phones_where_they_enter_the_cluster() {
    let cluster = Cluster::form(&[MemberRole::Full; 3], "");
    let m = cluster.member(1);
    for c in ["c1", "c2"] {
        assert_eq!(m.put_customer(c), Some(200));
    }
    c1_account(&cluster, "alice");
    let limit = m
        .request(
            "PUT",
            "/v1/accounts/example.com/alice",
            Some(r#"{"max_concurrent_calls":1}"#),
        )
        .unwrap();
    assert_eq!(limit.status, 200, "{}", limit.body);
    let b = m
        .request(
            "PUT",
            "/v1/accounts/example.com/bob",
            Some(r#"{"password":"pw-bob","customer":"c2"}"#),
        )
        .unwrap();
    assert_eq!(b.status, 201, "{}", b.body);
    // Bob's phone is behind node 2; alice calls through node 1, an outsider through
    // node 3. Neither account has a dialplan: the proxy carries the calls. Alice may
    // have one call at a time: a call that failed must free its place at once (her
    // last call follows a busy one immediately).
    let bob = registered_phone("bob", cluster.member(2).sip_addr());
    let mut alice = alice();
    let mut outsider = Ua::new("127.0.0.1", "mallory", "elsewhere.test", "x");
    for (who, node, call_id, status) in [
        ("alice", 1, "proxied-1", 200),
        ("outsider", 3, "proxied-2", 200),
        ("alice", 1, "proxied-3", 486),
        ("alice", 1, "proxied-4", 486),
    ] {
        let caller = if who == "alice" {
            &mut alice
        } else {
            &mut outsider
        };
        let addr = cluster.member(node).sip_addr();
        std::thread::scope(|s| {
            let bob = &bob;
            let callee = s.spawn(move || {
                let reason = if status == 200 { "OK" } else { "Busy Here" };
                answer_next(bob, status, reason);
                if status == 200 {
                    std::thread::sleep(Duration::from_millis(1100));
                    wait_for_bye(bob);
                }
            });
            let r = caller.invite(addr, "sip:bob@example.com", call_id, &mut |_, _| {});
            assert_eq!(r.status(), Some(status), "{}", r.text);
            if status == 200 {
                ack_and_hang_up(caller, &r);
            }
            callee.join().unwrap();
        });
    }
    // c1 (alice) has the caller's leg of her calls; c2 (bob) the callee's leg of
    // every call, and the outsider's leg of the call nobody local placed.
    let c1 = wait_customer_cdrs(&cluster, 2, "c1", 3);
    let c2 = wait_customer_cdrs(&cluster, 2, "c2", 5);
    // Nothing more arrives: the edge node (2) wrote nothing of its own.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(wait_customer_cdrs(&cluster, 2, "c1", 3).len(), 3, "{c1:#?}");
    assert_eq!(wait_customer_cdrs(&cluster, 2, "c2", 5).len(), 5, "{c2:#?}");

    let a = call_leg(&c1, "proxied-1", "a");
    assert_eq!(
        (&a["direction"], &a["account"], &a["node"]),
        (&"in".into(), &"alice@example.com".into(), &1.into()),
        "{a:#}"
    );
    let b1 = call_leg(&c2, "proxied-1", "b1");
    assert_eq!(
        (&b1["direction"], &b1["account"], &b1["node"]),
        (&"out".into(), &"bob@example.com".into(), &1.into()),
        "{b1:#}"
    );
    for r in [a, b1] {
        assert_eq!(
            (&r["code"], &r["outcome"]),
            (&200.into(), &"answered".into())
        );
        assert!(
            r["from"].as_str().unwrap().contains("alice@example.com"),
            "{r:#}"
        );
        assert_eq!(r["to"], "sip:bob@example.com");
        // (Bob's 180 and 200 leave back to back; the 180 may reach node 1 after the
        // 200, and is then not relayed, so ringing is not asserted.)
        assert!(r["duration_s"].as_u64() >= Some(1), "{r:#}");
        check_answered_times(r);
    }
    for leg in ["a", "b1"] {
        let r = call_leg(&c2, "proxied-2", leg);
        assert_eq!(
            (&r["account"], &r["node"], &r["outcome"]),
            (&"bob@example.com".into(), &3.into(), &"answered".into()),
            "{r:#}"
        );
        assert!(
            r["from"]
                .as_str()
                .unwrap()
                .contains("mallory@elsewhere.test"),
            "{r:#}"
        );
    }
    for (records, leg) in [(&c1, "a"), (&c2, "b1")] {
        let r = call_leg(records, "proxied-3", leg);
        assert_eq!(
            (&r["code"], &r["reason"], &r["outcome"], &r["node"]),
            (&486.into(), &"Busy Here".into(), &"busy".into(), &1.into()),
            "{r:#}"
        );
        assert!(r["answer_ms"].is_null() && r["duration_s"] == 0, "{r:#}");
    }
}
