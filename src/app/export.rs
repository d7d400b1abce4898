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
use crate::export::{Budget, ExportPlan, IncrementalPlan, Interrupt, Manifest, Progress};
use crate::extract::Listing;
use crate::fanout::Include;
use crate::sink::Format;
use crate::wide::ChildrenBy;

/// What to export and where, for any number of locations.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSettings {
    pub out: PathBuf,
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
}

impl ExportSettings {
    pub fn new(out: impl Into<PathBuf>, format: Format) -> ExportSettings {
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
            state_dir: None,
            partition_by_date: false,
            max_skipped: crate::export::DEFAULT_MAX_SKIPPED,
            children_by: ChildrenBy::Auto,
            verify_sample: crate::export::DEFAULT_VERIFY_SAMPLE,
            custom_fields: crate::export::CustomFieldsMode::Ids,
        }
    }

    /// Checks what can be checked before any request (usage errors).
    pub fn check(&self) -> Result<(), Outcome> {
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
        check_ids("--business", &self.businesses)
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
    conn: &Connection,
    placement: &Placement,
    interrupt: &Interrupt,
) -> ExportPlan {
    let mut plan = ExportPlan::new(location, s.format, s.out.clone());
    plan.businesses = s.businesses.clone();
    plan.include = s.include;
    plan.part_contacts = s.part_contacts.max(1);
    plan.commit_interval = s.commit_interval.max(Duration::from_secs(1));
    // Enough contacts in progress to keep every request permit busy, and at least a page
    // plus the children of the contacts still waiting on theirs.
    plan.listing = s.listing;
    // The largest page either listing brings.
    let page = plan.page_size.max(match s.listing {
        Listing::Get => 0,
        Listing::Search | Listing::Auto => plan.search_page,
    });
    plan.window = (conn.concurrency * 8).max(page as usize + 28);
    plan.restart = s.restart;
    plan.max_skipped = s.max_skipped;
    plan.children_by = s.children_by;
    plan.verify_sample = s.verify_sample;
    plan.custom_fields = s.custom_fields;
    plan.budget = s.budget.clone();
    if s.incremental {
        plan.incremental = Some(IncrementalPlan {
            state_dir: s.state_dir.clone().unwrap_or_else(|| s.out.join("_state")),
            full_refresh: s.full_refresh,
            overlap: s.overlap,
            full_walk_every: s.full_walk_every.max(1),
        });
    }
    plan.export_date = if s.partition_by_date {
        placement.export_date.clone()
    } else {
        None
    };
    if placement.shared_out {
        plan.manifest_path =
            Some(crate::checkpoint::state_dir(&s.out, location).join("manifest.json"));
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
    /// Where the run report goes (default `OUT/_report.json`).
    pub report: Option<PathBuf>,
}

/// An export ready to run: its plan and its client (whose counters a progress display reads).
pub struct Prepared {
    pub plan: ExportPlan,
    pub client: Arc<Client>,
    report: PathBuf,
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
        let placement = Placement {
            shared_out: false,
            export_date: None,
        };
        let plan = plan(
            &self.location,
            &self.settings,
            &self.conn,
            &placement,
            interrupt,
        );
        Ok(Prepared {
            report: self
                .report
                .clone()
                .unwrap_or_else(|| self.settings.out.join("_report.json")),
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
        if let Err(e) = report.write(&self.report) {
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
    tracing::info!(location = %plan.location_id, include = %plan.include, format = plan.format.extension(), out = %plan.out.display(), rate = ?client.limiter().effective_quota().map(|q| q.to_string()), "export started");
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
