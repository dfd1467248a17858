//! The SIP message: raw bytes plus an index of the start line, each header line and the
//! body; parsing for datagrams and streams, serialisation, and the edits a proxy and a UAS
//! make. Headers that are never edited are written back exactly as they arrived.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::headers::{AuthHeader, CSeq, Contacts, NameAddr, Via};
use crate::name::{HeaderName, Method};
use crate::text::{is_token_char, split_list, unfold};
use crate::uri::Uri;
use crate::Error;

/// The default size limit. Over UDP a message cannot be larger anyway, and 64 KiB leaves
/// plenty of room for SDP and long Via chains on streams.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 65_535;

/// The outcome of looking for the next message in a stream buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete message occupies the first `len` bytes.
    Message(usize),
    /// An RFC 5626 keepalive ping (CRLFCRLF) of `len` bytes; answer with one CRLF.
    Ping(usize),
    /// `len` bytes of stray line breaks to drop (a keepalive pong, or the CRLFs RFC 3261
    /// §7.5 says to ignore before a start line).
    Skip(usize),
    /// Not enough bytes yet.
    Incomplete,
}

/// Finds the next message boundary in a stream buffer (TCP, TLS). Content-Length decides
/// where the body ends; a message without one has an empty body. One look at a buffer; a
/// connection uses a [`StreamFramer`], which remembers how far it has looked.
pub fn frame_stream(buf: &[u8], max_size: usize) -> Result<Frame, Error> {
    StreamFramer::new(max_size).next(buf)
}

/// Frames one stream's messages in turn, remembering between reads how far it has
/// scanned for the end of the headers and, once it has them, the message's length. A
/// message that arrives a few bytes at a time is then scanned once in all, not once per
/// read: a peer dripping a 64 KiB message byte by byte would otherwise cost the node
/// time quadratic in its size.
#[derive(Debug, Clone)]
pub struct StreamFramer {
    max_size: usize,
    /// Bytes of the current message already searched for the end of its headers.
    scanned: usize,
    /// The current message's length, once its headers are complete.
    total: Option<usize>,
}

impl StreamFramer {
    pub fn new(max_size: usize) -> StreamFramer {
        StreamFramer {
            max_size,
            scanned: 0,
            total: None,
        }
    }

    /// The next boundary in `buf`. `buf` starts where the previous frame ended: the
    /// caller drops each Message, Ping or Skip from its front and calls again with what is
    /// left, more bytes appended as they arrive.
    pub fn next(&mut self, buf: &[u8]) -> Result<Frame, Error> {
        if let Some(total) = self.total {
            if buf.len() < total {
                return Ok(Frame::Incomplete);
            }
            *self = StreamFramer::new(self.max_size);
            return Ok(Frame::Message(total));
        }
        if self.scanned == 0 {
            if buf.starts_with(b"\r\n\r\n") {
                return Ok(Frame::Ping(4));
            }
            if buf.first().is_some_and(|&b| b == b'\r' || b == b'\n') {
                let n = buf
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if n == buf.len() && n < 4 {
                    return Ok(Frame::Incomplete);
                }
                return Ok(Frame::Skip(n));
            }
        }
        // The blank line may have begun in the last two bytes already scanned.
        let from = self.scanned.saturating_sub(2).min(buf.len());
        let Some(body_start) = find_header_end(&buf[from..]).map(|end| from + end) else {
            self.scanned = buf.len();
            return if buf.len() > self.max_size {
                Err(Error::TooLarge {
                    limit: self.max_size,
                })
            } else {
                Ok(Frame::Incomplete)
            };
        };
        let total = body_start + content_length(&buf[..body_start])?.unwrap_or(0);
        if total > self.max_size {
            return Err(Error::TooLarge {
                limit: self.max_size,
            });
        }
        if buf.len() < total {
            self.total = Some(total);
            return Ok(Frame::Incomplete);
        }
        *self = StreamFramer::new(self.max_size);
        Ok(Frame::Message(total))
    }
}

/// The Content-Length of a message's head (start line and headers), if it has one.
fn content_length(head: &[u8]) -> Result<Option<usize>, Error> {
    let mut content_length = None;
    let mut lines = head.split(|&b| b == b'\n');
    lines.next(); // start line
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = trim_ws(&line[..colon]);
        if matches!(HeaderName::from_bytes(name), HeaderName::ContentLength) {
            let value = std::str::from_utf8(trim_ws(trim_cr(&line[colon + 1..])))
                .map_err(|_| Error::ContentLength("not a number"))?;
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|c| c != n) {
                return Err(Error::Repeated("Content-Length"));
            }
            content_length = Some(n);
        }
    }
    Ok(content_length)
}

/// Index just past the blank line ending the headers (CRLFCRLF, or bare LFs).
fn find_header_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

fn parse_content_length(s: &str) -> Result<usize, Error> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::ContentLength("not a non-negative number below 10^9"));
    }
    s.parse().map_err(|_| Error::ContentLength("not a number"))
}

fn trim_ws(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn trim_cr(s: &[u8]) -> &[u8] {
    s.strip_suffix(b"\r").unwrap_or(s)
}

#[derive(Clone, Debug)]
enum Start {
    Request {
        method: Method,
        uri: Uri,
        version: Bytes,
    },
    Response {
        status: u16,
        reason: Bytes,
    },
}

#[derive(Clone, Debug)]
struct Header {
    name: HeaderName,
    repr: Repr,
}

#[derive(Clone, Debug)]
enum Repr {
    /// Untouched: the whole original line (name, separator, value, folds) and the value.
    Raw { line: Range<u32>, value: Range<u32> },
    /// Written or edited by Tandem: written as `Canonical-Name: value`.
    Value(Bytes),
}

/// A parsed or built SIP request or response.
#[derive(Clone, Debug)]
pub struct Message {
    raw: Bytes,
    start: Start,
    /// Whether `raw` still holds the start line verbatim.
    start_raw: Option<Range<u32>>,
    headers: Vec<Header>,
    body: Bytes,
    /// Parsed on first use, because the transport, the transaction layer, the core and
    /// the agents each read them; an edit of the header resets its value.
    parsed: Parsed,
}

/// The headers a message keeps parsed: see [`Message::top_via`], [`Message::from`],
/// [`Message::to`] and [`Message::contacts`]. Each value is boxed: a message is moved
/// through channels and kept in transactions, and most headers are never parsed.
#[derive(Debug, Default)]
struct Parsed {
    /// With whether it is the only value on its header line.
    top_via: OnceLock<Box<Result<(Via, bool), Error>>>,
    from: OnceLock<Box<Result<NameAddr, Error>>>,
    to: OnceLock<Box<Result<NameAddr, Error>>>,
    contacts: OnceLock<Box<Result<Option<Contacts>, Error>>>,
}

/// A copy starts unparsed: most copies (a proxy's branch requests) are edited at once,
/// and copying parsed values allocates as much as parsing them again.
impl Clone for Parsed {
    fn clone(&self) -> Self {
        Parsed::default()
    }
}

fn r32(r: Range<usize>) -> Range<u32> {
    r.start as u32..r.end as u32
}

fn ru(r: &Range<u32>) -> Range<usize> {
    r.start as usize..r.end as usize
}

impl Message {
    /// Parses one UDP datagram. Bytes after the Content-Length body are ignored
    /// (RFC 4475 dblreq); a Content-Length beyond the datagram is an error.
    pub fn parse_datagram(raw: Bytes, max_size: usize) -> Result<Message, Error> {
        if raw.len() > max_size {
            return Err(Error::TooLarge { limit: max_size });
        }
        Self::parse_inner(raw, true)
    }

    /// Parses one message that [`frame_stream`] delimited.
    pub fn parse_stream(raw: Bytes) -> Result<Message, Error> {
        Self::parse_inner(raw, false)
    }

    fn parse_inner(raw: Bytes, datagram: bool) -> Result<Message, Error> {
        let buf: &[u8] = &raw;
        let mut pos = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let line_end = buf[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| pos + p)
            .ok_or(Error::StartLine("no line break after the start line"))?;
        let start_range = pos..trim_cr(&buf[..line_end]).len();
        let start = parse_start_line(&raw, start_range.clone())?;
        pos = line_end + 1;

        let mut headers: Vec<Header> = Vec::with_capacity(16);
        let mut content_length: Option<usize> = None;
        let body_start = loop {
            let Some(p) = buf[pos..].iter().position(|&b| b == b'\n') else {
                return Err(Error::HeaderLine("headers do not end with a blank line"));
            };
            let end = pos + p;
            let line = trim_cr(&buf[pos..end]);
            if line.is_empty() {
                break end + 1;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                // A folded continuation extends the previous header.
                let Some(prev) = headers.last_mut() else {
                    return Err(Error::HeaderLine("continuation line before any header"));
                };
                if let Repr::Raw { line: l, value } = &mut prev.repr {
                    let new_end = (pos + line.len()) as u32;
                    l.end = new_end;
                    value.end = new_end;
                }
            } else {
                let colon = line
                    .iter()
                    .position(|&b| b == b':')
                    .ok_or(Error::HeaderLine("header line without ':'"))?;
                let name = trim_ws(&line[..colon]);
                if name.is_empty() || !name.iter().all(|&b| is_token_char(b)) {
                    return Err(Error::HeaderLine("bad header name"));
                }
                let mut vstart = pos + colon + 1;
                while vstart < pos + line.len() && (buf[vstart] == b' ' || buf[vstart] == b'\t') {
                    vstart += 1;
                }
                let name = HeaderName::from_bytes(name);
                if matches!(name, HeaderName::ContentLength) {
                    let v = std::str::from_utf8(trim_ws(&buf[vstart..pos + line.len()]))
                        .map_err(|_| Error::ContentLength("not a number"))?;
                    let n = parse_content_length(v)?;
                    if content_length.is_some() {
                        return Err(Error::Repeated("Content-Length"));
                    }
                    content_length = Some(n);
                }
                headers.push(Header {
                    name,
                    repr: Repr::Raw {
                        line: r32(pos..pos + line.len()),
                        value: r32(vstart..pos + line.len()),
                    },
                });
            }
            pos = end + 1;
        };
        let available = buf.len() - body_start;
        let body_len = match content_length {
            Some(n) if n > available => {
                return Err(Error::ContentLength("larger than the message"))
            }
            Some(n) => n,
            None if datagram => available,
            None => 0,
        };
        let body = raw.slice(body_start..body_start + body_len);
        Ok(Message {
            start,
            start_raw: Some(r32(start_range)),
            headers,
            body,
            raw,
            parsed: Parsed::default(),
        })
    }

    /// A new request with no headers.
    pub fn request(method: Method, uri: Uri) -> Message {
        Message {
            raw: Bytes::new(),
            start: Start::Request {
                method,
                uri,
                version: Bytes::from_static(b"SIP/2.0"),
            },
            start_raw: None,
            headers: Vec::new(),
            body: Bytes::new(),
            parsed: Parsed::default(),
        }
    }

    /// A response to `req` per RFC 3261 §8.2.6: the same Via values in order, From, To,
    /// Call-ID and CSeq, copied byte for byte, and `Content-Length: 0`. The caller adds a
    /// To tag where one is needed.
    pub fn response_to(req: &Message, status: u16, reason: &str) -> Message {
        let mut headers = Vec::with_capacity(12);
        for h in &req.headers {
            if matches!(
                h.name,
                HeaderName::Via
                    | HeaderName::From
                    | HeaderName::To
                    | HeaderName::CallId
                    | HeaderName::CSeq
            ) {
                headers.push(Header {
                    name: h.name.clone(),
                    repr: Repr::Value(req.value_bytes(h)),
                });
            }
        }
        headers.push(Header {
            name: HeaderName::ContentLength,
            repr: Repr::Value(Bytes::from_static(b"0")),
        });
        Message {
            raw: Bytes::new(),
            start: Start::Response {
                status,
                reason: Bytes::copy_from_slice(reason.as_bytes()),
            },
            start_raw: None,
            headers,
            body: Bytes::new(),
            parsed: Parsed::default(),
        }
    }

    /// Builds an error response for bytes that did not parse as a request, when the
    /// headers a response needs can still be found: Via (with a readable top value), From,
    /// To, Call-ID and CSeq. `None` for responses, which are never answered, and for bytes
    /// too broken to answer.
    pub fn error_response_for_unparseable(
        raw: &Bytes,
        status: u16,
        reason: &str,
    ) -> Option<Message> {
        let start = raw
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if raw[start..].starts_with(b"SIP/") {
            return None;
        }
        let mut headers: Vec<Header> = Vec::new();
        let mut current: Option<(HeaderName, Vec<u8>)> = None;
        let mut lines = raw[start..].split(|&b| b == b'\n');
        lines.next()?;
        let keep = |name: &HeaderName| {
            matches!(
                name,
                HeaderName::Via
                    | HeaderName::From
                    | HeaderName::To
                    | HeaderName::CallId
                    | HeaderName::CSeq
            )
        };
        let mut flush = |current: &mut Option<(HeaderName, Vec<u8>)>| {
            if let Some((name, value)) = current.take() {
                headers.push(Header {
                    name,
                    repr: Repr::Value(Bytes::from(value)),
                });
            }
        };
        for line in lines {
            let line = trim_cr(line);
            if line.is_empty() {
                break;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                if let Some((_, v)) = &mut current {
                    v.push(b' ');
                    v.extend_from_slice(trim_ws(line));
                }
                continue;
            }
            flush(&mut current);
            let colon = line.iter().position(|&b| b == b':')?;
            let name = HeaderName::from_bytes(trim_ws(&line[..colon]));
            if keep(&name) {
                current = Some((name, trim_ws(&line[colon + 1..]).to_vec()));
            }
        }
        flush(&mut current);
        let mut response = Message {
            raw: Bytes::new(),
            start: Start::Response {
                status,
                reason: Bytes::copy_from_slice(reason.as_bytes()),
            },
            start_raw: None,
            headers,
            body: Bytes::new(),
            parsed: Parsed::default(),
        };
        for name in [
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
        ] {
            if !response.has_header(&name) {
                return None;
            }
        }
        response.top_via().ok()?;
        response.push_header(HeaderName::ContentLength, "0");
        Some(response)
    }

    fn value_bytes(&self, h: &Header) -> Bytes {
        match &h.repr {
            Repr::Raw { value, .. } => self.raw.slice(ru(value)),
            Repr::Value(b) => b.clone(),
        }
    }

    fn value_slice<'a>(&'a self, h: &'a Header) -> &'a [u8] {
        match &h.repr {
            Repr::Raw { value, .. } => &self.raw[ru(value)],
            Repr::Value(b) => b,
        }
    }

    // ---- start line -------------------------------------------------------------------

    pub fn is_request(&self) -> bool {
        matches!(self.start, Start::Request { .. })
    }

    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            Start::Request { method, .. } => Some(method),
            Start::Response { .. } => None,
        }
    }

    pub fn uri(&self) -> Option<&Uri> {
        match &self.start {
            Start::Request { uri, .. } => Some(uri),
            Start::Response { .. } => None,
        }
    }

    /// The request's SIP-Version as written (only `SIP/2.0` is supported).
    pub fn version(&self) -> &[u8] {
        match &self.start {
            Start::Request { version, .. } => version,
            Start::Response { .. } => b"SIP/2.0",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match &self.start {
            Start::Response { status, .. } => Some(*status),
            Start::Request { .. } => None,
        }
    }

    pub fn reason(&self) -> Option<&[u8]> {
        match &self.start {
            Start::Response { reason, .. } => Some(reason),
            Start::Request { .. } => None,
        }
    }

    pub fn set_uri(&mut self, new: Uri) {
        if let Start::Request { uri, .. } = &mut self.start {
            *uri = new;
            self.start_raw = None;
        }
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Replaces the body and its Content-Length.
    pub fn set_body(&mut self, body: Bytes) {
        self.body = body;
        self.set_header(HeaderName::ContentLength, self.body.len().to_string());
    }

    // ---- generic header access --------------------------------------------------------

    /// Every header in order, as (name, raw value bytes, folds included).
    pub fn headers(&self) -> impl Iterator<Item = (&HeaderName, &[u8])> {
        self.headers.iter().map(|h| (&h.name, self.value_slice(h)))
    }

    pub fn has_header(&self, name: &HeaderName) -> bool {
        self.headers.iter().any(|h| &h.name == name)
    }

    /// How many header lines carry this name.
    pub fn header_count(&self, name: &HeaderName) -> usize {
        self.headers.iter().filter(|h| &h.name == name).count()
    }

    /// The first line of a header, unfolded and trimmed.
    pub fn header(&self, name: &HeaderName) -> Result<Option<Cow<'_, str>>, Error> {
        match self.headers.iter().find(|h| &h.name == name) {
            Some(h) => unfold(self.value_slice(h)).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `f` with every comma-separated element of every line of a list header.
    pub fn for_each_value(
        &self,
        name: &HeaderName,
        mut f: impl FnMut(&str) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for h in self.headers.iter().filter(|h| &h.name == name) {
            let text = unfold(self.value_slice(h))?;
            for part in split_list(&text)? {
                f(part)?;
            }
        }
        Ok(())
    }

    fn single(&self, name: HeaderName, label: &'static str) -> Result<Option<Cow<'_, str>>, Error> {
        if self.header_count(&name) > 1 {
            return Err(Error::Repeated(label));
        }
        self.header(&name)
    }

    /// Resets what was parsed from a header that is about to change.
    fn edited(&mut self, name: &HeaderName) {
        match name {
            HeaderName::Via => self.parsed.top_via = OnceLock::new(),
            HeaderName::From => self.parsed.from = OnceLock::new(),
            HeaderName::To => self.parsed.to = OnceLock::new(),
            HeaderName::Contact => self.parsed.contacts = OnceLock::new(),
            _ => {}
        }
    }

    /// Appends a header after all others.
    pub fn push_header(&mut self, name: HeaderName, value: impl Into<Bytes>) {
        self.edited(&name);
        self.headers.push(Header {
            name,
            repr: Repr::Value(value.into()),
        });
    }

    /// Inserts a header as the topmost value of its kind (Via, Record-Route, Route).
    pub fn prepend_header(&mut self, name: HeaderName, value: impl Into<Bytes>) {
        self.edited(&name);
        let at = self
            .headers
            .iter()
            .position(|h| h.name == name)
            .unwrap_or(0);
        self.headers.insert(
            at,
            Header {
                name,
                repr: Repr::Value(value.into()),
            },
        );
    }

    /// Replaces every line of a header with one value, where the first one was.
    pub fn set_header(&mut self, name: HeaderName, value: impl Into<Bytes>) {
        self.edited(&name);
        let at = self.headers.iter().position(|h| h.name == name);
        self.headers.retain(|h| h.name != name);
        let header = Header {
            name,
            repr: Repr::Value(value.into()),
        };
        match at {
            Some(i) => self.headers.insert(i, header),
            None => self.headers.push(header),
        }
    }

    pub fn remove_header(&mut self, name: &HeaderName) {
        self.edited(name);
        self.headers.retain(|h| &h.name != name);
    }

    /// Removes the topmost value of a list header (e.g. the top Via of a response, the
    /// top Route of a request) and returns it. A line holding several values keeps the rest.
    pub fn pop_first_value(&mut self, name: &HeaderName) -> Result<Option<String>, Error> {
        let Some(i) = self.headers.iter().position(|h| &h.name == name) else {
            return Ok(None);
        };
        self.edited(name);
        let text = unfold(self.value_slice(&self.headers[i]))?.into_owned();
        let parts = split_list(&text)?;
        let first = parts[0].to_owned();
        if parts.len() == 1 {
            self.headers.remove(i);
        } else {
            let rest_at = parts[1].as_ptr() as usize - text.as_ptr() as usize;
            self.headers[i].repr = Repr::Value(Bytes::copy_from_slice(&text.as_bytes()[rest_at..]));
        }
        Ok(Some(first))
    }

    /// Replaces the topmost value of a list header, keeping any values after it.
    pub fn replace_first_value(&mut self, name: HeaderName, value: &str) -> Result<(), Error> {
        self.pop_first_value(&name)?;
        self.prepend_header(name, Bytes::copy_from_slice(value.as_bytes()));
        Ok(())
    }

    /// Replaces the topmost Via value with `via`, which stays parsed.
    pub fn replace_top_via(&mut self, via: Via) -> Result<(), Error> {
        let alone = matches!(self.parsed.top_via.get().map(|b| &**b), Some(Ok((_, true))));
        let first = self.headers.iter().position(|h| h.name == HeaderName::Via);
        match first {
            // The common case, one Via per line: the line is rewritten where it is.
            Some(i) if alone => {
                self.headers[i].repr = Repr::Value(Bytes::from(via.to_text()));
            }
            _ => self.replace_first_value(HeaderName::Via, &via.to_text())?,
        }
        let alone = first.is_some() && (alone || self.top_via_line_values()? == 1);
        self.parsed.top_via = OnceLock::from(Box::new(Ok((via, alone))));
        Ok(())
    }

    /// How many values the first Via line holds.
    fn top_via_line_values(&self) -> Result<usize, Error> {
        let h = self
            .headers
            .iter()
            .find(|h| h.name == HeaderName::Via)
            .ok_or(Error::Missing("Via"))?;
        Ok(split_list(&unfold(self.value_slice(h))?)?.len())
    }

    /// Appends `;tag=` to To without looking for one: for a response whose request's To
    /// is known to have none.
    pub fn append_to_tag(&mut self, tag: &str) -> Result<(), Error> {
        let current = self
            .header(&HeaderName::To)?
            .ok_or(Error::Missing("To"))?
            .into_owned();
        self.set_header(HeaderName::To, format!("{current};tag={tag}"));
        Ok(())
    }

    /// Adds `;tag=` to To unless it already has a tag.
    pub fn add_to_tag(&mut self, tag: &str) -> Result<(), Error> {
        if self.to()?.tag().is_none() {
            self.append_to_tag(tag)?;
        }
        Ok(())
    }

    // ---- typed accessors ---------------------------------------------------------------

    pub fn call_id(&self) -> Result<Cow<'_, str>, Error> {
        let id = self
            .single(HeaderName::CallId, "Call-ID")?
            .ok_or(Error::Missing("Call-ID"))?;
        if id.is_empty() || id.contains([' ', '\t']) {
            return Err(Error::Header {
                name: "Call-ID",
                reason: "empty or contains whitespace",
            });
        }
        Ok(id)
    }

    pub fn cseq(&self) -> Result<CSeq, Error> {
        CSeq::parse(
            &self
                .single(HeaderName::CSeq, "CSeq")?
                .ok_or(Error::Missing("CSeq"))?,
        )
    }

    /// From, parsed once until it is edited.
    pub fn from(&self) -> Result<&NameAddr, Error> {
        self.kept_name_addr(&self.parsed.from, HeaderName::From, "From")
    }

    /// To, parsed once until it is edited.
    pub fn to(&self) -> Result<&NameAddr, Error> {
        self.kept_name_addr(&self.parsed.to, HeaderName::To, "To")
    }

    fn kept_name_addr<'a>(
        &self,
        kept: &'a OnceLock<Box<Result<NameAddr, Error>>>,
        name: HeaderName,
        label: &'static str,
    ) -> Result<&'a NameAddr, Error> {
        kept.get_or_init(|| Box::new(self.name_addr(name, label)))
            .as_ref()
            .as_ref()
            .map_err(Clone::clone)
    }

    fn name_addr(&self, name: HeaderName, label: &'static str) -> Result<NameAddr, Error> {
        let value = self.single(name, label)?.ok_or(Error::Missing(label))?;
        let parts = split_list(&value).map_err(|_| Error::Header {
            name: label,
            reason: "malformed",
        })?;
        if parts.len() != 1 {
            return Err(Error::Header {
                name: label,
                reason: "more than one value",
            });
        }
        NameAddr::parse(parts[0], label)
    }

    pub fn max_forwards(&self) -> Result<Option<u8>, Error> {
        match self.single(HeaderName::MaxForwards, "Max-Forwards")? {
            None => Ok(None),
            Some(v) => {
                let ok = !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit());
                let n: u32 = if ok {
                    v.parse().unwrap_or(u32::MAX)
                } else {
                    u32::MAX
                };
                u8::try_from(n).map(Some).map_err(|_| Error::Header {
                    name: "Max-Forwards",
                    reason: "not a number from 0 to 255",
                })
            }
        }
    }

    /// Every Via value, top first.
    pub fn vias(&self) -> Result<Vec<Via>, Error> {
        let mut out = Vec::new();
        self.for_each_value(&HeaderName::Via, |v| {
            out.push(Via::parse(v)?);
            Ok(())
        })?;
        Ok(out)
    }

    fn parse_top_via(&self) -> Result<(Via, bool), Error> {
        let h = self
            .headers
            .iter()
            .find(|h| h.name == HeaderName::Via)
            .ok_or(Error::Missing("Via"))?;
        let text = unfold(self.value_slice(h))?;
        let parts = split_list(&text).map_err(|_| Error::Header {
            name: "Via",
            reason: "malformed list",
        })?;
        Ok((Via::parse(parts[0])?, parts.len() == 1))
    }

    /// The topmost Via value, parsed once until a Via header is edited.
    pub fn top_via(&self) -> Result<&Via, Error> {
        self.parsed
            .top_via
            .get_or_init(|| Box::new(self.parse_top_via()))
            .as_ref()
            .as_ref()
            .map(|(via, _)| via)
            .map_err(Clone::clone)
    }

    /// Contact: `None` without one. Parsed once until it is edited.
    pub fn contacts(&self) -> Result<Option<&Contacts>, Error> {
        self.parsed
            .contacts
            .get_or_init(|| Box::new(self.parse_contacts()))
            .as_ref()
            .as_ref()
            .map(Option::as_ref)
            .map_err(Clone::clone)
    }

    fn parse_contacts(&self) -> Result<Option<Contacts>, Error> {
        if !self.has_header(&HeaderName::Contact) {
            return Ok(None);
        }
        let mut list = Vec::new();
        let mut star = 0;
        self.for_each_value(&HeaderName::Contact, |v| {
            if v == "*" {
                star += 1;
            } else {
                list.push(NameAddr::parse(v, "Contact")?);
            }
            Ok(())
        })?;
        match (star, list.is_empty()) {
            (0, _) => Ok(Some(Contacts::List(list))),
            (1, true) => Ok(Some(Contacts::Star)),
            _ => Err(Error::Header {
                name: "Contact",
                reason: "'*' must be the only contact",
            }),
        }
    }

    /// Route, Record-Route or Path values, top first.
    pub fn name_addrs(&self, name: &HeaderName) -> Result<Vec<NameAddr>, Error> {
        let label = match name {
            HeaderName::Route => "Route",
            HeaderName::RecordRoute => "Record-Route",
            HeaderName::Path => "Path",
            _ => "name-addr",
        };
        let mut out = Vec::new();
        self.for_each_value(name, |v| {
            out.push(NameAddr::parse(v, label)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// A delta-seconds header (Expires, Min-Expires): a 32-bit number.
    pub fn delta_seconds(&self, name: HeaderName) -> Result<Option<u32>, Error> {
        let label = if matches!(name, HeaderName::Expires) {
            "Expires"
        } else {
            "Min-Expires"
        };
        match self.single(name, label)? {
            None => Ok(None),
            Some(v) => {
                if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Error::Header {
                        name: label,
                        reason: "not a number of seconds",
                    });
                }
                v.parse::<u32>().map(Some).map_err(|_| Error::Header {
                    name: label,
                    reason: "larger than 2^32-1",
                })
            }
        }
    }

    pub fn expires(&self) -> Result<Option<u32>, Error> {
        self.delta_seconds(HeaderName::Expires)
    }

    /// Every value of an auth header (Authorization, Proxy-Authorization,
    /// WWW-Authenticate, Proxy-Authenticate); commas inside one line separate
    /// parameters, so each line is one value.
    pub fn auth_headers(&self, name: &HeaderName) -> Result<Vec<AuthHeader>, Error> {
        let label = match name {
            HeaderName::Authorization => "Authorization",
            HeaderName::ProxyAuthorization => "Proxy-Authorization",
            HeaderName::WwwAuthenticate => "WWW-Authenticate",
            _ => "Proxy-Authenticate",
        };
        self.headers
            .iter()
            .filter(|h| &h.name == name)
            .map(|h| AuthHeader::parse(&unfold(self.value_slice(h))?, label))
            .collect()
    }

    /// Option tags or methods of a token-list header (Supported, Require, Proxy-Require,
    /// Unsupported, Allow).
    pub fn tokens(&self, name: &HeaderName) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for h in self.headers.iter().filter(|h| &h.name == name) {
            let text = unfold(self.value_slice(h))?;
            if text.is_empty() {
                continue;
            }
            for part in split_list(&text)? {
                if !crate::text::is_token(part) {
                    return Err(Error::Header {
                        name: "option-tag list",
                        reason: "not a token",
                    });
                }
                out.push(part.to_owned());
            }
        }
        Ok(out)
    }

    pub fn content_length(&self) -> usize {
        self.body.len()
    }

    pub fn content_type(&self) -> Result<Option<Cow<'_, str>>, Error> {
        self.single(HeaderName::ContentType, "Content-Type")
    }

    // ---- serialisation -----------------------------------------------------------------

    /// Writes the message in wire form.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match (&self.start_raw, &self.start) {
            (Some(r), _) => out.extend_from_slice(&self.raw[ru(r)]),
            (None, Start::Request { method, uri, .. }) => {
                out.extend_from_slice(method.as_str().as_bytes());
                out.push(b' ');
                out.extend_from_slice(uri.to_string().as_bytes());
                out.extend_from_slice(b" SIP/2.0");
            }
            (None, Start::Response { status, reason }) => {
                out.extend_from_slice(b"SIP/2.0 ");
                out.extend_from_slice(itoa_u16(*status).as_bytes());
                out.push(b' ');
                out.extend_from_slice(reason);
            }
        }
        out.extend_from_slice(b"\r\n");
        for h in &self.headers {
            match &h.repr {
                Repr::Raw { line, .. } => out.extend_from_slice(&self.raw[ru(line)]),
                Repr::Value(v) => {
                    out.extend_from_slice(h.name.as_str().as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(v);
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.wire_len());
        self.write_to(&mut out);
        Bytes::from(out)
    }

    /// About the length [`Message::write_to`] writes (exact unless the start line is
    /// rewritten), so the buffer is allocated once: a built response shares no bytes with
    /// the request it came from, and growing its buffer was most of serialising it.
    fn wire_len(&self) -> usize {
        let start = match (&self.start_raw, &self.start) {
            (Some(r), _) => ru(r).len(),
            (None, Start::Request { method, .. }) => method.as_str().len() + 64,
            (None, Start::Response { reason, .. }) => 12 + reason.len(),
        };
        let headers: usize = self
            .headers
            .iter()
            .map(|h| match &h.repr {
                Repr::Raw { line, .. } => ru(line).len() + 2,
                Repr::Value(v) => h.name.as_str().len() + 2 + v.len() + 2,
            })
            .sum();
        start + 2 + headers + 2 + self.body.len()
    }
}

fn itoa_u16(n: u16) -> String {
    n.to_string()
}

fn parse_start_line(raw: &Bytes, range: Range<usize>) -> Result<Start, Error> {
    let line = &raw[range.clone()];
    if line.starts_with(b"SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let rest = line
            .strip_prefix(b"SIP/2.0 ")
            .ok_or(Error::StartLine("response version is not SIP/2.0"))?;
        if rest.len() < 3
            || !rest[..3].iter().all(u8::is_ascii_digit)
            || rest.get(3).is_some_and(|&b| b != b' ')
        {
            return Err(Error::StartLine("status code is not three digits"));
        }
        let status =
            (rest[0] - b'0') as u16 * 100 + (rest[1] - b'0') as u16 * 10 + (rest[2] - b'0') as u16;
        if !(100..=699).contains(&status) {
            return Err(Error::StartLine("status code out of range"));
        }
        let reason_start = range.start + 8 + 3 + usize::from(rest.len() > 3);
        if raw[reason_start..range.end]
            .iter()
            .any(|&b| b < b' ' && b != b'\t')
        {
            return Err(Error::StartLine("control character in reason phrase"));
        }
        return Ok(Start::Response {
            status,
            reason: raw.slice(reason_start..range.end),
        });
    }
    // Request-Line = Method SP Request-URI SP SIP-Version: exactly two single spaces.
    let text = std::str::from_utf8(line).map_err(|_| Error::StartLine("not UTF-8"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::StartLine(
            "expected 'METHOD URI SIP/2.0' separated by single spaces",
        ));
    };
    let method = Method::parse(method).ok_or(Error::StartLine("method is not a token"))?;
    let uri = Uri::parse(uri)?;
    let v = version.as_bytes();
    let version_ok = v.len() > 4
        && v[..4].eq_ignore_ascii_case(b"SIP/")
        && v[4..].split(|&b| b == b'.').count() == 2
        && v[4..]
            .split(|&b| b == b'.')
            .all(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit));
    if !version_ok {
        return Err(Error::StartLine("malformed SIP version"));
    }
    let vstart = range.end - v.len();
    Ok(Start::Request {
        method,
        uri,
        version: raw.slice(vstart..range.end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP client.atlanta.example.com:5060;branch=z9hG4bK74bf9\r\n\
Max-Forwards: 70\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
Call-ID: 3848276298220188511@atlanta.example.com\r\n\
CSeq: 2 INVITE\r\n\
Contact: <sip:alice@client.atlanta.example.com;transport=tcp>\r\n\
X-Custom:   kept   exactly\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n";

    fn parse(b: &[u8]) -> Message {
        Message::parse_datagram(Bytes::copy_from_slice(b), DEFAULT_MAX_MESSAGE_SIZE).unwrap()
    }

    #[test]
    fn a_framer_fed_a_byte_at_a_time_finds_what_one_look_at_the_whole_finds() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"\r\n\r\n");
        stream.extend_from_slice(INVITE);
        stream.extend_from_slice(b"\r\n");
        stream.extend_from_slice(INVITE);
        stream
            .extend_from_slice(b"OPTIONS sip:a@b SIP/2.0\nVia: SIP/2.0/TCP h;branch=z9hG4bKx\n\n");
        // Framed in one look at each remaining whole.
        let mut whole = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let f = frame_stream(rest, 100_000).unwrap();
            let n = match f {
                Frame::Message(n) | Frame::Ping(n) | Frame::Skip(n) => n,
                Frame::Incomplete => break,
            };
            whole.push(f);
            rest = &rest[n..];
        }
        // And fed one byte at a time, as a slow peer sends.
        let mut framer = StreamFramer::new(100_000);
        let (mut buf, mut dripped) = (Vec::new(), Vec::new());
        for &b in &stream {
            buf.push(b);
            loop {
                let f = framer.next(&buf).unwrap();
                let n = match f {
                    Frame::Message(n) | Frame::Ping(n) | Frame::Skip(n) => n,
                    Frame::Incomplete => break,
                };
                dripped.push(f);
                buf.drain(..n);
            }
        }
        assert!(buf.is_empty(), "{buf:?}");
        assert_eq!(dripped, whole);
        assert_eq!(
            whole
                .iter()
                .filter(|f| matches!(f, Frame::Message(_)))
                .count(),
            3
        );
    }

    #[test]
    fn round_trips_byte_for_byte() {
        let m = parse(INVITE);
        assert_eq!(m.method(), Some(&Method::Invite));
        assert_eq!(&m.to_bytes()[..], INVITE);
        assert_eq!(m.body(), b"v=0\n");
        assert_eq!(m.cseq().unwrap().seq, 2);
        assert_eq!(m.max_forwards().unwrap(), Some(70));
        assert_eq!(m.from().unwrap().tag(), Some("9fxced76sl"));
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK74bf9"));
        assert_eq!(
            m.call_id().unwrap(),
            "3848276298220188511@atlanta.example.com"
        );
    }

    #[test]
    fn folded_and_compact_headers() {
        let m = parse(b"OPTIONS sip:x@y SIP/2.0\r\nv: SIP/2.0/UDP a.example.com\r\n ;branch=z9hG4bK1,\r\n\tSIP/2.0/TCP b.example.com\r\ni: abc\r\nf: <sip:a@b>;tag=1\r\nt: sip:x@y\r\nCSeq: 1\r\n  OPTIONS\r\nl: 0\r\n\r\n");
        let vias = m.vias().unwrap();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[0].branch(), Some("z9hG4bK1"));
        assert_eq!(m.cseq().unwrap().method, Method::Options);
        assert_eq!(m.call_id().unwrap(), "abc");
        // Folding survives a round trip untouched.
        assert!(m.to_bytes().windows(3).any(|w| w == b"\r\n\t"));
    }

    #[test]
    fn datagram_content_length_rules() {
        let extra = b"OPTIONS sip:x@y SIP/2.0\r\nContent-Length: 2\r\n\r\nabJUNK";
        assert_eq!(parse(extra).body(), b"ab");
        let short = Bytes::from_static(b"OPTIONS sip:x@y SIP/2.0\r\nContent-Length: 20\r\n\r\nab");
        assert!(Message::parse_datagram(short, 1000).is_err());
        let neg = Bytes::from_static(b"OPTIONS sip:x@y SIP/2.0\r\nContent-Length: -1\r\n\r\n");
        assert!(Message::parse_datagram(neg, 1000).is_err());
        let none = b"OPTIONS sip:x@y SIP/2.0\r\n\r\nbody";
        assert_eq!(parse(none).body(), b"body");
        let big = Bytes::from(vec![b'a'; 70_000]);
        assert_eq!(
            Message::parse_datagram(big, DEFAULT_MAX_MESSAGE_SIZE).unwrap_err(),
            Error::TooLarge {
                limit: DEFAULT_MAX_MESSAGE_SIZE
            }
        );
    }

    #[test]
    fn stream_framing() {
        assert_eq!(frame_stream(b"\r\n\r\n", 100).unwrap(), Frame::Ping(4));
        assert_eq!(frame_stream(b"\r\n", 100).unwrap(), Frame::Incomplete);
        assert_eq!(frame_stream(b"\r\nOPT", 100).unwrap(), Frame::Skip(2));
        assert_eq!(
            frame_stream(&INVITE[..50], 1000).unwrap(),
            Frame::Incomplete
        );
        assert_eq!(
            frame_stream(&INVITE[..INVITE.len() - 1], 1000).unwrap(),
            Frame::Incomplete
        );
        let mut two = INVITE.to_vec();
        two.extend_from_slice(INVITE);
        assert_eq!(
            frame_stream(&two, 1000).unwrap(),
            Frame::Message(INVITE.len())
        );
        assert!(matches!(
            frame_stream(&INVITE[..100], 50),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            frame_stream(INVITE, 100),
            Err(Error::TooLarge { .. })
        ));
        let m = Message::parse_stream(Bytes::copy_from_slice(INVITE)).unwrap();
        assert_eq!(m.body(), b"v=0\n");
    }

    #[test]
    fn start_line_strictness() {
        for bad in [
            &b"INVITE  sip:x@y SIP/2.0\r\n\r\n"[..],
            b"INVITE sip:x@y SIP/2.0 \r\n\r\n",
            b"INVITE <sip:x@y> SIP/2.0\r\n\r\n",
            b"INVITE sip:x@y; lr SIP/2.0\r\n\r\n",
            b"SIP/2.0 4294967301 big\r\n\r\n",
            b"SIP/2.0 20 short\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(
                Message::parse_datagram(Bytes::copy_from_slice(bad), 1000).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let r = parse(b"SIP/2.0 100 \r\nVia: SIP/2.0/UDP h\r\n\r\n");
        assert_eq!(r.status(), Some(100));
        assert_eq!(r.reason(), Some(&b""[..]));
        let r = parse(b"SIP/2.0 180\r\n\r\n");
        assert_eq!(r.status(), Some(180));
        let m = parse(b"OPTIONS sip:x@y SIP/7.0\r\n\r\n");
        assert_eq!(m.version(), b"SIP/7.0");
    }

    #[test]
    fn response_builder_copies_the_right_headers() {
        let req = parse(INVITE);
        let mut resp = Message::response_to(&req, 486, "Busy Here");
        resp.add_to_tag("abc").unwrap();
        let text = String::from_utf8(resp.to_bytes().to_vec()).unwrap();
        assert!(text.starts_with("SIP/2.0 486 Busy Here\r\n"));
        assert!(text
            .contains("Via: SIP/2.0/TCP client.atlanta.example.com:5060;branch=z9hG4bK74bf9\r\n"));
        assert!(text.contains("To: Bob <sip:bob@biloxi.example.com>;tag=abc\r\n"));
        assert!(text.contains("Content-Length: 0\r\n\r\n"));
        assert!(!text.contains("X-Custom"));
        let again = parse(text.as_bytes());
        assert_eq!(again.cseq().unwrap(), req.cseq().unwrap());
    }

    #[test]
    fn answers_unparseable_requests_when_it_can() {
        let raw = Bytes::from_static(b"INVITE  sip:x@y  SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: c\r\nCSeq: 1\r\n INVITE\r\n\r\n");
        let r = Message::error_response_for_unparseable(&raw, 400, "Bad Request").unwrap();
        assert_eq!(r.status(), Some(400));
        assert_eq!(r.cseq().unwrap().seq, 1);
        let no_via = Bytes::from_static(b"INVITE  sip:x@y  SIP/2.0\r\nFrom: <sip:a@b>\r\nTo: <sip:x@y>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n");
        assert!(Message::error_response_for_unparseable(&no_via, 400, "Bad Request").is_none());
        let resp = Bytes::from_static(b"SIP/2.0 999 x\r\nVia: SIP/2.0/UDP h\r\n\r\n");
        assert!(Message::error_response_for_unparseable(&resp, 400, "Bad Request").is_none());
        assert!(Message::error_response_for_unparseable(
            &Bytes::from_static(b"\x00\xff garbage"),
            400,
            "x"
        )
        .is_none());
    }

    #[test]
    fn list_edits() {
        let mut m = parse(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2\r\nVia: SIP/2.0/UDP c\r\n\r\n");
        // Read (and so parsed) before every edit: an edit must not leave a stale top Via.
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK1"));
        let top = m.pop_first_value(&HeaderName::Via).unwrap().unwrap();
        assert_eq!(top, "SIP/2.0/UDP a;branch=z9hG4bK1");
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK2"));
        let vias = m.vias().unwrap();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[0].branch(), Some("z9hG4bK2"));
        m.prepend_header(HeaderName::Via, "SIP/2.0/TCP new;branch=z9hG4bK3");
        assert_eq!(m.top_via().unwrap().transport, "TCP");
        m.replace_first_value(HeaderName::Via, "SIP/2.0/UDP a;received=1.2.3.4")
            .unwrap();
        assert_eq!(m.top_via().unwrap().received(), Some("1.2.3.4"));
        let mut via = m.top_via().unwrap().clone();
        via.params.set("rport", Some("5060"));
        m.replace_top_via(via.clone()).unwrap();
        assert_eq!(m.top_via().unwrap(), &via);
        assert_eq!(
            m.vias().unwrap()[0],
            via,
            "the header says what the parsed value does"
        );
        assert_eq!(m.vias().unwrap().len(), 3);
        m.set_header(HeaderName::Via, "SIP/2.0/TLS only");
        assert_eq!(m.top_via().unwrap().transport, "TLS");
        m.remove_header(&HeaderName::Via);
        assert_eq!(m.top_via().unwrap_err(), Error::Missing("Via"));
        m.push_header(HeaderName::Via, "SIP/2.0/UDP last");
        assert_eq!(m.top_via().unwrap().transport, "UDP");
        // Two values on the top line: only the first is replaced.
        let mut two = parse(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP a;rport, SIP/2.0/UDP b\r\n\r\n");
        let mut top = two.top_via().unwrap().clone();
        top.params.set("rport", Some("5062"));
        two.replace_top_via(top.clone()).unwrap();
        let vias = two.vias().unwrap();
        assert_eq!(vias.len(), 2);
        assert_eq!((&vias[0], vias[1].host.to_string()), (&top, "b".to_owned()));
        assert_eq!(two.top_via().unwrap(), &top);
        // Now alone on its line: replaced in place.
        two.replace_top_via(vias[1].clone()).unwrap();
        assert_eq!(two.vias().unwrap(), vec![vias[1].clone(), vias[1].clone()]);
    }

    #[test]
    fn from_and_to_are_read_as_they_are_after_edits_and_copies() {
        let mut m = parse(b"INVITE sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n");
        assert_eq!(m.to().unwrap().tag(), None);
        assert_eq!(m.from().unwrap().tag(), Some("1"));
        m.add_to_tag("t1").unwrap();
        assert_eq!(m.to().unwrap().tag(), Some("t1"));
        m.set_header(HeaderName::From, "<sip:c@d>;tag=2");
        assert_eq!(m.from().unwrap().tag(), Some("2"));
        let copy = m.clone();
        assert_eq!(copy.from().unwrap(), m.from().unwrap());
        assert_eq!(copy.to().unwrap().tag(), Some("t1"));
        m.remove_header(&HeaderName::To);
        assert_eq!(m.to().unwrap_err(), Error::Missing("To"));
    }

    #[test]
    fn the_buffer_is_sized_to_what_is_written() {
        let mut m = parse(b"INVITE sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:x@y>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 4\r\n\r\nbody");
        assert_eq!(m.wire_len(), m.to_bytes().len());
        m.push_header(HeaderName::Server, "Tandem");
        let _ = m.add_to_tag("t1");
        assert_eq!(m.wire_len(), m.to_bytes().len());
        let r = Message::response_to(&m, 486, "Busy Here");
        assert_eq!(r.wire_len(), r.to_bytes().len());
    }

    #[test]
    fn single_valued_headers() {
        let m = parse(b"OPTIONS sip:x@y SIP/2.0\r\nCall-ID: a\r\nCall-ID: b\r\nMax-Forwards: 300\r\nTo: a <sip:a@b>, b <sip:b@c>\r\n\r\n");
        assert_eq!(m.call_id().unwrap_err(), Error::Repeated("Call-ID"));
        assert!(m.max_forwards().is_err());
        assert!(m.to().is_err());
    }
}
