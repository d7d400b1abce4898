//! Paginated listings as async streams of pages.
//!
//! `GET /contacts/` pages newest-first and continues from a cursor: the last item's
//! `dateAdded` in epoch ms plus its id (`meta.startAfter`, `meta.startAfterId`). Several
//! contacts can share a millisecond, so the id is part of the cursor. The stream ends on an
//! empty page or when `meta.nextPage` is null (or, without `meta`, on a short page). A cursor
//! that does not move forward means the server would loop: that is an error, not a hang.
//! Ids seen on the previous page are dropped if a server repeats them across a boundary.
//!
//! Every listing is guarded against a server that would keep it going forever, and each guard
//! stops the run with an error naming the request (exit 4) rather than hanging:
//! - the contacts listing: a cursor that does not move forward ([`ExtractError::CursorLoop`]),
//!   or a page with the same ids as the one before under a new cursor
//!   ([`ExtractError::PageLoop`]);
//! - the business listing (offset paging, no cursor): a page with the same ids as the one
//!   before, or [`STALE_PAGES`] pages in a row that bring no contact not already seen (the
//!   offset moves, the listing does not) ([`ExtractError::PageLoop`]);
//! - both: many more rows than the total the server announced at the start
//!   ([`rows_beyond_total`]).
//!
//! The offset-paging checks live in [`OffsetGuard`], which the OAuth `installedLocations`
//! listing (also skip/limit) uses too.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::{ApiError, Client};

/// Pages in a row without a new contact after which a business listing is taken to loop.
/// (One or two can happen when contacts are added while paging shifts the offsets.)
pub const STALE_PAGES: u32 = 3;

/// Whether `rows` read in this run are far beyond the `total` the server first announced:
/// more than twice it plus 1,000 (a listing may grow while it is read, never like that).
pub fn rows_beyond_total(rows: u64, total: Option<u64>) -> bool {
    total.is_some_and(|t| rows > t.saturating_mul(2).saturating_add(1000))
}

/// The guard of an offset-paged listing (skip/limit, no cursor) against a server that would
/// keep it going forever: the same page again, [`STALE_PAGES`] pages in a row of items
/// already read, or far more items than first announced ([`rows_beyond_total`]). It
/// remembers every id read, so use it for listings small enough for that (one business's
/// contacts, an agency's locations).
#[derive(Debug)]
pub(crate) struct OffsetGuard {
    /// What is listed, for messages: one and many (`"contact"`, `"contacts"`).
    noun: (&'static str, &'static str),
    seen: HashSet<String>,
    /// The ids of the previous page, in order.
    prev_ids: Vec<String>,
    /// Pages in a row that brought no item not already read.
    stale: u32,
    rows: u64,
    first_total: Option<u64>,
}

impl OffsetGuard {
    pub(crate) fn new(one: &'static str, many: &'static str) -> OffsetGuard {
        OffsetGuard {
            noun: (one, many),
            seen: HashSet::new(),
            prev_ids: Vec::new(),
            stale: 0,
            rows: 0,
            first_total: None,
        }
    }

    /// Checks the next page, given the ids of its items in order (`None` for an item without
    /// one) and the total the server announced with it. Returns, for each item, whether it is
    /// new (an item without an id always is), or why the listing is taken to loop.
    pub(crate) fn page(
        &mut self,
        ids: &[Option<String>],
        total: Option<u64>,
    ) -> Result<Vec<bool>, String> {
        let (one, many) = self.noun;
        let present: Vec<String> = ids.iter().flatten().cloned().collect();
        if !present.is_empty() && present == self.prev_ids {
            return Err(format!(
                "the server returned the same {} {many} as for the previous offset",
                present.len()
            ));
        }
        self.first_total = self.first_total.or(total);
        self.rows += ids.len() as u64;
        if rows_beyond_total(self.rows, self.first_total) {
            return Err(format!(
                "{} {many} read, far more than the {} the server announced (count)",
                self.rows,
                self.first_total.unwrap_or_default()
            ));
        }
        let fresh: Vec<bool> = ids
            .iter()
            .map(|id| id.as_ref().is_none_or(|id| self.seen.insert(id.clone())))
            .collect();
        self.stale = if !ids.is_empty() && !fresh.contains(&true) {
            self.stale + 1
        } else {
            0
        };
        if self.stale >= STALE_PAGES {
            return Err(format!(
                "{} pages in a row brought no {one} not already read (the offset moves, the listing does not)",
                self.stale
            ));
        }
        self.prev_ids = present;
        Ok(fresh)
    }
}

/// Where the contacts listing continues: after the contact with this `dateAdded` and id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cursor {
    pub start_after: i64,
    pub start_after_id: String,
}

/// Where a listing continues: after a cursor (the location listing through `GET
/// /contacts/`), after the `searchAfter` values of the last contact read (the listing through
/// `POST /contacts/search`), at an offset of the `index`-th requested business, or at the
/// `index`-th of a run's named contacts ([`contacts_by_id`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Position {
    After(Cursor),
    Business { index: usize, skip: u64 },
    Search { after: Vec<serde_json::Value> },
    Ids { index: usize },
}

/// How the location's contacts are listed: `GET /contacts/` (deprecated, 100 a page),
/// `POST /contacts/search` (500 a page, and the only one that can filter by `dateUpdated`),
/// or search falling back to GET when the API refuses the search.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Listing {
    Get,
    Search,
    Auto,
}

impl Listing {
    pub fn name(self) -> &'static str {
        match self {
            Listing::Get => "get",
            Listing::Search => "search",
            Listing::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Listing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "get" => Ok(Listing::Get),
            "search" => Ok(Listing::Search),
            "auto" => Ok(Listing::Auto),
            other => Err(format!(
                "unknown listing '{other}': expected get, search or auto"
            )),
        }
    }
}

/// Largest `pageLimit` `POST /contacts/search` takes.
pub const SEARCH_PAGE_MAX: u32 = 500;

/// One page of contacts, in listing order.
#[derive(Debug)]
pub struct Page {
    pub contacts: Vec<Box<RawValue>>,
    /// Where to continue after this page; `None` when this was the last one.
    pub next: Option<Position>,
    /// The server's total for the listing, when it says.
    pub total: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the contacts listing of location {location} did not advance: the server returned cursor startAfter={} startAfterId={} again (or an earlier one); stopping rather than looping. Retry later; if it persists, report it to HighLevel support", .cursor.start_after, crate::term::Escaped(&.cursor.start_after_id))]
    CursorLoop { location: String, cursor: Cursor },
    #[error("the contacts listing of location {location} returned a full page without a usable cursor (no meta.startAfter/startAfterId and no dateAdded/id on the last contact)")]
    NoCursor { location: String },
    /// A listing that would go on forever: the same page again, pages of contacts already
    /// seen, or far more rows than announced.
    #[error("{request}: the listing is not advancing: {reason}; stopping rather than looping\nhint: retry later; if it persists, report it to HighLevel support (with the request above)")]
    PageLoop { request: String, reason: String },
    /// A location-wide listing fetched ahead of its phase (`export::ahead`) could not be kept
    /// in its temporary file, or read back.
    #[error("the location-wide {entity} fetched ahead of their phase were lost ({error}; spooled in a temporary file in {dir})\nhint: if that disk is full or read-only, make room there; the next run asks for them again")]
    Spool {
        entity: &'static str,
        dir: String,
        error: String,
    },
}

/// The few fields of a contact the pipeline itself needs, read leniently: a field of an
/// unexpected type is `None`, never an error that would hide the others.
#[derive(Debug, Default)]
pub(crate) struct ContactHead {
    pub id: Option<String>,
    pub date_added: Option<i64>,
    pub date_updated: Option<i64>,
}

#[derive(Default, Deserialize)]
struct RawHead<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "dateAdded")]
    date_added: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "dateUpdated")]
    date_updated: Option<&'a RawValue>,
}

impl ContactHead {
    pub fn of(raw: &RawValue) -> ContactHead {
        let head: RawHead<'_> = serde_json::from_str(raw.get()).unwrap_or_default();
        ContactHead {
            id: head
                .id
                .and_then(|r| serde_json::from_str::<String>(r.get()).ok()),
            date_added: head.date_added.and_then(millis),
            date_updated: head.date_updated.and_then(millis),
        }
    }
}

/// An ISO timestamp string or epoch milliseconds.
fn millis(raw: &RawValue) -> Option<i64> {
    match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
        Ok(s) => crate::timefmt::parse_iso_millis(&s),
        Err(_) => serde_json::from_str::<i64>(raw.get()).ok(),
    }
}

struct ListState {
    client: Arc<Client>,
    location: String,
    page_size: u32,
    cursor: Option<Cursor>,
    /// Cursor ids already used within the cursor's millisecond (a loop inside a tie group).
    ids_in_ms: HashSet<String>,
    prev_page_ids: HashSet<String>,
    /// Rows read by this stream, and the total the server announced first.
    rows: u64,
    first_total: Option<u64>,
    done: bool,
}

/// Streams every contact of a location, starting after `start` (or from the newest).
pub fn location_contacts(
    client: Arc<Client>,
    location_id: String,
    start: Option<Cursor>,
    page_size: u32,
) -> impl Stream<Item = Result<Page, ExtractError>> {
    let state = ListState {
        client,
        location: location_id,
        page_size: page_size.clamp(1, 100),
        cursor: start,
        ids_in_ms: HashSet::new(),
        prev_page_ids: HashSet::new(),
        rows: 0,
        first_total: None,
        done: false,
    };
    futures::stream::try_unfold(state, |mut st| async move {
        if st.done {
            return Ok(None);
        }
        let after = st
            .cursor
            .as_ref()
            .map(|c| (c.start_after, c.start_after_id.as_str()));
        let page = st
            .client
            .list_contacts(&st.location, st.page_size, after)
            .await?;
        let meta = page.meta.unwrap_or_default();
        let total = meta.total.map(|t| t as u64);
        let fetched = page.contacts.len();
        st.first_total = st.first_total.or(total);
        st.rows += fetched as u64;
        if rows_beyond_total(st.rows, st.first_total) {
            return Err(ExtractError::PageLoop {
                request: Client::list_contacts_label(&st.location, st.page_size, after).0,
                reason: format!(
                    "{} contacts read, far more than the {} the server announced (meta.total)",
                    st.rows,
                    st.first_total.unwrap_or_default()
                ),
            });
        }
        let mut contacts = page.contacts;
        // Without `meta`, the cursor comes from the last contact the server sent, repeated
        // or not.
        let last_cursor = contacts.last().and_then(|c| cursor_of(c));
        let this_ids: HashSet<String> = contacts
            .iter()
            .filter_map(|c| ContactHead::of(c).id)
            .collect();
        // Judged once the cursor is known: a cursor loop is reported as such.
        let same_page = !this_ids.is_empty() && this_ids == st.prev_page_ids;
        if !st.prev_page_ids.is_empty() {
            contacts.retain(|c| {
                ContactHead::of(c)
                    .id
                    .is_none_or(|id| !st.prev_page_ids.contains(&id))
            });
            if contacts.len() < fetched {
                tracing::warn!(location = %st.location, repeated = fetched - contacts.len(), "the server repeated contacts across a page boundary; each is exported once");
            }
        }
        st.prev_page_ids = this_ids;

        // An explicit `nextPage: null` ends the listing; without one, only an empty page
        // does (a server may cap `limit` below what was asked, so a short page proves
        // nothing; the cost is one more request at the end).
        let last_page = fetched == 0 || matches!(meta.next_page, Some(serde_json::Value::Null));
        let next = if last_page {
            None
        } else {
            let from_meta = match (meta.start_after, meta.start_after_id.as_deref()) {
                (Some(ms), Some(id)) if !id.is_empty() => Some(Cursor {
                    start_after: ms as i64,
                    start_after_id: id.to_owned(),
                }),
                _ => None,
            };
            let cursor = match from_meta.or(last_cursor) {
                Some(c) => c,
                None => {
                    return Err(ExtractError::NoCursor {
                        location: st.location.clone(),
                    })
                }
            };
            let request =
                same_page.then(|| Client::list_contacts_label(&st.location, st.page_size, after).0);
            check_progress(&mut st, &cursor)?;
            if let Some(request) = request {
                return Err(ExtractError::PageLoop {
                    request,
                    reason: format!(
                        "the server returned the same {} contacts as for the previous cursor",
                        st.prev_page_ids.len()
                    ),
                });
            }
            Some(cursor)
        };
        st.done = next.is_none();
        st.cursor = next.clone();
        Ok(Some((
            Page {
                contacts,
                next: next.map(Position::After),
                total,
            },
            st,
        )))
    })
}

/// The cursor that continues after `raw`: its `dateAdded` in ms and its id.
fn cursor_of(raw: &RawValue) -> Option<Cursor> {
    let head = ContactHead::of(raw);
    Some(Cursor {
        start_after: head.date_added?,
        start_after_id: head.id?,
    })
}

/// Newest-first order means cursors move to older (smaller or equal) milliseconds, never
/// back; within one millisecond no cursor id may come twice.
fn check_progress(st: &mut ListState, next: &Cursor) -> Result<(), ExtractError> {
    if let Some(prev) = &st.cursor {
        if next.start_after > prev.start_after || next == prev {
            return Err(ExtractError::CursorLoop {
                location: st.location.clone(),
                cursor: next.clone(),
            });
        }
        if next.start_after < prev.start_after {
            st.ids_in_ms.clear();
        }
    }
    if !st.ids_in_ms.insert(next.start_after_id.clone()) {
        return Err(ExtractError::CursorLoop {
            location: st.location.clone(),
            cursor: next.clone(),
        });
    }
    Ok(())
}

struct BusinessState {
    client: Arc<Client>,
    location: String,
    business: String,
    index: usize,
    /// The last business of the export: its end is the end of the listing.
    last: bool,
    page_size: u32,
    skip: u64,
    /// Offset paging can repeat ids when the listing shifts; a business is small enough to
    /// remember its ids.
    guard: OffsetGuard,
    done: bool,
}

/// Streams the contacts of one business (`GET /contacts/business/:id`, skip/limit paging),
/// starting at offset `skip`. `index` is the business's place in the export's list; it goes
/// into each page's [`Position`] so a resumed run can continue there.
pub fn business_contacts(
    client: Arc<Client>,
    location_id: String,
    business_id: String,
    index: usize,
    last: bool,
    skip: u64,
    page_size: u32,
) -> impl Stream<Item = Result<Page, ExtractError>> {
    let state = BusinessState {
        client,
        location: location_id,
        business: business_id,
        index,
        last,
        page_size: page_size.clamp(1, 100),
        skip,
        guard: OffsetGuard::new("contact", "contacts"),
        done: false,
    };
    futures::stream::try_unfold(state, |mut st| async move {
        if st.done {
            return Ok(None);
        }
        let page = st
            .client
            .business_contacts(&st.location, &st.business, st.skip, st.page_size)
            .await?;
        let fetched = page.contacts.len() as u64;
        let total = page.count.map(|c| c as u64);
        let looping = |st: &BusinessState, reason: String| ExtractError::PageLoop {
            request: Client::business_contacts_label(
                &st.location,
                &st.business,
                st.skip,
                st.page_size,
            )
            .0,
            reason,
        };
        let ids: Vec<Option<String>> = page
            .contacts
            .iter()
            .map(|c| ContactHead::of(c).id)
            .collect();
        let fresh = match st.guard.page(&ids, total) {
            Ok(fresh) => fresh,
            Err(reason) => return Err(looping(&st, reason)),
        };
        let mut contacts = page.contacts;
        let mut fresh = fresh.into_iter();
        contacts.retain(|_| fresh.next().unwrap_or(true));
        st.skip += fetched;
        // Without a `count`, only an empty page ends the listing (the limit may be capped).
        st.done = fetched == 0 || total.is_some_and(|t| st.skip >= t);
        // The end of a business that is not the last continues at the next business: `None`
        // is kept for the end of the whole listing.
        let next = match (st.done, st.last) {
            (false, _) => Some(Position::Business {
                index: st.index,
                skip: st.skip,
            }),
            (true, false) => Some(Position::Business {
                index: st.index + 1,
                skip: 0,
            }),
            (true, true) => None,
        };
        Ok(Some((
            Page {
                contacts,
                next,
                total,
            },
            st,
        )))
    })
}

/// What a contacts search lists: the location, the page size, and (for incremental runs)
/// only contacts updated at or after a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchQuery {
    pub location_id: String,
    /// `pageLimit`, at most [`SEARCH_PAGE_MAX`].
    pub page_limit: u32,
    /// Only contacts whose `dateUpdated` is at or after this (epoch ms).
    pub updated_since: Option<i64>,
}

impl SearchQuery {
    /// The request body of the page after `after` (`None`: the first page). The order is
    /// `dateAdded` newest first, the order of `GET /contacts/`: `dateAdded` never changes,
    /// so a contact edited while the listing is read keeps its place (a listing sorted by
    /// `dateUpdated` would move it past the cursor, or back in front of it).
    pub fn body(&self, after: Option<&[serde_json::Value]>) -> serde_json::Value {
        let mut body = serde_json::json!({
            "locationId": self.location_id,
            "pageLimit": self.page_limit.clamp(1, SEARCH_PAGE_MAX),
            "sort": [{"field": "dateAdded", "direction": "desc"}],
        });
        if let Some(since) = self.updated_since {
            body["filters"] = serde_json::json!([{
                "field": "dateUpdated",
                "operator": "range",
                "value": {"gte": crate::timefmt::format_iso_millis(since)},
            }]);
        }
        if let Some(after) = after {
            body["searchAfter"] = serde_json::Value::Array(after.to_vec());
        }
        body
    }
}

/// The `searchAfter` values a contact of a search page carries, if it carries an array.
#[derive(Deserialize)]
struct SearchAfterOf {
    #[serde(default, rename = "searchAfter")]
    search_after: Option<serde_json::Value>,
}

/// The values that continue a search after `raw`: its own `searchAfter` when the server
/// sent one, else its `dateAdded` in ms and its id (the sort this client asks for).
fn search_after_of(raw: &RawValue) -> Option<Vec<serde_json::Value>> {
    if let Ok(SearchAfterOf {
        search_after: Some(serde_json::Value::Array(values)),
    }) = serde_json::from_str(raw.get())
    {
        if !values.is_empty() {
            return Some(values);
        }
    }
    let head = ContactHead::of(raw);
    Some(vec![head.date_added?.into(), head.id?.into()])
}

struct SearchState {
    client: Arc<Client>,
    query: SearchQuery,
    after: Option<Vec<serde_json::Value>>,
    /// A first page already fetched (by the probe of `--listing auto`).
    prefetched: Option<crate::api::SearchPage>,
    /// Cursors already used whose first value equals the current cursor's.
    tied: HashSet<String>,
    prev_page_ids: HashSet<String>,
    rows: u64,
    first_total: Option<u64>,
    done: bool,
}

/// Contacts of a search page handed on together (see [`search_runs`]).
pub const SEARCH_RUN: usize = 50;

/// Splits each page of a search listing into runs of about `run` contacts, each ending where
/// the listing can continue: after its last contact's `searchAfter`, which is what the next
/// page would be asked for. Downstream, a page is what is held until its every contact has
/// its children and what a checkpoint commits; a search page of 500 held that way cost a
/// megabyte or more per running location (BENCHMARKS.md, "Agency scale"). The requests are
/// unchanged: pages are still fetched 500 at a time. A contact without a usable cursor cannot
/// end a run, so its run goes on to the next one that has one (or to the page's end).
pub fn search_runs<S>(pages: S, run: usize) -> impl Stream<Item = Result<Page, ExtractError>>
where
    S: Stream<Item = Result<Page, ExtractError>>,
{
    use futures::TryStreamExt;
    let run = run.max(1);
    pages
        .map_ok(move |page| futures::stream::iter(split_search_page(page, run).map(Ok)))
        .try_flatten()
}

fn split_search_page(page: Page, run: usize) -> impl Iterator<Item = Page> {
    let Page {
        contacts,
        next,
        total,
    } = page;
    let mut pages = Vec::with_capacity(contacts.len() / run + 1);
    let mut current: Vec<Box<RawValue>> = Vec::with_capacity(run.min(contacts.len()));
    let count = contacts.len();
    for (i, contact) in contacts.into_iter().enumerate() {
        let cut = current.len() + 1 >= run && i + 1 < count;
        let after = cut.then(|| search_after_of(&contact)).flatten();
        current.push(contact);
        if let Some(after) = after {
            pages.push(Page {
                contacts: std::mem::replace(&mut current, Vec::with_capacity(run)),
                next: Some(Position::Search { after }),
                total,
            });
        }
    }
    pages.push(Page {
        contacts: current,
        next,
        total,
    });
    pages.into_iter()
}

/// Streams the contacts a search lists, starting after `after` (or from the newest), with
/// the guards of the GET listing: a cursor that does not move forward, or the same page
/// again, stops the run; a contact repeated across a page boundary is emitted once. The
/// listing ends on an empty page (a short one proves nothing: the server may cap the page).
/// `prefetched` is the reply to `query.body(after)` when the caller already has it.
pub fn search_contacts(
    client: Arc<Client>,
    query: SearchQuery,
    after: Option<Vec<serde_json::Value>>,
    prefetched: Option<crate::api::SearchPage>,
) -> impl Stream<Item = Result<Page, ExtractError>> {
    let state = SearchState {
        client,
        query,
        after,
        prefetched,
        tied: HashSet::new(),
        prev_page_ids: HashSet::new(),
        rows: 0,
        first_total: None,
        done: false,
    };
    futures::stream::try_unfold(state, |mut st| async move {
        if st.done {
            return Ok(None);
        }
        let page = match st.prefetched.take() {
            Some(page) => page,
            None => {
                let body = st.query.body(st.after.as_deref());
                st.client.search_contacts(&body).await?
            }
        };
        let looping = |st: &SearchState, reason: String| ExtractError::PageLoop {
            request: format!(
                "{} (location {}, searchAfter {})",
                Client::search_contacts_label(),
                crate::term::escape(&st.query.location_id),
                crate::term::escape(&serde_json::to_string(&st.after).unwrap_or_default())
            ),
            reason,
        };
        let total = page.total.map(|t| t as u64);
        let fetched = page.contacts.len();
        st.first_total = st.first_total.or(total);
        st.rows += fetched as u64;
        if rows_beyond_total(st.rows, st.first_total) {
            let reason = format!(
                "{} contacts read, far more than the {} the server announced (total)",
                st.rows,
                st.first_total.unwrap_or_default()
            );
            return Err(looping(&st, reason));
        }
        let mut contacts = page.contacts;
        // The cursor comes from the last contact the server sent, repeated or not.
        let last_after = contacts.last().map(|c| search_after_of(c));
        let this_ids: HashSet<String> = contacts
            .iter()
            .filter_map(|c| ContactHead::of(c).id)
            .collect();
        if !this_ids.is_empty() && this_ids == st.prev_page_ids {
            let reason = format!(
                "the server returned the same {} contacts as for the previous searchAfter",
                this_ids.len()
            );
            return Err(looping(&st, reason));
        }
        if !st.prev_page_ids.is_empty() {
            contacts.retain(|c| {
                ContactHead::of(c)
                    .id
                    .is_none_or(|id| !st.prev_page_ids.contains(&id))
            });
            if contacts.len() < fetched {
                tracing::warn!(location = %st.query.location_id, repeated = fetched - contacts.len(), "the search repeated contacts across a page boundary; each is exported once");
            }
        }
        st.prev_page_ids = this_ids;
        let next = if fetched == 0 {
            None
        } else {
            let Some(Some(after)) = last_after else {
                return Err(ExtractError::NoCursor {
                    location: st.query.location_id.clone(),
                });
            };
            if let Err(reason) = check_search_progress(&mut st, &after) {
                return Err(looping(&st, reason));
            }
            Some(after)
        };
        st.done = next.is_none();
        st.after = next.clone();
        Ok(Some((
            Page {
                contacts,
                next: next.map(|after| Position::Search { after }),
                total,
            },
            st,
        )))
    })
}

/// Newest first: the cursor's first value (`dateAdded` in ms) never grows, and among
/// cursors that share it none comes twice.
fn check_search_progress(st: &mut SearchState, next: &[serde_json::Value]) -> Result<(), String> {
    let first = |v: &[serde_json::Value]| v.first().and_then(serde_json::Value::as_f64);
    let key = serde_json::to_string(next).unwrap_or_default();
    if let Some(prev) = &st.after {
        if let (Some(p), Some(n)) = (first(prev), first(next)) {
            if n > p {
                return Err(format!(
                    "the next searchAfter {key} comes before the previous one in newest-first order"
                ));
            }
            if n < p {
                st.tied.clear();
            }
        }
    }
    if !st.tied.insert(key.clone()) {
        return Err(format!("the server returned searchAfter {key} again"));
    }
    Ok(())
}

/// For `--listing auto`: sends the search's first page. `Ok(None)` when the API refuses the
/// search itself (no such route, or a body it will not take: 400, 404, 405, 422, 501), and
/// the listing should fall back to `GET /contacts/`; a refusal that would meet the GET
/// listing too (401, 403, the quota, retries exhausted) is an error.
pub async fn probe_search(
    client: &Client,
    query: &SearchQuery,
) -> Result<Option<crate::api::SearchPage>, ExtractError> {
    match client.search_contacts(&query.body(None)).await {
        Ok(page) => Ok(Some(page)),
        Err(e @ ApiError::NotFound { .. }) => {
            tracing::warn!(error = %e, "the API refused the contacts search; listing through GET /contacts/ instead (100 contacts a request)");
            Ok(None)
        }
        Err(e @ ApiError::Fatal { status, .. }) if [400, 404, 405, 422, 501].contains(&status) => {
            tracing::warn!(error = %e, "the API refused the contacts search; listing through GET /contacts/ instead (100 contacts a request)");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Contacts fetched one by one (`GET /contacts/:id`), from the `from`-th of `ids`, in pages
/// of `page` ids: the listing of an event-driven run, which knows which contacts changed and
/// lists nothing else. `concurrency` requests of a page are in flight at once (the rate
/// limiter paces them like any other). A contact the API no longer knows (deleted since the
/// event named it) is left out of its page: its `ContactDelete` event deletes it, in this run
/// or the next. The page's `next` is the index after it, so a resumed run continues there.
pub fn contacts_by_id(
    client: Arc<Client>,
    ids: Arc<[String]>,
    from: usize,
    page: usize,
    concurrency: usize,
) -> impl Stream<Item = Result<Page, ExtractError>> {
    let page = page.max(1);
    let total = ids.len() as u64;
    let starts: Vec<usize> = (from.min(ids.len())..ids.len()).step_by(page).collect();
    futures::stream::iter(starts).then(move |start| {
        let (client, ids) = (client.clone(), ids.clone());
        async move {
            let end = (start + page).min(ids.len());
            let fetched: Vec<Result<Option<Box<RawValue>>, ApiError>> =
                futures::stream::iter(ids[start..end].iter().cloned())
                    .map(|id| {
                        let client = client.clone();
                        async move {
                            match client.contact_raw(&id).await {
                                Ok(c) => Ok(Some(c)),
                                Err(e) if e.kind() == crate::api::ErrorKind::NotFound => {
                                    tracing::info!(contact = %crate::term::Escaped(&id), "a contact named by an event is gone (deleted since): left to its delete event");
                                    Ok(None)
                                }
                                Err(e) => Err(e),
                            }
                        }
                    })
                    .buffered(concurrency.max(1))
                    .collect()
                    .await;
            let mut contacts = Vec::with_capacity(end - start);
            for c in fetched {
                contacts.extend(c?);
            }
            Ok(Page {
                contacts,
                next: (end < ids.len()).then_some(Position::Ids { index: end }),
                total: Some(total),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(i: usize, cursor: bool) -> Box<RawValue> {
        let json = if cursor {
            format!(
                r#"{{"id":"c{i}","searchAfter":[{},"c{i}"]}}"#,
                1_000_000 - i
            )
        } else {
            // No searchAfter and no dateAdded: no cursor can be made after it.
            format!(r#"{{"id":"c{i}"}}"#)
        };
        RawValue::from_string(json).unwrap()
    }

    fn ids(page: &Page) -> Vec<String> {
        page.contacts
            .iter()
            .map(|c| ContactHead::of(c).id.unwrap())
            .collect()
    }

    #[test]
    fn a_search_page_splits_into_runs_that_each_continue_after_their_last_contact() {
        let after = |i: usize| {
            Some(Position::Search {
                after: vec![(1_000_000 - i).into(), format!("c{i}").into()],
            })
        };
        let page = Page {
            contacts: (0..7).map(|i| contact(i, i != 2)).collect(),
            next: after(6),
            total: Some(70),
        };
        let runs: Vec<Page> = split_search_page(page, 2).collect();
        // c2 has no cursor, so its run goes on to c3; the last run keeps the page's own next.
        let got: Vec<(Vec<String>, Option<Position>)> =
            runs.iter().map(|p| (ids(p), p.next.clone())).collect();
        assert_eq!(
            got,
            vec![
                (vec!["c0".into(), "c1".into()], after(1)),
                (vec!["c2".into(), "c3".into()], after(3)),
                (vec!["c4".into(), "c5".into()], after(5)),
                (vec!["c6".into()], after(6)),
            ]
        );
        assert!(runs.iter().all(|p| p.total == Some(70)));
    }

    #[test]
    fn the_last_and_the_empty_page_keep_their_end() {
        let last = Page {
            contacts: (0..3).map(|i| contact(i, true)).collect(),
            next: None,
            total: None,
        };
        let runs: Vec<Page> = split_search_page(last, 500).collect();
        assert_eq!(runs.len(), 1);
        assert_eq!(ids(&runs[0]), ["c0", "c1", "c2"]);
        assert_eq!(runs[0].next, None);
        let empty = Page {
            contacts: Vec::new(),
            next: None,
            total: Some(0),
        };
        let runs: Vec<Page> = split_search_page(empty, 50).collect();
        assert_eq!(runs.len(), 1);
        assert!(runs[0].contacts.is_empty() && runs[0].next.is_none());
    }
}
