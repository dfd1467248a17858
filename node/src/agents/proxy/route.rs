//! The proxy's decisions without I/O (RFC 3261 §16): which of this node's addresses a URI
//! names, the deterministic branch that makes loops detectable (§16.6 step 8, §16.3
//! step 4), how bindings become q-value groups to try one after another (§16.6),
//! and which final response wins (§16.7 step 6).

use std::hash::{Hash, Hasher};

use tandem_sip::{HeaderName, Message, Method, Uri};

use crate::stack::transport::{OwnAddrs, TransportKind};

/// Whether a request is the proxy's: an ACK that matched no transaction (the ACK for a
/// 2xx, routed end to end), or any other request with a server transaction that is not
/// addressed to the node itself. A request for the node itself has a Request-URI without a
/// user part (what monitoring probes send), no To tag and no Route set.
pub fn takes(request: &Message, in_transaction: bool) -> bool {
    let Some(method) = request.method() else {
        return false;
    };
    if *method == Method::Ack {
        return !in_transaction;
    }
    let for_this_node = request
        .uri()
        .and_then(Uri::as_sip)
        .is_some_and(|u| u.user.is_none())
        && !request.has_header(&HeaderName::Route)
        && !request
            .to()
            .is_ok_and(|to| to.params.value("tag").is_some());
    in_transaction && *method != Method::Cancel && !for_this_node
}

/// Every branch Tandem creates starts with this (after the RFC 3261 magic cookie).
const BRANCH_PREFIX: &str = "z9hG4bKtdm";

/// The part of the branch that is the same each time the same request passes this node
/// (§16.6 step 8): a hash of what a spiral would change but a loop would not — the
/// Request-URI, the From and To tags, Call-ID, CSeq number, Route, Proxy-Require and
/// Proxy-Authorization.
pub fn loop_hash(request: &Message) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(uri) = request.uri() {
        uri.to_string().hash(&mut h);
    }
    for name in [HeaderName::From, HeaderName::To] {
        if let Ok(Some(v)) = request.header(&name) {
            let tag = tandem_sip::NameAddr::parse(&v, "From/To")
                .ok()
                .and_then(|n| n.tag().map(str::to_owned));
            tag.hash(&mut h);
        }
    }
    if let Ok(id) = request.call_id() {
        id.hash(&mut h);
    }
    if let Ok(cseq) = request.cseq() {
        cseq.seq.hash(&mut h);
    }
    for name in [
        HeaderName::Route,
        HeaderName::ProxyRequire,
        HeaderName::ProxyAuthorization,
    ] {
        if let Ok(Some(v)) = request.header(&name) {
            v.hash(&mut h);
        }
    }
    format!("{:016x}", h.finish())
}

/// The branch for fork `index` of a request whose loop hash is `hash`.
pub fn branch(hash: &str, index: usize) -> String {
    format!("{BRANCH_PREFIX}{hash}.{index}")
}

/// §16.3 step 4: the request already carries a Via of this node with this request's loop
/// hash, so forwarding it again would go round in a circle (482). A spiral (the same node
/// again with a changed Request-URI) has a different hash and passes.
pub fn is_loop(request: &Message, own: &OwnAddrs, hash: &str) -> bool {
    let Ok(vias) = request.vias() else {
        return false;
    };
    let ours = format!("{BRANCH_PREFIX}{hash}.");
    vias.iter().any(|v| {
        let kind = match v.transport.to_ascii_uppercase().as_str() {
            "TCP" => TransportKind::Tcp,
            "TLS" => TransportKind::Tls,
            _ => TransportKind::Udp,
        };
        v.branch().is_some_and(|b| b.starts_with(&ours))
            && own.is_own_sent_by(&v.host, v.port, kind)
    })
}

/// Splits targets into groups of equal q-value, highest first, keeping the given order
/// within a group (§16.6: groups are tried in turn, each group's contacts in parallel).
pub fn q_groups<T>(mut targets: Vec<(u16, T)>) -> Vec<Vec<T>> {
    targets.sort_by_key(|t| std::cmp::Reverse(t.0));
    let mut groups: Vec<(u16, Vec<T>)> = Vec::new();
    for (q, t) in targets {
        match groups.last_mut() {
            Some((gq, g)) if *gq == q => g.push(t),
            _ => groups.push((q, vec![t])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// §16.7 step 6: whether final response `candidate` beats the best one so far. Any 6xx
/// beats everything else; otherwise the lowest class wins, and within a class the first
/// one received, except that the proxy's own stand-ins (408 for a branch that timed out,
/// 503 for one it could not reach) give way to a real answer.
pub fn better(candidate: u16, best: Option<u16>) -> bool {
    let Some(best) = best else {
        return true;
    };
    let rank = |s: u16| -> (u16, u16) {
        let class = if s >= 600 { 0 } else { s / 100 };
        let stand_in = u16::from(matches!(s, 408 | 503));
        (class, stand_in)
    };
    rank(candidate) < rank(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn own() -> OwnAddrs {
        OwnAddrs {
            udp: vec!["127.0.0.1:5060".parse().unwrap()],
            tcp: vec!["127.0.0.1:5060".parse().unwrap()],
            tls: vec!["127.0.0.1:5061".parse().unwrap()],
            advertise: None,
        }
    }

    fn invite(uri: &str, extra: &str) -> Message {
        let text = format!(
            "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9:5070;branch=z9hG4bKa\r\n{extra}\
             From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n\
             Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse_datagram(Bytes::from(text), 65535).unwrap()
    }

    #[test]
    fn a_loop_is_detected_and_a_spiral_is_not() {
        let o = own();
        let first = invite("sip:bob@example.com", "");
        let hash = loop_hash(&first);
        assert!(!is_loop(&first, &o, &hash));
        // The same request comes back with this node's Via on it: a loop.
        let back = invite(
            "sip:bob@example.com",
            &format!(
                "Via: SIP/2.0/UDP 127.0.0.1:5060;branch={}\r\n",
                branch(&hash, 0)
            ),
        );
        assert_eq!(loop_hash(&back), hash, "Via is not part of the hash");
        assert!(is_loop(&back, &o, &loop_hash(&back)));
        // Back again with a new Request-URI: a spiral.
        let spiral = invite(
            "sip:carol@example.com",
            &format!(
                "Via: SIP/2.0/UDP 127.0.0.1:5060;branch={}\r\n",
                branch(&hash, 0)
            ),
        );
        assert!(!is_loop(&spiral, &o, &loop_hash(&spiral)));
        // Another node's Via with the same branch text is not ours.
        let elsewhere = invite(
            "sip:bob@example.com",
            &format!(
                "Via: SIP/2.0/UDP 127.0.0.2:5060;branch={}\r\n",
                branch(&hash, 0)
            ),
        );
        assert!(!is_loop(&elsewhere, &o, &loop_hash(&elsewhere)));
    }

    #[test]
    fn q_groups_go_highest_first_and_keep_order_within() {
        let groups = q_groups(vec![
            (500, "a"),
            (1000, "b"),
            (500, "c"),
            (1000, "d"),
            (100, "e"),
        ]);
        assert_eq!(groups, vec![vec!["b", "d"], vec!["a", "c"], vec!["e"]]);
        assert!(q_groups::<u8>(vec![]).is_empty());
    }

    #[test]
    fn best_response_prefers_6xx_then_the_lowest_class_then_real_answers() {
        assert!(better(486, None));
        assert!(better(603, Some(404)));
        assert!(!better(404, Some(603)));
        assert!(better(302, Some(404)));
        assert!(!better(480, Some(404)), "same class: the first one stays");
        assert!(
            better(486, Some(408)),
            "a real 4xx beats a timed-out branch"
        );
        assert!(better(480, Some(503)), "a 4xx beats a 5xx");
        assert!(!better(408, Some(486)));
    }
}
