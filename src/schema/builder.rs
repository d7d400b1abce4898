//! [`BatchBuilder`]: appends API objects, column by column, and hands out record batches.
//!
//! Each member of the object is appended straight into its column's builder as it is read;
//! a bit set records which columns got a value, and the others get a null (or their context
//! value) when the object ends. Keys arrive in any order, but each column receives exactly one
//! value per row, so the columns stay aligned without staging a row.

use std::sync::{Arc, OnceLock};

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Int64Builder, ListArray, ListBuilder, StringBuilder,
    StructArray, TimestampMillisecondBuilder,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use serde_json::value::RawValue;

use super::decode::{self, FieldScratch, Key, Shape, StrScratch};
use super::{Column, DecodeError, Entity, Kind, Role, RowContext};

/// The most JSON a batch takes in before it is handed on, whatever its row count. The
/// builders hold about that much until then, for each entity of each running export: rows
/// of 1,024 contacts held 2 MB per entity, most of a pipeline's memory with many locations
/// at once (BENCHMARKS.md, "Agency scale"). Batches of a few dozen rows cost the sinks
/// nothing measurable: Parquet gathers them into its row groups, CSV writes them through.
pub const BATCH_JSON_BYTES: usize = 128 * 1024;

/// Column builders for one entity.
pub struct BatchBuilder {
    entity: Entity,
    schema: SchemaRef,
    columns: &'static [Column],
    builders: Vec<ColumnBuilder>,
    lookup: &'static KeyIndex,
    rows: usize,
    /// JSON bytes of the rows appended since the last `finish`: about what the column
    /// builders hold.
    json_bytes: usize,
    /// `_extra` of the row being appended, `{` included once something went in.
    extra: String,
    strs: StrScratch,
    fields: FieldScratch,
}

enum ColumnBuilder {
    /// Str and Json columns.
    Utf8(StringBuilder),
    Bool(BooleanBuilder),
    Int(Int64Builder),
    Ts(TimestampMillisecondBuilder),
    StrList(ListBuilder<StringBuilder>),
    CustomFields(CustomFieldsBuilder),
}

/// What became of one member of the object.
#[derive(PartialEq, Eq)]
enum Put {
    /// Stored in its column.
    Filled,
    /// Stored in its column, and its raw value is also kept in `_extra` (the column dropped
    /// part of it).
    FilledKeepRaw,
    /// Nothing to store: a null, or a context column's value that agrees with the context.
    Skipped,
    /// Does not fit the column: goes to `_extra`.
    Misfit,
}

impl BatchBuilder {
    pub fn new(entity: Entity) -> Self {
        let columns = entity.columns();
        BatchBuilder {
            entity,
            schema: entity.schema(),
            columns,
            builders: columns.iter().map(|c| ColumnBuilder::new(c.kind)).collect(),
            lookup: KeyIndex::of(entity),
            rows: 0,
            json_bytes: 0,
            extra: String::new(),
            strs: StrScratch::default(),
            fields: FieldScratch::default(),
        }
    }

    pub fn entity(&self) -> Entity {
        self.entity
    }

    /// Appends one API object. Errors only when `raw` is not a JSON object (caller reports it).
    ///
    /// Values that do not fit their column, and keys that are not columns, are kept in
    /// `_extra` (see the [module docs](crate::schema)), so this never drops data.
    pub fn append(&mut self, raw: &RawValue, ctx: &RowContext<'_>) -> Result<(), DecodeError> {
        let text = raw.get().trim_start();
        if decode::shape(text) != Shape::Object {
            return Err(DecodeError::NotAnObject {
                entity: self.entity,
                found: super::truncate_for_message(text, 80),
            });
        }
        self.json_bytes += text.len();
        self.extra.clear();
        let mut filled: u64 = 0;
        let walked =
            decode::for_each_member(text, |key, value| self.member(&mut filled, key, value, ctx));
        if walked.is_err() {
            // Unreachable for a RawValue, which serde_json has validated; but some columns may
            // already hold this row's value, so complete the row rather than leave columns of
            // different lengths, and keep the whole object so nothing is lost.
            self.extra.clear();
            self.extra.push_str(text);
        } else if !self.extra.is_empty() {
            self.extra.push('}');
        }
        self.end_row(filled, ctx);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Whether the rows appended since the last [`finish`](Self::finish) make a batch: `rows`
    /// of them, or [`BATCH_JSON_BYTES`] of JSON, whichever comes first.
    pub fn is_full(&self, rows: usize) -> bool {
        self.rows >= rows.max(1) || self.json_bytes >= BATCH_JSON_BYTES
    }

    /// Takes the rows appended so far as a batch and resets the builder.
    pub fn finish(&mut self) -> RecordBatch {
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(ColumnBuilder::finish)
            .collect();
        self.rows = 0;
        self.json_bytes = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
            .expect("column builders are made from the same column list as the schema, one value per row each")
    }

    fn member<'de>(
        &mut self,
        filled: &mut u64,
        key: Key<'de>,
        value: &'de RawValue,
        ctx: &RowContext<'_>,
    ) {
        let put = match self.lookup.get(&key.0) {
            // A repeated key: the first value stays in the column.
            Some(col) if *filled & (1 << col) != 0 => Put::Misfit,
            Some(col) => {
                let put = self.put(col, value.get(), ctx);
                if matches!(put, Put::Filled | Put::FilledKeepRaw) {
                    *filled |= 1 << col;
                }
                put
            }
            // Where a search page continues after this contact: listing metadata, not a
            // field of the contact (a GET listing does not send it).
            None if self.entity == Entity::Contacts && key.0 == super::SEARCH_CURSOR_KEY => {
                Put::Skipped
            }
            None => Put::Misfit,
        };
        if matches!(put, Put::Misfit | Put::FilledKeepRaw) {
            self.extra
                .push(if self.extra.is_empty() { '{' } else { ',' });
            key.write_json(&mut self.extra);
            self.extra.push(':');
            self.extra.push_str(value.get());
        }
    }

    /// Stores `raw` in column `col` if it fits.
    fn put(&mut self, col: usize, raw: &str, ctx: &RowContext<'_>) -> Put {
        let shape = decode::shape(raw);
        let column = &self.columns[col];
        match column.role {
            Role::Field | Role::LocationOrContext => {}
            Role::ContextLocation => return agrees_with(raw, shape, Some(ctx.location_id)),
            Role::ContextContact if ctx.contact_id.is_some() => {
                return agrees_with(raw, shape, ctx.contact_id)
            }
            Role::ContextContact => {}
            // `_extra` is not in the lookup table.
            Role::Extra => return Put::Misfit,
        }
        if shape == Shape::Null {
            return Put::Skipped;
        }
        match (&mut self.builders[col], column.kind) {
            (ColumnBuilder::Utf8(b), Kind::Json) => b.append_value(raw),
            (ColumnBuilder::Utf8(b), _) => match shape {
                Shape::String => match decode::decode_str(raw) {
                    Some(s) => b.append_value(s),
                    None => return Put::Misfit,
                },
                // A number or bool in a text column: its JSON text (postalCode 12345 -> "12345").
                Shape::Number | Shape::Bool(_) => b.append_value(raw),
                _ => return Put::Misfit,
            },
            (ColumnBuilder::Bool(b), _) => match shape {
                Shape::Bool(v) => b.append_value(v),
                _ => return Put::Misfit,
            },
            (ColumnBuilder::Int(b), _) => match (shape, raw.parse::<i64>()) {
                (Shape::Number, Ok(v)) => b.append_value(v),
                _ => return Put::Misfit,
            },
            (ColumnBuilder::Ts(b), _) => {
                let ms = match shape {
                    Shape::String => {
                        decode::decode_str(raw).and_then(|s| crate::timefmt::parse_iso_millis(&s))
                    }
                    Shape::Number => raw.parse::<i64>().ok(),
                    _ => None,
                };
                match ms {
                    Some(ms) => b.append_value(ms),
                    None => return Put::Misfit,
                }
            }
            (ColumnBuilder::StrList(b), _) => {
                if shape != Shape::Array || decode::str_list(raw, &mut self.strs).is_err() {
                    return Put::Misfit;
                }
                let values = b.values();
                for s in self.strs.iter() {
                    values.append_value(s);
                }
                b.append(true);
            }
            (ColumnBuilder::CustomFields(b), _) => {
                let complete = match shape {
                    Shape::Array => match decode::custom_fields(raw, &mut self.fields) {
                        Ok(complete) => complete,
                        Err(_) => return Put::Misfit,
                    },
                    _ => return Put::Misfit,
                };
                b.append(&self.fields);
                return if complete {
                    Put::Filled
                } else {
                    Put::FilledKeepRaw
                };
            }
        }
        Put::Filled
    }

    /// Completes the row: context values, nulls for the columns the object did not fill, and
    /// `_extra`.
    fn end_row(&mut self, filled: u64, ctx: &RowContext<'_>) {
        for (i, (column, builder)) in self.columns.iter().zip(&mut self.builders).enumerate() {
            if filled & (1 << i) != 0 {
                continue;
            }
            let value = match column.role {
                Role::Field => None,
                Role::LocationOrContext | Role::ContextLocation => Some(ctx.location_id),
                Role::ContextContact => ctx.contact_id,
                Role::Extra => (!self.extra.is_empty()).then_some(self.extra.as_str()),
            };
            match (builder, value) {
                (ColumnBuilder::Utf8(b), Some(v)) => b.append_value(v),
                (b, _) => b.append_null(),
            }
        }
        self.rows += 1;
    }
}

/// Whether an object's value for a context column can be dropped: a null, or the context
/// value itself. Anything else is kept in `_extra`.
fn agrees_with(raw: &str, shape: Shape, expected: Option<&str>) -> Put {
    match shape {
        Shape::Null => Put::Skipped,
        Shape::String if decode::decode_str(raw).as_deref() == expected => Put::Skipped,
        _ => Put::Misfit,
    }
}

/// Column names to indices, for one entity: an open-addressing hash table.
///
/// Finding the column of each key is the inner loop of `append` (about 40 keys a contact);
/// a binary search over names spent most of its time in `memcmp`. This hashes a few bytes
/// and the length, then confirms with one comparison.
pub(crate) struct KeyIndex {
    slots: [u8; KeyIndex::SLOTS],
    columns: &'static [Column],
}

impl KeyIndex {
    const SLOTS: usize = 256;
    const EMPTY: u8 = u8::MAX;

    /// The index of the entity, built once.
    fn of(entity: Entity) -> &'static KeyIndex {
        static INDEXES: [OnceLock<KeyIndex>; Entity::COUNT] =
            [const { OnceLock::new() }; Entity::COUNT];
        INDEXES[entity as usize].get_or_init(|| {
            let columns = entity.columns();
            // The filled-columns set is a u64, and slots hold a u8 below EMPTY.
            assert!(columns.len() <= 64, "{entity}: at most 64 columns");
            let mut slots = [Self::EMPTY; Self::SLOTS];
            for (i, c) in columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.role != Role::Extra)
            {
                let mut h = Self::hash(c.name);
                while slots[h] != Self::EMPTY {
                    h = (h + 1) % Self::SLOTS;
                }
                slots[h] = i as u8;
            }
            KeyIndex { slots, columns }
        })
    }

    fn hash(key: &str) -> usize {
        let b = key.as_bytes();
        let n = b.len();
        let at = |i: usize| u64::from(b.get(i).copied().unwrap_or(0));
        let tail = |k: usize| {
            u64::from(
                n.checked_sub(k)
                    .and_then(|i| b.get(i))
                    .copied()
                    .unwrap_or(0),
            )
        };
        let x = (n as u64)
            | at(0) << 8
            | at(1) << 16
            | at(4) << 24
            | tail(1) << 32
            | tail(2) << 40
            | tail(5) << 48;
        (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize
    }

    /// The column named `key`, `_extra` excepted.
    fn get(&self, key: &str) -> Option<usize> {
        let mut h = Self::hash(key);
        loop {
            let slot = self.slots[h];
            if slot == Self::EMPTY {
                return None;
            }
            let col = usize::from(slot);
            if self.columns[col].name == key {
                return Some(col);
            }
            h = (h + 1) % Self::SLOTS;
        }
    }
}

impl ColumnBuilder {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Str | Kind::Json => ColumnBuilder::Utf8(StringBuilder::new()),
            Kind::Bool => ColumnBuilder::Bool(BooleanBuilder::new()),
            Kind::Int => ColumnBuilder::Int(Int64Builder::new()),
            Kind::Ts => ColumnBuilder::Ts(TimestampMillisecondBuilder::new().with_timezone("UTC")),
            Kind::StrList => ColumnBuilder::StrList(
                ListBuilder::new(StringBuilder::new()).with_field(super::str_item_field()),
            ),
            Kind::CustomFields => ColumnBuilder::CustomFields(CustomFieldsBuilder::default()),
        }
    }

    fn append_null(&mut self) {
        match self {
            ColumnBuilder::Utf8(b) => b.append_null(),
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::Int(b) => b.append_null(),
            ColumnBuilder::Ts(b) => b.append_null(),
            ColumnBuilder::StrList(b) => b.append_null(),
            ColumnBuilder::CustomFields(b) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Utf8(b) => Arc::new(b.finish()),
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Int(b) => Arc::new(b.finish()),
            ColumnBuilder::Ts(b) => Arc::new(b.finish()),
            ColumnBuilder::StrList(b) => Arc::new(b.finish()),
            ColumnBuilder::CustomFields(b) => Arc::new(b.finish()),
        }
    }
}

/// `List<Struct{id, value}>`, assembled from its parts: cheaper and simpler than the dynamic
/// `StructBuilder`.
struct CustomFieldsBuilder {
    offsets: Vec<i32>,
    valid: Vec<bool>,
    ids: StringBuilder,
    values: StringBuilder,
}

impl Default for CustomFieldsBuilder {
    fn default() -> Self {
        CustomFieldsBuilder {
            offsets: vec![0],
            valid: Vec::new(),
            ids: StringBuilder::new(),
            values: StringBuilder::new(),
        }
    }
}

impl CustomFieldsBuilder {
    fn append(&mut self, fields: &FieldScratch) {
        for (id, value) in fields.iter() {
            self.ids.append_value(id);
            self.values.append_option(value);
        }
        self.offsets.push(offset(self.ids.len()));
        self.valid.push(true);
    }

    fn append_null(&mut self) {
        self.offsets.push(offset(self.ids.len()));
        self.valid.push(false);
    }

    fn finish(&mut self) -> ListArray {
        let ids: ArrayRef = Arc::new(self.ids.finish());
        let values: ArrayRef = Arc::new(self.values.finish());
        let items = StructArray::new(super::custom_field_fields(), vec![ids, values], None);
        let offsets = OffsetBuffer::new(std::mem::replace(&mut self.offsets, vec![0]).into());
        let valid = std::mem::take(&mut self.valid);
        let nulls = valid.iter().any(|v| !v).then(|| NullBuffer::from(valid));
        ListArray::new(
            super::custom_field_item_field(),
            offsets,
            Arc::new(items),
            nulls,
        )
    }
}

fn offset(len: usize) -> i32 {
    // A batch is a few thousand rows; 2^31 custom fields in one batch is not a real input.
    i32::try_from(len).expect("fewer than 2^31 custom fields per batch")
}
