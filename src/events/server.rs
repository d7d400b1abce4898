//! The HTTP side of the receiver (axum): deliveries on `POST /` and `POST /webhook`, and
//! `GET /healthz`, `/readyz` and `/stats`.
//!
//! A delivery goes through the checks in the order that spends the least on a hostile
//! request: the per-source rate limit (429), the body size (413, from `Content-Length` before
//! reading, or while reading), the signature over the raw bytes (401), then the body parsed
//! (400) and its timestamp checked (401, stale). Only then does it reach the journal writer,
//! and the answer waits for it: 200 `{"status":"stored"}` once fsynced, 200
//! `{"status":"duplicate"}` for an id stored before, 429 when the journal cannot take
//! it (the one status HighLevel retries, about 10 minutes later).
//! Every refusal is counted by reason ([`super::Stats`]) and logged at debug level with the
//! peer and reason; bodies are never logged (they hold personal data), and the text of a
//! delivery that is logged (its id) is escaped ([`crate::term`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;

use super::journal::{Appended, Msg, Pending, Record};
use super::table::parse_head;
use super::verify::{Verifier, GHL_SIGNATURE, WH_SIGNATURE};
use super::{ListenConfig, Stats};

/// What every handler shares.
pub struct AppState {
    verifier: Verifier,
    stats: Arc<Stats>,
    journal: SyncSender<Msg>,
    max_age_ms: i64,
    max_body: usize,
    limiter: Option<PeerLimiter>,
    started_ms: i64,
    /// The journal is open and the receiver is not shutting down (`/readyz`).
    pub ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(
        config: &ListenConfig,
        journal: SyncSender<Msg>,
        stats: Arc<Stats>,
        started_ms: i64,
    ) -> AppState {
        AppState {
            verifier: config.verifier.clone(),
            stats,
            journal,
            max_age_ms: i64::try_from(config.max_age.as_millis()).unwrap_or(i64::MAX / 4),
            max_body: config.max_body,
            limiter: config
                .rate_limit
                .map(|r| PeerLimiter::new(f64::from(r.get()))),
            started_ms,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The receiver's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", post(deliver))
        .route("/webhook", post(deliver))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/stats", get(stats))
        .with_state(state)
}

async fn healthz() -> Response {
    json(StatusCode::OK, r#"{"status":"ok"}"#)
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(Ordering::SeqCst) {
        json(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready"}"#)
    }
}

async fn stats(State(s): State<Arc<AppState>>) -> Response {
    let body = serde_json::to_string(&s.stats.snapshot()).unwrap_or_default();
    json(StatusCode::OK, body)
}

/// Why a delivery was refused: its status, counter and reason word.
#[derive(Copy, Clone, Debug)]
enum Refusal {
    RateLimited,
    TooLarge,
    Signature(&'static str),
    Malformed(&'static str),
    Stale,
    Unavailable,
}

impl Refusal {
    fn respond(self, s: &AppState, peer: IpAddr) -> Response {
        let (status, reason, message, counter) = match self {
            Refusal::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many deliveries from this address",
                &s.stats.rate_limited,
            ),
            Refusal::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "body over the size limit",
                &s.stats.too_large,
            ),
            Refusal::Signature(m) => (StatusCode::UNAUTHORIZED, "signature", m, &s.stats.signature),
            Refusal::Malformed(m) => (StatusCode::BAD_REQUEST, "malformed", m, &s.stats.malformed),
            Refusal::Stale => (
                StatusCode::UNAUTHORIZED,
                "stale",
                "timestamp outside the accepted window (--max-age)",
                &s.stats.stale,
            ),
            // 429, not 503: HighLevel retries a delivery only when it is answered 429.
            Refusal::Unavailable => (
                StatusCode::TOO_MANY_REQUESTS,
                "unavailable",
                "the journal cannot take the delivery now; retry",
                &s.stats.unavailable,
            ),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, reason, "delivery refused: {message}");
        let body = serde_json::json!({"status": "refused", "reason": reason, "message": message});
        let mut response = json(status, body.to_string());
        if matches!(self, Refusal::RateLimited | Refusal::Unavailable) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// `POST /` and `POST /webhook`.
async fn deliver(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let peer = peer.ip();
    // Stored and duplicate deliveries are counted by the journal writer.
    match admit(&s, peer, &headers, body).await {
        Ok(Appended::Stored) => json(StatusCode::OK, r#"{"status":"stored"}"#),
        Ok(Appended::Duplicate) => json(StatusCode::OK, r#"{"status":"duplicate"}"#),
        Err(refusal) => refusal.respond(&s, peer),
    }
}

/// The checks, in order, then the journal.
async fn admit(
    s: &AppState,
    peer: IpAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<Appended, Refusal> {
    if let Some(limiter) = &s.limiter {
        if !limiter.allow(peer) {
            return Err(Refusal::RateLimited);
        }
    }
    let raw = read_body(headers, body, s.max_body).await?;
    let header = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
    s.verifier
        .verify(header(GHL_SIGNATURE), header(WH_SIGNATURE), &raw)
        .map_err(|e| Refusal::Signature(e.describe()))?;
    let head = parse_head(&raw).map_err(|e| Refusal::Malformed(e.describe()))?;
    let now = crate::timefmt::now_millis();
    if now.saturating_sub(head.timestamp_ms).unsigned_abs() > s.max_age_ms.unsigned_abs() {
        return Err(Refusal::Stale);
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let record = Record {
        received_at_ms: now,
        started_ms: s.started_ms,
        timestamp_ms: head.timestamp_ms,
        webhook_id: head.webhook_id,
        raw,
    };
    match s.journal.try_send(Msg::Append(Pending { record, reply })) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            return Err(Refusal::Unavailable)
        }
    }
    answer.await.map_err(|_| Refusal::Unavailable)
}

/// The body, up to `max` bytes: 413 past it (refused from `Content-Length` before reading
/// when it says so), 400 if the connection fails mid-body.
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Vec<u8>, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(Refusal::TooLarge);
    }
    let mut raw = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Refusal::Malformed("body could not be read"))?;
        if raw.len() + chunk.len() > max {
            return Err(Refusal::TooLarge);
        }
        raw.extend_from_slice(&chunk);
    }
    Ok(raw)
}

fn json(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.into(),
    )
        .into_response()
}

/// A token bucket per peer address: `rate` deliveries a second, bursts of `rate`.
struct PeerLimiter {
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Above this many addresses, the full buckets (idle peers) are dropped.
const MAX_PEERS: usize = 16 * 1024;

impl PeerLimiter {
    fn new(rate: f64) -> PeerLimiter {
        PeerLimiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn allow(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        // A poisoned lock (a panic elsewhere, which nothing here does) still holds buckets.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_PEERS && !buckets.contains_key(&peer) {
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
        }
        let (tokens, at) = buckets.entry(peer).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_over_its_rate_is_limited_and_others_are_not() {
        let limiter = PeerLimiter::new(3.0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let allowed = (0..10).filter(|_| limiter.allow(a)).count();
        // The burst, and at most what refilled during the loop.
        assert!((3..=4).contains(&allowed), "{allowed}");
        assert!(limiter.allow(b));
    }
}
