//! Unit tests of the non-INVITE client transaction, on the virtual clock.

use super::super::ms;
use super::super::sim::Sim;
use super::*;

use Action::{Cancel, Deliver, Schedule, Terminated, Timeout, Transmit, TransportError};
use ClientNonInviteState as S;

fn request() -> Bytes {
    Bytes::from_static(b"OPTIONS sip:a@example.com SIP/2.0\r\n\r\n")
}

fn start(reliability: Reliability) -> (ClientNonInvite, Actions) {
    start_with(reliability, &TimerSettings::default())
}

fn start_with(reliability: Reliability, timers: &TimerSettings) -> (ClientNonInvite, Actions) {
    let mut out = Actions::new();
    let transaction = ClientNonInvite::start(request(), reliability, timers, &mut out);
    (transaction, out)
}

fn response(transaction: &mut ClientNonInvite, status: u16) -> Actions {
    let mut out = Actions::new();
    transaction.on_response(status, &mut out);
    out
}

fn fire(transaction: &mut ClientNonInvite, timer: Timer) -> Actions {
    let mut out = Actions::new();
    transaction.on_timer(timer, &mut out);
    out
}

fn transport_error(transaction: &mut ClientNonInvite) -> Actions {
    let mut out = Actions::new();
    transaction.on_transport_error(&mut out);
    out
}

#[test]
fn start_over_udp_sends_and_arms_e_and_f() {
    let (transaction, out) = start(Reliability::Unreliable);
    assert_eq!(
        out,
        [
            Transmit(request()),
            Schedule(Timer::E, ms(500)),
            Schedule(Timer::F, ms(32_000)),
        ]
    );
    assert_eq!(transaction.state(), S::Trying);
    assert!(!transaction.has_final());
    assert!(!transaction.is_terminated());
}

#[test]
fn start_over_tcp_arms_only_f() {
    let (_, out) = start(Reliability::Reliable);
    assert_eq!(out, [Transmit(request()), Schedule(Timer::F, ms(32_000))]);
}

#[test]
fn timer_e_doubles_up_to_t2_while_trying() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    let mut intervals = Vec::new();
    for _ in 0..6 {
        let out = fire(&mut transaction, Timer::E);
        match out.as_slice() {
            [Transmit(bytes), Schedule(Timer::E, interval)] => {
                assert_eq!(bytes, &request());
                intervals.push(*interval);
            }
            other => panic!("unexpected actions {other:?}"),
        }
    }
    assert_eq!(
        intervals,
        [ms(1000), ms(2000), ms(4000), ms(4000), ms(4000), ms(4000)]
    );
    assert_eq!(transaction.state(), S::Trying);
}

#[test]
fn provisional_moves_to_proceeding_and_is_delivered_each_time() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    assert_eq!(response(&mut transaction, 100), [Deliver]);
    assert_eq!(transaction.state(), S::Proceeding);
    assert_eq!(response(&mut transaction, 180), [Deliver]);
    assert_eq!(transaction.state(), S::Proceeding);
    assert!(!transaction.has_final());
}

#[test]
fn timer_e_in_proceeding_retransmits_at_t2() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 100);
    // Even the first retransmission after a provisional uses T2, not 2*T1.
    assert_eq!(
        fire(&mut transaction, Timer::E),
        [Transmit(request()), Schedule(Timer::E, ms(4000))]
    );
    assert_eq!(
        fire(&mut transaction, Timer::E),
        [Transmit(request()), Schedule(Timer::E, ms(4000))]
    );
}

#[test]
fn final_over_udp_completes_and_arms_k() {
    for (status, via_proceeding) in [(200, false), (404, false), (200, true), (503, true)] {
        let (mut transaction, _) = start(Reliability::Unreliable);
        if via_proceeding {
            response(&mut transaction, 100);
        }
        assert_eq!(
            response(&mut transaction, status),
            [
                Deliver,
                Cancel(Timer::E),
                Cancel(Timer::F),
                Schedule(Timer::K, ms(5000)),
            ],
            "status {status}"
        );
        assert_eq!(transaction.state(), S::Completed);
        assert!(transaction.request.is_empty(), "nothing sends it again");
        assert!(transaction.has_final());
        assert_eq!(fire(&mut transaction, Timer::K), [Terminated]);
        assert!(transaction.is_terminated());
        assert!(transaction.has_final());
    }
}

#[test]
fn final_over_tcp_terminates_at_once() {
    let (mut transaction, _) = start(Reliability::Reliable);
    assert_eq!(
        response(&mut transaction, 200),
        [Deliver, Cancel(Timer::F), Terminated]
    );
    assert!(transaction.is_terminated());
    assert!(transaction.has_final());
}

#[test]
fn completed_absorbs_retransmitted_responses() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 200);
    assert_eq!(response(&mut transaction, 200), []);
    assert_eq!(response(&mut transaction, 500), []);
    assert_eq!(response(&mut transaction, 180), []);
    assert_eq!(transaction.state(), S::Completed);
}

#[test]
fn timer_f_times_out_from_trying_and_proceeding() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    assert_eq!(
        fire(&mut transaction, Timer::F),
        [Timeout, Cancel(Timer::E), Terminated]
    );
    assert!(transaction.is_terminated());
    assert!(!transaction.has_final());

    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 100);
    assert_eq!(
        fire(&mut transaction, Timer::F),
        [Timeout, Cancel(Timer::E), Terminated]
    );

    let (mut transaction, _) = start(Reliability::Reliable);
    assert_eq!(fire(&mut transaction, Timer::F), [Timeout, Terminated]);
}

#[test]
fn stale_timers_are_ignored() {
    // Timers that were never armed.
    let (mut transaction, _) = start(Reliability::Reliable);
    assert_eq!(fire(&mut transaction, Timer::E), []);
    assert_eq!(fire(&mut transaction, Timer::K), []);
    assert_eq!(fire(&mut transaction, Timer::A), []);
    assert_eq!(transaction.state(), S::Trying);

    // Timers cancelled by the final response.
    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 200);
    assert_eq!(fire(&mut transaction, Timer::E), []);
    assert_eq!(fire(&mut transaction, Timer::F), []);
    assert_eq!(transaction.state(), S::Completed);

    // Everything after termination.
    fire(&mut transaction, Timer::K);
    for timer in [Timer::E, Timer::F, Timer::K] {
        assert_eq!(fire(&mut transaction, timer), []);
    }
    assert_eq!(response(&mut transaction, 200), []);
    assert_eq!(transport_error(&mut transaction), []);
}

#[test]
fn a_timer_fires_once_per_arming() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 200);
    assert_eq!(fire(&mut transaction, Timer::K), [Terminated]);
    assert_eq!(fire(&mut transaction, Timer::K), []);
}

#[test]
fn transport_error_informs_tu_and_terminates_in_every_live_state() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    assert_eq!(
        transport_error(&mut transaction),
        [
            TransportError,
            Cancel(Timer::E),
            Cancel(Timer::F),
            Terminated
        ]
    );
    assert!(transaction.is_terminated());

    let (mut transaction, _) = start(Reliability::Reliable);
    response(&mut transaction, 183);
    assert_eq!(
        transport_error(&mut transaction),
        [TransportError, Cancel(Timer::F), Terminated]
    );

    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 200);
    assert_eq!(
        transport_error(&mut transaction),
        [TransportError, Cancel(Timer::K), Terminated]
    );
}

#[test]
fn custom_timer_values_are_honoured() {
    let timers = TimerSettings {
        t1: ms(100),
        t2: ms(300),
        t4: ms(700),
    };
    let (mut transaction, out) = start_with(Reliability::Unreliable, &timers);
    assert_eq!(
        out,
        [
            Transmit(request()),
            Schedule(Timer::E, ms(100)),
            Schedule(Timer::F, ms(6400)),
        ]
    );
    assert_eq!(
        fire(&mut transaction, Timer::E),
        [Transmit(request()), Schedule(Timer::E, ms(200))]
    );
    assert_eq!(
        fire(&mut transaction, Timer::E),
        [Transmit(request()), Schedule(Timer::E, ms(300))]
    );
    response(&mut transaction, 100);
    assert_eq!(
        fire(&mut transaction, Timer::E),
        [Transmit(request()), Schedule(Timer::E, ms(300))]
    );
    assert_eq!(
        response(&mut transaction, 200),
        [
            Deliver,
            Cancel(Timer::E),
            Cancel(Timer::F),
            Schedule(Timer::K, ms(700)),
        ]
    );
}

fn on_timer(transaction: &mut ClientNonInvite, timer: Timer, out: &mut Actions) {
    transaction.on_timer(timer, out);
}

/// §17.1.2.2 over UDP with default timers: E fires at 0.5, 1.5, 3.5, 7.5 s, then every
/// T2 = 4 s (11.5 ... 31.5 s); the next one (35.5 s) is after F at 64*T1 = 32 s. That is
/// the original request plus 10 retransmissions.
#[test]
fn unanswered_request_over_udp_is_sent_11_times_then_times_out_at_32_s() {
    let mut sim = Sim::new();
    let (mut transaction, out) = start(Reliability::Unreliable);
    sim.apply(out);
    sim.run_out(&mut transaction, on_timer);

    let times: Vec<Duration> = sim.transmissions().into_iter().map(|(at, _)| at).collect();
    let expected: Vec<Duration> = [0, 500, 1500, 3500, 7500, 11_500, 15_500]
        .into_iter()
        .chain([19_500, 23_500, 27_500, 31_500])
        .map(ms)
        .collect();
    assert_eq!(times, expected);
    assert_eq!(times.len(), 11);
    assert_eq!(sim.time_of(&Timeout), Some(ms(32_000)));
    assert_eq!(sim.log().last(), Some(&(ms(32_000), Terminated)));
    assert!(sim.is_terminated());
}

#[test]
fn unanswered_request_over_tcp_is_sent_once_then_times_out_at_32_s() {
    let mut sim = Sim::new();
    let (mut transaction, out) = start(Reliability::Reliable);
    sim.apply(out);
    sim.run_out(&mut transaction, on_timer);
    assert_eq!(sim.transmissions().len(), 1);
    assert_eq!(sim.time_of(&Timeout), Some(ms(32_000)));
    assert!(sim.is_terminated());
}

#[test]
fn provisional_slows_retransmissions_to_t2_and_final_stops_them() {
    let mut sim = Sim::new();
    let (mut transaction, out) = start(Reliability::Unreliable);
    sim.apply(out);
    sim.advance(ms(700), &mut transaction, on_timer);
    sim.apply(response(&mut transaction, 100));
    sim.advance(ms(10_000), &mut transaction, on_timer);
    sim.apply(response(&mut transaction, 200));
    sim.apply(response(&mut transaction, 200));
    sim.run_out(&mut transaction, on_timer);

    let times: Vec<Duration> = sim.transmissions().into_iter().map(|(at, _)| at).collect();
    // E armed at 0.5 s for 1 s still fires at 1.5 s; after that, every T2.
    assert_eq!(times, [ms(0), ms(500), ms(1500), ms(5500), ms(9500)]);
    let delivered = sim.log().iter().filter(|(_, a)| *a == Deliver).count();
    assert_eq!(delivered, 2, "the retransmitted 200 must not reach the TU");
    assert_eq!(
        sim.time_of(&Terminated),
        Some(ms(15_000)),
        "T4 after the final"
    );
    assert_eq!(sim.time_of(&Timeout), None);
}
