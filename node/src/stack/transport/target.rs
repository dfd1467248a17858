//! Where a URI says to send, and which addresses are this node's own: the transport and
//! address of RFC 3261 §18 and, for numeric hosts, RFC 3263. The proxy, the registrar and
//! the transport's own routing share these, so they live at the bottom, with the sockets.
//! For a name, the proxy looks up A/AAAA records; NAPTR and SRV (the rest of RFC 3263) are
//! not built yet.

use std::net::{IpAddr, SocketAddr};

use tandem_sip::{Host, SipUri};

use super::TransportKind;

/// The addresses this node listens on, by transport.
#[derive(Clone, Debug, Default)]
pub struct OwnAddrs {
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
    /// `sip.advertise`: the public address of a node behind 1:1 NAT (a cloud VM), which
    /// it puts in Via, Record-Route and Contact instead of its listeners' own, with the
    /// listeners' ports; a URI naming it names this node.
    pub advertise: Option<IpAddr>,
}

impl OwnAddrs {
    pub fn all(&self) -> impl Iterator<Item = (TransportKind, &SocketAddr)> {
        self.udp
            .iter()
            .map(|a| (TransportKind::Udp, a))
            .chain(self.tcp.iter().map(|a| (TransportKind::Tcp, a)))
            .chain(self.tls.iter().map(|a| (TransportKind::Tls, a)))
    }

    /// Whether `uri` names this node: a numeric host and port one of its listeners uses.
    pub fn is_own(&self, uri: &SipUri) -> bool {
        let Some(ip) = uri.host.ip() else {
            return false;
        };
        let kind = uri_transport(uri);
        let port = uri.port.unwrap_or(kind.default_port());
        self.names(ip, port)
    }

    /// Whether `ip:port` is a listener's, or the advertised address with a listener's port.
    fn names(&self, ip: IpAddr, port: u16) -> bool {
        self.all()
            .any(|(_, a)| (a.ip() == ip || self.advertise == Some(ip)) && a.port() == port)
    }

    /// Whether `(host, port)` from a Via is this node's.
    pub fn is_own_sent_by(&self, host: &Host, port: Option<u16>, kind: TransportKind) -> bool {
        let Some(ip) = host.ip() else {
            return false;
        };
        let port = port.unwrap_or(kind.default_port());
        self.names(ip, port)
    }

    /// The address to put in Via, Record-Route and Contact for `kind`: `local` if it is
    /// one of the listeners (an accepted connection or a UDP socket), else the first
    /// listener of that transport (a connection this node opened has an ephemeral local
    /// port); with `sip.advertise`, that listener's port at the advertised address.
    pub fn advertised(&self, kind: TransportKind, local: SocketAddr) -> SocketAddr {
        let list = match kind {
            TransportKind::Udp => &self.udp,
            TransportKind::Tcp => &self.tcp,
            TransportKind::Tls => &self.tls,
        };
        let listener = if list.contains(&local) {
            local
        } else {
            list.first()
                .or_else(|| self.udp.first())
                .copied()
                .unwrap_or(local)
        };
        match self.advertise {
            Some(ip) => SocketAddr::new(ip, listener.port()),
            None => listener,
        }
    }
}

/// The transport a URI asks for: its `transport` parameter, TLS for `sips:`, else UDP.
pub fn uri_transport(uri: &SipUri) -> TransportKind {
    match uri
        .transport_param()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("tcp") => TransportKind::Tcp,
        Some("tls") => TransportKind::Tls,
        _ if uri.secure => TransportKind::Tls,
        _ => TransportKind::Udp,
    }
}

/// The transport parameter to write into a URI for `kind` (none for UDP, the default).
pub fn transport_param(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Udp => "",
        TransportKind::Tcp => ";transport=tcp",
        TransportKind::Tls => ";transport=tls",
    }
}

/// Where to send for a URI: transport, host and port (the port defaulted per transport).
pub fn next_hop(uri: &SipUri) -> (TransportKind, Host, u16) {
    let kind = uri_transport(uri);
    let port = uri.port.unwrap_or(kind.default_port());
    let host = match uri.params.value("maddr").and_then(|m| Host::parse(m).ok()) {
        Some(maddr) => maddr,
        None => uri.host.clone(),
    };
    (kind, host, port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_sip::Uri;

    fn sip(s: &str) -> SipUri {
        Uri::parse(s).unwrap().as_sip().unwrap().clone()
    }

    fn own() -> OwnAddrs {
        OwnAddrs {
            udp: vec!["127.0.0.1:5060".parse().unwrap()],
            tcp: vec!["127.0.0.1:5060".parse().unwrap()],
            tls: vec!["127.0.0.1:5061".parse().unwrap()],
            advertise: None,
        }
    }

    #[test]
    fn an_advertised_address_replaces_the_listeners_and_names_this_node() {
        let o = OwnAddrs {
            advertise: Some("203.0.113.7".parse().unwrap()),
            ..own()
        };
        assert_eq!(
            o.advertised(TransportKind::Udp, "127.0.0.1:5060".parse().unwrap()),
            "203.0.113.7:5060".parse().unwrap()
        );
        assert_eq!(
            o.advertised(TransportKind::Tcp, "127.0.0.1:41000".parse().unwrap()),
            "203.0.113.7:5060".parse().unwrap()
        );
        assert!(o.is_own(&sip("sip:203.0.113.7;lr")));
        assert!(o.is_own(&sip("sip:127.0.0.1;lr")));
        assert!(
            !o.is_own(&sip("sip:203.0.113.7:5070;lr")),
            "only with a listener's port"
        );
        assert!(o.is_own_sent_by(
            &Host::Ip("203.0.113.7".parse().unwrap()),
            None,
            TransportKind::Udp
        ));
    }

    #[test]
    fn own_addresses_are_recognised_with_default_ports() {
        let o = own();
        assert!(o.is_own(&sip("sip:127.0.0.1;lr")));
        assert!(o.is_own(&sip("sip:tdm-x@127.0.0.1:5060;lr;transport=tcp")));
        assert!(o.is_own(&sip("sips:127.0.0.1;lr")), "sips defaults to 5061");
        assert!(!o.is_own(&sip("sip:127.0.0.2;lr")));
        assert!(!o.is_own(&sip("sip:127.0.0.1:5070;lr")));
        assert!(!o.is_own(&sip("sip:example.com;lr")));
        assert_eq!(
            o.advertised(TransportKind::Tcp, "127.0.0.1:41000".parse().unwrap()),
            "127.0.0.1:5060".parse().unwrap(),
            "an outbound connection advertises the listener"
        );
    }

    #[test]
    fn next_hop_follows_transport_sips_and_maddr() {
        let (k, h, p) = next_hop(&sip("sip:bob@127.0.0.5:5080;transport=TCP"));
        assert_eq!(
            (k, h.to_string(), p),
            (TransportKind::Tcp, "127.0.0.5".into(), 5080)
        );
        let (k, _, p) = next_hop(&sip("sips:bob@127.0.0.5"));
        assert_eq!((k, p), (TransportKind::Tls, 5061));
        let (_, h, p) = next_hop(&sip("sip:bob@example.com;maddr=127.0.0.7"));
        assert_eq!((h.to_string(), p), ("127.0.0.7".into(), 5060));
    }
}
