//! The limits of every run. The defaults let a dialplan of a few hundred lines do its
//! work many times over and stop a runaway one within milliseconds; the node's
//! `[dialplan]` config may change them.

use std::time::Duration;

/// Hard limits on each run, and on how many run at once.
#[derive(Clone, Debug)]
pub struct Limits {
    /// rhai operations per run (a simple dialplan uses about a hundred).
    pub max_operations: u64,
    /// Script time per run, time inside `dial()` not counted.
    pub max_run_time: Duration,
    /// Nested function calls.
    pub max_call_depth: usize,
    /// Nesting of expressions and blocks at the top level (half that inside functions).
    pub max_expr_depth: usize,
    /// Bytes in one string, and in all the strings inside one array or map.
    pub max_string_size: usize,
    /// Bytes a run may hold at once, as the memory meter counts them (see meter.rs); the
    /// size limits below catch most growth earlier, this catches the rest.
    pub max_memory_bytes: i64,
    /// Elements of one array, nested arrays included.
    pub max_array_size: usize,
    /// Properties of one map, nested maps included.
    pub max_map_size: usize,
    /// Variables alive at once.
    pub max_variables: usize,
    /// Functions a script may define.
    pub max_functions: usize,
    /// Bytes of script source.
    pub max_script_bytes: usize,
    /// `dial()` calls per run.
    pub max_dials: u32,
    /// Headers `set_header` may add.
    pub max_set_headers: usize,
    /// Lines kept in a run's trace, and bytes per line.
    pub max_trace_lines: usize,
    pub max_trace_line: usize,
    /// Runs of one account at once; more are refused.
    pub max_runs_per_account: u32,
    /// Script time one account's runs may use per second, on average (zero: no bound).
    /// An account that used more is refused runs until it is back within it, so a
    /// dialplan that loops until its time limit on every call costs the node this much
    /// of a core, however often it is called.
    pub run_time_per_second: Duration,
    /// Runs on the node at once; more are refused.
    pub max_runs: u32,
    /// Compiled scripts kept.
    pub max_cached_scripts: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_operations: 100_000,
            max_run_time: Duration::from_millis(100),
            max_call_depth: 16,
            max_expr_depth: 32,
            max_memory_bytes: 1 << 20,
            max_string_size: 4096,
            max_array_size: 1024,
            max_map_size: 256,
            max_variables: 128,
            max_functions: 64,
            max_script_bytes: 64 * 1024,
            max_dials: 8,
            max_set_headers: 16,
            max_trace_lines: 64,
            max_trace_line: 300,
            max_runs_per_account: 10,
            run_time_per_second: Duration::from_millis(200),
            max_runs: 256,
            max_cached_scripts: 4096,
        }
    }
}
