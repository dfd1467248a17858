//! What more than one test file needs and the harness cannot hold (its library does not
//! depend on rcgen): a node's SIP TLS certificate, and a client that trusts only it.

use std::sync::Arc;

/// A self-signed certificate for `localhost` and `127.0.0.1`, in PEM files for a node's
/// `sip.tls_certificate` and `sip.tls_private_key`.
pub struct SelfSignedTls {
    _dir: tempfile::TempDir,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
    // Not every test binary that includes this module uses every item.
    #[allow(dead_code)]
    pub cert_der: rustls::pki_types::CertificateDer<'static>,
}

pub fn self_signed_for_localhost() -> SelfSignedTls {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generate a self-signed certificate");
    let dir = tempfile::tempdir().expect("temp dir for PEMs");
    let cert_path = dir.path().join("sip.crt");
    let key_path = dir.path().join("sip.key");
    std::fs::write(&cert_path, certified.cert.pem()).expect("write certificate");
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).expect("write key");
    SelfSignedTls {
        _dir: dir,
        cert_path,
        key_path,
        cert_der: certified.cert.der().clone(),
    }
}

impl SelfSignedTls {
    /// A `[sip]` table with UDP (for the readiness probe) and TLS on `127.0.0.1:port`, and
    /// no TCP listener there, since TLS is TCP underneath.
    pub fn sip_config(&self, port: u16) -> String {
        format!(
            "[sip]\nudp = [\"127.0.0.1:{port}\"]\ntcp = []\ntls = [\"127.0.0.1:{port}\"]\n\
             tls_certificate = {:?}\ntls_private_key = {:?}\n",
            self.cert_path.display().to_string(),
            self.key_path.display().to_string(),
        )
    }

    /// A client configuration that trusts this certificate and nothing else.
    #[allow(dead_code)]
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .expect("trust the node's cert");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    }
}
