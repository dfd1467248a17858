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
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sip-{i}"))
                .spawn(move || {
                    runtime.block_on(stop.cancelled());
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

#[cfg(test)]
mod tests {
    use super::*;

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
