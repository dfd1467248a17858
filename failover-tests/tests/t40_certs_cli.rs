//! t40: provisioning secrets the way an operator does, with the real binary. `tandem cert ca`
//! and `tandem cert node` give two nodes files that form a working mutual-TLS link,
//! `tandem keygen` writes a master key file, private keys are 0600, nothing is ever
//! overwritten, and every failure exits non-zero with one line that names the file.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tandem_failover_tests::{describe, tandem_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// clap's exit code for bad usage.
const EXIT_USAGE: i32 = 2;

fn tandem(args: &[impl AsRef<OsStr>], dir: &Path) -> Output {
    tandem_command()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run tandem")
}

fn succeeds(args: &[impl AsRef<OsStr> + Debug], dir: &Path) -> Output {
    let output = tandem(args, dir);
    assert!(output.status.success(), "{args:?}: {}", describe(&output));
    output
}

/// Runs a command that must fail with exit 1 and one stderr line containing each of
/// `needles`.
fn fails_naming(args: &[impl AsRef<OsStr> + Debug], dir: &Path, needles: &[&str]) {
    let output = tandem(args, dir);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?}: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{}",
        describe(&output)
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing: {}",
            describe(&output)
        );
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    let pem = std::fs::read(path).unwrap();
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(certs.len(), 1, "{}", path.display());
    certs
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    let pem = std::fs::read(path).unwrap();
    rustls_pemfile::private_key(&mut &pem[..])
        .unwrap()
        .unwrap_or_else(|| panic!("{} holds no private key", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_cert: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(certs(ca_cert).remove(0)).unwrap();
    Arc::new(roots)
}

/// A node's files as written by `tandem cert node`.
struct NodeFiles<'a> {
    dir: &'a Path,
    name: &'a str,
}

impl NodeFiles<'_> {
    fn cert(&self) -> std::path::PathBuf {
        self.dir.join(format!("{}.crt", self.name))
    }
    fn key(&self) -> std::path::PathBuf {
        self.dir.join(format!("{}.key", self.name))
    }
    fn ca(&self) -> std::path::PathBuf {
        self.dir.join("ca.crt")
    }
}

/// One request and reply over TLS between `server` and `client`, each configured only from
/// its own directory, as a node would be.
fn mutual_tls_exchange(server: &NodeFiles, client: &NodeFiles, server_name: &str) {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&server.ca()), provider())
        .build()
        .unwrap();
    let server_config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&server.cert()), key(&server.key()))
        .expect("the node's key belongs to its certificate");
    let client_config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&client.ca()))
        .with_client_auth_cert(certs(&client.cert()), key(&client.key()))
        .expect("the node's key belongs to its certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (server_result, client_result) = runtime.block_on(async move {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::join!(
            async move {
                let mut tls = acceptor.accept(server_io).await?;
                let mut request = [0u8; 4];
                tls.read_exact(&mut request).await?;
                tls.write_all(b"pong").await?;
                tls.shutdown().await
            },
            async move {
                let mut tls = connector.connect(name, client_io).await?;
                tls.write_all(b"ping").await?;
                let mut reply = [0u8; 4];
                tls.read_exact(&mut reply).await?;
                Ok::<_, std::io::Error>(reply)
            }
        )
    });
    server_result.unwrap_or_else(|e| panic!("{} refused {}: {e}", server.name, client.name));
    let reply =
        client_result.unwrap_or_else(|e| panic!("{} refused {}: {e}", client.name, server.name));
    assert_eq!(&reply, b"pong");
}

#[test]
fn cert_ca_and_cert_node_give_two_nodes_a_working_mutual_tls_link() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let output = succeeds(&["cert", "ca", "--out", "ca", "--cluster", "t40"], work);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ca/ca.crt") && stdout.contains("ca/ca.key"),
        "{stdout}"
    );
    assert_eq!(mode(&work.join("ca/ca.key")), 0o600);

    for (name, id, sans) in [
        ("node-a", "1", ["127.0.0.1", "node-a.t40.internal"]),
        ("node-b", "2", ["127.0.0.2", "node-b.t40.internal"]),
    ] {
        let out = format!("nodes/{name}");
        let output = succeeds(
            &[
                "cert", "node", "--ca", "ca", "--name", name, "--id", id, "--san", sans[0],
                "--san", sans[1], "--out", &out,
            ],
            work,
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains(&format!("{out}/{name}.crt")), "{stdout}");
        assert_eq!(mode(&work.join(format!("{out}/{name}.key"))), 0o600);
        assert_eq!(
            std::fs::read(work.join(format!("{out}/ca.crt"))).unwrap(),
            std::fs::read(work.join("ca/ca.crt")).unwrap(),
            "the CA certificate is copied beside the node's"
        );
    }
    let nodes = work.join("nodes");
    let (a, b) = (
        NodeFiles {
            dir: &nodes.join("node-a"),
            name: "node-a",
        },
        NodeFiles {
            dir: &nodes.join("node-b"),
            name: "node-b",
        },
    );

    // Chain, purpose and names, checked the way rustls checks a peer.
    let roots = roots(&work.join("ca/ca.crt"));
    let as_server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .unwrap();
    let as_client = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .unwrap();
    let a_cert = certs(&a.cert()).remove(0);
    for name in ["127.0.0.1", "node-a.t40.internal"] {
        let server_name = ServerName::try_from(name).unwrap();
        as_server
            .verify_server_cert(&a_cert, &[], &server_name, &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("node-a as server {name}: {e}"));
    }
    let wrong = ServerName::try_from("127.0.0.2").unwrap();
    assert!(as_server
        .verify_server_cert(&a_cert, &[], &wrong, &[], UnixTime::now())
        .is_err());
    as_client
        .verify_client_cert(&a_cert, &[], UnixTime::now())
        .expect("node-a as client");

    mutual_tls_exchange(&a, &b, "127.0.0.1");
    mutual_tls_exchange(&b, &a, "node-b.t40.internal");
}

#[test]
fn cert_commands_refuse_to_overwrite_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    succeeds(&["cert", "ca", "--out", "ca"], work);
    let ca_key = std::fs::read(work.join("ca/ca.key")).unwrap();
    fails_naming(
        &["cert", "ca", "--out", "ca"],
        work,
        &["ca/ca.crt", "already exists"],
    );
    assert_eq!(std::fs::read(work.join("ca/ca.key")).unwrap(), ca_key);

    let node = [
        "cert",
        "node",
        "--ca",
        "ca",
        "--name",
        "node-a",
        "--id",
        "1",
        "--san",
        "127.0.0.1",
        "--out",
        "out",
    ];
    succeeds(&node, work);
    let node_key = std::fs::read(work.join("out/node-a.key")).unwrap();
    fails_naming(&node, work, &["out/node-a.crt", "already exists"]);
    assert_eq!(
        std::fs::read(work.join("out/node-a.key")).unwrap(),
        node_key
    );
}

#[test]
fn keygen_writes_a_0600_key_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let output = succeeds(&["keygen", "--out", "master.key"], work);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("master.key"), "{}", describe(&output));
    assert!(stdout.contains("back it up"), "{}", describe(&output));
    let path = work.join("master.key");
    assert_eq!(mode(&path), 0o600);
    let contents = std::fs::read_to_string(&path).unwrap();
    let keys: Vec<_> = contents.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(keys.len(), 1, "{contents}");
    assert!(
        keys[0].starts_with("1:") && keys[0].len() == 2 + 64,
        "{contents}"
    );

    fails_naming(
        &["keygen", "--out", "master.key"],
        work,
        &["master.key", "already exists"],
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), contents);
    fails_naming(
        &["keygen", "--out", "missing/master.key"],
        work,
        &["missing/master.key"],
    );
}

#[test]
fn cert_node_names_a_missing_or_mismatched_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    std::fs::create_dir(work.join("empty")).unwrap();
    let node = |ca: &str| {
        [
            "cert",
            "node",
            "--ca",
            ca,
            "--name",
            "node-a",
            "--id",
            "1",
            "--san",
            "127.0.0.1",
            "--out",
            "out",
        ]
        .map(str::to_owned)
    };
    fails_naming(&node("empty"), work, &["empty/ca.crt", "No such file"]);

    succeeds(&["cert", "ca", "--out", "one"], work);
    succeeds(&["cert", "ca", "--out", "two"], work);
    std::fs::copy(work.join("two/ca.key"), work.join("one/ca.key")).unwrap();
    fails_naming(
        &node("one"),
        work,
        &["one", "not a usable cluster CA", "does not belong"],
    );
    assert!(!work.join("out/node-a.crt").exists());
}

#[test]
fn bad_arguments_are_usage_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    succeeds(&["cert", "ca", "--out", "ca"], work);
    for args in [
        &[
            "cert", "node", "--ca", "ca", "--name", "node-a", "--id", "1", "--out", "out",
        ][..],
        // No node id, and a node id that cannot be one.
        &[
            "cert",
            "node",
            "--ca",
            "ca",
            "--name",
            "node-a",
            "--san",
            "127.0.0.1",
            "--out",
            "out",
        ],
        &[
            "cert",
            "node",
            "--ca",
            "ca",
            "--name",
            "node-a",
            "--id",
            "0",
            "--san",
            "127.0.0.1",
            "--out",
            "out",
        ],
        &[
            "cert",
            "node",
            "--ca",
            "ca",
            "--name",
            "../evil",
            "--id",
            "1",
            "--san",
            "127.0.0.1",
            "--out",
            "out",
        ],
        &[
            "cert",
            "node",
            "--ca",
            "ca",
            "--name",
            "ca",
            "--id",
            "1",
            "--san",
            "127.0.0.1",
            "--out",
            "ca",
        ],
        &[
            "cert",
            "node",
            "--ca",
            "ca",
            "--name",
            "x",
            "--id",
            "1",
            "--san",
            "not a name",
            "--out",
            "out",
        ],
        &["keygen"],
    ] {
        let output = tandem(args, work);
        assert_eq!(
            output.status.code(),
            Some(EXIT_USAGE),
            "{args:?}: {}",
            describe(&output)
        );
    }
    assert!(!work.join("out").exists());
    assert!(!work.join("evil.crt").exists());
}
