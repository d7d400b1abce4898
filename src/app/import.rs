//! Import jobs (`contacts-etl import …` and a pipeline's `[import]`) as typed values, and
//! their runs: options resolved, outputs checked against inputs, the import or undo run, its
//! summary written, and what it came to.

use std::path::PathBuf;
use std::sync::Arc;

use super::conn::{check_ids, Connection};
use super::outcome::{import_outcome, FailKind, Outcome};
use crate::api::{Client, ClientConfig, Token};
use crate::import::{
    ChildImportOptions, ContactImportOptions, Country, DryRun, Entity, ImportError, ImportReport,
    InputEncoding, Mapping, OnDuplicate, SourceOptions, UndoReport, DEFAULT_SETTLE,
};

/// The input file and what to do with it.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportSource {
    pub input: PathBuf,
    pub encoding: InputEncoding,
    /// A TOML file mapping other column names to API fields.
    pub mapping: Option<PathBuf>,
    pub delimiter: Option<u8>,
    pub default_country: Option<Country>,
    pub keep_spaces: bool,
    pub ignore_unknown_columns: bool,
    pub dry_run: Option<DryRun>,
    /// Default: INPUT.journal.jsonl.
    pub journal: Option<PathBuf>,
    /// Default: INPUT.rejects.csv.
    pub rejects: Option<PathBuf>,
    /// Also write the JSON summary here.
    pub summary: Option<PathBuf>,
    pub settle_secs: u64,
}

impl ImportSource {
    pub fn new(input: impl Into<PathBuf>) -> ImportSource {
        ImportSource {
            input: input.into(),
            encoding: InputEncoding::default(),
            mapping: None,
            delimiter: None,
            default_country: None,
            keep_spaces: false,
            ignore_unknown_columns: false,
            dry_run: None,
            journal: None,
            rejects: None,
            summary: None,
            settle_secs: DEFAULT_SETTLE.as_secs(),
        }
    }
}

/// What is imported.
#[derive(Clone, Debug, PartialEq)]
pub enum ImportWhat {
    Contacts {
        on_duplicate: OnDuplicate,
        ignore_ids: bool,
        /// The key of a custom field's value in request bodies.
        custom_field_value_key: String,
    },
    /// Tasks or notes.
    Children {
        entity: Entity,
        /// The journal of the contacts import, mapping ids, emails and phones to contacts.
        id_map: Option<PathBuf>,
    },
}

impl ImportWhat {
    pub fn contacts() -> ImportWhat {
        ImportWhat::Contacts {
            on_duplicate: OnDuplicate::Update,
            ignore_ids: false,
            custom_field_value_key: "field_value".into(),
        }
    }
}

/// An import of one file into one location.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportJob {
    pub location: String,
    pub what: ImportWhat,
    pub source: ImportSource,
    pub conn: Connection,
}

/// `import undo`: delete what an import created.
#[derive(Clone, Debug)]
pub struct UndoJob {
    pub journal: PathBuf,
    pub settle_secs: u64,
    pub conn: Connection,
}

/// What an import came to, with its report for printing (when it got that far).
pub struct ImportFinished {
    pub outcome: Outcome,
    pub report: Option<ImportReport>,
}

impl ImportJob {
    /// Runs the import: validates every row first, writes the journaled rows, writes the
    /// rejects file and the summary.
    pub async fn run(&self) -> ImportFinished {
        let fail = |outcome| ImportFinished {
            outcome,
            report: None,
        };
        if let Err(o) = check_ids("--location", std::slice::from_ref(&self.location)) {
            return fail(o);
        }
        let mut source = match self.source_options() {
            Ok(s) => s,
            Err(o) => return fail(o),
        };
        if let Err(o) = self.refuse_clobbering(&source) {
            return fail(o);
        }
        let result = match &self.what {
            ImportWhat::Contacts {
                on_duplicate,
                ignore_ids,
                custom_field_value_key,
            } => {
                let client = match source.dry_run {
                    Some(DryRun::Offline) => offline_client(),
                    _ => self.conn.client(),
                };
                let client = match client {
                    Ok(c) => c,
                    Err(o) => return fail(o),
                };
                let mut opts = ContactImportOptions::new(self.location.clone(), source.clone());
                opts.on_duplicate = *on_duplicate;
                opts.ignore_ids = *ignore_ids;
                opts.custom_field_value_key = custom_field_value_key.clone();
                crate::import::import_contacts(client, &opts).await
            }
            ImportWhat::Children { entity, id_map } => {
                // A dry run of tasks or notes looks nothing up but the location's country, and
                // only with a token at hand.
                let client = match source.dry_run {
                    Some(DryRun::Offline) => offline_client(),
                    Some(DryRun::Lookup) => self.conn.client().or_else(|_| {
                        source.country_from_location = false;
                        offline_client()
                    }),
                    None => self.conn.client(),
                };
                let client = match client {
                    Ok(c) => c,
                    Err(o) => return fail(o),
                };
                let opts = ChildImportOptions {
                    entity: *entity,
                    location_id: self.location.clone(),
                    source: source.clone(),
                    id_map: id_map.clone(),
                };
                crate::import::import_children(client, &opts).await
            }
        };
        self.finish(result, &source)
    }

    /// The engine's options, with the defaults filled in.
    fn source_options(&self) -> Result<SourceOptions, Outcome> {
        let s = &self.source;
        let mut o = SourceOptions::new(&s.input);
        o.settle = self.conn.settle(s.settle_secs);
        if let Some(m) = &s.mapping {
            o.mapping = Mapping::load(m).map_err(|e| Outcome::failed(FailKind::Usage, e))?;
        }
        o.delimiter = s.delimiter;
        o.encoding = s.encoding;
        o.default_country = s.default_country.clone();
        o.country_from_location = s.default_country.is_none() && s.dry_run != Some(DryRun::Offline);
        o.keep_spaces = s.keep_spaces;
        o.ignore_unknown_columns = s.ignore_unknown_columns;
        o.dry_run = s.dry_run;
        if let Some(j) = &s.journal {
            o.journal = j.clone();
        }
        if let Some(r) = &s.rejects {
            o.rejects = r.clone();
        }
        // Rows in flight: enough to keep every request permit busy while others journal.
        o.concurrency = self.conn.concurrency * 2;
        Ok(o)
    }

    /// Refuses outputs (rejects, summary, journal) that are an input (the file, the mapping,
    /// the id map) or each other, through links or `..`: before anything is written.
    fn refuse_clobbering(&self, s: &SourceOptions) -> Result<(), Outcome> {
        let mut outputs = vec![
            ("--rejects", s.rejects.as_path()),
            ("--journal", s.journal.as_path()),
        ];
        if let Some(p) = &self.source.summary {
            outputs.push(("--summary", p.as_path()));
        }
        let mut inputs = vec![("--input", s.input.as_path())];
        if let Some(p) = &self.source.mapping {
            inputs.push(("--mapping", p.as_path()));
        }
        if let ImportWhat::Children {
            id_map: Some(p), ..
        } = &self.what
        {
            inputs.push(("--id-map", p.as_path()));
        }
        crate::import::refuse_clobbering(&outputs, &inputs).map_err(Outcome::usage)
    }

    fn finish(
        &self,
        result: Result<ImportReport, ImportError>,
        source: &SourceOptions,
    ) -> ImportFinished {
        let report = match result {
            Ok(r) => r,
            Err(ImportError::Stopped { report, source: e }) => {
                let outcome = match self.write_summary(&report) {
                    Err(o) => o,
                    Ok(()) => {
                        let (created, updated) = (report.created, report.updated);
                        import_outcome(ImportError::Api(e), |e| {
                            e.context(format!("the import stopped early ({created} created, {updated} updated); fix the cause and rerun the same command to resume"))
                        })
                    }
                };
                return ImportFinished {
                    outcome,
                    report: Some(*report),
                };
            }
            Err(e) => {
                let input = source.input.display().to_string();
                return ImportFinished {
                    outcome: import_outcome(e, |e| {
                        e.context(format!("import of {input} did not complete"))
                    }),
                    report: None,
                };
            }
        };
        let outcome = if let Err(o) = self.write_summary(&report) {
            o
        } else if let Some(why) = &report.refused {
            Outcome::usage(format!(
                "{}: a real run would refuse this file before any write: {why}\nhint: fix the problems listed above, then run again",
                source.input.display()
            ))
        } else if report.complete() {
            Outcome::Complete
        } else {
            Outcome::Rejected {
                rejected: report.rejected,
                failed: report.failed_retryable,
                rejects: report.rejects.clone(),
            }
        };
        ImportFinished {
            outcome,
            report: Some(report),
        }
    }

    fn write_summary(&self, report: &ImportReport) -> Result<(), Outcome> {
        let Some(path) = &self.source.summary else {
            return Ok(());
        };
        let json = serde_json::to_vec_pretty(report).map_err(anyhow::Error::from)?;
        std::fs::write(path, json).map_err(|e| {
            Outcome::from(anyhow::anyhow!(
                "cannot write the summary {}: {e}",
                path.display()
            ))
        })
    }
}

/// A client for an offline dry run: never used to send anything.
fn offline_client() -> Result<Arc<Client>, Outcome> {
    let token = Token::new("offline-dry-run").map_err(Outcome::usage)?;
    Client::new(ClientConfig::new("http://127.0.0.1:9", token))
        .map(Arc::new)
        .map_err(super::outcome::client_outcome)
}

/// What an undo came to, with its report for printing.
pub struct UndoFinished {
    pub outcome: Outcome,
    pub report: Option<UndoReport>,
}

impl UndoJob {
    pub async fn run(&self) -> UndoFinished {
        let client = match self.conn.client() {
            Ok(c) => c,
            Err(outcome) => {
                return UndoFinished {
                    outcome,
                    report: None,
                }
            }
        };
        let settle = self.conn.settle(self.settle_secs);
        let journal = self.journal.display().to_string();
        match crate::import::undo(&client, &self.journal, self.conn.concurrency, &settle).await {
            Err(e) => UndoFinished {
                outcome: import_outcome(e, |e| {
                    e.context(format!("undo of {journal} did not complete"))
                }),
                report: None,
            },
            Ok(report) => UndoFinished {
                outcome: if report.failed > 0 {
                    Outcome::failed(
                        FailKind::Other,
                        anyhow::anyhow!(
                            "{} deletions failed; rerun `import undo` to retry them",
                            report.failed
                        ),
                    )
                } else {
                    Outcome::Complete
                },
                report: Some(report),
            },
        }
    }
}
