//! Read handlers. These are the hot path of an export: pages and children are generated and
//! serialised straight into the reply buffer under a read lock.

use std::borrow::Cow;
use std::str::FromStr;

use serde::Serialize;

use super::http::{ApiError, Env1, Kind, Reply, Req};
use super::model::Contact;
use super::store::{read, write, Location, View};

#[derive(Serialize)]
struct Page<'a> {
    contacts: Vec<Cow<'a, Contact>>,
    count: usize,
    meta: Meta,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    total: usize,
    next_page_url: Option<String>,
    start_after_id: Option<String>,
    start_after: Option<i64>,
    current_page: usize,
    next_page: Option<usize>,
    prev_page: Option<usize>,
}

/// An optional numeric query parameter; a non-number is a 422 as on the real API.
pub(crate) fn number<T: FromStr>(req: &Req<'_>, name: &str) -> Result<Option<T>, ApiError> {
    match req.param(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::invalid(format!(
                "{name} must be a number conforming to the specified constraints"
            ))
        }),
    }
}

/// The location named by the `locationId` query parameter.
pub(crate) fn location<'a>(req: &Req<'a>) -> Result<&'a std::sync::RwLock<Location>, ApiError> {
    let id = req.param("locationId").filter(|v| !v.is_empty());
    let id = id.ok_or_else(|| ApiError::invalid("locationId should not be empty"))?;
    req.sim.store.location(id).ok_or(ApiError::Forbidden)
}

/// `GET /contacts/`: newest `dateAdded` first, ties by id ascending. The cursor
/// (`startAfter` ms, `startAfterId`) is the last item of the previous page; the page holds
/// the items strictly after it in that order, so a millisecond shared across a page boundary
/// loses and repeats nothing.
///
/// `query` is a case-insensitive substring filter on full name, email and phone: a linear
/// scan of the location, fine for demo sizes, not meant for benchmarks.
pub(crate) fn list(req: &Req<'_>) -> Result<Reply, ApiError> {
    let lock = location(req)?;
    let max = req.sim.config.max_page.max(1);
    let limit = number::<i64>(req, "limit")?
        .unwrap_or(20)
        .clamp(1, max as i64) as usize;
    let start_after = number::<i64>(req, "startAfter")?;
    let start_after_id = req.param("startAfterId").filter(|v| !v.is_empty());
    let query = req
        .param("query")
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_lowercase);

    let l = read(lock);
    let cursor_ms = start_after.or_else(|| {
        let (_, slot) = req.sim.store.locate(start_after_id?)?;
        l.exists(slot).then(|| l.added(slot))
    });
    let start = cursor_ms.map_or(0, |ms| l.position_after(ms, start_after_id));
    let listing = l.listing();
    // Positions (in the listing) of the contacts this page may draw from.
    let (total, before, positions): (usize, usize, Vec<usize>) = match &query {
        None => {
            let end = (start + limit).min(listing.len());
            (listing.len(), start, (start.min(end)..end).collect())
        }
        Some(q) => {
            let hits: Vec<usize> = (0..listing.len())
                .filter(|&p| matches_query(&l.contact(listing[p]), q))
                .collect();
            let before = hits.partition_point(|&p| p < start);
            let page = hits.iter().skip(before).take(limit).copied().collect();
            (hits.len(), before, page)
        }
    };
    let contacts: Vec<Cow<'_, Contact>> =
        positions.iter().map(|&p| l.contact(listing[p])).collect();
    let count = contacts.len();
    let current_page = before / limit + 1;
    let more = before + count < total;
    let last = contacts.last().filter(|_| more);
    let (next_ms, next_id) = match last {
        Some(c) => (Some(c.date_added.0), Some(c.id.clone())),
        None => (None, None),
    };
    let next_page_url = match (&next_ms, &next_id) {
        (Some(ms), Some(id)) => Some(format!(
            "http://{}/contacts/?locationId={}&startAfter={ms}&startAfterId={id}",
            req.host,
            l.id()
        )),
        _ => None,
    };
    let meta = Meta {
        total,
        next_page_url,
        start_after_id: next_id,
        start_after: next_ms,
        current_page,
        next_page: more.then_some(current_page + 1),
        prev_page: (current_page > 1).then(|| current_page - 1),
    };
    Ok(Reply::ok(&Page {
        contacts,
        count,
        meta,
    }))
}

pub(crate) fn matches_query(c: &Contact, q: &str) -> bool {
    let has = |f: &super::model::F<super::model::Text>| {
        f.get().is_some_and(|v| v.to_lowercase().contains(q))
    };
    has(&c.full_name_lower_case) || has(&c.email_lower_case) || has(&c.phone)
}

#[derive(Serialize)]
struct BusinessPage<'a> {
    contacts: Vec<Cow<'a, Contact>>,
    count: usize,
}

/// `GET /contacts/business/:businessId`: offset paging (`skip`, `limit` default 25, max 100);
/// `count` is the business's total.
pub(crate) fn business(req: &Req<'_>) -> Result<Reply, ApiError> {
    let lock = location(req)?;
    let limit = number::<i64>(req, "limit")?.unwrap_or(25).clamp(1, 100) as usize;
    let skip = number::<i64>(req, "skip")?.unwrap_or(0).max(0) as usize;
    let l = read(lock);
    let slots = l.business(&req.route.id);
    let contacts = slots
        .iter()
        .skip(skip)
        .take(limit)
        .map(|&s| l.contact(s))
        .collect();
    Ok(Reply::ok(&BusinessPage {
        contacts,
        count: slots.len(),
    }))
}

/// Runs `f` on the live contact a path id names, or answers the API's 400.
pub(crate) fn with_contact<T>(
    req: &Req<'_>,
    f: impl FnOnce(&Location, u32) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let id = &req.route.id;
    let (lock, slot) = req
        .sim
        .store
        .locate(id)
        .ok_or_else(|| ApiError::contact_not_found(id))?;
    let l = read(lock);
    if !l.exists(slot) {
        return Err(ApiError::contact_not_found(id));
    }
    f(&l, slot)
}

/// `GET /contacts/:id`
pub(crate) fn contact(req: &Req<'_>) -> Result<Reply, ApiError> {
    with_contact(req, |l, slot| {
        Ok(Reply::ok(&Env1 {
            key: "contact",
            value: &*l.contact(slot),
        }))
    })
}

/// The children routes: lists, and single tasks and notes. A list may be refused for good
/// (403, see [`super::Faults::child_refusal_rate`]).
pub(crate) fn children(req: &Req<'_>) -> Result<Reply, ApiError> {
    with_contact(req, |l, slot| {
        let list = match req.route.kind {
            Kind::Tasks => Some("tasks"),
            Kind::Notes => Some("notes"),
            Kind::Appointments => Some("appointments"),
            _ => None,
        };
        if list.is_some_and(|entity| req.sim.faults.refuses_child(&req.route.id, entity)) {
            req.sim
                .counters
                .faults
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::Forbidden);
        }
        let ch = l.children(slot);
        let child = req.route.child.as_str();
        Ok(match req.route.kind {
            Kind::Tasks => Reply::ok(&Env1 {
                key: "tasks",
                value: &ch.tasks,
            }),
            Kind::Notes => Reply::ok(&Env1 {
                key: "notes",
                value: &ch.notes,
            }),
            Kind::Appointments => Reply::ok(&Env1 {
                key: "events",
                value: &ch.events,
            }),
            Kind::GetTask => match ch.tasks.iter().find(|t| t.id == child) {
                Some(t) => Reply::ok(&Env1 {
                    key: "task",
                    value: t,
                }),
                None => {
                    return Err(ApiError::BadRequest(format!(
                        "Task with id {child} not found"
                    )))
                }
            },
            Kind::GetNote => match ch.notes.iter().find(|n| n.id == child) {
                Some(n) => Reply::ok(&Env1 {
                    key: "note",
                    value: n,
                }),
                None => {
                    return Err(ApiError::BadRequest(format!(
                        "Note with id {child} not found"
                    )))
                }
            },
            _ => {
                return Err(ApiError::NoRoute(
                    "Cannot handle this method and path".into(),
                ))
            }
        })
    })
}

/// `GET /contacts/search/duplicate?locationId&email&number`: email matched case-insensitively,
/// then phone exactly. A `+` sent unescaped arrives as a space and is read back as `+`.
/// It reads the lagging search view; with duplicates allowed it answers the oldest match.
pub(crate) fn duplicate(req: &Req<'_>) -> Result<Reply, ApiError> {
    let lock = location(req)?;
    let email = req.param("email").map(str::trim);
    let phone = req.param("number").map(|p| match p.strip_prefix(' ') {
        Some(rest) => format!("+{}", rest.trim()),
        None => p.trim().to_string(),
    });
    let oldest_first = req.sim.config.allow_duplicates;
    let serve = |l: &Location, found: Option<(u32, &str)>| {
        let contact = found.map(|(slot, _)| l.contact(slot));
        Reply::ok(&Env1 {
            key: "contact",
            value: &contact,
        })
    };
    if read(lock).search_lags() {
        // Catching the search index up writes to it.
        let mut l = write(lock);
        let found = l.search_duplicate(email, phone.as_deref(), oldest_first);
        return Ok(serve(&l, found));
    }
    let l = read(lock);
    let found = l.find_duplicate(email, phone.as_deref(), None, View::Search, oldest_first);
    Ok(serve(&l, found))
}

/// `GET /locations/:locationId`: the few fields of the spec's `GetLocationByIdSchema` a
/// client of the contacts API uses (country, timezone, the duplicate setting).
pub(crate) fn location_info(req: &Req<'_>) -> Result<Reply, ApiError> {
    let lock = req
        .sim
        .store
        .location(&req.route.id)
        .ok_or(ApiError::Forbidden)?;
    let l = read(lock);
    let cfg = &req.sim.config;
    let body = serde_json::json!({
        "location": {
            "id": l.id(),
            "companyId": cfg.oauth.company_id,
            "name": format!("Simulated location {}", l.id()),
            "country": cfg.country,
            "timezone": timezone_of(&cfg.country),
            "settings": {"allowDuplicateContact": cfg.allow_duplicates},
        }
    });
    Ok(Reply::ok(&body))
}

/// A plausible IANA zone for a location in `country` (ISO 3166 alpha-2).
fn timezone_of(country: &str) -> &'static str {
    match country {
        "US" => "America/New_York",
        "CA" => "America/Toronto",
        "GB" => "Europe/London",
        "IE" => "Europe/Dublin",
        "DE" => "Europe/Berlin",
        "FR" => "Europe/Paris",
        "ES" => "Europe/Madrid",
        "IN" => "Asia/Kolkata",
        "AU" => "Australia/Sydney",
        "BR" => "America/Sao_Paulo",
        _ => "UTC",
    }
}
