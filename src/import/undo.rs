//! `import undo`: delete what an import created, as its journal records it.
//!
//! Contacts are deleted with `DELETE /contacts/:id`, tasks with `DELETE …/tasks/:taskId`,
//! notes with `DELETE …/notes/:noteId`. Nothing that was only updated or skipped is touched:
//! the journal does not hold the values before the update, so they cannot be restored.
//!
//! Rows left ambiguous (an intent, no outcome) are looked up like a resumed import would (after
//! waiting for a create still in flight to land), and deleted when the contact found was
//! added after the intent. The journal is locked for the undo like for an import. Each deletion is journaled, so
//! an interrupted undo can be run again.

use futures::StreamExt;
use serde::Serialize;

use super::ambiguous::{self, Settle};
use super::journal::{self, Journal, Outcome, Record};
use super::validate::Entity;
use super::write::{added_since, key_part};
use super::ImportError;
use crate::api::{ApiError, Client, ErrorKind};

/// What `undo` did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UndoReport {
    pub entity: Option<Entity>,
    /// Records deleted now.
    pub deleted: u64,
    /// Records already gone (deleted by an earlier undo, or by someone else).
    pub already_gone: u64,
    /// Deletions that failed; rerun `undo` to retry them.
    pub failed: u64,
    /// Records this import updated or skipped: left as they are (not restored).
    pub left_updated: u64,
    /// Ambiguous rows checked against the API.
    pub ambiguous_checked: u64,
    /// Task or note rows whose create was sent but never confirmed: they have no key to look
    /// them up by, so undo cannot tell whether they exist. Check those contacts by hand.
    pub ambiguous_unchecked: u64,
    pub errors: Vec<String>,
}

impl UndoReport {
    pub fn render(&self) -> String {
        let mut s = format!(
            "undo of a {} import: {} deleted, {} already gone, {} failed; {} updated or skipped records left as they are (undo does not restore updates)",
            self.entity.map_or("?", Entity::name),
            self.deleted,
            self.already_gone,
            self.failed,
            self.left_updated
        );
        if self.ambiguous_unchecked > 0 {
            s.push_str(&format!(
                "\n  {} rows were sent but never confirmed and cannot be looked up (see below)",
                self.ambiguous_unchecked
            ));
        }
        for e in self.errors.iter().take(20) {
            s.push_str(&format!("\n  {e}"));
        }
        s
    }
}

enum Target {
    Contact(String),
    Task { contact: String, id: String },
    Note { contact: String, id: String },
}

/// Deletes what the journal's import created. `concurrency` bounds the deletions in flight.
pub async fn undo(
    client: &Client,
    journal_path: &std::path::Path,
    concurrency: usize,
    settle: &Settle,
) -> Result<UndoReport, ImportError> {
    let (locked, state) = Journal::lock(journal_path)?;
    let Some(entity) = state.entity else {
        return Err(ImportError::EmptyJournal(journal_path.to_owned()));
    };
    let mut report = UndoReport {
        entity: Some(entity),
        ..UndoReport::default()
    };
    let journal = locked
        .start(&journal::RunInfo {
            entity,
            location: state.location.as_deref(),
            input: std::path::Path::new("undo"),
            timeout: settle.timeout,
        })
        .await?;
    // Contacts whose create was never confirmed are looked up: first let them land.
    if entity == Entity::Contacts {
        ambiguous::startup_wait(&state, settle).await;
    }
    let mut targets = Vec::new();
    for (line, r) in &state.rows {
        match &r.done {
            Some(d) if d.outcome == Outcome::Created => {
                if state.undone.contains(&d.id) {
                    continue;
                }
                match (entity, &d.contact) {
                    (Entity::Contacts, _) => targets.push(Target::Contact(d.id.clone())),
                    (Entity::Tasks, Some(c)) => targets.push(Target::Task {
                        contact: c.clone(),
                        id: d.id.clone(),
                    }),
                    (Entity::Notes, Some(c)) => targets.push(Target::Note {
                        contact: c.clone(),
                        id: d.id.clone(),
                    }),
                    (_, None) => {
                        report.failed += 1;
                        report.errors.push(format!(
                            "line {line}: the journal holds no contact id for {} {}, so it cannot be deleted",
                            entity.name(),
                            d.id
                        ));
                    }
                }
            }
            Some(_) => report.left_updated += 1,
            None => {
                if r.pending_since.is_some() && entity != Entity::Contacts {
                    report.ambiguous_unchecked += 1;
                    report.errors.push(format!(
                        "line {line}: its create was sent but never confirmed; if the {} exists, delete it by hand",
                        entity.name().trim_end_matches('s')
                    ));
                    continue;
                }
                let (Some(since), Entity::Contacts, Some(location)) =
                    (r.pending_since, entity, state.location.as_deref())
                else {
                    continue;
                };
                report.ambiguous_checked += 1;
                let found = client
                    .find_duplicate(
                        location,
                        key_part(&r.key, "email"),
                        key_part(&r.key, "phone"),
                    )
                    .await;
                match found {
                    Ok(Some(c)) if added_since(c.date_added.as_deref(), since) => {
                        if let Some(id) = c.id.filter(|id| !state.undone.contains(id)) {
                            targets.push(Target::Contact(id));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        report.failed += 1;
                        report.errors.push(format!("line {line}: {e}"));
                    }
                }
            }
        }
    }
    let results: Vec<(Target, Result<(), ApiError>)> = futures::stream::iter(targets)
        .map(|t| async move {
            let r = match &t {
                Target::Contact(id) => client.delete_contact(id).await,
                Target::Task { contact, id } => client.delete_task(contact, id).await,
                Target::Note { contact, id } => client.delete_note(contact, id).await,
            };
            (t, r)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for (t, r) in results {
        let (id, contact) = match t {
            Target::Contact(id) => (id, None),
            Target::Task { contact, id } | Target::Note { contact, id } => (id, Some(contact)),
        };
        let error = match r {
            Ok(()) => {
                report.deleted += 1;
                None
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                report.already_gone += 1;
                None
            }
            Err(e) => {
                report.failed += 1;
                report.errors.push(e.to_string());
                Some(e.to_string())
            }
        };
        journal
            .append(&Record::Undone {
                run: journal.run_id().to_owned(),
                id,
                contact,
                error,
            })
            .await?;
    }
    Ok(report)
}
