//! What the node tells a run about its call, and what a run tells the node: the facts a
//! script reads, the dials it asks for, their outcomes, and how the run ended.

use crate::spec::DialSpec;

/// The facts of one call, as the script sees them (`invite.from`, `invite.user` …).
#[derive(Clone, Debug, Default)]
pub struct Call {
    /// The From URI.
    pub from: String,
    /// The From URI's user part.
    pub from_user: String,
    /// The From display name, empty if none.
    pub from_name: String,
    /// The To URI.
    pub to: String,
    /// The To URI's user part.
    pub to_user: String,
    /// The Request-URI.
    pub ruri: String,
    /// The Request-URI's user part: the number dialled.
    pub user: String,
    /// The Request-URI's host.
    pub host: String,
    /// Where the request came from, `ip:port`.
    pub source: String,
    /// The source's IP address alone.
    pub source_ip: String,
    /// The account whose dialplan runs, `user@domain`.
    pub account: String,
    /// The customer the account belongs to.
    pub customer: String,
    /// `outbound` (from one of the customer's phones), `inbound` (from a provider or a
    /// trunk, to one of the customer's numbers) or `local` (to the account itself).
    pub direction: String,
    /// The request's headers, name and value, in order; `header(name)` reads them.
    pub headers: Vec<(String, String)>,
    /// The customer's IANA time zone (`Europe/Berlin`); UTC if empty or unknown.
    pub time_zone: String,
    /// Now, in milliseconds since the Unix epoch, from the node's clock: scripts have no
    /// clock of their own.
    pub now_ms: i64,
}

/// The caller ID a script set for the legs it dials next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerId {
    pub number: String,
    pub name: Option<String>,
}

/// One `dial()` as the node must carry it out.
#[derive(Clone, Debug)]
pub struct DialRequest {
    /// The spec as the script wrote it, for traces.
    pub text: String,
    pub spec: DialSpec,
    /// Headers to add to every leg (`set_header`), validated.
    pub headers: Vec<(String, String)>,
    /// The caller ID for every leg (`set_caller_id`), validated.
    pub caller_id: Option<CallerId>,
}

/// How a dial ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialOutcome {
    /// A leg answered and the call is now connected to `target`. The run ends here.
    Answered { target: String },
    /// Every leg tried was busy (486, 600).
    Busy { code: u16, reason: String },
    /// No leg answered within its ringing time (408, 480, 487 after our timeout).
    NoAnswer,
    /// Every leg failed otherwise: the best final code seen, and its reason.
    Failed { code: u16, reason: String },
    /// The caller hung up while the dial rang. The run ends here.
    CallerGone,
}

impl DialOutcome {
    /// The word a script sees in `result`.
    pub fn result(&self) -> &'static str {
        match self {
            DialOutcome::Answered { .. } => "answered",
            DialOutcome::Busy { .. } => "busy",
            DialOutcome::NoAnswer => "no answer",
            DialOutcome::Failed { .. } => "failed",
            DialOutcome::CallerGone => "caller gone",
        }
    }

    /// The SIP code a script sees in `code`.
    pub fn code(&self) -> u16 {
        match self {
            DialOutcome::Answered { .. } => 200,
            DialOutcome::Busy { code, .. } | DialOutcome::Failed { code, .. } => *code,
            DialOutcome::NoAnswer => 480,
            DialOutcome::CallerGone => 487,
        }
    }

    /// The reason phrase a script sees in `reason`.
    pub fn reason(&self) -> &str {
        match self {
            DialOutcome::Answered { .. } => "OK",
            DialOutcome::Busy { reason, .. } | DialOutcome::Failed { reason, .. } => reason,
            DialOutcome::NoAnswer => "Temporarily Unavailable",
            DialOutcome::CallerGone => "Request Terminated",
        }
    }
}

/// Carries out what a script asks for. A run calls it on the run's own thread and waits:
/// the node's implementation hands the dial to its async side and blocks until the
/// outcome. Time spent here does not count against the run's time limit; the spec's
/// ringing times bound it.
pub trait Host: Send + Sync {
    fn dial(&self, request: DialRequest) -> DialOutcome;

    /// Starts a callback (`callback(a, b)`): the node calls `a`, then `b`, and connects
    /// them, on its own, apart from this call. Returns the callback's id at once, or why
    /// it was not started. Both specs are parsed already.
    fn callback(&self, a: &str, b: &str) -> Result<String, String> {
        let _ = (a, b);
        Err("callbacks are not available here".into())
    }
}

/// How a run ended, when it did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// A dial answered: the call is connected to `target`.
    Connected { target: String },
    /// The script called `respond(code, reason)`: the caller gets that final response.
    Responded { code: u16, reason: String },
    /// The caller hung up during a dial.
    CallerGone,
    /// The script ran to its end without connecting or responding. `last_dial` is the
    /// outcome of its last dial, if it made one; the node answers the caller from it (a
    /// busy dial ends in 486, no dial at all in 404).
    Ended { last_dial: Option<DialOutcome> },
}
