//! RFC 4475 torture tests: every valid message parses, passes the receiver checks and
//! round-trips byte for byte; every invalid one is rejected by the parser or the checks.
//! The messages live in `tests/rfc4475/` with a MANIFEST saying which is which.

use std::path::PathBuf;

use bytes::Bytes;
use tandem_sip::{Error, HeaderName, Message, Method, Uri, DEFAULT_MAX_MESSAGE_SIZE};

struct Case {
    name: String,
    valid: bool,
    bytes: Vec<u8>,
}

fn dir() -> PathBuf {
    tandem_manifest_dir().join("tests/rfc4475")
}

fn cases() -> Vec<Case> {
    let manifest = std::fs::read_to_string(dir().join("MANIFEST")).expect("MANIFEST");
    let cases: Vec<Case> = manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            let name = cols[0].to_owned();
            let bytes = std::fs::read(dir().join(format!("{name}.sip"))).expect("message file");
            Case {
                name,
                valid: cols[1] == "valid",
                bytes,
            }
        })
        .collect();
    assert_eq!(cases.len(), 49, "RFC 4475 section 3 has 49 messages");
    cases
}

fn check(bytes: &[u8]) -> Result<Message, Error> {
    let m = Message::parse_datagram(Bytes::copy_from_slice(bytes), DEFAULT_MAX_MESSAGE_SIZE)?;
    if m.is_request() {
        m.validate_request()?;
    } else {
        m.validate_response()?;
    }
    Ok(m)
}

fn get(name: &str) -> Message {
    let case = cases().into_iter().find(|c| c.name == name).unwrap();
    check(&case.bytes).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn valid_messages_are_accepted_and_round_trip() {
    let mut failures = Vec::new();
    for case in cases().iter().filter(|c| c.valid) {
        match check(&case.bytes) {
            Ok(m) => {
                let out = m.to_bytes();
                if case.name != "dblreq" && out[..] != case.bytes[..] {
                    failures.push(format!("{}: does not round-trip", case.name));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn invalid_messages_are_rejected() {
    let accepted: Vec<String> = cases()
        .iter()
        .filter(|c| !c.valid && check(&c.bytes).is_ok())
        .map(|c| c.name.clone())
        .collect();
    assert!(
        accepted.is_empty(),
        "accepted invalid messages: {accepted:?}"
    );
}

#[test]
fn details_of_tortuous_messages() {
    let m = get("wsinv");
    assert_eq!(m.max_forwards().unwrap(), Some(68));
    assert_eq!(m.cseq().unwrap().seq, 9);
    assert_eq!(m.vias().unwrap().len(), 3);
    assert_eq!(
        m.from().unwrap().display.as_deref(),
        Some(r#"J Rosenberg \""#)
    );

    let m = get("intmeth");
    assert_eq!(
        m.method(),
        Some(&Method::Other(
            "!interesting-Method0123456789_*+`.%indeed'~".into()
        ))
    );

    let m = get("esc01");
    let Some(Uri::Sip(uri)) = m.uri() else {
        panic!("sip uri")
    };
    assert_eq!(uri.user_unescaped().unwrap(), "sips:user@example.com");

    let m = get("semiuri");
    let Some(Uri::Sip(uri)) = m.uri() else {
        panic!("sip uri")
    };
    assert_eq!(uri.user.as_deref(), Some("user;par=u%40example.net"));

    let m = get("dblreq");
    assert_eq!(m.method(), Some(&Method::Register));
    assert!(
        m.body().is_empty(),
        "the trailing INVITE is not part of the REGISTER"
    );

    let m = get("mpart01");
    assert_eq!(m.body().len(), 553);

    assert_eq!(get("unreason").status(), Some(200));
    assert_eq!(get("noreason").reason(), Some(&b""[..]));
    assert!(matches!(get("unkscm").uri(), Some(Uri::Other { .. })));
    assert!(matches!(get("novelsc").uri(), Some(Uri::Other { .. })));
    assert_eq!(get("zeromf").max_forwards().unwrap(), Some(0));
    assert_eq!(
        get("bext01").tokens(&HeaderName::Require).unwrap(),
        vec!["nothingSupportsThis", "nothingSupportsThisEither"]
    );
}

#[test]
fn invalid_messages_fail_for_the_right_reason() {
    let reason = |name: &str| {
        let case = cases().into_iter().find(|c| c.name == name).unwrap();
        check(&case.bytes).unwrap_err()
    };
    assert_eq!(reason("badvers"), Error::Version);
    assert_eq!(reason("mismatch01"), Error::CSeqMismatch);
    assert_eq!(reason("mismatch02"), Error::CSeqMismatch);
    assert!(matches!(reason("clerr"), Error::ContentLength(_)));
    assert!(matches!(reason("ncl"), Error::ContentLength(_)));
    assert_eq!(reason("mcl01"), Error::Repeated("Content-Length"));
    assert!(matches!(reason("insuf"), Error::Missing(_)));
    assert!(matches!(
        reason("baddate"),
        Error::Header { name: "Date", .. }
    ));
    assert!(matches!(reason("lwsstart"), Error::StartLine(_)));
}

/// This package's directory. Read at run time: the target dir is shared between checkouts
/// at different paths, and a binary built in one must not look for files in another.
fn tandem_manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .into()
}
