//! t10: the basics a phone or a load balancer depends on. OPTIONS is answered with 200 over
//! UDP, TCP and TLS, every answer carries an RFC 1123 Date and the Server header, TCP
//! keepalive pings get their pong, and UDP answers honour `rport`.

mod common;

use common::self_signed_for_localhost;

use std::net::UdpSocket;
use std::time::Duration;

use tandem_failover_tests::{
    header_value, options_request, recv_udp_until, send_udp_and_recv, sipp, sipp_scenario,
    status_code, Node, SipTcp, StreamRead,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALLS: u32 = 200;

#[test]
fn sipp_options_over_udp_all_get_200() {
    let node = Node::start_ready("");
    let outcome = sipp(&sipp_scenario("options.xml"), "u1", node.udp_addr(), CALLS);
    if !outcome.all_succeeded(CALLS) {
        node.panic_with_log(&format!(
            "sipp over UDP: {} of {CALLS} calls succeeded, {} failed, exit {}\n{}",
            outcome.successful, outcome.failed, outcome.status, outcome.output
        ));
    }
}

#[test]
fn sipp_options_over_tcp_all_get_200() {
    let node = Node::start_ready("");
    let outcome = sipp(&sipp_scenario("options.xml"), "t1", node.tcp_addr(), CALLS);
    if !outcome.all_succeeded(CALLS) {
        node.panic_with_log(&format!(
            "sipp over TCP: {} of {CALLS} calls succeeded, {} failed, exit {}\n{}",
            outcome.successful, outcome.failed, outcome.status, outcome.output
        ));
    }
}

/// `Sun, 08 Nov 2009 12:12:21 GMT`: the only Date form RFC 3261 §20.17 allows.
fn is_rfc1123(date: &str) -> bool {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 29
        && DAYS.contains(&&date[0..3])
        && &date[3..5] == ", "
        && digits(5..7)
        && b[7] == b' '
        && MONTHS.contains(&&date[8..11])
        && b[11] == b' '
        && digits(12..16)
        && b[16] == b' '
        && digits(17..19)
        && b[19] == b':'
        && digits(20..22)
        && b[22] == b':'
        && digits(23..25)
        && &date[25..] == " GMT"
}

#[test]
fn rfc1123_check_rejects_near_misses() {
    assert!(is_rfc1123("Sun, 08 Nov 2009 12:12:21 GMT"));
    assert!(!is_rfc1123("Sun, 8 Nov 2009 12:12:21 GMT"));
    assert!(!is_rfc1123("Sun, 08 Nov 2009 12:12:21 UTC"));
    assert!(!is_rfc1123("Sunday, 08-Nov-09 12:12:21 GMT"));
    assert!(!is_rfc1123("Sun Nov  8 12:12:21 2009"));
}

#[test]
fn tls_options_round_trip_carries_date_and_server() {
    let tls = self_signed_for_localhost();
    // UDP (for the readiness probe) and TLS share one port number; TLS is TCP underneath,
    // so no TCP listener may be configured there.
    let node = Node::start_ready_with(|port| tls.sip_config(port));

    let config = tls.client_config();
    let connector = tokio_rustls::TlsConnector::from(config);
    let remote = node.tls_addr();

    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(remote).await?;
        let local = tcp.local_addr()?;
        // The certificate names localhost and 127.0.0.1; verifying against the IP proves
        // the node serves the configured chain, not just any certificate.
        let name = rustls::pki_types::ServerName::IpAddress(remote.ip().into());
        let mut stream = connector.connect(name, tcp).await?;
        let request = options_request("TLS", local, remote, "z9hG4bKtls1");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 4096];
        while !response.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(response)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let response = match runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), exchange).await })
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => node.panic_with_log(&format!("TLS OPTIONS exchange failed: {e}")),
        Err(_) => node.panic_with_log("no TLS response within 5 s"),
    };
    let text = String::from_utf8_lossy(&response);
    node.check(status_code(&response) == Some(200), || {
        format!("not a 200:\n{text}")
    });
    let date = header_value(&response, "Date").unwrap_or_default();
    node.check(is_rfc1123(&date), || {
        format!("Date is not RFC 1123: {date:?}\n{text}")
    });
    let server = header_value(&response, "Server").unwrap_or_default();
    node.check(server.starts_with("Tandem/"), || {
        format!("Server: {server:?}\n{text}")
    });
    let via = header_value(&response, "Via").unwrap_or_default();
    node.check(via.starts_with("SIP/2.0/TLS "), || format!("Via: {via:?}"));
}

#[test]
fn tcp_crlfcrlf_ping_gets_exactly_one_crlf() {
    let node = Node::start_ready("");
    let mut conn = SipTcp::connect(node.tcp_addr());
    conn.send(b"\r\n\r\n").expect("send ping");
    // RFC 5626 §3.5.1: the pong is exactly one CRLF, and nothing follows it.
    let pong = match conn.read_at_least(2, Duration::from_secs(2)) {
        StreamRead::TimedOut(bytes) | StreamRead::Closed(bytes) => {
            node.panic_with_log(&format!("no pong after a ping; got {bytes:?}"))
        }
        StreamRead::Message(bytes) => bytes,
    };
    node.check(pong == b"\r\n", || {
        format!("the pong is {pong:?}, not one CRLF")
    });
    // The connection is still a SIP connection after the ping, and the OPTIONS answer is
    // the next thing on it: had the node sent anything more after the pong, it would
    // arrive first.
    let (extra, answer) = conn.fence(Duration::from_secs(2));
    let status = answer.as_deref().and_then(status_code);
    node.check(extra.is_empty() && status == Some(200), || {
        format!(
            "after the pong: {:?}, then OPTIONS got {status:?}",
            String::from_utf8_lossy(&extra)
        )
    });
}

#[test]
fn udp_response_honours_rport() {
    let node = Node::start_ready("");
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A second socket whose port the Via names: without rport the answer belongs there.
    let via_port_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let via_addr = via_port_socket.local_addr().unwrap();

    let request = options_request("UDP", via_addr, node.udp_addr(), "z9hG4bKrport1");
    let response = send_udp_and_recv(
        &sender,
        node.udp_addr(),
        request.as_bytes(),
        Duration::from_secs(2),
    )
    .unwrap_or_else(|| {
        node.panic_with_log("no answer at the source port of a request with ;rport in Via")
    });
    node.check(status_code(&response) == Some(200), || {
        format!("not a 200: {}", String::from_utf8_lossy(&response))
    });
    let via = header_value(&response, "Via").unwrap_or_default();
    let source_port = sender.local_addr().unwrap().port();
    node.check(
        via.contains(&format!("rport={source_port}")) && via.contains("received=127.0.0.1"),
        || format!("RFC 3581 parameters missing from Via: {via}"),
    );

    // Control: without rport the same request is answered at the Via port (RFC 3261
    // §18.2.2), so the check above can tell the two apart. Its answer is also the fence
    // for the first: the node answers in order, so an answer to the first request at the
    // Via port would arrive before this one.
    let without =
        options_request("UDP", via_addr, node.udp_addr(), "z9hG4bKrport2").replace(";rport;", ";");
    sender.send_to(without.as_bytes(), node.udp_addr()).unwrap();
    let names = |branch: &'static str| move |d: &[u8]| String::from_utf8_lossy(d).contains(branch);
    let (earlier, response) = recv_udp_until(
        &via_port_socket,
        Duration::from_secs(2),
        names("z9hG4bKrport2"),
    );
    node.check(earlier.is_empty(), || {
        format!(
            "with rport, an answer went to the Via port too: {:?}",
            earlier
                .iter()
                .map(|d| String::from_utf8_lossy(d))
                .collect::<Vec<_>>()
        )
    });
    let response =
        response.unwrap_or_else(|| node.panic_with_log("no answer at the Via port without rport"));
    // And a third request, with rport again, fences the second at the source port.
    let again = options_request("UDP", via_addr, node.udp_addr(), "z9hG4bKrport3");
    sender.send_to(again.as_bytes(), node.udp_addr()).unwrap();
    let (at_source, third) =
        recv_udp_until(&sender, Duration::from_secs(2), names("z9hG4bKrport3"));
    node.check(at_source.is_empty() && third.is_some(), || {
        format!(
            "without rport, the answer went to the source port ({} datagrams before the next \
             answer, which {})",
            at_source.len(),
            if third.is_some() {
                "came"
            } else {
                "never came"
            }
        )
    });
    node.check(status_code(&response) == Some(200), || {
        format!("not a 200: {}", String::from_utf8_lossy(&response))
    });
}
