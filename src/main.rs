//! `contacts-etl` binary: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use contacts_etl::app::Outcome;
use contacts_etl::cli::{self, Cli, Command};

/// jemalloc, because it hands freed memory back to the OS: with glibc's malloc the exporter's
/// resident memory crept up with the size of the location (freed row-group buffers stayed
/// mapped); with jemalloc it stays flat (BENCHMARKS.md, "Memory").
#[cfg(unix)]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (tikv-jemalloc-sys's `malloc_conf`, under its symbol
/// prefix): freed pages go back to the OS after half a second instead of ten, and directly,
/// not as lazily reclaimed MADV_FREE pages that still count as resident. No measurable CPU
/// cost here; `_RJEM_MALLOC_CONF` in the environment overrides it.
#[cfg(unix)]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: Option<&'static u8> = Some(&b"dirty_decay_ms:500,muzzy_decay_ms:0\0"[0]);

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli);
    // The client side is I/O-bound and runs on one thread: the CPU work (decoding into
    // columns, compression) has its own writer thread, and a single-threaded runtime avoids
    // the cross-thread wake-ups that dominate CPU time when requests are paced. The simulator
    // (alone or in the demo) and the webhook receiver serve many connections and get the
    // multi-threaded runtime.
    let mut builder = match cli.command {
        Command::Sim(_) | Command::Demo(_) | Command::Listen(_) => {
            tokio::runtime::Builder::new_multi_thread()
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let outcome = match builder.enable_all().build() {
        Ok(rt) => rt.block_on(cli::dispatch(&cli)),
        Err(e) => Outcome::from(anyhow::Error::from(e).context("cannot start the async runtime")),
    };
    if let Outcome::Failed(_, err) = &outcome {
        if is_broken_pipe(err) {
            return ExitCode::SUCCESS;
        }
    }
    if let Some(message) = outcome.message() {
        // Complete but for the listed records: a warning, with its own exit code.
        let level = match outcome {
            Outcome::Skipped { .. } => "warning",
            _ => "error",
        };
        // The last line between the server and the terminal: control characters are shown
        // escaped; the message's own newlines (`hint:` lines) stay.
        eprintln!("{level}: {}", contacts_etl::term::escape_text(&message));
    }
    ExitCode::from(outcome.exit_code())
}

/// Output piped into `head` and closed early is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
