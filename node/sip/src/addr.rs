//! IP addresses and ports written as `Display` writes them, without `core::fmt`. Every
//! REGISTER writes several (the Via's `received` and `rport`, the client a nonce is bound
//! to, the flow a binding stores), and going through `fmt` for each cost a few percent of
//! a loaded node's SIP thread (BENCHMARKS.md). IPv6 addresses, rare here, still use `fmt`.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A number in decimal, on the stack.
pub struct Decimal {
    buf: [u8; 10],
    start: usize,
}

impl Decimal {
    pub fn new(n: u32) -> Decimal {
        let mut d = Decimal {
            buf: [0; 10],
            start: 10,
        };
        let mut n = n;
        loop {
            d.start -= 1;
            d.buf[d.start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        d
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or_default()
    }
}

/// Appends `n` in decimal.
pub fn push_u16(out: &mut String, n: u16) {
    out.push_str(Decimal::new(n.into()).as_str());
}

/// An IPv4 address in dotted-quad form, on the stack.
pub struct Ipv4Text {
    buf: [u8; 15],
    len: usize,
}

impl Ipv4Text {
    pub fn new(ip: Ipv4Addr) -> Ipv4Text {
        let mut text = Ipv4Text {
            buf: [0; 15],
            len: 0,
        };
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                text.push(b'.');
            }
            if octet >= 100 {
                text.push(b'0' + octet / 100);
            }
            if octet >= 10 {
                text.push(b'0' + octet / 10 % 10);
            }
            text.push(b'0' + octet % 10);
        }
        text
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and dots are ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// Appends `ip` in dotted-quad form.
pub fn push_ipv4(out: &mut String, ip: Ipv4Addr) {
    out.push_str(Ipv4Text::new(ip).as_str());
}

/// Appends `ip` as `IpAddr`'s `Display` does (IPv6 without brackets).
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `ip` as `IpAddr`'s `Display` writes it.
pub fn ip_string(ip: IpAddr) -> String {
    let mut out = String::with_capacity(15);
    push_ip(&mut out, ip);
    out
}

/// `addr` as `SocketAddr`'s `Display` writes it (`192.0.2.1:5060`, `[2001:db8::1]:5060`).
pub fn socket_addr_string(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => {
            let mut out = String::with_capacity(21);
            push_ipv4(&mut out, *v4.ip());
            out.push(':');
            push_u16(&mut out, v4.port());
            out
        }
        SocketAddr::V6(_) => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_display_writes() {
        for n in [
            0u16, 1, 9, 10, 99, 100, 255, 999, 1000, 5060, 9999, 10000, 65535,
        ] {
            let mut s = String::new();
            push_u16(&mut s, n);
            assert_eq!(s, n.to_string());
        }
        for n in [0u32, 7, 4_294_967_295, 1_000_000_000, 123_456] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
        for octet in 0..=255u8 {
            let ip = Ipv4Addr::new(octet, 0, 99, octet / 3);
            assert_eq!(Ipv4Text::new(ip).as_str(), ip.to_string());
        }
        let ips: [IpAddr; 5] = [
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "192.0.2.255".parse().unwrap(),
            "10.20.100.9".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        for ip in ips {
            assert_eq!(ip_string(ip), ip.to_string());
            for port in [0, 5060, 65535] {
                let addr = SocketAddr::new(ip, port);
                assert_eq!(socket_addr_string(addr), addr.to_string());
            }
        }
    }
}
