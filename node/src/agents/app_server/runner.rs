//! The threads dialplan runs are on: the app server's own, at a lower scheduling priority
//! than the SIP threads (a nice value 10 above the process's), so a script that spins until
//! its time limit takes its CPU from idle time first, not from other calls' signalling.
//!
//! A run blocks its thread while its dials ring (minutes), so the pool grows to as many
//! threads as runs wait at once (bounded by `dialplan.max_runs`: a run over it ends at
//! once), and a thread idle for a minute exits. On Linux the nice value is a property of
//! each thread, so lowering it here touches no other thread of the node.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// How much lower than the process a dialplan thread runs.
const NICER_BY: i32 = 10;
/// How long an idle dialplan thread waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(60);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    threads: usize,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

#[derive(Default)]
pub struct Runner {
    shared: Arc<Shared>,
}

impl Runner {
    /// Runs `f` on a dialplan thread, inside the calling task's runtime (a run may start
    /// tasks: a callback); its result comes on the receiver. Call from inside the runtime.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        let handle = tokio::runtime::Handle::current();
        let job: Job = Box::new(move || {
            let _runtime = handle.enter();
            let _ = tx.send(f());
        });
        let mut state = self.shared.state.lock().expect("dialplan runner lock");
        state.jobs.push_back(job);
        // Every queued job has a waiting thread to take it, or gets a new one.
        if state.jobs.len() > state.idle {
            state.threads += 1;
            let shared = self.shared.clone();
            let started = std::thread::Builder::new()
                .name("dialplan".into())
                .spawn(move || {
                    lower_priority();
                    work(&shared);
                });
            if let Err(e) = started {
                state.threads -= 1;
                tracing::error!(error = %e, "could not start a dialplan thread; runs wait for one");
            }
        }
        drop(state);
        self.shared.work.notify_one();
        rx
    }

    /// Dialplan threads alive now.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.shared
            .state
            .lock()
            .expect("dialplan runner lock")
            .threads
    }
}

fn work(shared: &Shared) {
    let mut state = shared.state.lock().expect("dialplan runner lock");
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            job();
            state = shared.state.lock().expect("dialplan runner lock");
            continue;
        }
        state.idle += 1;
        let (next, waited) = shared
            .work
            .wait_timeout(state, IDLE_EXIT)
            .expect("dialplan runner lock");
        state = next;
        state.idle -= 1;
        if waited.timed_out() && state.jobs.is_empty() {
            state.threads -= 1;
            return;
        }
    }
}

/// Lowers this thread's priority by [`NICER_BY`] (up to the lowest, 19). Raising a nice
/// value needs no privilege; a failure leaves the thread as it was, and says so once.
fn lower_priority() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let lowered = rustix::process::getpriority_process(None)
        .and_then(|now| rustix::process::setpriority_process(None, (now + NICER_BY).min(19)));
    if let Err(e) = lowered {
        WARNED.call_once(|| {
            tracing::warn!(error = %e, "dialplan threads run at the node's own priority");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn runs_go_to_nicer_threads_that_are_reused() {
        let runner = Runner::default();
        let base = rustix::process::getpriority_process(None).unwrap();
        let nice = runner
            .spawn(|| rustix::process::getpriority_process(None).unwrap())
            .await
            .unwrap();
        assert_eq!(nice, (base + NICER_BY).min(19));
        assert_eq!(
            rustix::process::getpriority_process(None).unwrap(),
            base,
            "the caller's thread is untouched"
        );
        // Sequential runs reuse the idle thread; runs at once get a thread each.
        for _ in 0..5 {
            runner.spawn(|| ()).await.unwrap();
        }
        assert_eq!(runner.threads(), 1);
        let gate = Arc::new(std::sync::Barrier::new(4));
        let waits: Vec<_> = (0..4)
            .map(|_| {
                let gate = gate.clone();
                runner.spawn(move || {
                    gate.wait();
                })
            })
            .collect();
        for w in waits {
            w.await.unwrap();
        }
        assert_eq!(runner.threads(), 4);
        // A run may start tasks on the runtime.
        let spawned = runner
            .spawn(|| tokio::spawn(async { 7 }))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(spawned, 7);
    }
}
