//! A small SIP user agent for the tests sipp cannot do: REGISTER with a chosen digest
//! algorithm (sipp 3.6 speaks MD5 only), with full control over every header. It has its
//! own digest code, independent of Tandem's, over UDP on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use md5::Digest as _;

use crate::{header_value, recv_udp, status_code};

/// One UA bound to a UDP port on 127.0.0.x.
pub struct Ua {
    pub socket: UdpSocket,
    pub user: String,
    pub domain: String,
    pub password: String,
    /// The User-Agent its REGISTERs carry, if any.
    pub agent: Option<String>,
    /// Header lines (each ending in CRLF) its INVITEs carry.
    pub invite_extra: String,
    cseq: u32,
    call_id: String,
}

/// A final response, with its raw text for assertions.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub text: String,
}

impl Reply {
    /// Every value of header `name` (case-insensitive), in order.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or_default();
        head.split("\r\n")
            .skip(1)
            .filter_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        header_value(self.text.as_bytes(), name)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `H(data)` for a digest algorithm name ("MD5" or "SHA-256").
pub fn digest_hex(algorithm: &str, data: &str) -> String {
    match algorithm {
        "MD5" => hex(&md5::Md5::digest(data.as_bytes())),
        "SHA-256" => hex(ring::digest::digest(&ring::digest::SHA256, data.as_bytes()).as_ref()),
        other => panic!("the test UA has no digest algorithm {other}"),
    }
}

/// The value of `name=` in a challenge, quotes removed.
/// A digest credentials value (qop=auth) for `user` with `password`, answering
/// `challenge` with its algorithm (MD5 when it names none), for `method` on `uri`.
pub fn digest_authorization(
    user: &str,
    password: &str,
    challenge: &str,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> String {
    let algorithm = param(challenge, "algorithm").unwrap_or_else(|| "MD5".into());
    let realm = param(challenge, "realm").expect("realm in challenge");
    let nonce = param(challenge, "nonce").expect("nonce in challenge");
    let ha1 = digest_hex(&algorithm, &format!("{user}:{realm}:{password}"));
    let ha2 = digest_hex(&algorithm, &format!("{method}:{uri}"));
    let response = digest_hex(
        &algorithm,
        &format!("{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}"),
    );
    format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
         response=\"{response}\", algorithm={algorithm}, qop=auth, nc={nc:08x}, \
         cnonce=\"{cnonce}\""
    )
}

/// The text of a response to `request`: its Vias, From, Call-ID and CSeq, its To with
/// `to_tag` added unless it has one, the Record-Route set copied for a 1xx/2xx to an
/// INVITE, then `extra` header lines.
pub fn response_text(
    request: &Received,
    status: u16,
    reason: &str,
    to_tag: &str,
    extra: &str,
) -> String {
    let mut text = format!("SIP/2.0 {status} {reason}\r\n");
    for via in request.headers("Via") {
        text.push_str(&format!("Via: {via}\r\n"));
    }
    let to = request.header("To").unwrap();
    let to = if to.contains("tag=") {
        to
    } else {
        format!("{to};tag={to_tag}")
    };
    text.push_str(&format!(
        "From: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n",
        request.header("From").unwrap(),
        request.header("Call-ID").unwrap(),
        request.header("CSeq").unwrap()
    ));
    if status < 300 && request.method() == Some("INVITE") {
        for rr in request.headers("Record-Route") {
            text.push_str(&format!("Record-Route: {rr}\r\n"));
        }
    }
    text.push_str(extra);
    text.push_str("Content-Length: 0\r\n\r\n");
    text
}

fn param(challenge: &str, name: &str) -> Option<String> {
    challenge.split(',').find_map(|part| {
        let part = part.trim().trim_start_matches("Digest").trim();
        let (k, v) = part.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

impl Ua {
    pub fn new(ip: &str, user: &str, domain: &str, password: &str) -> Ua {
        let socket = UdpSocket::bind((ip, 0)).expect("bind the UA's UDP socket");
        let port = socket.local_addr().unwrap().port();
        Ua {
            socket,
            user: user.into(),
            domain: domain.into(),
            password: password.into(),
            agent: None,
            invite_extra: String::new(),
            cseq: 0,
            call_id: format!("ua-{user}-{port}"),
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// Continues as a UA that picked a new Call-ID (or went back to an old one), with the
    /// next request at CSeq `next_cseq`.
    pub fn set_call(&mut self, call_id: &str, next_cseq: u32) {
        self.call_id = call_id.into();
        self.cseq = next_cseq.saturating_sub(1);
    }

    /// The Contact this UA registers: itself.
    pub fn contact(&self) -> String {
        format!("sip:{}@{}", self.user, self.local())
    }

    /// Sends one REGISTER to `node` and waits for its final response. `contact` is the
    /// whole Contact value (or `None` for a query), `extra` more header lines.
    pub fn register_once(
        &mut self,
        node: SocketAddr,
        contact: Option<&str>,
        expires: Option<u32>,
        extra: &str,
    ) -> Reply {
        self.cseq += 1;
        let local = self.local();
        let mut text = format!(
            "REGISTER sip:{domain} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-ua-{cseq}-{port};rport\r\n\
             From: <sip:{user}@{domain}>;tag=ua{port}\r\n\
             To: <sip:{user}@{domain}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Max-Forwards: 70\r\n",
            domain = self.domain,
            user = self.user,
            cseq = self.cseq,
            port = local.port(),
            call_id = self.call_id,
        );
        if let Some(c) = contact {
            text.push_str(&format!("Contact: {c}\r\n"));
        }
        if let Some(e) = expires {
            text.push_str(&format!("Expires: {e}\r\n"));
        }
        if let Some(a) = &self.agent {
            text.push_str(&format!("User-Agent: {a}\r\n"));
        }
        text.push_str(extra);
        text.push_str("Content-Length: 0\r\n\r\n");
        self.transact(node, &text)
    }

    fn transact(&self, node: SocketAddr, text: &str) -> Reply {
        for _ in 0..4 {
            self.socket.send_to(text.as_bytes(), node).expect("send");
            let deadline = crate::Deadline::after(Duration::from_secs(2));
            while !deadline.expired() {
                let Some(bytes) = recv_udp(&self.socket, deadline.remaining()) else {
                    break;
                };
                match status_code(&bytes) {
                    Some(s) if s >= 200 => {
                        return Reply {
                            status: s,
                            text: String::from_utf8_lossy(&bytes).into_owned(),
                        }
                    }
                    _ => continue,
                }
            }
        }
        panic!("no final response from {node} to:\n{text}");
    }

    /// The Authorization header answering `challenge` for `method` and `uri`.
    pub fn authorization(&self, challenge: &str, method: &str, uri: &str, nc: u32) -> String {
        let cnonce = format!("c{nc}x{}", self.local().port());
        digest_authorization(
            &self.user,
            &self.password,
            challenge,
            method,
            uri,
            nc,
            &cnonce,
        )
    }

    /// REGISTERs with digest: sends without credentials, answers the 401 challenge for
    /// `algorithm` (`"MD5"` or `"SHA-256"`), returns the final response.
    pub fn register(
        &mut self,
        node: SocketAddr,
        algorithm: &str,
        contact: Option<&str>,
        expires: Option<u32>,
    ) -> Reply {
        let first = self.register_once(node, contact, expires, "");
        if first.status != 401 {
            return first;
        }
        let challenge = first
            .headers("WWW-Authenticate")
            .into_iter()
            .find(|c| {
                c.contains(&format!("algorithm={algorithm}"))
                    // A challenge that names no algorithm means MD5 (RFC 2617).
                    || (algorithm == "MD5" && !c.contains("algorithm="))
            })
            .unwrap_or_else(|| panic!("no {algorithm} challenge in:\n{}", first.text));
        let uri = format!("sip:{}", self.domain);
        let auth = self.authorization(&challenge, "REGISTER", &uri, 1);
        self.register_once(
            node,
            contact,
            expires,
            &format!("Authorization: {auth}\r\n"),
        )
    }
}

/// A request inside `dialog` from `user@domain` at `local`, along its route set, with `to`
/// as its To value (the dialog's, or one a test forges).
pub fn in_dialog_request(
    (user, domain): (&str, &str),
    dialog: &Dialog,
    local: SocketAddr,
    method: &str,
    cseq: u32,
    to: &str,
) -> String {
    let mut text = format!(
        "{method} {target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-{method}-{cseq}-{port};rport\r\n\
         From: <sip:{user}@{domain}>;tag={from_tag}\r\n\
         To: {to}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\n\
         Max-Forwards: 70\r\n",
        target = dialog.remote_target,
        port = local.port(),
        from_tag = dialog.from_tag,
        call_id = dialog.call_id,
    );
    for r in &dialog.route {
        text.push_str(&format!("Route: {r}\r\n"));
    }
    text.push_str("Content-Length: 0\r\n\r\n");
    text
}

/// A message the UA received, and where from.
#[derive(Debug, Clone)]
pub struct Received {
    pub text: String,
    pub from: SocketAddr,
}

impl Received {
    pub fn start_line(&self) -> &str {
        self.text.split("\r\n").next().unwrap_or_default()
    }

    /// The method of a request, `None` for a response.
    pub fn method(&self) -> Option<&str> {
        let first = self.start_line();
        (!first.starts_with("SIP/2.0")).then(|| first.split(' ').next().unwrap_or_default())
    }

    pub fn status(&self) -> Option<u16> {
        status_code(self.text.as_bytes())
    }

    pub fn request_uri(&self) -> Option<&str> {
        self.method()?;
        self.start_line().split(' ').nth(1)
    }

    /// Every value of header `name`, one per line (the tests' peers never fold).
    pub fn headers(&self, name: &str) -> Vec<String> {
        Reply {
            status: 0,
            text: self.text.clone(),
        }
        .headers(name)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    /// The To tag, if any.
    pub fn to_tag(&self) -> Option<String> {
        tag_of(&self.header("To")?)
    }

    /// The body, after the blank line.
    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

/// The `tag` parameter of a From or To value.
fn tag_of(value: &str) -> Option<String> {
    value
        .split(';')
        .find_map(|p| p.trim().strip_prefix("tag=").map(str::to_owned))
}

/// The URI inside a name-addr: `<sip:bob@h>;expires=60` gives `sip:bob@h`.
fn uri_in(name_addr: &str) -> String {
    name_addr
        .trim()
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The address a SIP URI (or name-addr) names: `<sip:user@127.0.0.2:5070;lr>` gives
/// 127.0.0.2:5070, and no port means 5060.
pub fn uri_addr(uri: &str) -> SocketAddr {
    let inner = uri.trim().trim_start_matches('<');
    let inner = inner.split('>').next().unwrap();
    let rest = inner
        .strip_prefix("sip:")
        .or_else(|| inner.strip_prefix("sips:"))
        .unwrap_or(inner);
    let hostport = rest.rsplit('@').next().unwrap();
    let hostport = hostport.split([';', '?']).next().unwrap();
    let with_port = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5060")
    };
    with_port
        .parse()
        .unwrap_or_else(|_| panic!("not a numeric SIP URI: {uri}"))
}

/// The caller's side of one dialog (RFC 3261 §12.1.2), as far as the tests need it.
#[derive(Debug, Clone)]
pub struct Dialog {
    pub call_id: String,
    pub from_tag: String,
    /// The remote party's From or To value, with its tag.
    pub to: String,
    pub cseq: u32,
    /// The Record-Route set of the 2xx, reversed: the caller's route set.
    pub route: Vec<String>,
    pub remote_target: String,
}

impl Ua {
    /// Waits up to `timeout` for any message.
    pub fn recv(&self, timeout: Duration) -> Option<Received> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = vec![0u8; 65535];
        match self.socket.recv_from(&mut buf) {
            Ok((n, from)) => Some(Received {
                text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                from,
            }),
            Err(_) => None,
        }
    }

    /// Waits for a request with `method`, answering nothing else; panics after `timeout`.
    pub fn expect_request(&self, method: &str, timeout: Duration) -> Received {
        let deadline = crate::Deadline::after(timeout);
        while !deadline.expired() {
            if let Some(m) = self.recv(deadline.remaining()) {
                if m.method() == Some(method) {
                    return m;
                }
            }
        }
        panic!("{}: no {method} within {timeout:?}", self.user);
    }

    /// Waits for a response with a status (not 100) to the request with CSeq method
    /// `method`; panics after `timeout`.
    pub fn expect_response(&self, method: &str, timeout: Duration) -> Received {
        self.next_response(method, timeout)
            .unwrap_or_else(|| panic!("{}: no response to {method} within {timeout:?}", self.user))
    }

    /// [`Ua::expect_response`], `None` after `timeout`.
    fn next_response(&self, method: &str, timeout: Duration) -> Option<Received> {
        let deadline = crate::Deadline::after(timeout);
        while !deadline.expired() {
            if let Some(m) = self.recv(deadline.remaining()) {
                let cseq = m.header("CSeq").unwrap_or_default();
                if m.status().is_some_and(|s| s > 100) && cseq.ends_with(method) {
                    return Some(m);
                }
            }
        }
        None
    }

    /// Answers `request` (sent back to where it came from), with a To tag, the
    /// Record-Route set copied for a 1xx/2xx, and `extra` header lines.
    pub fn respond(&self, request: &Received, status: u16, reason: &str, extra: &str) {
        let tag = format!("callee{}", self.local().port());
        let text = response_text(request, status, reason, &tag, extra);
        self.socket.send_to(text.as_bytes(), request.from).unwrap();
    }

    /// [`Ua::respond`] with an SDP body.
    pub fn respond_sdp(
        &self,
        request: &Received,
        status: u16,
        reason: &str,
        extra: &str,
        sdp: &str,
    ) {
        let tag = format!("callee{}", self.local().port());
        let extra = format!("{extra}Content-Type: application/sdp\r\n");
        let text = response_text(request, status, reason, &tag, &extra);
        let text = text.replace(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Length: {}\r\n\r\n{sdp}", sdp.len()),
        );
        self.socket.send_to(text.as_bytes(), request.from).unwrap();
    }

    /// Sends an INVITE for `to` through `node`, authenticating with its own account when
    /// challenged (407), and returns the first final response other than 407 (after
    /// ACKing any non-2xx). `on_ringing` runs at the first 180.
    pub fn invite(
        &mut self,
        node: SocketAddr,
        to: &str,
        call_id: &str,
        on_ringing: &mut dyn FnMut(&Ua, &Received),
    ) -> Received {
        self.invite_giving_up(node, to, call_id, on_ringing, None, false)
            .expect("no give-up time, so a final response")
    }

    /// [`Ua::invite`] by a caller who sends its CANCEL right behind the INVITE that
    /// carries its credentials, so that the CANCEL reaches the node while it is still
    /// checking them. The final response to that INVITE.
    pub fn invite_cancelled_at_once(
        &mut self,
        node: SocketAddr,
        to: &str,
        call_id: &str,
    ) -> Received {
        self.invite_giving_up(node, to, call_id, &mut |_, _| {}, None, true)
            .expect("no give-up time, so a final response")
    }

    /// [`Ua::invite`] by a caller who hangs up (CANCEL) when no final response came
    /// within `give_up` of the INVITE that was not challenged: `None` then. The UA must
    /// not be used for another call afterwards, since a late answer may still arrive.
    pub fn invite_within(
        &mut self,
        node: SocketAddr,
        to: &str,
        call_id: &str,
        give_up: Duration,
    ) -> Option<Received> {
        self.invite_giving_up(node, to, call_id, &mut |_, _| {}, Some(give_up), false)
    }

    fn invite_giving_up(
        &mut self,
        node: SocketAddr,
        to: &str,
        call_id: &str,
        on_ringing: &mut dyn FnMut(&Ua, &Received),
        give_up: Option<Duration>,
        cancel_at_once: bool,
    ) -> Option<Received> {
        let mut auth = String::new();
        for attempt in 0..2 {
            self.cseq += 1;
            let branch = format!("z9hG4bK-inv-{call_id}-{attempt}");
            let local = self.local();
            let head = |branch: &str, to_header: &str, method: &str| {
                format!(
                    "{method} {to} SIP/2.0\r\n\
                     Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
                     From: <sip:{user}@{domain}>;tag=caller{port}\r\n\
                     To: {to_header}\r\n\
                     Call-ID: {call_id}\r\n\
                     CSeq: {cseq} {method}\r\n\
                     Max-Forwards: 70\r\n",
                    user = self.user,
                    domain = self.domain,
                    port = local.port(),
                    cseq = self.cseq,
                )
            };
            let mut text = head(&branch, &format!("<{to}>"), "INVITE");
            text.push_str(&format!("Contact: <sip:{}@{local}>\r\n", self.user));
            text.push_str(&self.invite_extra);
            text.push_str(&auth);
            text.push_str("Content-Length: 0\r\n\r\n");
            self.socket.send_to(text.as_bytes(), node).unwrap();
            if cancel_at_once && !auth.is_empty() {
                self.cancel(node, to, call_id, attempt);
            }
            let mut rang = false;
            let deadline = crate::Deadline::after(give_up.unwrap_or(Duration::from_secs(40)));
            let last = loop {
                let Some(r) = self.next_response("INVITE", deadline.remaining()) else {
                    if give_up.is_some() {
                        self.cancel(node, to, call_id, attempt);
                        return None;
                    }
                    panic!("{}: no response to INVITE within 40 s", self.user);
                };
                let status = r.status().unwrap();
                if status < 200 {
                    if status == 180 && !rang {
                        rang = true;
                        on_ringing(self, &r);
                    }
                    continue;
                }
                break r;
            };
            let status = last.status().unwrap();
            if status >= 300 {
                // The ACK for a non-2xx is hop by hop: same branch, the response's To.
                let mut ack = head(&branch, &last.header("To").unwrap(), "ACK");
                ack.push_str("Content-Length: 0\r\n\r\n");
                self.socket.send_to(ack.as_bytes(), node).unwrap();
            }
            if status == 407 && attempt == 0 {
                let challenge = last
                    .headers("Proxy-Authenticate")
                    .into_iter()
                    .next()
                    .expect("a 407 carries a challenge");
                auth = format!(
                    "Proxy-Authorization: {}\r\n",
                    self.authorization(&challenge, "INVITE", to, 1)
                );
                continue;
            }
            return Some(last);
        }
        unreachable!()
    }

    /// The dialog a 2xx to our INVITE created.
    pub fn dialog(&self, ok: &Received) -> Dialog {
        let mut route = ok.headers("Record-Route");
        route.reverse();
        let contact = ok.header("Contact").expect("a 2xx has a Contact");
        Dialog {
            call_id: ok.header("Call-ID").unwrap(),
            from_tag: format!("caller{}", self.local().port()),
            to: ok
                .header("To")
                .filter(|to| tag_of(to).is_some())
                .expect("a 2xx has a To tag"),
            cseq: ok
                .header("CSeq")
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap(),
            route,
            remote_target: uri_in(&contact),
        }
    }

    /// The callee's side of the dialog that `invite` created when this UA answered it
    /// (RFC 3261 §12.1.1): the route set is the Record-Route set in order.
    pub fn callee_dialog(&self, invite: &Received) -> Dialog {
        let contact = invite.header("Contact").expect("an INVITE has a Contact");
        Dialog {
            call_id: invite.header("Call-ID").unwrap(),
            from_tag: format!("callee{}", self.local().port()),
            to: invite
                .header("From")
                .filter(|from| tag_of(from).is_some())
                .expect("the caller's From has a tag"),
            cseq: 1,
            route: invite.headers("Record-Route"),
            remote_target: uri_in(&contact),
        }
    }

    /// Sends a request inside `dialog` along its route set; returns where it went.
    pub fn send_in_dialog(&self, dialog: &Dialog, method: &str, cseq: u32) -> SocketAddr {
        let text = in_dialog_request(
            (&self.user, &self.domain),
            dialog,
            self.local(),
            method,
            cseq,
            &dialog.to,
        );
        let first_hop = dialog
            .route
            .first()
            .map(|r| uri_addr(r))
            .unwrap_or_else(|| uri_addr(&dialog.remote_target));
        self.socket.send_to(text.as_bytes(), first_hop).unwrap();
        first_hop
    }

    /// Sends a CANCEL for the INVITE that `invite_attempt` of `call_id` sent.
    pub fn cancel(&self, node: SocketAddr, to: &str, call_id: &str, invite_attempt: u32) {
        let local = self.local();
        let text = format!(
            "CANCEL {to} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-inv-{call_id}-{invite_attempt};rport\r\n\
             From: <sip:{user}@{domain}>;tag=caller{port}\r\n\
             To: <{to}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} CANCEL\r\n\
             Max-Forwards: 70\r\n\
             Content-Length: 0\r\n\r\n",
            user = self.user,
            domain = self.domain,
            port = local.port(),
            cseq = self.cseq,
        );
        self.socket.send_to(text.as_bytes(), node).unwrap();
    }
}
