//! The `curec` command line: `main` sets up the process (signals, threads, allocator, logging),
//! parses the arguments ([`cli::args`]) and runs the command ([`cli::dispatch`]); any error is
//! printed as one line and the exit status is non-zero.

mod cli;

use std::process::ExitCode;

use clap::Parser;

// glibc malloc spent 40-50% of wall time in sys calls during CPU training; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `curec … | head` closes stdout early: die quietly as other Unix tools do, instead of
    // panicking in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // candle asks for its thread count at every matmul and, unless RAYON_NUM_THREADS is set,
    // answers by reading /proc/cpuinfo each time (a third of a small request's CPU in `curec
    // serve`). Ask once, before any thread starts, and pin the same answer.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    curec::alloc::tune();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CUREC_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: CI logs and files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .without_time()
        .init();
    let cli = match cli::args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // A bad flag: clap's first line (it names the flag, the value and what was expected),
            // like every other error, without the usage block.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    match cli::dispatch::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
