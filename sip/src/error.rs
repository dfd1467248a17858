//! The wire format's one error type. Every variant says what was wrong in words an
//! operator can act on; the node maps them to SIP status codes in one place.

/// Why bytes could not be read as a SIP message, or why a message breaks a rule every
/// receiver must check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("message is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("malformed start line: {0}")]
    StartLine(&'static str),
    #[error("malformed header line: {0}")]
    HeaderLine(&'static str),
    #[error("malformed {name} header: {reason}")]
    Header {
        name: &'static str,
        reason: &'static str,
    },
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("more than one {0} header")]
    Repeated(&'static str),
    #[error("malformed URI: {0}")]
    Uri(&'static str),
    #[error("invalid Content-Length: {0}")]
    ContentLength(&'static str),
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    #[error("text is not valid UTF-8")]
    Encoding,
    #[error("unsupported SIP version")]
    Version,
    #[error("CSeq method does not match the request method")]
    CSeqMismatch,
}
