//! Fuzzes the digest header parser (Authorization, Proxy-Authorization, WWW-Authenticate,
//! Proxy-Authenticate values) with the property a proxy relies on when it passes other
//! realms' credentials on: whatever parses, Tandem writes back in a form that parses to
//! the same scheme and parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_sip::AuthHeader;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["Authorization", "Proxy-Authorization", "WWW-Authenticate"] {
        let Ok(h) = AuthHeader::parse(text, name) else {
            continue;
        };
        for p in ["username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce"] {
            let _ = h.param(p);
        }
        let written = h.to_string();
        let again = AuthHeader::parse(&written, name)
            .unwrap_or_else(|e| panic!("{written:?} written from {text:?} does not parse: {e}"));
        assert_eq!(again.scheme, h.scheme, "{written:?}");
        assert_eq!(again.params, h.params, "{written:?} from {text:?}");
    }
});
