//! Running an export pipeline: every location under one lock, each with its own client (its
//! own rate limiter and daily quota), one semaphore capping requests across all of them.

use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::{LocationTarget, Pipeline};
use crate::app::conn::TokenRef;
use crate::app::export::{execute, plan, ExportSettings, Placement};
use crate::app::outcome::{auth_outcome, code, Outcome};
use crate::app::report::{RunReport, Started};
use crate::export::{Interrupt, Progress};

/// `OUT/_pipeline_report.json`: the outcome of every location.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineReport {
    pub pipeline: String,
    pub file: String,
    /// `complete`, `partial` (some locations failed, or completed except listed records),
    /// `stopped` (quota), `interrupted` (SIGTERM or SIGINT: what was complete is committed;
    /// rerun to resume) or `failed`.
    pub status: String,
    pub exit_code: u8,
    pub started_at: String,
    pub finished_at: String,
    pub locations: Vec<RunReport>,
}

/// Runs an export pipeline over its locations, stopped by `interrupt` (SIGTERM, SIGINT: no
/// location starts after it is raised, the running ones commit what is complete). Returns
/// what it came to and its report (also written to `OUT/_pipeline_report.json`); `None` when
/// it never started (another run holds the pipeline's lock, or the OAuth settings are
/// unusable).
pub async fn run_export(
    p: &Pipeline,
    job: &ExportSettings,
    interrupt: &Interrupt,
) -> (Outcome, Option<PipelineReport>) {
    let lock_path = job
        .out
        .join("_state")
        .join(format!("pipeline-{}.lock", p.name));
    let _lock = match crate::durable::lock::RunLock::acquire(&lock_path) {
        Ok(l) => l,
        Err(e @ crate::durable::lock::LockError::Busy { .. }) => {
            return (Outcome::Busy(e.into()), None)
        }
        Err(e) => return (Outcome::from(anyhow::Error::from(e)), None),
    };
    let started = Started::now();
    let placement = Placement {
        shared_out: true,
        export_date: Some(started.at[..10].to_owned()),
    };
    let global = Arc::new(Semaphore::new(p.max_concurrency));
    let conn = &p.conn;
    // One OAuth provider for the whole run: the locations of an agency share its grant, so
    // its rotating refresh token is never spent twice.
    let provider = match &p.oauth {
        None => None,
        Some(o) => {
            let made = crate::auth::OAuthApp::load(
                &o.client_id,
                &o.client_secret_env,
                o.client_secret_file.as_deref(),
            )
            .and_then(|app| {
                let mut settings = crate::auth::OAuthSettings::new(
                    conn.base_url.clone(),
                    app,
                    o.token_store.clone(),
                );
                conn.limit_retries(&mut settings.retry);
                crate::auth::OAuthProvider::new(settings)
            });
            match made {
                Ok(provider) => Some(Arc::new(provider)),
                Err(e) => return (auth_outcome(e), None),
            }
        }
    };
    let mut locations = p.locations.clone();
    if let (Some(o), Some(provider)) = (&p.oauth, &provider) {
        if o.all_installed_locations {
            let installed = match provider.installed_locations(o.company_id.as_deref()).await {
                Ok(l) => l,
                Err(e) => return (auth_outcome(e), None),
            };
            for l in installed
                .into_iter()
                .filter(|l| l.is_installed != Some(false))
            {
                // The id goes into requests and names this location's directories: one the
                // server made up (`../x`, escape sequences) is skipped, not used.
                if let Err(why) = crate::api::check_id(&l.id) {
                    tracing::warn!(
                        "skipping an installed location: the id the server gave for it cannot be used: {}",
                        crate::term::escape(&why)
                    );
                    continue;
                }
                if !locations.iter().any(|x| x.id == l.id) {
                    locations.push(LocationTarget {
                        id: l.id,
                        token: TokenRef::OAuth,
                    });
                }
            }
        }
    }
    tracing::info!(pipeline = %p.name, locations = locations.len(), base_url = %conn.base_url, "pipeline started");

    let shared = Shared {
        conn,
        job,
        placement: &placement,
        global,
        provider,
        interrupt,
    };
    let runs = futures::stream::iter(locations)
        .map(|loc| {
            let shared = &shared;
            async move { shared.run_location(&loc).await }
        })
        .buffer_unordered(p.parallel_locations);
    let mut runs: Vec<(Outcome, RunReport)> = runs.collect().await;
    runs.sort_by(|a, b| a.1.location_id.cmp(&b.1.location_id));
    let (outcomes, reports): (Vec<Outcome>, Vec<RunReport>) = runs.into_iter().unzip();

    let skipped = reports.iter().map(|r| r.skipped.len() as u64).sum();
    let mut outcome = combine(outcomes, skipped);
    if let Outcome::Skipped { report, .. } = &mut outcome {
        *report = Some(job.out.join("_pipeline_report.json"));
    }
    let report = PipelineReport {
        pipeline: p.name.clone(),
        file: p.file.display().to_string(),
        status: outcome.status().into(),
        exit_code: outcome.exit_code(),
        started_at: started.at,
        finished_at: crate::timefmt::format_iso_millis(crate::export::now_millis()),
        locations: reports,
    };
    if let Err(e) = crate::durable::write(
        &job.out.join("_pipeline_report.json"),
        &serde_json::to_vec_pretty(&report).unwrap_or_default(),
    ) {
        return (Outcome::from(anyhow::Error::from(e)), Some(report));
    }
    for r in report.locations.iter().filter(|r| r.exit_code != code::OK) {
        tracing::warn!(location = %r.location_id, status = %r.status, exit_code = r.exit_code, error = r.error.as_deref().unwrap_or(""), "location did not complete");
    }
    tracing::info!(pipeline = %p.name, status = %report.status, "pipeline finished");
    (outcome, Some(report))
}

/// The pipeline's outcome from its locations' (in location order), of which `skipped` child
/// requests were skipped: an interruption wins; then all complete; all failed (as the first
/// location failed); some failed (partial); only quota stops; complete except listed records.
fn combine(outcomes: Vec<Outcome>, skipped: u64) -> Outcome {
    let of = outcomes.len();
    if let Some(signal) = outcomes.iter().find_map(|o| match o {
        Outcome::Interrupted(signal, _) => Some(*signal),
        _ => None,
    }) {
        return Outcome::Interrupted(
            signal,
            anyhow::anyhow!("the pipeline was interrupted by {signal}: complete pages are committed\nhint: rerun the same command to resume"),
        );
    }
    let is_failure = |o: &Outcome| {
        !matches!(
            o,
            Outcome::Complete | Outcome::Skipped { .. } | Outcome::Stopped(_)
        )
    };
    let failed = outcomes.iter().filter(|o| is_failure(o)).count();
    let stopped = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Stopped(_)))
        .count();
    if failed > 0 && failed == of {
        return outcomes
            .into_iter()
            .next()
            .expect("at least one location failed");
    }
    if failed > 0 {
        return Outcome::Partial { failed, of };
    }
    if stopped > 0 {
        return Outcome::Stopped(anyhow::anyhow!(
            "{stopped} of {of} locations stopped for the daily quota (see the pipeline report)\nhint: rerun the same command after the quota resets to resume them"
        ));
    }
    if skipped > 0 {
        return Outcome::Skipped {
            records: skipped,
            report: None,
        };
    }
    Outcome::Complete
}

/// What the locations of one pipeline run share.
struct Shared<'a> {
    conn: &'a crate::app::conn::Connection,
    job: &'a ExportSettings,
    placement: &'a Placement,
    global: Arc<Semaphore>,
    provider: Option<Arc<crate::auth::OAuthProvider>>,
    interrupt: &'a Interrupt,
}

impl Shared<'_> {
    async fn run_location(&self, loc: &LocationTarget) -> (Outcome, RunReport) {
        let started = Started::now();
        let plan = plan(&loc.id, self.job, self.conn, self.placement, self.interrupt);
        let state_dir = crate::checkpoint::state_dir(&self.job.out, &loc.id);
        let client = match (&loc.token, &self.provider) {
            (TokenRef::OAuth, Some(provider)) => match provider.for_location(&loc.id) {
                Ok(source) => self.conn.client_with(
                    crate::api::Token::new("oauth").expect("a constant valid token"),
                    Some(source),
                    Some(self.global.clone()),
                ),
                Err(e) => Err(Outcome::usage(e)),
            },
            (TokenRef::OAuth, None) => Err(Outcome::usage("no [auth.oauth] settings")),
            (t, _) => t.load().map_err(Outcome::usage).and_then(|token| {
                self.conn
                    .client_with(token, None, Some(self.global.clone()))
            }),
        };
        let (outcome, manifest, client) = match (self.interrupt.signal(), client) {
            // Stopped before this location's turn: nothing of it ran; what an earlier run
            // committed stays committed.
            (Some(signal), client) => {
                let contacts = crate::checkpoint::load(&crate::checkpoint::path(&state_dir))
                    .ok()
                    .flatten()
                    .filter(|ck| !ck.complete)
                    .map_or(0, |ck| ck.contacts_listed);
                let e = crate::export::ExportError::Interrupted { signal, contacts };
                (Outcome::Interrupted(signal, e.into()), None, client.ok())
            }
            (None, Err(outcome)) => (outcome, None, None),
            (None, Ok(client)) => {
                let (outcome, manifest) =
                    execute(client.clone(), &plan, Arc::new(Progress::default())).await;
                (outcome, manifest, Some(client))
            }
        };
        if let Some(m) = outcome.message() {
            tracing::warn!(location = %loc.id, error = %m, "location did not complete");
        }
        let report = RunReport::build(
            &plan,
            client.as_deref(),
            &started,
            &outcome,
            manifest.as_ref(),
            0,
        );
        // A location whose export lock another run holds did nothing: its report file is
        // that run's to write.
        if !matches!(outcome, Outcome::Busy(_)) {
            let _ = report.write(&state_dir.join("report.json"));
        }
        (outcome, report)
    }
}
