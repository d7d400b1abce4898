//! Declarative pipelines: `contacts-etl run pipelines/<name>.toml` for unattended runs over
//! one or many locations.
//!
//! A file is parsed strictly ([`config`]) and checked into a [`Pipeline`] ([`file`]: every
//! error names the file, line and key) holding the same typed jobs the commands build from
//! their flags ([`ExportSettings`], [`ImportJob`]). An export pipeline runs under a lock
//! ([`run`]): each location gets its own client, so its own rate limiter and daily quota (that
//! is how the API counts), while one semaphore caps requests in flight across all of them. One
//! location failing does not stop the others; the pipeline report says which failed and why,
//! and the exit code says the run was partial. An import pipeline runs its [`ImportJob`]
//! exactly as `contacts-etl import` does. With `--shard K/N` a run takes only its share of
//! the locations ([`shard`]), so N workers cover an agency.

pub mod config;
mod file;
mod run;
pub mod shard;

use std::path::PathBuf;

pub use file::load;
pub use run::{run_export, run_export_shard, PipelineReport};

use super::conn::{Connection, TokenRef};
use super::export::ExportSettings;
use super::import::ImportJob;

/// OAuth settings of a pipeline; secrets are named, not held.
#[derive(Clone, Debug)]
pub struct OAuthConf {
    pub token_store: PathBuf,
    pub client_id: String,
    pub client_secret_env: String,
    pub client_secret_file: Option<PathBuf>,
    pub company_id: Option<String>,
    pub all_installed_locations: bool,
}

#[derive(Clone, Debug)]
pub struct LocationTarget {
    pub id: String,
    pub token: TokenRef,
}

/// A checked pipeline, ready to run.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// How each location's client reaches the API (its token comes from its
    /// [`LocationTarget`]). `HL_BASE_URL`, when set, has already replaced the file's base URL.
    pub conn: Connection,
    /// Requests in flight across all locations.
    pub max_concurrency: usize,
    pub parallel_locations: usize,
    pub locations: Vec<LocationTarget>,
    pub oauth: Option<OAuthConf>,
    pub job: Job,
}

#[derive(Clone, Debug)]
pub enum Job {
    Export(ExportSettings),
    /// One file into the pipeline's one location: the job `contacts-etl import` runs.
    Import(Box<ImportJob>),
}
