//! The events table: its Arrow schema, the fields taken from a delivery's body, the batch a
//! rolled segment becomes, and [`scan`], the reader `export --from-events` uses.
//!
//! # Layout
//! ```text
//! OUT/events/part-00000007.parquet   (or .csv) one part per rolled journal segment
//! ```
//! The part's number is its segment's: numbers only grow, gaps are allowed (an empty segment
//! makes no part), and a part rewritten after a crash between its rename and the roll state is
//! rewritten identically (it is built from the sealed segment alone).
//!
//! # Columns
//! | column | type | from |
//! |---|---|---|
//! | `webhookId` | Utf8, not null | the body |
//! | `type` | Utf8, not null | the body |
//! | `locationId` | Utf8 | the body |
//! | `timestamp` | Timestamp(ms, UTC) | the body's `timestamp` (ISO 8601, or epoch ms) |
//! | `recordId` | Utf8 | `id`, or `appointment.id` |
//! | `contactId` | Utf8 | `contactId`, or `appointment.contactId`; the `id` of `Contact*` types |
//! | `receivedAt` | Timestamp(ms, UTC), not null | the receiver's clock |
//! | `receiverStartedAt` | Timestamp(ms, UTC), not null | when the storing receiver started: a change between consecutive rows marks a restart |
//! | `raw` | Utf8, not null | the body exactly as received |

use std::path::Path;
use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, StringArray, StringBuilder, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use super::journal::Record;
use super::EventsError;
use crate::dest::Dest;
use crate::sink::Format;

/// The table's directory under OUT.
pub const TABLE_DIR: &str = "events";

/// Version of the column layout, in the schema metadata.
pub const EVENTS_SCHEMA_VERSION: u32 = 1;

/// The longest `webhookId` accepted (ids are short; this bounds the duplicate set).
pub const MAX_ID_LEN: usize = 256;

/// The Arrow schema of the events table.
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
            let metadata = [(
                "contacts_etl.events_schema_version".to_owned(),
                EVENTS_SCHEMA_VERSION.to_string(),
            )]
            .into_iter()
            .collect();
            Arc::new(Schema::new_with_metadata(
                vec![
                    Field::new("webhookId", DataType::Utf8, false),
                    Field::new("type", DataType::Utf8, false),
                    Field::new("locationId", DataType::Utf8, true),
                    Field::new("timestamp", ts(), true),
                    Field::new("recordId", DataType::Utf8, true),
                    Field::new("contactId", DataType::Utf8, true),
                    Field::new("receivedAt", ts(), false),
                    Field::new("receiverStartedAt", ts(), false),
                    Field::new("raw", DataType::Utf8, false),
                ],
                metadata,
            ))
        })
        .clone()
}

/// The receiver's status beside the parts (`OUT/events/_receiver.json`), rewritten every
/// [`Heartbeat::interval_ms`] while it runs: how an export tells a receiver that was up all
/// along from one that was down or restarted (events sent meanwhile are lost: HighLevel
/// retries a delivery only when it was answered 429) or that refused signed deliveries.
pub const HEARTBEAT: &str = "_receiver.json";

/// The content of [`HEARTBEAT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// When this receiver started (the `receiverStartedAt` of the rows it stores).
    pub started_ms: i64,
    /// When it last wrote this file.
    pub alive_ms: i64,
    /// How often it writes it.
    pub interval_ms: i64,
    /// Signed deliveries it refused since it started that may be events lost: stale
    /// (outside `--max-age`), or answered 429 because the journal could not take them.
    pub lossy_refusals: u64,
    /// When it stopped (SIGTERM), after its last roll; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_ms: Option<i64>,
}

/// The heartbeat under `dest`, `None` when there is none.
pub fn read_heartbeat(dest: &Dest) -> Result<Option<Heartbeat>, EventsError> {
    let path = dest.root().join(TABLE_DIR).join(HEARTBEAT);
    let Some(bytes) = dest.read(&path).map_err(EventsError::io("read", &path))? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| table_error(&path, e.to_string()))
}

/// Writes `beat` under `dest` (atomically; uploaded to a bucket).
pub fn write_heartbeat(dest: &Dest, beat: &Heartbeat) -> Result<(), EventsError> {
    let dir = dest.root().join(TABLE_DIR);
    let path = dir.join(HEARTBEAT);
    std::fs::create_dir_all(&dir).map_err(EventsError::io("create directory", &dir))?;
    let bytes = serde_json::to_vec(beat).unwrap_or_default();
    crate::durable::write(&path, &bytes)?;
    dest.publish(&path)
        .map_err(EventsError::io("upload", &path))
}

/// The highest part number under `dest` (`None`: no part yet). A receiver with a new journal
/// numbers its parts after it, so a reader's mark (the last part it read) stays valid.
pub fn highest_part(dest: &Dest) -> Result<Option<u64>, EventsError> {
    let dir = dest.root().join(TABLE_DIR);
    let names = dest
        .list_files(&dir)
        .map_err(EventsError::io("list", &dir))?;
    Ok(names
        .iter()
        .filter_map(|n| parse_part_name(n))
        .map(|(seq, _)| seq)
        .max())
}

/// `part-<seq:08>.<ext>`.
pub fn part_name(seq: u64, format: Format) -> String {
    format!("part-{seq:08}.{}", format.extension())
}

/// The fields of a delivery the receiver needs, taken from its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventHead {
    pub kind: String,
    pub webhook_id: String,
    pub location_id: Option<String>,
    pub timestamp_ms: i64,
    pub record_id: Option<String>,
    pub contact_id: Option<String>,
}

/// Why a body is not a delivery (answered 400).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Malformed {
    NotUtf8,
    NotJson,
    NotAnObject,
    /// `type`, `webhookId` or `timestamp` missing, or not of their kind.
    Field(&'static str),
}

impl Malformed {
    pub fn describe(self) -> &'static str {
        match self {
            Malformed::NotUtf8 => "body is not UTF-8",
            Malformed::NotJson => "body is not JSON",
            Malformed::NotAnObject => "body is not a JSON object",
            Malformed::Field("type") => "type is missing or not a non-empty string",
            Malformed::Field("webhookId") => {
                "webhookId is missing or not a non-empty string of at most 256 bytes"
            }
            Malformed::Field(_) => "timestamp is missing or not ISO 8601 or epoch milliseconds",
        }
    }
}

/// Reads a delivery's head from its raw body. Lenient where the contract is (unknown types,
/// ids as numbers, `timestamp` as ISO 8601 or epoch milliseconds, number or numeric string),
/// strict on the three fields the receiver cannot do without.
pub fn parse_head(body: &[u8]) -> Result<EventHead, Malformed> {
    let text = std::str::from_utf8(body).map_err(|_| Malformed::NotUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|_| Malformed::NotJson)?;
    let Value::Object(map) = &value else {
        return Err(Malformed::NotAnObject);
    };
    let kind = match map.get("type") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(Malformed::Field("type")),
    };
    let webhook_id = match map.get("webhookId") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => s.clone(),
        _ => return Err(Malformed::Field("webhookId")),
    };
    let timestamp_ms = map
        .get("timestamp")
        .and_then(timestamp_ms)
        .ok_or(Malformed::Field("timestamp"))?;
    let appointment = map.get("appointment").and_then(Value::as_object);
    let id = map.get("id").and_then(id_text);
    let record_id = id
        .clone()
        .or_else(|| appointment.and_then(|a| a.get("id")).and_then(id_text));
    let contact_id = map
        .get("contactId")
        .and_then(id_text)
        .or_else(|| {
            appointment
                .and_then(|a| a.get("contactId"))
                .and_then(id_text)
        })
        .or_else(|| kind.starts_with("Contact").then_some(id).flatten());
    Ok(EventHead {
        kind,
        webhook_id,
        location_id: map.get("locationId").and_then(id_text),
        timestamp_ms,
        record_id,
        contact_id,
    })
}

/// An id as text: a string as it is (not empty), a number as its JSON text.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// ISO 8601, or epoch milliseconds as a whole number or a string of digits.
fn timestamp_ms(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => {
            let t = s.trim();
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                t.parse().ok()
            } else {
                crate::timefmt::parse_iso_millis(t)
            }
        }
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// The rows of a rolled segment as one batch.
pub fn batch(records: &[Record]) -> Result<RecordBatch, EventsError> {
    let n = records.len();
    let mut ids = StringBuilder::with_capacity(n, n * 24);
    let mut kinds = StringBuilder::with_capacity(n, n * 16);
    let mut locations = StringBuilder::with_capacity(n, n * 20);
    let mut record_ids = StringBuilder::with_capacity(n, n * 20);
    let mut contact_ids = StringBuilder::with_capacity(n, n * 20);
    let mut raws = StringBuilder::with_capacity(n, records.iter().map(|r| r.raw.len()).sum());
    let mut timestamps = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    for r in records {
        // Only bodies that parsed were journaled; a record that no longer does (it cannot,
        // the CRC guards it) still lands, with what the journal itself holds.
        let head = parse_head(&r.raw).ok();
        ids.append_value(&r.webhook_id);
        kinds.append_value(head.as_ref().map_or("", |h| h.kind.as_str()));
        locations.append_option(head.as_ref().and_then(|h| h.location_id.as_deref()));
        timestamps.push(Some(r.timestamp_ms));
        record_ids.append_option(head.as_ref().and_then(|h| h.record_id.as_deref()));
        contact_ids.append_option(head.as_ref().and_then(|h| h.contact_id.as_deref()));
        received.push(r.received_at_ms);
        started.push(r.started_ms);
        raws.append_value(String::from_utf8_lossy(&r.raw));
    }
    let ts = |v: Vec<Option<i64>>| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(kinds.finish()),
        Arc::new(locations.finish()),
        ts(timestamps),
        Arc::new(record_ids.finish()),
        Arc::new(contact_ids.finish()),
        ts(received.into_iter().map(Some).collect()),
        ts(started.into_iter().map(Some).collect()),
        Arc::new(raws.finish()),
    ];
    RecordBatch::try_new(schema(), columns).map_err(|e| EventsError::Table {
        path: TABLE_DIR.into(),
        detail: e.to_string(),
    })
}

/// One row of the events table, as [`scan`] hands it over (the raw body left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub webhook_id: String,
    pub kind: String,
    pub location_id: Option<String>,
    pub timestamp_ms: Option<i64>,
    pub record_id: Option<String>,
    pub contact_id: Option<String>,
    pub received_at_ms: i64,
    pub receiver_started_ms: i64,
    /// The number of the part the row was read from: a reader's resume mark.
    pub part: u64,
}

/// Calls `f` for every row of the parts with seq > `after` (all when `None`), in seq order
/// then row order; returns the highest seq read (or `after` when there is none newer).
/// `format` `None` reads whichever extension is there (Parquet when a number has both).
pub fn scan(
    dest: &Dest,
    format: Option<Format>,
    after: Option<u64>,
    mut f: impl FnMut(EventRow),
) -> Result<Option<u64>, EventsError> {
    let dir = dest.root().join(TABLE_DIR);
    let names = dest
        .list_files(&dir)
        .map_err(EventsError::io("list", &dir))?;
    let mut parts: Vec<(u64, Format)> = names
        .iter()
        .filter_map(|name| parse_part_name(name))
        .filter(|(seq, fmt)| {
            after.is_none_or(|a| *seq > a) && format.is_none_or(|want| want == *fmt)
        })
        .collect();
    // Parquet sorts before CSV for one number; dedup keeps the first.
    parts.sort_by_key(|(seq, fmt)| (*seq, *fmt == Format::Csv));
    parts.dedup_by_key(|(seq, _)| *seq);
    let mut last = after;
    for (seq, fmt) in parts {
        let path = dir.join(part_name(seq, fmt));
        let Some(bytes) = dest.read(&path).map_err(EventsError::io("read", &path))? else {
            // Listed, then gone: nothing to read.
            continue;
        };
        match fmt {
            Format::Parquet => read_parquet(&path, seq, bytes, &mut f)?,
            Format::Csv => read_csv(&path, seq, &bytes, &mut f)?,
        }
        last = Some(seq);
    }
    Ok(last)
}

/// `part-<digits>.<parquet|csv>` → its number and format.
fn parse_part_name(name: &str) -> Option<(u64, Format)> {
    let rest = name.strip_prefix("part-")?;
    let (digits, ext) = rest.split_once('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let format = match ext {
        "parquet" => Format::Parquet,
        "csv" => Format::Csv,
        _ => return None,
    };
    Some((digits.parse().ok()?, format))
}

fn read_parquet(
    path: &Path,
    part: u64,
    bytes: Vec<u8>,
    f: &mut impl FnMut(EventRow),
) -> Result<(), EventsError> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .and_then(|b| b.build())
        .map_err(|e| table_error(path, e.to_string()))?;
    for batch in reader {
        let batch = batch.map_err(|e| table_error(path, e.to_string()))?;
        let (ids, kinds, locations, records, contacts) = (
            text_column(&batch, "webhookId", path)?,
            text_column(&batch, "type", path)?,
            text_column(&batch, "locationId", path)?,
            text_column(&batch, "recordId", path)?,
            text_column(&batch, "contactId", path)?,
        );
        let (timestamps, received, started) = (
            time_column(&batch, "timestamp", path)?,
            time_column(&batch, "receivedAt", path)?,
            time_column(&batch, "receiverStartedAt", path)?,
        );
        let opt = |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_owned());
        for i in 0..batch.num_rows() {
            f(EventRow {
                webhook_id: ids.value(i).to_owned(),
                kind: kinds.value(i).to_owned(),
                location_id: opt(locations, i),
                timestamp_ms: timestamps.is_valid(i).then(|| timestamps.value(i)),
                record_id: opt(records, i),
                contact_id: opt(contacts, i),
                received_at_ms: received.value(i),
                receiver_started_ms: started.value(i),
                part,
            });
        }
    }
    Ok(())
}

fn table_error(path: &Path, detail: String) -> EventsError {
    EventsError::Table {
        path: path.to_path_buf(),
        detail,
    }
}

fn text_column<'b>(
    batch: &'b RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'b StringArray, EventsError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| table_error(path, format!("no text column {name}")))
}

fn time_column<'b>(
    batch: &'b RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'b TimestampMillisecondArray, EventsError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
        .ok_or_else(|| table_error(path, format!("no timestamp column {name}")))
}

fn read_csv(
    path: &Path,
    part: u64,
    bytes: &[u8],
    f: &mut impl FnMut(EventRow),
) -> Result<(), EventsError> {
    let bad = |detail: String| table_error(path, detail);
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes);
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| bad(format!("no column {name}")))
    };
    let (id, kind, loc, ts, rec, con, recv, start) = (
        col("webhookId")?,
        col("type")?,
        col("locationId")?,
        col("timestamp")?,
        col("recordId")?,
        col("contactId")?,
        col("receivedAt")?,
        col("receiverStartedAt")?,
    );
    for row in reader.records() {
        let row = row.map_err(|e| bad(e.to_string()))?;
        let cell = |i: usize| row.get(i).filter(|s| !s.is_empty());
        let text = |i: usize| cell(i).map(str::to_owned);
        let time = |i: usize| cell(i).and_then(crate::timefmt::parse_iso_millis);
        let line = row.position().map_or(0, |p| p.line());
        f(EventRow {
            webhook_id: text(id).unwrap_or_default(),
            kind: text(kind).unwrap_or_default(),
            location_id: text(loc),
            timestamp_ms: time(ts),
            record_id: text(rec),
            contact_id: text(con),
            received_at_ms: time(recv).ok_or_else(|| bad(format!("line {line}: no receivedAt")))?,
            receiver_started_ms: time(start)
                .ok_or_else(|| bad(format!("line {line}: no receiverStartedAt")))?,
            part,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_of_each_kind_of_delivery() {
        let h = parse_head(br#"{"type":"ContactUpdate","locationId":"L","webhookId":"w","timestamp":"2026-11-30T23:59:59.123Z","id":"c1"}"#).unwrap();
        assert_eq!(
            (h.record_id.as_deref(), h.contact_id.as_deref()),
            (Some("c1"), Some("c1"))
        );
        assert_eq!(h.timestamp_ms, 1_796_083_199_123);
        let h = parse_head(br#"{"type":"NoteCreate","webhookId":"w","timestamp":1796083199123,"id":"n1","contactId":"c2"}"#).unwrap();
        assert_eq!(
            (
                h.record_id.as_deref(),
                h.contact_id.as_deref(),
                h.location_id
            ),
            (Some("n1"), Some("c2"), None)
        );
        let h = parse_head(br#"{"type":"AppointmentCreate","webhookId":"w","timestamp":"1796083199123","appointment":{"id":"a1","contactId":"c3"}}"#).unwrap();
        assert_eq!(
            (h.record_id.as_deref(), h.contact_id.as_deref()),
            (Some("a1"), Some("c3"))
        );
        let h = parse_head(br#"{"type":"SomethingNew","webhookId":"w","timestamp":1}"#).unwrap();
        assert_eq!((h.record_id, h.contact_id), (None, None));
    }

    #[test]
    fn bodies_without_the_three_fields_are_malformed() {
        for (body, want) in [
            (&b"\xff"[..], Malformed::NotUtf8),
            (b"{", Malformed::NotJson),
            (b"[1]", Malformed::NotAnObject),
            (
                br#"{"webhookId":"w","timestamp":1}"#,
                Malformed::Field("type"),
            ),
            (
                br#"{"type":"","webhookId":"w","timestamp":1}"#,
                Malformed::Field("type"),
            ),
            (
                br#"{"type":"X","webhookId":7,"timestamp":1}"#,
                Malformed::Field("webhookId"),
            ),
            (
                br#"{"type":"X","webhookId":"w"}"#,
                Malformed::Field("timestamp"),
            ),
            (
                br#"{"type":"X","webhookId":"w","timestamp":"yesterday"}"#,
                Malformed::Field("timestamp"),
            ),
            (
                br#"{"type":"X","webhookId":"w","timestamp":1.5}"#,
                Malformed::Field("timestamp"),
            ),
        ] {
            assert_eq!(
                parse_head(body),
                Err(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    fn rows_of(
        dest: &Dest,
        format: Option<Format>,
        after: Option<u64>,
    ) -> (Vec<EventRow>, Option<u64>) {
        let mut rows = Vec::new();
        let last = scan(dest, format, after, |r| rows.push(r)).unwrap();
        (rows, last)
    }

    #[test]
    fn scan_reads_both_formats_in_part_order_after_a_given_part() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Dest::local(dir.path());
        let record = |id: &str, body: &str| Record {
            received_at_ms: 2_000,
            started_ms: 1_000,
            timestamp_ms: 1_500,
            webhook_id: id.into(),
            raw: body.as_bytes().to_vec(),
        };
        let write = |seq: u64, format: Format, records: &[Record]| {
            let mut part = crate::sink::open_table_part(
                &dest,
                format,
                TABLE_DIR,
                TABLE_DIR,
                &part_name(seq, format),
                schema(),
            )
            .unwrap();
            part.write(&batch(records).unwrap()).unwrap();
            part.finish().unwrap();
        };
        let a = record(
            "a",
            r#"{"type":"ContactDelete","webhookId":"a","timestamp":1500,"id":"c1","locationId":"L"}"#,
        );
        let b = record(
            "b",
            r#"{"type":"NoteCreate","webhookId":"b","timestamp":1500,"id":"n","contactId":"c2"}"#,
        );
        write(3, Format::Csv, std::slice::from_ref(&b));
        write(2, Format::Parquet, std::slice::from_ref(&a));
        let (rows, last) = rows_of(&dest, None, None);
        assert_eq!(last, Some(3));
        assert_eq!(
            rows.iter()
                .map(|r| r.webhook_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            rows[0],
            EventRow {
                webhook_id: "a".into(),
                kind: "ContactDelete".into(),
                location_id: Some("L".into()),
                timestamp_ms: Some(1_500),
                record_id: Some("c1".into()),
                contact_id: Some("c1".into()),
                received_at_ms: 2_000,
                receiver_started_ms: 1_000,
                part: 2,
            }
        );
        assert_eq!(rows[1].contact_id.as_deref(), Some("c2"));
        assert_eq!(rows[1].location_id, None);
        let (rows, last) = rows_of(&dest, None, Some(2));
        assert_eq!((rows.len(), last), (1, Some(3)));
        let (rows, last) = rows_of(&dest, Some(Format::Parquet), Some(3));
        assert_eq!((rows.len(), last), (0, Some(3)));
        let (rows, last) = rows_of(&Dest::local(dir.path().join("none")), None, None);
        assert_eq!((rows.len(), last), (0, None));
    }
}
