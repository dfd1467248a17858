//! The non-INVITE client transaction (RFC 3261 §17.1.2): sends a request other than INVITE
//! or ACK, retransmits it on Timer E over unreliable transports, gives up on Timer F, hands
//! provisional and final responses to the TU, and absorbs retransmitted responses in
//! Completed until Timer K.
//!
//! ```text
//!   Trying --1xx--> Proceeding
//!   Trying | Proceeding --200-699--> Completed --K--> Terminated
//!   Trying | Proceeding --F--> Terminated;  any state --transport error--> Terminated
//! ```

use std::time::Duration;

use bytes::Bytes;

use super::{Action, Actions, ArmedTimers, Reliability, StatusClass, Timer, TimerSettings};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientNonInviteState {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

#[derive(Debug)]
pub struct ClientNonInvite {
    state: ClientNonInviteState,
    reliability: Reliability,
    timers: TimerSettings,
    request: Bytes,
    /// The interval Timer E was last armed with; it doubles in Trying up to T2.
    e_interval: Duration,
    armed: ArmedTimers,
    final_received: bool,
}

impl ClientNonInvite {
    /// Sends `request` and arms the retransmission (E, unreliable only) and timeout (F) timers.
    pub fn start(
        request: Bytes,
        reliability: Reliability,
        timers: &TimerSettings,
        out: &mut Actions,
    ) -> Self {
        let mut transaction = Self {
            state: ClientNonInviteState::Trying,
            reliability,
            timers: *timers,
            request,
            e_interval: timers.t1,
            armed: ArmedTimers::default(),
            final_received: false,
        };
        out.push(Action::Transmit(transaction.request.clone()));
        if reliability == Reliability::Unreliable {
            transaction.armed.arm(Timer::E, timers.t1, out);
        }
        transaction
            .armed
            .arm(Timer::F, timers.transaction_timeout(), out);
        transaction
    }

    #[cfg(test)]
    pub fn state(&self) -> ClientNonInviteState {
        self.state
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ClientNonInviteState::Terminated
    }

    /// A final response has been received (and delivered to the TU).
    pub fn has_final(&self) -> bool {
        self.final_received
    }

    /// A response matching this transaction arrived; `Deliver` hands it to the TU.
    pub fn on_response(&mut self, status: u16, out: &mut Actions) {
        match self.state {
            ClientNonInviteState::Trying | ClientNonInviteState::Proceeding => {
                out.push(Action::Deliver);
                if StatusClass::of(status) == StatusClass::Provisional {
                    // E keeps its current deadline; only its next interval changes (to T2).
                    self.state = ClientNonInviteState::Proceeding;
                    return;
                }
                self.final_received = true;
                self.state = ClientNonInviteState::Completed;
                // Nothing sends the request again.
                self.request = Bytes::new();
                self.armed.cancel(Timer::E, out);
                self.armed.cancel(Timer::F, out);
                match self.reliability {
                    // Completed only exists to absorb retransmitted finals for T4.
                    Reliability::Unreliable => self.armed.arm(Timer::K, self.timers.t4, out),
                    Reliability::Reliable => self.terminate(out),
                }
            }
            // Retransmissions of the final response (and late provisionals) are absorbed.
            ClientNonInviteState::Completed | ClientNonInviteState::Terminated => {}
        }
    }

    pub fn on_timer(&mut self, timer: Timer, out: &mut Actions) {
        if !self.armed.fired(timer) {
            return;
        }
        match (self.state, timer) {
            (ClientNonInviteState::Trying, Timer::E) => {
                out.push(Action::Transmit(self.request.clone()));
                self.e_interval = self.timers.backoff_capped(self.e_interval);
                self.armed.arm(Timer::E, self.e_interval, out);
            }
            (ClientNonInviteState::Proceeding, Timer::E) => {
                // The server has answered, so it is alive: retransmit only to guard against
                // a lost final response, at the slowest rate (§17.1.2.2).
                out.push(Action::Transmit(self.request.clone()));
                self.e_interval = self.timers.t2;
                self.armed.arm(Timer::E, self.e_interval, out);
            }
            (ClientNonInviteState::Trying | ClientNonInviteState::Proceeding, Timer::F) => {
                out.push(Action::Timeout);
                self.terminate(out);
            }
            (ClientNonInviteState::Completed, Timer::K) => self.terminate(out),
            _ => {}
        }
    }

    pub fn on_transport_error(&mut self, out: &mut Actions) {
        if self.is_terminated() {
            return;
        }
        out.push(Action::TransportError);
        self.terminate(out);
    }

    fn terminate(&mut self, out: &mut Actions) {
        self.armed.cancel_all(out);
        self.state = ClientNonInviteState::Terminated;
        out.push(Action::Terminated);
    }
}

#[cfg(test)]
#[path = "client_non_invite_tests.rs"]
mod tests;
