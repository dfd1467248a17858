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
mod tests {
    use super::super::ms;
    use super::super::sim::Sim;
    use super::*;

    use Action::{Cancel, Schedule, Terminated, Transmit, TransportError};
    use ServerNonInviteState as S;

    fn trying() -> Bytes {
        Bytes::from_static(b"SIP/2.0 100 Trying\r\n\r\n")
    }

    fn ok() -> Bytes {
        Bytes::from_static(b"SIP/2.0 200 OK\r\n\r\n")
    }

    fn not_found() -> Bytes {
        Bytes::from_static(b"SIP/2.0 404 Not Found\r\n\r\n")
    }

    fn new(reliability: Reliability) -> ServerNonInvite {
        ServerNonInvite::new(reliability, &TimerSettings::default())
    }

    fn respond(transaction: &mut ServerNonInvite, status: u16, response: Bytes) -> Actions {
        let mut out = Actions::new();
        transaction.on_tu_response(status, response, &mut out);
        out
    }

    fn retransmission(transaction: &mut ServerNonInvite) -> Actions {
        let mut out = Actions::new();
        transaction.on_request_retransmission(&mut out);
        out
    }

    fn fire(transaction: &mut ServerNonInvite, timer: Timer) -> Actions {
        let mut out = Actions::new();
        transaction.on_timer(timer, &mut out);
        out
    }

    fn transport_error(transaction: &mut ServerNonInvite) -> Actions {
        let mut out = Actions::new();
        transaction.on_transport_error(&mut out);
        out
    }

    #[test]
    fn starts_in_trying_and_absorbs_retransmissions_until_the_tu_answers() {
        let mut transaction = new(Reliability::Unreliable);
        assert_eq!(transaction.state(), S::Trying);
        assert!(!transaction.has_final());
        assert_eq!(retransmission(&mut transaction), []);
        assert_eq!(retransmission(&mut transaction), []);
        assert_eq!(transaction.state(), S::Trying);
    }

    #[test]
    fn provisional_is_sent_and_repeated_for_each_retransmission() {
        let mut transaction = new(Reliability::Unreliable);
        assert_eq!(
            respond(&mut transaction, 100, trying()),
            [Transmit(trying())]
        );
        assert_eq!(transaction.state(), S::Proceeding);
        assert_eq!(retransmission(&mut transaction), [Transmit(trying())]);

        let later = Bytes::from_static(b"SIP/2.0 100 Trying\r\nX: 2\r\n\r\n");
        assert_eq!(
            respond(&mut transaction, 100, later.clone()),
            [Transmit(later.clone())]
        );
        assert_eq!(retransmission(&mut transaction), [Transmit(later)]);
        assert!(!transaction.has_final());
    }

    #[test]
    fn final_over_udp_completes_and_answers_retransmissions_until_timer_j() {
        for via_proceeding in [false, true] {
            let mut transaction = new(Reliability::Unreliable);
            if via_proceeding {
                respond(&mut transaction, 100, trying());
            }
            assert_eq!(
                respond(&mut transaction, 404, not_found()),
                [Transmit(not_found()), Schedule(Timer::J, ms(32_000))]
            );
            assert_eq!(transaction.state(), S::Completed);
            assert!(transaction.has_final());
            assert_eq!(retransmission(&mut transaction), [Transmit(not_found())]);
            assert_eq!(retransmission(&mut transaction), [Transmit(not_found())]);

            // §17.2.2: later responses from the TU are discarded, not sent.
            assert_eq!(respond(&mut transaction, 200, ok()), []);
            assert_eq!(respond(&mut transaction, 100, trying()), []);
            assert_eq!(retransmission(&mut transaction), [Transmit(not_found())]);

            assert_eq!(fire(&mut transaction, Timer::J), [Terminated]);
            assert!(transaction.is_terminated());
            assert!(transaction.has_final());
            assert_eq!(retransmission(&mut transaction), []);
        }
    }

    #[test]
    fn an_abandoned_transaction_answers_nothing_and_absorbs_retransmissions() {
        let mut transaction = new(Reliability::Unreliable);
        respond(&mut transaction, 100, trying());
        let mut out = Actions::new();
        transaction.on_tu_abandon(&mut out);
        assert_eq!(out, [Schedule(Timer::J, ms(32_000))]);
        assert_eq!(transaction.state(), S::Completed);
        assert!(transaction.has_final());
        // Not even the earlier 100 is repeated, and a late final is discarded.
        assert_eq!(retransmission(&mut transaction), []);
        assert_eq!(respond(&mut transaction, 200, ok()), []);
        assert_eq!(fire(&mut transaction, Timer::J), [Terminated]);

        let mut transaction = new(Reliability::Reliable);
        let mut out = Actions::new();
        transaction.on_tu_abandon(&mut out);
        assert_eq!(out, [Terminated]);
    }

    #[test]
    fn a_stateless_final_ends_the_transaction_at_once() {
        let mut transaction = new(Reliability::Unreliable);
        let mut out = Actions::new();
        transaction.on_tu_response_stateless(404, not_found(), &mut out);
        assert_eq!(out, [Transmit(not_found()), Terminated]);
        assert!(transaction.has_final());
        assert!(transaction.is_terminated());
    }

    #[test]
    fn final_over_tcp_terminates_at_once() {
        let mut transaction = new(Reliability::Reliable);
        assert_eq!(
            respond(&mut transaction, 200, ok()),
            [Transmit(ok()), Terminated]
        );
        assert!(transaction.is_terminated());
        assert!(transaction.has_final());
        assert_eq!(respond(&mut transaction, 200, ok()), []);
    }

    #[test]
    fn stale_timers_are_ignored() {
        let mut transaction = new(Reliability::Unreliable);
        assert_eq!(fire(&mut transaction, Timer::J), []);
        respond(&mut transaction, 100, trying());
        assert_eq!(fire(&mut transaction, Timer::J), []);
        assert_eq!(fire(&mut transaction, Timer::G), []);
        assert_eq!(transaction.state(), S::Proceeding);
        respond(&mut transaction, 200, ok());
        fire(&mut transaction, Timer::J);
        assert_eq!(fire(&mut transaction, Timer::J), []);
    }

    #[test]
    fn transport_error_informs_tu_and_terminates_in_every_live_state() {
        let mut transaction = new(Reliability::Unreliable);
        assert_eq!(
            transport_error(&mut transaction),
            [TransportError, Terminated]
        );
        assert!(!transaction.has_final());

        let mut transaction = new(Reliability::Unreliable);
        respond(&mut transaction, 100, trying());
        assert_eq!(
            transport_error(&mut transaction),
            [TransportError, Terminated]
        );

        let mut transaction = new(Reliability::Unreliable);
        respond(&mut transaction, 200, ok());
        assert_eq!(
            transport_error(&mut transaction),
            [TransportError, Cancel(Timer::J), Terminated]
        );
        assert_eq!(transport_error(&mut transaction), []);
    }

    #[test]
    fn custom_t1_sets_timer_j() {
        let timers = TimerSettings {
            t1: ms(250),
            ..TimerSettings::default()
        };
        let mut transaction = ServerNonInvite::new(Reliability::Unreliable, &timers);
        assert_eq!(
            respond(&mut transaction, 200, ok()),
            [Transmit(ok()), Schedule(Timer::J, ms(16_000))]
        );
    }

    fn on_timer(transaction: &mut ServerNonInvite, timer: Timer, out: &mut Actions) {
        transaction.on_timer(timer, out);
    }

    #[test]
    fn completed_lives_64_t1_after_the_final() {
        let mut sim = Sim::new();
        let mut transaction = new(Reliability::Unreliable);
        sim.advance(ms(300), &mut transaction, on_timer);
        sim.apply(retransmission(&mut transaction));
        sim.advance(ms(1200), &mut transaction, on_timer);
        sim.apply(respond(&mut transaction, 200, ok()));
        for at in [1500, 3500, 31_000] {
            sim.advance(ms(at), &mut transaction, on_timer);
            sim.apply(retransmission(&mut transaction));
        }
        sim.run_out(&mut transaction, on_timer);
        let times: Vec<_> = sim.transmissions().into_iter().map(|(at, _)| at).collect();
        assert_eq!(times, [1200, 1500, 3500, 31_000].map(ms).to_vec());
        assert_eq!(sim.time_of(&Terminated), Some(ms(33_200)));
    }
}
