//! State for incremental (nightly) exports: which contacts existed at the last complete run,
//! and their `dateUpdated`.
//!
//! The state is a text file of `id<TAB>dateUpdatedMs` lines sorted by id (about 35 bytes a
//! contact), loaded into three flat vectors for binary search (about 32 bytes a contact in
//! memory). During a run, every listed contact is appended to a `seen` log; the writer fsyncs
//! it at each commit and the checkpoint records its committed length, so a resumed run
//! truncates what was not committed. At the end, the sorted `seen` log becomes the new state,
//! and the ids of the old state missing from it are the deletions.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Marks a contact whose `dateUpdated` was absent or unreadable: always treated as changed.
const UNKNOWN: i64 = i64::MIN;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StateError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError {
        path: path.to_path_buf(),
        source,
    }
}

/// The previous run's contacts, sorted by id.
#[derive(Debug, Default)]
pub struct PrevState {
    keys: String,
    ends: Vec<u32>,
    ms: Vec<i64>,
}

impl PrevState {
    /// Loads a state file; `None` when there is none (the first run).
    pub fn load(path: &Path) -> Result<Option<PrevState>, StateError> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(path)(e)),
        };
        let mut st = PrevState::default();
        let mut prev: Option<String> = None;
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(err(path))?;
            let (id, ms) = parse_line(&line).ok_or_else(|| err(path)(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {}: not `id<TAB>ms`; delete the file to start over with a full export", n + 1))))?;
            if prev.as_deref().is_some_and(|p| p >= id) {
                return Err(err(path)(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {}: ids are not sorted; delete the file to start over with a full export", n + 1))));
            }
            st.keys.push_str(id);
            st.ends.push(st.keys.len() as u32);
            st.ms.push(ms);
            prev = Some(id.to_owned());
        }
        Ok(Some(st))
    }

    pub fn len(&self) -> usize {
        self.ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ms.is_empty()
    }

    fn key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.keys[start..self.ends[i] as usize]
    }

    fn find(&self, id: &str) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key(mid).cmp(id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Whether a contact is new or changed since the previous run.
    pub fn changed(&self, id: &str, date_updated: Option<i64>) -> bool {
        match (self.find(id), date_updated) {
            (Some(i), Some(ms)) => self.ms[i] == UNKNOWN || self.ms[i] != ms,
            _ => true,
        }
    }
}

fn parse_line(line: &str) -> Option<(&str, i64)> {
    let (id, ms) = line.split_once('\t')?;
    let ms = if ms.is_empty() {
        UNKNOWN
    } else {
        ms.parse().ok()?
    };
    (!id.is_empty()).then_some((id, ms))
}

/// The `seen` log of a run in progress.
pub struct SeenLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl SeenLog {
    /// Opens the log, cutting it to `committed` bytes (what the checkpoint vouches for).
    pub fn open(path: &Path, committed: u64) -> Result<SeenLog, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err(dir))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(err(path))?;
        f.set_len(committed).map_err(err(path))?;
        f.seek(SeekFrom::Start(committed)).map_err(err(path))?;
        Ok(SeenLog {
            path: path.to_path_buf(),
            out: BufWriter::new(f),
        })
    }

    /// Records a listed contact. Ids that cannot be stored (tab or newline) are skipped: such
    /// a contact is simply treated as new at every run.
    pub fn record(&mut self, id: &str, date_updated: Option<i64>) -> Result<(), StateError> {
        if id.is_empty() || id.contains(['\t', '\n', '\r']) {
            return Ok(());
        }
        let r = match date_updated {
            Some(ms) => writeln!(self.out, "{id}\t{ms}"),
            None => writeln!(self.out, "{id}\t"),
        };
        r.map_err(err(&self.path))
    }

    /// Makes everything recorded so far durable; returns the committed length.
    pub fn sync(&mut self) -> Result<u64, StateError> {
        self.out.flush().map_err(err(&self.path))?;
        let f = self.out.get_ref();
        f.sync_data().map_err(err(&self.path))?;
        f.metadata().map(|m| m.len()).map_err(err(&self.path))
    }
}

/// Contacts of the previous state that a run did not see: id and last known `dateUpdated`.
pub type Deletions = Vec<(String, Option<i64>)>;

/// Reads a complete `seen` log: returns the new state's text (sorted, one line per contact)
/// and the contacts of `prev` that were not seen (the deletions, with their last known
/// `dateUpdated`). Nothing is written: save the deletions first, then [`save_state`].
pub fn finish(
    prev: Option<&PrevState>,
    seen: &Path,
) -> Result<(String, Deletions), StateError> {
    let text = std::fs::read_to_string(seen).map_err(err(seen))?;
    let mut rows: Vec<(&str, i64)> = text.lines().filter_map(parse_line).collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
    rows.dedup_by(|a, b| a.0 == b.0);

    let mut deleted = Vec::new();
    if let Some(prev) = prev {
        let mut j = 0;
        for i in 0..prev.len() {
            let key = prev.key(i);
            while j < rows.len() && rows[j].0 < key {
                j += 1;
            }
            if j >= rows.len() || rows[j].0 != key {
                deleted.push((
                    key.to_owned(),
                    (prev.ms[i] != UNKNOWN).then_some(prev.ms[i]),
                ));
            }
        }
    }

    let mut body = String::with_capacity(text.len());
    for (id, ms) in &rows {
        body.push_str(id);
        body.push('\t');
        if *ms != UNKNOWN {
            body.push_str(&ms.to_string());
        }
        body.push('\n');
    }
    Ok((body, deleted))
}

/// Replaces the state file atomically.
pub fn save_state(path: &Path, body: &str) -> Result<(), StateError> {
    crate::checkpoint::write_atomic(path, body.as_bytes()).map_err(|e| match e {
        crate::checkpoint::CheckpointError::Io { path, source } => StateError { path, source },
        crate::checkpoint::CheckpointError::Corrupt { path, .. } => StateError {
            path,
            source: std::io::Error::other("corrupt"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_log_becomes_state_and_yields_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let (seen, state) = (dir.path().join("seen.tsv"), dir.path().join("state.tsv"));
        let mut log = SeenLog::open(&seen, 0).unwrap();
        for (id, ms) in [("b", Some(2)), ("a", Some(1)), ("c", None)] {
            log.record(id, ms).unwrap();
        }
        log.sync().unwrap();
        let (body, deleted) = finish(None, &seen).unwrap();
        assert!(deleted.is_empty());
        save_state(&state, &body).unwrap();
        let prev = PrevState::load(&state).unwrap().unwrap();
        assert_eq!(prev.len(), 3);
        assert!(!prev.changed("a", Some(1)));
        assert!(prev.changed("a", Some(5)), "dateUpdated moved");
        assert!(prev.changed("c", Some(1)), "unknown before");
        assert!(prev.changed("z", Some(1)), "new");
        assert!(prev.changed("b", None));

        let seen2 = dir.path().join("seen2.tsv");
        let mut log = SeenLog::open(&seen2, 0).unwrap();
        log.record("a", Some(1)).unwrap();
        log.record("d", Some(4)).unwrap();
        log.sync().unwrap();
        let (_, deleted) = finish(Some(&prev), &seen2).unwrap();
        assert_eq!(
            deleted,
            vec![("b".to_owned(), Some(2)), ("c".to_owned(), None)]
        );
    }

    #[test]
    fn reopening_cuts_uncommitted_records() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen.tsv");
        let mut log = SeenLog::open(&seen, 0).unwrap();
        log.record("a", Some(1)).unwrap();
        let committed = log.sync().unwrap();
        log.record("b", Some(2)).unwrap();
        log.sync().unwrap();
        drop(log);
        let mut log = SeenLog::open(&seen, committed).unwrap();
        log.record("c", Some(3)).unwrap();
        log.sync().unwrap();
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "a\t1\nc\t3\n");
    }

    #[test]
    fn a_damaged_state_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tsv");
        std::fs::write(&p, "b\t1\na\t2\n").unwrap();
        let e = PrevState::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("sorted"), "{e}");
    }
}
