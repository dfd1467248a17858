//! The links of a WAN lab: one TUN device per namespace, whose packets this process reads
//! and writes into the destination's TUN device, after a delay when both ends are
//! members. It stands in for `tc netem`, which the kernels these tests run on lack
//! (`CONFIG_NET_SCH_NETEM` is not set), and works at the IP layer like netem would:
//! every packet between two members (the Raft link, SIP forwarded between nodes,
//! anything else) waits the same time in each direction and keeps its order, and the
//! nodes see their peers' own addresses. Packets to and from the clients' namespace are
//! not delayed: a phone is near the node it uses.
//!
//! Each device is read by a thread of its own; delayed packets wait in one queue, in the
//! order they arrived, served by one more thread. Changing the delay never reorders
//! packets: one that arrives after a shorter delay was set waits behind those queued
//! before it.

use std::collections::VecDeque;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Deadline;

/// Which host (0 for the clients, a member's id otherwise) owns an address, if any.
pub type Owner = fn(Ipv4Addr) -> Option<u64>;

/// A packet waiting in the delay line: when it is due (time since the relay started),
/// the host it goes to, its bytes.
type Queued = (Duration, usize, Vec<u8>);

struct Shared {
    /// TUN devices by host.
    tuns: Vec<File>,
    owner: Owner,
    stop: AtomicBool,
    /// The one-way delay between members, in microseconds.
    delay_us: AtomicU64,
    queue: Mutex<VecDeque<Queued>>,
    queued: Condvar,
    clock: Deadline,
    relayed: AtomicU64,
}

/// A running relay; dropping it stops its threads and closes the devices (which deletes
/// them).
pub struct Relay {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Serves `tuns` (the device of host `i` at index `i`), delivering each IPv4 packet to
    /// the device of the host that `owner` says owns its destination. Anything else (IPv6
    /// router solicitations, addresses no host owns) is dropped.
    pub fn start(tuns: Vec<File>, owner: Owner) -> Relay {
        let shared = Arc::new(Shared {
            tuns,
            owner,
            stop: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            queued: Condvar::new(),
            clock: Deadline::after(Duration::ZERO),
            relayed: AtomicU64::new(0),
        });
        let mut threads: Vec<JoinHandle<()>> = (0..shared.tuns.len())
            .map(|host| {
                let shared = shared.clone();
                std::thread::spawn(move || read_loop(&shared, host))
            })
            .collect();
        let delayer = shared.clone();
        threads.push(std::thread::spawn(move || delay_loop(&delayer)));
        Relay { shared, threads }
    }

    /// From now on every packet between two members waits `one_way` before delivery.
    pub fn set_delay(&self, one_way: Duration) {
        let us = u64::try_from(one_way.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(us, Ordering::Relaxed);
    }

    /// Packets delivered so far.
    pub fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.queued.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads packets from host `from`'s device until the relay stops.
fn read_loop(shared: &Shared, from: usize) {
    let tun = &shared.tuns[from];
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        #[allow(unsafe_code)]
        // SAFETY: one valid pollfd, owned by this frame, for the length given.
        let ready = unsafe { libc::poll(&mut poll, 1, 100) };
        if ready <= 0 || poll.revents & libc::POLLIN == 0 {
            if poll.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // The device is gone (its namespace was deleted): nothing more to read.
                return;
            }
            continue;
        }
        #[allow(unsafe_code)]
        // SAFETY: `buf` is writable for its whole length and outlives the call.
        let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        let packet = &buf[..n];
        if n < 20 || packet[0] >> 4 != 4 {
            continue;
        }
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let Some(to) = (shared.owner)(dst).and_then(|h| usize::try_from(h).ok()) else {
            continue;
        };
        if to >= shared.tuns.len() || to == from {
            continue;
        }
        if from == 0 || to == 0 {
            deliver(shared, to, packet);
            continue;
        }
        let delay = Duration::from_micros(shared.delay_us.load(Ordering::Relaxed));
        let due = shared.clock.elapsed() + delay;
        shared
            .queue
            .lock()
            .unwrap()
            .push_back((due, to, packet.to_vec()));
        shared.queued.notify_one();
    }
}

/// Delivers queued packets, in order, each once it is due, until the relay stops.
fn delay_loop(shared: &Shared) {
    let mut queue = shared.queue.lock().unwrap();
    while !shared.stop.load(Ordering::Relaxed) {
        let wait = match queue.front() {
            None => Duration::from_millis(100),
            Some((due, _, _)) => {
                let now = shared.clock.elapsed();
                if *due <= now {
                    let (_, to, packet) = queue.pop_front().expect("the front just seen");
                    drop(queue);
                    deliver(shared, to, &packet);
                    queue = shared.queue.lock().unwrap();
                    continue;
                }
                *due - now
            }
        };
        queue = shared.queued.wait_timeout(queue, wait).unwrap().0;
    }
}

/// Writes `packet` into host `to`'s device. A packet the device refuses (it is down, its
/// queue is full) is lost, as on a real link.
fn deliver(shared: &Shared, to: usize, packet: &[u8]) {
    #[allow(unsafe_code)]
    // SAFETY: `packet` is readable for its whole length and outlives the call.
    let n = unsafe {
        libc::write(
            shared.tuns[to].as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
        )
    };
    if n > 0 {
        shared.relayed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens a TUN device named `name` (IP packets, no extra header) in the network namespace
/// of the calling thread.
pub fn open_tun(name: &str) -> File {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun (the WAN lab needs the kernel's TUN driver)");
    #[allow(unsafe_code)]
    // SAFETY: ifreq is plain data, for which all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    assert!(
        name.len() < request.ifr_name.len(),
        "TUN name {name} too long"
    );
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    #[allow(unsafe_code)]
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `request` is and outlives.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    tun
}
