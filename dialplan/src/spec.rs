//! Dial specs: the strings a script passes to `dial()`, parsed before anything is dialled.
//!
//! ```text
//! spec    := serial
//! serial  := parallel ( "|" parallel )*      try each in turn until one answers
//! parallel:= leg ( "&" leg )*                ring all at once; the first to answer wins
//! leg     := ( "(" serial ")" | target ) ( "/" seconds )?
//! target  := sip:… | sips:… | tel:…          a URI, dialled as written
//!          | user                            an account of the caller's domain
//!          | user "@" name                   a local account (name is a served domain)
//!                                            or a number through the customer's
//!                                            provider called name
//! ```
//!
//! `&` binds tighter than `|`, so `a & b | c` rings a and b together, then c if neither
//! answered. `/seconds` is how long a leg or group may ring (1 to 300). Whitespace
//! around operators is ignored. A spec has at most [`MAX_LEGS`] targets and
//! [`MAX_DEPTH`] levels of parentheses, so that one `dial()` cannot fan out without
//! bound.

use std::fmt;

/// The most targets one spec may name.
pub const MAX_LEGS: usize = 16;
/// The deepest nesting of parentheses.
pub const MAX_DEPTH: usize = 4;
/// The longest ringing time a leg or group may ask for, in seconds.
pub const MAX_TIMEOUT_SECS: u32 = 300;
/// The longest spec accepted, in bytes.
pub const MAX_SPEC_LEN: usize = 2048;
/// The longest single target, in bytes.
pub const MAX_TARGET_LEN: usize = 256;

/// One parsed dial spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialSpec {
    /// One target, with its own ringing time if the spec gave one.
    Leg {
        target: Target,
        timeout_secs: Option<u32>,
    },
    /// Several specs tried together (parallel) or in turn (serial).
    Group {
        mode: Mode,
        members: Vec<DialSpec>,
        timeout_secs: Option<u32>,
    },
}

/// How the members of a group are dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// All at once; the first to answer wins and the others are cancelled.
    Parallel,
    /// One after another, until one answers.
    Serial,
}

/// What one leg dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A `sip:`, `sips:` or `tel:` URI, dialled as written.
    Uri(String),
    /// `user` alone (`at` is `None`): an account of the caller's domain. `user@at`: the
    /// account `user` of domain `at` if the node serves it, else `user` dialled through
    /// the customer's provider named `at`. The node decides which; the spec only parses.
    Named { user: String, at: Option<String> },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Uri(uri) => f.write_str(uri),
            Target::Named { user, at: None } => f.write_str(user),
            Target::Named { user, at: Some(at) } => write!(f, "{user}@{at}"),
        }
    }
}

impl DialSpec {
    /// Every target of the spec, in the order written.
    pub fn targets(&self) -> Vec<&Target> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Target>) {
        match self {
            DialSpec::Leg { target, .. } => out.push(target),
            DialSpec::Group { members, .. } => members.iter().for_each(|m| m.collect(out)),
        }
    }
}

/// Parses a dial spec, or says what is wrong with it and where (a byte offset).
pub fn parse(spec: &str) -> Result<DialSpec, String> {
    if spec.len() > MAX_SPEC_LEN {
        return Err(format!(
            "dial spec is {} bytes long, more than {MAX_SPEC_LEN}",
            spec.len()
        ));
    }
    let mut p = Parser {
        s: spec.as_bytes(),
        at: 0,
        legs: 0,
    };
    let parsed = p.serial(0)?;
    p.skip_space();
    if p.at < p.s.len() {
        return Err(p.error("unexpected character"));
    }
    Ok(parsed)
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    legs: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> String {
        match self.s.get(self.at) {
            Some(c) if c.is_ascii_graphic() => {
                format!("dial spec: {what} '{}' at {}", *c as char, self.at)
            }
            Some(_) => format!("dial spec: {what} at {}", self.at),
            None if self.s.is_empty() => "dial spec is empty".to_owned(),
            None => format!("dial spec: {what}: it ends at {}", self.at),
        }
    }

    fn skip_space(&mut self) {
        while self
            .s
            .get(self.at)
            .is_some_and(|c| *c == b' ' || *c == b'\t')
        {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        if self.s.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn serial(&mut self, depth: usize) -> Result<DialSpec, String> {
        self.group(depth, Mode::Serial)
    }

    fn group(&mut self, depth: usize, mode: Mode) -> Result<DialSpec, String> {
        let (separator, next) = match mode {
            Mode::Serial => (b'|', Some(Mode::Parallel)),
            Mode::Parallel => (b'&', None),
        };
        let mut members = vec![self.member(depth, next)?];
        while self.eat(separator) {
            members.push(self.member(depth, next)?);
        }
        Ok(if members.len() == 1 {
            members.pop().expect("one member")
        } else {
            DialSpec::Group {
                mode,
                members,
                timeout_secs: None,
            }
        })
    }

    fn member(&mut self, depth: usize, inner: Option<Mode>) -> Result<DialSpec, String> {
        match inner {
            Some(mode) => self.group(depth, mode),
            None => self.leg(depth),
        }
    }

    fn leg(&mut self, depth: usize) -> Result<DialSpec, String> {
        let mut spec = if self.eat(b'(') {
            if depth + 1 > MAX_DEPTH {
                return Err(self.error(&format!("more than {MAX_DEPTH} levels of parentheses")));
            }
            let inner = self.serial(depth + 1)?;
            if !self.eat(b')') {
                return Err(self.error("expected ')'"));
            }
            inner
        } else {
            let target = self.target()?;
            self.legs += 1;
            if self.legs > MAX_LEGS {
                return Err(format!("dial spec names more than {MAX_LEGS} targets"));
            }
            DialSpec::Leg {
                target,
                timeout_secs: None,
            }
        };
        if self.eat(b'/') {
            let secs = self.seconds()?;
            match &mut spec {
                DialSpec::Leg { timeout_secs, .. } | DialSpec::Group { timeout_secs, .. } => {
                    *timeout_secs = Some(secs);
                }
            }
        }
        Ok(spec)
    }

    fn seconds(&mut self) -> Result<u32, String> {
        self.skip_space();
        let start = self.at;
        while self.s.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        let digits = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
        match digits.parse::<u32>() {
            Ok(n) if (1..=MAX_TIMEOUT_SECS).contains(&n) => Ok(n),
            Ok(n) => {
                self.at = start;
                Err(self.error(&format!(
                    "a ringing time of {n} s is outside 1 to {MAX_TIMEOUT_SECS}"
                )))
            }
            Err(_) => {
                self.at = start;
                Err(self.error("expected a ringing time in seconds after '/'"))
            }
        }
    }

    fn target(&mut self) -> Result<Target, String> {
        self.skip_space();
        let start = self.at;
        while self
            .s
            .get(self.at)
            .is_some_and(|c| c.is_ascii_graphic() && !b"&|()/\"'<>\\".contains(c))
        {
            self.at += 1;
        }
        if self.at == start {
            return Err(self.error("expected a target"));
        }
        let text = std::str::from_utf8(&self.s[start..self.at]).expect("ASCII");
        if text.len() > MAX_TARGET_LEN {
            self.at = start;
            return Err(self.error(&format!("a target longer than {MAX_TARGET_LEN} bytes")));
        }
        let lower = text.to_ascii_lowercase();
        if ["sip:", "sips:", "tel:"]
            .iter()
            .any(|s| lower.starts_with(s))
        {
            return Ok(Target::Uri(text.to_owned()));
        }
        let (user, at) = match text.split_once('@') {
            Some((u, a)) => (u, Some(a)),
            None => (text, None),
        };
        let user_ok = !user.is_empty()
            && user
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.!~*+#".contains(&c));
        let at_ok = at.is_none_or(|a| {
            !a.is_empty()
                && a.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        });
        if !user_ok || !at_ok {
            self.at = start;
            return Err(self.error(&format!(
                "'{text}' is neither a sip:, sips: or tel: URI nor user or user@name"
            )));
        }
        Ok(Target::Named {
            user: user.to_owned(),
            at: at.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(user: &str, at: Option<&str>, t: Option<u32>) -> DialSpec {
        DialSpec::Leg {
            target: Target::Named {
                user: user.into(),
                at: at.map(Into::into),
            },
            timeout_secs: t,
        }
    }

    #[test]
    fn parses_targets_groups_and_timeouts() {
        assert_eq!(parse("alice").unwrap(), leg("alice", None, None));
        assert_eq!(
            parse(" 0123456@myprovider/30 ").unwrap(),
            leg("0123456", Some("myprovider"), Some(30))
        );
        assert_eq!(
            parse("sip:bob@example.org;transport=tcp").unwrap(),
            DialSpec::Leg {
                target: Target::Uri("sip:bob@example.org;transport=tcp".into()),
                timeout_secs: None
            }
        );
        // & binds tighter than |.
        assert_eq!(
            parse("a & b/10 | c").unwrap(),
            DialSpec::Group {
                mode: Mode::Serial,
                members: vec![
                    DialSpec::Group {
                        mode: Mode::Parallel,
                        members: vec![leg("a", None, None), leg("b", None, Some(10))],
                        timeout_secs: None
                    },
                    leg("c", None, None)
                ],
                timeout_secs: None
            }
        );
        assert_eq!(
            parse("(a | b)/20 & c").unwrap(),
            DialSpec::Group {
                mode: Mode::Parallel,
                members: vec![
                    DialSpec::Group {
                        mode: Mode::Serial,
                        members: vec![leg("a", None, None), leg("b", None, None)],
                        timeout_secs: Some(20)
                    },
                    leg("c", None, None)
                ],
                timeout_secs: None
            }
        );
        assert_eq!(parse("+4930123@p1").unwrap().targets().len(), 1);
    }

    #[test]
    fn refuses_what_is_not_a_spec_with_the_reason() {
        for (spec, says) in [
            ("", "empty"),
            ("a &", "expected a target"),
            ("a | | b", "expected a target"),
            ("(a | b", "expected ')'"),
            ("a/0", "outside 1 to 300"),
            ("a/301", "outside 1 to 300"),
            ("a/x", "ringing time"),
            ("a b", "unexpected character 'b' at 2"),
            ("al ice@x", "unexpected character"),
            ("a@", "neither"),
            ("@p", "neither"),
            ("a@b@c", "neither"),
            ("a\r\nVia: x", "unexpected character"),
            ("a<b>", "unexpected character '<'"),
            ("((((( a )))))", "levels of parentheses"),
        ] {
            let err = parse(spec).expect_err(spec);
            assert!(err.contains(says), "{spec:?}: {err}");
        }
        let many = vec!["a"; MAX_LEGS + 1].join("&");
        assert!(parse(&many).unwrap_err().contains("more than 16 targets"));
        assert!(parse(&"a".repeat(MAX_SPEC_LEN + 1)).is_err());
        assert!(parse(&"a".repeat(MAX_TARGET_LEN + 1)).is_err());
    }
}
