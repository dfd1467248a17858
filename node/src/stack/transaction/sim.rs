//! A virtual clock for tests: it executes `Schedule`/`Cancel` actions, fires timers in
//! deadline order, and records every action with the time it was emitted, so a test can check
//! a whole timeline (e.g. when each retransmission goes out). It also checks the contract in
//! the module docs: nothing after `Terminated`, no timer left armed at `Terminated`, and no
//! `Cancel` of a timer that is not pending.

use super::*;

#[derive(Debug, Default)]
pub(crate) struct Sim {
    now: Duration,
    /// Pending timers with their deadlines, in the order they were armed (the tie-break
    /// when two deadlines coincide).
    pending: Vec<(Timer, Duration)>,
    log: Vec<(Duration, Action)>,
    terminated: bool,
}

impl Sim {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn now(&self) -> Duration {
        self.now
    }

    pub(crate) fn log(&self) -> &[(Duration, Action)] {
        &self.log
    }

    pub(crate) fn pending(&self) -> Vec<Timer> {
        self.pending.iter().map(|(t, _)| *t).collect()
    }

    pub(crate) fn is_terminated(&self) -> bool {
        self.terminated
    }

    /// Executes actions emitted at the current time.
    pub(crate) fn apply(&mut self, actions: Actions) {
        for action in actions {
            assert!(!self.terminated, "{action:?} emitted after Terminated");
            match &action {
                Action::Schedule(timer, after) => {
                    self.pending.retain(|(t, _)| t != timer);
                    self.pending.push((*timer, self.now.saturating_add(*after)));
                }
                Action::Cancel(timer) => {
                    let before = self.pending.len();
                    self.pending.retain(|(t, _)| t != timer);
                    assert_ne!(before, self.pending.len(), "Cancel({timer:?}) not pending");
                }
                Action::Terminated => {
                    assert!(
                        self.pending.is_empty(),
                        "Terminated with timers pending: {:?}",
                        self.pending
                    );
                    self.terminated = true;
                }
                _ => {}
            }
            self.log.push((self.now, action));
        }
    }

    /// Fires, in deadline order, every timer due at or before `until`, then moves the clock
    /// to `until`.
    pub(crate) fn advance<M>(
        &mut self,
        until: Duration,
        machine: &mut M,
        mut on_timer: impl FnMut(&mut M, Timer, &mut Actions),
    ) {
        while let Some(index) = self.next_due(until) {
            let (timer, deadline) = self.pending.remove(index);
            self.now = deadline;
            let mut out = Actions::new();
            on_timer(machine, timer, &mut out);
            self.apply(out);
        }
        self.now = self.now.max(until);
    }

    /// Fires timers until none is pending.
    pub(crate) fn run_out<M>(
        &mut self,
        machine: &mut M,
        on_timer: impl FnMut(&mut M, Timer, &mut Actions),
    ) {
        let last = self.pending.iter().map(|(_, d)| *d).max();
        if let Some(last) = last {
            self.advance(last, machine, on_timer);
            // Timers armed while firing may lie beyond `last`.
            if !self.pending.is_empty() {
                panic!("timers keep re-arming: {:?}", self.pending);
            }
        }
    }

    fn next_due(&self, until: Duration) -> Option<usize> {
        self.pending
            .iter()
            .enumerate()
            .filter(|(_, (_, deadline))| *deadline <= until)
            .min_by_key(|(index, (_, deadline))| (*deadline, *index))
            .map(|(index, _)| index)
    }

    /// When each `Transmit` went out, and what it carried.
    pub(crate) fn transmissions(&self) -> Vec<(Duration, Bytes)> {
        self.log
            .iter()
            .filter_map(|(at, action)| match action {
                Action::Transmit(bytes) => Some((*at, bytes.clone())),
                _ => None,
            })
            .collect()
    }

    /// When `action` was first emitted.
    pub(crate) fn time_of(&self, action: &Action) -> Option<Duration> {
        self.log
            .iter()
            .find(|(_, a)| a == action)
            .map(|(at, _)| *at)
    }
}
