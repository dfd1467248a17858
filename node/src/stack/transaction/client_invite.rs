//! The INVITE client transaction (RFC 3261 §17.1.1 as amended by RFC 6026 §7.2): sends an
//! INVITE, retransmits it on Timer A over unreliable transports until a response arrives,
//! gives up on Timer B, ACKs non-2xx final responses itself (re-sending that ACK for every
//! retransmitted final until Timer D), and after a 2xx stays in Accepted until Timer M so
//! that retransmitted and forked 2xx responses still reach the TU. The ACK for a 2xx is not
//! part of this transaction: the TU sends it.
//!
//! ```text
//!   Calling --1xx--> Proceeding
//!   Calling | Proceeding --2xx------> Accepted  --M--> Terminated
//!   Calling | Proceeding --300-699--> Completed --D--> Terminated
//!   Calling --B--> Terminated;  any state --transport error--> Terminated
//! ```

use std::time::Duration;

use bytes::Bytes;

use super::{Action, Actions, ArmedTimers, Reliability, StatusClass, Timer, TimerSettings};

/// Timer D over an unreliable transport. RFC 3261 §17.1.1.2 asks for at least 32 s and does
/// not derive it from our T1: it must outlast the server's retransmissions of its final
/// response, which run on the server's T1, not ours. Over a reliable transport it is zero.
pub const TIMER_D_UNRELIABLE: Duration = Duration::from_secs(32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientInviteState {
    Calling,
    Proceeding,
    /// RFC 6026: a 2xx was received; later 2xx responses still go to the TU.
    Accepted,
    Completed,
    Terminated,
}

#[derive(Debug)]
pub struct ClientInvite {
    state: ClientInviteState,
    reliability: Reliability,
    timers: TimerSettings,
    request: Bytes,
    /// The ACK for the non-2xx final response, built once and re-sent for retransmissions.
    ack: Option<Bytes>,
    /// The interval Timer A was last armed with; it doubles without a cap (§17.1.1.2).
    a_interval: Duration,
    armed: ArmedTimers,
    final_received: bool,
}

impl ClientInvite {
    /// Sends the INVITE and arms the retransmission (A, unreliable only) and timeout (B)
    /// timers.
    pub fn start(
        request: Bytes,
        reliability: Reliability,
        timers: &TimerSettings,
        out: &mut Actions,
    ) -> Self {
        let mut transaction = Self {
            state: ClientInviteState::Calling,
            reliability,
            timers: *timers,
            request,
            ack: None,
            a_interval: timers.t1,
            armed: ArmedTimers::default(),
            final_received: false,
        };
        out.push(Action::Transmit(transaction.request.clone()));
        if reliability == Reliability::Unreliable {
            transaction.armed.arm(Timer::A, timers.t1, out);
        }
        transaction
            .armed
            .arm(Timer::B, timers.transaction_timeout(), out);
        transaction
    }

    #[cfg(test)]
    pub fn state(&self) -> ClientInviteState {
        self.state
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ClientInviteState::Terminated
    }

    /// A final response has been received (and delivered to the TU).
    pub fn has_final(&self) -> bool {
        self.final_received
    }

    /// A response matching this transaction arrived. `ack` builds the ACK for a 300-699
    /// response (§17.1.1.3); it is called at most once, on the first such response.
    pub fn on_response(&mut self, status: u16, ack: impl FnOnce() -> Bytes, out: &mut Actions) {
        self.on_response_inner(status, ack, out);
        // Only Timer A, in Calling, sends the request again: once answered it is not kept.
        if self.state != ClientInviteState::Calling {
            self.request = Bytes::new();
        }
    }

    fn on_response_inner(&mut self, status: u16, ack: impl FnOnce() -> Bytes, out: &mut Actions) {
        let class = StatusClass::of(status);
        match (self.state, class) {
            (
                ClientInviteState::Calling | ClientInviteState::Proceeding,
                StatusClass::Provisional,
            ) => {
                out.push(Action::Deliver);
                self.state = ClientInviteState::Proceeding;
                // Once the server has answered it is responsible for the final response: no
                // more retransmissions, and no timeout either. A UAC waits indefinitely (it
                // may CANCEL); a proxy bounds the wait with its own Timer C.
                self.armed.cancel(Timer::A, out);
                self.armed.cancel(Timer::B, out);
            }
            (ClientInviteState::Calling | ClientInviteState::Proceeding, StatusClass::Success) => {
                out.push(Action::Deliver);
                self.final_received = true;
                self.state = ClientInviteState::Accepted;
                self.armed.cancel(Timer::A, out);
                self.armed.cancel(Timer::B, out);
                self.armed
                    .arm(Timer::M, self.timers.transaction_timeout(), out);
            }
            // Retransmitted 2xx, or 2xx from other forks: the TU ACKs (or forwards) each.
            (ClientInviteState::Accepted, StatusClass::Success) => out.push(Action::Deliver),
            (ClientInviteState::Calling | ClientInviteState::Proceeding, StatusClass::Failure) => {
                let ack = ack();
                out.push(Action::Transmit(ack.clone()));
                out.push(Action::Deliver);
                self.ack = Some(ack);
                self.final_received = true;
                self.state = ClientInviteState::Completed;
                self.armed.cancel(Timer::A, out);
                self.armed.cancel(Timer::B, out);
                match self.reliability {
                    Reliability::Unreliable => {
                        self.armed.arm(Timer::D, TIMER_D_UNRELIABLE, out);
                    }
                    // A reliable transport does not retransmit the final, so there is
                    // nothing to re-ACK.
                    Reliability::Reliable => self.terminate(out),
                }
            }
            // The server retransmits its final until our ACK arrives: re-send the ACK, but
            // the TU already has the response.
            (ClientInviteState::Completed, StatusClass::Failure) => {
                if let Some(ack) = &self.ack {
                    out.push(Action::Transmit(ack.clone()));
                }
            }
            // Late provisionals, a failure after a 2xx, a 2xx after a failure: RFC 3261 and
            // RFC 6026 give them no transition.
            _ => {}
        }
    }

    pub fn on_timer(&mut self, timer: Timer, out: &mut Actions) {
        if !self.armed.fired(timer) {
            return;
        }
        match (self.state, timer) {
            (ClientInviteState::Calling, Timer::A) => {
                out.push(Action::Transmit(self.request.clone()));
                self.a_interval = self.a_interval.saturating_mul(2);
                self.armed.arm(Timer::A, self.a_interval, out);
            }
            (ClientInviteState::Calling, Timer::B) => {
                out.push(Action::Timeout);
                self.terminate(out);
            }
            (ClientInviteState::Completed, Timer::D) | (ClientInviteState::Accepted, Timer::M) => {
                self.terminate(out);
            }
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
        self.state = ClientInviteState::Terminated;
        out.push(Action::Terminated);
    }
}

#[cfg(test)]
#[path = "client_invite_tests.rs"]
mod tests;
