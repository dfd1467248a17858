//! Tandem's SIP wire format: bytes in, [`Message`] out, and back, with no I/O and no
//! async runtime (sip/DESIGN.md, "Our own wire layer").
//!
//! A message keeps the bytes it was parsed from plus an index of where each header sits,
//! so a proxy forwards headers it does not interpret byte for byte. Typed views (Via,
//! From/To, Contact, CSeq, auth headers, ...) are parsed on demand from that index.
//! Stream transports frame messages with a [`StreamFramer`] per connection, which reports
//! an incomplete message as [`Frame::Incomplete`] rather than as an error and scans each
//! byte once however slowly it arrives.
#![forbid(unsafe_code)]

pub mod addr;
mod error;
pub mod headers;
mod message;
mod name;
pub mod text;
pub mod uri;
mod validate;

pub use error::Error;
pub use headers::{AuthHeader, CSeq, Contacts, NameAddr, Via, BRANCH_COOKIE};
pub use message::{frame_stream, Frame, Message, StreamFramer, DEFAULT_MAX_MESSAGE_SIZE};
pub use name::{HeaderName, Method};
pub use text::Params;
pub use uri::{canonical_domain, Host, SipUri, TelUri, Uri};

/// Formats a time as an RFC 1123 date, the only form SIP's Date header allows
/// (`Sun, 08 Nov 2009 12:12:21 GMT`).
pub fn format_date(t: std::time::SystemTime) -> String {
    httpdate::fmt_http_date(t)
}
