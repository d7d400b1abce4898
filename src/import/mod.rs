//! Bulk import: CSV rows to contacts, tags, tasks and notes, validated first, journaled,
//! resumable, and never a duplicate.
//!
//! A run reads the input twice. The first pass validates every row ([`validate`]) and writes
//! the rejects file; nothing is sent unless the header is usable and the file decodes. It also
//! groups rows naming the same person ([`validate::Grouper`]); when rows are to be merged, one
//! more read collects just those rows. The second pass writes the valid rows with bounded
//! concurrency through the one [`Client`] (its rate limiter and retry policy), journaling each
//! row ([`journal`]). A rerun with the same journal skips finished rows and looks up rows whose
//! create may have happened before creating them again.
//!
//! # Layout
//! - `input`: CSV reading (BOM, delimiter sniffing, quoted newlines) and the mapping file.
//! - `validate`: columns to API fields, per-row checks, request bodies.
//! - `journal`: the append-only, fsync'd journal (locked for the run) and its replay.
//! - `ambiguous`: the one protocol that keeps a create from happening twice (intent, wait for
//!   an ambiguous create to land, look up, create).
//! - `write`: one contact row (create, duplicates, updates, ambiguous failures).
//! - `children`: one task or note row.
//! - `undo`: delete what a journal says was created.
//! - `report`: rejects CSV, JSON summary, printed report.
//! - `cli`: the `import` subcommands' arguments and glue.

mod ambiguous;
mod children;
mod custom_fields;
mod input;
mod journal;
mod report;
mod undo;
mod validate;
mod write;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

pub use ambiguous::{Settle, DEFAULT_SETTLE};
pub use input::{refuse_clobbering, InputEncoding, InputError, Mapping};
pub use journal::{
    read as read_journal, Action, JournalError, JournalState, Outcome, Record, RowState,
};
pub use report::{DefaultCountry, ImportReport, MergedLines, ProblemEntry};
pub use undo::{undo, UndoReport};
pub use validate::{Country, Entity, Reason};

use crate::api::{ApiError, Client};
use ambiguous::InFlight;
use input::{open_csv, RawRecord};
use journal::{Journal, LockedJournal};
use report::{reason_text, Rejects};
use validate::{ColumnPlan, Grouper, Place, Repeats, Row, Rules, Validator};
use write::{classify, ContactWriter, RowResult};

/// `--on-duplicate`: what to do when a create matches an existing contact (the API's 400
/// "does not allow duplicated contacts", or a contact found after an ambiguous failure that
/// predates the import), and with later rows of the file naming the same person as an earlier
/// row (same email ignoring case, phone, or id): merged into the earlier row's write, skipped,
/// or rejected.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum OnDuplicate {
    /// Update the existing contact (`PUT` without tags, then add the row's tags).
    #[default]
    Update,
    /// Leave the existing contact as it is.
    Skip,
    /// Reject the row (it goes to the rejects file).
    Fail,
}

impl std::str::FromStr for OnDuplicate {
    type Err = String;
    fn from_str(s: &str) -> Result<OnDuplicate, String> {
        match s.trim() {
            "update" => Ok(OnDuplicate::Update),
            "skip" => Ok(OnDuplicate::Skip),
            "fail" => Ok(OnDuplicate::Fail),
            _ => Err(format!("'{s}' is not a choice: use update, skip or fail")),
        }
    }
}

/// `--dry-run`: validate and report, write nothing.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DryRun {
    /// No API call at all.
    Offline,
    /// Read-only lookups (`GET /contacts/search/duplicate`, `GET /contacts/:id`) to tell
    /// creates from updates.
    Lookup,
}

/// The input side, shared by every import.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub input: PathBuf,
    /// `None`: sniffed from the header line (`,` `;` tab `|`).
    pub delimiter: Option<u8>,
    pub mapping: Mapping,
    /// How the file's bytes become text.
    pub encoding: InputEncoding,
    pub default_country: Option<Country>,
    /// Without `default_country`: use the location's country (`GET /locations/:id`) when the
    /// file has a phone column. Off for offline dry runs (no API call).
    pub country_from_location: bool,
    /// Keep leading and trailing spaces of free-text cells.
    pub keep_spaces: bool,
    /// Leave unknown columns out instead of refusing to write.
    pub ignore_unknown_columns: bool,
    pub dry_run: Option<DryRun>,
    pub journal: PathBuf,
    pub rejects: PathBuf,
    /// Rows in progress at once (requests are further bounded by the client).
    pub concurrency: usize,
    /// How long a create whose outcome is unknown may take to land and become visible.
    pub settle: Settle,
}

impl SourceOptions {
    /// Defaults next to the input: `FILE.journal.jsonl` and `FILE.rejects.csv`.
    pub fn new(input: impl Into<PathBuf>) -> SourceOptions {
        let input = input.into();
        let beside = |suffix: &str| {
            let mut s = input.clone().into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        SourceOptions {
            journal: beside(".journal.jsonl"),
            rejects: beside(".rejects.csv"),
            input,
            delimiter: None,
            mapping: Mapping::default(),
            encoding: InputEncoding::default(),
            default_country: None,
            country_from_location: false,
            keep_spaces: false,
            ignore_unknown_columns: false,
            dry_run: None,
            concurrency: 8,
            settle: Settle::default(),
        }
    }
}

/// `import contacts`.
#[derive(Clone, Debug)]
pub struct ContactImportOptions {
    pub location_id: String,
    pub source: SourceOptions,
    pub on_duplicate: OnDuplicate,
    /// Never use the `id` column as an update target (it is still recorded for `--id-map`).
    pub ignore_ids: bool,
    /// The key of a custom field's value in request bodies: `field_value` (the spec), `value`
    /// or `fieldValue` (v3).
    pub custom_field_value_key: String,
}

impl ContactImportOptions {
    pub fn new(location_id: impl Into<String>, source: SourceOptions) -> Self {
        ContactImportOptions {
            location_id: location_id.into(),
            source,
            on_duplicate: OnDuplicate::Update,
            ignore_ids: false,
            custom_field_value_key: "field_value".into(),
        }
    }
}

/// `import tasks` and `import notes`.
#[derive(Clone, Debug)]
pub struct ChildImportOptions {
    pub entity: Entity,
    /// Where `email`/`phone` keys are looked up.
    pub location_id: String,
    pub source: SourceOptions,
    /// A contacts import journal: maps the export's contact ids (and emails, phones) to the
    /// contacts it created or updated, without a lookup per row.
    pub id_map: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{path}: the header cannot be imported as it is:\n  {}\nhint: nothing was written; --dry-run lists every problem", problems.join("\n  "))]
    Columns {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("journal {path}: {message}\nhint: use the journal of this import, or a new --journal for a new import")]
    JournalMismatch { path: PathBuf, message: String },
    #[error("journal {0}: no import recorded in it")]
    EmptyJournal(PathBuf),
    /// An output would overwrite an input (or another output): nothing was written.
    #[error("{0}")]
    Clobber(String),
    #[error("rejects file {path}: {source}")]
    Rejects {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the import stopped early ({} created, {} updated so far); rerun the same command to resume", report.created, report.updated)]
    Stopped {
        report: Box<ImportReport>,
        #[source]
        source: ApiError,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Imports contacts. Validation problems and rows the API refused are in the report (and the
/// rejects file), not errors; errors stop the run (unreadable input, journal failure, token
/// refused, quota spent).
pub async fn import_contacts(
    client: Arc<Client>,
    opts: &ContactImportOptions,
) -> Result<ImportReport, ImportError> {
    let mut rules = Rules {
        default_country: opts.source.default_country.clone(),
        keep_spaces: opts.source.keep_spaces,
        location_id: opts.location_id.clone(),
        ignore_ids: opts.ignore_ids,
        on_duplicate: opts.on_duplicate,
    };
    // The journal is locked before anything is written, the rejects file included, so a
    // second run with the same journal is refused having done nothing.
    let (locked, state) = Journal::lock(&opts.source.journal)?;
    let (mut report, rejects, plan) =
        validate_all(&client, Entity::Contacts, &opts.source, &mut rules).await?;
    if let Some(mode) = opts.source.dry_run {
        finish_rejects(rejects, &opts.source)?;
        dry_journal_check(
            &opts.source,
            &state,
            Entity::Contacts,
            &opts.location_id,
            None,
            &mut report,
        )?;
        // A file the real run would refuse gets no lookups: that run would send nothing.
        report.looked_up &= report.refused.is_none();
        if mode == DryRun::Lookup && report.refused.is_none() {
            dry_lookup(&client, opts, &rules, plan, &mut report).await?;
        }
        return Ok(report);
    }
    let journal = open_journal(
        locked,
        &state,
        &opts.source,
        Entity::Contacts,
        &opts.location_id,
    )
    .await?;
    report.journal = Some(opts.source.journal.clone());
    ambiguous::startup_wait(&state, &opts.source.settle).await;
    let in_flight = InFlight::new(&journal, opts.source.settle);
    let writer = ContactWriter {
        in_flight: &in_flight,
        client: &client,
        journal: &journal,
        location_id: &opts.location_id,
        on_duplicate: opts.on_duplicate,
        value_key: &opts.custom_field_value_key,
    };
    let state = &state;
    let writer = &writer;
    let work = |rec: RawRecord, row: Row| async move {
        let Row::Contact(c) = row else {
            unreachable!("a contacts validator yields contacts")
        };
        let prior = state.rows.get(&rec.line);
        if let Some(p) = prior {
            if !p.key.is_empty() && p.key != c.key() {
                let e = mismatch(&opts.source.journal, rec.line, &c.key(), p);
                return (rec, Err(e));
            }
            if p.done.is_some() {
                return (rec, Ok(Step::AlreadyDone));
            }
        }
        let r = match writer.write(&c, prior).await {
            Ok(RowResult::Deferred { until }) => Ok(Step::Later {
                row: Row::Contact(c),
                until,
            }),
            Ok(r) => Ok(Step::Wrote(r)),
            Err(e) => Err(ImportError::from(e)),
        };
        (rec, r)
    };
    write_all(&opts.source, &rules, plan, &mut report, rejects, work).await?;
    Ok(report)
}

/// Imports tasks or notes (see [`ChildImportOptions`]).
pub async fn import_children(
    client: Arc<Client>,
    opts: &ChildImportOptions,
) -> Result<ImportReport, ImportError> {
    let mut rules = Rules {
        default_country: opts.source.default_country.clone(),
        keep_spaces: opts.source.keep_spaces,
        location_id: opts.location_id.clone(),
        ignore_ids: true,
        on_duplicate: OnDuplicate::default(),
    };
    let (locked, state) = Journal::lock(&opts.source.journal)?;
    let (mut report, rejects, plan) =
        validate_all(&client, opts.entity, &opts.source, &mut rules).await?;
    if opts.source.dry_run.is_some() {
        finish_rejects(rejects, &opts.source)?;
        let id_map = opts.id_map.as_deref();
        dry_journal_check(
            &opts.source,
            &state,
            opts.entity,
            &opts.location_id,
            id_map,
            &mut report,
        )?;
        return Ok(report);
    }
    let map = match &opts.id_map {
        Some(p) => {
            let (s, _) = journal::read(p)?;
            if s.entity != Some(Entity::Contacts) {
                return Err(ImportError::JournalMismatch {
                    path: p.clone(),
                    message: "--id-map needs the journal of a contacts import".into(),
                });
            }
            children::id_map(&s)
        }
        None => Default::default(),
    };
    let journal =
        open_journal(locked, &state, &opts.source, opts.entity, &opts.location_id).await?;
    report.journal = Some(opts.source.journal.clone());
    ambiguous::startup_wait(&state, &opts.source.settle).await;
    let in_flight = InFlight::new(&journal, opts.source.settle);
    let resolver =
        children::ContactResolver::new(&client, &opts.location_id, map, opts.id_map.is_some());
    let writer = children::ChildWriter::new(
        &client,
        &journal,
        opts.entity,
        state.claimed_ids(),
        &in_flight,
    );
    let (state, resolver, writer) = (&state, &resolver, &writer);
    let work = |rec: RawRecord, row: Row| async move {
        let Row::Child(c) = row else {
            unreachable!("a children validator yields children")
        };
        let prior = state.rows.get(&rec.line);
        let mut known_contact = None;
        if let Some(p) = prior {
            let key = children::ChildWriter::key(&c);
            if !p.key.is_empty() && p.key != key {
                let e = mismatch(&opts.source.journal, rec.line, &key, p);
                return (rec, Err(e));
            }
            if let Some(d) = &p.done {
                if p.closed || !c.completed {
                    return (rec, Ok(Step::AlreadyDone));
                }
                known_contact = d.contact.clone();
            }
        }
        let contact = match known_contact {
            Some(id) => id,
            None => match resolver.resolve(&c.contact).await {
                Ok(Some(id)) => id,
                Ok(None) => {
                    let what = c.contact.key().replacen(':', " ", 1);
                    let error = match (&c.contact, opts.id_map.is_some()) {
                        (validate::ContactRef::Id(_), true) => format!("contact {what} is not in the --id-map journal (its contact was not imported)"),
                        _ => format!("no contact with {what} in location {}", resolver.location_id),
                    };
                    let failed = RowResult::Failed {
                        error,
                        retry: false,
                    };
                    return (rec, Ok(Step::Wrote(failed)));
                }
                Err(e) => return (rec, Ok(Step::Wrote(classify(e)))),
            },
        };
        let r = match writer.write(&c, &contact, prior).await {
            Ok(RowResult::Deferred { until }) => Ok(Step::Later {
                row: Row::Child(c),
                until,
            }),
            Ok(r) => Ok(Step::Wrote(r)),
            Err(e) => Err(ImportError::from(e)),
        };
        (rec, r)
    };
    write_all(&opts.source, &rules, plan, &mut report, rejects, work).await?;
    Ok(report)
}

enum Step {
    AlreadyDone,
    Wrote(RowResult),
    /// An ambiguous create: the row comes back after the others, once `until` (epoch ms) has
    /// passed.
    Later {
        row: Row,
        until: i64,
    },
}

fn mismatch(journal: &std::path::Path, line: u64, key: &str, prior: &RowState) -> ImportError {
    ImportError::JournalMismatch {
        path: journal.to_owned(),
        message: format!(
            "line {line}: the journal's row has key '{}' but the input's row has '{key}': the input changed since the journal was written",
            prior.key
        ),
    }
}

/// What the first pass decided, for the passes after it: how columns map to fields, and what
/// becomes of rows naming the same person as an earlier row.
pub(crate) struct Checked {
    columns: ColumnPlan,
    repeats: Repeats,
}

/// Pass 1: the outputs checked against the inputs, the header checked, the default country
/// settled, every row validated and grouped by person, rejects written.
///
/// A dry run goes on where a real run stops before writing (header problems, bytes that do not
/// decode) so that it reports every problem; `report.refused` then says why the real run would
/// stop, and the dry run exits as it would.
async fn validate_all(
    client: &Client,
    entity: Entity,
    source: &SourceOptions,
    rules: &mut Rules,
) -> Result<(ImportReport, Rejects, Checked), ImportError> {
    input::refuse_clobbering(
        &[
            ("the rejects file", &source.rejects),
            ("the journal", &source.journal),
        ],
        &[("the input", &source.input)],
    )
    .map_err(ImportError::Clobber)?;
    let mut input = open_csv(&source.input, source.delimiter, source.encoding)?;
    let mut plan = ColumnPlan::new(entity, &input.headers, &source.mapping);
    if plan.names_custom_fields() {
        if let Some(index) = custom_fields::load(client, &rules.location_id).await? {
            plan.resolve_custom_fields(&index);
        }
    }
    let mut report = ImportReport {
        entity: Some(entity),
        input: source.input.clone(),
        dry_run: source.dry_run.is_some(),
        looked_up: source.dry_run == Some(DryRun::Lookup) && entity == Entity::Contacts,
        rejects: source.rejects.clone(),
        skipped_columns: plan.skipped.clone(),
        unknown_columns: plan.unknown.clone(),
        create_only_fields: plan.create_only_fields(),
        ..ImportReport::default()
    };
    let mut file_problems = plan.header_problems.clone();
    if !source.ignore_unknown_columns {
        file_problems = plan.file_problems();
    }
    report.problems.extend(file_problems.iter().map(Into::into));
    if !file_problems.is_empty() {
        if source.dry_run.is_none() {
            return Err(ImportError::Columns {
                path: source.input.clone(),
                problems: file_problems.iter().map(ToString::to_string).collect(),
            });
        }
        report.refuse(format!(
            "the header has {} problem(s) (line 1 above)",
            file_problems.len()
        ));
    }
    settle_country(client, source, &plan, rules, &mut report).await;
    let mut rejects = Rejects::create(&source.rejects, &input.raw_headers, source.encoding)
        .map_err(|e| rejects_err(source, e))?;
    let mut v = Validator::new(plan.clone(), rules.clone());
    let mut grouper = (entity == Entity::Contacts).then(|| Grouper::new(rules.on_duplicate));
    // The first row that does not decode, and how many do not.
    let mut undecodable: Option<(u64, String)> = None;
    let mut undecodable_rows = 0u64;
    while let Some(rec) = input.next_record() {
        let rec = rec?;
        report.rows += 1;
        if rec.undecodable {
            undecodable_rows += 1;
            undecodable.get_or_insert_with(|| (rec.line, rec.problem.clone().unwrap_or_default()));
        }
        let problems = match (v.check(&rec), grouper.as_mut()) {
            (Ok(Row::Contact(c)), Some(g)) => match g.place(&c) {
                Place::First | Place::Merged { .. } => {
                    report.valid += 1;
                    continue;
                }
                Place::Skipped { .. } => {
                    report.valid += 1;
                    report.skipped += 1;
                    report.skipped_in_file += 1;
                    continue;
                }
                Place::Rejected(p) => vec![p],
            },
            (Ok(_), _) => {
                report.valid += 1;
                continue;
            }
            (Err(problems), _) => problems,
        };
        report.add_problems(&problems);
        rejects
            .push(&rec, &reason_text(&problems))
            .map_err(|e| rejects_err(source, e))?;
    }
    if let Some((line, first)) = undecodable {
        let message = format!("{undecodable_rows} row(s) are not UTF-8; the first: {first}");
        if source.dry_run.is_none() {
            finish_rejects(rejects, source)?;
            return Err(InputError::Encoding {
                path: source.input.clone(),
                line,
                message,
            }
            .into());
        }
        report.refuse(format!("line {line}: {message}"));
    }
    let mut repeats = grouper.map(Grouper::finish).unwrap_or_default();
    for (into, lines) in &repeats.groups {
        report.add_merge(*into, lines.clone());
    }
    if repeats.merging() {
        // The rows of each group, merged in file order: only they are kept.
        let mut input = open_csv(&source.input, source.delimiter, source.encoding)?;
        let mut v = Validator::new(plan.clone(), rules.clone());
        while let Some(rec) = input.next_record() {
            let rec = rec?;
            if repeats.wants(rec.line) {
                if let Ok(row) = v.check(&rec) {
                    repeats.collect_record(&rec);
                    repeats.collect(rec.line, row);
                }
            }
        }
    }
    Ok((
        report,
        rejects,
        Checked {
            columns: plan,
            repeats,
        },
    ))
}

/// Dry run: records in `report.refused` what the real run would refuse about the journal
/// (replayed as `state` when it was locked) and the `--id-map` journal (read, never written):
/// the same checks as [`open_journal`] and `import_children`.
fn dry_journal_check(
    source: &SourceOptions,
    state: &JournalState,
    entity: Entity,
    location: &str,
    id_map: Option<&std::path::Path>,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    if let Some(m) = journal_mismatch(state, entity, location) {
        report.refuse(format!("journal {}: {m}", source.journal.display()));
    }
    if let Some(p) = id_map {
        let (s, _) = journal::read(p)?;
        if s.entity != Some(Entity::Contacts) {
            report.refuse(format!(
                "--id-map {}: it needs the journal of a contacts import",
                p.display()
            ));
        }
    }
    Ok(())
}

/// Why the journal (replayed as `state`) is not this import's, if it is not.
fn journal_mismatch(state: &JournalState, entity: Entity, location: &str) -> Option<String> {
    if let Some(e) = state.entity.filter(|e| *e != entity) {
        return Some(format!(
            "it records a {} import, not {}",
            e.name(),
            entity.name()
        ));
    }
    state
        .location
        .as_deref()
        .filter(|l| *l != location)
        .map(|l| format!("it records an import into location {l}, not {location}"))
}

/// Settles the default country of national phone numbers: `--default-country`, else (when
/// allowed and the file has phones) the location's own country, else none.
async fn settle_country(
    client: &Client,
    source: &SourceOptions,
    plan: &ColumnPlan,
    rules: &mut Rules,
    report: &mut ImportReport,
) {
    if rules.default_country.is_none() && source.country_from_location && plan.reads_phones() {
        report.asked_location = true;
        rules.default_country = location_country(client, &rules.location_id).await;
        if let Some(c) = &rules.default_country {
            tracing::info!(country = %c.code, "default country of national phone numbers: the location's");
        }
        report.default_country = rules
            .default_country
            .as_ref()
            .map(|c| report::DefaultCountry {
                code: c.code.clone(),
                from: "location",
            });
    } else if let Some(c) = &rules.default_country {
        report.default_country = Some(report::DefaultCountry {
            code: c.code.clone(),
            from: "flag",
        });
    }
}

/// The location's country (`GET /locations/:id`, scope `locations.readonly`). Any failure
/// leaves no default, said in one warning line: national numbers are then rejected.
async fn location_country(client: &Client, location: &str) -> Option<Country> {
    let what = "national phone numbers will be rejected; pass --default-country to read them";
    match client.get_location(location).await {
        Ok(l) => {
            match l
                .country
                .as_deref()
                .map(str::trim)
                .filter(|c| !c.is_empty())
            {
                Some(code) => match code.parse::<Country>() {
                    Ok(c) => Some(c),
                    Err(_) => {
                        tracing::warn!("the location's country '{}' is not one --default-country knows: {what}", crate::schema::truncate_for_message(code, 40));
                        None
                    }
                },
                None => {
                    tracing::warn!("the location has no country: {what}");
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!("could not read the location's country (GET /locations/{location}: {e}; the token needs the locations.readonly scope): {what}");
            None
        }
    }
}

fn rejects_err(source: &SourceOptions, e: std::io::Error) -> ImportError {
    ImportError::Rejects {
        path: source.rejects.clone(),
        source: e,
    }
}

fn finish_rejects(rejects: Rejects, source: &SourceOptions) -> Result<(), ImportError> {
    rejects.finish().map_err(|e| rejects_err(source, e))
}

/// The rows to write, from a second read of the input, with their records: valid rows
/// written on their own, a group's merged row in place of its first row.
fn valid_rows(
    source: &SourceOptions,
    checked: Checked,
    rules: &Rules,
) -> Result<impl Iterator<Item = Result<(RawRecord, Row), InputError>>, InputError> {
    let mut input = open_csv(&source.input, source.delimiter, source.encoding)?;
    let Checked {
        columns,
        mut repeats,
    } = checked;
    let mut v = Validator::new(columns, rules.clone());
    Ok(std::iter::from_fn(move || loop {
        match input.next_record()? {
            Err(e) => return Some(Err(e)),
            Ok(rec) => {
                if !repeats.written(rec.line) {
                    continue;
                }
                if let Ok(row) = v.check(&rec) {
                    let row = repeats.take(rec.line, row);
                    return Some(Ok((rec, row)));
                }
            }
        }
    }))
}

/// Checks the locked journal belongs to this import, then starts this run in it.
async fn open_journal(
    locked: LockedJournal,
    state: &JournalState,
    source: &SourceOptions,
    entity: Entity,
    location: &str,
) -> Result<Journal, ImportError> {
    if let Some(message) = journal_mismatch(state, entity, location) {
        return Err(ImportError::JournalMismatch {
            path: source.journal.clone(),
            message,
        });
    }
    if state.runs > 0 {
        tracing::info!(journal = %source.journal.display(), earlier_runs = state.runs, rows = state.rows.len(), "resuming from the journal");
    }
    let info = journal::RunInfo {
        entity,
        location: Some(location),
        input: &source.input,
        timeout: source.settle.timeout,
    };
    Ok(locked.start(&info).await?)
}

/// Pass 2: valid rows through `work` with bounded concurrency; outcomes counted, refusals
/// added to the rejects file. Rows whose create failed ambiguously come back in later rounds,
/// after one wait each round (see [`ambiguous`]).
async fn write_all<F, Fut>(
    source: &SourceOptions,
    rules: &Rules,
    plan: Checked,
    report: &mut ImportReport,
    mut rejects: Rejects,
    work: F,
) -> Result<(), ImportError>
where
    F: Fn(RawRecord, Row) -> Fut,
    Fut: std::future::Future<Output = (RawRecord, Result<Step, ImportError>)>,
{
    let mut plan = plan;
    let merged = plan.repeats.take_records();
    let rows = valid_rows(source, plan, rules)?;
    let results = futures::stream::iter(rows)
        .map(|r| {
            let fut = r.map(|(rec, row)| work(rec, row));
            async move {
                match fut {
                    Ok(f) => Ok(f.await),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(source.concurrency.max(1));
    let mut tally = Tally {
        source,
        report,
        rejects: &mut rejects,
        merged,
        later: Vec::new(),
        finished: 0,
        last_log: Instant::now(),
    };
    let mut abort = tally.consume(results).await?;
    while abort.is_none() && !tally.later.is_empty() {
        let later = std::mem::take(&mut tally.later);
        let until = later.iter().map(|(_, _, u)| *u).max().unwrap_or(0);
        ambiguous::wait_for_deferred(until, later.len()).await;
        let results = futures::stream::iter(later)
            .map(|(rec, row, _)| async { Ok(work(rec, row).await) })
            .buffer_unordered(source.concurrency.max(1));
        abort = tally.consume(results).await?;
    }
    finish_rejects(rejects, source)?;
    if let Some(e) = abort {
        report.stopped = Some(e.to_string());
        return Err(ImportError::Stopped {
            report: Box::new(report.clone()),
            source: e,
        });
    }
    Ok(())
}

/// Counts outcomes of pass 2 and keeps the rows to take up again.
struct Tally<'a> {
    source: &'a SourceOptions,
    report: &'a mut ImportReport,
    rejects: &'a mut Rejects,
    /// The records of lines merged into a first line, by that line.
    merged: HashMap<u64, Vec<RawRecord>>,
    later: Vec<(RawRecord, Row, i64)>,
    finished: u64,
    last_log: Instant,
}

impl Tally<'_> {
    /// Drains `results`; returns the error that stops the whole import, if one came.
    async fn consume(
        &mut self,
        results: impl futures::Stream<Item = Result<(RawRecord, Result<Step, ImportError>), InputError>>,
    ) -> Result<Option<ApiError>, ImportError> {
        let mut results = std::pin::pin!(results);
        while let Some(item) = results.next().await {
            let (rec, step) = item?;
            let report = &mut *self.report;
            match step? {
                Step::AlreadyDone => report.already_done += 1,
                Step::Later { row, until } => {
                    self.later.push((rec, row, until));
                    continue;
                }
                Step::Wrote(RowResult::Done(o, _)) => match o {
                    Outcome::Created => report.created += 1,
                    Outcome::Updated => report.updated += 1,
                    Outcome::Skipped => report.skipped += 1,
                },
                Step::Wrote(RowResult::Failed { error, retry: true }) => {
                    report.failed_retryable += 1;
                    tracing::warn!(line = rec.line, %error, "row failed; a rerun with the same journal retries it");
                }
                Step::Wrote(RowResult::Failed {
                    error,
                    retry: false,
                }) => {
                    let p = validate::Problem {
                        line: rec.line,
                        field: None,
                        reason: Reason::Api,
                        message: error.clone(),
                    };
                    report.add_problems(std::slice::from_ref(&p));
                    self.rejects
                        .push(&rec, &error)
                        .map_err(|e| rejects_err(self.source, e))?;
                    // The lines merged into this one were refused with it.
                    for other in self.merged.remove(&rec.line).unwrap_or_default() {
                        let reason = format!("merged into line {}: {error}", rec.line);
                        let p = validate::Problem {
                            line: other.line,
                            field: None,
                            reason: Reason::Api,
                            message: reason.clone(),
                        };
                        report.add_problems(std::slice::from_ref(&p));
                        self.rejects
                            .push(&other, &reason)
                            .map_err(|e| rejects_err(self.source, e))?;
                    }
                }
                Step::Wrote(RowResult::Deferred { .. }) => {
                    // The work functions turn these into `Step::Later`; should one slip
                    // through, the row is left for a rerun, which looks it up first.
                    report.failed_retryable += 1;
                }
                Step::Wrote(RowResult::Abort(e)) => return Ok(Some(e)),
            }
            self.finished += 1;
            if self.last_log.elapsed() >= Duration::from_secs(10) {
                self.last_log = Instant::now();
                tracing::info!(
                    rows = self.finished,
                    of = report.valid,
                    created = report.created,
                    updated = report.updated,
                    "importing"
                );
            }
        }
        Ok(None)
    }
}

/// Dry run with lookups: tells creates from updates, read-only.
async fn dry_lookup(
    client: &Client,
    opts: &ContactImportOptions,
    rules: &Rules,
    plan: Checked,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    let rows: Vec<_> = valid_rows(&opts.source, plan, rules)?.collect::<Result<_, _>>()?;
    let location = opts.location_id.as_str();
    let mut results = std::pin::pin!(futures::stream::iter(rows)
        .map(|(_, row)| async move {
            match row {
                Row::Contact(c) => write::would_update(client, location, &c).await,
                Row::Child(_) => Ok(false),
            }
        })
        .buffer_unordered(opts.source.concurrency.max(1)));
    while let Some(r) = results.next().await {
        match r? {
            true => report.would_update += 1,
            false => report.would_create += 1,
        }
    }
    Ok(())
}
