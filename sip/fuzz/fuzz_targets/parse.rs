//! Fuzzes the SIP wire format: datagram parsing, stream framing, every typed accessor,
//! the receiver checks, error-response salvage, and the round-trip property that what
//! Tandem writes it can read back and writes identically.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem_sip::{frame_stream, Frame, HeaderName, Message};

const MAX: usize = 65_535;

fn exercise(m: &Message) {
    let _ = m.validate_request();
    let _ = m.validate_response();
    let _ = m.vias();
    let _ = m.top_via();
    let _ = m.from();
    let _ = m.to();
    let _ = m.call_id();
    let _ = m.cseq();
    let _ = m.max_forwards();
    let _ = m.contacts();
    let _ = m.expires();
    for name in [HeaderName::Route, HeaderName::RecordRoute, HeaderName::Path] {
        let _ = m.name_addrs(&name);
    }
    for name in [HeaderName::Authorization, HeaderName::ProxyAuthorization, HeaderName::WwwAuthenticate, HeaderName::ProxyAuthenticate] {
        let _ = m.auth_headers(&name);
    }
    let _ = m.tokens(&HeaderName::Require);
    let _ = m.content_type();
    let mut copy = m.clone();
    if let Ok(via) = copy.top_via().cloned() {
        let _ = copy.replace_top_via(via);
    }
    let _ = copy.pop_first_value(&HeaderName::Via);
    let _ = copy.add_to_tag("fuzz");
    let _ = copy.to_bytes();
}

fuzz_target!(|data: &[u8]| {
    let raw = Bytes::copy_from_slice(data);
    match Message::parse_datagram(raw.clone(), MAX) {
        Ok(m) => {
            exercise(&m);
            let once = m.to_bytes();
            let again = Message::parse_datagram(once.clone(), MAX)
                .expect("a message Tandem wrote must parse again");
            assert_eq!(again.to_bytes(), once, "serialisation must be stable");
        }
        Err(_) => {
            let _ = Message::error_response_for_unparseable(&raw, 400, "Bad Request");
        }
    }
    let mut rest = data;
    while let Ok(frame) = frame_stream(rest, MAX) {
        let n = match frame {
            Frame::Incomplete => break,
            Frame::Ping(n) | Frame::Skip(n) => n,
            Frame::Message(n) => {
                if let Ok(m) = Message::parse_stream(Bytes::copy_from_slice(&rest[..n])) {
                    exercise(&m);
                }
                n
            }
        };
        assert!(n > 0 && n <= rest.len());
        rest = &rest[n..];
    }
});
