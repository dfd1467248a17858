//! The registration agent against a real provider: a standalone `tandem` node plays the
//! provider's registrar (digest auth, a binding per contact, an admin API to read them).
//! A three-node cluster keeps 20 provider accounts registered, each from its lease owner
//! only; the SIGKILL of an owner moves its accounts to the others within the lease time
//! plus 5 s; a wrong password ends in "auth failed" and backs off.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use tandem_failover_tests::cluster::{
    self, add_account, http, metric, Answer, Cluster, MemberRole,
};
use tandem_failover_tests::dns::DnsServer;
use tandem_failover_tests::kamailio::{Kamailio, RegisterLog};
use tandem_failover_tests::netns::{member_of, Lab, CLIENT_IP};
use tandem_failover_tests::ua::Ua;
use tandem_failover_tests::{sip_config, Deadline, Node, Wait};

const FULL3: [MemberRole; 3] = [MemberRole::Full, MemberRole::Full, MemberRole::Full];
const LEASE_SECS: u64 = 8;

/// Short leases and retries, so a test sees takeovers and backoff in seconds.
fn agent_config() -> String {
    format!(
        "\n[registration_agent]\nlease_secs = {LEASE_SECS}\nrenew_secs = 2\nclock_skew_secs = 1\n\
         start_spread_secs = 1\nretry_min_secs = 1\nretry_max_secs = 4\n\
         auth_retry_min_secs = 2\nauth_retry_max_secs = 8\n"
    )
}

/// The provider: a standalone node whose accounts live in `provider.test`.
struct Provider {
    node: Node,
    token: String,
}

impl Provider {
    fn start() -> Provider {
        let node = Node::start_ready("");
        let token = node.admin_token();
        Provider { node, token }
    }

    fn add(&self, user: &str, password: &str) {
        add_account(
            self.node.admin_addr(),
            &self.token,
            user,
            "provider.test",
            password,
        );
    }

    /// The live contacts of `user@provider.test`.
    fn contacts(&self, user: &str) -> Vec<String> {
        let a = http(
            self.node.admin_addr(),
            Some(&self.token),
            "GET",
            &format!("/v1/accounts/provider.test/{user}/bindings"),
            None,
        )
        .expect("the provider's admin API answers");
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["contact"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// The node a contact URI names: its host is 127.0.0.<id>, or the node's address in a
/// network lab.
fn node_of(contact: &str) -> Option<u64> {
    let at = contact.find('@')? + 1;
    let host: String = contact[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    match host.strip_prefix("127.0.0.") {
        Some(id) => id.parse().ok(),
        None => member_of(&host),
    }
}

/// A standalone node (a cluster of one) running the agent with `extra` `[sip]` keys,
/// ready for provider accounts: feature version 1 reached, customer `c1` created.
struct AgentNode {
    node: Node,
    token: String,
}

impl AgentNode {
    fn start(extra: &str) -> AgentNode {
        AgentNode::start_reaching(extra, None)
    }

    /// With `registration_agent.private_networks` set to `networks` (else the harness's
    /// loopback and lab networks).
    fn start_reaching(extra: &str, networks: Option<&str>) -> AgentNode {
        let reach = networks.map_or(String::new(), |n| format!("private_networks = {n}\n"));
        let node = Node::start_ready_with(|port| {
            sip_config(port, &format!("{extra}\n{}{reach}", agent_config()))
        });
        let token = node.admin_token();
        let n = AgentNode { node, token };
        Wait::new(
            "the node's feature version to reach 1",
            Duration::from_secs(15),
        )
        .showing(&n.node)
        .until(|| {
            n.api("GET", "/v1/cluster/status", None).json()["feature_version"].as_u64() >= Some(1)
        });
        let c = n.api("PUT", "/v1/customers/c1", Some(r#"{"name":"C1"}"#));
        assert_eq!(c.status, 200, "{}", c.body);
        n
    }

    fn api(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        http(
            self.node.admin_addr(),
            Some(&self.token),
            method,
            path,
            body,
        )
        .expect("admin API answers")
    }
}

/// Forms a cluster and waits until it takes provider accounts (feature version 1, raised
/// by the leader within a second or so of forming).
fn form(roles: &[MemberRole]) -> Cluster {
    ready(Cluster::form(roles, &agent_config()))
}

/// Waits until a newly formed cluster takes provider accounts, and creates customer c1.
fn ready(cluster: Cluster) -> Cluster {
    Wait::new(
        "the cluster's feature version to reach 1",
        Duration::from_secs(15),
    )
    .showing(&cluster)
    .until(|| {
        cluster
            .member(1)
            .status()
            .is_some_and(|s| s["feature_version"].as_u64() >= Some(1))
    });
    assert_eq!(cluster.member(1).put_customer("c1"), Some(200));
    // Every node's admin API checks the customer in its own replica.
    Wait::new("every node to have customer c1", Duration::from_secs(10))
        .showing(&cluster)
        .until(|| {
            cluster.members.iter().all(|m| {
                m.customer_ids()
                    .is_some_and(|ids| ids.iter().any(|c| c == "c1"))
            })
        });
    cluster
}

fn put_provider(cluster: &Cluster, via: u64, name: &str, body: &str) -> (u16, Value) {
    let a = cluster
        .member(via)
        .request("PUT", &format!("/v1/providers/c1/{name}"), Some(body))
        .expect("admin API answers");
    let json = serde_json::from_str(&a.body).unwrap_or(Value::Null);
    (a.status, json)
}

fn provider_body(user: &str, password: &str, proxy: SocketAddr) -> String {
    format!(
        r#"{{"registrar":"provider.test","outbound_proxy":"{proxy}","transport":"udp",
            "username":"{user}","password":"{password}","expires_secs":60}}"#
    )
}

fn status(cluster: &Cluster, via: u64, name: &str) -> Value {
    cluster
        .member(via)
        .get(&format!("/v1/providers/c1/{name}/status"))
        .expect("admin API answers")
        .json()
}

#[test]
fn every_account_is_registered_once_by_its_owner_and_moves_when_the_owner_dies() {
    let provider = Provider::start();
    for i in 0..20 {
        provider.add(&format!("u{i}"), &format!("pw{i}"));
    }
    let cluster = form(&FULL3);
    for i in 0..20 {
        let body = provider_body(
            &format!("u{i}"),
            &format!("pw{i}"),
            provider.node.udp_addr(),
        );
        let (code, json) = put_provider(&cluster, 1 + i % 3, &format!("p{i}"), &body);
        assert_eq!(code, 201, "{json}");
        assert!(
            !json.to_string().contains(&format!("pw{i}")),
            "the password came back: {json}"
        );
    }

    // Every account ends up with exactly one contact at the provider, from the node
    // that holds its lease, and every node holds some. A node whose agent started after
    // the first assignment gets its share when the leader rebalances, so the wait
    // covers that too.
    let owners: BTreeMap<usize, u64> = Wait::new(
        "every provider account to be registered once, by its owner, on every node",
        Duration::from_secs(40),
    )
    .showing(&cluster)
    .until(|| {
        let mut owners = BTreeMap::new();
        for i in 0..20 {
            let contacts = provider.contacts(&format!("u{i}"));
            let s = status(&cluster, 1 + (i as u64 % 3), &format!("p{i}"));
            match (&contacts[..], s["owner"].as_u64()) {
                ([one], Some(owner))
                    if node_of(one) == Some(owner) && s["state"] == "registered" =>
                {
                    owners.insert(i, owner);
                }
                _ => return None,
            }
        }
        let nodes: std::collections::BTreeSet<u64> = owners.values().copied().collect();
        (nodes.len() == 3).then_some(owners)
    });
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for o in owners.values() {
        *per_node.entry(*o).or_default() += 1;
    }
    eprintln!("leases per node: {per_node:?}");
    assert_eq!(per_node.len(), 3, "every node owns some: {per_node:?}");
    for (node, n) in &per_node {
        assert!(
            (6..=8).contains(n),
            "node {node} owns {n} of 20 (±20% of 6.7): {per_node:?}"
        );
    }

    // SIGKILL the owner of the most accounts. Each of them is registered from a live node
    // within the lease time plus 5 s, and a live node never registers one twice.
    let (&victim, _) = per_node.iter().max_by_key(|(_, n)| **n).unwrap();
    let moved: BTreeSet<usize> = owners
        .iter()
        .filter(|(_, o)| **o == victim)
        .map(|(i, _)| *i)
        .collect();
    let survivor = [1, 2, 3].into_iter().find(|n| *n != victim).unwrap();
    let killed_at = Deadline::after(Duration::ZERO);
    cluster.member(victim).sigkill();
    let mut taken: BTreeMap<usize, Duration> = BTreeMap::new();
    Wait::new(
        "the killed owner's accounts to be registered from the other nodes",
        Duration::from_secs(LEASE_SECS + 20),
    )
    .every(Duration::from_millis(200))
    .showing(&cluster)
    .until(|| {
        for i in &moved {
            if taken.contains_key(i) {
                continue;
            }
            let live: Vec<u64> = provider
                .contacts(&format!("u{i}"))
                .iter()
                .filter_map(|c| node_of(c))
                .filter(|n| *n != victim)
                .collect();
            assert!(live.len() <= 1, "two live nodes registered u{i}: {live:?}");
            if live.len() == 1 {
                taken.insert(*i, killed_at.elapsed());
            }
        }
        taken.len() == moved.len()
    });
    let slowest = taken.values().max().copied().unwrap_or_default();
    eprintln!(
        "node {victim} killed: its {} accounts were registered elsewhere after {:?} to {slowest:?}",
        moved.len(),
        taken.values().min().copied().unwrap_or_default()
    );
    assert!(
        slowest <= Duration::from_secs(LEASE_SECS + 5),
        "takeover took {slowest:?}, more than the lease ({LEASE_SECS} s) plus 5 s"
    );
    for i in 0..20 {
        let s = status(&cluster, survivor, &format!("p{i}"));
        assert_ne!(s["owner"].as_u64(), Some(victim), "p{i}: {s}");
    }
}

#[test]
fn a_wrong_password_ends_in_auth_failed_and_backs_off_without_disabling_the_account() {
    let provider = Provider::start();
    provider.add("u1", "right");
    let cluster = form(&FULL3[..1]);
    let body = provider_body("u1", "wrong", provider.node.udp_addr());
    assert_eq!(put_provider(&cluster, 1, "p1", &body).0, 201);
    let failed = Wait::new(
        "the account to be reported auth failed",
        Duration::from_secs(20),
    )
    .showing(&cluster)
    .until(|| {
        let s = status(&cluster, 1, "p1");
        (s["state"] == "auth failed").then_some(s)
    });
    assert!(
        failed["registration"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("auth failed")),
        "{failed}"
    );
    // Over 30 s, with waits of 2 s doubling to 8 s (each scaled by 0.5 to 1), an attempt
    // (a REGISTER and the answer to its challenge) starts at most 10 times.
    let before = failed["registration"]["registers_sent"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(30));
    let s = status(&cluster, 1, "p1");
    let sent = s["registration"]["registers_sent"].as_u64().unwrap() - before;
    eprintln!("REGISTERs sent in 30 s with a wrong password: {sent}");
    assert!(sent <= 20, "{sent} REGISTERs in 30 s: no backoff ({s})");
    assert!(sent >= 4, "the account stopped being retried ({s})");
    assert_eq!(s["enabled"], true);
    assert!(provider.contacts("u1").is_empty());

    // The right password: registered at the next attempt, without operator action
    // beyond the fix.
    let fixed = r#"{"password":"right"}"#;
    assert_eq!(put_provider(&cluster, 1, "p1", fixed).0, 200);
    Wait::new(
        "the account to register with the right password",
        Duration::from_secs(20),
    )
    .showing(&cluster)
    .until(|| provider.contacts("u1").len() == 1);
}

/// A call from the provider's network to the number of a provider account rings the local
/// account the provider account names, through the owner and then the node the phone
/// registered through, and the dialog's BYE goes back the same way.
#[test]
fn a_call_from_the_provider_rings_the_local_account_named_for_inbound_calls() {
    let provider = Provider::start();
    provider.add("u0", "pw0");
    provider.add("carol", "pw-carol");
    let cluster = form(&FULL3);
    let token = std::fs::read_to_string(cluster.root().join("admin.token")).unwrap();
    let token = token.trim();
    let a = http(
        cluster.member(1).admin_addr,
        Some(token),
        "PUT",
        "/v1/accounts/example.com/alice",
        Some(r#"{"password":"pw-alice","customer":"c1"}"#),
    )
    .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    let body = provider_body("u0", "pw0", provider.node.udp_addr())
        .replace('}', r#","inbound":{"account":"alice@example.com"}}"#);
    // Through the node that wrote the account: another node's replica may not have
    // applied it yet, and the API checks the account exists in its own.
    let (code, json) = put_provider(&cluster, 1, "p0", &body);
    assert_eq!(code, 201, "{json}");
    // An inbound account of another customer, or none at all, is refused.
    let (code, json) = put_provider(
        &cluster,
        2,
        "p1",
        &provider_body("u1", "pw1", provider.node.udp_addr())
            .replace('}', r#","inbound":{"account":"nobody@example.com"}}"#),
    );
    assert_eq!(code, 409, "{json}");

    let mut alice = Ua::new("127.0.0.1", "alice", "example.com", "pw-alice");
    let edge = cluster.member(3).sip_addr();
    let contact = alice.contact();
    let r = alice.register(edge, "MD5", Some(&format!("<{contact}>")), Some(600));
    assert_eq!(r.status, 200, "{}", r.text);
    let owner = Wait::new("p0 to be registered", Duration::from_secs(30))
        .showing(&cluster)
        .until(|| match &provider.contacts("u0")[..] {
            [one] => node_of(one),
            _ => None,
        });
    eprintln!("p0 registered by node {owner}; alice registered through node 3");
    // The owner sends the call through alice's edge node only once that node answers its
    // SIP pings (a node never heard from counts as down), which can take a second or two
    // after the cluster forms.
    if owner != 3 {
        let series = "tandem_sip_peer_up{node=\"3\"}";
        cluster::wait_metric(
            &cluster,
            cluster.member(owner).admin_addr,
            series,
            1.0,
            Duration::from_secs(10),
        );
    }

    let mut carol = Ua::new("127.0.0.1", "carol", "provider.test", "pw-carol");
    std::thread::scope(|s| {
        let alice = &alice;
        let phone = s.spawn(move || {
            let invite = alice.expect_request("INVITE", Duration::from_secs(20));
            assert_eq!(
                invite.from, edge,
                "not through alice's edge node:\n{}",
                invite.text
            );
            assert_eq!(
                invite.request_uri(),
                Some(contact.as_str()),
                "{}",
                invite.text
            );
            assert!(
                invite.text.contains("carol@provider.test"),
                "{}",
                invite.text
            );
            alice.respond(&invite, 180, "Ringing", "");
            alice.respond(&invite, 200, "OK", &format!("Contact: <{contact}>\r\n"));
            let bye = alice.expect_request("BYE", Duration::from_secs(20));
            alice.respond(&bye, 200, "OK", "");
        });
        let ok = carol.invite(
            provider.node.udp_addr(),
            "sip:u0@provider.test",
            "inbound-1",
            &mut |_, _| {},
        );
        assert_eq!(ok.status(), Some(200), "{}", ok.text);
        let dialog = carol.dialog(&ok);
        carol.send_in_dialog(&dialog, "ACK", dialog.cseq);
        carol.send_in_dialog(&dialog, "BYE", dialog.cseq + 1);
        let bye_ok = carol.expect_response("BYE", Duration::from_secs(20));
        assert_eq!(bye_ok.status(), Some(200), "{}", bye_ok.text);
        phone.join().unwrap();
    });

    // A request to the contact's address that names no registered account (a forged
    // `pa`, or none: the user part alone is often a public number a scanner can guess)
    // reaches nobody: it is not for any domain served here.
    let owner_addr = cluster.member(owner).sip_addr();
    for (n, target) in [
        format!("sip:u0@{owner_addr};pa=000000000000"),
        format!("sip:u0@{owner_addr}"),
    ]
    .iter()
    .enumerate()
    {
        let mut stranger = Ua::new("127.0.0.1", "x", "elsewhere.test", "x");
        let refused = stranger.invite(owner_addr, target, &format!("inbound-x{n}"), &mut |_, _| {});
        assert_eq!(refused.status(), Some(403), "{target}: {}", refused.text);
    }
}

/// RFC 3263 through a real resolver and a DNS server the test controls: while the
/// provider's name does not resolve, attempts back off and the account stays enabled;
/// once SRV records appear it registers with the first of them; when that registrar stops
/// answering, a refresh fails over to the second.
#[test]
fn dns_failures_back_off_and_srv_failover_reaches_the_second_registrar() {
    let dns = DnsServer::start();
    // Two registrars for provider.test, each granting at most 10 s, so refreshes come
    // every 6 to 8 s.
    let short = "\n[registrar]\nmin_expires = 5\nmax_expires = 10\ndefault_expires = 10\n";
    let first = Node::start_ready(short);
    let second = Node::start_ready(short);
    for p in [&first, &second] {
        add_account(
            p.admin_addr(),
            &p.admin_token(),
            "u0",
            "provider.test",
            "pw0",
        );
    }
    // The agent's node: a standalone node (a cluster of one) resolving through `dns`, with
    // T1 at 100 ms so that an unanswered REGISTER times out after 6.4 s.
    let dns_addr = dns.addr();
    let agent = AgentNode::start(&format!("dns_servers = [\"{dns_addr}\"]\nt1_ms = 100"));
    let (node, admin) = (&agent.node, agent.node.admin_addr());
    let api = |method: &str, path: &str, body: Option<&str>| agent.api(method, path, body);
    let body =
        r#"{"registrar":"provider.test","username":"u0","password":"pw0","expires_secs":60}"#;
    let put = api("PUT", "/v1/providers/c1/p0", Some(body));
    assert_eq!(put.status, 201, "{}", put.body);
    let status = || api("GET", "/v1/providers/c1/p0/status", None).json();

    // 1. The name does not resolve: DNS failures, retried with backoff, never disabled.
    let failing = Wait::new("a DNS failure to be reported", Duration::from_secs(20))
        .showing(node)
        .until(|| {
            let s = status();
            s["registration"]["last_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("dns failure"))
                .then_some(s)
        });
    assert_eq!(failing["state"], "failing", "{failing}");
    std::thread::sleep(Duration::from_secs(12));
    let failures = metric(admin, "tandem_provider_dns_failures_total").unwrap_or(0.0);
    // Waits of 1 s doubling to 4 s (each scaled by 0.5 to 1): at most 9 attempts in 14 s.
    assert!(
        (2.0..=9.0).contains(&failures),
        "{failures} DNS failures in about 14 s"
    );
    assert_eq!(status()["enabled"], true);

    // 2. SRV records appear: the first registrar by priority gets the registration.
    dns.add_srv(
        "_sip._udp.provider.test",
        10,
        10,
        first.udp_addr().port(),
        "one.provider.test",
    );
    dns.add_srv(
        "_sip._udp.provider.test",
        20,
        10,
        second.udp_addr().port(),
        "two.provider.test",
    );
    dns.add_a("one.provider.test", Ipv4Addr::LOCALHOST);
    dns.add_a("two.provider.test", Ipv4Addr::LOCALHOST);
    let contacts = |p: &Node, user: &str| -> usize {
        let a = http(
            p.admin_addr(),
            Some(&p.admin_token()),
            "GET",
            &format!("/v1/accounts/provider.test/{user}/bindings"),
            None,
        )
        .unwrap();
        a.json().as_array().map_or(0, Vec::len)
    };
    Wait::new(
        "registration with the first SRV target",
        Duration::from_secs(20),
    )
    .showing(node)
    .until(|| contacts(&first, "u0") == 1);
    assert_eq!(contacts(&second, "u0"), 0);

    // 3. The first registrar stops answering: the next refresh times out and fails over.
    first.sigkill();
    Wait::new(
        "registration with the second SRV target",
        Duration::from_secs(30),
    )
    .showing(node)
    .until(|| contacts(&second, "u0") == 1);
    let s = status();
    assert_eq!(s["state"], "registered", "{s}");
    assert!(
        s["registration"]["target"]
            .as_str()
            .is_some_and(|t| t.ends_with(&second.udp_addr().port().to_string())),
        "{s}"
    );
}

/// A provider account names hosts of the customer's choosing, so a customer's token must
/// not make the nodes send SIP into their own network: a registrar whose name resolves to
/// loopback, and an outbound proxy given as a loopback address, get no REGISTER; the
/// account is "rejected" with a reason naming `registration_agent.private_networks` and
/// backs off as after a refusal. The same accounts register once the operator lists the network.
#[test]
fn a_customers_provider_inside_the_network_gets_no_register_unless_the_operator_lists_it() {
    let dns = DnsServer::start();
    // The provider's domain, resolving to loopback: public-looking names are judged by
    // the addresses they resolve to.
    dns.add_a("provider.test", Ipv4Addr::LOCALHOST);
    let provider = Provider::start();
    provider.add("u0", "pw0");
    let port = provider.node.udp_addr().port();
    let bodies = [
        (
            "by-name",
            format!(
                r#"{{"registrar":"provider.test:{port}","transport":"udp",
                    "username":"u0","password":"pw0","expires_secs":60}}"#
            ),
        ),
        (
            "by-proxy",
            format!(
                r#"{{"registrar":"provider.test","outbound_proxy":"127.0.0.1:{port}",
                    "transport":"udp","username":"u0","password":"pw0","expires_secs":60}}"#
            ),
        ),
    ];
    let dns_servers = format!("dns_servers = [\"{}\"]", dns.addr());
    let agent = AgentNode::start_reaching(&dns_servers, Some("[]"));
    let admin = agent.node.admin_addr();
    // The customer's own token puts the accounts, as a fraudster holding one would.
    let minted = agent.api("POST", "/v1/tokens", Some(r#"{"customer":"c1"}"#));
    assert_eq!(minted.status, 201, "{}", minted.body);
    let customer = minted.json()["token"].as_str().unwrap().to_owned();
    for (name, body) in &bodies {
        let put = http(
            admin,
            Some(&customer),
            "PUT",
            &format!("/v1/providers/c1/{name}"),
            Some(body),
        )
        .unwrap();
        assert_eq!(put.status, 201, "{}", put.body);
    }
    for (name, _) in &bodies {
        let failing = Wait::new(
            format!("{name} to be rejected for its private address"),
            Duration::from_secs(20),
        )
        .showing(&agent.node)
        .until(|| {
            let s = agent
                .api("GET", &format!("/v1/providers/c1/{name}/status"), None)
                .json();
            (s["state"] == "rejected").then_some(s)
        });
        let error = failing["registration"]["last_error"].as_str().unwrap_or("");
        assert!(
            error.contains("not a public address")
                && error.contains("registration_agent.private_networks"),
            "{failing}"
        );
        assert_eq!(failing["enabled"], true, "{failing}");
    }
    assert_eq!(
        metric(admin, "tandem_provider_registers_sent_total"),
        Some(0.0),
        "a REGISTER went to a private address"
    );
    assert!(metric(admin, "tandem_provider_refused_targets_total") >= Some(2.0));
    // Backing off as after a refusal (2 s doubling here), not retrying at once.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        metric(admin, "tandem_provider_refused_targets_total") <= Some(8.0),
        "refused attempts were retried without backing off"
    );
    assert!(provider.contacts("u0").is_empty());

    // Listed by the operator, the same accounts register.
    let listed = AgentNode::start_reaching(&dns_servers, Some(r#"["127.0.0.0/8"]"#));
    for (name, body) in &bodies {
        let put = listed.api("PUT", &format!("/v1/providers/c1/{name}"), Some(body));
        assert_eq!(put.status, 201, "{}", put.body);
    }
    Wait::new("both accounts to register", Duration::from_secs(20))
        .showing(&listed.node)
        .until(|| {
            bodies.iter().all(|(name, _)| {
                listed
                    .api("GET", &format!("/v1/providers/c1/{name}/status"), None)
                    .json()["state"]
                    == "registered"
            })
        });
}

/// Each provider account makes the nodes send REGISTERs to a host the customer chose, so
/// a customer's own token creates at most `admin.customer_provider_accounts` (20 by
/// default) for its customer; changing one it has still works at the cap, and the
/// operator's token may create more.
#[test]
fn a_customers_token_creates_provider_accounts_only_up_to_its_cap() {
    // No private network listed: the accounts (at a loopback address) send nothing.
    let agent = AgentNode::start_reaching("", Some("[]"));
    let admin = agent.node.admin_addr();
    let minted = agent.api("POST", "/v1/tokens", Some(r#"{"customer":"c1"}"#));
    assert_eq!(minted.status, 201, "{}", minted.body);
    let customer = minted.json()["token"].as_str().unwrap().to_owned();
    let body = r#"{"registrar":"127.0.0.1:9","username":"u","password":"pw","expires_secs":60}"#;
    let put = |token: &str, name: &str| {
        http(
            admin,
            Some(token),
            "PUT",
            &format!("/v1/providers/c1/{name}"),
            Some(body),
        )
        .unwrap()
    };
    for i in 0..20 {
        let a = put(&customer, &format!("p{i}"));
        assert_eq!(a.status, 201, "p{i}: {}", a.body);
    }
    let over = put(&customer, "p20");
    assert!(
        over.status == 403
            && over.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("admin.customer_provider_accounts")),
        "{} {}",
        over.status,
        over.body
    );
    assert_eq!(put(&customer, "p0").status, 200, "a change at the cap");
    assert_eq!(put(&agent.token, "p20").status, 201, "the operator's");
    let list = agent.api("GET", "/v1/providers?customer=c1", None).json();
    assert_eq!(list.as_array().map(Vec::len), Some(21), "{list}");
}

/// With Kamailio as the provider, each account has one contact, its owner's; after the
/// owner's SIGKILL the new owner's REGISTER (same +sip.instance and reg-id) replaces the
/// dead owner's contact within the lease time plus 5 s.
#[test]
fn kamailio_as_the_provider_sees_each_account_registered_once_by_its_owner() {
    let kamailio = Kamailio::start();
    let cluster = form(&FULL3);
    for i in 0..6 {
        let body = format!(
            r#"{{"registrar":"kamailio.test","outbound_proxy":"{}","transport":"udp",
                "username":"k{i}","password":"pw-k{i}","expires_secs":60}}"#,
            kamailio.addr
        );
        let (code, json) = put_provider(&cluster, 1, &format!("k{i}"), &body);
        assert_eq!(code, 201, "{json}");
    }
    let owners: Vec<u64> = Wait::new(
        "every account registered at Kamailio once, by its owner",
        Duration::from_secs(40),
    )
    .showing(&cluster)
    .until(|| {
        (0..6)
            .map(|i| {
                let s = status(&cluster, 1, &format!("k{i}"));
                match (
                    &kamailio.contacts(&format!("k{i}"))[..],
                    s["owner"].as_u64(),
                ) {
                    ([one], Some(owner)) if node_of(one) == Some(owner) => Some(owner),
                    _ => None,
                }
            })
            .collect::<Option<Vec<u64>>>()
    });
    eprintln!("owners at Kamailio: {owners:?}");
    let victim = owners[0];
    let killed_at = Deadline::after(Duration::ZERO);
    cluster.member(victim).sigkill();
    let contacts = Wait::new(
        "k0 to be registered from a live node",
        Duration::from_secs(LEASE_SECS + 20),
    )
    .every(Duration::from_millis(250))
    .showing(&cluster)
    .until(|| {
        let c = kamailio.contacts("k0");
        c.iter()
            .any(|c| node_of(c).is_some_and(|n| n != victim))
            .then_some(c)
    });
    let took = killed_at.elapsed();
    eprintln!("k0 moved from node {victim} in {took:?}; Kamailio now lists {contacts:?}");
    assert!(took <= Duration::from_secs(LEASE_SECS + 5), "{took:?}");
    // Kamailio matches the new owner's contact to the old one by +sip.instance and reg-id
    // and replaces it: never two contacts.
    assert_eq!(contacts.len(), 1, "{contacts:?}");
}

/// A provider and a three-node cluster with provider accounts p0..p5 for its u0..u5, once
/// each is registered, with the node registering each.
fn six_registered() -> (Provider, Cluster, Vec<u64>) {
    let provider = Provider::start();
    let cluster = six_accounts_at(&provider);
    let before = Wait::new("all six registered", Duration::from_secs(40))
        .showing(&cluster)
        .until(|| six_owners(&provider));
    (provider, cluster, before)
}

/// A three-node cluster with provider accounts p0..p5 for `provider`'s u0..u5.
fn six_accounts_at(provider: &Provider) -> Cluster {
    for i in 0..6 {
        provider.add(&format!("u{i}"), &format!("pw{i}"));
    }
    let cluster = form(&FULL3);
    for i in 0..6 {
        let body = provider_body(
            &format!("u{i}"),
            &format!("pw{i}"),
            provider.node.udp_addr(),
        );
        assert_eq!(put_provider(&cluster, 1, &format!("p{i}"), &body).0, 201);
    }
    cluster
}

/// The node registering each of u0..u5 at `provider`, if each has exactly one contact.
fn six_owners(provider: &Provider) -> Option<Vec<u64>> {
    (0..6)
        .map(|i| match &provider.contacts(&format!("u{i}"))[..] {
            [one] => node_of(one),
            _ => None,
        })
        .collect()
}

/// SIGTERM drains first (README): a node stopped that way hands its provider accounts to
/// the others before it exits, each un-registered here before it is registered there,
/// rather than leaving them to lapse with its leases.
#[test]
fn a_node_stopped_with_sigterm_hands_its_provider_accounts_over_before_it_exits() {
    let (provider, cluster, before) = six_registered();
    let owners = || six_owners(&provider);
    let (leader, _) = cluster.wait_for_leader(&[], Duration::from_secs(10));
    // A follower that owns some (the leader would hold up the hand-over with an election).
    let victim = *before
        .iter()
        .find(|&&n| n != leader)
        .expect("a follower owns an account");
    let held: Vec<usize> = (0..6).filter(|&i| before[i] == victim).collect();
    let member = cluster.member(victim);
    member.sigterm();
    let exited = member.wait_exit(Duration::from_secs(40));
    assert!(exited.is_some(), "node {victim} did not stop");
    // By the time it has exited it un-registered every account it held (killed, it would
    // leave each contact up and each lease to lapse first)...
    for &i in &held {
        let c = provider.contacts(&format!("u{i}"));
        assert!(
            c.iter().all(|c| node_of(c) != Some(victim)),
            "node {victim} exited with u{i} still registered from it: {c:?}"
        );
    }
    // ...and the others have them at once, not after a lease time (8 s).
    let after = Wait::new("the others to register them", Duration::from_secs(5))
        .showing(&cluster)
        .until(|| owners().filter(|o| held.iter().all(|&i| o[i] != victim)));
    eprintln!(
        "SUMMARY SIGTERM hand-over: node {victim} held {held:?}; owners {before:?} -> {after:?}"
    );
}

/// Hand-over from a live owner, and the operator's changes: draining a node moves its
/// accounts only after it has un-registered them (so the provider never lists two of our
/// contacts for one account), the drain counts as done only once it holds none; disabling
/// an account un-registers it, enabling registers it again, deleting un-registers it.
#[test]
fn drain_disable_and_delete_unregister_before_anything_else_registers() {
    let (provider, cluster, before) = six_registered();
    let owners = || six_owners(&provider);
    let victim = before[0];

    // Drain the owner of u0, watching the provider all along: never two contacts.
    let drained = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let deadline = Deadline::after(Duration::from_secs(40));
            while !deadline.expired() {
                for i in 0..6 {
                    let c = provider.contacts(&format!("u{i}"));
                    assert!(
                        c.len() <= 1,
                        "u{i} had two contacts during the hand-over: {c:?}"
                    );
                }
                if owners().is_some_and(|o| !o.contains(&victim)) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        });
        let out = cluster
            .member(victim)
            .cli(&["node", "drain", "--timeout-secs", "40"]);
        assert!(
            out.status.success(),
            "{}",
            tandem_failover_tests::describe(&out)
        );
        watcher.join().unwrap()
    });
    assert!(drained, "the drained node's accounts did not move");
    let drain = cluster.member(victim).get("/v1/node/drain").unwrap().json();
    assert_eq!(drain["provider_leases"], 0, "{drain}");

    // Disable: un-registered; enable: registered again; delete: un-registered.
    let via = [1, 2, 3].into_iter().find(|n| *n != victim).unwrap();
    assert_eq!(
        put_provider(&cluster, via, "p1", r#"{"enabled":false}"#).0,
        200
    );
    Wait::new(
        "p1 to be un-registered when disabled",
        Duration::from_secs(20),
    )
    .showing(&cluster)
    .until(|| provider.contacts("u1").is_empty());
    // The provider drops the contact before its 200 reaches the agent, which then says so.
    Wait::new("p1's status to say disabled", Duration::from_secs(10))
        .showing(&cluster)
        .until(|| status(&cluster, via, "p1")["state"] == "disabled");
    assert_eq!(
        put_provider(&cluster, via, "p1", r#"{"enabled":true}"#).0,
        200
    );
    Wait::new(
        "p1 to be registered again when enabled",
        Duration::from_secs(20),
    )
    .showing(&cluster)
    .until(|| provider.contacts("u1").len() == 1);
    let gone = cluster
        .member(via)
        .request("DELETE", "/v1/providers/c1/p2", None)
        .unwrap();
    assert_eq!(gone.status, 200, "{}", gone.body);
    Wait::new(
        "p2 to be un-registered when deleted",
        Duration::from_secs(20),
    )
    .showing(&cluster)
    .until(|| provider.contacts("u2").is_empty());
    let missing = cluster.member(via).get("/v1/providers/c1/p2").unwrap();
    assert_eq!(missing.status, 404, "{}", missing.body);
}

/// The operator's command line: the password comes from the environment (or a prompt,
/// never the command line), never comes back, and without either the command says how to
/// give it. A cluster whose members do not all support provider accounts refuses them
/// with a clear error instead of writing what an older member could not apply.
#[test]
fn the_cli_manages_provider_accounts_and_an_older_cluster_refuses_them() {
    // Names resolve through a DNS server of the test's own (with no records), so that
    // nothing is ever asked of the host's resolver.
    let dns = DnsServer::start();
    let agent = AgentNode::start(&format!("dns_servers = [\"{}\"]", dns.addr()));
    let node = &agent.node;
    let config = node.dir().join("config.toml");
    let (admin, token) = (node.admin_addr(), agent.token.clone());
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        tandem_failover_tests::tandem_command()
            .args(["provider"])
            .args(args)
            .arg("--config")
            .arg(&config)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let put = [
        "put",
        "c1/trunk",
        "--registrar",
        "sip.provider.test:5080",
        "--username",
        "4930123",
        "--transport",
        "tcp",
        "--expires",
        "300",
    ];
    let no_password = cli(&put, &[]);
    assert!(!no_password.status.success());
    let err = String::from_utf8_lossy(&no_password.stderr);
    assert!(err.contains("TANDEM_PROVIDER_PASSWORD"), "{err}");
    let ok = cli(&put, &[("TANDEM_PROVIDER_PASSWORD", "s3cret-pw")]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        tandem_failover_tests::describe(&ok)
    );
    assert!(
        out.contains("\"registrar\": \"sip.provider.test:5080\""),
        "{out}"
    );
    assert!(!out.contains("s3cret-pw"), "the password came back: {out}");
    // A change without --password keeps it and asks for nothing.
    let edit = cli(&["put", "c1/trunk", "--realm", "provider.test"], &[]);
    assert!(
        edit.status.success(),
        "{}",
        tandem_failover_tests::describe(&edit)
    );
    let list = cli(&["list", "--customer", "c1"], &[]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("c1/trunk  4930123@sip.provider.test:5080  enabled"),
        "{listed}"
    );
    let shown = cli(&["show", "c1/trunk"], &[]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("\"realm\": \"provider.test\""));
    let st = cli(&["status", "c1/trunk"], &[]);
    assert!(
        st.status.success(),
        "{}",
        tandem_failover_tests::describe(&st)
    );
    let bad = cli(
        &["put", "c1/other", "--registrar", "a b", "--username", "u"],
        &[("TANDEM_PROVIDER_PASSWORD", "x")],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("registrar"),
        "{}",
        tandem_failover_tests::describe(&bad)
    );
    let del = cli(&["delete", "c1/trunk"], &[]);
    assert!(
        del.status.success(),
        "{}",
        tandem_failover_tests::describe(&del)
    );
    assert_eq!(
        http(admin, Some(&token), "GET", "/v1/providers/c1/trunk", None)
            .unwrap()
            .status,
        404
    );

    // A node that claims only the first release's features: its cluster stays at
    // feature version 0, and a provider account is refused before it reaches the log.
    let old = Node::start_env(
        &sip_config(tandem_failover_tests::free_port(), ""),
        &[("TANDEM_TEST_FEATURES", "0")],
    );
    old.wait_ready();
    let (admin, token) = (old.admin_addr(), old.admin_token());
    let c = http(
        admin,
        Some(&token),
        "PUT",
        "/v1/customers/c1",
        Some(r#"{"name":"C1"}"#),
    )
    .unwrap();
    assert_eq!(c.status, 200, "{}", c.body);
    let body = r#"{"registrar":"provider.test","username":"u","password":"p"}"#;
    let refused = http(admin, Some(&token), "PUT", "/v1/providers/c1/p", Some(body)).unwrap();
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.body.contains("feature version"), "{}", refused.body);
    assert_eq!(
        http(admin, Some(&token), "GET", "/v1/cluster/status", None)
            .unwrap()
            .json()["feature_version"],
        0
    );
}

/// A node behind 1:1 NAT (`sip.advertise`) registers its public address: the provider
/// stores a contact that names it, with the listener's port.
#[test]
fn a_node_behind_nat_registers_its_advertised_address() {
    let provider = Provider::start();
    provider.add("u0", "pw0");
    let agent = AgentNode::start("advertise = \"127.0.0.77\"");
    let node = &agent.node;
    let api = |method: &str, path: &str, body: Option<&str>| agent.api(method, path, body);
    let body = provider_body("u0", "pw0", provider.node.udp_addr());
    assert_eq!(api("PUT", "/v1/providers/c1/p0", Some(&body)).status, 201);
    let contact = Wait::new("u0 registered", Duration::from_secs(20))
        .showing(node)
        .until(|| provider.contacts("u0").pop());
    let port = node.udp_addr().port();
    assert!(
        contact.contains(&format!("@127.0.0.77:{port};")),
        "the contact does not name the advertised address: {contact}"
    );
}

/// TLS to the provider: the registrar's certificate must chain to a trusted root; a
/// self-signed one is refused (the status says why) until the account names it as its CA
/// file, and then the account registers over TLS.
#[test]
fn a_provider_over_tls_is_registered_only_once_its_certificate_is_trusted() {
    let tls = common::self_signed_for_localhost();
    let provider = Provider {
        node: Node::start_ready_with(|port| tls.sip_config(port)),
        token: String::new(),
    };
    let provider = Provider {
        token: provider.node.admin_token(),
        ..provider
    };
    provider.add("u0", "pw0");
    let dns = DnsServer::start();
    let dns_addr = dns.addr();
    let agent = AgentNode::start(&format!("dns_servers = [\"{dns_addr}\"]"));
    let node = &agent.node;
    let api = |method: &str, path: &str, body: Option<&str>| agent.api(method, path, body);
    let body = format!(
        r#"{{"registrar":"provider.test","outbound_proxy":"{}","transport":"tls",
            "username":"u0","password":"pw0","expires_secs":60}}"#,
        provider.node.tls_addr()
    );
    assert_eq!(api("PUT", "/v1/providers/c1/p0", Some(&body)).status, 201);
    let refused = Wait::new(
        "the untrusted certificate to be reported",
        Duration::from_secs(20),
    )
    .showing(node)
    .until(|| {
        let s = api("GET", "/v1/providers/c1/p0/status", None).json();
        let e = s["registration"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        e.contains("TLS").then_some(e)
    });
    eprintln!("without the CA file: {refused}");
    assert!(provider.contacts("u0").is_empty());

    let ca = format!(r#"{{"ca_file":{:?}}}"#, tls.cert_path.display().to_string());
    assert_eq!(api("PUT", "/v1/providers/c1/p0", Some(&ca)).status, 200);
    let contact = Wait::new("u0 registered over TLS", Duration::from_secs(20))
        .showing(node)
        .until(|| provider.contacts("u0").pop());
    assert!(contact.contains("transport=tls"), "{contact}");
}

/// A thousand accounts at Kamailio: spread over three nodes within ±20%, all registered;
/// node 3 stops, and the other two hold them all, within ±20% of half each; node 3 comes
/// back, and rebalancing (a tenth at a time, un-registering first) brings it its share.
#[test]
fn a_thousand_accounts_spread_within_20_percent_and_again_after_a_node_leaves_and_rejoins() {
    const N: usize = 1000;
    let kamailio = Kamailio::start();
    let cluster = form(&FULL3);
    for i in 0..N {
        let body = format!(
            r#"{{"registrar":"kamailio.test","outbound_proxy":"{}","transport":"udp",
                "username":"t{i}","password":"pw-t{i}","expires_secs":60}}"#,
            kamailio.addr
        );
        let (code, json) = put_provider(&cluster, 1 + (i as u64 % 3), &format!("t{i}"), &body);
        assert_eq!(code, 201, "{json}");
    }
    let held = |ids: &[u64], series: &str| -> Vec<usize> {
        ids.iter()
            .map(|id| metric(cluster.member(*id).admin_addr, series).unwrap_or(-1.0) as usize)
            .collect()
    };
    let spread_over = |ids: &[u64], what: &str| {
        let share = N as f64 / ids.len() as f64;
        Wait::new(what, Duration::from_secs(90))
            .every(Duration::from_millis(500))
            .showing(&cluster)
            .until(|| {
                let leases = held(ids, "tandem_provider_leases_held");
                let registered = held(ids, "tandem_providers_registered");
                let even = leases
                    .iter()
                    .all(|n| (*n as f64 - share).abs() <= share * 0.2);
                if even && leases.iter().sum::<usize>() == N && registered == leases {
                    Ok(leases)
                } else {
                    Err(format!("leases {leases:?}, registered {registered:?}"))
                }
            })
    };
    let at_start = spread_over(
        &[1, 2, 3],
        "1,000 accounts registered, spread over three nodes",
    );
    eprintln!("three nodes: {at_start:?}");

    let three = cluster.member(3);
    three.sigterm();
    three.wait_exit(Duration::from_secs(40));
    let two = spread_over(&[1, 2], "all accounts registered by nodes 1 and 2");
    eprintln!("node 3 gone: {two:?}");

    three.start();
    three.wait_healthy();
    let again = spread_over(&[1, 2, 3], "node 3 given its share again");
    eprintln!("node 3 back: {again:?}");
}

/// (seen at, user, lab node it came from) of every REGISTER so far, in Kamailio's order.
fn registers(log: &RegisterLog) -> Vec<(Duration, String, Option<u64>)> {
    log.registers()
        .into_iter()
        .map(|r| (r.at, r.user, member_of(&r.ip)))
        .collect()
}

/// Each node in its own network namespace, Kamailio as the provider in the clients'. The
/// leader, owner of some accounts, is cut off from the other two (it still reaches the
/// provider): it stops registering once its lease lapses, the majority elects a leader
/// that grants the leases to itself or the other node, and they register; the cut-off
/// node's last REGISTER for an account comes before its new owner's first. After the cut
/// heals, every account is registered once, by the owner its status names.
#[test]
fn netns_an_owner_cut_off_from_the_quorum_stops_registering_and_the_majority_takes_over() {
    let lab = Lab::new(3);
    let kamailio = Kamailio::start_on(CLIENT_IP, 5060);
    let cluster = ready(Cluster::form_in(&lab, &FULL3, &agent_config()));
    // Kamailio grants 30 s at most, so an owner refreshes every 16.5-24 s: one that kept
    // registering after its lease lapsed would show within the 30 s of the partition.
    for i in 0..6 {
        let body = format!(
            r#"{{"registrar":"kamailio.test","outbound_proxy":"{}","transport":"udp",
                "username":"k{i}","password":"pw-k{i}","expires_secs":60}}"#,
            kamailio.addr
        );
        let (code, json) = put_provider(&cluster, 1, &format!("k{i}"), &body);
        assert_eq!(code, 201, "{json}");
    }
    let registered_by_owners = |via: u64| {
        (0..6)
            .map(|i| {
                let s = status(&cluster, via, &format!("k{i}"));
                match (
                    &kamailio.contacts(&format!("k{i}"))[..],
                    s["owner"].as_u64(),
                ) {
                    ([one], Some(owner)) if node_of(one) == Some(owner) => Some(owner),
                    _ => None,
                }
            })
            .collect::<Option<Vec<u64>>>()
    };
    let owners = Wait::new(
        "every account registered at Kamailio once, by its owner",
        Duration::from_secs(40),
    )
    .showing(&cluster)
    .until(|| registered_by_owners(1));
    let (victim, _) = cluster.wait_for_leader(&[], Duration::from_secs(10));
    let moved: Vec<usize> = (0..6).filter(|i| owners[*i] == victim).collect();
    assert!(
        !moved.is_empty(),
        "the leader, node {victim}, owns none of {owners:?}"
    );
    let majority: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != victim).collect();

    let clock = Deadline::after(Duration::ZERO);
    let log = RegisterLog::watch(&kamailio, clock);
    std::thread::sleep(Duration::from_millis(200));
    let cut_at = clock.elapsed();
    lab.partition(victim, &majority);
    eprintln!("owners {owners:?}; node {victim} (leader) cut off at {cut_at:?}");

    // The majority registers each of the cut-off node's accounts, from a majority node.
    let mut taken: BTreeMap<usize, Duration> = BTreeMap::new();
    Wait::new(
        "the majority to register the cut-off node's accounts",
        Duration::from_secs(LEASE_SECS + 25),
    )
    .every(Duration::from_millis(100))
    .showing(&cluster)
    .until(|| {
        for (at, user, from) in registers(&log) {
            let i: usize = user.trim_start_matches('k').parse().unwrap_or(99);
            if at > cut_at && moved.contains(&i) && from.is_some_and(|n| n != victim) {
                taken.entry(i).or_insert(at - cut_at);
            }
        }
        taken.len() == moved.len()
    });
    // Stay cut for 30 s in all, long enough for two more refreshes of every account.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(clock.elapsed() - cut_at));
    let healed_at = clock.elapsed();
    let registers = registers(&log);
    let from_victim: Vec<Duration> = registers
        .iter()
        .filter(|(at, _, from)| *at > cut_at && *at < healed_at && *from == Some(victim))
        .map(|(at, ..)| *at - cut_at)
        .collect();
    eprintln!(
        "takeover after the cut: {taken:?}; the cut-off node's REGISTERs after the cut, \
         at {from_victim:?}"
    );
    // Its lease was renewed last before the cut and runs LEASE_SECS from then; 1 s more
    // for the log's polling.
    let lapse = Duration::from_secs(LEASE_SECS + 1);
    assert!(
        from_victim.iter().all(|at| *at <= lapse),
        "node {victim} registered after its lease lapsed (cut at {cut_at:?}): {from_victim:?}"
    );
    for i in &moved {
        let user = format!("k{i}");
        let last_old = registers
            .iter()
            .rposition(|(_, u, from)| *u == user && *from == Some(victim));
        let first_new = registers.iter().position(|(at, u, from)| {
            *u == user && *at > cut_at && from.is_some_and(|n| n != victim)
        });
        assert!(
            last_old < first_new,
            "{user}: the cut-off node registered (line {last_old:?}) after its new owner \
             (line {first_new:?})"
        );
    }
    let slowest = taken.values().max().copied().unwrap_or_default();
    assert!(
        slowest <= Duration::from_secs(LEASE_SECS + 5),
        "takeover took {slowest:?}, more than the lease ({LEASE_SECS} s) plus 5 s"
    );

    lab.heal();
    cluster.wait_caught_up(victim, Duration::from_secs(30));
    let after = Wait::new(
        "every account registered once, by its owner, after the heal",
        Duration::from_secs(40),
    )
    .showing(&cluster)
    .until(|| registered_by_owners(victim));
    eprintln!("after the heal: owners {after:?}");
}
