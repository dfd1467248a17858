//! The HA promise under network faults (issue #19): three full nodes, each in its own
//! network namespace (`netns::Lab`), with writers, phones and calls running while a node
//! is cut off. Each scenario prints a `SUMMARY` line: the outage window writers saw, the
//! calls that failed, the acknowledged writes lost, and how often the leader changed.
//!
//! The invariants checked after every scenario: every write acknowledged with 200, by any
//! node, is on every node; every call placed between phones on the side that kept its
//! quorum was answered; a registration a cut-off node answered 200 in degraded mode
//! reaches the others once the cut heals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tandem_failover_tests::cluster::{
    add_account, bindings, http, member_data_dir, metric, Cluster, Member, MemberRole,
};
use tandem_failover_tests::netns::{client_ip, Lab, CLIENT_IP};
use tandem_failover_tests::ua::Ua;
use tandem_failover_tests::{Deadline, SetOnDrop, Wait};

const FULL3: [MemberRole; 3] = [MemberRole::Full; 3];
const ALL: [u64; 3] = [1, 2, 3];
const WAIT: Duration = Duration::from_secs(20);

/// A member's admin API, for threads that outlive a borrow of the cluster.
#[derive(Clone)]
struct Admin {
    id: u64,
    addr: std::net::SocketAddr,
    token: String,
}

impl Admin {
    fn of(cluster: &Cluster, id: u64) -> Admin {
        let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
        Admin {
            id,
            addr: cluster.member(id).admin_addr,
            token: token.trim().to_owned(),
        }
    }

    fn put_customer(&self, name: &str) -> Option<u16> {
        let body = format!("{{\"name\":\"customer {name}\"}}");
        let path = format!("/v1/customers/{name}");
        http(self.addr, Some(&self.token), "PUT", &path, Some(&body)).map(|a| a.status)
    }

    fn status(&self) -> Option<Value> {
        http(
            self.addr,
            Some(&self.token),
            "GET",
            "/v1/cluster/status",
            None,
        )
        .filter(|a| a.status == 200)
        .map(|a| a.json())
    }
}

/// A cluster of three in `lab` with customer acme and accounts alice, bob, carol and dave.
fn cluster_in(lab: &Lab) -> Cluster {
    with_accounts(Cluster::form_in(lab, &FULL3, ""))
}

/// `cluster` with customer acme and accounts alice, bob, carol and dave.
fn with_accounts(cluster: Cluster) -> Cluster {
    assert_eq!(cluster.member(1).put_customer("acme"), Some(200));
    for user in ["alice", "bob", "carol", "dave"] {
        put_account(&cluster, user);
    }
    cluster
}

/// Creates account `user`@example.com of customer acme, password `pw-<user>`.
fn put_account(cluster: &Cluster, user: &str) {
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let admin = cluster.member(1).admin_addr;
    add_account(
        admin,
        token.trim(),
        user,
        "example.com",
        &format!("pw-{user}"),
    );
}

/// A phone of `user` in the lab, registered through `node` (a new socket, so a new
/// contact).
fn phone(user: &str, node: &Member) -> Ua {
    phone_at(CLIENT_IP, user, node)
}

/// [`phone`] on address `ip`.
fn phone_at(ip: &str, user: &str, node: &Member) -> Ua {
    let mut ua = Ua::new(ip, user, "example.com", &format!("pw-{user}"));
    register(&mut ua, node);
    ua
}

/// `ua` registers its contact through `node`, for 600 s, and gets 200.
fn register(ua: &mut Ua, node: &Member) {
    let contact = ua.contact();
    let r = ua.register(
        node.sip_addr(),
        "MD5",
        Some(&format!("<{contact}>")),
        Some(600),
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

/// `caller` calls `callee`'s user through `node`; the callee answers, the caller hangs
/// up. The final status the caller got (200 for a call that went through).
fn call(caller: &mut Ua, node: &Member, callee: &Ua, callee_user: &str, call_id: &str) -> u16 {
    timed_call(caller, node, callee, callee_user, call_id).0
}

/// [`call`], and its setup time: from the first INVITE (its 407 challenge included) to
/// the final response.
fn timed_call(
    caller: &mut Ua,
    node: &Member,
    callee: &Ua,
    callee_user: &str,
    call_id: &str,
) -> (u16, Duration) {
    std::thread::scope(|s| {
        let answering = s.spawn(move || {
            // A node's keepalive OPTIONS first is answered 200; anything else is ignored.
            let deadline = Deadline::after(WAIT);
            let invite = loop {
                let Some(r) = callee.recv(deadline.remaining()) else {
                    return;
                };
                match r.method() {
                    Some("INVITE") => break r,
                    Some("OPTIONS") if r.header("To").is_some() => {
                        callee.respond(&r, 200, "OK", "")
                    }
                    _ => {}
                }
            };
            callee.respond(&invite, 180, "Ringing", "");
            let contact = callee.contact();
            callee.respond(&invite, 200, "OK", &format!("Contact: <{contact}>\r\n"));
            callee.expect_request("ACK", WAIT);
            let bye = callee.expect_request("BYE", WAIT);
            callee.respond(&bye, 200, "OK", "");
        });
        let setup = Deadline::after(Duration::ZERO);
        let r = caller.invite(
            node.sip_addr(),
            &format!("sip:{callee_user}@example.com"),
            call_id,
            &mut |_, _| {},
        );
        let took = setup.elapsed();
        let status = r.status().unwrap_or(0);
        if status == 200 {
            let dialog = caller.dialog(&r);
            caller.send_in_dialog(&dialog, "ACK", dialog.cseq);
            caller.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
            let bye = caller.expect_response("BYE", WAIT);
            assert_eq!(bye.status(), Some(200), "{}", bye.text);
        } else {
            eprintln!("call {call_id} ended with:\n{}", r.text);
        }
        answering.join().unwrap();
        (status, took)
    })
}

/// Writers, one per node, each writing customers `w<node>-<i>` one after the other
/// through its node until stopped; what each acknowledged, and when.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, Duration)>>>,
    refused: Arc<Mutex<usize>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(cluster: &Cluster, ids: &[u64], clock: Deadline) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let threads = ids
            .iter()
            .map(|&id| {
                let member = Admin::of(cluster, id);
                let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let name = format!("w{id}-{i}");
                        i += 1;
                        if member.put_customer(&name) == Some(200) {
                            acked.lock().unwrap().push((name, clock.elapsed()));
                            // Paced: enough to time a gap, not a load test.
                            std::thread::sleep(Duration::from_millis(10));
                        } else {
                            *refused.lock().unwrap() += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            refused,
            threads,
        }
    }

    /// Stops the writers; every write acknowledged, and the number refused.
    fn stop(self) -> (Vec<(String, Duration)>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let refused = *self.refused.lock().unwrap();
        (acked, refused)
    }
}

/// The longest time between two acknowledgements (by any writer) within `from..to`.
fn longest_gap(acked: &[(String, Duration)], from: Duration, to: Duration) -> Duration {
    let mut at: Vec<Duration> = acked
        .iter()
        .map(|(_, t)| *t)
        .filter(|t| *t >= from && *t <= to)
        .collect();
    at.sort_unstable();
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for t in at.into_iter().chain(std::iter::once(to)) {
        longest = longest.max(t.saturating_sub(previous));
        previous = t;
    }
    longest
}

/// A change of leader: when it was seen, the leader before, the new term.
type Change = (Duration, Option<u64>, u64);

/// Watches who leads, as the nodes report it, until stopped: every change of leader seen.
struct LeaderLog {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<Change>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaderLog {
    fn start(cluster: &Cluster, ids: &[u64], clock: Deadline) -> LeaderLog {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let members: Vec<Admin> = ids.iter().map(|&id| Admin::of(cluster, id)).collect();
        let thread = {
            let (stop, changes) = (stop.clone(), changes.clone());
            std::thread::spawn(move || {
                let mut last: Option<u64> = None;
                while !stop.load(Ordering::Relaxed) {
                    // The leader with a quorum, by the first node that says it is one.
                    let now = members.iter().find_map(|m| {
                        let s = m.status()?;
                        (s["state"] == "leader" && s["quorum"] == "ok")
                            .then(|| (m.id, s["term"].as_u64().unwrap_or(0)))
                    });
                    if let Some((leader, term)) = now {
                        if last != Some(leader) {
                            changes.lock().unwrap().push((clock.elapsed(), last, term));
                            last = Some(leader);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        LeaderLog {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    /// Stops watching; each change as (when, the leader before, the new term).
    fn stop(mut self) -> Vec<Change> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.changes.lock().unwrap())
    }
}

/// Every acknowledged write is on each of the full members `ids`, once each has caught
/// up; the ones missing anywhere.
fn lost_writes(cluster: &Cluster, ids: &[u64], acked: &[(String, Duration)]) -> Vec<String> {
    for &id in ids {
        cluster.wait_caught_up(id, Duration::from_secs(30));
    }
    let mut lost = Vec::new();
    for &id in ids {
        let have: std::collections::HashSet<String> = cluster
            .member(id)
            .customer_ids()
            .unwrap_or_default()
            .into_iter()
            .collect();
        lost.extend(
            acked
                .iter()
                .filter(|(name, _)| !have.contains(name))
                .map(|(name, _)| format!("{name} on node {id}")),
        );
    }
    lost
}

/// What the writers and the leader watch saw over a fault in the lab.
struct Outcome {
    acked: Vec<(String, Duration)>,
    refused: usize,
    changes: Vec<Change>,
    lost: Vec<String>,
}

/// After a fault has healed: waits for `victim` to catch up, lets the writers go on for
/// 2 s more, stops them and the watch, and checks every acknowledged write on every node.
fn settle(cluster: &Cluster, victim: u64, writers: Writers, leaders: LeaderLog) -> Outcome {
    cluster.wait_caught_up(victim, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let (acked, refused) = writers.stop();
    let changes = leaders.stop();
    let lost = lost_writes(cluster, &ALL, &acked);
    Outcome {
        acked,
        refused,
        changes,
        lost,
    }
}

/// Whether `user`'s bindings, as member `id` holds them, include `contact`.
fn has_binding(cluster: &Cluster, id: u64, user: &str, contact: &str) -> bool {
    let m = cluster.member(id);
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    bindings(m.admin_addr, token.trim(), user)
        .to_string()
        .contains(contact)
}

#[test]
fn netns_a_leader_cut_off_for_30_s_loses_no_acknowledged_write_and_calls_go_on() {
    let lab = Lab::new(3);
    let cluster = cluster_in(&lab);
    let (victim, _) = cluster.wait_for_leader(&[], WAIT);
    let majority: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != victim).collect();
    let (a, b) = (cluster.member(majority[0]), cluster.member(majority[1]));
    let mut alice = phone("alice", a);
    let bob = phone("bob", b);
    let _carol_before = phone("carol", cluster.member(victim));

    let clock = Deadline::after(Duration::ZERO);
    let leaders = LeaderLog::start(&cluster, &ALL, clock);
    let writers = Writers::start(&cluster, &ALL, clock);
    std::thread::sleep(Duration::from_secs(2));
    let cut_at = clock.elapsed();
    lab.partition(victim, &majority);

    // The majority elects a leader of its own.
    let (new_leader, took) = cluster.wait_for_leader(&[victim], WAIT);
    // The cut-off node knows it has no quorum, and says why.
    let degraded = Wait::new(format!("node {victim} to report degraded"), WAIT)
        .showing(&cluster)
        .until(|| {
            let s = cluster.member(victim).status()?;
            (s["quorum"] != "ok").then(|| s["degraded_reason"].to_string())
        });
    // It keeps serving what it can: a phone registering through it gets 200 (held in
    // its degraded-mode overlay until the quorum is back).
    let carol = phone("carol", cluster.member(victim));
    let carol_contact = carol.contact();
    // Calls between phones on the majority's side go through, on both of its nodes.
    let mut calls = Vec::new();
    let mut bob = bob;
    for i in 0..4 {
        let through = if i % 2 == 0 { a } else { b };
        calls.push(call(&mut alice, through, &bob, "bob", &format!("cut-{i}")));
        std::thread::sleep(Duration::from_secs(3));
        // Bob's phone refreshes through its node meanwhile.
        register(&mut bob, b);
    }
    std::thread::sleep(Duration::from_secs(30).saturating_sub(clock.elapsed() - cut_at));
    let healed_at = clock.elapsed();
    lab.heal();
    let Outcome {
        acked,
        refused,
        changes,
        lost,
    } = settle(&cluster, victim, writers, leaders);
    let failed_calls = calls.iter().filter(|s| **s != 200).count();
    let gap = longest_gap(&acked, cut_at, healed_at);
    eprintln!(
        "SUMMARY partition: leader {victim} cut off for {:?}; node {new_leader} led the \
         majority after {took:?}; longest write gap {gap:?}; writes acknowledged {}, \
         refused {refused}, lost {}; calls failed {failed_calls} of {}; leader changes \
         {changes:?}; node {victim} said {degraded}",
        healed_at - cut_at,
        acked.len(),
        lost.len(),
        calls.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert_eq!(failed_calls, 0, "calls on the majority's side: {calls:?}");
    // Writers on the majority's side wait for the election (a second or two), not for
    // the cut's end, nor for a write forwarded to the old leader to time out (5 s).
    assert!(gap < Duration::from_secs(4), "writes stopped for {gap:?}");
    // One change at the cut; the healed node may force one more with its higher term.
    assert!(changes.len() <= 3, "leader changes: {changes:?}");
    // Carol's registration through the cut-off node reached the others.
    Wait::new("carol's degraded-mode binding on the majority", WAIT)
        .showing(&cluster)
        .until(|| {
            majority
                .iter()
                .all(|id| has_binding(&cluster, *id, "carol", &carol_contact))
        });
    // And a call to her now rings that phone.
    assert_eq!(call(&mut alice, a, &carol, "carol", "after-heal"), 200);
}

/// A node that can send but not receive, then a link that flaps. A follower that hears
/// nothing from the leader starts elections, and its vote requests still reach the
/// others: without care that is leader ping-pong for as long as the fault lasts.
#[test]
fn netns_a_one_way_cut_and_a_flapping_link_neither_lose_writes_nor_make_the_leader_ping_pong() {
    let lab = Lab::new(3);
    let cluster = cluster_in(&lab);
    let (leader, _) = cluster.wait_for_leader(&[], WAIT);
    let victim = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != victim).collect();
    let (a, b) = (cluster.member(others[0]), cluster.member(others[1]));
    let mut alice = phone("alice", a);
    let bob = phone("bob", b);

    let clock = Deadline::after(Duration::ZERO);
    let leaders = LeaderLog::start(&cluster, &ALL, clock);
    let writers = Writers::start(&cluster, &ALL, clock);
    std::thread::sleep(Duration::from_secs(2));

    // 1. For 30 s the follower receives nothing from the others; what it sends arrives.
    let one_way_at = clock.elapsed();
    for peer in &others {
        lab.cut_one_way(*peer, victim);
    }
    let mut calls = Vec::new();
    for i in 0..3 {
        calls.push(call(&mut alice, a, &bob, "bob", &format!("one-way-{i}")));
        std::thread::sleep(Duration::from_secs(8));
    }
    std::thread::sleep(Duration::from_secs(30).saturating_sub(clock.elapsed() - one_way_at));
    lab.heal();
    let one_way_end = clock.elapsed();
    cluster.wait_caught_up(victim, Duration::from_secs(30));

    // 2. For 60 s the link between the follower and the others is cut and healed every 2 s.
    let flap_at = clock.elapsed();
    let mut cut = false;
    while clock.elapsed() - flap_at < Duration::from_secs(60) {
        if cut {
            lab.heal();
        } else {
            lab.partition(victim, &others);
        }
        cut = !cut;
        if !cut {
            calls.push(call(
                &mut alice,
                a,
                &bob,
                "bob",
                &format!("flap-{}", calls.len()),
            ));
        }
        let next = flap_at
            + Duration::from_secs(2) * ((clock.elapsed() - flap_at).as_secs() as u32 / 2 + 1);
        std::thread::sleep(next.saturating_sub(clock.elapsed()));
    }
    lab.heal();
    let flap_end = clock.elapsed();
    let Outcome {
        acked,
        refused,
        changes,
        lost,
    } = settle(&cluster, victim, writers, leaders);
    let failed_calls = calls.iter().filter(|s| **s != 200).count();
    let in_window = |from: Duration, to: Duration| {
        changes
            .iter()
            .filter(|(at, before, _)| before.is_some() && *at >= from && *at <= to)
            .count()
    };
    let one_way_changes = in_window(one_way_at, flap_at);
    let flap_changes = in_window(flap_at, clock.elapsed());
    eprintln!(
        "SUMMARY one-way cut and flapping link (node {victim}, a follower of {leader}): \
         leader changes {one_way_changes} during and after the 30 s one-way cut, \
         {flap_changes} during and after 60 s of flapping; longest write gap {:?} and {:?}; \
         writes acknowledged {}, refused {refused}, lost {}; calls failed {failed_calls} of \
         {}; every change {changes:?}",
        longest_gap(&acked, one_way_at, one_way_end),
        longest_gap(&acked, flap_at, flap_end),
        acked.len(),
        lost.len(),
        calls.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert_eq!(
        failed_calls, 0,
        "calls between the two connected nodes: {calls:?}"
    );
    assert!(
        one_way_changes <= 1,
        "the leader changed {one_way_changes} times for one node that could not hear: {changes:?}"
    );
    assert!(
        flap_changes <= 2,
        "the leader changed {flap_changes} times for one flapping follower: {changes:?}"
    );
}

/// Places a call from `caller` to `callee` through `node` every `every` until `stop`,
/// and returns every final status.
fn calls_until(
    stop: &AtomicBool,
    caller: &mut Ua,
    node: &Member,
    callee: &Ua,
    callee_user: &str,
    every: Duration,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let id = format!("load-{}-{}", callee_user, statuses.len());
        statuses.push(call(caller, node, callee, callee_user, &id));
        std::thread::sleep(every);
    }
    statuses
}

/// Scenario 1: the leader is SIGKILLed while writers write and, on the other two nodes,
/// alice calls bob and carol calls dave every half second, each pair across both nodes.
#[test]
fn the_leader_killed_under_load_fails_no_call_between_the_survivors_and_writes_resume() {
    let cluster = with_accounts(Cluster::form(&FULL3, ""));
    let (victim, _) = cluster.wait_for_leader(&[], WAIT);
    let survivors: Vec<u64> = ALL.into_iter().filter(|n| *n != victim).collect();
    let (a, b) = (cluster.member(survivors[0]), cluster.member(survivors[1]));
    let mut alice = phone_at("127.0.0.1", "alice", a);
    let bob = phone_at("127.0.0.1", "bob", b);
    let mut carol = phone_at("127.0.0.1", "carol", b);
    let dave = phone_at("127.0.0.1", "dave", a);
    let clock = Deadline::after(Duration::ZERO);
    let leaders = LeaderLog::start(&cluster, &ALL, clock);
    let writers = Writers::start(&cluster, &survivors, clock);
    let stop = AtomicBool::new(false);
    let (statuses, killed_at) = std::thread::scope(|s| {
        let to_bob = s.spawn(|| {
            calls_until(
                &stop,
                &mut alice,
                a,
                &bob,
                "bob",
                Duration::from_millis(500),
            )
        });
        let to_dave = s.spawn(|| {
            calls_until(
                &stop,
                &mut carol,
                b,
                &dave,
                "dave",
                Duration::from_millis(500),
            )
        });
        let stopping = SetOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(3));
        let killed_at = clock.elapsed();
        cluster.member(victim).sigkill();
        cluster.wait_for_leader(&[victim], WAIT);
        std::thread::sleep(Duration::from_secs(5));
        drop(stopping);
        let mut statuses = to_bob.join().unwrap();
        statuses.extend(to_dave.join().unwrap());
        (statuses, killed_at)
    });
    let (acked, refused) = writers.stop();
    let changes = leaders.stop();
    let lost = lost_writes(&cluster, &survivors, &acked);
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    let gap = longest_gap(&acked, killed_at, clock.elapsed());
    eprintln!(
        "SUMMARY leader killed: node {victim}; longest write gap {gap:?}; writes acknowledged \
         {}, refused {refused}, lost {}; calls failed {} of {}; leader changes {changes:?}",
        acked.len(),
        lost.len(),
        failed.len(),
        statuses.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        failed.is_empty(),
        "calls between the survivors failed: {statuses:?}"
    );
    assert!(gap < Duration::from_secs(4), "writes stopped for {gap:?}");
}

/// Scenario 4: two SIP nodes and a witness. Losing the witness, then (with the witness
/// back) one SIP node: writes and calls go on each time; the lost node's phone registers
/// again through the other, as a phone with both in DNS SRV would.
#[test]
fn a_pair_with_a_witness_keeps_serving_without_the_witness_and_then_without_one_node() {
    let roles = [MemberRole::Full, MemberRole::Full, MemberRole::Witness];
    let cluster = with_accounts(Cluster::form(&roles, ""));
    let (one, two) = (cluster.member(1), cluster.member(2));
    let mut alice = phone_at("127.0.0.1", "alice", one);
    let mut bob = phone_at("127.0.0.1", "bob", two);
    let clock = Deadline::after(Duration::ZERO);
    let leaders = LeaderLog::start(&cluster, &ALL, clock);
    let writers = Writers::start(&cluster, &[1, 2], clock);
    let mut statuses = Vec::new();

    // The witness goes.
    std::thread::sleep(Duration::from_secs(2));
    let witness_lost_at = clock.elapsed();
    cluster.member(3).sigkill();
    for i in 0..3 {
        statuses.push(call(
            &mut alice,
            one,
            &bob,
            "bob",
            &format!("no-witness-{i}"),
        ));
        statuses.push(call(
            &mut bob,
            two,
            &alice,
            "alice",
            &format!("no-witness-back-{i}"),
        ));
        std::thread::sleep(Duration::from_secs(1));
    }
    let witness_back_at = clock.elapsed();
    cluster.member(3).start();
    cluster.member(3).wait_healthy();
    cluster.wait_for_voters(3, WAIT);

    // Then a SIP node goes: the leader if a SIP node leads (the harder case: node and
    // witness must elect), else node 2. Its phone registers again through the other.
    let (leader, _) = cluster.wait_for_leader(&[], WAIT);
    let gone = if leader == 1 { 1 } else { 2 };
    let survivor = cluster.member(3 - gone);
    let node_lost_at = clock.elapsed();
    cluster.member(gone).sigkill();
    cluster.wait_for_leader(&[gone], WAIT);
    let (moved, stayed) = if gone == 1 {
        (&mut alice, &mut bob)
    } else {
        (&mut bob, &mut alice)
    };
    register(moved, survivor);
    let moved_user = if gone == 1 { "alice" } else { "bob" };
    for i in 0..3 {
        statuses.push(call(
            stayed,
            survivor,
            moved,
            moved_user,
            &format!("one-node-{i}"),
        ));
        std::thread::sleep(Duration::from_secs(1));
    }
    let end = clock.elapsed();
    let (acked, refused) = writers.stop();
    let changes = leaders.stop();
    cluster.member(gone).start();
    cluster.member(gone).wait_healthy();
    let lost = lost_writes(&cluster, &[1, 2], &acked);
    let failed = statuses.iter().filter(|s| **s != 200).count();
    let witness_gap = longest_gap(&acked, witness_lost_at, witness_back_at);
    let node_gap = longest_gap(&acked, node_lost_at, end);
    eprintln!(
        "SUMMARY pair and witness: longest write gap {witness_gap:?} without the witness, \
         {node_gap:?} without node {gone}; writes acknowledged {}, refused {refused}, lost {}; \
         calls failed {failed} of {}; leader changes {changes:?}",
        acked.len(),
        lost.len(),
        statuses.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert_eq!(failed, 0, "calls: {statuses:?}");
    assert!(
        witness_gap < Duration::from_secs(4),
        "writes stopped for {witness_gap:?}"
    );
    assert!(
        node_gap < Duration::from_secs(6),
        "writes stopped for {node_gap:?}"
    );
}

/// Scenario 7: every node SIGKILLed at once and started again: every acknowledged write,
/// and every binding, is still there, and a call to a phone registered before reaches it.
#[test]
fn a_whole_cluster_killed_at_once_comes_back_with_every_acknowledged_write_and_binding() {
    let cluster = with_accounts(Cluster::form(&FULL3, ""));
    let mut alice = phone_at("127.0.0.1", "alice", cluster.member(1));
    let bob = phone_at("127.0.0.1", "bob", cluster.member(2));
    let carol = phone_at("127.0.0.1", "carol", cluster.member(3));
    let clock = Deadline::after(Duration::ZERO);
    let writers = Writers::start(&cluster, &ALL, clock);
    std::thread::sleep(Duration::from_secs(3));
    // Mid-write: some writes are in flight as the nodes die.
    for id in ALL {
        cluster.member(id).sigkill();
    }
    let (acked, _) = writers.stop();
    for id in ALL {
        cluster.member(id).start();
    }
    for id in ALL {
        cluster.member(id).wait_healthy();
    }
    cluster.wait_for_leader(&[], WAIT);
    let lost = lost_writes(&cluster, &ALL, &acked);
    let bindings_kept = [("bob", bob.contact()), ("carol", carol.contact())]
        .iter()
        .all(|(user, contact)| {
            ALL.iter()
                .all(|id| has_binding(&cluster, *id, user, contact))
        });
    let to_bob = call(
        &mut alice,
        cluster.member(1),
        &bob,
        "bob",
        "after-restart-bob",
    );
    let to_carol = call(
        &mut alice,
        cluster.member(2),
        &carol,
        "carol",
        "after-restart-carol",
    );
    eprintln!(
        "SUMMARY full restart: writes acknowledged {}, lost {}; bindings kept {bindings_kept}; \
         calls after the restart {to_bob}, {to_carol}",
        acked.len(),
        lost.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(bindings_kept, "bindings lost in the restart");
    assert_eq!((to_bob, to_carol), (200, 200));
}

/// A mounted file system that is unmounted (lazily) when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Runs a command, panicking with its output if it fails.
fn run(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves member `id`'s data dir (the member stopped) onto a tmpfs of `mib` MiB.
fn data_on_tmpfs(cluster: &Cluster, id: u64, mib: u32) -> (Mount, std::path::PathBuf) {
    let data = cluster.member(id).dir.join("data");
    let old = cluster.member(id).dir.join("data.before");
    std::fs::rename(&data, &old).unwrap();
    std::fs::create_dir(&data).unwrap();
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m"),
            "tandem-test",
            data.to_str().unwrap(),
        ],
    );
    let mount = Mount(data.clone());
    run(
        "cp",
        &[
            "-a",
            &format!("{}/.", old.display()),
            data.to_str().unwrap(),
        ],
    );
    (mount, data)
}

/// Scenario 8, a full disk: one follower's data dir fills up. It says so on `/ready`,
/// refuses writes of its own (507) instead of failing inside RocksDB, the others go on,
/// nothing acknowledged is lost, and once the space is back it takes writes again and has
/// everything, without a restart.
#[test]
fn root_a_full_disk_on_one_node_loses_nothing_and_the_others_go_on() {
    tandem_failover_tests::netns::require_root();
    let cluster = with_accounts(Cluster::form(&FULL3, ""));
    let (leader, _) = cluster.wait_for_leader(&[], WAIT);
    let victim = ALL.into_iter().find(|n| *n != leader).unwrap();
    let others: Vec<u64> = ALL.into_iter().filter(|n| *n != victim).collect();
    cluster.member(victim).sigterm();
    cluster.member(victim).wait_exit(WAIT);
    let (_mount, data) = data_on_tmpfs(&cluster, victim, 512);
    cluster.member(victim).start();
    cluster.member(victim).wait_healthy();
    cluster.wait_caught_up(victim, WAIT);

    let clock = Deadline::after(Duration::ZERO);
    let writers = Writers::start(&cluster, &others, clock);
    std::thread::sleep(Duration::from_secs(1));
    // Fill the disk: dd stops at ENOSPC.
    let filler = data.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status();
    let full_at = clock.elapsed();
    let not_ready = Wait::new(format!("node {victim} to say it is not ready"), WAIT)
        .showing(&cluster)
        .until(|| {
            let a = cluster.member(victim).get("/ready")?;
            (a.status == 503).then_some(a.body)
        });
    assert!(not_ready.contains("data disk"), "{not_ready}");
    let refused_here = cluster
        .member(victim)
        .request(
            "PUT",
            "/v1/customers/on-a-full-disk",
            Some(r#"{"name":"x"}"#),
        )
        .expect("the admin API answers");
    assert_eq!(refused_here.status, 507, "{}", refused_here.body);
    assert!(
        refused_here.body.contains("data disk"),
        "{}",
        refused_here.body
    );
    std::thread::sleep(Duration::from_secs(5));
    let during = clock.elapsed();
    let stopped = !cluster.member(victim).is_running();
    // Space is back: the node takes writes again, with no restart.
    std::fs::remove_file(&filler).unwrap();
    Wait::new(format!("node {victim} to be ready again"), WAIT)
        .showing(&cluster)
        .until(|| {
            cluster
                .member(victim)
                .get("/ready")
                .is_some_and(|a| a.status == 200)
        });
    assert_eq!(
        cluster.member(victim).put_customer("after-the-disk"),
        Some(200)
    );
    std::thread::sleep(Duration::from_secs(2));
    let (acked, refused) = writers.stop();
    let lost = lost_writes(&cluster, &ALL, &acked);
    let gap = longest_gap(&acked, full_at, during);
    eprintln!(
        "SUMMARY full disk: node {victim}; it said {not_ready}; stopped on its own: {stopped}; \
         longest write gap {gap:?}; writes acknowledged {}, refused {refused}, lost {}; log \
         lines about the disk: {:?}",
        acked.len(),
        lost.len(),
        cluster
            .member(victim)
            .log()
            .lines()
            .filter(|l| l.contains("data disk"))
            .take(3)
            .collect::<Vec<_>>(),
    );
    assert!(!stopped, "node {victim} stopped on a full disk");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        gap < Duration::from_secs(2),
        "the others' writes stopped for {gap:?}"
    );
}

/// Scenario 8's other half: a follower's data disk turns read-only under it (a preloaded
/// shim, `fixtures/readonly-disk.c`, fails every write under its data dir with EROFS, as
/// a file system the kernel remounted read-only would). The node must say so on `/ready`
/// and in `tandem_ready`, refuse writes, and not take the others down; they go on, nothing
/// acknowledged is lost, and once the disk is writable the node, restarted, catches up.
#[test]
fn a_read_only_disk_on_one_node_loses_nothing_and_it_catches_up_once_writable() {
    const VICTIM: u64 = 3;
    let build = tempfile::tempdir().unwrap();
    let shim = build.path().join("readonly-disk.so");
    let source = tandem_failover_tests::package_dir().join("fixtures/readonly-disk.c");
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&shim)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("run cc (Debian: gcc, which ./ops/setup.sh's clang brings)");
    assert!(
        cc.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let env = |root: &std::path::Path, id: u64| {
        if id != VICTIM {
            return Vec::new();
        }
        vec![
            ("LD_PRELOAD".to_owned(), shim.display().to_string()),
            (
                "READONLY_DIR".to_owned(),
                member_data_dir(root, id).display().to_string(),
            ),
            (
                "READONLY_TRIGGER".to_owned(),
                root.join("read-only").display().to_string(),
            ),
        ]
    };
    let cluster = with_accounts(Cluster::form_env_each(&FULL3, "", &env));
    let others: Vec<u64> = ALL.into_iter().filter(|n| *n != VICTIM).collect();
    cluster.wait_caught_up(VICTIM, WAIT);
    let clock = Deadline::after(Duration::ZERO);
    let writers = Writers::start(&cluster, &others, clock);
    std::thread::sleep(Duration::from_secs(1));

    let trigger = cluster.root().join("read-only");
    std::fs::write(&trigger, "").unwrap();
    let read_only_at = clock.elapsed();
    let not_ready = Wait::new(format!("node {VICTIM} to say it is not ready"), WAIT)
        .showing(&cluster)
        .until(|| {
            let a = cluster.member(VICTIM).get("/ready")?;
            (a.status == 503).then_some(a.body)
        });
    let metric =
        tandem_failover_tests::cluster::metric(cluster.member(VICTIM).admin_addr, "tandem_ready");
    std::thread::sleep(Duration::from_secs(3));
    let during = clock.elapsed();
    let running = cluster.member(VICTIM).is_running();
    let written_here = cluster.member(VICTIM).put_customer("still-read-only");

    // The disk is writable again; the node is restarted and catches up.
    std::fs::remove_file(&trigger).unwrap();
    cluster.member(VICTIM).sigkill();
    cluster.member(VICTIM).start();
    cluster.member(VICTIM).wait_healthy();
    cluster.wait_caught_up(VICTIM, WAIT);
    std::thread::sleep(Duration::from_secs(1));
    let (acked, refused) = writers.stop();
    let lost = lost_writes(&cluster, &ALL, &acked);
    let gap = longest_gap(&acked, read_only_at, during);
    eprintln!(
        "SUMMARY read-only disk: node {VICTIM}; it said {not_ready} (tandem_ready {metric:?}); \
         a write through it then: {written_here:?}; still running: {running}; longest write \
         gap {gap:?}; writes acknowledged {}, refused {refused}, lost {}; after a restart it \
         caught up",
        acked.len(),
        lost.len(),
    );
    assert_ne!(
        written_here,
        Some(200),
        "a write went through the read-only node"
    );
    assert_eq!(metric, Some(0.0), "tandem_ready on the read-only node");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        gap < Duration::from_secs(2),
        "the others' writes stopped for {gap:?}"
    );
}

/// The one-way delay between members in the WAN scenario: about New York to Chicago and
/// back through a provider's backbone, or two European cities far apart.
const WAN_DELAY: Duration = Duration::from_millis(40);

/// The `[cluster]` settings README ("Two sites") gives for a link of `WAN_DELAY`: an
/// append must complete within one heartbeat, so the heartbeat is over twice the round
/// trip, and elections wait five heartbeats.
const WAN_CLUSTER: &str = "heartbeat_ms = 200\nelection_timeout_ms = 1000";

/// How long each half of the WAN scenario keeps registering and calling.
const WAN_PHASE: Duration = Duration::from_secs(8);

/// The accounts whose phones register new contacts over and over in the WAN scenario.
const REGISTERING: [&str; 4] = ["r1", "r2", "r3", "r4"];

/// What the WAN scenario's load saw in one phase: the time each REGISTER took (with its
/// 401 challenge) that wrote (a new contact, a removal) and that only refreshed, each
/// call's setup time, what failed, and the contacts (user, contact) left registered and
/// removed.
#[derive(Default)]
struct WanLoad {
    writes: Vec<Duration>,
    /// The same, through node 1 and through node 2.
    writes_through: [Vec<Duration>; 2],
    refreshes: Vec<Duration>,
    calls: Vec<Duration>,
    failed: Vec<String>,
    kept: Vec<(String, String)>,
    removed: Vec<(String, String)>,
}

/// How many contacts each registering phone of the WAN scenario keeps registered: with
/// the previous phase's, still under the node's limit of five per account.
const WAN_KEPT: usize = 2;

impl WanLoad {
    /// For `WAN_PHASE`: each of the `REGISTERING` phones, two through each SIP node,
    /// registers a new contact, refreshes it at once and removes the one it registered
    /// `WAN_KEPT` rounds before; alice (registered through node 1) calls bob (node 2)
    /// through node 1, and carol (node 2) calls dave (node 1) through node 2, so every
    /// call crosses between the nodes.
    fn run(cluster: &Cluster, phase: &str, callers: &mut [(Ua, Ua, &str, u64); 2]) -> WanLoad {
        let clock = Deadline::after(Duration::ZERO);
        let load = Mutex::new(WanLoad::default());
        std::thread::scope(|s| {
            for (k, user) in REGISTERING.iter().enumerate() {
                let node = cluster.member(1 + k as u64 % 2);
                let load = &load;
                s.spawn(move || {
                    // A phone of its own address each: one address sending this much
                    // would be banned for flooding.
                    let ip = client_ip(1 + k as u8);
                    let mut ua = Ua::new(&ip, user, "example.com", &format!("pw-{user}"));
                    let mut live = std::collections::VecDeque::new();
                    let mut register = |contact: &str, expires: u32| {
                        let took = Deadline::after(Duration::ZERO);
                        let r = ua.register(
                            node.sip_addr(),
                            "MD5",
                            Some(&format!("<{contact}>")),
                            Some(expires),
                        );
                        if r.status != 200 {
                            let why = format!("{user} {contact} expires {expires}: {}", r.status);
                            load.lock().unwrap().failed.push(why);
                        }
                        took.elapsed()
                    };
                    let mut i = 0;
                    while clock.elapsed() < WAN_PHASE {
                        let contact = format!("sip:{user}-{phase}-{i}@{ip}");
                        i += 1;
                        let added = register(&contact, 600);
                        let refreshed = register(&contact, 600);
                        live.push_back(contact);
                        let removal = (live.len() > WAN_KEPT).then(|| {
                            let old = live.pop_front().expect("more than kept");
                            (register(&old, 0), old)
                        });
                        let mut load = load.lock().unwrap();
                        load.writes.push(added);
                        load.writes_through[k % 2].push(added);
                        load.refreshes.push(refreshed);
                        if let Some((took, old)) = removal {
                            load.writes.push(took);
                            load.writes_through[k % 2].push(took);
                            load.removed.push((user.to_string(), old));
                        }
                        drop(load);
                        // Paced under the node's flood limit for one address (100/s).
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let kept = live.into_iter().map(|c| (user.to_string(), c));
                    load.lock().unwrap().kept.extend(kept);
                });
            }
            for (caller, callee, callee_user, through) in callers.iter_mut() {
                let (node, callee_user) = (cluster.member(*through), *callee_user);
                let load = &load;
                s.spawn(move || {
                    let mut n = 0;
                    while clock.elapsed() < WAN_PHASE {
                        let id = format!("wan-{phase}-{callee_user}-{n}");
                        n += 1;
                        let (status, took) = timed_call(caller, node, callee, callee_user, &id);
                        let mut load = load.lock().unwrap();
                        load.calls.push(took);
                        if status != 200 {
                            load.failed.push(format!("call {id}: {status}"));
                        }
                        drop(load);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
            }
        });
        load.into_inner().unwrap()
    }
}

/// The `q` quantile (0..=1) of `samples`, by the nearest-rank method.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

/// "p99 X (p50 Y, n N)" of `samples`, in milliseconds.
fn percentiles(samples: &[Duration]) -> String {
    format!(
        "p99 {:.1} ms (p50 {:.1} ms, n {})",
        quantile(samples, 0.99).as_secs_f64() * 1e3,
        quantile(samples, 0.5).as_secs_f64() * 1e3,
        samples.len()
    )
}

/// Scenario 10: a WAN pair. Two SIP nodes and a witness with `WAN_DELAY` each way between
/// any two of them (the lab's relay holds every packet between members: the Raft link
/// and SIP forwarded from one node to the other), formed across that distance. Phones
/// register and call through both nodes; then the same load runs with no delay, in the
/// same cluster, as the reference. Nothing may fail or be lost, the leader must stay put,
/// and a registration or call over the WAN must not wait for more than a few round trips.
#[test]
fn netns_a_wan_pair_with_a_witness_registers_and_calls_with_40_ms_between_its_members() {
    let lab = Lab::wan(3);
    lab.set_delay(WAN_DELAY);
    let roles = [MemberRole::Full, MemberRole::Full, MemberRole::Witness];
    let cluster = with_accounts(Cluster::form_in(&lab, &roles, WAN_CLUSTER));
    for user in REGISTERING {
        put_account(&cluster, user);
    }
    cluster.wait_peers_up(WAIT);
    let (one, two) = (cluster.member(1), cluster.member(2));
    let mut callers = [
        (
            phone_at(&client_ip(5), "alice", one),
            phone_at(&client_ip(6), "bob", two),
            "bob",
            1,
        ),
        (
            phone_at(&client_ip(7), "carol", two),
            phone("dave", one),
            "dave",
            2,
        ),
    ];
    // A phone called at once through the node it did not register through, each way:
    // the follower among the two may not have applied the binding yet, and must catch up
    // with the leader before it answers 480 (`Replica::catch_up`; without it, 480).
    put_account(&cluster, "erin");
    let alice = &mut callers[0].0;
    for (registered, called) in [(1, 2), (2, 1)] {
        let mut erin = phone_at(&client_ip(4), "erin", cluster.member(registered));
        let id = format!("at-once-{registered}-{called}");
        let status = call(alice, cluster.member(called), &erin, "erin", &id);
        assert_eq!(
            status, 200,
            "erin, registered through node {registered}, called at once through node {called}"
        );
        let contact = erin.contact();
        let gone = erin.register(
            cluster.member(registered).sip_addr(),
            "MD5",
            Some(&format!("<{contact}>")),
            Some(0),
        );
        assert_eq!(gone.status, 200, "{}", gone.text);
    }
    let (leader, _) = cluster.wait_for_leader(&[], WAIT);
    let clock = Deadline::after(Duration::ZERO);
    let leaders = LeaderLog::start(&cluster, &ALL, clock);
    let relayed_before = lab.relayed();
    let late = || -> f64 {
        ALL.iter()
            .filter_map(|id| {
                metric(
                    cluster.member(*id).admin_addr,
                    "tandem_raft_rpcs_late_total",
                )
            })
            .sum()
    };
    let late_before = late();
    let far = WanLoad::run(&cluster, "far", &mut callers);
    let relayed = lab.relayed() - relayed_before;
    let late_rpcs = late() - late_before;
    lab.set_delay(Duration::ZERO);
    // Packets queued under the delay drain first.
    std::thread::sleep(WAN_DELAY * 2);
    let near = WanLoad::run(&cluster, "near", &mut callers);
    let changes = leaders.stop();

    // Every write answered 200 holds on both SIP nodes: the contacts kept are there, the
    // ones removed are not.
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let mut lost = Vec::new();
    for id in [1, 2] {
        cluster.wait_caught_up(id, WAIT);
        let addr = cluster.member(id).admin_addr;
        let held: Vec<String> = REGISTERING
            .iter()
            .map(|user| bindings(addr, token.trim(), user).to_string())
            .collect();
        let holds = |user: &str, contact: &str| {
            let k = REGISTERING.iter().position(|u| *u == user).unwrap();
            // The index ends at the '@', so no contact is a prefix of another.
            held[k].contains(contact)
        };
        for (user, contact) in far.kept.iter().chain(&near.kept) {
            if !holds(user, contact) {
                lost.push(format!("{contact} missing on node {id}"));
            }
        }
        for (user, contact) in far.removed.iter().chain(&near.removed) {
            if holds(user, contact) {
                lost.push(format!("{contact} still on node {id}"));
            }
        }
    }
    let failed: Vec<&String> = far.failed.iter().chain(&near.failed).collect();
    eprintln!(
        "SUMMARY WAN pair ({} ms each way between members, node {leader} leading): REGISTER \
         that writes {} vs {} without delay (through node 1 {}, node 2 {}); refresh REGISTER \
         {} vs {}; call setup {} vs {}; failed {}, writes lost {} of {}; leader changes \
         {changes:?}; {relayed} packets relayed under delay, {late_rpcs} Raft RPCs late",
        WAN_DELAY.as_millis(),
        percentiles(&far.writes),
        percentiles(&near.writes),
        percentiles(&far.writes_through[0]),
        percentiles(&far.writes_through[1]),
        percentiles(&far.refreshes),
        percentiles(&near.refreshes),
        percentiles(&far.calls),
        percentiles(&near.calls),
        failed.len(),
        lost.len(),
        far.writes.len() + near.writes.len(),
    );
    let first = |v: &[String]| v[..v.len().min(10)].to_vec();
    let failed: Vec<String> = failed.into_iter().cloned().collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        first(&failed)
    );
    assert!(
        lost.is_empty(),
        "{} lost, first: {:?}",
        lost.len(),
        first(&lost)
    );
    assert_eq!(changes.len(), 1, "the leader changed: {changes:?}");
    // Under the delay the load did cross the relay, and took the time it should. A write
    // is a forward to the leader (through node 2), a round of replication and, through
    // node 2, the commit reaching it: two to three round trips of 80 ms, and more when an
    // append is already on its way; a call crosses once each way for the INVITE and its
    // answer, and waits for no write.
    assert!(relayed > 1000, "only {relayed} packets crossed the relay");
    for (what, samples, bound) in [
        ("writing REGISTER", &far.writes, Duration::from_millis(800)),
        ("call setup", &far.calls, Duration::from_millis(300)),
    ] {
        let p99 = quantile(samples, 0.99);
        assert!(
            p99 < bound,
            "{what} p99 {p99:?} over the WAN (bound {bound:?})"
        );
        assert!(
            quantile(samples, 0.5) >= WAN_DELAY * 2,
            "{what} took less than a round trip between members: was the delay applied?"
        );
    }
}
