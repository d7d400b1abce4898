//! The one retry policy. Every API call goes through [`RetryPolicy::run`]; nothing retries at
//! a call site.
//!
//! Transient failures (429, 5xx, 408, timeouts, resets, malformed bodies) are retried with
//! exponential backoff and full jitter, never sooner than the server's `Retry-After`. A request
//! that is not idempotent (a create) is retried only when it surely never took effect: a 429,
//! or a connection that could not be made. Anything else is handed back so the caller can look
//! the record up first (see [`super::ApiError::maybe_applied`]).
//!
//! Two limits keep a server from stalling a run without saying so: one wait is at most
//! [`RetryPolicy::max_wait`] (a `Retry-After` of an hour, or a date in 2100, is cut to it), and
//! a request gives up once its next attempt would start after [`RetryPolicy::deadline`],
//! counted from its first attempt. Giving up names the server's own retry time, so a scheduler
//! (or a person) knows when to run again. Long waits are logged at info, with the request.

use std::time::{Duration, SystemTime};

use super::error::{human, ApiError, ErrorKind};

/// Retry settings. The defaults ride out a few minutes of 5xx or 429s.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request for 5xx, timeouts and malformed bodies, the first included.
    pub max_attempts: u32,
    /// Attempts per request while the server answers 429 (rate limiting is expected to pass).
    pub max_rate_limited_attempts: u32,
    /// First backoff; doubles each attempt up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// The longest single wait, whatever the server's `Retry-After` asks
    /// (`--max-retry-wait`).
    pub max_wait: Duration,
    /// The longest a request may take across all its attempts and waits
    /// (`--request-deadline`): no attempt starts after it.
    pub deadline: Duration,
}

/// A wait longer than this is logged at info (when it starts and when it ends).
pub const LONG_WAIT: Duration = Duration::from_secs(30);

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            max_rate_limited_attempts: 40,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            max_wait: Duration::from_secs(300),
            deadline: Duration::from_secs(900),
        }
    }
}

/// Whether a request may be sent twice without changing the outcome.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Idempotency {
    Idempotent,
    /// A create: a second send after an ambiguous failure may create a second record.
    NonIdempotent,
}

impl RetryPolicy {
    /// The backoff before attempt `attempt + 1` (attempt counts from 1): a random delay in
    /// `[d/2, d]` where `d = base * 2^(attempt-1)` capped at `max_delay`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let cap = exp.min(self.max_delay);
        let half = cap / 2;
        half + half.mul_f64(jitter_unit())
    }

    /// Runs `attempt` until it succeeds, fails for good, or the attempts or the deadline run
    /// out. `on_retry` is told about each retry (for counters and logs).
    pub async fn run<T, F, Fut>(
        &self,
        idempotency: Idempotency,
        mut attempt: F,
        mut on_retry: impl FnMut(&ApiError, Duration),
    ) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let started = tokio::time::Instant::now();
        let mut failures = 0u32;
        let mut rate_limited = 0u32;
        // When the server last said it would take requests again.
        let mut retry_at: Option<SystemTime> = None;
        loop {
            let err = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if err.kind() != ErrorKind::Retry {
                return Err(err);
            }
            if idempotency == Idempotency::NonIdempotent && err.maybe_applied() {
                return Err(err);
            }
            let asked = err.retry_after();
            if let Some(wait) = asked {
                retry_at = SystemTime::now().checked_add(wait);
            }
            let is_429 = err.status() == Some(429);
            if is_429 {
                rate_limited += 1;
            } else {
                failures += 1;
            }
            let total = failures + rate_limited;
            let give_up = |err: ApiError, out_of_time: bool| ApiError::GaveUp {
                attempts: total,
                elapsed: started.elapsed(),
                out_of_time,
                // A time already past is no advice.
                retry_at: retry_at.filter(|t| *t > SystemTime::now()),
                last: Box::new(err),
            };
            if failures >= self.max_attempts || rate_limited >= self.max_rate_limited_attempts {
                return Err(give_up(err, false));
            }
            let n = if is_429 {
                rate_limited.min(4)
            } else {
                failures
            };
            let wanted = self.backoff(n).max(asked.unwrap_or_default());
            let delay = wanted.min(self.max_wait);
            if started.elapsed() + delay >= self.deadline {
                return Err(give_up(err, true));
            }
            on_retry(&err, delay);
            let capped = delay < wanted;
            let loud = delay > LONG_WAIT || capped;
            if loud {
                let why = match asked {
                    Some(a) if capped => format!(
                        " (the server's Retry-After asked for {}; one wait is capped at {}: --max-retry-wait)",
                        human(&a),
                        human(&self.max_wait)
                    ),
                    Some(a) => format!(" (the server's Retry-After asked for {})", human(&a)),
                    None => String::new(),
                };
                tracing::info!(
                    wait_secs = delay.as_secs_f64(),
                    "{err}: waiting {} before attempt {}{why}",
                    human(&delay),
                    total + 1
                );
            }
            tokio::time::sleep(delay).await;
            if loud {
                tracing::info!(
                    "{}: wait over, sending attempt {}",
                    err.request(),
                    total + 1
                );
            }
        }
    }
}

/// A uniform number in [0, 1) from a per-thread xorshift generator: jitter needs spread, not
/// cryptographic quality, and this keeps a dependency out of the hot path.
pub(crate) fn jitter_unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x9E37_79B9);
            let addr = &t as *const u64 as u64;
            (t ^ addr.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::RequestLabel;
    use std::cell::Cell;

    fn transient(status: u16, retry_after: Option<Duration>, maybe_applied: bool) -> ApiError {
        ApiError::Transient {
            request: RequestLabel("GET /x".into()),
            reason: format!("HTTP {status}"),
            retry_after,
            maybe_applied,
            status: Some(status),
            trace_id: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_5xx_then_succeeds() {
        let calls = Cell::new(0);
        let policy = RetryPolicy::default();
        let out = policy
            .run(
                Idempotency::Idempotent,
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move {
                        if n < 3 {
                            Err(transient(502, None, true))
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(out.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_429_waits_for_retry_after() {
        let start = tokio::time::Instant::now();
        let calls = Cell::new(0);
        let out = RetryPolicy::default()
            .run(
                Idempotency::Idempotent,
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move {
                        if n == 1 {
                            Err(transient(429, Some(Duration::from_secs(7)), false))
                        } else {
                            Ok(())
                        }
                    }
                },
                |_, _| {},
            )
            .await;
        assert!(out.is_ok());
        assert!(start.elapsed() >= Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn create_is_not_retried_after_ambiguous_failure() {
        let calls = Cell::new(0);
        let out: Result<(), _> = RetryPolicy::default()
            .run(
                Idempotency::NonIdempotent,
                || {
                    calls.set(calls.get() + 1);
                    async { Err(transient(502, None, true)) }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(calls.get(), 1);
        assert!(out.unwrap_err().maybe_applied());
        // …but a 429 (rejected before it took effect) is retried.
        let calls = Cell::new(0);
        let _ = RetryPolicy::default()
            .run(
                Idempotency::NonIdempotent,
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move {
                        if n == 1 {
                            Err(transient(429, None, false))
                        } else {
                            Ok(())
                        }
                    }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(calls.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_and_says_so() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let err = policy
            .run(
                Idempotency::Idempotent,
                || async { Err::<(), _>(transient(503, None, true)) },
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::GaveUp { attempts: 3, .. }));
        assert!(err.to_string().contains("gave up after 3 attempts"));
    }

    #[tokio::test(start_paused = true)]
    async fn far_future_retry_after_waited_an_hour_per_attempt() {
        let start = tokio::time::Instant::now();
        let calls = Cell::new(0);
        let out = RetryPolicy::default()
            .run(
                Idempotency::Idempotent,
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move {
                        if n == 1 {
                            Err(transient(429, Some(Duration::from_secs(3600)), false))
                        } else {
                            Ok(())
                        }
                    }
                },
                |_, _| {},
            )
            .await;
        assert!(out.is_ok());
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(300) && waited < Duration::from_secs(301),
            "one wait is capped at max_wait (5 min), not the hour asked: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn endless_429s_retried_40_times_for_hours_instead_of_stopping_at_a_deadline() {
        let start = tokio::time::Instant::now();
        let before = SystemTime::now();
        let calls = Cell::new(0);
        let err = RetryPolicy::default()
            .run(
                Idempotency::Idempotent,
                || {
                    calls.set(calls.get() + 1);
                    async { Err::<(), _>(transient(429, Some(Duration::from_secs(3600)), false)) }
                },
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert!(
            start.elapsed() <= Duration::from_secs(900),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            calls.get(),
            3,
            "attempts at 0, 5 and 10 minutes; a 4th would pass 15"
        );
        assert_eq!(err.kind(), ErrorKind::Retry, "exit 5: try again later");
        let ApiError::GaveUp {
            out_of_time: true,
            retry_at: Some(at),
            ..
        } = &err
        else {
            panic!("gave up at the deadline with the server's time: {err:?}");
        };
        assert!(*at >= before + Duration::from_secs(3599), "{at:?}");
        let msg = err.to_string();
        assert!(msg.contains("GET /x: HTTP 429"), "{msg}");
        assert!(msg.contains("request deadline"), "{msg}");
        assert!(
            msg.contains(&format!("retry after {}", crate::api::error::utc(*at))),
            "{msg}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_dated_2100_is_named_when_giving_up() {
        let in_2100 = SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800);
        let wait = in_2100.duration_since(SystemTime::now()).unwrap();
        let policy = RetryPolicy {
            max_wait: Duration::from_secs(1),
            deadline: Duration::from_secs(3),
            ..RetryPolicy::default()
        };
        let err = policy
            .run(
                Idempotency::Idempotent,
                || async move { Err::<(), _>(transient(429, Some(wait), false)) },
                |_, _| {},
            )
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("retry after 2100-01-01T00:00:0"), "{msg}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_error_is_never_retried() {
        let calls = Cell::new(0);
        let err = RetryPolicy::default()
            .run(
                Idempotency::Idempotent,
                || {
                    calls.set(calls.get() + 1);
                    async {
                        Err::<(), _>(ApiError::Refused {
                            request: RequestLabel("GET /x".into()),
                            status: None,
                            reason: "cannot be built".into(),
                            hint: "h".into(),
                        })
                    }
                },
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert_eq!(calls.get(), 1);
        assert_eq!(err.kind(), ErrorKind::Fatal);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for a in 1..20 {
            let d = p.backoff(a);
            assert!(d <= p.max_delay, "{d:?}");
            assert!(d >= (p.base_delay * (1 << (a - 1).min(16))).min(p.max_delay) / 2);
        }
    }
}
