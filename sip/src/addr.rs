//! IP addresses and ports written as `Display` writes them, without `core::fmt`. Every
//! REGISTER writes several (the Via's `received` and `rport`, the client a nonce is bound
//! to, the flow a binding stores), and going through `fmt` for each cost a few percent of
//! a loaded node's SIP thread (BENCHMARKS.md). IPv6 addresses, rare here, still use `fmt`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Up to `N` ASCII bytes on the stack: a number or an address as it is written.
pub struct AsciiText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> AsciiText<N> {
    fn new() -> Self {
        AsciiText {
            buf: [0; N],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn push_decimal(&mut self, n: u32) {
        let start = self.len;
        let mut n = n;
        loop {
            self.push(b'0' + (n % 10) as u8);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.buf[start..self.len].reverse();
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and dots are ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// `n` in decimal.
pub fn decimal(n: u32) -> AsciiText<10> {
    let mut text = AsciiText::new();
    text.push_decimal(n);
    text
}

/// `ip` in dotted-quad form.
pub fn ipv4(ip: Ipv4Addr) -> AsciiText<15> {
    let mut text = AsciiText::new();
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text.push(b'.');
        }
        text.push_decimal(octet.into());
    }
    text
}

/// `ip` as `IpAddr`'s `Display` writes it (IPv6 without brackets).
pub fn ip_string(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => ipv4(v4).as_str().to_owned(),
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// `addr` as `SocketAddr`'s `Display` writes it (`192.0.2.1:5060`, `[2001:db8::1]:5060`).
pub fn socket_addr_string(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => {
            let mut out = String::with_capacity(21);
            out.push_str(ipv4(*v4.ip()).as_str());
            out.push(':');
            out.push_str(decimal(v4.port().into()).as_str());
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
            0u32,
            1,
            9,
            10,
            99,
            100,
            255,
            5060,
            65535,
            123_456,
            1_000_000_000,
            4_294_967_295,
        ] {
            assert_eq!(decimal(n).as_str(), n.to_string());
        }
        for octet in 0..=255u8 {
            let ip = Ipv4Addr::new(octet, 0, 99, octet / 3);
            assert_eq!(ipv4(ip).as_str(), ip.to_string());
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
