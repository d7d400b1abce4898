//! The machine-readable run report: written after every run, whatever its outcome.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::api::{Client, StatsSnapshot};
use crate::export::{ExportPlan, Manifest, Resources};

/// `OUT/_report.json` (or `--report FILE`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub tool: String,
    pub command: String,
    pub location_id: String,
    /// `complete`, `partial` (complete except the requests under `skipped`), `stopped` (daily
    /// quota or budget: resume later), `interrupted` (SIGTERM or SIGINT: what was complete is
    /// committed; rerun to resume) or `failed`.
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
}

impl RunReport {
    pub fn build(
        plan: &ExportPlan,
        client: &Client,
        started: (String, std::time::Instant),
        result: &anyhow::Result<Manifest>,
        resumed_from: u64,
    ) -> RunReport {
        let secs = started.1.elapsed().as_secs_f64();
        let exit_code = match result {
            Ok(m) if !m.skipped.is_empty() => super::exit::SKIPPED,
            Ok(_) => super::exit::OK,
            Err(e) => super::exit::code_for(e),
        };
        let status = match exit_code {
            super::exit::OK => "complete",
            super::exit::SKIPPED => "partial",
            super::exit::QUOTA => "stopped",
            c if super::exit::is_interrupted(c) => "interrupted",
            _ => "failed",
        };
        let ck = crate::checkpoint::load(&crate::checkpoint::path(&crate::checkpoint::state_dir(
            &plan.out,
            &plan.location_id,
        )))
        .ok()
        .flatten();
        let (rows, listed) = match (result, &ck) {
            (Ok(m), _) => (
                m.entities
                    .iter()
                    .map(|(k, v)| (k.clone(), v.rows))
                    .collect(),
                m.contacts_listed,
            ),
            (Err(_), Some(ck)) => (
                ck.entities
                    .iter()
                    .map(|(k, v)| (k.clone(), v.rows))
                    .collect(),
                ck.contacts_listed,
            ),
            _ => (BTreeMap::new(), 0),
        };
        let skipped = match (result, &ck) {
            (Ok(m), _) => m.skipped.clone(),
            (Err(_), Some(ck)) => ck.skipped.clone(),
            _ => Vec::new(),
        };
        let requests = client.stats().snapshot();
        let quota = client.limiter().effective_quota();
        let (daily_remaining, daily_limit) = client.limiter().daily();
        RunReport {
            tool: concat!("contacts-etl ", env!("CARGO_PKG_VERSION")).into(),
            command: "export".into(),
            location_id: plan.location_id.clone(),
            status: status.into(),
            exit_code,
            error: result.as_ref().err().map(|e| format!("{e:#}")),
            started_at: started.0,
            finished_at: crate::timefmt::format_iso_millis(crate::export::now_millis()),
            duration_secs: secs,
            resumed: resumed_from > 0 || ck.as_ref().is_some_and(|c| c.resumed > 0 && !c.complete),
            incremental: plan.incremental.is_some(),
            out: plan.out.display().to_string(),
            manifest: result
                .as_ref()
                .ok()
                .map(|_| plan.manifest_path().display().to_string()),
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
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), crate::checkpoint::CheckpointError> {
        crate::checkpoint::write_atomic(path, &serde_json::to_vec_pretty(self).unwrap_or_default())
    }
}
