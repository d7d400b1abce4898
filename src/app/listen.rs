//! The `listen` job: the webhook receiver ([`crate::events`]) with its settings resolved,
//! bound to its address, stopped by SIGTERM or SIGINT, and what it came to.
//!
//! A first SIGTERM (what Kubernetes sends) or SIGINT stops accepting, lets the requests in
//! flight finish, rolls the journal into the events table and exits 0: a stop is the normal
//! end of a receiver, not an interruption of work. A second signal exits at once, as a kill
//! would (128 + the signal): acknowledged events are in the journal, and the next start rolls
//! them.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use super::outcome::{FailKind, Outcome};
use crate::dest::{Dest, Target};
use crate::events::{EventsError, ListenConfig, Verifier};
use crate::sink::Format;

/// A receiver to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenJob {
    /// Address to bind (`127.0.0.1`; `0.0.0.0` in a container).
    pub bind: String,
    /// 0 picks a free port.
    pub port: u16,
    pub out: Target,
    pub format: Format,
    /// Default `OUT/_state/events` for a local OUT; required for a bucket.
    pub journal: Option<PathBuf>,
    /// PEM Ed25519 public key for `X-GHL-Signature`.
    pub public_key: PathBuf,
    /// PEM RSA public key: accept the legacy `X-WH-Signature` too.
    pub legacy_rsa_key: Option<PathBuf>,
    pub max_age: Duration,
    pub max_body: usize,
    /// Per peer address and second; `None`: no limit.
    pub rate_limit: Option<NonZeroU32>,
    pub roll_every: Duration,
    pub roll_events: u64,
}

impl ListenJob {
    /// A job with the documented defaults.
    pub fn new(out: Target, public_key: PathBuf) -> ListenJob {
        ListenJob {
            bind: "127.0.0.1".into(),
            port: 8080,
            out,
            format: Format::Parquet,
            journal: None,
            public_key,
            legacy_rsa_key: None,
            max_age: crate::events::DEFAULT_MAX_AGE,
            max_body: crate::events::DEFAULT_MAX_BODY,
            rate_limit: NonZeroU32::new(crate::events::DEFAULT_RATE_LIMIT),
            roll_every: crate::events::DEFAULT_ROLL_EVERY,
            roll_events: crate::events::DEFAULT_ROLL_EVENTS,
        }
    }

    /// The journal directory: `--journal`, else `OUT/_state/events` for a local OUT.
    pub fn journal_dir(&self) -> Result<PathBuf, Outcome> {
        match (&self.journal, self.out.dir()) {
            (Some(j), _) => Ok(j.clone()),
            (None, Some(out)) => Ok(out.join(crate::events::DEFAULT_JOURNAL_DIR)),
            (None, None) => Err(Outcome::usage(format!(
                "--journal DIR is required when --out is a bucket ({})\nhint: the journal must be a local directory that survives restarts (a persistent volume): acknowledged events live there until they are rolled",
                self.out
            ))),
        }
    }

    /// Runs the receiver until a signal; `on_bound` is told the address it listens on.
    pub async fn run(&self, on_bound: impl FnOnce(SocketAddr, &ListenConfig)) -> Outcome {
        if self.max_age.is_zero() || self.roll_every.is_zero() || self.roll_events == 0 {
            return Outcome::usage("--max-age, --roll-every and --roll-events must be above 0");
        }
        let journal = match self.journal_dir() {
            Ok(j) => j,
            Err(o) => return o,
        };
        let verifier = match Verifier::from_files(&self.public_key, self.legacy_rsa_key.as_deref())
        {
            Ok(v) => v,
            Err(e) => return Outcome::failed(FailKind::Usage, e),
        };
        let out = match Dest::open(&self.out) {
            Ok(d) => d,
            Err(e) => return Outcome::failed(FailKind::Other, e),
        };
        let mut config = ListenConfig::new(out, journal, verifier);
        config.format = self.format;
        config.max_age = self.max_age;
        config.max_body = self.max_body;
        config.rate_limit = self.rate_limit;
        config.roll_every = self.roll_every;
        config.roll_events = self.roll_events;

        let listener = match tokio::net::TcpListener::bind((self.bind.as_str(), self.port)).await {
            Ok(l) => l,
            Err(e) => {
                return Outcome::failed(
                    FailKind::Other,
                    anyhow::Error::from(e)
                        .context(format!("cannot listen on {}:{}", self.bind, self.port)),
                )
            }
        };
        let stop = match stop_signal() {
            Ok(s) => s,
            Err(e) => {
                return Outcome::from(
                    anyhow::Error::from(e).context("cannot install the SIGTERM/SIGINT handlers"),
                )
            }
        };
        if let Ok(addr) = listener.local_addr() {
            on_bound(addr, &config);
        }
        match crate::events::run(listener, config, stop).await {
            Ok(_) => Outcome::Complete,
            Err(EventsError::Lock(e @ crate::durable::lock::LockError::Busy { .. })) => {
                Outcome::Busy(anyhow::Error::from(e).context("another receiver uses this journal"))
            }
            Err(e) => Outcome::failed(FailKind::Other, e),
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT; a second one exits the process at once.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use crate::export::Signal;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            let mut tx = Some(tx);
            loop {
                let got = tokio::select! {
                    Some(()) = int.recv() => Signal::Int,
                    Some(()) = term.recv() => Signal::Term,
                    else => return,
                };
                match tx.take() {
                    Some(tx) => {
                        tracing::info!(signal = got.name(), "stopping: finishing the requests in flight and rolling the journal (a second signal exits at once)");
                        let _ = tx.send(());
                    }
                    None => {
                        tracing::warn!(signal = got.name(), "second signal: exiting at once (acknowledged events are in the journal; the next start rolls them)");
                        std::process::exit(i32::from(got.exit_code()));
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(());
        }
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(i32::from(Signal::Int.exit_code()));
        }
    });
    Ok(async move {
        let _ = rx.await;
    })
}
