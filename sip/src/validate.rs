//! The checks every receiver makes before acting on a message (RFC 3261 §8.2, §16.3 step 1,
//! and the rejections RFC 4475 §3.1.2 and §3.3 expect): required headers present,
//! single-valued headers single, every interpreted header well formed, CSeq matching the
//! method. Semantic decisions that depend on the receiver (416, 420, 483) stay with the node.

use crate::name::{HeaderName, Method};
use crate::uri::Uri;
use crate::{Error, Message};

impl Message {
    /// Checks a request. `Err(Error::Version)` means 505; any other error means 400.
    pub fn validate_request(&self) -> Result<(), Error> {
        let method = self
            .method()
            .ok_or(Error::StartLine("a response is not a request"))?;
        if !self.version().eq_ignore_ascii_case(b"SIP/2.0") {
            return Err(Error::Version);
        }
        if let Some(Uri::Sip(u)) = self.uri() {
            // RFC 3261 §19.1.5 and table 1: headers are not allowed in a Request-URI.
            if !u.headers.is_empty() {
                return Err(Error::Uri("a Request-URI must not carry headers"));
            }
        }
        self.validate_common()?;
        let cseq = self.cseq()?;
        if &cseq.method != method {
            return Err(Error::CSeqMismatch);
        }
        self.max_forwards()?;
        if !matches!(method, Method::Ack | Method::Cancel) {
            self.contacts()?;
        }
        self.expires()?;
        self.delta_seconds(HeaderName::MinExpires)?;
        self.name_addrs(&HeaderName::Route)?;
        self.name_addrs(&HeaderName::RecordRoute)?;
        self.name_addrs(&HeaderName::Path)?;
        self.tokens(&HeaderName::Require)?;
        self.tokens(&HeaderName::ProxyRequire)?;
        Ok(())
    }

    /// Checks a response before a client transaction or the proxy acts on it.
    pub fn validate_response(&self) -> Result<(), Error> {
        if self.is_request() {
            return Err(Error::StartLine("a request is not a response"));
        }
        self.validate_common()?;
        self.cseq()?;
        Ok(())
    }

    fn validate_common(&self) -> Result<(), Error> {
        for (name, label) in [
            (HeaderName::Via, "Via"),
            (HeaderName::From, "From"),
            (HeaderName::To, "To"),
        ] {
            if !self.has_header(&name) {
                return Err(Error::Missing(label));
            }
        }
        // The top Via is parsed (and kept) by top_via; the rest are only checked.
        self.top_via()?;
        let mut below_top = false;
        self.for_each_value(&HeaderName::Via, |v| {
            if below_top {
                crate::headers::Via::parse(v)?;
            }
            below_top = true;
            Ok(())
        })?;
        self.from()?;
        self.to()?;
        self.call_id()?;
        self.content_type()?;
        if let Some(date) = self.header(&HeaderName::Date)? {
            // SIP-date is RFC 1123 and always GMT (RFC 3261 §20.17).
            if !date.ends_with(" GMT") || httpdate::parse_http_date(&date).is_err() {
                return Err(Error::Header {
                    name: "Date",
                    reason: "not an RFC 1123 date in GMT",
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn check(text: &str) -> Result<(), Error> {
        Message::parse_datagram(Bytes::from(text.replace('\n', "\r\n")), 65535)?.validate_request()
    }

    const GOOD: &str = "OPTIONS sip:x@example.com SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nFrom: <sip:a@b>;tag=1\nTo: <sip:x@example.com>\nCall-ID: c1\nCSeq: 1 OPTIONS\nMax-Forwards: 70\n\n";

    #[test]
    fn accepts_a_plain_request() {
        check(GOOD).unwrap();
    }

    #[test]
    fn rejects_what_receivers_must_reject() {
        assert_eq!(
            check(&GOOD.replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE")),
            Err(Error::CSeqMismatch)
        );
        assert_eq!(
            check(&GOOD.replace("SIP/2.0\n", "SIP/7.0\n")),
            Err(Error::Version)
        );
        assert_eq!(
            check(&GOOD.replace("Call-ID: c1\n", "")),
            Err(Error::Missing("Call-ID"))
        );
        assert!(check(&GOOD.replace("Max-Forwards: 70", "Max-Forwards: 300")).is_err());
        assert!(
            check(&GOOD.replace("Max-Forwards: 70", "Date: Fri, 01 Jan 2010 16:00:00 EST"))
                .is_err()
        );
        check(&GOOD.replace("Max-Forwards: 70", "Date: Fri, 01 Jan 2010 16:00:00 GMT")).unwrap();
        assert!(check(&GOOD.replace(
            "sip:x@example.com SIP",
            "sip:x@example.com?Route=%3Csip:e%3E SIP"
        ))
        .is_err());
        assert!(check(&GOOD.replace(
            "To: <sip:x@example.com>\n",
            "To: <sip:x@example.com>\nTo: <sip:y@example.com>\n"
        ))
        .is_err());
    }
}
