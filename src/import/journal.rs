//! The import journal: an append-only JSON-lines file of what each row did, fsync'd before
//! the importer relies on it.
//!
//! Why an intent line: the API has no idempotency key, and a create reported as failed (a
//! timeout, a 5xx after the request was sent, or this process killed mid-request) may have
//! happened. Before each create the importer appends `intent` and waits for the fsync; after
//! it, `done` (with the resulting id) or `failed`. On a rerun, a row with an intent but no
//! `done` is ambiguous: the record is looked up before anything is created again.
//!
//! Writes go through one thread that appends every queued line, calls `sync_data` once, and
//! then acknowledges the whole group (group commit), so concurrent rows share an fsync.
//! A torn last line (the process killed mid-write) is dropped when the journal is reopened.
//!
//! One run at a time: the journal is locked for the run (an advisory lock on `JOURNAL.lock`,
//! released by the kernel however the run ends), so a second import or undo with the same
//! journal exits 8 instead of writing every row a second time. The file is opened in append
//! mode and each group of lines goes out in one `write`, so lines never interleave.
//!
//! Why a run records its request timeout: a create sent just before a run died may still be in
//! flight, and may land after the next run looked for it. The next run waits until every
//! unconfirmed intent is older than the timeout of the run that sent it plus a settle time
//! (see `super::ambiguous`).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::validate::Entity;
use crate::durable::lock::{LockError, RunLock};

/// Version of the record layout (in every `run` line).
pub const JOURNAL_VERSION: u32 = 1;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Created by this import (undo deletes it).
    Created,
    /// An existing record was updated (undo leaves it as it is).
    Updated,
    /// An existing record was left alone (`--on-duplicate skip`).
    Skipped,
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
pub enum Record {
    /// Opens each run (each invocation appending to the journal).
    #[serde(rename_all = "camelCase")]
    Run {
        v: u32,
        run: String,
        entity: Entity,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        location: Option<String>,
        input: String,
        at: String,
        /// The run's request timeout: how long a create it sent may stay in flight.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// About to send a create (`at`: epoch ms, before sending). Durable before the request.
    #[serde(rename_all = "camelCase")]
    Intent {
        run: String,
        row: u64,
        key: String,
        action: Action,
        at: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        contact: Option<String>,
    },
    /// The row's record exists: `id` is the contact (or task, note) id.
    #[serde(rename_all = "camelCase")]
    Done {
        run: String,
        row: u64,
        key: String,
        outcome: Outcome,
        id: String,
        /// For tasks and notes: their contact.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        contact: Option<String>,
        /// For contacts imported from another location's export: the id they had there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        phone: Option<String>,
    },
    /// A created task was closed with `PUT …/completed`.
    #[serde(rename_all = "camelCase")]
    Closed { run: String, row: u64, id: String },
    /// The row failed; `retry`: a rerun may succeed (transient), else the API refused it.
    #[serde(rename_all = "camelCase")]
    Failed {
        run: String,
        row: u64,
        key: String,
        error: String,
        retry: bool,
    },
    /// `import undo` deleted (or found gone) a record this journal created.
    #[serde(rename_all = "camelCase")]
    Undone {
        run: String,
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        contact: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// What the journal says about one row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowState {
    pub key: String,
    /// Earliest intent not followed by `done`: the row may have been applied.
    pub pending_since: Option<i64>,
    /// Latest intent not followed by `done`, with the timeout of the run that wrote it (ms):
    /// its create may be in flight until `at + timeout`.
    pub pending_until: Option<i64>,
    pub done: Option<Done>,
    pub closed: bool,
    pub failed: Option<(String, bool)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Done {
    pub outcome: Outcome,
    pub id: String,
    pub contact: Option<String>,
    pub source_id: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
}

/// The journal replayed.
#[derive(Clone, Debug, Default)]
pub struct JournalState {
    pub entity: Option<Entity>,
    pub location: Option<String>,
    pub runs: usize,
    pub rows: HashMap<u64, RowState>,
    /// Ids `undo` already deleted.
    pub undone: HashSet<String>,
    /// Request timeout (ms) of each run, by run id.
    run_timeouts: HashMap<String, u64>,
}

impl JournalState {
    fn apply(&mut self, rec: Record) {
        match rec {
            Record::Run {
                entity,
                location,
                run,
                timeout_ms,
                ..
            } => {
                if let Some(t) = timeout_ms {
                    self.run_timeouts.insert(run, t);
                }
                self.entity.get_or_insert(entity);
                if self.location.is_none() {
                    self.location = location;
                }
                self.runs += 1;
            }
            Record::Intent {
                row, key, at, run, ..
            } => {
                // A journal from before timeouts were recorded: assume the default timeout.
                let timeout = self
                    .run_timeouts
                    .get(&run)
                    .copied()
                    .unwrap_or(DEFAULT_TIMEOUT_MS);
                let r = self.rows.entry(row).or_default();
                r.key = key;
                if r.done.is_none() {
                    r.pending_since = Some(r.pending_since.map_or(at, |p| p.min(at)));
                    let until = at.saturating_add(timeout as i64);
                    r.pending_until = Some(r.pending_until.map_or(until, |p| p.max(until)));
                }
            }
            Record::Done {
                row,
                key,
                outcome,
                id,
                contact,
                source_id,
                email,
                phone,
                ..
            } => {
                let r = self.rows.entry(row).or_default();
                r.key = key;
                r.pending_since = None;
                r.pending_until = None;
                r.failed = None;
                r.done = Some(Done {
                    outcome,
                    id,
                    contact,
                    source_id,
                    email,
                    phone,
                });
            }
            Record::Closed { row, .. } => self.rows.entry(row).or_default().closed = true,
            Record::Failed {
                row,
                key,
                error,
                retry,
                ..
            } => {
                let r = self.rows.entry(row).or_default();
                r.key = key;
                r.failed = Some((error, retry));
            }
            Record::Undone {
                id, error: None, ..
            } => {
                self.undone.insert(id);
            }
            Record::Undone { .. } => {}
        }
    }

    /// When the last create an earlier run may have left in flight has surely ended (epoch ms):
    /// the latest unconfirmed intent plus its run's request timeout. `None`: nothing pending.
    pub fn in_flight_until(&self) -> Option<i64> {
        self.rows
            .values()
            .filter(|r| r.done.is_none())
            .filter_map(|r| r.pending_until)
            .max()
    }

    /// Rows whose create was sent but never confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.rows
            .values()
            .filter(|r| r.done.is_none() && r.pending_since.is_some())
            .count()
    }

    /// Child ids already taken by some row: an ambiguous create must not adopt them.
    pub fn claimed_ids(&self) -> HashSet<String> {
        self.rows
            .values()
            .filter_map(|r| r.done.as_ref().map(|d| d.id.clone()))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path}:{line}: not a journal record ({message}); the file is damaged or not a journal")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("journal {path}: the journal writer stopped: {message}")]
    Writer { path: PathBuf, message: String },
    /// Another import or undo has the journal open (exit 8).
    #[error("journal {path} is in use by another import or undo")]
    Busy {
        path: PathBuf,
        #[source]
        source: LockError,
    },
}

/// The request timeout assumed for runs that did not record theirs (the client's default).
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// Reads a journal (missing file = empty). A torn last line is ignored.
pub fn read(path: &Path) -> Result<(JournalState, u64), JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_owned(),
        source,
    };
    let mut state = JournalState::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((state, 0)),
        Err(e) => return Err(io(e)),
    };
    let mut reader = BufReader::new(file);
    let mut good_len = 0u64;
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            // Torn final write: the record was never acknowledged, so nothing relied on it.
            break;
        }
        let text = &buf[..buf.len() - 1];
        if text.iter().all(u8::is_ascii_whitespace) {
            good_len += n as u64;
            continue;
        }
        let rec: Record = serde_json::from_slice(text).map_err(|e| JournalError::Corrupt {
            path: path.to_owned(),
            line: line_no,
            message: e.to_string(),
        })?;
        state.apply(rec);
        good_len += n as u64;
    }
    Ok((state, good_len))
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// An open journal: appends go through one writer thread with group commit.
pub struct Journal {
    path: PathBuf,
    run: String,
    tx: Option<std::sync::mpsc::Sender<(Vec<u8>, Ack)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Held for the run; released on drop (or by the kernel if the process dies).
    _lock: RunLock,
}

/// A journal locked for this run and replayed, before its run line is written.
pub struct LockedJournal {
    path: PathBuf,
    lock: RunLock,
    /// Length of the journal's whole lines; a torn tail after it is cut at [`Self::start`].
    good_len: u64,
}

/// What a run records about itself in its `run` line.
#[derive(Clone, Debug)]
pub struct RunInfo<'a> {
    pub entity: Entity,
    pub location: Option<&'a str>,
    pub input: &'a Path,
    pub timeout: std::time::Duration,
}

/// The lock file that keeps two runs off one journal: `JOURNAL.lock`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

impl Journal {
    /// Locks the journal for this run (or fails with [`JournalError::Busy`]) and replays it.
    /// Nothing is written (a torn tail is cut, the run line appended) until
    /// [`LockedJournal::start`], so a dry run can hold the lock and change nothing.
    pub fn lock(path: &Path) -> Result<(LockedJournal, JournalState), JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = RunLock::acquire(&lock_path(path)).map_err(|source| match source {
            LockError::Busy { .. } => JournalError::Busy {
                path: path.to_owned(),
                source,
            },
            LockError::Io { source, .. } => io(source),
        })?;
        let (state, good_len) = read(path)?;
        Ok((
            LockedJournal {
                path: path.to_owned(),
                lock,
                good_len,
            },
            state,
        ))
    }

    /// [`Journal::lock`] then [`LockedJournal::start`].
    #[cfg(test)]
    pub async fn open(
        path: &Path,
        info: &RunInfo<'_>,
    ) -> Result<(Journal, JournalState), JournalError> {
        let (locked, state) = Journal::lock(path)?;
        Ok((locked.start(info).await?, state))
    }

    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// Appends a record and returns once it is on disk.
    pub async fn append(&self, rec: &Record) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(rec).map_err(|e| self.writer_err(e.to_string()))?;
        line.push(b'\n');
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx
            .as_ref()
            .ok_or_else(|| self.writer_err("closed".into()))?
            .send((line, ack))
            .map_err(|_| self.writer_err("the writer thread is gone".into()))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(self.writer_err(m)),
            Err(_) => Err(self.writer_err("the writer thread is gone".into())),
        }
    }

    fn writer_err(&self, message: String) -> JournalError {
        JournalError::Writer {
            path: self.path.clone(),
            message,
        }
    }
}

impl LockedJournal {
    /// Starts the writer and appends this run's `run` line.
    pub async fn start(self, info: &RunInfo<'_>) -> Result<Journal, JournalError> {
        let LockedJournal {
            path,
            lock,
            good_len,
        } = self;
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        // Append mode: every write lands at the end, whatever else has the file open.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        if file.metadata().map_err(io)?.len() != good_len {
            file.set_len(good_len).map_err(io)?;
        }
        let (tx, rx) = std::sync::mpsc::channel::<(Vec<u8>, Ack)>();
        let thread = std::thread::Builder::new()
            .name("import-journal".into())
            .spawn(move || writer(file, rx))
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
        let run = format!("{}-{}", now_ms(), std::process::id());
        let journal = Journal {
            path,
            run: run.clone(),
            tx: Some(tx),
            thread: Some(thread),
            _lock: lock,
        };
        journal
            .append(&Record::Run {
                v: JOURNAL_VERSION,
                run,
                entity: info.entity,
                location: info.location.map(str::to_owned),
                input: info.input.display().to_string(),
                at: crate::timefmt::format_iso_millis(now_ms()),
                timeout_ms: Some(info.timeout.as_millis().min(u128::from(u64::MAX)) as u64),
            })
            .await?;
        Ok(journal)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it has written what was queued.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer(mut file: File, rx: std::sync::mpsc::Receiver<(Vec<u8>, Ack)>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < 512 {
            match rx.try_recv() {
                Ok(m) => group.push(m),
                Err(_) => break,
            }
        }
        let result = match &failed {
            Some(m) => Err(m.clone()),
            None => {
                let mut bytes = Vec::with_capacity(group.iter().map(|(l, _)| l.len()).sum());
                for (line, _) in &group {
                    bytes.extend_from_slice(line);
                }
                // One write for the group: in append mode it lands whole at the end.
                file.write_all(&bytes)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(m) = &result {
            // After a failed write the file's tail is unknown: refuse everything that follows.
            failed = Some(m.clone());
        }
        for (_, ack) in group {
            let _ = ack.send(result.clone());
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(location: Option<&str>) -> RunInfo<'_> {
        RunInfo {
            entity: Entity::Contacts,
            location,
            input: Path::new("in.csv"),
            timeout: std::time::Duration::from_secs(7),
        }
    }

    fn done(row: u64, id: &str) -> Record {
        Record::Done {
            run: "r".into(),
            row,
            key: format!("k{row}"),
            outcome: Outcome::Created,
            id: id.into(),
            contact: None,
            source_id: None,
            email: None,
            phone: None,
        }
    }

    #[tokio::test]
    async fn replay_marks_intents_without_outcome_as_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        {
            let (j, state) = Journal::open(&path, &info(Some("L"))).await.unwrap();
            assert_eq!(state.runs, 0);
            for (row, at) in [(2, 100), (3, 200)] {
                let key = format!("k{row}");
                j.append(&Record::Intent {
                    run: j.run_id().into(),
                    row,
                    key,
                    action: Action::Create,
                    at,
                    contact: None,
                })
                .await
                .unwrap();
            }
            j.append(&done(2, "c2")).await.unwrap();
        }
        let (state, _) = read(&path).unwrap();
        assert_eq!(state.runs, 1);
        assert_eq!(state.entity, Some(Entity::Contacts));
        assert_eq!(state.rows[&2].done.as_ref().unwrap().id, "c2");
        assert_eq!(state.rows[&2].pending_since, None);
        assert_eq!(state.rows[&3].pending_since, Some(200));
        assert_eq!(
            state.in_flight_until(),
            Some(200 + 7_000),
            "the unconfirmed create may be in flight for the run's recorded timeout"
        );
        assert_eq!(state.unconfirmed(), 1);
        assert!(state.claimed_ids().contains("c2"));
    }

    #[tokio::test]
    async fn two_imports_with_the_same_journal_the_second_is_refused_as_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (first, _) = Journal::open(&path, &info(Some("L"))).await.unwrap();
        let second = Journal::lock(&path);
        assert!(
            matches!(second, Err(JournalError::Busy { .. })),
            "a second run on a journal in use must be refused"
        );
        drop(first);
        let (_again, state) = Journal::lock(&path).expect("free once the first run ended");
        assert_eq!(state.runs, 1, "the refused run wrote nothing");
    }

    #[tokio::test]
    async fn journal_lines_land_at_the_end_even_when_the_file_grew_under_the_writer() {
        // Append mode: a line written by anything else after the journal was opened is never
        // overwritten (a writer that seeks to the end once at open would write over it).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (j, _) = Journal::open(&path, &info(Some("L"))).await.unwrap();
        let mut other = OpenOptions::new().append(true).open(&path).unwrap();
        let mut line = serde_json::to_vec(&done(7, "c7")).unwrap();
        line.push(b'\n');
        other.write_all(&line).unwrap();
        j.append(&done(8, "c8")).await.unwrap();
        let (state, _) = read(&path).unwrap();
        assert_eq!(state.rows[&7].done.as_ref().unwrap().id, "c7");
        assert_eq!(state.rows[&8].done.as_ref().unwrap().id, "c8");
    }

    #[tokio::test]
    async fn torn_last_line_is_dropped_and_appends_continue_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut text = serde_json::to_string(&done(2, "c2")).unwrap();
        text.push('\n');
        text.push_str("{\"t\":\"done\",\"run\":\"r\",\"ro");
        std::fs::write(&path, text).unwrap();
        {
            let (j, state) = Journal::open(&path, &info(None)).await.unwrap();
            assert_eq!(state.rows.len(), 1);
            j.append(&done(3, "c3")).await.unwrap();
        }
        let (state, _) = read(&path).unwrap();
        assert_eq!(state.rows.len(), 2);
        std::fs::write(&path, "garbage\n{}\n").unwrap();
        assert!(matches!(
            read(&path),
            Err(JournalError::Corrupt { line: 1, .. })
        ));
    }
}
