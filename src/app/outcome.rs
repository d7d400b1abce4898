//! What a command came to, as a value: every command returns an [`Outcome`], and
//! [`Outcome::exit_code`] is the one place that turns it into the process's exit status (the
//! run reports record the same code, so a report and the exit status cannot disagree).
//!
//! Errors are classified where they are still typed ([`FailKind`] from each error type below),
//! never by searching an `anyhow` chain.

use std::path::PathBuf;

use crate::api::{ApiError, ClientBuildError, ErrorKind};
use crate::auth::AuthError;
use crate::export::{ExportError, Signal};
use crate::import::{ImportError, InputError, JournalError};
use crate::sink::SinkError;

/// Exit statuses; README.md, "Exit codes", says what to do about each.
pub mod code {
    pub const OK: u8 = 0;
    /// Anything not covered below (I/O errors, bugs).
    pub const FAILURE: u8 = 1;
    /// Bad arguments or settings (the argument parser also exits 2 on a bad flag).
    pub const USAGE: u8 = 2;
    /// The API refused the token (401) or its access to the location (403).
    pub const AUTH: u8 = 3;
    /// The API rejected a request for good (4xx) or misbehaved (cursor loop).
    pub const API: u8 = 4;
    /// A transient failure outlasted the retries (5xx, timeouts, 429s): try again later.
    pub const TRANSIENT: u8 = 5;
    /// An import finished, but rejected some rows (they are in its rejects file).
    pub const REJECTED_ROWS: u8 = 6;
    /// A pipeline over many locations finished some and failed others (see its report).
    pub const PARTIAL: u8 = 7;
    /// Another run holds the lock: nothing was done.
    pub const BUSY: u8 = 8;
    /// The export completed except the records listed under `skipped` in its report.
    pub const SKIPPED: u8 = 9;
    /// The location's daily request quota is spent (or this run's budget): resume after it
    /// resets.
    pub const QUOTA: u8 = 75;
}

/// Why a command failed, as far as the user can act on it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// Bad arguments or settings, found before any work (exit 2).
    Usage,
    /// The token or its access was refused (exit 3).
    Auth,
    /// A request rejected for good, or an API that misbehaved (exit 4).
    Api,
    /// A transient failure outlasted the retries (exit 5).
    Transient,
    /// Anything else: I/O, bugs (exit 1).
    Other,
}

/// What a command came to.
#[derive(Debug)]
pub enum Outcome {
    /// Everything asked for was done.
    Complete,
    /// Done, except the records listed in the run report under `skipped` (the API refused
    /// them for good); everything else is exact.
    Skipped {
        records: u64,
        /// The report that lists them, when one was written.
        report: Option<PathBuf>,
    },
    /// Stopped for the daily quota (or the run's budget); rerunning resumes.
    Stopped(anyhow::Error),
    /// Stopped by a signal, with the complete work committed; rerunning resumes.
    Interrupted(Signal, anyhow::Error),
    /// A pipeline finished some locations and failed others.
    Partial { failed: usize, of: usize },
    /// Another run holds the lock: nothing was done.
    Busy(anyhow::Error),
    /// An import finished, with rows rejected (in its rejects file) or failed transiently.
    Rejected {
        rejected: u64,
        failed: u64,
        rejects: PathBuf,
    },
    /// The command failed.
    Failed(FailKind, anyhow::Error),
}

impl Outcome {
    /// A failure of the given kind.
    pub fn failed(kind: FailKind, e: impl Into<anyhow::Error>) -> Outcome {
        Outcome::Failed(kind, e.into())
    }

    /// A usage error (bad arguments or settings).
    pub fn usage(message: impl std::fmt::Display) -> Outcome {
        Outcome::Failed(FailKind::Usage, anyhow::anyhow!("{message}"))
    }

    /// The process exit status for this outcome: the one mapping.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Complete => code::OK,
            Outcome::Skipped { .. } => code::SKIPPED,
            Outcome::Stopped(_) => code::QUOTA,
            Outcome::Interrupted(signal, _) => signal.exit_code(),
            Outcome::Partial { .. } => code::PARTIAL,
            Outcome::Busy(_) => code::BUSY,
            Outcome::Rejected { failed, .. } if *failed > 0 => code::TRANSIENT,
            Outcome::Rejected { .. } => code::REJECTED_ROWS,
            Outcome::Failed(FailKind::Usage, _) => code::USAGE,
            Outcome::Failed(FailKind::Auth, _) => code::AUTH,
            Outcome::Failed(FailKind::Api, _) => code::API,
            Outcome::Failed(FailKind::Transient, _) => code::TRANSIENT,
            Outcome::Failed(FailKind::Other, _) => code::FAILURE,
        }
    }

    /// The word the run reports use: `complete`, `partial` (complete except listed records,
    /// or some locations failed), `stopped`, `interrupted`, `busy` or `failed`.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Skipped { .. } | Outcome::Partial { .. } => "partial",
            Outcome::Stopped(_) => "stopped",
            Outcome::Interrupted(..) => "interrupted",
            Outcome::Busy(_) => "busy",
            Outcome::Rejected { .. } | Outcome::Failed(..) => "failed",
        }
    }

    /// The message for the user when the outcome is not plain success, with its `hint:` lines.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::Complete => None,
            Outcome::Skipped { records, report } => Some(format!(
                "the export completed except {records} child requests the API refused for good; they are listed under 'skipped' in {} and the manifest\nhint: every other row is exported; each entry names the contact, the request, its HTTP status and traceId (quote it to HighLevel support); a 403 often means a missing scope",
                report
                    .as_ref()
                    .map_or_else(|| "the run report".to_owned(), |p| p.display().to_string())
            )),
            Outcome::Partial { failed, of } => Some(format!(
                "{failed} of {of} locations did not complete (see the pipeline report)"
            )),
            Outcome::Rejected {
                rejected,
                failed,
                rejects,
            } => {
                let mut s = format!(
                    "{rejected} rows rejected, {failed} rows failed transiently\nhint: the rejected rows and their reasons are in {}",
                    rejects.display()
                );
                if *failed > 0 {
                    s.push_str("\nhint: rerun the same command to retry the failed rows (finished rows are skipped)");
                }
                Some(s)
            }
            Outcome::Stopped(e)
            | Outcome::Interrupted(_, e)
            | Outcome::Busy(e)
            | Outcome::Failed(_, e) => Some(format!("{e:#}")),
        }
    }
}

impl From<anyhow::Error> for Outcome {
    /// An error nothing classified: exit 1.
    fn from(e: anyhow::Error) -> Outcome {
        Outcome::Failed(FailKind::Other, e)
    }
}

/// The kind of an API error: 403 is the token's access (exit 3), as is a 401.
pub fn api_kind(e: &ApiError) -> FailKind {
    if e.status() == Some(403) {
        return FailKind::Auth;
    }
    match e.kind() {
        ErrorKind::Reauth => FailKind::Auth,
        ErrorKind::Retry => FailKind::Transient,
        // Mapped to `Stopped` by the callers that can stop for the quota.
        ErrorKind::QuotaExhausted => FailKind::Transient,
        ErrorKind::Fatal | ErrorKind::NotFound | ErrorKind::Duplicate => FailKind::Api,
    }
}

/// An API error as an outcome: the daily quota stops the run (resumable), anything else fails.
pub fn api_outcome(e: ApiError, context: impl FnOnce(anyhow::Error) -> anyhow::Error) -> Outcome {
    if e.kind() == ErrorKind::QuotaExhausted {
        return Outcome::Stopped(context(e.into()));
    }
    let kind = api_kind(&e);
    Outcome::Failed(kind, context(e.into()))
}

/// An export's error as an outcome.
pub fn export_outcome(
    e: ExportError,
    context: impl FnOnce(anyhow::Error) -> anyhow::Error,
) -> Outcome {
    let kind = match &e {
        ExportError::QuotaStop { .. } => return Outcome::Stopped(context(e.into())),
        ExportError::Interrupted { signal, .. } => {
            let signal = *signal;
            return Outcome::Interrupted(signal, context(e.into()));
        }
        ExportError::Lock(crate::durable::lock::LockError::Busy { .. }) => {
            return Outcome::Busy(context(e.into()))
        }
        ExportError::CheckpointMismatch { .. } | ExportError::Unsupported(_) => FailKind::Usage,
        ExportError::TooManySkipped { .. } => FailKind::Api,
        ExportError::Sink(SinkError::UnsafeLocationId { .. }) => FailKind::Usage,
        ExportError::Extract(_) => match e.api() {
            Some(api) if api.kind() == ErrorKind::QuotaExhausted => {
                return Outcome::Stopped(context(e.into()))
            }
            Some(api) => api_kind(api),
            None => FailKind::Api,
        },
        _ => FailKind::Other,
    };
    Outcome::Failed(kind, context(e.into()))
}

/// An import's error as an outcome (an import stopped early is handled by its caller, which
/// still has the report to print).
pub fn import_outcome(
    e: ImportError,
    context: impl FnOnce(anyhow::Error) -> anyhow::Error,
) -> Outcome {
    let e = match e {
        ImportError::Api(api) | ImportError::Stopped { source: api, .. } => {
            return api_outcome(api, context)
        }
        other => other,
    };
    match &e {
        ImportError::Journal(JournalError::Busy { .. }) => Outcome::Busy(e.into()),
        // Each already says what to do: shown as it is.
        ImportError::Columns { .. }
        | ImportError::JournalMismatch { .. }
        | ImportError::Clobber(_)
        | ImportError::Input(InputError::Encoding { .. }) => {
            Outcome::Failed(FailKind::Usage, e.into())
        }
        _ => Outcome::Failed(FailKind::Other, context(e.into())),
    }
}

/// An OAuth error as an outcome: settings problems are usage errors, an API refusal keeps its
/// kind (exit 3 for a refused grant).
pub fn auth_outcome(e: AuthError) -> Outcome {
    match e {
        AuthError::Api(api) => api_outcome(api, |e| e),
        AuthError::Config(_)
        | AuthError::StorePermissions { .. }
        | AuthError::StoreUnsafe { .. }
        | AuthError::StoreCorrupt { .. }
        | AuthError::NotFound { .. } => Outcome::Failed(FailKind::Usage, e.into()),
        other => Outcome::Failed(FailKind::Other, other.into()),
    }
}

/// A client that cannot be built from the settings: a usage error.
pub fn client_outcome(e: ClientBuildError) -> Outcome {
    Outcome::Failed(FailKind::Usage, e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_documented_exit_code() {
        let e = || anyhow::anyhow!("x");
        let cases = [
            (Outcome::Complete, 0),
            (
                Outcome::Skipped {
                    records: 2,
                    report: None,
                },
                9,
            ),
            (Outcome::Stopped(e()), 75),
            (Outcome::Interrupted(Signal::Int, e()), 130),
            (Outcome::Interrupted(Signal::Term, e()), 143),
            (Outcome::Partial { failed: 1, of: 2 }, 7),
            (Outcome::Busy(e()), 8),
            (
                Outcome::Rejected {
                    rejected: 1,
                    failed: 0,
                    rejects: "r.csv".into(),
                },
                6,
            ),
            (
                Outcome::Rejected {
                    rejected: 1,
                    failed: 1,
                    rejects: "r.csv".into(),
                },
                5,
            ),
            (Outcome::Failed(FailKind::Usage, e()), 2),
            (Outcome::Failed(FailKind::Auth, e()), 3),
            (Outcome::Failed(FailKind::Api, e()), 4),
            (Outcome::Failed(FailKind::Transient, e()), 5),
            (Outcome::Failed(FailKind::Other, e()), 1),
        ];
        for (outcome, want) in cases {
            assert_eq!(outcome.exit_code(), want, "{outcome:?}");
        }
    }
}
