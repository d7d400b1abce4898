//! Part files: Parquet or CSV, written under a temporary name and renamed when complete.
//!
//! # Layout
//! ```text
//! OUT/<entity>/location_id=<location id>/part-00000.parquet
//!                                       /.part-00001.parquet.tmp   (being written)
//! ```
//! The `location_id=` directory level is Hive-style partitioning, so DuckDB, Spark and pyarrow
//! read `OUT/contacts/` as one table with a `location_id` column.
//!
//! # Durability
//! A part is written to `.part-<n>.<ext>.tmp` in its final directory, then flushed, fsynced,
//! renamed to `part-<n>.<ext>`, and the directory fsynced ([`crate::durable::commit`]). A part
//! file that exists under its final name is therefore complete: readers never see half a file,
//! and after a crash only the partition's own `.part-*.tmp` files need cleaning
//! ([`clean_temp_parts`]). Renaming over an existing part of the same number replaces it: a
//! resumed export rewrites the part it had not finished.
//!
//! Both formats take the same [`RecordBatch`] from [`crate::schema`]. The module docs of
//! `sink/parquet.rs` and `sink/csv.rs` say how each encodes the columns (the CSV cell
//! conventions are the ones the README documents).

mod csv;
mod parquet;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::dest::{Dest, PartFile};
use crate::schema::Entity;

/// Output file format.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Format {
    Parquet,
    Csv,
}

impl Format {
    /// The file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
        }
    }
}

/// A finished part file, as recorded in the manifest.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PartInfo {
    /// Relative to the output root, `/`-separated on every platform.
    pub path: String,
    pub rows: u64,
    /// Size of the file.
    pub bytes: u64,
}

/// One part file being written. Dropping it without `finish` leaves only the temporary file
/// (which `clean_temp_parts` removes).
pub trait PartWriter: Send {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError>;
    /// Flushes, fsyncs, renames the temp file to its final name (and fsyncs the directory),
    /// returns what was written.
    fn finish(self: Box<Self>) -> Result<PartInfo, SinkError>;
}

/// A part file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write Parquet file {}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: ::parquet::errors::ParquetError,
    },
    #[error("cannot write CSV file {}: {source}", path.display())]
    Csv { path: PathBuf, source: ::csv::Error },
    /// A batch whose columns are not the table's declared schema (a bug in the caller).
    #[error("{}: batch does not match the {table} schema: {detail}", path.display())]
    SchemaMismatch {
        path: PathBuf,
        /// The table: an entity's name, or `events`.
        table: &'static str,
        detail: String,
    },
    /// The bucket refused or failed a request.
    #[error(transparent)]
    Dest(#[from] crate::dest::DestError),
    /// The location id cannot be used as a directory name.
    #[error(
        "location id {location_id:?} is not safe as a directory name: only ASCII letters, digits, '-', '_' and '.' are allowed"
    )]
    UnsafeLocationId { location_id: String },
}

impl From<crate::durable::WriteError> for SinkError {
    fn from(e: crate::durable::WriteError) -> SinkError {
        SinkError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }
}

impl SinkError {
    pub(crate) fn io<'p>(
        action: &'static str,
        path: &'p Path,
    ) -> impl FnOnce(io::Error) -> SinkError + 'p {
        move |source| SinkError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// The Hive-style partition directories of a part: `[export_date=<date>/]location_id=<id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// A nightly pipeline's run date (`YYYY-MM-DD`), partitioning above the location.
    pub export_date: Option<String>,
    pub location_id: String,
    /// `--table delta`: the run's own directory below the location (`run=…`,
    /// [`crate::delta`]), so no run overwrites or deletes the files of another.
    pub run: Option<String>,
}

impl Partition {
    pub fn location(location_id: &str) -> Partition {
        Partition {
            export_date: None,
            location_id: location_id.to_owned(),
            run: None,
        }
    }

    /// `<entity>/[export_date=…/]location_id=…`, relative to OUT, `/`-separated.
    pub fn rel_dir(&self, entity: Entity) -> String {
        let dir = match &self.export_date {
            Some(d) => format!(
                "{}/export_date={d}/location_id={}",
                entity.name(),
                self.location_id
            ),
            None => format!("{}/location_id={}", entity.name(), self.location_id),
        };
        match &self.run {
            Some(run) => format!("{dir}/{run}"),
            None => dir,
        }
    }

    /// Refuses a location id or date that is not safe as a directory name.
    pub(crate) fn check(&self) -> Result<(), SinkError> {
        check_location_id(&self.location_id)?;
        if let Some(d) = &self.export_date {
            if d.len() != 10 || !d.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
                return Err(SinkError::UnsafeLocationId {
                    location_id: format!("export_date={d}"),
                });
            }
        }
        Ok(())
    }
}

/// Opens OUT/<entity>/location_id=<location_id>/part-<n:05>.<ext>, written first as
/// `.part-<n:05>.<ext>.tmp` in the same dir (creating dirs).
pub fn open_part(
    out: &Dest,
    format: Format,
    entity: Entity,
    location_id: &str,
    n: u32,
) -> Result<Box<dyn PartWriter>, SinkError> {
    open_part_at(out, format, entity, &Partition::location(location_id), n)
}

/// [`open_part`] under any [`Partition`].
pub fn open_part_at(
    out: &Dest,
    format: Format,
    entity: Entity,
    partition: &Partition,
    n: u32,
) -> Result<Box<dyn PartWriter>, SinkError> {
    open_part_with(out, format, entity, partition, n, entity.schema())
}

/// [`open_part_at`] with a schema of its own: the entity's columns, then more (the contacts'
/// wide custom field columns, [`crate::export::WideColumns`]). Every batch written must have
/// exactly this schema's columns.
pub fn open_part_with(
    out: &Dest,
    format: Format,
    entity: Entity,
    partition: &Partition,
    n: u32,
    schema: SchemaRef,
) -> Result<Box<dyn PartWriter>, SinkError> {
    partition.check()?;
    let rel_dir = partition.rel_dir(entity);
    let name = format!("part-{n:05}.{}", format.extension());
    let target = PartTarget::new(out, entity.name(), &rel_dir, &name, schema);
    open_target(format, target)
}

/// A part file of a table outside the entities' partitioned layout: `OUT/<rel_dir>/<name>`
/// (the events table of `contacts-etl listen`, `events/part-<seq:08>.<ext>`), written under the
/// same rules (a temporary `.<name>.tmp` renamed when complete, or a multipart upload). The
/// caller builds `rel_dir` and `name` from fixed text and numbers only: nothing from outside.
pub fn open_table_part(
    out: &Dest,
    format: Format,
    table: &'static str,
    rel_dir: &str,
    name: &str,
    schema: SchemaRef,
) -> Result<Box<dyn PartWriter>, SinkError> {
    open_target(format, PartTarget::new(out, table, rel_dir, name, schema))
}

fn open_target(format: Format, target: PartTarget) -> Result<Box<dyn PartWriter>, SinkError> {
    Ok(match format {
        Format::Parquet => Box::new(parquet::ParquetPart::create(target)?),
        Format::Csv => Box::new(csv::CsvPart::create(target)?),
    })
}

/// Removes the temporary part files a stopped run left in one partition: each entity's
/// `location_id=<id>` directory (and those of `deleted_contacts` and `custom_fields`), under
/// `partition`. Returns how many.
///
/// Only this partition is touched, and only names this module writes
/// (`.part-<digits>.<parquet|csv>.tmp`): another location's export may be writing into the same
/// OUT at this moment, and other tools' files may sit anywhere under it. Symbolic links are not
/// followed. Missing directories count as clean.
pub fn clean_temp_parts(out: &Dest, partition: &Partition) -> Result<usize, SinkError> {
    partition.check()?;
    // A bucket holds no temporary parts: an unfinished upload is not an object.
    if out.is_remote() {
        return Ok(0);
    }
    let out = out.root();
    let mut removed = 0;
    for entity in Entity::ALL
        .into_iter()
        .chain([Entity::DeletedContacts, Entity::CustomFields])
    {
        let dir = out.join(partition.rel_dir(entity));
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SinkError::io("list", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(SinkError::io("list", &dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(SinkError::io("inspect", &path))?;
            if kind.is_file() && is_temp_part_name(&entry.file_name().to_string_lossy()) {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    // Removed meanwhile: the goal is met.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(SinkError::io("remove", &path)(e)),
                }
            }
        }
    }
    Ok(removed)
}

/// Whether `name` is a temporary part file as [`PartTarget`] names it:
/// `.part-<digits>.<parquet|csv>.tmp`.
fn is_temp_part_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(".part-")
        .and_then(|r| r.strip_suffix(".tmp"))
    else {
        return false;
    };
    let Some((number, ext)) = rest.split_once('.') else {
        return false;
    };
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && [Format::Parquet, Format::Csv]
            .iter()
            .any(|f| f.extension() == ext)
}

/// Rejects a location id that is not a plain directory-name token.
///
/// Location ids are short alphanumeric keys; rather than escape unusual characters (and have
/// two spellings of one location), anything outside `[A-Za-z0-9._-]` is refused, as are `.`
/// and `..`, so a part can never land outside OUT.
fn check_location_id(location_id: &str) -> Result<(), SinkError> {
    let safe = !location_id.is_empty()
        && location_id.len() <= 128
        && location_id != "."
        && location_id != ".."
        && location_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if safe {
        Ok(())
    } else {
        Err(SinkError::UnsafeLocationId {
            location_id: crate::schema::truncate_for_message(location_id, 80),
        })
    }
}

/// Where a part is written, and the temp-then-rename steps shared by both formats.
pub(crate) struct PartTarget {
    dest: Dest,
    /// The table's name, for messages.
    pub(crate) table: &'static str,
    /// The columns of every batch, and of the file.
    pub(crate) schema: SchemaRef,
    /// `.part-<n>.<ext>.tmp`, the file being written.
    pub(crate) tmp: PathBuf,
    /// `part-<n>.<ext>`.
    fin: PathBuf,
    /// `fin` relative to OUT, `/`-separated.
    rel: String,
}

impl PartTarget {
    fn new(out: &Dest, table: &'static str, rel_dir: &str, name: &str, schema: SchemaRef) -> Self {
        let dir = out.root().join(rel_dir);
        PartTarget {
            dest: out.clone(),
            table,
            schema,
            tmp: dir.join(format!(".{name}.tmp")),
            fin: dir.join(name),
            rel: format!("{rel_dir}/{name}"),
        }
    }

    /// Starts the file: the temp file (truncating a leftover one, creating directories), or
    /// the bucket's upload ([`Dest::create_part`]).
    fn create(&self) -> Result<PartFile, SinkError> {
        self.dest
            .create_part(&self.tmp, &self.fin)
            .map_err(SinkError::io("create", &self.tmp))
    }

    /// Makes the written file durable and visible under its final name
    /// ([`PartFile::commit`]).
    fn commit(self, file: PartFile, rows: u64) -> Result<PartInfo, SinkError> {
        let bytes = file.commit().map_err(SinkError::io("commit", &self.fin))?;
        Ok(PartInfo {
            path: self.rel,
            rows,
            bytes,
        })
    }

    /// Checks that `batch` has the part's columns (names, types, nullability).
    pub(crate) fn check_schema(&self, batch: &RecordBatch) -> Result<(), SinkError> {
        let expected = &self.schema;
        let got = batch.schema();
        if got.fields() == expected.fields() {
            return Ok(());
        }
        let detail = match got
            .fields()
            .iter()
            .zip(expected.fields().iter())
            .find(|(g, e)| g != e)
        {
            Some((g, e)) => format!(
                "column {:?} is {}, expected {:?} {}",
                g.name(),
                g.data_type(),
                e.name(),
                e.data_type()
            ),
            None => format!(
                "{} columns, expected {}",
                got.fields().len(),
                expected.fields().len()
            ),
        };
        Err(SinkError::SchemaMismatch {
            path: self.tmp.clone(),
            table: self.table,
            detail,
        })
    }
}

#[cfg(test)]
mod tests;
