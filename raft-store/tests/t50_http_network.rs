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
use tandem_raft_store::types::{NodeInfo, Request};
use tokio::time::{sleep, Instant};

fn tls_for(ca: &CertAuthority, name: &str, ip: &str) -> ClusterTls {
    let issued = ca.issue(name, &[ip.to_string()]).unwrap();
    ClusterTls::from_pem(
        ca.cert_pem().as_bytes(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .unwrap()
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
        let raft = r.raft().clone();
        tokio::spawn(async move {
            http_network::serve(listener, &tls, raft, std::future::pending()).await
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
    let member = HttpNetwork::new(&tls_for(&ca, "node9", "127.0.0.9")).unwrap();
    let request = Request {
        commands: vec![Command::SetFeatureVersion { version: 21 }.encode()],
    };
    let response = member
        .forward(&members[&leader], &request, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(response.results, vec![CommandResult::Done]);

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
