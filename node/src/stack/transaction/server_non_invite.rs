//! The non-INVITE server transaction (RFC 3261 §17.2.2): sends the TU's responses to a
//! request other than INVITE or ACK, answers each retransmission of the request with the
//! latest response, and absorbs retransmissions in Completed until Timer J so that the TU
//! sees the request only once.
//!
//! ```text
//!   Trying --1xx from TU--> Proceeding
//!   Trying | Proceeding --200-699 from TU--> Completed --J--> Terminated
//!   any state --transport error--> Terminated
//! ```

use bytes::Bytes;

use super::{Action, Actions, ArmedTimers, Reliability, StatusClass, Timer, TimerSettings};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerNonInviteState {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

#[derive(Debug)]
pub struct ServerNonInvite {
    state: ServerNonInviteState,
    reliability: Reliability,
    timers: TimerSettings,
    /// The latest response sent: the last provisional in Proceeding, the final in Completed.
    last_response: Option<Bytes>,
    armed: ArmedTimers,
    final_sent: bool,
}

impl ServerNonInvite {
    /// The runtime has already passed the request to the TU. No timers run until the TU
    /// sends a final response: the TU is responsible for answering.
    pub fn new(reliability: Reliability, timers: &TimerSettings) -> Self {
        Self {
            state: ServerNonInviteState::Trying,
            reliability,
            timers: *timers,
            last_response: None,
            armed: ArmedTimers::default(),
            final_sent: false,
        }
    }

    #[cfg(test)]
    pub fn state(&self) -> ServerNonInviteState {
        self.state
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ServerNonInviteState::Terminated
    }

    /// The TU is done with it: a final response was sent, or the TU gave up on one.
    pub fn has_final(&self) -> bool {
        self.final_sent
    }

    /// The request arrived again: answer with the latest response, if any.
    pub fn on_request_retransmission(&mut self, out: &mut Actions) {
        match self.state {
            // Nothing to repeat: the TU has not answered yet, or the transaction is over.
            ServerNonInviteState::Trying | ServerNonInviteState::Terminated => {}
            ServerNonInviteState::Proceeding | ServerNonInviteState::Completed => {
                if let Some(response) = &self.last_response {
                    out.push(Action::Transmit(response.clone()));
                }
            }
        }
    }

    /// The TU sends a response to the request.
    pub fn on_tu_response(&mut self, status: u16, response: Bytes, out: &mut Actions) {
        match self.state {
            ServerNonInviteState::Trying | ServerNonInviteState::Proceeding => {
                out.push(Action::Transmit(response.clone()));
                self.last_response = Some(response);
                if StatusClass::of(status) == StatusClass::Provisional {
                    self.state = ServerNonInviteState::Proceeding;
                    return;
                }
                self.complete(out);
            }
            // §17.2.2: any other final response from the TU must be discarded.
            ServerNonInviteState::Completed | ServerNonInviteState::Terminated => {}
        }
    }

    /// The TU answers with a final response and keeps no state for it (RFC 3261 §8.2.7): a
    /// retransmitted request is a new request and gets a new answer. For a registrar's
    /// challenge, which is fresh on every request anyway, this saves holding each
    /// challenge for Timer J.
    pub fn on_tu_response_stateless(&mut self, status: u16, response: Bytes, out: &mut Actions) {
        let live = matches!(
            self.state,
            ServerNonInviteState::Trying | ServerNonInviteState::Proceeding
        );
        if !live || StatusClass::of(status) == StatusClass::Provisional {
            return self.on_tu_response(status, response, out);
        }
        out.push(Action::Transmit(response));
        self.final_sent = true;
        self.terminate(out);
    }

    /// The TU ends the transaction without a final response. RFC 4320 §4.2: a proxy whose
    /// next hop never answered a non-INVITE sends no 408, since by then the client's own
    /// transaction has timed out. Over UDP it stays Completed while the client could still
    /// retransmit, absorbing those retransmissions in silence, so they are not taken for
    /// new requests.
    pub fn on_tu_abandon(&mut self, out: &mut Actions) {
        match self.state {
            ServerNonInviteState::Trying | ServerNonInviteState::Proceeding => {
                self.last_response = None;
                self.complete(out);
            }
            ServerNonInviteState::Completed | ServerNonInviteState::Terminated => {}
        }
    }

    /// The TU is done: Completed absorbs retransmitted requests for as long as the client
    /// can retransmit (its Timer F); over a reliable transport there are none.
    fn complete(&mut self, out: &mut Actions) {
        self.final_sent = true;
        self.state = ServerNonInviteState::Completed;
        match self.reliability {
            Reliability::Unreliable => {
                self.armed
                    .arm(Timer::J, self.timers.transaction_timeout(), out);
            }
            Reliability::Reliable => self.terminate(out),
        }
    }

    pub fn on_timer(&mut self, timer: Timer, out: &mut Actions) {
        if !self.armed.fired(timer) {
            return;
        }
        if let (ServerNonInviteState::Completed, Timer::J) = (self.state, timer) {
            self.terminate(out);
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
        self.state = ServerNonInviteState::Terminated;
        out.push(Action::Terminated);
    }
}

#[cfg(test)]
#[path = "server_non_invite_tests.rs"]
mod tests;
