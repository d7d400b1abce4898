//! Location-wide reads: the custom field definitions, and the children of every contact of
//! a location without one request per contact.
//!
//! - `POST /locations/:locationId/tasks/search` serves the very task objects
//!   `GET /contacts/:id/tasks` serves, contacts in listing order, each one's tasks in order,
//!   with offset paging (`skip`, `limit`). Without filters a page costs a binary search in
//!   the location's task prefix counts (see `Location::task_prefix`) plus the page's
//!   contacts; with filters it scans (`contactId` batches scan only those contacts).
//!   Offset paging shifts when contacts or tasks are written meanwhile, as on the real API:
//!   rows can be missed or repeated, which the client must detect.
//! - `GET /calendars/` lists the location's calendars; `GET /calendars/events` serves the
//!   appointments `GET /contacts/:id/appointments` serves, of one calendar (or user or
//!   group), whose start lies in the window, by start time, from an index built once per
//!   location. Start times without a zone are read as UTC.

use serde::Serialize;
use serde_json::Value;

use super::http::{ApiError, Env1, Reply, Req};
use super::model::{Event, Task};
use super::read::location;
use super::store::{read, Location};
use super::write::{object, only};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CustomFieldDef<'a> {
    id: &'a str,
    name: &'a str,
    field_key: &'a str,
    placeholder: &'a str,
    data_type: &'static str,
    position: usize,
    picklist_options: &'static [&'static str],
    location_id: &'a str,
    model: &'static str,
}

/// `GET /locations/:locationId/customFields?model=contact`: every field the location's
/// contacts carry in `customFields` (all generated contacts draw from these definitions).
/// `model=opportunity` lists none: the simulator has no opportunities.
pub(crate) fn custom_fields(req: &Req<'_>) -> Result<Reply, ApiError> {
    let contact = match req.param("model").filter(|m| !m.is_empty()) {
        None | Some("contact" | "all") => true,
        Some("opportunity") => false,
        Some(_) => {
            return Err(ApiError::invalid(
                "model must be one of the following values: contact, opportunity, all",
            ))
        }
    };
    let lock = req
        .sim
        .store
        .location(&req.route.id)
        .ok_or(ApiError::Forbidden)?;
    let l = read(lock);
    let defs = l.gen.custom_fields();
    let fields: Vec<CustomFieldDef<'_>> = defs
        .iter()
        .enumerate()
        .filter(|_| contact)
        .map(|(i, d)| CustomFieldDef {
            id: &d.id,
            name: d.name,
            field_key: &d.key,
            placeholder: d.name,
            data_type: d.data_type(),
            position: i * 50,
            picklist_options: d.picklist(),
            location_id: l.id(),
            model: "contact",
        })
        .collect();
    Ok(Reply::ok(&Env1 {
        key: "customFields",
        value: &fields,
    }))
}

/// The body keys of the task search (`TaskSearchParamsDto`).
const TASK_KEYS: &[&str] = &[
    "contactId",
    "completed",
    "assignedTo",
    "query",
    "limit",
    "skip",
    "businessId",
];

/// A validated task search.
#[derive(Default)]
struct TaskSearch {
    contacts: Option<Vec<String>>,
    completed: Option<bool>,
    assigned_to: Option<Vec<String>>,
    /// Lower case; matched in title and body.
    query: Option<String>,
    business: Option<String>,
    limit: Option<f64>,
    skip: Option<f64>,
}

impl TaskSearch {
    fn parse(body: &[u8]) -> Result<TaskSearch, ApiError> {
        let map = object(body)?;
        only(&map, &[TASK_KEYS])?;
        let mut errs = Vec::new();
        let mut s = TaskSearch::default();
        for (k, v) in map.iter().filter(|(_, v)| !v.is_null()) {
            match k.as_str() {
                "contactId" => s.contacts = strings(v, k, &mut errs),
                "assignedTo" => s.assigned_to = strings(v, k, &mut errs),
                "completed" => match v.as_bool() {
                    Some(b) => s.completed = Some(b),
                    None => errs.push("completed must be a boolean value".into()),
                },
                "query" | "businessId" => match v.as_str() {
                    Some(q) if k == "query" => {
                        s.query = Some(q.trim().to_lowercase()).filter(|q| !q.is_empty())
                    }
                    Some(b) => s.business = Some(b.to_string()),
                    None => errs.push(format!("{k} must be a string")),
                },
                _ => match v.as_f64() {
                    Some(n) if k == "skip" && n < 0.0 => {
                        errs.push("skip must not be less than 0".into())
                    }
                    Some(n) if k == "skip" => s.skip = Some(n),
                    Some(n) => s.limit = Some(n),
                    None => errs.push(format!(
                        "{k} must be a number conforming to the specified constraints"
                    )),
                },
            }
        }
        if errs.is_empty() {
            Ok(s)
        } else {
            Err(ApiError::Invalid(errs))
        }
    }

    fn filters(&self) -> bool {
        self.contacts.is_some()
            || self.completed.is_some()
            || self.assigned_to.is_some()
            || self.query.is_some()
            || self.business.is_some()
    }

    fn matches(&self, t: &Task) -> bool {
        let text = |f: &super::model::F<super::model::Text>, q: &str| {
            f.get().is_some_and(|v| v.to_lowercase().contains(q))
        };
        self.completed.is_none_or(|c| t.completed == c)
            && self.assigned_to.as_ref().is_none_or(|users| {
                t.assigned_to
                    .get()
                    .is_some_and(|u| users.iter().any(|x| x == u))
            })
            && self
                .query
                .as_deref()
                .is_none_or(|q| text(&t.title, q) || text(&t.body, q))
    }
}

/// An array of strings, or a 422 message.
fn strings(v: &Value, key: &str, errs: &mut Vec<String>) -> Option<Vec<String>> {
    let items = v.as_array().and_then(|a| {
        a.iter()
            .map(|i| i.as_str().map(String::from))
            .collect::<Option<Vec<String>>>()
    });
    if items.is_none() {
        errs.push(format!("each value in {key} must be a string"));
    }
    items
}

/// `POST /locations/:locationId/tasks/search`
pub(crate) fn tasks(req: &Req<'_>) -> Result<Reply, ApiError> {
    let search = TaskSearch::parse(req.body)?;
    let lock = req
        .sim
        .store
        .location(&req.route.id)
        .ok_or(ApiError::Forbidden)?;
    let max = req.sim.config.max_page.max(1);
    // Fractions are truncated; whatever is asked, at most `max` rows.
    let limit = (search.limit.unwrap_or(25.0).max(1.0) as usize).min(max);
    let skip = search.skip.unwrap_or(0.0) as usize;
    let l = read(lock);
    let tasks = if search.filters() {
        filtered_tasks(&l, &search, skip, limit)
    } else {
        task_page(&l, skip, limit)
    };
    Ok(Reply::ok(&Env1 {
        key: "tasks",
        value: &tasks,
    }))
}

/// Tasks `skip..skip + limit` of the whole location, through the prefix counts.
fn task_page(l: &Location, skip: usize, limit: usize) -> Vec<Task> {
    let prefix = l.task_prefix();
    let listing = l.listing();
    let mut out = Vec::new();
    if skip >= prefix.last().map_or(0, |&n| n as usize) {
        return out;
    }
    // The contact holding task number `skip`: prefix[p] <= skip < prefix[p + 1].
    let mut p = prefix.partition_point(|&n| n as usize <= skip) - 1;
    let mut offset = skip - prefix[p] as usize;
    while out.len() < limit && p < listing.len() {
        if prefix[p + 1] > prefix[p] {
            let ch = l.children(listing[p]);
            let want = limit - out.len();
            out.extend(ch.tasks.iter().skip(offset).take(want).cloned());
        }
        offset = 0;
        p += 1;
    }
    out
}

/// A page of the tasks that pass the search's filters, scanning the candidate contacts.
fn filtered_tasks(l: &Location, s: &TaskSearch, skip: usize, limit: usize) -> Vec<Task> {
    let store_slot = |id: &str| {
        let (loc, slot) = l.gen.codec.decode(id)?;
        (loc == l.gen.loc && l.exists(slot)).then_some(slot)
    };
    // Candidate contacts, in listing order.
    let mut slots: Vec<u32> = match (&s.contacts, &s.business) {
        (Some(ids), _) => {
            let mut by_position: Vec<(usize, u32)> = ids
                .iter()
                .filter_map(|id| store_slot(id))
                .filter_map(|slot| Some((l.listing_position(slot)?, slot)))
                .collect();
            by_position.sort_unstable();
            by_position.dedup();
            by_position.into_iter().map(|(_, slot)| slot).collect()
        }
        (None, Some(b)) => l.business(b),
        (None, None) => l.listing().to_vec(),
    };
    if let (Some(b), Some(_)) = (&s.business, &s.contacts) {
        let members = l.business(b);
        slots.retain(|s| members.contains(s));
    }
    slots
        .into_iter()
        .flat_map(|slot| {
            let ch = l.children(slot);
            ch.tasks
                .iter()
                .filter(|t| s.matches(t))
                .cloned()
                .collect::<Vec<_>>()
        })
        .skip(skip)
        .take(limit)
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Calendar<'a> {
    id: &'a str,
    location_id: &'a str,
    group_id: String,
    name: String,
    description: &'static str,
    slug: String,
    calendar_type: &'static str,
    is_active: bool,
}

/// `GET /calendars/?locationId=L[&groupId=G]`: the location's calendars (every calendar an
/// appointment of the location is in).
pub(crate) fn calendars(req: &Req<'_>) -> Result<Reply, ApiError> {
    let lock = location(req)?;
    let l = read(lock);
    let group = l.gen.group_id();
    let wanted = req
        .param("groupId")
        .filter(|g| !g.is_empty())
        .is_none_or(|g| g == group);
    let names = [
        "Discovery calls",
        "Demos, \"product\" tours",
        "Onboarding ☕",
    ];
    let calendars: Vec<Calendar<'_>> = l
        .gen
        .calendars()
        .iter()
        .enumerate()
        .filter(|_| wanted)
        .map(|(i, id)| Calendar {
            id,
            location_id: l.id(),
            group_id: group.clone(),
            name: names[i % names.len()].to_string(),
            description: "Simulated calendar",
            slug: format!("calendar-{i}"),
            calendar_type: "round_robin",
            is_active: true,
        })
        .collect();
    Ok(Reply::ok(&Env1 {
        key: "calendars",
        value: &calendars,
    }))
}

/// `GET /calendars/events?locationId&calendarId|userId|groupId&startTime&endTime`
pub(crate) fn events(req: &Req<'_>) -> Result<Reply, ApiError> {
    let mut errs = Vec::new();
    let mut millis = |name: &str| match req.param(name).map(str::trim).filter(|v| !v.is_empty()) {
        None => {
            errs.push(format!("{name} should not be empty"));
            None
        }
        Some(v) => {
            let ms = v.parse::<i64>().ok();
            if ms.is_none() {
                errs.push(format!(
                    "{name} must be epoch milliseconds (a string of digits)"
                ));
            }
            ms
        }
    };
    let (start, end) = (millis("startTime"), millis("endTime"));
    let param = |name: &str| req.param(name).filter(|v| !v.is_empty());
    let (calendar, user, group) = (param("calendarId"), param("userId"), param("groupId"));
    if calendar.is_none() && user.is_none() && group.is_none() {
        errs.push("Either of calendarId, userId or groupId is required".into());
    }
    let lock = location(req)?;
    if !errs.is_empty() {
        return Err(ApiError::Invalid(errs));
    }
    let (Some(start), Some(end)) = (start, end) else {
        return Err(ApiError::invalid("startTime and endTime are required"));
    };
    let l = read(lock);
    let index = l.events_by_start();
    let from = index.partition_point(|e| e.0 < start);
    let to = index.partition_point(|e| e.0 <= end).max(from);
    let matches = |e: &Event| {
        calendar.is_none_or(|c| e.calendar_id == c)
            && group.is_none_or(|g| e.group_id == g)
            && user.is_none_or(|u| e.assigned_user_id.get().is_some_and(|x| x == u))
    };
    let events: Vec<Event> = index[from..to]
        .iter()
        .filter(|(_, slot, _)| l.exists(*slot))
        .filter_map(|&(_, slot, j)| l.children(slot).events.get(usize::from(j)).cloned())
        .filter(|e| matches(e))
        .collect();
    Ok(Reply::ok(&Env1 {
        key: "events",
        value: &events,
    }))
}
