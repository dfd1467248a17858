//! Drain (DECISIONS §11): before an upgrade or removal, a node stops taking new dialogs
//! and registrations (503 with Retry-After, so phones move to another SRV target) while
//! running calls and transactions finish. `tandem node drain`, `POST /v1/node/drain` and
//! SIGTERM all start it; the node reports itself drained once no transaction is left.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

/// The node's drain state, shared by the core, the admin API and shutdown.
#[derive(Debug, Default)]
pub struct Drain {
    draining: Arc<AtomicBool>,
    active: OnceLock<watch::Receiver<usize>>,
}

impl Drain {
    /// The flag the core reads on every request.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    /// Starts draining; returns false if it had already started.
    pub fn start(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Called once the SIP stack runs, so drain can count its transactions.
    pub fn watch_transactions(&self, active: watch::Receiver<usize>) {
        let _ = self.active.set(active);
    }

    /// Transactions still waiting for a final response (0 on a node without SIP).
    pub fn active_transactions(&self) -> usize {
        self.active.get().map_or(0, |a| *a.borrow())
    }

    /// Draining, and nothing left to finish.
    pub fn is_drained(&self) -> bool {
        self.is_draining() && self.active_transactions() == 0
    }
}
