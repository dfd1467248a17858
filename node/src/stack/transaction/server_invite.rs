//! The INVITE server transaction (RFC 3261 §17.2.1 as amended by RFC 6026 §7.1): asks for
//! a 100 Trying when the TU stays silent for 200 ms, sends the TU's responses and repeats the
//! latest one for retransmitted INVITEs, retransmits a 300-699 final on Timer G over
//! unreliable transports until the ACK arrives (or Timer H gives up), then absorbs
//! retransmitted ACKs in Confirmed until Timer I. After a 2xx it stays in Accepted until
//! Timer L: it sends the 2xx retransmissions the TU makes, absorbs retransmitted INVITEs so
//! the TU does not see them as new requests, and hands matching ACKs to the TU.
//!
//! ```text
//!   Proceeding --300-699 from TU--> Completed --ACK--> Confirmed --I--> Terminated
//!                                   Completed --H (no ACK)------------> Terminated
//!   Proceeding --2xx from TU------> Accepted  --L---------------------> Terminated
//! ```
//!
//! Transport errors follow RFC 6026's redrawn figure 7 rather than RFC 3261's original: they
//! are reported to the TU but do not end the transaction, because a transaction that died
//! early would let a retransmitted INVITE through to the TU as a new request (a proxy would
//! fork it again). Timers H and L still bound its life once the TU has answered.

use std::time::Duration;

use bytes::Bytes;

use super::{Action, Actions, ArmedTimers, Reliability, StatusClass, Timer, TimerSettings};

/// How long the TU may stay silent before the transaction asks for a 100 Trying (§17.2.1).
pub const TRYING_DELAY: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerInviteState {
    Proceeding,
    Completed,
    Confirmed,
    /// RFC 6026: a 2xx was sent; the TU retransmits it and receives the ACK.
    Accepted,
    Terminated,
}

#[derive(Debug)]
pub struct ServerInvite {
    state: ServerInviteState,
    reliability: Reliability,
    timers: TimerSettings,
    /// The latest provisional response, which Proceeding repeats; dropped with the final,
    /// as a transaction that has answered is held for up to 32 s more (Timers H and L) and
    /// at a few thousand calls a second those held transactions are most of a node's
    /// memory.
    last_provisional: Option<Bytes>,
    /// The 300-699 response that Completed retransmits; dropped in Confirmed.
    final_response: Option<Bytes>,
    /// The interval Timer G was last armed with; it doubles up to T2.
    g_interval: Duration,
    armed: ArmedTimers,
    final_sent: bool,
    /// The TU has been told of a transport error; once is enough.
    transport_error_reported: bool,
}

impl ServerInvite {
    /// The runtime has already passed the INVITE to the TU. Arms the 200 ms Trying timer.
    pub fn new(reliability: Reliability, timers: &TimerSettings, out: &mut Actions) -> Self {
        let mut transaction = Self {
            state: ServerInviteState::Proceeding,
            reliability,
            timers: *timers,
            last_provisional: None,
            final_response: None,
            g_interval: timers.t1,
            armed: ArmedTimers::default(),
            final_sent: false,
            transport_error_reported: false,
        };
        transaction.armed.arm(Timer::Trying, TRYING_DELAY, out);
        transaction
    }

    #[cfg(test)]
    pub fn state(&self) -> ServerInviteState {
        self.state
    }

    /// The bytes of the responses it keeps.
    #[cfg(test)]
    pub fn kept_bytes(&self) -> usize {
        [&self.last_provisional, &self.final_response]
            .into_iter()
            .flatten()
            .map(Bytes::len)
            .sum()
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ServerInviteState::Terminated
    }

    /// A final response has been sent.
    pub fn has_final(&self) -> bool {
        self.final_sent
    }

    /// The INVITE arrived again: repeat the latest response, if the state calls for it.
    pub fn on_request_retransmission(&mut self, out: &mut Actions) {
        let response = match self.state {
            ServerInviteState::Proceeding => &self.last_provisional,
            ServerInviteState::Completed => &self.final_response,
            // RFC 6026: in Accepted the 2xx is the TU's to retransmit, so the INVITE is only
            // absorbed. In Confirmed the client has already seen the final.
            ServerInviteState::Accepted
            | ServerInviteState::Confirmed
            | ServerInviteState::Terminated => &None,
        };
        if let Some(response) = response {
            out.push(Action::Transmit(response.clone()));
        }
    }

    /// The TU (or the runtime, after `NeedTrying`) sends a response to the INVITE.
    pub fn on_tu_response(&mut self, status: u16, response: Bytes, out: &mut Actions) {
        match (self.state, StatusClass::of(status)) {
            (ServerInviteState::Proceeding, StatusClass::Provisional) => {
                out.push(Action::Transmit(response.clone()));
                self.last_provisional = Some(response);
                self.armed.cancel(Timer::Trying, out);
            }
            (ServerInviteState::Proceeding, StatusClass::Success) => {
                out.push(Action::Transmit(response));
                self.final_sent = true;
                // A held transaction keeps only what its state still sends.
                self.last_provisional = None;
                self.state = ServerInviteState::Accepted;
                self.armed.cancel(Timer::Trying, out);
                self.armed
                    .arm(Timer::L, self.timers.transaction_timeout(), out);
            }
            // The TU (a UAS core per §13.3.1.4, or a proxy forwarding retransmissions and
            // forked 2xx) sends each 2xx again; the transaction never does on its own.
            (ServerInviteState::Accepted, StatusClass::Success) => {
                out.push(Action::Transmit(response));
            }
            (ServerInviteState::Proceeding, StatusClass::Failure) => {
                out.push(Action::Transmit(response.clone()));
                self.final_response = Some(response);
                self.last_provisional = None;
                self.final_sent = true;
                self.state = ServerInviteState::Completed;
                self.armed.cancel(Timer::Trying, out);
                if self.reliability == Reliability::Unreliable {
                    self.armed.arm(Timer::G, self.g_interval, out);
                }
                // H runs on every transport: it bounds the wait for an ACK that never comes.
                self.armed
                    .arm(Timer::H, self.timers.transaction_timeout(), out);
            }
            // A response after the final has no transition; sending it would contradict the
            // final the client already has.
            _ => {}
        }
    }

    /// The TU refuses the INVITE with an answer it computes afresh for every copy (a 407
    /// challenge, a 403 or 404 of its own): the final is sent once and the transaction
    /// ends at once, with no Timer G to retransmit it and no wait for the ACK. A spoofed
    /// INVITE then costs one response, not one every T1 to T2 for 32 s (a reflection
    /// amplifier), and leaves no state; its ACK and any retransmission of the INVITE
    /// arrive as new messages, and the retransmission gets a new answer. Provisional and
    /// 2xx answers, and answers after the first final, take the usual path.
    pub fn on_tu_response_stateless(&mut self, status: u16, response: Bytes, out: &mut Actions) {
        if self.state != ServerInviteState::Proceeding || status < 300 {
            return self.on_tu_response(status, response, out);
        }
        out.push(Action::Transmit(response));
        self.final_sent = true;
        self.terminate(out);
    }

    /// An ACK matching this transaction arrived.
    pub fn on_ack(&mut self, out: &mut Actions) {
        match self.state {
            ServerInviteState::Completed => {
                self.state = ServerInviteState::Confirmed;
                // Confirmed only absorbs ACKs: the final is not sent again.
                self.final_response = None;
                self.armed.cancel(Timer::G, out);
                self.armed.cancel(Timer::H, out);
                match self.reliability {
                    // Confirmed absorbs the ACK retransmissions still in flight.
                    Reliability::Unreliable => self.armed.arm(Timer::I, self.timers.t4, out),
                    Reliability::Reliable => self.terminate(out),
                }
            }
            // RFC 6026: an ACK to a 2xx belongs to the TU (the dialog, or a proxy forwarding
            // it), and each one goes there.
            ServerInviteState::Accepted => out.push(Action::Deliver),
            // Before a final there is nothing to acknowledge; in Confirmed it is a
            // retransmission.
            ServerInviteState::Proceeding
            | ServerInviteState::Confirmed
            | ServerInviteState::Terminated => {}
        }
    }

    pub fn on_timer(&mut self, timer: Timer, out: &mut Actions) {
        if !self.armed.fired(timer) {
            return;
        }
        match (self.state, timer) {
            // Every response from the TU cancels this timer, so it only fires while the
            // TU is silent.
            (ServerInviteState::Proceeding, Timer::Trying) => out.push(Action::NeedTrying),
            (ServerInviteState::Completed, Timer::G) => {
                if let Some(response) = &self.final_response {
                    out.push(Action::Transmit(response.clone()));
                }
                self.g_interval = self.timers.backoff_capped(self.g_interval);
                self.armed.arm(Timer::G, self.g_interval, out);
            }
            (ServerInviteState::Completed, Timer::H) => {
                out.push(Action::Timeout);
                self.terminate(out);
            }
            (ServerInviteState::Confirmed, Timer::I) | (ServerInviteState::Accepted, Timer::L) => {
                self.terminate(out);
            }
            _ => {}
        }
    }

    /// The transport failed to send a response. The TU is told once and the transaction
    /// carries on (see the module docs).
    pub fn on_transport_error(&mut self, out: &mut Actions) {
        if self.is_terminated() || self.transport_error_reported {
            return;
        }
        self.transport_error_reported = true;
        out.push(Action::TransportError);
    }

    fn terminate(&mut self, out: &mut Actions) {
        self.armed.cancel_all(out);
        self.state = ServerInviteState::Terminated;
        out.push(Action::Terminated);
    }
}

#[cfg(test)]
#[path = "server_invite_tests.rs"]
mod tests;
