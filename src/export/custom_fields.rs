//! The location's custom field definitions, once per run: the `custom_fields` table, and the
//! wide contacts columns of `--custom-fields wide` ([`crate::schema::WideColumns`]).
//!
//! They are fetched before the listing starts (`GET /locations/:id/customFields?model=contact`,
//! one request) and written as one part committed in the checkpoint, like `deleted_contacts`
//! at the end of a run. The definitions are also kept beside the checkpoint
//! (`custom_fields.json`, tagged with the run's `startedAt`): a run resumed after a stop or a
//! kill neither fetches nor writes them again, and its wide columns are the ones its earlier
//! parts have, even if a field was added meanwhile.
//!
//! A token without the scope `locations/customFields.readonly` (a 401 or 403 on this request)
//! gets one warning and an export without the table (and without wide columns); that, too, is
//! kept for the run's resumptions so every part has the same columns. Any other failure of
//! the request (after the retries) is a warning too, and a resumed run tries again, except
//! where the run cannot go on without it: the daily quota is spent, or `--custom-fields wide`
//! asked for the columns the definitions make.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{ExportError, ExportPlan};
use crate::api::{ApiError, Client, ErrorKind, CUSTOM_FIELDS_SCOPE};
use crate::checkpoint::{self, Checkpoint, EntityReport};
use crate::extract::ExtractError;
use crate::schema::{BatchBuilder, Entity, RowContext, WideColumns};
use crate::sink;

/// How the contacts table shows custom fields (`--custom-fields`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum CustomFieldsMode {
    /// Only the `customFields` column (`[{id, value}]`), as the API sends it.
    #[default]
    Ids,
    /// Also one column per custom field, named by its key.
    Wide,
}

impl std::str::FromStr for CustomFieldsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ids" => Ok(CustomFieldsMode::Ids),
            "wide" => Ok(CustomFieldsMode::Wide),
            other => Err(format!(
                "'{}' is not a custom fields layout: use ids or wide",
                crate::term::escape(other)
            )),
        }
    }
}

impl std::fmt::Display for CustomFieldsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CustomFieldsMode::Ids => "ids",
            CustomFieldsMode::Wide => "wide",
        })
    }
}

/// What the one request for the definitions came to.
enum Fetched {
    Definitions(Vec<Box<RawValue>>),
    /// The token may not read them (401/403): settled for the run.
    NoScope,
    /// Another failure, logged: this attempt goes on without them; a resumed run tries again.
    Failed,
}

/// `custom_fields.json` beside the checkpoint.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    /// The run (its checkpoint's `startedAt`) these are for.
    started_at: String,
    /// As received; `None`: the token may not read them.
    definitions: Option<Vec<Box<RawValue>>>,
}

fn saved_path(ck_path: &Path) -> PathBuf {
    ck_path.with_file_name("custom_fields.json")
}

/// Makes sure this run's custom field definitions are settled: fetched and written as the
/// `custom_fields` table (committed in `ck`) once per run, or known to be out of the token's
/// reach. Returns the wide columns when the plan asks for them and the definitions are known.
pub(super) async fn prepare(
    client: &Client,
    plan: &ExportPlan,
    mut ck: Checkpoint,
    ck_path: &Path,
) -> Result<(Checkpoint, Option<Arc<WideColumns>>), ExportError> {
    let table = Entity::CustomFields.name();
    let have_table = ck.entities.contains_key(table);
    let path = saved_path(ck_path);
    let saved = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
        .filter(|s| s.started_at == ck.started_at);
    let definitions = match saved {
        // Settled by an earlier attempt of this run.
        Some(s) if have_table || s.definitions.is_none() => {
            if s.definitions.is_none() {
                warn_no_scope(plan);
            }
            s.definitions
        }
        _ => {
            let definitions = match fetch(client, plan).await? {
                Fetched::Definitions(d) => Some(d),
                Fetched::NoScope => None,
                Fetched::Failed => return Ok((ck, None)),
            };
            if let (false, Some(defs)) = (have_table, &definitions) {
                write_table(plan, &mut ck, defs)?;
            }
            let bytes = serde_json::to_vec(&Saved {
                started_at: ck.started_at.clone(),
                definitions: definitions.clone(),
            })
            .unwrap_or_default();
            // Before the checkpoint: a checkpoint listing the table always has this file.
            checkpoint::write_atomic(&path, &bytes)?;
            checkpoint::commit(&plan.dest, ck_path, &ck)?;
            definitions
        }
    };
    let wide = match (plan.custom_fields, definitions) {
        (CustomFieldsMode::Wide, Some(defs)) => {
            let defs: Vec<Value> = defs
                .iter()
                .filter_map(|d| serde_json::from_str(d.get()).ok())
                .collect();
            Some(Arc::new(WideColumns::new(&defs)))
        }
        _ => None,
    };
    Ok((ck, wide))
}

/// The definitions, or why there are none (logged). Fails the run only when the quota is
/// spent (nothing else could be fetched either) or when the wide columns were asked for and
/// cannot be made (a rerun resumes).
async fn fetch(client: &Client, plan: &ExportPlan) -> Result<Fetched, ExportError> {
    match client.custom_fields(&plan.location_id).await {
        Ok(raw) => Ok(Fetched::Definitions(
            match serde_json::from_str::<Vec<Box<RawValue>>>(raw.get()) {
                Ok(list) => list,
                Err(_) => {
                    tracing::warn!(location = %plan.location_id, reply = %crate::term::escape(&crate::schema::truncate_for_message(raw.get(), 80)), "the custom field definitions are not a list: writing an empty custom_fields table");
                    Vec::new()
                }
            },
        )),
        Err(e) if e.is_scope_refusal() => {
            tracing::debug!(error = %e, "custom field definitions refused");
            warn_no_scope(plan);
            Ok(Fetched::NoScope)
        }
        // Refused before any reply (the server's certificate, a request that cannot be
        // built): every request of the run would be, so it stops here.
        Err(e)
            if e.kind() == ErrorKind::QuotaExhausted
                || matches!(e, ApiError::Refused { status: None, .. })
                || plan.custom_fields == CustomFieldsMode::Wide =>
        {
            Err(ExportError::Extract(ExtractError::Api(e)))
        }
        Err(e) => {
            tracing::warn!(location = %plan.location_id, error = %e, "cannot read the location's custom field definitions: exporting without the custom_fields table (a resumed run tries again)");
            Ok(Fetched::Failed)
        }
    }
}

fn warn_no_scope(plan: &ExportPlan) {
    let wide = if plan.custom_fields == CustomFieldsMode::Wide {
        " and no wide custom field columns"
    } else {
        ""
    };
    tracing::warn!(
        location = %plan.location_id,
        "the token may not read the location's custom field definitions (it lacks the {CUSTOM_FIELDS_SCOPE} scope): exporting without the custom_fields table{wide}; contacts keep their custom field values by id"
    );
}

/// Writes the definitions as the one `custom_fields` part (`part-00000`) and records it in `ck`
/// (saved by the caller).
fn write_table(
    plan: &ExportPlan,
    ck: &mut Checkpoint,
    defs: &[Box<RawValue>],
) -> Result<(), ExportError> {
    let partition = plan.partition(ck);
    // The table's only part: its own directory has no other, so it takes number 0 and leaves
    // the run's part numbers (`ck.next_part`) to the other tables, whose layout stays as it was.
    let mut part =
        sink::open_part_at(&plan.dest, plan.format, Entity::CustomFields, &partition, 0)?;
    let mut builder = BatchBuilder::new(Entity::CustomFields);
    let ctx = RowContext {
        location_id: &plan.location_id,
        contact_id: None,
    };
    for def in defs {
        if let Err(e) = builder.append(def, &ctx) {
            ck.skipped_objects += 1;
            tracing::warn!(error = %e, "skipping a custom field definition that cannot be written");
        }
    }
    if !builder.is_empty() {
        part.write(&builder.finish())?;
    }
    let info = part.finish()?;
    ck.entities.insert(
        Entity::CustomFields.name().to_owned(),
        EntityReport {
            rows: info.rows,
            files: vec![info],
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClientConfig, Token};
    use crate::sink::Format;

    fn fresh_checkpoint(plan: &ExportPlan) -> Checkpoint {
        Checkpoint {
            settings: plan.settings(),
            started_at: "2026-01-01T00:00:00.000Z".into(),
            export_date: None,
            resumed: 0,
            position: None,
            next_part: 0,
            contacts_listed: 0,
            entities: Default::default(),
            skipped_objects: 0,
            skipped: Vec::new(),
            seen_bytes: 0,
            listing_done: false,
            deletions_done: false,
            complete: false,
            run_kind: None,
            listing_used: None,
            wide: None,
            events: None,
        }
    }

    #[tokio::test]
    async fn unreadable_definitions_leave_an_ids_export_without_the_table_and_stop_a_wide_one() {
        // A port nobody listens on: the request fails without a reply (no retries here).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg =
            ClientConfig::new(format!("http://127.0.0.1:{port}"), Token::new("t").unwrap());
        cfg.retry.max_attempts = 1;
        cfg.rate_limit = None;
        let client = Client::new(cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ck_path = dir.path().join("checkpoint.json");
        let mut plan = ExportPlan::new("L1", Format::Csv, dir.path());
        let (ck, wide) = prepare(&client, &plan, fresh_checkpoint(&plan), &ck_path)
            .await
            .unwrap();
        assert!(wide.is_none());
        assert!(ck.entities.is_empty(), "no table");
        // Nothing settled: a resumed run asks again.
        assert!(!saved_path(&ck_path).exists());
        assert!(!ck_path.exists());

        plan.custom_fields = CustomFieldsMode::Wide;
        let err = prepare(&client, &plan, fresh_checkpoint(&plan), &ck_path)
            .await
            .unwrap_err();
        assert!(err.api().is_some(), "{err}");
        assert!(
            err.to_string().contains("/locations/L1/customFields"),
            "{err}"
        );
    }

    #[test]
    fn custom_fields_layouts_parse_and_print() {
        assert_eq!("ids".parse(), Ok(CustomFieldsMode::Ids));
        assert_eq!(" Wide".parse(), Ok(CustomFieldsMode::Wide));
        assert!("names"
            .parse::<CustomFieldsMode>()
            .unwrap_err()
            .contains("ids or wide"));
        assert_eq!(CustomFieldsMode::Wide.to_string(), "wide");
        assert_eq!(CustomFieldsMode::default(), CustomFieldsMode::Ids);
    }
}
