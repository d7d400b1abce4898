//! Parquet part files.
//!
//! Settings, and why:
//! - **zstd level 3**: close to the best ratio for this kind of text-heavy data at a fraction
//!   of the CPU of higher levels; every common reader supports it.
//! - **Row groups of up to 8Ki rows** (or 128 MiB), with 256 KiB pages: large enough for
//!   column statistics and scans to pay off (about 1 MB of compressed contacts, and engines
//!   read row groups in parallel), small enough that the group the writer holds in memory
//!   fills within the first 10k contacts of every entity, so memory reaches its plateau early
//!   and stays there (BENCHMARKS.md has the figures). Many parts open at once (a pipeline of
//!   many locations) share a budget and close smaller groups ([`BUFFER_BUDGET`]). The caller
//!   hands in batches of up to 1k rows or 128 KiB of JSON; a part keeps a group's first
//!   megabyte as those batches and only then encodes it, so with many parts open (each with a
//!   share below that) no column writer, each with its own zstd contexts, lives between
//!   groups ([`ENCODE_AT`]).
//! - **Dictionary encoding** (the default, kept on) for strings: tags, types, sources, owner
//!   and contact ids repeat a lot. Off for the columns whose values are unique (an entity's
//!   own `id`, timestamps, emails, note bodies: [`UNIQUE_COLUMNS`]).
//! - **Page-level statistics** (the default) so engines can skip pages on `dateAdded` etc.
//! - **Writer version `PARQUET_1_0`**: v1 data pages are read by every engine and version
//!   (older Spark and Hive, Athena, BigQuery loads, pandas through either engine), while v2
//!   pages and delta encodings are where reader bugs have historically been. With zstd on, v2
//!   would save little here. The logical types (timestamps with `isAdjustedToUTC`, lists) are
//!   the same in both versions.
//! - **The Arrow schema is embedded** (arrow-rs does it by default), so readers using Arrow get
//!   back `Timestamp(Millisecond, "UTC")` and the schema-version metadata unchanged.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use super::{PartInfo, PartTarget, PartWriter, SinkError};

const MAX_ROW_GROUP_ROWS: usize = 8 * 1024;
const MAX_ROW_GROUP_BYTES: usize = 128 * 1024 * 1024;
/// A part holds a whole row group in memory (its batches, in Arrow's memory) until it
/// writes it; with wide contact rows that grew with the location up to the row limit. Writing
/// the group once its batches pass this keeps memory flat, and still gives analytics-sized
/// groups (thousands of contacts).
const MAX_BUFFERED_BYTES: usize = 24 * 1024 * 1024;
/// What the row groups of all the parts open in the process may buffer together: a pipeline
/// running 200 locations has 800 parts open, and 24 MiB each (or a whole small location
/// each) is gigabytes. Each part closes its group at its share of this, between
/// [`MIN_BUFFERED_BYTES`] and [`MAX_BUFFERED_BYTES`]: one export keeps its large groups, many
/// at once write smaller ones (every reader takes them; what they cost is a little metadata).
const BUFFER_BUDGET: usize = 64 * 1024 * 1024;
const MIN_BUFFERED_BYTES: usize = 128 * 1024;
/// Up to this much of a row group waits as the caller's Arrow batches before it is encoded:
/// see `ParquetPart`'s `write`.
const ENCODE_AT: usize = 1024 * 1024;

/// Parquet parts open in this process now.
static OPEN_PARTS: AtomicUsize = AtomicUsize::new(0);

/// Counts a part as open for as long as it lives.
struct Open;

impl Open {
    fn new() -> Open {
        OPEN_PARTS.fetch_add(1, Relaxed);
        Open
    }

    /// The most this part's row group may buffer now.
    fn limit() -> usize {
        (BUFFER_BUDGET / OPEN_PARTS.load(Relaxed).max(1))
            .clamp(MIN_BUFFERED_BYTES, MAX_BUFFERED_BYTES)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN_PARTS.fetch_sub(1, Relaxed);
    }
}

const ZSTD_LEVEL: i32 = 3;
const PAGE_BYTES: usize = 256 * 1024;

pub(crate) struct ParquetPart {
    target: PartTarget,
    writer: ArrowWriter<crate::dest::PartFile>,
    /// The start of the row group, kept back as the caller's batches (see `write`).
    pending: Vec<RecordBatch>,
    pending_bytes: usize,
    pending_rows: usize,
    rows: u64,
    _open: Open,
}

/// Schema metadata also written as the file's own key-value metadata (beside the embedded
/// Arrow schema, which carries all of it): readers that do not decode the Arrow schema
/// (DuckDB's `parquet_kv_metadata`, `pyarrow.parquet.ParquetFile(...).metadata.metadata`) find it
/// there.
const FILE_METADATA_KEYS: &[&str] = &[crate::schema::WIDE_COLUMNS_KEY];

/// Columns whose values hardly ever repeat within a part (besides the timestamps): a
/// dictionary would only cost its hash table (tens of KB per column and part, allocated again
/// at every row group) and the encoding time before the writer falls back to plain values.
const UNIQUE_COLUMNS: &[&str] = &[
    "id",
    "_extra",
    "email",
    "emailLowerCase",
    "phone",
    "contactName",
    "name",
    "fullNameLowerCase",
    "address1",
    "body",
];

fn properties(schema: &Schema) -> Result<WriterProperties, parquet::errors::ParquetError> {
    let file_metadata: Vec<KeyValue> = FILE_METADATA_KEYS
        .iter()
        .filter_map(|k| {
            schema
                .metadata()
                .get(*k)
                .map(|v| KeyValue::new((*k).to_owned(), v.clone()))
        })
        .collect();
    let mut props = WriterProperties::builder();
    for field in schema.fields() {
        let unique = matches!(field.data_type(), DataType::Timestamp(..))
            || UNIQUE_COLUMNS.contains(&field.name().as_str());
        if unique {
            props =
                props.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
        }
    }
    Ok(props
        .set_key_value_metadata((!file_metadata.is_empty()).then_some(file_metadata))
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
        .set_max_row_group_bytes(Some(MAX_ROW_GROUP_BYTES))
        .set_dictionary_enabled(true)
        // Every column keeps a page and a dictionary in memory while it is built; with ~40
        // columns the default 1 MiB of each is most of the writer's memory.
        .set_data_page_size_limit(PAGE_BYTES)
        .set_dictionary_page_size_limit(PAGE_BYTES)
        .set_statistics_enabled(EnabledStatistics::Page)
        .build())
}

impl ParquetPart {
    pub(crate) fn create(target: PartTarget) -> Result<Self, SinkError> {
        let file = target.create()?;
        let writer = properties(&target.schema)
            .and_then(|props| ArrowWriter::try_new(file, target.schema.clone(), Some(props)))
            .map_err(|source| SinkError::Parquet {
                path: target.tmp.clone(),
                source,
            })?;
        Ok(ParquetPart {
            target,
            writer,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_rows: 0,
            rows: 0,
            _open: Open::new(),
        })
    }
}

impl ParquetPart {
    /// Hands the batches kept back to the `ArrowWriter`, which encodes them into its row group.
    fn encode_pending(&mut self) -> Result<(), parquet::errors::ParquetError> {
        for batch in self.pending.drain(..) {
            self.writer.write(&batch)?;
        }
        self.pending_bytes = 0;
        self.pending_rows = 0;
        Ok(())
    }
}

impl PartWriter for ParquetPart {
    /// A row group's first [`ENCODE_AT`] bytes wait as the caller's batches, and are encoded
    /// only when the group closes or outgrows that. A row group in progress in the
    /// `ArrowWriter` holds a column writer per column, each with its own zstd compressor and
    /// decompressor, encoders and statistics: with 800 parts open (a pipeline of 200
    /// locations, each part's share of the budget far below `ENCODE_AT`) they were most of the
    /// process's memory while holding no more rows than these batches do, and now live only
    /// while a group is written. One export (shares of megabytes) encodes as it goes, as
    /// before: encoded columns are more compact than Arrow's.
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.target.check_schema(batch)?;
        self.rows += batch.num_rows() as u64;
        // Arrow's memory of the batch: its buffers' capacity, which is what it holds.
        self.pending_bytes += batch.get_array_memory_size();
        self.pending_rows += batch.num_rows();
        self.pending.push(batch.clone());
        let limit = Open::limit();
        let encoded = self.writer.memory_size();
        let result = if encoded + self.pending_bytes > limit {
            self.encode_pending().and_then(|()| self.writer.flush())
        } else if encoded > 0
            || self.pending_bytes >= ENCODE_AT
            // The writer closes a group at exactly this many rows.
            || self.pending_rows >= MAX_ROW_GROUP_ROWS
        {
            self.encode_pending()
        } else {
            Ok(())
        };
        result.map_err(|source| SinkError::Parquet {
            path: self.target.tmp.clone(),
            source,
        })
    }

    fn finish(mut self: Box<Self>) -> Result<PartInfo, SinkError> {
        self.encode_pending().map_err(|source| SinkError::Parquet {
            path: self.target.tmp.clone(),
            source,
        })?;
        let ParquetPart {
            target,
            writer,
            rows,
            _open,
            ..
        } = *self;
        // `into_inner` writes the footer (what makes the file valid); the commit flushes what
        // the file still buffers.
        let file = writer.into_inner().map_err(|source| SinkError::Parquet {
            path: target.tmp.clone(),
            source,
        })?;
        target.commit(file, rows)
    }
}
