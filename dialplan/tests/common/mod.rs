//! What the sandbox tests and the README's examples share: the facts of one call.

use tandem_dialplan::Call;

/// Alice (alice@example.com, customer acme) calls 0301234 from 192.0.2.7 on Monday
/// 2026-07-06 at 09:30 in Berlin.
pub fn facts() -> Call {
    Call {
        from: "sip:alice@example.com".into(),
        from_user: "alice".into(),
        from_name: "Alice".into(),
        to: "sip:0301234@example.com".into(),
        to_user: "0301234".into(),
        ruri: "sip:0301234@example.com".into(),
        user: "0301234".into(),
        host: "example.com".into(),
        source: "192.0.2.7:5060".into(),
        source_ip: "192.0.2.7".into(),
        account: "alice@example.com".into(),
        customer: "acme".into(),
        direction: "outbound".into(),
        headers: Vec::new(),
        time_zone: "Europe/Berlin".into(),
        now_ms: 1_783_323_000_000,
    }
}
