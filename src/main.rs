//! `contacts-etl` binary: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use contacts_etl::app::Outcome;
use contacts_etl::cli::{self, Cli, Command};

/// jemalloc, because it hands freed memory back to the OS: with glibc's malloc the exporter's
/// resident memory crept up with the size of the location (freed row-group buffers stayed
/// mapped); with jemalloc it stays flat (BENCHMARKS.md, "Memory"). Where the platform allows
/// (not Apple, Android, DragonFly), jemalloc is the C libraries' `malloc` too (Cargo.toml).
#[cfg(unix)]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (its `malloc_conf`, under the `_rjem_` prefix where
/// jemalloc is not the system's `malloc`): freed pages go back to the OS after half a second
/// instead of ten, and directly, not as lazily reclaimed MADV_FREE pages that still count as
/// resident. Each thread's cache
/// keeps objects up to 1 KiB, 32 of a size at most (jemalloc's defaults, up to 32 KiB and 200,
/// held 0.8 MB per location of a 50-location pipeline, two threads each; the same CPU).
/// `MALLOC_CONF` (`_RJEM_MALLOC_CONF` where prefixed) in the environment overrides it.
#[cfg(unix)]
#[cfg_attr(
    any(
        target_vendor = "apple",
        target_os = "android",
        target_os = "dragonfly"
    ),
    export_name = "_rjem_malloc_conf"
)]
#[cfg_attr(
    not(any(
        target_vendor = "apple",
        target_os = "android",
        target_os = "dragonfly"
    )),
    export_name = "malloc_conf"
)]
pub static MALLOC_CONF: Option<&'static u8> =
    Some(&b"dirty_decay_ms:500,muzzy_decay_ms:0,tcache_max:1024,tcache_nslots_small_max:32\0"[0]);

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
