//! STUN keepalives on the SIP UDP port (RFC 5626 §4.4.2, §8; STUN itself is RFC 5389).
//!
//! A phone that sends SIP over UDP learns that its flow to a node died only when a request
//! times out, which for a REGISTER refresh is up to 32 s after the refresh was due. RFC 5626
//! lets the phone ask sooner: it sends a STUN Binding request over the flow every few
//! seconds, and a flow that stops answering is dead, so the phone re-registers through the
//! next server its DNS SRV records name at once. This module is that answer, without I/O:
//! [`binding_response`] turns one datagram into the Binding success response to send back,
//! or `None` when the datagram is not a Binding request we answer.
//!
//! Every packet on the SIP port is hostile, so the answer is deliberately small: only a
//! Binding request (no other method, no indication), and only one whose attributes we may
//! ignore (every comprehension-required attribute makes us drop it rather than answer 420,
//! which would echo attribute types back). The response carries XOR-MAPPED-ADDRESS and
//! nothing else: 32 bytes for an IPv4 source (44 for IPv6) against a request of at least
//! 20, so a forged source gains at most 1.6 (2.2) times its bytes, and the caller counts
//! the request against the source's flood limit like any SIP request.

use std::net::{IpAddr, SocketAddr};

/// The fixed value every STUN message of RFC 5389 carries at bytes 4 to 8.
const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// Whether `datagram` is shaped like a STUN message (RFC 5389 §6: the two top bits zero and
/// the magic cookie), so it is never taken for SIP, whose messages start with a letter.
pub fn looks_like_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER
        && datagram[0] & 0xC0 == 0
        && u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]) == MAGIC_COOKIE
}

/// The Binding success response to `request` from `from`, or `None` if the request is not
/// a well-formed Binding request whose attributes may all be ignored.
pub fn binding_response(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    if !looks_like_stun(request) {
        return None;
    }
    let kind = u16::from_be_bytes([request[0], request[1]]);
    let length = usize::from(u16::from_be_bytes([request[2], request[3]]));
    if kind != BINDING_REQUEST || length % 4 != 0 || HEADER + length != request.len() {
        return None;
    }
    let mut attributes = &request[HEADER..];
    while !attributes.is_empty() {
        if attributes.len() < 4 {
            return None;
        }
        let kind = u16::from_be_bytes([attributes[0], attributes[1]]);
        let len = usize::from(u16::from_be_bytes([attributes[2], attributes[3]]));
        let padded = len.div_ceil(4) * 4;
        if kind < 0x8000 || attributes.len() < 4 + padded {
            return None;
        }
        attributes = &attributes[4 + padded..];
    }
    let transaction = &request[8..HEADER];
    let port = from.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut value = vec![0u8];
    match from.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            let x = u32::from(ip) ^ MAGIC_COOKIE;
            value.extend_from_slice(&x.to_be_bytes());
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mut mask = MAGIC_COOKIE.to_be_bytes().to_vec();
            mask.extend_from_slice(transaction);
            value.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m));
        }
    }
    let mut out = Vec::with_capacity(HEADER + 4 + value.len());
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(transaction);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(&value);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(attributes: &[u8]) -> Vec<u8> {
        let mut r = vec![0x00, 0x01];
        r.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        r.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        r.extend_from_slice(b"0123456789ab");
        r.extend_from_slice(attributes);
        r
    }

    #[test]
    fn a_binding_request_gets_the_source_address_xored_back() {
        let from: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let r = binding_response(&request(&[]), from).unwrap();
        assert_eq!(r.len(), 32);
        assert_eq!(&r[0..2], &[0x01, 0x01]);
        assert_eq!(&r[2..4], &[0x00, 0x0c]);
        assert_eq!(&r[8..20], b"0123456789ab");
        assert_eq!(&r[20..24], &[0x00, 0x20, 0x00, 0x08]);
        // RFC 5769 §2.2's mapping: port 32853 -> 0xa147, 192.0.2.1 -> 0xe112a643.
        assert_eq!(
            &r[24..32],
            &[0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]
        );

        let from6: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap();
        let r = binding_response(&request(&[]), from6).unwrap();
        assert_eq!(r.len(), 44);
        // The first four address bytes are xored with the cookie, the rest with the id.
        assert_eq!(&r[28..32], &[0x01, 0x13, 0xa9, 0xfa]);
        assert_eq!(r[32], 0x12 ^ b'0');
    }

    #[test]
    fn ignorable_attributes_are_skipped_and_anything_else_is_not_answered() {
        let from: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        // SOFTWARE (comprehension-optional), three bytes padded to four.
        let software = [0x80, 0x22, 0x00, 0x03, b'a', b'b', b'c', 0];
        assert!(binding_response(&request(&software), from).is_some());
        // USERNAME is comprehension-required: dropped, never echoed in a 420.
        let username = [0x00, 0x06, 0x00, 0x04, b'u', b's', b'e', b'r'];
        assert!(binding_response(&request(&username), from).is_none());
        // An attribute longer than the message, a length not a multiple of four, a
        // truncated header, another method, a response, no cookie, SIP text.
        assert!(binding_response(&request(&[0x80, 0x22, 0x00, 0x09, 0, 0, 0, 0]), from).is_none());
        let mut odd = request(&[]);
        odd[3] = 2;
        odd.extend_from_slice(&[0, 0]);
        assert!(binding_response(&odd, from).is_none());
        assert!(binding_response(&request(&[])[..19], from).is_none());
        let mut allocate = request(&[]);
        allocate[1] = 0x03;
        assert!(binding_response(&allocate, from).is_none());
        let mut success = request(&[]);
        success[0] = 0x01;
        assert!(binding_response(&success, from).is_none());
        let mut classic = request(&[]);
        classic[4] = 0;
        assert!(!looks_like_stun(&classic));
        assert!(binding_response(&classic, from).is_none());
        assert!(!looks_like_stun(b"OPTIONS sip:x SIP/2.0\r\n\r\n"));
    }
}
