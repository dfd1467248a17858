//! t20: abuse from the network. Garbage, truncated and oversized messages over UDP and
//! TCP, and the RFC 4475 torture messages, must never take the node down: each test ends
//! by checking that OPTIONS still gets 200. Where RFC 3261 or RFC 4475 say what the answer
//! is, the test checks that answer too.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use tandem_failover_tests::cluster::wait_metric;
use tandem_failover_tests::{
    header_value, options_request, recv_udp, send_udp_and_recv, status_code, Deadline, Node,
    SipTcp, StreamRead,
};

/// xorshift64*: deterministic bytes without a rand dependency, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn client() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind UDP client");
    let a = s.local_addr().unwrap();
    (s, a)
}

/// Reads and drops whatever the node sent back, so later reads see only new answers.
fn drain(socket: &UdpSocket) {
    while recv_udp(socket, Duration::from_millis(50)).is_some() {}
}

fn assert_alive(node: &Node) {
    if let Some(status) = node.exit_status() {
        node.panic_with_log(&format!("node exited with {status}"));
    }
    node.assert_answers_options();
}

#[test]
fn random_garbage_datagrams_leave_the_node_healthy() {
    let node = Node::start_ready("");
    let (socket, local) = client();
    let target = node.udp_addr();
    let valid = options_request("UDP", local, target, "z9hG4bKgarbage");
    let prefixes: [&[u8]; 4] = [
        b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP ",
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK",
        b"OPTIONS sip:",
        b"REGISTER sip:example.com SIP/2.0\r\nContact: <",
    ];
    let mut rng = Rng(0x7a6e_4465_6d21_0001);
    for i in 0..300 {
        let datagram = match i % 3 {
            // Noise of any length a datagram can have on an Ethernet path.
            0 => {
                let n = 1 + rng.below(1400);
                rng.bytes(n)
            }
            // Starts like SIP, then turns to noise: reaches the header parser.
            1 => {
                let mut d = prefixes[rng.below(prefixes.len())].to_vec();
                let n = rng.below(600);
                d.extend(rng.bytes(n));
                d
            }
            // A valid request with a few bytes flipped: reaches every header's parser.
            _ => {
                let mut d = valid.clone().into_bytes();
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(d.len());
                    d[at] = rng.next() as u8;
                }
                d
            }
        };
        socket.send_to(&datagram, target).expect("UDP send");
    }
    drain(&socket);
    assert_alive(&node);
}

/// An OPTIONS with a body, so it can be cut in its headers or in its body.
fn options_with_body(transport: &str, local: SocketAddr, remote: SocketAddr) -> String {
    let body = "this body is 25 octets!\r\n";
    assert_eq!(body.len(), 25);
    options_request(transport, local, remote, "z9hG4bKcut").replace(
        "Content-Length: 0\r\n\r\n",
        "Content-Type: text/plain\r\nContent-Length: 25\r\n\r\n",
    ) + body
}

#[test]
fn truncated_datagrams_are_rejected_or_dropped() {
    let node = Node::start_ready("");
    let (socket, local) = client();
    let target = node.udp_addr();
    let whole = options_with_body("UDP", local, target);
    let body_start = whole.find("\r\n\r\n").unwrap() + 4;

    // Cut in the start line or headers: whatever the answer, the node must carry on.
    for cut in 1..body_start - 2 {
        socket
            .send_to(&whole.as_bytes()[..cut], target)
            .expect("UDP send");
    }
    drain(&socket);

    // Cut in the body: Content-Length promises more than the datagram holds, which
    // RFC 3261 §18.3 answers with 400 (RFC 4475 clerr), never with 200.
    for cut in body_start..whole.len() {
        let answer = send_udp_and_recv(
            &socket,
            target,
            &whole.as_bytes()[..cut],
            Duration::from_secs(1),
        );
        let status = answer.as_deref().and_then(status_code);
        if status != Some(400) {
            node.panic_with_log(&format!(
                "a request cut {} octets short of its Content-Length got {status:?}, not 400",
                whole.len() - cut
            ));
        }
    }
    // The whole message is fine.
    let answer = send_udp_and_recv(&socket, target, whole.as_bytes(), Duration::from_secs(1));
    let status = answer.as_deref().and_then(status_code);
    node.check(status == Some(200), || {
        format!("the whole message got {status:?}")
    });
    assert_alive(&node);
}

#[test]
fn a_truncated_tcp_message_waits_for_the_rest() {
    let node = Node::start_ready("");
    let mut conn = SipTcp::connect(node.tcp_addr());
    let whole = options_with_body("TCP", conn.local_addr(), node.tcp_addr());
    // Cut in the headers and again in the body: a stream delivers in pieces.
    let (a, rest) = whole.as_bytes().split_at(whole.len() / 3);
    let (b, c) = rest.split_at(rest.len() - 10);
    for piece in [a, b] {
        conn.send(piece).expect("send part of a message");
        // Another connection is served while this one waits for the rest.
        let other = SipTcp::connect(node.tcp_addr()).options(Duration::from_secs(2));
        node.check(other == Some(200), || {
            format!("OPTIONS on a second connection got {other:?}")
        });
    }
    conn.send(c).expect("send the rest");
    // The stream then holds exactly one answer, to the whole message, and then the
    // fence's: anything the node had sent for a part would come before them.
    let (answers, fence) = conn.fence(Duration::from_secs(2));
    let text = String::from_utf8_lossy(&answers);
    node.check(
        fence.is_some()
            && text.starts_with("SIP/2.0 200 ")
            && text.matches("SIP/2.0 ").count() == 1
            && text.contains("branch=z9hG4bKcut"),
        || format!("after the message in pieces: {text:?}, then the fence's {fence:?}"),
    );
    assert_alive(&node);
}

#[test]
fn a_truncated_tcp_message_then_eof_closes_the_connection() {
    let node = Node::start_ready("");
    let mut conn = SipTcp::connect(node.tcp_addr());
    let whole = options_with_body("TCP", conn.local_addr(), node.tcp_addr());
    conn.send(&whole.as_bytes()[..whole.len() - 5])
        .expect("send a truncated message");
    conn.stream()
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    if !conn.wait_closed(Duration::from_secs(3)) {
        node.panic_with_log("the node kept a connection open after the peer's EOF");
    }
    assert_alive(&node);
}

/// Sends `bytes` from another thread (the node may stop reading midway) and reports what
/// came back: optionally one response, then the close.
fn send_oversized_over_tcp(node: &Node, bytes: Vec<u8>) {
    let mut conn = SipTcp::connect(node.tcp_addr());
    let mut writer = conn.stream().try_clone().expect("clone TCP stream");
    let sending = std::thread::spawn(move || {
        // Fails once the node has closed the connection, which is the point.
        let _ = writer.write_all(&bytes);
    });
    match conn.read_message(Duration::from_secs(5)) {
        StreamRead::Message(m) => {
            let status = status_code(&m);
            if status != Some(513) {
                node.panic_with_log(&format!(
                    "an oversized message got {status:?}:\n{}",
                    String::from_utf8_lossy(&m)
                ));
            }
            if !conn.wait_closed(Duration::from_secs(5)) {
                node.panic_with_log("connection still open after the 513");
            }
        }
        StreamRead::Closed(_) => {}
        StreamRead::TimedOut(partial) => node.panic_with_log(&format!(
            "connection still open 5 s after an oversized message (got {} octets)",
            partial.len()
        )),
    }
    sending.join().expect("writer thread");
}

#[test]
fn a_tcp_message_over_64k_closes_the_connection() {
    let node = Node::start_ready("");
    let local: SocketAddr = "127.0.0.1:9".parse().unwrap();

    // Declared too large: Content-Length 70 000.
    let body = vec![b'x'; 70_000];
    let mut message = options_request("TCP", local, node.tcp_addr(), "z9hG4bKbig1")
        .replace("Content-Length: 0", "Content-Length: 70000")
        .into_bytes();
    message.extend_from_slice(&body);
    send_oversized_over_tcp(&node, message);

    // Headers that never end: 70 000 octets of one header line.
    let mut message = options_request("TCP", local, node.tcp_addr(), "z9hG4bKbig2")
        .replace("Content-Length: 0\r\n\r\n", "X-Padding: ")
        .into_bytes();
    message.extend_from_slice(&[b'p'; 70_000]);
    send_oversized_over_tcp(&node, message);

    assert_alive(&node);
}

#[test]
fn a_65000_octet_datagram_is_processed() {
    let node = Node::start_ready("");
    let (socket, local) = client();
    let target = node.udp_addr();
    let head = options_request("UDP", local, target, "z9hG4bKhuge");
    let head = head.replace(
        "Content-Length: 0\r\n\r\n",
        "Content-Type: text/plain\r\nContent-Length: NNNNN\r\n\r\n",
    );
    let body_len = 65_000 - head.len();
    let message = head.replace("NNNNN", &body_len.to_string()) + &"b".repeat(body_len);
    assert_eq!(message.len(), 65_000);
    let answer = send_udp_and_recv(&socket, target, message.as_bytes(), Duration::from_secs(2));
    let status = answer.as_deref().and_then(status_code);
    if status != Some(200) {
        node.panic_with_log(&format!(
            "a valid 65 000-octet OPTIONS got {status:?}, not 200"
        ));
    }
    // The largest payload IPv4 UDP can carry, as noise.
    socket
        .send_to(&Rng(7).bytes(65_507), target)
        .expect("UDP send");
    drain(&socket);
    assert_alive(&node);
}

#[test]
fn a_datagram_over_max_message_size_gets_513() {
    let node = Node::start_ready("max_message_size = 2048");
    let (socket, local) = client();
    let target = node.udp_addr();
    let message = options_request("UDP", local, target, "z9hG4bKover").replace(
        "Accept: application/sdp\r\n",
        &format!(
            "Accept: application/sdp\r\nX-Padding: {}\r\n",
            "p".repeat(3000)
        ),
    );
    let answer = send_udp_and_recv(&socket, target, message.as_bytes(), Duration::from_secs(2));
    let status = answer.as_deref().and_then(status_code);
    if status != Some(513) {
        node.panic_with_log(&format!("a 3 KB OPTIONS over a 2 KB limit got {status:?}"));
    }
    assert_alive(&node);
    // Answers to unparseable messages are counted by status code too.
    let metrics =
        tandem_failover_tests::cluster::http(node.admin_addr(), None, "GET", "/metrics", None)
            .expect("admin API answers")
            .body;
    assert!(
        metrics.contains("tandem_sip_responses_total{code=\"513\"} 1"),
        "{metrics}"
    );
}

struct TortureCase {
    name: String,
    class: String,
    expect: String,
    bytes: Vec<u8>,
}

fn corpus_dir() -> PathBuf {
    tandem_failover_tests::package_dir().join("../sip/tests/rfc4475")
}

fn torture_cases() -> Vec<TortureCase> {
    let manifest =
        std::fs::read_to_string(corpus_dir().join("MANIFEST")).expect("read RFC 4475 MANIFEST");
    let cases: Vec<TortureCase> = manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert!(cols.len() >= 4, "MANIFEST line has too few columns: {l}");
            let bytes = std::fs::read(corpus_dir().join(format!("{}.sip", cols[0])))
                .unwrap_or_else(|e| panic!("{}.sip: {e}", cols[0]));
            TortureCase {
                name: cols[0].to_owned(),
                class: cols[1].to_owned(),
                expect: cols[3].to_owned(),
                bytes,
            }
        })
        .collect();
    assert_eq!(cases.len(), 49, "RFC 4475 section 3 has 49 messages");
    cases
}

/// The top Via's value, as written.
fn top_via(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next()?.to_owned();
    head.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        (name.eq_ignore_ascii_case("via") || name.eq_ignore_ascii_case("v"))
            .then(|| value.trim().to_owned())
    })
}

/// The port of the top Via's sent-by (5060 when absent): where RFC 3261 §18.2.2 sends the
/// answer to a request without `rport`.
fn via_port(message: &[u8]) -> u16 {
    top_via(message)
        .and_then(|via| {
            let sent_by = via.split_whitespace().nth(1)?.to_owned();
            let host_port = sent_by.split([';', ',']).next()?;
            host_port.rsplit_once(':')?.1.parse().ok()
        })
        .unwrap_or(5060)
}

/// RFC 3261 §17.2.3 matches a request to a server transaction by top Via (branch and
/// sent-by) and method, never by source address. Several torture messages share all three
/// (cparam01/cparam02, escnull/regescrt, unkscm/novelsc), so sent together the second of
/// a pair is a retransmission of the first and its answer goes to the first's address.
/// Such messages go in later waves, once the earlier transaction has ended.
fn waves(cases: &[TortureCase]) -> Vec<Vec<&TortureCase>> {
    let mut seen: BTreeMap<(Option<String>, Vec<u8>), usize> = BTreeMap::new();
    let mut waves: Vec<Vec<&TortureCase>> = Vec::new();
    for case in cases {
        let method = case
            .bytes
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default()
            .to_vec();
        let n = seen.entry((top_via(&case.bytes), method)).or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(case);
        *n += 1;
    }
    waves
}

/// T1 for the corpus node: short, so that transactions (and INVITE retransmissions) end
/// within 64*T1 = 640 ms, and the next wave, which waits for that, starts soon.
const CORPUS_T1_MS: u64 = 10;

/// Sends every message of a wave as its own datagram, each from a fresh socket on its own
/// loopback address, and collects every answer within 1 s (stopping at a final one).
///
/// Most torture messages carry no `rport`, so RFC 3261 §18.2.2 sends their answers to the
/// source IP and the *Via* port, usually 5060. Each socket is therefore bound to that port
/// on an address of its own in 127.0.0.0/8: the answer reaches it whichever rule the node
/// follows, and INVITE retransmissions cannot land on another case's socket.
fn run_wave(
    node: &Node,
    wave_index: usize,
    wave: &[&TortureCase],
) -> BTreeMap<String, Vec<Vec<u8>>> {
    let salt = (std::process::id() % 200) as u8;
    std::thread::scope(|scope| {
        let handles: Vec<_> = wave
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let port = via_port(&case.bytes);
                let target = node.udp_addr();
                scope.spawn(move || {
                    let socket = (0..20u8)
                        .find_map(|attempt| {
                            let ip = Ipv4Addr::new(
                                127,
                                50 + salt.wrapping_add(attempt.wrapping_mul(37)) % 200,
                                wave_index as u8 + 1,
                                i as u8 + 1,
                            );
                            UdpSocket::bind(SocketAddrV4::new(ip, port)).ok()
                        })
                        .unwrap_or_else(|| panic!("{}: no free 127.x.y.z:{port}", case.name));
                    socket.send_to(&case.bytes, target).expect("UDP send");
                    let deadline = Deadline::after(Duration::from_secs(1));
                    let mut answers = Vec::new();
                    while let Some(answer) = recv_udp(&socket, deadline.remaining()) {
                        // Anything unparsable back from the node counts as status 0.
                        let is_final = !matches!(status_code(&answer), Some(s) if s < 200);
                        answers.push(answer);
                        if is_final || deadline.expired() {
                            break;
                        }
                    }
                    (case.name.clone(), answers)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("corpus thread"))
            .collect()
    })
}

#[test]
fn rfc4475_torture_messages_get_the_answers_the_rfc_asks_for() {
    let node = Node::start_ready(&format!("t1_ms = {CORPUS_T1_MS}"));
    let cases = torture_cases();
    let mut answers = BTreeMap::new();
    for (i, wave) in waves(&cases).iter().enumerate() {
        if i > 0 {
            // The earlier wave's transactions must have ended, completed ones included,
            // or a message sharing their branch would be taken for a retransmission.
            let admin = node.admin_addr();
            let held = "tandem_sip_transactions_held";
            wait_metric(&node, admin, held, 0.0, Duration::from_secs(10));
        }
        answers.extend(run_wave(&node, i, wave));
    }

    let mut problems = Vec::new();
    for case in &cases {
        let received = &answers[&case.name];
        let statuses: Vec<u16> = received
            .iter()
            .map(|a| status_code(a).unwrap_or(0))
            .collect();
        let last = statuses.last().copied();
        if case.bytes.starts_with(b"SIP/2.0") {
            if !statuses.is_empty() {
                problems.push(format!(
                    "{}: a response was answered with {statuses:?}",
                    case.name
                ));
            }
            continue;
        }
        let allow = received
            .last()
            .and_then(|a| header_value(a, "Allow"))
            .unwrap_or_default();
        let wanted: Vec<u16> = match (case.name.as_str(), case.expect.as_str()) {
            // RFC 4475 §3.1.2.18 prefers 501 but allows 400.
            ("mismatch02", _) => vec![400, 501],
            // 400 is a registrar's answer (the AOR must be sip or sips). A node that does
            // not serve REGISTER answers 405, and says so in Allow; once REGISTER is in
            // Allow, only 400 will do.
            ("unksm2", _) if !allow.to_ascii_uppercase().contains("REGISTER") => vec![400, 405],
            (_, code @ ("400" | "416" | "420" | "483" | "505")) => vec![code.parse().unwrap()],
            // An endpoint answers 415 to a body type it does not know (invut) and 406 when
            // Accept excludes what it would send (sdp01); a proxy forwards both (RFC 4475
            // §3.3.6, §3.3.15). This node proxies, serves no such domain and has no
            // outbound route, so it gives the answer any INVITE there gets: 403, never the
            // endpoint's 415 or 406, and never 400.
            ("invut" | "sdp01", _) => vec![403],
            _ => Vec::new(),
        };
        // A message the RFC calls valid must be acted on, not refused as malformed, unless
        // the MANIFEST asks for that answer (unksm2: a registrar's 400 for a non-SIP AOR).
        const MALFORMED: [u16; 3] = [400, 505, 513];
        if !wanted.is_empty() {
            if !last.is_some_and(|s| wanted.contains(&s)) {
                problems.push(format!(
                    "{} ({} {}): expected {wanted:?}, got {statuses:?}",
                    case.name, case.class, case.expect
                ));
            }
        } else if case.class == "valid" && !matches!(last, Some(s) if s >= 200) {
            problems.push(format!(
                "{} (valid request): no final response, got {statuses:?}",
                case.name
            ));
        }
        if case.class == "valid"
            && wanted.is_empty()
            && last.is_some_and(|s| MALFORMED.contains(&s))
        {
            problems.push(format!(
                "{} (valid request): refused as malformed, got {statuses:?}",
                case.name
            ));
        }
    }
    let summary: Vec<String> = cases
        .iter()
        .map(|c| {
            let statuses: Vec<u16> = answers[&c.name]
                .iter()
                .map(|a| status_code(a).unwrap_or(0))
                .collect();
            format!("{} {statuses:?}", c.name)
        })
        .collect();
    eprintln!("RFC 4475 answers: {}", summary.join(", "));
    if !problems.is_empty() {
        node.panic_with_log(&format!(
            "RFC 4475 answers that differ from the MANIFEST:\n  {}\nall answers: {}",
            problems.join("\n  "),
            summary.join(", ")
        ));
    }
    assert_alive(&node);
}
