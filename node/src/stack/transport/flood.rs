//! Flood defence (what Kamailio's pike module does): a token bucket of requests per
//! source address, and a temporary ban for an address that empties its bucket.
//!
//! A UDP source address proves nothing, so a ban on its own would let anyone who floods
//! with an office's address shut that office out. A banned address therefore loses only
//! the requests that prove nothing: a request that shows its sender heard from the
//! cluster before (credentials on a nonce issued to that very address, or a genuine flow
//! token of a dialog) still passes, as do ACK (never answered) and CANCEL (answered once,
//! and needed to stop a ringing call). Deciding that is the agents' business, through
//! [`Vouch`]; this module only counts. IPv6 sources count per /64, the block one
//! subscriber usually gets. Both tables are bounded, with the oldest entry making room;
//! bans have a table of their own, so a flood from many new addresses cannot push an
//! existing ban out by filling the buckets.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use tandem_sip::{Message, Method};
use tokio::time::Instant;

/// What the agents know about a source that the transports do not.
pub trait Vouch: Send + Sync {
    /// A peer that is never limited: another member of the cluster.
    fn trusted(&self, ip: IpAddr) -> bool;
    /// Whether `request` shows that its sender received something from the cluster at
    /// `ip` before, which a spoofed flood cannot.
    fn proves_round_trip(&self, request: &Message, ip: IpAddr) -> bool;
}

/// The limit's settings (`sip.flood_*`).
#[derive(Clone, Debug, PartialEq)]
pub struct FloodLimit {
    /// Sustained requests per second one address may send; 0 turns the limit off.
    pub rate: f64,
    /// Requests an address may send at once above the sustained rate.
    pub burst: f64,
    /// How long an address that exceeded the limit stays banned.
    pub ban: Duration,
    /// Addresses never limited, as (network, prefix length).
    pub exempt: Vec<(IpAddr, u8)>,
}

impl FloodLimit {
    pub fn is_on(&self) -> bool {
        self.rate > 0.0
    }

    fn exempts(&self, ip: IpAddr) -> bool {
        self.exempt
            .iter()
            .any(|(net, len)| in_network(ip, *net, *len))
    }
}

/// Whether `ip` lies in `net`/`len`.
pub fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// The address is banned (perhaps by this very request); pass only with proof.
    Banned,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A table bounded at `max` entries that evicts the one inserted first, in O(1).
#[derive(Debug)]
struct Bounded<V> {
    map: HashMap<IpAddr, (V, u64)>,
    /// Insertion order; positions of keys removed or inserted again since are skipped.
    order: VecDeque<(IpAddr, u64)>,
    next_seq: u64,
    max: usize,
}

impl<V> Bounded<V> {
    fn new(max: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            max: max.max(1),
        }
    }

    fn insert(&mut self, k: IpAddr, v: V) {
        if !self.map.contains_key(&k) {
            while self.map.len() >= self.max {
                let Some((old, seq)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|(_, s)| *s == seq) {
                    self.map.remove(&old);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((k, seq));
        self.map.insert(k, (v, seq));
        if self.order.len() > 2 * self.max {
            let map = &self.map;
            self.order
                .retain(|(k, seq)| map.get(k).is_some_and(|(_, s)| s == seq));
        }
    }

    fn get_mut(&mut self, k: &IpAddr) -> Option<&mut V> {
        self.map.get_mut(k).map(|(v, _)| v)
    }

    fn remove(&mut self, k: &IpAddr) {
        self.map.remove(k);
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The address a source is counted under: itself, or its /64 for IPv6.
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// The per-address buckets and bans: sans-IO, time comes in.
#[derive(Debug)]
pub struct FloodGuard {
    limit: FloodLimit,
    buckets: Bounded<Bucket>,
    /// When each banned address's ban ends.
    bans: Bounded<Instant>,
}

impl FloodGuard {
    pub fn new(limit: FloodLimit, max: usize) -> FloodGuard {
        FloodGuard {
            limit,
            buckets: Bounded::new(max),
            bans: Bounded::new(max),
        }
    }

    /// Counts one request from `ip` at `now`. `newly_banned` is set when this request
    /// started a ban.
    pub fn admit(&mut self, ip: IpAddr, now: Instant, newly_banned: &mut bool) -> Verdict {
        if !self.limit.is_on() || self.limit.exempts(ip) {
            return Verdict::Pass;
        }
        let FloodLimit {
            rate, burst, ban, ..
        } = self.limit;
        let k = counted_as(ip);
        if let Some(until) = self.bans.get_mut(&k).map(|u| *u) {
            if now < until {
                return Verdict::Banned;
            }
            // The ban is over: start again with a full bucket.
            self.bans.remove(&k);
            self.buckets.remove(&k);
        }
        let b = match self.buckets.get_mut(&k) {
            Some(b) => b,
            None => {
                self.buckets.insert(
                    k,
                    Bucket {
                        tokens: burst,
                        last: now,
                    },
                );
                self.buckets.get_mut(&k).expect("just inserted")
            }
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Verdict::Pass
        } else {
            self.buckets.remove(&k);
            self.bans.insert(k, now + ban);
            *newly_banned = true;
            Verdict::Banned
        }
    }

    /// Addresses tracked: buckets and bans.
    pub fn len(&self) -> usize {
        self.buckets.len() + self.bans.len()
    }

    /// Addresses tracked, and how many of those are banned now.
    #[cfg(test)]
    fn sizes(&self, now: Instant) -> (usize, usize) {
        let banned = self.bans.map.values().filter(|(u, _)| now < *u).count();
        (self.len(), banned)
    }
}

/// Whether a ban lets `message` through: an ACK (never answered, and not counted
/// either) and a CANCEL (counted, answered once, and how a caller at a banned address
/// stops a call that is ringing).
pub fn passes_bans(message: &Message) -> bool {
    matches!(message.method(), Some(Method::Ack | Method::Cancel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_network;

    fn limit(rate: f64, burst: f64) -> FloodLimit {
        FloodLimit {
            rate,
            burst,
            ban: Duration::from_secs(60),
            exempt: vec![parse_network("10.0.0.0/8").unwrap()],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_the_address_is_banned_until_the_ban_lapses() {
        let mut g = FloodGuard::new(limit(10.0, 5.0), 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        let mut banned = false;
        for _ in 0..5 {
            assert_eq!(g.admit(ip, t0, &mut banned), Verdict::Pass);
        }
        assert!(!banned);
        assert_eq!(g.admit(ip, t0, &mut banned), Verdict::Banned);
        assert!(banned);
        // Another address is not affected; the banned one stays banned while it waits.
        assert_eq!(g.admit(other, t0, &mut false), Verdict::Pass);
        let later = t0 + Duration::from_secs(30);
        let mut again = false;
        assert_eq!(g.admit(ip, later, &mut again), Verdict::Banned);
        assert!(!again, "a ban in force is not a new one");
        assert_eq!(g.sizes(later), (2, 1));
        let after = t0 + Duration::from_secs(61);
        assert_eq!(g.admit(ip, after, &mut false), Verdict::Pass);
        assert_eq!(g.sizes(after), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sustained_rate_refills_the_bucket() {
        let mut g = FloodGuard::new(limit(10.0, 2.0), 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        // 10/s for ten seconds, one every 100 ms: never banned.
        for i in 0..100 {
            let now = t0 + Duration::from_millis(100 * i);
            assert_eq!(g.admit(ip, now, &mut false), Verdict::Pass, "request {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exempt_networks_and_a_zero_rate_are_never_limited() {
        let mut g = FloodGuard::new(limit(1.0, 1.0), 100);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(
                g.admit("10.1.2.3".parse().unwrap(), t0, &mut false),
                Verdict::Pass
            );
        }
        let mut off = FloodGuard::new(limit(0.0, 1.0), 100);
        for _ in 0..100 {
            assert_eq!(
                off.admit("192.0.2.1".parse().unwrap(), t0, &mut false),
                Verdict::Pass
            );
        }
        assert_eq!(g.sizes(t0).0 + off.sizes(t0).0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tables_are_bounded_and_new_addresses_never_push_a_ban_out() {
        let mut g = FloodGuard::new(limit(10.0, 1.0), 3);
        let t0 = Instant::now();
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        g.admit(ip(1), t0, &mut false);
        assert_eq!(g.admit(ip(1), t0, &mut false), Verdict::Banned);
        for i in 2..=250 {
            g.admit(ip(i), t0, &mut false);
        }
        assert_eq!(g.sizes(t0), (4, 1), "three buckets, one ban");
        assert_eq!(g.admit(ip(1), t0, &mut false), Verdict::Banned);
        assert!(g.buckets.order.len() <= 6 && g.bans.order.len() <= 6);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counts_per_64() {
        let mut g = FloodGuard::new(limit(10.0, 2.0), 100);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(g.admit(a, t0, &mut false), Verdict::Pass);
        assert_eq!(g.admit(b, t0, &mut false), Verdict::Pass);
        assert_eq!(
            g.admit(a, t0, &mut false),
            Verdict::Banned,
            "one /64, one bucket"
        );
        assert_eq!(g.admit(other, t0, &mut false), Verdict::Pass);
    }

    #[test]
    fn networks_parse_and_match() {
        let (n, l) = parse_network("192.0.2.0/24").unwrap();
        assert!(in_network("192.0.2.200".parse().unwrap(), n, l));
        assert!(!in_network("192.0.3.1".parse().unwrap(), n, l));
        let (n, l) = parse_network("::1").unwrap();
        assert!(in_network("::1".parse().unwrap(), n, l));
        assert!(!in_network("127.0.0.1".parse().unwrap(), n, l));
        let (n, l) = parse_network("0.0.0.0/0").unwrap();
        assert!(in_network("203.0.113.9".parse().unwrap(), n, l));
        assert!(parse_network("10.0.0.0/33").is_err());
        assert!(parse_network("example.com").is_err());
    }
}
