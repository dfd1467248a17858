//! The admin API and the operator commands, against real processes: bearer-token checks,
//! JSON errors for bad input, health, readiness and Prometheus metrics on a standalone
//! node (and metrics behind the token when configured); `tandem cluster
//! status|remove|join`, `tandem keys rotate|reseal` and customers' tokens on a cluster.

use std::time::Duration;

use tandem_failover_tests::cluster::{add_account, http, Cluster, MemberRole};
use tandem_failover_tests::ua::Ua;
use tandem_failover_tests::{describe, Node, Wait};

#[test]
fn the_admin_api_checks_the_token_and_answers_bad_input_with_json_errors() {
    let node = Node::start_ready("");
    let addr = node.admin_addr();
    let token = node.admin_token();
    let call = |token: Option<&str>, method: &str, path: &str, body: Option<&str>| {
        http(addr, token, method, path, body)
            .unwrap_or_else(|| node.panic_with_log(&format!("no answer to {method} {path}")))
    };
    let ok = Some(token.as_str());

    // Probes need no token.
    let health = call(None, "GET", "/health", None);
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["status"], "alive");
    let ready = call(None, "GET", "/ready", None);
    assert_eq!(
        (ready.status, ready.json()["ready"].clone()),
        (200, true.into())
    );

    // Everything under /v1 does.
    let missing = call(None, "GET", "/v1/cluster/status", None);
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    assert!(missing.json()["error"].as_str().unwrap().contains("Bearer"));
    let wrong = call(Some("not-the-token"), "GET", "/v1/cluster/status", None);
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let put = call(None, "PUT", "/v1/customers/c1", Some(r#"{"name":"x"}"#));
    assert_eq!(put.status, 401, "a write without a token was not refused");

    // A standalone node reports itself as a cluster of one.
    let status = call(ok, "GET", "/v1/cluster/status", None).json();
    assert_eq!(status["standalone"], true, "{status}");
    assert_eq!(status["state"], "leader");
    assert_eq!(status["quorum"], "ok");
    assert_eq!(status["members"].as_array().unwrap().len(), 1);

    // Bad input: each answer is JSON naming the problem.
    for (method, path, body, code, needle) in [
        ("PUT", "/v1/customers/c1", "{not json", 400, "invalid JSON"),
        (
            "PUT",
            "/v1/customers/c1",
            r#"{"nam":"x"}"#,
            400,
            "unknown field `nam`",
        ),
        (
            "PUT",
            "/v1/customers/c1",
            r#"{"name":""}"#,
            400,
            "name must be",
        ),
        (
            "PUT",
            "/v1/customers/bad%20id",
            r#"{"name":"x"}"#,
            400,
            "customer id",
        ),
        ("GET", "/v1/customers/nobody", "", 404, "no customer"),
        ("DELETE", "/v1/cluster/members/abc", "", 400, "node id"),
        (
            "POST",
            "/v1/cluster/members",
            r#"{"id":2,"raft_addr":"nowhere"}"#,
            400,
            "host:port",
        ),
        (
            "POST",
            "/v1/cluster/members",
            r#"{"id":2,"raft_addr":"127.0.0.2:7"}"#,
            409,
            "standalone",
        ),
        ("POST", "/v1/cluster/join-tokens", "", 409, "standalone"),
        ("GET", "/v1/nothing-here", "", 404, "no such endpoint"),
        ("POST", "/health", "", 405, "method"),
    ] {
        let body = (!body.is_empty()).then_some(body);
        let a = call(ok, method, path, body);
        let error = a.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            a.status == code && error.contains(needle),
            "{method} {path}: want {code} with {needle:?}, got {} {}",
            a.status,
            a.body
        );
    }

    // A good write, read back, deleted.
    let put = call(
        ok,
        "PUT",
        "/v1/customers/acme",
        Some(r#"{"name":"Acme Ltd"}"#),
    );
    assert_eq!(put.status, 200, "{}", put.body);
    let got = call(ok, "GET", "/v1/customers/acme", None).json();
    assert_eq!(
        (got["name"].as_str(), got["enabled"].as_bool()),
        (Some("Acme Ltd"), Some(true))
    );
    assert_eq!(call(ok, "DELETE", "/v1/customers/acme", None).status, 200);
    assert_eq!(call(ok, "GET", "/v1/customers/acme", None).status, 404);

    // Metrics in Prometheus text format, with the write path's figures.
    let metrics = call(None, "GET", "/metrics", None);
    assert_eq!(metrics.status, 200);
    for name in [
        "tandem_raft_term 1",
        "tandem_raft_is_leader 1",
        "tandem_raft_quorum_ok 1",
        "tandem_raft_applied_index ",
        "tandem_raft_apply_lag 0",
        "tandem_raft_batch_size_bucket{le=\"+Inf\"} ",
        "tandem_log_fsync_seconds_bucket{le=\"0.00025\"} ",
        "tandem_log_fsync_seconds_bucket{le=\"+Inf\"} ",
        "tandem_log_fsync_seconds_count ",
        "tandem_raft_proposals_total ",
    ] {
        assert!(
            metrics.body.contains(name),
            "/metrics lacks {name:?}:\n{}",
            metrics.body
        );
    }
    node.assert_answers_options();
}

#[test]
fn operators_see_status_remove_a_node_for_good_and_rotate_keys() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let one = cluster.member(1);

    let status = one.cli(&["cluster", "status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.status.success(), "{}", describe(&status));
    assert!(text.contains("quorum ok"), "{text}");
    for m in &cluster.members {
        assert!(
            text.contains(&m.raft_addr),
            "status lacks node {}: {text}",
            m.id
        );
    }
    let json = one.cli(&["cluster", "status", "--json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON status");
    let members = value["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(
        members
            .iter()
            .all(|m| m["voter"] == true && m["lag"].is_u64()),
        "{value}"
    );

    // Key rotation: refused until every node has the new key, then everything re-sealed.
    let rotate = one.cli(&["keys", "rotate"]);
    assert!(rotate.status.success(), "{}", describe(&rotate));
    // Until the other nodes have the new key, re-sealing would lock them out: refused.
    let refused = one.cli(&["keys", "reseal"]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        describe(&refused).contains("node 2 does not have key 2"),
        "{}",
        describe(&refused)
    );
    for m in &cluster.members[1..] {
        std::fs::copy(one.dir.join("master.key"), m.dir.join("master.key")).unwrap();
    }
    let resealed = one.cli(&["keys", "reseal"]);
    assert!(resealed.status.success(), "{}", describe(&resealed));
    assert!(
        describe(&resealed).contains("sealed with key 2"),
        "{}",
        describe(&resealed)
    );

    // Remove the leader itself, through another member; it is gone for good.
    let (leader, _) = cluster.wait_for_leader(&[], Duration::from_secs(5));
    let via = cluster.members.iter().find(|m| m.id != leader).unwrap();
    let remove = via.cli(&["cluster", "remove", &leader.to_string()]);
    if !remove.status.success() {
        cluster.panic_with_logs(&format!("removing the leader: {}", describe(&remove)));
    }
    let (new_leader, _) = cluster.wait_for_leader(&[leader], Duration::from_secs(10));
    cluster.wait_for_voters(2, Duration::from_secs(10));
    let removed = cluster.member(leader);
    Wait::new(
        "the removed node to log that it was removed from the cluster",
        Duration::from_secs(10),
    )
    .showing(&cluster)
    .until(|| removed.log().contains("removed from the cluster"));
    assert!(
        removed.log().contains("removed from the cluster"),
        "the removed node was not told"
    );
    let ready = removed.get("/ready").unwrap();
    assert_eq!(ready.status, 503, "a removed node must not report ready");
    assert!(ready.body.contains("not a member"), "{}", ready.body);
    let again = via.cli(&["cluster", "remove", &leader.to_string()]);
    assert!(
        again.status.success(),
        "removing again is harmless: {}",
        describe(&again)
    );

    removed.sigterm();
    removed
        .wait_exit(Duration::from_secs(10))
        .expect("the removed node stops");
    std::fs::remove_dir_all(removed.dir.join("data")).unwrap();
    // Refused: by the leader (the id is never reused) or, once the removal is a few
    // seconds old, at the handshake, where the peer logs why.
    // The operator will not mint a token for the retired id; one for any id does not
    // bring it back either.
    let minted = via.cli(&[
        "cluster",
        "join-token",
        "create",
        "--node-id",
        &leader.to_string(),
    ]);
    assert!(!minted.status.success(), "{}", describe(&minted));
    assert!(
        describe(&minted).contains("never used again"),
        "{}",
        describe(&minted)
    );
    let token = cluster.root().join("rejoin.token");
    let minted = via.cli(&[
        "cluster",
        "join-token",
        "create",
        "--out",
        &token.to_string_lossy(),
    ]);
    assert!(minted.status.success(), "{}", describe(&minted));
    let rejoin = removed.cli(&[
        "cluster",
        "join",
        "--peer",
        &via.raft_addr,
        "--token-file",
        &token.to_string_lossy(),
    ]);
    assert!(!rejoin.status.success(), "{}", describe(&rejoin));
    let revoked = format!("node {leader} was removed from the cluster; its certificate");
    assert!(
        describe(&rejoin).contains("never reused") || via.log().contains(&revoked),
        "node {} does not say why it refused: {}",
        via.id,
        describe(&rejoin)
    );
    assert!(
        !removed.dir.join("data/tandem-identity").exists(),
        "a refused join must not claim the data dir"
    );
    let writes = tandem_failover_tests::cluster::write_customers(
        &[cluster.member(new_leader)],
        "after-remove",
        20,
        2,
    );
    assert_eq!(writes.len(), 20, "the remaining pair takes writes");

    // A join through an address where nothing listens says so.
    let nowhere = removed.cli(&["cluster", "join", "--peer", "127.0.0.3:9"]);
    assert!(!nowhere.status.success());
    assert!(
        describe(&nowhere).contains("127.0.0.3:9"),
        "{}",
        describe(&nowhere)
    );
}

#[test]
fn the_write_check_measures_the_write_path_and_validates_its_input() {
    let node = Node::start_ready("");
    let token = node.admin_token();
    let post = |body: &str| {
        http(
            node.admin_addr(),
            Some(&token),
            "POST",
            "/v1/cluster/write-check",
            Some(body),
        )
        .unwrap_or_else(|| node.panic_with_log("no answer to the write check"))
    };
    let report = post(r#"{"proposers": 4, "seconds": 1}"#);
    assert_eq!(report.status, 200, "{}", report.body);
    let r = report.json();
    assert!(r["writes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["command_bytes"], 300, "{r}");
    assert!(
        r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap(),
        "{r}"
    );
    for (body, needle) in [
        (r#"{"proposers": 0, "seconds": 1}"#, "proposers"),
        (r#"{"proposers": 1, "seconds": 1000}"#, "seconds"),
        (
            r#"{"proposers": 1, "seconds": 1, "command_bytes": 1}"#,
            "command_bytes",
        ),
        (r#"{"proposers": 1}"#, "missing field `seconds`"),
    ] {
        let a = post(body);
        assert!(
            a.status == 400 && a.body.contains(needle),
            "{body}: {} {}",
            a.status,
            a.body
        );
    }
}

/// Stops every member (SIGTERM, so each drains and closes its store), starts them again
/// and waits until the cluster is whole.
fn restart_all(cluster: &Cluster) {
    for m in &cluster.members {
        m.sigterm();
        if m.wait_exit(Duration::from_secs(20)).is_none() {
            cluster.panic_with_logs(&format!("node {} kept running after SIGTERM", m.id));
        }
    }
    for m in &cluster.members {
        m.start();
    }
    for m in &cluster.members {
        m.wait_healthy();
    }
    cluster.wait_for_leader(&[], Duration::from_secs(10));
    cluster.wait_for_voters(3, Duration::from_secs(10));
}

/// Registers every phone (one per account) through every member's SIP address; each
/// REGISTER must get 200.
fn every_account_registers_everywhere(cluster: &Cluster, phones: &mut [Ua], when: &str) {
    for m in &cluster.members {
        for ua in phones.iter_mut() {
            let contact = format!("<{}>", ua.contact());
            let r = ua.register(m.sip_addr(), "MD5", Some(&contact), Some(600));
            if r.status != 200 {
                cluster.panic_with_logs(&format!(
                    "{when}: {} got {} from node {}:\n{}",
                    ua.contact(),
                    r.status,
                    m.id,
                    r.text
                ));
            }
        }
    }
}

/// Key `id` from a key file (`id:hex` lines).
fn master_key(file: &str, id: u32) -> [u8; 32] {
    let hex = file
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{id}:")))
        .unwrap_or_else(|| panic!("no key {id} in:\n{file}"));
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    bytes.try_into().expect("a 32-byte key")
}

/// How many values sealed under key `key_id` for one of `accounts`' HA1s lie anywhere in
/// the files under `dir`. A sealed value is stored as its version (1), key id, 12-byte
/// nonce and length-prefixed AES-256-GCM ciphertext, with the key id, record and field as
/// associated data; each candidate at any offset is counted only if it opens, so the
/// count is of real sealed values, not of look-alike bytes.
fn values_sealed_under(
    dir: &std::path::Path,
    key_id: u32,
    key: &[u8; 32],
    accounts: &[&str],
) -> usize {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    assert!(key_id < 128, "the key id must fit one varint byte");
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let aads: Vec<Vec<u8>> = accounts
        .iter()
        .flat_map(|user| {
            ["MD5", "SHA-256"].map(|alg| {
                let mut ad = key_id.to_be_bytes().to_vec();
                ad.extend_from_slice(format!("account/{user}@example.com").as_bytes());
                ad.push(0);
                ad.extend_from_slice(format!("ha1.{alg}").as_bytes());
                ad
            })
        })
        .collect();
    let mut found = 0;
    for path in files_under(dir) {
        // A file may vanish between listing and reading (RocksDB deletes obsolete ones).
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for i in 0..bytes.len().saturating_sub(15) {
            if bytes[i] != 1 || bytes[i + 1] != key_id as u8 {
                continue;
            }
            let len = bytes[i + 14] as usize;
            let start = i + 15;
            if !(17..128).contains(&len) || start + len > bytes.len() {
                continue;
            }
            let nonce: [u8; 12] = bytes[i + 2..i + 14].try_into().unwrap();
            let opens = aads.iter().any(|ad| {
                let mut buf = bytes[start..start + len].to_vec();
                key.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(ad.as_slice()),
                    &mut buf,
                )
                .is_ok()
            });
            if opens {
                found += 1;
            }
        }
    }
    found
}

#[test]
fn a_rotated_key_reseals_every_account_and_leaves_nothing_under_the_old_key_on_disk() {
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let one = cluster.member(1);
    let token = std::fs::read_to_string(cluster.root().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let accounts = [
        ("alice", "pw-alice-1"),
        ("bob", "pw-bob-1"),
        ("carol", "pw-carol-1"),
    ];
    let users: Vec<&str> = accounts.iter().map(|(u, _)| *u).collect();
    for (user, password) in accounts {
        add_account(one.admin_addr, &token, user, "example.com", password);
    }
    for m in &cluster.members {
        cluster.wait_caught_up(m.id, Duration::from_secs(10));
    }
    let mut phones: Vec<Ua> = accounts
        .iter()
        .map(|(user, password)| Ua::new("127.0.0.1", user, "example.com", password))
        .collect();
    every_account_registers_everywhere(&cluster, &mut phones, "before the rotation");
    let key_1 = master_key(
        &std::fs::read_to_string(one.dir.join("master.key")).unwrap(),
        1,
    );
    // The scan must see the HA1s where they are: in the log (and its WAL) of every node.
    for m in &cluster.members {
        let before = values_sealed_under(&m.dir, 1, &key_1, &users);
        assert!(
            before >= accounts.len(),
            "node {}: only {before} values sealed under key 1 found before the rotation",
            m.id
        );
    }

    let rotate = one.cli(&["keys", "rotate"]);
    assert!(rotate.status.success(), "{}", describe(&rotate));
    for m in &cluster.members[1..] {
        std::fs::copy(one.dir.join("master.key"), m.dir.join("master.key")).unwrap();
    }
    let resealed = one.cli(&["keys", "reseal"]);
    assert!(resealed.status.success(), "{}", describe(&resealed));
    let said = String::from_utf8_lossy(&resealed.stdout);
    for m in &cluster.members {
        assert!(
            said.contains(&format!("Node {}: log purged", m.id)),
            "node {} not reported clean:\n{said}",
            m.id
        );
    }
    let key_2 = master_key(
        &std::fs::read_to_string(one.dir.join("master.key")).unwrap(),
        2,
    );
    for m in &cluster.members {
        let old = values_sealed_under(&m.dir, 1, &key_1, &users);
        let new = values_sealed_under(&m.dir, 2, &key_2, &users);
        if old != 0 || new < accounts.len() {
            cluster.panic_with_logs(&format!(
                "node {}: {old} values sealed under key 1 remain on disk, {new} under key 2",
                m.id
            ));
        }
    }
    for m in &cluster.members {
        cluster.wait_caught_up(m.id, Duration::from_secs(10));
    }
    restart_all(&cluster);
    every_account_registers_everywhere(&cluster, &mut phones, "after the reseal and a restart");

    // Drop the old key from every node's key file. Anything still sealed under it would no
    // longer open, and its account could not authenticate.
    let keys = std::fs::read_to_string(one.dir.join("master.key")).unwrap();
    let newest_only: String = keys
        .lines()
        .filter(|l| !l.starts_with("1:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        newest_only.lines().any(|l| l.starts_with("2:")) && newest_only.len() < keys.len(),
        "unexpected key file:\n{keys}"
    );
    for m in &cluster.members {
        std::fs::write(m.dir.join("master.key"), &newest_only).unwrap();
    }
    restart_all(&cluster);
    every_account_registers_everywhere(&cluster, &mut phones, "with only the new key");
}

/// `admin.metrics_need_token` puts /metrics behind the bearer token (#20): refused without
/// it or with a wrong one (401, a JSON error), served with it; the probes stay open.
#[test]
fn metrics_can_be_put_behind_the_token() {
    let node = Node::start_ready_with(|port| {
        format!(
            "{}[admin]\nlisten = \"127.0.0.1:{}\"\nmetrics_need_token = true\n",
            tandem_failover_tests::sip_config(port, ""),
            tandem_failover_tests::free_port()
        )
    });
    let addr = node.admin_addr();
    let token = node.admin_token();
    for presented in [None, Some("not-the-token")] {
        let refused = http(addr, presented, "GET", "/metrics", None).expect("an answer");
        assert_eq!(refused.status, 401, "{}", refused.body);
        assert!(refused.json()["error"].is_string(), "{}", refused.body);
        assert!(
            !refused.body.contains("tandem_raft_term"),
            "{}",
            refused.body
        );
    }
    let served = http(addr, Some(&token), "GET", "/metrics", None).expect("an answer");
    assert_eq!(served.status, 200, "{}", served.body);
    assert!(
        served.body.contains("tandem_raft_term 1"),
        "{}",
        served.body
    );
    assert!(
        served
            .body
            .contains("tandem_store_memory_bytes{store=\"raft\",kind=\"memtables\"}"),
        "{}",
        served.body
    );
    let health = http(addr, None, "GET", "/health", None).expect("an answer");
    assert_eq!(health.status, 200, "{}", health.body);
}

/// A token file others on the host may read is refused at start with an error naming the
/// key (#20): whoever reads the token owns the cluster. The same file made 0600 is taken.
#[test]
fn a_token_file_others_may_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = |port: u16| {
        format!(
            "{}[admin]\nlisten = \"127.0.0.1:{}\"\ntoken_file = {:?}\n",
            tandem_failover_tests::sip_config(port, ""),
            tandem_failover_tests::free_port(),
            token.display().to_string()
        )
    };
    let node = Node::start(&config(tandem_failover_tests::free_port()));
    let status = node
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| node.panic_with_log("tandem run took a token file others may read"));
    node.check(status.code() == Some(64), || format!("exit {status}"));
    node.check(
        node.log().contains("admin.token_file") && node.log().contains("chmod 600"),
        || "the error does not name admin.token_file and the fix".into(),
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = Node::start_ready_with(config);
    let addr = node.admin_addr();
    let status = http(
        addr,
        Some("0123456789abcdef0123456789abcdef"),
        "GET",
        "/v1/cluster/status",
        None,
    )
    .expect("an answer");
    assert_eq!(status.status, 200, "{}", status.body);
}

/// The admin API over HTTPS (#20). Plain HTTP anywhere but loopback is a config error
/// naming admin.listen. With admin.certificate and private_key (a node certificate from
/// `tandem cert node`) the admin port speaks TLS only: a plain-HTTP request gets no HTTP
/// answer, connections that never start a handshake delay no one, and one that completes
/// its handshake and then sends nothing is closed after 10 s; the CLI reaches
/// the API checking its certificate against the CA, and refuses it when told to trust
/// another CA.
#[test]
fn the_admin_api_speaks_https_and_plain_http_only_on_loopback() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = tandem_failover_tests::tandem_command()
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run tandem");
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
    };
    run(&["cert", "ca", "--out", "ca"]);
    run(&[
        "cert",
        "node",
        "--ca",
        "ca",
        "--name",
        "n1",
        "--id",
        "1",
        "--san",
        "127.0.0.1",
        "--out",
        "certs",
    ]);
    run(&["cert", "ca", "--out", "other-ca"]);
    let path = |p: &str| format!("{:?}", dir.path().join(p).display().to_string());

    let exposed = dir.path().join("exposed.toml");
    std::fs::write(&exposed, "[admin]\nlisten = \"192.0.2.1:8060\"\n").unwrap();
    let check = tandem_failover_tests::tandem_command()
        .arg("check-config")
        .arg(&exposed)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(64), "{}", describe(&check));
    assert!(
        describe(&check).contains("admin.listen"),
        "{}",
        describe(&check)
    );

    let admin_port = tandem_failover_tests::free_port();
    let node = Node::start(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ncertificate = {}\nprivate_key = {}\nca_certificate = {}\n",
        tandem_failover_tests::sip_config(tandem_failover_tests::free_port(), ""),
        path("certs/n1.crt"),
        path("certs/n1.key"),
        path("certs/ca.crt"),
    ));
    let config = node.dir().join("config.toml");
    let status = |config: &std::path::Path| {
        tandem_failover_tests::tandem_command()
            .args(["cluster", "status", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let reached = Wait::new(
        "the CLI to reach the API over HTTPS",
        Duration::from_secs(10),
    )
    .showing(&node)
    .until(|| {
        let out = status(&config);
        if out.status.success() {
            Ok(describe(&out))
        } else {
            Err(describe(&out))
        }
    });
    assert!(reached.contains("quorum ok"), "{reached}");

    // A client that completes its handshake and then says nothing is closed once the
    // deadline for a request's headers (10 s) has passed: anyone can get that far, and
    // idle connections must not keep the listener's places. Watched beside the rest.
    let ca = std::fs::read(dir.path().join("certs/ca.crt")).unwrap();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let silent = std::thread::spawn(move || {
        let tcp = std::net::TcpStream::connect(admin).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut tls = tandem_failover_tests::cluster::https(tcp, admin, &ca).expect("TLS client");
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("handshake");
        }
        let clock = tandem_failover_tests::Deadline::after(Duration::from_secs(30));
        let read = tls.read(&mut [0u8; 1]).map_err(|e| e.kind());
        (read, clock.elapsed())
    });

    // Clients that open a connection and never start their handshake hold up no one:
    // four of them, each held 10 s, would outlast the CLI's 30 s if handshakes ran one
    // after another in the accept loop.
    let stalled: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", admin_port)).unwrap())
        .collect();
    let past_them = status(&config);
    assert!(past_them.status.success(), "{}", describe(&past_them));
    drop(stalled);

    let mut plain = std::net::TcpStream::connect(("127.0.0.1", admin_port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {}",
        String::from_utf8_lossy(&answer)
    );

    let distrusting = node.dir().join("other.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&path("certs/ca.crt"), &path("other-ca/ca.crt"));
    std::fs::write(&distrusting, text).unwrap();
    let refused = status(&distrusting);
    assert!(
        !refused.status.success() && describe(&refused).contains("certificate"),
        "{}",
        describe(&refused)
    );

    let (read, after) = silent.join().unwrap();
    assert!(
        matches!(read, Ok(0) | Err(std::io::ErrorKind::UnexpectedEof))
            && after >= Duration::from_secs(8)
            && after < Duration::from_secs(20),
        "a silent connection read {read:?} after {after:?}: the node should have closed it \
         after 10 s"
    );
}

/// Customers' tokens: the operator makes one with the CLI; it is stored hashed and
/// replicated, reaches only its customer's accounts and what hangs off them on every node,
/// cannot create names in another customer's domain or raise the operator's limits, and
/// stops working everywhere once revoked or once its customer is disabled or deleted.
#[test]
fn customer_tokens_reach_only_their_customer_on_every_node_until_revoked() {
    use tandem_failover_tests::cluster::Member;
    let cluster = Cluster::form(&[MemberRole::Full, MemberRole::Full, MemberRole::Full], "");
    let (one, two, three) = (cluster.member(1), cluster.member(2), cluster.member(3));
    let ask = |m: &Member, token: Option<&str>, method: &str, path: &str, body: Option<&str>| {
        http(m.admin_addr, token, method, path, body).unwrap_or_else(|| {
            cluster.panic_with_logs(&format!("node {} did not answer {method} {path}", m.id))
        })
    };
    let op = |m: &Member, method: &str, path: &str, body: Option<&str>| {
        m.request(method, path, body).unwrap_or_else(|| {
            cluster.panic_with_logs(&format!("node {} did not answer {method} {path}", m.id))
        })
    };
    for (customer, domain, user) in [
        ("acme", "acme.example", "alice"),
        ("globex", "globex.example", "bob"),
    ] {
        let c = op(
            one,
            "PUT",
            &format!("/v1/customers/{customer}"),
            Some(&format!(r#"{{"name":"{customer}"}}"#)),
        );
        assert_eq!(c.status, 200, "{}", c.body);
        let a = op(
            one,
            "PUT",
            &format!("/v1/accounts/{domain}/{user}"),
            Some(&format!(
                r#"{{"password":"pw-{user}-12345","customer":"{customer}"}}"#
            )),
        );
        assert_eq!(a.status, 201, "{}", a.body);
    }

    // The operator makes acme's token with the CLI, into a file only its owner reads.
    let file = cluster.root().join("acme.token");
    let made = one.cli(&[
        "token",
        "create",
        "--customer",
        "acme",
        "--label",
        "portal",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{}", describe(&made));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is mode {mode:o}");
    let acme = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    let acme_id = acme.split('_').nth(1).expect("tc_<id>_<secret>").to_owned();
    let again = one.cli(&[
        "token",
        "create",
        "--customer",
        "acme",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        !again.status.success(),
        "an existing token file was overwritten"
    );
    // And globex's through the API of another node.
    let g = op(two, "POST", "/v1/tokens", Some(r#"{"customer":"globex"}"#));
    assert_eq!(g.status, 201, "{}", g.body);
    let globex = g.json()["token"].as_str().unwrap().to_owned();
    for (body, code, needle) in [
        (r#"{"customer":"nobody"}"#, 409, "no customer"),
        (r#"{"customer":"bad id"}"#, 400, "customer"),
        (r#"{"customer":"acme","label":"a\nb"}"#, 400, "label"),
        (r#"{"customer":"acme","scope":"all"}"#, 400, "unknown field"),
    ] {
        let a = op(one, "POST", "/v1/tokens", Some(body));
        assert!(
            a.status == code && a.body.contains(needle),
            "{body}: want {code} with {needle:?}, got {} {}",
            a.status,
            a.body
        );
    }

    // Replicated: every node knows both tokens, and a customer's list is its own.
    for m in &cluster.members {
        Wait::new(
            format!("node {} to know both tokens", m.id),
            Duration::from_secs(10),
        )
        .showing(m)
        .until(|| ask(m, Some(&globex), "GET", "/v1/accounts", None).status == 200);
        let list = ask(m, Some(&acme), "GET", "/v1/accounts", None);
        assert_eq!(list.status, 200, "{}", list.body);
        let aors: Vec<_> = list
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["aor"].clone())
            .collect();
        assert_eq!(
            aors,
            vec![serde_json::json!("sip:alice@acme.example")],
            "node {}",
            m.id
        );
    }

    // What acme's token reaches, and what it does not, on node 2.
    let script = r#"{"script":"fn route(call) { call.reject(403) }"}"#;
    for (method, path, body, code) in [
        ("GET", "/v1/accounts/acme.example/alice", None, 200),
        ("GET", "/v1/accounts/acme.example/alice/bindings", None, 200),
        ("GET", "/v1/customers/acme", None, 200),
        ("GET", "/v1/customers/acme/settings", None, 200),
        ("GET", "/v1/cdrs", None, 200),
        ("GET", "/v1/providers", None, 200),
        ("GET", "/v1/numbers", None, 200),
        ("GET", "/v1/trunks", None, 200),
        // Another customer's records are not there for it...
        ("GET", "/v1/accounts/globex.example/bob", None, 404),
        ("GET", "/v1/accounts/globex.example/bob/bindings", None, 404),
        ("GET", "/v1/accounts/globex.example/bob/dialplan", None, 404),
        (
            "PUT",
            "/v1/accounts/globex.example/bob/dialplan",
            Some(script),
            404,
        ),
        ("DELETE", "/v1/accounts/globex.example/bob", None, 404),
        ("GET", "/v1/customers/globex", None, 404),
        ("GET", "/v1/customers/globex/settings", None, 403),
        ("GET", "/v1/cdrs?customer=globex", None, 403),
        ("GET", "/v1/providers?customer=globex", None, 403),
        ("GET", "/v1/providers/globex/sip", None, 403),
        ("PUT", "/v1/providers/globex/sip", Some("{}"), 403),
        ("GET", "/v1/numbers?customer=globex", None, 403),
        ("GET", "/v1/trunks/globex/pbx", None, 403),
        // ...nor can it take names in another's domain, give accounts away, or raise
        // what the operator set...
        (
            "PUT",
            "/v1/accounts/globex.example/bob",
            Some(r#"{"password":"taken-over-1"}"#),
            403,
        ),
        (
            "PUT",
            "/v1/accounts/globex.example/mallory",
            Some(r#"{"password":"squatter-123"}"#),
            403,
        ),
        (
            "PUT",
            "/v1/accounts/unclaimed.example/mallory",
            Some(r#"{"password":"squatter-123"}"#),
            403,
        ),
        (
            "PUT",
            "/v1/accounts/acme.example/eve",
            Some(r#"{"password":"gift-12345","customer":"globex"}"#),
            403,
        ),
        // A customer that does not exist answers the same: no oracle for customer ids.
        (
            "PUT",
            "/v1/accounts/acme.example/eve",
            Some(r#"{"password":"gift-12345","customer":"nobody"}"#),
            403,
        ),
        (
            "PUT",
            "/v1/accounts/acme.example/alice",
            Some(r#"{"max_concurrent_calls":1000}"#),
            403,
        ),
        (
            "PUT",
            "/v1/providers/acme/sip",
            Some(
                r#"{"registrar":"sip:127.0.0.1:9","username":"u","password":"p","ca_file":"/etc/shadow"}"#,
            ),
            403,
        ),
        (
            "PUT",
            "/v1/customers/acme/settings",
            Some(r#"{"max_calls":0}"#),
            403,
        ),
        (
            "PUT",
            "/v1/numbers/4930111",
            Some(r#"{"customer":"acme","account":"alice@acme.example"}"#),
            403,
        ),
        // ...nor touch the cluster, other customers or tokens.
        ("GET", "/v1/customers", None, 403),
        (
            "PUT",
            "/v1/customers/acme",
            Some(r#"{"name":"mine now"}"#),
            403,
        ),
        ("DELETE", "/v1/customers/globex", None, 403),
        ("GET", "/v1/cluster/status", None, 403),
        ("DELETE", "/v1/cluster/members/3", None, 403),
        (
            "POST",
            "/v1/cluster/members",
            Some(r#"{"id":9,"raft_addr":"127.0.0.1:1"}"#),
            403,
        ),
        ("POST", "/v1/keys/reseal", None, 403),
        ("POST", "/v1/node/drain", None, 403),
        ("POST", "/v1/tokens", Some(r#"{"customer":"acme"}"#), 403),
        ("GET", "/v1/tokens", None, 403),
        (
            "POST",
            "/v1/callback",
            Some(
                r#"{"account":"alice@acme.example","a":"alice@acme.example","b":"bob@globex.example"}"#,
            ),
            403,
        ),
    ] {
        let a = ask(two, Some(&acme), method, path, body);
        assert_eq!(
            a.status, code,
            "{method} {path} with acme's token: {}",
            a.body
        );
        if code >= 400 {
            assert!(a.json()["error"].is_string(), "{method} {path}: {}", a.body);
        }
    }
    let bob = op(one, "GET", "/v1/accounts/globex.example/bob", None).json();
    assert_eq!(bob["customer"], "globex", "{bob}");
    assert_eq!(
        op(one, "GET", "/v1/customers/acme", None).json()["name"],
        "acme"
    );

    // What it may change: its accounts' passwords, and new accounts in its own domain,
    // which then register over SIP at another node.
    let carol = ask(
        two,
        Some(&acme),
        "PUT",
        "/v1/accounts/acme.example/carol",
        Some(r#"{"password":"carols-pw-123"}"#),
    );
    assert_eq!(carol.status, 201, "{}", carol.body);
    assert_eq!(carol.json()["customer"], "acme");
    let changed = ask(
        two,
        Some(&acme),
        "PUT",
        "/v1/accounts/acme.example/alice",
        Some(r#"{"password":"alices-new-pw-1"}"#),
    );
    assert_eq!(changed.status, 200, "{}", changed.body);
    let mut phone = Ua::new("127.0.0.1", "carol", "acme.example", "carols-pw-123");
    let registered = Wait::new("carol to register through node 3", Duration::from_secs(10))
        .showing(three)
        .until(|| {
            let r = phone.register(
                three.sip_addr(),
                "MD5",
                Some("<sip:carol@127.0.0.1:5077>"),
                Some(300),
            );
            (r.status == 200).then_some(r)
        });
    assert_eq!(registered.status, 200);

    // Forged tokens: a wrong secret, another token's id with this secret, a truncated one.
    let secret = acme.rsplit('_').next().unwrap();
    let globex_id = globex.split('_').nth(1).unwrap();
    let flipped = format!(
        "{}{}",
        &acme[..acme.len() - 1],
        if acme.ends_with('0') { '1' } else { '0' }
    );
    for forged in [
        flipped,
        format!("tc_{globex_id}_{secret}"),
        acme[..acme.len() - 2].to_owned(),
        format!("tc_{acme_id}_"),
    ] {
        let a = ask(two, Some(&forged), "GET", "/v1/accounts", None);
        assert_eq!(a.status, 401, "{forged}: {}", a.body);
    }

    // Stored hashed: neither the API nor any file of any node holds a token.
    let listed = op(one, "GET", "/v1/tokens", None);
    assert_eq!(
        listed.json().as_array().unwrap().len(),
        2,
        "{}",
        listed.body
    );
    assert!(
        !listed.body.contains(secret) && listed.body.contains(&acme_id),
        "{}",
        listed.body
    );
    for m in &cluster.members {
        for path in files_under(&m.dir) {
            let bytes = std::fs::read(&path).unwrap_or_default();
            for token in [&acme, &globex] {
                let secret = token.rsplit('_').next().unwrap().as_bytes();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret),
                    "{} holds a token's secret",
                    path.display()
                );
            }
        }
    }

    // Revoked through node 3's CLI: refused on every node.
    let revoke = three.cli(&["token", "revoke", &acme_id]);
    assert!(revoke.status.success(), "{}", describe(&revoke));
    for m in &cluster.members {
        Wait::new(
            format!("node {} to refuse the revoked token", m.id),
            Duration::from_secs(10),
        )
        .showing(m)
        .until(|| ask(m, Some(&acme), "GET", "/v1/accounts", None).status == 401);
    }
    let list = one.cli(&["token", "list"]);
    assert!(
        list.status.success() && !describe(&list).contains(&acme_id),
        "{}",
        describe(&list)
    );
    let unknown = three.cli(&["token", "revoke", &acme_id]);
    assert!(!unknown.status.success(), "{}", describe(&unknown));
    for (id, code) in [
        ("not-a-token-id", 400),
        ("../../cluster/members/1", 404),
        ("0000000000000000", 404),
    ] {
        let a = op(one, "DELETE", &format!("/v1/tokens/{id}"), None);
        assert_eq!(a.status, code, "DELETE /v1/tokens/{id}: {}", a.body);
    }

    // A disabled customer's token is refused; a deleted customer's tokens are gone.
    let off = op(
        one,
        "PUT",
        "/v1/customers/globex",
        Some(r#"{"name":"globex","enabled":false}"#),
    );
    assert_eq!(off.status, 200, "{}", off.body);
    for m in &cluster.members {
        Wait::new(
            format!("node {} to refuse a disabled customer's token", m.id),
            Duration::from_secs(10),
        )
        .showing(m)
        .until(|| ask(m, Some(&globex), "GET", "/v1/accounts", None).status == 403);
    }
    // A customer with an account left is not deleted: nothing of its may be left
    // without it.
    let refused = op(one, "DELETE", "/v1/customers/globex", None);
    assert!(
        refused.status == 409
            && refused.json()["error"]
                .as_str()
                .unwrap_or("")
                .contains("1 account"),
        "{} {}",
        refused.status,
        refused.body
    );
    assert_eq!(op(one, "GET", "/v1/customers/globex", None).status, 200);
    let bob = op(one, "DELETE", "/v1/accounts/globex.example/bob", None);
    assert_eq!(bob.status, 200, "{}", bob.body);
    assert_eq!(op(one, "DELETE", "/v1/customers/globex", None).status, 200);
    let left = op(one, "GET", "/v1/tokens", None);
    assert_eq!(left.json(), serde_json::json!([]), "{}", left.body);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
