//! The sandbox: one rhai engine for every script, configured so that a script can compute
//! and call the functions below and nothing else, and hard limits on every run.
//!
//! A run happens on the caller's thread, synchronously: the node gives it a blocking
//! thread. The per-run state (the call's facts, the host, the trace, the deadline) lives
//! in a thread-local for the length of the run, so the engine and its registered
//! functions are built once and shared by every run and every thread; a guard clears it
//! however the run ends.
//!
//! What a script cannot do, and why it cannot:
//! - I/O: rhai itself has none; `import` is compiled out (feature `no_module`), `eval` is
//!   disabled, `print` and `debug` go to the run's trace, and the clock functions are
//!   compiled out (`no_time`): the time helpers read the node's clock through the facts.
//! - Run for ever: the operation limit, and the wall-clock limit checked from rhai's
//!   progress callback every 64 operations (time inside `dial()` is not counted).
//! - Take memory without bound: string, array and map sizes (rhai adds up nested
//!   containers), the number of variables and functions, call and expression depth, and
//!   the bytes the run's thread holds, counted by the allocator (meter.rs) and checked
//!   with the time every 64 operations.
//! - Catch its way out: rhai's `try`/`catch` does not catch a limit or a termination, and
//!   `respond()` or an answered dial end the run as a termination.
//! - Panic the node: every run is inside `catch_unwind`, and reports an internal error if
//!   the interpreter ever panicked.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rhai::{Dynamic, Engine, EvalAltResult, Map, Position, Scope, AST};
use tokio::time::Instant;

use crate::call::{Call, CallerId, DialOutcome, DialRequest, Ending, Host};
use crate::limits::Limits;
use crate::{clock, meter, spec, Error};

/// A compiled script, shared by every run of it.
#[derive(Clone)]
pub struct Script {
    ast: Arc<AST>,
    /// The SHA-256 of the source: the cache key.
    pub hash: [u8; 32],
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hash: String = self.hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "Script({hash}…)")
    }
}

/// What one run produced: its ending or its error, and its trace either way.
#[derive(Debug)]
pub struct Run {
    pub result: Result<Ending, Error>,
    /// The script's `log()` and `print()` lines, then a line for how the run ended if it
    /// failed; bounded by [`Limits::max_trace_lines`].
    pub trace: Vec<String>,
}

/// The shared engine, its cache of compiled scripts and the counts of runs in progress.
pub struct Sandbox {
    engine: Engine,
    limits: Limits,
    cache: Mutex<HashMap<[u8; 32], Arc<AST>>>,
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    total: u32,
    per_account: HashMap<String, u32>,
    /// The script time accounts may still use, for those that used some lately.
    budgets: HashMap<String, Budget>,
}

/// Budgets kept before the full ones are dropped.
const MAX_BUDGETS: usize = 4096;

/// One account's script time: a token bucket that holds up to one second's worth of
/// [`Limits::run_time_per_second`] and refills at that rate. A run is charged after it
/// ends, so the bucket can go below zero (one long run's debt); no run starts until it is
/// above zero again.
#[derive(Clone, Copy, Debug)]
struct Budget {
    /// Microseconds left (negative: owed).
    left_us: i64,
    at: Instant,
}

impl Budget {
    fn refilled(self, per_second: Duration, now: Instant) -> Budget {
        let cap = i64::try_from(per_second.as_micros()).unwrap_or(i64::MAX);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let gained = (elapsed * cap as f64) as i64;
        Budget {
            left_us: self.left_us.saturating_add(gained).min(cap),
            at: now,
        }
    }

    fn full(self, per_second: Duration) -> bool {
        self.left_us >= i64::try_from(per_second.as_micros()).unwrap_or(i64::MAX)
    }
}

/// The names of the per-run values a termination carries, to tell them apart.
const RESPONDED: &str = "tandem:responded";
const CONNECTED: &str = "tandem:connected";
const CALLER_GONE: &str = "tandem:caller-gone";
const OUT_OF_TIME: &str = "tandem:time";
const OUT_OF_MEMORY: &str = "tandem:memory";

/// Headers a script may not set: the B2BUA writes these itself, and a script that set
/// them could break the dialog or route a leg elsewhere.
const RESERVED_HEADERS: &[&str] = &[
    "via",
    "v",
    "from",
    "f",
    "to",
    "t",
    "call-id",
    "i",
    "cseq",
    "contact",
    "m",
    "content-length",
    "l",
    "content-type",
    "c",
    "content-encoding",
    "e",
    "max-forwards",
    "route",
    "record-route",
    "path",
    "authorization",
    "proxy-authorization",
    "www-authenticate",
    "proxy-authenticate",
    "proxy-require",
    "require",
    "supported",
    "k",
    "session-expires",
    "x",
    "min-se",
    "expires",
    "allow",
    "event",
    "o",
    "refer-to",
    "r",
];

/// The per-run state the registered functions read and write.
struct RunState {
    host: Arc<dyn Host>,
    facts: Arc<Call>,
    limits: Limits,
    trace: Vec<String>,
    dropped_lines: usize,
    headers: Vec<(String, String)>,
    caller_id: Option<CallerId>,
    dials: u32,
    /// Whether the run started its callback (one per run).
    called_back: bool,
    last_dial: Option<DialOutcome>,
    ending: Option<Ending>,
    /// When the run's time is up; moved on by the time spent in `dial()`.
    deadline: Instant,
    /// The thread's memory count when the run began (see meter.rs).
    memory_base: i64,
}

thread_local! {
    static RUN: RefCell<Option<RunState>> = const { RefCell::new(None) };
}

/// Clears the thread's run state however the run ends, returning what is left of it.
struct RunGuard;

impl RunGuard {
    fn install(state: RunState) -> RunGuard {
        RUN.with(|r| *r.borrow_mut() = Some(state));
        RunGuard
    }

    fn take(self) -> Option<RunState> {
        RUN.with(|r| r.borrow_mut().take())
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        RUN.with(|r| r.borrow_mut().take());
    }
}

/// Runs `f` on this thread's run state. Outside a run (a registered function called
/// from a test engine) it reports a script error instead.
fn with_run<T>(f: impl FnOnce(&mut RunState) -> T) -> Result<T, Box<EvalAltResult>> {
    RUN.with(|r| match r.borrow_mut().as_mut() {
        Some(state) => Ok(f(state)),
        None => Err("this function works only inside a dialplan run".into()),
    })
}

/// Ends the run now with `what` (one of the tokens above); not catchable by the script.
fn terminate(what: &str) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorTerminated(
        Dynamic::from(what.to_owned()),
        Position::NONE,
    ))
}

impl Sandbox {
    pub fn new(limits: Limits) -> Sandbox {
        Sandbox {
            engine: build_engine(&limits),
            limits,
            cache: Mutex::new(HashMap::new()),
            running: Mutex::new(Running::default()),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles `source`, or says what is wrong and where (line and column, 1-based).
    /// A script already compiled is taken from the cache by its SHA-256.
    pub fn compile(&self, source: &str) -> Result<Script, Error> {
        if source.len() > self.limits.max_script_bytes {
            return Err(Error::Compile {
                line: 0,
                column: 0,
                message: format!(
                    "the script is {} bytes, more than the {} allowed",
                    source.len(),
                    self.limits.max_script_bytes
                ),
            });
        }
        let hash: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, source.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(ast) = self.cache.lock().expect("cache lock").get(&hash) {
            return Ok(Script {
                ast: ast.clone(),
                hash,
            });
        }
        // `invite` is declared for the strict-variables check, as a variable: a constant
        // here would be folded into the script with the empty value of the placeholder.
        let mut scope = Scope::new();
        scope.push("invite", Map::new());
        let ast = self
            .engine
            .compile_with_scope(&scope, source)
            .map_err(|e| {
                let p = e.position();
                Error::Compile {
                    line: p.line().unwrap_or(0),
                    column: p.position().unwrap_or(0),
                    message: e.err_type().to_string(),
                }
            })?;
        let ast = Arc::new(ast);
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= self.limits.max_cached_scripts {
            // Scripts change rarely; when the cache is full, start again rather than
            // track use. Each script is compiled again on its next run.
            cache.clear();
        }
        cache.insert(hash, ast.clone());
        Ok(Script { ast, hash })
    }

    /// Runs `script` for `call`, dialling through `host`. Refused with [`Error::Busy`]
    /// if the account already has its limit of runs going, or the node its total, and
    /// with [`Error::OverBudget`] if the account used its script time for now.
    pub fn run(&self, script: &Script, call: Call, host: Arc<dyn Host>) -> Run {
        let account = call.account.clone();
        let _slot = match self.acquire(&account) {
            Ok(slot) => slot,
            Err(e) => {
                return Run {
                    result: Err(e),
                    trace: Vec::new(),
                }
            }
        };
        let facts = Arc::new(call);
        let mut scope = new_scope(&facts);
        let guard = RunGuard::install(RunState {
            host,
            facts,
            limits: self.limits.clone(),
            trace: Vec::new(),
            dropped_lines: 0,
            headers: Vec::new(),
            caller_id: None,
            dials: 0,
            called_back: false,
            last_dial: None,
            ending: None,
            deadline: Instant::now() + self.limits.max_run_time,
            memory_base: meter::thread_net_bytes(),
        });
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.engine.run_ast_with_scope(&mut scope, &script.ast)
        }));
        let mut state = guard.take().expect("the run's state is still installed");
        // Script time: the wall time less the time inside dial(), by which the deadline
        // moved on.
        let left = state.deadline.saturating_duration_since(Instant::now());
        self.charge(&account, self.limits.max_run_time.saturating_sub(left));
        let result = match outcome {
            Ok(Ok(())) => Ok(Ending::Ended {
                last_dial: state.last_dial.take(),
            }),
            Ok(Err(e)) => match state.ending.take() {
                // respond(), an answered dial or a caller gone ended the run.
                Some(ending) if is_our_termination(&e) => Ok(ending),
                _ => Err(classify(*e)),
            },
            Err(_) => Err(Error::Internal(
                "the script engine panicked; the run was stopped".to_owned(),
            )),
        };
        if let Err(e) = &result {
            push_line(&mut state, format!("run stopped: {e}"));
        }
        if state.dropped_lines > 0 {
            let n = state.dropped_lines;
            state
                .trace
                .push(format!("({n} more lines were dropped: the trace is full)"));
        }
        Run {
            result,
            trace: state.trace,
        }
    }

    /// Takes a run slot for `account`, or says which limit is reached.
    fn acquire(&self, account: &str) -> Result<Slot<'_>, Error> {
        let mut running = self.running.lock().expect("running lock");
        if running.total >= self.limits.max_runs {
            return Err(Error::NodeBusy {
                limit: self.limits.max_runs,
            });
        }
        let per_second = self.limits.run_time_per_second;
        if let Some(b) = running.budgets.get_mut(account) {
            *b = b.refilled(per_second, Instant::now());
            if b.left_us <= 0 && !per_second.is_zero() {
                return Err(Error::OverBudget {
                    account: account.to_owned(),
                    per_second_ms: u64::try_from(per_second.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
        let n = running.per_account.entry(account.to_owned()).or_default();
        if *n >= self.limits.max_runs_per_account {
            return Err(Error::Busy {
                account: account.to_owned(),
                limit: self.limits.max_runs_per_account,
            });
        }
        *n += 1;
        running.total += 1;
        Ok(Slot {
            sandbox: self,
            account: account.to_owned(),
        })
    }

    /// Charges `spent` script time to `account`'s budget.
    fn charge(&self, account: &str, spent: Duration) {
        let per_second = self.limits.run_time_per_second;
        if per_second.is_zero() || spent.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut running = self.running.lock().expect("running lock");
        if running.budgets.len() >= MAX_BUDGETS && !running.budgets.contains_key(account) {
            running
                .budgets
                .retain(|_, b| !b.refilled(per_second, now).full(per_second));
        }
        let spent = i64::try_from(spent.as_micros()).unwrap_or(i64::MAX);
        let charged = |b: Budget| {
            let mut b = b.refilled(per_second, now);
            b.left_us = b.left_us.saturating_sub(spent);
            b
        };
        // The account's name is copied only for its first charge.
        if let Some(b) = running.budgets.get_mut(account) {
            *b = charged(*b);
        } else {
            let full = Budget {
                left_us: i64::MAX,
                at: now,
            };
            running.budgets.insert(account.to_owned(), charged(full));
        }
    }

    /// How many runs are in progress, in all and for `account`.
    pub fn running(&self, account: &str) -> (u32, u32) {
        let running = self.running.lock().expect("running lock");
        (
            running.total,
            running.per_account.get(account).copied().unwrap_or(0),
        )
    }
}

/// A run slot; given back on drop.
struct Slot<'a> {
    sandbox: &'a Sandbox,
    account: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut running = self.sandbox.running.lock().expect("running lock");
        running.total -= 1;
        if let Some(n) = running.per_account.get_mut(&self.account) {
            *n -= 1;
            if *n == 0 {
                running.per_account.remove(&self.account);
            }
        }
    }
}

/// The scope every run starts with: the call's facts as the constant `invite` (`call` is
/// a reserved word in rhai).
fn new_scope(facts: &Call) -> Scope<'static> {
    let mut call = Map::new();
    for (k, v) in [
        ("from", &facts.from),
        ("from_user", &facts.from_user),
        ("from_name", &facts.from_name),
        ("to", &facts.to),
        ("to_user", &facts.to_user),
        ("ruri", &facts.ruri),
        ("user", &facts.user),
        ("host", &facts.host),
        ("source", &facts.source),
        ("source_ip", &facts.source_ip),
        ("account", &facts.account),
        ("customer", &facts.customer),
        ("direction", &facts.direction),
    ] {
        call.insert(k.into(), v.clone().into());
    }
    let mut scope = Scope::new();
    scope.push_constant("invite", call);
    scope
}

fn is_our_termination(e: &EvalAltResult) -> bool {
    match e {
        EvalAltResult::ErrorTerminated(token, _) => token
            .clone()
            .into_string()
            .is_ok_and(|t| [RESPONDED, CONNECTED, CALLER_GONE].contains(&t.as_str())),
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => is_our_termination(inner),
        _ => false,
    }
}

/// The crate error for an error that ended a run, with the script position if known.
fn classify(e: EvalAltResult) -> Error {
    let position = e.position();
    match e {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => classify(*inner),
        EvalAltResult::ErrorTooManyOperations(_) => Error::Limit {
            limit: "operations",
        },
        EvalAltResult::ErrorTooManyVariables(_) => Error::Limit { limit: "variables" },
        EvalAltResult::ErrorStackOverflow(_) => Error::Limit {
            limit: "call depth",
        },
        EvalAltResult::ErrorDataTooLarge(what, _) => Error::Limit {
            limit: match what.to_ascii_lowercase() {
                w if w.contains("array") => "array size",
                w if w.contains("map") => "map size",
                w if w.contains("string") => "string size",
                _ => "data size",
            },
        },
        EvalAltResult::ErrorTerminated(token, _)
            if token.clone().into_string().is_ok_and(|t| t == OUT_OF_TIME) =>
        {
            Error::Limit { limit: "time" }
        }
        EvalAltResult::ErrorTerminated(token, _)
            if token
                .clone()
                .into_string()
                .is_ok_and(|t| t == OUT_OF_MEMORY) =>
        {
            Error::Limit { limit: "memory" }
        }
        other => Error::Script {
            line: position.line().unwrap_or(0),
            column: position.position().unwrap_or(0),
            message: other.to_string(),
        },
    }
}

/// Appends a trace line, truncated, or counts it as dropped once the trace is full.
fn push_line(state: &mut RunState, mut line: String) {
    if state.trace.len() >= state.limits.max_trace_lines {
        state.dropped_lines += 1;
        return;
    }
    if line.len() > state.limits.max_trace_line {
        let mut cut = state.limits.max_trace_line;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    state.trace.push(line);
}

fn build_engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_depth);
    engine.set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth / 2);
    engine.set_max_string_size(limits.max_string_size);
    engine.set_max_array_size(limits.max_array_size);
    engine.set_max_map_size(limits.max_map_size);
    engine.set_max_variables(limits.max_variables);
    engine.set_max_functions(limits.max_functions);
    engine.set_strict_variables(true);
    engine.disable_symbol("eval");
    engine.on_progress(|ops| {
        if ops % 64 != 0 {
            return None;
        }
        RUN.with(|r| {
            let r = r.borrow();
            let s = r.as_ref()?;
            if meter::thread_net_bytes() - s.memory_base > s.limits.max_memory_bytes {
                Some(Dynamic::from(OUT_OF_MEMORY.to_owned()))
            } else if Instant::now() >= s.deadline {
                Some(Dynamic::from(OUT_OF_TIME.to_owned()))
            } else {
                None
            }
        })
    });
    engine.on_print(|text| {
        let _ = with_run(|s| push_line(s, text.to_owned()));
    });
    engine.on_debug(|text, _, pos| {
        let _ = with_run(|s| push_line(s, format!("{text} (line {})", pos.line().unwrap_or(0))));
    });

    engine.register_fn("log", |value: Dynamic| -> Result<(), Box<EvalAltResult>> {
        let text = if value.is_string() {
            value.into_string().unwrap_or_default()
        } else {
            value.to_string()
        };
        with_run(|s| push_line(s, text))
    });
    engine.register_fn(
        "header",
        |name: &str| -> Result<String, Box<EvalAltResult>> {
            with_run(|s| {
                s.facts
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            })
        },
    );
    engine.register_fn(
        "has_header",
        |name: &str| -> Result<bool, Box<EvalAltResult>> {
            with_run(|s| {
                s.facts
                    .headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case(name))
            })
        },
    );
    engine.register_fn(
        "set_header",
        |name: &str, value: &str| -> Result<(), Box<EvalAltResult>> {
            check_header(name, value)?;
            with_run(|s| -> Result<(), Box<EvalAltResult>> {
                s.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                if s.headers.len() >= s.limits.max_set_headers {
                    return Err(format!(
                        "set_header: at most {} headers may be set",
                        s.limits.max_set_headers
                    )
                    .into());
                }
                s.headers.push((name.to_owned(), value.to_owned()));
                Ok(())
            })?
        },
    );
    engine.register_fn("set_caller_id", |number: &str| set_caller_id(number, None));
    engine.register_fn("set_caller_id", |number: &str, name: &str| {
        set_caller_id(number, Some(name))
    });
    engine.register_fn(
        "respond",
        |code: i64, reason: &str| -> Result<(), Box<EvalAltResult>> { respond(code, reason) },
    );
    engine.register_fn("respond", |code: i64| -> Result<(), Box<EvalAltResult>> {
        respond(code, "")
    });
    engine.register_fn("dial", |text: &str| -> Result<Map, Box<EvalAltResult>> {
        dial(text)
    });
    engine.register_fn(
        "callback",
        |a: &str, b: &str| -> Result<Map, Box<EvalAltResult>> { callback(a, b) },
    );

    engine.register_fn("hour", || -> Result<i64, Box<EvalAltResult>> {
        with_run(|s| clock::local(&s.facts).hour)
    });
    engine.register_fn("minute", || -> Result<i64, Box<EvalAltResult>> {
        with_run(|s| clock::local(&s.facts).minute)
    });
    engine.register_fn("weekday", || -> Result<String, Box<EvalAltResult>> {
        with_run(|s| clock::local(&s.facts).weekday.to_owned())
    });
    engine.register_fn("day_of_week", || -> Result<i64, Box<EvalAltResult>> {
        with_run(|s| clock::local(&s.facts).day_of_week)
    });
    engine.register_fn("date", || -> Result<String, Box<EvalAltResult>> {
        with_run(|s| clock::local(&s.facts).date.clone())
    });
    engine.register_fn("is_weekend", || -> Result<bool, Box<EvalAltResult>> {
        with_run(|s| clock::local(&s.facts).day_of_week >= 6)
    });
    engine.register_fn(
        "time_between",
        |from: &str, to: &str| -> Result<bool, Box<EvalAltResult>> {
            let from = clock::parse_hhmm(from).map_err(|e| format!("time_between: {e}"))?;
            let to = clock::parse_hhmm(to).map_err(|e| format!("time_between: {e}"))?;
            with_run(|s| {
                let now = clock::local(&s.facts);
                clock::between(now.hour * 60 + now.minute, from, to)
            })
        },
    );
    engine
}

fn check_header(name: &str, value: &str) -> Result<(), Box<EvalAltResult>> {
    let token = |c: u8| c.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&c);
    if name.is_empty() || name.len() > 64 || !name.bytes().all(token) {
        return Err(format!("set_header: '{name}' is not a header name").into());
    }
    if RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(format!("set_header: {name} is set by the node, not by a script").into());
    }
    if value.len() > 512 || value.bytes().any(|c| c.is_ascii_control() && c != b'\t') {
        return Err(format!(
            "set_header: the value of {name} must be at most 512 bytes without line breaks or control characters"
        )
        .into());
    }
    Ok(())
}

fn set_caller_id(number: &str, name: Option<&str>) -> Result<(), Box<EvalAltResult>> {
    let number_ok = !number.is_empty()
        && number.len() <= 32
        && number
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+*#-_.".contains(&c));
    if !number_ok {
        return Err(format!(
            "set_caller_id: '{number}' is not a number (up to 32 of 0-9 A-Z a-z + * # - _ .)"
        )
        .into());
    }
    if let Some(name) = name {
        if name.chars().count() > 64
            || name
                .chars()
                .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            return Err(
                "set_caller_id: a name is at most 64 characters, without quotes, backslashes or control characters"
                    .into(),
            );
        }
    }
    with_run(|s| {
        s.caller_id = Some(CallerId {
            number: number.to_owned(),
            name: name.filter(|n| !n.is_empty()).map(str::to_owned),
        });
    })
}

fn respond(code: i64, reason: &str) -> Result<(), Box<EvalAltResult>> {
    if !(400..=699).contains(&code) {
        return Err(format!("respond: {code} is not a final error code (400 to 699)").into());
    }
    if reason.len() > 64 || reason.chars().any(|c| c.is_control()) {
        return Err("respond: a reason is at most 64 bytes, without control characters".into());
    }
    with_run(|s| {
        s.ending = Some(Ending::Responded {
            code: code as u16,
            reason: reason.to_owned(),
        });
    })?;
    Err(terminate(RESPONDED))
}

/// `callback(a, b)`: one per run; the specs are checked as `dial()` checks its own.
fn callback(a: &str, b: &str) -> Result<Map, Box<EvalAltResult>> {
    for text in [a, b] {
        spec::parse(text).map_err(|e| -> Box<EvalAltResult> { e.into() })?;
    }
    let host = with_run(|s| -> Result<_, Box<EvalAltResult>> {
        if s.called_back {
            return Err("callback: at most one per run".into());
        }
        s.called_back = true;
        push_line(s, format!("callback {a} then {b}"));
        Ok(s.host.clone())
    })??;
    let started = host.callback(a, b);
    let mut map = Map::new();
    map.insert("started".into(), started.is_ok().into());
    match started {
        Ok(id) => {
            map.insert("id".into(), id.into());
        }
        Err(why) => {
            with_run(|s| push_line(s, format!("callback not started: {why}")))?;
            map.insert("reason".into(), why.into());
        }
    }
    Ok(map)
}

fn dial(text: &str) -> Result<Map, Box<EvalAltResult>> {
    let parsed = spec::parse(text).map_err(|e| -> Box<EvalAltResult> { e.into() })?;
    let (host, request) = with_run(|s| -> Result<_, Box<EvalAltResult>> {
        if s.dials >= s.limits.max_dials {
            return Err(format!("dial: at most {} dials per run", s.limits.max_dials).into());
        }
        s.dials += 1;
        push_line(s, format!("dial {text}"));
        Ok((
            s.host.clone(),
            DialRequest {
                text: text.to_owned(),
                spec: parsed,
                headers: s.headers.clone(),
                caller_id: s.caller_id.clone(),
            },
        ))
    })??;
    let started = Instant::now();
    let outcome = host.dial(request);
    let spent = started.elapsed();
    let mut map = Map::new();
    map.insert("result".into(), outcome.result().into());
    map.insert("code".into(), i64::from(outcome.code()).into());
    map.insert("reason".into(), outcome.reason().to_owned().into());
    let end = with_run(|s| {
        s.deadline += spent.min(Duration::from_secs(3600));
        push_line(
            s,
            format!("dial {text}: {} {}", outcome.code(), outcome.result()),
        );
        match &outcome {
            DialOutcome::Answered { target } => {
                s.ending = Some(Ending::Connected {
                    target: target.clone(),
                });
                Some(CONNECTED)
            }
            DialOutcome::CallerGone => {
                s.ending = Some(Ending::CallerGone);
                Some(CALLER_GONE)
            }
            _ => {
                s.last_dial = Some(outcome.clone());
                None
            }
        }
    })?;
    match end {
        Some(token) => Err(terminate(token)),
        None => Ok(map),
    }
}
