//! Per-contact children: tasks, notes and appointments, fetched with bounded concurrency.
//!
//! Contacts flow through in listing order (`buffered`, not `buffer_unordered`): the output is
//! then deterministic, and a page boundary in the stream means every contact before it is
//! complete, which is what a checkpoint needs. Head-of-line blocking is bounded by the window;
//! the number of requests in flight is bounded separately by the client's permits, and their
//! pace by the location's rate limiter.
//!
//! A child request the API refuses for good (a 4xx other than 401 and "not found": 403, 422, a
//! 400) would meet the same refusal at every rerun, so failing the run for it would stop the
//! export at that page forever. Such a refusal is instead kept with the contact as a
//! [`SkippedRequest`]: the contact and its other children are written, and the refusal is
//! committed with the page, listed in the manifest and the run report, and capped by
//! `ExportPlan::max_skipped` (a token lacking a scope would otherwise "complete" with every
//! child skipped).

use std::str::FromStr;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::value::RawValue;

use crate::api::{ApiError, Client, ErrorKind};
use crate::extract::{ContactHead, ExtractError, Page, Position};
use crate::schema::Entity;

/// Which children to fetch for each contact.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Include {
    pub tasks: bool,
    pub notes: bool,
    pub appointments: bool,
}

impl Include {
    pub const ALL: Include = Include {
        tasks: true,
        notes: true,
        appointments: true,
    };
    pub const NONE: Include = Include {
        tasks: false,
        notes: false,
        appointments: false,
    };

    pub fn any(&self) -> bool {
        self.tasks || self.notes || self.appointments
    }

    /// Child requests per contact.
    pub fn requests_per_contact(&self) -> u64 {
        u64::from(self.tasks) + u64::from(self.notes) + u64::from(self.appointments)
    }
}

impl std::fmt::Display for Include {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.tasks, "tasks"),
            (self.notes, "notes"),
            (self.appointments, "appointments"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n)
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// Parses `tasks,notes,appointments` (any subset), `all` or `none`.
impl FromStr for Include {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut inc = Include::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.to_ascii_lowercase().as_str() {
                "tasks" => inc.tasks = true,
                "notes" => inc.notes = true,
                "appointments" | "events" => inc.appointments = true,
                "all" => inc = Include::ALL,
                "none" => {}
                other => return Err(format!("unknown child entity '{other}': expected a comma-separated list of tasks, notes, appointments (or all, none)")),
            }
        }
        Ok(inc)
    }
}

/// A contact's children, objects as received. Empty for entities not included.
#[derive(Debug, Default)]
pub struct Children {
    pub tasks: Vec<Box<RawValue>>,
    pub notes: Vec<Box<RawValue>>,
    pub appointments: Vec<Box<RawValue>>,
    /// The child requests the API refused for good: their entity has no rows for this contact.
    pub skipped: Vec<SkippedRequest>,
    /// A child request found the contact gone (deleted since it was listed): no rows.
    pub vanished: bool,
}

/// A child request the API refused for good, as the manifest and the run report list it.
/// Every text comes from the server or names a request: it is stored escaped and shortened,
/// and never holds the token or a query string.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkippedRequest {
    /// `tasks`, `notes` or `appointments`.
    pub entity: String,
    pub contact_id: String,
    /// Method and path, e.g. `GET /contacts/abc/tasks`.
    pub request: String,
    /// The HTTP status of the refusal.
    pub status: u16,
    /// The API's `traceId`, to quote to HighLevel support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The API's message.
    pub message: String,
}

impl SkippedRequest {
    /// The record of `err` if it is a refusal for good of a child request: a 400, 403 or 422
    /// (401 reauthorises, 404/"not found" means no children, 408 and 429 are retried). Refusals made on this side (a redirect, a reply over the size cap) are not
    /// the API's and still stop the run: they concern every request, not this contact.
    pub fn of(err: &ApiError, entity: Entity, contact_id: &str) -> Option<SkippedRequest> {
        let ApiError::Fatal {
            request,
            status,
            messages,
            trace_id,
        } = err
        else {
            return None;
        };
        // The refusals that name this request as sent: a bad request, no access, a value
        // the API will not take. Other 4xx (409, 423, …) may pass: the run stops as before,
        // and a rerun asks again.
        if ![400, 403, 422].contains(status) {
            return None;
        }
        let printable =
            |s: &str, max: usize| crate::schema::truncate_for_message(&crate::term::escape(s), max);
        // The label is `METHOD path?query`: the query goes (child requests have none today,
        // and a query is where a secret could sit).
        let request = request.0.split('?').next().unwrap_or_default();
        Some(SkippedRequest {
            entity: entity.name().to_owned(),
            contact_id: printable(contact_id, 200),
            request: printable(request, 300),
            status: *status,
            trace_id: trace_id.as_deref().map(|t| printable(t, 100)),
            message: printable(&messages.join("; "), 500),
        })
    }
}

impl std::fmt::Display for SkippedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: HTTP {} {}", self.request, self.status, self.message)?;
        match &self.trace_id {
            Some(t) => write!(f, " [traceId {t}]"),
            None => Ok(()),
        }
    }
}

/// A contact with its children, ready to write.
#[derive(Debug)]
pub struct ContactUnit {
    pub contact: Box<RawValue>,
    pub id: Option<String>,
    /// `dateUpdated` in epoch ms, when the contact has a readable one.
    pub date_updated: Option<i64>,
    /// False when an incremental run found the contact unchanged: nothing is fetched or
    /// written for it, it is only recorded as still present.
    pub changed: bool,
    pub children: Children,
}

/// Decides from a contact's id and `dateUpdated` whether it changed since the last run.
pub type ChangeFilter = Arc<dyn Fn(&str, Option<i64>) -> bool + Send + Sync>;

/// What flows from the fan-out to the writer: contacts in listing order, and page ends.
#[derive(Debug)]
pub enum Item {
    Contact(ContactUnit),
    /// Every contact of the page (and its children) came before this.
    PageEnd {
        next: Option<Position>,
        total: Option<u64>,
        contacts: usize,
    },
}

/// Fetches the included children of one contact, concurrently. A contact deleted since it
/// was listed (the API's 400 "not found") has no children; a child request the API refuses
/// for good is recorded in `skipped` (see [`SkippedRequest::of`]) and the others are kept.
pub async fn fetch_children(
    client: &Client,
    contact_id: &str,
    include: Include,
) -> Result<Children, ApiError> {
    type Rows = Vec<Box<RawValue>>;
    async fn opt(
        on: bool,
        entity: Entity,
        contact_id: &str,
        fut: impl std::future::Future<Output = Result<Rows, ApiError>>,
    ) -> Result<(Rows, Option<SkippedRequest>, bool), ApiError> {
        if !on {
            return Ok((Vec::new(), None, false));
        }
        match fut.await {
            Ok(rows) => Ok((rows, None, false)),
            // The API's answer for a contact deleted since it was listed: "Contact with id …
            // not found" (a 400). Any other "not found" (a 404 from a proxy, a moved route)
            // is an error, not an empty list.
            Err(e)
                if e.kind() == ErrorKind::NotFound
                    && e.to_string()
                        .to_ascii_lowercase()
                        .contains("contact with id") =>
            {
                tracing::debug!(error = %e, "contact vanished during the export; no children");
                Ok((Vec::new(), None, true))
            }
            Err(e) => match SkippedRequest::of(&e, entity, contact_id) {
                Some(skip) => {
                    tracing::warn!(error = %e, "the API refused a child request for good: skipped (listed under `skipped` in the manifest and the run report)");
                    Ok((Vec::new(), Some(skip), false))
                }
                None => Err(e),
            },
        }
    }
    let ((tasks, t, vt), (notes, n, vn), (appointments, a, va)) = futures::try_join!(
        opt(
            include.tasks,
            Entity::Tasks,
            contact_id,
            client.tasks_raw(contact_id)
        ),
        opt(
            include.notes,
            Entity::Notes,
            contact_id,
            client.notes_raw(contact_id)
        ),
        opt(
            include.appointments,
            Entity::Appointments,
            contact_id,
            client.appointments_raw(contact_id)
        ),
    )?;
    Ok(Children {
        tasks,
        notes,
        appointments,
        skipped: [t, n, a].into_iter().flatten().collect(),
        vanished: vt || vn || va,
    })
}

enum Pending {
    Contact(Box<RawValue>),
    PageEnd {
        next: Option<Position>,
        total: Option<u64>,
        contacts: usize,
    },
}

/// Contacts whose child requests are under way at once, per request permit of the client:
/// enough to keep every permit busy (each contact has up to three requests, and a reply's
/// decoding overlaps the next request), far fewer than a window that absorbs a slow contact.
const LIVE_PER_PERMIT: usize = 4;

/// Turns a stream of pages into contacts with their children, in order, with at most
/// `window` contacts in progress, of which at most [`LIVE_PER_PERMIT`] per request permit
/// have their requests under way. With a `filter`, unchanged contacts pass through without
/// requests.
pub fn fan_out<S>(
    pages: S,
    client: Arc<Client>,
    include: Include,
    window: usize,
    filter: Option<ChangeFilter>,
) -> impl Stream<Item = Result<Item, ExtractError>>
where
    S: Stream<Item = Result<Page, ExtractError>>,
{
    let live = Arc::new(tokio::sync::Semaphore::new(
        client.concurrency() * LIVE_PER_PERMIT,
    ));
    pages
        .map_ok(|page: Page| {
            let end = Pending::PageEnd {
                next: page.next,
                total: page.total,
                contacts: page.contacts.len(),
            };
            futures::stream::iter(
                page.contacts
                    .into_iter()
                    .map(Pending::Contact)
                    .chain(std::iter::once(end))
                    .map(Ok::<_, ExtractError>),
            )
        })
        .try_flatten()
        .map(move |pending| {
            let client = client.clone();
            let filter = filter.clone();
            let live = live.clone();
            async move {
                match pending? {
                    Pending::PageEnd {
                        next,
                        total,
                        contacts,
                    } => Ok(Item::PageEnd {
                        next,
                        total,
                        contacts,
                    }),
                    Pending::Contact(contact) => {
                        let ContactHead {
                            id, date_updated, ..
                        } = ContactHead::of(&contact);
                        let changed = match (&filter, &id) {
                            (Some(f), Some(id)) => f(id, date_updated),
                            _ => true,
                        };
                        let children = match (&id, changed && include.any()) {
                            (Some(id), true) => {
                                // A contact's requests take about 14 KB of state once started,
                                // most of it waiting for the location's pace: only `live`
                                // contacts start them at once, the rest of the window waits
                                // here with its JSON alone (the permits go in listing order).
                                let _live = live.acquire().await;
                                Box::pin(fetch_children(&client, id, include)).await?
                            }
                            _ => Children::default(),
                        };
                        Ok(Item::Contact(ContactUnit {
                            contact,
                            id,
                            date_updated,
                            changed,
                            children,
                        }))
                    }
                }
            }
        })
        .buffered(window.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_include_lists() {
        assert_eq!(
            "tasks,notes,appointments".parse::<Include>().unwrap(),
            Include::ALL
        );
        assert_eq!("all".parse::<Include>().unwrap(), Include::ALL);
        assert_eq!("none".parse::<Include>().unwrap(), Include::NONE);
        assert_eq!("".parse::<Include>().unwrap(), Include::NONE);
        let t: Include = " Tasks , notes".parse().unwrap();
        assert!(t.tasks && t.notes && !t.appointments);
        assert!("tasks,opportunities"
            .parse::<Include>()
            .unwrap_err()
            .contains("opportunities"));
        assert_eq!(Include::ALL.to_string(), "tasks,notes,appointments");
    }

    fn fatal(status: u16, label: &str, message: &str) -> ApiError {
        ApiError::Fatal {
            request: crate::api::RequestLabel(label.into()),
            status,
            messages: vec![message.into()],
            trace_id: Some("trace\u{1b}[2J-1".into()),
        }
    }

    #[test]
    fn a_403_or_422_on_a_child_request_is_skipped_with_its_request_status_and_trace_id() {
        let s = SkippedRequest::of(
            &fatal(
                403,
                "GET /contacts/c1/notes?x=secret",
                "no access\nforged line",
            ),
            Entity::Notes,
            "c1",
        )
        .expect("a 403 is skipped");
        assert_eq!(s.entity, "notes");
        assert_eq!(s.contact_id, "c1");
        assert_eq!(s.request, "GET /contacts/c1/notes", "no query string");
        assert_eq!(s.status, 403);
        assert!(!s.message.contains('\n') && s.message.contains("forged line"));
        let t = s.trace_id.unwrap();
        assert!(!t.contains('\u{1b}') && t.ends_with("-1"), "{t}");
        assert!(SkippedRequest::of(&fatal(422, "GET /x", "bad"), Entity::Tasks, "c").is_some());
    }

    #[test]
    fn reauth_retry_quota_and_not_found_errors_are_not_skipped() {
        let label = || crate::api::RequestLabel("GET /contacts/c/tasks".into());
        let not_skipped = [
            ApiError::Unauthorized {
                request: label(),
                message: "Invalid JWT".into(),
                trace_id: None,
            },
            ApiError::NotFound {
                request: label(),
                message: "Not Found".into(),
                trace_id: None,
            },
            ApiError::QuotaExhausted {
                request: label(),
                trace_id: None,
            },
            ApiError::Transient {
                request: label(),
                reason: "HTTP 503".into(),
                retry_after: None,
                maybe_applied: false,
                status: Some(503),
                trace_id: None,
            },
            ApiError::Refused {
                request: label(),
                status: Some(302),
                reason: "redirect".into(),
                hint: "check --base-url".into(),
            },
        ];
        for e in &not_skipped {
            assert_eq!(SkippedRequest::of(e, Entity::Tasks, "c"), None, "{e}");
        }
    }
}
