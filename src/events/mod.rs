//! Change capture from webhooks: `contacts-etl listen`, a signed webhook receiver that lands
//! every event exactly once in an `events` table.
//!
//! # The path of a delivery
//! 1. **Admission** ([`server`]): a per-source token bucket (429), the body read up to the
//!    limit (413), the signature verified over the raw bytes ([`verify`], 401), then, and
//!    only then, the body parsed (400 unless a JSON object with `type`, `webhookId` and
//!    `timestamp`) and its `timestamp` checked against `--max-age` in both directions (401:
//!    a replay of an old capture is refused whatever its id).
//! 2. **Journal** ([`journal`]): the record goes to the one writer thread, which checks the
//!    duplicate set, appends, fsyncs (one fsync for every record waiting: group commit) and
//!    only then answers. `200` therefore means "on disk": a crash or `SIGKILL` after it loses
//!    nothing, and a redelivery of a stored `webhookId` is answered `200` and stored nowhere.
//! 3. **Roll** ([`roll`]): every `--roll-every` or `--roll-events`, and at shutdown, the writer
//!    seals its segment and opens the next; a roller thread turns each sealed segment into one
//!    part of the events table ([`table`]) through [`crate::sink`] (temporary name, then
//!    rename; multipart uploads to a bucket), then records the roll ([`crate::durable`]). A
//!    crash between the part and the record rolls the same sealed segment again into the same
//!    part: every acknowledged event reaches exactly one part.
//!
//! # Exactly once, bounded memory
//! The duplicate set holds the ids of the events whose `timestamp` is within `--max-age` plus
//! [`CLOCK_MARGIN`] of now; older deliveries are refused as stale before the set is asked, so
//! nothing older needs remembering. Rolled segments stay on disk until their newest event
//! leaves that window, and a start reads them back: the set survives restarts.
//!
//! # Behind a load balancer
//! The rate limit is per peer address: behind an Ingress every delivery comes from the
//! Ingress, so size `--rate-limit` for the total there (forwarded-for headers are not
//! trusted: anyone can send one). The receiver speaks plain HTTP; TLS ends at the Ingress.

pub mod journal;
pub mod roll;
pub mod server;
pub mod table;
pub mod verify;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::dest::Dest;
use crate::sink::Format;

pub use table::{scan, EventRow};
pub use verify::Verifier;

/// Allowed clock difference between HighLevel and this machine on top of `--max-age`, for
/// how long ids are remembered.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(60);

/// Defaults of the `listen` flags.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
pub const DEFAULT_RATE_LIMIT: u32 = 1000;
pub const DEFAULT_ROLL_EVERY: Duration = Duration::from_secs(60);
pub const DEFAULT_ROLL_EVENTS: u64 = 50_000;
/// The receiver rewrites its heartbeat ([`table::HEARTBEAT`]) at least this often (more
/// often when `--roll-every` is shorter).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);

/// The receiver's journal and report, by default under OUT.
pub const DEFAULT_JOURNAL_DIR: &str = "_state/events";

/// The report file in the journal directory, rewritten at every roll and at shutdown.
pub const REPORT_FILE: &str = "listen-report.json";

/// What the receiver does, resolved (no flags here).
#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// Where the events table goes.
    pub out: Dest,
    /// A local directory: segments, roll state, report, lock.
    pub journal: PathBuf,
    pub format: Format,
    pub verifier: Verifier,
    /// Oldest (and furthest in the future) `timestamp` accepted, from now.
    pub max_age: Duration,
    pub max_body: usize,
    /// Deliveries per second per peer address, bursts of as many; `None`: no limit.
    pub rate_limit: Option<NonZeroU32>,
    pub roll_every: Duration,
    pub roll_events: u64,
}

impl ListenConfig {
    pub fn new(out: Dest, journal: PathBuf, verifier: Verifier) -> ListenConfig {
        ListenConfig {
            out,
            journal,
            format: Format::Parquet,
            verifier,
            max_age: DEFAULT_MAX_AGE,
            max_body: DEFAULT_MAX_BODY,
            rate_limit: NonZeroU32::new(DEFAULT_RATE_LIMIT),
            roll_every: DEFAULT_ROLL_EVERY,
            roll_events: DEFAULT_ROLL_EVENTS,
        }
    }

    /// How far back ids are remembered: `max_age` + [`CLOCK_MARGIN`], in milliseconds.
    fn horizon_ms(&self) -> i64 {
        i64::try_from((self.max_age + CLOCK_MARGIN).as_millis()).unwrap_or(i64::MAX / 4)
    }
}

/// The receiver failed.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal segment {} is damaged at byte {offset}, before its end: it was sealed complete, so this is disk corruption, not an interrupted append\nhint: move the file aside to start (its events from byte {offset} on are lost), after copying it for inspection", path.display())]
    Corrupt { path: PathBuf, offset: u64 },
    #[error("events table {}: {detail}", path.display())]
    Table { path: PathBuf, detail: String },
    #[error("{} is not a roll state this version reads: {detail}", path.display())]
    State { path: PathBuf, detail: String },
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error(transparent)]
    Lock(#[from] crate::durable::lock::LockError),
    #[error(transparent)]
    Key(#[from] verify::KeyError),
    #[error("the receiver's {0} thread stopped unexpectedly")]
    Thread(&'static str),
}

impl EventsError {
    pub(crate) fn io<'p>(
        action: &'static str,
        path: &'p Path,
    ) -> impl FnOnce(std::io::Error) -> EventsError + 'p {
        move |source| EventsError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<crate::durable::WriteError> for EventsError {
    fn from(e: crate::durable::WriteError) -> EventsError {
        EventsError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }
}

/// The receiver's counters, shared by the handlers, the writer and the roller.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub signature: AtomicU64,
    pub stale: AtomicU64,
    pub malformed: AtomicU64,
    pub too_large: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Answered 429: the journal queue was full or the journal failed.
    pub unavailable: AtomicU64,
    pub parts_written: AtomicU64,
    pub events_rolled: AtomicU64,
}

/// Deliveries refused, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refused {
    pub signature: u64,
    pub stale: u64,
    pub malformed: u64,
    pub too_large: u64,
    pub rate_limited: u64,
}

/// A snapshot of [`Stats`], as `/stats` and the report show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// Stored (answered 200 after the fsync).
    pub accepted: u64,
    /// Answered 200, already stored.
    pub duplicates: u64,
    pub refused: Refused,
    pub unavailable: u64,
    pub parts_written: u64,
    pub events_rolled: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            accepted: get(&self.accepted),
            duplicates: get(&self.duplicates),
            refused: Refused {
                signature: get(&self.signature),
                stale: get(&self.stale),
                malformed: get(&self.malformed),
                too_large: get(&self.too_large),
                rate_limited: get(&self.rate_limited),
            },
            unavailable: get(&self.unavailable),
            parts_written: get(&self.parts_written),
            events_rolled: get(&self.events_rolled),
        }
    }
}

/// Runs the receiver on `listener` until `shutdown` resolves (or the journal fails): then
/// stops accepting, finishes the requests in flight, rolls what the journal holds, and
/// returns the counters.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: ListenConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Counters, EventsError> {
    let started_ms = crate::timefmt::now_millis();
    let dir = config.journal.clone();
    std::fs::create_dir_all(&dir).map_err(EventsError::io("create directory", &dir))?;
    let _lock = crate::durable::lock::RunLock::acquire(&dir.join("listen.lock"))?;
    crate::durable::remove_stale_temps(&dir).map_err(EventsError::io("clean", &dir))?;

    let horizon_ms = config.horizon_ms();
    let recovered = journal::recover(&dir, started_ms - horizon_ms)?;
    let state = roll::RollState::load(&dir)?;
    let rolled = state.rolled_through.unwrap_or(0);
    let last = recovered.segments.last().map_or(0, |s| s.seq);
    let (kept, unrolled): (Vec<_>, Vec<_>) = recovered
        .segments
        .into_iter()
        .partition(|s| s.seq <= rolled);
    if !unrolled.is_empty() {
        tracing::info!(
            segments = unrolled.len(),
            "rolling the journal segments a previous run left unrolled"
        );
    }
    // After the parts already in OUT too: a new journal (a lost volume) must not number its
    // parts below what readers have already read.
    let highest = table::highest_part(&config.out)?.unwrap_or(0);
    let segment = journal::Segment::create(&dir, last.max(rolled).max(highest) + 1)?;

    let stats = Arc::new(Stats::default());
    let stopping = Arc::new(AtomicBool::new(false));
    let (roll_tx, roll_rx) = std::sync::mpsc::channel::<u64>();
    for s in &unrolled {
        // The receiver is the roller's, alive: a send cannot fail.
        let _ = roll_tx.send(s.seq);
    }
    let roller = roll::Roller {
        dir: dir.clone(),
        out: config.out.clone(),
        format: config.format,
        horizon_ms,
        kept,
        state,
        stats: stats.clone(),
        started_ms,
        stopping: stopping.clone(),
    };
    let roller = std::thread::Builder::new()
        .name("events-roll".into())
        .spawn(move || roller.run(roll_rx))
        .map_err(|_| EventsError::Thread("roll"))?;

    let (fatal_tx, mut fatal_rx) = tokio::sync::watch::channel(false);
    let (tx, rx) = std::sync::mpsc::sync_channel(journal::QUEUE);
    let writer = journal::Writer {
        dir: dir.clone(),
        segment,
        seen: recovered.seen,
        horizon_ms,
        roll_every: config.roll_every,
        roll_events: config.roll_events.max(1),
        roller: roll_tx,
        stats: stats.clone(),
    };
    let writer = std::thread::Builder::new()
        .name("events-journal".into())
        .spawn(move || {
            let done = writer.run(rx);
            if done.is_err() {
                fatal_tx.send_replace(true);
            }
            done
        })
        .map_err(|_| EventsError::Thread("journal"))?;

    let app = Arc::new(server::AppState::new(
        &config,
        tx.clone(),
        stats.clone(),
        started_ms,
    ));
    let ready = app.ready.clone();
    // The first heartbeat before the first delivery is taken, then one every interval.
    let every = config.roll_every.min(HEARTBEAT_EVERY);
    let beat = {
        let (out, stats) = (config.out.clone(), stats.clone());
        move |stopped_ms: Option<i64>| {
            let now = crate::timefmt::now_millis();
            let beat = table::Heartbeat {
                started_ms,
                alive_ms: now,
                interval_ms: i64::try_from(every.as_millis()).unwrap_or(i64::MAX),
                lossy_refusals: stats.stale.load(Ordering::Relaxed)
                    + stats.unavailable.load(Ordering::Relaxed),
                stopped_ms: stopped_ms.map(|_| now),
            };
            table::write_heartbeat(&out, &beat)
        }
    };
    beat(None)?;
    let last_beat = beat.clone();
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let beat = beat.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || beat(None)).await {
                tracing::warn!(error = %e, "cannot write the receiver's heartbeat; retrying at the next interval");
            }
        }
    });
    ready.store(true, Ordering::SeqCst);
    let stop = {
        let ready = ready.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                Ok(_) = fatal_rx.wait_for(|failed| *failed) => {}
            }
            ready.store(false, Ordering::SeqCst);
        }
    };
    let served = axum::serve(
        listener,
        server::router(app).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await;
    ready.store(false, Ordering::SeqCst);
    // No heartbeat once it stops accepting: a reader then sees it down.
    heartbeat.abort();
    stopping.store(true, Ordering::SeqCst);
    tracing::info!("stopped accepting; sealing and rolling the journal");

    // Every handler has answered; the writer seals its segment and hands it to the roller.
    let writer_done = tokio::task::spawn_blocking(move || {
        let _ = tx.send(journal::Msg::Stop);
        drop(tx);
        writer.join()
    })
    .await;
    let roller_done = tokio::task::spawn_blocking(move || roller.join()).await;
    // Stopped, after the last roll: a reader knows that what is sent from now on is lost.
    if let Err(e) = tokio::task::spawn_blocking(move || last_beat(Some(0)))
        .await
        .unwrap_or(Err(EventsError::Thread("heartbeat")))
    {
        tracing::warn!(error = %e, "cannot write the receiver's last heartbeat");
    }
    let counters = stats.snapshot();
    tracing::info!(
        accepted = counters.accepted,
        duplicates = counters.duplicates,
        signature = counters.refused.signature,
        stale = counters.refused.stale,
        malformed = counters.refused.malformed,
        too_large = counters.refused.too_large,
        rate_limited = counters.refused.rate_limited,
        unavailable = counters.unavailable,
        parts_written = counters.parts_written,
        "receiver stopped"
    );
    served.map_err(EventsError::io(
        "serve on",
        Path::new("the listening socket"),
    ))?;
    match writer_done {
        Ok(Ok(r)) => r?,
        _ => return Err(EventsError::Thread("journal")),
    }
    match roller_done {
        Ok(Ok(r)) => r?,
        _ => return Err(EventsError::Thread("roll")),
    }
    Ok(counters)
}
