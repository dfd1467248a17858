//! Drain (node/DESIGN.md, "Drain"): before an upgrade or removal, a node stops taking new dialogs
//! and registrations (503 with Retry-After, so phones move to another SRV target) while
//! running calls and transactions finish. `tandem node drain`, `POST /v1/node/drain` and
//! SIGTERM all start it; the node reports itself drained once no transaction is left and
//! the calls it record-routed have ended (or the configured wait for them is over).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::agents::proxy::Dialogs;
use crate::stack::transaction::ActiveTransactions;

/// The node's drain state, shared by the dispatcher, the admin API and shutdown.
#[derive(Debug, Default)]
pub struct Drain {
    draining: Arc<AtomicBool>,
    active: OnceLock<Arc<ActiveTransactions>>,
    /// The proxy's open dialogs, and how long drain waits for them.
    calls: OnceLock<(Arc<Dialogs>, Duration)>,
    started: Mutex<Option<Instant>>,
}

impl Drain {
    /// The flag the dispatcher reads on every request.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    /// Starts draining; returns false if it had already started.
    pub fn start(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        let mut started = self.started.lock().expect("drain start lock");
        if started.is_none() {
            *started = Some(Instant::now());
        }
        first
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Called once the SIP stack runs, so drain can count its transactions.
    pub fn watch_transactions(&self, active: Arc<ActiveTransactions>) {
        let _ = self.active.set(active);
    }

    /// Transactions still waiting for a final response (0 on a node without SIP).
    pub fn active_transactions(&self) -> usize {
        self.active.get().map_or(0, |a| a.get())
    }

    /// Transactions in the transaction tables, completed ones included.
    pub fn held_transactions(&self) -> usize {
        self.active.get().map_or(0, |a| a.held())
    }

    /// Called once the proxy runs, so drain can wait for its calls.
    pub fn watch_calls(&self, dialogs: Arc<Dialogs>, wait: Duration) {
        let _ = self.calls.set((dialogs, wait));
    }

    /// Calls through this node that have not ended.
    pub fn active_calls(&self) -> usize {
        self.calls.get().map_or(0, |(d, _)| d.count())
    }

    /// Entries in the proxy's dialog table (calls and subscriptions, pending or up).
    pub fn tracked_dialogs(&self) -> usize {
        self.calls.get().map_or(0, |(d, _)| d.len())
    }

    /// Dialogs the proxy's full table evicted to make room for new ones.
    pub fn evicted_dialogs(&self) -> u64 {
        self.calls.get().map_or(0, |(d, _)| d.evicted())
    }

    /// New dialogs refused because the table was full of dialogs that could not be evicted.
    pub fn refused_dialogs(&self) -> u64 {
        self.calls.get().map_or(0, |(d, _)| d.refused())
    }

    /// Whether drain stopped waiting for calls: none left, or the wait is over.
    fn calls_done(&self) -> bool {
        let Some((dialogs, wait)) = self.calls.get() else {
            return true;
        };
        dialogs.count() == 0
            || self
                .started
                .lock()
                .expect("drain start lock")
                .is_some_and(|t| t.elapsed() >= *wait)
    }

    /// Draining, and nothing left to finish.
    pub fn is_drained(&self) -> bool {
        self.is_draining() && self.active_transactions() == 0 && self.calls_done()
    }
}
