//! Per-contact children: tasks, notes and appointments, fetched with bounded concurrency.
//!
//! Contacts flow through in listing order (`buffered`, not `buffer_unordered`): the output is
//! then deterministic, and a page boundary in the stream means every contact before it is
//! complete, which is what a checkpoint needs. Head-of-line blocking is bounded by the window;
//! the number of requests in flight is bounded separately by the client's permits, and their
//! pace by the location's rate limiter.

use std::str::FromStr;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::value::RawValue;

use crate::api::{ApiError, Client, ErrorKind};
use crate::extract::{ContactHead, ExtractError, Page, Position};

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
/// was listed (the API's 400 "not found") has no children.
pub async fn fetch_children(
    client: &Client,
    contact_id: &str,
    include: Include,
) -> Result<Children, ApiError> {
    async fn opt(
        on: bool,
        fut: impl std::future::Future<Output = Result<Vec<Box<RawValue>>, ApiError>>,
    ) -> Result<Vec<Box<RawValue>>, ApiError> {
        if !on {
            return Ok(Vec::new());
        }
        match fut.await {
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
                Ok(Vec::new())
            }
            other => other,
        }
    }
    let (tasks, notes, appointments) = futures::try_join!(
        opt(include.tasks, client.tasks_raw(contact_id)),
        opt(include.notes, client.notes_raw(contact_id)),
        opt(include.appointments, client.appointments_raw(contact_id)),
    )?;
    Ok(Children {
        tasks,
        notes,
        appointments,
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

/// Turns a stream of pages into contacts with their children, in order, with at most
/// `window` contacts in progress. With a `filter`, unchanged contacts pass through without
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
                            (Some(id), true) => fetch_children(&client, id, include).await?,
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
}
