//! The one protocol that keeps a create from happening twice, for contacts, tasks and notes.
//!
//! The API has no idempotency key, and a create whose outcome is unknown (a timeout, a 5xx
//! after the request was sent, the process killed mid-request) may still land later: the
//! service finishes a request whether or not its client is still there, and its duplicate
//! search is backed by an index that sees a write only a while after it landed. Looking the
//! record up right after such a failure can find nothing and create it a second time. So:
//!
//! 1. Before each attempt of a create goes on the wire (after the client's pace and permit
//!    waits, and before every retry of a 429) an `intent` line stamped with that instant is
//!    made durable in the journal.
//! 2. A create that fails ambiguously is not looked up at once: the row is set aside
//!    ([`Attempt::Deferred`]) until its last attempt is older than the request timeout (the
//!    longest the request can have been in flight) plus a settle time (for the write to land
//!    and the search index to see it). Rows set aside do not hold a slot of the run's
//!    concurrency; they are taken up again after the other rows, after one wait.
//! 3. A run that finds intents an earlier run left unconfirmed (it was killed, or its machine
//!    died) waits once, at start-up, until the newest of them is that old ([`startup_wait`]).
//! 4. Only then is the record looked up; only if the lookup finds nothing is it created again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;

use super::journal::{now_ms, Action, Journal, JournalError, JournalState, Record, RowState};
use crate::api::{ApiError, BeforeSend, RequestLabel};

/// Attempts at an ambiguous create for one row in one run before the row is left for a rerun.
const MAX_AMBIGUOUS: u32 = 6;

/// The default settle time: how long after a write may still be invisible to a lookup.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(10);

/// How long to wait before looking up a create whose outcome is unknown.
#[derive(Copy, Clone, Debug)]
pub struct Settle {
    /// This run's request timeout: how long a create it sends can stay in flight.
    pub timeout: Duration,
    /// After that, how long the service may take to apply the write and show it to searches.
    pub settle: Duration,
}

impl Default for Settle {
    fn default() -> Self {
        Settle {
            timeout: Duration::from_millis(super::journal::DEFAULT_TIMEOUT_MS),
            settle: DEFAULT_SETTLE,
        }
    }
}

/// What one pass of the protocol did for a row.
pub(crate) enum Attempt<F, C> {
    /// The lookup after an earlier ambiguous create found a record: `since` is that row's first
    /// intent, for telling a record this import made from one that existed before.
    Found { found: F, since: i64 },
    /// The create succeeded.
    Created(C),
    /// The create failed in a way that surely did not apply. `earlier`: the first intent of an
    /// earlier ambiguous create of this row, if any (a duplicate refusal may then be ours).
    Refused {
        error: ApiError,
        earlier: Option<i64>,
        first_intent: i64,
    },
    /// The lookup failed: the row cannot go on in this run.
    LookupFailed(ApiError),
    /// The create failed ambiguously: try the row again (lookup first) at `until` (epoch ms).
    Deferred { until: i64 },
    /// Too many ambiguous failures in this run: leave the row for a rerun.
    GaveUp,
}

#[derive(Copy, Clone, Debug)]
struct Pending {
    first: i64,
    attempts: u32,
}

/// This run's unconfirmed creates, by input line, and the journal their intents go to.
pub(crate) struct InFlight<'a> {
    journal: &'a Journal,
    settle: Settle,
    rows: Mutex<HashMap<u64, Pending>>,
}

impl<'a> InFlight<'a> {
    pub(crate) fn new(journal: &'a Journal, settle: Settle) -> InFlight<'a> {
        InFlight {
            journal,
            settle,
            rows: Mutex::new(HashMap::new()),
        }
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One pass for one row: look up (if an earlier create of the row is unconfirmed), else
    /// create, with an intent made durable right before each attempt goes on the wire (the
    /// client calls the [`BeforeSend`] it is given after its pace and permit waits, so the
    /// intent carries the real send time). `lookup` gets the row's first intent (epoch ms).
    pub(crate) async fn create<F, C>(
        &self,
        line: u64,
        key: &str,
        contact: Option<&str>,
        prior: Option<&RowState>,
        lookup: impl AsyncFnOnce(i64) -> Result<Option<F>, ApiError>,
        create: impl AsyncFnOnce(BeforeSend<'_>) -> Result<C, ApiError>,
    ) -> Result<Attempt<F, C>, JournalError> {
        let mine = self.rows().get(&line).copied();
        let earlier = match (prior.and_then(|p| p.pending_since), mine.map(|m| m.first)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(since) = earlier {
            match lookup(since).await {
                Ok(Some(found)) => {
                    self.rows().remove(&line);
                    return Ok(Attempt::Found { found, since });
                }
                Ok(None) => {}
                Err(e) => return Ok(Attempt::LookupFailed(e)),
            }
        }
        if mine.is_some_and(|m| m.attempts >= MAX_AMBIGUOUS) {
            return Ok(Attempt::GaveUp);
        }
        // (first, last) send times of this pass's attempts, and a journal failure, if any.
        let sent: Mutex<Option<(i64, i64)>> = Mutex::new(None);
        let failed: Mutex<Option<JournalError>> = Mutex::new(None);
        let (sent_ref, failed_ref, journal) = (&sent, &failed, self.journal);
        let hook = move || -> BoxFuture<'_, Result<(), ApiError>> {
            Box::pin(async move {
                let at = now_ms();
                let intent = Record::Intent {
                    run: journal.run_id().to_owned(),
                    row: line,
                    key: key.to_owned(),
                    action: Action::Create,
                    at,
                    contact: contact.map(str::to_owned),
                };
                match journal.append(&intent).await {
                    Ok(()) => {
                        let mut s = sent_ref.lock().unwrap_or_else(|e| e.into_inner());
                        *s = Some(s.map_or((at, at), |(first, _)| (first, at)));
                        Ok(())
                    }
                    Err(e) => {
                        let refused = ApiError::Refused {
                            request: RequestLabel(format!("create of line {line}")),
                            status: None,
                            reason: format!("not sent: {e}"),
                            hint: "the journal must record a create before it is sent".into(),
                        };
                        *failed_ref.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        Err(refused)
                    }
                }
            })
        };
        let result = create(&hook).await;
        if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        let sent = *sent.lock().unwrap_or_else(|e| e.into_inner());
        let first_intent = match (earlier, sent) {
            (Some(a), Some((b, _))) => a.min(b),
            (Some(a), None) => a,
            (None, Some((b, _))) => b,
            (None, None) => now_ms(),
        };
        match result {
            Ok(c) => {
                self.rows().remove(&line);
                Ok(Attempt::Created(c))
            }
            Err(e) if e.maybe_applied() => {
                tracing::debug!(line, error = %e, "ambiguous create; the row is looked up after the settle time");
                let last_sent = sent.map_or_else(now_ms, |(_, last)| last);
                let mut rows = self.rows();
                let p = rows.entry(line).or_insert(Pending {
                    first: first_intent,
                    attempts: 0,
                });
                p.first = p.first.min(first_intent);
                p.attempts += 1;
                Ok(Attempt::Deferred {
                    until: last_sent.saturating_add(self.wait_ms()),
                })
            }
            Err(error) => {
                self.rows().remove(&line);
                Ok(Attempt::Refused {
                    error,
                    earlier,
                    first_intent,
                })
            }
        }
    }

    /// Request timeout plus settle time, in ms.
    fn wait_ms(&self) -> i64 {
        (self.settle.timeout + self.settle.settle)
            .as_millis()
            .min(i64::MAX as u128) as i64
    }
}

/// At start-up: waits until every create an earlier run left unconfirmed has surely ended and
/// settled, so the lookups that follow see it if it landed. One wait for the whole run.
pub(crate) async fn startup_wait(state: &JournalState, settle: &Settle) {
    let Some(in_flight_until) = state.in_flight_until() else {
        return;
    };
    let settle_ms = settle.settle.as_millis().min(i64::MAX as u128) as i64;
    let until = in_flight_until.saturating_add(settle_ms);
    let now = now_ms();
    if until <= now {
        return;
    }
    let wait = Duration::from_millis((until - now) as u64);
    tracing::info!(
        wait_secs = wait.as_secs_f64().ceil(),
        unconfirmed = state.unconfirmed(),
        settle_secs = settle.settle.as_secs_f64(),
        "an earlier run stopped with creates unconfirmed; they may still be in flight or not yet \
         visible to searches, so this run waits for them to land before looking them up \
         (their request timeout plus the settle time), and creates nothing twice"
    );
    tokio::time::sleep(wait).await;
}

/// Waits until `until` (epoch ms) before taking up rows set aside after ambiguous creates.
pub(crate) async fn wait_for_deferred(until: i64, rows: usize) {
    let now = now_ms();
    if until <= now {
        return;
    }
    let wait = Duration::from_millis((until - now) as u64);
    tracing::info!(
        rows,
        wait_secs = wait.as_secs_f64().ceil(),
        "waiting for creates that failed ambiguously to land before looking them up"
    );
    tokio::time::sleep(wait).await;
}
