//! The Arrow schema of each exported entity, and the JSON-to-Arrow row decoder.
//!
//! This is the one truth both sinks share: the Parquet and CSV writers take the same
//! [`RecordBatch`](arrow::record_batch::RecordBatch) built here, so a column means the same
//! thing in both formats.
//!
//! # Columns
//! Columns carry the API's own field names, in a fixed declared order (the schema is never
//! inferred from data, so every part file of an entity has the same schema). Every column is
//! nullable. Column kinds:
//!
//! | kind | Arrow type | accepted JSON |
//! |---|---|---|
//! | Str | `Utf8` | a string (decoded); a number or bool (its JSON text, e.g. `12345`) |
//! | Bool | `Boolean` | `true` / `false` |
//! | Int | `Int64` | an integer |
//! | Ts | `Timestamp(Millisecond, "UTC")` | an ISO 8601 string, or integer epoch milliseconds |
//! | StrList | `List<Utf8>` | an array of strings |
//! | CustomFields | `List<Struct{id: Utf8, value: Utf8}>` | an array of `{id, value}` objects; `value` holds the JSON text of the API value as received (`"abc"` with its quotes, `12.5`, `["a"]`, `null`); a missing `value` is a null |
//! | Json | `Utf8` | any value, as its JSON text as received |
//!
//! `null` or an absent key gives a null cell.
//!
//! # Nothing is lost: `_extra`
//! The last column of every entity, `_extra`, is a JSON object holding, in input order and as
//! received, every key that is not a column, every key whose value does not fit its column
//! (`"dnd": "yes"`, an unparseable date, a `tags` array holding a number, ...), and repeated
//! keys after the first. It is null when there is nothing extra. A `customFields` array whose
//! elements carry keys other than `id` and `value` is decoded (ids and values) *and* kept whole
//! in `_extra`.
//!
//! One key is dropped: `searchAfter` on a contact, which `POST /contacts/search` adds to
//! each contact of a page to say where the next page starts. It is where the listing was,
//! not data of the contact, and a contact listed through `GET /contacts/` has none: kept, it
//! would make the two listings' exports differ.
//!
//! # Values set from context
//! The child entities' `contactId` and `locationId` come from the export (the parent contact
//! and the location being exported), not from the object: child endpoints do not always echo
//! them. An object value that disagrees with the context goes to `_extra`. A contact's
//! `locationId` is taken from the object when it holds a string, else from the context.

mod builder;
mod decode;
mod wide;

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

pub use builder::BatchBuilder;
pub(crate) use decode::push_json_string;
pub use wide::{WideColumn, WideColumns, WIDE_COLUMNS_KEY};

/// Version of the column layout below. Bump it when a column is added, removed, renamed or
/// retyped, so readers of old exports (and the manifest) can tell layouts apart.
pub const SCHEMA_VERSION: u32 = 1;

/// The key `POST /contacts/search` adds to each contact (its cursor); not exported.
pub(crate) const SEARCH_CURSOR_KEY: &str = "searchAfter";

/// Schema metadata key holding [`SCHEMA_VERSION`]; embedded in Parquet files with the schema.
pub(crate) const SCHEMA_VERSION_KEY: &str = "contacts_etl.schema_version";

/// An exported entity: one table, one directory of part files.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    Contacts,
    Tasks,
    Notes,
    Appointments,
    /// Contacts an incremental run no longer found: `id`, last known `dateUpdated`, `locationId`.
    DeletedContacts,
    /// The location's contact custom field definitions (`GET /locations/:id/customFields`),
    /// written once per run: what the ids in the contacts' `customFields` stand for.
    CustomFields,
}

impl Entity {
    pub const ALL: [Entity; 4] = [
        Entity::Contacts,
        Entity::Tasks,
        Entity::Notes,
        Entity::Appointments,
    ];

    /// Number of variants (sizes per-entity tables indexed by `self as usize`).
    pub(crate) const COUNT: usize = 6;

    /// The table name, also the directory name under the output root.
    pub fn name(self) -> &'static str {
        match self {
            Entity::Contacts => "contacts",
            Entity::Tasks => "tasks",
            Entity::Notes => "notes",
            Entity::Appointments => "appointments",
            Entity::DeletedContacts => "deleted_contacts",
            Entity::CustomFields => "custom_fields",
        }
    }

    /// The declared Arrow schema (built once, then shared).
    pub fn schema(self) -> SchemaRef {
        static SCHEMAS: [OnceLock<SchemaRef>; Entity::COUNT] =
            [const { OnceLock::new() }; Entity::COUNT];
        SCHEMAS[self as usize]
            .get_or_init(|| build_schema(self))
            .clone()
    }

    pub(crate) fn columns(self) -> &'static [Column] {
        match self {
            Entity::Contacts => CONTACTS,
            Entity::Tasks => TASKS,
            Entity::Notes => NOTES,
            Entity::Appointments => APPOINTMENTS,
            Entity::DeletedContacts => DELETED_CONTACTS,
            Entity::CustomFields => CUSTOM_FIELDS,
        }
    }
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Context a row is appended with.
pub struct RowContext<'a> {
    /// The location being exported: the child entities' `locationId`, and a contact's when the
    /// object has none.
    pub location_id: &'a str,
    /// The parent contact of a task, note or appointment (`None` for contacts). When `None`
    /// for a child, the object's own `contactId` is kept.
    pub contact_id: Option<&'a str>,
}

/// An API object that could not be appended.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The value is valid JSON but not an object (the caller reports and skips it).
    #[error("{entity}: expected a JSON object, got {found}")]
    NotAnObject { entity: Entity, found: String },
}

/// How a column decodes and stores its values.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Str,
    Bool,
    /// `custom_fields`' `position` and `maxFileLimit`.
    Int,
    Ts,
    StrList,
    CustomFields,
    Json,
}

/// Where a column's value comes from, beyond decoding the object's key of the same name.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Decoded from the object.
    Field,
    /// A contact's `locationId`: from the object, else the context.
    LocationOrContext,
    /// A child's `locationId`: always the context.
    ContextLocation,
    /// A child's `contactId`: the context's contact when given, else the object.
    ContextContact,
    /// `_extra`: never a key of the object (an input key `_extra` is itself extra).
    Extra,
}

#[derive(Copy, Clone, Debug)]
pub(crate) struct Column {
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    pub(crate) role: Role,
}

const fn col(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        role: Role::Field,
    }
}

const fn ctx(name: &'static str, role: Role) -> Column {
    Column {
        name,
        kind: Kind::Str,
        role,
    }
}

const EXTRA: Column = Column {
    name: "_extra",
    kind: Kind::Json,
    role: Role::Extra,
};

use Kind::{Bool, CustomFields, Int, Json, Str, StrList, Ts};

const CONTACTS: &[Column] = &[
    col("id", Str),
    ctx("locationId", Role::LocationOrContext),
    col("contactName", Str),
    col("name", Str),
    col("firstName", Str),
    col("lastName", Str),
    col("firstNameLowerCase", Str),
    col("lastNameLowerCase", Str),
    col("fullNameLowerCase", Str),
    col("companyName", Str),
    col("email", Str),
    col("emailLowerCase", Str),
    col("phone", Str),
    col("dnd", Bool),
    col("dndSettings", Json),
    col("inboundDndSettings", Json),
    col("type", Str),
    col("source", Str),
    col("assignedTo", Str),
    col("address1", Str),
    col("city", Str),
    col("state", Str),
    col("country", Str),
    col("postalCode", Str),
    col("website", Str),
    col("timezone", Str),
    col("gender", Str),
    col("tags", StrList),
    // Text, not a date: the API sends `YYYY-MM-DD`, ISO timestamps or epoch ms.
    col("dateOfBirth", Str),
    col("dateAdded", Ts),
    col("dateUpdated", Ts),
    col("lastActivity", Ts),
    col("customFields", CustomFields),
    col("businessId", Str),
    col("attributions", Json),
    col("attributionSource", Json),
    col("lastAttributionSource", Json),
    col("followers", StrList),
    col("additionalEmails", Json),
    col("additionalPhones", Json),
    col("visitorId", Str),
    EXTRA,
];

const DELETED_CONTACTS: &[Column] = &[
    col("id", Str),
    col("dateUpdated", Ts),
    ctx("locationId", Role::ContextLocation),
];

/// The API's `CustomFieldSchema`: the fields it declares, in its order; anything else in `_extra`.
const CUSTOM_FIELDS: &[Column] = &[
    col("id", Str),
    col("name", Str),
    col("fieldKey", Str),
    col("dataType", Str),
    col("placeholder", Str),
    col("position", Int),
    col("picklistOptions", StrList),
    col("picklistImageOptions", StrList),
    col("isAllowedCustomOption", Bool),
    col("isMultiFileAllowed", Bool),
    col("maxFileLimit", Int),
    ctx("locationId", Role::LocationOrContext),
    col("model", Str),
    EXTRA,
];

const TASKS: &[Column] = &[
    col("id", Str),
    col("title", Str),
    col("body", Str),
    col("assignedTo", Str),
    col("dueDate", Ts),
    col("completed", Bool),
    col("dateAdded", Ts),
    col("dateUpdated", Ts),
    ctx("contactId", Role::ContextContact),
    ctx("locationId", Role::ContextLocation),
    EXTRA,
];

const NOTES: &[Column] = &[
    col("id", Str),
    col("body", Str),
    col("userId", Str),
    col("dateAdded", Ts),
    col("title", Str),
    col("color", Str),
    col("pinned", Bool),
    ctx("contactId", Role::ContextContact),
    ctx("locationId", Role::ContextLocation),
    EXTRA,
];

const APPOINTMENTS: &[Column] = &[
    col("id", Str),
    col("calendarId", Str),
    col("status", Str),
    col("title", Str),
    col("assignedUserId", Str),
    col("notes", Str),
    col("address", Str),
    col("startTime", Ts),
    col("endTime", Ts),
    col("appointmentStatus", Str),
    col("groupId", Str),
    col("users", StrList),
    col("assignedResources", StrList),
    col("dateAdded", Ts),
    col("dateUpdated", Ts),
    ctx("contactId", Role::ContextContact),
    ctx("locationId", Role::ContextLocation),
    EXTRA,
];

/// The element field of `List<Utf8>` columns.
pub(crate) fn str_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Utf8, true))
}

/// The fields of a custom field struct: `id`, and `value` as JSON text.
pub(crate) fn custom_field_fields() -> Fields {
    Fields::from(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("value", DataType::Utf8, true),
    ])
}

/// The element field of the `customFields` column.
pub(crate) fn custom_field_item_field() -> Arc<Field> {
    Arc::new(Field::new(
        "item",
        DataType::Struct(custom_field_fields()),
        true,
    ))
}

pub(crate) fn data_type(kind: Kind) -> DataType {
    match kind {
        Kind::Str | Kind::Json => DataType::Utf8,
        Kind::Bool => DataType::Boolean,
        Kind::Int => DataType::Int64,
        Kind::Ts => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        Kind::StrList => DataType::List(str_item_field()),
        Kind::CustomFields => DataType::List(custom_field_item_field()),
    }
}

fn build_schema(entity: Entity) -> SchemaRef {
    let fields: Vec<Field> = entity
        .columns()
        .iter()
        .map(|c| Field::new(c.name, data_type(c.kind), true))
        .collect();
    let metadata = std::collections::HashMap::from([(
        SCHEMA_VERSION_KEY.to_owned(),
        SCHEMA_VERSION.to_string(),
    )]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// Cuts `s` to about `max` bytes (on a char boundary) for error messages.
pub(crate) fn truncate_for_message(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests;
