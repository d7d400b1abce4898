//! `contacts-etl` binary: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use contacts_etl::cli::{self, Cli, Command};

use contacts_etl::cli::exit;

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
    // (alone or in the demo) serves many connections and gets the multi-threaded runtime.
    let mut builder = match cli.command {
        Command::Sim(_) | Command::Demo(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::from(exit::OK);
            }
            // The last line between the server and the terminal: control characters in the
            // chain are shown escaped; the chain's own newlines (`hint:` lines) stay.
            let text = format!("{err:#}");
            eprintln!("error: {}", contacts_etl::term::escape_text(&text));
            ExitCode::from(exit::code_for(&err))
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Export(args) => cli::run_export(args, cli.quiet).await.map(|_| ()),
        Command::Sim(args) => cli::run_sim(args, cli.quiet).await,
        Command::Demo(args) => cli::run_demo(args, cli.quiet).await,
        Command::Import(args) => contacts_etl::import::cli::run(args, cli.quiet).await,
        Command::Auth(args) => contacts_etl::auth::cli::run(args, cli.quiet).await,
        Command::Run(args) => cli::run_pipeline(args, cli.quiet).await,
        Command::Validate(args) => cli::run_validate(args),
        Command::Completions(args) => {
            cli::run_completions(args);
            Ok(())
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
