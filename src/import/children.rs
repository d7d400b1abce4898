//! Writing task and note rows. Tasks and notes have no natural key, so after an ambiguous
//! create (or an intent without outcome found on a rerun), once it has had time to land
//! (`super::ambiguous`), the contact's tasks or notes are
//! listed and one matching the row (tasks: title and dueDate; notes: body, added after the
//! intent) that no other row of the journal has claimed is taken as this row's.
//!
//! Rows of one contact are written one at a time (a per-contact lock), so two rows with the
//! same title and due date cannot both adopt the one task a single create made.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::ambiguous::{Attempt, InFlight};
use super::journal::{Journal, JournalError, Outcome, Record, RowState};
use super::validate::{ChildRow, ContactRef, Entity};
use super::write::{added_since, classify, gave_up, RowResult};
use crate::api::{ApiError, Client};

/// Where children rows find their contacts: the contacts journal, then the API.
pub(crate) struct ContactResolver<'a> {
    pub client: &'a Client,
    pub location_id: &'a str,
    /// From `--id-map` (a contacts import journal): `id:<source id>`, `email:<lower>`,
    /// `phone:<e164>` → the contact id in this location.
    pub map: HashMap<String, String>,
    ids_mapped: bool,
    cache: Mutex<HashMap<String, Option<String>>>,
}

impl<'a> ContactResolver<'a> {
    /// `ids_mapped`: contactId values are ids of another location, to be found in `map`.
    pub(crate) fn new(
        client: &'a Client,
        location_id: &'a str,
        map: HashMap<String, String>,
        ids_mapped: bool,
    ) -> Self {
        ContactResolver {
            client,
            location_id,
            map,
            ids_mapped,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The contact id, `Ok(None)` when no such contact exists.
    pub(crate) async fn resolve(&self, r: &ContactRef) -> Result<Option<String>, ApiError> {
        let key = r.key();
        if let Some(id) = self.map.get(&key) {
            return Ok(Some(id.clone()));
        }
        let (email, phone) = match r {
            // With an id map, contactId is an id of the exported location: one the map does
            // not know belongs to a contact that was not imported, never to one here.
            ContactRef::Id(_) if self.ids_mapped => return Ok(None),
            ContactRef::Id(id) => return Ok(Some(id.clone())),
            ContactRef::Email(e) => (Some(e.as_str()), None),
            ContactRef::Phone(p) => (None, Some(p.as_str())),
        };
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(hit.clone());
        }
        let found = self
            .client
            .find_duplicate(self.location_id, email, phone)
            .await?
            .and_then(|c| c.id);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, found.clone());
        Ok(found)
    }
}

/// The id map a contacts journal gives: source ids, emails and phones of its done rows.
pub(crate) fn id_map(state: &super::journal::JournalState) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for r in state.rows.values() {
        if let Some(d) = &r.done {
            if let Some(s) = &d.source_id {
                m.insert(format!("id:{s}"), d.id.clone());
            }
            if let Some(e) = &d.email {
                m.insert(format!("email:{}", e.to_lowercase()), d.id.clone());
            }
            if let Some(p) = &d.phone {
                m.insert(format!("phone:{p}"), d.id.clone());
            }
        }
    }
    m
}

pub(crate) struct ChildWriter<'a> {
    pub client: &'a Client,
    pub journal: &'a Journal,
    pub entity: Entity,
    /// Child ids some row owns (from the journal, and created or adopted in this run).
    pub claimed: Mutex<HashSet<String>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    in_flight: &'a InFlight<'a>,
}

impl<'a> ChildWriter<'a> {
    pub(crate) fn new(
        client: &'a Client,
        journal: &'a Journal,
        entity: Entity,
        claimed: HashSet<String>,
        in_flight: &'a InFlight<'a>,
    ) -> Self {
        ChildWriter {
            client,
            journal,
            entity,
            claimed: Mutex::new(claimed),
            locks: Mutex::new(HashMap::new()),
            in_flight,
        }
    }

    /// The journal key of a row: its contact reference and what identifies the record.
    pub(crate) fn key(row: &ChildRow) -> String {
        format!("{}|{}", row.contact.key(), row.fingerprint())
    }

    fn claim(&self, id: &str) -> bool {
        self.claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned())
    }

    pub(crate) async fn write(
        &self,
        row: &ChildRow,
        contact_id: &str,
        prior: Option<&RowState>,
    ) -> Result<RowResult, JournalError> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(contact_id.to_owned())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let key = Self::key(row);
        let done = prior.and_then(|p| p.done.clone());
        let id = match done {
            Some(d) => d.id,
            None => match self.create(row, contact_id, &key, prior).await? {
                RowResult::Done(_, id) => {
                    self.journal
                        .append(&Record::Done {
                            run: self.journal.run_id().to_owned(),
                            row: row.line,
                            key: key.clone(),
                            outcome: Outcome::Created,
                            id: id.clone(),
                            contact: Some(contact_id.to_owned()),
                            source_id: None,
                            email: None,
                            phone: None,
                        })
                        .await?;
                    id
                }
                other => return self.record_failure(row, &key, other).await,
            },
        };
        if self.entity == Entity::Tasks && row.completed && !prior.is_some_and(|p| p.closed) {
            if let Err(e) = self.client.complete_task(contact_id, &id, true).await {
                return self.record_failure(row, &key, classify(e)).await;
            }
            self.journal
                .append(&Record::Closed {
                    run: self.journal.run_id().to_owned(),
                    row: row.line,
                    id: id.clone(),
                })
                .await?;
        }
        Ok(RowResult::Done(Outcome::Created, id))
    }

    async fn record_failure(
        &self,
        row: &ChildRow,
        key: &str,
        r: RowResult,
    ) -> Result<RowResult, JournalError> {
        if let RowResult::Failed { error, retry } = &r {
            self.journal
                .append(&Record::Failed {
                    run: self.journal.run_id().to_owned(),
                    row: row.line,
                    key: key.to_owned(),
                    error: error.clone(),
                    retry: *retry,
                })
                .await?;
        }
        Ok(r)
    }

    async fn create(
        &self,
        row: &ChildRow,
        contact_id: &str,
        key: &str,
        prior: Option<&RowState>,
    ) -> Result<RowResult, JournalError> {
        let body = Value::Object(row.body.clone());
        let attempt = self
            .in_flight
            .create(
                row.line,
                key,
                Some(contact_id),
                prior,
                async |since| self.find(row, contact_id, since).await,
                async |sent| match self.entity {
                    Entity::Tasks => self
                        .client
                        .create_task(contact_id, &body, Some(sent))
                        .await
                        .map(|t| t.id),
                    _ => self
                        .client
                        .create_note(contact_id, &body, Some(sent))
                        .await
                        .map(|n| n.id),
                },
            )
            .await?;
        Ok(match attempt {
            Attempt::Found { found, .. } => RowResult::Done(Outcome::Created, found),
            Attempt::Created(Some(id)) => {
                self.claim(&id);
                RowResult::Done(Outcome::Created, id)
            }
            Attempt::Created(None) => RowResult::Failed {
                error: format!(
                    "POST /contacts/{contact_id}/{}: the reply has no id",
                    self.entity.name()
                ),
                retry: true,
            },
            Attempt::Refused { error, .. } | Attempt::LookupFailed(error) => classify(error),
            Attempt::Deferred { until } => RowResult::Deferred { until },
            Attempt::GaveUp => gave_up(),
        })
    }

    /// An unclaimed task or note of the contact matching the row, claimed for it.
    async fn find(
        &self,
        row: &ChildRow,
        contact_id: &str,
        since: i64,
    ) -> Result<Option<String>, ApiError> {
        let list = match self.entity {
            Entity::Tasks => self.client.tasks_raw(contact_id).await?,
            _ => self.client.notes_raw(contact_id).await?,
        };
        let want = |k: &str| {
            row.body
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        for raw in list {
            let Ok(v) = serde_json::from_str::<Value>(raw.get()) else {
                continue;
            };
            let get = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            let matches = match self.entity {
                Entity::Tasks => {
                    let due = |s: String| crate::timefmt::parse_iso_millis(&s);
                    get("title") == want("title") && due(get("dueDate")) == due(want("dueDate"))
                }
                // Notes carry dateAdded: one added before the first intent is not ours.
                _ => {
                    get("body") == want("body")
                        && added_since(v.get("dateAdded").and_then(Value::as_str), since)
                }
            };
            if matches {
                if let Some(id) = v.get("id").and_then(Value::as_str) {
                    if self.claim(id) {
                        return Ok(Some(id.to_owned()));
                    }
                }
            }
        }
        Ok(None)
    }
}
