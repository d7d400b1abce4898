//! Exit codes: each means one thing, and the README documents them for schedulers.

use crate::api::{ApiError, ClientBuildError, ErrorKind};
use crate::export::ExportError;
use crate::pipeline::lock::LockError;

pub const OK: u8 = 0;
/// Anything not covered below (I/O errors, bugs).
pub const FAILURE: u8 = 1;
/// Bad arguments or settings (clap also exits 2 on usage errors).
pub const USAGE: u8 = 2;
/// The API refused the token (401) or its access to the location (403).
pub const AUTH: u8 = 3;
/// The API rejected a request for good (4xx) or misbehaved (cursor loop).
pub const API: u8 = 4;
/// A transient failure outlasted the retries (5xx, timeouts, 429s): try again later.
pub const TRANSIENT: u8 = 5;
/// An import finished, but rejected some rows (they are in its rejects file).
pub const REJECTED_ROWS: u8 = 6;
/// The location's daily request quota is spent (or this run's budget): resume after it resets.
pub const QUOTA: u8 = 75;
/// A pipeline over many locations finished some and failed others (see its report).
pub const PARTIAL: u8 = 7;
/// (export) Complete except the child requests the API refused for good, listed under
/// `skipped` in the run report and the manifest.
pub const SKIPPED: u8 = 9;
/// Another run holds the lock: of the same pipeline (`run`), or of the same location and output
/// (`export`). Nothing was done; schedulers can treat it as "skipped". Inside a pipeline, a
/// location whose export lock is held fails like any other location (exit 7).
pub const BUSY: u8 = 8;
/// Stopped by SIGINT (128 + 2): the complete pages are committed; rerun to resume.
pub const INTERRUPTED_INT: u8 = 130;
/// Stopped by SIGTERM (128 + 15): the complete pages are committed; rerun to resume.
pub const INTERRUPTED_TERM: u8 = 143;

/// Whether an exit code means "stopped by a signal" (status `interrupted` in the reports).
pub fn is_interrupted(code: u8) -> bool {
    code == INTERRUPTED_INT || code == INTERRUPTED_TERM
}

/// Marks an error as a usage error (bad settings found before any work).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// An export that completed except the child requests listed under `skipped` (exit 9).
/// Carried as an error until the typed outcome replaces it.
#[derive(Debug, thiserror::Error)]
#[error("the export of location {location_id} completed except {count} child requests the API refused for good; they are listed under 'skipped' in {report} and the manifest\nhint: every other row is exported; each entry names the contact, the request, its HTTP status and traceId (quote it to HighLevel support)")]
pub struct CompleteExceptSkipped {
    pub location_id: String,
    pub count: usize,
    pub report: String,
}

/// The exit code for an error, from the first cause in its chain that decides it.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(i) = cause.downcast_ref::<crate::import::cli::Incomplete>() {
            return if i.transient() {
                TRANSIENT
            } else {
                REJECTED_ROWS
            };
        }
        if cause.downcast_ref::<CompleteExceptSkipped>().is_some() {
            return SKIPPED;
        }
        if let Some(e) = cause.downcast_ref::<ExportError>() {
            return match e {
                ExportError::TooManySkipped { .. } => API,
                ExportError::QuotaStop { .. } => QUOTA,
                ExportError::Interrupted { signal, .. } => signal.exit_code(),
                ExportError::Lock(LockError::Busy { .. }) => BUSY,
                ExportError::CheckpointMismatch { .. } | ExportError::Unsupported(_) => USAGE,
                ExportError::Sink(crate::sink::SinkError::UnsafeLocationId { .. }) => USAGE,
                ExportError::Extract(_) => e.api().map_or(API, api_code),
                _ => FAILURE,
            };
        }
        if let Some(LockError::Busy { .. }) = cause.downcast_ref::<LockError>() {
            return BUSY;
        }
        if let Some(p) = cause.downcast_ref::<super::PipelineExit>() {
            return p.0;
        }
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            return api_code(api);
        }
        if cause.downcast_ref::<ClientBuildError>().is_some()
            || cause.downcast_ref::<UsageError>().is_some()
        {
            return USAGE;
        }
    }
    FAILURE
}

fn api_code(err: &ApiError) -> u8 {
    if err.status() == Some(403) {
        return AUTH;
    }
    match err.kind() {
        ErrorKind::Reauth => AUTH,
        ErrorKind::Retry => TRANSIENT,
        ErrorKind::QuotaExhausted => QUOTA,
        ErrorKind::Fatal | ErrorKind::NotFound | ErrorKind::Duplicate => API,
    }
}
