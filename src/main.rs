//! `contacts-etl` binary: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use contacts_etl::cli::{self, Cli, Command};

use contacts_etl::cli::exit;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
            eprintln!("error: {err:#}");
            ExitCode::from(exit::code_for(&err))
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Export(args) => cli::run_export(args, cli.quiet).await.map(|_| ()),
        Command::Sim(args) => cli::run_sim(args).await,
        Command::Demo(args) => cli::run_demo(args, cli.quiet).await,
        Command::Import(args) => contacts_etl::import::cli::run(args, cli.quiet).await,
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
