//! `POST /contacts/search`, the successor of the deprecated `GET /contacts/`.
//!
//! It pages through the same per-location listing index as `GET /contacts/` (dateAdded
//! descending, ties by id ascending), from the `searchAfter` cursor `[dateAddedMs, id]` that
//! every served contact carries, so a page without filters costs a binary search plus the
//! page itself, whatever the location's size. `sort` may reverse the order (dateAdded
//! ascending, ties still by id ascending).
//!
//! A `dateUpdated` range filter or a `query` scans the whole location on every page, because
//! `total` counts every match: cheap for the filter (base contacts' dateUpdated is computed
//! once per location, see [`Location::updated`]), slow for `query` (it builds every contact),
//! which is fine for tests and not meant for benchmarks.
//!
//! The body is validated as the real API's DTO validation does: every problem is listed in
//! one 422, an unknown property is refused.

use std::borrow::Cow;
use std::ops::Range;

use serde::Serialize;
use serde_json::{Map, Value};

use super::http::{ApiError, Reply, Req};
use super::model::Contact;
use super::read::matches_query;
use super::store::{read, Location};
use super::write::{object, only};

/// The properties of the search body the simulator knows.
const KEYS: &[&str] = &[
    "locationId",
    "pageLimit",
    "searchAfter",
    "sort",
    "filters",
    "query",
    "page",
];
/// The largest `pageLimit` the API accepts.
pub(crate) const MAX_PAGE_LIMIT: i64 = 500;

/// A validated search request.
struct Search {
    location: String,
    limit: usize,
    /// The cursor: the `searchAfter` of the last contact of the previous page.
    after: Option<(i64, String)>,
    ascending: bool,
    filter: Option<Filter>,
    /// Lower-case substring of name, email or phone, as `GET /contacts/?query=`.
    query: Option<String>,
}

/// A `filters` tree. Only `dateUpdated` `range` conditions exist, so a leaf is its bounds.
#[derive(Debug)]
enum Filter {
    Range(Bounds),
    All(Vec<Filter>),
    Any(Vec<Filter>),
}

/// Epoch-ms bounds of a range condition.
#[derive(Debug, Default)]
struct Bounds {
    gte: Option<i64>,
    gt: Option<i64>,
    lte: Option<i64>,
    lt: Option<i64>,
}

impl Filter {
    fn matches(&self, updated: i64) -> bool {
        match self {
            Filter::Range(b) => {
                b.gte.is_none_or(|v| updated >= v)
                    && b.gt.is_none_or(|v| updated > v)
                    && b.lte.is_none_or(|v| updated <= v)
                    && b.lt.is_none_or(|v| updated < v)
            }
            Filter::All(fs) => fs.iter().all(|f| f.matches(updated)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(updated)),
        }
    }
}

/// A served contact: the object `GET /contacts/` serves plus its cursor.
#[derive(Serialize)]
struct Hit<'a> {
    #[serde(flatten)]
    contact: Cow<'a, Contact>,
    #[serde(rename = "searchAfter")]
    search_after: (i64, String),
}

#[derive(Serialize)]
struct Page<'a> {
    contacts: Vec<Hit<'a>>,
    total: usize,
}

/// `POST /contacts/search`
pub(crate) fn search(req: &Req<'_>) -> Result<Reply, ApiError> {
    let map = object(req.body)?;
    let search = parse(&map)?;
    let lock = req
        .sim
        .store
        .location(&search.location)
        .ok_or(ApiError::Forbidden)?;
    let l = read(lock);
    Ok(page(&l, &search))
}

fn page(l: &Location, s: &Search) -> Reply {
    let listing = l.listing();
    let walk = Walk::after(l, s.ascending, s.after.as_ref());
    let (total, positions): (usize, Vec<usize>) = if s.filter.is_none() && s.query.is_none() {
        (listing.len(), walk.take(s.limit).collect())
    } else {
        let hit = |p: usize| {
            let slot = listing[p];
            s.filter.as_ref().is_none_or(|f| f.matches(l.updated(slot)))
                && s.query
                    .as_deref()
                    .is_none_or(|q| matches_query(&l.contact(slot), q))
        };
        let total = (0..listing.len()).filter(|&p| hit(p)).count();
        (total, walk.filter(|&p| hit(p)).take(s.limit).collect())
    };
    let contacts = positions
        .iter()
        .map(|&p| {
            let contact = l.contact(listing[p]);
            let search_after = (contact.date_added.0, contact.id.clone());
            Hit {
                contact,
                search_after,
            }
        })
        .collect();
    Reply::ok(&Page { contacts, total })
}

/// Listing positions strictly after a cursor, in the search's order.
enum Walk<'a> {
    /// The listing's own order: a range of it.
    Desc(Range<usize>),
    /// dateAdded ascending, ties by id ascending: the listing's groups of one millisecond
    /// from its end backwards, each group forwards. `group` is being served; the groups
    /// before `end` come next.
    Asc {
        l: &'a Location,
        group: Range<usize>,
        end: usize,
    },
}

impl<'a> Walk<'a> {
    fn after(l: &'a Location, ascending: bool, cursor: Option<&(i64, String)>) -> Walk<'a> {
        let len = l.listing().len();
        if !ascending {
            let start = cursor.map_or(0, |(ms, id)| l.position_after(*ms, Some(id)));
            return Walk::Desc(start..len);
        }
        let Some((ms, id)) = cursor else {
            return Walk::Asc {
                l,
                group: len..len,
                end: len,
            };
        };
        let listing = l.listing();
        let newer = listing.partition_point(|&s| l.added(s) > *ms);
        let same = listing.partition_point(|&s| l.added(s) >= *ms);
        let past = listing
            .get(newer..same)
            .unwrap_or_default()
            .partition_point(|&s| l.contact_id(s).as_str() <= id.as_str());
        Walk::Asc {
            l,
            group: newer + past..same,
            end: newer,
        }
    }
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Walk::Desc(r) => r.next(),
            Walk::Asc { l, group, end } => loop {
                if let Some(p) = group.next() {
                    return Some(p);
                }
                if *end == 0 {
                    return None;
                }
                let listing = l.listing();
                let ms = l.added(listing[*end - 1]);
                let start = listing.partition_point(|&s| l.added(s) > ms);
                *group = start..*end;
                *end = start;
            },
        }
    }
}

/// Validates the body; every problem goes into one 422.
fn parse(map: &Map<String, Value>) -> Result<Search, ApiError> {
    only(map, &[KEYS])?;
    let mut errs = Vec::new();
    let location = match map.get("locationId") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            errs.push("locationId should not be empty".to_string());
            String::new()
        }
    };
    let limit = match map.get("pageLimit").filter(|v| !v.is_null()) {
        None => {
            errs.push("pageLimit must not be less than 1".into());
            0
        }
        Some(v) => match integer(v) {
            Some(n) if n < 1 => {
                errs.push("pageLimit must not be less than 1".into());
                0
            }
            Some(n) if n > MAX_PAGE_LIMIT => {
                errs.push(format!(
                    "pageLimit must not be greater than {MAX_PAGE_LIMIT}"
                ));
                0
            }
            Some(n) => n as usize,
            None => {
                errs.push("pageLimit must be an integer number".into());
                0
            }
        },
    };
    let after = match map.get("searchAfter").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => {
            let cursor = v.as_array().and_then(|a| match a.as_slice() {
                [sort, Value::String(id)] => Some((time_value(sort)?, id.clone())),
                _ => None,
            });
            if cursor.is_none() {
                errs.push(
                    "searchAfter must be the array [sortValue, id] a served contact carries".into(),
                );
            }
            cursor
        }
    };
    let ascending = match map.get("sort").filter(|v| !v.is_null()) {
        None => false,
        Some(v) => sort(v, &mut errs),
    };
    let filter = match map.get("filters").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => filters(v, "filters", &mut errs).map(Filter::All),
    };
    let query = match map.get("query").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::String(q)) => Some(q.trim().to_lowercase()).filter(|q| !q.is_empty()),
        Some(_) => {
            errs.push("query must be a string".into());
            None
        }
    };
    if !errs.is_empty() {
        return Err(ApiError::Invalid(errs));
    }
    Ok(Search {
        location,
        limit,
        after,
        ascending,
        filter,
        query,
    })
}

/// A JSON integer, also written as `10.0`.
fn integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
            .map(|f| f as i64)
    })
}

/// Epoch ms as a number or a string of digits, or an ISO 8601 timestamp.
fn time_value(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s
            .trim()
            .parse::<i64>()
            .ok()
            .or_else(|| crate::timefmt::parse_iso_millis(s)),
        _ => integer(v),
    }
}

/// `sort: [{field: "dateAdded", direction: "asc" | "desc"}]`; returns whether ascending.
fn sort(v: &Value, errs: &mut Vec<String>) -> bool {
    let Some(items) = v.as_array() else {
        errs.push("sort must be an array".into());
        return false;
    };
    if items.len() > 1 {
        errs.push("sort supports one field (dateAdded); ties are ordered by id".into());
    }
    let Some(item) = items.first() else {
        return false;
    };
    let Some(o) = item.as_object() else {
        errs.push("sort.0 must be an object {field, direction}".into());
        return false;
    };
    for k in o.keys().filter(|k| *k != "field" && *k != "direction") {
        errs.push(format!("property sort.0.{k} should not exist"));
    }
    match o.get("field").and_then(Value::as_str) {
        Some("dateAdded") => {}
        Some(other) => errs.push(format!(
            "sort field {other} is not supported (the simulator sorts by dateAdded)"
        )),
        None => errs.push("sort.0.field must be a string".into()),
    }
    match o.get("direction").and_then(Value::as_str) {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            errs.push(format!(
                "sort direction {other} must be one of the following values: asc, desc"
            ));
            false
        }
    }
}

/// An array of conditions and groups at `path`.
fn filters(v: &Value, path: &str, errs: &mut Vec<String>) -> Option<Vec<Filter>> {
    let Some(items) = v.as_array() else {
        errs.push(format!("{path} must be an array"));
        return None;
    };
    let before = errs.len();
    let out: Vec<Filter> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| condition(item, &format!("{path}.{i}"), errs))
        .collect();
    (errs.len() == before).then_some(out)
}

/// One condition `{field, operator, value}` or group `{group, filters}`.
fn condition(v: &Value, path: &str, errs: &mut Vec<String>) -> Option<Filter> {
    let Some(o) = v.as_object() else {
        errs.push(format!("{path} must be an object"));
        return None;
    };
    if let Some(group) = o.get("group") {
        for k in o.keys().filter(|k| *k != "group" && *k != "filters") {
            errs.push(format!("property {path}.{k} should not exist"));
        }
        let inner = filters(
            o.get("filters").unwrap_or(&Value::Null),
            &format!("{path}.filters"),
            errs,
        );
        return match group.as_str() {
            Some("AND") => inner.map(Filter::All),
            Some("OR") => inner.map(Filter::Any),
            _ => {
                errs.push(format!(
                    "{path}.group must be one of the following values: AND, OR"
                ));
                None
            }
        };
    }
    for k in o
        .keys()
        .filter(|k| !["field", "operator", "value"].contains(&k.as_str()))
    {
        errs.push(format!("property {path}.{k} should not exist"));
    }
    let field = o.get("field").and_then(Value::as_str).unwrap_or_default();
    if field != "dateUpdated" {
        errs.push(format!(
            "{path}: filter field {field:?} is not supported (the simulator filters on dateUpdated)"
        ));
        return None;
    }
    let operator = o
        .get("operator")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if operator != "range" {
        errs.push(format!(
            "{path}: operator {operator:?} is not supported for dateUpdated (use range)"
        ));
        return None;
    }
    let Some(value) = o.get("value").and_then(Value::as_object) else {
        errs.push(format!(
            "{path}.value must be an object of gte, gt, lte or lt bounds"
        ));
        return None;
    };
    let mut b = Bounds::default();
    for (k, v) in value {
        let slot = match k.as_str() {
            "gte" => &mut b.gte,
            "gt" => &mut b.gt,
            "lte" => &mut b.lte,
            "lt" => &mut b.lt,
            _ => {
                errs.push(format!(
                    "{path}.value.{k} is not a range bound (gte, gt, lte, lt)"
                ));
                continue;
            }
        };
        match time_value(v) {
            Some(ms) => *slot = Some(ms),
            None => errs.push(format!(
                "{path}.value.{k} must be an ISO 8601 date string or epoch milliseconds"
            )),
        }
    }
    if value.is_empty() {
        errs.push(format!("{path}.value must hold at least one bound"));
    }
    Some(Filter::Range(b))
}
