//! The one error type of the API client, classified by what the caller should do.

use std::time::{Duration, SystemTime};

use crate::term::Escaped;

/// What a caller should do about a failed request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Transient: 429, 5xx, timeouts, resets, malformed bodies. The retry policy already
    /// retried; seeing it outside means retries were exhausted.
    Retry,
    /// 401: the token is missing, expired or revoked. Refresh it or supply a new one.
    Reauth,
    /// 403, 422 and other 4xx: the request will never succeed as sent.
    Fatal,
    /// 404, or the API's 400 "… not found" for an unknown id.
    NotFound,
    /// 400 "This location does not allow duplicated contacts." with `meta.contactId`.
    Duplicate,
    /// The location's daily request quota is spent; resume after it resets.
    QuotaExhausted,
}

/// A request as it may be shown to a user: method and path with query, never a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLabel(pub String);

impl RequestLabel {
    /// The label of `method path_and_query`; a path of absurd length (an id pasted wrongly)
    /// is shortened so that messages stay readable.
    pub fn new(method: &reqwest::Method, path_and_query: &str) -> RequestLabel {
        RequestLabel(format!(
            "{method} {}",
            crate::schema::truncate_for_message(path_and_query, 300)
        ))
    }
}

/// Text from outside (a header, an id) made safe to print with the one escaper
/// ([`crate::term::escape`]), at most `max` bytes kept.
pub(crate) fn printable(s: &str, max: usize) -> String {
    crate::schema::truncate_for_message(&crate::term::escape(s), max)
}

impl std::fmt::Display for RequestLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::term::escape(&self.0))
    }
}

/// A failed API call. Every variant names the request; none carries the token. Text the
/// server sent (messages, trace ids, ids) is shown escaped ([`crate::term::escape`]): a
/// control character or newline in it can neither drive the terminal nor forge a line.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{request}: {}{}", Escaped(.reason), trace(.trace_id))]
    Transient {
        request: RequestLabel,
        reason: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
        /// Whether the request may have reached the server and taken effect (matters for writes).
        maybe_applied: bool,
        /// HTTP status, if a response arrived.
        status: Option<u16>,
        trace_id: Option<String>,
    },
    #[error("{request}: HTTP 401 {}{}\nhint: the token is invalid or expired; set a fresh one in HL_TOKEN or --token-file", Escaped(.message), trace(.trace_id))]
    Unauthorized {
        request: RequestLabel,
        message: String,
        trace_id: Option<String>,
    },
    #[error("{request}: HTTP {status} {}{}", Escaped(&messages.join("; ")), trace(.trace_id))]
    Fatal {
        request: RequestLabel,
        status: u16,
        messages: Vec<String>,
        trace_id: Option<String>,
    },
    #[error("{request}: not found ({}){}", Escaped(.message), trace(.trace_id))]
    NotFound {
        request: RequestLabel,
        message: String,
        trace_id: Option<String>,
    },
    #[error("{request}: duplicate of existing contact {} (matching {}){}", Escaped(.contact_id), Escaped(matching_field.as_deref().unwrap_or("?")), trace(.trace_id))]
    Duplicate {
        request: RequestLabel,
        contact_id: String,
        matching_field: Option<String>,
        trace_id: Option<String>,
    },
    #[error("{request}: the location's daily request quota is spent{}\nhint: HighLevel resets the daily quota within 24 hours (it does not say when); rerun the same command then to resume", trace(.trace_id))]
    QuotaExhausted {
        request: RequestLabel,
        trace_id: Option<String>,
    },
    /// Refused on this side: a redirect, a reply over the size cap, a request that cannot be
    /// built. Never retried (the same request would meet the same refusal).
    #[error("{request}: {reason}\nhint: {hint}")]
    Refused {
        request: RequestLabel,
        /// HTTP status, if a reply arrived.
        status: Option<u16>,
        reason: String,
        hint: String,
    },
    #[error("{last}\n(gave up after {attempts} attempts in {}{})\nhint: {}", human(.elapsed), if *.out_of_time { ": the next attempt would pass the request deadline (--request-deadline)" } else { "" }, when_to_retry(.retry_at))]
    GaveUp {
        attempts: u32,
        /// From the first attempt to giving up.
        elapsed: Duration,
        /// True when the request's deadline (not the attempt count) ended the retries.
        out_of_time: bool,
        /// When the server said it will take requests again (its last `Retry-After`).
        retry_at: Option<SystemTime>,
        last: Box<ApiError>,
    },
}

/// A duration as people read it: `4.2s`, `5m00s`, `1h00m`.
pub(crate) fn human(d: &Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The advice of a request that ran out of retries: the server's own time when it gave one.
fn when_to_retry(at: &Option<SystemTime>) -> String {
    match at {
        Some(t) => format!(
            "the server asked to retry after {} (its Retry-After): run again after that",
            utc(*t)
        ),
        None => "run again later; the run resumes where it stopped".into(),
    }
}

/// A time as an absolute UTC timestamp, to the second.
pub(crate) fn utc(t: SystemTime) -> String {
    // Clamped to year 9999 so that no header can overflow the arithmetic.
    const MAX_SECS: u64 = 253_402_300_799;
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(MAX_SECS) as i64 * 1000);
    let mut s = crate::timefmt::format_iso_millis(ms);
    // `…T12:00:00.000Z` to `…T12:00:00Z`: a retry time needs no milliseconds.
    if let Some(dot) = s.rfind('.') {
        s.replace_range(dot.., "Z");
    }
    s
}

fn trace(id: &Option<String>) -> String {
    match id {
        Some(t) => format!(" [traceId {}]", Escaped(t)),
        None => String::new(),
    }
}

impl ApiError {
    /// The API refusing a request for a scope the token does not hold: a 401 that survived
    /// the token refresh, or a 403. Such a refusal of an optional request (custom field
    /// definitions, a location-wide listing) is a warning and another way, not a failure.
    pub fn is_scope_refusal(&self) -> bool {
        match self {
            ApiError::Unauthorized { .. } => true,
            // Not the API's 403 for a location the token may not use at all: every request
            // will meet that one.
            ApiError::Fatal {
                status: 403,
                messages,
                ..
            } => !messages
                .iter()
                .any(|m| m.to_ascii_lowercase().contains("access to this location")),
            _ => false,
        }
    }

    /// A 401 that says it is about a scope (the API's "The token is not authorized for this
    /// scope."): a fresh access token carries the same scopes, so it is not refreshed for.
    pub(crate) fn names_a_scope(&self) -> bool {
        matches!(self, ApiError::Unauthorized { message, .. } if message.to_ascii_lowercase().contains("scope"))
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Transient { .. } => ErrorKind::Retry,
            ApiError::Unauthorized { .. } => ErrorKind::Reauth,
            ApiError::Fatal { .. } => ErrorKind::Fatal,
            ApiError::NotFound { .. } => ErrorKind::NotFound,
            ApiError::Duplicate { .. } => ErrorKind::Duplicate,
            ApiError::QuotaExhausted { .. } => ErrorKind::QuotaExhausted,
            ApiError::Refused { .. } => ErrorKind::Fatal,
            ApiError::GaveUp { last, .. } => last.kind(),
        }
    }

    /// True when a write reported as failed may nevertheless have been applied by the server
    /// (timeout or 5xx after the request was sent): look the record up before creating again.
    pub fn maybe_applied(&self) -> bool {
        match self {
            ApiError::Transient { maybe_applied, .. } => *maybe_applied,
            ApiError::GaveUp { last, .. } => last.maybe_applied(),
            _ => false,
        }
    }

    /// The server's `Retry-After`, if this is a transient error that carried one.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status behind the error, when a reply arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Transient { status, .. } => *status,
            ApiError::Unauthorized { .. } => Some(401),
            ApiError::Fatal { status, .. } => Some(*status),
            ApiError::QuotaExhausted { .. } => Some(429),
            ApiError::Refused { status, .. } => *status,
            ApiError::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }

    /// The request that failed.
    pub fn request(&self) -> &RequestLabel {
        match self {
            ApiError::Transient { request, .. }
            | ApiError::Unauthorized { request, .. }
            | ApiError::Fatal { request, .. }
            | ApiError::NotFound { request, .. }
            | ApiError::Duplicate { request, .. }
            | ApiError::QuotaExhausted { request, .. }
            | ApiError::Refused { request, .. } => request,
            ApiError::GaveUp { last, .. } => last.request(),
        }
    }
}
