//! Unit tests of the non-INVITE server transaction, on the virtual clock.

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
