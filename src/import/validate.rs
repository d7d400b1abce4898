//! Validation before any write: each column is resolved to an API field once (header row and
//! mapping file), then each row is checked and turned into what will be sent. Every problem
//! carries the row's first line in the file and the field it concerns.
//!
//! Checks: email syntax; phones normalised to E.164 (`--default-country` for national
//! numbers); booleans; dates; JSON cells (tags, customFields, dndSettings as the export writes
//! them); control characters in cells that would be sent; unknown columns; contacts without
//! email or phone.
//!
//! Rows of one file that name the same person (by id, email or phone) are grouped by
//! [`Grouper`] in the first pass and follow `--on-duplicate` ([`Repeats`]): the API would
//! otherwise see two writes for one contact, racing each other.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::custom_fields::FieldIndex;
use super::input::{constant_text, Mapping, RawRecord};
use super::OnDuplicate;

/// What a file's rows become.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    Contacts,
    Tasks,
    Notes,
}

impl Entity {
    pub fn name(self) -> &'static str {
        match self {
            Entity::Contacts => "contacts",
            Entity::Tasks => "tasks",
            Entity::Notes => "notes",
        }
    }
}

/// How a cell is read.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    Email,
    Phone,
    Bool,
    /// `dateOfBirth`: `YYYY-MM-DD`, an ISO 8601 timestamp or epoch milliseconds, sent as given.
    Date,
    /// `dueDate`: an ISO 8601 date or timestamp, sent as `2021-07-02T05:18:26.704Z`.
    Timestamp,
    JsonObject,
    /// A JSON array of strings (as exported) or a comma-separated list.
    Tags,
    /// The export's `[{"id":…,"value":…}]`.
    CustomFields,
    /// An id of a record that must exist (`id` of a contact to update, a child's `contactId`).
    Id,
}

const CONTACT_FIELDS: &[(&str, Kind)] = &[
    ("id", Kind::Id),
    ("firstName", Kind::Text),
    ("lastName", Kind::Text),
    ("name", Kind::Text),
    ("email", Kind::Email),
    ("phone", Kind::Phone),
    ("companyName", Kind::Text),
    ("address1", Kind::Text),
    ("city", Kind::Text),
    ("state", Kind::Text),
    ("postalCode", Kind::Text),
    ("country", Kind::Text),
    ("website", Kind::Text),
    ("source", Kind::Text),
    ("timezone", Kind::Text),
    ("dnd", Kind::Bool),
    ("dndSettings", Kind::JsonObject),
    ("inboundDndSettings", Kind::JsonObject),
    ("dateOfBirth", Kind::Date),
    ("assignedTo", Kind::Text),
    ("gender", Kind::Text),
    ("tags", Kind::Tags),
    ("customFields", Kind::CustomFields),
];

/// Fields `POST /contacts/` accepts but `PUT /contacts/:id` answers 422 to (the spec's
/// `UpdateContactDto` lacks them): sent on create only.
pub(crate) const CREATE_ONLY: &[&str] = &["companyName", "gender"];

/// Columns the export writes that the API computes or does not accept on a write: read, not sent.
const CONTACT_READ_ONLY: &[&str] = &[
    "locationId",
    "contactName",
    "firstNameLowerCase",
    "lastNameLowerCase",
    "fullNameLowerCase",
    "emailLowerCase",
    "type",
    "dateAdded",
    "dateUpdated",
    "lastActivity",
    "businessId",
    "attributions",
    "attributionSource",
    "lastAttributionSource",
    "followers",
    "additionalEmails",
    "additionalPhones",
    "visitorId",
    "_extra",
];

/// Children are keyed by `contactId`, or by `email`/`phone` looked up.
const TASK_FIELDS: &[(&str, Kind)] = &[
    ("contactId", Kind::Id),
    ("email", Kind::Email),
    ("phone", Kind::Phone),
    ("title", Kind::Text),
    ("body", Kind::Text),
    ("dueDate", Kind::Timestamp),
    ("completed", Kind::Bool),
    ("assignedTo", Kind::Text),
];
const TASK_READ_ONLY: &[&str] = &["id", "dateAdded", "dateUpdated", "locationId", "_extra"];

const NOTE_FIELDS: &[(&str, Kind)] = &[
    ("contactId", Kind::Id),
    ("email", Kind::Email),
    ("phone", Kind::Phone),
    ("body", Kind::Text),
    ("userId", Kind::Text),
    ("title", Kind::Text),
    ("color", Kind::Text),
    ("pinned", Kind::Bool),
];
const NOTE_READ_ONLY: &[&str] = &["id", "dateAdded", "locationId", "_extra"];

fn fields(entity: Entity) -> (&'static [(&'static str, Kind)], &'static [&'static str]) {
    match entity {
        Entity::Contacts => (CONTACT_FIELDS, CONTACT_READ_ONLY),
        Entity::Tasks => (TASK_FIELDS, TASK_READ_ONLY),
        Entity::Notes => (NOTE_FIELDS, NOTE_READ_ONLY),
    }
}

/// Why a row was rejected, for counting; the message says the detail.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    BadRow,
    InvalidEmail,
    InvalidPhone,
    InvalidBoolean,
    InvalidDate,
    InvalidValue,
    NoEmailOrPhone,
    MissingField,
    ControlCharacter,
    DuplicateInFile,
    /// Found at write time: the API refused the row (422, duplicate with `--on-duplicate fail`, …).
    Api,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadRow => "unreadable row",
            Reason::InvalidEmail => "invalid email",
            Reason::InvalidPhone => "invalid phone",
            Reason::InvalidBoolean => "invalid boolean",
            Reason::InvalidDate => "invalid date",
            Reason::InvalidValue => "invalid value",
            Reason::NoEmailOrPhone => "no email or phone",
            Reason::MissingField => "missing required field",
            Reason::ControlCharacter => "control character",
            Reason::DuplicateInFile => "duplicate in file",
            Reason::Api => "refused by the API",
        }
    }
}

/// One problem with one row (or with the header, line 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: u64,
    pub field: Option<String>,
    pub reason: Reason,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "line {}, {field}: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

/// Calling codes for `--default-country`; `trunk` = a leading 0 of national numbers is dropped.
const COUNTRIES: &[(&str, &str, bool)] = &[
    ("US", "1", false),
    ("CA", "1", false),
    ("GB", "44", true),
    ("IE", "353", true),
    ("FR", "33", true),
    ("DE", "49", true),
    ("ES", "34", false),
    ("IT", "39", false),
    ("PT", "351", false),
    ("NL", "31", true),
    ("BE", "32", true),
    ("CH", "41", true),
    ("AT", "43", true),
    ("SE", "46", true),
    ("NO", "47", false),
    ("DK", "45", false),
    ("FI", "358", true),
    ("PL", "48", false),
    ("AU", "61", true),
    ("NZ", "64", true),
    ("IN", "91", true),
    ("BR", "55", true),
    ("MX", "52", false),
    ("ZA", "27", true),
    ("JP", "81", true),
    ("SG", "65", false),
    ("AE", "971", true),
    ("IL", "972", true),
];

/// `--default-country`: the calling code national numbers get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Country {
    pub code: String,
    pub calling_code: &'static str,
    trunk_zero: bool,
}

impl std::str::FromStr for Country {
    type Err = String;
    fn from_str(s: &str) -> Result<Country, String> {
        let up = s.trim().to_ascii_uppercase();
        COUNTRIES
            .iter()
            .find(|(c, cc, _)| *c == up || up.strip_prefix('+') == Some(cc))
            .map(|&(c, cc, trunk)| Country {
                code: c.to_owned(),
                calling_code: cc,
                trunk_zero: trunk,
            })
            .ok_or_else(|| {
                let known: Vec<&str> = COUNTRIES.iter().map(|c| c.0).collect();
                format!(
                    "unknown country '{s}': use one of {} (or its calling code, e.g. +44)",
                    known.join(", ")
                )
            })
    }
}

/// A phone as E.164 (`+` and 8 to 15 digits), from international (`+…`, `00…`) or, with a
/// default country, national notation. Spaces, dots, dashes, slashes and brackets are dropped.
pub(crate) fn normalize_phone(raw: &str, country: Option<&Country>) -> Result<String, String> {
    let s = raw.trim();
    let s = s.strip_prefix("tel:").unwrap_or(s);
    let mut digits = String::with_capacity(s.len());
    let mut plus = false;
    for (i, c) in s.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => plus = true,
            ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' => {}
            _ => return Err(format!("'{raw}' is not a phone number (unexpected '{c}')")),
        }
    }
    let international = if plus {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_owned()
    } else if let Some(c) = country {
        let national = if c.calling_code == "1" {
            match digits.len() {
                11 if digits.starts_with('1') => digits[1..].to_owned(),
                10 => digits,
                _ => {
                    return Err(format!(
                        "'{raw}' is not a {} number (expected 10 digits)",
                        c.code
                    ))
                }
            }
        } else if c.trunk_zero {
            digits.strip_prefix('0').unwrap_or(&digits).to_owned()
        } else {
            digits
        };
        format!("{}{national}", c.calling_code)
    } else {
        return Err(format!(
            "'{raw}' is not in international form (+CC…); pass --default-country to read national numbers"
        ));
    };
    if !(8..=15).contains(&international.len()) || international.starts_with('0') {
        return Err(format!("'{raw}' is not a valid international number"));
    }
    Ok(format!("+{international}"))
}

/// Email syntax as APIs check it: a dot-atom or quoted local part (UTF-8 allowed), `@`, and
/// a domain of at least two labels (letters, digits, hyphens, UTF-8).
pub(crate) fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || local.len() > 64 || domain.is_empty() || domain.len() > 255 {
        return false;
    }
    let local_ok = if local.len() >= 2 && local.starts_with('"') && local.ends_with('"') {
        let inner = &local[1..local.len() - 1];
        !inner.contains(['"', '\\', '\r', '\n'])
    } else {
        local.split('.').all(|atom| {
            !atom.is_empty()
                && atom.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || "!#$%&'*+/=?^_`{|}~-".contains(c)
                        || (!c.is_ascii() && !c.is_whitespace() && !c.is_control())
                })
        })
    };
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && c.is_alphanumeric())
                })
        })
        && labels
            .last()
            .is_some_and(|tld| !tld.chars().all(|c| c.is_ascii_digit()));
    local_ok && domain_ok
}

pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// Where a column's cells go.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Field(&'static str, Kind),
    /// `customField.<id>`: one custom field's value as text.
    CustomField(String),
    /// `locationId` of an export: tells whether the row's `id` belongs to this location.
    SourceLocation,
    /// Export-only or `ignore`d in the mapping: read, never sent.
    Skip,
}

/// The columns of a file resolved against an entity's fields and the mapping.
#[derive(Clone, Debug)]
pub(crate) struct ColumnPlan {
    entity: Entity,
    /// The header's column names, in order (for messages).
    columns: Vec<String>,
    targets: Vec<Target>,
    constants: Vec<(Target, String)>,
    extra_tags: Vec<String>,
    /// Columns that name no field: a file-level problem.
    pub unknown: Vec<String>,
    /// Columns read but not sent (export-only fields, `ignore`).
    pub skipped: Vec<String>,
    /// Problems with the header itself (the same field twice, a bad mapping target).
    pub header_problems: Vec<Problem>,
}

impl ColumnPlan {
    /// Fields this file sets (by a column or a mapping constant) that only a create accepts
    /// ([`CREATE_ONLY`]): an update leaves them as they are.
    pub(crate) fn create_only_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .targets
            .iter()
            .chain(self.constants.iter().map(|(t, _)| t))
            .filter_map(|t| match t {
                Target::Field(name, _) if CREATE_ONLY.contains(name) => Some((*name).to_owned()),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn resolve(entity: Entity, name: &str) -> Option<Target> {
    let (writable, read_only) = fields(entity);
    if let Some(&(f, k)) = writable.iter().find(|(f, _)| f.eq_ignore_ascii_case(name)) {
        return Some(Target::Field(f, k));
    }
    if entity == Entity::Contacts {
        if name.eq_ignore_ascii_case("locationId") {
            return Some(Target::SourceLocation);
        }
        let lower = name.to_ascii_lowercase();
        if let Some(id) = lower
            .strip_prefix("customfield.")
            .map(|_| &name["customField.".len()..])
        {
            let id = id.trim();
            if !id.is_empty() {
                return Some(Target::CustomField(id.to_owned()));
            }
        }
    }
    read_only
        .iter()
        .any(|f| f.eq_ignore_ascii_case(name))
        .then_some(Target::Skip)
}

impl ColumnPlan {
    pub(crate) fn new(entity: Entity, headers: &[String], mapping: &Mapping) -> ColumnPlan {
        let mut plan = ColumnPlan {
            entity,
            columns: headers.to_vec(),
            targets: Vec::with_capacity(headers.len()),
            constants: Vec::new(),
            extra_tags: mapping.tags.clone(),
            unknown: Vec::new(),
            skipped: Vec::new(),
            header_problems: Vec::new(),
        };
        for h in headers {
            let target = if mapping.ignore.iter().any(|i| i == h) {
                Some(Target::Skip)
            } else if let Some(field) = mapping.columns.get(h) {
                let t = resolve(entity, field);
                if t.is_none() || t == Some(Target::Skip) {
                    plan.header_problems.push(Problem {
                        line: 1,
                        field: Some(h.clone()),
                        reason: Reason::BadRow,
                        message: format!("the mapping sends this column to '{field}', which is not a writable {} field", entity.name()),
                    });
                }
                t
            } else {
                resolve(entity, h)
            };
            let target = match target {
                Some(t) => t,
                None => {
                    plan.unknown.push(h.clone());
                    Target::Skip
                }
            };
            if target == Target::Skip && !plan.unknown.contains(h) {
                plan.skipped.push(h.clone());
            }
            if !matches!(target, Target::Skip) && plan.targets.contains(&target) {
                plan.header_problems.push(Problem {
                    line: 1,
                    field: Some(h.clone()),
                    reason: Reason::BadRow,
                    message: "a second column for the same field".into(),
                });
            }
            plan.targets.push(target);
        }
        for (field, value) in &mapping.constants {
            if let Some((at, c)) = control_char(&constant_text(value)) {
                plan.header_problems.push(Problem {
                    line: 1,
                    field: Some(field.clone()),
                    reason: Reason::ControlCharacter,
                    message: format!("the mapping's constant has the control character U+{:04X} at character {at}: remove it", c as u32),
                });
                continue;
            }
            match resolve(entity, field) {
                Some(t @ (Target::Field(..) | Target::CustomField(_))) => plan.constants.push((t, constant_text(value))),
                _ => plan.header_problems.push(Problem {
                    line: 1,
                    field: Some(field.clone()),
                    reason: Reason::BadRow,
                    message: format!("the mapping sets a constant for '{field}', which is not a writable {} field", entity.name()),
                }),
            }
        }
        plan
    }

    /// Whether a column or a mapping constant is a `customField.<name>`.
    pub(crate) fn names_custom_fields(&self) -> bool {
        self.targets
            .iter()
            .chain(self.constants.iter().map(|(t, _)| t))
            .any(|t| matches!(t, Target::CustomField(_)))
    }

    /// Maps every `customField.<name>` (a column or a mapping constant) to the id it names
    /// ([`FieldIndex::resolve`]); a name the location does not know is a header problem
    /// naming the column and listing the known keys. Two columns that name one field are a
    /// header problem too.
    pub(crate) fn resolve_custom_fields(&mut self, index: &FieldIndex) {
        let unknown = |field: &str, name: &str| {
            Problem {
            line: 1,
            field: Some(field.to_owned()),
            reason: Reason::BadRow,
            message: format!(
                "no custom field of the location has the id or key '{}'; name one by its key (customField.<key>), its full fieldKey or its id; the location's keys: {}",
                crate::term::escape(name),
                index.known_keys()
            ),
        }
        };
        // (id, name as written): one field named twice the same way is already a problem.
        let mut seen: Vec<(String, String)> = Vec::new();
        for (column, target) in self.columns.iter().zip(self.targets.iter_mut()) {
            let Target::CustomField(name) = target else {
                continue;
            };
            match index.resolve(name) {
                Some(id) => {
                    let id = id.to_owned();
                    if seen.iter().any(|(i, n)| *i == id && n != name) {
                        self.header_problems.push(Problem {
                            line: 1,
                            field: Some(column.clone()),
                            reason: Reason::BadRow,
                            message: format!("a second column for the same custom field (id {id})"),
                        });
                    }
                    seen.push((id.clone(), name.clone()));
                    *name = id;
                }
                None => {
                    self.header_problems.push(unknown(column, name));
                    *target = Target::Skip;
                }
            }
        }
        let mut problems = Vec::new();
        self.constants.retain_mut(|(target, _)| {
            let Target::CustomField(name) = target else {
                return true;
            };
            match index.resolve(name) {
                Some(id) => {
                    *name = id.to_owned();
                    true
                }
                None => {
                    problems.push(unknown(&format!("customField.{name}"), name));
                    false
                }
            }
        });
        self.header_problems.extend(problems);
    }

    /// Whether rows carry phone numbers (a column or a constant).
    pub(crate) fn reads_phones(&self) -> bool {
        self.targets
            .iter()
            .chain(self.constants.iter().map(|(t, _)| t))
            .any(|t| matches!(t, Target::Field("phone", _)))
    }

    /// Problems that concern the whole file: reported once, against the header (line 1).
    pub(crate) fn file_problems(&self) -> Vec<Problem> {
        let mut out = self.header_problems.clone();
        for u in &self.unknown {
            out.push(Problem {
                line: 1,
                field: Some(u.clone()),
                reason: Reason::BadRow,
                message: format!("unknown column: not a {} field; map it in --mapping, list it under ignore there, or pass --ignore-unknown-columns", self.entity.name()),
            });
        }
        out
    }
}

/// Settings that change how rows are read.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub default_country: Option<Country>,
    /// Keep leading and trailing spaces of free-text cells (emails, phones, ids, booleans and
    /// dates are always trimmed).
    pub keep_spaces: bool,
    /// The location written to: an `id` from another location's export is not an update target.
    pub location_id: String,
    /// Never treat `id` as an update target.
    pub ignore_ids: bool,
    /// What later rows naming the same person as an earlier row of the file become.
    pub on_duplicate: OnDuplicate,
}

/// A row read into API values, before entity-specific checks.
#[derive(Clone, Debug, Default)]
struct Parsed {
    values: BTreeMap<&'static str, Value>,
    custom: Vec<(String, Value)>,
    source_location: Option<String>,
    /// Fields (`customField.<id>` for custom fields) whose value is a mapping constant.
    constants: Vec<String>,
}

fn read_cell(kind: Kind, cell: &str, rules: &Rules) -> Result<Option<Value>, (Reason, String)> {
    let trimmed = cell.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let v = match kind {
        Kind::Text => Value::String(if rules.keep_spaces {
            cell.to_owned()
        } else {
            trimmed.to_owned()
        }),
        Kind::Id => Value::String(trimmed.to_owned()),
        Kind::Email => {
            if !valid_email(trimmed) {
                return Err((
                    Reason::InvalidEmail,
                    format!("'{}' is not an email address", short(trimmed)),
                ));
            }
            Value::String(trimmed.to_owned())
        }
        Kind::Phone => Value::String(
            normalize_phone(trimmed, rules.default_country.as_ref())
                .map_err(|m| (Reason::InvalidPhone, m))?,
        ),
        Kind::Bool => Value::Bool(parse_bool(trimmed).ok_or_else(|| {
            (
                Reason::InvalidBoolean,
                format!(
                    "'{}' is not a boolean (use true/false, yes/no or 1/0)",
                    short(trimmed)
                ),
            )
        })?),
        Kind::Date => {
            let ok = crate::timefmt::parse_iso_millis(trimmed).is_some()
                || (trimmed.len() <= 15
                    && trimmed
                        .trim_start_matches('-')
                        .chars()
                        .all(|c| c.is_ascii_digit()));
            if !ok {
                return Err((
                    Reason::InvalidDate,
                    format!("'{}' is not a date (use YYYY-MM-DD)", short(trimmed)),
                ));
            }
            Value::String(trimmed.to_owned())
        }
        Kind::Timestamp => match crate::timefmt::parse_iso_millis(trimmed) {
            Some(ms) => Value::String(crate::timefmt::format_iso_millis(ms)),
            None => {
                return Err((
                    Reason::InvalidDate,
                    format!(
                        "'{}' is not an ISO 8601 date (use 2024-05-01 or 2024-05-01T09:00:00Z)",
                        short(trimmed)
                    ),
                ))
            }
        },
        Kind::JsonObject => match serde_json::from_str::<Value>(trimmed) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err((Reason::InvalidValue, "expected a JSON object".into())),
        },
        Kind::Tags => Value::Array(
            parse_tags(cell)
                .map_err(|m| (Reason::InvalidValue, m))?
                .into_iter()
                .map(Value::String)
                .collect(),
        ),
        Kind::CustomFields => {
            parse_custom_fields(trimmed).map_err(|m| (Reason::InvalidValue, m))?
        }
    };
    Ok(Some(v))
}

/// A JSON array of strings (kept exactly), or a comma-separated list (items trimmed, empty
/// items dropped).
pub(crate) fn parse_tags(cell: &str) -> Result<Vec<String>, String> {
    let t = cell.trim();
    if t.starts_with('[') {
        if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(t) {
            return items
                .into_iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s),
                    other => Err(format!("tags: {other} is not a string")),
                })
                .collect();
        }
    }
    Ok(t.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The export's `[{"id":…,"value":…}]` as `[{"id":…,"value":…}]` with ids checked.
fn parse_custom_fields(cell: &str) -> Result<Value, String> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(cell) else {
        return Err("expected a JSON array of {\"id\":…,\"value\":…}".into());
    };
    for (i, item) in items.iter().enumerate() {
        if item
            .get("id")
            .and_then(Value::as_str)
            .is_none_or(|s| s.trim().is_empty())
        {
            return Err(format!("item {i} has no id"));
        }
    }
    Ok(Value::Array(items))
}

/// The first control character of a cell (1-based character position): NUL and the other
/// C0 controls except tab, line feed and carriage return (quoted cells may span lines), DEL,
/// and the C1 controls. Such bytes are never sent: the API stores them and they break the
/// CRM's own exports and the terminals that show them.
pub(crate) fn control_char(s: &str) -> Option<(usize, char)> {
    s.chars()
        .enumerate()
        .find(|(_, c)| {
            matches!(
                *c,
                '\0'..='\x08' | '\x0B' | '\x0C' | '\x0E'..='\x1F' | '\x7F'..='\u{9F}'
            )
        })
        .map(|(i, c)| (i + 1, c))
}

/// The first control character ([`control_char`]) in a JSON value's strings and keys.
fn json_control_char(v: &Value) -> Option<char> {
    match v {
        Value::String(s) => control_char(s).map(|(_, c)| c),
        Value::Array(items) => items.iter().find_map(json_control_char),
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            control_char(k)
                .map(|(_, c)| c)
                .or_else(|| json_control_char(v))
        }),
        _ => None,
    }
}

fn short(s: &str) -> String {
    crate::schema::truncate_for_message(s, 80)
}

fn parse(plan: &ColumnPlan, rec: &RawRecord, rules: &Rules, problems: &mut Vec<Problem>) -> Parsed {
    let mut p = Parsed::default();
    let put = |target: &Target,
               cell: &str,
               problems: &mut Vec<Problem>,
               p: &mut Parsed,
               is_constant: bool| match target {
        Target::Skip => {}
        Target::SourceLocation => {
            let t = cell.trim();
            if !t.is_empty() {
                p.source_location = Some(t.to_owned());
            }
        }
        Target::CustomField(id) => {
            if is_constant && p.custom.iter().any(|(i, _)| i == id) {
                return;
            }
            let t = if rules.keep_spaces { cell } else { cell.trim() };
            if !t.trim().is_empty() {
                p.custom.push((id.clone(), Value::String(t.to_owned())));
                if is_constant {
                    p.constants.push(format!("customField.{id}"));
                }
            }
        }
        Target::Field(name, kind) => {
            if is_constant && p.values.contains_key(name) && *kind != Kind::Tags {
                return;
            }
            match read_cell(*kind, cell, rules) {
                Ok(Some(v)) => {
                    // JSON cells (tags, customFields, dndSettings) can spell a control
                    // character as an escape (`\u0000`): the parsed value is checked too.
                    if let Some(c) = json_control_char(&v) {
                        problems.push(Problem {
                            line: rec.line,
                            field: Some((*name).to_owned()),
                            reason: Reason::ControlCharacter,
                            message: format!(
                                "the JSON holds the control character U+{:04X} (as an escape): remove it (nothing of the row was sent)",
                                c as u32
                            ),
                        });
                        return;
                    }
                    if let (Kind::Tags, Some(Value::Array(old))) = (kind, p.values.get_mut(name)) {
                        if let Value::Array(new) = v {
                            old.extend(new);
                        }
                    } else {
                        p.values.insert(name, v);
                        if is_constant {
                            p.constants.push((*name).to_owned());
                        }
                    }
                }
                Ok(None) => {}
                Err((reason, message)) => problems.push(Problem {
                    line: rec.line,
                    field: Some((*name).to_owned()),
                    reason,
                    message,
                }),
            }
        }
    };
    for (i, (target, cell)) in plan.targets.iter().zip(&rec.cells).enumerate() {
        if *target != Target::Skip {
            if let Some((at, c)) = control_char(cell) {
                let field = match target {
                    Target::Field(name, _) => (*name).to_owned(),
                    Target::CustomField(id) => format!("customField.{id}"),
                    _ => plan.columns[i].clone(),
                };
                problems.push(Problem {
                    line: rec.line,
                    field: Some(field),
                    reason: Reason::ControlCharacter,
                    message: format!(
                        "column '{}' has the control character U+{:04X} at character {at}: remove it (nothing of the row was sent)",
                        plan.columns[i], c as u32
                    ),
                });
                continue;
            }
        }
        put(target, cell, problems, &mut p, false);
    }
    for (target, text) in &plan.constants {
        put(target, text, problems, &mut p, true);
    }
    if !plan.extra_tags.is_empty() {
        let tags = p
            .values
            .entry("tags")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = tags {
            a.extend(plan.extra_tags.iter().cloned().map(Value::String));
        }
    }
    if let Some(Value::Array(tags)) = p.values.get_mut("tags") {
        let mut seen = std::collections::HashSet::new();
        tags.retain(|t| seen.insert(t.as_str().unwrap_or_default().to_owned()));
    }
    p
}

/// A contact row ready to send.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ContactRow {
    pub line: u64,
    /// The contact to update (`id` column, same location).
    pub id: Option<String>,
    /// The id the row had in another location's export: recorded to map children.
    pub source_id: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    /// Scalar fields to send (no tags, no custom fields, no id).
    pub fields: Map<String, Value>,
    pub custom: Vec<(String, Value)>,
    pub tags: Vec<String>,
    /// Fields (`customField.<id>`) set by a mapping constant, not a cell: in a merge, a
    /// later row's constant does not replace an earlier row's cell.
    pub from_constants: Vec<String>,
}

impl ContactRow {
    /// The journal key: what identifies the row's contact. For rows merged from several rows
    /// of the file, the merged values: the email and phone the create sends, so `undo` looks
    /// an unconfirmed create up by what it was made with (the merge is deterministic, so a
    /// rerun on the same file computes the same key; an edited file is told apart).
    pub(crate) fn key(&self) -> String {
        match (&self.id, &self.email, &self.phone) {
            (Some(id), _, _) => format!("id:{id}"),
            (None, e, p) => format!(
                "email:{}|phone:{}",
                e.as_deref().unwrap_or("").to_lowercase(),
                p.as_deref().unwrap_or("")
            ),
        }
    }

    /// What groups the row with other rows of the file naming the same person.
    fn group_keys(&self) -> Vec<(&'static str, String)> {
        let mut keys = Vec::with_capacity(3);
        if let Some(id) = &self.id {
            keys.push(("id", id.clone()));
        }
        if let Some(e) = &self.email {
            keys.push(("email", e.to_lowercase()));
        }
        if let Some(ph) = &self.phone {
            keys.push(("phone", ph.clone()));
        }
        keys
    }

    /// Merges a later row of the same person into this one: a later non-empty cell wins,
    /// tags are the union, custom fields are merged by id (a later value wins). The line
    /// stays this row's.
    pub(crate) fn merge(&mut self, later: ContactRow) {
        let keep = |mine: &mut Option<String>, theirs: Option<String>| {
            if theirs.is_some() {
                *mine = theirs;
            }
        };
        keep(&mut self.id, later.id);
        keep(&mut self.source_id, later.source_id);
        keep(&mut self.email, later.email);
        keep(&mut self.phone, later.phone);
        let constant = |k: &str| later.from_constants.iter().any(|c| c == k);
        for (k, v) in later.fields {
            if !(constant(&k) && self.fields.contains_key(&k)) {
                self.fields.insert(k, v);
            }
        }
        for (id, value) in later.custom {
            match self.custom.iter_mut().find(|(i, _)| *i == id) {
                Some(_) if constant(&format!("customField.{id}")) => {}
                Some(slot) => slot.1 = value,
                None => self.custom.push((id, value)),
            }
        }
        for t in later.tags {
            if !self.tags.contains(&t) {
                self.tags.push(t);
            }
        }
    }

    fn custom_body(&self, value_key: &str) -> Option<Value> {
        (!self.custom.is_empty()).then(|| {
            Value::Array(
                self.custom
                    .iter()
                    .map(|(id, v)| {
                        let mut m = Map::new();
                        m.insert("id".into(), Value::String(id.clone()));
                        m.insert(value_key.to_owned(), v.clone());
                        Value::Object(m)
                    })
                    .collect(),
            )
        })
    }

    /// `POST /contacts/` body: everything, tags included (a new contact has none to keep).
    pub(crate) fn create_body(&self, location_id: &str, value_key: &str) -> Value {
        let mut m = self.fields.clone();
        m.insert("locationId".into(), Value::String(location_id.to_owned()));
        if !self.tags.is_empty() {
            m.insert("tags".into(), Value::from(self.tags.clone()));
        }
        if let Some(cf) = self.custom_body(value_key) {
            m.insert("customFields".into(), cf);
        }
        Value::Object(m)
    }

    /// `PUT /contacts/:id` body: no `locationId` (a 422) and no `tags` (they would replace the
    /// contact's tags; they are added with `POST …/tags` instead), nor the fields only a create
    /// accepts ([`CREATE_ONLY`]). `None` when nothing to send.
    pub(crate) fn update_body(&self, value_key: &str) -> Option<Value> {
        let mut m = self.fields.clone();
        for create_only in CREATE_ONLY {
            m.remove(*create_only);
        }
        if let Some(cf) = self.custom_body(value_key) {
            m.insert("customFields".into(), cf);
        }
        (!m.is_empty()).then_some(Value::Object(m))
    }
}

/// How a child row names its contact.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ContactRef {
    Id(String),
    Email(String),
    Phone(String),
}

impl ContactRef {
    pub(crate) fn key(&self) -> String {
        match self {
            ContactRef::Id(i) => format!("id:{i}"),
            ContactRef::Email(e) => format!("email:{}", e.to_lowercase()),
            ContactRef::Phone(p) => format!("phone:{p}"),
        }
    }
}

/// A task or note row ready to send (its contact still to resolve).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ChildRow {
    pub line: u64,
    pub contact: ContactRef,
    /// The create body (`completed` is always false for tasks: closing is a second call).
    pub body: Map<String, Value>,
    /// Tasks: close with `PUT …/completed` after creating.
    pub completed: bool,
}

impl ChildRow {
    /// What identifies the row's record among the contact's children (tasks have no natural key).
    pub(crate) fn fingerprint(&self) -> String {
        let get = |k: &str| self.body.get(k).and_then(Value::as_str).unwrap_or("");
        if self.body.contains_key("dueDate") {
            format!("title:{}|due:{}", get("title"), get("dueDate"))
        } else {
            format!("body:{}", digest(get("body")))
        }
    }
}

/// A short stable digest (FNV-1a, 64 bits) for journal keys built from long text. The
/// journal holds these keys: changing the function would make a rerun miss its own notes.
pub(crate) fn digest(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A validated row of any entity.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Row {
    Contact(ContactRow),
    Child(ChildRow),
}

/// Validates one row at a time (rows naming the same person: [`Grouper`]).
pub(crate) struct Validator {
    pub plan: ColumnPlan,
    rules: Rules,
}

impl Validator {
    pub(crate) fn new(plan: ColumnPlan, rules: Rules) -> Validator {
        Validator { plan, rules }
    }

    /// Checks one record on its own.
    pub(crate) fn check(&mut self, rec: &RawRecord) -> Result<Row, Vec<Problem>> {
        if let Some(p) = &rec.problem {
            return Err(vec![Problem {
                line: rec.line,
                field: None,
                reason: Reason::BadRow,
                message: p.clone(),
            }]);
        }
        let mut problems = Vec::new();
        let p = parse(&self.plan, rec, &self.rules, &mut problems);
        let row = match self.plan.entity {
            Entity::Contacts => self.contact(rec.line, p, &mut problems).map(Row::Contact),
            Entity::Tasks | Entity::Notes => self.child(rec.line, p, &mut problems).map(Row::Child),
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        row.ok_or_else(Vec::new)
    }

    fn contact(&self, line: u64, mut p: Parsed, problems: &mut Vec<Problem>) -> Option<ContactRow> {
        let take = |p: &mut Parsed, k: &str| match p.values.remove(k) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let raw_id = take(&mut p, "id");
        let foreign = p
            .source_location
            .as_deref()
            .is_some_and(|l| l != self.rules.location_id);
        let (id, source_id) = if self.rules.ignore_ids || foreign {
            (None, raw_id)
        } else {
            (raw_id, None)
        };
        let email = p
            .values
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let phone = p
            .values
            .get("phone")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let failed_key = problems.iter().any(|x| {
            matches!(x.reason, Reason::InvalidEmail | Reason::InvalidPhone)
                || matches!(x.field.as_deref(), Some("email" | "phone" | "id"))
        });
        if id.is_none() && email.is_none() && phone.is_none() && !failed_key {
            problems.push(Problem {
                line,
                field: None,
                reason: Reason::NoEmailOrPhone,
                message: "no email and no phone: the contact could not be matched against existing ones (add an id column to update a known contact)".into(),
            });
        }
        let tags = match p.values.remove("tags") {
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let from_constants = std::mem::take(&mut p.constants);
        let mut custom = p.custom;
        if let Some(Value::Array(items)) = p.values.remove("customFields") {
            for item in items {
                let id = item
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let value = ["value", "field_value", "fieldValue"]
                    .iter()
                    .find_map(|k| item.get(*k))
                    .cloned()
                    .unwrap_or(Value::Null);
                if !custom.iter().any(|(i, _)| *i == id) {
                    custom.push((id, value));
                }
            }
        }
        let fields: Map<String, Value> = p
            .values
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        Some(ContactRow {
            line,
            id,
            source_id,
            email,
            phone,
            fields,
            custom,
            tags,
            from_constants,
        })
    }

    fn child(&self, line: u64, mut p: Parsed, problems: &mut Vec<Problem>) -> Option<ChildRow> {
        let contact = match (
            p.values.remove("contactId"),
            p.values.remove("email"),
            p.values.remove("phone"),
        ) {
            (Some(Value::String(id)), _, _) => Some(ContactRef::Id(id)),
            (_, Some(Value::String(e)), _) => Some(ContactRef::Email(e)),
            (_, _, Some(Value::String(ph))) => Some(ContactRef::Phone(ph)),
            _ => {
                if !problems.iter().any(|x| {
                    matches!(x.reason, Reason::InvalidEmail | Reason::InvalidPhone)
                        || matches!(x.field.as_deref(), Some("email" | "phone" | "contactId"))
                }) {
                    problems.push(Problem {
                        line,
                        field: Some("contactId".into()),
                        reason: Reason::MissingField,
                        message: "no contactId, email or phone to find the contact by".into(),
                    });
                }
                None
            }
        };
        let required: &[&str] = match self.plan.entity {
            Entity::Tasks => &["title", "dueDate"],
            _ => &["body"],
        };
        for f in required {
            if !p.values.contains_key(f) && !problems.iter().any(|x| x.field.as_deref() == Some(f))
            {
                problems.push(Problem {
                    line,
                    field: Some((*f).to_owned()),
                    reason: Reason::MissingField,
                    message: format!("{f} is required and empty"),
                });
            }
        }
        let mut completed = false;
        if self.plan.entity == Entity::Tasks {
            completed = p
                .values
                .remove("completed")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            p.values.insert("completed", Value::Bool(false));
        }
        let body = p
            .values
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        Some(ChildRow {
            line,
            contact: contact?,
            body,
            completed,
        })
    }
}

/// Where the first pass puts a contact row among the rows before it.
#[derive(Debug, PartialEq)]
pub(crate) enum Place {
    /// The first row of its person (so far): written.
    First,
    /// `--on-duplicate update`: merged into the write of the row at `into`.
    Merged { into: u64 },
    /// `--on-duplicate skip`: not written; the row at `first` is.
    Skipped { first: u64 },
    /// `--on-duplicate fail`, or ambiguous: rejected.
    Rejected(Problem),
}

/// Groups the contact rows of one file that name the same person, in file order.
///
/// A row joins the group of the earlier rows it shares a key with (its id, its email ignoring
/// case, its phone in E.164) and brings its other keys to that group. The rule for a row that
/// shares keys with two different groups (say one by email and another by phone), or whose id
/// differs from its group's id, is to reject it as ambiguous whatever `--on-duplicate` says:
/// merging it would join two people, and writing it alone would race the others' writes.
///
/// Memory: one entry per key of each row (what any duplicate check needs), the ids of groups
/// that have one, and an entry per later row of a group.
pub(crate) struct Grouper {
    on_duplicate: OnDuplicate,
    /// `what:key` to the first line of its group.
    first: HashMap<String, u64>,
    /// The id of each group that has one, by first line.
    ids: HashMap<u64, String>,
    repeats: Repeats,
}

/// What the first pass decided about rows that repeat a person, for the passes after it.
#[derive(Debug, Default)]
pub(crate) struct Repeats {
    /// Rows not written on their own (merged, skipped or rejected): line to the first line of
    /// their person.
    aside: HashMap<u64, u64>,
    /// `--on-duplicate update`: the lines merged into each first line.
    pub groups: BTreeMap<u64, Vec<u64>>,
    /// The merged rows, by first line (filled by [`Repeats::collect`]).
    merged: HashMap<u64, ContactRow>,
    /// The records of the lines merged into each first line, as read: should the API refuse
    /// the one write, every one of them goes to the rejects file.
    records: HashMap<u64, Vec<super::input::RawRecord>>,
}

impl Grouper {
    pub(crate) fn new(on_duplicate: OnDuplicate) -> Grouper {
        Grouper {
            on_duplicate,
            first: HashMap::new(),
            ids: HashMap::new(),
            repeats: Repeats::default(),
        }
    }

    /// Places a valid row; call in file order.
    pub(crate) fn place(&mut self, row: &ContactRow) -> Place {
        let keys = row.group_keys();
        let mut found: Option<(u64, &(&'static str, String))> = None;
        for k in &keys {
            let Some(&g) = self.first.get(&format!("{}:{}", k.0, k.1)) else {
                continue;
            };
            match found {
                None => found = Some((g, k)),
                Some((h, hk)) if h != g => {
                    return self.reject(row, k.0, format!(
                        "same {} as line {h} and same {} as line {g}, which are two different people in this file: the row is ambiguous (fix its {} or {})",
                        hk.0, k.0, hk.0, k.0
                    ));
                }
                Some(_) => {}
            }
        }
        let Some((g, (what, value))) = found else {
            for (what, value) in keys {
                self.first.insert(format!("{what}:{value}"), row.line);
            }
            if let Some(id) = &row.id {
                self.ids.insert(row.line, id.clone());
            }
            return Place::First;
        };
        let (what, value) = (*what, value.clone());
        if let (Some(id), Some(gid)) = (&row.id, self.ids.get(&g)) {
            if id != gid {
                let message = format!("same {what} {value} as line {g}, but id {id} where line {g} has id {gid}: the row is ambiguous (two contacts cannot be merged)");
                return self.reject(row, "id", message);
            }
        }
        for (w, v) in keys {
            self.first.entry(format!("{w}:{v}")).or_insert(g);
        }
        if let Some(id) = &row.id {
            self.ids.entry(g).or_insert_with(|| id.clone());
        }
        self.repeats.aside.insert(row.line, g);
        match self.on_duplicate {
            OnDuplicate::Update => {
                self.repeats.groups.entry(g).or_default().push(row.line);
                Place::Merged { into: g }
            }
            OnDuplicate::Skip => Place::Skipped { first: g },
            OnDuplicate::Fail => Place::Rejected(Problem {
                line: row.line,
                field: Some(what.to_owned()),
                reason: Reason::DuplicateInFile,
                message: format!(
                    "duplicate of line {g} (same {what} {value}): rejected by --on-duplicate fail"
                ),
            }),
        }
    }

    fn reject(&mut self, row: &ContactRow, field: &str, message: String) -> Place {
        self.repeats.aside.insert(row.line, 0);
        Place::Rejected(Problem {
            line: row.line,
            field: Some(field.to_owned()),
            reason: Reason::DuplicateInFile,
            message,
        })
    }

    pub(crate) fn finish(self) -> Repeats {
        self.repeats
    }
}

impl Repeats {
    /// Whether the row at `line` is written on its own (or as the first of merged rows).
    pub(crate) fn written(&self, line: u64) -> bool {
        !self.aside.contains_key(&line)
    }

    /// Whether rows of the file are to be merged (and a read to collect them is needed).
    pub(crate) fn merging(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Builds the merged rows from a read of the file: only the rows of groups are kept.
    pub(crate) fn collect(&mut self, line: u64, row: Row) {
        let Row::Contact(c) = row else { return };
        if self.groups.contains_key(&line) {
            self.merged.insert(line, c);
        } else if let Some(into) = self.aside.get(&line) {
            if let Some(m) = self.merged.get_mut(into) {
                m.merge(c);
            }
        }
    }

    /// Keeps the record of a line merged into another (see `records`).
    pub(crate) fn collect_record(&mut self, rec: &super::input::RawRecord) {
        if let Some(into) = self.aside.get(&rec.line) {
            if self.groups.contains_key(into) {
                self.records.entry(*into).or_default().push(rec.clone());
            }
        }
    }

    /// The records of the lines merged into others, by first line.
    pub(crate) fn take_records(&mut self) -> HashMap<u64, Vec<super::input::RawRecord>> {
        std::mem::take(&mut self.records)
    }

    /// Whether `collect` wants the row at `line`.
    pub(crate) fn wants(&self, line: u64) -> bool {
        self.groups.contains_key(&line)
            || self
                .aside
                .get(&line)
                .is_some_and(|into| self.groups.contains_key(into))
    }

    /// The row to write for the row at `line` (its group's merged row, taken once).
    pub(crate) fn take(&mut self, line: u64, row: Row) -> Row {
        match self.merged.remove(&line) {
            Some(m) => Row::Contact(m),
            None => row,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(line: u64, cells: &[&str]) -> RawRecord {
        RawRecord {
            line,
            cells: cells.iter().map(|s| s.to_string()).collect(),
            ..RawRecord::default()
        }
    }

    fn validator(entity: Entity, headers: &[&str]) -> Validator {
        let h: Vec<String> = headers.iter().map(|s| s.to_string()).collect();
        let plan = ColumnPlan::new(entity, &h, &Mapping::default());
        let rules = Rules {
            default_country: Some("US".parse().unwrap()),
            location_id: "L1".into(),
            ..Rules::default()
        };
        Validator::new(plan, rules)
    }

    #[test]
    fn emails() {
        for ok in [
            "a@b.co",
            "first.last+tag@example.com",
            "用户5@例子.广告",
            "\"odd one\"@x.org",
            "o'brien@x.ie",
        ] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@",
            "@b.co",
            "a@b",
            "a..b@x.co",
            ".a@x.co",
            "a b@x.co",
            "o'brien+\"tag\"5@example.com",
            "a@-x.co",
            "a@x.123",
            "a@@x.co",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn phones_become_e164() {
        let us: Country = "US".parse().unwrap();
        let gb: Country = "+44".parse().unwrap();
        assert_eq!(
            normalize_phone("+1 (555) 010-9999", None).unwrap(),
            "+15550109999"
        );
        assert_eq!(
            normalize_phone("(555) 010-9999", Some(&us)).unwrap(),
            "+15550109999"
        );
        assert_eq!(
            normalize_phone("1-555-010-9999", Some(&us)).unwrap(),
            "+15550109999"
        );
        assert_eq!(
            normalize_phone("07700 900123", Some(&gb)).unwrap(),
            "+447700900123"
        );
        assert_eq!(
            normalize_phone("0044 7700 900123", Some(&us)).unwrap(),
            "+447700900123"
        );
        assert!(normalize_phone("555-0109", Some(&us)).is_err());
        assert!(normalize_phone("07700 900123", None).is_err());
        assert!(normalize_phone("call me", Some(&us)).is_err());
        assert!("XX".parse::<Country>().is_err());
    }

    #[test]
    fn booleans() {
        assert_eq!(parse_bool(" Yes "), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn tags_from_export_json_or_commas() {
        assert_eq!(parse_tags("[\"a, b\",\" c \"]").unwrap(), ["a, b", " c "]);
        assert_eq!(
            parse_tags(" vip, , new lead ").unwrap(),
            ["vip", "new lead"]
        );
    }

    #[test]
    fn custom_field_columns_by_key_or_field_key_become_ids_and_an_unknown_key_names_the_column() {
        let index = FieldIndex::new(
            &serde_json::from_str::<Vec<Value>>(
                r#"[{"id":"A1","fieldKey":"contact.pincode"},{"id":"B2","fieldKey":"contact.employees"}]"#,
            )
            .unwrap(),
        );
        let h: Vec<String> = [
            "email",
            "customField.pincode",
            "customField.contact.employees",
            "customField.zip",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mapping = Mapping {
            constants: [("customField.B2".to_owned(), toml::Value::Integer(3))].into(),
            ..Mapping::default()
        };
        let mut plan = ColumnPlan::new(Entity::Contacts, &h, &mapping);
        assert!(plan.names_custom_fields());
        plan.resolve_custom_fields(&index);
        assert_eq!(
            plan.targets[1..3],
            [
                Target::CustomField("A1".into()),
                Target::CustomField("B2".into())
            ]
        );
        assert_eq!(
            plan.constants,
            [(Target::CustomField("B2".into()), "3".into())]
        );
        let [p] = plan.header_problems.as_slice() else {
            panic!("{:?}", plan.header_problems)
        };
        assert_eq!(p.field.as_deref(), Some("customField.zip"));
        assert!(
            p.message.contains("'zip'") && p.message.contains("employees, pincode"),
            "{}",
            p.message
        );

        // One field named twice (by key and by id) is a second column for it.
        let h: Vec<String> = ["customField.pincode", "customField.A1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut plan = ColumnPlan::new(Entity::Contacts, &h, &Mapping::default());
        plan.resolve_custom_fields(&index);
        assert_eq!(plan.header_problems.len(), 1, "{:?}", plan.header_problems);
        assert_eq!(
            plan.header_problems[0].field.as_deref(),
            Some("customField.A1")
        );
    }

    #[test]
    fn contact_row_problems_carry_line_and_field() {
        let mut v = validator(
            Entity::Contacts,
            &["email", "phone", "dnd", "dateOfBirth", "Favourite"],
        );
        assert_eq!(v.plan.unknown, ["Favourite"]);
        let errs = v
            .check(&rec(7, &["bad@", "12", "perhaps", "31/12/1990", ""]))
            .unwrap_err();
        let fields: Vec<_> = errs
            .iter()
            .map(|p| (p.line, p.field.clone().unwrap(), p.reason))
            .collect();
        assert_eq!(
            fields,
            [
                (7, "email".into(), Reason::InvalidEmail),
                (7, "phone".into(), Reason::InvalidPhone),
                (7, "dnd".into(), Reason::InvalidBoolean),
                (7, "dateOfBirth".into(), Reason::InvalidDate),
            ]
        );
        let errs = v.check(&rec(8, &["", "", "", "", ""])).unwrap_err();
        assert_eq!(errs[0].reason, Reason::NoEmailOrPhone);
    }

    fn place_all(mode: OnDuplicate, rows: &[(u64, &[&str])]) -> (Vec<Place>, Repeats, Validator) {
        let mut v = validator(
            Entity::Contacts,
            &[
                "id",
                "email",
                "phone",
                "firstName",
                "tags",
                "customField.cf1",
            ],
        );
        let mut g = Grouper::new(mode);
        let places = rows
            .iter()
            .map(|(line, cells)| match v.check(&rec(*line, cells)).unwrap() {
                Row::Contact(c) => g.place(&c),
                Row::Child(_) => unreachable!(),
            })
            .collect();
        (places, g.finish(), v)
    }

    #[test]
    fn in_file_duplicates_fail_naming_the_first_line() {
        let rows: &[(u64, &[&str])] = &[
            (2, &["", "A@x.io", "", "", "", ""]),
            (3, &["", "b@x.io", "5550109999", "", "", ""]),
            (4, &["", "a@X.io", "", "", "", ""]),
            (5, &["", "c@x.io", "+1 555 010 9999", "", "", ""]),
        ];
        let (places, _, _) = place_all(OnDuplicate::Fail, rows);
        assert_eq!(places[..2], [Place::First, Place::First]);
        let Place::Rejected(p) = &places[2] else {
            panic!("{places:?}")
        };
        assert_eq!(p.reason, Reason::DuplicateInFile);
        assert!(p.message.contains("line 2"), "{}", p.message);
        let Place::Rejected(p) = &places[3] else {
            panic!("{places:?}")
        };
        assert!(
            p.message.contains("line 3") && p.field.as_deref() == Some("phone"),
            "{p:?}"
        );
    }

    #[test]
    fn in_file_duplicates_merge_in_file_order_under_the_first_line() {
        let rows: &[(u64, &[&str])] = &[
            (2, &["", "a@x.io", "", "Ann", "vip", "red"]),
            (3, &["", "z@x.io", "", "Zed", "", ""]),
            (5, &["", "A@X.IO", "+44 7700 900123", "", "new, vip", ""]),
            // Joins through the phone the row above brought to the group.
            (7, &["", "", "+447700900123", "Anna", "", "blue"]),
        ];
        let (places, mut repeats, mut v) = place_all(OnDuplicate::Update, rows);
        assert_eq!(
            places,
            [
                Place::First,
                Place::First,
                Place::Merged { into: 2 },
                Place::Merged { into: 2 }
            ]
        );
        assert_eq!(repeats.groups, BTreeMap::from([(2, vec![5, 7])]));
        for (line, cells) in rows {
            if repeats.wants(*line) {
                repeats.collect(*line, v.check(&rec(*line, cells)).unwrap());
            }
        }
        assert!(!repeats.written(5) && !repeats.written(7) && repeats.written(2));
        let first = v.check(&rec(2, rows[0].1)).unwrap();
        let Row::Contact(m) = repeats.take(2, first) else {
            panic!()
        };
        assert_eq!(m.line, 2);
        assert_eq!(
            m.key(),
            "email:a@x.io|phone:+447700900123",
            "the journal key names what the one create sends (undo looks it up by that)"
        );
        assert_eq!(m.email.as_deref(), Some("A@X.IO"));
        assert_eq!(m.phone.as_deref(), Some("+447700900123"));
        assert_eq!(m.fields["firstName"], "Anna");
        assert_eq!(m.tags, ["vip", "new"]);
        assert_eq!(m.custom, [("cf1".to_owned(), Value::String("blue".into()))]);
    }

    #[test]
    fn control_characters_spelled_as_json_escapes_are_rejected_too() {
        let mut v = validator(
            Entity::Contacts,
            &["email", "tags", "dndSettings", "firstName"],
        );
        let errs = v
            .check(&rec(
                2,
                &[
                    "a@x.io",
                    r#"["ok","b\u0000"]"#,
                    r#"{"SMS\u001b":{}}"#,
                    "Ann",
                ],
            ))
            .unwrap_err();
        let got: Vec<_> = errs
            .iter()
            .map(|p| (p.field.as_deref().unwrap(), p.reason))
            .collect();
        assert_eq!(
            got,
            [
                ("tags", Reason::ControlCharacter),
                ("dndSettings", Reason::ControlCharacter)
            ]
        );
        assert!(errs[0].message.contains("U+0000"), "{}", errs[0].message);
        assert!(v
            .check(&rec(3, &["b@x.io", r#"["a\tb"]"#, "", "x"]))
            .is_ok());
    }

    #[test]
    fn in_file_duplicates_merge_keeps_an_earlier_cell_over_a_later_constant() {
        let m = Mapping::parse("[constants]\nsource = \"crm\"\ncity = \"Paris\"\n").unwrap();
        let headers = ["email", "source", "city"].map(String::from);
        let plan = ColumnPlan::new(Entity::Contacts, &headers, &m);
        let mut v = Validator::new(plan, Rules::default());
        let row = |v: &mut Validator, line, cells: &[&str]| match v.check(&rec(line, cells)) {
            Ok(Row::Contact(c)) => c,
            other => panic!("{other:?}"),
        };
        let mut first = row(&mut v, 2, &["a@x.io", "web", ""]);
        first.merge(row(&mut v, 3, &["a@x.io", "", "Rome"]));
        assert_eq!(
            first.fields["source"], "web",
            "a constant does not replace a cell"
        );
        assert_eq!(
            first.fields["city"], "Rome",
            "a later cell replaces a constant"
        );
    }

    #[test]
    fn in_file_duplicates_linking_two_people_are_ambiguous() {
        let rows: &[(u64, &[&str])] = &[
            (2, &["", "a@x.io", "", "", "", ""]),
            (3, &["", "b@x.io", "+15550109999", "", "", ""]),
            (4, &["", "A@x.io", "+15550109999", "", "", ""]),
            (5, &["id1", "c@x.io", "", "", "", ""]),
            (6, &["id2", "c@x.io", "", "", "", ""]),
            (7, &["id1", "", "", "Cy", "", ""]),
        ];
        for mode in [OnDuplicate::Update, OnDuplicate::Skip] {
            let (places, repeats, _) = place_all(mode, rows);
            let Place::Rejected(p) = &places[2] else {
                panic!("{places:?}")
            };
            assert!(
                p.message.contains("line 2") && p.message.contains("line 3"),
                "{}",
                p.message
            );
            let Place::Rejected(p) = &places[4] else {
                panic!("{places:?}")
            };
            assert!(
                p.message.contains("id id2") && p.message.contains("id1"),
                "{}",
                p.message
            );
            assert!(!repeats.written(4) && !repeats.written(6));
            assert_ne!(places[5], Place::First, "same id as line 5");
        }
        let (places, _, _) = place_all(OnDuplicate::Skip, &rows[3..]);
        assert_eq!(places[2], Place::Skipped { first: 5 });
    }

    #[test]
    fn export_rows_become_create_and_update_bodies() {
        let mut v = validator(
            Entity::Contacts,
            &[
                "id",
                "locationId",
                "email",
                "tags",
                "customFields",
                "dateAdded",
                "customField.cf9",
            ],
        );
        assert!(v.plan.unknown.is_empty());
        let row = v
            .check(&rec(
                2,
                &[
                    "abc",
                    "OTHER",
                    " x@y.io ",
                    "[\"a\",\"b\"]",
                    "[{\"id\":\"cf1\",\"value\":{\"amount\":1}}]",
                    "2024-01-01T00:00:00.000Z",
                    " blue ",
                ],
            ))
            .unwrap();
        let Row::Contact(c) = row else { panic!() };
        assert_eq!(
            c.id, None,
            "an id from another location is not an update target"
        );
        assert_eq!(c.source_id.as_deref(), Some("abc"));
        let body = c.create_body("L1", "field_value");
        assert_eq!(
            body,
            serde_json::json!({"email":"x@y.io","locationId":"L1","tags":["a","b"],"customFields":[{"id":"cf9","field_value":"blue"},{"id":"cf1","field_value":{"amount":1}}]})
        );
        let upd = c.update_body("value").unwrap();
        assert!(upd.get("locationId").is_none() && upd.get("tags").is_none());
        let mut with_company = c.clone();
        with_company
            .fields
            .insert("companyName".into(), "Acme".into());
        assert!(with_company
            .update_body("value")
            .unwrap()
            .get("companyName")
            .is_none());
    }

    #[test]
    fn plan_names_the_fields_an_update_cannot_set() {
        let m = Mapping::parse("[constants]\ngender=\"female\"\n").unwrap();
        let headers = ["email", "companyName", "firstName"].map(String::from);
        let plan = ColumnPlan::new(Entity::Contacts, &headers, &m);
        assert_eq!(plan.create_only_fields(), ["companyName", "gender"]);
        let plain = ColumnPlan::new(Entity::Contacts, &headers[..1], &Mapping::default());
        assert!(plain.create_only_fields().is_empty());
    }

    #[test]
    fn mapping_constants_and_tags() {
        let m = Mapping::parse(
            "tags=[\"imported\"]\n[columns]\n\"E-mail\"=\"email\"\n[constants]\nsource=\"crm\"\n",
        )
        .unwrap();
        let plan = ColumnPlan::new(
            Entity::Contacts,
            &["E-mail".to_string(), "tags".to_string()],
            &m,
        );
        let mut v = Validator::new(plan, Rules::default());
        let Row::Contact(c) = v.check(&rec(2, &["a@b.co", "x, imported"])).unwrap() else {
            panic!()
        };
        assert_eq!(c.tags, ["x", "imported"]);
        assert_eq!(c.fields["source"], "crm");
    }

    #[test]
    fn task_rows() {
        let mut v = validator(Entity::Tasks, &["email", "title", "dueDate", "completed"]);
        let Row::Child(t) = v
            .check(&rec(2, &["a@b.co", "Call", "2024-05-01", "yes"]))
            .unwrap()
        else {
            panic!()
        };
        assert!(t.completed);
        assert_eq!(t.body["dueDate"], "2024-05-01T00:00:00.000Z");
        assert_eq!(t.body["completed"], false);
        let e = v.check(&rec(3, &["a@b.co", "", "soon", ""])).unwrap_err();
        assert_eq!(e.len(), 2);
    }

    /// Regression (issue 12): `2021-02-31` was accepted as a date of birth, and as a due date
    /// it was sent as March 3, because the date parser rolled impossible days over.
    #[test]
    fn impossible_calendar_dates_are_rejected_as_invalid_dates() {
        let reasons = |errs: Vec<Problem>| -> Vec<(String, Reason)> {
            errs.into_iter()
                .map(|p| (p.field.unwrap_or_default(), p.reason))
                .collect()
        };
        let mut v = validator(Entity::Contacts, &["email", "dateOfBirth"]);
        for (line, bad) in [(2, "2021-02-31"), (3, "1990-04-31"), (4, "2023-02-29")] {
            let email = format!("p{line}@b.co");
            let errs = v.check(&rec(line, &[&email, bad])).unwrap_err();
            assert_eq!(
                reasons(errs),
                [("dateOfBirth".to_owned(), Reason::InvalidDate)],
                "{bad}"
            );
        }
        assert!(v.check(&rec(5, &["p5@b.co", "2024-02-29"])).is_ok());
        let mut v = validator(Entity::Tasks, &["email", "title", "dueDate"]);
        for (line, bad) in [(2, "2021-02-31"), (3, "2024-02-30T09:00:00Z")] {
            let errs = v.check(&rec(line, &["a@b.co", "Call", bad])).unwrap_err();
            assert_eq!(
                reasons(errs),
                [("dueDate".to_owned(), Reason::InvalidDate)],
                "{bad}"
            );
        }
    }
}
