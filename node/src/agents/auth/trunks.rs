//! Trusted trunks: a customer's PBX or carrier recognised by the address its calls come
//! from instead of by digest, as Kamailio's address table does. Sans-IO: whether one flow
//! is one of a trunk's.
//!
//! A source address over UDP can be forged by anyone who does not need the answer, and a
//! call out needs none to cost money; a trunk that matters should be limited to TCP or
//! TLS, where the handshake proves the address (node/DESIGN.md, "Trusted trunks").

use tandem_raft_store::command::{ProviderTransport, Trunk};

use crate::config::parse_network;
use crate::stack::transport::flood::in_network;
use crate::stack::transport::{Flow, TransportKind};

/// Whether `flow` comes from enabled trunk `t`: its transport and port if it names them,
/// and an address in one of its sources.
pub fn admits(t: &Trunk, flow: &Flow) -> bool {
    let transport = match flow.transport {
        TransportKind::Udp => ProviderTransport::Udp,
        TransportKind::Tcp => ProviderTransport::Tcp,
        TransportKind::Tls => ProviderTransport::Tls,
    };
    t.enabled
        && t.transport.is_none_or(|want| want == transport)
        && t.port.is_none_or(|p| p == flow.remote.port())
        && t.sources.iter().any(|s| {
            parse_network(s).is_ok_and(|(net, len)| in_network(flow.remote.ip(), net, len))
        })
}

/// The shortest prefix a trunk's source may have: a wider network would let anyone in it
/// call out as the customer.
pub fn widest_prefix(v4: bool) -> u8 {
    if v4 {
        16
    } else {
        48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(remote: &str, transport: TransportKind) -> Flow {
        Flow {
            transport,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: remote.parse().unwrap(),
            connection: None,
        }
    }

    #[test]
    fn a_trunk_admits_its_addresses_transport_and_port_only() {
        let mut t = Trunk {
            customer: "c".into(),
            name: "pbx".into(),
            sources: vec!["192.0.2.0/24".into(), "2001:db8::7".into()],
            transport: None,
            port: None,
            account: "pbx@example.com".into(),
            enabled: true,
        };
        assert!(admits(&t, &flow("192.0.2.9:5060", TransportKind::Udp)));
        assert!(admits(&t, &flow("[2001:db8::7]:5060", TransportKind::Tcp)));
        assert!(!admits(&t, &flow("192.0.3.9:5060", TransportKind::Udp)));
        assert!(!admits(&t, &flow("[2001:db8::8]:5060", TransportKind::Tcp)));
        t.transport = Some(ProviderTransport::Tcp);
        assert!(!admits(&t, &flow("192.0.2.9:5060", TransportKind::Udp)));
        assert!(admits(&t, &flow("192.0.2.9:5060", TransportKind::Tcp)));
        t.port = Some(5070);
        assert!(!admits(&t, &flow("192.0.2.9:5060", TransportKind::Tcp)));
        assert!(admits(&t, &flow("192.0.2.9:5070", TransportKind::Tcp)));
        t.enabled = false;
        assert!(!admits(&t, &flow("192.0.2.9:5070", TransportKind::Tcp)));
    }
}
