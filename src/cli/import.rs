//! `contacts-etl import …`: arguments (the doc comments are the help), turned into the
//! typed jobs of [`crate::app::import`], and the printing of their reports.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::ConnArgs;
use crate::app::env;
use crate::app::import::{ImportJob, ImportSource, ImportWhat, UndoJob};
use crate::app::Outcome;
use crate::import::{Country, DryRun, Entity, InputEncoding, OnDuplicate};

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
    /// customField.<key> per custom field (its fieldKey without 'contact.', the full fieldKey,
    /// or its id), customFields as the export's JSON, id to update a
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
    #[arg(long, value_enum, value_name = "ENCODING", default_value_t = EncodingArg::Utf8)]
    pub encoding: EncodingArg,

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
    #[arg(long, value_name = "SECS", default_value_t = crate::import::DEFAULT_SETTLE.as_secs())]
    pub settle_secs: u64,
}

/// `--encoding`: how the file's bytes become text.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EncodingArg {
    /// UTF-8 (a BOM is skipped). Bytes that are not UTF-8 stop the import, naming the line.
    #[default]
    #[value(name = "utf-8", alias = "utf8")]
    Utf8,
    /// ISO-8859-1, decoded as windows-1252 (as the WHATWG Encoding Standard and browsers do:
    /// the same characters, plus printable ones such as € and curly quotes in 0x80-0x9F).
    #[value(alias = "iso-8859-1")]
    Latin1,
    /// Windows-1252 (Excel and many CRMs on Windows).
    #[value(name = "windows-1252", alias = "cp1252")]
    Windows1252,
}

impl From<EncodingArg> for InputEncoding {
    fn from(e: EncodingArg) -> InputEncoding {
        match e {
            EncodingArg::Utf8 => InputEncoding::Utf8,
            EncodingArg::Latin1 => InputEncoding::Latin1,
            EncodingArg::Windows1252 => InputEncoding::Windows1252,
        }
    }
}

/// `--on-duplicate`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OnDuplicateArg {
    /// Update the existing contact (`PUT` without tags, then add the row's tags).
    #[default]
    Update,
    /// Leave the existing contact as it is.
    Skip,
    /// Reject the row (it goes to the rejects file).
    Fail,
}

impl From<OnDuplicateArg> for OnDuplicate {
    fn from(d: OnDuplicateArg) -> OnDuplicate {
        match d {
            OnDuplicateArg::Update => OnDuplicate::Update,
            OnDuplicateArg::Skip => OnDuplicate::Skip,
            OnDuplicateArg::Fail => OnDuplicate::Fail,
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
    #[arg(long, value_enum, default_value_t = OnDuplicateArg::Update)]
    pub on_duplicate: OnDuplicateArg,

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

impl SourceArgs {
    fn source(&self) -> ImportSource {
        ImportSource {
            input: self.input.clone(),
            encoding: self.encoding.into(),
            mapping: self.mapping.clone(),
            delimiter: self.delimiter,
            default_country: self.default_country.clone(),
            keep_spaces: self.keep_spaces,
            ignore_unknown_columns: self.ignore_unknown_columns,
            dry_run: self.dry_run.then_some(if self.offline {
                DryRun::Offline
            } else {
                DryRun::Lookup
            }),
            journal: self.journal.clone(),
            rejects: self.rejects.clone(),
            summary: self.summary.clone(),
            settle_secs: self.settle.settle_secs,
        }
    }
}

impl ImportCommand {
    /// The import job these arguments describe (`None` for undo).
    pub fn job(&self) -> Option<ImportJob> {
        let (location, source, conn, what) = match self {
            ImportCommand::Undo(_) => return None,
            ImportCommand::Contacts(c) => (
                &c.location,
                &c.source,
                &c.conn,
                ImportWhat::Contacts {
                    on_duplicate: c.on_duplicate.into(),
                    ignore_ids: c.ignore_ids,
                    custom_field_value_key: c.custom_field_value_key.clone(),
                },
            ),
            ImportCommand::Tasks(c) | ImportCommand::Notes(c) => (
                &c.location,
                &c.source,
                &c.conn,
                ImportWhat::Children {
                    entity: if matches!(self, ImportCommand::Tasks(_)) {
                        Entity::Tasks
                    } else {
                        Entity::Notes
                    },
                    id_map: c.id_map.clone(),
                },
            ),
        };
        Some(ImportJob {
            location: location.clone(),
            what,
            source: source.source(),
            conn: conn.connection(),
        })
    }
}

/// Runs an `import` subcommand and prints its report (stdout).
pub async fn run(args: &ImportArgs, quiet: bool) -> Outcome {
    if let ImportCommand::Undo(u) = &args.command {
        let job = UndoJob {
            journal: u.journal.clone(),
            settle_secs: u.settle.settle_secs,
            conn: u.conn.connection(),
        };
        let done = job.run().await;
        if let (Some(report), false) = (&done.report, quiet) {
            println!("{}", report.render());
        }
        return done.outcome;
    }
    let Some(job) = args.command.job() else {
        return Outcome::usage("not an import");
    };
    run_job(&job, quiet).await
}

/// Runs an import job (from the command line or a pipeline) and prints its report.
pub async fn run_job(job: &ImportJob, quiet: bool) -> Outcome {
    let done = job.run().await;
    if let (Some(report), false) = (&done.report, quiet) {
        print!("{}", report.render());
    }
    done.outcome
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
