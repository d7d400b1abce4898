//! CSV part files.
//!
//! # Format
//! RFC 4180: comma-separated, fields quoted only when they must be (they hold a comma, a
//! quote, CR or LF), quotes doubled inside
//! quoted fields, records ended by **CRLF** (the RFC's terminator, and what Excel writes;
//! pandas, DuckDB, Spark and the `csv` crate read it as well as LF). Line breaks *inside* a
//! value are written as they are, inside quotes. The first row is the header: the column
//! names of the entity's schema, in order. UTF-8, no byte-order mark.
//!
//! # Cells
//! | column kind | cell |
//! |---|---|
//! | any, when null | empty |
//! | text (Str) | the text, byte for byte |
//! | Bool | `true` / `false` |
//! | Int | decimal |
//! | Float64 (wide custom field columns of number fields) | the shortest decimal that reads back as the same double: `12.5`, `5000` |
//! | timestamp (Ts) | `YYYY-MM-DDTHH:MM:SS.sssZ` (UTC, milliseconds) |
//! | list of text (StrList) | a JSON array: `["a","b"]` |
//! | customFields | a JSON array: `[{"id":"x","value":<the value's JSON as received>}]`; a missing value is `null` |
//! | JSON (Json, `_extra`) | the JSON text as received |
//!
//! A null and an empty string are both an empty cell: CSV cannot tell them apart. Use
//! Parquet when that matters.
//!
//! Text is written faithfully: no protection against spreadsheet formula injection (a cell
//! starting with `=`, `+`, `-` or `@` is not prefixed or altered), since an export must give
//! back exactly what the CRM holds. Open untrusted exports in a spreadsheet with care.

use ::csv::{QuoteStyle, Terminator, Writer, WriterBuilder};
use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, GenericListArray, Int64Array, StringArray,
    TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;

use super::{PartInfo, PartTarget, PartWriter, SinkError};
use crate::schema::push_json_string;

/// The `csv` crate's output buffer; larger than its 8 KiB default for fewer syscalls.
const WRITE_BUFFER: usize = 256 * 1024;

/// The one place CSV writing is configured, so every part is quoted the same way.
fn writer_builder() -> WriterBuilder {
    let mut b = WriterBuilder::new();
    b.delimiter(b',')
        .quote(b'"')
        .double_quote(true)
        .quote_style(QuoteStyle::Necessary)
        .terminator(Terminator::CRLF)
        .has_headers(true)
        .buffer_capacity(WRITE_BUFFER);
    b
}

pub(crate) struct CsvPart {
    target: PartTarget,
    writer: Writer<crate::dest::PartFile>,
    rows: u64,
    /// Cell text of non-string columns, reused across cells.
    cell: String,
}

impl CsvPart {
    pub(crate) fn create(target: PartTarget) -> Result<Self, SinkError> {
        let file = target.create()?;
        let mut writer = writer_builder().from_writer(file);
        let schema = target.schema.clone();
        writer
            .write_record(schema.fields().iter().map(|f| f.name().as_bytes()))
            .map_err(|source| SinkError::Csv {
                path: target.tmp.clone(),
                source,
            })?;
        Ok(CsvPart {
            target,
            writer,
            rows: 0,
            cell: String::new(),
        })
    }
}

impl PartWriter for CsvPart {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.target.check_schema(batch)?;
        let columns = batch
            .columns()
            .iter()
            .map(|c| Cells::new(c.as_ref()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| SinkError::SchemaMismatch {
                path: self.target.tmp.clone(),
                table: self.target.table,
                detail: "a column type the CSV writer does not encode".into(),
            })?;
        let csv_err = |source| SinkError::Csv {
            path: self.target.tmp.clone(),
            source,
        };
        for row in 0..batch.num_rows() {
            for cells in &columns {
                match cells {
                    // Text goes out straight from the array, without a copy.
                    Cells::Utf8(a) if a.is_valid(row) => self.writer.write_field(a.value(row)),
                    _ => {
                        self.cell.clear();
                        cells.write(row, &mut self.cell);
                        self.writer.write_field(self.cell.as_bytes())
                    }
                }
                .map_err(csv_err)?;
            }
            self.writer.write_record(None::<&[u8]>).map_err(csv_err)?;
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<PartInfo, SinkError> {
        let CsvPart {
            target,
            writer,
            rows,
            ..
        } = *self;
        let file = writer
            .into_inner()
            .map_err(|e| SinkError::io("write", &target.tmp)(e.into_error()))?;
        target.commit(file, rows)
    }
}

/// A column of a batch, typed for writing cells.
enum Cells<'a> {
    Utf8(&'a StringArray),
    Bool(&'a BooleanArray),
    Int(&'a Int64Array),
    /// The wide custom field columns of a number field.
    Float(&'a Float64Array),
    Ts(&'a TimestampMillisecondArray),
    StrList(&'a GenericListArray<i32>, &'a StringArray),
    CustomFields {
        list: &'a GenericListArray<i32>,
        ids: &'a StringArray,
        values: &'a StringArray,
    },
}

impl<'a> Cells<'a> {
    /// `None` for a type the schema never declares.
    fn new(array: &'a dyn Array) -> Option<Self> {
        Some(match array.data_type() {
            DataType::Utf8 => Cells::Utf8(array.as_string_opt::<i32>()?),
            DataType::Boolean => Cells::Bool(array.as_boolean_opt()?),
            DataType::Int64 => Cells::Int(array.as_primitive_opt::<Int64Type>()?),
            DataType::Float64 => Cells::Float(array.as_primitive_opt::<Float64Type>()?),
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                Cells::Ts(array.as_primitive_opt::<TimestampMillisecondType>()?)
            }
            DataType::List(item) => {
                let list = array.as_list_opt::<i32>()?;
                match item.data_type() {
                    DataType::Utf8 => Cells::StrList(list, list.values().as_string_opt::<i32>()?),
                    DataType::Struct(_) => {
                        let items = list.values().as_struct_opt()?;
                        Cells::CustomFields {
                            list,
                            ids: items.column_by_name("id")?.as_string_opt::<i32>()?,
                            values: items.column_by_name("value")?.as_string_opt::<i32>()?,
                        }
                    }
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// Writes the cell of `row` (empty for a null).
    fn write(&self, row: usize, out: &mut String) {
        use std::fmt::Write;
        let valid = match self {
            Cells::Utf8(a) => a.is_valid(row),
            Cells::Bool(a) => a.is_valid(row),
            Cells::Int(a) => a.is_valid(row),
            Cells::Float(a) => a.is_valid(row),
            Cells::Ts(a) => a.is_valid(row),
            Cells::StrList(a, _) | Cells::CustomFields { list: a, .. } => a.is_valid(row),
        };
        if !valid {
            return;
        }
        match self {
            Cells::Utf8(a) => out.push_str(a.value(row)),
            Cells::Bool(a) => out.push_str(if a.value(row) { "true" } else { "false" }),
            // Writing to a String cannot fail.
            Cells::Int(a) => drop(write!(out, "{}", a.value(row))),
            // The shortest text that reads back as the same double (`12.5`, `5000`).
            Cells::Float(a) => drop(write!(out, "{}", a.value(row))),
            Cells::Ts(a) => crate::timefmt::write_iso_millis(out, a.value(row)),
            Cells::StrList(list, values) => {
                let range = list_range(list, row);
                out.push('[');
                for (k, i) in range.enumerate() {
                    if k > 0 {
                        out.push(',');
                    }
                    if values.is_valid(i) {
                        push_json_string(out, values.value(i));
                    } else {
                        out.push_str("null");
                    }
                }
                out.push(']');
            }
            Cells::CustomFields { list, ids, values } => {
                let range = list_range(list, row);
                out.push('[');
                for (k, i) in range.enumerate() {
                    if k > 0 {
                        out.push(',');
                    }
                    out.push_str("{\"id\":");
                    if ids.is_valid(i) {
                        push_json_string(out, ids.value(i));
                    } else {
                        out.push_str("null");
                    }
                    out.push_str(",\"value\":");
                    // Already JSON text, as the API sent it.
                    out.push_str(if values.is_valid(i) {
                        values.value(i)
                    } else {
                        "null"
                    });
                    out.push('}');
                }
                out.push(']');
            }
        }
    }
}

/// Indices into the list's values of the elements of `row`.
fn list_range(list: &GenericListArray<i32>, row: usize) -> std::ops::Range<usize> {
    let offsets = list.value_offsets();
    // Offsets of a valid ListArray are non-negative and non-decreasing.
    let start = usize::try_from(offsets[row]).unwrap_or(0);
    let end = usize::try_from(offsets[row + 1]).unwrap_or(start);
    start..end
}
