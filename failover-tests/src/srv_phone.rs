//! A test phone that finds its servers the way a real one does (RFC 3263 §4 and §5 over
//! RFC 2782): it looks up `_sip._udp.<domain>` through hickory's real resolver, pointed at
//! the test's own DNS server ([`crate::dns`]), orders the targets by priority and, within
//! a priority, by a weighted random draw, and registers through the first that answers.
//! A REGISTER that times out or gets 503 moves it to the next target (RFC 3263 §4.3).
//!
//! It runs on its own thread, like a phone on a desk: it refreshes its registration,
//! answers every call (180, then 200) and every BYE, and records what happened and when.
//! Two behaviours a provider's phones have are options:
//! - **Keepalives** (RFC 5626 §4.4.2): a STUN Binding request over its flow every few
//!   seconds. A flow that stops answering is dead, and the phone registers through the
//!   next target at once instead of at its next refresh.
//! - **NAT**: behind a NAT that filters by address, a phone hears only from addresses it
//!   sent to lately. Without it, a node could reach the phone directly and hide how long
//!   the phone was really unreachable.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::Resolver;

use crate::ua::{digest_authorization, response_text, Received};
use crate::Deadline;

/// How the phone behaves.
#[derive(Clone, Debug)]
pub struct SrvPhoneConfig {
    pub user: String,
    pub password: String,
    /// The SIP domain: the AOR's and the one whose SRV records name the servers.
    pub domain: String,
    /// The DNS server the phone asks.
    pub dns: SocketAddr,
    /// The loopback address it binds.
    pub ip: String,
    /// The Expires it asks for; it refreshes at half of it.
    pub expires: u32,
    /// How long a REGISTER may go unanswered before the next target is tried: 32 s, RFC
    /// 3261's Timer F, unless a phone is configured shorter.
    pub transaction_timeout: Duration,
    /// STUN keepalives every so often, or none.
    pub keepalive: Option<Duration>,
    /// Only hear from addresses sent to in the last 60 s (a filtering NAT).
    pub nat: bool,
}

impl SrvPhoneConfig {
    pub fn new(user: &str, domain: &str, dns: SocketAddr) -> SrvPhoneConfig {
        SrvPhoneConfig {
            user: user.into(),
            password: format!("pw-{user}"),
            domain: domain.into(),
            dns,
            ip: "127.0.0.1".into(),
            expires: 60,
            transaction_timeout: Duration::from_secs(32),
            keepalive: None,
            nat: false,
        }
    }
}

/// What the phone did, each at its time since the phone started.
#[derive(Clone, Debug, PartialEq)]
pub enum PhoneEvent {
    Registered {
        via: SocketAddr,
    },
    /// A REGISTER through `via` timed out or was refused with `status` (0: no answer).
    RegisterFailed {
        via: SocketAddr,
        status: u16,
    },
    /// A keepalive over the flow to `via` went unanswered.
    FlowFailed {
        via: SocketAddr,
    },
    /// No target could be found or none answered.
    NoServer {
        why: String,
    },
    CallAnswered {
        call_id: String,
    },
    /// The NAT dropped a datagram from an address the phone had not sent to.
    NatDropped {
        from: SocketAddr,
    },
}

#[derive(Default)]
struct Shared {
    events: Vec<(Duration, PhoneEvent)>,
    registered_via: Option<SocketAddr>,
}

/// A running phone; dropping it stops it (without unregistering, like a phone unplugged).
pub struct SrvPhone {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SrvPhone {
    /// Starts the phone; it resolves and registers on its own thread.
    pub fn start(config: SrvPhoneConfig, clock: Deadline) -> SrvPhone {
        let socket = UdpSocket::bind((config.ip.as_str(), 0)).expect("bind the phone's socket");
        let contact = format!("sip:{}@{}", config.user, socket.local_addr().unwrap());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut phone = Phone {
            socket,
            contact,
            config,
            shared: shared.clone(),
            stop: stop.clone(),
            clock,
            cseq: 0,
            heard_from: HashMap::new(),
            answered: HashMap::new(),
            seed: u64::from(clock.elapsed().subsec_nanos()) | 1,
            resolver: None,
        };
        let thread = std::thread::spawn(move || phone.run());
        SrvPhone {
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// The server it is registered through now, if any.
    pub fn registered_via(&self) -> Option<SocketAddr> {
        self.shared.lock().unwrap().registered_via
    }

    /// Everything so far, each with its time on the test's clock.
    pub fn events(&self) -> Vec<(Duration, PhoneEvent)> {
        self.shared.lock().unwrap().events.clone()
    }

    /// When it last registered through `via`, after `since`.
    pub fn registered_through_since(&self, via: SocketAddr, since: Duration) -> Option<Duration> {
        self.events()
            .into_iter()
            .find_map(|(at, e)| (at >= since && e == PhoneEvent::Registered { via }).then_some(at))
    }
}

impl Drop for SrvPhone {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Phone {
    socket: UdpSocket,
    contact: String,
    config: SrvPhoneConfig,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    clock: Deadline,
    cseq: u32,
    /// When each address was last sent to: the NAT's pinholes.
    heard_from: HashMap<SocketAddr, Duration>,
    /// The 200 sent for each answered INVITE's Call-ID, resent if the INVITE is.
    answered: HashMap<String, String>,
    seed: u64,
    /// One resolver for the phone's life, so its cache works as a phone's would.
    resolver: Option<Resolver>,
}

/// What came back to a request or keepalive.
enum Answer {
    Status(Received),
    Timeout,
}

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
/// How long a keepalive may go unanswered, with a retransmission at half of it.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// A STUN Binding request (RFC 5389) with transaction id `id` and `attributes` (whole
/// attributes, padded), as a phone's keepalive or a test's probe.
pub fn stun_binding_request(id: &[u8; 12], attributes: &[u8]) -> Vec<u8> {
    let mut r = vec![0x00, 0x01];
    r.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    r.extend_from_slice(id);
    r.extend_from_slice(attributes);
    r
}

impl Phone {
    fn record(&self, event: PhoneEvent) {
        let mut s = self.shared.lock().unwrap();
        if let PhoneEvent::Registered { via } = &event {
            s.registered_via = Some(*via);
        }
        if matches!(event, PhoneEvent::FlowFailed { .. }) {
            s.registered_via = None;
        }
        s.events.push((self.clock.elapsed(), event));
    }

    fn run(&mut self) {
        let mut failed: Option<SocketAddr> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let via = match self.register_somewhere(failed.take()) {
                Some(via) => via,
                None => {
                    self.idle(Duration::from_secs(1));
                    continue;
                }
            };
            let refresh_at =
                self.clock.elapsed() + Duration::from_secs(u64::from(self.config.expires / 2));
            while !self.stop.load(Ordering::Relaxed) && self.clock.elapsed() < refresh_at {
                let Some(every) = self.config.keepalive else {
                    self.idle(refresh_at.saturating_sub(self.clock.elapsed()));
                    continue;
                };
                self.idle(every.min(refresh_at.saturating_sub(self.clock.elapsed())));
                if self.clock.elapsed() >= refresh_at {
                    break;
                }
                if !self.keepalive(via) {
                    self.record(PhoneEvent::FlowFailed { via });
                    failed = Some(via);
                    break;
                }
            }
        }
    }

    /// The servers in RFC 3263 order, the one whose flow just failed last.
    fn targets(&mut self, failed: Option<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
        if self.resolver.is_none() {
            let mut options = ResolverOpts::default();
            options.attempts = 1;
            options.timeout = Duration::from_secs(1);
            let servers = NameServerConfigGroup::from_ips_clear(
                &[self.config.dns.ip()],
                self.config.dns.port(),
                true,
            );
            let config = ResolverConfig::from_parts(None, vec![], servers);
            self.resolver =
                Some(Resolver::new(config, options).map_err(|e| format!("resolver: {e}"))?);
        }
        let resolver = self.resolver.as_ref().expect("just made");
        let service = format!("_sip._udp.{}.", self.config.domain);
        let srv = resolver
            .srv_lookup(service.as_str())
            .map_err(|e| format!("SRV {service}: {e}"))?;
        let mut records: Vec<(u16, u16, u16, String)> = srv
            .iter()
            .map(|r| (r.priority(), r.weight(), r.port(), r.target().to_ascii()))
            .collect();
        records.sort_by_key(|r| r.0);
        let mut ordered = Vec::new();
        // RFC 2782: within one priority, pick by running sum of weights, one at a time.
        while !records.is_empty() {
            let priority = records[0].0;
            let mut group: Vec<_> = records
                .iter()
                .filter(|r| r.0 == priority)
                .cloned()
                .collect();
            records.retain(|r| r.0 != priority);
            while !group.is_empty() {
                let total: u32 = group.iter().map(|r| u32::from(r.1)).sum();
                let pick = (self.random() % u64::from(total + 1)) as u32;
                let mut sum = 0;
                let i = group
                    .iter()
                    .position(|r| {
                        sum += u32::from(r.1);
                        sum >= pick
                    })
                    .unwrap_or(0);
                ordered.push(group.remove(i));
            }
        }
        let resolver = self.resolver.as_ref().expect("made above");
        let mut out = Vec::new();
        for (_, _, port, target) in ordered {
            let ips = resolver
                .lookup_ip(target.as_str())
                .map_err(|e| format!("A {target}: {e}"))?;
            out.extend(ips.iter().map(|ip: IpAddr| SocketAddr::new(ip, port)));
        }
        if let Some(f) = failed {
            if let Some(i) = out.iter().position(|t| *t == f) {
                let t = out.remove(i);
                out.push(t);
            }
        }
        Ok(out)
    }

    fn random(&mut self) -> u64 {
        // xorshift64: enough to spread a weighted draw.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    fn register_somewhere(&mut self, failed: Option<SocketAddr>) -> Option<SocketAddr> {
        let targets = match self.targets(failed) {
            Ok(t) if !t.is_empty() => t,
            Ok(_) => {
                self.record(PhoneEvent::NoServer {
                    why: "no SRV targets".into(),
                });
                return None;
            }
            Err(why) => {
                self.record(PhoneEvent::NoServer { why });
                return None;
            }
        };
        for via in targets {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            match self.register(via) {
                200 => {
                    self.record(PhoneEvent::Registered { via });
                    return Some(via);
                }
                status => self.record(PhoneEvent::RegisterFailed { via, status }),
            }
        }
        self.record(PhoneEvent::NoServer {
            why: "every target failed".into(),
        });
        None
    }

    /// One REGISTER through `via`, answering a 401 once: the final status, 0 for none.
    fn register(&mut self, via: SocketAddr) -> u16 {
        let mut authorization = String::new();
        for _ in 0..2 {
            self.cseq += 1;
            let local = self.socket.local_addr().unwrap();
            let text = format!(
                "REGISTER sip:{domain} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch=z9hG4bK-srv-{cseq}-{port};rport\r\n\
                 From: <sip:{user}@{domain}>;tag=srv{port}\r\n\
                 To: <sip:{user}@{domain}>\r\n\
                 Call-ID: srv-{user}-{port}\r\n\
                 CSeq: {cseq} REGISTER\r\n\
                 Max-Forwards: 70\r\n\
                 Contact: <{contact}>\r\n\
                 Expires: {expires}\r\n\
                 {authorization}\
                 Content-Length: 0\r\n\r\n",
                domain = self.config.domain,
                user = self.config.user,
                cseq = self.cseq,
                port = local.port(),
                contact = self.contact,
                expires = self.config.expires,
            );
            let reply = match self.transact(via, text.as_bytes(), self.config.transaction_timeout) {
                Answer::Status(r) => r,
                Answer::Timeout => return 0,
            };
            let status = reply.status().unwrap_or(0);
            if status != 401 || !authorization.is_empty() {
                return status;
            }
            let Some(challenge) = reply
                .headers("WWW-Authenticate")
                .into_iter()
                .find(|c| !c.contains("algorithm=") || c.contains("algorithm=MD5"))
            else {
                return status;
            };
            let uri = format!("sip:{}", self.config.domain);
            let cnonce = format!("srv{}", self.cseq);
            authorization = format!(
                "Authorization: {}\r\n",
                digest_authorization(
                    &self.config.user,
                    &self.config.password,
                    &challenge,
                    "REGISTER",
                    &uri,
                    1,
                    &cnonce,
                )
            );
        }
        0
    }

    /// Sends `bytes` to `to` with RFC 3261 §17.1.2 retransmissions (T1 doubling to T2)
    /// until a final response to that CSeq, or `timeout`.
    fn transact(&mut self, to: SocketAddr, bytes: &[u8], timeout: Duration) -> Answer {
        let cseq = format!("{} REGISTER", self.cseq);
        let deadline = Deadline::after(timeout);
        let mut interval = T1;
        while !deadline.expired() {
            self.send(to, bytes);
            let wait = Deadline::after(interval.min(deadline.remaining()));
            while !wait.expired() {
                if let Some(r) = self.receive(wait.remaining()) {
                    let final_status = r.status().is_some_and(|s| s >= 200);
                    if final_status && r.header("CSeq").as_deref() == Some(cseq.as_str()) {
                        return Answer::Status(r);
                    }
                }
            }
            interval = (interval * 2).min(T2);
        }
        Answer::Timeout
    }

    /// One STUN keepalive to `via`, resent once: whether it was answered.
    fn keepalive(&mut self, via: SocketAddr) -> bool {
        let id: [u8; 12] = std::array::from_fn(|i| (self.random() >> (i % 8)) as u8);
        let request = stun_binding_request(&id, &[]);
        let deadline = Deadline::after(KEEPALIVE_TIMEOUT);
        for _ in 0..2 {
            self.send(via, &request);
            let half = Deadline::after(KEEPALIVE_TIMEOUT / 2);
            while !half.expired() && !deadline.expired() {
                if let Some(from) = self.receive_stun(&id, half.remaining()) {
                    if from == via {
                        return true;
                    }
                }
            }
        }
        false
    }

    fn send(&mut self, to: SocketAddr, bytes: &[u8]) {
        self.heard_from.insert(to, self.clock.elapsed());
        let _ = self.socket.send_to(bytes, to);
    }

    /// Answers requests for up to `time`.
    fn idle(&mut self, time: Duration) {
        let deadline = Deadline::after(time);
        while !deadline.expired() && !self.stop.load(Ordering::Relaxed) {
            let _ = self.receive(deadline.remaining().min(Duration::from_millis(100)));
        }
    }

    /// The next datagram the NAT lets through, within `timeout`: requests are answered
    /// here and not returned, responses are.
    fn receive(&mut self, timeout: Duration) -> Option<Received> {
        let (bytes, from) = self.datagram(timeout)?;
        if bytes.first().is_some_and(|b| b & 0xC0 == 0) {
            return None; // a STUN response nobody waits for any more
        }
        let m = Received {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            from,
        };
        if m.method().is_none() {
            return Some(m);
        }
        self.answer(&m);
        None
    }

    fn receive_stun(&mut self, id: &[u8; 12], timeout: Duration) -> Option<SocketAddr> {
        let (bytes, from) = self.datagram(timeout)?;
        if bytes.len() >= 20 && bytes[0..2] == [0x01, 0x01] && bytes[8..20] == id[..] {
            return Some(from);
        }
        if bytes.first().is_some_and(|b| b & 0xC0 != 0) {
            let m = Received {
                text: String::from_utf8_lossy(&bytes).into_owned(),
                from,
            };
            if m.method().is_some() {
                self.answer(&m);
            }
        }
        None
    }

    fn datagram(&mut self, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = vec![0u8; 65535];
        let (n, from) = self.socket.recv_from(&mut buf).ok()?;
        if self.config.nat {
            let open = self
                .heard_from
                .get(&from)
                .is_some_and(|t| self.clock.elapsed().saturating_sub(*t) < Duration::from_secs(60));
            if !open {
                self.record(PhoneEvent::NatDropped { from });
                return None;
            }
        }
        buf.truncate(n);
        Some((buf, from))
    }

    fn answer(&mut self, request: &Received) {
        let tag = format!("srv{}", self.socket.local_addr().unwrap().port());
        let contact = format!("Contact: <{}>\r\n", self.contact);
        let reply = |status: u16, reason: &str, extra: &str| {
            response_text(request, status, reason, &tag, extra)
        };
        match request.method() {
            Some("INVITE") => {
                let call_id = request.header("Call-ID").unwrap_or_default();
                if let Some(ok) = self.answered.get(&call_id) {
                    let ok = ok.clone();
                    self.send(request.from, ok.as_bytes());
                    return;
                }
                self.send(request.from, reply(180, "Ringing", "").as_bytes());
                let ok = reply(200, "OK", &contact);
                self.send(request.from, ok.as_bytes());
                self.answered.insert(call_id.clone(), ok);
                self.record(PhoneEvent::CallAnswered { call_id });
            }
            Some("ACK") => {}
            Some(_) => self.send(request.from, reply(200, "OK", "").as_bytes()),
            None => {}
        }
    }
}
