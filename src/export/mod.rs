//! An export run: listing → fan-out → writer thread → part files → manifest.
//!
//! `OUT/<entity>/location_id=<id>/part-<n>.<ext>` holds the rows; `OUT/_manifest.json` is
//! written last, so its presence means the run completed.

mod resources;
mod writer;

pub use resources::Resources;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::api::{Client, StatsSnapshot};
use crate::extract::{self, ExtractError, Page};
use crate::fanout::{self, Include, Item};
use crate::schema::{Entity, SCHEMA_VERSION};
use crate::sink::{self, Format, PartInfo, SinkError};

/// The manifest's file name under the output root.
pub const MANIFEST: &str = "_manifest.json";

/// What to export and how.
#[derive(Clone, Debug)]
pub struct ExportPlan {
    pub location_id: String,
    /// When non-empty, export these businesses' contacts instead of the whole location.
    pub businesses: Vec<String>,
    pub include: Include,
    pub format: Format,
    pub out: PathBuf,
    /// Contacts per list request (the API's maximum is 100).
    pub page_size: u32,
    /// Contacts in progress at once in the fan-out.
    pub window: usize,
    /// Rows per record batch (and so the smallest unit a sink compresses).
    pub batch_rows: usize,
    /// Contacts per part file.
    pub part_contacts: u64,
}

impl ExportPlan {
    pub fn new(location_id: impl Into<String>, format: Format, out: impl Into<PathBuf>) -> Self {
        ExportPlan {
            location_id: location_id.into(),
            businesses: Vec::new(),
            include: Include::ALL,
            format,
            out: out.into(),
            page_size: 100,
            window: 256,
            batch_rows: 8192,
            part_contacts: 250_000,
        }
    }
}

/// Live counters for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub contacts: AtomicU64,
    /// The listing's total as the server reports it (0 until known).
    pub total: AtomicU64,
}

/// Rows and files of one entity.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EntityReport {
    pub rows: u64,
    pub files: Vec<PartInfo>,
}

/// `OUT/_manifest.json`: what a completed run wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub tool: String,
    pub format: String,
    pub location_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub businesses: Vec<String>,
    pub include: String,
    pub started_at: String,
    pub finished_at: String,
    pub entities: BTreeMap<String, EntityReport>,
    /// Objects skipped because they were not JSON objects.
    pub skipped_objects: u64,
    pub requests: StatsSnapshot,
    /// This process's CPU time and peak memory at the end of the run.
    pub resources: Resources,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the writer thread stopped unexpectedly")]
    WriterLost,
}

impl ExportError {
    /// The API error underneath, if that is what failed.
    pub fn api(&self) -> Option<&crate::api::ApiError> {
        match self {
            ExportError::Extract(ExtractError::Api(e)) => Some(e),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs one export to completion and returns its manifest (also written to `OUT`).
pub async fn run(
    client: Arc<Client>,
    plan: &ExportPlan,
    progress: Arc<Progress>,
) -> Result<Manifest, ExportError> {
    let started_at = crate::timefmt::format_iso_millis(now_millis());
    std::fs::create_dir_all(&plan.out).map_err(io_err(&plan.out))?;
    prepare_out(plan)?;

    let pages = listing(client.clone(), plan).map({
        let progress = progress.clone();
        move |page| {
            if let Ok(p) = &page {
                if let Some(t) = p.total {
                    progress.total.fetch_max(t, Relaxed);
                }
            }
            page
        }
    });
    let items = fanout::fan_out(pages, client.clone(), plan.include, plan.window);
    let (tx, handle) = writer::spawn(
        writer::WriterConfig {
            out: plan.out.clone(),
            format: plan.format,
            location_id: plan.location_id.clone(),
            include: plan.include,
            batch_rows: plan.batch_rows.max(1),
            part_contacts: plan.part_contacts.max(1),
            first_part: 0,
        },
        plan.window,
    );

    let mut items = std::pin::pin!(items);
    let mut failure = None;
    while let Some(item) = items.next().await {
        match item {
            Ok(item) => {
                if matches!(item, Item::Contact(_)) {
                    progress.contacts.fetch_add(1, Relaxed);
                }
                if tx.send(item).await.is_err() {
                    break; // the writer failed; its error is collected below
                }
            }
            Err(e) => {
                failure = Some(ExportError::from(e));
                break;
            }
        }
    }
    drop(tx);
    let written = tokio::task::spawn_blocking(move || handle.join())
        .await
        .map_err(|_| ExportError::WriterLost)?
        .map_err(|_| ExportError::WriterLost)?;
    if let Some(e) = failure {
        // Parts completed so far stay; the manifest is not written: the run is incomplete.
        return Err(e);
    }
    let written = written?;

    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: concat!("contacts-etl ", env!("CARGO_PKG_VERSION")).into(),
        format: plan.format.extension().into(),
        location_id: plan.location_id.clone(),
        businesses: plan.businesses.clone(),
        include: plan.include.to_string(),
        started_at,
        finished_at: crate::timefmt::format_iso_millis(now_millis()),
        entities: written
            .entities
            .into_iter()
            .map(|(e, r)| (e.name().to_owned(), r))
            .collect(),
        skipped_objects: written.skipped,
        requests: client.stats().snapshot(),
        resources: Resources::now(),
    };
    write_atomic(
        &plan.out.join(MANIFEST),
        &serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    )?;
    Ok(manifest)
}

/// The pages to export: the whole location, or the listed businesses one after another.
fn listing(
    client: Arc<Client>,
    plan: &ExportPlan,
) -> std::pin::Pin<Box<dyn Stream<Item = Result<Page, ExtractError>> + Send>> {
    if plan.businesses.is_empty() {
        Box::pin(extract::location_contacts(
            client,
            plan.location_id.clone(),
            None,
            plan.page_size,
        ))
    } else {
        let (loc, size) = (plan.location_id.clone(), plan.page_size);
        Box::pin(
            futures::stream::iter(plan.businesses.clone()).flat_map(move |b| {
                extract::business_contacts(client.clone(), loc.clone(), b, size)
            }),
        )
    }
}

/// Makes `OUT` ready for a fresh run of this location: removes leftover temporary files, the
/// old manifest, and this location's part files from an earlier run (so a rerun never mixes
/// old and new rows). Files that are not ours are left alone.
fn prepare_out(plan: &ExportPlan) -> Result<(), ExportError> {
    let cleaned = sink::clean_temp_files(&plan.out)?;
    if cleaned > 0 {
        tracing::info!(
            files = cleaned,
            "removed temporary files left by an interrupted run"
        );
    }
    let manifest = plan.out.join(MANIFEST);
    if manifest.exists() {
        std::fs::remove_file(&manifest).map_err(io_err(&manifest))?;
    }
    let mut removed = 0;
    for entity in Entity::ALL {
        let dir = plan
            .out
            .join(entity.name())
            .join(format!("location_id={}", plan.location_id));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("part-") && (name.ends_with(".parquet") || name.ends_with(".csv")) {
                std::fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::info!(files = removed, location = %plan.location_id, "replaced the part files of an earlier export of this location");
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
