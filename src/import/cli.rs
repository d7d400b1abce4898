//! `contacts-etl import …`: arguments (the doc comments are the help) and the glue from
//! arguments to an import run and its exit status.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{
    ChildImportOptions, ContactImportOptions, Country, DryRun, Entity, ImportError, ImportReport,
    InputEncoding, InputError, Mapping, OnDuplicate, SourceOptions,
};
use crate::api::Client;
use crate::cli::{env, load_token, ConnArgs};

/// Import contacts, tasks or notes from CSV, validated first, journaled and resumable.
#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub command: ImportCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Import contacts from a CSV file (creates, or updates on a duplicate or an id column).
    ///
    /// Columns are named as the API's fields (firstName, lastName, email, phone, companyName,
    /// address1, city, state, postalCode, country, website, source, timezone, dnd,
    /// dateOfBirth, assignedTo, tags as one comma-separated cell or a JSON array,
    /// customField.<id> per custom field, customFields as the export's JSON, id to update a
    /// contact of this location), or mapped with --mapping. A CSV written by `export` is
    /// accepted as it is: its read-only columns are left out and ids from another location
    /// are not update targets.
    ///
    /// Every row is validated before anything is written; rejected rows go to the rejects
    /// file with a reason. Rows of the file naming the same person (same email ignoring case,
    /// same phone, or same id) follow --on-duplicate: merged into one write, skipped, or
    /// rejected. Each row's outcome goes to the journal (fsync'd); rerunning the
    /// same command skips finished rows, and looks a contact up before creating it again
    /// when an earlier create may have happened (timeout, 5xx, the process killed).
    ///
    /// Exit status: 0 all rows imported; 2 the file cannot be imported as it is (its header,
    /// its encoding, an output path that is an input), a dry run included; 5 some rows failed
    /// transiently (rerun the same command); 6 some rows were rejected (see the rejects file);
    /// 3, 4, 75 as for export.
    Contacts(ContactsArgs),
    /// Import tasks from a CSV file: title, dueDate, body, assignedTo, completed, and the
    /// contact as contactId, email or phone.
    ///
    /// Tasks are created with POST /contacts/:id/tasks and, when completed is true, closed
    /// with PUT …/completed. Tasks have no natural key: the journal keeps a retry or a rerun
    /// from creating a second one.
    Tasks(ChildArgs),
    /// Import notes from a CSV file: body, userId, title, color, pinned, and the contact as
    /// contactId, email or phone.
    Notes(ChildArgs),
    /// Delete what an import created, as its journal records it.
    ///
    /// Contacts, tasks and notes the import created are deleted (a contact with its tasks and
    /// notes). Contacts the import updated are left as they are: their earlier values are not
    /// restored. Safe to rerun.
    Undo(UndoArgs),
}

/// The input file and what to do with it; shared by the import commands.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// The CSV file (a header row; UTF-8 with or without BOM, or see --encoding).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,

    /// The file's text encoding: utf-8, latin1 or windows-1252. A file that is not UTF-8
    /// stops the import (exit 2, naming the line) unless this says which it is. latin1 is
    /// decoded as windows-1252, as the WHATWG Encoding Standard (and the encoding_rs crate)
    /// define that label: the same letters, plus printable characters such as € in
    /// 0x80-0x9F. The rejects file keeps rejected rows in the input's encoding, byte for byte.
    #[arg(long, value_enum, value_name = "ENCODING", default_value_t = InputEncoding::Utf8)]
    pub encoding: InputEncoding,

    /// A TOML file mapping other column names to API fields, with constants and tags for
    /// every row: [columns] "E-mail" = "email"; ignore = ["Col"]; [constants] source = "x";
    /// tags = ["imported"].
    #[arg(long, value_name = "FILE")]
    pub mapping: Option<PathBuf>,

    /// Cell delimiter: ',', ';', '|', or 'tab'. Default: sniffed from the header line.
    #[arg(long, value_parser = parse_delimiter)]
    pub delimiter: Option<u8>,

    /// Country of phone numbers written without a country code (ISO code such as US, GB, DE,
    /// or a calling code such as +44). Without it, the location's country is used
    /// (GET /locations/:id, scope locations.readonly; not with --offline); when that cannot be
    /// read, a warning says so and such numbers are rejected.
    #[arg(long, value_name = "COUNTRY")]
    pub default_country: Option<Country>,

    /// Keep leading and trailing spaces of free-text cells (names, addresses, …). Emails,
    /// phones, ids, booleans and dates are always trimmed.
    #[arg(long)]
    pub keep_spaces: bool,

    /// Leave unknown columns out. Without it an unknown column stops the import before any
    /// write (a dry run reports it).
    #[arg(long)]
    pub ignore_unknown_columns: bool,

    /// Validate and report; write nothing to the API. Contacts: looks each valid row up with
    /// read-only calls (GET /contacts/search/duplicate, or GET /contacts/:id for an id column)
    /// to tell creates from updates; with --offline, makes no API call at all (no token needed).
    /// The rejects file is written. Every problem is reported, and the exit status is the
    /// one the real run would have (2 where it would refuse the file, 6 for rejected rows).
    #[arg(long)]
    pub dry_run: bool,

    /// With --dry-run: no API call at all.
    #[arg(long, requires = "dry_run")]
    pub offline: bool,

    /// The journal of this import. Default: INPUT.journal.jsonl. Rerunning with the same
    /// journal resumes; `import undo --journal` deletes what it created.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,

    /// Where rejected rows go: line and reason first, then the row's cells as read (a row with
    /// more or fewer cells than the header keeps them under the right headers; bytes as in the
    /// input). Default: INPUT.rejects.csv. No output may be an input (or a link to one).
    #[arg(long, value_name = "FILE")]
    pub rejects: Option<PathBuf>,

    /// Also write the JSON summary of the run to this file.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,

    #[command(flatten)]
    pub settle: SettleArg,
}

/// `--settle-secs`, for every command that may look up a create whose outcome is unknown.
#[derive(Debug, Args)]
pub struct SettleArg {
    /// Seconds a write may take, after its request ended, to land and show in the API's
    /// duplicate search. A create whose outcome is unknown (a timeout, a 5xx, a run killed
    /// mid-request) is looked up only when it is older than the request timeout (--timeout)
    /// plus this, so a create still in flight is never made a second time. A rerun after a
    /// killed run waits once for the creates it left unconfirmed, and says so.
    #[arg(long, value_name = "SECS", default_value_t = super::DEFAULT_SETTLE.as_secs())]
    pub settle_secs: u64,
}

impl SettleArg {
    fn settle(&self, conn: &ConnArgs) -> super::Settle {
        super::Settle {
            timeout: std::time::Duration::from_secs(conn.timeout),
            settle: std::time::Duration::from_secs(self.settle_secs),
        }
    }
}

#[derive(Debug, Args)]
pub struct ContactsArgs {
    /// The location (sub-account) to import into.
    #[arg(long, env = env::HL_LOCATION_ID)]
    pub location: String,

    #[command(flatten)]
    pub source: SourceArgs,

    /// When a row matches an existing contact (same email or phone): update it (PUT without
    /// tags, then add the row's tags), skip it, or fail the row. Rows of the file naming the
    /// same person as an earlier row (same email ignoring case, same phone, or same id):
    /// update merges them in file order into the first row's one write (a later non-empty
    /// cell wins, tags and custom fields are merged), skip writes only the first, fail rejects
    /// the later ones naming the first's line. A row that matches two different earlier
    /// people (one by email, another by phone), or another id, is rejected as ambiguous.
    #[arg(long, value_enum, default_value_t = OnDuplicate::Update)]
    pub on_duplicate: OnDuplicate,

    /// Never use the id column as an update target (ids from another location's export are
    /// never used as one anyway).
    #[arg(long)]
    pub ignore_ids: bool,

    /// The key of a custom field's value in request bodies: field_value (the spec), value, or
    /// fieldValue (v3).
    #[arg(long, default_value = "field_value", value_parser = ["field_value", "value", "fieldValue"])]
    pub custom_field_value_key: String,

    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct ChildArgs {
    /// The location whose contacts the rows name (email and phone are looked up there).
    #[arg(long, env = env::HL_LOCATION_ID)]
    pub location: String,

    #[command(flatten)]
    pub source: SourceArgs,

    /// The journal of the contacts import: maps the contactId of an export (and emails and
    /// phones) to the contacts that import created, without a lookup per row.
    #[arg(long, value_name = "JOURNAL")]
    pub id_map: Option<PathBuf>,

    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct UndoArgs {
    /// The journal of the import to undo.
    #[arg(long, value_name = "FILE")]
    pub journal: PathBuf,

    #[command(flatten)]
    pub settle: SettleArg,

    #[command(flatten)]
    pub conn: ConnArgs,
}

fn parse_delimiter(s: &str) -> Result<u8, String> {
    match s {
        "tab" | "\\t" | "\t" => Ok(b'\t'),
        _ if s.len() == 1 && s.is_ascii() && s != "\"" => Ok(s.as_bytes()[0]),
        _ => Err(format!("'{s}': expected one ASCII character, or 'tab'")),
    }
}

/// An import that finished with rows not imported: its exit status tells which kind.
#[derive(Debug, thiserror::Error)]
#[error("{rejected} rows rejected, {failed} rows failed transiently{}", hint(.rejects, *.failed))]
pub struct Incomplete {
    pub rejected: u64,
    pub failed: u64,
    pub rejects: PathBuf,
}

fn hint(rejects: &std::path::Path, failed: u64) -> String {
    let mut s = format!(
        "\nhint: the rejected rows and their reasons are in {}",
        rejects.display()
    );
    if failed > 0 {
        s.push_str(
            "\nhint: rerun the same command to retry the failed rows (finished rows are skipped)",
        );
    }
    s
}

impl Incomplete {
    /// Some rows only need a rerun.
    pub fn transient(&self) -> bool {
        self.failed > 0
    }
}

/// Refuses outputs (rejects, summary, journal) that are an input (the file, the mapping, the
/// --id-map journal) or each other, through links or `..`: exit 2 before anything is written.
fn refuse_clobbering(
    args: &SourceArgs,
    s: &SourceOptions,
    id_map: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut outputs = vec![
        ("--rejects", s.rejects.as_path()),
        ("--journal", s.journal.as_path()),
    ];
    if let Some(p) = &args.summary {
        outputs.push(("--summary", p.as_path()));
    }
    let mut inputs = vec![("--input", s.input.as_path())];
    if let Some(p) = &args.mapping {
        inputs.push(("--mapping", p.as_path()));
    }
    if let Some(p) = id_map {
        inputs.push(("--id-map", p));
    }
    super::input::refuse_clobbering(&outputs, &inputs)
        .map_err(|m| crate::cli::exit::UsageError(m).into())
}

fn source_options(args: &SourceArgs, conn: &ConnArgs) -> anyhow::Result<SourceOptions> {
    let concurrency = conn.concurrency;
    let mut s = SourceOptions::new(&args.input);
    s.settle = args.settle.settle(conn);
    if let Some(m) = &args.mapping {
        s.mapping = Mapping::load(m)?;
    }
    s.delimiter = args.delimiter;
    s.encoding = args.encoding;
    s.default_country = args.default_country.clone();
    s.country_from_location = args.default_country.is_none() && !args.offline;
    s.keep_spaces = args.keep_spaces;
    s.ignore_unknown_columns = args.ignore_unknown_columns;
    s.dry_run = args.dry_run.then_some(if args.offline {
        DryRun::Offline
    } else {
        DryRun::Lookup
    });
    if let Some(j) = &args.journal {
        s.journal = j.clone();
    }
    if let Some(r) = &args.rejects {
        s.rejects = r.clone();
    }
    // Rows in flight: enough to keep every request permit busy while others journal.
    s.concurrency = usize::from(concurrency) * 2;
    Ok(s)
}

fn client(conn: &ConnArgs) -> anyhow::Result<Arc<Client>> {
    let token = load_token(conn.token_file.as_deref())?;
    Ok(Arc::new(Client::new(conn.client_config(token))?))
}

/// A client for an offline dry run: never used to send anything.
fn offline_client() -> anyhow::Result<Arc<Client>> {
    let token = crate::api::Token::new("offline-dry-run").map_err(anyhow::Error::msg)?;
    Ok(Arc::new(Client::new(crate::api::ClientConfig::new(
        "http://127.0.0.1:9",
        token,
    ))?))
}

/// Runs an `import` subcommand: prints the report (stdout), writes the summary, and returns
/// [`Incomplete`] when rows were rejected or failed.
pub async fn run(args: &ImportArgs, quiet: bool) -> anyhow::Result<()> {
    let (result, source, summary) = match &args.command {
        ImportCommand::Undo(u) => {
            let client = client(&u.conn)?;
            let settle = u.settle.settle(&u.conn);
            let report = super::undo(
                &client,
                &u.journal,
                usize::from(u.conn.concurrency),
                &settle,
            )
            .await
            .with_context(|| format!("undo of {} did not complete", u.journal.display()))?;
            if !quiet {
                println!("{}", report.render());
            }
            if report.failed > 0 {
                anyhow::bail!(
                    "{} deletions failed; rerun `import undo` to retry them",
                    report.failed
                );
            }
            return Ok(());
        }
        ImportCommand::Contacts(c) => {
            crate::cli::check_ids("--location", std::slice::from_ref(&c.location))?;
            let source = source_options(&c.source, &c.conn)?;
            refuse_clobbering(&c.source, &source, None)?;
            let client = if source.dry_run == Some(DryRun::Offline) {
                offline_client()?
            } else {
                client(&c.conn)?
            };
            let mut opts = ContactImportOptions::new(c.location.clone(), source.clone());
            opts.on_duplicate = c.on_duplicate;
            opts.ignore_ids = c.ignore_ids;
            opts.custom_field_value_key = c.custom_field_value_key.clone();
            (
                super::import_contacts(client, &opts).await,
                source,
                c.source.summary.clone(),
            )
        }
        ImportCommand::Tasks(c) | ImportCommand::Notes(c) => {
            let entity = if matches!(args.command, ImportCommand::Tasks(_)) {
                Entity::Tasks
            } else {
                Entity::Notes
            };
            crate::cli::check_ids("--location", std::slice::from_ref(&c.location))?;
            let mut source = source_options(&c.source, &c.conn)?;
            refuse_clobbering(&c.source, &source, c.id_map.as_deref())?;
            // A dry run of tasks or notes looks nothing up but the location's country, and
            // only with a token at hand.
            let client = match source.dry_run {
                Some(DryRun::Offline) => offline_client()?,
                Some(DryRun::Lookup) => match client(&c.conn) {
                    Ok(c) => c,
                    Err(_) => {
                        source.country_from_location = false;
                        offline_client()?
                    }
                },
                None => client(&c.conn)?,
            };
            let opts = ChildImportOptions {
                entity,
                location_id: c.location.clone(),
                source: source.clone(),
                id_map: c.id_map.clone(),
            };
            (
                super::import_children(client, &opts).await,
                source,
                c.source.summary.clone(),
            )
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(ImportError::Stopped { report, source: e }) => {
            finish(&report, summary.as_deref(), quiet)?;
            return Err(anyhow::Error::new(e).context(format!(
                "the import stopped early ({} created, {} updated); fix the cause and rerun the same command to resume",
                report.created, report.updated
            )));
        }
        Err(
            e @ (ImportError::Columns { .. }
            | ImportError::JournalMismatch { .. }
            | ImportError::Clobber(_)
            | ImportError::Input(InputError::Encoding { .. })),
        ) => return Err(crate::cli::exit::UsageError(e.to_string()).into()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("import of {} did not complete", source.input.display()))
        }
    };
    finish(&report, summary.as_deref(), quiet)?;
    if let Some(why) = &report.refused {
        return Err(crate::cli::exit::UsageError(format!(
            "{}: a real run would refuse this file before any write: {why}\nhint: fix the problems listed above, then run again",
            source.input.display()
        ))
        .into());
    }
    if report.complete() {
        Ok(())
    } else {
        Err(Incomplete {
            rejected: report.rejected,
            failed: report.failed_retryable,
            rejects: report.rejects.clone(),
        }
        .into())
    }
}

fn finish(
    report: &ImportReport,
    summary: Option<&std::path::Path>,
    quiet: bool,
) -> anyhow::Result<()> {
    if !quiet {
        print!("{}", report.render());
    }
    if let Some(path) = summary {
        let json = serde_json::to_vec_pretty(report)?;
        std::fs::write(path, json)
            .with_context(|| format!("cannot write the summary {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delimiters() {
        assert_eq!(parse_delimiter(";"), Ok(b';'));
        assert_eq!(parse_delimiter("tab"), Ok(b'\t'));
        assert!(parse_delimiter("\"").is_err());
        assert!(parse_delimiter(";;").is_err());
    }
}
