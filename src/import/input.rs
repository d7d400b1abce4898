//! Reading import files: CSV as other CRMs write it, and the TOML mapping file.
//!
//! One builder ([`open_csv`]) makes every CSV reader, so BOM handling, delimiter sniffing,
//! quoting and line numbering are decided once. Records are streamed: the importer reads the
//! file twice (validate everything, then write) instead of holding it in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Chain, Cursor, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Problems with an input file as a whole (not with one row).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Csv {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{path}: the file is empty (expected a header row)")]
    Empty { path: PathBuf },
    #[error("{path}: invalid mapping file: {message}")]
    Mapping { path: PathBuf, message: String },
}

type Source = LineCounter<Chain<Cursor<Vec<u8>>, File>>;

/// Line numbers of byte offsets, for a reader read once from start to end. (The csv crate's
/// own record line numbers do not count quoted line breaks and blank lines as a text editor
/// does, and people look rows up by the editor's line number.)
#[derive(Debug, Default)]
struct Lines {
    /// Offsets of line feeds read but not yet passed by a query.
    ahead: std::collections::VecDeque<u64>,
    /// Line feeds before the last queried offset.
    passed: u64,
}

impl Lines {
    /// The 1-based line of `offset`; offsets must be queried in increasing order.
    fn line_of(&mut self, offset: u64) -> u64 {
        while self.ahead.front().is_some_and(|&nl| nl < offset) {
            self.ahead.pop_front();
            self.passed += 1;
        }
        self.passed + 1
    }
}

struct LineCounter<R> {
    inner: R,
    pos: u64,
    lines: std::sync::Arc<std::sync::Mutex<Lines>>,
}

impl<R: Read> Read for LineCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in buf[..n].iter().enumerate() {
            if *b == b'\n' {
                lines.ahead.push_back(self.pos + i as u64);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// An open CSV file: its header row and a reader positioned on the first record.
pub(crate) struct CsvInput {
    pub path: PathBuf,
    pub headers: Vec<String>,
    reader: csv::Reader<Source>,
    lines: std::sync::Arc<std::sync::Mutex<Lines>>,
}

/// One record as read: its first line in the file and its cells (not yet trimmed).
#[derive(Clone, Debug)]
pub(crate) struct RawRecord {
    pub line: u64,
    pub cells: Vec<String>,
    /// Set when the record cannot be used as a row at all (bad UTF-8, wrong cell count).
    pub problem: Option<String>,
}

/// Delimiters tried when none is given, in order of preference on a tie.
const CANDIDATES: [u8; 4] = [b',', b';', b'\t', b'|'];

/// Picks the delimiter that occurs most often outside quotes in the header line.
pub(crate) fn sniff_delimiter(head: &[u8]) -> u8 {
    let mut counts = [0usize; CANDIDATES.len()];
    let mut quoted = false;
    for &b in head {
        match b {
            b'"' => quoted = !quoted,
            b'\n' | b'\r' if !quoted => break,
            _ if !quoted => {
                if let Some(i) = CANDIDATES.iter().position(|&c| c == b) {
                    counts[i] += 1;
                }
            }
            _ => {}
        }
    }
    let mut best = 0;
    for i in 1..CANDIDATES.len() {
        if counts[i] > counts[best] {
            best = i;
        }
    }
    CANDIDATES[best]
}

/// Opens a CSV file: strips a UTF-8 BOM, picks the delimiter (given, else sniffed from the
/// header line), reads the header row. Quoted cells may hold delimiters, quotes and line
/// breaks; blank lines are skipped.
pub(crate) fn open_csv(path: &Path, delimiter: Option<u8>) -> Result<CsvInput, InputError> {
    let io = |source| InputError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut head = Vec::with_capacity(64 * 1024);
    (&mut file)
        .take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(io)?;
    if head.starts_with(b"\xEF\xBB\xBF") {
        head.drain(..3);
    }
    if head.iter().all(u8::is_ascii_whitespace) {
        return Err(InputError::Empty {
            path: path.to_owned(),
        });
    }
    let delimiter = delimiter.unwrap_or_else(|| sniff_delimiter(&head));
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Lines::default()));
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(true)
        .from_reader(LineCounter {
            inner: Cursor::new(head).chain(file),
            pos: 0,
            lines: lines.clone(),
        });
    let headers = reader.byte_headers().map_err(|e| csv_err(path, &e))?;
    let headers = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            String::from_utf8(h.to_vec())
                .map(|s| s.trim().to_owned())
                .map_err(|_| InputError::Csv {
                    path: path.to_owned(),
                    line: 1,
                    message: format!(
                        "header {} is not valid UTF-8 (convert the file to UTF-8)",
                        i + 1
                    ),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CsvInput {
        path: path.to_owned(),
        headers,
        reader,
        lines,
    })
}

fn csv_err(path: &Path, e: &csv::Error) -> InputError {
    let line = e.position().map_or(0, csv::Position::line);
    InputError::Csv {
        path: path.to_owned(),
        line,
        message: e.to_string(),
    }
}

impl CsvInput {
    /// The next record, `None` at the end. An I/O error ends the read.
    pub(crate) fn next_record(&mut self) -> Option<Result<RawRecord, InputError>> {
        let mut rec = csv::ByteRecord::new();
        match self.reader.read_byte_record(&mut rec) {
            Ok(false) => None,
            Err(e) => Some(Err(csv_err(&self.path, &e))),
            Ok(true) => {
                // The csv crate's record start skips neither blank lines nor a CRLF's LF, so
                // the line is found from the record's end (its terminator sits just before the
                // reader's position) less the line breaks inside its quoted cells.
                let end = self.reader.position().byte();
                let last = self
                    .lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .line_of(end.saturating_sub(1));
                let inner = rec
                    .iter()
                    .map(|c| c.iter().filter(|&&b| b == b'\n').count() as u64)
                    .sum::<u64>();
                let line = last.saturating_sub(inner).max(2);
                let mut problem = None;
                let cells: Vec<String> = rec
                    .iter()
                    .map(|c| match std::str::from_utf8(c) {
                        Ok(s) => s.to_owned(),
                        Err(_) => {
                            problem = Some(
                                "the row is not valid UTF-8 (convert the file to UTF-8)".to_owned(),
                            );
                            String::from_utf8_lossy(c).into_owned()
                        }
                    })
                    .collect();
                if problem.is_none() && cells.len() != self.headers.len() {
                    problem = Some(format!(
                        "the row has {} cells, the header has {}",
                        cells.len(),
                        self.headers.len()
                    ));
                }
                Some(Ok(RawRecord {
                    line,
                    cells,
                    problem,
                }))
            }
        }
    }
}

/// `--mapping FILE.toml`: how another CRM's columns become API fields.
///
/// ```toml
/// ignore = ["Internal ID"]          # columns to leave out
/// tags = ["imported", "crm-x"]      # added to every row
/// [columns]                         # column name = API field
/// "E-mail Address" = "email"
/// "Mobile" = "phone"
/// "Favourite colour" = "customField.kP3sQ1xZ9aB4cD5eF6gH"
/// [constants]                       # field = value, for every row (a cell wins)
/// source = "crm-x migration"
/// ```
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub ignore: Vec<String>,
    #[serde(default)]
    pub constants: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Mapping {
    pub fn load(path: &Path) -> Result<Mapping, InputError> {
        let text = std::fs::read_to_string(path).map_err(|source| InputError::Io {
            path: path.to_owned(),
            source,
        })?;
        Mapping::parse(&text).map_err(|message| InputError::Mapping {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Mapping, String> {
        let m: Mapping =
            toml::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| e.to_string())?;
        for (k, v) in &m.constants {
            if !matches!(
                v,
                toml::Value::String(_)
                    | toml::Value::Boolean(_)
                    | toml::Value::Integer(_)
                    | toml::Value::Float(_)
            ) {
                return Err(format!(
                    "constants.{k}: expected a string, number or boolean"
                ));
            }
        }
        Ok(m)
    }
}

/// A constant as the cell text it stands for.
pub(crate) fn constant_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read_all(bytes: &[u8], delimiter: Option<u8>) -> (Vec<String>, Vec<RawRecord>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let mut input = open_csv(f.path(), delimiter).unwrap();
        let mut recs = Vec::new();
        while let Some(r) = input.next_record() {
            recs.push(r.unwrap());
        }
        (input.headers.clone(), recs)
    }

    #[test]
    fn bom_semicolons_quoted_newlines_and_blank_lines() {
        let text = "\u{feff}email ; firstName\r\na@x.io;\"Ann\r\nMarie\"\r\n\r\n\r\nb@x.io;Bob\r\n";
        let (headers, recs) = read_all(text.as_bytes(), None);
        assert_eq!(headers, ["email", "firstName"]);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].line, 2);
        assert_eq!(recs[0].cells[1], "Ann\r\nMarie");
        assert_eq!(recs[1].line, 6, "blank lines are skipped but counted");
    }

    #[test]
    fn line_numbers_with_lf_and_no_final_newline() {
        let text = "email,note\n\na@x.io,\"one\ntwo\nthree\"\nb@x.io,x\n\nc@x.io,\"q\"";
        let (_, recs) = read_all(text.as_bytes(), None);
        let lines: Vec<u64> = recs.iter().map(|r| r.line).collect();
        assert_eq!(lines, [3, 6, 8]);
    }

    #[test]
    fn sniffing_ignores_delimiters_inside_quotes() {
        assert_eq!(sniff_delimiter(b"\"a;b;c\",d,e\n"), b',');
        assert_eq!(sniff_delimiter(b"a\tb\tc\n"), b'\t');
        assert_eq!(sniff_delimiter(b"single\n"), b',');
    }

    #[test]
    fn short_rows_and_bad_utf8_are_row_problems() {
        let (_, recs) = read_all(b"a,b\n1\n\xff,2\n", Some(b','));
        assert!(recs[0].problem.as_deref().unwrap().contains("1 cells"));
        assert!(recs[1].problem.as_deref().unwrap().contains("UTF-8"));
    }

    #[test]
    fn mapping_parses_and_rejects_unknown_keys() {
        let m = Mapping::parse("tags=[\"x\"]\n[columns]\n\"E-mail\"=\"email\"\n[constants]\nsource=\"crm\"\ndnd=false\n").unwrap();
        assert_eq!(m.columns["E-mail"], "email");
        assert_eq!(constant_text(&m.constants["dnd"]), "false");
        assert!(Mapping::parse("colums = {}").is_err());
        assert!(Mapping::parse("[constants]\nx=[1]").is_err());
    }
}
