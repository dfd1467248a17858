//! TLS connections this node opens (RFC 3261 §26.2.1, RFC 5922 §7): to a provider's
//! registrar, or any other server a request goes to over TLS. The server's certificate
//! must chain to the system's roots (Debian's `ca-certificates` bundle) or to the CAs of an
//! optional PEM file given for that server, and name the host the request was meant for
//! (the domain of the URI, not the SRV target). An open connection to the same address is
//! reused; a new one is connected, handshaken and then run like any other connection, on a
//! SIP thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustls::pki_types::ServerName;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;

use super::stream;
use super::{Flow, TransportKind, Transports, CONNECT_TIMEOUT};
use crate::Error;

/// Where Debian (and most Linux distributions) keep the system's trusted roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Client configurations by their extra CA file: built once each, then shared.
fn configs() -> &'static Mutex<HashMap<Option<PathBuf>, Arc<rustls::ClientConfig>>> {
    static CONFIGS: OnceLock<Mutex<HashMap<Option<PathBuf>, Arc<rustls::ClientConfig>>>> =
        OnceLock::new();
    CONFIGS.get_or_init(Mutex::default)
}

fn add_pem(roots: &mut rustls::RootCertStore, path: &Path) -> Result<usize, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Io {
        context: format!("reading CA certificates from {}", path.display()),
        source,
    })?;
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
        if roots.add(cert).is_ok() {
            added += 1;
        }
    }
    Ok(added)
}

/// The client configuration trusting the system's roots and those in `ca_file`.
fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let key = ca_file.map(Path::to_path_buf);
    if let Some(c) = configs().lock().expect("TLS client configs").get(&key) {
        return Ok(c.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    let system = Path::new(SYSTEM_ROOTS);
    if system.exists() {
        add_pem(&mut roots, system)?;
    }
    if let Some(f) = ca_file {
        if add_pem(&mut roots, f)? == 0 {
            return Err(Error::Tls(format!("{}: no certificate", f.display())));
        }
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!(
            "no trusted roots: {SYSTEM_ROOTS} is missing and no CA file is given"
        )));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let config = Arc::new(config);
    configs()
        .lock()
        .expect("TLS client configs")
        .insert(key, config.clone());
    Ok(config)
}

impl Transports {
    /// A TLS flow to `remote` whose certificate must name `server_name`: an open TLS
    /// connection to that address (one the peer opened included), or a new one.
    pub async fn flow_to_tls(
        &self,
        remote: SocketAddr,
        server_name: &str,
        ca_file: Option<&Path>,
    ) -> Result<Flow, Error> {
        if let Ok(flow) = self.existing(TransportKind::Tls, remote) {
            return Ok(flow);
        }
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| Error::Tls(format!("{server_name:?} is not a valid TLS server name")))?;
        let connector = TlsConnector::from(client_config(ca_file)?);
        let outbound = self.shared.outbound.get().ok_or(Error::NoRoute {
            transport: "TLS",
            addr: remote,
        })?;
        let connecting = move |source| Error::Io {
            context: format!("connecting to {remote} over TLS"),
            source,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(remote))
            .await
            .map_err(|_| connecting(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connecting)?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().map_err(connecting)?;
        // The handshake and the connection run on a SIP thread; this waits for the outcome.
        let tcp = tcp.into_std().map_err(connecting)?;
        let (done, outcome) = oneshot::channel();
        let ctx = self.outbound_context(outbound);
        outbound.tracker.spawn_on(
            async move {
                let handshake = async {
                    let tcp = tokio::net::TcpStream::from_std(tcp).map_err(connecting)?;
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                        .await
                        .map_err(|_| Error::Tls(format!("TLS handshake with {remote} timed out")))?
                        .map_err(|e| Error::Tls(format!("TLS handshake with {remote}: {e}")))
                };
                let tls = match handshake.await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = done.send(Err(e));
                        return;
                    }
                };
                let (tx, rx) = mpsc::channel(stream::QUEUE_DEPTH);
                let Some(flow) = ctx
                    .transports
                    .register(TransportKind::Tls, local, remote, tx)
                else {
                    let _ = done.send(Err(Error::NoRoute {
                        transport: "TLS (connection limit reached)",
                        addr: remote,
                    }));
                    return;
                };
                let _ = done.send(Ok(flow));
                stream::run_connection(tls, flow, rx, ctx).await;
            },
            outbound.shards.next(),
        );
        outcome
            .await
            .unwrap_or_else(|_| Err(Error::Tls("the SIP thread stopped".into())))
    }
}
