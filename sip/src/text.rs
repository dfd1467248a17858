//! Lexical building blocks of RFC 3261 §25: character classes, unfolding of header lines,
//! comma-separated lists, quoted strings and generic parameters. Everything above this
//! module works on unfolded `&str` values and never looks at raw line breaks.

use std::borrow::Cow;

use crate::Error;

/// `token` characters (RFC 3261 §25.1).
pub(crate) fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

pub(crate) fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Turns a raw header value into one logical line: every line break followed by
/// whitespace (a folded continuation) becomes a single space, and the result is trimmed.
/// Values that were never folded are borrowed, which is the common case.
pub(crate) fn unfold(raw: &[u8]) -> Result<Cow<'_, str>, Error> {
    let text = std::str::from_utf8(raw).map_err(|_| Error::Encoding)?;
    // A byte scan: a `char` pattern search costs several times more on every header read.
    if !raw.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Ok(Cow::Borrowed(text.trim_matches([' ', '\t'])));
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' || c == '\n' {
            // Swallow the rest of the line break and the continuation's leading whitespace.
            while matches!(chars.peek(), Some('\r' | '\n' | ' ' | '\t')) {
                chars.next();
            }
            if !out.ends_with([' ', '\t']) {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    Ok(Cow::Owned(out.trim_matches([' ', '\t']).to_owned()))
}

/// Splits a list-valued header at the commas that separate its elements, leaving commas
/// inside quoted strings and `<...>` alone. Empty elements are an error: the grammar has
/// none, and RFC 4475's badinv01 shows what tolerating them invites.
pub(crate) fn split_list(value: &str) -> Result<Vec<&str>, Error> {
    let bytes = value.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut in_angle = false;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = skip_quoted(bytes, i)?,
            b'<' => {
                in_angle = true;
                i += 1;
            }
            b'>' => {
                in_angle = false;
                i += 1;
            }
            b',' if !in_angle => {
                parts.push(non_empty(&value[start..i])?);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    parts.push(non_empty(&value[start..])?);
    Ok(parts)
}

fn non_empty(s: &str) -> Result<&str, Error> {
    let t = s.trim_matches([' ', '\t']);
    if t.is_empty() {
        Err(Error::Syntax("empty element in a comma-separated list"))
    } else {
        Ok(t)
    }
}

/// Given the index of an opening `"`, returns the index just past the closing one.
pub(crate) fn skip_quoted(bytes: &[u8], open: usize) -> Result<usize, Error> {
    let mut i = open + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(Error::Syntax("unterminated quoted string"))
}

/// Removes the quotes and backslash escapes of a quoted string (including the quotes).
pub(crate) fn unquote(quoted: &str) -> String {
    let inner = &quoted[1..quoted.len() - 1];
    if !inner.contains('\\') {
        return inner.to_owned();
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks `%HH` escapes and that every other byte satisfies `allowed`.
pub(crate) fn check_escaped(s: &str, allowed: impl Fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else if allowed(b[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// Decodes `%HH` escapes. Invalid escapes are left as written; callers validate first.
pub fn unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A small cursor over an unfolded header value, for the grammars with optional
/// whitespace around separators (`SLASH`, `COLON`, `SEMI`, `EQUAL` in RFC 3261 §25.1).
pub(crate) struct Cursor<'a> {
    pub(crate) s: &'a str,
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(s: &'a str) -> Self {
        Self { s, pos: 0 }
    }

    pub(crate) fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    /// Skips whitespace; returns whether there was any.
    pub(crate) fn ws(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(is_ws) {
            self.pos += 1;
        }
        self.pos > start
    }

    /// Consumes `c` surrounded by optional whitespace.
    pub(crate) fn sep(&mut self, c: u8) -> bool {
        let save = self.pos;
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            self.ws();
            true
        } else {
            self.pos = save;
            false
        }
    }

    pub(crate) fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    pub(crate) fn token(&mut self, what: &'static str) -> Result<&'a str, Error> {
        let t = self.take_while(is_token_char);
        if t.is_empty() {
            Err(Error::Syntax(what))
        } else {
            Ok(t)
        }
    }
}

/// Generic `;name[=value]` parameters, in the order written. Names compare
/// case-insensitively; values keep their spelling (quoted values keep their quotes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, Option<String>)>);

impl Params {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// `Some(None)` for a flag parameter such as `;lr`, `Some(Some(v))` for `;name=v`.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).flatten()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets or replaces a parameter, keeping its position if it was there.
    pub fn set(&mut self, name: &str, value: Option<&str>) {
        let value = value.map(str::to_owned);
        match self
            .0
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_deref()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses header parameters: `*( SEMI generic-param )`, starting at a `;` or at the
    /// end. Whitespace around `;` and `=` is allowed, empty names are not.
    pub(crate) fn parse_header_params(c: &mut Cursor<'_>) -> Result<Self, Error> {
        let mut params = Vec::new();
        loop {
            if c.at_end() {
                break;
            }
            if !c.sep(b';') {
                return Err(Error::Syntax("expected ';' before a parameter"));
            }
            let name = c.token("empty parameter name")?;
            let value = if c.sep(b'=') {
                if c.peek() == Some(b'"') {
                    let start = c.pos;
                    c.pos = skip_quoted(c.s.as_bytes(), start)?;
                    Some(c.s[start..c.pos].to_owned())
                } else {
                    let v = c.take_while(|b| is_token_char(b) || matches!(b, b':' | b'[' | b']'));
                    if v.is_empty() {
                        return Err(Error::Syntax("empty parameter value"));
                    }
                    Some(v.to_owned())
                }
            } else {
                None
            };
            params.push((name.to_owned(), value));
            c.ws();
        }
        Ok(Self(params))
    }

    pub(crate) fn push_raw(&mut self, name: String, value: Option<String>) {
        self.0.push((name, value));
    }
}

impl Params {
    /// Writes `;name=value` for each, with `write_str` only: every Via, Contact and To
    /// written goes through here.
    pub fn write_to<W: std::fmt::Write>(&self, out: &mut W) -> std::fmt::Result {
        for (n, v) in &self.0 {
            out.write_str(";")?;
            out.write_str(n)?;
            if let Some(v) = v {
                out.write_str("=")?;
                out.write_str(v)?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write_to(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfolds_continuation_lines() {
        assert_eq!(
            unfold(b" SIP  /   2.0\r\n /UDP\r\n    192.0.2.2").unwrap(),
            "SIP  /   2.0 /UDP 192.0.2.2"
        );
        assert!(matches!(
            unfold(b" plain ").unwrap(),
            Cow::Borrowed("plain")
        ));
    }

    #[test]
    fn splits_lists_outside_quotes_and_brackets() {
        let parts = split_list(r#""a, b" <sip:x@y;p=1,2>, <sip:z@w>"#).unwrap();
        assert_eq!(parts, vec![r#""a, b" <sip:x@y;p=1,2>"#, "<sip:z@w>"]);
        assert!(split_list("a,,b").is_err());
        assert!(split_list("a,").is_err());
        assert!(split_list(r#""open"#).is_err());
    }

    #[test]
    fn escapes() {
        assert!(check_escaped("a%20b", |b| b.is_ascii_alphanumeric()));
        assert!(!check_escaped("a%2", |b| b.is_ascii_alphanumeric()));
        assert!(!check_escaped("a%zz", |b| b.is_ascii_alphanumeric()));
        assert_eq!(unescape("%61lice%40x"), "alice@x");
        assert_eq!(unescape("100%"), "100%");
    }

    #[test]
    fn header_params() {
        let mut c = Cursor::new(" ;  tag = 98asjd8 ; lr;received=[2001:db8::1];q=\"x;y\"");
        let p = Params::parse_header_params(&mut c).unwrap();
        assert_eq!(p.value("TAG"), Some("98asjd8"));
        assert_eq!(p.get("lr"), Some(None));
        assert_eq!(p.value("received"), Some("[2001:db8::1]"));
        assert_eq!(p.value("q"), Some("\"x;y\""));
        assert!(Params::parse_header_params(&mut Cursor::new(";;")).is_err());
    }
}
