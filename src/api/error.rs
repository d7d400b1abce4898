//! The one error type of the API client, classified by what the caller should do.

use std::time::Duration;

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
    #[error("{request}: the location's daily request quota is spent{}", trace(.trace_id))]
    QuotaExhausted {
        request: RequestLabel,
        trace_id: Option<String>,
    },
    #[error("{last}\n(gave up after {attempts} attempts)")]
    GaveUp { attempts: u32, last: Box<ApiError> },
}

fn trace(id: &Option<String>) -> String {
    match id {
        Some(t) => format!(" [traceId {}]", Escaped(t)),
        None => String::new(),
    }
}

impl ApiError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Transient { .. } => ErrorKind::Retry,
            ApiError::Unauthorized { .. } => ErrorKind::Reauth,
            ApiError::Fatal { .. } => ErrorKind::Fatal,
            ApiError::NotFound { .. } => ErrorKind::NotFound,
            ApiError::Duplicate { .. } => ErrorKind::Duplicate,
            ApiError::QuotaExhausted { .. } => ErrorKind::QuotaExhausted,
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
            ApiError::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }
}
