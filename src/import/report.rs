//! What an import reports: the rejects CSV (its line and reason, then each rejected row's
//! cells as read, bytes and all), the JSON summary, and the report printed for people.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::input::{InputEncoding, RawRecord};
use super::validate::{Entity, Problem};

/// Most problems kept in the summary (all of them are in the rejects file).
pub(crate) const MAX_PROBLEMS: usize = 10_000;

/// One problem as the summary shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProblemEntry {
    pub line: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
    pub message: String,
}

impl From<&Problem> for ProblemEntry {
    fn from(p: &Problem) -> Self {
        ProblemEntry {
            line: p.line,
            field: p.field.clone(),
            reason: p.reason.as_str().to_owned(),
            message: p.message.clone(),
        }
    }
}

/// The JSON summary of a run (also what `--summary FILE` holds).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImportReport {
    pub entity: Option<Entity>,
    pub input: PathBuf,
    pub dry_run: bool,
    /// Dry run only: whether existing contacts were looked up to tell creates from updates.
    pub looked_up: bool,
    /// Whether `GET /locations/:id` was sent (for the default country).
    #[serde(skip)]
    pub asked_location: bool,
    pub journal: Option<PathBuf>,
    pub rejects: PathBuf,
    /// Data rows read (blank lines and the header not counted).
    pub rows: u64,
    /// Rows that passed validation.
    pub valid: u64,
    /// Rows rejected by validation, and at write time by the API.
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub created: u64,
    pub updated: u64,
    pub skipped: u64,
    /// Rows an earlier run with this journal already finished.
    pub already_done: u64,
    /// Rows that failed transiently: a rerun with the same journal retries them.
    pub failed_retryable: u64,
    /// Rows naming a person an earlier row of the file names (same email ignoring case,
    /// same phone, or same id), merged into that row's write (`--on-duplicate update`).
    pub merged: u64,
    /// Which lines were merged into which (the first line of each person), up to 10,000.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_lines: Vec<MergedLines>,
    /// Of `skipped`: rows skipped because an earlier row of the file names the same person
    /// (`--on-duplicate skip`).
    pub skipped_in_file: u64,
    /// The country of national phone numbers, and where it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_country: Option<DefaultCountry>,
    /// Dry run: valid rows that would create or update (when looked up).
    pub would_create: u64,
    pub would_update: u64,
    /// Columns read but not sent (export-only fields, ignored in the mapping).
    pub skipped_columns: Vec<String>,
    pub unknown_columns: Vec<String>,
    /// Fields the file sets that only a create accepts: contacts this import updates keep
    /// their values of these (the API's `PUT /contacts/:id` answers 422 to them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub create_only_fields: Vec<String>,
    /// Every problem found (up to 10,000; the rejects file has them all), by line.
    pub problems: Vec<ProblemEntry>,
    pub problems_truncated: bool,
    /// Set when the run stopped early (token refused, quota spent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Dry run: why a real run would refuse the file before any write (its header, its
    /// encoding, the journal); the dry run then exits 2 as the real run would.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Rows merged into the write of an earlier row (`into`, the person's first line).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MergedLines {
    pub into: u64,
    pub lines: Vec<u64>,
}

/// `--default-country` as used: the code, and `flag` or `location` (`GET /locations/:id`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DefaultCountry {
    pub code: String,
    pub from: &'static str,
}

impl ImportReport {
    /// True when every row was written (or was already): the exit code is 0.
    pub fn complete(&self) -> bool {
        self.rejected == 0
            && self.failed_retryable == 0
            && self.stopped.is_none()
            && self.refused.is_none()
    }

    /// Dry run: adds a reason the real run would refuse the file for.
    pub(crate) fn refuse(&mut self, why: String) {
        self.refused = Some(match self.refused.take() {
            Some(earlier) => format!("{earlier}; {why}"),
            None => why,
        });
    }

    /// Records that the rows `lines` were merged into the row at `into`.
    pub(crate) fn add_merge(&mut self, into: u64, lines: Vec<u64>) {
        self.merged += lines.len() as u64;
        if self.merged_lines.len() < MAX_PROBLEMS {
            self.merged_lines.push(MergedLines { into, lines });
        }
    }

    pub(crate) fn add_problems(&mut self, problems: &[Problem]) {
        self.rejected += 1;
        let mut reasons: Vec<&str> = problems.iter().map(|p| p.reason.as_str()).collect();
        reasons.dedup();
        for r in reasons {
            *self.rejected_by_reason.entry(r.to_owned()).or_default() += 1;
        }
        for p in problems {
            if self.problems.len() < MAX_PROBLEMS {
                self.problems.push(p.into());
            } else {
                self.problems_truncated = true;
            }
        }
    }

    /// The report for people. Problems and reasons quote cells and server messages: they
    /// are escaped ([`crate::term::escape`]) so neither can drive the terminal or forge a line.
    pub fn render(&self) -> String {
        use crate::term::Escaped;
        let what = self.entity.map_or("rows", Entity::name);
        let mut s = String::new();
        if self.dry_run {
            s.push_str(&format!(
                "dry run of {what} import from {}: nothing was written to the API{}\n",
                self.input.display(),
                if self.looked_up {
                    " (existing contacts were looked up, read-only)"
                } else if self.asked_location {
                    " (only the location's country was read)"
                } else {
                    " (no API call made)"
                }
            ));
        } else {
            s.push_str(&format!("{what} import from {}\n", self.input.display()));
        }
        s.push_str(&format!(
            "  rows: {} read, {} valid, {} rejected\n",
            self.rows, self.valid, self.rejected
        ));
        if let Some(c) = &self.default_country {
            let from = if c.from == "location" {
                "from the location"
            } else {
                "from --default-country"
            };
            s.push_str(&format!("  default country {} ({from})\n", c.code));
        }
        if self.merged > 0 {
            let shown: Vec<String> = self
                .merged_lines
                .iter()
                .take(5)
                .map(|m| {
                    let lines: Vec<String> = m.lines.iter().map(u64::to_string).collect();
                    format!("{} into {}", lines.join(", "), m.into)
                })
                .collect();
            let more = if self.merged_lines.len() > 5 {
                ", …"
            } else {
                ""
            };
            s.push_str(&format!(
                "  merged {} rows into an earlier row of the same person (lines {}{more}): one write each\n",
                self.merged,
                shown.join("; ")
            ));
        }
        if self.skipped_in_file > 0 {
            s.push_str(&format!(
                "  skipped {} rows naming the same person as an earlier row (--on-duplicate skip)\n",
                self.skipped_in_file
            ));
        }
        if self.dry_run {
            if self.looked_up {
                s.push_str(&format!(
                    "  would create {}, would update {}\n",
                    self.would_create, self.would_update
                ));
            }
        } else {
            s.push_str(&format!(
                "  created {}, updated {}, skipped {}, already done by an earlier run {}, failed (rerun to retry) {}\n",
                self.created, self.updated, self.skipped, self.already_done, self.failed_retryable
            ));
        }
        if !self.rejected_by_reason.is_empty() {
            s.push_str("  rejected by reason:\n");
            for (r, n) in &self.rejected_by_reason {
                s.push_str(&format!("    {}: {n}\n", Escaped(r)));
            }
        }
        if !self.skipped_columns.is_empty() {
            s.push_str(&format!(
                "  columns read but not sent (export-only or ignored): {}\n",
                self.skipped_columns.join(", ")
            ));
        }
        if !self.create_only_fields.is_empty() {
            s.push_str(&format!(
                "  {}: set on contacts this import creates; the API's update does not accept them, so contacts it updates keep their values\n",
                self.create_only_fields.join(", ")
            ));
        }
        if !self.problems.is_empty() {
            s.push_str("  problems:\n");
            for p in &self.problems {
                match &p.field {
                    Some(f) => s.push_str(&format!(
                        "    line {}, {}: {}\n",
                        p.line,
                        Escaped(f),
                        Escaped(&p.message)
                    )),
                    None => s.push_str(&format!("    line {}: {}\n", p.line, Escaped(&p.message))),
                }
            }
            if self.problems_truncated {
                s.push_str("    … more in the rejects file\n");
            }
        }
        if self.rejected > 0 {
            s.push_str(&format!("  rejected rows: {}\n", self.rejects.display()));
        }
        if let Some(j) = &self.journal {
            s.push_str(&format!("  journal: {}\n", j.display()));
        }
        if let Some(why) = &self.stopped {
            // An error of ours (its `hint:` line kept); server text in it is escaped already.
            s.push_str(&format!(
                "  stopped early: {}\n",
                crate::term::escape_text(why)
            ));
        }
        if let Some(why) = &self.refused {
            s.push_str(&format!("  a real run would refuse this file: {why}\n"));
        }
        s
    }
}

/// The rejects CSV, written under a temporary name and renamed when complete
/// ([`crate::durable`]).
///
/// `line` and `reason` come first, then the row's cells as read: a row with more or fewer
/// cells than the header keeps its cells under the right headers, and every cell keeps its
/// original bytes (the file is in the input's encoding, the reasons encoded to match).
pub(crate) struct Rejects {
    path: PathBuf,
    tmp: PathBuf,
    writer: csv::Writer<std::fs::File>,
    encoding: InputEncoding,
}

impl Rejects {
    pub(crate) fn create(
        path: &Path,
        headers: &csv::ByteRecord,
        encoding: InputEncoding,
    ) -> std::io::Result<Rejects> {
        // A temporary name of this write's own: two runs writing the same rejects file never
        // write into, or rename, each other's.
        let (file, tmp) = crate::durable::create_temp(path)?;
        // Always comma-separated, whatever the input used: the file is read by people and tools.
        let mut writer = csv::WriterBuilder::new().flexible(true).from_writer(file);
        let mut header: Vec<Vec<u8>> = Vec::with_capacity(headers.len() + 2);
        for extra in ["line", "reason"] {
            let mut name = extra.to_owned();
            while headers.iter().any(|h| h == name.as_bytes()) {
                name.insert(0, '_');
            }
            header.push(name.into_bytes());
        }
        header.extend(headers.iter().map(<[u8]>::to_vec));
        writer.write_record(&header).map_err(csv_io)?;
        Ok(Rejects {
            path: path.to_owned(),
            tmp,
            writer,
            encoding,
        })
    }

    pub(crate) fn push(&mut self, rec: &RawRecord, reason: &str) -> std::io::Result<()> {
        let line = rec.line.to_string();
        let reason = self.encoding.encode(reason);
        let fields = [line.as_bytes(), reason.as_ref()]
            .into_iter()
            .chain(rec.original_cells());
        self.writer.write_record(fields).map_err(csv_io)
    }

    /// Makes the file durable under its name ([`crate::durable::commit`]).
    pub(crate) fn finish(self) -> std::io::Result<()> {
        let file = self.writer.into_inner().map_err(|e| e.into_error())?;
        Ok(crate::durable::commit(file, &self.tmp, &self.path)?)
    }
}

fn csv_io(e: csv::Error) -> std::io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => std::io::Error::other(format!("{other:?}")),
    }
}

/// A row's problems as one reason cell.
pub(crate) fn reason_text(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| match &p.field {
            Some(f) => format!("{f}: {}", p.message),
            None => p.message.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}
