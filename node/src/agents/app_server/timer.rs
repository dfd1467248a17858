//! Session timers (RFC 4028) on each leg of an app server call. Sans-IO: what a leg
//! negotiated, the header lines that say so, and when a refresh is due or the session has
//! expired; `call.rs` sends and waits.
//!
//! The app server is a user agent on each leg, so each leg has a timer of its own, and
//! a refresh is answered on the leg it came from, never passed across: a provider that
//! refreshes by UPDATE must not depend on the phone at the other end supporting UPDATE.
//! A leg whose peer is the refresher and lets the session expire has gone, and the call
//! is ended on both legs, so a leg that vanished without a BYE costs no more than one
//! interval.
//!
//! Roles in the `refresher` parameter are the transaction's: in a request we send, `uac`
//! is us; in a response we send, `uac` is the peer. [`Refresher`] names the party instead.

use std::time::Duration;

use tandem_sip::{HeaderName, Message};

/// The smallest interval RFC 4028 allows, and our Min-SE.
pub const MIN_SE: u32 = 90;

/// Who keeps a leg's session alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresher {
    Us,
    Peer,
}

/// What one leg negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionTimer {
    /// Seconds.
    pub interval: u32,
    pub refresher: Refresher,
    /// Whether the peer said `Supported: timer` (then our 2xx carries `Require: timer`).
    pub peer_supports: bool,
}

/// `Session-Expires` of `m`: the interval and the `refresher` parameter, lowercase.
fn session_expires(m: &Message) -> Option<(u32, Option<String>)> {
    let v = m.header(&HeaderName::SessionExpires).ok()??;
    let mut parts = v.split(';');
    let delta = parts.next()?.trim().parse::<u32>().ok()?;
    let refresher = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("refresher")
            .then(|| v.trim().to_ascii_lowercase())
    });
    Some((delta, refresher))
}

/// Whether `m` lists the `timer` option tag in Supported or Require.
pub fn supports_timer(m: &Message) -> bool {
    [HeaderName::Supported, HeaderName::Require]
        .iter()
        .any(|h| {
            m.tokens(h)
                .unwrap_or_default()
                .iter()
                .any(|t| t.eq_ignore_ascii_case("timer"))
        })
}

/// The `Min-SE` of a 422, if it names one we can meet (at most a day).
pub fn min_se(m: &Message) -> Option<u32> {
    m.header(&HeaderName::from("Min-SE"))
        .ok()??
        .split(';')
        .next()?
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|s| (MIN_SE..=86_400).contains(s))
}

/// The header lines of an INVITE of ours that asks for session timers of `interval`.
pub fn offer_lines(interval: u32) -> String {
    format!("Supported: timer\r\nSession-Expires: {interval}\r\nMin-SE: {MIN_SE}\r\n")
}

impl SessionTimer {
    /// The caller's leg, from its INVITE (or a refresh of it), with `ours` (seconds) as
    /// the interval when the caller names none. None when the caller neither supports
    /// timers nor asks for one, or when `ours` is 0 (timers off).
    pub fn for_request(request: &Message, ours: u32) -> Option<SessionTimer> {
        if ours == 0 {
            return None;
        }
        let peer_supports = supports_timer(request);
        let asked = session_expires(request);
        if !peer_supports && asked.is_none() {
            return None;
        }
        let (interval, refresher) = match asked {
            // An interval below the minimum breaks RFC 4028 §4; taken as the minimum.
            Some((delta, r)) => (delta.max(MIN_SE), r),
            None => (ours, None),
        };
        let refresher = match refresher.as_deref() {
            Some("uac") if peer_supports => Refresher::Peer,
            Some("uas") => Refresher::Us,
            // A caller without support cannot refresh: we do.
            _ if peer_supports => Refresher::Peer,
            _ => Refresher::Us,
        };
        Some(SessionTimer {
            interval,
            refresher,
            peer_supports,
        })
    }

    /// A leg we dialled, from the 2xx to our INVITE (which offered timers): none if the
    /// answer has no Session-Expires (the callee does not use them).
    pub fn for_answer(answer: &Message) -> Option<SessionTimer> {
        let (delta, refresher) = session_expires(answer)?;
        Some(SessionTimer {
            interval: delta.max(MIN_SE),
            refresher: match refresher.as_deref() {
                Some("uas") => Refresher::Peer,
                _ => Refresher::Us,
            },
            peer_supports: supports_timer(answer),
        })
    }

    /// The headers of a 2xx of ours to the peer's INVITE or UPDATE.
    pub fn response_headers(&self) -> Vec<(HeaderName, String)> {
        let who = match self.refresher {
            Refresher::Peer => "uac",
            Refresher::Us => "uas",
        };
        let mut headers = vec![(
            HeaderName::SessionExpires,
            format!("{};refresher={who}", self.interval),
        )];
        if self.peer_supports {
            headers.push((HeaderName::Require, "timer".into()));
        }
        headers
    }

    /// The header lines of an INVITE or UPDATE of ours inside the leg.
    pub fn request_lines(&self) -> String {
        let who = match self.refresher {
            Refresher::Us => "uac",
            Refresher::Peer => "uas",
        };
        format!(
            "Supported: timer\r\nSession-Expires: {};refresher={who}\r\n",
            self.interval
        )
    }

    /// From the last refresh to the next thing to do: our refresh at half the interval,
    /// or, when the peer refreshes, the session's end a little before the interval is up
    /// (RFC 4028 §10: the interval less a third of it, at most 32 seconds).
    pub fn due_after(&self) -> Duration {
        let s = u64::from(self.interval);
        match self.refresher {
            Refresher::Us => Duration::from_secs(s / 2),
            Refresher::Peer => Duration::from_secs(s - (s / 3).min(32)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn invite(extra: &str) -> Message {
        let text = format!(
            "INVITE sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: c\r\n\
             CSeq: 1 INVITE\r\nMax-Forwards: 70\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        Message::parse_datagram(Bytes::from(text), 65535).unwrap()
    }

    fn ok(extra: &str) -> Message {
        let text = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\nCall-ID: c\r\n\
             CSeq: 1 INVITE\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        Message::parse_datagram(Bytes::from(text), 65535).unwrap()
    }

    #[test]
    fn a_caller_that_supports_timers_refreshes_at_its_interval() {
        let t = SessionTimer::for_request(
            &invite("Supported: timer, 100rel\r\nSession-Expires: 120;refresher=uac\r\n"),
            1800,
        )
        .unwrap();
        assert_eq!(
            t,
            SessionTimer {
                interval: 120,
                refresher: Refresher::Peer,
                peer_supports: true
            }
        );
        assert_eq!(
            t.response_headers(),
            [
                (HeaderName::SessionExpires, "120;refresher=uac".to_owned()),
                (HeaderName::Require, "timer".to_owned())
            ]
        );
        assert_eq!(t.due_after(), Duration::from_secs(88));
        // Compact form, no refresher named: the caller that supports timers refreshes.
        let t = SessionTimer::for_request(&invite("k: timer\r\nx: 600\r\n"), 1800).unwrap();
        assert_eq!((t.interval, t.refresher), (600, Refresher::Peer));
    }

    #[test]
    fn a_caller_without_support_is_refreshed_by_us_or_not_at_all() {
        let t = SessionTimer::for_request(&invite("Session-Expires: 30\r\n"), 1800).unwrap();
        assert_eq!(
            (t.interval, t.refresher, t.peer_supports),
            (MIN_SE, Refresher::Us, false)
        );
        assert_eq!(
            t.response_headers(),
            [(HeaderName::SessionExpires, "90;refresher=uas".to_owned())]
        );
        assert_eq!(t.due_after(), Duration::from_secs(45));
        assert_eq!(SessionTimer::for_request(&invite(""), 1800), None);
        assert_eq!(
            SessionTimer::for_request(&invite("Supported: timer\r\n"), 0),
            None,
            "timers off"
        );
        let t = SessionTimer::for_request(&invite("Supported: timer\r\n"), 1800).unwrap();
        assert_eq!((t.interval, t.refresher), (1800, Refresher::Peer));
    }

    #[test]
    fn the_callees_answer_decides_its_leg() {
        let t = SessionTimer::for_answer(&ok("Session-Expires: 900;refresher=uac\r\n")).unwrap();
        assert_eq!((t.interval, t.refresher), (900, Refresher::Us));
        assert_eq!(
            t.request_lines(),
            "Supported: timer\r\nSession-Expires: 900;refresher=uac\r\n"
        );
        let t = SessionTimer::for_answer(&ok(
            "Require: timer\r\nSession-Expires: 900; refresher=UAS\r\n",
        ))
        .unwrap();
        assert_eq!((t.refresher, t.peer_supports), (Refresher::Peer, true));
        assert_eq!(SessionTimer::for_answer(&ok("")), None);
        assert_eq!(
            SessionTimer::for_answer(&ok("Session-Expires: soon\r\n")),
            None
        );
    }

    #[test]
    fn a_422_names_the_interval_to_retry_with() {
        assert_eq!(min_se(&ok("Min-SE: 1200\r\n")), Some(1200));
        assert_eq!(min_se(&ok("Min-SE: 999999\r\n")), None);
        assert_eq!(min_se(&ok("")), None);
        assert_eq!(
            offer_lines(1800),
            "Supported: timer\r\nSession-Expires: 1800\r\nMin-SE: 90\r\n"
        );
    }
}
