//! An export run: listing → fan-out → writer thread → part files → checkpoint → manifest.
//!
//! `OUT/<entity>/location_id=<id>/part-<n>.<ext>` holds the rows; `OUT/_state/location_id=<id>/`
//! the checkpoint (and, for incremental runs, the `seen` log); `OUT/_manifest.json` is written
//! last, so its presence means the run completed.
//!
//! A run that finds an unfinished checkpoint with the same settings resumes it: it deletes
//! part files the checkpoint does not list (written after its last commit) and continues the
//! listing after the committed position. A run stopped by the daily quota, an error or a kill
//! therefore costs time, never rows. SIGTERM and SIGINT stop it the same way, with the
//! complete pages committed first ([`interrupt`]).
//!
//! A child request the API refuses for good does not stop the run: it is committed with its
//! page as a [`SkippedRequest`] and listed under `skipped` in the manifest, up to
//! [`ExportPlan::max_skipped`]; beyond that the run fails ([`ExportError::TooManySkipped`]).

mod ahead;
mod custom_fields;
mod events;
pub mod interrupt;
mod resources;
mod wide;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

pub use crate::wide::WideProgress;
pub use custom_fields::CustomFieldsMode;
pub use events::{EventsSource, DEFAULT_MAX_GAP};
pub use interrupt::{Interrupt, Signal};
pub use resources::Resources;
pub use wide::{report as children_report, ChildrenReport, DEFAULT_VERIFY_SAMPLE};

use crate::api::{Client, StatsSnapshot};
pub use crate::checkpoint::EntityReport;
use crate::checkpoint::{self, Checkpoint, CheckpointError, Settings};
use crate::dest::Dest;
use crate::extract::{self, ExtractError, Listing, Page, Position, SearchQuery};
use crate::fanout::{self, ChangeFilter, Include, Item, SkippedRequest};
use crate::incremental::{self, PrevState, RunKind, SeenLog, StateError};
use crate::schema::{BatchBuilder, Entity, RowContext, SCHEMA_VERSION};
use crate::sink::{self, Format, Partition, SinkError};

/// `GET /contacts/:id` requests of an events run in flight at once (the rate limiter paces
/// them; the fan-out then fetches their children).
const EVENTS_CONCURRENCY: usize = 8;

/// Child requests refused for good that a run skips, by default, before it fails.
pub const DEFAULT_MAX_SKIPPED: u64 = 1000;

/// The manifest's file name under the output root.
pub const MANIFEST: &str = "_manifest.json";

/// What to export and how.
#[derive(Clone, Debug)]
pub struct ExportPlan {
    pub location_id: String,
    /// When non-empty, export these businesses' contacts instead of the whole location.
    pub businesses: Vec<String>,
    pub include: Include,
    pub format: Format,
    /// Where the files go: a directory, or a bucket ([`Dest`]).
    pub dest: Dest,
    /// How the location's contacts are listed (businesses always through their own route).
    pub listing: Listing,
    /// Contacts per `GET /contacts/` or business request (the API's maximum is 100).
    pub page_size: u32,
    /// Contacts per search request (the API's maximum is 500).
    pub search_page: u32,
    /// Contacts in progress at once in the fan-out.
    pub window: usize,
    /// Rows per record batch handed to a sink: bounds the column builders' memory (a Parquet
    /// part accumulates batches into its row group).
    pub batch_rows: usize,
    /// Contacts per part file.
    pub part_contacts: u64,
    /// Longest time between commits: bounds the work a kill can cost.
    pub commit_interval: Duration,
    /// Discard an unfinished checkpoint instead of resuming it.
    pub restart: bool,
    pub budget: Budget,
    /// Fetch children only for new or changed contacts, and report deletions.
    pub incremental: Option<IncrementalPlan>,
    /// Write under an `export_date=<date>` partition (nightly pipelines). A resumed run keeps
    /// the date it started with.
    pub export_date: Option<String>,
    /// Where the manifest goes (default `OUT/_manifest.json`; pipelines use one per location).
    pub manifest_path: Option<PathBuf>,
    /// Raised by SIGTERM or SIGINT: stop listing, commit the complete pages, return
    /// [`ExportError::Interrupted`].
    pub interrupt: Interrupt,
    /// Most child requests refused for good that a run may skip (all attempts of a resumed
    /// run together); one more fails the run with [`ExportError::TooManySkipped`].
    pub max_skipped: u64,
    /// Where tasks and appointments come from (`wide`): per contact, or the location-wide
    /// routes after the listing.
    pub children_by: crate::wide::ChildrenBy,
    /// Share of the listed contacts whose location-wide children are checked per contact.
    pub verify_sample: f64,
    /// `--custom-fields`: also one contacts column per custom field (`Wide`).
    pub custom_fields: CustomFieldsMode,
    /// `--table delta`: each run in a directory of its own, committed to the entities' Delta
    /// tables before the manifest ([`crate::delta`]).
    pub table: crate::delta::TableFormat,
}

/// When to stop before the location's daily quota is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    /// Most requests this run may send.
    pub max_requests: Option<u64>,
    /// Stop when `X-RateLimit-Daily-Remaining` falls to this share of the daily limit, leaving
    /// it to the location's other integrations.
    pub reserve: f64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_requests: None,
            reserve: 0.05,
        }
    }
}

impl Budget {
    /// Why the run should stop now, if it should.
    fn exhausted(&self, client: &Client) -> Option<String> {
        let spent = client.stats().snapshot().attempts;
        if let Some(max) = self.max_requests {
            if spent >= max {
                return Some(format!(
                    "this run's budget of {max} requests (--daily-budget) is spent"
                ));
            }
        }
        match client.limiter().daily() {
            (Some(remaining), Some(limit)) if remaining as f64 <= self.reserve * limit as f64 => {
                Some(format!("the location's daily quota is down to {remaining} of {limit} requests (the reserve is {:.0}%)", self.reserve * 100.0))
            }
            (Some(0), None) => Some("the location's daily quota is spent".into()),
            _ => None,
        }
    }
}

/// Where incremental state lives, and whether to ignore it this time.
#[derive(Clone, Debug)]
pub struct IncrementalPlan {
    /// Directory of the state kept between runs (contact id → `dateUpdated`).
    pub state_dir: PathBuf,
    /// Export everything, then replace the state.
    pub full_refresh: bool,
    /// How far before the previous run's start a filtered run lists changes (clock skew).
    pub overlap: Duration,
    /// Every this many runs, one lists every contact to find deletions (1: every run).
    pub full_walk_every: u32,
    /// `--from-events`: the runs between walks fetch only the contacts webhook events named
    /// ([`events`]).
    pub from_events: Option<EventsSource>,
}

impl IncrementalPlan {
    pub fn state_file(&self, location_id: &str) -> PathBuf {
        self.state_dir
            .join(format!("location_id={location_id}"))
            .join("contacts-state.tsv")
    }

    pub fn meta_file(&self, location_id: &str) -> PathBuf {
        self.state_dir
            .join(format!("location_id={location_id}"))
            .join("incremental.json")
    }
}

pub use crate::incremental::{DEFAULT_FULL_WALK_EVERY, DEFAULT_OVERLAP};

impl ExportPlan {
    pub fn new(location_id: impl Into<String>, format: Format, out: impl Into<Dest>) -> Self {
        ExportPlan {
            location_id: location_id.into(),
            businesses: Vec::new(),
            include: Include::ALL,
            format,
            dest: out.into(),
            listing: Listing::Auto,
            page_size: 100,
            search_page: extract::SEARCH_PAGE_MAX,
            window: 256,
            batch_rows: 1024,
            part_contacts: 250_000,
            commit_interval: Duration::from_secs(600),
            restart: false,
            budget: Budget::default(),
            incremental: None,
            export_date: None,
            manifest_path: None,
            interrupt: Interrupt::default(),
            max_skipped: DEFAULT_MAX_SKIPPED,
            children_by: crate::wide::ChildrenBy::Contact,
            verify_sample: wide::DEFAULT_VERIFY_SAMPLE,
            custom_fields: CustomFieldsMode::Ids,
            table: crate::delta::TableFormat::Files,
        }
    }

    /// The partition the run of `ck` writes to (in Delta mode, its own run directory).
    pub(crate) fn partition(&self, ck: &Checkpoint) -> Partition {
        Partition {
            export_date: ck.export_date.clone(),
            location_id: self.location_id.clone(),
            run: self.run_dir(&ck.started_at),
        }
    }

    /// `run=…` in Delta mode, for the run that started at `started_at`.
    fn run_dir(&self, started_at: &str) -> Option<String> {
        self.table
            .is_delta()
            .then(|| crate::delta::run_dir(started_at))
    }

    /// Where this run's manifest is written.
    pub fn manifest_path(&self) -> PathBuf {
        self.manifest_path
            .clone()
            .unwrap_or_else(|| self.out().join(MANIFEST))
    }

    /// The local directory the run writes under: OUT, or the work directory of a bucket
    /// ([`Dest::root`]).
    pub fn out(&self) -> &Path {
        self.dest.root()
    }

    fn settings(&self) -> Settings {
        Settings {
            location_id: self.location_id.clone(),
            businesses: self.businesses.clone(),
            include: self.include.to_string(),
            format: self.format.extension().into(),
            page_size: self.page_size,
            incremental: self.incremental.is_some(),
            listing: self.listing.name().into(),
            children_by: self.children_by.name().into(),
            wide_custom_fields: self.custom_fields == CustomFieldsMode::Wide,
        }
    }

    /// The children the listing fetches per contact: all included ones with
    /// `--children-by contact`, else notes only (the `wide` phase brings the others).
    fn listing_include(&self) -> Include {
        match self.children_by {
            crate::wide::ChildrenBy::Contact => self.include,
            _ => Include {
                notes: self.include.notes,
                ..Include::NONE
            },
        }
    }
}

/// Live counters for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub contacts: AtomicU64,
    /// The listing's total as the server reports it (0 until known).
    pub total: AtomicU64,
    /// Contacts already committed by earlier attempts of a resumed run.
    pub resumed_from: AtomicU64,
}

/// `OUT/_manifest.json`: what a completed run wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub tool: String,
    pub format: String,
    pub location_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub businesses: Vec<String>,
    pub include: String,
    /// True for an incremental run: `contacts` holds new and changed contacts only, and
    /// `deleted_contacts` the ids that disappeared since the previous run.
    pub incremental: bool,
    /// Which contacts the run listed: `full` (every contact with its children), `walk`
    /// (incremental: every contact listed, children and rows of new and changed ones,
    /// deletions found), `filtered` (incremental: only contacts updated since
    /// `changedSince`; deletions not looked for) or `events` (incremental, `--from-events`:
    /// only the contacts webhook events named; deletions from `ContactDelete` events).
    #[serde(default)]
    pub run_kind: String,
    /// The filtered run's bound: contacts updated at or after it were listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<String>,
    /// How the contacts were listed: `search`, `get`, `business` or `events` (fetched one by
    /// one as events named them).
    #[serde(default)]
    pub listing: String,
    pub started_at: String,
    pub finished_at: String,
    /// How many times this run was resumed after a stop.
    pub resumed: u32,
    /// Contacts listed (changed or not).
    pub contacts_listed: u64,
    pub entities: BTreeMap<String, EntityReport>,
    /// Objects skipped because they were not JSON objects.
    pub skipped_objects: u64,
    /// Child requests the API refused for good, in listing order (all attempts of a resumed
    /// run, each once): their entity has no rows for that contact. Empty when none.
    #[serde(default)]
    pub skipped: Vec<SkippedRequest>,
    /// Requests of the last attempt of the run (a resumed run's earlier attempts not included).
    pub requests: StatsSnapshot,
    /// This process's CPU time and peak memory at the end of the run.
    pub resources: Resources,
    /// How tasks and appointments were fetched, per entity (`location` or `contact`, and
    /// why): absent when every child came per contact (`--children-by contact`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub children_by: BTreeMap<String, ChildrenReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds an unfinished export made with other settings: {why}\nhint: rerun with the checkpoint's settings to resume it, or pass --restart to discard it and start over")]
    CheckpointMismatch { path: PathBuf, why: String },
    #[error("stopped before the daily quota ran out: {reason}. {contacts} contacts are committed.\nhint: HighLevel resets the quota within 24 hours (it does not say when); rerun the same command then to resume")]
    QuotaStop { reason: String, contacts: u64 },
    #[error("stopped by {signal}: {contacts} contacts are committed.\nhint: rerun the same command to resume")]
    Interrupted { signal: Signal, contacts: u64 },
    #[error("the API refused {count} child requests for good, more than --max-skipped {max} allows; the last: {last}. {contacts} contacts are committed.\nhint: when most contacts' {entity} are refused, the token probably lacks access (it needs the contacts.readonly scope for the location): fix it, then rerun with --restart so that the skipped requests are fetched again; or, to accept the skips, rerun with a higher --max-skipped to resume")]
    TooManySkipped {
        count: u64,
        max: u64,
        entity: String,
        last: Box<SkippedRequest>,
        contacts: u64,
    },
    #[error("the writer thread stopped unexpectedly")]
    WriterLost,
    /// Settings or a situation the export refuses (a usage error).
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Lock(#[from] crate::durable::lock::LockError),
    #[error(transparent)]
    Delta(#[from] crate::delta::DeltaError),
    #[error("cannot read the events table in {dir}: {message}\nhint: --from-events takes the --out of `contacts-etl listen`; run without --from-events to list changes instead")]
    Events { dir: String, message: String },
}

impl ExportError {
    /// The API error underneath, if that is what failed.
    pub fn api(&self) -> Option<&crate::api::ApiError> {
        match self {
            ExportError::Extract(ExtractError::Api(e)) => Some(e),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs one export to completion (resuming an unfinished one) and returns its manifest
/// (also written to `OUT`).
pub async fn run(
    client: Arc<Client>,
    plan: &ExportPlan,
    progress: Arc<Progress>,
) -> Result<Manifest, ExportError> {
    // The location id becomes a directory name: refuse one that could leave OUT.
    Partition::location(&plan.location_id).check()?;
    if plan.incremental.is_some() && !plan.businesses.is_empty() {
        return Err(ExportError::Unsupported("--incremental covers a whole location; it cannot be combined with --business (the state would mark every other contact deleted)".into()));
    }
    if let Some(why) = plan
        .table
        .refuse(plan.format, plan.custom_fields == CustomFieldsMode::Wide)
    {
        return Err(ExportError::Unsupported(why));
    }
    std::fs::create_dir_all(plan.out()).map_err(io_err(plan.out()))?;
    let state_dir = checkpoint::state_dir(plan.out(), &plan.location_id);
    // Two runs on one OUT and location would delete each other's parts: one at a time (in a
    // bucket, also across machines).
    let _lock = plan.dest.lock(&state_dir.join("export.lock"))?;
    // Writers of this state directory killed mid-write left their temporary files: the lock
    // says no other run writes here now.
    match crate::durable::remove_stale_temps(&state_dir) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(files = n, "removed temporary files of killed runs"),
        Err(e) => {
            tracing::warn!(dir = %state_dir.display(), error = %e, "cannot remove temporary files of killed runs")
        }
    }
    // A bucket holds the truth; the work directory may be stale, or new (another machine).
    plan.dest
        .pull_state(&state_dir)
        .map_err(io_err(&state_dir))?;
    let ck_path = checkpoint::path(&state_dir);
    let seen_path = state_dir.join("seen.tsv");
    // The manifest means "complete": it goes before anything else changes.
    let manifest_path = plan.manifest_path();
    plan.dest
        .remove(&manifest_path)
        .map_err(io_err(&manifest_path))?;
    let ck = begin(plan, &ck_path, &seen_path)?;
    // A resumed run with a lower cap than the refusals already committed stops as the first
    // run would have, before anything else is fetched.
    if let Some(last) = ck.skipped.last() {
        if ck.skipped.len() as u64 > plan.max_skipped {
            return Err(ExportError::TooManySkipped {
                count: ck.skipped.len() as u64,
                max: plan.max_skipped,
                entity: last.entity.clone(),
                last: Box::new(last.clone()),
                contacts: ck.contacts_listed,
            });
        }
    }
    progress.resumed_from.store(ck.contacts_listed, Relaxed);
    let (ck, wide) = custom_fields::prepare(&client, plan, ck, &ck_path).await?;

    let prev = match &plan.incremental {
        Some(inc) if !inc.full_refresh => {
            PrevState::load(&inc.state_file(&plan.location_id))?.map(Arc::new)
        }
        _ => None,
    };
    if let (Some(_), None) = (&plan.incremental, &prev) {
        tracing::info!(location = %plan.location_id, "no incremental state (first run or --full-refresh): exporting every contact");
    }
    let mut ck = ck;
    decide_events(plan, &mut ck, &ck_path, prev.is_some())?;
    // An events run fetches a few contacts' children one contact at a time: the
    // location-wide routes would list every task and appointment of the location.
    let per_contact;
    let plan = match ck.run_kind {
        Some(RunKind::Events { .. }) if plan.children_by != crate::wide::ChildrenBy::Contact => {
            per_contact = ExportPlan {
                children_by: crate::wide::ChildrenBy::Contact,
                ..plan.clone()
            };
            &per_contact
        }
        _ => plan,
    };
    // What the events of the run's range name: the contacts an events run fetches, and those
    // a walk fetches whatever their `dateUpdated`; the events run's deletions.
    let named = match (
        plan.incremental
            .as_ref()
            .and_then(|i| i.from_events.as_ref()),
        &ck.events,
        ck.run_kind,
    ) {
        (Some(source), Some(range), Some(RunKind::Events { .. } | RunKind::Walk)) => {
            Some(Arc::new(events::named(source, &plan.location_id, range)?))
        }
        _ => None,
    };
    // The location-wide listings, started near the listing's end where the phase's requests
    // do not depend on what the listing finds (see `ahead`).
    let mut ahead = match wide::needs_listed(plan) && prev.is_none() && plan.businesses.is_empty() {
        true => ahead::Ahead::new(&client, plan, &state_dir),
        false => ahead::Ahead::none(),
    };
    let ck = if ck.listing_done {
        ck
    } else {
        let mut ck = ck;
        let source = decide(
            &client,
            plan,
            &mut ck,
            &ck_path,
            prev.is_some(),
            named.as_deref(),
        )
        .await?;
        // The `seen` log is also the list of contacts the location-wide phase keeps rows of.
        let seen = match plan.incremental.is_some() || wide::needs_listed(plan) {
            true => Some(SeenLog::open(&seen_path, ck.seen_bytes)?),
            false => None,
        };
        stream(
            client.clone(),
            plan,
            ck,
            &ck_path,
            source,
            seen,
            prev.clone(),
            progress,
            wide,
            named.clone(),
            &mut ahead,
        )
        .await?
    };
    let ck = wide::run(
        client.clone(),
        plan,
        ck,
        &ck_path,
        &seen_path,
        prev.as_deref(),
        ahead.take(),
    )
    .await?;
    finish(
        client,
        plan,
        ck,
        &ck_path,
        &seen_path,
        prev.as_deref(),
        named.as_deref(),
    )
    .await
}

/// Resumes the unfinished checkpoint, or starts afresh.
fn begin(plan: &ExportPlan, ck_path: &Path, seen_path: &Path) -> Result<Checkpoint, ExportError> {
    let settings = plan.settings();
    // With --restart even a damaged checkpoint is simply replaced.
    let loaded = match checkpoint::load(ck_path) {
        Err(e) if plan.restart => {
            tracing::warn!(error = %e, "--restart: replacing an unreadable checkpoint");
            None
        }
        other => other?,
    };
    // Temporary parts of a stopped run of this location: in the partition it wrote to and in
    // the one this run writes to. Nothing else under OUT is ours to delete (another location's
    // export may be writing there right now).
    let mut cleaned = 0;
    let mut partitions = vec![Partition {
        export_date: plan.export_date.clone(),
        location_id: plan.location_id.clone(),
        run: None,
    }];
    partitions.extend(loaded.as_ref().map(|ck| plan.partition(ck)));
    partitions.dedup();
    for partition in partitions {
        cleaned += sink::clean_temp_parts(&plan.dest, &partition)?;
    }
    if cleaned > 0 {
        tracing::info!(
            files = cleaned,
            location = %plan.location_id,
            "removed temporary files left by an interrupted run"
        );
    }
    if let Some(mut ck) = loaded {
        if !ck.complete && !plan.restart {
            if let Some(why) = settings.mismatch(&ck.settings) {
                return Err(ExportError::CheckpointMismatch {
                    path: ck_path.to_path_buf(),
                    why,
                });
            }
            // Its parts are in a `run=` directory exactly when it was a Delta run.
            let delta_ck = ck
                .entities
                .values()
                .flat_map(|e| e.files.iter())
                .any(|f| f.path.contains("/run="));
            let delta = plan.table.is_delta();
            if ck.entities.values().any(|e| !e.files.is_empty()) && delta_ck != delta {
                return Err(ExportError::CheckpointMismatch {
                    path: ck_path.to_path_buf(),
                    why: format!(
                        "it was started {} --table delta",
                        if delta_ck { "with" } else { "without" }
                    ),
                });
            }
            let listed: Vec<&str> = ck
                .entities
                .values()
                .flat_map(|e| e.files.iter().map(|f| f.path.as_str()))
                .collect();
            let partition = plan.partition(&ck);
            let orphans = remove_parts(&plan.dest, &partition, |rel| !listed.contains(&rel))?;
            ck.resumed += 1;
            checkpoint::commit(&plan.dest, ck_path, &ck)?;
            tracing::info!(
                location = %plan.location_id,
                contacts = ck.contacts_listed,
                parts = listed.len(),
                discarded_uncommitted_parts = orphans,
                resumed = ck.resumed,
                "resuming the unfinished export found in {}",
                ck_path.display()
            );
            return Ok(ck);
        }
        if !ck.complete {
            tracing::info!(location = %plan.location_id, "--restart: discarding the unfinished export in {}", ck_path.display());
            // Its parts may sit in another day's partition: they go too. Not in Delta mode:
            // a run killed after its commit is in the table (its files stay; unreferenced
            // ones are the table's VACUUM's).
            if ck.export_date != plan.export_date && !plan.table.is_delta() {
                let old = plan.partition(&ck);
                remove_parts(&plan.dest, &old, |_| true)?;
            }
        }
    }
    let started_at = crate::timefmt::format_iso_millis(now_millis());
    // In Delta mode this is the new run's own directory: earlier runs' files stay.
    let partition = Partition {
        export_date: plan.export_date.clone(),
        location_id: plan.location_id.clone(),
        run: plan.run_dir(&started_at),
    };
    let removed = remove_parts(&plan.dest, &partition, |_| true)?;
    if removed > 0 {
        tracing::info!(files = removed, location = %plan.location_id, "replacing the part files of an earlier export of this location");
    }
    if seen_path.exists() {
        std::fs::remove_file(seen_path).map_err(io_err(seen_path))?;
    }
    let ck = Checkpoint {
        settings,
        started_at,
        export_date: plan.export_date.clone(),
        resumed: 0,
        position: None,
        next_part: 0,
        contacts_listed: 0,
        entities: BTreeMap::new(),
        skipped_objects: 0,
        skipped: Vec::new(),
        seen_bytes: 0,
        listing_done: false,
        deletions_done: false,
        complete: false,
        run_kind: None,
        listing_used: None,
        wide: None,
        events: None,
    };
    checkpoint::commit(&plan.dest, ck_path, &ck)?;
    Ok(ck)
}

/// Lists, fans out and writes until the listing ends, the budget is spent, or an error.
/// Complete pages are committed in every case.
#[allow(clippy::too_many_arguments)] // the run's parts, each from a different step of `run`
async fn stream(
    client: Arc<Client>,
    plan: &ExportPlan,
    ck: Checkpoint,
    ck_path: &Path,
    source: Source,
    seen: Option<SeenLog>,
    prev: Option<Arc<PrevState>>,
    progress: Arc<Progress>,
    wide: Option<Arc<crate::schema::WideColumns>>,
    named: Option<Arc<events::Named>>,
    ahead: &mut ahead::Ahead,
) -> Result<Checkpoint, ExportError> {
    // Contacts a page of this listing brings at most (a search page comes in runs).
    let page_len = match &source {
        Source::Search { query, .. } => (query.page_limit as usize).min(extract::SEARCH_RUN),
        Source::Get(_) | Source::Businesses { .. } | Source::Ids { .. } => plan.page_size as usize,
    }
    .max(1);
    let pages = listing(client.clone(), plan, source).map({
        let progress = progress.clone();
        move |page| {
            if let Ok(p) = &page {
                if let Some(t) = p.total {
                    progress.total.fetch_max(t, Relaxed);
                }
            }
            page
        }
    });
    // Refusals committed by earlier attempts count towards the cap too.
    let mut skipped = ck.skipped.len() as u64;
    let mut too_many = None;
    // A full run (first incremental run, --full-refresh) treats every contact as changed.
    // An events run fetches every contact the events named, and a walk those too: a note's
    // event does not move its contact's `dateUpdated`.
    let filter: Option<ChangeFilter> = prev
        .filter(|_| !matches!(ck.run_kind, Some(RunKind::Full | RunKind::Events { .. })))
        .map(|p| -> ChangeFilter {
            Arc::new(move |id: &str, ms: Option<i64>| {
                p.changed(id, ms) || named.as_ref().is_some_and(|n| n.names(id))
            })
        });
    let items = fanout::fan_out(
        pages,
        client.clone(),
        plan.listing_include(),
        plan.window,
        filter,
    );
    let (tx, handle) = writer::spawn(
        writer::WriterConfig {
            dest: plan.dest.clone(),
            format: plan.format,
            location_id: plan.location_id.clone(),
            partition: plan.partition(&ck),
            include: plan.listing_include(),
            batch_rows: plan.batch_rows.max(1),
            part_contacts: plan.part_contacts.max(1),
            commit_interval: plan.commit_interval,
            checkpoint_path: ck_path.to_path_buf(),
            seen,
            wide,
        },
        ck,
        // In pages of this listing: as many as the fan-out window holds, and one more (a
        // writer slower than the listing holds about a window of contacts, not pages of
        // thousands, in memory).
        plan.window / page_len + 1,
    );

    let mut items = std::pin::pin!(items);
    // The current page's items, sent to the writer when its `PageEnd` arrives. Anything left
    // here when the stream stops is an incomplete page, which the writer would discard anyway.
    let mut batch = Vec::new();
    let mut failure = None;
    let mut interrupted = None;
    let mut listing_done = false;
    let stop = plan.interrupt.raised();
    let mut stop = std::pin::pin!(stop);
    loop {
        // A signal stops the listing between items; the pages already sent are committed
        // below, the incomplete one in `batch` is dropped (the next run lists it again).
        let next = tokio::select! {
            biased;
            signal = &mut stop => {
                interrupted = Some(signal);
                break;
            }
            next = items.next() => next,
        };
        match next {
            None => {
                listing_done = true;
                break;
            }
            Some(Ok(item)) => {
                let page_end = matches!(item, Item::PageEnd { .. });
                // After the last page only the finishing steps remain: never stop there.
                let last_page = matches!(item, Item::PageEnd { next: None, .. });
                if let Item::Contact(unit) = &item {
                    progress.contacts.fetch_add(1, Relaxed);
                    if let Some(last) = unit.children.skipped.last() {
                        skipped += unit.children.skipped.len() as u64;
                        if skipped > plan.max_skipped {
                            // Stops like a failed request would: this page is not committed.
                            too_many = Some(last.clone());
                            break;
                        }
                    }
                }
                batch.push(item);
                if !page_end {
                    continue;
                }
                if tx
                    .send(writer::Msg::Items(std::mem::take(&mut batch)))
                    .await
                    .is_err()
                {
                    break; // the writer failed; its error is collected below
                }
                ahead.at(
                    progress.resumed_from.load(Relaxed) + progress.contacts.load(Relaxed),
                    progress.total.load(Relaxed),
                );
                if !last_page {
                    if let Some(reason) = plan.budget.exhausted(&client) {
                        failure = Some(reason);
                        break;
                    }
                }
            }
            Some(Err(e)) => {
                let _ = tx
                    .send(writer::Msg::Finish {
                        listing_done: false,
                    })
                    .await;
                drop(tx);
                // Complete pages are committed by the writer before this error is reported.
                let _ = join(handle).await;
                return Err(e.into());
            }
        }
    }
    let _ = tx.send(writer::Msg::Finish { listing_done }).await;
    drop(tx);
    let ck = join(handle).await?;
    if let Some(signal) = interrupted {
        return Err(ExportError::Interrupted {
            signal,
            contacts: ck.contacts_listed,
        });
    }
    if let Some(last) = too_many {
        return Err(ExportError::TooManySkipped {
            count: skipped,
            max: plan.max_skipped,
            entity: last.entity.clone(),
            last: Box::new(last),
            contacts: ck.contacts_listed,
        });
    }
    if let Some(reason) = failure {
        return Err(ExportError::QuotaStop {
            reason,
            contacts: ck.contacts_listed,
        });
    }
    Ok(ck)
}

async fn join(
    handle: std::thread::JoinHandle<Result<Checkpoint, ExportError>>,
) -> Result<Checkpoint, ExportError> {
    tokio::task::spawn_blocking(move || handle.join())
        .await
        .map_err(|_| ExportError::WriterLost)?
        .map_err(|_| ExportError::WriterLost)?
}

/// The finishing steps, each safe to repeat after a crash: deletions (incremental), the new
/// state, the manifest, and the checkpoint marked complete.
#[allow(clippy::too_many_arguments)] // the run's parts, each from a different step of `run`
async fn finish(
    client: Arc<Client>,
    plan: &ExportPlan,
    mut ck: Checkpoint,
    ck_path: &Path,
    seen_path: &Path,
    prev: Option<&PrevState>,
    named: Option<&events::Named>,
) -> Result<Manifest, ExportError> {
    let kind = ck.run_kind.unwrap_or(RunKind::Full);
    if let Some(inc) = &plan.incremental {
        // An events run's deletions are its `ContactDelete` events (the same on every attempt).
        // Only contacts the previous state knew: one created and deleted between two runs
        // was never exported, and one whose delete a run already wrote is gone from it.
        let events_deleted: Vec<String> = match (kind, named) {
            (RunKind::Events { .. }, Some(n)) => n
                .deleted
                .iter()
                .filter(|id| prev.is_some_and(|p| p.known(id).is_some()))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        // A filtered run did not list what it did not change: it cannot see deletions.
        let filtered = matches!(kind, RunKind::Filtered { .. });
        if !ck.deletions_done && !filtered {
            let deleted = match kind {
                RunKind::Events { .. } => events_deleted
                    .iter()
                    .map(|id| (id.clone(), prev.and_then(|p| p.known(id)).flatten()))
                    .collect(),
                _ => incremental::deletions(prev, seen_path)?,
            };
            let partition = plan.partition(&ck);
            let mut part = sink::open_part_at(
                &plan.dest,
                plan.format,
                Entity::DeletedContacts,
                &partition,
                ck.next_part,
            )?;
            let mut builder = BatchBuilder::new(Entity::DeletedContacts);
            let ctx = RowContext {
                location_id: &plan.location_id,
                contact_id: None,
            };
            for (id, ms) in &deleted {
                let obj = serde_json::json!({ "id": id, "dateUpdated": ms });
                let raw = serde_json::value::to_raw_value(&obj).unwrap_or_default();
                if let Err(e) = builder.append(&raw, &ctx) {
                    tracing::warn!(error = %e, "cannot record a deleted contact");
                }
                if builder.is_full(plan.batch_rows) {
                    part.write(&builder.finish())?;
                }
            }
            if !builder.is_empty() {
                part.write(&builder.finish())?;
            }
            let info = part.finish()?;
            let report = ck
                .entities
                .entry(Entity::DeletedContacts.name().to_owned())
                .or_default();
            *report = EntityReport {
                rows: info.rows,
                files: vec![info],
            };
            ck.next_part += 1;
            ck.deletions_done = true;
            checkpoint::commit(&plan.dest, ck_path, &ck)?;
            if !deleted.is_empty() {
                tracing::info!(location = %plan.location_id, deleted = deleted.len(), "contacts deleted since the previous run");
            }
        }
        let state = inc.state_file(&plan.location_id);
        if kind.partial() {
            incremental::append_state(&state, seen_path, &events_deleted)?;
        } else {
            incremental::save_state(&state, seen_path)?;
        }
        // What the next run chooses its kind from, written after the state it describes.
        let meta = incremental::Meta {
            last_started_ms: crate::timefmt::parse_iso_millis(&ck.started_at)
                .unwrap_or_else(now_millis),
            filtered_since_walk: kind.nth(),
            refetch: !ck.skipped.is_empty(),
            // A run that read no events (no --from-events) keeps the previous mark: the next
            // events run reads on from there, not from this run's start.
            events: ck.events.map(|r| r.mark).or_else(|| {
                incremental::Meta::load(&inc.meta_file(&plan.location_id)).and_then(|m| m.events)
            }),
        };
        meta.save(&inc.meta_file(&plan.location_id))?;
    }

    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: concat!("contacts-etl ", env!("CARGO_PKG_VERSION")).into(),
        format: plan.format.extension().into(),
        location_id: plan.location_id.clone(),
        businesses: plan.businesses.clone(),
        include: plan.include.to_string(),
        incremental: plan.incremental.is_some(),
        run_kind: kind.name().into(),
        changed_since: match kind {
            RunKind::Filtered { since_ms, .. } => Some(crate::timefmt::format_iso_millis(since_ms)),
            _ => None,
        },
        listing: ck.listing_used.clone().unwrap_or_default(),
        started_at: ck.started_at.clone(),
        finished_at: crate::timefmt::format_iso_millis(now_millis()),
        resumed: ck.resumed,
        contacts_listed: ck.contacts_listed,
        entities: ck.entities.clone(),
        skipped_objects: ck.skipped_objects,
        skipped: ck.skipped.clone(),
        requests: client.stats().snapshot(),
        resources: Resources::now(),
        children_by: wide::report(&ck),
    };
    // The Delta commit: after every part is complete, before the manifest (at most once:
    // see `crate::delta`).
    if plan.table.is_delta() {
        let state_dir = checkpoint::state_dir(plan.out(), &plan.location_id);
        let run = crate::delta::RunCommit {
            dest: &plan.dest,
            location_id: &plan.location_id,
            export_date: ck
                .export_date
                .clone()
                .unwrap_or_else(|| ck.started_at.chars().take(10).collect()),
            started_at: &ck.started_at,
            state_dir: &state_dir,
            entities: &ck.entities,
        };
        crate::delta::commit_run(&run).await?;
        if plan.table == crate::delta::TableFormat::DeltaMerge {
            crate::delta::merge_run(&run, kind == RunKind::Full).await?;
        }
    }
    // Everything the manifest describes is the destination's before the manifest is.
    plan.dest
        .sync_state(ck_path.parent().unwrap_or(Path::new(".")))
        .map_err(io_err(ck_path))?;
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    let manifest_path = plan.manifest_path();
    checkpoint::write_atomic(&manifest_path, &bytes)?;
    plan.dest
        .publish(&manifest_path)
        .map_err(io_err(&manifest_path))?;
    ck.complete = true;
    checkpoint::commit(&plan.dest, ck_path, &ck)?;
    Ok(manifest)
}

/// The listing a run reads: decided once when it starts (see [`decide`]); a resumed run
/// continues the one its checkpoint's position belongs to.
enum Source {
    /// `GET /contacts/`, after the cursor.
    Get(Option<extract::Cursor>),
    /// `POST /contacts/search`, after `after`; `prefetched` is the first page when the
    /// `--listing auto` probe already fetched it.
    Search {
        query: SearchQuery,
        after: Option<Vec<serde_json::Value>>,
        prefetched: Option<crate::api::SearchPage>,
    },
    /// The listed businesses, from the `first`-th at offset `skip`.
    Businesses { first: usize, skip: u64 },
    /// The contacts an events run fetches, one by one, from the `from`-th.
    Ids { ids: Arc<[String]>, from: usize },
}

/// With `--from-events`, decides the kind of a run that has not decided yet (events or
/// walk, see [`events`]) and records it, with where the events table stood, in the
/// checkpoint. Without it, or once decided, nothing.
fn decide_events(
    plan: &ExportPlan,
    ck: &mut Checkpoint,
    ck_path: &Path,
    has_state: bool,
) -> Result<(), ExportError> {
    let Some(inc) = &plan.incremental else {
        return Ok(());
    };
    let Some(source) = &inc.from_events else {
        return Ok(());
    };
    if ck.run_kind.is_some() || ck.position.is_some() || !plan.businesses.is_empty() {
        return Ok(());
    }
    let (kind, range) = events::choose(
        source,
        &plan.location_id,
        inc.full_refresh,
        has_state,
        incremental::Meta::load(&inc.meta_file(&plan.location_id)).as_ref(),
        inc.overlap,
        inc.full_walk_every.max(1),
    )?;
    ck.run_kind = Some(kind);
    ck.events = Some(range);
    checkpoint::commit(&plan.dest, ck_path, ck)?;
    Ok(())
}

/// Decides, once per run, which contacts it lists ([`RunKind`]) and through which route,
/// and records both in the checkpoint before the first page is asked for. A resumed run
/// keeps them. With `--listing auto` the decision costs no request of its own: the search's
/// first page is the probe, and is used.
async fn decide(
    client: &Client,
    plan: &ExportPlan,
    ck: &mut Checkpoint,
    ck_path: &Path,
    has_state: bool,
    named: Option<&events::Named>,
) -> Result<Source, ExportError> {
    if !plan.businesses.is_empty() {
        let (first, skip) = match &ck.position {
            Some(Position::Business { index, skip }) => (*index, *skip),
            _ => (0, 0),
        };
        if ck.run_kind.is_none() {
            ck.run_kind = Some(RunKind::Full);
            ck.listing_used = Some("business".into());
            checkpoint::commit(&plan.dest, ck_path, ck)?;
        }
        return Ok(Source::Businesses { first, skip });
    }
    if let (Some(RunKind::Events { .. }), Some(named)) = (ck.run_kind, named) {
        let from = match ck.position {
            Some(Position::Ids { index }) => index,
            _ => 0,
        };
        if ck.listing_used.as_deref() != Some("events") {
            ck.listing_used = Some("events".into());
            checkpoint::commit(&plan.dest, ck_path, ck)?;
        }
        return Ok(Source::Ids {
            ids: named.changed.clone().into(),
            from,
        });
    }
    if let Some(RunKind::Events { .. }) = ck.run_kind {
        return Err(ExportError::Unsupported(format!(
            "{} is part-way through an events run (--from-events), but no --from-events was given\nhint: rerun with the same --from-events to resume it, or pass --restart",
            ck_path.display()
        )));
    }
    let kind = match (ck.run_kind, &plan.incremental) {
        (Some(kind), _) => kind,
        (None, None) => RunKind::Full,
        // An older version's checkpoint, part-way through its listing.
        (None, Some(_)) if ck.position.is_some() => {
            if has_state {
                RunKind::Walk
            } else {
                RunKind::Full
            }
        }
        (None, Some(inc)) => RunKind::choose(
            inc.full_refresh,
            has_state,
            incremental::Meta::load(&inc.meta_file(&plan.location_id)).as_ref(),
            plan.listing != Listing::Get,
            inc.overlap,
            inc.full_walk_every.max(1),
        ),
    };
    let query = |kind: RunKind| SearchQuery {
        location_id: plan.location_id.clone(),
        page_limit: plan.search_page,
        updated_since: match kind {
            RunKind::Filtered { since_ms, .. } => Some(since_ms),
            _ => None,
        },
    };
    let (kind, source) = match ck.position.clone() {
        Some(Position::After(cursor)) => (kind, Source::Get(Some(cursor))),
        Some(Position::Search { after }) => (
            kind,
            Source::Search {
                query: query(kind),
                after: Some(after),
                prefetched: None,
            },
        ),
        // Only an events run has this position, and it returned above.
        Some(Position::Ids { .. }) => {
            return Err(ExportError::Unsupported(format!(
                "{} holds a position of an events run but no run kind\nhint: pass --restart",
                ck_path.display()
            )))
        }
        Some(Position::Business { .. }) => {
            return Err(ExportError::Unsupported(format!(
                "{} is part-way through a business listing, but no --business was given\nhint: rerun with the same --business flags to resume it, or pass --restart",
                ck_path.display()
            )))
        }
        None => match plan.listing {
            Listing::Get => (kind.unfiltered(), Source::Get(None)),
            Listing::Search => (
                kind,
                Source::Search {
                    query: query(kind),
                    after: None,
                    prefetched: None,
                },
            ),
            Listing::Auto => match extract::probe_search(client, &query(kind)).await? {
                Some(page) => (
                    kind,
                    Source::Search {
                        query: query(kind),
                        after: None,
                        prefetched: Some(page),
                    },
                ),
                None => (kind.unfiltered(), Source::Get(None)),
            },
        },
    };
    let used = match source {
        Source::Get(_) => "get",
        Source::Search { .. } => "search",
        Source::Businesses { .. } => "business",
        Source::Ids { .. } => "events",
    };
    if ck.run_kind != Some(kind) || ck.listing_used.as_deref() != Some(used) {
        ck.run_kind = Some(kind);
        ck.listing_used = Some(used.into());
        checkpoint::commit(&plan.dest, ck_path, ck)?;
    }
    if let RunKind::Filtered { since_ms, .. } = kind {
        tracing::info!(location = %plan.location_id, since = %crate::timefmt::format_iso_millis(since_ms), "incremental run: listing only the contacts updated since");
    }
    Ok(source)
}

/// The pages of a [`Source`].
fn listing(
    client: Arc<Client>,
    plan: &ExportPlan,
    source: Source,
) -> std::pin::Pin<Box<dyn Stream<Item = Result<Page, ExtractError>> + Send>> {
    match source {
        Source::Get(cursor) => Box::pin(extract::location_contacts(
            client,
            plan.location_id.clone(),
            cursor,
            plan.page_size,
        )),
        Source::Search {
            query,
            after,
            prefetched,
        } => Box::pin(extract::search_runs(
            extract::search_contacts(client, query, after, prefetched),
            extract::SEARCH_RUN,
        )),
        Source::Ids { ids, from } => Box::pin(extract::contacts_by_id(
            client,
            ids,
            from,
            plan.page_size as usize,
            EVENTS_CONCURRENCY,
        )),
        Source::Businesses { first, skip } => {
            let (loc, size) = (plan.location_id.clone(), plan.page_size);
            let businesses: Vec<(usize, String)> = plan
                .businesses
                .iter()
                .cloned()
                .enumerate()
                .skip(first)
                .collect();
            let count = plan.businesses.len();
            Box::pin(futures::stream::iter(businesses).flat_map(move |(i, b)| {
                extract::business_contacts(
                    client.clone(),
                    loc.clone(),
                    b,
                    i,
                    i + 1 == count,
                    if i == first { skip } else { 0 },
                    size,
                )
            }))
        }
    }
}

/// Removes the partition's part files for which `remove(relative path)` holds; returns how many.
fn remove_parts(
    out: &Dest,
    partition: &Partition,
    remove: impl Fn(&str) -> bool,
) -> Result<usize, ExportError> {
    let mut removed = 0;
    for entity in Entity::ALL
        .into_iter()
        .chain([Entity::DeletedContacts, Entity::CustomFields])
    {
        let rel_dir = partition.rel_dir(entity);
        let dir = out.root().join(&rel_dir);
        for name in out.list_files(&dir).map_err(io_err(&dir))? {
            let ours =
                name.starts_with("part-") && (name.ends_with(".parquet") || name.ends_with(".csv"));
            if ours && remove(&format!("{rel_dir}/{name}")) {
                let path = dir.join(&name);
                out.remove(&path).map_err(io_err(&path))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

pub(crate) use crate::timefmt::now_millis;
