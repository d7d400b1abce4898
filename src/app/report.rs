//! The machine-readable run report of one location's export: written after every run,
//! whatever its outcome (`OUT/_report.json`, or `OUT/_state/location_id=<id>/report.json` in a
//! pipeline, which also gathers them into its own report).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::outcome::Outcome;
use crate::api::{Client, StatsSnapshot};
use crate::checkpoint::Checkpoint;
use crate::estimate::{CostInput, Estimate};
use crate::export::{ExportPlan, Manifest, Resources};
use crate::incremental::RunKind;

/// `OUT/_report.json` (or `--report FILE`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub tool: String,
    pub command: String,
    pub location_id: String,
    /// `complete`, `partial` (complete except the records under `skipped`), `stopped` (daily
    /// quota or budget: resume later), `interrupted` (SIGTERM or SIGINT: what was complete is
    /// committed; rerun to resume), `busy` (another run held the lock: in a pipeline's report
    /// only) or `failed`.
    pub status: String,
    pub exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_secs: f64,
    /// This run continued an unfinished checkpoint.
    pub resumed: bool,
    pub incremental: bool,
    /// Which contacts the run lists: `full`, `walk` (incremental: every contact listed,
    /// deletions found), `filtered` (incremental: only contacts updated since
    /// `changedSince`) or `events` (`--from-events`: only the contacts events named); absent
    /// when the run stopped before deciding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<String>,
    /// How contacts were listed: `search`, `get` or `business`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listing: Option<String>,
    pub out: String,
    /// The manifest, when the run completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Rows committed per entity (for an unfinished run: so far, all attempts included).
    pub rows: BTreeMap<String, u64>,
    pub contacts_listed: u64,
    /// Child requests the API refused for good (committed so far, for an unfinished run).
    pub skipped: Vec<crate::fanout::SkippedRequest>,
    /// Requests of this run, by kind, with retries and 429s.
    pub requests: StatsSnapshot,
    /// What `contacts-etl plan`'s model gives for this run (the contacts it listed, its kind,
    /// listing and children strategy), beside `requests.attempts`; absent before the run
    /// chose its listing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// An events run (`--from-events`): what a listing-based incremental run would have spent
    /// on the contacts this run fetched (a filtered search, then their children: tasks through
    /// the location-wide search unless `--children-by contact`, notes and appointments per
    /// contact), beside `requests.attempts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listing_estimate: Option<Estimate>,
    /// Share of the rate limit in force that this run used (successful requests / allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_limit: Option<u64>,
    pub resources: Resources,
    /// How tasks and appointments were fetched (the manifest's `childrenBy`; so far, for an
    /// unfinished run); absent with `--children-by contact`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub children_by: BTreeMap<String, crate::export::ChildrenReport>,
}

/// When a run started: the wall-clock time for the report, the instant for its duration.
#[derive(Clone, Debug)]
pub struct Started {
    pub at: String,
    pub instant: Instant,
}

impl Started {
    pub fn now() -> Started {
        Started {
            at: crate::timefmt::format_iso_millis(crate::export::now_millis()),
            instant: Instant::now(),
        }
    }
}

impl RunReport {
    /// The report of a run of `plan` that came to `outcome`. `client` is `None` when none
    /// could be made (no token): the report then shows no requests.
    pub fn build(
        plan: &ExportPlan,
        client: Option<&Client>,
        started: &Started,
        outcome: &Outcome,
        manifest: Option<&Manifest>,
        resumed_from: u64,
    ) -> RunReport {
        let secs = started.instant.elapsed().as_secs_f64();
        let ck = crate::checkpoint::load(&crate::checkpoint::path(&crate::checkpoint::state_dir(
            plan.out(),
            &plan.location_id,
        )))
        .ok()
        .flatten();
        let (rows, listed) = match (manifest, &ck) {
            (Some(m), _) => (
                m.entities
                    .iter()
                    .map(|(k, v)| (k.clone(), v.rows))
                    .collect(),
                m.contacts_listed,
            ),
            (None, Some(ck)) => (
                ck.entities
                    .iter()
                    .map(|(k, v)| (k.clone(), v.rows))
                    .collect(),
                ck.contacts_listed,
            ),
            _ => (BTreeMap::new(), 0),
        };
        let skipped = match (manifest, &ck) {
            (Some(m), _) => m.skipped.clone(),
            (None, Some(ck)) => ck.skipped.clone(),
            _ => Vec::new(),
        };
        let children_by = match (manifest, &ck) {
            (Some(m), _) => m.children_by.clone(),
            (None, Some(ck)) => crate::export::children_report(ck),
            _ => BTreeMap::new(),
        };
        let requests = client.map(|c| c.stats().snapshot()).unwrap_or_default();
        let quota = client.and_then(|c| c.limiter().effective_quota());
        let (daily_remaining, daily_limit) = client.map_or((None, None), |c| c.limiter().daily());
        RunReport {
            tool: concat!("contacts-etl ", env!("CARGO_PKG_VERSION")).into(),
            command: "export".into(),
            location_id: plan.location_id.clone(),
            status: outcome.status().into(),
            exit_code: outcome.exit_code(),
            error: match outcome {
                Outcome::Complete | Outcome::Skipped { .. } => None,
                other => other.message(),
            },
            started_at: started.at.clone(),
            finished_at: crate::timefmt::format_iso_millis(crate::export::now_millis()),
            duration_secs: secs,
            resumed: resumed_from > 0 || ck.as_ref().is_some_and(|c| c.resumed > 0 && !c.complete),
            incremental: plan.incremental.is_some(),
            run_kind: ck
                .as_ref()
                .and_then(|c| c.run_kind)
                .map(|k| k.name().into()),
            changed_since: match ck.as_ref().and_then(|c| c.run_kind) {
                Some(RunKind::Filtered { since_ms, .. }) => {
                    Some(crate::timefmt::format_iso_millis(since_ms))
                }
                _ => None,
            },
            listing: ck.as_ref().and_then(|c| c.listing_used.clone()),
            estimate: ck.as_ref().and_then(|c| estimate_of_run(plan, c)),
            listing_estimate: ck.as_ref().and_then(|c| listing_estimate(plan, c)),
            out: plan.dest.describe(),
            manifest: manifest.map(|_| plan.manifest_path().display().to_string()),
            rows,
            contacts_listed: listed,
            skipped,
            rate_limit_share: quota
                .filter(|_| secs > 0.0)
                .map(|q| requests.succeeded() as f64 / (q.per_second() * secs)),
            rate_limit: quota.map(|q| q.to_string()),
            requests,
            daily_remaining,
            daily_limit,
            resources: Resources::now(),
            children_by,
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), crate::durable::WriteError> {
        crate::durable::write(path, &serde_json::to_vec_pretty(self).unwrap_or_default())
    }
}

/// What the model gives for a run as its checkpoint describes it: the contacts it listed,
/// its kind, its listing and how its children came. The run report puts it beside the
/// requests the run spent. `None` before the run decided its listing.
fn estimate_of_run(plan: &ExportPlan, ck: &Checkpoint) -> Option<Estimate> {
    let kind = ck.run_kind?;
    let listing = ck.listing_used.as_deref()?;
    let wide = |entity: &str| ck.wide.as_ref().and_then(|w| w.entities.get(entity));
    let written = ck.entities.get("contacts").map_or(0, |e| e.rows);
    Some(Estimate::of(&CostInput {
        contacts: ck.contacts_listed,
        changed: match kind {
            RunKind::Full => None,
            RunKind::Walk | RunKind::Filtered { .. } | RunKind::Events { .. } => Some(written),
        },
        kind,
        search: listing == "search",
        search_page: plan.search_page,
        include: plan.include,
        tasks_by_location: wide("tasks").is_some(),
        appointments_by_location: wide("appointments").is_some(),
        verify_sample: plan.verify_sample,
        calendars: wide("appointments")
            .and_then(|e| e.events_plan.as_ref())
            .map(|p| p.calendars.len() as u64),
        now_ms: crate::export::now_millis(),
    }))
}

/// What a filtered run would have spent on an events run's contacts (see
/// [`RunReport::listing_estimate`]); `None` for other runs.
fn listing_estimate(plan: &ExportPlan, ck: &Checkpoint) -> Option<Estimate> {
    let filtered = match ck.run_kind? {
        RunKind::Events { nth } => RunKind::Filtered {
            since_ms: ck.events.map_or(0, |e| e.since_ms),
            nth,
        },
        _ => return None,
    };
    let by_location = plan.children_by != crate::wide::ChildrenBy::Contact;
    Some(Estimate::of(&CostInput {
        contacts: ck.contacts_listed,
        changed: Some(ck.contacts_listed),
        kind: filtered,
        search: true,
        search_page: plan.search_page,
        include: plan.include,
        tasks_by_location: by_location && plan.include.tasks,
        appointments_by_location: false,
        verify_sample: if by_location { plan.verify_sample } else { 0.0 },
        calendars: None,
        now_ms: crate::export::now_millis(),
    }))
}
