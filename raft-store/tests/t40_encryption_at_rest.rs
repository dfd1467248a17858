//! Sensitive fields never reach the disk in the clear (raft-store/DESIGN.md, "Secrets are
//! sealed before the log"): after accounts and providers with known secrets are replicated,
//! snapshotted and flushed, no file under any replica's data directory (WAL, SSTs,
//! snapshots) holds the password or the HA1. A marker stored in the clear (a customer's
//! name) is found by the same scan, so the scan does see the state's files. After a key
//! rotation and [`Replica::drop_history`](tandem_raft_store::replica::Replica::drop_history),
//! no file holds a ciphertext made under the old key either (raft-store/DESIGN.md,
//! "Rotating keys leaves nothing behind").

use std::path::Path;
use std::time::Duration;

use tandem_raft_store::command::{
    account_record, ha1_field, provider_record, Account, Command, CommandResult, Customer,
    Provider, PROVIDER_PASSWORD_FIELD,
};
use tandem_raft_store::crypto::KeyRing;
use tandem_raft_store::local_network::LocalCluster;
use tandem_raft_store::replica::RaftSettings;
use tandem_raft_store::replica::ResealReport;

const PASSWORD: &[u8] = b"correct-horse-battery-staple";
const HA1: &[u8] = b"5f4dcc3b5aa765d61d8327deb882cf99";
const MARKER: &[u8] = b"PLAINTEXT-MARKER-4c1d9e";

/// alice@example.com with one sealed HA1 per (algorithm, value).
fn alice(keys: &KeyRing, ha1: &[(&str, &[u8])]) -> Account {
    let record = account_record("alice", "example.com");
    Account {
        user: "alice".into(),
        domain: "example.com".into(),
        customer: "acme".into(),
        ha1: ha1
            .iter()
            .map(|(alg, v)| (alg.to_string(), keys.seal(&record, &ha1_field(alg), v)))
            .collect(),
        enabled: true,
        max_contacts: 5,
        max_concurrent_calls: 2,
    }
}

/// Provider account trunk-1 with PASSWORD sealed.
fn trunk(keys: &KeyRing) -> Provider {
    Provider {
        id: "trunk-1".into(),
        customer: "acme".into(),
        registrar: "sip:provider.example.net".into(),
        username: "acme-trunk".into(),
        password: keys.seal(
            &provider_record("trunk-1"),
            PROVIDER_PASSWORD_FIELD,
            PASSWORD,
        ),
        expires_secs: 600,
        enabled: true,
    }
}

/// trunk-1's password, opened.
fn trunk_password(keys: &KeyRing, p: &Provider) -> Vec<u8> {
    keys.open(
        &p.password,
        &provider_record("trunk-1"),
        PROVIDER_PASSWORD_FIELD,
    )
    .unwrap()
}

/// Three replicas in a cluster, each in a temp dir of its own.
async fn three_replicas(settings: &RaftSettings) -> (Vec<tempfile::TempDir>, LocalCluster) {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let paths: Vec<&Path> = dirs.iter().map(|d| d.path()).collect();
    let cluster = LocalCluster::start(&paths, settings, Duration::from_secs(10))
        .await
        .unwrap();
    (dirs, cluster)
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_secret_reaches_any_file() {
    let keys = KeyRing::generate();
    let settings = RaftSettings {
        snapshot_every: 20,
        keep_after_snapshot: 2,
        ..RaftSettings::default()
    };
    let (dirs, cluster) = three_replicas(&settings).await;
    let replicas = &cluster.replicas;
    let leader = cluster.leader().unwrap().clone();

    let account = alice(&keys, &[("MD5", HA1)]);
    let provider = trunk(&keys);
    assert_eq!(
        leader.propose(Command::PutAccount(account)).await.unwrap(),
        CommandResult::Done
    );
    assert_eq!(
        leader
            .propose(Command::PutProvider(provider))
            .await
            .unwrap(),
        CommandResult::Done
    );
    let marker = Customer {
        id: "acme".into(),
        name: String::from_utf8(MARKER.to_vec()).unwrap(),
        enabled: true,
    };
    leader.propose(Command::PutCustomer(marker)).await.unwrap();
    // Enough entries for a snapshot and a purge, so snapshots and SSTs exist too.
    for v in 0..40 {
        leader
            .propose(Command::SetFeatureVersion { version: v })
            .await
            .unwrap();
    }
    let applied = leader.metrics().last_applied.unwrap().index;
    for r in replicas {
        while r.metrics().last_applied.map_or(0, |l| l.index) < applied {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.raft().trigger().snapshot().await.unwrap();
    }
    // A snapshot is built in the background: wait until every replica has one that covers
    // the secrets, so the scan below reads it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for r in replicas {
        while r.metrics().snapshot.map_or(0, |s| s.index) < applied {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no snapshot up to index {applied}: {:?}",
                r.metrics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for r in replicas {
        r.flush_to_disk().unwrap();
    }

    // The sealed values still open on every replica.
    for r in replicas {
        let a = r.reader().account("example.com", "alice").unwrap().unwrap();
        assert_eq!(
            keys.open(
                &a.ha1[0].1,
                &account_record("alice", "example.com"),
                &ha1_field("MD5")
            )
            .unwrap(),
            HA1
        );
        let p = r.reader().provider("trunk-1").unwrap().unwrap();
        assert_eq!(trunk_password(&keys, &p), PASSWORD);
    }
    for dir in &dirs {
        let with_marker = files_containing(dir.path(), MARKER);
        assert!(
            with_marker.iter().any(|f| f.contains(&format!(
                "{}snapshots{}",
                std::path::MAIN_SEPARATOR,
                std::path::MAIN_SEPARATOR
            ))),
            "the scan must read a snapshot holding the marker in {:?}: {with_marker:?}",
            dir.path()
        );
        assert_eq!(
            files_containing(dir.path(), PASSWORD),
            Vec::<String>::new(),
            "password in the clear"
        );
        assert_eq!(
            files_containing(dir.path(), HA1),
            Vec::<String>::new(),
            "HA1 in the clear"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_reseals_every_field_through_raft() {
    let mut keys = KeyRing::generate();
    let (_dirs, cluster) = three_replicas(&RaftSettings::default()).await;
    let leader = cluster.leader().unwrap().clone();
    let record = account_record("alice", "example.com");
    let account = alice(&keys, &[("MD5", b"md5-ha1"), ("SHA-256", b"sha256-ha1")]);
    let provider = trunk(&keys);
    leader.propose(Command::PutAccount(account)).await.unwrap();
    leader
        .propose(Command::PutProvider(provider))
        .await
        .unwrap();

    assert_eq!(keys.rotate(), 2);
    let report = leader.reseal_all(&keys).await.unwrap();
    assert_eq!(
        report,
        ResealReport {
            accounts: 1,
            providers: 1
        }
    );
    let a = leader
        .reader()
        .account("example.com", "alice")
        .unwrap()
        .unwrap();
    assert!(a.ha1.iter().all(|(_, s)| s.key_id == 2), "{:?}", a.ha1);
    assert_eq!(
        keys.open(&a.ha1[1].1, &record, &ha1_field("SHA-256"))
            .unwrap(),
        b"sha256-ha1"
    );
    let p = leader.reader().provider("trunk-1").unwrap().unwrap();
    assert_eq!(p.password.key_id, 2);
    assert_eq!(trunk_password(&keys, &p), PASSWORD);
    assert_eq!(
        leader.reseal_all(&keys).await.unwrap(),
        ResealReport::default(),
        "nothing left to re-seal"
    );

    // A re-seal that raced with another change is refused, not applied over it.
    let stale = Command::ResealProvider {
        id: "trunk-1".into(),
        expected: keys.seal("x", "y", b"z"),
        resealed: p.password.clone(),
    };
    assert!(matches!(
        leader.propose(stale).await.unwrap(),
        CommandResult::Rejected(_)
    ));
    cluster.shutdown().await;
}

/// Every data directory under `dirs` that holds `needle` somewhere.
fn dirs_holding(dirs: &[tempfile::TempDir], needle: &[u8]) -> Vec<usize> {
    (0..dirs.len())
        .filter(|&i| !files_containing(dirs[i].path(), needle).is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_no_file_holds_a_value_sealed_under_the_old_key() {
    let mut keys = KeyRing::generate();
    let (dirs, cluster) = three_replicas(&RaftSettings::default()).await;
    let replicas = &cluster.replicas;
    let leader = cluster.leader().unwrap().clone();
    let account = alice(&keys, &[("MD5", HA1), ("SHA-256", b"sha256-ha1")]);
    let provider = trunk(&keys);
    let old: Vec<Vec<u8>> = account
        .ha1
        .iter()
        .map(|(_, s)| s.ciphertext.clone())
        .chain([provider.password.ciphertext.clone()])
        .collect();
    leader.propose(Command::PutAccount(account)).await.unwrap();
    leader
        .propose(Command::PutProvider(provider))
        .await
        .unwrap();
    let everyone_applied = |index: u64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for r in replicas {
            while r.metrics().last_applied.map_or(0, |l| l.index) < index {
                assert!(tokio::time::Instant::now() < deadline, "{:?}", r.metrics());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let written = leader.metrics().last_log_index.unwrap();
    everyone_applied(written).await;
    // The old values in every kind of file: the log, a snapshot, and SSTs after a flush.
    for r in replicas {
        r.raft().trigger().snapshot().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while r.metrics().snapshot.map_or(0, |s| s.index) < written {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", r.metrics());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.flush_to_disk().unwrap();
    }
    for (i, ciphertext) in old.iter().enumerate() {
        assert_eq!(
            dirs_holding(&dirs, ciphertext),
            vec![0, 1, 2],
            "the scan must find old value {i} on every replica before the rotation"
        );
        for dir in &dirs {
            assert!(
                files_containing(dir.path(), ciphertext)
                    .iter()
                    .any(|f| f.ends_with("current.snapshot")),
                "old value {i} must be in {:?}'s snapshot too",
                dir.path()
            );
        }
    }

    assert_eq!(keys.rotate(), 2);
    assert_eq!(
        leader.reseal_all(&keys).await.unwrap(),
        ResealReport {
            accounts: 1,
            providers: 1
        }
    );
    let upto = leader.metrics().last_log_index.unwrap();
    everyone_applied(upto).await;
    for r in replicas {
        r.flush_to_disk().unwrap();
    }
    // Re-sealing alone changes the state, not the files: the old values are still there.
    for ciphertext in &old {
        assert_eq!(dirs_holding(&dirs, ciphertext), vec![0, 1, 2]);
    }

    for r in replicas {
        let dropped = r.drop_history(upto, Duration::from_secs(30)).await.unwrap();
        assert!(
            dropped.snapshot_index >= upto && dropped.purged_index >= upto,
            "{dropped:?} on node {}",
            r.id()
        );
    }
    for (i, ciphertext) in old.iter().enumerate() {
        assert_eq!(
            dirs_holding(&dirs, ciphertext),
            Vec::<usize>::new(),
            "old value {i} is still on disk after the history was dropped"
        );
    }
    // The state survived in the files: the new values are on every disk and still open.
    let a = leader
        .reader()
        .account("example.com", "alice")
        .unwrap()
        .unwrap();
    let p = leader.reader().provider("trunk-1").unwrap().unwrap();
    for sealed in a.ha1.iter().map(|(_, s)| s).chain([&p.password]) {
        assert_eq!(sealed.key_id, 2);
        assert_eq!(dirs_holding(&dirs, &sealed.ciphertext), vec![0, 1, 2]);
    }
    assert_eq!(trunk_password(&keys, &p), PASSWORD);
    // And the cluster still takes writes after its log was purged.
    assert_eq!(
        leader
            .propose(Command::SetFeatureVersion { version: 7 })
            .await
            .unwrap(),
        CommandResult::Done
    );
    cluster.shutdown().await;
}
