//! Locating SIP servers (RFC 3263 §4): which transport, address and port a request for a
//! URI goes to, and in which order to try the alternatives. Sans-IO: the DNS answers come
//! in, an ordered list of targets goes out, so the rules are tested without a resolver and
//! the same code serves the registration agent and the proxy.
//!
//! The rules, in the order RFC 3263 applies them:
//! - a numeric host needs no DNS: the URI's port, or the transport's default;
//! - a host with an explicit port is looked up by address (A/AAAA) only, never by SRV;
//! - otherwise, with a `transport` parameter, the SRV records for that transport
//!   (`_sip._udp`, `_sip._tcp`, `_sips._tcp`), then the address with the default port;
//! - otherwise NAPTR picks transports and their SRV names (by order, then preference, among
//!   the transports this node speaks); without NAPTR records, the SRV names for every
//!   transport this node speaks, in its own order of preference; without SRV records, the
//!   address with the default port over UDP (TLS for `sips`).
//!
//! SRV records are tried by priority, and within a priority in a weighted random order
//! (RFC 2782), so load spreads as the provider asked and a dead server is skipped on
//! timeout or 503.

use tandem_sip::{Host, SipUri};

use crate::stack::transport::TransportKind;

/// A NAPTR record as RFC 3263 reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naptr {
    pub order: u16,
    pub preference: u16,
    /// The flags; only "s" (the replacement is an SRV name) is used.
    pub flags: String,
    /// "SIP+D2U", "SIP+D2T", "SIPS+D2T", ...
    pub service: String,
    pub replacement: String,
}

/// An SRV record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// What to look up first for a URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// A numeric host: no DNS at all.
    Direct {
        transport: TransportKind,
        ip: std::net::IpAddr,
        port: u16,
    },
    /// A host name with a port: its addresses only.
    Address {
        transport: TransportKind,
        host: String,
        port: u16,
    },
    /// SRV names to try in this order (each with its transport), then the host's
    /// addresses with `fallback`'s transport and default port if none has records.
    Srv {
        names: Vec<(TransportKind, String)>,
        host: String,
        fallback: TransportKind,
    },
    /// NAPTR first, for a domain whose transport the URI does not name.
    Naptr { domain: String, secure: bool },
}

/// The transport a URI names with its `transport` parameter, if it names one this node
/// can use.
fn named_transport(uri: &SipUri) -> Option<TransportKind> {
    match uri.params.value("transport")?.to_ascii_lowercase().as_str() {
        "udp" => Some(TransportKind::Udp),
        "tcp" if uri.secure => Some(TransportKind::Tls),
        "tcp" => Some(TransportKind::Tcp),
        "tls" => Some(TransportKind::Tls),
        _ => None,
    }
}

/// The SRV name for a transport (RFC 3263 §4.1).
fn srv_name(kind: TransportKind, domain: &str) -> String {
    match kind {
        TransportKind::Udp => format!("_sip._udp.{domain}"),
        TransportKind::Tcp => format!("_sip._tcp.{domain}"),
        TransportKind::Tls => format!("_sips._tcp.{domain}"),
    }
}

/// The first step for `uri`.
pub fn plan(uri: &SipUri) -> Plan {
    let named = named_transport(uri);
    let default = if uri.secure {
        TransportKind::Tls
    } else {
        TransportKind::Udp
    };
    let host = match &uri.host {
        Host::Ip(ip) => {
            let transport = named.unwrap_or(default);
            return Plan::Direct {
                transport,
                ip: *ip,
                port: uri.port.unwrap_or(transport.default_port()),
            };
        }
        other => other.canonical(),
    };
    if let Some(port) = uri.port {
        return Plan::Address {
            transport: named.unwrap_or(default),
            host,
            port,
        };
    }
    if let Some(transport) = named {
        return Plan::Srv {
            names: vec![(transport, srv_name(transport, &host))],
            host,
            fallback: transport,
        };
    }
    Plan::Naptr {
        domain: host,
        secure: uri.secure,
    }
}

/// After NAPTR: the SRV names to try, from the records if any fit (order, then
/// preference, among the transports this node speaks; for `sips`, TLS only), else one per
/// supported transport in the node's order (RFC 3263 §4.1).
pub fn after_naptr(
    domain: &str,
    secure: bool,
    records: &[Naptr],
    supported: &[TransportKind],
) -> Plan {
    let service = |s: &str| -> Option<TransportKind> {
        match s.to_ascii_uppercase().as_str() {
            "SIP+D2U" if !secure => Some(TransportKind::Udp),
            "SIP+D2T" if !secure => Some(TransportKind::Tcp),
            "SIPS+D2T" => Some(TransportKind::Tls),
            _ => None,
        }
    };
    let mut usable: Vec<&Naptr> = records
        .iter()
        .filter(|r| r.flags.eq_ignore_ascii_case("s"))
        .filter(|r| service(&r.service).is_some_and(|k| supported.contains(&k)))
        .collect();
    usable.sort_by_key(|r| (r.order, r.preference));
    let fallback = if secure {
        TransportKind::Tls
    } else {
        TransportKind::Udp
    };
    let names: Vec<(TransportKind, String)> = if usable.is_empty() {
        supported
            .iter()
            .filter(|k| !secure || **k == TransportKind::Tls)
            .map(|k| (*k, srv_name(*k, domain)))
            .collect()
    } else {
        usable
            .into_iter()
            .filter_map(|r| {
                Some((
                    service(&r.service)?,
                    r.replacement.trim_end_matches('.').to_owned(),
                ))
            })
            .collect()
    };
    Plan::Srv {
        names,
        host: domain.to_owned(),
        fallback,
    }
}

/// SRV records in the order to try them (RFC 2782): by priority, and within one priority
/// by weighted random selection, where `random(n)` returns a number in `0..=n`. A record of
/// weight 0 is tried last in its priority unless all are 0. A target of "." means the
/// service is not offered there, so it is left out.
pub fn order_srv(records: &[Srv], mut random: impl FnMut(u32) -> u32) -> Vec<Srv> {
    let mut by_priority: Vec<Srv> = records
        .iter()
        .filter(|r| r.target != "." && !r.target.is_empty())
        .cloned()
        .collect();
    by_priority.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(by_priority.len());
    let mut i = 0;
    while i < by_priority.len() {
        let p = by_priority[i].priority;
        let mut group: Vec<Srv> = by_priority[i..]
            .iter()
            .take_while(|r| r.priority == p)
            .cloned()
            .collect();
        i += group.len();
        // RFC 2782: zero weights first in the list, so they are picked with a running sum
        // of 0 only when nothing heavier is left.
        group.sort_by_key(|r| r.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let pick = random(total);
            let mut running = 0u32;
            let at = group
                .iter()
                .position(|r| {
                    running += u32::from(r.weight);
                    running >= pick
                })
                .unwrap_or(group.len() - 1);
            out.push(group.remove(at));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_sip::Uri;

    const ALL: [TransportKind; 3] = [TransportKind::Tls, TransportKind::Tcp, TransportKind::Udp];

    fn sip(s: &str) -> SipUri {
        Uri::parse(s).unwrap().as_sip().unwrap().clone()
    }

    /// The SRV names and fallback transport of a plan that must be `Plan::Srv`.
    fn srv_plan(plan: Plan) -> (Vec<(TransportKind, String)>, TransportKind) {
        match plan {
            Plan::Srv {
                names, fallback, ..
            } => (names, fallback),
            other => panic!("not an SRV plan: {other:?}"),
        }
    }

    fn srv(priority: u16, weight: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port: 5060,
            target: target.into(),
        }
    }

    #[test]
    fn numeric_hosts_and_explicit_ports_skip_srv() {
        assert_eq!(
            plan(&sip("sip:192.0.2.1")),
            Plan::Direct {
                transport: TransportKind::Udp,
                ip: "192.0.2.1".parse().unwrap(),
                port: 5060
            }
        );
        assert_eq!(
            plan(&sip("sips:[2001:db8::1]")),
            Plan::Direct {
                transport: TransportKind::Tls,
                ip: "2001:db8::1".parse().unwrap(),
                port: 5061
            }
        );
        assert_eq!(
            plan(&sip("sip:Provider.Example.:5080;transport=tcp")),
            Plan::Address {
                transport: TransportKind::Tcp,
                host: "provider.example".into(),
                port: 5080
            }
        );
    }

    #[test]
    fn a_named_transport_asks_its_srv_name_only() {
        assert_eq!(
            plan(&sip("sip:provider.example;transport=tcp")),
            Plan::Srv {
                names: vec![(TransportKind::Tcp, "_sip._tcp.provider.example".into())],
                host: "provider.example".into(),
                fallback: TransportKind::Tcp,
            }
        );
        assert_eq!(
            plan(&sip("sip:provider.example")),
            Plan::Naptr {
                domain: "provider.example".into(),
                secure: false
            }
        );
    }

    #[test]
    fn naptr_orders_the_transports_this_node_speaks() {
        let n = |order, preference, service: &str, replacement: &str| Naptr {
            order,
            preference,
            flags: "s".into(),
            service: service.into(),
            replacement: replacement.into(),
        };
        let records = [
            n(20, 10, "SIP+D2U", "_sip._udp.provider.example."),
            n(10, 20, "SIP+D2T", "_sip._tcp.provider.example."),
            n(10, 10, "SIPS+D2T", "_sips._tcp.provider.example."),
            n(5, 10, "SIP+D2S", "_sip._sctp.provider.example."),
        ];
        let (names, _) = srv_plan(after_naptr("provider.example", false, &records, &ALL));
        assert_eq!(
            names,
            vec![
                (TransportKind::Tls, "_sips._tcp.provider.example".into()),
                (TransportKind::Tcp, "_sip._tcp.provider.example".into()),
                (TransportKind::Udp, "_sip._udp.provider.example".into()),
            ],
            "SCTP is not spoken here; order, then preference"
        );
        // A node without TLS skips it; a sips URI takes TLS only.
        let (names, _) = srv_plan(after_naptr(
            "provider.example",
            false,
            &records,
            &[TransportKind::Udp, TransportKind::Tcp],
        ));
        assert_eq!(names[0].0, TransportKind::Tcp);
        let (names, fallback) = srv_plan(after_naptr("provider.example", true, &records, &ALL));
        assert_eq!(names.len(), 1);
        assert_eq!(fallback, TransportKind::Tls);
        // No NAPTR records: every spoken transport's SRV name, in the node's order.
        let (names, fallback) = srv_plan(after_naptr("provider.example", false, &[], &ALL));
        assert_eq!(
            names.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
            [
                "_sips._tcp.provider.example",
                "_sip._tcp.provider.example",
                "_sip._udp.provider.example"
            ]
        );
        assert_eq!(fallback, TransportKind::Udp);
    }

    #[test]
    fn srv_goes_by_priority_then_weight_and_skips_dot() {
        let records = [
            srv(20, 0, "backup.example"),
            srv(10, 60, "a.example"),
            srv(10, 40, "b.example"),
            srv(10, 0, "."),
        ];
        // random always says "the top": a (60) then b.
        let first = order_srv(&records, |n| n);
        assert_eq!(
            first.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(),
            ["b.example", "a.example", "backup.example"]
        );
        let low = order_srv(&records, |_| 1);
        assert_eq!(low[0].target, "a.example");
        // Over many draws, a is first about 60% of the time.
        let mut seed = 12345u64;
        let mut a_first = 0;
        for _ in 0..10_000 {
            let ordered = order_srv(&records, |n| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) % (u64::from(n) + 1)) as u32
            });
            assert_eq!(ordered.len(), 3);
            assert_eq!(ordered[2].target, "backup.example");
            if ordered[0].target == "a.example" {
                a_first += 1;
            }
        }
        assert!((5_500..6_500).contains(&a_first), "{a_first}");
    }

    #[test]
    fn zero_weights_are_tried_last_unless_all_are_zero() {
        let records = [srv(1, 0, "zero.example"), srv(1, 10, "ten.example")];
        for pick in 1..=10 {
            assert_eq!(order_srv(&records, |_| pick)[0].target, "ten.example");
        }
        let zeros = [srv(1, 0, "x.example"), srv(1, 0, "y.example")];
        assert_eq!(order_srv(&zeros, |_| 0).len(), 2);
    }
}
