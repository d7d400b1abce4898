//! `--table delta`: each run's part files published as one Delta Lake commit per entity table.
//!
//! # Layout
//! Every entity directory is a Delta table: `OUT/<entity>/` with its log in
//! `OUT/<entity>/_delta_log/`, partitioned by `location_id` and `export_date` (the run's date;
//! the day the run started when it is not partitioned by date). Data files keep the API's
//! columns only; the two partition columns live in the log's `partitionValues`, as Delta wants.
//!
//! # Why a run directory
//! Delta keeps history: a table's older versions still point at the files earlier runs wrote,
//! so a run must never delete or overwrite them. A run in Delta mode therefore writes under a
//! directory of its own, `…/location_id=<id>/run=<started_at>/part-*.parquet` (the start time
//! is in the checkpoint, so a resumed run keeps its directory), and `export::begin` removes
//! nothing outside it. Files of a run killed for good and discarded with `--restart` stay
//! unreferenced until the table is vacuumed.
//!
//! # Exactly once
//! The commit is made at the end of the run, after every part is complete and before the
//! manifest. Each commit carries a Delta `txn` action, appId `contacts-etl:<location>:<entity>`,
//! version = the location's run counter (kept in `_state/location_id=<id>/delta.json` with the
//! run's start time, so every attempt of one run uses one number). Before committing, the run
//! reads the table's latest `txn` version for its appId: at or past its own number, the commit
//! already landed (a run killed after its commit and resumed) and is not made again. A run
//! killed before it leaves no commit: readers keep seeing the previous snapshot.
//!
//! Commits are blind appends (they read no data), so the commits of several locations of one
//! pipeline into one table do not conflict: the crate retries a commit that lost the race for
//! a log version against the newer snapshot ([`MAX_RETRIES`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use crate::checkpoint::EntityReport;
use crate::dest::Dest;

/// `--table`: how a run's files are published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TableFormat {
    /// Part files and `_manifest.json` only (Hive-style directories).
    #[default]
    Files,
    /// Also one Delta Lake commit per entity table and run.
    Delta,
    /// `--table delta --merge`: also the current-state tables under `OUT/current/`.
    DeltaMerge,
}

impl FromStr for TableFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<TableFormat, String> {
        match s {
            "delta" => Ok(TableFormat::Delta),
            other => Err(format!("'{other}' is not a table format: use delta")),
        }
    }
}

impl TableFormat {
    /// Whether runs are committed to Delta tables.
    pub fn is_delta(self) -> bool {
        self != TableFormat::Files
    }

    /// `--merge` on top of this format.
    pub fn with_merge(self, merge: bool) -> Result<TableFormat, String> {
        match (self, merge) {
            (t, false) => Ok(t),
            (TableFormat::Files, true) => Err("--merge needs --table delta".into()),
            (_, true) => Ok(TableFormat::DeltaMerge),
        }
    }

    /// Whether this build can write Delta tables (the `delta` cargo feature).
    pub const DELTA_BUILT: bool = cfg!(feature = "delta");

    /// Why `--table delta` cannot be combined with these settings, if it cannot.
    pub fn refuse(self, format: crate::sink::Format, wide_custom_fields: bool) -> Option<String> {
        if !self.is_delta() {
            return None;
        }
        if !Self::DELTA_BUILT {
            return Some("this build of contacts-etl has no Delta Lake support (it was built without the `delta` feature)\nhint: build with the default features, or drop --table delta".into());
        }
        if format != crate::sink::Format::Parquet {
            return Some("--table delta needs --format parquet (Delta tables hold Parquet files)\nhint: drop --format csv".into());
        }
        if wide_custom_fields {
            return Some("--table delta cannot be combined with --custom-fields wide: a Delta table has one schema, and the wide columns differ by location and run\nhint: use --custom-fields ids (the custom_fields table names the ids)".into());
        }
        None
    }
}

/// Attempts of a commit that lost the race for a log version to another writer.
pub const MAX_RETRIES: usize = 30;

/// The run's directory under its partition: `run=<start time, digits only>Z`.
pub(crate) fn run_dir(started_at: &str) -> String {
    let digits: String = started_at
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    format!("run={digits}Z")
}

/// The Delta `txn` appId of a location's commits to an entity's table.
pub fn app_id(location_id: &str, entity: &str) -> String {
    format!("contacts-etl:{location_id}:{entity}")
}

/// Where the location's run counter is kept.
#[cfg(feature = "delta")]
fn counter_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("delta.json")
}

/// The run counter: the number of the run that started at `started_at`.
#[cfg(feature = "delta")]
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Counter {
    started_at: String,
    version: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot commit the run's files to the Delta table {table}: {detail}\nhint: {hint}")]
pub struct DeltaError {
    /// The table's directory or URL.
    pub table: String,
    pub detail: String,
    pub hint: String,
}

/// What one run commits.
// Without the `delta` feature only `dest` is read (to say what has no Delta support).
#[cfg_attr(not(feature = "delta"), allow(dead_code))]
pub(crate) struct RunCommit<'a> {
    pub dest: &'a Dest,
    pub location_id: &'a str,
    /// The partition value: the run's `export_date`, else the day it started.
    pub export_date: String,
    pub started_at: &'a str,
    /// The location's state directory (the run counter's home).
    pub state_dir: &'a Path,
    /// The run's files by entity (paths relative to OUT).
    pub entities: &'a BTreeMap<String, EntityReport>,
}

#[cfg(not(feature = "delta"))]
pub(crate) async fn commit_run(run: &RunCommit<'_>) -> Result<(), DeltaError> {
    Err(DeltaError {
        table: run.dest.describe(),
        detail: "this build has no Delta Lake support".into(),
        hint: "build with the default features (`delta`)".into(),
    })
}

#[cfg(not(feature = "delta"))]
pub(crate) async fn merge_run(run: &RunCommit<'_>, _full: bool) -> Result<(), DeltaError> {
    commit_run(run).await
}

#[cfg(feature = "delta")]
pub use imp::open_table;
#[cfg(feature = "delta")]
pub(crate) use imp::{commit_run, merge_run};

#[cfg(feature = "delta")]
mod imp {
    use std::collections::HashMap;
    use std::sync::Arc;

    use deltalake_core::kernel::engine::arrow_conversion::TryFromArrow;
    use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
    use deltalake_core::kernel::{Action, Add, StructField, StructType, Transaction};
    use deltalake_core::logstore::{default_logstore, LogStoreRef, StorageConfig};
    use deltalake_core::operations::create::CreateBuilder;
    use deltalake_core::protocol::{DeltaOperation, SaveMode};
    use deltalake_core::{DeltaTable, DeltaTableError};
    use std::collections::HashSet;

    use arrow::array::{AsArray, BooleanArray, RecordBatch};
    use arrow::compute::filter_record_batch;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Compression;
    use parquet::file::properties::WriterProperties;

    use super::*;
    use crate::schema::Entity;

    /// Partition columns of every table, in this order.
    pub const PARTITION_COLUMNS: [&str; 2] = ["location_id", "export_date"];
    /// Partition column of the current-state tables (`--merge`).
    pub const CURRENT_PARTITION_COLUMNS: [&str; 1] = ["location_id"];
    /// Where the current-state tables live, below OUT.
    pub const CURRENT_DIR: &str = "current";

    /// The log store of `OUT/<entity>/`: the bucket's store under the table's prefix, or the
    /// local directory.
    fn log_store(dest: &Dest, entity: &str) -> Result<(LogStoreRef, String), DeltaError> {
        let err = |table: String, detail: String| DeltaError {
            table,
            detail,
            hint: "check that OUT is writable".into(),
        };
        match dest.remote_store() {
            Some(Err(e)) => Err(err(dest.describe(), e.to_string())),
            Some(Ok((store, prefix, url))) => {
                let shown = format!("{url}/{entity}");
                let location = url::Url::parse(&format!("{shown}/"))
                    .map_err(|e| err(shown.clone(), e.to_string()))?;
                let mut key = prefix;
                key.extend(entity.split('/'));
                let prefixed: Arc<dyn object_store::ObjectStore> =
                    Arc::new(object_store::prefix::PrefixStore::new(store.clone(), key));
                let ls = default_logstore(prefixed, store, &location, &StorageConfig::default());
                Ok((ls, shown))
            }
            None => {
                let dir = dest.root().join(entity);
                let shown = dir.display().to_string();
                std::fs::create_dir_all(&dir).map_err(|e| err(shown.clone(), e.to_string()))?;
                let dir =
                    std::fs::canonicalize(&dir).map_err(|e| err(shown.clone(), e.to_string()))?;
                let location = url::Url::from_directory_path(&dir)
                    .map_err(|()| err(shown.clone(), "not an absolute path".into()))?;
                let ls =
                    deltalake_core::logstore::logstore_for(&location, StorageConfig::default())
                        .map_err(|e| err(shown.clone(), e.to_string()))?;
                Ok((ls, shown))
            }
        }
    }

    /// Opens the entity's table under `dest` with its latest snapshot loaded; `Ok(None)` when
    /// no table is there yet. Also what a reader (and the tests) use.
    pub async fn open_table(dest: &Dest, entity: &str) -> Result<Option<DeltaTable>, DeltaError> {
        let (ls, shown) = log_store(dest, entity)?;
        // Asked first: loading a table that is not there logs an error of the crate's own.
        if !ls
            .is_delta_table_location()
            .await
            .map_err(|e| fail(&shown, e))?
        {
            return Ok(None);
        }
        let mut table = DeltaTable::new(ls);
        match table.load().await {
            Ok(()) => Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(fail(&shown, e)),
        }
    }

    fn fail(table: &str, e: impl std::fmt::Display) -> DeltaError {
        let detail = crate::schema::truncate_for_message(&e.to_string(), 600);
        DeltaError {
            table: table.to_owned(),
            detail,
            hint: "rerun the same command: the run resumes and commits once (nothing of this run is visible in the table until then)".into(),
        }
    }

    /// The latest `txn` version of `app` in `table`.
    async fn txn_version(
        table: &DeltaTable,
        app: &str,
        shown: &str,
    ) -> Result<Option<i64>, DeltaError> {
        let ls = table.log_store();
        table
            .snapshot()
            .map_err(|e| fail(shown, e))?
            .transaction_version(ls.as_ref(), app)
            .await
            .map_err(|e| fail(shown, e))
    }

    /// The run's number: the one recorded for its start time, or (a new run) one past every
    /// number the counter or the tables have seen for this location, recorded (and mirrored
    /// to a bucket) before anything is committed.
    async fn run_version(run: &RunCommit<'_>) -> Result<i64, DeltaError> {
        let path = counter_path(run.state_dir);
        let shown = run.dest.show(&path);
        let old: Option<Counter> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(c) = &old {
            if c.started_at == run.started_at {
                return Ok(c.version);
            }
        }
        // A lost counter (a new machine, a local state) must not reuse a committed number.
        let mut seen = old.map_or(0, |c| c.version);
        for entity in run.entities.keys() {
            if let Some(table) = open_table(run.dest, entity).await? {
                let app = app_id(run.location_id, entity);
                if let Some(v) = txn_version(&table, &app, entity).await? {
                    seen = seen.max(v);
                }
            }
        }
        let counter = Counter {
            started_at: run.started_at.to_owned(),
            version: seen + 1,
        };
        let bytes = serde_json::to_vec_pretty(&counter).unwrap_or_default();
        let io = |e: String| DeltaError {
            table: shown.clone(),
            detail: e,
            hint: "check that the state directory is writable, then rerun the same command".into(),
        };
        crate::checkpoint::write_atomic(&path, &bytes).map_err(|e| io(e.to_string()))?;
        run.dest
            .sync_state(run.state_dir)
            .map_err(|e| io(e.to_string()))?;
        Ok(counter.version)
    }

    /// The entity's Delta schema: its declared columns, then the partition columns.
    fn schema(entity: &str, partitions: &[&str]) -> Result<Vec<StructField>, String> {
        let entity = Entity::ALL
            .into_iter()
            .chain([Entity::DeletedContacts, Entity::CustomFields])
            .find(|e| e.name() == entity)
            .ok_or_else(|| format!("'{entity}' is not an entity of this tool"))?;
        let arrow = entity.schema();
        let st = StructType::try_from_arrow(arrow.as_ref()).map_err(|e| e.to_string())?;
        let mut fields: Vec<StructField> = st.fields().cloned().collect();
        for &p in partitions {
            fields.push(StructField::nullable(
                p,
                deltalake_core::kernel::DataType::STRING,
            ));
        }
        Ok(fields)
    }

    /// Commits the run's files: one commit per entity table, each at most once.
    pub(crate) async fn commit_run(run: &RunCommit<'_>) -> Result<(), DeltaError> {
        let version = run_version(run).await?;
        let now = crate::timefmt::now_millis();
        for (entity, report) in run.entities {
            let (ls, shown) = log_store(run.dest, entity)?;
            let app = app_id(run.location_id, entity);
            let table = open_table(run.dest, entity).await?;
            if let Some(t) = &table {
                if txn_version(t, &app, &shown)
                    .await?
                    .is_some_and(|v| v >= version)
                {
                    tracing::info!(table = %shown, version, "this run's Delta commit is already in the table");
                    continue;
                }
            }
            let prefix = format!("{entity}/");
            let adds: Vec<Action> = report
                .files
                .iter()
                .map(|f| {
                    let rel = f.path.strip_prefix(&prefix).unwrap_or(&f.path);
                    Action::Add(Add {
                        path: rel.to_owned(),
                        partition_values: HashMap::from([
                            ("location_id".to_owned(), Some(run.location_id.to_owned())),
                            ("export_date".to_owned(), Some(run.export_date.clone())),
                        ]),
                        size: f.bytes as i64,
                        modification_time: now,
                        data_change: true,
                        stats: Some(format!("{{\"numRecords\":{}}}", f.rows)),
                        ..Default::default()
                    })
                })
                .collect();
            let files = adds.len();
            let target = Target {
                ls: &ls,
                shown: &shown,
                entity,
                partitions: &PARTITION_COLUMNS,
                app: &app,
                version,
            };
            if commit(&target, table.is_some(), adds, now).await? {
                tracing::info!(table = %shown, files, version, location = %run.location_id, "committed the run's files to the Delta table");
            }
        }
        Ok(())
    }

    /// A table a commit goes to.
    struct Target<'a> {
        ls: &'a LogStoreRef,
        shown: &'a str,
        entity: &'a str,
        partitions: &'a [&'a str],
        app: &'a str,
        version: i64,
    }

    /// Commits `actions` with the `txn` (app, version): creates the table when `exists` is
    /// false (appending when another writer created it meanwhile). Returns false when the
    /// table already holds this version's commit.
    async fn commit(
        t: &Target<'_>,
        exists: bool,
        actions: Vec<Action>,
        now: i64,
    ) -> Result<bool, DeltaError> {
        let props = || {
            CommitProperties::default()
                .with_application_transaction(Transaction::new_with_last_update(
                    t.app,
                    t.version,
                    Some(now),
                ))
                .with_max_retries(MAX_RETRIES)
        };
        if !exists {
            let fields = schema(t.entity, t.partitions).map_err(|e| fail(t.shown, e))?;
            let create = CreateBuilder::new()
                .with_log_store(t.ls.clone())
                .with_table_name(t.entity.to_owned())
                .with_columns(fields)
                .with_partition_columns(t.partitions.iter().copied())
                .with_save_mode(SaveMode::ErrorIfExists)
                .with_actions(actions.clone())
                .with_commit_properties(props());
            match create.await {
                Ok(_) => return Ok(true),
                // Another location's run created it first: append to it.
                Err(e) if t.ls.is_delta_table_location().await.unwrap_or(false) => {
                    tracing::debug!(table = %t.shown, error = %e, "the table appeared meanwhile: appending");
                }
                Err(e) => return Err(fail(t.shown, e)),
            }
        }
        let mut table = DeltaTable::new(t.ls.clone());
        table.load().await.map_err(|e| fail(t.shown, e))?;
        if txn_version(&table, t.app, t.shown)
            .await?
            .is_some_and(|v| v >= t.version)
        {
            return Ok(false);
        }
        let snapshot = table.snapshot().map_err(|e| fail(t.shown, e))?;
        CommitBuilder::from(props())
            .with_actions(actions)
            .build(
                Some(snapshot),
                t.ls.clone(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: Some(t.partitions.iter().map(|p| p.to_string()).collect()),
                    predicate: None,
                },
            )
            .await
            .map_err(|e| fail(t.shown, e))?;
        Ok(true)
    }

    /// Reads a Parquet file of a table through its store (whole, into memory).
    async fn read_file(
        ls: &LogStoreRef,
        path: &object_store::path::Path,
        shown: &str,
    ) -> Result<Vec<RecordBatch>, DeltaError> {
        use object_store::ObjectStoreExt;
        let store = ls.object_store(None);
        let bytes = store
            .get(path)
            .await
            .map_err(|e| fail(shown, format!("{path}: {e}")))?
            .bytes()
            .await
            .map_err(|e| fail(shown, format!("{path}: {e}")))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| fail(shown, format!("{path}: {e}")))?;
        reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(shown, format!("{path}: {e}")))
    }

    /// The values of string column `col` in `batches`.
    fn ids(batches: &[RecordBatch], col: &str) -> HashSet<String> {
        let mut out = HashSet::new();
        for b in batches {
            if let Some(a) = b.column_by_name(col).and_then(|a| a.as_string_opt::<i32>()) {
                out.extend(a.iter().flatten().map(str::to_owned));
            }
        }
        out
    }

    /// The run's rows of `entity` (read back from its part files).
    async fn run_rows(run: &RunCommit<'_>, entity: &str) -> Result<Vec<RecordBatch>, DeltaError> {
        let Some(report) = run.entities.get(entity) else {
            return Ok(Vec::new());
        };
        let (ls, shown) = log_store(run.dest, entity)?;
        let prefix = format!("{entity}/");
        let mut out = Vec::new();
        for f in &report.files {
            let rel = f.path.strip_prefix(&prefix).unwrap_or(&f.path);
            out.extend(read_file(&ls, &object_store::path::Path::from(rel), &shown).await?);
        }
        Ok(out)
    }

    /// `--merge`: the location's rows of each current-state table `OUT/current/<entity>/`,
    /// copy-on-write. The location's current files are read whole, the rows of contacts the
    /// run exported (new or changed) or found deleted are dropped (children by their
    /// `contactId`), the run's rows added, all written as one new file; one commit removes the
    /// old files and adds the new one (a full run replaces the location's rows). Memory: the
    /// location's current rows of one table at a time, plus the file being written.
    pub(crate) async fn merge_run(run: &RunCommit<'_>, full: bool) -> Result<(), DeltaError> {
        let version = run_version(run).await?;
        let now = crate::timefmt::now_millis();
        let changed = ids(&run_rows(run, Entity::Contacts.name()).await?, "id");
        let deleted = ids(&run_rows(run, Entity::DeletedContacts.name()).await?, "id");
        let run_dir = super::run_dir(run.started_at);
        for entity in [
            Entity::Contacts,
            Entity::Tasks,
            Entity::Notes,
            Entity::Appointments,
            Entity::CustomFields,
        ] {
            let name = entity.name();
            if !run.entities.contains_key(name) {
                continue;
            }
            let dir = format!("{CURRENT_DIR}/{name}");
            let (ls, shown) = log_store(run.dest, &dir)?;
            let app = format!("contacts-etl:{}:current:{name}", run.location_id);
            let table = open_table(run.dest, &dir).await?;
            let mut old = Vec::new();
            if let Some(t) = &table {
                if txn_version(t, &app, &shown)
                    .await?
                    .is_some_and(|v| v >= version)
                {
                    continue;
                }
                let snapshot = t.snapshot().map_err(|e| fail(&shown, e))?;
                for f in snapshot.log_data() {
                    let ours = f
                        .partition_values_map()
                        .get("location_id")
                        .cloned()
                        .flatten();
                    if ours.as_deref() == Some(run.location_id) {
                        old.push((f.object_store_path(), f.remove_action(true)));
                    }
                }
            }
            let schema = entity.schema();
            let mut rows: Vec<RecordBatch> = Vec::new();
            // A full run's rows replace the location's; custom_fields is always whole.
            if !full && entity != Entity::CustomFields {
                let key = if entity == Entity::Contacts {
                    "id"
                } else {
                    "contactId"
                };
                for (path, _) in &old {
                    for b in read_file(&ls, path, &shown).await? {
                        let Some(col) =
                            b.column_by_name(key).and_then(|a| a.as_string_opt::<i32>())
                        else {
                            return Err(fail(&shown, format!("{path} has no {key} column")));
                        };
                        let keep: BooleanArray = col
                            .iter()
                            .map(|v| {
                                Some(v.is_none_or(|v| !changed.contains(v) && !deleted.contains(v)))
                            })
                            .collect();
                        rows.push(filter_record_batch(&b, &keep).map_err(|e| fail(&shown, e))?);
                    }
                }
            }
            rows.extend(run_rows(run, name).await?);
            // One file: the location's remaining current rows, then the run's.
            let mut buf = Vec::new();
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(Default::default()))
                .build();
            let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props))
                .map_err(|e| fail(&shown, e))?;
            let mut count = 0u64;
            for b in rows {
                let b = RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                    .map_err(|e| fail(&shown, e))?;
                count += b.num_rows() as u64;
                w.write(&b).map_err(|e| fail(&shown, e))?;
            }
            w.close().map_err(|e| fail(&shown, e))?;
            let rel = format!(
                "location_id={}/{run_dir}/part-00000.parquet",
                run.location_id
            );
            let size = buf.len() as i64;
            {
                use object_store::ObjectStoreExt;
                ls.object_store(None)
                    .put(&object_store::path::Path::from(rel.as_str()), buf.into())
                    .await
                    .map_err(|e| fail(&shown, e))?;
            }
            let mut actions: Vec<Action> =
                old.into_iter().map(|(_, r)| Action::Remove(r)).collect();
            actions.push(Action::Add(Add {
                path: rel,
                partition_values: HashMap::from([(
                    "location_id".to_owned(),
                    Some(run.location_id.to_owned()),
                )]),
                size,
                modification_time: now,
                data_change: true,
                stats: Some(format!("{{\"numRecords\":{count}}}")),
                ..Default::default()
            }));
            let target = Target {
                ls: &ls,
                shown: &shown,
                entity: name,
                partitions: &CURRENT_PARTITION_COLUMNS,
                app: &app,
                version,
            };
            if commit(&target, table.is_some(), actions, now).await? {
                tracing::info!(table = %shown, rows = count, version, location = %run.location_id, "merged the run into the current-state table");
            }
        }
        Ok(())
    }
}
