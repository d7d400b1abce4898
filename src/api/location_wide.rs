//! The location-wide child listings: tasks through `POST /locations/:id/tasks/search`, and
//! appointments through `GET /calendars/` then `GET /calendars/events` per calendar and time
//! window. One request then brings the children of many contacts, where the per-contact
//! routes cost one request per contact (see `crate::wide` for how an export pages them).
//!
//! The replies are decoded leniently: `apps/locations.json` declares the task search's `tasks`
//! as an array of arrays, real replies hold objects. Every object is kept as received (its
//! unknown fields included), a nested array is opened one level, and anything else is skipped
//! and counted rather than failing the page. A reply without its array is malformed (an
//! error): taking it for an empty page would end a listing early without a word.

use reqwest::Method;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::client::Client;
use super::error::{ApiError, RequestLabel};
use super::stats::RequestKind;
use super::transport::path_and_query;
use super::{API_VERSION, CALENDARS_API_VERSION};

/// Rows of one location-wide reply: the objects as received, in the server's order.
#[derive(Debug, Default)]
pub struct LooseRows {
    pub rows: Vec<Box<RawValue>>,
    /// Elements of the reply's top-level array: what offset paging advances by (the server
    /// counts its elements, whatever they hold).
    pub served: usize,
    /// Elements that were neither an object nor an array of objects: skipped.
    pub non_objects: u64,
}

/// A calendar of the location: its id, every other field ignored (only ids are used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalendarRef {
    pub id: String,
}

/// The identity fields of a child object, read leniently: `id` (or Mongo's `_id`) and
/// `contactId`, each a string or `None` (another type is `None`, never an error).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChildKey {
    pub id: Option<String>,
    pub contact_id: Option<String>,
}

#[derive(Default, Deserialize)]
struct RawKey<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "_id")]
    mongo_id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "contactId")]
    contact_id: Option<&'a RawValue>,
}

impl ChildKey {
    pub fn of(raw: &RawValue) -> ChildKey {
        let k: RawKey<'_> = serde_json::from_str(raw.get()).unwrap_or_default();
        let text = |r: Option<&RawValue>| {
            r.and_then(|r| serde_json::from_str::<String>(r.get()).ok())
                .filter(|s| !s.is_empty())
        };
        ChildKey {
            id: text(k.id).or_else(|| text(k.mongo_id)),
            contact_id: text(k.contact_id),
        }
    }
}

/// What a JSON value starts with, whitespace skipped.
fn first_byte(raw: &RawValue) -> Option<u8> {
    raw.get().bytes().find(|b| !b.is_ascii_whitespace())
}

/// Flattens a reply's array: objects kept, an array's objects kept (one level), the rest
/// counted.
fn loose(items: Vec<Box<RawValue>>) -> LooseRows {
    let mut out = LooseRows {
        served: items.len(),
        ..LooseRows::default()
    };
    for item in items {
        match first_byte(&item) {
            Some(b'{') => out.rows.push(item),
            Some(b'[') => match serde_json::from_str::<Vec<Box<RawValue>>>(item.get()) {
                Ok(inner) => {
                    for v in inner {
                        if first_byte(&v) == Some(b'{') {
                            out.rows.push(v);
                        } else {
                            out.non_objects += 1;
                        }
                    }
                }
                Err(_) => out.non_objects += 1,
            },
            _ => out.non_objects += 1,
        }
    }
    out
}

#[derive(Deserialize)]
struct TasksReply {
    tasks: Vec<Box<RawValue>>,
}
#[derive(Deserialize)]
struct EventsReply {
    events: Vec<Box<RawValue>>,
}
#[derive(Deserialize)]
struct CalendarsReply {
    calendars: Vec<Box<RawValue>>,
}

fn task_search_path(location_id: &str) -> String {
    path_and_query(&["locations", location_id, "tasks", "search"], &[])
}

fn calendars_path(location_id: &str) -> String {
    path_and_query(&["calendars", ""], &[("locationId", location_id)])
}

fn events_path(location_id: &str, calendar_id: &str, start_ms: i64, end_ms: i64) -> String {
    path_and_query(
        &["calendars", "events"],
        &[
            ("locationId", location_id),
            ("calendarId", calendar_id),
            ("startTime", &start_ms.to_string()),
            ("endTime", &end_ms.to_string()),
        ],
    )
}

impl Client {
    /// `POST /locations/:locationId/tasks/search` (scope `locations/tasks.readonly`): one
    /// page of the location's tasks matching `body` (`contactId` array, `completed`, `limit`,
    /// `skip`, ...).
    pub async fn task_search(
        &self,
        location_id: &str,
        body: &serde_json::Value,
    ) -> Result<LooseRows, ApiError> {
        let reply: TasksReply = self
            .read_json(
                RequestKind::LocationTasks,
                Method::POST,
                task_search_path(location_id),
                Some(body),
                API_VERSION,
            )
            .await?;
        Ok(loose(reply.tasks))
    }

    /// The request [`Client::task_search`] sends, as errors name it (without the body).
    pub fn task_search_label(location_id: &str) -> RequestLabel {
        RequestLabel::new(&Method::POST, &task_search_path(location_id))
    }

    /// `GET /calendars/?locationId` (scope `calendars.readonly`): the location's calendars.
    /// An element without a string `id` is skipped (it could not be asked for its events).
    pub async fn calendars(&self, location_id: &str) -> Result<Vec<CalendarRef>, ApiError> {
        let reply: CalendarsReply = self
            .read_json(
                RequestKind::LocationEvents,
                Method::GET,
                calendars_path(location_id),
                None,
                CALENDARS_API_VERSION,
            )
            .await?;
        Ok(loose(reply.calendars)
            .rows
            .iter()
            .filter_map(|c| ChildKey::of(c).id.map(|id| CalendarRef { id }))
            .collect())
    }

    /// The request [`Client::calendars`] sends, as errors name it.
    pub fn calendars_label(location_id: &str) -> RequestLabel {
        RequestLabel::new(&Method::GET, &calendars_path(location_id))
    }

    /// `GET /calendars/events` (scope `calendars/events.readonly`): the calendar's events
    /// whose start lies in `[start_ms, end_ms]` (epoch ms, both ends included). Not paged.
    pub async fn calendar_events(
        &self,
        location_id: &str,
        calendar_id: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<LooseRows, ApiError> {
        let reply: EventsReply = self
            .read_json(
                RequestKind::LocationEvents,
                Method::GET,
                events_path(location_id, calendar_id, start_ms, end_ms),
                None,
                CALENDARS_API_VERSION,
            )
            .await?;
        Ok(loose(reply.events))
    }

    /// The request [`Client::calendar_events`] sends, as errors name it.
    pub fn calendar_events_label(
        location_id: &str,
        calendar_id: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> RequestLabel {
        RequestLabel::new(
            &Method::GET,
            &events_path(location_id, calendar_id, start_ms, end_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(json: &str) -> LooseRows {
        let r: TasksReply = serde_json::from_str(json).unwrap();
        loose(r.tasks)
    }

    #[test]
    fn a_task_reply_of_objects_keeps_every_field_as_received() {
        let r =
            rows(r#"{"tasks":[{"id":"t1","contactId":"c1","newField":{"x":[1,2]}},{"_id":"t2"}]}"#);
        assert_eq!(r.served, 2);
        assert_eq!(r.non_objects, 0);
        assert_eq!(
            r.rows[0].get(),
            r#"{"id":"t1","contactId":"c1","newField":{"x":[1,2]}}"#
        );
        assert_eq!(
            ChildKey::of(&r.rows[0]),
            ChildKey {
                id: Some("t1".into()),
                contact_id: Some("c1".into())
            }
        );
        assert_eq!(ChildKey::of(&r.rows[1]).id.as_deref(), Some("t2"));
    }

    #[test]
    fn a_task_reply_shaped_as_the_spec_declares_it_array_of_arrays_is_read_and_non_objects_counted()
    {
        let r = rows(r#"{"tasks":[[{"id":"a"},{"id":"b"},3],{"id":"c"},null,"x",[[]]]}"#);
        let ids: Vec<_> = r.rows.iter().map(|t| ChildKey::of(t).id.unwrap()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(r.served, 5);
        // 3, null, "x", and the [] inside the last array.
        assert_eq!(r.non_objects, 4);
    }

    #[test]
    fn a_reply_without_its_array_is_malformed_not_an_empty_page() {
        assert!(serde_json::from_str::<TasksReply>(r#"{"task":[]}"#).is_err());
        assert!(serde_json::from_str::<TasksReply>(r#"{"tasks":null}"#).is_err());
        assert!(serde_json::from_str::<EventsReply>(r#"{"events":{}}"#).is_err());
    }

    #[test]
    fn identity_fields_of_unexpected_types_are_none() {
        let raw: Box<RawValue> =
            serde_json::from_str(r#"{"id":12,"_id":"m1","contactId":{"a":1}}"#).unwrap();
        assert_eq!(
            ChildKey::of(&raw),
            ChildKey {
                id: Some("m1".into()),
                contact_id: None
            }
        );
        let raw: Box<RawValue> = serde_json::from_str(r#"{"id":""}"#).unwrap();
        assert_eq!(ChildKey::of(&raw), ChildKey::default());
    }

    #[test]
    fn location_wide_paths_encode_their_ids() {
        assert_eq!(task_search_path("L/1"), "/locations/L%2F1/tasks/search");
        assert_eq!(calendars_path("L 1"), "/calendars/?locationId=L+1");
        assert_eq!(
            events_path("L1", "c&1", 5, 9),
            "/calendars/events?locationId=L1&calendarId=c%261&startTime=5&endTime=9"
        );
    }
}
