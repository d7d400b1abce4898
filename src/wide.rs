//! Location-wide children: a location's tasks and appointments in a few requests per hundred
//! contacts instead of one request per contact.
//!
//! # Tasks
//! `POST /locations/:id/tasks/search` pages by offset (`skip`, `limit` 100; the server may
//! serve fewer) in the API's stable order (contacts in listing order, then each contact's
//! tasks), until an empty page. With a `contactId` filter (incremental runs: the changed
//! contacts) the ids go in batches of [`CONTACT_BATCH`], each paged the same way.
//!
//! # Appointments
//! `GET /calendars/` names the calendars, then `GET /calendars/events` returns a calendar's
//! events whose start lies in a time window (no paging). The windows cover
//! `[2015-01-01, now + 2 years]` ([`FIRST_MS`]: before HighLevel's API existed, so any
//! appointment it holds; the end leaves room for bookings made far ahead), cut into `max(8, contacts / (calendars x 2,500))` equal windows per calendar: a location's
//! appointments then cost `1 + calendars x windows` requests (25 for 3 calendars, whatever
//! the size up to 60,000 contacts), and one reply holds about 5,000 events at most on
//! average (about 2 per contact), far below the reply cap. Appointments outside the range
//! are not seen: the export's verification sample (per-contact fetches, `crate::export`)
//! finds such a difference and falls back to per-contact requests.
//!
//! # Guards
//! Offset paging can repeat or miss rows while the location changes. A repeat is dropped by
//! id, remembered as a 64-bit hash ([`key`]: 8 bytes a row, not a String). A server that
//! would page forever is stopped as `extract` stops the business listing: the same page
//! again, or [`extract::STALE_PAGES`] pages in a row that bring no row not already read
//! ([`RepeatGuard`]). Misses are what the verification sample is for.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::{ChildKey, Client};
use crate::extract::{self, ExtractError};

/// Rows asked per task search page (the API serves at most 100).
pub const TASK_PAGE: u32 = 100;

/// Rows each task page asks for again before where the last one ended (at most a fifth of
/// the page the server serves): a task deleted before that point shifts the rest of the
/// listing back, and the overlap catches the rows that slid under it. Repeats are dropped.
pub const TASK_OVERLAP: u64 = 20;

/// Steps back in a row (see [`location_tasks`]) after which a task listing is taken to loop.
const MAX_STEPS_BACK: u32 = 20;

/// Contact ids per `contactId` filter of a task search.
pub const CONTACT_BATCH: usize = 100;

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;

/// Where the appointment windows start: 2015-01-01T00:00:00Z.
pub const FIRST_MS: i64 = 1_420_070_400_000;

/// How to fetch tasks and appointments (`--children-by`); notes are always per contact.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChildrenBy {
    /// One request per contact and entity.
    Contact,
    /// The location-wide routes; a token without their scope fails the run.
    Location,
    /// The location-wide routes where the token holds their scope, per contact otherwise.
    #[default]
    Auto,
}

impl ChildrenBy {
    pub fn name(self) -> &'static str {
        match self {
            ChildrenBy::Contact => "contact",
            ChildrenBy::Location => "location",
            ChildrenBy::Auto => "auto",
        }
    }
}

impl std::str::FromStr for ChildrenBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "contact" => Ok(ChildrenBy::Contact),
            "location" => Ok(ChildrenBy::Location),
            "auto" => Ok(ChildrenBy::Auto),
            other => Err(format!(
                "unknown --children-by '{}': expected contact, location or auto",
                crate::term::Escaped(other)
            )),
        }
    }
}

/// A stable 64-bit hash (FNV-1a) of an id or a row's text: the same in every process and
/// build, so hashes written to the state directory are read back by a resumed run. Two of
/// 10^6 ids collide with a probability near 3 x 10^-8.
pub fn key(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short inputs: fold the high half in.
    h ^ (h >> 29)
}

/// Whether contact `id` is in the verification sample of share `share` (0..=1): decided by
/// its hash alone, so every run and every resumed attempt picks the same contacts.
pub fn in_sample(id: &str, share: f64) -> bool {
    // A second hash, salted, so the sample does not follow the set's hash order.
    let h = key(id) ^ 0x9e37_79b9_7f4a_7c15;
    let h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let unit = (h >> 11) as f64 / (1u64 << 53) as f64;
    unit < share
}

/// A set of contact ids as sorted 64-bit hashes: 8 bytes a contact (100,000 contacts in
/// 800 KB), built once, looked up by binary search.
#[derive(Debug, Default, Clone)]
pub struct ContactSet {
    keys: Vec<u64>,
}

impl ContactSet {
    pub fn contains(&self, id: &str) -> bool {
        self.keys.binary_search(&key(id)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl<'a> FromIterator<&'a str> for ContactSet {
    fn from_iter<I: IntoIterator<Item = &'a str>>(ids: I) -> Self {
        let mut keys: Vec<u64> = ids.into_iter().map(key).collect();
        keys.sort_unstable();
        keys.dedup();
        ContactSet { keys }
    }
}

/// Drops rows already read (by the hash of their id) and stops a listing that would go on
/// forever; `extract::OffsetGuard`'s checks, with hashes instead of Strings so that a
/// location's hundreds of thousands of tasks fit.
#[derive(Debug, Default)]
pub struct RepeatGuard {
    seen: HashSet<u64>,
    prev_page: Vec<u64>,
    stale: u32,
}

impl RepeatGuard {
    /// A guard that already read `keys` (a resumed run's committed rows).
    pub fn with_seen(keys: impl IntoIterator<Item = u64>) -> RepeatGuard {
        RepeatGuard {
            seen: keys.into_iter().collect(),
            ..RepeatGuard::default()
        }
    }

    /// Checks a page given its rows' id hashes (`None`: a row without an id, always new).
    /// Returns for each row whether it is new, or why the listing is taken to loop.
    pub fn page(&mut self, ids: &[Option<u64>]) -> Result<Vec<bool>, String> {
        let present: Vec<u64> = ids.iter().flatten().copied().collect();
        if !present.is_empty() && present == self.prev_page {
            return Err(format!(
                "the server returned the same {} rows as for the previous request",
                present.len()
            ));
        }
        let fresh: Vec<bool> = ids
            .iter()
            .map(|id| id.is_none_or(|k| self.seen.insert(k)))
            .collect();
        self.stale = if !ids.is_empty() && !fresh.contains(&true) {
            self.stale + 1
        } else {
            0
        };
        if self.stale >= extract::STALE_PAGES {
            return Err(format!(
                "{} pages in a row brought no row not already read (the offset moves, the listing does not)",
                self.stale
            ));
        }
        self.prev_page = present;
        Ok(fresh)
    }

    /// Whether a row with this id hash was read already.
    pub fn has_seen(&self, key: u64) -> bool {
        self.seen.contains(&key)
    }

    /// Forgets the previous page (a new batch or window starts: its first page may equal
    /// the last one of the one before, e.g. two empty calendars).
    fn new_sequence(&mut self) {
        self.prev_page.clear();
        self.stale = 0;
    }
}

/// A row of a location-wide listing, new in this run.
#[derive(Debug, Serialize, Deserialize)]
pub struct WideRow {
    pub raw: Box<RawValue>,
    /// Hash of the row's id (`id` or `_id`), if it has one.
    pub id_key: Option<u64>,
    /// The contact it belongs to (`contactId`).
    pub contact_id: Option<String>,
}

/// Where a location-wide listing continues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum WidePos {
    /// Task search: `skip` within the `batch`-th `contactId` batch (0 without a filter).
    Tasks { batch: usize, skip: u64 },
    /// Calendar events: the `window`-th window of the `calendar`-th calendar.
    Events { calendar: usize, window: u32 },
}

/// One reply of a location-wide listing (serialized only into the spool of a listing
/// fetched ahead, `export::ahead`).
#[derive(Debug, Serialize, Deserialize)]
pub struct WidePage {
    /// Rows not read before, in the server's order.
    pub rows: Vec<WideRow>,
    /// Rows dropped as repeats.
    pub repeats: u64,
    /// Elements that were not objects.
    pub non_objects: u64,
    /// Where to continue after this page; `None` when this was the last.
    pub next: Option<WidePos>,
}

/// A row's identity for dropping repeats: the hash of its id, or, for a row without one, of
/// its whole text (a row read twice is the same text; two id-less rows with the same text
/// cannot be told apart anyway).
fn row_key(raw: &RawValue, k: &ChildKey) -> u64 {
    match k.id.as_deref() {
        Some(id) => key(id),
        None => key(raw.get()) ^ 0x9e37_79b9_7f4a_7c15,
    }
}

fn wide_rows(
    rows: Vec<Box<RawValue>>,
    guard: &mut RepeatGuard,
) -> Result<(Vec<WideRow>, u64), String> {
    let keys: Vec<ChildKey> = rows.iter().map(|r| ChildKey::of(r)).collect();
    let ids: Vec<Option<u64>> = rows
        .iter()
        .zip(&keys)
        .map(|(raw, k)| Some(row_key(raw, k)))
        .collect();
    let fresh = guard.page(&ids)?;
    let mut repeats = 0;
    let out = rows
        .into_iter()
        .zip(keys)
        .zip(ids)
        .zip(fresh)
        .filter_map(|(((raw, k), id_key), fresh)| {
            if !fresh {
                repeats += 1;
                return None;
            }
            Some(WideRow {
                raw,
                id_key,
                contact_id: k.contact_id,
            })
        })
        .collect();
    Ok((out, repeats))
}

struct TaskState {
    client: Arc<Client>,
    location: String,
    batches: Option<Arc<Vec<Vec<String>>>>,
    batch: usize,
    /// Rows of the batch read so far, in the server's order: where the next page continues.
    skip: u64,
    /// The most rows one page brought: the server's page size, as far as seen.
    page: u64,
    /// The furthest position reached, and the steps back taken since it last grew: a listing
    /// that keeps sliding back (or a server whose order is not stable) stops the run instead
    /// of swinging between two offsets.
    furthest: u64,
    backs: u32,
    guard: RepeatGuard,
    done: bool,
}

/// Streams a location's tasks from `from` on, each page's new rows with the position after
/// it. With `contacts`, only the tasks of these contacts, in [`CONTACT_BATCH`] batches (the
/// batches are cut the same way at every attempt, so a saved position stays valid).
///
/// Offset paging while the location changes: a task created before the position pushes rows
/// forward (they come again, and are dropped as repeats); a task deleted before it pulls rows
/// back, under the next page's start, where they would be missed. So each page starts
/// [`TASK_OVERLAP`] rows early, and must find a row it already read there (its anchor). A page
/// without one means the listing slid back further: the next page starts earlier still,
/// until an anchor (or the start) is found. What slips through anyway is for the
/// verification sample to find.
pub fn location_tasks(
    client: Arc<Client>,
    location_id: String,
    contacts: Option<Vec<String>>,
    from: Option<WidePos>,
    guard: RepeatGuard,
) -> impl Stream<Item = Result<WidePage, ExtractError>> {
    let (batch, skip) = match from {
        Some(WidePos::Tasks { batch, skip }) => (batch, skip),
        _ => (0, 0),
    };
    let batches = contacts.map(|ids| {
        Arc::new(
            ids.chunks(CONTACT_BATCH)
                .map(<[String]>::to_vec)
                .collect::<Vec<_>>(),
        )
    });
    let done = batches.as_ref().is_some_and(|b| batch >= b.len());
    let state = TaskState {
        client,
        location: location_id,
        batches,
        batch,
        skip,
        // A resumed listing starts early by the overlap and checks its anchor from the first
        // page: rows may have slid back while no run was reading.
        page: if skip > 0 { u64::from(TASK_PAGE) } else { 0 },
        furthest: skip,
        backs: 0,
        guard,
        done,
    };
    futures::stream::try_unfold(state, |mut st| async move {
        if st.done {
            return Ok(None);
        }
        // Start early by the overlap, once the server's page size is known (never more than
        // a fifth of it, so every page also brings rows past the position).
        let lead = st.skip.min(TASK_OVERLAP.min(st.page / 5));
        let ask = st.skip - lead;
        let mut body = serde_json::json!({ "limit": TASK_PAGE, "skip": ask });
        if let Some(b) = &st.batches {
            body["contactId"] = serde_json::json!(b[st.batch]);
        }
        let reply = st.client.task_search(&st.location, &body).await?;
        let served = reply.served as u64;
        st.page = st.page.max(served);
        // The anchor: a row of the overlap already read. Without one the listing slid back
        // past the overlap (or shrank below `ask`).
        let anchored = lead == 0
            || reply
                .rows
                .iter()
                .take(lead as usize)
                .any(|r| st.guard.has_seen(row_key(r, &ChildKey::of(r))));
        let (rows, repeats) =
            wide_rows(reply.rows, &mut st.guard).map_err(|reason| ExtractError::PageLoop {
                request: format!("{} (skip {ask})", Client::task_search_label(&st.location).0,),
                reason,
            })?;
        // A short page from a known point: the server has no rows past it, the listing (or
        // this batch) ends.
        let next = if anchored && served < st.page {
            None
        } else if !anchored {
            st.backs += 1;
            if st.backs > MAX_STEPS_BACK {
                return Err(ExtractError::PageLoop {
                    request: format!(
                        "{} (skip {ask})",
                        Client::task_search_label(&st.location).0,
                    ),
                    reason: format!(
                        "the listing slid back past the rows already read {MAX_STEPS_BACK} times in a row without passing offset {}",
                        st.furthest
                    ),
                });
            }
            // Start again earlier: by a page, not just the overlap, so a large slide costs
            // few requests.
            st.skip = ask.saturating_sub(st.page.max(TASK_OVERLAP) - lead);
            tracing::debug!(location = %st.location, skip = st.skip, "the task listing slid back past the overlap; reading again from earlier");
            Some(WidePos::Tasks {
                batch: st.batch,
                skip: st.skip,
            })
        } else if served > lead {
            st.skip = ask + served;
            if st.skip > st.furthest {
                st.furthest = st.skip;
                st.backs = 0;
            }
            Some(WidePos::Tasks {
                batch: st.batch,
                skip: st.skip,
            })
        } else {
            None
        };
        let next = match next {
            Some(pos) => Some(pos),
            // Nothing past the position: the listing, or this batch, ends.
            None => {
                st.batch += 1;
                st.skip = 0;
                st.furthest = 0;
                st.backs = 0;
                st.guard.new_sequence();
                match &st.batches {
                    Some(b) if st.batch < b.len() => Some(WidePos::Tasks {
                        batch: st.batch,
                        skip: 0,
                    }),
                    _ => None,
                }
            }
        };
        st.done = next.is_none();
        Ok(Some((
            WidePage {
                rows,
                repeats,
                non_objects: reply.non_objects,
                next,
            },
            st,
        )))
    })
}

/// The calendars and time windows that cover a location's appointments; fixed at the start
/// of a run (and saved with its checkpoint) so a resumed run asks for the same windows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsPlan {
    pub calendars: Vec<String>,
    /// First millisecond covered.
    pub start_ms: i64,
    /// Last millisecond covered.
    pub end_ms: i64,
    /// Windows per calendar.
    pub windows: u32,
}

impl EventsPlan {
    /// The plan for a location of `contacts` listed contacts, at `now_ms`.
    pub fn new(calendars: Vec<String>, contacts: u64, now_ms: i64) -> EventsPlan {
        let start_ms = FIRST_MS.min(now_ms - 365 * DAY_MS);
        let end_ms = now_ms + 2 * 365 * DAY_MS;
        let per_window = (calendars.len().max(1) as u64) * 2_500;
        let windows = contacts.div_ceil(per_window).clamp(8, 1_000) as u32;
        EventsPlan {
            calendars,
            start_ms,
            end_ms,
            windows,
        }
    }

    /// The plan for a location of `contacts` contacts, from its calendars as listed now (one
    /// request).
    pub async fn ask(
        client: &Client,
        location_id: &str,
        contacts: u64,
    ) -> Result<EventsPlan, crate::api::ApiError> {
        let calendars = client.calendars(location_id).await?;
        Ok(EventsPlan::new(
            calendars.into_iter().map(|c| c.id).collect(),
            contacts,
            crate::timefmt::now_millis(),
        ))
    }

    /// The `i`-th window, both ends included; consecutive windows neither overlap nor leave
    /// a gap, and together they cover `[start_ms, end_ms]`.
    pub fn window(&self, i: u32) -> (i64, i64) {
        let span = (self.end_ms - self.start_ms + 1) as i128;
        let n = i128::from(self.windows.max(1));
        let at = |k: i128| self.start_ms + (span * k / n) as i64;
        (at(i128::from(i)), at(i128::from(i) + 1) - 1)
    }

    /// Requests the plan costs (the calendars listing not included).
    pub fn requests(&self) -> u64 {
        self.calendars.len() as u64 * u64::from(self.windows)
    }

    /// Whether the windows cost fewer requests than one per contact for `contacts`.
    pub fn cheaper_than_per_contact(&self, contacts: u64) -> bool {
        self.requests() < contacts
    }

    /// The position after `pos`, or `None` after the last window of the last calendar.
    fn after(&self, calendar: usize, window: u32) -> Option<WidePos> {
        if window + 1 < self.windows {
            Some(WidePos::Events {
                calendar,
                window: window + 1,
            })
        } else if calendar + 1 < self.calendars.len() {
            Some(WidePos::Events {
                calendar: calendar + 1,
                window: 0,
            })
        } else {
            None
        }
    }
}

/// Windows asked for beyond the one being read. The windows are independent requests: asked
/// one round trip at a time, a location's appointments went at the speed of its replies
/// (below its pace over any real network, and the tail of every export); one ahead keeps
/// them at the pace while at most two replies (about 5,000 events each at most on average)
/// wait at once.
const EVENTS_AHEAD: usize = 1;

/// One window's reply, with where it was asked.
struct WindowReply {
    calendar: usize,
    window: u32,
    reply: Result<crate::api::LooseRows, crate::api::ApiError>,
}

struct EventState {
    replies: futures::stream::BoxStream<'static, WindowReply>,
    location: String,
    plan: Arc<EventsPlan>,
    guard: RepeatGuard,
}

/// Streams the events of every window of every calendar of `plan`, from `from` on, in
/// window order (the replies are read in order whatever order they arrive in).
pub fn location_events(
    client: Arc<Client>,
    location_id: String,
    plan: EventsPlan,
    from: Option<WidePos>,
    guard: RepeatGuard,
) -> impl Stream<Item = Result<WidePage, ExtractError>> {
    use futures::StreamExt;

    let first = match from {
        Some(WidePos::Events { calendar, window }) => Some((calendar, window)),
        _ => Some((0, 0)),
    }
    .filter(|(c, w)| *c < plan.calendars.len() && *w < plan.windows);
    let plan = Arc::new(plan);
    let positions = {
        let plan = plan.clone();
        std::iter::successors(first, move |&(c, w)| match plan.after(c, w) {
            Some(WidePos::Events { calendar, window }) => Some((calendar, window)),
            _ => None,
        })
    };
    let replies = {
        let (plan, location) = (plan.clone(), location_id.clone());
        futures::stream::iter(positions)
            .map(move |(calendar, window)| {
                let (client, plan, location) = (client.clone(), plan.clone(), location.clone());
                async move {
                    let (start, end) = plan.window(window);
                    let reply = client
                        .calendar_events(&location, &plan.calendars[calendar], start, end)
                        .await;
                    WindowReply {
                        calendar,
                        window,
                        reply,
                    }
                }
            })
            .buffered(EVENTS_AHEAD + 1)
            .boxed()
    };
    let state = EventState {
        replies,
        location: location_id,
        plan,
        guard,
    };
    futures::stream::try_unfold(state, |mut st| async move {
        let Some(got) = st.replies.next().await else {
            return Ok(None);
        };
        let reply = got.reply?;
        let calendar = &st.plan.calendars[got.calendar];
        // Windows do not overlap: only a repeat inside a window, or an event that moved
        // between windows while they were read, is a repeat. Each window is one request, so
        // two equal windows in a row (both empty, or the server ignoring the times) are
        // normal: only repeated ids count.
        st.guard.new_sequence();
        let (rows, repeats) = wide_rows(reply.rows, &mut st.guard).map_err(|reason| {
            let (start, end) = st.plan.window(got.window);
            ExtractError::PageLoop {
                request: Client::calendar_events_label(&st.location, calendar, start, end).0,
                reason,
            }
        })?;
        let next = st.plan.after(got.calendar, got.window);
        Ok(Some((
            WidePage {
                rows,
                repeats,
                non_objects: reply.non_objects,
                next,
            },
            st,
        )))
    })
}

// ---- What the export's location-wide phase records in its checkpoint ----------------------
//
// These types live here, with the listings they describe, and not in `crate::export`: the
// checkpoint holds them, and the checkpoint sits below the export that writes it.

/// Where the phase stands, per entity (`tasks`, `appointments`), in the checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WideProgress {
    pub entities: BTreeMap<String, EntityProgress>,
}

/// One entity's progress through the phase.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntityProgress {
    #[serde(flatten)]
    pub stage: Stage,
    /// Why the entity is fetched per contact, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_contact_reason: Option<String>,
    /// What the verification sample found different.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difference: Option<String>,
    /// The share sampled, fixed at the start (a resumed run with another
    /// `--verify-sample` checks the same contacts).
    pub verify_sample: f64,
    /// Calendars and windows of the appointments, fixed at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_plan: Option<EventsPlan>,
    /// Committed length of the id-hash log.
    #[serde(default)]
    pub ids_bytes: u64,
    /// `[hash of contactId, hash of the row's text]` of the committed location-wide rows of
    /// sampled contacts.
    #[serde(default)]
    pub sample: Vec<[u64; 2]>,
    /// Sampled contacts checked per contact.
    #[serde(default)]
    pub verified_contacts: u64,
    /// Location-wide rows dropped: their contact was not listed in this run.
    #[serde(default)]
    pub unlisted_rows: u64,
    /// Location-wide rows dropped as repeats.
    #[serde(default)]
    pub repeats: u64,
}

/// The stage an entity is in.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", tag = "stage")]
pub enum Stage {
    /// Reading the location-wide rows, from `pos` (`None`: the first request).
    Listing {
        #[serde(default)]
        pos: Option<WidePos>,
    },
    /// The rows are committed; the sample remains to be checked.
    Verify,
    /// Per contact, from the `next`-th listed contact on.
    PerContact {
        next: u64,
    },
    Done {
        location_wide: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_across_builds_and_processes() {
        // Written to the state directory and read back by a resumed run: pinned values.
        assert_eq!(
            key(""),
            0xcbf2_9ce4_8422_2325 ^ (0xcbf2_9ce4_8422_2325 >> 29)
        );
        assert_ne!(key("a"), key("b"));
        assert_eq!(key("contact-1"), key("contact-1"));
    }

    #[test]
    fn the_sample_is_deterministic_and_close_to_its_share() {
        let ids: Vec<String> = (0..100_000).map(|i| format!("c{i}")).collect();
        let n = ids.iter().filter(|id| in_sample(id, 0.005)).count();
        assert!((350..=650).contains(&n), "{n}");
        assert_eq!(
            n,
            ids.iter().filter(|id| in_sample(id, 0.005)).count(),
            "same ids, same sample"
        );
        assert!(ids.iter().all(|id| in_sample(id, 1.0)));
        assert!(!ids.iter().any(|id| in_sample(id, 0.0)));
    }

    #[test]
    fn contact_set_holds_exactly_its_ids() {
        let set: ContactSet = ["a", "b", "a", "c"].into_iter().collect();
        assert_eq!(set.len(), 3);
        assert!(set.contains("a") && set.contains("c"));
        assert!(!set.contains("d") && !set.contains(""));
    }

    #[test]
    fn repeats_are_dropped_and_a_server_that_loops_is_stopped() {
        let mut g = RepeatGuard::default();
        assert_eq!(
            g.page(&[Some(1), Some(2), None]).unwrap(),
            [true, true, true]
        );
        // A repeat across pages is dropped; a row without an id is always new.
        assert_eq!(
            g.page(&[Some(2), Some(3), None]).unwrap(),
            [false, true, true]
        );
        // The same page again: the offset was ignored.
        assert!(g
            .page(&[Some(2), Some(3)])
            .unwrap_err()
            .contains("same 2 rows"));
        let mut g = RepeatGuard::with_seen([1, 2, 3, 4]);
        assert_eq!(g.page(&[Some(1)]).unwrap(), [false]);
        assert_eq!(g.page(&[Some(2)]).unwrap(), [false]);
        let e = g.page(&[Some(3)]).unwrap_err();
        assert!(e.contains("3 pages in a row"), "{e}");
        // Empty pages are not stale ones.
        let mut g = RepeatGuard::default();
        for _ in 0..5 {
            assert!(g.page(&[]).unwrap().is_empty());
        }
    }

    #[test]
    fn windows_tile_the_range_without_gap_or_overlap() {
        let day = DAY_MS;
        let now = 1_780_000_000_000;
        let p = EventsPlan::new(vec!["a".into(), "b".into(), "c".into()], 2_000, now);
        assert_eq!(p.windows, 8, "at least 8 windows");
        assert_eq!(p.requests(), 24);
        assert_eq!(p.start_ms, FIRST_MS);
        assert_eq!(p.end_ms, now + 2 * 365 * day);
        assert_eq!(p.window(0).0, p.start_ms);
        assert_eq!(p.window(p.windows - 1).1, p.end_ms);
        for i in 1..p.windows {
            assert_eq!(p.window(i).0, p.window(i - 1).1 + 1);
        }
        // Larger locations get more windows, so a reply stays near 5,000 events.
        let big = EventsPlan::new(vec!["a".into(); 3], 100_000, now);
        assert_eq!(big.windows, 14);
        assert_eq!(
            big.after(0, 13),
            Some(WidePos::Events {
                calendar: 1,
                window: 0
            })
        );
        assert_eq!(big.after(2, 13), None);
    }

    #[test]
    fn positions_round_trip_through_the_checkpoint() {
        for pos in [
            WidePos::Tasks {
                batch: 2,
                skip: 300,
            },
            WidePos::Events {
                calendar: 1,
                window: 7,
            },
        ] {
            let s = serde_json::to_string(&pos).unwrap();
            assert_eq!(serde_json::from_str::<WidePos>(&s).unwrap(), pos);
        }
    }

    /// A task search on loopback serving `tasks` rows by offset, through `page`:
    /// `page(skip, rows)` returns the ids served for a request at `skip`.
    async fn fake_search(
        page: impl Fn(u64) -> Vec<String> + Clone + Send + Sync + 'static,
    ) -> Arc<Client> {
        use axum::{routing::post, Json, Router};
        let app = Router::new().route(
            "/locations/{loc}/tasks/search",
            post(move |Json(body): Json<serde_json::Value>| {
                let page = page.clone();
                async move {
                    let skip = body["skip"].as_u64().unwrap_or(0);
                    let tasks: Vec<serde_json::Value> = page(skip)
                        .into_iter()
                        .map(|id| serde_json::json!({"id": id, "contactId": "c"}))
                        .collect();
                    Json(serde_json::json!({ "tasks": tasks }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut cfg = crate::api::ClientConfig::new(
            format!("http://{addr}"),
            crate::api::Token::new("t").unwrap(),
        );
        cfg.rate_limit = None;
        Arc::new(Client::new(cfg).unwrap())
    }

    async fn collect(client: Arc<Client>) -> Result<(Vec<String>, u64), ExtractError> {
        use futures::TryStreamExt;
        let pages: Vec<WidePage> =
            location_tasks(client, "L".into(), None, None, RepeatGuard::default())
                .try_collect()
                .await?;
        let repeats = pages.iter().map(|p| p.repeats).sum();
        let ids = pages
            .into_iter()
            .flat_map(|p| p.rows)
            .map(|r| ChildKey::of(&r.raw).id.unwrap())
            .collect();
        Ok((ids, repeats))
    }

    #[tokio::test]
    async fn task_search_pages_by_offset_until_an_empty_page_and_drops_rows_repeated_by_a_shift() {
        // 250 tasks; a task inserted at the front after the first page shifts the offsets:
        // the second page repeats the first page's last row.
        let all: Vec<String> = (0..250).map(|i| format!("t{i:03}")).collect();
        let client = fake_search(move |skip| {
            let shifted = skip > 0;
            let start = if shifted { skip as usize - 1 } else { 0 };
            all.iter().skip(start).take(100).cloned().collect()
        })
        .await;
        let (ids, repeats) = collect(client).await.unwrap();
        assert!(
            repeats >= 1,
            "the row the shift pushed across the first boundary, and the overlaps"
        );
        assert_eq!(ids.len(), 250);
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), 250, "each task once");
    }

    /// Pages 300 tasks through a fake whose `deleted` tasks vanish after the first request
    /// (every later row slides back by their number), and checks every remaining task comes
    /// exactly once.
    async fn assert_every_task_once_after_deleting(deleted: std::ops::Range<usize>) {
        let all: Vec<String> = (0..300).map(|i| format!("t{i:03}")).collect();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gone = deleted.clone();
        let client = fake_search(move |skip| {
            let first = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            all.iter()
                .enumerate()
                .filter(|(i, _)| first || !gone.contains(i))
                .map(|(_, t)| t.clone())
                .skip(skip as usize)
                .take(100)
                .collect()
        })
        .await;
        let (ids, _) = collect(client).await.unwrap();
        let got: HashSet<&String> = ids.iter().collect();
        assert_eq!(got.len(), ids.len(), "each task once");
        let missing: Vec<String> = (0..300)
            .filter(|i| !deleted.contains(i))
            .map(|i| format!("t{i:03}"))
            .filter(|t| !got.contains(t))
            .collect();
        assert!(missing.is_empty(), "missed {missing:?}");
    }

    #[tokio::test]
    async fn tasks_deleted_before_the_offset_while_paging_do_not_hide_the_rows_that_slid_back() {
        // 15 tasks of the first page deleted: the rows slide under the next page's start,
        // within the overlap.
        assert_every_task_once_after_deleting(40..55).await;
    }

    #[tokio::test]
    async fn a_slide_larger_than_the_overlap_is_found_by_the_missing_anchor_and_read_again() {
        // 60 tasks of the first page deleted: more than the overlap.
        assert_every_task_once_after_deleting(10..70).await;
    }

    #[tokio::test]
    async fn a_task_search_that_ignores_skip_is_stopped_not_paged_forever() {
        let client = fake_search(|_| (0..100).map(|i| format!("t{i}")).collect()).await;
        let e = collect(client).await.unwrap_err();
        assert!(
            matches!(&e, ExtractError::PageLoop { request, .. } if request.contains("/tasks/search")),
            "{e}"
        );
    }
}
