//! How Tandem answers: every response it writes carries Date (RFC 1123, always GMT) and
//! Server; To tags are derived from the request so retransmitted requests get the same tag;
//! and this is the one place where a parse or validation error becomes a status code.

use std::hash::{Hash, Hasher};

use bytes::Bytes;
use tandem_sip::{Error as SipError, HeaderName, Message};

/// `Server` and `User-Agent` value.
pub const SERVER: &str = concat!("Tandem/", env!("CARGO_PKG_VERSION"));

/// Adds Date and Server to a response Tandem wrote.
pub fn stamp(response: &mut Message) {
    response.push_header(HeaderName::Date, date_now());
    response.push_header(HeaderName::Server, SERVER);
}

/// The Date value for now. It changes once a second, so each thread formats it once a
/// second and shares the bytes.
fn date_now() -> Bytes {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, Bytes)> = const { RefCell::new((u64::MAX, Bytes::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE.with_borrow_mut(|(at, date)| {
        if *at != second {
            *date = Bytes::from(tandem_sip::format_date(now));
            *at = second;
        }
        date.clone()
    })
}

/// A To tag that is the same for every retransmission of a request. The hash needs no
/// key (nothing depends on a peer not guessing the tag) and this runs for most responses,
/// so it is FxHash, written out without `fmt`.
pub fn to_tag(request: &Message) -> String {
    let mut h = rustc_hash::FxHasher::default();
    if let Ok(id) = request.call_id() {
        id.hash(&mut h);
    }
    if let Ok(Some(from)) = request.header(&HeaderName::From) {
        from.hash(&mut h);
    }
    if let Ok(via) = request.top_via() {
        via.branch().hash(&mut h);
    }
    // The low 48 bits, as twelve hex digits.
    let mut tag = String::from("td");
    tag.push_str(&crate::hex::encode(&h.finish().to_be_bytes()[2..]));
    tag
}

/// A response to `request` with Date, Server and (above 100) a To tag.
pub fn build(request: &Message, status: u16, reason: &str) -> Message {
    let mut r = Message::response_to(request, status, reason);
    // The request's To is parsed already (validation read it); the copy is not.
    if status > 100 && request.to().is_ok_and(|to| to.tag().is_none()) {
        let _ = r.append_to_tag(&to_tag(request));
    }
    stamp(&mut r);
    r
}

/// The status and reason phrase for a message that failed parsing or validation.
pub fn status_for(error: &SipError) -> (u16, String) {
    match error {
        SipError::Version => (505, "Version Not Supported".into()),
        SipError::TooLarge { .. } => (513, "Message Too Large".into()),
        other => (
            400,
            format!("Bad Request ({})", reason_text(&other.to_string())),
        ),
    }
}

/// A reason phrase must stay on one line and should stay short.
fn reason_text(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn date_is_rfc1123_and_tags_are_stable() {
        let req = Message::parse_datagram(
            Bytes::from_static(b"OPTIONS sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n"),
            65535,
        )
        .unwrap();
        let a = build(&req, 200, "OK");
        let b = build(&req, 200, "OK");
        assert_eq!(a.to().unwrap().tag(), b.to().unwrap().tag());
        let date = a.header(&HeaderName::Date).unwrap().unwrap().into_owned();
        // e.g. "Sun, 08 Nov 2009 12:12:21 GMT"
        assert_eq!(date.len(), 29, "{date}");
        assert!(
            date.ends_with(" GMT") && date.as_bytes()[3] == b',',
            "{date}"
        );
        assert!(httpdate::parse_http_date(&date).is_ok());
        assert_eq!(a.header(&HeaderName::Server).unwrap().unwrap(), SERVER);
        assert!(build(&req, 100, "Trying").to().unwrap().tag().is_none());
    }

    #[test]
    fn a_cancel_and_its_invite_get_one_tag_and_other_branches_another() {
        // RFC 3261 §9.2: the CANCEL carries the INVITE's top Via value alone.
        let parse = |via: &str| {
            Message::parse_datagram(
                Bytes::from(format!("INVITE sip:x@y SIP/2.0\r\nVia: {via}\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n")),
                65535,
            )
            .unwrap()
        };
        let invite = parse("SIP/2.0/UDP p;branch=z9hG4bKp, SIP/2.0/UDP u;branch=z9hG4bKu");
        assert_eq!(
            to_tag(&invite),
            to_tag(&parse("SIP/2.0/UDP p;branch=z9hG4bKp"))
        );
        assert_ne!(
            to_tag(&invite),
            to_tag(&parse("SIP/2.0/UDP p;branch=z9hG4bKq"))
        );
    }

    #[test]
    fn errors_map_to_status_codes() {
        assert_eq!(status_for(&SipError::Version).0, 505);
        let (code, reason) = status_for(&SipError::Missing("Call-ID"));
        assert_eq!(code, 400);
        assert_eq!(reason, "Bad Request (missing Call-ID header)");
    }
}
