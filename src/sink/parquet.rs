//! Parquet part files.
//!
//! Settings, and why:
//! - **zstd level 3**: close to the best ratio for this kind of text-heavy data at a fraction
//!   of the CPU of higher levels; every common reader supports it.
//! - **Row groups of up to 8Ki rows** (or 128 MiB), with 256 KiB pages: large enough for
//!   column statistics and scans to pay off (about 1 MB of compressed contacts, and engines
//!   read row groups in parallel), small enough that the group the writer holds in memory
//!   fills within the first 10k contacts of every entity, so memory reaches its plateau early
//!   and stays there (BENCHMARKS.md has the figures). The caller hands in 1k-row batches; the
//!   writer accumulates them.
//! - **Dictionary encoding** (the default, kept on) for strings: ids, tags, types, sources and
//!   owner ids repeat a lot.
//! - **Page-level statistics** (the default) so engines can skip pages on `dateAdded` etc.
//! - **Writer version `PARQUET_1_0`**: v1 data pages are read by every engine and version
//!   (older Spark and Hive, Athena, BigQuery loads, pandas through either engine), while v2
//!   pages and delta encodings are where reader bugs have historically been. With zstd on, v2
//!   would save little here. The logical types (timestamps with `isAdjustedToUTC`, lists) are
//!   the same in both versions.
//! - **The Arrow schema is embedded** (arrow-rs does it by default), so readers using Arrow get
//!   back `Timestamp(Millisecond, "UTC")` and the schema-version metadata unchanged.

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};

use super::{PartInfo, PartTarget, PartWriter, SinkError};

const MAX_ROW_GROUP_ROWS: usize = 8 * 1024;
const MAX_ROW_GROUP_BYTES: usize = 128 * 1024 * 1024;
/// The writer holds a whole row group in memory until it closes; with wide contact rows that
/// grew with the location up to the row limit. Closing the group once its buffered size passes
/// this keeps memory flat, and still gives analytics-sized groups (thousands of contacts).
const MAX_BUFFERED_BYTES: usize = 24 * 1024 * 1024;
const ZSTD_LEVEL: i32 = 3;
const PAGE_BYTES: usize = 256 * 1024;

pub(crate) struct ParquetPart {
    target: PartTarget,
    writer: ArrowWriter<crate::dest::PartFile>,
    rows: u64,
}

/// Schema metadata also written as the file's own key-value metadata (beside the embedded
/// Arrow schema, which carries all of it): readers that do not decode the Arrow schema
/// (DuckDB's `parquet_kv_metadata`, `pyarrow.parquet.ParquetFile(...).metadata.metadata`) find it
/// there.
const FILE_METADATA_KEYS: &[&str] = &[crate::schema::WIDE_COLUMNS_KEY];

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
    Ok(WriterProperties::builder()
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
            rows: 0,
        })
    }
}

impl PartWriter for ParquetPart {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.target.check_schema(batch)?;
        self.writer
            .write(batch)
            .map_err(|source| SinkError::Parquet {
                path: self.target.tmp.clone(),
                source,
            })?;
        self.rows += batch.num_rows() as u64;
        if self.writer.in_progress_size() > MAX_BUFFERED_BYTES {
            self.writer.flush().map_err(|source| SinkError::Parquet {
                path: self.target.tmp.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<PartInfo, SinkError> {
        let ParquetPart {
            target,
            writer,
            rows,
        } = *self;
        // `into_inner` flushes the last row group and writes the footer (what makes the file
        // valid); the commit flushes what the file still buffers.
        let file = writer.into_inner().map_err(|source| SinkError::Parquet {
            path: target.tmp.clone(),
            source,
        })?;
        target.commit(file, rows)
    }
}
