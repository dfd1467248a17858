//! Fuzzes the SIP wire format: datagram parsing, stream framing, every typed accessor,
//! the receiver checks, error-response salvage, and the round-trip property that what
//! Tandem writes it can read back and writes identically. The stream framer is also fed
//! the input in pieces (their size from the first byte), as a connection reads it, and
//! must find exactly the frames one look at the whole finds.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem_sip::{frame_stream, Frame, HeaderName, Message, StreamFramer};

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
    let mut whole = Vec::new();
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
        whole.push(frame);
        rest = &rest[n..];
    }
    let whole_error = frame_stream(rest, MAX).is_err();

    // The same bytes in pieces, through one framer.
    let piece = usize::from(data.first().copied().unwrap_or(1) % 16) + 1;
    let mut framer = StreamFramer::new(MAX);
    let (mut buf, mut pieced, mut pieced_error) = (Vec::new(), Vec::new(), false);
    'feed: for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match framer.next(&buf) {
                Ok(Frame::Incomplete) => break,
                Ok(f) => {
                    let n = match f {
                        Frame::Message(n) | Frame::Ping(n) | Frame::Skip(n) => n,
                        Frame::Incomplete => unreachable!(),
                    };
                    pieced.push(f);
                    buf.drain(..n);
                }
                Err(_) => {
                    pieced_error = true;
                    break 'feed;
                }
            }
        }
    }
    // Line breaks between messages may be split differently depending on what has
    // arrived (a run of them is skipped in one piece or two, and four of them may read
    // as a keepalive ping); compare the messages and the bytes between them.
    // Line breaks after the last message may still be arriving, so a trailing span is
    // not compared.
    let (mut pieced, mut whole) = (separated(&pieced), separated(&whole));
    for v in [&mut pieced, &mut whole] {
        if matches!(v.last(), Some(Framed::Between(_))) {
            v.pop();
        }
    }
    // A framer that errs stops there, as the connection does; the messages before the
    // error are the same either way.
    let common = pieced.len().min(whole.len());
    let messages = |v: &[Framed]| v.iter().filter(|f| matches!(f, Framed::Message(_))).count();
    if pieced_error || whole_error {
        assert_eq!(messages(&pieced[..common]), messages(&whole[..common]));
    } else {
        assert_eq!(pieced, whole);
    }
});

#[derive(Debug, PartialEq)]
enum Framed {
    Message(usize),
    Between(usize),
}

/// Frames with every run of pings and skips merged into one span of bytes between
/// messages.
fn separated(frames: &[Frame]) -> Vec<Framed> {
    let mut out = Vec::new();
    for f in frames {
        match (f, out.last_mut()) {
            (Frame::Message(n), _) => out.push(Framed::Message(*n)),
            (Frame::Ping(n) | Frame::Skip(n), Some(Framed::Between(m))) => *m += n,
            (Frame::Ping(n) | Frame::Skip(n), _) => out.push(Framed::Between(*n)),
            (Frame::Incomplete, _) => {}
        }
    }
    out
}
