//! Mutual TLS for the internal listener (raft-store/DESIGN.md, "The Raft network"): every
//! node presents a certificate from the cluster's private CA, and accepts a peer only if
//! the peer's certificate comes from that same CA. Server and client configurations are
//! built once from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::Error;

/// The TLS configurations of one node on the internal listener.
#[derive(Clone)]
pub struct ClusterTls {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: ClientConfig,
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{what}: no PEM certificate found")));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, Error> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| Error::Tls(format!("{what}: {e}")))?
        .ok_or_else(|| Error::Tls(format!("{what}: no PEM private key found")))
}

impl ClusterTls {
    /// Reads the cluster CA certificate and this node's certificate and key.
    pub fn load(ca_cert: &Path, cert: &Path, key: &Path) -> Result<ClusterTls, Error> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::Io(format!("reading {}: {e}", p.display())))
        };
        Self::from_pem(&read(ca_cert)?, &read(cert)?, &read(key)?)
    }

    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<ClusterTls, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in certs(ca_pem, "cluster CA certificate")? {
            roots
                .add(ca)
                .map_err(|e| Error::Tls(format!("cluster CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = certs(cert_pem, "node certificate")?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key(key_pem, "node key")?)
            .map_err(|e| Error::Tls(format!("node certificate and key: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key(key_pem, "node key")?)
            .map_err(|e| Error::Tls(format!("node certificate and key: {e}")))?;
        Ok(ClusterTls {
            server: Arc::new(server),
            client,
        })
    }
}

/// The SHA-256 fingerprint (hex) of the first certificate in a CA file: what a data dir
/// records of the cluster it belongs to, so another cluster's node cannot run on it.
pub fn ca_fingerprint(ca_cert: &Path) -> Result<String, Error> {
    let pem = std::fs::read(ca_cert)
        .map_err(|e| Error::Io(format!("reading {}: {e}", ca_cert.display())))?;
    let first = certs(&pem, "cluster CA certificate")?.remove(0);
    let digest = ring::digest::digest(&ring::digest::SHA256, first.as_ref());
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes beside the
/// accept loop, each within `handshake`, so a client that stalls its handshake holds up no
/// one else. Returns the established connections, for `warp::serve(..)
/// .serve_incoming_with_graceful_shutdown`, and the accept task, to abort once the server
/// has stopped. `what` names the listener in the log.
pub fn accept_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake: std::time::Duration,
    what: &'static str,
) -> (
    impl tokio_stream::Stream<
            Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        > + Send
        + Unpin,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(stream).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "{what}: refused a TLS handshake")
                    }
                    Err(_) => tracing::warn!(%peer, "{what}: a TLS handshake timed out"),
                }
            });
        }
    });
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, std::io::Error>,
    );
    (incoming, accept_loop)
}
