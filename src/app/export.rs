//! Export jobs: the one plan builder, and the run of one location's export with its report.
//!
//! `export`, `demo` and every location of a pipeline build their [`ExportPlan`] through
//! [`plan`] from the same [`ExportSettings`] and [`Connection`], so a pipeline location and the
//! equivalent `export` command line export the same way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{check_ids, Connection};
use super::outcome::{export_outcome, Outcome};
use super::report::{RunReport, Started};
use crate::api::Client;
use crate::dest::{Dest, Target};
use crate::export::{
    Budget, EventsSource, ExportPlan, IncrementalPlan, Interrupt, Manifest, Progress,
};
use crate::extract::Listing;
use crate::fanout::Include;
use crate::sink::Format;
use crate::wide::ChildrenBy;

/// What to export and where, for any number of locations.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSettings {
    /// A directory, or a bucket URL (opened once per command or pipeline: [`Dest::open`]).
    pub out: Target,
    pub format: Format,
    pub include: Include,
    /// When non-empty, these businesses' contacts instead of the whole location.
    pub businesses: Vec<String>,
    pub part_contacts: u64,
    pub commit_interval: Duration,
    /// Discard an unfinished export instead of resuming it.
    pub restart: bool,
    pub budget: Budget,
    pub incremental: bool,
    /// With `incremental`: export everything and replace the state.
    pub full_refresh: bool,
    /// How contacts are listed.
    pub listing: Listing,
    /// With `incremental`: how far before the previous run's start a filtered run lists.
    pub overlap: Duration,
    /// With `incremental`: every this many runs, one lists every contact (deletions).
    pub full_walk_every: u32,
    /// With `incremental`: the `--out` of `contacts-etl listen`; runs between walks fetch
    /// only the contacts its events named.
    pub from_events: Option<Target>,
    /// With `from_events`: a receiver restart after this long without a stored event is a
    /// gap (the run walks).
    pub max_gap: Duration,
    /// Where incremental state lives (default `OUT/_state`).
    pub state_dir: Option<PathBuf>,
    /// Write under an `export_date=<day the run started>` partition.
    pub partition_by_date: bool,
    /// Most child requests the API may refuse for good before the run fails; up to it each is
    /// skipped and listed in the report.
    pub max_skipped: u64,
    /// Where tasks and appointments come from (`--children-by`).
    pub children_by: ChildrenBy,
    /// Share of the listed contacts whose location-wide children are checked per contact
    /// (`--verify-sample`, 0..=1).
    pub verify_sample: f64,
    /// `--custom-fields`: `Wide` adds one contacts column per custom field.
    pub custom_fields: crate::export::CustomFieldsMode,
    /// `--table delta`: also commit each run to the entities' Delta tables.
    pub table: crate::delta::TableFormat,
}

/// Contacts of search pages that the running locations of a pipeline hold together, at most
/// (while a page's contacts wait for their children it stays in memory, with the reply it
/// came in: about 2.5 KB a contact).
const PAGES_IN_MEMORY: usize = 20_000;

/// The search page for `running` locations at once: the API's 500 up to 40 locations, then
/// smaller, down to 100 from 200 locations on. At 200 locations of 1,000 contacts that is 8
/// more requests per location (0.8%) for a fifth of the pages' memory (BENCHMARKS.md,
/// "Agency scale").
pub fn search_page_for(running: usize) -> u32 {
    let max = crate::extract::SEARCH_PAGE_MAX as usize;
    (PAGES_IN_MEMORY / running.max(1)).clamp(100, max) as u32
}

impl ExportSettings {
    pub fn new(out: impl Into<Target>, format: Format) -> ExportSettings {
        ExportSettings {
            out: out.into(),
            format,
            include: Include::ALL,
            businesses: Vec::new(),
            part_contacts: 250_000,
            commit_interval: Duration::from_secs(600),
            restart: false,
            budget: Budget::default(),
            incremental: false,
            full_refresh: false,
            listing: Listing::Auto,
            overlap: crate::export::DEFAULT_OVERLAP,
            full_walk_every: crate::export::DEFAULT_FULL_WALK_EVERY,
            from_events: None,
            max_gap: crate::export::DEFAULT_MAX_GAP,
            state_dir: None,
            partition_by_date: false,
            max_skipped: crate::export::DEFAULT_MAX_SKIPPED,
            children_by: ChildrenBy::Auto,
            verify_sample: crate::export::DEFAULT_VERIFY_SAMPLE,
            custom_fields: crate::export::CustomFieldsMode::Ids,
            table: crate::delta::TableFormat::Files,
        }
    }

    /// Checks what can be checked before any request (usage errors).
    pub fn check(&self) -> Result<(), Outcome> {
        if let Some(why) = self.table.refuse(
            self.format,
            self.custom_fields == crate::export::CustomFieldsMode::Wide,
        ) {
            return Err(Outcome::usage(why));
        }
        if !(0.0..1.0).contains(&self.budget.reserve) {
            // Shown as given (the fraction times 100 can print as 110.00000000000001).
            let percent = (self.budget.reserve * 100.0 * 1e6).round() / 1e6;
            return Err(Outcome::usage(format!(
                "--daily-reserve {percent} is not a percentage below 100"
            )));
        }
        if !(0.0..=1.0).contains(&self.verify_sample) {
            return Err(Outcome::usage(format!(
                "--verify-sample {} is not a share between 0 and 1 (0.005 checks half a percent of the contacts)",
                self.verify_sample
            )));
        }
        if self.from_events.is_some() && !self.incremental {
            return Err(Outcome::usage(
                "--from-events drives incremental runs: add --incremental",
            ));
        }
        check_ids("--business", &self.businesses)
    }

    /// Opens `out` ([`Dest::open`]): for a bucket, connects and checks it answers.
    pub fn open_out(&self) -> Result<Dest, Outcome> {
        Dest::open(&self.out)
            .map_err(|e| Outcome::Failed(super::outcome::FailKind::Other, anyhow::Error::from(e)))
    }
}

/// Where a location's export sits among others.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// Other locations share OUT (a pipeline): the manifest goes to the location's state
    /// directory instead of `OUT/_manifest.json`.
    pub shared_out: bool,
    /// The partition date (`partition_by_date`): the day the run (the pipeline) started.
    pub export_date: Option<String>,
}

/// The plan of one location's export: the one builder.
pub fn plan(
    location: &str,
    s: &ExportSettings,
    dest: &Dest,
    conn: &Connection,
    placement: &Placement,
    interrupt: &Interrupt,
) -> ExportPlan {
    let mut plan = ExportPlan::new(location, s.format, dest.clone());
    plan.businesses = s.businesses.clone();
    plan.include = s.include;
    plan.part_contacts = s.part_contacts.max(1);
    plan.commit_interval = s.commit_interval.max(Duration::from_secs(1));
    plan.listing = s.listing;
    // Contacts in progress: enough to keep every request permit busy and to ask for the next
    // page while the last ones of a page wait for their children (a GET page of 100 plus 28).
    // Not a whole search page of 500: the listing asks for the next page once the window
    // reaches the end of the current one, so a window of 128 overlaps pages as well, and each
    // contact in progress holds its JSON and its requests' state (about 11 KB): a window of
    // 528 cost 4.5 MB per location, most of a pipeline's memory with many locations at once
    // (BENCHMARKS.md, "Agency scale").
    plan.window = (conn.concurrency * 8).max(plan.page_size as usize + 28);
    plan.restart = s.restart;
    plan.max_skipped = s.max_skipped;
    plan.children_by = s.children_by;
    plan.verify_sample = s.verify_sample;
    plan.custom_fields = s.custom_fields;
    plan.table = s.table;
    plan.budget = s.budget.clone();
    if s.incremental {
        plan.incremental = Some(IncrementalPlan {
            state_dir: s
                .state_dir
                .clone()
                .unwrap_or_else(|| dest.root().join("_state")),
            full_refresh: s.full_refresh,
            overlap: s.overlap,
            full_walk_every: s.full_walk_every.max(1),
            from_events: s.from_events.clone().map(|target| EventsSource {
                target,
                max_gap: s.max_gap,
            }),
        });
    }
    plan.export_date = if s.partition_by_date {
        placement.export_date.clone()
    } else {
        None
    };
    if placement.shared_out {
        plan.manifest_path =
            Some(crate::checkpoint::state_dir(dest.root(), location).join("manifest.json"));
    }
    plan.interrupt = interrupt.clone();
    plan
}

/// `contacts-etl export`: one location.
#[derive(Clone, Debug)]
pub struct ExportJob {
    pub location: String,
    pub settings: ExportSettings,
    pub conn: Connection,
    /// Where the run report goes (default `OUT/_report.json`, in the bucket for a bucket).
    pub report: Option<PathBuf>,
}

/// An export ready to run: its plan and its client (whose counters a progress display reads).
pub struct Prepared {
    pub plan: ExportPlan,
    pub client: Arc<Client>,
    report: PathBuf,
    /// The report is `OUT/_report.json`: a bucket gets it too.
    report_in_out: bool,
    started: Started,
}

/// What an export came to.
pub struct Finished {
    pub outcome: Outcome,
    pub manifest: Option<Manifest>,
    pub report: Option<RunReport>,
}

impl ExportJob {
    /// Checks the settings, reads the token and builds the client and the plan. Nothing is
    /// sent or written yet.
    pub fn prepare(&self, interrupt: &Interrupt) -> Result<Prepared, Outcome> {
        self.settings.check()?;
        check_ids("--location", std::slice::from_ref(&self.location))?;
        let client = self.conn.client()?;
        let dest = self.settings.open_out()?;
        let placement = Placement {
            shared_out: false,
            export_date: None,
        };
        let plan = plan(
            &self.location,
            &self.settings,
            &dest,
            &self.conn,
            &placement,
            interrupt,
        );
        Ok(Prepared {
            report: self
                .report
                .clone()
                .unwrap_or_else(|| dest.root().join("_report.json")),
            report_in_out: self.report.is_none(),
            plan,
            client,
            started: Started::now(),
        })
    }
}

impl Prepared {
    /// Runs the export and writes its report (not when another run holds the lock: the
    /// report there is that run's).
    pub async fn run(self, progress: Arc<Progress>) -> Finished {
        let (mut outcome, manifest) =
            execute(self.client.clone(), &self.plan, progress.clone()).await;
        if let Outcome::Skipped { report, .. } = &mut outcome {
            *report = Some(self.report.clone());
        }
        let resumed_from = progress
            .resumed_from
            .load(std::sync::atomic::Ordering::Relaxed);
        if matches!(outcome, Outcome::Busy(_)) {
            return Finished {
                outcome,
                manifest,
                report: None,
            };
        }
        let report = RunReport::build(
            &self.plan,
            Some(&self.client),
            &self.started,
            &outcome,
            manifest.as_ref(),
            resumed_from,
        );
        let written = report
            .write(&self.report)
            .map_err(std::io::Error::from)
            .and_then(|()| match self.report_in_out {
                true => self.plan.dest.publish(&self.report),
                false => Ok(()),
            });
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write the run report");
        }
        Finished {
            outcome,
            manifest,
            report: Some(report),
        }
    }
}

/// Runs one location's export and says what it came to.
pub async fn execute(
    client: Arc<Client>,
    plan: &ExportPlan,
    progress: Arc<Progress>,
) -> (Outcome, Option<Manifest>) {
    tracing::info!(location = %plan.location_id, include = %plan.include, format = plan.format.extension(), out = %plan.dest.describe(), rate = ?client.limiter().effective_quota().map(|q| q.to_string()), "export started");
    match crate::export::run(client, plan, progress).await {
        Ok(m) => {
            tracing::info!(location = %plan.location_id, contacts = m.entities.get("contacts").map_or(0, |e| e.rows), skipped = m.skipped.len(), "export complete");
            let outcome = match m.skipped.len() as u64 {
                0 => Outcome::Complete,
                records => Outcome::Skipped {
                    records,
                    report: None,
                },
            };
            (outcome, Some(m))
        }
        Err(e) => {
            let location = plan.location_id.clone();
            let outcome = export_outcome(e, |e| {
                e.context(format!("export of location {location} did not complete"))
            });
            (outcome, None)
        }
    }
}
