//! Replicas talking over the real Raft network: HTTPS with mutual TLS on 127.0.0.x
//! listeners, certificates from a cluster CA. A client whose certificate another CA signed
//! is refused; a follower's forwarded proposal is applied by the leader.

use std::sync::Arc;
use std::time::Duration;

use tandem_raft_store::certs::CertAuthority;
use tandem_raft_store::command::{Command, CommandResult};
use tandem_raft_store::http_network::{self, HttpNetwork};
use tandem_raft_store::replica::{Forwarder, RaftSettings, Replica};
use tandem_raft_store::tls::ClusterTls;
use tandem_raft_store::types::{NodeInfo, Request, TypeConfig};
use tokio::time::{sleep, Instant};

fn tls_for(ca: &CertAuthority, name: &str, ip: &str) -> ClusterTls {
    let id = name.trim_start_matches("node").parse().expect("node<id>");
    let issued = ca.issue(name, id, &[ip.to_string()]).unwrap();
    ClusterTls::from_pem(
        ca.cert_pem().as_bytes(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .unwrap()
}

fn context(tls: &ClusterTls) -> http_network::ServeContext {
    http_network::ServeContext {
        cluster_id: "test-cluster".into(),
        key_ids: Arc::new(|| Ok(vec![1, 2])),
        features: 0,
        agent: Arc::default(),
        network: HttpNetwork::new(tls).unwrap(),
        join_members: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_replicate_over_mutual_tls_and_refuse_strangers() {
    let ca = CertAuthority::generate("test").unwrap();
    let settings = RaftSettings {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(300),
        election_timeout_max: Duration::from_millis(600),
        ..RaftSettings::default()
    };
    let mut replicas = Vec::new();
    let mut dirs = Vec::new();
    let mut members = std::collections::BTreeMap::new();
    let mut listeners = Vec::new();
    for id in 1..=3u64 {
        let ip = format!("127.0.0.{id}");
        let listener = tokio::net::TcpListener::bind((ip.as_str(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        members.insert(
            id,
            NodeInfo {
                raft_addr: addr.to_string(),
            },
        );
        listeners.push((id, ip, listener));
    }
    for (id, ip, listener) in listeners {
        let tls = tls_for(&ca, &format!("node{id}"), &ip);
        let dir = tempfile::tempdir().unwrap();
        let network = HttpNetwork::new(&tls).unwrap();
        let forwarder: Arc<dyn Forwarder> = Arc::new(network.clone());
        let r = Replica::start_with_forwarding(id, dir.path(), &settings, network, Some(forwarder))
            .await
            .unwrap();
        let served = r.clone();
        tokio::spawn(async move {
            http_network::serve(
                listener,
                &tls,
                served,
                context(&tls),
                std::future::pending(),
            )
            .await
        });
        replicas.push(r);
        dirs.push(dir);
    }
    replicas[0].initialize(members.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        if let Some(l) = replicas[0].metrics().current_leader {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no leader elected over the network"
        );
        sleep(Duration::from_millis(20)).await;
    };
    let lr = &replicas[(leader - 1) as usize];
    for v in 1..=20u32 {
        assert_eq!(
            lr.propose(Command::SetFeatureVersion { version: v })
                .await
                .unwrap(),
            CommandResult::Done
        );
    }
    let applied = lr.metrics().last_applied.unwrap().index;
    for r in &replicas {
        while r.metrics().last_applied.map_or(0, |l| l.index) < applied {
            assert!(
                Instant::now() < deadline,
                "node {} did not catch up",
                r.id()
            );
            sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(r.reader().feature_version().unwrap(), 20);
    }

    // A proposal made on a follower is forwarded to the leader and applied everywhere.
    let follower = replicas.iter().find(|r| r.id() != leader).unwrap();
    assert_eq!(
        follower
            .propose(Command::PutCustomer(tandem_raft_store::command::Customer {
                id: "c1".into(),
                name: "n".into(),
                enabled: true
            }))
            .await
            .unwrap(),
        CommandResult::Done
    );
    assert!(lr.reader().customer("c1").unwrap().is_some());

    // A member forwards a batch to the leader over the same authenticated link.
    let id = follower.id();
    let member = HttpNetwork::new(&tls_for(
        &ca,
        &format!("node{id}"),
        &format!("127.0.0.{id}"),
    ))
    .unwrap();
    let request = Request {
        commands: vec![Command::SetFeatureVersion { version: 21 }.encode()],
    };
    let (response, index) = member
        .forward(&members[&leader], &request, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(response.results, vec![CommandResult::Done]);
    assert!(index > 0, "the entry's index comes back");

    // A certificate from another CA gets nowhere.
    let stranger_ca = CertAuthority::generate("other").unwrap();
    let stranger = HttpNetwork::new(&tls_for(&stranger_ca, "node1", "127.0.0.1")).unwrap();
    let request = Request {
        commands: vec![Command::SetFeatureVersion { version: 99 }.encode()],
    };
    let refused = stranger
        .forward(&members[&leader], &request, Duration::from_secs(5))
        .await;
    assert!(
        refused.is_err(),
        "a peer with a foreign certificate was served: {refused:?}"
    );
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lr.reader().feature_version().unwrap(),
        21,
        "the stranger's write was not applied"
    );
    for r in &replicas {
        r.shutdown().await;
    }
}

/// Starts a replica serving the Raft network on a fresh port of 127.0.0.<id>, on a new
/// data dir, until the test ends.
async fn serving_replica(
    ca: &CertAuthority,
    id: u64,
    settings: &RaftSettings,
) -> (Replica, NodeInfo, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let served = serve_node(ca, id, dir.path(), None, settings, Vec::new()).await;
    // Never stopped: the serving task ends with the test's runtime.
    std::mem::forget(served.stop);
    (served.replica, served.info, dir)
}

async fn wait_for(what: &str, deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_through_any_member_become_voters_and_removed_ids_stay_retired() {
    use tandem_raft_store::membership::{ClusterReply, ClusterRequest};
    let ca = CertAuthority::generate("test").unwrap();
    let settings = RaftSettings {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(300),
        election_timeout_max: Duration::from_millis(600),
        ..RaftSettings::default()
    };
    let (r1, info1, _d1) = serving_replica(&ca, 1, &settings).await;
    let (r2, info2, _d2) = serving_replica(&ca, 2, &settings).await;
    let (r3, info3, _d3) = serving_replica(&ca, 3, &settings).await;
    r1.initialize([(1, info1.clone())].into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_for("node 1 to lead", deadline, || {
        r1.metrics().current_leader == Some(1)
    })
    .await;
    for v in 1..=10u32 {
        r1.propose(Command::SetFeatureVersion { version: v })
            .await
            .unwrap();
    }

    // Node 2 joins through node 1, with a joining node's own certificate: at this feature
    // version, only with a join token.
    let joiner = HttpNetwork::new(&tls_for(&ca, "node2", "127.0.0.2")).unwrap();
    let timeout = Duration::from_secs(5);
    let plain = joiner
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::Join {
                id: 2,
                raft_addr: info2.raft_addr.clone(),
            },
            timeout,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(plain.contains("only with a join token"), "{plain}");
    let (cluster_id, reply) = joiner
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::JoinWithToken {
                id: 2,
                raft_addr: info2.raft_addr.clone(),
                token: join_token(&r1, Some(2)).await.into(),
            },
            timeout,
        )
        .await
        .unwrap();
    assert_eq!(
        (cluster_id.as_str(), reply),
        ("test-cluster", ClusterReply::Joined)
    );
    let promoted = loop {
        let p = r1.promote_caught_up_learners().await.unwrap();
        if !p.is_empty() {
            break p;
        }
        assert!(Instant::now() < deadline, "node 2 never caught up");
        sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(promoted, vec![2]);
    assert_eq!(
        r2.reader().feature_version().unwrap(),
        10,
        "node 2 has the state"
    );

    // Node 3 joins through node 2, a follower, which forwards to the leader.
    wait_for("node 2 to know the leader", deadline, || {
        r2.metrics().current_leader == Some(1)
    })
    .await;
    let joiner = HttpNetwork::new(&tls_for(&ca, "node3", "127.0.0.3")).unwrap();
    let token3 = join_token(&r1, None).await;
    let join3 = ClusterRequest::JoinWithToken {
        id: 3,
        raft_addr: info3.raft_addr.clone(),
        token: token3.clone().into(),
    };
    joiner
        .cluster(&info2.raft_addr, &join3, timeout)
        .await
        .unwrap();
    loop {
        if r1.promote_caught_up_learners().await.unwrap() == vec![3] {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 never caught up");
        sleep(Duration::from_millis(50)).await;
    }
    wait_for("node 3 to see three voters", deadline, || {
        r3.members().iter().filter(|m| m.voter).count() == 3
    })
    .await;

    // Another member at the same id is refused; the same join again (its answer lost) is
    // harmless with any token that admits it (the one it used may be gone), which it
    // does not use up, and refused with a made-up one.
    let clash = joiner
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::JoinWithToken {
                id: 3,
                raft_addr: "127.0.0.9:1".into(),
                token: join_token(&r1, None).await.into(),
            },
            timeout,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(clash.contains("already a member"), "{clash}");
    let (_, reply) = joiner
        .cluster(&info1.raft_addr, &join3, timeout)
        .await
        .unwrap();
    assert_eq!(reply, ClusterReply::Joined);
    let fresh = join_token(&r1, None).await;
    let (_, reply) = joiner
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::JoinWithToken {
                id: 3,
                raft_addr: info3.raft_addr.clone(),
                token: fresh.clone().into(),
            },
            timeout,
        )
        .await
        .unwrap();
    assert_eq!(reply, ClusterReply::Joined);
    let unused = r1.reader().join_token(&fresh[3..19]).unwrap().unwrap();
    assert_eq!(unused.used_by, 0, "a repeated join used up a token");
    let made_up = joiner
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::JoinWithToken {
                id: 3,
                raft_addr: info3.raft_addr.clone(),
                token: format!("tj_{}_{}", "1".repeat(16), "2".repeat(64)).into(),
            },
            timeout,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(made_up.contains("not one this cluster issued"), "{made_up}");

    // Remove node 3 through node 2; its id is retired for good.
    let (_, reply) = joiner
        .cluster(&info2.raft_addr, &ClusterRequest::Remove { id: 3 }, timeout)
        .await
        .unwrap();
    assert_eq!(reply, ClusterReply::Removed);
    assert_eq!(
        r1.members().iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let again = joiner
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::JoinWithToken {
                id: 3,
                raft_addr: info3.raft_addr.clone(),
                token: join_token(&r1, None).await.into(),
            },
            timeout,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("never reused"), "{again}");

    // Key ids are answered by the member asked, not forwarded; only to a member (node 3
    // is not one any more).
    let refused = joiner
        .cluster(&info2.raft_addr, &ClusterRequest::KeyIds, timeout)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("403"), "{refused}");
    let member = HttpNetwork::new(&tls_for(&ca, "node1", "127.0.0.1")).unwrap();
    let (_, reply) = member
        .cluster(&info2.raft_addr, &ClusterRequest::KeyIds, timeout)
        .await
        .unwrap();
    assert_eq!(reply, ClusterReply::KeyIds(vec![1, 2]));
    let view = r1.replication_view().unwrap();
    assert_eq!(view.leader, 1);
    assert!(view.matched.contains_key(&2));

    // Down to one voter, which the cluster cannot remove.
    r1.cluster_request(ClusterRequest::Remove { id: 2 })
        .await
        .unwrap();
    let last = r1
        .cluster_request(ClusterRequest::Remove { id: 1 })
        .await
        .unwrap_err()
        .to_string();
    assert!(last.contains("only voter"), "{last}");
    for r in [&r1, &r2, &r3] {
        r.shutdown().await;
    }
}

/// An append that carries nothing, from `leader` as the leader of `term`: enough to make
/// a follower take a new leader and term, if it takes the message at all.
fn empty_append(term: u64, leader: u64) -> openraft::raft::AppendEntriesRequest<TypeConfig> {
    openraft::raft::AppendEntriesRequest {
        vote: tandem_raft_store::types::Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    }
}

/// A join token minted and stored through `leader`, as the admin API does: its text.
async fn join_token(leader: &Replica, node: Option<u64>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (text, token) = tandem_raft_store::join_token::mint(node, now, now + 60_000);
    let put = Command::PutJoinToken { token, now_ms: now };
    assert_eq!(leader.propose(put).await.unwrap(), CommandResult::Done);
    text
}

/// A certificate speaks only for its own node id: a member's cannot send a Raft message in
/// another node's name, and a certificate from the cluster's CA for an id that never
/// joined can ask to join in its own name and nothing else: no proposal, no removal, no
/// question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_speaks_only_for_its_own_node_and_only_members_propose() {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::VoteRequest;
    use tandem_raft_store::membership::ClusterRequest;
    use tandem_raft_store::types::Vote;

    let ca = CertAuthority::generate("test").unwrap();
    let settings = RaftSettings::default();
    let (r1, info1, _d1) = serving_replica(&ca, 1, &settings).await;
    let (r2, info2, _d2) = serving_replica(&ca, 2, &settings).await;
    r1.initialize([(1, info1.clone())].into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_for("node 1 to lead", deadline, || {
        r1.metrics().current_leader == Some(1)
    })
    .await;
    r1.propose(Command::SetFeatureVersion { version: 5 })
        .await
        .unwrap();
    let timeout = Duration::from_secs(5);
    let member = HttpNetwork::new(&tls_for(&ca, "node2", "127.0.0.2")).unwrap();
    member
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::JoinWithToken {
                id: 2,
                raft_addr: info2.raft_addr.clone(),
                token: join_token(&r1, Some(2)).await.into(),
            },
            timeout,
        )
        .await
        .unwrap();
    loop {
        if r1.promote_caught_up_learners().await.unwrap() == vec![2] {
            break;
        }
        assert!(Instant::now() < deadline, "node 2 never caught up");
        sleep(Duration::from_millis(50)).await;
    }
    let term = |r: &Replica| r.metrics().current_term;
    let (term1, term2) = (term(&r1), term(&r2));

    // Node 2's certificate, in node 3's name (a vote) and node 1's (an append): refused,
    // and neither term moves.
    let option = RPCOption::new(timeout);
    let mut to_1 = member.clone().new_client(1, &info1).await;
    let vote = to_1
        .vote(
            VoteRequest::new(Vote::new(term1 + 50, 3), None),
            option.clone(),
        )
        .await;
    assert!(
        vote.is_err(),
        "a vote in another node's name was taken: {vote:?}"
    );
    let mut to_2 = member.clone().new_client(2, &info2).await;
    let append = to_2
        .append_entries(empty_append(term2 + 50, 1), option.clone())
        .await;
    assert!(
        append.is_err(),
        "an append in the leader's name was taken: {append:?}"
    );
    assert_eq!(
        (term(&r1), term(&r2)),
        (term1, term2),
        "a forged message moved a term"
    );
    // In its own name, node 2 is heard.
    let features = member
        .cluster(&info1.raft_addr, &ClusterRequest::Features, timeout)
        .await;
    assert!(features.is_ok(), "{features:?}");

    // A certificate for node 9, which never joined.
    let stranger = HttpNetwork::new(&tls_for(&ca, "node9", "127.0.0.9")).unwrap();
    let planted = stranger
        .forward(
            &info1,
            &tandem_raft_store::types::Request {
                commands: vec![Command::PutCustomer(tandem_raft_store::command::Customer {
                    id: "planted".into(),
                    name: "by a certificate that never joined".into(),
                    enabled: true,
                })
                .encode()],
            },
            timeout,
        )
        .await;
    assert!(
        planted.is_err(),
        "a stranger's proposal was taken: {planted:?}"
    );
    assert_eq!(r1.reader().customer("planted").unwrap(), None);
    for request in [
        ClusterRequest::Remove { id: 2 },
        ClusterRequest::Features,
        ClusterRequest::Replication,
        ClusterRequest::Members,
    ] {
        let answer = stranger.cluster(&info1.raft_addr, &request, timeout).await;
        assert!(answer.is_err(), "{request:?} from a stranger: {answer:?}");
    }
    let err = stranger
        .cluster(
            &info1.raft_addr,
            &ClusterRequest::JoinWithToken {
                id: 3,
                raft_addr: "127.0.0.3:1".into(),
                token: join_token(&r1, None).await.into(),
            },
            timeout,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("403"), "a join in another node's name: {err}");
    assert_eq!(
        r1.members().iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 2],
        "the membership changed"
    );
    for r in [&r1, &r2] {
        r.shutdown().await;
    }
}

/// A replica serving the Raft network, which the test can stop and start again on the
/// same data dir and address.
struct Served {
    replica: Replica,
    info: NodeInfo,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts node `id` on `dir`, at `addr` (a fresh port of 127.0.0.<id> if `None`), with the
/// members its join recorded.
async fn serve_node(
    ca: &CertAuthority,
    id: u64,
    dir: &std::path::Path,
    addr: Option<&str>,
    settings: &RaftSettings,
    join_members: Vec<String>,
) -> Served {
    let ip = format!("127.0.0.{id}");
    let listener = match addr {
        Some(addr) => tokio::net::TcpListener::bind(addr).await.unwrap(),
        None => tokio::net::TcpListener::bind((ip.as_str(), 0))
            .await
            .unwrap(),
    };
    let info = NodeInfo {
        raft_addr: listener.local_addr().unwrap().to_string(),
    };
    let tls = tls_for(ca, &format!("node{id}"), &ip);
    let network = HttpNetwork::new(&tls).unwrap();
    let forwarder: Arc<dyn Forwarder> = Arc::new(network.clone());
    // A replica stopped a moment ago may still hold the store's lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    let replica = loop {
        match Replica::start_with_forwarding(
            id,
            dir,
            settings,
            network.clone(),
            Some(forwarder.clone()),
        )
        .await
        {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("node {id} did not start again: {e}"),
        }
    };
    let context = http_network::ServeContext {
        join_members,
        ..context(&tls)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = replica.clone();
    let task = tokio::spawn(async move {
        http_network::serve(listener, &tls, served, context, async move {
            let _ = stopped.await;
        })
        .await
    });
    Served {
        replica,
        info,
        stop,
        task,
    }
}

impl Served {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
        self.replica.shutdown().await;
    }
}

/// Raft messages count only from members: a certificate the cluster's CA signed for an id
/// that never joined cannot vote or append in its own name, not even to a node that has
/// just joined and knows no membership yet. A member this node has not heard of is taken
/// once a member it knows vouches for it: a member (node 3, a learner) that was down while
/// node 4 joined and took the lead catches up from node 4, and a node that just joined
/// takes the leader's first appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_count_only_from_members_or_those_a_member_vouches_for() {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::VoteRequest;
    use tandem_raft_store::command::Customer;
    use tandem_raft_store::membership::ClusterRequest;
    use tandem_raft_store::types::Vote;

    let ca = CertAuthority::generate("test").unwrap();
    let settings = RaftSettings {
        heartbeat: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(600),
        election_timeout_max: Duration::from_millis(1200),
        ..RaftSettings::default()
    };
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let n1 = serve_node(&ca, 1, dirs[0].path(), None, &settings, vec![]).await;
    n1.replica
        .initialize([(1, n1.info.clone())].into())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_for("node 1 to lead", deadline, || {
        n1.replica.metrics().current_leader == Some(1)
    })
    .await;
    n1.replica
        .propose(Command::SetFeatureVersion { version: 5 })
        .await
        .unwrap();
    let timeout = Duration::from_secs(5);
    let join = |id: u64, served: &Served, token: String| {
        let network = HttpNetwork::new(&tls_for(
            &ca,
            &format!("node{id}"),
            &format!("127.0.0.{id}"),
        ))
        .unwrap();
        let request = ClusterRequest::JoinWithToken {
            id,
            raft_addr: served.info.raft_addr.clone(),
            token: token.into(),
        };
        let to = n1.info.raft_addr.clone();
        async move { network.cluster(&to, &request, timeout).await.unwrap() }
    };
    let joined_through_1 = vec![n1.info.raft_addr.clone()];
    let n2 = serve_node(
        &ca,
        2,
        dirs[1].path(),
        None,
        &settings,
        joined_through_1.clone(),
    )
    .await;
    let n3 = serve_node(
        &ca,
        3,
        dirs[2].path(),
        None,
        &settings,
        joined_through_1.clone(),
    )
    .await;
    join(2, &n2, join_token(&n1.replica, Some(2)).await).await;
    let promote = |want: Vec<u64>| {
        let leader = n1.replica.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut promoted = Vec::new();
            while promoted != want {
                promoted.extend(leader.promote_caught_up_learners().await.unwrap());
                promoted.sort();
                assert!(
                    Instant::now() < deadline,
                    "only {promoted:?} of {want:?} caught up"
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
    };
    promote(vec![2]).await;
    // Node 3 stays a learner, so that nodes 1, 2 and 4 make a majority without it below.
    join(3, &n3, join_token(&n1.replica, Some(3)).await).await;
    let caught_up = |n: &Served| {
        let last = n1.replica.metrics().last_log_index;
        n.replica.metrics().last_applied.map(|l| l.index) == last
    };
    wait_for(
        "node 3 to catch up",
        Instant::now() + Duration::from_secs(30),
        || caught_up(&n3),
    )
    .await;

    // A certificate for node 9, which never joined, speaking Raft in its own name.
    let stranger = HttpNetwork::new(&tls_for(&ca, "node9", "127.0.0.9")).unwrap();
    let option = RPCOption::new(timeout);
    let terms = |nodes: &[&Served]| {
        nodes
            .iter()
            .map(|n| n.replica.metrics().current_term)
            .collect::<Vec<_>>()
    };
    let before = terms(&[&n1, &n2, &n3]);
    let high = before.iter().max().unwrap() + 50;
    for target in [&n1, &n2] {
        let mut to = stranger
            .clone()
            .new_client(target.replica.id(), &target.info)
            .await;
        let vote = to
            .vote(VoteRequest::new(Vote::new(high, 9), None), option.clone())
            .await;
        assert!(vote.is_err(), "a never-member's vote was taken: {vote:?}");
        let append = to
            .append_entries(empty_append(high, 9), option.clone())
            .await;
        assert!(
            append.is_err(),
            "a never-member's append was taken: {append:?}"
        );
    }
    assert_eq!(
        terms(&[&n1, &n2, &n3]),
        before,
        "a never-member moved a term"
    );
    assert_eq!(n2.replica.metrics().current_leader, Some(1));

    // Node 3 goes down; node 4 joins, becomes a voter and takes the lead.
    let addr3 = n3.info.raft_addr.clone();
    n3.stop().await;
    let n4 = serve_node(
        &ca,
        4,
        dirs[3].path(),
        None,
        &settings,
        joined_through_1.clone(),
    )
    .await;
    // Before its join, node 4 knows no membership: node 1 (its join's member) does not
    // vouch for node 9, so node 9 cannot plant a log there either.
    let mut to_4 = stranger.clone().new_client(4, &n4.info).await;
    let append = to_4
        .append_entries(empty_append(high, 9), option.clone())
        .await;
    assert!(
        append.is_err(),
        "a fresh node took a never-member's append: {append:?}"
    );
    assert_eq!(n4.replica.metrics().current_term, 0);
    join(4, &n4, join_token(&n1.replica, Some(4)).await).await;
    wait_for(
        "node 4 to catch up",
        Instant::now() + Duration::from_secs(30),
        || caught_up(&n4),
    )
    .await;
    n1.replica
        .raft()
        .change_membership(openraft::ChangeMembers::AddVoterIds([4].into()), false)
        .await
        .unwrap();
    // An election node 4 starts before its log is as long as the others' loses, so it
    // waits for that, and tries again if another node won meanwhile.
    let leads = Instant::now() + Duration::from_secs(60);
    let leader_everywhere = |id| {
        [&n1, &n2, &n4]
            .iter()
            .all(|n| n.replica.metrics().current_leader == Some(id))
    };
    while !leader_everywhere(4) {
        assert!(
            Instant::now() < leads,
            "node 4 never took the lead: {:?}",
            [&n1, &n2, &n4].map(|n| {
                let m = n.replica.metrics();
                (
                    m.id,
                    m.state,
                    m.current_term,
                    m.current_leader,
                    m.last_log_index,
                )
            })
        );
        let last = |n: &Served| n.replica.metrics().last_log_index;
        if last(&n4) == last(&n1) && last(&n4) == last(&n2) {
            n4.replica.raft().trigger().elect().await.unwrap();
            let settled = Instant::now() + Duration::from_secs(3);
            while Instant::now() < settled && !leader_everywhere(4) {
                sleep(Duration::from_millis(20)).await;
            }
        } else {
            sleep(Duration::from_millis(20)).await;
        }
    }
    let written_by_4 = Command::PutCustomer(Customer {
        id: "while-3-was-down".into(),
        name: "written through node 4".into(),
        enabled: true,
    });
    assert_eq!(
        n4.replica.propose(written_by_4).await.unwrap(),
        CommandResult::Done
    );

    // Node 3 comes back knowing only nodes 1, 2 and itself: nodes 1 and 2 vouch for node 4,
    // so node 3 takes its appends and catches up.
    let n3 = serve_node(
        &ca,
        3,
        dirs[2].path(),
        Some(&addr3),
        &settings,
        joined_through_1,
    )
    .await;
    assert!(!n3.replica.members().iter().any(|m| m.id == 4));
    let back = Instant::now() + Duration::from_secs(30);
    while n3
        .replica
        .reader()
        .customer("while-3-was-down")
        .unwrap()
        .is_none()
    {
        assert!(
            Instant::now() < back,
            "node 3 never took the appends of node 4, a member it had not heard of"
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n3.replica.metrics().current_leader, Some(4));
    for n in [n1, n2, n3, n4] {
        n.stop().await;
    }
}
