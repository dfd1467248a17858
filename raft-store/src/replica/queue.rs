//! The queue between proposers and the batcher, which wakes the batcher only when it has
//! a use for the wake-up.
//!
//! A channel wakes its receiver for every message. While a batch lingers for more
//! proposals, that meant one wake-up per proposal: the proposing SIP thread wrote to the
//! runtime's eventfd to unpark the thread the batcher waited on, and that thread woke,
//! took one proposal and slept again, once for every registration of a storm (the
//! proposer's side alone was about 5% of the leader's CPU: BENCHMARKS.md, the storm). Here a
//! proposal wakes the batcher only when it waits for a first one, or when the batch it
//! lingers over has become full; otherwise the batcher takes what arrived when its linger
//! ends.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::{Notify, Semaphore};

/// When a proposal must wake the batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Never: the batcher is busy, and takes what waits when it comes back.
    No,
    /// Once this many proposals wait.
    At(usize),
}

/// What waits, and when the next proposal wakes the batcher: the part without I/O.
#[derive(Debug)]
pub(super) struct Waiting<T> {
    items: VecDeque<T>,
    wake: Wake,
    closed: bool,
}

impl<T> Waiting<T> {
    fn new() -> Waiting<T> {
        Waiting {
            items: VecDeque::new(),
            wake: Wake::No,
            closed: false,
        }
    }

    /// Adds `item`; whether the batcher must be woken for it.
    fn push(&mut self, item: T) -> bool {
        self.items.push_back(item);
        match self.wake {
            Wake::At(n) if self.items.len() >= n => {
                self.wake = Wake::No;
                true
            }
            _ => false,
        }
    }

    /// Moves up to `room` waiting items to `into`; how many.
    fn take(&mut self, into: &mut Vec<T>, room: usize) -> usize {
        let n = room.min(self.items.len());
        into.extend(self.items.drain(..n));
        n
    }

    /// The batcher will sleep until `more` items wait (at least one).
    fn wake_at(&mut self, more: usize) {
        self.wake = Wake::At(more.max(1));
    }

    /// The batcher is not sleeping on the queue.
    fn busy(&mut self) {
        self.wake = Wake::No;
    }
}

/// Proposals on their way to the batcher, at most `capacity` waiting at once: a proposer
/// waits for room as it would on a full channel. A wake-up left over (a proposal's that
/// raced the end of a linger) only makes the next linger end early.
pub(super) struct Queue<T> {
    waiting: Mutex<Waiting<T>>,
    wake: Notify,
    room: Semaphore,
}

/// The queue is closed: the replica stopped.
#[derive(Debug)]
pub(super) struct Closed;

impl<T> Queue<T> {
    pub(super) fn new(capacity: usize) -> Queue<T> {
        Queue {
            waiting: Mutex::new(Waiting::new()),
            wake: Notify::new(),
            room: Semaphore::new(capacity),
        }
    }

    /// Queues `item` once there is room.
    pub(super) async fn send(&self, item: T) -> Result<(), Closed> {
        self.room.acquire().await.map_err(|_| Closed)?.forget();
        let wake = {
            let mut waiting = self.waiting.lock().expect("proposal queue");
            if waiting.closed {
                return Err(Closed);
            }
            waiting.push(item)
        };
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Refuses every proposal from now on; the batcher ends once it took what waits.
    pub(super) fn close(&self) {
        self.waiting.lock().expect("proposal queue").closed = true;
        self.room.close();
        self.wake.notify_one();
    }

    /// Moves up to `room` waiting items to `into`, without waiting; how many.
    pub(super) fn take(&self, into: &mut Vec<T>, room: usize) -> usize {
        let n = self
            .waiting
            .lock()
            .expect("proposal queue")
            .take(into, room);
        self.room.add_permits(n);
        n
    }

    /// Waits until something waits and moves up to `room` of it to `into`; `None` once
    /// the queue is closed and empty.
    pub(super) async fn first(&self, into: &mut Vec<T>, room: usize) -> Option<usize> {
        loop {
            // A wake between the look and the wait is not lost: `notify_one` leaves a
            // permit when nobody waits, which the wait then takes.
            let woken = self.wake.notified();
            {
                let mut waiting = self.waiting.lock().expect("proposal queue");
                let n = waiting.take(into, room);
                if n > 0 {
                    waiting.busy();
                    drop(waiting);
                    self.room.add_permits(n);
                    return Some(n);
                }
                if waiting.closed {
                    return None;
                }
                waiting.wake_at(1);
            }
            woken.await;
        }
    }

    /// Sleeps until `until`, or until `more` items wait, and moves up to `room` of what
    /// waits then to `into`; how many.
    pub(super) async fn linger(
        &self,
        into: &mut Vec<T>,
        room: usize,
        more: usize,
        until: tokio::time::Instant,
    ) -> usize {
        let woken = self.wake.notified();
        {
            let mut waiting = self.waiting.lock().expect("proposal queue");
            if waiting.items.len() >= more || waiting.closed {
                drop(waiting);
                return self.take(into, room);
            }
            waiting.wake_at(more);
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until(until) => {}
        }
        self.waiting.lock().expect("proposal queue").busy();
        self.take(into, room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision alone: a proposal wakes a batcher that waits for a first one, and one
    /// that lingers only once the batch is full; a busy batcher is never woken.
    #[test]
    fn a_proposal_wakes_the_batcher_only_when_it_waits_for_it() {
        let mut w = Waiting::new();
        assert!(!w.push(1), "the batcher is busy");
        let mut into = Vec::new();
        assert_eq!(w.take(&mut into, 10), 1);
        w.wake_at(1);
        assert!(w.push(2), "a first proposal wakes an idle batcher");
        assert!(!w.push(3), "once woken, no more wake-ups");
        into.clear();
        assert_eq!(w.take(&mut into, 10), 2);
        w.wake_at(3);
        assert!(!w.push(4));
        assert!(!w.push(5));
        assert!(w.push(6), "the third fills the lingering batch");
        assert!(!w.push(7));
        w.busy();
        into.clear();
        assert_eq!(w.take(&mut into, 2), 2, "at most the room asked for");
        assert_eq!(into, [4, 5]);
    }

    /// A lingering batcher wakes when its batch is full, long before its deadline, and at
    /// the deadline with what came otherwise; a closed queue refuses proposals and ends
    /// the batcher once emptied.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_batch_ends_when_full_or_at_its_deadline() {
        let queue = std::sync::Arc::new(Queue::new(100));
        let mut batch = Vec::new();
        queue.send(0).await.unwrap();
        assert_eq!(queue.first(&mut batch, 10).await, Some(1));

        let start = tokio::time::Instant::now();
        let sender = queue.clone();
        tokio::spawn(async move {
            for i in 1..=3 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                sender.send(i).await.unwrap();
            }
        });
        let deadline = start + std::time::Duration::from_secs(10);
        assert_eq!(queue.linger(&mut batch, 10, 3, deadline).await, 3);
        assert_eq!(batch, [0, 1, 2, 3]);
        assert!(start.elapsed() < std::time::Duration::from_secs(1));

        queue.send(4).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(5);
        assert_eq!(queue.linger(&mut batch, 10, 3, deadline).await, 1);
        assert_eq!(tokio::time::Instant::now(), deadline);

        queue.send(5).await.unwrap();
        queue.close();
        assert!(queue.send(6).await.is_err());
        let mut rest = Vec::new();
        assert_eq!(queue.first(&mut rest, 10).await, Some(1));
        assert_eq!(queue.first(&mut rest, 10).await, None);
    }

    /// A full queue makes a proposer wait for room, as a full channel did.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_holds_the_proposer_until_the_batcher_takes() {
        let queue = std::sync::Arc::new(Queue::new(2));
        queue.send(1).await.unwrap();
        queue.send(2).await.unwrap();
        let sender = queue.clone();
        let third = tokio::spawn(async move { sender.send(3).await });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(!third.is_finished());
        let mut batch = Vec::new();
        assert_eq!(queue.first(&mut batch, 1).await, Some(1));
        third.await.unwrap().unwrap();
        assert_eq!(queue.take(&mut batch, 10), 2);
        assert_eq!(batch, [1, 2, 3]);
    }
}
