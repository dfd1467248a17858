//! Where configuration a customer controls may make the nodes send SIP. A dialplan's
//! `sip:` URI, and a provider account's registrar and outbound proxy, name hosts of the
//! customer's choosing; unchecked, a customer's token would make the nodes a scanner of
//! the network they run in (REGISTERs and INVITEs to loopback, private or link-local
//! addresses, with what those answer shown back in a status). So those targets must be on
//! the public internet, judged on the addresses DNS gave (a public name that resolves
//! inside does not pass), unless the operator lists a network as reachable
//! (`registration_agent.private_networks` for providers, `app_server.uri_private_targets`
//! for dialled URIs).

use std::net::IpAddr;

use crate::config::parse_network;
use crate::stack::transport::flood::in_network;

/// The networks outside the public internet that provider accounts may reach.
#[derive(Clone, Debug, Default)]
pub struct Reach {
    private: Vec<(IpAddr, u8)>,
}

/// Public addresses only.
pub static PUBLIC_ONLY: Reach = Reach {
    private: Vec::new(),
};

impl Reach {
    /// From `registration_agent.private_networks` (validated with the config; an entry
    /// that does not parse reaches nothing).
    pub fn from_config(networks: &[String]) -> Reach {
        Reach {
            private: networks
                .iter()
                .filter_map(|n| parse_network(n).ok())
                .collect(),
        }
    }

    /// Whether a provider account may send to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        is_public(ip)
            || self
                .private
                .iter()
                .any(|&(net, len)| in_network(ip, net, len))
    }
}

/// Whether `ip` is an address on the public internet: not loopback, private, shared,
/// link-local, unique-local, unspecified, broadcast, multicast or documentation.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0))
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            // Addresses that carry an IPv4 address reach it: judged by that address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(v4.into());
            }
            if s[..6] == [0; 6] && s[6] != 0 {
                return is_public(embedded(s[6], s[7]).into()); // IPv4-compatible
            }
            if s[0] == 0x0064 && s[1] == 0xff9b {
                return is_public(embedded(s[6], s[7]).into()); // NAT64 (64:ff9b::/96, ::1:/48)
            }
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]).into()); // 6to4
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
                || (s[0] == 0x0100 && s[1..4] == [0; 3])) // discard-only
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_public, Reach};

    #[test]
    fn a_listed_private_network_is_reached_and_no_other() {
        let reach = Reach::from_config(&["10.20.0.0/16".into(), "fd00::/8".into()]);
        for a in ["10.20.1.2", "fd00::5", "8.8.8.8"] {
            assert!(reach.allows(a.parse().unwrap()), "{a}");
        }
        for a in [
            "10.21.0.1",
            "127.0.0.1",
            "::1",
            "::ffff:10.21.0.1",
            "192.168.0.1",
        ] {
            assert!(!reach.allows(a.parse().unwrap()), "{a}");
        }
        assert!(!Reach::default().allows("10.20.1.2".parse().unwrap()));
    }

    #[test]
    fn only_public_addresses_are_public_however_they_are_written() {
        for a in [
            "8.8.8.8",
            "2a00:1450:4001::1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "169.254.1.1",
            "198.18.0.1",
            "192.0.0.8",
            "240.0.0.1",
            "0.1.2.3",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "2001:db8::1",
            "2001::1",
            "100::1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
    }
}
