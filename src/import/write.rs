//! Writing one contact row: create, or follow `--on-duplicate`, or update by id; never a
//! second contact after an ambiguous failure.
//!
//! A create that failed ambiguously (`maybe_applied`: a timeout or 5xx after sending, or a
//! rerun finding an intent without outcome in the journal) is followed, once it has had time
//! to land (`super::ambiguous`), by `GET /contacts/search/duplicate` before any new create.
//! A contact found that way counts as
//! created by this import only if its `dateAdded` is not older than the first intent (less
//! [`CLOCK_MARGIN_MS`]); an older one existed before and is handled as a duplicate.

use super::ambiguous::{Attempt, InFlight};
use super::journal::{Journal, JournalError, Outcome, Record, RowState};
use super::validate::ContactRow;
use super::OnDuplicate;
use crate::api::{ApiError, Client, Contact, ErrorKind};

/// Server clock allowance when deciding whether a contact found after an ambiguous create is ours.
pub(crate) const CLOCK_MARGIN_MS: i64 = 5_000;

/// How one row ended in this run.
#[derive(Debug)]
pub(crate) enum RowResult {
    Done(Outcome, String),
    /// `retry`: a rerun may succeed; otherwise the API refused the row.
    Failed {
        error: String,
        retry: bool,
    },
    /// Stop the whole import (token refused, quota spent, no access to the location).
    Abort(ApiError),
    /// The create failed ambiguously: take the row up again (lookup first) at `until` (epoch
    /// ms), when the create has surely landed if it was applied (see `super::ambiguous`).
    Deferred {
        until: i64,
    },
}

/// A row whose creates kept failing ambiguously in this run.
pub(crate) fn gave_up() -> RowResult {
    RowResult::Failed {
        error: "the create failed ambiguously several times; rerun with the same journal to finish the row (it is looked up first, never created twice)".into(),
        retry: true,
    }
}

/// Turns an API error into a row result.
pub(crate) fn classify(e: ApiError) -> RowResult {
    match e.kind() {
        ErrorKind::Reauth | ErrorKind::QuotaExhausted => RowResult::Abort(e),
        _ if e.status() == Some(403) => RowResult::Abort(e),
        ErrorKind::Retry => RowResult::Failed {
            error: e.to_string(),
            retry: true,
        },
        ErrorKind::Fatal | ErrorKind::NotFound | ErrorKind::Duplicate => RowResult::Failed {
            error: e.to_string(),
            retry: false,
        },
    }
}

pub(crate) struct ContactWriter<'a> {
    pub client: &'a Client,
    pub journal: &'a Journal,
    pub location_id: &'a str,
    pub on_duplicate: OnDuplicate,
    pub value_key: &'a str,
    pub in_flight: &'a InFlight<'a>,
}

/// Whether `c` was added at or after `since` (epoch ms), allowing for clock skew.
pub(crate) fn added_since(date_added: Option<&str>, since: i64) -> bool {
    date_added
        .and_then(crate::timefmt::parse_iso_millis)
        .is_some_and(|ms| ms >= since - CLOCK_MARGIN_MS)
}

impl ContactWriter<'_> {
    pub(crate) async fn write(
        &self,
        row: &ContactRow,
        prior: Option<&RowState>,
    ) -> Result<RowResult, JournalError> {
        let result = self.write_inner(row, prior).await?;
        match &result {
            RowResult::Done(outcome, id) => {
                self.journal
                    .append(&Record::Done {
                        run: self.journal.run_id().to_owned(),
                        row: row.line,
                        key: row.key(),
                        outcome: *outcome,
                        id: id.clone(),
                        contact: None,
                        source_id: row.source_id.clone(),
                        email: row.email.clone(),
                        phone: row.phone.clone(),
                    })
                    .await?
            }
            RowResult::Failed { error, retry } => {
                self.journal
                    .append(&Record::Failed {
                        run: self.journal.run_id().to_owned(),
                        row: row.line,
                        key: row.key(),
                        error: error.clone(),
                        retry: *retry,
                    })
                    .await?
            }
            RowResult::Abort(_) | RowResult::Deferred { .. } => {}
        }
        Ok(result)
    }

    async fn write_inner(
        &self,
        row: &ContactRow,
        prior: Option<&RowState>,
    ) -> Result<RowResult, JournalError> {
        if let Some(id) = &row.id {
            return Ok(self.update(row, id).await);
        }
        let body = row.create_body(self.location_id, self.value_key);
        let attempt = self
            .in_flight
            .create(
                row.line,
                &row.key(),
                None,
                prior,
                async |_since| {
                    self.client
                        .find_duplicate(
                            self.location_id,
                            row.email.as_deref(),
                            row.phone.as_deref(),
                        )
                        .await
                },
                async |sent| self.client.create_contact(&body, Some(sent)).await,
            )
            .await?;
        Ok(match attempt {
            Attempt::Found { found, since } => self.found(row, found, since).await,
            Attempt::Created(c) => match c.id {
                Some(id) => RowResult::Done(Outcome::Created, id),
                None => RowResult::Failed {
                    error: "POST /contacts/: the reply has no contact id".into(),
                    retry: true,
                },
            },
            Attempt::Refused {
                error:
                    ApiError::Duplicate {
                        contact_id,
                        matching_field,
                        ..
                    },
                earlier,
                first_intent,
            } => {
                if earlier.is_some() {
                    // An earlier attempt may have created it: look at when it was added.
                    match self.client.get_contact(&contact_id).await {
                        Ok(c) => self.found(row, c, first_intent).await,
                        Err(e) => classify(e),
                    }
                } else {
                    self.existing(row, &contact_id, matching_field.as_deref())
                        .await
                }
            }
            Attempt::Refused { error, .. } | Attempt::LookupFailed(error) => classify(error),
            Attempt::Deferred { until } => RowResult::Deferred { until },
            Attempt::GaveUp => gave_up(),
        })
    }

    /// A contact matching the row exists after an ambiguous create.
    async fn found(&self, row: &ContactRow, c: Contact, since: i64) -> RowResult {
        let Some(id) = c.id.clone() else {
            return RowResult::Failed {
                error: "the duplicate search returned a contact without id".into(),
                retry: true,
            };
        };
        if added_since(c.date_added.as_deref(), since) {
            RowResult::Done(Outcome::Created, id)
        } else {
            self.existing(row, &id, None).await
        }
    }

    /// The row matches a contact that existed before: `--on-duplicate`.
    async fn existing(&self, row: &ContactRow, id: &str, field: Option<&str>) -> RowResult {
        match self.on_duplicate {
            OnDuplicate::Update => self.update(row, id).await,
            OnDuplicate::Skip => RowResult::Done(Outcome::Skipped, id.to_owned()),
            OnDuplicate::Fail => RowResult::Failed {
                error: format!(
                    "duplicate of existing contact {id}{} (--on-duplicate fail)",
                    field
                        .map(|f| format!(" (matching {f})"))
                        .unwrap_or_default()
                ),
                retry: false,
            },
        }
    }

    /// `PUT /contacts/:id` without tags, then `POST /contacts/:id/tags`: both idempotent.
    async fn update(&self, row: &ContactRow, id: &str) -> RowResult {
        if let Some(body) = row.update_body(self.value_key) {
            if let Err(e) = self.client.update_contact(id, &body).await {
                return classify(e);
            }
        }
        if !row.tags.is_empty() {
            if let Err(e) = self.client.add_tags(id, &row.tags).await {
                return classify(e);
            }
        }
        RowResult::Done(Outcome::Updated, id.to_owned())
    }
}

/// A dry run's guess for one contact row: `Some(true)` = would update.
pub(crate) async fn would_update(
    client: &Client,
    location_id: &str,
    row: &ContactRow,
) -> Result<bool, ApiError> {
    if let Some(id) = &row.id {
        // An id that does not exist fails at write time; the dry run counts it as an update.
        return match client.get_contact(id).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        };
    }
    client
        .find_duplicate(location_id, row.email.as_deref(), row.phone.as_deref())
        .await
        .map(|c| c.is_some())
}

/// The value a journal key holds for `field` (`email:…|phone:…`).
pub(crate) fn key_part<'k>(key: &'k str, field: &str) -> Option<&'k str> {
    key.split('|')
        .find_map(|p| p.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back_into_email_and_phone() {
        let k = "email:a@b.co|phone:+15550109999";
        assert_eq!(key_part(k, "email"), Some("a@b.co"));
        assert_eq!(key_part(k, "phone"), Some("+15550109999"));
        assert_eq!(key_part("email:|phone:+1", "email"), None);
    }

    #[test]
    fn found_contact_is_ours_only_if_added_after_the_intent() {
        assert!(added_since(
            Some("2024-01-01T00:00:10.000Z"),
            1_704_067_210_000
        ));
        assert!(
            added_since(Some("2024-01-01T00:00:08.000Z"), 1_704_067_210_000),
            "within the clock margin"
        );
        assert!(!added_since(
            Some("2023-12-31T00:00:00.000Z"),
            1_704_067_210_000
        ));
        assert!(!added_since(None, 0));
    }
}
