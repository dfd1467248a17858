//! One side of a back-to-back call as a dialog (RFC 3261 §12): what the app server needs
//! to send requests into it and to answer the requests that come out of it. Sans-IO: it
//! builds messages and reads them; `call.rs` sends them.
//!
//! A call has two legs. On the caller's leg (A) the app server is the UAS: the caller's
//! From is the remote side, the To with our tag the local one, and the route set is the
//! INVITE's Record-Route in order. On each leg it dials (B) it is the UAC: our From is the
//! local side, the callee's To with its tag the remote one, and the route set is the 2xx's
//! Record-Route reversed. Each leg has a Contact of its own, whose user part is the call's
//! token with the leg's letter: requests inside the call come back to this node with it.

use bytes::Bytes;
use tandem_sip::{HeaderName, Message, Method};

use crate::stack::transport::Flow;

/// The prefix of the Contact user part of every leg the app server runs.
pub const CONTACT_PREFIX: &str = "tdb-";

/// One dialog of a call.
#[derive(Clone, Debug)]
pub struct Leg {
    pub call_id: String,
    /// Our header value (From in our requests), tag included.
    pub local: String,
    /// The peer's header value (To in our requests), tag included.
    pub remote: String,
    /// The peer's tag, as parsed from that header.
    pub remote_tag: Option<String>,
    /// Where requests go: the peer's Contact URI.
    pub remote_target: String,
    /// Route values for our requests, in order.
    pub route_set: Vec<String>,
    /// The CSeq of our last request in this dialog.
    pub local_cseq: u32,
    /// Our Contact URI on this leg.
    pub contact: String,
    /// The flow the dialog was set up on; requests without a route set go out on it.
    pub flow: Flow,
}

/// The header values of a message, of one name, in order.
#[cfg(test)]
pub fn values(m: &Message, name: &HeaderName) -> Vec<String> {
    m.headers()
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// The first value of a header, as text.
pub fn value(m: &Message, name: &HeaderName) -> Option<String> {
    m.header(name).ok().flatten().map(|v| v.into_owned())
}

/// The URI inside the first Contact of `m`, without brackets or header parameters.
pub fn contact_uri(m: &Message) -> Option<String> {
    match m.contacts().ok()?? {
        tandem_sip::Contacts::List(list) => list.first().map(|c| c.uri.to_string()),
        tandem_sip::Contacts::Star => None,
    }
}

/// Route values from Record-Route headers (each line may hold several).
fn record_routes(m: &Message) -> Vec<String> {
    m.name_addrs(&HeaderName::RecordRoute)
        .unwrap_or_default()
        .iter()
        .map(|n| n.to_string())
        .collect()
}

impl Leg {
    /// The caller's leg, from its INVITE and our To tag.
    pub fn from_invite(invite: &Message, our_tag: &str, contact: String, flow: Flow) -> Leg {
        let to = value(invite, &HeaderName::To).unwrap_or_default();
        Leg {
            call_id: invite.call_id().map(|c| c.into_owned()).unwrap_or_default(),
            local: format!("{to};tag={our_tag}"),
            remote: value(invite, &HeaderName::From).unwrap_or_default(),
            remote_tag: invite.from().ok().and_then(|f| f.tag().map(str::to_owned)),
            remote_target: contact_uri(invite).unwrap_or_default(),
            route_set: record_routes(invite),
            local_cseq: 0,
            contact,
            flow,
        }
    }

    /// A leg we dialled, from the INVITE we sent and the 2xx that answered it.
    pub fn from_answer(invite: &Message, answer: &Message, contact: String, flow: Flow) -> Leg {
        let mut route_set = record_routes(answer);
        route_set.reverse();
        Leg {
            call_id: invite.call_id().map(|c| c.into_owned()).unwrap_or_default(),
            local: value(invite, &HeaderName::From).unwrap_or_default(),
            remote: value(answer, &HeaderName::To).unwrap_or_default(),
            remote_tag: answer.to().ok().and_then(|t| t.tag().map(str::to_owned)),
            remote_target: contact_uri(answer).unwrap_or_default(),
            route_set,
            local_cseq: invite.cseq().map(|c| c.seq).unwrap_or(1),
            contact,
            flow,
        }
    }

    /// A new request of ours in this dialog (CSeq one higher), with `body` of
    /// `content_type` and `extra` header lines (each ending in CRLF).
    pub fn request(
        &mut self,
        method: &Method,
        via: &str,
        extra: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Option<Message> {
        self.local_cseq += 1;
        let seq = self.local_cseq;
        self.build(method, seq, via, extra, content_type, body)
    }

    /// The ACK for a 2xx to our INVITE of CSeq `seq` (RFC 3261 §13.2.2.4): the same CSeq
    /// number, a new branch.
    pub fn ack(&self, seq: u32, via: &str) -> Option<Message> {
        self.build(&Method::Ack, seq, via, "", None, b"")
    }

    /// The ACK for a 2xx to our INVITE of CSeq `seq` that carried the offer (our INVITE had
    /// none): the ACK carries the answer (RFC 3261 §13.2.1).
    pub fn ack_with(
        &self,
        seq: u32,
        via: &str,
        content_type: &str,
        answer: &[u8],
    ) -> Option<Message> {
        self.build(&Method::Ack, seq, via, "", Some(content_type), answer)
    }

    fn build(
        &self,
        method: &Method,
        seq: u32,
        via: &str,
        extra: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Option<Message> {
        let mut text = format!(
            "{method} {target} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n",
            target = self.remote_target,
        );
        for r in &self.route_set {
            text.push_str(&format!("Route: {r}\r\n"));
        }
        text.push_str(&format!(
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {seq} {method}\r\n",
            self.local, self.remote, self.call_id
        ));
        if matches!(method, Method::Invite | Method::Update) {
            text.push_str(&format!("Contact: <{}>\r\n", self.contact));
        }
        text.push_str(extra);
        if let Some(t) = content_type {
            text.push_str(&format!("Content-Type: {t}\r\n"));
        }
        text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(body);
        // Every part comes from a parsed message; a peer's Contact that still makes an
        // unparseable request (it should not) leaves the request unsent, never a panic.
        Message::parse_datagram(Bytes::from(bytes), usize::MAX).ok()
    }

    /// Whether `request` comes from this leg's peer: its Call-ID, and its From tag the
    /// peer's tag (the phones of one account share a Call-ID, each with its own tag).
    pub fn sent_by_peer(&self, request: &Message) -> bool {
        request.call_id().ok().as_deref() == Some(self.call_id.as_str())
            && request
                .from()
                .ok()
                .and_then(|f| f.tag().map(str::to_owned))
                .is_some_and(|t| Some(t) == self.remote_tag)
    }

    /// Takes a new remote target from a target-refresh request or its answer (a re-INVITE
    /// or UPDATE, RFC 3261 §12.2.2).
    pub fn refresh_target(&mut self, m: &Message) {
        if let Some(uri) = contact_uri(m) {
            self.remote_target = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::transport::TransportKind;

    fn parse(text: &str) -> Message {
        Message::parse_datagram(Bytes::from(text.replace('\n', "\r\n")), usize::MAX).unwrap()
    }

    fn flow() -> Flow {
        Flow {
            transport: TransportKind::Udp,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: "127.0.0.1:5070".parse().unwrap(),
            connection: None,
        }
    }

    #[test]
    fn the_callers_leg_answers_along_its_record_route() {
        let invite = parse(
            "INVITE sip:0301234@example.com SIP/2.0\n\
             Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\n\
             Record-Route: <sip:edge@127.0.0.3:5060;lr>, <sip:x@127.0.0.2;lr>\n\
             From: \"Alice\" <sip:alice@example.com>;tag=a1\n\
             To: <sip:0301234@example.com>\n\
             Call-ID: c1\n\
             CSeq: 7 INVITE\n\
             Contact: <sip:alice@127.0.0.1:5070>\n\
             Content-Length: 0\n\n",
        );
        let mut a = Leg::from_invite(&invite, "t9", "sip:tdb-xa@127.0.0.1:5060".into(), flow());
        let bye = a
            .request(
                &Method::Bye,
                "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKb",
                "",
                None,
                b"",
            )
            .unwrap();
        assert_eq!(bye.uri().unwrap().to_string(), "sip:alice@127.0.0.1:5070");
        assert_eq!(
            values(&bye, &HeaderName::Route),
            ["<sip:edge@127.0.0.3:5060;lr>", "<sip:x@127.0.0.2;lr>"]
        );
        assert_eq!(
            value(&bye, &HeaderName::From).unwrap(),
            "<sip:0301234@example.com>;tag=t9"
        );
        assert_eq!(
            value(&bye, &HeaderName::To).unwrap(),
            "\"Alice\" <sip:alice@example.com>;tag=a1"
        );
        assert_eq!(bye.cseq().unwrap().seq, 1);
    }

    #[test]
    fn a_dialled_leg_routes_along_the_reversed_record_route() {
        let invite = parse(
            "INVITE sip:0301234@provider.test SIP/2.0\n\
             Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK2\n\
             From: <sip:u0@provider.test>;tag=b1\n\
             To: <sip:0301234@provider.test>\n\
             Call-ID: c2\n\
             CSeq: 3 INVITE\n\
             Content-Length: 0\n\n",
        );
        let ok = parse(
            "SIP/2.0 200 OK\n\
             Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK2\n\
             Record-Route: <sip:p2@192.0.2.2;lr>\n\
             Record-Route: <sip:p1@192.0.2.1;lr>\n\
             From: <sip:u0@provider.test>;tag=b1\n\
             To: <sip:0301234@provider.test>;tag=callee\n\
             Call-ID: c2\n\
             CSeq: 3 INVITE\n\
             Contact: <sip:callee@192.0.2.9:5060>\n\
             Content-Length: 0\n\n",
        );
        let b = Leg::from_answer(&invite, &ok, "sip:tdb-xb@127.0.0.1:5060".into(), flow());
        let ack = b
            .ack(3, "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKa")
            .unwrap();
        assert_eq!(ack.cseq().unwrap().seq, 3);
        assert_eq!(ack.method(), Some(&Method::Ack));
        assert_eq!(
            values(&ack, &HeaderName::Route),
            ["<sip:p1@192.0.2.1;lr>", "<sip:p2@192.0.2.2;lr>"]
        );
        assert_eq!(
            value(&ack, &HeaderName::To).unwrap(),
            "<sip:0301234@provider.test>;tag=callee"
        );
        let mut b = b;
        let reinvite = b
            .request(
                &Method::Invite,
                "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKr",
                "",
                Some("application/sdp"),
                b"v=0\r\n",
            )
            .unwrap();
        assert_eq!(reinvite.cseq().unwrap().seq, 4);
        assert_eq!(reinvite.body(), b"v=0\r\n");
        assert_eq!(
            value(&reinvite, &HeaderName::Contact).unwrap(),
            "<sip:tdb-xb@127.0.0.1:5060>"
        );
    }
}
