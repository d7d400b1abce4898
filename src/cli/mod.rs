//! The command line: arguments (the doc comments are the help), logging, and the glue that
//! turns arguments into a plan and runs it.

pub mod auth;
pub mod import;
mod progress;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::DEFAULT_BASE_URL;
use crate::app::env;
use crate::app::export::{ExportJob, ExportSettings, Finished, Prepared};
use crate::app::pipeline::shard::{Shard, ShardSpec};
use crate::app::pipeline::Job;
use crate::app::{Connection, Outcome, TokenRef};
use crate::export::{Budget, Interrupt, Manifest, Progress};
use crate::extract::Listing;
use crate::fanout::Include;
use crate::ratelimit::Quota;
use crate::sink::Format;
pub use progress::ProgressReporter;

/// The exit codes, for `--help` (README.md, "Exit codes", says what to do about each).
const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   other failure (I/O, unexpected)
  2   bad arguments or settings
  3   the API refused the token (401) or its access to the location (403)
  4   the API rejected a request for good (4xx) or misbehaved
  5   a transient failure outlasted the retries: run again later
  6   (import) some rows were rejected: see the rejects file
  7   (pipeline) some locations failed, others completed: see its report
  8   another run holds the lock: nothing was done (its report is left alone)
  9   (export) complete except the child requests the API refused for good, listed under
      'skipped' in the run report and the manifest (everything else is exact)
  75  stopped for the daily quota (or --daily-budget); rerun after it resets to resume
  130 stopped by SIGINT (Ctrl-C), 143 by SIGTERM: complete pages committed, the report says
      'interrupted'; rerun to resume (a second signal exits at once)";

/// Bulk export of HighLevel (LeadConnector) contacts with their tasks, notes and
/// appointments, to Parquet or CSV.
///
/// Start with `contacts-etl demo`: it runs a full export against the built-in simulator, no
/// credentials needed. Against the real API, set HL_TOKEN (a Private Integration Token or a
/// location OAuth access token with the contacts.readonly scope) and run `contacts-etl export`.
#[derive(Debug, Parser)]
#[command(name = "contacts-etl", version, max_term_width = 100, after_long_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Only errors on stderr: no progress, no summary.
    #[arg(long, short, global = true)]
    pub quiet: bool,

    /// More detail in the logs (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Export a location's contacts (and their tasks, notes, appointments) to Parquet or CSV.
    ///
    /// Output layout: OUT/<entity>/location_id=<id>/part-<n>.<ext> for the entities contacts,
    /// tasks, notes and appointments, and OUT/_manifest.json (written last: its presence means
    /// the run completed). Columns keep the API's field names; child tables carry contactId and
    /// locationId. A rerun into the same OUT replaces that location's files.
    ///
    /// Example: HL_TOKEN=pit-... contacts-etl export --location ve9EPM428h8vShlRW1KT --out ./export
    Export(ExportArgs),
    /// Say what an export with the same flags will cost, for one or two requests: the
    /// requests each strategy needs, the time at the rate limit, the days of daily quota, and
    /// what the export will do.
    ///
    /// Example: HL_TOKEN=pit-... contacts-etl plan --location ve9EPM428h8vShlRW1KT --out ./export
    Plan(PlanArgs),
    /// Run the built-in API simulator (for trying the tool and for tests), until Ctrl-C.
    ///
    /// Serves GET /contacts/, business listings, per-contact tasks, notes and appointments and
    /// the write endpoints, with the real API's envelopes, errors and X-RateLimit-* headers,
    /// over deterministic synthetic data (including adversarial values). Any bearer token is
    /// accepted. Point the exporter at it with --base-url http://127.0.0.1:PORT.
    Sim(SimArgs),
    /// Export 5,000 simulated contacts to ./demo-out as Parquet: a full run in seconds, with no
    /// credentials. Prints what it wrote and how to read it.
    Demo(DemoArgs),
    /// Import contacts, tasks or notes from CSV: validated first, journaled, resumable, never a
    /// duplicate; `import undo` deletes what an import created.
    Import(import::ImportArgs),
    /// OAuth for Marketplace apps: `auth login` (consent in a browser, tokens saved to a
    /// 0600 token store), `auth status`, `auth locations`.
    Auth(auth::AuthArgs),
    /// Run a pipeline file: an export over one or many locations, or an import.
    ///
    /// Pipeline files (see pipelines/ for commented examples to copy) name the locations,
    /// where each one's token comes from (an environment variable or a file: never the token
    /// itself), and what to do. Each location has its own rate limiter and daily quota, as the
    /// API counts them; max_concurrency caps requests across all of them. One location failing
    /// does not stop the others. Two runs of one pipeline never overlap (a lock in
    /// OUT/_state; a lock left by a dead run is taken over). HL_BASE_URL overrides the file's
    /// base_url. Writes OUT/_pipeline_report.json; exit 0 all complete, 7 some locations
    /// failed (partial), 75 stopped for the daily quota, 130/143 interrupted by SIGINT/SIGTERM
    /// (complete pages committed; rerun to resume), otherwise as for export.
    ///
    /// Many workers: --shard K/N runs worker K's share of the locations (README, "Scale-out").
    ///
    /// Example: JOB_COMPLETION_INDEX=2 contacts-etl run agency.toml --shard /8
    Run(RunArgs),
    /// Receive HighLevel webhooks: verify each signature, store each event exactly once, and
    /// roll the events into an events table (OUT/events/part-<n>.<ext>).
    ///
    /// Deliveries are POSTed to / or /webhook. Each is checked in turn: rate per source
    /// address (429), body size (413), the Ed25519 X-GHL-Signature over the raw body (401;
    /// the legacy RSA X-WH-Signature only with --legacy-rsa-key), a JSON object with type,
    /// webhookId and timestamp (400), a timestamp within --max-age of now (401). A webhookId
    /// already stored is answered 200 and not stored again. 200 is answered only once the
    /// event is fsynced in the journal (--journal), so a crash loses nothing acknowledged.
    /// Every --roll-every seconds or --roll-events events, and at shutdown, the journal rolls
    /// into a part file (columns webhookId, type, locationId, timestamp, recordId, contactId,
    /// receivedAt, receiverStartedAt, raw), for `export --incremental --from-events OUT`.
    ///
    /// GET /healthz (the process is up), GET /readyz (accepting deliveries), GET /stats
    /// (counters as JSON). SIGTERM or SIGINT: stop accepting, finish the requests in flight,
    /// roll, exit 0. Counters are logged at shutdown and written to JOURNAL/listen-report.json
    /// at each roll; OUT/events/_receiver.json is its heartbeat, which tells `export
    /// --from-events` whether events may be missing. Plain HTTP: put TLS in front of it (an
    /// Ingress, README).
    ///
    /// Example: contacts-etl listen --public-key highlevel-webhook.pem --out ./warehouse
    Listen(ListenArgs),
    /// Check a pipeline file without running it: every problem is reported with its line and
    /// key.
    Validate(ValidateArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: contacts-etl completions bash > /etc/bash_completion.d/contacts-etl
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub export: ExportArgs,

    /// Print the plan as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file (TOML).
    pub file: PathBuf,

    /// Run only worker K's share of N (K counted from 0): a location goes to the worker
    /// FNV-1a-64(location id) mod N, so N workers cover every location exactly once. /N takes
    /// K from JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job). Each shard has its own
    /// pipeline lock and report, OUT/_pipeline_report.shard-K-of-N.json.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<ShardSpec>,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The pipeline file (TOML).
    pub file: PathBuf,

    /// Also print the locations worker K of N gets (as `run --shard K/N`).
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<ShardSpec>,
}

/// `--shard K/N` or `/N`.
fn parse_shard(s: &str) -> Result<ShardSpec, String> {
    s.parse()
}

/// The shard `--shard` names, K from `JOB_COMPLETION_INDEX` when omitted. A K given beside
/// a different `JOB_COMPLETION_INDEX` wins, with a warning: in an Indexed Job that is every
/// pod running the same shard and the other shards' locations never running.
fn resolve_shard(spec: Option<ShardSpec>) -> Result<Option<Shard>, Outcome> {
    let Some(spec) = spec else { return Ok(None) };
    let index =
        std::env::var_os(env::JOB_COMPLETION_INDEX).map(|v| v.to_string_lossy().into_owned());
    if let (Some(k), Some(v)) = (spec.index, &index) {
        if v.trim() != k.to_string() {
            tracing::warn!(
                "--shard {k}/{} runs worker {k}, not the {}={} this process was given; use --shard /{} to take the index from it",
                spec.count,
                env::JOB_COMPLETION_INDEX,
                crate::term::escape(&v.chars().take(40).collect::<String>()),
                spec.count
            );
        }
    }
    spec.resolve(index.as_deref())
        .map(Some)
        .map_err(Outcome::usage)
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    /// Port to listen on (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// Address to listen on: loopback by default; 0.0.0.0 in a container.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub bind: String,

    /// Where the events table goes (OUT/events/), a directory or a bucket as for export.
    #[arg(long, value_name = "DIR|URL")]
    pub out: crate::dest::Target,

    /// Format of the events table's part files.
    #[arg(long, value_enum, default_value_t = FormatArg::Parquet)]
    pub format: FormatArg,

    /// The journal directory (local, and kept across restarts: a persistent volume): events
    /// acknowledged but not yet rolled, recent ids for duplicates, the roll state and the
    /// report. Default: OUT/_state/events; required when OUT is a bucket.
    #[arg(long, value_name = "DIR")]
    pub journal: Option<PathBuf>,

    /// HighLevel's webhook public key (PEM, -----BEGIN PUBLIC KEY-----, Ed25519) that
    /// X-GHL-Signature is verified with.
    #[arg(long, value_name = "FILE")]
    pub public_key: PathBuf,

    /// Also accept deliveries signed only with the legacy X-WH-Signature (RSA-SHA256),
    /// verified with this PEM public key. Without it that header is ignored.
    #[arg(long, value_name = "FILE")]
    pub legacy_rsa_key: Option<PathBuf>,

    /// Refuse (401) a delivery whose timestamp is more than this many seconds before now,
    /// or after now: a captured delivery cannot be replayed later.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_age: u64,

    /// Largest body accepted (bytes, or with K, M for KiB, MiB); larger ones get 413.
    #[arg(long, default_value = "1M", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_body: u64,

    /// Deliveries per second accepted from one source address, in bursts of as many (429
    /// beyond); 0: no limit. Behind an Ingress every delivery comes from it.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub rate_limit: u32,

    /// Roll the journal into a part at least this often, in seconds (when it holds events).
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub roll_every: u64,

    /// Roll the journal into a part when it holds this many events.
    #[arg(long, default_value_t = 50_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub roll_events: u64,
}

impl ListenArgs {
    /// The receiver these flags describe.
    pub fn job(&self) -> crate::app::listen::ListenJob {
        let mut job = crate::app::listen::ListenJob::new(self.out.clone(), self.public_key.clone());
        job.bind = self.bind.clone();
        job.port = self.port;
        job.format = self.format.into();
        job.journal = self.journal.clone();
        job.legacy_rsa_key = self.legacy_rsa_key.clone();
        job.max_age = Duration::from_secs(self.max_age);
        job.max_body = usize::try_from(self.max_body).unwrap_or(usize::MAX);
        job.rate_limit = std::num::NonZeroU32::new(self.rate_limit);
        job.roll_every = Duration::from_secs(self.roll_every);
        job.roll_events = self.roll_events;
        job
    }
}

/// `contacts-etl listen`: prints where it listens, runs until a signal.
async fn run_listen(args: &ListenArgs, quiet: bool) -> Outcome {
    args.job()
        .run(|addr, config| {
            if !quiet {
                eprintln!(
                    "listening on http://{addr} (POST / or /webhook); events table: {}/events; journal: {}",
                    config.out.describe(),
                    config.journal.display()
                );
            }
        })
        .await
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The location (sub-account) id to export.
    #[arg(long, env = env::HL_LOCATION_ID)]
    pub location: String,

    /// Export only the contacts of this business (repeatable). Without it, the whole location.
    #[arg(long = "business", value_name = "BUSINESS_ID")]
    pub businesses: Vec<String>,

    /// Children to fetch per contact: a comma-separated subset of tasks,notes,appointments,
    /// or all, or none. Each costs one request per contact.
    #[arg(long, default_value = "tasks,notes,appointments", value_parser = parse_include)]
    pub include: Include,

    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Parquet)]
    pub format: FormatArg,

    /// Output directory (created if missing), or a bucket: s3://BUCKET/PREFIX, gs://…, az://…
    /// (credentials from the environment: AWS_*, GOOGLE_*, AZURE_*; see the README's "Object
    /// storage"). file:///DIR is a directory.
    #[arg(long, value_name = "DIR|URL")]
    pub out: crate::dest::Target,

    #[command(flatten)]
    pub conn: ConnArgs,

    /// Contacts per part file; a part holds whole pages of contacts with all their children.
    #[arg(long, default_value_t = 250_000, value_name = "N")]
    pub part_contacts: u64,

    /// Longest time between commits, in seconds. Each commit closes the open part files and
    /// records the position in the checkpoint: a kill or crash costs at most this much work.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub commit_interval: u64,

    /// Continue the unfinished export found in OUT (a rerun of the same command does this
    /// anyway, and says so). Refused if the checkpoint was made with other settings.
    #[arg(long, conflicts_with = "restart")]
    pub resume: bool,

    /// Discard an unfinished export found in OUT and start over.
    #[arg(long)]
    pub restart: bool,

    /// Most requests this run may send. When spent, the run commits, checkpoints and exits
    /// with code 75; rerun the same command to continue.
    #[arg(long, value_name = "N")]
    pub daily_budget: Option<u64>,

    /// Share of the location's daily quota (X-RateLimit-Limit-Daily) to leave for its other
    /// integrations, in percent: the run stops (exit 75) when the quota remaining falls to it.
    #[arg(long, default_value_t = 5.0, value_name = "PERCENT")]
    pub daily_reserve: f64,

    /// Incremental (nightly) run: fetch tasks, notes and appointments and write rows only for
    /// contacts new or changed (dateUpdated moved) since the last complete incremental run.
    /// Through the search listing, most runs list only the contacts updated since the last
    /// run started (minus --overlap); every --full-walk-every-th run lists every contact and
    /// writes the ids of contacts that disappeared to deleted_contacts/. The first run
    /// exports everything. The report's runKind says which kind of run it was.
    #[arg(long)]
    pub incremental: bool,

    /// How contacts are listed: search (POST /contacts/search, 500 a request, and the only
    /// listing an incremental run can filter), get (the deprecated GET /contacts/, 100 a
    /// request), or auto: search, falling back to get where the API refuses the search.
    #[arg(long, value_enum, default_value_t = ListingArg::Auto)]
    pub listing: ListingArg,

    /// With --incremental: how far before the previous run's start a filtered run lists
    /// changes, to cover the skew between this machine's clock and the API's.
    #[arg(
        long,
        default_value_t = 600,
        value_name = "SECS",
        requires = "incremental"
    )]
    pub overlap: u64,

    /// With --incremental: every N-th run lists every contact, to find deletions (a filter
    /// cannot see them); the runs between list only what changed. 1: every run.
    #[arg(long, default_value_t = crate::export::DEFAULT_FULL_WALK_EVERY, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), requires = "incremental")]
    pub full_walk_every: u32,

    /// With --incremental: drive the runs between walks by webhook events: DIR (or a bucket
    /// URL) is the --out of `contacts-etl listen`. Such a run lists nothing: it fetches the
    /// contacts that events named since the last run (GET /contacts/:id and their tasks,
    /// notes and appointments: about 4 requests a changed contact) and writes ContactDelete
    /// events to deleted_contacts/. Every --full-walk-every-th run, and any run after a gap
    /// in the events (see --max-gap), walks every contact instead.
    #[arg(long, value_name = "DIR|URL", requires = "incremental")]
    pub from_events: Option<crate::dest::Target>,

    /// With --from-events: a receiver restart is a gap in the events (the next run walks)
    /// when it came more than SECS after the receiver last stored an event. 0: every restart
    /// is, since HighLevel does not send again what it could not deliver (it retries only
    /// deliveries answered 429).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "SECS",
        requires = "from_events"
    )]
    pub max_gap: u64,

    /// With --incremental: export everything and replace the state (run it weekly: a child
    /// changed without its contact's dateUpdated moving is only caught by a full refresh).
    #[arg(long, requires = "incremental")]
    pub full_refresh: bool,

    /// Where --incremental keeps its state between runs (keep it when OUT changes nightly).
    /// Default: OUT/_state.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where to write the run report (JSON). Default: OUT/_report.json.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Most child requests (a contact's tasks, notes or appointments) the API may refuse for
    /// good (403, 422, a 400) before the run fails (exit 4). Up to it, each is skipped and
    /// listed under 'skipped' in the report and the manifest, and the run exits 9.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub max_skipped: u64,

    /// Where tasks and appointments come from: contact (one request per contact each),
    /// location (the location-wide task search and calendar events: a few requests per
    /// hundred contacts; fails without their scopes), or auto (location where the token holds
    /// the scope, per contact otherwise, with a warning). Notes are always per contact.
    #[arg(long, default_value = "auto", value_name = "contact|location|auto")]
    pub children_by: crate::wide::ChildrenBy,

    /// Share of the listed contacts (0 to 1) whose location-wide tasks and appointments are
    /// also fetched per contact and compared; on a difference that entity is fetched per
    /// contact for the whole run (reported in the manifest).
    #[arg(long, default_value_t = crate::export::DEFAULT_VERIFY_SAMPLE, value_name = "SHARE")]
    pub verify_sample: f64,
    /// How contacts show custom fields: ids (the customFields column, [{id, value}] as the API
    /// sends it) or wide (also one column per custom field, named by its key: fieldKey without
    /// 'contact.'; numbers as doubles, the rest as text). Either way the location's field
    /// definitions go to the custom_fields table (token scope locations/customFields.readonly;
    /// without it, a warning and no table).
    #[arg(long, default_value = "ids", value_name = "ids|wide", value_parser = clap::builder::ValueParser::new(str::parse::<crate::export::CustomFieldsMode>))]
    pub custom_fields: crate::export::CustomFieldsMode,

    /// Also publish each run as a Delta Lake commit per entity table (OUT/<entity>/ with its
    /// _delta_log, partitioned by location_id and export_date): readers see a run all at
    /// once or not at all. Each run then writes under a run=<start time> directory of its
    /// own, and earlier runs' files stay (the tables keep history). Needs --format parquet.
    #[arg(long, value_name = "delta", value_parser = clap::builder::ValueParser::new(str::parse::<crate::delta::TableFormat>))]
    pub table: Option<crate::delta::TableFormat>,

    /// With --table delta: also keep a current-state table per entity under OUT/current/
    /// (one row per contact, task, note, appointment, as of the latest run; deleted contacts
    /// and their children dropped), rewritten for the run's location at the end of each run.
    #[arg(long, requires = "table")]
    pub merge: bool,
}

/// How to reach the API: shared by every command that calls it.
#[derive(Debug, Args)]
pub struct ConnArgs {
    /// API base URL. Plain http is refused except to a loopback address.
    #[arg(long, env = env::HL_BASE_URL, default_value = DEFAULT_BASE_URL)]
    pub base_url: String,

    /// Read the API token from this file instead of the HL_TOKEN environment variable.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Most requests in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    /// The request rate to keep, as REQUESTS/INTERVAL (100/10s is the API's limit per app and
    /// location), or 'off'. Requests are spaced evenly with a 2% margin, so no 429s are
    /// provoked; a stricter limit announced by the server's X-RateLimit-* headers wins.
    #[arg(long, default_value = "100/10s", value_parser = parse_rate)]
    pub rate_limit: RateArg,

    /// Timeout of one request, in seconds (connect, send, and read the reply).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub timeout: u64,

    /// Longest single wait before retrying a request, in seconds, whatever the server's
    /// Retry-After asks (a 429 asking for an hour is tried again after this). Waits over 30 s
    /// are logged.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_retry_wait: u64,

    /// Longest time one request may take with all its retries, in seconds. When it runs out
    /// (or the attempts do) the run stops with exit 5 and says when the server asked to be
    /// retried; rerun then to resume.
    #[arg(long, default_value_t = 900, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub request_deadline: u64,

    /// Largest reply body accepted, in bytes (or with K, M, G for KiB, MiB, GiB). A larger
    /// reply stops the run (exit 4) before it can exhaust memory.
    #[arg(long, default_value = "64M", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_response_bytes: u64,
}

/// `--max-response-bytes`: a byte count, with an optional binary suffix.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => {
            return Err(format!(
                "'{s}' is not a size: use a number of bytes, or e.g. 64M or 1G"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!("'{s}' is not a size: use a positive number of bytes, or e.g. 64M or 1G")
        })
}

/// `--rate-limit`: a quota, or off.
#[derive(Copy, Clone, Debug)]
pub struct RateArg(pub Option<Quota>);

fn parse_rate(s: &str) -> Result<RateArg, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(RateArg(None));
    }
    s.parse::<Quota>().map(|q| RateArg(Some(q)))
}

fn parse_include(s: &str) -> Result<Include, String> {
    s.parse()
}

/// `--listing`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListingArg {
    Auto,
    Search,
    Get,
}

impl From<ListingArg> for Listing {
    fn from(l: ListingArg) -> Listing {
        match l {
            ListingArg::Auto => Listing::Auto,
            ListingArg::Search => Listing::Search,
            ListingArg::Get => Listing::Get,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Parquet,
    Csv,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Parquet => Format::Parquet,
            FormatArg::Csv => Format::Csv,
        }
    }
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Contacts per location.
    #[arg(long, default_value_t = 5_000)]
    pub contacts: usize,
    /// Seed of the synthetic data: the same seed gives the same data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Location id to serve (repeatable; default demoLocation00000001).
    #[arg(long = "location", value_name = "LOCATION_ID")]
    pub locations: Vec<String>,
    /// Businesses per location.
    #[arg(long, default_value_t = 20)]
    pub businesses: usize,
    /// Limit per token and location, as REQUESTS/INTERVAL, or 'off'.
    #[arg(long, default_value = "100/10s", value_parser = parse_rate)]
    pub rate_limit: RateArg,
    /// Requests per token and location per day, or 0 for no quota.
    #[arg(long, default_value_t = 200_000)]
    pub daily_quota: u64,
    /// Share of requests answered with a 5xx (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share of replies whose body is cut off (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub truncate_rate: f64,
    /// Share of replies delayed by --slow-ms (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub slow_rate: f64,
    #[arg(long, default_value_t = 2_000)]
    pub slow_ms: u64,
    /// Share of connections dropped before a complete reply (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Share of writes applied but answered 502 (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub ambiguous_write_rate: f64,
    /// Share of child list requests (tasks, notes, appointments of a contact) refused for good
    /// with 403 (0..1); the same ones at every run with the same seed.
    #[arg(long, default_value_t = 0.0)]
    pub child_refusal_rate: f64,
    /// Each write is applied after MS (or a seeded draw in MIN-MAX) milliseconds, even if
    /// the client has gone by then; the reply follows the apply.
    #[arg(long, value_name = "MS|MIN-MAX", default_value = "0", value_parser = parse_latency)]
    pub write_latency_ms: std::ops::RangeInclusive<Duration>,
    /// The duplicate search (GET /contacts/search/duplicate) sees a write only this many
    /// milliseconds after it was applied.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub search_lag_ms: u64,
    /// Locations allow duplicate contacts: creates of an existing email or phone succeed.
    #[arg(long)]
    pub allow_duplicates: bool,
    /// Country of the locations (ISO 3166 alpha-2), served by GET /locations/:id.
    #[arg(long, default_value = "US", value_parser = parse_country)]
    pub country: String,
    /// Scopes every bearer token holds, comma-separated (e.g. contacts.readonly,
    /// locations/tasks.readonly); a route needing another answers 401. '' holds none.
    /// Without the flag: every scope.
    #[arg(long = "sim-scopes", value_name = "SCOPE,...", value_delimiter = ',')]
    pub sim_scopes: Option<Vec<String>>,
    /// Writes while clients page: after every EVERY listing pages served, UPDATE contacts
    /// of that location are edited, DELETE deleted and CREATE created (e.g. 10:5:1:1).
    #[arg(long, value_name = "EVERY:UPDATE:DELETE:CREATE", value_parser = parse_churn)]
    pub churn: Option<crate::sim::Churn>,
    /// Send a signed webhook for every applied write to URL, as HighLevel does
    /// (ContactCreate, ContactUpdate, ContactDelete, ContactTagUpdate, Task*, Note*...), with
    /// X-GHL-Signature (Ed25519, a test key derived from --seed); redelivered until answered
    /// 2xx.
    #[arg(long, value_name = "URL", value_parser = parse_webhook_url)]
    pub webhook_url: Option<String>,
    /// Write the public key that verifies X-GHL-Signature (PEM) to FILE, for the receiver's
    /// --public-key. The key depends on --seed only.
    #[arg(long, value_name = "FILE")]
    pub webhook_public_key_out: Option<PathBuf>,
    /// Also send the legacy X-WH-Signature (RSA-SHA256), signed with this private key
    /// (PKCS#8, DER or PEM, 2048 bits or more).
    #[arg(long, value_name = "FILE", requires = "webhook_url")]
    pub webhook_rsa_key: Option<PathBuf>,
    /// Share of webhook deliveries answered 2xx that are sent again anyway, as after a lost
    /// acknowledgement (0..1; default 0).
    #[arg(long, value_name = "R", value_parser = parse_share, requires = "webhook_url")]
    pub webhook_redelivery_rate: Option<f64>,
    /// Share of webhook events sent twice at the same time (0..1; default 0).
    #[arg(long, value_name = "R", value_parser = parse_share, requires = "webhook_url")]
    pub webhook_duplicate_rate: Option<f64>,
}

/// An `http://` or `https://` URL with a host.
fn parse_webhook_url(s: &str) -> Result<String, String> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(s.to_string()),
        Ok(_) => Err(format!("{s:?} is not an http:// or https:// URL")),
        Err(e) => Err(format!("{s:?} is not a URL: {e}")),
    }
}

/// A share from 0 to 1, e.g. `0.05`.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a share from 0 to 1 (e.g. 0.05)")),
    }
}

/// `EVERY:UPDATE:DELETE:CREATE`, e.g. `10:5:1:1`.
fn parse_churn(s: &str) -> Result<crate::sim::Churn, String> {
    let bad = || {
        format!("{s:?} is not EVERY:UPDATE:DELETE:CREATE (four whole numbers, EVERY at least 1), e.g. 10:5:1:1")
    };
    let n: Vec<u64> = s
        .split(':')
        .map(|v| v.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let size = |v: u64| usize::try_from(v).map_err(|_| bad());
    match n.as_slice() {
        &[every, update, delete, create] if every > 0 => Ok(crate::sim::Churn {
            every,
            update: size(update)?,
            delete: size(delete)?,
            create: size(create)?,
        }),
        _ => Err(bad()),
    }
}

/// `200` or `50-400` (milliseconds) as a range of durations.
fn parse_latency(s: &str) -> Result<std::ops::RangeInclusive<Duration>, String> {
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| {
                format!("{v:?} is not a whole number of milliseconds (e.g. 200 or 50-400)")
            })
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (ms(lo)?, ms(hi)?),
        None => (ms(s)?, ms(s)?),
    };
    if lo > hi {
        return Err(format!(
            "the range {s} runs backwards: write MIN-MAX, e.g. 50-400"
        ));
    }
    Ok(lo..=hi)
}

/// Two ASCII letters, upper-cased (`de` gives `DE`).
fn parse_country(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(s.to_ascii_uppercase())
    } else {
        Err("expected a two-letter ISO 3166 country code, e.g. US or DE".into())
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Contacts in the simulated location.
    #[arg(long, default_value_t = 5_000)]
    pub contacts: usize,
    /// Output directory.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = FormatArg::Parquet)]
    pub format: FormatArg,
}

/// Sets up logging on stderr: plain text (colour only on a terminal) or JSON lines.
pub fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env(env::RUST_LOG)
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,contacts_etl={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match cli.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(crate::term::log_fields())
            .init(),
    }
}

impl ConnArgs {
    /// The connection these flags describe.
    pub fn connection(&self) -> Connection {
        Connection {
            base_url: self.base_url.clone(),
            token: TokenRef::from_flag(self.token_file.clone()),
            rate_limit: self.rate_limit.0,
            concurrency: usize::from(self.concurrency),
            timeout: Duration::from_secs(self.timeout.max(1)),
            max_retry_wait: Duration::from_secs(self.max_retry_wait),
            request_deadline: Duration::from_secs(self.request_deadline),
            max_response_bytes: self.max_response_bytes,
        }
    }
}

impl ExportArgs {
    /// The export job these flags describe.
    pub fn job(&self) -> ExportJob {
        let mut settings = ExportSettings::new(self.out.clone(), self.format.into());
        settings.businesses = self.businesses.clone();
        settings.include = self.include;
        settings.part_contacts = self.part_contacts;
        settings.commit_interval = Duration::from_secs(self.commit_interval);
        settings.restart = self.restart;
        settings.budget = Budget {
            max_requests: self.daily_budget,
            reserve: self.daily_reserve / 100.0,
        };
        settings.incremental = self.incremental;
        settings.full_refresh = self.full_refresh;
        settings.listing = self.listing.into();
        settings.overlap = Duration::from_secs(self.overlap);
        settings.full_walk_every = self.full_walk_every;
        settings.from_events = self.from_events.clone();
        settings.max_gap = Duration::from_secs(self.max_gap);
        settings.state_dir = self.state_dir.clone();
        settings.max_skipped = self.max_skipped;
        settings.children_by = self.children_by;
        settings.verify_sample = self.verify_sample;
        settings.custom_fields = self.custom_fields;
        settings.table = self
            .table
            .unwrap_or_default()
            .with_merge(self.merge)
            .unwrap_or_default();
        ExportJob {
            location: self.location.clone(),
            settings,
            conn: self.conn.connection(),
            report: self.report.clone(),
        }
    }
}

/// Runs the command: every command returns what it came to.
pub async fn dispatch(cli: &Cli) -> Outcome {
    match &cli.command {
        Command::Export(args) => run_export(args, cli.quiet).await,
        Command::Plan(args) => run_plan(args).await,
        Command::Sim(args) => match run_sim(args, cli.quiet).await {
            Ok(()) => Outcome::Complete,
            Err(e) => e.into(),
        },
        Command::Demo(args) => run_demo(args, cli.quiet).await,
        Command::Import(args) => import::run(args, cli.quiet).await,
        Command::Auth(args) => auth::run(args, cli.quiet).await,
        Command::Run(args) => run_pipeline(args, cli.quiet).await,
        Command::Validate(args) => run_validate(args),
        Command::Listen(args) => run_listen(args, cli.quiet).await,
        Command::Completions(args) => {
            run_completions(args);
            Outcome::Complete
        }
    }
}

/// Installs the SIGTERM/SIGINT handlers that raise `interrupt`.
fn install_interrupt(interrupt: &Interrupt) -> Result<(), Outcome> {
    crate::export::interrupt::install(interrupt).map_err(|e| {
        Outcome::from(anyhow::Error::from(e).context("cannot install the SIGTERM/SIGINT handlers"))
    })
}

/// `contacts-etl plan`: prints the estimate as a table, or as JSON.
async fn run_plan(args: &PlanArgs) -> Outcome {
    let plan = match crate::app::plan::run(&args.export.job()).await {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).unwrap_or_default()
        );
    } else {
        print!("{}", plan_table(&plan));
    }
    Outcome::Complete
}

/// The plan as a person reads it.
fn plan_table(p: &crate::app::plan::QuotaPlan) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let changed = match (&p.changed, &p.changed_since) {
        (Some(c), Some(since)) => format!(", {c} updated since {since}"),
        (Some(c), None) => format!(", {c} updated since the last run"),
        _ => String::new(),
    };
    let _ = writeln!(
        t,
        "location {}: {} contacts{changed}; {} request(s) spent on this plan",
        crate::term::escape(&p.location_id),
        p.contacts,
        p.requests_spent
    );
    let rate = p.rate_limit.as_deref().unwrap_or("no limit");
    let _ = writeln!(
        t,
        "\n{:<78} {:>10} {:>12} {:>10}",
        "strategy",
        "requests",
        format!("h at {rate}"),
        "days"
    );
    for s in p.strategies.iter().chain(std::iter::once(&p.chosen)) {
        let name = if std::ptr::eq(s, &p.chosen) {
            format!("this export: {}", s.name)
        } else {
            s.name.clone()
        };
        let _ = writeln!(
            t,
            "{:<78} {:>10} {:>12.1} {:>10.2}",
            name, s.estimate.total, s.hours_at_limit, s.days_of_quota
        );
    }
    let e = &p.chosen.estimate;
    let _ = writeln!(
        t,
        "\nthis export ({} run, {} listing): {} requests = {} listing + {} tasks + {} notes + {} appointments + {} verification + {} custom-field definitions",
        p.run_kind, p.listing, e.total, e.listing, e.tasks, e.notes, e.appointments, e.verify, e.other
    );
    let days = p.chosen.days_of_quota;
    let _ = writeln!(
        t,
        "daily quota {}{}: {}",
        p.daily_limit,
        p.daily_remaining
            .map(|r| format!(" ({r} left now)"))
            .unwrap_or_default(),
        if days > 1.0 {
            format!("about {:.0} days; the export stops at the reserve each day (exit 75) and resumes when rerun", days.ceil())
        } else {
            "fits in one day".into()
        }
    );
    for n in &p.notes {
        let _ = writeln!(t, "note: {n}");
    }
    t
}

/// `contacts-etl export`: runs the job with a progress display and prints the summary.
async fn run_export(args: &ExportArgs, quiet: bool) -> Outcome {
    let interrupt = Interrupt::default();
    let prepared = match args.job().prepare(&interrupt) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    if let Err(o) = install_interrupt(&interrupt) {
        return o;
    }
    run_prepared(prepared, quiet).await.outcome
}

/// Runs a prepared export with progress display and prints the closing summary.
async fn run_prepared(prepared: Prepared, quiet: bool) -> Finished {
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let reporter = ProgressReporter::start(
        progress.clone(),
        prepared.client.stats().clone(),
        quiet,
        Duration::from_secs(10),
    );
    let client = prepared.client.clone();
    let done = prepared.run(progress).await;
    drop(reporter);
    if let (Some(m), false) = (&done.manifest, quiet) {
        eprintln!(
            "{}",
            summary(m, started.elapsed(), client.limiter().effective_quota())
        );
    }
    done
}

/// The closing summary, for people.
fn summary(m: &Manifest, elapsed: Duration, quota: Option<Quota>) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let r = &m.requests;
    let mut s = format!("export complete in {secs:.1}s: ");
    let parts: Vec<String> = m
        .entities
        .iter()
        .map(|(name, e)| format!("{} {name}", e.rows))
        .collect();
    s.push_str(&parts.join(", "));
    let contacts = m.entities.get("contacts").map_or(0, |e| e.rows);
    s.push_str(&format!(
        "\n  {:.0} contacts/s, {} requests ({:.1}/s), {} retries, {} rate-limited (429), {:.1} MB received",
        contacts as f64 / secs,
        r.attempts,
        r.attempts as f64 / secs,
        r.retries,
        r.rate_limited,
        r.bytes_received as f64 / 1e6
    ));
    if let Some(q) = quota {
        s.push_str(&format!(
            ", {:.0}% of the {q} limit",
            100.0 * (r.attempts as f64 / secs) / q.per_second()
        ));
    }
    if !m.skipped.is_empty() {
        s.push_str(&format!(
            "\n  {} child requests refused by the API were skipped: listed under 'skipped' in the manifest and the report",
            m.skipped.len()
        ));
    }
    s.push_str(&format!("\n  manifest: {}", crate::export::MANIFEST));
    s
}

/// Builds the simulator configuration from `sim` arguments.
pub fn sim_config(args: &SimArgs) -> crate::sim::SimConfig {
    let mut cfg = crate::sim::SimConfig::default();
    if !args.locations.is_empty() {
        cfg.locations = args.locations.clone();
    }
    cfg.contacts = args.contacts;
    cfg.seed = args.seed;
    cfg.businesses = args.businesses;
    cfg.rate_limit = args.rate_limit.0.map(|q| (q.max.get(), q.interval));
    cfg.daily_quota = (args.daily_quota > 0).then_some(args.daily_quota);
    cfg.faults = crate::sim::Faults {
        error_rate: args.error_rate,
        truncate_rate: args.truncate_rate,
        slow_rate: args.slow_rate,
        slow_delay: Duration::from_millis(args.slow_ms),
        drop_rate: args.drop_rate,
        ambiguous_write_rate: args.ambiguous_write_rate,
        child_refusal_rate: args.child_refusal_rate,
    };
    cfg.write_latency = args.write_latency_ms.clone();
    cfg.search_lag = Duration::from_millis(args.search_lag_ms);
    cfg.allow_duplicates = args.allow_duplicates;
    cfg.country = args.country.clone();
    cfg.scopes = args.sim_scopes.as_ref().map(|scopes| {
        scopes
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    });
    cfg.churn = args.churn;
    cfg.webhooks = args
        .webhook_url
        .as_ref()
        .map(|url| crate::sim::WebhookConfig {
            url: url.clone(),
            // Read from --webhook-rsa-key by `run_sim`: building the config does no I/O.
            rsa_key_pkcs8: None,
            redelivery_rate: args.webhook_redelivery_rate.unwrap_or(0.0),
            duplicate_rate: args.webhook_duplicate_rate.unwrap_or(0.0),
        });
    cfg
}

/// Runs the simulator until Ctrl-C.
pub async fn run_sim(args: &SimArgs, quiet: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let mut cfg = sim_config(args);
    if let (Some(hooks), Some(path)) = (cfg.webhooks.as_mut(), &args.webhook_rsa_key) {
        let file = std::fs::read(path)
            .with_context(|| format!("cannot read --webhook-rsa-key {}", path.display()))?;
        let key = crate::sim::rsa_key_pkcs8(&file)
            .with_context(|| format!("--webhook-rsa-key {}", path.display()))?;
        hooks.rsa_key_pkcs8 = Some(key);
    }
    let locations = cfg.locations.join(", ");
    let webhook_url = cfg.webhooks.as_ref().map(|w| w.url.clone());
    let sim = crate::sim::Sim::new(cfg);
    if let Some(path) = &args.webhook_public_key_out {
        crate::durable::write(path, sim.webhook_public_key_pem().as_bytes())
            .with_context(|| format!("cannot write --webhook-public-key-out {}", path.display()))?;
        eprintln!(
            "webhook public key (X-GHL-Signature) written to {}",
            path.display()
        );
    }
    if let Some(url) = webhook_url {
        // Shown without credentials or query: a receiver URL may carry a secret.
        let shown = url::Url::parse(&url)
            .map(|u| crate::dest::remote::redact(&u))
            .unwrap_or_default();
        eprintln!(
            "sending signed webhooks to {}; X-GHL-Signature verifies with:\n{}",
            crate::term::escape(&shown),
            sim.webhook_public_key_pem().trim_end()
        );
    }
    eprintln!("simulator listening on http://{addr} (locations: {locations}; any bearer token is accepted; Ctrl-C stops)");
    if !quiet {
        eprintln!("try: HL_TOKEN=demo contacts-etl export --base-url http://{addr} --location {} --out ./sim-out", locations.split(", ").next().unwrap_or_default());
    }
    crate::sim::serve(listener, sim, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// Runs the demo: an in-process simulator on a free loopback port, a full export to `out`.
async fn run_demo(args: &DemoArgs, quiet: bool) -> Outcome {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            return anyhow::Error::from(e)
                .context("cannot listen on a loopback port")
                .into()
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return anyhow::Error::from(e).into(),
    };
    let cfg = crate::sim::SimConfig {
        contacts: args.contacts,
        // Raised from the real API's 100/10s so the demo takes seconds; the client learns the
        // limit from the X-RateLimit-* headers.
        rate_limit: Some((50_000, Duration::from_secs(10))),
        daily_quota: None,
        ..crate::sim::SimConfig::default()
    };
    let location = cfg.locations.first().cloned().unwrap_or_default();
    let sim = crate::sim::Sim::new(cfg);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::sim::serve(listener, sim, async {
        let _ = stop_rx.await;
    }));
    // The same job as `export`, against the simulator: any token is accepted there.
    let job = ExportJob {
        location,
        settings: ExportSettings::new(args.out.clone(), args.format.into()),
        conn: Connection {
            base_url: format!("http://{addr}"),
            token: TokenRef::Simulator,
            rate_limit: None,
            concurrency: 32,
            ..Connection::default()
        },
        report: None,
    };
    let format = job.settings.format;
    let done = match job.prepare(&Interrupt::default()) {
        Ok(prepared) => Ok(run_prepared(prepared, quiet).await),
        Err(outcome) => Err(outcome),
    };
    let _ = stop_tx.send(());
    let _ = server.await;
    let manifest = match done {
        Ok(Finished {
            outcome: Outcome::Complete,
            manifest: Some(m),
            ..
        }) => m,
        Ok(other) => return other.outcome,
        Err(outcome) => return outcome,
    };
    let out = args.out.display();
    println!("wrote {out}/:");
    for e in manifest.entities.values() {
        for f in &e.files {
            println!("  {:<60} {:>8} rows {:>10} bytes", f.path, f.rows, f.bytes);
        }
    }
    println!("  {}", crate::export::MANIFEST);
    match format {
        Format::Parquet => {
            println!("\nread it with DuckDB:");
            println!("  duckdb -c \"SELECT count(*), count(DISTINCT id) FROM read_parquet('{out}/contacts/*/*.parquet', hive_partitioning=true)\"");
            println!("or pandas (pyarrow):");
            println!("  python3 -c \"import pandas as pd; df = pd.read_parquet('{out}/contacts'); print(df.shape); print(df[['id','email','dateAdded','tags']].head())\"");
        }
        Format::Csv => {
            println!("\nread it with DuckDB:");
            println!("  duckdb -c \"SELECT count(*) FROM read_csv('{out}/contacts/*/*.csv', header=true)\"");
        }
    }
    Outcome::Complete
}

/// `contacts-etl validate FILE`.
fn run_validate(args: &ValidateArgs) -> Outcome {
    let shard = match resolve_shard(args.shard) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let p = match crate::app::pipeline::load(&args.file) {
        Ok(p) => p,
        Err(e) => return Outcome::usage(e),
    };
    let what = match &p.job {
        Job::Export(j) => format!(
            "export ({}, include {}{}) to {}",
            j.format.extension(),
            j.include,
            if j.incremental { ", incremental" } else { "" },
            crate::term::escape(&j.out.to_string())
        ),
        Job::Import(j) => format!(
            "import of {} into location {}{}",
            j.source.input.display(),
            j.location,
            if j.source.dry_run.is_some() {
                " (dry run)"
            } else {
                ""
            }
        ),
    };
    println!(
        "{}: ok: pipeline '{}', {} location(s), {what}",
        args.file.display(),
        p.name,
        p.locations.len()
    );
    if let Some(s) = shard {
        let mine: Vec<&str> = p
            .locations
            .iter()
            .filter(|l| s.owns(&l.id))
            .map(|l| l.id.as_str())
            .collect();
        println!(
            "shard {s}: {} of {} location(s){}{}",
            mine.len(),
            p.locations.len(),
            if mine.is_empty() { "" } else { ": " },
            mine.join(" ")
        );
        if p.oauth.as_ref().is_some_and(|o| o.all_installed_locations) {
            println!("  (plus the installed locations `run` finds, split the same way)");
        }
    }
    Outcome::Complete
}

/// `contacts-etl run FILE`.
async fn run_pipeline(args: &RunArgs, quiet: bool) -> Outcome {
    let shard = match resolve_shard(args.shard) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let p = match crate::app::pipeline::load(&args.file) {
        Ok(p) => p,
        Err(e) => return Outcome::usage(e),
    };
    match &p.job {
        Job::Export(job) => {
            let interrupt = Interrupt::default();
            if let Err(o) = install_interrupt(&interrupt) {
                return o;
            }
            let (outcome, report) =
                crate::app::pipeline::run_export_shard(&p, job, shard, &interrupt).await;
            if let (Some(report), false) = (&report, quiet) {
                // Ids and errors can hold server text: printed escaped (crate::term).
                for r in &report.locations {
                    eprintln!(
                        "  {:<24} {:<11} {:>8} contacts  {}",
                        crate::term::escape(&r.location_id),
                        r.status,
                        r.rows.get("contacts").copied().unwrap_or(0),
                        crate::term::escape(
                            r.error
                                .as_deref()
                                .map(|e| e.lines().next().unwrap_or(""))
                                .unwrap_or("")
                        )
                    );
                }
                eprintln!(
                    "pipeline {}{}: {} (report: {})",
                    p.name,
                    shard.map(|s| format!(", shard {s}")).unwrap_or_default(),
                    report.status,
                    match &job.out {
                        crate::dest::Target::Dir(d) => d
                            .join(crate::app::pipeline::shard::report_file(shard))
                            .display()
                            .to_string(),
                        store => format!(
                            "{store}/{}",
                            crate::app::pipeline::shard::report_file(shard)
                        ),
                    }
                );
            }
            outcome
        }
        Job::Import(_) if shard.is_some() => Outcome::usage(format!(
            "--shard splits the locations of an export pipeline; {} is an import (one location)\nhint: run it without --shard, from one worker",
            args.file.display()
        )),
        Job::Import(job) => import::run_job(job, quiet).await,
    }
}

/// `contacts-etl completions SHELL`.
pub fn run_completions(args: &CompletionsArgs) {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "contacts-etl", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The simulator's config `contacts-etl sim ARGS` builds, or clap's error.
    fn config(args: &[&str]) -> Result<crate::sim::SimConfig, String> {
        let argv = ["contacts-etl", "sim"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Sim(a)) => Ok(sim_config(&a)),
            Ok(_) => panic!("not the sim command"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn sim_flags_reach_the_config() {
        let c = config(&[
            "--write-latency-ms",
            "50-400",
            "--search-lag-ms",
            "1500",
            "--allow-duplicates",
            "--country",
            "de",
        ])
        .expect("valid flags");
        let ms = Duration::from_millis;
        assert_eq!(c.write_latency, ms(50)..=ms(400));
        assert_eq!(c.search_lag, ms(1500));
        assert!(c.allow_duplicates);
        assert_eq!(c.country, "DE");

        let c = config(&["--write-latency-ms", "200"]).expect("one value");
        assert_eq!(c.write_latency, ms(200)..=ms(200));
        let d = config(&[]).expect("defaults");
        let today = crate::sim::SimConfig::default();
        assert_eq!(today.write_latency, Duration::ZERO..=Duration::ZERO);
        assert_eq!(
            (d.write_latency, d.search_lag, d.allow_duplicates, d.country),
            (today.write_latency, today.search_lag, false, today.country)
        );

        for bad in [
            ["--write-latency-ms", "400-50"],
            ["--write-latency-ms", "fast"],
            ["--country", "USA"],
        ] {
            assert!(config(&bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn webhook_flags_reach_the_sim_config() {
        let c = config(&[
            "--webhook-url",
            "http://127.0.0.1:9/hooks",
            "--webhook-redelivery-rate",
            "0.05",
            "--webhook-duplicate-rate",
            "0.01",
        ])
        .expect("valid webhook flags");
        let w = c.webhooks.expect("webhooks are on");
        assert_eq!(w.url, "http://127.0.0.1:9/hooks");
        assert_eq!((w.redelivery_rate, w.duplicate_rate), (0.05, 0.01));
        assert!(
            w.rsa_key_pkcs8.is_none(),
            "the key file is read when the sim starts"
        );

        let plain = config(&["--webhook-url", "https://hooks.example.com/in"]).expect("url only");
        let w = plain.webhooks.expect("webhooks are on");
        assert_eq!((w.redelivery_rate, w.duplicate_rate), (0.0, 0.0));
        assert!(config(&[]).expect("defaults").webhooks.is_none());

        for bad in [
            &["--webhook-url", "ftp://127.0.0.1/x"][..],
            &["--webhook-url", "not a url"],
            &[
                "--webhook-url",
                "http://h/",
                "--webhook-duplicate-rate",
                "1.5",
            ],
            &["--webhook-duplicate-rate", "0.1"],
            &["--webhook-redelivery-rate", "0.1"],
            &["--webhook-rsa-key", "k.der"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} is refused");
        }
    }
}

/// The command line and a pipeline file describe the same jobs, so they run the same way.
#[cfg(test)]
mod same_jobs {
    use super::*;
    use crate::app::export::{plan, Placement};

    fn parse(args: &[&str]) -> Command {
        let argv = ["contacts-etl"].iter().chain(args).copied();
        Cli::try_parse_from(argv).expect("valid arguments").command
    }

    fn pipeline(dir: &std::path::Path, body: &str) -> crate::app::pipeline::Pipeline {
        let file = dir.join("p.toml");
        let text = format!(
            "[api]\nbase_url = \"http://127.0.0.1:9\"\nconcurrency = 5\n[auth]\ntoken_file = \"{}\"\n[[locations]]\nid = \"L1\"\n{body}",
            dir.join("tok").display()
        );
        std::fs::write(&file, text).unwrap();
        crate::app::pipeline::load(&file).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_pipeline_import_is_the_job_the_import_command_runs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let path = |name: &str| d.join(name).display().to_string();
        let p = pipeline(
            d,
            &format!(
                "[import]\nentity = \"contacts\"\ninput = \"{}\"\nmapping = \"{}\"\njournal = \"{}\"\nrejects = \"{}\"\non_duplicate = \"skip\"\ndefault_country = \"DE\"\nencoding = \"windows-1252\"\nsettle_secs = 3\ndry_run = true\n",
                path("in.csv"),
                path("map.toml"),
                path("j.jsonl"),
                path("rej.csv")
            ),
        );
        let crate::app::pipeline::Job::Import(from_file) = p.job else {
            panic!("an import pipeline")
        };
        let Command::Import(args) = parse(&[
            "import",
            "contacts",
            "--location",
            "L1",
            "--input",
            &path("in.csv"),
            "--mapping",
            &path("map.toml"),
            "--journal",
            &path("j.jsonl"),
            "--rejects",
            &path("rej.csv"),
            "--on-duplicate",
            "skip",
            "--default-country",
            "DE",
            "--encoding",
            "windows-1252",
            "--settle-secs",
            "3",
            "--dry-run",
            "--base-url",
            "http://127.0.0.1:9",
            "--concurrency",
            "5",
            "--token-file",
            &path("tok"),
        ]) else {
            panic!("an import command")
        };
        let from_flags = args.command.job().expect("an import job");
        assert_eq!(*from_file, from_flags);
    }

    #[test]
    fn a_pipeline_location_and_the_export_command_build_the_same_plan() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = d.join("out").display().to_string();
        let p = pipeline(
            d,
            &format!("[export]\nout = \"{out}\"\nformat = \"csv\"\ninclude = [\"tasks\", \"notes\"]\nincremental = true\ndaily_budget = 5000\ndaily_reserve_percent = 10.0\npart_contacts = 1000\ncommit_interval_secs = 30\nmax_skipped = 7\n"),
        );
        let crate::app::pipeline::Job::Export(settings) = &p.job else {
            panic!("an export pipeline")
        };
        let Command::Export(args) = parse(&[
            "export",
            "--location",
            "L1",
            "--out",
            &out,
            "--format",
            "csv",
            "--include",
            "tasks,notes",
            "--incremental",
            "--daily-budget",
            "5000",
            "--daily-reserve",
            "10",
            "--part-contacts",
            "1000",
            "--commit-interval",
            "30",
            "--max-skipped",
            "7",
            "--base-url",
            "http://127.0.0.1:9",
            "--concurrency",
            "5",
        ]) else {
            panic!("an export command")
        };
        let job = args.job();
        let interrupt = Interrupt::default();
        let dest = crate::dest::Dest::open(&job.settings.out).unwrap();
        let alone = plan(
            &job.location,
            &job.settings,
            &dest,
            &job.conn,
            &Placement::default(),
            &interrupt,
        );
        let in_pipeline = plan(
            "L1",
            settings,
            &dest,
            &p.conn,
            &Placement {
                shared_out: true,
                export_date: None,
            },
            &interrupt,
        );
        // The one difference by design: locations sharing OUT keep their manifests apart.
        assert_eq!(
            in_pipeline.manifest_path,
            Some(crate::checkpoint::state_dir(dest.root(), "L1").join("manifest.json"))
        );
        let in_pipeline = crate::export::ExportPlan {
            manifest_path: None,
            ..in_pipeline
        };
        assert_eq!(format!("{alone:?}"), format!("{in_pipeline:?}"));
        assert_eq!(job.conn.concurrency, p.conn.concurrency);
    }
}
