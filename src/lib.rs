//! `contacts-etl`: bulk export and import of HighLevel (LeadConnector) contacts.
//!
//! # Layout
//! - [`api`]: the HTTP client for the Contacts API: typed calls, the error kinds callers act on,
//!   and the one retry policy every request goes through.
//! - [`ratelimit`]: one request pacer per location, sized from the configured limit and
//!   corrected from the `X-RateLimit-*` headers the server sends.
//! - [`extract`]: cursor pagination of `GET /contacts/` and business listings as async streams.
//! - [`fanout`]: per-contact children (tasks, notes, appointments) with bounded concurrency.
//! - [`wide`]: location-wide children (task search, calendar events) as guarded streams.
//! - [`schema`]: the Arrow schema of each entity and the JSON-to-Arrow row decoder: one truth
//!   for both sinks.
//! - [`sink`]: Parquet and CSV part files, written under a temporary name and renamed.
//! - [`dest`]: where a run's files land: a local directory, or an object store bucket
//!   (`s3://`, `gs://`, `az://`), with parts streamed as multipart uploads, the state mirrored,
//!   and the run lock as a lease object.
//! - [`durable`]: the one atomic file write (temp, fsync, rename, fsync the directory) and the
//!   run lock (`File::try_lock`).
//! - [`estimate`]: what an export will cost in requests, per strategy (`contacts-etl plan`).
//! - [`export`]: the export run: plan, pipeline from extractor to sinks, manifest.
//! - [`import`]: the bulk import: CSV validated first, journaled writes, resume, undo.
//! - [`auth`]: OAuth 2.0 for Marketplace apps: login, the 0600 token store, refreshing token
//!   sources, agency-to-location tokens.
//! - [`events`]: `contacts-etl listen`, the signed webhook receiver: signature checks, an
//!   fsynced journal with group commit and duplicate detection, and the `events` table its
//!   segments roll into (with the reader incremental exports use).
//! - [`sim`]: an in-process simulator of the API (axum) used by the demo, tests and benches.
//! - [`app`]: the application layer: each command as a typed job, what it came to
//!   ([`app::Outcome`]) and its exit code; pipeline files.
//! - [`cli`]: command-line arguments, progress and logging; parses into `app` jobs and prints
//!   what they return. Nothing else imports it.
//! - [`term`]: text from outside (server messages, ids) escaped before it reaches a terminal.

pub mod api;
pub mod app;
pub mod auth;
pub mod checkpoint;
pub mod cli;
pub mod delta;
pub mod dest;
pub mod durable;
pub mod estimate;
pub mod events;
pub mod export;
pub mod extract;
pub mod fanout;
pub mod import;
pub mod incremental;
pub mod ratelimit;
pub mod schema;
pub mod sim;
pub mod sink;
pub mod term;
pub mod timefmt;
pub mod wide;
