//! The little SDP a callback needs (RFC 3725): an answer that puts a session on hold
//! without media, and a description re-stamped with our own origin. Sans-IO, text in and
//! text out; everything else the app server passes through unchanged.
//!
//! A callback calls A without an offer, so A's 2xx carries the offer and our ACK must
//! carry an answer before B has answered. That answer is a "black hole" (RFC 3725 §4.2):
//! every stream of A's offer, accepted with the same format list but `inactive`, at
//! 0.0.0.0 port 9, so A sends no media until the re-INVITE that brings B's description.
//! That re-INVITE changes the description A holds from ours to B's; A must see one
//! origin for the session (RFC 3264 §8), so its `o=` line is replaced by ours with a
//! higher version.

/// Our origin for the sessions of one callback: the session id and the next version.
#[derive(Clone, Debug)]
pub struct Origin {
    pub session: u64,
    pub version: u64,
}

impl Origin {
    fn line(&self) -> String {
        format!("o=tandem {} {} IN IP4 0.0.0.0", self.session, self.version)
    }
}

/// The lines of a description, without their line ends; none if it is not text.
fn lines(sdp: &[u8]) -> Option<Vec<&str>> {
    let text = std::str::from_utf8(sdp).ok()?;
    Some(
        text.split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty())
            .collect(),
    )
}

/// The answer that holds every stream of `offer` without media: the same media lines
/// with the offer's format list (and their `rtpmap`/`fmtp` lines), `inactive`, at 0.0.0.0
/// port 9. A stream the offer refused (port 0) stays refused. None if `offer` has no
/// media line, a media line without formats, or encrypted media (SRTP or DTLS: its
/// answer needs keys of our own, and a callback has none), or is not text.
pub fn black_hole_answer(offer: &[u8], origin: &Origin) -> Option<Vec<u8>> {
    let lines = lines(offer)?;
    let mut out = vec![
        "v=0".to_owned(),
        origin.line(),
        "s=-".to_owned(),
        "c=IN IP4 0.0.0.0".to_owned(),
        "t=0 0".to_owned(),
    ];
    let mut media = 0;
    for line in &lines {
        if let Some(m) = line.strip_prefix("m=") {
            let mut parts = m.split_whitespace();
            let (Some(kind), Some(port), Some(proto)) = (parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            let formats: Vec<&str> = parts.collect();
            let proto_upper = proto.to_ascii_uppercase();
            if formats.is_empty() || proto_upper.contains("SAVP") || proto_upper.contains("TLS") {
                return None;
            }
            let port = if port.split('/').next() == Some("0") {
                "0"
            } else {
                "9"
            };
            out.push(format!("m={kind} {port} {proto} {}", formats.join(" ")));
            out.push("a=inactive".to_owned());
            media += 1;
        } else if media > 0 && (line.starts_with("a=rtpmap:") || line.starts_with("a=fmtp:")) {
            out.push((*line).to_owned());
        }
    }
    if media == 0 {
        return None;
    }
    Some(join(out))
}

/// `sdp` with its `o=` line replaced by `origin`'s (or one added after `v=`); none if it
/// is not text, or has no `v=` line first (not a session description).
pub fn with_origin(sdp: &[u8], origin: &Origin) -> Option<Vec<u8>> {
    let lines = lines(sdp)?;
    if !lines.first().is_some_and(|l| l.starts_with("v=")) {
        return None;
    }
    let mut out: Vec<String> = Vec::with_capacity(lines.len() + 1);
    let mut stamped = false;
    for line in lines {
        if line.starts_with("o=") {
            if !stamped {
                out.push(origin.line());
                stamped = true;
            }
        } else {
            out.push(line.to_owned());
            if line.starts_with("v=") && !stamped {
                out.push(origin.line());
                stamped = true;
            }
        }
    }
    Some(join(out))
}

fn join(lines: Vec<String>) -> Vec<u8> {
    let mut text = lines.join("\r\n");
    text.push_str("\r\n");
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=call\r\nc=IN IP4 127.0.0.1\r\n\
        t=0 0\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
        a=fmtp:101 0-16\r\na=sendrecv\r\nm=video 0 RTP/AVP 96\r\n";

    #[test]
    fn the_black_hole_answer_holds_every_stream_of_the_offer() {
        let origin = Origin {
            session: 7,
            version: 1,
        };
        let answer =
            String::from_utf8(black_hole_answer(OFFER.as_bytes(), &origin).unwrap()).unwrap();
        assert_eq!(
            answer,
            "v=0\r\no=tandem 7 1 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n\
             m=audio 9 RTP/AVP 0 8 101\r\na=inactive\r\na=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n\
             m=video 0 RTP/AVP 96\r\na=inactive\r\n"
        );
    }

    #[test]
    fn no_media_or_no_text_gives_no_answer() {
        let origin = Origin {
            session: 1,
            version: 1,
        };
        assert!(black_hole_answer(b"v=0\r\ns=-\r\n", &origin).is_none());
        assert!(black_hole_answer(&[0xff, 0xfe], &origin).is_none());
        assert!(black_hole_answer(b"m=audio\r\n", &origin).is_none());
        assert!(black_hole_answer(b"v=0\r\nm=audio 4000 RTP/AVP\r\n", &origin).is_none());
        for proto in ["RTP/SAVP", "UDP/TLS/RTP/SAVPF", "RTP/SAVPF"] {
            let offer = format!("v=0\r\nm=audio 4000 {proto} 0\r\n");
            assert!(
                black_hole_answer(offer.as_bytes(), &origin).is_none(),
                "{proto}"
            );
        }
    }

    #[test]
    fn the_origin_is_replaced_or_added() {
        let origin = Origin {
            session: 9,
            version: 2,
        };
        let out = String::from_utf8(with_origin(OFFER.as_bytes(), &origin).unwrap()).unwrap();
        assert!(out.starts_with("v=0\r\no=tandem 9 2 IN IP4 0.0.0.0\r\ns=call\r\n"));
        assert_eq!(out.matches("o=").count(), 1);
        let out = String::from_utf8(with_origin(b"v=0\ns=-\n", &origin).unwrap()).unwrap();
        assert_eq!(out, "v=0\r\no=tandem 9 2 IN IP4 0.0.0.0\r\ns=-\r\n");
        assert!(with_origin(b"--boundary\r\nv=0\r\n", &origin).is_none());
    }
}
