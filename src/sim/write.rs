//! Write handlers. Bodies are validated as strictly as the real API (an unknown property is
//! a 422), then applied to the overlay under the location's write lock. Every write moves the
//! contact's `dateUpdated`. Writes are rare next to reads, so `serde_json::Value` is fine here.
//!
//! A handler runs when the write is applied (after the configured write latency; see
//! `routes`), so `dateAdded` and `dateUpdated` are the apply time, and a handler that applied
//! its write emits the write's webhook then (see `webhooks` for which type each sends). The rule against
//! duplicates reads the primary state ([`View::Primary`]): it sees every applied write at
//! once, unlike the duplicate search. A location that allows duplicates never applies it.

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::gen::CfDef;
use super::http::{ApiError, Kind, Reply, Req};
use super::model::{CfValue, Contact, CustomField, Ms, Note, OrJson, Task, Text, F};
use super::now_ms;
use super::store::{write, Location, View};
use super::webhooks::EventType;

const CONTACT_FIELDS: &[&str] = &[
    "firstName",
    "lastName",
    "name",
    "email",
    "phone",
    "address1",
    "city",
    "state",
    "postalCode",
    "website",
    "timezone",
    "dnd",
    "dndSettings",
    "inboundDndSettings",
    "tags",
    "customFields",
    "source",
    "dateOfBirth",
    "country",
    "assignedTo",
];
/// `CreateContactDto` adds these to the fields `UpdateContactDto` shares.
const CREATE_ONLY: &[&str] = &["locationId", "gender", "companyName"];
const UPSERT_ONLY: &[&str] = &["createNewIfDuplicateAllowed"];
const TASK_FIELDS: &[&str] = &["title", "body", "dueDate", "completed", "assignedTo"];
const NOTE_FIELDS: &[&str] = &["userId", "body", "title", "color", "pinned"];
/// An update of only these sends `ContactDndUpdate` instead of `ContactUpdate`.
const DND_FIELDS: &[&str] = &["dnd", "dndSettings", "inboundDndSettings"];

/// The JSON object body; an empty body counts as `{}`.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::BadRequest(
            "Request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!(
            "Unexpected token in JSON body: {e}"
        ))),
    }
}

/// 422 listing every property not in `allowed` (any of the slices).
pub(crate) fn only(map: &Map<String, Value>, allowed: &[&[&str]]) -> Result<(), ApiError> {
    let unknown: Vec<String> = map
        .keys()
        .filter(|k| !allowed.iter().any(|a| a.contains(&k.as_str())))
        .map(|k| format!("property {k} should not exist"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(unknown))
    }
}

fn text(v: &Value, key: &str, errs: &mut Vec<String>) -> F<Text> {
    match v {
        Value::String(s) => F::Val(Text::Owned(s.clone())),
        Value::Null => F::Null,
        _ => {
            errs.push(format!("{key} must be a string"));
            F::Absent
        }
    }
}

fn string_list(v: &Value, key: &str, errs: &mut Vec<String>) -> Vec<Text> {
    let mut out: Vec<Text> = Vec::new();
    match v {
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) if !out.iter().any(|t| t == s) => out.push(s.clone().into()),
                    Value::String(_) => {}
                    _ => {
                        errs.push(format!("each value in {key} must be a string"));
                        break;
                    }
                }
            }
        }
        _ => errs.push(format!("{key} must be an array")),
    }
    out
}

fn boolean(v: &Value, key: &str, errs: &mut Vec<String>) -> Option<bool> {
    let b = v.as_bool();
    if b.is_none() {
        errs.push(format!("{key} must be a boolean value"));
    }
    b
}

/// Applies the contact properties of a create, update or upsert body to `c`.
fn apply_contact(
    c: &mut Contact,
    map: &Map<String, Value>,
    defs: &[CfDef],
) -> Result<(), ApiError> {
    let mut errs = Vec::new();
    for (key, v) in map {
        let e = &mut errs;
        match key.as_str() {
            "firstName" => c.first_name = text(v, key, e),
            "lastName" => c.last_name = text(v, key, e),
            "email" => {
                c.email = text(v, key, e);
                if c.email
                    .get()
                    .is_some_and(|m| !m.is_empty() && !m.contains('@'))
                {
                    e.push("email must be an email".into());
                }
            }
            "phone" => c.phone = text(v, key, e),
            "address1" => c.address1 = text(v, key, e),
            "city" => c.city = text(v, key, e),
            "state" => c.state = text(v, key, e),
            "postalCode" => c.postal_code = text(v, key, e),
            "website" => c.website = text(v, key, e),
            "timezone" => c.timezone = text(v, key, e),
            "source" => c.source = text(v, key, e),
            "dateOfBirth" => c.date_of_birth = text(v, key, e),
            "country" => c.country = text(v, key, e),
            "companyName" => c.company_name = text(v, key, e),
            "assignedTo" => c.assigned_to = text(v, key, e),
            "gender" => {
                text(v, key, e);
            }
            "dnd" => c.dnd = boolean(v, key, e).map_or(F::Absent, F::Val),
            "dndSettings" => match v {
                Value::Object(_) => c.dnd_settings = F::Val(OrJson::Json(v.clone())),
                Value::Null => c.dnd_settings = F::Null,
                _ => e.push("dndSettings must be an object".into()),
            },
            "inboundDndSettings" if !v.is_object() && !v.is_null() => {
                e.push("inboundDndSettings must be an object".into())
            }
            "tags" => c.tags = F::Val(string_list(v, key, e)),
            "customFields" => set_custom_fields(c, v, defs, e),
            _ => {}
        }
    }
    if let Some(name) = map.get("name") {
        if let F::Val(full) = text(name, "name", &mut errs) {
            let (first, last) = full.split_once(' ').unwrap_or((&full, ""));
            if !map.contains_key("firstName") {
                c.first_name = F::Val(first.to_string().into());
            }
            if !map.contains_key("lastName") && !last.is_empty() {
                c.last_name = F::Val(last.to_string().into());
            }
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::Invalid(errs));
    }
    c.refresh_derived();
    Ok(())
}

/// `customFields: [{id | key, field_value | value | fieldValue}]`; a null or empty value
/// clears the field.
fn set_custom_fields(c: &mut Contact, v: &Value, defs: &[CfDef], errs: &mut Vec<String>) {
    let Some(entries) = v.as_array() else {
        errs.push("customFields must be an array".into());
        return;
    };
    let mut fields = c.custom_fields.get().cloned().unwrap_or_default();
    for (i, entry) in entries.iter().enumerate() {
        let by_key = |k: &str| {
            defs.iter()
                .find(|d| d.key == k || d.key.strip_prefix("contact.") == Some(k))
                .map(|d| d.id.clone())
        };
        let id = match (
            entry.get("id").and_then(Value::as_str),
            entry.get("key").and_then(Value::as_str),
        ) {
            (Some(id), _) => Some(id.to_string()),
            (None, Some(k)) => by_key(k),
            _ => None,
        };
        let Some(id) = id else {
            errs.push(format!("customFields.{i} must have a known id or key"));
            continue;
        };
        let value = ["field_value", "value", "fieldValue"]
            .iter()
            .find_map(|k| entry.get(*k));
        fields.retain(|f| f.id != id);
        let value = match value {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) if s.is_empty() => continue,
            Some(Value::String(s)) => CfValue::Str(s.clone().into()),
            Some(Value::Bool(b)) => CfValue::Bool(*b),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => CfValue::Int(i),
                None => CfValue::Float(n.as_f64().unwrap_or(0.0)),
            },
            Some(other) => CfValue::Json(other.clone()),
        };
        fields.push(CustomField {
            id: id.into(),
            value,
        });
    }
    c.custom_fields = F::Val(fields);
}

/// Moves `dateUpdated` to now, strictly forward.
fn touch(c: &mut Contact) {
    c.date_updated = Ms(now_ms().max(c.date_updated.0 + 1));
}

fn duplicate_error(l: &Location, slot: u32, field: &'static str) -> ApiError {
    let c = l.contact(slot);
    ApiError::Duplicate {
        contact_id: c.id.clone(),
        name: c.display_name(),
        field,
    }
}

pub(crate) fn new_contact(location_id: &str) -> Contact {
    let now = now_ms();
    Contact {
        date_added: Ms(now),
        date_updated: Ms(now),
        location_id: location_id.to_string(),
        dnd: F::Val(false),
        kind: F::Val("lead".into()),
        tags: F::Val(Vec::new()),
        custom_fields: F::Val(Vec::new()),
        followers: F::Val(Vec::new()),
        additional_emails: F::Val(Vec::new()),
        additional_phones: F::Val(Vec::new()),
        ..Contact::default()
    }
}

fn body_location<'a>(
    req: &Req<'a>,
    map: &Map<String, Value>,
) -> Result<&'a std::sync::RwLock<Location>, ApiError> {
    match map.get("locationId") {
        Some(Value::String(id)) if !id.is_empty() => {
            req.sim.store.location(id).ok_or(ApiError::Forbidden)
        }
        _ => Err(ApiError::invalid("locationId should not be empty")),
    }
}

/// Checks for a duplicate of `c` (unless the location allows them), then adds it; returns
/// the reply body's contact.
fn insert(l: &mut Location, mut c: Contact, allow_duplicates: bool) -> Result<Value, ApiError> {
    let email = c.email.get().map(|e| e.to_string());
    let phone = c.phone.get().map(|p| p.to_string());
    let found = (!allow_duplicates)
        .then(|| {
            l.find_duplicate(
                email.as_deref(),
                phone.as_deref(),
                None,
                View::Primary,
                false,
            )
        })
        .flatten();
    if let Some((slot, field)) = found {
        return Err(duplicate_error(l, slot, field));
    }
    let slot = l.create(|id| {
        c.id = id;
        c
    });
    Ok(json!(&*l.contact(slot)))
}

/// `POST /contacts/`
pub(crate) fn create(req: &Req<'_>) -> Result<Reply, ApiError> {
    let map = object(req.body)?;
    only(&map, &[CONTACT_FIELDS, CREATE_ONLY])?;
    let lock = body_location(req, &map)?;
    let mut l = write(lock);
    let mut c = new_contact(l.id());
    apply_contact(&mut c, &map, l.gen.custom_fields())?;
    let contact = insert(&mut l, c, req.sim.config.allow_duplicates)?;
    if let Some(h) = req.sim.hooks() {
        h.emit(EventType::ContactCreate, l.id(), &contact);
    }
    Ok(Reply::new(
        StatusCode::CREATED,
        &json!({"contact": contact, "traceId": req.sim.trace_id()}),
    ))
}

/// `POST /contacts/upsert`: updates the contact matching by email, else by phone, or creates.
/// Where duplicates are allowed, the oldest match is updated, and `createNewIfDuplicateAllowed:
/// true` always creates (as the spec describes).
pub(crate) fn upsert(req: &Req<'_>) -> Result<Reply, ApiError> {
    let map = object(req.body)?;
    only(&map, &[CONTACT_FIELDS, CREATE_ONLY, UPSERT_ONLY])?;
    let lock = body_location(req, &map)?;
    let mut l = write(lock);
    let email = map.get("email").and_then(Value::as_str);
    let phone = map.get("phone").and_then(Value::as_str);
    let trace_id = req.sim.trace_id();
    let allow = req.sim.config.allow_duplicates;
    let always_new = allow
        && map
            .get("createNewIfDuplicateAllowed")
            .and_then(Value::as_bool)
            == Some(true);
    let found = (!always_new)
        .then(|| l.find_duplicate(email, phone, None, View::Primary, allow))
        .flatten();
    match found {
        Some((slot, _)) => {
            let mut c = l.contact(slot).into_owned();
            apply_contact(&mut c, &map, l.gen.custom_fields())?;
            touch(&mut c);
            let contact = json!(&c);
            l.put_contact(slot, c);
            if let Some(h) = req.sim.hooks() {
                h.emit(EventType::ContactUpdate, l.id(), &contact);
            }
            Ok(Reply::ok(
                &json!({"new": false, "contact": contact, "traceId": trace_id}),
            ))
        }
        None => {
            let mut c = new_contact(l.id());
            apply_contact(&mut c, &map, l.gen.custom_fields())?;
            let contact = insert(&mut l, c, allow)?;
            if let Some(h) = req.sim.hooks() {
                h.emit(EventType::ContactCreate, l.id(), &contact);
            }
            Ok(Reply::new(
                StatusCode::CREATED,
                &json!({"new": true, "contact": contact, "traceId": trace_id}),
            ))
        }
    }
}

/// Runs `f` on the live contact the path names, under the write lock.
fn with_contact_mut<T>(
    req: &Req<'_>,
    f: impl FnOnce(&mut Location, u32) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let id = &req.route.id;
    let (lock, slot) = req
        .sim
        .store
        .locate(id)
        .ok_or_else(|| ApiError::contact_not_found(id))?;
    let mut l = write(lock);
    if !l.exists(slot) {
        return Err(ApiError::contact_not_found(id));
    }
    f(&mut l, slot)
}

/// `PUT /contacts/:id`: `tags` replace all tags.
pub(crate) fn update(req: &Req<'_>) -> Result<Reply, ApiError> {
    let map = object(req.body)?;
    only(&map, &[CONTACT_FIELDS])?;
    with_contact_mut(req, |l, slot| {
        let mut c = l.contact(slot).into_owned();
        apply_contact(&mut c, &map, l.gen.custom_fields())?;
        let email = map
            .contains_key("email")
            .then(|| c.email.get().map(|e| e.to_string()))
            .flatten();
        let phone = map
            .contains_key("phone")
            .then(|| c.phone.get().map(|p| p.to_string()))
            .flatten();
        let found = (!req.sim.config.allow_duplicates)
            .then(|| {
                l.find_duplicate(
                    email.as_deref(),
                    phone.as_deref(),
                    Some(slot),
                    View::Primary,
                    false,
                )
            })
            .flatten();
        if let Some((other, field)) = found {
            return Err(duplicate_error(l, other, field));
        }
        touch(&mut c);
        let contact = json!(&c);
        l.put_contact(slot, c);
        if let Some(h) = req.sim.hooks() {
            let dnd_only = !map.is_empty() && map.keys().all(|k| DND_FIELDS.contains(&k.as_str()));
            let ty = if dnd_only {
                EventType::ContactDndUpdate
            } else {
                EventType::ContactUpdate
            };
            h.emit(ty, l.id(), &contact);
        }
        Ok(Reply::ok(
            &json!({"succeded": true, "contact": contact, "traceId": req.sim.trace_id()}),
        ))
    })
}

/// `DELETE /contacts/:id`
pub(crate) fn delete(req: &Req<'_>) -> Result<Reply, ApiError> {
    with_contact_mut(req, |l, slot| {
        if let Some(h) = req.sim.hooks() {
            h.emit(EventType::ContactDelete, l.id(), &*l.contact(slot));
        }
        l.delete(slot);
        Ok(Reply::ok(
            &json!({"succeded": true, "traceId": req.sim.trace_id()}),
        ))
    })
}

/// `POST /contacts/:id/tags` adds (deduplicated); `DELETE` removes. Both answer all tags now.
pub(crate) fn tags(req: &Req<'_>) -> Result<Reply, ApiError> {
    let map = object(req.body)?;
    only(&map, &[&["tags"]])?;
    let mut errs = Vec::new();
    let given = match map.get("tags") {
        Some(v) => string_list(v, "tags", &mut errs),
        None => {
            errs.push("tags must be an array".into());
            Vec::new()
        }
    };
    if !errs.is_empty() {
        return Err(ApiError::Invalid(errs));
    }
    let adding = req.route.kind == Kind::AddTags;
    with_contact_mut(req, |l, slot| {
        let c = l.contact_mut(slot);
        let mut tags = c.tags.get().cloned().unwrap_or_default();
        if adding {
            for t in given {
                if !tags.contains(&t) {
                    tags.push(t);
                }
            }
        } else {
            tags.retain(|t| !given.contains(t));
        }
        c.tags = F::Val(tags.clone());
        touch(c);
        if let Some(h) = req.sim.hooks() {
            h.emit(EventType::ContactTagUpdate, &c.location_id, &*c);
        }
        let status = if adding {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(Reply::new(
            status,
            &json!({"tags": tags, "traceId": req.sim.trace_id()}),
        ))
    })
}

/// Task create, update, complete and delete.
pub(crate) fn task(req: &Req<'_>) -> Result<Reply, ApiError> {
    let kind = req.route.kind;
    let map = object(req.body)?;
    match kind {
        Kind::CompleteTask => only(&map, &[&["completed"]])?,
        Kind::DeleteTask => {}
        _ => only(&map, &[TASK_FIELDS])?,
    }
    let mut errs = Vec::new();
    if kind == Kind::CreateTask {
        for (k, what) in [
            ("title", "a string"),
            ("dueDate", "a string"),
            ("completed", "a boolean value"),
        ] {
            if map.get(k).is_none_or(Value::is_null) {
                errs.push(format!("{k} must be {what}"));
            }
        }
    }
    if kind == Kind::CompleteTask && map.get("completed").is_none() {
        errs.push("completed must be a boolean value".into());
    }
    let trace_id = req.sim.trace_id();
    let child = req.route.child.clone();
    let new_id = (kind == Kind::CreateTask).then(|| req.sim.new_child_id());
    let hooks = req.sim.hooks();
    with_contact_mut(req, |l, slot| {
        let contact_id = l.contact_id(slot);
        let location_id = l.id().to_owned();
        let emit = |ty: EventType, t: &Task| {
            if let Some(h) = hooks {
                h.emit(ty, &location_id, t);
            }
        };
        let tasks = &mut l.children_mut(slot).tasks;
        let not_found = || ApiError::BadRequest(format!("Task with id {child} not found"));
        let (status, body) = match kind {
            Kind::CreateTask => {
                let mut t = Task {
                    id: new_id.unwrap_or_default(),
                    title: F::Absent,
                    body: F::Absent,
                    assigned_to: F::Absent,
                    due_date: F::Absent,
                    completed: false,
                    contact_id,
                };
                apply_task(&mut t, &map, &mut errs);
                if !errs.is_empty() {
                    return Err(ApiError::Invalid(errs));
                }
                let body = json!({"task": &t, "traceId": trace_id});
                emit(EventType::TaskCreate, &t);
                tasks.push(t);
                (StatusCode::CREATED, body)
            }
            Kind::UpdateTask | Kind::CompleteTask => {
                let t = tasks
                    .iter_mut()
                    .find(|t| t.id == child)
                    .ok_or_else(not_found)?;
                let mut edited = t.clone();
                apply_task(&mut edited, &map, &mut errs);
                if !errs.is_empty() {
                    return Err(ApiError::Invalid(errs));
                }
                let was_completed = t.completed;
                *t = edited;
                // Completing (or confirming completion on the completion route) is a
                // TaskComplete; any other edit a TaskUpdate.
                let completes = t.completed && (kind == Kind::CompleteTask || !was_completed);
                emit(
                    if completes {
                        EventType::TaskComplete
                    } else {
                        EventType::TaskUpdate
                    },
                    &*t,
                );
                (StatusCode::OK, json!({"task": &*t, "traceId": trace_id}))
            }
            _ => {
                let at = tasks
                    .iter()
                    .position(|t| t.id == child)
                    .ok_or_else(not_found)?;
                let gone = tasks.remove(at);
                emit(EventType::TaskDelete, &gone);
                (
                    StatusCode::OK,
                    json!({"succeded": true, "traceId": trace_id}),
                )
            }
        };
        touch(l.contact_mut(slot));
        l.sync_task_count(slot);
        Ok(Reply::new(status, &body))
    })
}

fn apply_task(t: &mut Task, map: &Map<String, Value>, errs: &mut Vec<String>) {
    for (k, v) in map {
        match k.as_str() {
            "title" => t.title = text(v, k, errs),
            "body" => t.body = text(v, k, errs),
            "assignedTo" => t.assigned_to = text(v, k, errs),
            "dueDate" => {
                t.due_date = text(v, k, errs);
                let valid = t
                    .due_date
                    .get()
                    .is_none_or(|d| crate::timefmt::parse_iso_millis(d).is_some());
                if !valid {
                    errs.push("dueDate must be a valid ISO 8601 date string".into());
                }
            }
            "completed" => t.completed = boolean(v, k, errs).unwrap_or(t.completed),
            _ => {}
        }
    }
}

/// Note create, update and delete.
pub(crate) fn note(req: &Req<'_>) -> Result<Reply, ApiError> {
    let kind = req.route.kind;
    let map = object(req.body)?;
    if kind != Kind::DeleteNote {
        only(&map, &[NOTE_FIELDS])?;
    }
    let mut errs = Vec::new();
    if kind == Kind::CreateNote && !map.get("body").is_some_and(Value::is_string) {
        errs.push("body must be a string".into());
    }
    let trace_id = req.sim.trace_id();
    let child = req.route.child.clone();
    let new_id = (kind == Kind::CreateNote).then(|| req.sim.new_child_id());
    let hooks = req.sim.hooks();
    with_contact_mut(req, |l, slot| {
        let contact_id = l.contact_id(slot);
        let location_id = l.id().to_owned();
        let emit = |ty: EventType, n: &Note| {
            if let Some(h) = hooks {
                h.emit(ty, &location_id, n);
            }
        };
        let notes = &mut l.children_mut(slot).notes;
        let not_found = || ApiError::BadRequest(format!("Note with id {child} not found"));
        let (status, body) = match kind {
            Kind::CreateNote => {
                let mut n = Note {
                    id: new_id.unwrap_or_default(),
                    body: F::Absent,
                    user_id: F::Absent,
                    date_added: Ms(now_ms()),
                    contact_id,
                    title: F::Absent,
                    color: F::Absent,
                    pinned: F::Absent,
                };
                apply_note(&mut n, &map, &mut errs);
                if !errs.is_empty() {
                    return Err(ApiError::Invalid(errs));
                }
                let body = json!({"note": &n, "traceId": trace_id});
                emit(EventType::NoteCreate, &n);
                notes.push(n);
                (StatusCode::CREATED, body)
            }
            Kind::UpdateNote => {
                let n = notes
                    .iter_mut()
                    .find(|n| n.id == child)
                    .ok_or_else(not_found)?;
                let mut edited = n.clone();
                apply_note(&mut edited, &map, &mut errs);
                if !errs.is_empty() {
                    return Err(ApiError::Invalid(errs));
                }
                *n = edited;
                emit(EventType::NoteUpdate, &*n);
                (StatusCode::OK, json!({"note": &*n, "traceId": trace_id}))
            }
            _ => {
                let at = notes
                    .iter()
                    .position(|n| n.id == child)
                    .ok_or_else(not_found)?;
                let gone = notes.remove(at);
                emit(EventType::NoteDelete, &gone);
                (
                    StatusCode::OK,
                    json!({"succeded": true, "traceId": trace_id}),
                )
            }
        };
        touch(l.contact_mut(slot));
        Ok(Reply::new(status, &body))
    })
}

fn apply_note(n: &mut Note, map: &Map<String, Value>, errs: &mut Vec<String>) {
    for (k, v) in map {
        match k.as_str() {
            "body" => n.body = text(v, k, errs),
            "userId" => n.user_id = text(v, k, errs),
            "title" => n.title = text(v, k, errs),
            "color" => n.color = text(v, k, errs),
            "pinned" => n.pinned = boolean(v, k, errs).map_or(F::Absent, F::Val),
            _ => {}
        }
    }
}
