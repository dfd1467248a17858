//! The four SIP transaction state machines of RFC 3261 §17, with the "Accepted" state that
//! RFC 6026 adds to both INVITE machines, as pure sans-IO code. This module owns what they
//! share: the timer values (T1, T2, T4), the names of the timers, and the `Action`s a machine
//! asks its runtime to perform. A machine never touches a socket or a clock. It is fed events
//! (a response arrived, the TU answered, a timer fired, the transport failed) and appends the
//! actions those events cause to an `Actions` vector, which the runtime executes in order.
//!
//! Contract between the machines and the runtime:
//! - Within one event, actions come in a fixed order: what goes on the wire (`Transmit`),
//!   then what goes to the TU (`Deliver`, `Timeout`, `TransportError`, `NeedTrying`), then
//!   timer changes (`Cancel`, `Schedule`), then `Terminated`.
//! - A machine emits `Cancel` only for a timer it has armed and that has not fired, and it
//!   cancels every such timer before `Terminated`. The runtime may still drop all of a
//!   transaction's timers when it removes it, but it never has to.
//! - A timer expiry the machine does not expect (already cancelled, already fired, or not
//!   meaningful in the current state) is ignored. What the machine cannot detect is an expiry
//!   of an *earlier* instance of a timer that has since been re-armed, so the runtime must
//!   make sure a replaced or cancelled instance never reports.
//! - After `Terminated` every method is a no-op.
//!
//! The runtime is `layer.rs`: one tokio task that matches messages to transactions and
//! executes these actions with real sockets and tokio timers.

pub mod client_invite;
pub mod client_non_invite;
mod layer;
pub mod server_invite;
pub mod server_non_invite;
mod split_map;

use std::time::Duration;

use bytes::Bytes;

pub use client_invite::ClientInvite;
pub use client_non_invite::ClientNonInvite;
pub use layer::{
    start_shards, ActiveTransactions, ClientEvent, CoreEvent, EventSink, LayerHandle, TxId,
    CHANNEL_DEPTH,
};
pub use server_invite::ServerInvite;
pub use server_non_invite::ServerNonInvite;

/// The RFC 3261 timer base values (§17.1.1.1 and table 4). Every other timer is derived from
/// these, except Timer D (fixed at 32 s, see `client_invite`) and the 200 ms "Trying" delay.
///
/// T1 must be non-zero: the retransmission timers start at T1 and double, so a zero T1 would
/// retransmit in a tight loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerSettings {
    /// Round-trip time estimate: first retransmission interval, and 64*T1 is the transaction
    /// timeout.
    pub t1: Duration,
    /// Cap on the retransmission interval of non-INVITE requests and INVITE final responses.
    pub t2: Duration,
    /// How long a message may stay in the network; how long Completed/Confirmed linger.
    pub t4: Duration,
}

impl TimerSettings {
    /// The timers `sip.t1_ms`, `sip.t2_ms` and `sip.t4_ms` set.
    pub fn from_config(sip: &crate::config::SipConfig) -> TimerSettings {
        TimerSettings {
            t1: Duration::from_millis(sip.t1_ms),
            t2: Duration::from_millis(sip.t2_ms),
            t4: Duration::from_millis(sip.t4_ms),
        }
    }
}

impl Default for TimerSettings {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerSettings {
    /// 64*T1: Timers B, F, H, J, L and M.
    pub fn transaction_timeout(&self) -> Duration {
        self.t1.saturating_mul(64)
    }

    /// The next interval of a retransmission timer that doubles up to T2 (E and G).
    fn backoff_capped(&self, previous: Duration) -> Duration {
        previous.saturating_mul(2).min(self.t2)
    }
}

/// Whether the transport retransmits for us. Over a reliable transport (TCP, TLS, WebSocket)
/// the machines never retransmit and skip the states that only exist to absorb
/// retransmissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reliability {
    Reliable,
    Unreliable,
}

/// The timers of RFC 3261 table 4 and RFC 6026, plus the 200 ms delay after which an INVITE
/// server transaction sends 100 Trying on its TU's behalf (§17.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timer {
    A,
    B,
    D,
    E,
    F,
    G,
    H,
    I,
    J,
    K,
    L,
    M,
    Trying,
}

impl Timer {
    const ALL: [Timer; 13] = [
        Timer::A,
        Timer::B,
        Timer::D,
        Timer::E,
        Timer::F,
        Timer::G,
        Timer::H,
        Timer::I,
        Timer::J,
        Timer::K,
        Timer::L,
        Timer::M,
        Timer::Trying,
    ];

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// What a machine asks its runtime to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes over the transaction's flow.
    Transmit(Bytes),
    /// Hand the message currently being processed (a response, or an ACK) to the TU.
    Deliver,
    /// (Re)arm this timer, replacing a pending instance of the same timer.
    Schedule(Timer, Duration),
    /// Disarm this timer.
    Cancel(Timer),
    /// INVITE server: the TU sent nothing within 200 ms. The runtime builds a 100 Trying and
    /// passes it back through `ServerInvite::on_tu_response(100, bytes)`.
    NeedTrying,
    /// Tell the TU the transaction timed out. Client: no final response (the runtime makes a
    /// 408). INVITE server: Timer H, no ACK for a non-2xx final response.
    Timeout,
    /// Tell the TU the transport failed.
    TransportError,
    /// The runtime removes the transaction. Always the last action a machine emits.
    Terminated,
}

/// Methods append to an `out: &mut Actions` so that one buffer can be reused across events.
pub type Actions = Vec<Action>;

/// The three classes of response status a transaction tells apart. The wire layer only
/// accepts 100-699, so anything above 299 is a failure (3xx-6xx) here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StatusClass {
    Provisional,
    Success,
    Failure,
}

impl StatusClass {
    fn of(status: u16) -> Self {
        match status {
            0..=199 => StatusClass::Provisional,
            200..=299 => StatusClass::Success,
            _ => StatusClass::Failure,
        }
    }
}

/// The timers a machine has armed and that have not yet fired. It lets a machine ignore
/// stale expiries and emit `Cancel` only when there is something to cancel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ArmedTimers(u16);

impl ArmedTimers {
    fn arm(&mut self, timer: Timer, after: Duration, out: &mut Actions) {
        self.0 |= timer.bit();
        out.push(Action::Schedule(timer, after));
    }

    fn cancel(&mut self, timer: Timer, out: &mut Actions) {
        if self.0 & timer.bit() != 0 {
            self.0 &= !timer.bit();
            out.push(Action::Cancel(timer));
        }
    }

    fn cancel_all(&mut self, out: &mut Actions) {
        for timer in Timer::ALL {
            self.cancel(timer, out);
        }
    }

    /// Records that `timer` fired. False when it was not armed, i.e. the expiry is stale.
    fn fired(&mut self, timer: Timer) -> bool {
        let was_armed = self.0 & timer.bit() != 0;
        self.0 &= !timer.bit();
        was_armed
    }
}

#[cfg(test)]
pub(crate) mod sim;

#[cfg(test)]
pub(crate) fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// The CANCEL for an INVITE we sent (RFC 3261 §9.1): its Request-URI, top Via (so it
/// matches the INVITE's transaction at the next hop), Route, From, To, Call-ID and CSeq
/// number; `None` for a message without a Request-URI.
pub fn cancel_for(invite: &tandem_sip::Message) -> Option<tandem_sip::Message> {
    use tandem_sip::{HeaderName, Message, Method};
    let uri = invite.uri()?.clone();
    let mut cancel = Message::request(Method::Cancel, uri);
    if let Ok(via) = invite.top_via() {
        cancel.push_header(HeaderName::Via, via.to_string());
    }
    for name in [
        HeaderName::Route,
        HeaderName::From,
        HeaderName::To,
        HeaderName::CallId,
    ] {
        for (n, v) in invite.headers() {
            if *n == name {
                cancel.push_header(name.clone(), bytes::Bytes::copy_from_slice(v));
            }
        }
    }
    let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
    cancel.push_header(HeaderName::CSeq, format!("{seq} CANCEL"));
    cancel.push_header(HeaderName::MaxForwards, "70");
    cancel.push_header(HeaderName::ContentLength, "0");
    Some(cancel)
}

#[cfg(test)]
mod tests {
    use super::sim::Sim;
    use super::*;

    #[test]
    fn default_timers_are_rfc_3261_values() {
        let t = TimerSettings::default();
        assert_eq!(t.t1, ms(500));
        assert_eq!(t.t2, ms(4000));
        assert_eq!(t.t4, ms(5000));
        assert_eq!(t.transaction_timeout(), ms(32_000));
    }

    #[test]
    fn backoff_doubles_then_caps_at_t2() {
        let t = TimerSettings::default();
        let mut interval = t.t1;
        let mut seen = Vec::new();
        for _ in 0..5 {
            interval = t.backoff_capped(interval);
            seen.push(interval);
        }
        assert_eq!(seen, [ms(1000), ms(2000), ms(4000), ms(4000), ms(4000)]);
    }

    #[test]
    fn huge_t1_saturates_instead_of_overflowing() {
        let t = TimerSettings {
            t1: Duration::MAX,
            ..TimerSettings::default()
        };
        assert_eq!(t.transaction_timeout(), Duration::MAX);
    }

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(100), StatusClass::Provisional);
        assert_eq!(StatusClass::of(199), StatusClass::Provisional);
        assert_eq!(StatusClass::of(200), StatusClass::Success);
        assert_eq!(StatusClass::of(299), StatusClass::Success);
        assert_eq!(StatusClass::of(300), StatusClass::Failure);
        assert_eq!(StatusClass::of(699), StatusClass::Failure);
    }

    #[test]
    fn armed_timers_cancel_only_what_is_armed() {
        let mut armed = ArmedTimers::default();
        let mut out = Actions::new();
        armed.arm(Timer::E, ms(500), &mut out);
        armed.arm(Timer::F, ms(32_000), &mut out);
        armed.cancel(Timer::K, &mut out);
        assert!(armed.fired(Timer::E));
        assert!(!armed.fired(Timer::E), "a timer fires once per arming");
        armed.cancel(Timer::E, &mut out);
        armed.cancel_all(&mut out);
        armed.cancel_all(&mut out);
        assert_eq!(
            out,
            [
                Action::Schedule(Timer::E, ms(500)),
                Action::Schedule(Timer::F, ms(32_000)),
                Action::Cancel(Timer::F),
            ]
        );
        assert!(!armed.fired(Timer::F));
    }

    #[test]
    fn sim_replaces_rescheduled_timers_and_fires_in_deadline_order() {
        let mut sim = Sim::new();
        sim.apply(vec![
            Action::Schedule(Timer::A, ms(300)),
            Action::Schedule(Timer::B, ms(200)),
            Action::Schedule(Timer::A, ms(100)),
        ]);
        let mut fired = Vec::new();
        sim.advance(ms(250), &mut fired, |fired, timer, _| fired.push(timer));
        assert_eq!(fired, [Timer::A, Timer::B]);
        assert_eq!(sim.now(), ms(250));
        assert!(
            sim.pending().is_empty(),
            "the replaced A must not fire again"
        );
    }

    #[test]
    #[should_panic(expected = "Terminated with timers pending")]
    fn sim_rejects_termination_with_armed_timers() {
        let mut sim = Sim::new();
        sim.apply(vec![Action::Schedule(Timer::K, ms(1)), Action::Terminated]);
    }

    #[test]
    #[should_panic(expected = "after Terminated")]
    fn sim_rejects_actions_after_termination() {
        let mut sim = Sim::new();
        sim.apply(vec![Action::Terminated, Action::Deliver]);
    }
}
