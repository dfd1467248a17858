//! An authoritative DNS server for tests, in process, on a loopback UDP port: the zone is
//! a map the test edits while the node under test resolves through it with its real
//! resolver (hickory-resolver, `sip.dns_servers`). Messages are read and written with
//! hickory's own wire format (hickory-proto); the server is a loop over one socket.
//!
//! Every answer has a TTL of one second, and a negative answer carries an SOA whose
//! minimum is one second, so a resolver that honours TTLs sees an edit within a second.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// A running DNS server. Dropping it stops answering.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Vec<Record>>>>,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

fn name(s: &str) -> Name {
    let fq = if s.ends_with('.') {
        s.to_owned()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(fq).expect("a valid DNS name")
}

fn key(n: &Name) -> String {
    n.to_ascii().to_ascii_lowercase()
}

impl DnsServer {
    /// Starts answering on 127.0.0.1 with an empty zone (every name: NXDOMAIN).
    pub fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let server = DnsServer {
            addr: socket.local_addr().unwrap(),
            zone: Arc::default(),
            silent: Arc::default(),
            stop: Arc::default(),
        };
        let (zone, silent, stop) = (
            server.zone.clone(),
            server.silent.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if silent.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let reply = answer(&request, &zone.lock().unwrap());
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds an SRV record: `owner` (e.g. `_sip._udp.example.test`) points at
    /// `target:port`.
    pub fn add_srv(&self, owner: &str, priority: u16, weight: u16, port: u16, target: &str) {
        let r = Record::from_rdata(
            name(owner),
            1,
            RData::SRV(SRV::new(priority, weight, port, name(target))),
        );
        self.add(r);
    }

    pub fn add_a(&self, owner: &str, ip: Ipv4Addr) {
        self.add(Record::from_rdata(name(owner), 1, RData::A(A(ip))));
    }

    fn add(&self, r: Record) {
        self.zone
            .lock()
            .unwrap()
            .entry(key(r.name()))
            .or_default()
            .push(r);
    }

    /// Forgets every record: every name is NXDOMAIN again.
    pub fn clear(&self) {
        self.zone.lock().unwrap().clear();
    }

    /// While on, queries get no answer at all (a DNS outage).
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Relaxed);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer(request: &Message, zone: &HashMap<String, Vec<Record>>) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    let Some(query) = request.queries().first() else {
        reply.set_response_code(ResponseCode::FormErr);
        return reply;
    };
    reply.add_query(query.clone());
    let records = zone.get(&key(query.name()));
    let matching: Vec<Record> = records
        .into_iter()
        .flatten()
        .filter(|r| query.query_type() == RecordType::ANY || r.record_type() == query.query_type())
        .cloned()
        .collect();
    if matching.is_empty() {
        // NXDOMAIN for an unknown name, NOERROR without answers for a known one; either
        // way an SOA whose minimum (one second) is the negative TTL.
        if records.is_none() {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        let soa = SOA::new(name("ns.test"), name("hostmaster.test"), 1, 60, 60, 60, 1);
        reply.add_name_server(Record::from_rdata(name("test"), 1, RData::SOA(soa)));
    } else {
        reply.add_answers(matching);
    }
    reply
}
