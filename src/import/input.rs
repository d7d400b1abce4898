//! Reading import files: CSV as other CRMs write it, and the TOML mapping file.
//!
//! One builder ([`open_csv`]) makes every CSV reader, so BOM handling, delimiter sniffing,
//! quoting, line numbering and the text encoding are decided once. Records are streamed: the
//! importer reads the file twice (validate everything, then write) instead of holding it in
//! memory.
//!
//! Cells are parsed as bytes and decoded per cell ([`InputEncoding`]); a record keeps its
//! original bytes when the text differs from them, so the rejects file can hold a rejected row
//! exactly as it was read (a latin1 row stays latin1, a damaged byte stays damaged).
//!
//! [`refuse_clobbering`] keeps the outputs of an import (rejects, summary, journal) from
//! landing on one of its inputs, through whatever links or `..` a path takes.

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
    /// The bytes are not text in the encoding the import was told (a usage error: exit 2).
    #[error("{path}:{line}: {message}\nhint: {ENCODING_HINT}")]
    Encoding {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

/// What to do about a file that is not UTF-8.
pub(crate) const ENCODING_HINT: &str = "nothing was sent; if another program wrote the file in latin1 or windows-1252 (Excel, older CRMs), pass --encoding windows-1252; if it is UTF-8 with a damaged byte, fix that line";

/// `--encoding`: how the file's bytes become text.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum InputEncoding {
    /// UTF-8 (a BOM is skipped). Bytes that are not UTF-8 stop the import, naming the line.
    #[default]
    Utf8,
    /// ISO-8859-1, decoded as windows-1252 (as the WHATWG Encoding Standard and browsers do:
    /// the same characters, plus printable ones such as € and curly quotes in 0x80-0x9F).
    Latin1,
    /// Windows-1252 (Excel and many CRMs on Windows).
    Windows1252,
}

impl std::str::FromStr for InputEncoding {
    type Err = String;
    /// The names `--encoding` and a pipeline's `encoding` accept, with their aliases.
    fn from_str(s: &str) -> Result<InputEncoding, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" => Ok(InputEncoding::Utf8),
            "latin1" | "iso-8859-1" => Ok(InputEncoding::Latin1),
            "windows-1252" | "cp1252" => Ok(InputEncoding::Windows1252),
            _ => Err(format!(
                "'{s}' is not an encoding: use utf-8, latin1 or windows-1252"
            )),
        }
    }
}

impl InputEncoding {
    /// The decoder of a single-byte encoding; `None` for UTF-8.
    fn single_byte(self) -> Option<&'static encoding_rs::Encoding> {
        match self {
            InputEncoding::Utf8 => None,
            // encoding_rs maps the label latin1 to windows-1252, per the WHATWG standard.
            InputEncoding::Latin1 | InputEncoding::Windows1252 => Some(encoding_rs::WINDOWS_1252),
        }
    }

    /// Text in this encoding, for what the importer adds to the rejects file (its `reason`
    /// cells): characters the encoding lacks become `&#NNNN;`.
    pub(crate) fn encode<'a>(self, text: &'a str) -> std::borrow::Cow<'a, [u8]> {
        match self.single_byte() {
            None => std::borrow::Cow::Borrowed(text.as_bytes()),
            Some(enc) => enc.encode(text).0,
        }
    }

    /// One cell as text: `Err` names the first byte that is not UTF-8.
    fn decode(self, bytes: &[u8]) -> Result<std::borrow::Cow<'_, str>, String> {
        match self.single_byte() {
            Some(enc) => Ok(enc.decode_without_bom_handling(bytes).0),
            None => std::str::from_utf8(bytes).map(Into::into).map_err(|e| {
                let at = e.valid_up_to();
                format!(
                    "byte 0x{:02X} at position {} is not UTF-8",
                    bytes[at],
                    at + 1
                )
            }),
        }
    }
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
    /// The header row as read (written as it is at the top of the rejects file).
    pub raw_headers: csv::ByteRecord,
    pub encoding: InputEncoding,
    reader: csv::Reader<Source>,
    lines: std::sync::Arc<std::sync::Mutex<Lines>>,
}

/// One record as read: its first line in the file and its cells (not yet trimmed).
#[derive(Clone, Debug, Default)]
pub(crate) struct RawRecord {
    pub line: u64,
    pub cells: Vec<String>,
    /// Set when the record cannot be used as a row at all (bad UTF-8, wrong cell count).
    pub problem: Option<String>,
    /// The cells' bytes as read, kept only when `cells` differ from them (another encoding,
    /// bytes that are not UTF-8).
    pub raw: Option<csv::ByteRecord>,
    /// The record has bytes that are not text in the file's encoding (a file-level problem:
    /// the import needs `--encoding`).
    pub undecodable: bool,
}

impl RawRecord {
    /// The cells as they were in the file.
    pub(crate) fn original_cells(&self) -> Vec<&[u8]> {
        match &self.raw {
            Some(raw) => raw.iter().collect(),
            None => self.cells.iter().map(String::as_bytes).collect(),
        }
    }
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
pub(crate) fn open_csv(
    path: &Path,
    delimiter: Option<u8>,
    encoding: InputEncoding,
) -> Result<CsvInput, InputError> {
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
    if encoding == InputEncoding::Utf8 && head.starts_with(b"\xEF\xBB\xBF") {
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
    let raw_headers = reader
        .byte_headers()
        .map_err(|e| csv_err(path, &e))?
        .clone();
    let headers = raw_headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            encoding
                .decode(h)
                .map(|s| s.trim().to_owned())
                .map_err(|why| InputError::Encoding {
                    path: path.to_owned(),
                    line: 1,
                    message: format!("header {}: {why}", i + 1),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CsvInput {
        path: path.to_owned(),
        headers,
        raw_headers,
        encoding,
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
                let mut changed = false;
                let cells: Vec<String> = rec
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match self.encoding.decode(c) {
                        Ok(std::borrow::Cow::Borrowed(s)) => s.to_owned(),
                        Ok(std::borrow::Cow::Owned(s)) => {
                            changed = true;
                            s
                        }
                        Err(why) => {
                            changed = true;
                            if problem.is_none() {
                                let column = self.headers.get(i).map_or_else(
                                    || format!("cell {}", i + 1),
                                    |h| format!("column '{h}'"),
                                );
                                problem = Some(format!("{column}: {why} (the file is not UTF-8; pass --encoding windows-1252 if another program wrote it in latin1 or windows-1252)"));
                            }
                            String::from_utf8_lossy(c).into_owned()
                        }
                    })
                    .collect();
                let undecodable = problem.is_some();
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
                    raw: changed.then_some(rec),
                    undecodable,
                }))
            }
        }
    }
}

/// Where a path leads: symlinks resolved in the part that exists, `.` and `..` applied to
/// the rest as the OS will once the missing directories are created (`Rejects` creates them).
fn resolved(path: &Path) -> PathBuf {
    let mut out = match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd,
        _ => PathBuf::new(),
    };
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => {
                out.push(other);
                if let Ok(real) = std::fs::canonicalize(&out) {
                    out = real;
                }
            }
        }
    }
    out
}

/// The file itself (device and inode), when it exists: a hard link is the same file.
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// Refuses outputs that would overwrite an input (or another output): the same path, a
/// symlink or a hard link to it, or a path through `..` or linked directories. `what` names
/// each path for the message (`--rejects`, `the input`, …). Checked before anything is
/// written, dry runs included.
pub fn refuse_clobbering(
    outputs: &[(&str, &Path)],
    inputs: &[(&str, &Path)],
) -> Result<(), String> {
    let key = |p: &Path| (resolved(p), file_id(p));
    let same = |a: &(PathBuf, Option<(u64, u64)>), b: &(PathBuf, Option<(u64, u64)>)| {
        a.0 == b.0 || (a.1.is_some() && a.1 == b.1)
    };
    let ins: Vec<_> = inputs.iter().map(|(w, p)| (*w, *p, key(p))).collect();
    let outs: Vec<_> = outputs.iter().map(|(w, p)| (*w, *p, key(p))).collect();
    for (i, (what, path, k)) in outs.iter().enumerate() {
        let clash = ins
            .iter()
            .chain(&outs[..i])
            .find(|(_, _, other)| same(k, other));
        if let Some((other_what, other_path, _)) = clash {
            return Err(format!(
                "{what} {} is the same file as {other_what} {}: writing it would destroy that file\nhint: nothing was written; choose another path for {what}",
                path.display(),
                other_path.display()
            ));
        }
    }
    Ok(())
}

/// `--mapping FILE.toml`: how another CRM's columns become API fields.
///
/// ```toml
/// ignore = ["Internal ID"]          # columns to leave out
/// tags = ["imported", "crm-x"]      # added to every row
/// [columns]                         # column name = API field
/// "E-mail Address" = "email"
/// "Mobile" = "phone"
/// "Favourite colour" = "customField.favourite_color"   # a key, a fieldKey or an id
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
        let mut input = open_csv(f.path(), delimiter, InputEncoding::Utf8).unwrap();
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
    fn latin1_cells_are_decoded_and_keep_their_bytes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"email,firstName\na@x.io,Ren\xe9e \x80\n")
            .unwrap();
        let mut input = open_csv(f.path(), None, InputEncoding::Latin1).unwrap();
        let rec = input.next_record().unwrap().unwrap();
        assert_eq!(rec.cells[1], "Ren\u{e9}e \u{20ac}");
        assert!(rec.problem.is_none());
        assert_eq!(rec.original_cells()[1], b"Ren\xe9e \x80");
        let mut input = open_csv(f.path(), None, InputEncoding::Utf8).unwrap();
        let rec = input.next_record().unwrap().unwrap();
        assert!(rec.undecodable);
        let why = rec.problem.clone().unwrap();
        assert!(
            why.contains("column 'firstName'")
                && why.contains("0xE9")
                && why.contains("--encoding"),
            "{why}"
        );
        assert_eq!(rec.original_cells()[1], b"Ren\xe9e \x80");
        assert_eq!(
            InputEncoding::Latin1.encode("é ☃").as_ref(),
            b"\xe9 &#9731;"
        );
    }

    #[test]
    fn outputs_that_lead_to_an_input_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.csv");
        std::fs::write(&input, "email\n").unwrap();
        let other = dir.path().join("out.csv");
        let via_dots = dir.path().join("new").join("..").join("in.csv");
        let e =
            refuse_clobbering(&[("--rejects", &via_dots)], &[("the input", &input)]).unwrap_err();
        assert!(e.contains("--rejects") && e.contains("the input"), "{e}");
        assert!(refuse_clobbering(&[("--rejects", &other)], &[("the input", &input)]).is_ok());
        assert!(refuse_clobbering(
            &[("--rejects", &other), ("--summary", &other)],
            &[("the input", &input)]
        )
        .is_err());
        #[cfg(unix)]
        {
            let hard = dir.path().join("hard.csv");
            std::fs::hard_link(&input, &hard).unwrap();
            assert!(refuse_clobbering(&[("--summary", &hard)], &[("the input", &input)]).is_err());
            let soft = dir.path().join("soft.csv");
            std::os::unix::fs::symlink(&input, &soft).unwrap();
            assert!(refuse_clobbering(&[("--journal", &soft)], &[("the input", &input)]).is_err());
        }
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
