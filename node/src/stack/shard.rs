//! The SIP stack in shards. A node runs `node.sip_threads` copies of the transaction layer
//! and the core, each on a thread of its own with a single-threaded tokio runtime, and every
//! received message goes to the shard its Call-ID hashes to.
//!
//! Every message of a call carries its Call-ID: requests and their responses, CANCEL and
//! ACK, and both legs of a proxied call (a proxy never changes the Call-ID, RFC 3261 §16.6).
//! So a server transaction, the fork it starts and that fork's client transactions all live
//! in one shard, and a message crosses between threads at most once, when the thread that
//! read it from the socket is not its shard's. Everything the shards share (the replica,
//! the registrar's writers, digest state, the proxy's dialog table, the counters) was
//! already safe to share between threads.
//!
//! Raft, the HTTP listeners, TCP/TLS accept loops and the node's own periodic work stay on
//! the main runtime.
//!
//! A shard thread that stops running (a blocking call, or a loop that never ends, in code
//! it runs) silently stops every call whose Call-ID hashes to it. So each thread counts a
//! beat every second, and [`ShardThreads::watch`], on the main runtime, logs an error
//! naming the thread when its count has not moved for [`STALLED_AFTER_BEATS`] seconds,
//! counts it (`tandem_sip_thread_stalls_total`), and says when it runs again. Beats are
//! counted, not timed, so a clock that steps or a process that was stopped as a whole
//! raises nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_sip::Message;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Most shards a node runs; a transaction id is its shard modulo this.
pub const MAX_SHARDS: usize = crate::config::MAX_SIP_THREADS as usize;

/// How long a shard's runtime waits for its remaining tasks once the node stops.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);
/// How often each shard thread beats, and the watchdog looks.
const BEAT_EVERY: Duration = Duration::from_secs(1);
/// Looks without a beat after which a shard thread is reported stalled: far longer than
/// any one task of a shard may run (they never block), and short enough to show in the
/// log well before a caller gives up (Timer B, 32 s).
const STALLED_AFTER_BEATS: u32 = 5;

/// The shard a Call-ID belongs to, out of `shards`.
pub fn of_call_id(call_id: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    // FNV-1a: deterministic across threads and restarts, and a Call-ID is short. A peer
    // that picks Call-IDs to load one shard only slows its own calls' shard.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in call_id.as_bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    // Fold the high bits in: the low bits of FNV-1a alone spread short keys poorly.
    ((hash ^ (hash >> 32)) % shards as u64) as usize
}

/// The shard a message belongs to: that of its Call-ID, or the first shard for a message
/// without one (which validation will refuse). With one shard nothing is read.
pub fn of_message(message: &Message, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    match message.call_id() {
        Ok(call_id) => of_call_id(&call_id, shards),
        Err(_) => 0,
    }
}

/// The shard threads, each running a single-threaded tokio runtime until the node stops.
pub struct ShardThreads {
    handles: Vec<Handle>,
    /// Each thread's beats so far.
    beats: Vec<Arc<AtomicU64>>,
    done: Vec<oneshot::Receiver<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ShardThreads {
    /// Starts `count` threads named `sip-0`, `sip-1`, …; each stops its runtime once `stop`
    /// is cancelled, dropping any task still running on it.
    pub fn start(count: usize, stop: &CancellationToken) -> Result<ShardThreads, Error> {
        let count = count.clamp(1, MAX_SHARDS);
        let mut shards = ShardThreads {
            handles: Vec::with_capacity(count),
            beats: Vec::with_capacity(count),
            done: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        // If one thread cannot start, the ones already running stop with this.
        let stop = stop.child_token();
        for i in 0..count {
            let io = |source| {
                stop.cancel();
                Error::Io {
                    context: format!("starting SIP thread sip-{i}"),
                    source,
                }
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io)?;
            let (done_tx, done_rx) = oneshot::channel();
            shards.handles.push(runtime.handle().clone());
            let beats = Arc::new(AtomicU64::new(0));
            shards.beats.push(beats.clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sip-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = beat(&beats) => {}
                        }
                    });
                    runtime.shutdown_timeout(SHUTDOWN_WAIT);
                    let _ = done_tx.send(());
                })
                .map_err(io)?;
            shards.done.push(done_rx);
            shards.threads.push(thread);
        }
        Ok(shards)
    }

    /// One runtime handle per shard, in shard order.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Watches the threads' beats until `stop`: a thread silent for
    /// [`STALLED_AFTER_BEATS`] looks is logged as stalled and counted in `stats`, and
    /// logged again when it beats once more. For the main runtime.
    pub fn watch(
        &self,
        stats: Arc<crate::stack::stats::Stats>,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let beats = self.beats.clone();
        async move {
            let mut watchdog = Watchdog::new(beats.len());
            let mut tick = tokio::time::interval(BEAT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now: Vec<u64> = beats.iter().map(|b| b.load(Ordering::Relaxed)).collect();
                for (thread, change) in watchdog.look(&now) {
                    match change {
                        Change::Stalled => {
                            stats.sip_thread_stalls.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                thread = %format!("sip-{thread}"),
                                "a SIP thread has not run for {} s: the calls whose Call-ID \
                                 hashes to it get no answer (a blocking call or an endless loop \
                                 in the code it runs; a bug to report)",
                                STALLED_AFTER_BEATS
                            );
                        }
                        Change::Resumed { looks } => tracing::warn!(
                            thread = %format!("sip-{thread}"),
                            "a SIP thread that had stalled runs again after about {looks} s"
                        ),
                    }
                }
            }
        }
    }

    /// Waits, for at most `wait`, until every shard thread has stopped. Call it after the
    /// stop token is cancelled.
    pub async fn join(self, wait: Duration) {
        let all = async {
            for done in self.done {
                let _ = done.await;
            }
        };
        if tokio::time::timeout(wait, all).await.is_err() {
            tracing::warn!("some SIP threads did not stop in time");
            return;
        }
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a SIP thread panicked");
            }
        }
    }
}

/// Counts a beat every [`BEAT_EVERY`], for ever.
async fn beat(beats: &AtomicU64) {
    let mut tick = tokio::time::interval(BEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        beats.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the watchdog saw change for one thread.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Stalled,
    /// Beating again after `looks` looks without a beat.
    Resumed {
        looks: u32,
    },
}

/// The watchdog's memory, sans-IO: each thread's beat count at the last look, and how many
/// looks in a row found it unchanged.
#[derive(Debug)]
struct Watchdog {
    last: Vec<Option<u64>>,
    quiet: Vec<u32>,
}

impl Watchdog {
    fn new(threads: usize) -> Watchdog {
        Watchdog {
            last: vec![None; threads],
            quiet: vec![0; threads],
        }
    }

    /// Takes one look at the beat counts; what changed, by thread.
    fn look(&mut self, beats: &[u64]) -> Vec<(usize, Change)> {
        let mut changes = Vec::new();
        for (i, &n) in beats.iter().enumerate() {
            if self.last[i].replace(n) == Some(n) {
                self.quiet[i] += 1;
                if self.quiet[i] == STALLED_AFTER_BEATS {
                    changes.push((i, Change::Stalled));
                }
            } else {
                if self.quiet[i] >= STALLED_AFTER_BEATS {
                    changes.push((
                        i,
                        Change::Resumed {
                            looks: self.quiet[i],
                        },
                    ));
                }
                self.quiet[i] = 0;
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_without_beats_is_reported_once_and_again_when_it_beats() {
        let mut w = Watchdog::new(2);
        assert!(w.look(&[0, 0]).is_empty());
        // Thread 1 beats on; thread 0 stops.
        for n in 1..STALLED_AFTER_BEATS {
            assert!(w.look(&[0, u64::from(n)]).is_empty(), "look {n}");
        }
        assert_eq!(w.look(&[0, 9]), [(0, Change::Stalled)]);
        assert!(w.look(&[0, 10]).is_empty(), "reported once");
        assert!(w.look(&[0, 11]).is_empty());
        assert_eq!(
            w.look(&[1, 12]),
            [(
                0,
                Change::Resumed {
                    looks: STALLED_AFTER_BEATS + 2
                }
            )]
        );
        assert!(w.look(&[2, 13]).is_empty());
        // A look that comes late (a slow main runtime) is no stall.
        assert!(w.look(&[2, 13]).is_empty());
        assert!(w.look(&[3, 14]).is_empty());
    }

    /// A real thread blocked by a task that never yields is reported, and not before.
    #[tokio::test]
    async fn a_blocked_shard_thread_is_seen_by_the_watchdog() {
        let stop = CancellationToken::new();
        let shards = ShardThreads::start(2, &stop).unwrap();
        let stats = Arc::new(crate::stack::stats::Stats::default());
        let watching = tokio::spawn(shards.watch(stats.clone(), stop.clone()));
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        shards.handles()[1].spawn(async move {
            let _ = blocked.recv();
        });
        tokio::time::sleep(BEAT_EVERY * 3).await;
        assert_eq!(stats.sip_thread_stalls.load(Ordering::Relaxed), 0);
        let deadline = tokio::time::Instant::now() + BEAT_EVERY * (STALLED_AFTER_BEATS + 5);
        while stats.sip_thread_stalls.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the blocked thread was never reported"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        release.send(()).unwrap();
        stop.cancel();
        watching.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), shards.join(Duration::from_secs(5)))
            .await
            .expect("the threads stop");
    }

    #[test]
    fn one_shard_takes_everything() {
        assert_eq!(of_call_id("a@b", 1), 0);
        assert_eq!(of_call_id("a@b", 0), 0);
    }

    #[test]
    fn call_ids_spread_over_shards_and_always_land_on_the_same_one() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let id = format!("{i}-1@127.0.0.1");
            let shard = of_call_id(&id, 4);
            assert_eq!(shard, of_call_id(&id, 4));
            counts[shard] += 1;
        }
        // sipp numbers its Call-IDs like this; each shard should get about 1,000.
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn a_message_without_call_id_goes_to_the_first_shard() {
        let m = Message::parse_datagram(
            bytes::Bytes::from_static(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n"),
            65_535,
        )
        .unwrap();
        assert_eq!(of_message(&m, 4), 0);
    }

    #[tokio::test]
    async fn threads_run_tasks_and_stop_with_the_token() {
        let stop = CancellationToken::new();
        let shards = ShardThreads::start(2, &stop).unwrap();
        let mut names = Vec::new();
        for h in shards.handles() {
            let name = h
                .spawn(async { std::thread::current().name().map(str::to_owned) })
                .await
                .unwrap();
            names.push(name.unwrap());
        }
        assert_eq!(names, ["sip-0", "sip-1"]);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), shards.join(Duration::from_secs(5)))
            .await
            .expect("the threads stop");
    }
}
