//! RFC 3263 lookups through hickory-resolver: the DNS side of [`crate::stack::locate`],
//! which decides what to look up and in which order to try the answers. hickory keeps its
//! own cache and honours each record's TTL, so a refresh every few minutes asks the
//! provider's DNS only when the records expire.
//!
//! Names are looked up fully qualified (a trailing dot), so no search domain of the host
//! turns a provider's name into a local one.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, Protocol, ResolverConfig, ResolverOpts};
use hickory_resolver::error::{ResolveError, ResolveErrorKind};
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioAsyncResolver;
use rand::Rng;
use tandem_sip::SipUri;

use crate::stack::locate::{self, Naptr, Plan, Srv};
use crate::stack::transport::TransportKind;

/// One place to send a request to, in the order to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub transport: TransportKind,
    pub addr: SocketAddr,
}

/// A DNS resolver for SIP targets.
#[derive(Clone)]
pub struct Resolver {
    dns: TokioAsyncResolver,
    /// The transports this node can send on, in its order of preference.
    supported: Vec<TransportKind>,
}

impl Resolver {
    /// Asks `servers`, or the system's resolvers (`/etc/resolv.conf`) when empty. Without a
    /// readable system configuration it asks nobody, and every lookup of a name fails
    /// with an error that says so (numeric hosts still work): it never falls back to some
    /// public resolver.
    pub fn new(servers: &[SocketAddr], supported: Vec<TransportKind>) -> Resolver {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.cache_size = 1024;
        let dns = if servers.is_empty() {
            match hickory_resolver::system_conf::read_system_conf() {
                Ok((config, mut system)) => {
                    system.timeout = opts.timeout;
                    system.attempts = opts.attempts;
                    TokioAsyncResolver::tokio(config, system)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no system DNS configuration: names of outside servers will not resolve (set sip.dns_servers)");
                    TokioAsyncResolver::tokio(ResolverConfig::new(), opts)
                }
            }
        } else {
            let mut config = ResolverConfig::new();
            for s in servers {
                config.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
            }
            TokioAsyncResolver::tokio(config, opts)
        };
        Resolver { dns, supported }
    }

    /// Where to send a request for `uri`, in the order to try (RFC 3263 §4). An error
    /// means no target was found; it says why.
    pub async fn targets(&self, uri: &SipUri) -> Result<Vec<Target>, String> {
        let plan = match locate::plan(uri) {
            Plan::Naptr { domain, secure } => {
                let records = self.naptr(&domain).await?;
                locate::after_naptr(&domain, secure, &records, &self.supported)
            }
            other => other,
        };
        match plan {
            Plan::Direct {
                transport,
                ip,
                port,
            } => Ok(vec![Target {
                transport,
                addr: SocketAddr::new(ip, port),
            }]),
            Plan::Address {
                transport,
                host,
                port,
            } => self.addresses(&host, transport, port).await,
            Plan::Srv {
                names,
                host,
                fallback,
            } => {
                let mut out = Vec::new();
                let mut last_error = None;
                for (transport, name) in names {
                    if !self.supported.contains(&transport) {
                        continue;
                    }
                    match self.srv(&name).await {
                        Ok(records) => {
                            for r in records {
                                match self.addresses(&r.target, transport, r.port).await {
                                    Ok(found) => out.extend(found),
                                    Err(e) => last_error = Some(e),
                                }
                            }
                        }
                        Err(e) => last_error = Some(e),
                    }
                }
                if !out.is_empty() {
                    return Ok(out);
                }
                // No SRV records (or none that resolve): the host itself, default port.
                match self
                    .addresses(&host, fallback, fallback.default_port())
                    .await
                {
                    Ok(found) => Ok(found),
                    Err(e) => Err(last_error.map_or(e.clone(), |srv| format!("{e}; {srv}"))),
                }
            }
            Plan::Naptr { domain, .. } => Err(format!("NAPTR for {domain} led nowhere")),
        }
    }

    async fn naptr(&self, domain: &str) -> Result<Vec<Naptr>, String> {
        match self.dns.lookup(fqdn(domain), RecordType::NAPTR).await {
            Ok(found) => Ok(found
                .iter()
                .filter_map(|r| match r {
                    RData::NAPTR(n) => Some(Naptr {
                        order: n.order(),
                        preference: n.preference(),
                        flags: String::from_utf8_lossy(n.flags()).into_owned(),
                        service: String::from_utf8_lossy(n.services()).into_owned(),
                        replacement: n.replacement().to_utf8(),
                    }),
                    _ => None,
                })
                .collect()),
            Err(e) if no_records(&e) => Ok(Vec::new()),
            Err(e) => Err(format!("NAPTR lookup of {domain} failed: {e}")),
        }
    }

    async fn srv(&self, name: &str) -> Result<Vec<Srv>, String> {
        match self.dns.srv_lookup(fqdn(name)).await {
            Ok(found) => {
                let records: Vec<Srv> = found
                    .iter()
                    .map(|r| Srv {
                        priority: r.priority(),
                        weight: r.weight(),
                        port: r.port(),
                        target: r.target().to_utf8().trim_end_matches('.').to_owned(),
                    })
                    .collect();
                let mut rng = rand::thread_rng();
                Ok(locate::order_srv(&records, |n| rng.gen_range(0..=n)))
            }
            Err(e) if no_records(&e) => Ok(Vec::new()),
            Err(e) => Err(format!("SRV lookup of {name} failed: {e}")),
        }
    }

    async fn addresses(
        &self,
        host: &str,
        transport: TransportKind,
        port: u16,
    ) -> Result<Vec<Target>, String> {
        if let Ok(ip) = host.parse() {
            return Ok(vec![Target {
                transport,
                addr: SocketAddr::new(ip, port),
            }]);
        }
        match self.dns.lookup_ip(fqdn(host)).await {
            Ok(found) => {
                let out: Vec<Target> = found
                    .iter()
                    .map(|ip| Target {
                        transport,
                        addr: SocketAddr::new(ip, port),
                    })
                    .collect();
                if out.is_empty() {
                    Err(format!("{host} has no address"))
                } else {
                    Ok(out)
                }
            }
            Err(e) if no_records(&e) => Err(format!("{host} does not resolve")),
            Err(e) => Err(format!("address lookup of {host} failed: {e}")),
        }
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

fn no_records(e: &ResolveError) -> bool {
    matches!(e.kind(), ResolveErrorKind::NoRecordsFound { .. })
}
