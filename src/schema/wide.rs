//! Wide custom field columns (`--custom-fields wide`): the contacts table gets one column per
//! custom field definition of the location, after its declared columns (`_extra` included),
//! so that the declared columns stay a prefix of the wide schema. The `customFields` column
//! itself is unchanged: the wide columns are a view of it, never the only copy of a value.
//!
//! # Names
//! A column is named by the field's key: its `fieldKey` without the `contact.` prefix (the
//! whole `fieldKey` if it has another prefix, the field id if it has none). Names are made
//! safe and unique, in this order:
//! - every character other than an ASCII letter, digit or `_` becomes `_`; a name starting
//!   with a digit gets a leading `_`; names are cut to 64 characters;
//! - the definitions are taken in order of that name, then id; a name already taken, ignoring
//!   case (by a declared contacts column such as `email`, or an earlier custom field), gets
//!   `_2`, `_3`, … (the first free one). Case is ignored because DuckDB, Spark and most SQL
//!   engines do.
//!
//! # Types
//! A field whose `dataType` is a number (`NUMERICAL`, `FLOAT`, `MONETORY`/`MONETARY`,
//! `NUMBER`) is a `Float64` column; every other field is text (`Utf8`). A text cell holds a
//! string value decoded, and any other value (number, bool, list, object) as its JSON text. A
//! number cell holds a JSON number, or a string holding one (`"12.5"`), when a double holds it
//! exactly (at most 15 significant digits); any other value (`"n/a"`, `{"amount": 3}`, a
//! 20-digit id) leaves the cell null, is logged once per field, and stays as received in
//! `customFields`. A contact without a value for a field has a null cell; when a contact
//! lists one id twice, its first value is used.
//!
//! # Metadata
//! The schema's metadata key [`WIDE_COLUMNS_KEY`] holds a JSON object mapping each wide
//! column name to the field: `{"<column>": {"id": …, "fieldKey": …, "dataType": …}}`.
//! Parquet files carry it in their key-value metadata (and in the embedded Arrow schema).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, AsArray, Float64Builder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use super::decode::{self, Shape};
use super::Entity;

/// Schema metadata key of the wide columns' mapping (see the module docs).
pub const WIDE_COLUMNS_KEY: &str = "contacts_etl.custom_fields";

/// The `dataType`s whose columns are `Float64`.
const NUMBER_TYPES: &[&str] = &["NUMERICAL", "FLOAT", "MONETORY", "MONETARY", "NUMBER"];

/// Longest column name, before a uniqueness suffix.
const MAX_NAME: usize = 64;

/// One wide column: the custom field it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WideColumn {
    pub name: String,
    pub id: String,
    pub field_key: Option<String>,
    pub data_type: Option<String>,
    /// `Float64` (else `Utf8`).
    pub number: bool,
}

/// The wide columns of one run, and the contacts schema they make.
#[derive(Debug)]
pub struct WideColumns {
    columns: Vec<WideColumn>,
    by_id: HashMap<String, usize>,
    schema: SchemaRef,
    /// Per column: a value that did not fit has been logged.
    warned: Vec<AtomicBool>,
}

impl WideColumns {
    /// The columns of these definitions (objects as `GET /locations/:id/customFields` returns
    /// them). A definition without a string `id`, or with an id seen before, makes no column
    /// (contacts refer to fields by id only).
    pub fn new(definitions: &[Value]) -> WideColumns {
        let mut seen = HashSet::new();
        let mut defs: Vec<(String, WideColumn)> = definitions
            .iter()
            .filter_map(|d| {
                let id = d.get("id")?.as_str()?.to_owned();
                if id.is_empty() || !seen.insert(id.clone()) {
                    return None;
                }
                let text = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
                let field_key = text("fieldKey");
                let data_type = text("dataType");
                let number = data_type.as_deref().is_some_and(|t| {
                    NUMBER_TYPES
                        .iter()
                        .any(|n| n.eq_ignore_ascii_case(t.trim()))
                });
                let base = safe_name(field_key.as_deref(), &id);
                Some((
                    base,
                    WideColumn {
                        name: String::new(),
                        id,
                        field_key,
                        data_type,
                        number,
                    },
                ))
            })
            .collect();
        defs.sort_by(|a, b| (&a.0, &a.1.id).cmp(&(&b.0, &b.1.id)));
        let mut taken: HashSet<String> = Entity::Contacts
            .columns()
            .iter()
            .map(|c| c.name.to_ascii_lowercase())
            .collect();
        let columns: Vec<WideColumn> = defs
            .into_iter()
            .map(|(base, mut col)| {
                let mut name = base.clone();
                let mut n = 2;
                while !taken.insert(name.to_ascii_lowercase()) {
                    name = format!("{base}_{n}");
                    n += 1;
                }
                col.name = name;
                col
            })
            .collect();
        let by_id = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        let schema = wide_schema(&columns);
        WideColumns {
            warned: columns.iter().map(|_| AtomicBool::new(false)).collect(),
            columns,
            by_id,
            schema,
        }
    }

    pub fn columns(&self) -> &[WideColumn] {
        &self.columns
    }

    /// The contacts schema with the wide columns.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// `batch` (a contacts batch of the declared schema) with the wide columns appended.
    pub fn widen(&self, batch: &RecordBatch) -> RecordBatch {
        let rows = batch.num_rows();
        let mut builders: Vec<Cells> = self
            .columns
            .iter()
            .map(|c| {
                if c.number {
                    Cells::Number(Float64Builder::with_capacity(rows))
                } else {
                    Cells::Text(StringBuilder::with_capacity(rows, rows * 8))
                }
            })
            .collect();
        let list = batch.column(custom_fields_index()).as_list::<i32>();
        let items = list.values().as_struct();
        let ids = items.column(0).as_string::<i32>();
        let values = items.column(1).as_string::<i32>();
        let offsets = list.value_offsets();
        // This row's value (JSON text) per wide column.
        let mut row: Vec<Option<&str>> = vec![None; self.columns.len()];
        for r in 0..rows {
            row.iter_mut().for_each(|v| *v = None);
            if list.is_valid(r) {
                let (start, end) = (offsets[r] as usize, offsets[r + 1] as usize);
                for i in start..end {
                    if !ids.is_valid(i) || !values.is_valid(i) {
                        continue;
                    }
                    if let Some(&c) = self.by_id.get(ids.value(i)) {
                        row[c].get_or_insert(values.value(i));
                    }
                }
            }
            for (c, (b, v)) in builders.iter_mut().zip(&row).enumerate() {
                match b {
                    Cells::Text(b) => b.append_option(v.and_then(text_cell).as_deref()),
                    Cells::Number(b) => {
                        let n = v.and_then(|v| {
                            let n = number_cell(v);
                            if n.is_none() && decode::shape(v.trim()) != Shape::Null {
                                self.misfit(c, v);
                            }
                            n
                        });
                        b.append_option(n)
                    }
                }
            }
        }
        let mut arrays: Vec<ArrayRef> = batch.columns().to_vec();
        arrays.extend(builders.into_iter().map(Cells::finish));
        RecordBatch::try_new(self.schema.clone(), arrays)
            .expect("the wide schema is the contacts schema plus one column per builder")
    }

    /// Logs, once per field and run, a value a number column cannot hold.
    fn misfit(&self, c: usize, value: &str) {
        if self.warned[c].swap(true, Relaxed) {
            return;
        }
        let col = &self.columns[c];
        tracing::warn!(
            column = %col.name,
            field_id = %col.id,
            data_type = col.data_type.as_deref().unwrap_or(""),
            value = %crate::term::escape(&super::truncate_for_message(value, 80)),
            "a custom field value is not a number a double holds exactly: its wide column is null there (the value stays in customFields); further such values of this field are not logged"
        );
    }
}

enum Cells {
    Text(StringBuilder),
    Number(Float64Builder),
}

impl Cells {
    fn finish(self) -> ArrayRef {
        match self {
            Cells::Text(mut b) => Arc::new(b.finish()),
            Cells::Number(mut b) => Arc::new(b.finish()),
        }
    }
}

/// The index of `customFields` in the declared contacts schema.
fn custom_fields_index() -> usize {
    static INDEX: OnceLock<usize> = OnceLock::new();
    *INDEX.get_or_init(|| {
        Entity::Contacts
            .columns()
            .iter()
            .position(|c| c.name == "customFields")
            .expect("contacts declare customFields")
    })
}

fn wide_schema(columns: &[WideColumn]) -> SchemaRef {
    let base = Entity::Contacts.schema();
    let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(columns.iter().map(|c| {
        let t = if c.number {
            DataType::Float64
        } else {
            DataType::Utf8
        };
        Field::new(&c.name, t, true)
    }));
    let mapping: serde_json::Map<String, Value> = columns
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                serde_json::json!({"id": c.id, "fieldKey": c.field_key, "dataType": c.data_type}),
            )
        })
        .collect();
    let mut metadata = base.metadata().clone();
    metadata.insert(
        WIDE_COLUMNS_KEY.to_owned(),
        Value::Object(mapping).to_string(),
    );
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// The column name of a field (before uniqueness): see the module docs.
fn safe_name(field_key: Option<&str>, id: &str) -> String {
    let key = field_key
        .map(|k| k.strip_prefix("contact.").unwrap_or(k))
        .filter(|k| !k.is_empty())
        .unwrap_or(id);
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME)
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
        name.truncate(MAX_NAME);
    }
    name
}

/// A text cell: a string decoded, anything else as its JSON text; null for a JSON null.
fn text_cell(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let raw = raw.trim();
    match decode::shape(raw) {
        Shape::Null => None,
        Shape::String => decode::decode_str(raw).or(Some(raw.into())),
        _ => Some(raw.into()),
    }
}

/// A number cell: a JSON number, or a string holding one, that a double holds exactly.
fn number_cell(raw: &str) -> Option<f64> {
    let raw = raw.trim();
    let text = match decode::shape(raw) {
        Shape::Number => std::borrow::Cow::Borrowed(raw),
        Shape::String => decode::decode_str(raw)?,
        _ => return None,
    };
    exact_double(text.trim())
}

/// `text` as a double, when it is a JSON number of at most 15 significant digits (so that the
/// double reads back as the same decimal) and finite.
fn exact_double(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let mut digits = String::new();
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        digits.push(b[i] as char);
        i += 1;
    }
    let int_len = i - int_start;
    if int_len == 0 || (int_len > 1 && b[int_start] == b'0') {
        return None;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let frac_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            digits.push(b[i] as char);
            i += 1;
        }
        if i == frac_start {
            return None;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    if significant > 15 {
        return None;
    }
    text.parse::<f64>().ok().filter(|f| f.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{BatchBuilder, RowContext};
    use arrow::array::{Float64Array, StringArray};

    fn defs() -> Vec<Value> {
        serde_json::from_str(
            r#"[
            {"id":"f1","name":"Colour","fieldKey":"contact.favourite_color","dataType":"TEXT"},
            {"id":"f2","name":"Employees","fieldKey":"contact.employees","dataType":"NUMERICAL"},
            {"id":"f3","name":"E-mail","fieldKey":"contact.email","dataType":"TEXT"},
            {"id":"f4","name":"Email 2","fieldKey":"contact.Email","dataType":"TEXT"},
            {"id":"f5","name":"Odd","fieldKey":"contact.2nd name/ü","dataType":"TEXT"},
            {"id":"f6","name":"No key","dataType":"FLOAT"},
            {"name":"no id","fieldKey":"contact.x"},
            {"id":"f1","fieldKey":"contact.again"}
        ]"#,
        )
        .unwrap()
    }

    #[test]
    fn wide_column_names_are_the_keys_made_safe_and_unique_ignoring_case() {
        let w = WideColumns::new(&defs());
        let names: Vec<(&str, &str, bool)> = w
            .columns()
            .iter()
            .map(|c| (c.name.as_str(), c.id.as_str(), c.number))
            .collect();
        assert_eq!(
            names,
            [
                // "email" is a declared column: taken, ignoring case, in this order.
                ("Email_2", "f4", false),
                ("_2nd_name__", "f5", false),
                ("email_3", "f3", false),
                ("employees", "f2", true),
                ("f6", "f6", true),
                ("favourite_color", "f1", false),
            ]
        );
        let schema = w.schema();
        let base = Entity::Contacts.schema();
        assert_eq!(schema.fields().len(), base.fields().len() + 6);
        assert_eq!(&schema.fields()[..base.fields().len()], &base.fields()[..]);
        let meta: Value = serde_json::from_str(&schema.metadata()[WIDE_COLUMNS_KEY]).unwrap();
        assert_eq!(meta["employees"]["id"], "f2");
        assert_eq!(meta["employees"]["fieldKey"], "contact.employees");
        assert_eq!(meta["f6"]["fieldKey"], Value::Null);
    }

    #[test]
    fn wide_cells_hold_each_contacts_value_typed_and_misfits_are_null() {
        let w = WideColumns::new(&defs());
        let mut b = BatchBuilder::new(Entity::Contacts);
        let ctx = RowContext {
            location_id: "L",
            contact_id: None,
        };
        for raw in [
            r#"{"id":"c1","customFields":[{"id":"f1","value":"blue, \"dark\""},{"id":"f2","value":12},{"id":"f6","value":"12.5"}]}"#,
            r#"{"id":"c2","customFields":[{"id":"f2","value":"n/a"},{"id":"f1","value":["a","b"]},{"id":"f1","value":"second"},{"id":"zz","value":1}]}"#,
            r#"{"id":"c3"}"#,
            r#"{"id":"c4","customFields":[{"id":"f2","value":12345678901234567890},{"id":"f6","value":-0.25e2},{"id":"f1","value":null}]}"#,
        ] {
            let raw = serde_json::value::RawValue::from_string(raw.into()).unwrap();
            b.append(&raw, &ctx).unwrap();
        }
        let batch = w.widen(&b.finish());
        assert_eq!(batch.schema(), w.schema());
        let text = |name: &str| -> Vec<Option<String>> {
            let a: &StringArray = batch.column_by_name(name).unwrap().as_string::<i32>();
            a.iter().map(|v| v.map(str::to_owned)).collect()
        };
        let num = |name: &str| -> Vec<Option<f64>> {
            let a: &Float64Array = batch
                .column_by_name(name)
                .unwrap()
                .as_primitive::<arrow::datatypes::Float64Type>();
            a.iter().collect()
        };
        assert_eq!(
            text("favourite_color"),
            [
                Some(r#"blue, "dark""#.to_owned()),
                Some(r#"["a","b"]"#.to_owned()),
                None,
                None
            ]
        );
        assert_eq!(num("employees"), [Some(12.0), None, None, None]);
        assert_eq!(num("f6"), [Some(12.5), None, None, Some(-25.0)]);
    }

    #[test]
    fn a_double_holds_a_number_only_when_it_keeps_every_digit() {
        assert_eq!(exact_double("5000"), Some(5000.0));
        assert_eq!(exact_double("-0.5"), Some(-0.5));
        assert_eq!(exact_double("1e21"), Some(1e21));
        assert_eq!(exact_double("123456789012345"), Some(123456789012345.0));
        assert_eq!(exact_double("1234567890123456"), None);
        assert_eq!(exact_double("0.1000000000000000000"), Some(0.1));
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "1,5", " 1", "NaN", "inf", "1e999",
        ] {
            assert_eq!(exact_double(bad), None, "{bad}");
        }
    }
}
