//! The export checkpoint: where a run stands, committed atomically with each part.
//!
//! The writer commits in this order: finish the parts (temp file, fsync, rename), then save
//! the checkpoint (temp file, fsync, rename, fsync the directory). A crash between the two
//! leaves complete part files the checkpoint does not list: a resumed run deletes them and
//! rewrites their rows. So after a kill at any instant, the parts the checkpoint lists plus
//! what the resumed run writes after its cursor are exactly the rows of an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::extract::Position;
use crate::fanout::SkippedRequest;

/// Rows and files of one entity: committed so far (here), or in a finished run (the
/// manifest, which shows the same).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EntityReport {
    pub rows: u64,
    pub files: Vec<crate::sink::PartInfo>,
}

/// The settings a checkpoint was made with; a run resumes it only if they match.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub location_id: String,
    pub businesses: Vec<String>,
    pub include: String,
    pub format: String,
    pub page_size: u32,
    pub incremental: bool,
    /// `--listing` (`get`, `search`, `auto`). Checkpoints without it resume as `auto`, which
    /// continues the listing their position belongs to.
    #[serde(default = "auto_listing")]
    pub listing: String,
    /// `--children-by` (a checkpoint made before it existed fetched every child per contact).
    #[serde(default = "per_contact")]
    pub children_by: String,
    /// `--custom-fields wide`: the contacts parts have the wide columns.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wide_custom_fields: bool,
}

fn per_contact() -> String {
    "contact".into()
}

fn auto_listing() -> String {
    crate::extract::Listing::Auto.name().into()
}

impl Settings {
    /// Why a run with `self` cannot resume a checkpoint made with `other`, if it cannot.
    pub fn mismatch(&self, other: &Settings) -> Option<String> {
        let mut diffs = Vec::new();
        if self.location_id != other.location_id {
            diffs.push(format!(
                "--location {} (checkpoint: {})",
                self.location_id, other.location_id
            ));
        }
        if self.businesses != other.businesses {
            diffs.push(format!(
                "--business {:?} (checkpoint: {:?})",
                self.businesses, other.businesses
            ));
        }
        if self.include != other.include {
            diffs.push(format!(
                "--include {} (checkpoint: {})",
                self.include, other.include
            ));
        }
        if self.format != other.format {
            diffs.push(format!(
                "--format {} (checkpoint: {})",
                self.format, other.format
            ));
        }
        if self.page_size != other.page_size {
            diffs.push(format!(
                "page size {} (checkpoint: {})",
                self.page_size, other.page_size
            ));
        }
        if self.incremental != other.incremental {
            diffs.push(format!(
                "--incremental {} (checkpoint: {})",
                self.incremental, other.incremental
            ));
        }
        if self.listing != other.listing {
            diffs.push(format!(
                "--listing {} (checkpoint: {})",
                self.listing, other.listing
            ));
        }
        // `location` and `auto` list the same way (tasks and appointments come after the
        // listing): only a change to or from `contact` changes what the listing fetched.
        if (self.children_by == "contact") != (other.children_by == "contact") {
            diffs.push(format!(
                "--children-by {} (checkpoint: {})",
                self.children_by, other.children_by
            ));
        }
        if self.wide_custom_fields != other.wide_custom_fields {
            let name = |wide: bool| if wide { "wide" } else { "ids" };
            diffs.push(format!(
                "--custom-fields {} (checkpoint: {})",
                name(self.wide_custom_fields),
                name(other.wide_custom_fields)
            ));
        }
        (!diffs.is_empty()).then(|| diffs.join(", "))
    }
}

/// Where an export of one location stands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub settings: Settings,
    /// When the run that this checkpoint belongs to first started.
    pub started_at: String,
    /// The `export_date=` partition the run writes to (fixed at its start, so a run resumed
    /// the next day finishes in the same partition).
    #[serde(default)]
    pub export_date: Option<String>,
    /// How many times the run was resumed.
    pub resumed: u32,
    /// The listing continues after this position; `None` means from the start (or, when
    /// `complete`, that the listing is done).
    pub position: Option<Position>,
    /// Number of the next part file.
    pub next_part: u32,
    /// Contacts listed and committed (changed or not).
    pub contacts_listed: u64,
    /// Committed part files and rows per entity.
    pub entities: BTreeMap<String, EntityReport>,
    /// Objects skipped because they were not JSON objects.
    #[serde(default)]
    pub skipped_objects: u64,
    /// Child requests the API refused for good, of the committed pages only: a page redone
    /// after a kill lists its refusals again, and only then.
    #[serde(default)]
    pub skipped: Vec<SkippedRequest>,
    /// Committed length of the incremental run's `seen` file.
    #[serde(default)]
    pub seen_bytes: u64,
    /// Every page of the listing is committed; only finishing steps remain.
    #[serde(default)]
    pub listing_done: bool,
    /// An incremental run wrote its deletions (before replacing the state they came from).
    #[serde(default)]
    pub deletions_done: bool,
    /// The run finished: the manifest is written.
    pub complete: bool,
    /// Which contacts this run lists, once decided (before its first request); a checkpoint
    /// without it that has a position is an older version's run: a walk or a full run.
    #[serde(default)]
    pub run_kind: Option<crate::incremental::RunKind>,
    /// The listing this run reads (`get`, `search` or `business`), once decided.
    #[serde(default)]
    pub listing_used: Option<String>,
    /// How far the location-wide children phase got (`crate::export` runs it after the
    /// listing); `None` before it starts, and in runs with `--children-by contact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wide: Option<crate::wide::WideProgress>,
    /// `--from-events`: the events the run covers, fixed when it decided its kind. Absent
    /// without `--from-events`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<crate::incremental::EventsRange>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum Versioned {
    #[serde(rename = "1")]
    V1(Checkpoint),
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: not a checkpoint this version can read ({source}); move it away or pass --restart"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// `OUT/_state/location_id=<id>/`: the checkpoint, the incremental state, and the report.
pub fn state_dir(out: &Path, location_id: &str) -> PathBuf {
    out.join("_state")
        .join(format!("location_id={location_id}"))
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("checkpoint.json")
}

pub fn load(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: path.into(),
                source,
            })
        }
    };
    match serde_json::from_slice::<Versioned>(&bytes) {
        Ok(Versioned::V1(c)) => Ok(Some(c)),
        Err(source) => Err(CheckpointError::Corrupt {
            path: path.into(),
            source,
        }),
    }
}

/// Saves atomically: after a crash, the file holds either the old or the new checkpoint.
pub fn save(path: &Path, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let bytes = serde_json::to_vec_pretty(&Versioned::V1(checkpoint.clone())).unwrap_or_default();
    write_atomic(path, &bytes)
}

/// [`save`], then the state directory it is in made the destination's
/// ([`crate::dest::Dest::sync_state`]: uploaded to a bucket, the checkpoint last): every
/// commit of a run goes through here.
pub fn commit(
    dest: &crate::dest::Dest,
    path: &Path,
    checkpoint: &Checkpoint,
) -> Result<(), CheckpointError> {
    save(path, checkpoint)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    dest.sync_state(dir).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file atomically ([`crate::durable::write`]), with the error of this module.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    crate::durable::write(path, bytes).map_err(write_error(path))
}

/// `path: cannot <step> <file>: <cause>`.
fn write_error(path: &Path) -> impl FnOnce(crate::durable::WriteError) -> CheckpointError + '_ {
    |e| CheckpointError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            location_id: "L".into(),
            businesses: vec![],
            include: "tasks".into(),
            format: "parquet".into(),
            page_size: 100,
            incremental: false,
            listing: "auto".into(),
            children_by: "contact".into(),
            wide_custom_fields: false,
        }
    }

    #[test]
    fn saves_and_loads_a_versioned_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert_eq!(load(&p).unwrap(), None);
        let c = Checkpoint {
            settings: settings(),
            started_at: "2026-01-01T00:00:00.000Z".into(),
            export_date: None,
            resumed: 0,
            position: Some(Position::After(crate::extract::Cursor {
                start_after: 5,
                start_after_id: "x".into(),
            })),
            next_part: 3,
            contacts_listed: 300,
            entities: BTreeMap::new(),
            skipped_objects: 0,
            skipped: vec![SkippedRequest {
                entity: "notes".into(),
                contact_id: "c1".into(),
                request: "GET /contacts/c1/notes".into(),
                status: 403,
                trace_id: Some("t-1".into()),
                message: "no".into(),
            }],
            seen_bytes: 0,
            listing_done: false,
            deletions_done: false,
            complete: false,
            run_kind: None,
            listing_used: None,
            wide: None,
            events: None,
        };
        save(&p, &c).unwrap();
        assert_eq!(load(&p).unwrap(), Some(c));
        assert!(std::fs::read_to_string(&p)
            .unwrap()
            .contains("\"version\": \"1\""));
        assert!(!dir.path().join("checkpoint.json.tmp").exists());
    }

    #[test]
    fn a_checkpoint_written_before_skipped_requests_existed_still_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let old = r#"{"version":"1","settings":{"locationId":"L","businesses":[],"include":"tasks","format":"parquet","pageSize":100,"incremental":false},
            "startedAt":"2026-01-01T00:00:00.000Z","resumed":0,"position":null,"nextPart":0,"contactsListed":0,"entities":{},"complete":false}"#;
        std::fs::write(&p, old).unwrap();
        let ck = load(&p).unwrap().unwrap();
        assert!(ck.skipped.is_empty());
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        std::fs::write(&p, b"{\"version\":\"9\"}").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("--restart"), "{e}");
    }

    #[test]
    fn mismatch_names_each_differing_setting() {
        let a = settings();
        let mut b = settings();
        assert_eq!(a.mismatch(&b), None);
        b.format = "csv".into();
        b.include = "notes".into();
        let m = a.mismatch(&b).unwrap();
        assert!(
            m.contains("--format parquet (checkpoint: csv)") && m.contains("--include"),
            "{m}"
        );
    }

    #[test]
    fn a_wide_export_does_not_resume_an_ids_checkpoint() {
        let mut wide = settings();
        wide.wide_custom_fields = true;
        let m = wide.mismatch(&settings()).unwrap();
        assert!(m.contains("--custom-fields wide (checkpoint: ids)"), "{m}");
        // Written only when set: checkpoints of ids runs read as before, both ways.
        let text = serde_json::to_string(&settings()).unwrap();
        assert!(!text.contains("wideCustomFields"), "{text}");
        let back: Settings = serde_json::from_str(&serde_json::to_string(&wide).unwrap()).unwrap();
        assert!(back.wide_custom_fields);
    }
}
