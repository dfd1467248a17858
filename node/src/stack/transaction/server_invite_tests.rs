//! Unit tests of the INVITE server transaction, on the virtual clock.

use super::super::ms;
use super::super::sim::Sim;
use super::*;

use Action::{
    Cancel, Deliver, NeedTrying, Schedule, Terminated, Timeout, Transmit, TransportError,
};
use ServerInviteState as S;

fn trying() -> Bytes {
    Bytes::from_static(b"SIP/2.0 100 Trying\r\n\r\n")
}

fn ringing() -> Bytes {
    Bytes::from_static(b"SIP/2.0 180 Ringing\r\n\r\n")
}

fn ok() -> Bytes {
    Bytes::from_static(b"SIP/2.0 200 OK\r\n\r\n")
}

fn busy() -> Bytes {
    Bytes::from_static(b"SIP/2.0 486 Busy Here\r\n\r\n")
}

fn new(reliability: Reliability) -> (ServerInvite, Actions) {
    new_with(reliability, &TimerSettings::default())
}

fn new_with(reliability: Reliability, timers: &TimerSettings) -> (ServerInvite, Actions) {
    let mut out = Actions::new();
    let transaction = ServerInvite::new(reliability, timers, &mut out);
    (transaction, out)
}

fn respond(transaction: &mut ServerInvite, status: u16, response: Bytes) -> Actions {
    let mut out = Actions::new();
    transaction.on_tu_response(status, response, &mut out);
    out
}

fn retransmission(transaction: &mut ServerInvite) -> Actions {
    let mut out = Actions::new();
    transaction.on_request_retransmission(&mut out);
    out
}

fn ack(transaction: &mut ServerInvite) -> Actions {
    let mut out = Actions::new();
    transaction.on_ack(&mut out);
    out
}

fn fire(transaction: &mut ServerInvite, timer: Timer) -> Actions {
    let mut out = Actions::new();
    transaction.on_timer(timer, &mut out);
    out
}

fn transport_error(transaction: &mut ServerInvite) -> Actions {
    let mut out = Actions::new();
    transaction.on_transport_error(&mut out);
    out
}

/// A transaction that has sent `busy()` over `reliability`.
fn completed(reliability: Reliability) -> ServerInvite {
    let (mut transaction, _) = new(reliability);
    respond(&mut transaction, 486, busy());
    transaction
}

#[test]
fn new_arms_the_trying_timer() {
    let (transaction, out) = new(Reliability::Unreliable);
    assert_eq!(out, [Schedule(Timer::Trying, ms(200))]);
    assert_eq!(transaction.state(), S::Proceeding);
    assert!(!transaction.has_final());
}

#[test]
fn silent_tu_gets_a_100_trying_built_by_the_runtime() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    assert_eq!(fire(&mut transaction, Timer::Trying), [NeedTrying]);
    // The runtime answers NeedTrying by passing a 100 back in.
    assert_eq!(
        respond(&mut transaction, 100, trying()),
        [Transmit(trying())]
    );
    assert_eq!(retransmission(&mut transaction), [Transmit(trying())]);
    assert_eq!(fire(&mut transaction, Timer::Trying), []);
}

#[test]
fn tu_answering_within_200_ms_cancels_the_trying_timer() {
    for (status, response) in [(180, ringing()), (200, ok()), (486, busy())] {
        let (mut transaction, _) = new(Reliability::Unreliable);
        let out = respond(&mut transaction, status, response.clone());
        assert_eq!(out[..2], [Transmit(response), Cancel(Timer::Trying)]);
        // A late expiry of the cancelled timer must not ask for a 100.
        assert_eq!(fire(&mut transaction, Timer::Trying), [], "{status}");
    }
}

#[test]
fn retransmitted_invite_in_proceeding_gets_the_latest_provisional() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    assert_eq!(retransmission(&mut transaction), [], "nothing sent yet");
    respond(&mut transaction, 100, trying());
    respond(&mut transaction, 180, ringing());
    assert_eq!(retransmission(&mut transaction), [Transmit(ringing())]);
    assert_eq!(transaction.state(), S::Proceeding);
}

#[test]
fn success_enters_accepted() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    respond(&mut transaction, 180, ringing());
    assert_eq!(
        respond(&mut transaction, 200, ok()),
        [Transmit(ok()), Schedule(Timer::L, ms(32_000))]
    );
    assert_eq!(transaction.state(), S::Accepted);
    assert!(transaction.has_final());

    // The TU retransmits its 2xx (or forwards another fork's); the transaction sends it.
    let forked = Bytes::from_static(b"SIP/2.0 200 OK\r\nTo: <sip:b@x>;tag=2\r\n\r\n");
    assert_eq!(respond(&mut transaction, 200, ok()), [Transmit(ok())]);
    assert_eq!(
        respond(&mut transaction, 200, forked.clone()),
        [Transmit(forked)]
    );
    // Retransmitted INVITEs are absorbed: no 2xx from the transaction itself.
    assert_eq!(retransmission(&mut transaction), []);
    // Every ACK goes to the TU.
    assert_eq!(ack(&mut transaction), [Deliver]);
    assert_eq!(ack(&mut transaction), [Deliver]);
    // No other response may follow a 2xx.
    assert_eq!(respond(&mut transaction, 180, ringing()), []);
    assert_eq!(respond(&mut transaction, 486, busy()), []);
    assert_eq!(transaction.state(), S::Accepted);

    assert_eq!(fire(&mut transaction, Timer::L), [Terminated]);
    assert!(transaction.is_terminated());
}

#[test]
fn success_over_tcp_also_waits_in_accepted_for_timer_l() {
    let (mut transaction, _) = new(Reliability::Reliable);
    assert_eq!(
        respond(&mut transaction, 200, ok()),
        [
            Transmit(ok()),
            Cancel(Timer::Trying),
            Schedule(Timer::L, ms(32_000))
        ]
    );
    assert_eq!(transaction.state(), S::Accepted);
}

#[test]
fn failure_over_udp_retransmits_on_g_with_backoff_capped_at_t2() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    assert_eq!(
        respond(&mut transaction, 486, busy()),
        [
            Transmit(busy()),
            Cancel(Timer::Trying),
            Schedule(Timer::G, ms(500)),
            Schedule(Timer::H, ms(32_000)),
        ]
    );
    assert_eq!(transaction.state(), S::Completed);
    assert!(transaction.has_final());

    let mut intervals = Vec::new();
    for _ in 0..5 {
        match fire(&mut transaction, Timer::G).as_slice() {
            [Transmit(bytes), Schedule(Timer::G, interval)] => {
                assert_eq!(bytes, &busy());
                intervals.push(*interval);
            }
            other => panic!("unexpected actions {other:?}"),
        }
    }
    assert_eq!(
        intervals,
        [ms(1000), ms(2000), ms(4000), ms(4000), ms(4000)]
    );
}

#[test]
fn completed_repeats_the_final_for_retransmitted_invites_and_ignores_the_tu() {
    let mut transaction = completed(Reliability::Unreliable);
    assert_eq!(retransmission(&mut transaction), [Transmit(busy())]);
    assert_eq!(retransmission(&mut transaction), [Transmit(busy())]);
    assert_eq!(respond(&mut transaction, 200, ok()), []);
    assert_eq!(respond(&mut transaction, 180, ringing()), []);
    assert_eq!(respond(&mut transaction, 500, busy()), []);
    assert_eq!(transaction.state(), S::Completed);
}

#[test]
fn ack_over_udp_confirms_and_confirmed_absorbs_until_timer_i() {
    let mut transaction = completed(Reliability::Unreliable);
    assert_eq!(
        ack(&mut transaction),
        [
            Cancel(Timer::G),
            Cancel(Timer::H),
            Schedule(Timer::I, ms(5000))
        ]
    );
    assert_eq!(transaction.state(), S::Confirmed);
    assert_eq!(ack(&mut transaction), []);
    assert_eq!(retransmission(&mut transaction), []);
    assert_eq!(respond(&mut transaction, 200, ok()), []);
    assert_eq!(fire(&mut transaction, Timer::G), []);
    assert_eq!(fire(&mut transaction, Timer::H), []);
    assert_eq!(transaction.state(), S::Confirmed);
    assert_eq!(fire(&mut transaction, Timer::I), [Terminated]);
    assert!(transaction.is_terminated());
    assert!(transaction.has_final());
}

#[test]
fn failure_over_tcp_has_no_g_and_ack_terminates_at_once() {
    let (mut transaction, _) = new(Reliability::Reliable);
    assert_eq!(
        respond(&mut transaction, 603, busy()),
        [
            Transmit(busy()),
            Cancel(Timer::Trying),
            Schedule(Timer::H, ms(32_000))
        ]
    );
    assert_eq!(fire(&mut transaction, Timer::G), []);
    assert_eq!(ack(&mut transaction), [Cancel(Timer::H), Terminated]);
    assert!(transaction.is_terminated());
}

#[test]
fn timer_h_reports_the_missing_ack() {
    let mut transaction = completed(Reliability::Unreliable);
    assert_eq!(
        fire(&mut transaction, Timer::H),
        [Timeout, Cancel(Timer::G), Terminated]
    );
    assert!(transaction.is_terminated());

    let mut transaction = completed(Reliability::Reliable);
    assert_eq!(fire(&mut transaction, Timer::H), [Timeout, Terminated]);
}

#[test]
fn ack_before_a_final_is_ignored() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    assert_eq!(ack(&mut transaction), []);
    respond(&mut transaction, 180, ringing());
    assert_eq!(ack(&mut transaction), []);
    assert_eq!(transaction.state(), S::Proceeding);
}

#[test]
fn stale_timers_are_ignored() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    for timer in [Timer::G, Timer::H, Timer::I, Timer::L, Timer::A] {
        assert_eq!(fire(&mut transaction, timer), [], "{timer:?}");
    }
    respond(&mut transaction, 200, ok());
    for timer in [Timer::Trying, Timer::G, Timer::H, Timer::I] {
        assert_eq!(fire(&mut transaction, timer), [], "{timer:?}");
    }
    assert_eq!(transaction.state(), S::Accepted);
    fire(&mut transaction, Timer::L);
    assert_eq!(fire(&mut transaction, Timer::L), []);
    assert_eq!(ack(&mut transaction), []);
    assert_eq!(respond(&mut transaction, 200, ok()), []);
}

#[test]
fn transport_error_is_reported_once_and_the_transaction_carries_on() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    respond(&mut transaction, 180, ringing());
    assert_eq!(transport_error(&mut transaction), [TransportError]);
    assert_eq!(transport_error(&mut transaction), []);
    assert_eq!(transaction.state(), S::Proceeding);
    // The TU's final still moves it on, and H still ends it.
    respond(&mut transaction, 486, busy());
    assert_eq!(transaction.state(), S::Completed);
    assert_eq!(transport_error(&mut transaction), []);
    assert_eq!(
        fire(&mut transaction, Timer::H),
        [Timeout, Cancel(Timer::G), Terminated]
    );

    // In Accepted it keeps absorbing retransmitted INVITEs until L.
    let (mut transaction, _) = new(Reliability::Unreliable);
    respond(&mut transaction, 200, ok());
    assert_eq!(transport_error(&mut transaction), [TransportError]);
    assert_eq!(retransmission(&mut transaction), []);
    assert_eq!(transaction.state(), S::Accepted);
    assert_eq!(fire(&mut transaction, Timer::L), [Terminated]);
    assert_eq!(transport_error(&mut transaction), []);
}

#[test]
fn custom_timer_values_are_honoured() {
    let timers = TimerSettings {
        t1: ms(100),
        t2: ms(250),
        t4: ms(1500),
    };
    let (mut transaction, out) = new_with(Reliability::Unreliable, &timers);
    assert_eq!(
        out,
        [Schedule(Timer::Trying, ms(200))],
        "fixed, not from T1"
    );
    assert_eq!(
        respond(&mut transaction, 404, busy()),
        [
            Transmit(busy()),
            Cancel(Timer::Trying),
            Schedule(Timer::G, ms(100)),
            Schedule(Timer::H, ms(6400)),
        ]
    );
    assert_eq!(
        fire(&mut transaction, Timer::G),
        [Transmit(busy()), Schedule(Timer::G, ms(200))]
    );
    assert_eq!(
        fire(&mut transaction, Timer::G),
        [Transmit(busy()), Schedule(Timer::G, ms(250))]
    );
    assert_eq!(
        ack(&mut transaction),
        [
            Cancel(Timer::G),
            Cancel(Timer::H),
            Schedule(Timer::I, ms(1500))
        ]
    );

    let (mut transaction, _) = new_with(Reliability::Unreliable, &timers);
    assert_eq!(
        respond(&mut transaction, 200, ok()),
        [
            Transmit(ok()),
            Cancel(Timer::Trying),
            Schedule(Timer::L, ms(6400))
        ]
    );
}

fn on_timer(transaction: &mut ServerInvite, timer: Timer, out: &mut Actions) {
    transaction.on_timer(timer, out);
}

/// Over UDP a 486 that is never ACKed goes out at 0 s and on G at 0.5, 1.5, 3.5, 7.5 s,
/// then every T2 = 4 s up to 31.5 s: 11 times before H at 32 s.
#[test]
fn unacknowledged_failure_over_udp_is_sent_11_times_then_times_out_at_32_s() {
    let mut sim = Sim::new();
    let (mut transaction, out) = new(Reliability::Unreliable);
    sim.apply(out);
    sim.apply(respond(&mut transaction, 486, busy()));
    sim.run_out(&mut transaction, on_timer);
    let times: Vec<Duration> = sim.transmissions().into_iter().map(|(at, _)| at).collect();
    let expected: Vec<Duration> = [0, 500, 1500, 3500, 7500, 11_500, 15_500]
        .into_iter()
        .chain([19_500, 23_500, 27_500, 31_500])
        .map(ms)
        .collect();
    assert_eq!(times, expected);
    assert_eq!(sim.time_of(&Timeout), Some(ms(32_000)));
    assert!(sim.is_terminated());
    assert_eq!(sim.time_of(&NeedTrying), None);
}

#[test]
fn slow_tu_gets_100_at_200_ms_then_ack_ends_retransmissions() {
    let mut sim = Sim::new();
    let (mut transaction, out) = new(Reliability::Unreliable);
    sim.apply(out);
    sim.advance(ms(1000), &mut transaction, on_timer);
    assert_eq!(sim.time_of(&NeedTrying), Some(ms(200)));
    sim.apply(respond(&mut transaction, 100, trying()));
    sim.advance(ms(3000), &mut transaction, on_timer);
    sim.apply(respond(&mut transaction, 486, busy()));
    sim.advance(ms(5000), &mut transaction, on_timer);
    sim.apply(ack(&mut transaction));
    sim.advance(ms(5100), &mut transaction, on_timer);
    sim.apply(ack(&mut transaction));
    sim.run_out(&mut transaction, on_timer);
    assert_eq!(
        sim.transmissions(),
        [
            (ms(1000), trying()),
            (ms(3000), busy()),
            (ms(3500), busy()),
            (ms(4500), busy()),
        ]
    );
    assert_eq!(
        sim.time_of(&Terminated),
        Some(ms(10_000)),
        "T4 after the ACK"
    );
    assert_eq!(sim.time_of(&Timeout), None);
}

#[test]
fn accepted_lasts_64_t1_and_never_retransmits_on_its_own() {
    let mut sim = Sim::new();
    let (mut transaction, out) = new(Reliability::Unreliable);
    sim.apply(out);
    sim.advance(ms(100), &mut transaction, on_timer);
    sim.apply(respond(&mut transaction, 200, ok()));
    sim.advance(ms(600), &mut transaction, on_timer);
    sim.apply(retransmission(&mut transaction));
    sim.apply(respond(&mut transaction, 200, ok()));
    sim.advance(ms(700), &mut transaction, on_timer);
    sim.apply(ack(&mut transaction));
    sim.run_out(&mut transaction, on_timer);
    assert_eq!(sim.transmissions(), [(ms(100), ok()), (ms(600), ok())]);
    assert_eq!(sim.time_of(&Deliver), Some(ms(700)));
    assert_eq!(sim.time_of(&NeedTrying), None);
    assert_eq!(sim.time_of(&Terminated), Some(ms(32_100)));
}

#[test]
fn a_stateless_refusal_is_sent_once_and_ends_the_transaction() {
    for reliability in [Reliability::Unreliable, Reliability::Reliable] {
        let (mut transaction, _) = new(reliability);
        let mut out = Actions::new();
        transaction.on_tu_response_stateless(407, busy(), &mut out);
        // Sent once; no Timer G to repeat it, no Timer H to wait for an ACK.
        assert_eq!(
            out,
            [Transmit(busy()), Cancel(Timer::Trying), Terminated],
            "{reliability:?}"
        );
        assert_eq!(transaction.state(), S::Terminated);
        assert!(transaction.has_final());
    }
}

#[test]
fn a_stateless_2xx_or_provisional_takes_the_usual_path() {
    let (mut transaction, _) = new(Reliability::Unreliable);
    let mut out = Actions::new();
    transaction.on_tu_response_stateless(180, ringing(), &mut out);
    assert_eq!(transaction.state(), S::Proceeding);
    transaction.on_tu_response_stateless(200, ok(), &mut out);
    assert_eq!(transaction.state(), S::Accepted, "a 2xx waits for its ACK");
    // After a final, a stateless answer is no different from any other: not sent.
    let mut late = Actions::new();
    transaction.on_tu_response_stateless(486, busy(), &mut late);
    assert_eq!(late, []);
}

/// A transaction that has answered keeps only the response its state may still send: none
/// in Accepted or Confirmed, the final in Completed; the provisional goes with the final.
#[test]
fn an_answered_transaction_keeps_only_what_it_may_still_send() {
    let (mut accepted, _) = new(Reliability::Unreliable);
    respond(&mut accepted, 180, ringing());
    assert_eq!(accepted.kept_bytes(), ringing().len());
    respond(&mut accepted, 200, ok());
    assert_eq!(accepted.kept_bytes(), 0);

    let (mut refused, _) = new(Reliability::Unreliable);
    respond(&mut refused, 180, ringing());
    respond(&mut refused, 486, busy());
    assert_eq!(refused.kept_bytes(), busy().len());
    assert_eq!(retransmission(&mut refused), [Transmit(busy())]);
    ack(&mut refused);
    assert_eq!(refused.state(), S::Confirmed);
    assert_eq!(refused.kept_bytes(), 0);
    assert_eq!(retransmission(&mut refused), []);
}
