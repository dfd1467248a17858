//! Unit tests of the INVITE client transaction, on the virtual clock.

use std::cell::Cell;

use super::super::ms;
use super::super::sim::Sim;
use super::*;

use Action::{Cancel, Deliver, Schedule, Terminated, Timeout, Transmit, TransportError};
use ClientInviteState as S;

fn invite() -> Bytes {
    Bytes::from_static(b"INVITE sip:b@example.com SIP/2.0\r\n\r\n")
}

fn ack_bytes() -> Bytes {
    Bytes::from_static(b"ACK sip:b@example.com SIP/2.0\r\n\r\n")
}

fn start(reliability: Reliability) -> (ClientInvite, Actions) {
    start_with(reliability, &TimerSettings::default())
}

fn start_with(reliability: Reliability, timers: &TimerSettings) -> (ClientInvite, Actions) {
    let mut out = Actions::new();
    let transaction = ClientInvite::start(invite(), reliability, timers, &mut out);
    (transaction, out)
}

/// Feeds a response whose ACK builder must not be needed.
fn response(transaction: &mut ClientInvite, status: u16) -> Actions {
    let mut out = Actions::new();
    transaction.on_response(status, || panic!("ACK built for {status}"), &mut out);
    out
}

/// Feeds a response and counts how often the ACK builder runs.
fn response_counting(transaction: &mut ClientInvite, status: u16, builds: &Cell<u32>) -> Actions {
    let mut out = Actions::new();
    transaction.on_response(
        status,
        || {
            builds.set(builds.get() + 1);
            ack_bytes()
        },
        &mut out,
    );
    out
}

fn fire(transaction: &mut ClientInvite, timer: Timer) -> Actions {
    let mut out = Actions::new();
    transaction.on_timer(timer, &mut out);
    out
}

fn transport_error(transaction: &mut ClientInvite) -> Actions {
    let mut out = Actions::new();
    transaction.on_transport_error(&mut out);
    out
}

#[test]
fn start_over_udp_sends_and_arms_a_and_b() {
    let (transaction, out) = start(Reliability::Unreliable);
    assert_eq!(
        out,
        [
            Transmit(invite()),
            Schedule(Timer::A, ms(500)),
            Schedule(Timer::B, ms(32_000)),
        ]
    );
    assert_eq!(transaction.state(), S::Calling);
    assert!(!transaction.has_final());
}

#[test]
fn start_over_tcp_arms_only_b() {
    let (_, out) = start(Reliability::Reliable);
    assert_eq!(out, [Transmit(invite()), Schedule(Timer::B, ms(32_000))]);
}

#[test]
fn timer_a_doubles_without_a_cap() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    let mut intervals = Vec::new();
    for _ in 0..6 {
        match fire(&mut transaction, Timer::A).as_slice() {
            [Transmit(bytes), Schedule(Timer::A, interval)] => {
                assert_eq!(bytes, &invite());
                intervals.push(*interval);
            }
            other => panic!("unexpected actions {other:?}"),
        }
    }
    // Past T2 (4 s): INVITE retransmissions are not capped, unlike E and G.
    assert_eq!(
        intervals,
        [
            ms(1000),
            ms(2000),
            ms(4000),
            ms(8000),
            ms(16_000),
            ms(32_000)
        ]
    );
}

#[test]
fn provisional_stops_retransmissions_and_the_timeout() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    assert_eq!(
        response(&mut transaction, 100),
        [Deliver, Cancel(Timer::A), Cancel(Timer::B)]
    );
    assert_eq!(transaction.state(), S::Proceeding);
    assert_eq!(response(&mut transaction, 180), [Deliver]);
    assert_eq!(response(&mut transaction, 183), [Deliver]);
    assert_eq!(transaction.state(), S::Proceeding);
    // A and B from before the provisional are stale now.
    assert_eq!(fire(&mut transaction, Timer::A), []);
    assert_eq!(fire(&mut transaction, Timer::B), []);
    assert_eq!(transaction.state(), S::Proceeding);

    let (mut transaction, _) = start(Reliability::Reliable);
    assert_eq!(response(&mut transaction, 180), [Deliver, Cancel(Timer::B)]);
}

#[test]
fn timer_b_times_out_while_calling() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    assert_eq!(
        fire(&mut transaction, Timer::B),
        [Timeout, Cancel(Timer::A), Terminated]
    );
    assert!(transaction.is_terminated());
    assert!(!transaction.has_final());

    let (mut transaction, _) = start(Reliability::Reliable);
    assert_eq!(fire(&mut transaction, Timer::B), [Timeout, Terminated]);
}

#[test]
fn success_enters_accepted_and_later_2xx_still_reach_the_tu() {
    for via_proceeding in [false, true] {
        let (mut transaction, _) = start(Reliability::Unreliable);
        let mut expected = vec![Deliver];
        if via_proceeding {
            response(&mut transaction, 180);
        } else {
            expected.extend([Cancel(Timer::A), Cancel(Timer::B)]);
        }
        expected.push(Schedule(Timer::M, ms(32_000)));
        assert_eq!(response(&mut transaction, 200), expected);
        assert_eq!(transaction.state(), S::Accepted);
        assert!(transaction.has_final());
        assert!(
            transaction.request.is_empty(),
            "an answered INVITE is not kept"
        );

        // Retransmitted or forked 2xx: delivered, never ACKed by the transaction.
        assert_eq!(response(&mut transaction, 200), [Deliver]);
        assert_eq!(response(&mut transaction, 202), [Deliver]);
        // Nothing else has a transition out of Accepted.
        assert_eq!(response(&mut transaction, 180), []);
        assert_eq!(response(&mut transaction, 486), []);
        assert_eq!(fire(&mut transaction, Timer::A), []);
        assert_eq!(fire(&mut transaction, Timer::B), []);
        assert_eq!(transaction.state(), S::Accepted);

        assert_eq!(fire(&mut transaction, Timer::M), [Terminated]);
        assert!(transaction.is_terminated());
    }
}

#[test]
fn success_over_tcp_also_waits_in_accepted_for_timer_m() {
    // RFC 6026 Timer M is 64*T1 on every transport: forked 2xx can still arrive.
    let (mut transaction, _) = start(Reliability::Reliable);
    assert_eq!(
        response(&mut transaction, 200),
        [Deliver, Cancel(Timer::B), Schedule(Timer::M, ms(32_000))]
    );
    assert_eq!(transaction.state(), S::Accepted);
}

#[test]
fn failure_over_udp_is_acked_once_and_the_ack_re_sent_for_retransmissions() {
    for via_proceeding in [false, true] {
        let builds = Cell::new(0);
        let (mut transaction, _) = start(Reliability::Unreliable);
        let mut expected = vec![Transmit(ack_bytes()), Deliver];
        if via_proceeding {
            response(&mut transaction, 183);
        } else {
            expected.extend([Cancel(Timer::A), Cancel(Timer::B)]);
        }
        expected.push(Schedule(Timer::D, ms(32_000)));
        assert_eq!(response_counting(&mut transaction, 486, &builds), expected);
        assert_eq!(builds.get(), 1);
        assert_eq!(transaction.state(), S::Completed);
        assert!(transaction.has_final());

        // Retransmitted final: the stored ACK again, nothing to the TU, no new ACK built.
        for _ in 0..3 {
            assert_eq!(
                response_counting(&mut transaction, 486, &builds),
                [Transmit(ack_bytes())]
            );
        }
        assert_eq!(builds.get(), 1);
        assert_eq!(response(&mut transaction, 180), []);
        assert_eq!(response(&mut transaction, 200), []);

        assert_eq!(fire(&mut transaction, Timer::D), [Terminated]);
        assert!(transaction.is_terminated());
        assert_eq!(response_counting(&mut transaction, 486, &builds), []);
        assert_eq!(builds.get(), 1);
    }
}

#[test]
fn failure_over_tcp_acks_and_terminates_at_once() {
    let builds = Cell::new(0);
    let (mut transaction, _) = start(Reliability::Reliable);
    assert_eq!(
        response_counting(&mut transaction, 603, &builds),
        [Transmit(ack_bytes()), Deliver, Cancel(Timer::B), Terminated]
    );
    assert_eq!(builds.get(), 1);
    assert!(transaction.is_terminated());
    assert!(transaction.has_final());
}

#[test]
fn stale_timers_are_ignored() {
    let (mut transaction, _) = start(Reliability::Reliable);
    for timer in [Timer::A, Timer::D, Timer::M, Timer::E] {
        assert_eq!(fire(&mut transaction, timer), [], "{timer:?}");
    }
    assert_eq!(transaction.state(), S::Calling);

    let (mut transaction, _) = start(Reliability::Unreliable);
    response_counting(&mut transaction, 404, &Cell::new(0));
    for timer in [Timer::A, Timer::B, Timer::M] {
        assert_eq!(fire(&mut transaction, timer), [], "{timer:?}");
    }
    assert_eq!(transaction.state(), S::Completed);
    fire(&mut transaction, Timer::D);
    assert_eq!(fire(&mut transaction, Timer::D), []);
}

#[test]
fn transport_error_informs_tu_and_terminates_in_every_live_state() {
    let (mut transaction, _) = start(Reliability::Unreliable);
    assert_eq!(
        transport_error(&mut transaction),
        [
            TransportError,
            Cancel(Timer::A),
            Cancel(Timer::B),
            Terminated
        ]
    );

    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 180);
    assert_eq!(
        transport_error(&mut transaction),
        [TransportError, Terminated]
    );

    let (mut transaction, _) = start(Reliability::Unreliable);
    response(&mut transaction, 200);
    assert_eq!(
        transport_error(&mut transaction),
        [TransportError, Cancel(Timer::M), Terminated]
    );

    let (mut transaction, _) = start(Reliability::Unreliable);
    response_counting(&mut transaction, 500, &Cell::new(0));
    assert_eq!(
        transport_error(&mut transaction),
        [TransportError, Cancel(Timer::D), Terminated]
    );
    assert_eq!(transport_error(&mut transaction), []);
}

#[test]
fn custom_timer_values_are_honoured_except_for_timer_d() {
    let timers = TimerSettings {
        t1: ms(2000),
        t2: ms(3000),
        t4: ms(9000),
    };
    let (mut transaction, out) = start_with(Reliability::Unreliable, &timers);
    assert_eq!(
        out,
        [
            Transmit(invite()),
            Schedule(Timer::A, ms(2000)),
            Schedule(Timer::B, ms(128_000)),
        ]
    );
    assert_eq!(
        fire(&mut transaction, Timer::A),
        [Transmit(invite()), Schedule(Timer::A, ms(4000))]
    );
    assert_eq!(
        response_counting(&mut transaction, 480, &Cell::new(0)),
        [
            Transmit(ack_bytes()),
            Deliver,
            Cancel(Timer::A),
            Cancel(Timer::B),
            Schedule(Timer::D, ms(32_000)),
        ]
    );

    let (mut transaction, _) = start_with(Reliability::Unreliable, &timers);
    assert_eq!(
        response(&mut transaction, 200),
        [
            Deliver,
            Cancel(Timer::A),
            Cancel(Timer::B),
            Schedule(Timer::M, ms(128_000)),
        ]
    );
}

fn on_timer(transaction: &mut ClientInvite, timer: Timer, out: &mut Actions) {
    transaction.on_timer(timer, out);
}

/// §17.1.1.2: over UDP an unanswered INVITE goes out at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and
/// 31.5 s (seven times), and Timer B ends it at 64*T1 = 32 s.
#[test]
fn unanswered_invite_over_udp_is_sent_7_times_then_times_out_at_32_s() {
    let mut sim = Sim::new();
    let (mut transaction, out) = start(Reliability::Unreliable);
    sim.apply(out);
    sim.run_out(&mut transaction, on_timer);
    let times: Vec<Duration> = sim.transmissions().into_iter().map(|(at, _)| at).collect();
    assert_eq!(
        times,
        [0, 500, 1500, 3500, 7500, 15_500, 31_500].map(ms).to_vec()
    );
    assert_eq!(sim.time_of(&Timeout), Some(ms(32_000)));
    assert!(sim.is_terminated());
}

#[test]
fn ringing_invite_waits_without_timers() {
    let mut sim = Sim::new();
    let (mut transaction, out) = start(Reliability::Unreliable);
    sim.apply(out);
    sim.advance(ms(2000), &mut transaction, on_timer);
    sim.apply(response(&mut transaction, 180));
    sim.advance(ms(600_000), &mut transaction, on_timer);
    assert_eq!(sim.transmissions().len(), 3, "0, 0.5 and 1.5 s only");
    assert!(sim.pending().is_empty());
    assert_eq!(transaction.state(), S::Proceeding);
    assert_eq!(sim.time_of(&Timeout), None);
}

#[test]
fn accepted_lasts_64_t1_after_the_first_2xx() {
    let mut sim = Sim::new();
    let (mut transaction, out) = start(Reliability::Unreliable);
    sim.apply(out);
    sim.advance(ms(1000), &mut transaction, on_timer);
    sim.apply(response(&mut transaction, 200));
    for at in [1500, 2500, 4500, 8500] {
        sim.advance(ms(at), &mut transaction, on_timer);
        sim.apply(response(&mut transaction, 200));
    }
    sim.run_out(&mut transaction, on_timer);
    let delivered = sim.log().iter().filter(|(_, a)| *a == Deliver).count();
    assert_eq!(delivered, 5);
    assert_eq!(
        sim.transmissions().len(),
        2,
        "INVITE at 0 and 0.5 s, no ACK"
    );
    assert_eq!(sim.time_of(&Terminated), Some(ms(33_000)));
}

#[test]
fn completed_over_udp_re_acks_until_timer_d() {
    let mut sim = Sim::new();
    let (mut transaction, out) = start(Reliability::Unreliable);
    sim.apply(out);
    sim.advance(ms(100), &mut transaction, on_timer);
    sim.apply(response_counting(&mut transaction, 486, &Cell::new(0)));
    for at in [600, 1600, 3600] {
        sim.advance(ms(at), &mut transaction, on_timer);
        sim.apply(response_counting(&mut transaction, 486, &Cell::new(0)));
    }
    sim.run_out(&mut transaction, on_timer);
    let sent: Vec<(Duration, Bytes)> = sim.transmissions();
    assert_eq!(
        sent,
        [
            (ms(0), invite()),
            (ms(100), ack_bytes()),
            (ms(600), ack_bytes()),
            (ms(1600), ack_bytes()),
            (ms(3600), ack_bytes()),
        ]
    );
    assert_eq!(sim.time_of(&Terminated), Some(ms(32_100)));
}
