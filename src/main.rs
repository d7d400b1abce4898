//! `contacts-etl` binary: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use contacts_etl::api::ErrorKind;
use contacts_etl::cli::{self, Cli, Command};

/// Exit codes; each means one thing (documented in the README).
mod exit {
    pub const OK: u8 = 0;
    /// Anything not covered below (I/O errors, bugs).
    pub const FAILURE: u8 = 1;
    /// Bad arguments or settings (clap also exits 2 on usage errors).
    pub const USAGE: u8 = 2;
    /// The API refused the token (401) or its access to the location (403).
    pub const AUTH: u8 = 3;
    /// The API rejected a request for good (4xx) or misbehaved (cursor loop).
    pub const API: u8 = 4;
    /// A transient failure outlasted the retries (5xx, timeouts, 429s): try again later.
    pub const TRANSIENT: u8 = 5;
    /// The location's daily request quota is spent: resume after it resets.
    pub const QUOTA: u8 = 75;
}

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
            ExitCode::from(exit_code(&err))
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Export(args) => cli::run_export(args, cli.quiet).await.map(|_| ()),
        Command::Sim(args) => cli::run_sim(args).await,
        Command::Demo(args) => cli::run_demo(args, cli.quiet).await,
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<contacts_etl::export::ExportError>() {
            if let Some(api) = e.api() {
                return api_code(api);
            }
            if matches!(e, contacts_etl::export::ExportError::Extract(_)) {
                return exit::API;
            }
            return exit::FAILURE;
        }
        if let Some(api) = cause.downcast_ref::<contacts_etl::api::ApiError>() {
            return api_code(api);
        }
        if cause
            .downcast_ref::<contacts_etl::api::ClientBuildError>()
            .is_some()
        {
            return exit::USAGE;
        }
    }
    if err.to_string().starts_with("no API token") || err.to_string().contains("token file") {
        return exit::USAGE;
    }
    exit::FAILURE
}

fn api_code(err: &contacts_etl::api::ApiError) -> u8 {
    if err.status() == Some(403) {
        return exit::AUTH;
    }
    match err.kind() {
        ErrorKind::Reauth => exit::AUTH,
        ErrorKind::Retry => exit::TRANSIENT,
        ErrorKind::QuotaExhausted => exit::QUOTA,
        ErrorKind::Fatal | ErrorKind::NotFound | ErrorKind::Duplicate => exit::API,
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
