//! The `tandem` binary: parse the command line, load and validate config (exit 64 when it
//! is invalid), set up logging, and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use tandem_node::{
    cert, init_logging, keygen, load_config, run_operator_command, run_until_signal, Cli, Command,
    Config, Error, EXIT_CONFIG,
};

/// mimalloc, not glibc's malloc: a node allocates and frees small buffers for every
/// message, and with glibc that was a quarter of its CPU time per registration. With
/// mimalloc a registration cost 48–54 µs of CPU instead of 68–73 µs (BENCHMARKS.md).
/// Wrapped in the dialplan sandbox's memory meter, which counts each thread's bytes so
/// that a script run can be stopped at its memory limit (dialplan/src/meter.rs).
#[global_allocator]
static ALLOCATOR: tandem_dialplan::Metered<mimalloc::MiMalloc> =
    tandem_dialplan::Metered(mimalloc::MiMalloc);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, run) = match cli.command {
        Command::Version => {
            println!("tandem {}", tandem_node::version());
            return ExitCode::SUCCESS;
        }
        Command::Keygen { out } => return report(keygen(&out)),
        Command::Cert(command) => return report(cert(&command)),
        Command::CheckConfig { file } => (Some(file), false),
        Command::Run { config } => (config, true),
        operator_command => return operator(operator_command),
    };
    let Some(config) = config_or_report(path.as_deref()) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    if !run {
        println!(
            "{}: configuration is valid",
            path.unwrap_or_default().display()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log);
    no_transparent_huge_pages();
    fixed_mmap_threshold();
    let Some(runtime) = runtime(config.node.runtime_threads) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(run_until_signal(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tandem stopped with an error");
            eprintln!("tandem: {e}");
            // A config value found wrong only at start (a token file others may read)
            // exits as an invalid config does.
            match e {
                Error::Config { .. } => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Keeps a running node's memory in 4 KiB pages. mimalloc asks for transparent huge pages
/// on its arena, and the kernel then backs it in 2 MiB pages: resident memory grows by a
/// whole huge page whenever one object lands in a fresh one, and mimalloc cannot return a
/// freed page of its own (64 KiB) inside one. A node's heap is many small, long-lived
/// objects, so at 100,000 AORs huge pages cost about 14 MB at rest and about 90 bytes per
/// AOR, for no CPU gain measured in the registration storm (BENCHMARKS.md, "Resident
/// memory per registered AOR"). The flag is the process's (and a child's, were the node
/// ever to start one).
fn no_transparent_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off; resident memory will be higher");
    }
}

/// Keeps glibc's malloc, which RocksDB's C++ code allocates from (the Rust side uses
/// mimalloc), from holding on to memory RocksDB has freed. RocksDB allocates its memtables
/// in blocks of a megabyte or two and frees them when a memtable is flushed. glibc serves
/// such blocks with mmap and returns them on free, but raises its mmap threshold to the
/// size of each block freed that way, so from the first flush on the blocks come from its
/// heaps instead, between the block cache's small blocks, where what a flush frees can
/// stay resident. Setting the threshold, here to glibc's own starting value, turns that
/// adjustment off: a node's memory then follows its memtables down as well as up
/// (BENCHMARKS.md, "Resident memory per registered AOR").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fixed_mmap_threshold() {
    const THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only sets a parameter of the allocator; it is called before the
    // runtime and RocksDB start any thread.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) } != 1 {
        tracing::warn!("could not fix malloc's mmap threshold; resident memory may creep");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_mmap_threshold() {}

/// Runs an operator command (`cluster`, `keys`, `account`, `node`) with the config it
/// names.
fn operator(command: Command) -> ExitCode {
    let Some(path) = command.config_file() else {
        eprintln!("tandem: {command:?} takes no config file");
        return ExitCode::FAILURE;
    };
    let Some(config) = config_or_report(Some(&path)) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    // Raft's own chatter is not for the operator at a terminal; warnings still show.
    let mut quiet = config.log.clone();
    quiet.filter = "warn".into();
    init_logging(&quiet);
    let Some(runtime) = runtime(1) else {
        return ExitCode::FAILURE;
    };
    report(runtime.block_on(run_operator_command(&command, &config)))
}

/// The validated config, or `None` after printing every problem with it.
fn config_or_report(path: Option<&std::path::Path>) -> Option<Config> {
    match load_config(path) {
        Ok(c) => Some(c),
        Err(problems) => {
            for p in problems {
                eprintln!("tandem: invalid configuration: {p}");
            }
            None
        }
    }
}

/// The tokio runtime with `threads` workers (0: one per core), or `None` (with the reason
/// printed). The multi-threaded scheduler even with one worker: tasks then run on that
/// worker, never on the thread blocked in `block_on`.
fn runtime(threads: u16) -> Option<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(usize::from(threads));
    }
    match builder.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("tandem: cannot start the async runtime: {e}");
            None
        }
    }
}

/// Prints a provisioning command's report, or its error on one line.
fn report(result: Result<String, Error>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::FAILURE
        }
    }
}
