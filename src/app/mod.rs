//! The application layer: what each command does, as typed jobs, between the command line
//! (which parses flags into these jobs and prints what they return) and the engine modules
//! (`api`, `export`, `import`, `auth`, …, which never see either).
//!
//! - [`outcome`]: what a command came to ([`Outcome`]) and the one mapping to an exit code.
//! - [`conn`]: how a job reaches the API ([`Connection`], where its token comes from).
//! - [`export`]: the one export plan builder, and the run of one location with its report.
//! - [`pipeline`]: pipeline files, checked into the same typed jobs, and their runs.
//! - [`import`]: import and undo jobs.
//! - [`listen`]: the webhook receiver job (`contacts-etl listen`).
//! - [`auth`]: the OAuth login, the token store, installed locations.
//! - [`report`]: the run report of an export.
//! - [`env`]: every environment variable the tool reads.
//!
//! Data flows one way: `cli` → `app` → engine. Nothing here imports `cli`.

pub mod auth;
pub mod conn;
pub mod env;
pub mod export;
pub mod import;
pub mod listen;
pub mod outcome;
pub mod pipeline;
pub mod plan;
pub mod report;

pub use conn::{Connection, TokenRef};
pub use outcome::{FailKind, Outcome};
