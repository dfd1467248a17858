//! INVITE parse + serialise throughput on one core (issue: at least 500,000 messages/s).
//! Run with `./ops/bench/parse.sh`; it prints one line per measurement.
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a benchmark

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_sip::{Message, DEFAULT_MAX_MESSAGE_SIZE};

/// A typical softphone INVITE through one proxy: 2 Vias, Record-Route, SDP body.
const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP proxy.atlanta.example.com:5060;branch=z9hG4bK2d4790.1\r\n\
Via: SIP/2.0/UDP 192.0.2.101:5060;received=198.51.100.7;rport=40123;branch=z9hG4bK74bf9\r\n\
Record-Route: <sip:proxy.atlanta.example.com;lr>\r\n\
Max-Forwards: 69\r\n\
From: \"Alice\" <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
Call-ID: 3848276298220188511@atlanta.example.com\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@192.0.2.101:5060;transport=udp>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY, MESSAGE\r\n\
Supported: replaces, timer, path\r\n\
User-Agent: Softphone/4.2.1\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 240\r\n\
\r\n\
v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 192.0.2.101\r\n\
s=-\r\n\
c=IN IP4 192.0.2.101\r\n\
t=0 0\r\n\
m=audio 49170 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=sendrecv\r\n\
a=ptime:20\r\n";

fn measure(label: &str, mut f: impl FnMut()) {
    // Warm up, then run for a fixed time and count.
    for _ in 0..10_000 {
        f();
    }
    let budget = Duration::from_secs(3);
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < budget {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{label}: {:.0} messages/s ({:.0} ns/message, {n} messages)",
        n as f64 / secs,
        secs * 1e9 / n as f64
    );
}

fn main() {
    let raw = Bytes::from_static(INVITE.as_bytes());
    let m = Message::parse_datagram(raw.clone(), DEFAULT_MAX_MESSAGE_SIZE)
        .expect("benchmark INVITE parses");
    assert_eq!(
        m.body().len(),
        240,
        "Content-Length in the benchmark message is right"
    );
    assert_eq!(&m.to_bytes()[..], INVITE.as_bytes());
    println!(
        "message: INVITE, {} bytes, {} header lines",
        INVITE.len(),
        m.headers().count()
    );

    measure("parse", || {
        black_box(
            Message::parse_datagram(black_box(raw.clone()), DEFAULT_MAX_MESSAGE_SIZE).unwrap(),
        );
    });
    measure("parse+serialise", || {
        let m = Message::parse_datagram(black_box(raw.clone()), DEFAULT_MAX_MESSAGE_SIZE).unwrap();
        black_box(m.to_bytes());
    });
    measure("parse+read Via/CSeq/Call-ID/From/To+serialise", || {
        let m = Message::parse_datagram(black_box(raw.clone()), DEFAULT_MAX_MESSAGE_SIZE).unwrap();
        black_box(m.top_via().unwrap());
        black_box(m.cseq().unwrap());
        black_box(m.call_id().unwrap());
        black_box(m.from().unwrap());
        black_box(m.to().unwrap());
        black_box(m.to_bytes());
    });
}
