//! Declarative pipelines: `contacts-etl run pipelines/<name>.toml` for unattended runs over
//! one or many locations.
//!
//! A file is parsed strictly ([`config`]), checked into a [`Pipeline`] (every error names the
//! file, line and key), then run under a lock ([`lock`]): each location gets its own client,
//! so its own rate limiter and daily quota (that is how the API counts), while one semaphore
//! caps requests in flight across all of them. One location failing does not stop the
//! others; the pipeline report says which failed and why, and the exit code says the run was
//! partial.

pub mod config;
pub mod lock;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::api::{Client, ClientConfig, Token, DEFAULT_BASE_URL};
use crate::cli::{exit, RunReport};
use crate::export::{Budget, ExportPlan, IncrementalPlan, Progress};
use crate::fanout::Include;
use crate::ratelimit::Quota;
use crate::sink::Format;
use config::{ConfigError, Source};

/// Where a location's token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRef {
    Env(String),
    File(PathBuf),
    /// From the pipeline's OAuth token store (a location grant, or the agency's).
    OAuth,
}

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
    pub base_url: String,
    pub rate_limit: Option<Quota>,
    pub concurrency: usize,
    pub max_concurrency: usize,
    pub parallel_locations: usize,
    pub timeout: Duration,
    /// HTTP limits of every client (see `ConnArgs`: --max-retry-wait, --request-deadline,
    /// --max-response-bytes).
    pub max_retry_wait: Duration,
    pub request_deadline: Duration,
    pub max_response_bytes: u64,
    pub locations: Vec<LocationTarget>,
    pub oauth: Option<OAuthConf>,
    pub job: Job,
}

#[derive(Clone, Debug)]
pub enum Job {
    Export(ExportJob),
    /// An import, run as the equivalent `contacts-etl import …` arguments.
    Import(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct ExportJob {
    pub out: PathBuf,
    pub format: Format,
    pub include: Include,
    pub businesses: Vec<String>,
    pub incremental: bool,
    pub state_dir: Option<PathBuf>,
    pub partition_by_date: bool,
    pub budget: Budget,
    pub part_contacts: u64,
    pub commit_interval: Duration,
}

/// Reads and checks a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        key: "-".into(),
        message: format!("cannot read the file: {e}"),
    })?;
    let src = Source {
        file: path,
        text: &text,
    };
    let f = config::parse(&src)?;
    check(&src, f)
}

fn positive(
    src: &Source<'_>,
    v: &Option<toml::Spanned<i64>>,
    key: &str,
    default: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if (1..=max).contains(s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(src.at(
            s,
            key,
            format!("{} is out of range: expected 1 to {max}", s.get_ref()),
        )),
    }
}

/// Relative paths in a pipeline file are relative to the file's own directory, so a scheduled
/// run finds them whatever its working directory.
fn resolve(src: &Source<'_>, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    src.file
        .parent()
        .map_or_else(|| p.to_path_buf(), |d| d.join(p))
}

fn check(src: &Source<'_>, f: config::PipelineFile) -> Result<Pipeline, ConfigError> {
    let name = match &f.name {
        Some(n)
            if n.get_ref().trim().is_empty()
                || !n
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            return Err(src.at(
                n,
                "name",
                "use letters, digits, '-', '_' or '.' (it names the lock and report files)",
            ));
        }
        Some(n) => n.get_ref().clone(),
        None => src
            .file
            .file_stem()
            .map_or_else(|| "pipeline".into(), |s| s.to_string_lossy().into_owned()),
    };
    let api = &f.api;
    let rate_limit = match &api.rate_limit {
        None => Some(Quota::API_DEFAULT),
        Some(r) if r.get_ref().trim().eq_ignore_ascii_case("off") => None,
        Some(r) => Some(
            r.get_ref()
                .parse::<Quota>()
                .map_err(|e| src.at(r, "rate_limit", e))?,
        ),
    };
    let base_url = match &api.base_url {
        Some(u) => {
            if reqwest::Url::parse(u.get_ref()).is_err() {
                return Err(src.at(u, "base_url", format!("'{}' is not a URL", u.get_ref())));
            }
            u.get_ref().clone()
        }
        None => DEFAULT_BASE_URL.into(),
    };
    let concurrency = positive(src, &api.concurrency, "concurrency", 4, 256)? as usize;
    let max_concurrency =
        positive(src, &api.max_concurrency, "max_concurrency", 64, 4096)? as usize;
    let parallel_locations =
        positive(src, &api.parallel_locations, "parallel_locations", 8, 1024)? as usize;
    let timeout =
        Duration::from_secs(positive(src, &api.timeout_secs, "timeout_secs", 60, 3600)? as u64);
    let max_retry_wait = Duration::from_secs(positive(
        src,
        &api.max_retry_wait_secs,
        "max_retry_wait_secs",
        300,
        86_400,
    )? as u64);
    let request_deadline = Duration::from_secs(positive(
        src,
        &api.request_deadline_secs,
        "request_deadline_secs",
        900,
        604_800,
    )? as u64);
    let max_response_bytes = positive(
        src,
        &api.max_response_bytes,
        "max_response_bytes",
        crate::api::DEFAULT_MAX_RESPONSE_BYTES as i64,
        1 << 40,
    )? as u64;

    if let Some(t) = &f.auth.token {
        return Err(src.at(t, "token", "a token must not be written in a pipeline file: name an environment variable (token_env) or a file (token_file)"));
    }
    let oauth = match &f.auth.oauth {
        None => None,
        Some(o) => {
            let client_id = match (&o.get_ref().client_id, &o.get_ref().client_id_env) {
                (Some(id), None) => id.get_ref().clone(),
                (None, Some(var)) => std::env::var(var.get_ref()).unwrap_or_default(),
                _ => {
                    return Err(src.at(o, "oauth", "give client_id or client_id_env (exactly one)"))
                }
            };
            Some(OAuthConf {
                token_store: resolve(src, o.get_ref().token_store.get_ref()),
                client_id,
                client_secret_env: o
                    .get_ref()
                    .client_secret_env
                    .as_ref()
                    .map_or_else(|| "HL_CLIENT_SECRET".to_owned(), |v| v.get_ref().clone()),
                client_secret_file: o
                    .get_ref()
                    .client_secret_file
                    .as_ref()
                    .map(|p| resolve(src, p.get_ref())),
                company_id: o.get_ref().company_id.as_ref().map(|c| c.get_ref().clone()),
                all_installed_locations: o.get_ref().all_installed_locations,
            })
        }
    };
    let default_token = match (&f.auth.token_env, &f.auth.token_file) {
        (None, None) if oauth.is_some() => Some(TokenRef::OAuth),
        (Some(e), None) => Some(TokenRef::Env(e.get_ref().clone())),
        (None, Some(p)) => Some(TokenRef::File(resolve(src, p.get_ref()))),
        (Some(e), Some(_)) => {
            return Err(src.at(e, "token_env", "give token_env or token_file, not both"))
        }
        (None, None) => None,
    };
    if f.locations.is_empty() && !oauth.as_ref().is_some_and(|o| o.all_installed_locations) {
        return Err(src.error(
            src.text.len(),
            "locations",
            "no locations: add a [[locations]] table with an id for each location to run",
        ));
    }
    let mut locations = Vec::new();
    for l in &f.locations {
        let id = l.id.get_ref().trim().to_owned();
        if let Err(e) = crate::api::check_id(&id) {
            return Err(src.at(&l.id, "id", format!("not a location id: {e}")));
        }
        if locations.iter().any(|x: &LocationTarget| x.id == id) {
            return Err(src.at(&l.id, "id", format!("location {id} is listed twice")));
        }
        let token = match (&l.token_env, &l.token_file) {
            (Some(e), None) => TokenRef::Env(e.get_ref().clone()),
            (None, Some(p)) => TokenRef::File(resolve(src, p.get_ref())),
            (Some(e), Some(_)) => {
                return Err(src.at(e, "token_env", "give token_env or token_file, not both"))
            }
            (None, None) => default_token.clone().ok_or_else(|| {
                src.at(
                    &l.id,
                    "id",
                    format!(
                        "no token for location {id}: set token_env or token_file here or in [auth]"
                    ),
                )
            })?,
        };
        locations.push(LocationTarget { id, token });
    }

    let job = match (&f.export, &f.import) {
        (Some(e), None) => Job::Export(check_export(src, e)?),
        (None, Some(i)) => {
            if locations.len() != 1 {
                return Err(src.error(
                    0,
                    "locations",
                    "an import pipeline loads into exactly one location",
                ));
            }
            Job::Import(import_args(src, i, &locations[0].id)?)
        }
        (Some(_), Some(i)) => {
            return Err(src.at(
                &i.input,
                "import",
                "a pipeline has an [export] or an [import] section, not both",
            ))
        }
        (None, None) => {
            return Err(src.error(
                src.text.len(),
                "export",
                "nothing to do: add an [export] or an [import] section",
            ))
        }
    };
    if let (Job::Import(_), Some(TokenRef::OAuth)) = (&job, locations.first().map(|l| &l.token)) {
        return Err(src.error(
            0,
            "oauth",
            "an import pipeline reads its token from HL_TOKEN or a token_file",
        ));
    }
    Ok(Pipeline {
        name,
        file: src.file.to_path_buf(),
        base_url,
        rate_limit,
        concurrency,
        max_concurrency,
        parallel_locations,
        timeout,
        max_retry_wait,
        request_deadline,
        max_response_bytes,
        locations,
        oauth,
        job,
    })
}

fn check_export(src: &Source<'_>, e: &config::ExportSection) -> Result<ExportJob, ConfigError> {
    let format = match &e.format {
        None => Format::Parquet,
        Some(f) => match f.get_ref().as_str() {
            "parquet" => Format::Parquet,
            "csv" => Format::Csv,
            other => {
                return Err(src.at(
                    f,
                    "format",
                    format!("'{other}' is not a format: use parquet or csv"),
                ))
            }
        },
    };
    let include = match &e.include {
        None => Include::ALL,
        Some(list) => list
            .get_ref()
            .join(",")
            .parse::<Include>()
            .map_err(|m| src.at(list, "include", m))?,
    };
    let reserve = match &e.daily_reserve_percent {
        None => 0.05,
        Some(r) if (0.0..100.0).contains(r.get_ref()) => r.get_ref() / 100.0,
        Some(r) => {
            return Err(src.at(
                r,
                "daily_reserve_percent",
                format!("{} is not a percentage below 100", r.get_ref()),
            ))
        }
    };
    let daily_budget = match &e.daily_budget {
        None => None,
        Some(_) => Some(positive(src, &e.daily_budget, "daily_budget", 1, i64::MAX)? as u64),
    };
    if e.out.get_ref().as_os_str().is_empty() {
        return Err(src.at(&e.out, "out", "the output directory is empty"));
    }
    Ok(ExportJob {
        out: resolve(src, e.out.get_ref()),
        format,
        include,
        businesses: e
            .businesses
            .iter()
            .map(|b| {
                crate::api::check_id(b.get_ref())
                    .map(|()| b.get_ref().clone())
                    .map_err(|m| src.at(b, "businesses", format!("not a business id: {m}")))
            })
            .collect::<Result<_, _>>()?,
        incremental: e.incremental,
        state_dir: e.state_dir.as_ref().map(|s| resolve(src, s.get_ref())),
        partition_by_date: e.partition_by_date,
        budget: Budget {
            max_requests: daily_budget,
            reserve,
        },
        part_contacts: positive(src, &e.part_contacts, "part_contacts", 250_000, i64::MAX)? as u64,
        commit_interval: Duration::from_secs(positive(
            src,
            &e.commit_interval_secs,
            "commit_interval_secs",
            600,
            86_400,
        )? as u64),
    })
}

/// The `import` command line the section stands for.
fn import_args(
    src: &Source<'_>,
    i: &config::ImportSection,
    location: &str,
) -> Result<Vec<String>, ConfigError> {
    let entity = match &i.entity {
        None => "contacts".to_owned(),
        Some(e) if ["contacts", "tasks", "notes"].contains(&e.get_ref().as_str()) => {
            e.get_ref().clone()
        }
        Some(e) => {
            return Err(src.at(
                e,
                "entity",
                format!(
                    "'{}' cannot be imported: use contacts, tasks or notes",
                    e.get_ref()
                ),
            ))
        }
    };
    let mut args = vec![
        "import".to_owned(),
        entity.clone(),
        "--location".into(),
        location.to_owned(),
        "--input".into(),
        resolve(src, i.input.get_ref()).display().to_string(),
    ];
    let path_opt = |args: &mut Vec<String>, flag: &str, v: &Option<toml::Spanned<PathBuf>>| {
        if let Some(p) = v {
            args.push(flag.into());
            args.push(resolve(src, p.get_ref()).display().to_string());
        }
    };
    path_opt(&mut args, "--mapping", &i.mapping);
    path_opt(&mut args, "--journal", &i.journal);
    path_opt(&mut args, "--rejects", &i.rejects);
    if i.dry_run {
        args.push("--dry-run".into());
    }
    if let Some(d) = &i.on_duplicate {
        if entity != "contacts" || !["update", "skip", "fail"].contains(&d.get_ref().as_str()) {
            return Err(src.at(
                d,
                "on_duplicate",
                "use update, skip or fail (contacts imports only)",
            ));
        }
        args.push("--on-duplicate".into());
        args.push(d.get_ref().clone());
    }
    if let Some(c) = &i.default_country {
        args.push("--default-country".into());
        args.push(c.get_ref().clone());
    }
    Ok(args)
}

impl TokenRef {
    fn load(&self) -> Result<Token, String> {
        match self {
            TokenRef::Env(var) => {
                let raw = std::env::var(var).map_err(|_| {
                    format!(
                        "the environment variable {var} (named by the pipeline file) is not set"
                    )
                })?;
                Token::new(&raw).map_err(|e| format!("{var}: {e}"))
            }
            TokenRef::File(p) => {
                let raw = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read the token file {}: {e}", p.display()))?;
                Token::new(&raw).map_err(|e| format!("token file {}: {e}", p.display()))
            }
            TokenRef::OAuth => Err("an OAuth location has no static token".into()),
        }
    }
}

/// `OUT/_pipeline_report.json`: the outcome of every location.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineReport {
    pub pipeline: String,
    pub file: String,
    /// `complete`, `partial` (some locations failed), `stopped` (quota) or `failed`.
    pub status: String,
    pub exit_code: u8,
    pub started_at: String,
    pub finished_at: String,
    pub locations: Vec<RunReport>,
}

impl Pipeline {
    /// The base URL to use: `HL_BASE_URL` overrides the file.
    fn effective_base_url(&self) -> String {
        std::env::var(crate::cli::env::HL_BASE_URL)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.base_url.clone())
    }
}

/// Runs an export pipeline over its locations and returns its report (also written to
/// `OUT/_pipeline_report.json`). The exit code is in the report.
pub async fn run_export(p: &Pipeline, job: &ExportJob) -> anyhow::Result<PipelineReport> {
    let lock_path = job
        .out
        .join("_state")
        .join(format!("pipeline-{}.lock", p.name));
    let _lock = lock::RunLock::acquire(&lock_path)?;
    let started = crate::timefmt::format_iso_millis(crate::export::now_millis());
    let export_date = job.partition_by_date.then(|| started[..10].to_owned());
    let global = Arc::new(Semaphore::new(p.max_concurrency));
    let base_url = p.effective_base_url();
    // One OAuth provider for the whole run: the locations of an agency share its grant, so
    // its rotating refresh token is never spent twice.
    let provider = match &p.oauth {
        None => None,
        Some(o) => {
            let app = crate::auth::OAuthApp::load(
                &o.client_id,
                &o.client_secret_env,
                o.client_secret_file.as_deref(),
            )
            .map_err(crate::auth::cli::into_anyhow)?;
            let settings =
                crate::auth::OAuthSettings::new(base_url.clone(), app, o.token_store.clone());
            Some(Arc::new(
                crate::auth::OAuthProvider::new(settings).map_err(crate::auth::cli::into_anyhow)?,
            ))
        }
    };
    let mut locations = p.locations.clone();
    if let (Some(o), Some(provider)) = (&p.oauth, &provider) {
        if o.all_installed_locations {
            let installed = provider
                .installed_locations(o.company_id.as_deref())
                .await
                .map_err(crate::auth::cli::into_anyhow)?;
            for l in installed
                .into_iter()
                .filter(|l| l.is_installed != Some(false))
            {
                if !locations.iter().any(|x| x.id == l.id) {
                    locations.push(LocationTarget {
                        id: l.id,
                        token: TokenRef::OAuth,
                    });
                }
            }
        }
    }
    tracing::info!(pipeline = %p.name, locations = locations.len(), base_url = %base_url, "pipeline started");

    let runs = futures::stream::iter(locations)
        .map(|loc| {
            let global = global.clone();
            let base_url = base_url.clone();
            let export_date = export_date.clone();
            let provider = provider.clone();
            async move { run_location(p, job, &loc, &base_url, global, export_date, provider).await }
        })
        .buffer_unordered(p.parallel_locations);
    let mut reports: Vec<RunReport> = runs.collect().await;
    reports.sort_by(|a, b| a.location_id.cmp(&b.location_id));

    let failed = reports
        .iter()
        .filter(|r| r.exit_code != exit::OK && r.exit_code != exit::QUOTA)
        .count();
    let stopped = reports
        .iter()
        .filter(|r| r.exit_code == exit::QUOTA)
        .count();
    let (status, code) = if failed == 0 && stopped == 0 {
        ("complete", exit::OK)
    } else if failed == reports.len() {
        (
            "failed",
            reports.first().map_or(exit::FAILURE, |r| r.exit_code),
        )
    } else if failed == 0 {
        ("stopped", exit::QUOTA)
    } else {
        ("partial", exit::PARTIAL)
    };
    let report = PipelineReport {
        pipeline: p.name.clone(),
        file: p.file.display().to_string(),
        status: status.into(),
        exit_code: code,
        started_at: started,
        finished_at: crate::timefmt::format_iso_millis(crate::export::now_millis()),
        locations: reports,
    };
    crate::checkpoint::write_atomic(
        &job.out.join("_pipeline_report.json"),
        &serde_json::to_vec_pretty(&report).unwrap_or_default(),
    )?;
    for r in report.locations.iter().filter(|r| r.exit_code != exit::OK) {
        tracing::warn!(location = %r.location_id, status = %r.status, exit_code = r.exit_code, error = r.error.as_deref().unwrap_or(""), "location did not complete");
    }
    tracing::info!(pipeline = %p.name, status, "pipeline finished");
    Ok(report)
}

async fn run_location(
    p: &Pipeline,
    job: &ExportJob,
    loc: &LocationTarget,
    base_url: &str,
    global: Arc<Semaphore>,
    export_date: Option<String>,
    provider: Option<Arc<crate::auth::OAuthProvider>>,
) -> RunReport {
    let started = (
        crate::timefmt::format_iso_millis(crate::export::now_millis()),
        std::time::Instant::now(),
    );
    let mut plan = ExportPlan::new(loc.id.clone(), job.format, job.out.clone());
    plan.include = job.include;
    plan.businesses = job.businesses.clone();
    plan.part_contacts = job.part_contacts;
    plan.commit_interval = job.commit_interval;
    plan.budget = job.budget.clone();
    plan.window = (p.concurrency * 8).max(128);
    plan.export_date = export_date;
    plan.manifest_path =
        Some(crate::checkpoint::state_dir(&job.out, &loc.id).join("manifest.json"));
    if job.incremental {
        plan.incremental = Some(IncrementalPlan {
            state_dir: job
                .state_dir
                .clone()
                .unwrap_or_else(|| job.out.join("_state")),
            full_refresh: false,
        });
    }
    // A client is built even when the token is missing, so the report has one shape.
    let (token, source) = match (&loc.token, &provider) {
        (TokenRef::OAuth, Some(provider)) => match provider.for_location(&loc.id) {
            Ok(source) => (
                Ok(Token::new("oauth").expect("a constant valid token")),
                Some(source),
            ),
            Err(e) => (Err(e.to_string()), None),
        },
        (TokenRef::OAuth, None) => (Err("no [auth.oauth] settings".to_owned()), None),
        (t, _) => (t.load(), None),
    };
    let mut cfg = ClientConfig::new(
        base_url.to_owned(),
        token
            .clone()
            .unwrap_or_else(|_| Token::new("missing").expect("a constant valid token")),
    );
    if let Some(source) = source {
        cfg.token = source;
    }
    cfg.rate_limit = p.rate_limit;
    cfg.concurrency = p.concurrency;
    cfg.timeout = p.timeout;
    cfg.retry.max_wait = p.max_retry_wait;
    cfg.retry.deadline = p.request_deadline;
    cfg.max_response_bytes = p.max_response_bytes;
    cfg.global_permits = Some(global);
    let client = match Client::new(cfg) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let fallback = Arc::new(
                Client::new(ClientConfig::new(
                    "https://invalid.example",
                    Token::new("x").expect("constant"),
                ))
                .expect("a valid constant configuration"),
            );
            return RunReport::build(
                &plan,
                &fallback,
                started,
                &Err(exit::UsageError(e.to_string()).into()),
                0,
            );
        }
    };
    let result: anyhow::Result<crate::export::Manifest> = match token {
        Err(msg) => Err(exit::UsageError(msg).into()),
        Ok(_) => {
            tracing::info!(location = %loc.id, "export started");
            let progress = Arc::new(Progress::default());
            crate::export::run(client.clone(), &plan, progress)
                .await
                .map_err(anyhow::Error::from)
        }
    };
    match &result {
        Ok(m) => {
            tracing::info!(location = %loc.id, contacts = m.entities.get("contacts").map_or(0, |e| e.rows), "location complete")
        }
        Err(e) => tracing::warn!(location = %loc.id, error = %format!("{e:#}"), "location failed"),
    }
    let report = RunReport::build(&plan, &client, started, &result, 0);
    let _ = report.write(&crate::checkpoint::state_dir(&job.out, &loc.id).join("report.json"));
    report
}
