//! Running an export pipeline: every location under one lock, each with its own client (its
//! own rate limiter and daily quota), one semaphore capping requests across all of them. A
//! sharded run ([`super::shard`]) takes only its share of the locations, under its shard's own
//! lock and report.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::shard::{self, Shard};
use super::{LocationTarget, Pipeline};
use crate::app::conn::TokenRef;
use crate::app::export::{execute, plan, search_page_for, ExportSettings, Placement};
use crate::app::outcome::{auth_outcome, code, Outcome};
use crate::app::report::{RunReport, Started};
use crate::export::{Interrupt, Progress};

/// `OUT/_pipeline_report.json` (`OUT/_pipeline_report.shard-K-of-N.json` for a shard): the
/// outcome of every location it ran.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineReport {
    pub pipeline: String,
    pub file: String,
    /// The worker's shard (`--shard K/N`); absent from an unsharded run's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
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
    run_export_shard(p, job, None, interrupt).await
}

/// [`run_export`] of one shard's locations (all of them for `None`): the workers of one
/// pipeline each hold their shard's lock and write their shard's report, so they run side by
/// side; a location handed to two of them is refused by its own export lock in one.
pub async fn run_export_shard(
    p: &Pipeline,
    job: &ExportSettings,
    shard: Option<Shard>,
    interrupt: &Interrupt,
) -> (Outcome, Option<PipelineReport>) {
    let dest = match job.open_out() {
        Ok(d) => d,
        Err(outcome) => return (outcome, None),
    };
    let report_path = dest.root().join(shard::report_file(shard));
    let lock_path = dest
        .root()
        .join("_state")
        .join(shard::lock_file(&p.name, shard));
    // In the destination: for a bucket, two workers of one shard on two machines refuse
    // each other too.
    let _lock = match dest.lock(&lock_path) {
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
    if let Some(s) = shard {
        let of = locations.len();
        locations.retain(|l| s.owns(&l.id));
        if locations.is_empty() {
            tracing::info!(pipeline = %p.name, shard = %s, "shard {s} has no location (none of the pipeline's {of} hashes to it): nothing to do");
        } else {
            tracing::info!(pipeline = %p.name, shard = %s, "shard {s} runs {} of the pipeline's {of} locations", locations.len());
        }
    }
    tracing::info!(pipeline = %p.name, locations = locations.len(), base_url = %conn.base_url, "pipeline started");

    let running = p.parallel_locations.clamp(1, locations.len().max(1));
    let shared = Arc::new(Shared {
        conn: conn.clone(),
        job: job.clone(),
        search_page: search_page_for(running),
        placement,
        dest: dest.clone(),
        global,
        provider,
        interrupt: interrupt.clone(),
    });
    let mut runs = run_locations(&shared, locations, p.parallel_locations).await;
    runs.sort_by(|a, b| a.1.location_id.cmp(&b.1.location_id));
    let (outcomes, reports): (Vec<Outcome>, Vec<RunReport>) = runs.into_iter().unzip();

    let skipped = reports.iter().map(|r| r.skipped.len() as u64).sum();
    let mut outcome = combine(outcomes, skipped);
    if let Outcome::Skipped { report, .. } = &mut outcome {
        *report = Some(report_path.clone());
    }
    let report = PipelineReport {
        pipeline: p.name.clone(),
        file: p.file.display().to_string(),
        shard,
        status: outcome.status().into(),
        exit_code: outcome.exit_code(),
        started_at: started.at,
        finished_at: crate::timefmt::format_iso_millis(crate::export::now_millis()),
        locations: reports,
    };
    let written = crate::durable::write(
        &report_path,
        &serde_json::to_vec_pretty(&report).unwrap_or_default(),
    )
    .map_err(std::io::Error::from)
    .and_then(|()| dest.publish(&report_path));
    if let Err(e) = written {
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

/// Runs every location, `parallel` at once, each on a thread of its own (a worker takes the
/// next location when its last one is done) with its own single-threaded runtime; returns
/// their outcomes and reports in the order they finished.
///
/// Why threads: an export does blocking work on its async thread (files created, renamed and
/// fsynced at every checkpoint, the root certificates read for its client). On one shared
/// thread, every location waited for every other location's disk: with 200 locations the
/// start and the location-wide phase (a checkpoint per page) spent most of their time in
/// fsync, and each location used about 70% of its rate limit instead of 97%
/// (benches/agency.sh; BENCHMARKS.md, "Agency scale"). Each location still runs on one thread
/// (no cross-thread wake-ups on its paced requests); what the locations share (the global
/// semaphore, the OAuth provider, the interrupt) works across runtimes.
///
/// The first locations start a little apart ([`start_delay`]): equal locations started in
/// the same instant stay in step to the end, and 200 of them closed their parts and ran
/// their location-wide phases in the same few seconds on a 2-core machine, each waiting for
/// the others' CPU with its rate limit unused (the lowest location at 94.8% of its limit;
/// 97.1 to 98.4% with starts 20 ms apart, BENCHMARKS.md "Share, sixth pass"; with the
/// exporter stopped a tenth of the time (`STEAL=50/500` in the bench), 94.9 to 96.8% at
/// 20 ms and 97.2 to 97.6% at 50 ms, "Share, eighth pass").
///
/// A worker's runtime keeps running until every location is done: the shared OAuth client may
/// hold a connection opened on it that another location is using. A panic in a location is
/// carried to this thread and resumed here, as it would have been before. Locations that no
/// worker could take (no thread or runtime could be made) run here, as they did before.
async fn run_locations(
    shared: &Arc<Shared>,
    locations: Vec<LocationTarget>,
    parallel: usize,
) -> Vec<(Outcome, RunReport)> {
    type Ran = std::thread::Result<(Outcome, RunReport)>;
    let expected = locations.len();
    let workers = parallel.clamp(1, expected.max(1));
    let queue = Arc::new(std::sync::Mutex::new(locations.into_iter()));
    let next = |q: &std::sync::Mutex<std::vec::IntoIter<LocationTarget>>| {
        q.lock().unwrap_or_else(|e| e.into_inner()).next()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Ran>();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    for i in 0..workers {
        let (shared, queue, tx, mut done) =
            (shared.clone(), queue.clone(), tx.clone(), done_rx.clone());
        let work = move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return; // the other workers, or the pipeline's own thread, take its share
            };
            let delay = start_delay(i, workers);
            if !delay.is_zero() {
                rt.block_on(async {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = shared.interrupt.raised() => {}
                    }
                });
            }
            while let Some(loc) = next(&queue) {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    // On the heap: a location's export is a large future, and this thread's
                    // stack is a spawned thread's, not the main one's.
                    rt.block_on(Box::pin(shared.run_location(&loc)))
                }));
                if tx.send(ran).is_err() {
                    return;
                }
            }
            rt.block_on(async move {
                let _ = done.wait_for(|d| *d).await;
            });
        };
        if let Err(e) = std::thread::Builder::new()
            .name(format!("location-{i}"))
            // As much stack as the main thread had when the locations ran there (reserved,
            // not resident until used).
            .stack_size(8 << 20)
            .spawn(work)
        {
            tracing::debug!(error = %e, "cannot start a location thread; fewer locations run at once");
        }
    }
    drop(tx);
    let mut runs = Vec::with_capacity(expected);
    while runs.len() < expected {
        match rx.recv().await {
            Some(Ok(run)) => runs.push(run),
            Some(Err(panic)) => {
                let _ = done_tx.send(true);
                std::panic::resume_unwind(panic);
            }
            // Every worker has gone: what is left runs here.
            None => break,
        }
    }
    let _ = done_tx.send(true);
    let rest: Vec<LocationTarget> = std::iter::from_fn(|| next(&queue)).collect();
    let mut here: Vec<(Outcome, RunReport)> = futures::stream::iter(rest)
        .map(|loc| {
            let shared = &shared;
            async move { shared.run_location(&loc).await }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    runs.append(&mut here);
    runs
}

/// How far apart the first locations of a run start, at most: worker `i` takes its first
/// location `i` steps after the first worker. A location's CPU comes in bursts at known
/// points (its start; closing its parts and its location-wide phase at the end), and equal
/// locations paced alike reach them together. 50 ms apart, 20 locations start per second:
/// the ends of 200 equal locations (about 7 CPU seconds in all on the bench's 2 cores)
/// spread over 10 s and take about one core, where 20 ms apart packed them into 4 s with
/// both cores busy and the last locations waiting for them.
const START_STEP: Duration = Duration::from_millis(50);
/// The whole spread of the first starts, at most: more workers start closer together. A
/// location loses nothing while it waits (its rate limiter is made when it starts); only
/// the pipeline's wall time grows, by this much at most.
const START_SPREAD: Duration = Duration::from_secs(10);

/// How long worker `i` of `workers` waits before its first location (the workers' threads
/// start within a few milliseconds of each other). Later locations start when a worker is
/// free, already apart.
fn start_delay(i: usize, workers: usize) -> Duration {
    let gaps = u32::try_from(workers.saturating_sub(1)).unwrap_or(u32::MAX);
    if gaps == 0 {
        return Duration::ZERO;
    }
    let step = START_STEP.min(START_SPREAD / gaps);
    step * u32::try_from(i).unwrap_or(u32::MAX).min(gaps)
}

/// What the locations of one pipeline run share (each runs on its own thread).
struct Shared {
    conn: crate::app::conn::Connection,
    job: ExportSettings,
    /// Contacts per search page: fewer than the API's 500 when many locations run at once.
    search_page: u32,
    placement: Placement,
    dest: crate::dest::Dest,
    global: Arc<Semaphore>,
    provider: Option<Arc<crate::auth::OAuthProvider>>,
    interrupt: Interrupt,
}

impl Shared {
    async fn run_location(&self, loc: &LocationTarget) -> (Outcome, RunReport) {
        let started = Started::now();
        let mut plan = plan(
            &loc.id,
            &self.job,
            &self.dest,
            &self.conn,
            &self.placement,
            &self.interrupt,
        );
        plan.search_page = self.search_page;
        let state_dir = crate::checkpoint::state_dir(self.dest.root(), &loc.id);
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
            let path = state_dir.join("report.json");
            if report.write(&path).is_ok() {
                let _ = self.dest.publish(&path);
            }
        }
        (outcome, report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_whose_only_location_was_refused_busy_exits_busy() {
        let busy = || Outcome::Busy(anyhow::anyhow!("another run is in progress"));
        assert_eq!(combine(vec![busy()], 0).exit_code(), code::BUSY);
        // Beside a location that ran, it is a partial run.
        assert_eq!(
            combine(vec![Outcome::Complete, busy()], 0).exit_code(),
            code::PARTIAL
        );
        // A shard with no location has nothing left to do.
        assert_eq!(combine(vec![], 0).exit_code(), code::OK);
    }

    #[test]
    fn the_first_locations_start_a_step_apart_within_the_spread() {
        assert_eq!(start_delay(0, 1), Duration::ZERO);
        assert_eq!(start_delay(0, 200), Duration::ZERO);
        // 200 at once: 50 ms apart, the last after 9.95 s.
        assert_eq!(start_delay(1, 200), START_STEP);
        assert_eq!(start_delay(199, 200), START_STEP * 199);
        assert_eq!(start_delay(199, 200), Duration::from_millis(9_950));
        // More than the spread holds at 50 ms: closer, the last at the spread's end.
        let many = 2_000;
        assert!(start_delay(1, many) < START_STEP);
        let last = start_delay(many - 1, many);
        assert!(
            last <= START_SPREAD && last > START_SPREAD - START_STEP,
            "{last:?}"
        );
        for workers in [2, 7, 200, 201, 202, 2_000, 100_000] {
            let delays: Vec<Duration> = (0..workers).map(|i| start_delay(i, workers)).collect();
            assert!(delays.windows(2).all(|w| w[0] < w[1]), "{workers} workers");
            assert!(delays[workers - 1] <= START_SPREAD, "{workers} workers");
        }
    }
}
