//! State for incremental (nightly) exports: which contacts existed at the last complete run,
//! and their `dateUpdated`.
//!
//! The state is a text file of `id<TAB>dateUpdatedMs` lines (about 35 bytes a contact), loaded
//! into flat vectors with an index sorted by id for binary search (about 36 bytes a contact in
//! memory: the one structure that grows with the location, by design). During a run, every
//! listed contact is appended to a `seen` log; the writer fsyncs it at each commit and the
//! checkpoint records its committed length, so a resumed run truncates what was not committed.
//! At the end the `seen` log, streamed, becomes the new state, and the ids of the old state
//! it does not hold are the deletions: neither step reads the log into memory.
//!
//! # Which contacts a run lists ([`RunKind`])
//! A filter cannot list what was deleted, so incremental runs alternate:
//! - a **walk** lists every contact (search pages of 500, or the GET listing), fetches
//!   children for new and changed ones only, and finds the deletions; the `seen` log
//!   replaces the state;
//! - a **filtered** run lists only contacts whose `dateUpdated` is at or after the start of
//!   the previous complete run minus `--overlap` (a contact edited while that run was
//!   listing may have been passed already; the overlap covers the two clocks' skew). Its
//!   `seen` log is appended to the state (a later line wins), and it reports no deletions.
//!   Every `--full-walk-every`-th run is a walk again, which also compacts the state.
//!
//! - an **events** run (`--from-events`) lists nothing: it fetches, one by one, the contacts
//!   that webhook events stored by `contacts-etl listen` named since the last run (a
//!   contact's own events, and its notes', tasks' and appointments'), with their children,
//!   and writes the contacts of `ContactDelete` events as deletions (see
//!   `crate::export::events`). Like a filtered run, its `seen` log is appended to the state;
//!   its deletions are appended as tombstones (`id<TAB>-`), which a later line overrides and
//!   a walk's state drops. Every `--full-walk-every`-th run walks, and so does the run after
//!   a gap in the events.
//!
//! [`Meta`] (`incremental.json` beside the state) holds what choosing needs: when the last
//! complete run started, how many filtered or events runs followed the last walk, and where
//! in the events table the last run stopped.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Marks a contact whose `dateUpdated` was absent or unreadable: always treated as changed.
const UNKNOWN: i64 = i64::MIN;
/// Marks a contact an events run deleted (`id<TAB>-` in the state file): not in the state.
const DELETED: i64 = i64::MIN + 1;

/// How often an incremental run walks every contact, by default.
pub const DEFAULT_FULL_WALK_EVERY: u32 = 7;
/// How far before the previous run's start a filtered run lists changes, by default.
pub const DEFAULT_OVERLAP: std::time::Duration = std::time::Duration::from_secs(600);

/// Which contacts a run lists (see the [module docs](self)). Fixed when a run starts and kept
/// in its checkpoint, so a resumed run lists as it began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum RunKind {
    /// Every contact with its children: not incremental, the first incremental run, or
    /// `--full-refresh`.
    Full,
    /// Every contact listed; children of new and changed ones; deletions found.
    Walk,
    /// Only contacts updated at or after `since_ms`; no deletions. The `nth` filtered run
    /// since the last walk.
    #[serde(rename_all = "camelCase")]
    Filtered { since_ms: i64, nth: u32 },
    /// Only the contacts named by the events of the checkpoint's [`EventsRange`]. The `nth`
    /// filtered or events run since the last walk.
    Events { nth: u32 },
}

impl RunKind {
    pub fn name(self) -> &'static str {
        match self {
            RunKind::Full => "full",
            RunKind::Walk => "walk",
            RunKind::Filtered { .. } => "filtered",
            RunKind::Events { .. } => "events",
        }
    }

    /// The `nth` of a filtered or events run (0 for a walk or a full run): how many runs since
    /// the last walk it makes.
    pub fn nth(self) -> u32 {
        match self {
            RunKind::Filtered { nth, .. } | RunKind::Events { nth, .. } => nth,
            RunKind::Full | RunKind::Walk => 0,
        }
    }

    /// Whether the run lists only some contacts (filtered, events): it cannot see deletions by
    /// their absence, and its `seen` log is appended to the state rather than replacing it.
    pub fn partial(self) -> bool {
        matches!(self, RunKind::Filtered { .. } | RunKind::Events { .. })
    }

    /// The kind a listing that cannot filter (`GET /contacts/`) runs instead: a walk.
    pub fn unfiltered(self) -> RunKind {
        match self {
            RunKind::Filtered { .. } => RunKind::Walk,
            other => other,
        }
    }

    /// Chooses the kind of the next incremental run. `prev`: whether a state exists;
    /// `meta`: what the last complete run left; `can_filter`: whether the listing can filter
    /// by `dateUpdated` (the search can, `GET /contacts/` cannot).
    pub fn choose(
        full_refresh: bool,
        prev: bool,
        meta: Option<&Meta>,
        can_filter: bool,
        overlap: std::time::Duration,
        full_walk_every: u32,
    ) -> RunKind {
        if full_refresh || !prev {
            return RunKind::Full;
        }
        match meta {
            Some(m)
                if can_filter
                    && !m.refetch
                    && m.filtered_since_walk.saturating_add(1) < full_walk_every =>
            {
                RunKind::Filtered {
                    since_ms: m
                        .last_started_ms
                        .saturating_sub(i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX)),
                    nth: m.filtered_since_walk + 1,
                }
            }
            _ => RunKind::Walk,
        }
    }
}

/// What the last complete incremental run of a location left for the next one to choose
/// its [`RunKind`]: `incremental.json` beside the state file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// When that run first started (epoch ms, this machine's clock).
    pub last_started_ms: i64,
    /// Filtered runs since the last walk (0 after a walk or a full run).
    pub filtered_since_walk: u32,
    /// That run skipped child requests the API refused: their contacts are fetched again by
    /// the next run, which a filter would not list (their `dateUpdated` did not move), so
    /// the next run walks.
    #[serde(default)]
    pub refetch: bool,
    /// Where that run stopped reading the events table (`--from-events`): the last part it
    /// covered, and the last event row in it. Absent when the run read no events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsMark>,
}

/// The events an incremental run with `--from-events` covers, fixed when it starts: the parts
/// after part `after` (all parts when `None`, then only events stamped at or after
/// `since_ms`) up to `mark.part`. An events run fetches the contacts they name; a walk
/// fetches them too, whatever their `dateUpdated` says (a note's change does not move it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsRange {
    pub after: Option<u64>,
    pub since_ms: i64,
    /// Where the table stood: the next run reads after it.
    pub mark: EventsMark,
}

/// A position in the events table that `contacts-etl listen` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsMark {
    /// The last part covered (`None`: the table had no part yet).
    pub part: Option<u64>,
    /// The last row of the table up to that part: when it was received, and when the
    /// receiver that stored it had started (a restart after a long silence is a gap).
    pub received_ms: Option<i64>,
    pub receiver_started_ms: Option<i64>,
    /// The receiver's heartbeat when the run started (`crate::events::table::Heartbeat`):
    /// which receiver was running, and how many deliveries it had refused by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat_started_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat_refusals: Option<u64>,
}

impl Meta {
    /// The meta file, or `None` when there is none or it cannot be read (the next run then
    /// walks, which is always correct).
    pub fn load(path: &Path) -> Option<Meta> {
        Meta::load_from(&crate::dest::Dest::local(""), path)
    }

    /// [`Meta::load`] from a destination (a bucket's copy, for `contacts-etl plan` on a
    /// machine that has no work directory yet).
    pub fn load_from(dest: &crate::dest::Dest, path: &Path) -> Option<Meta> {
        let bytes = match dest.read(path) {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(path = %dest.show(path), error = %e, "cannot read the incremental run's meta file; this run lists every contact");
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the incremental run's meta file is damaged; this run lists every contact");
                None
            }
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        crate::durable::write(path, &bytes).map_err(|e| err(path)(e.into()))
    }
}

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

/// The previous run's contacts, in file order, with an index sorted by id.
#[derive(Debug, Default)]
pub struct PrevState {
    keys: String,
    ends: Vec<u32>,
    ms: Vec<i64>,
    /// Positions sorted by id; of an id listed twice, only the later line.
    order: Vec<u32>,
}

impl PrevState {
    /// Loads a state file (any line order); `None` when there is none (the first run).
    pub fn load(path: &Path) -> Result<Option<PrevState>, StateError> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(path)(e)),
        };
        let mut st = PrevState::default();
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(err(path))?;
            let (id, ms) = parse_line(&line).ok_or_else(|| err(path)(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {}: not `id<TAB>ms`; delete the file to start over with a full export", n + 1))))?;
            st.keys.push_str(id);
            let end = u32::try_from(st.keys.len()).map_err(|_| {
                err(path)(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "more than 4 GiB of ids; delete the file to start over with a full export",
                ))
            })?;
            st.ends.push(end);
            st.ms.push(ms);
        }
        let mut order: Vec<u32> = (0..st.ms.len() as u32).collect();
        // Stable: equal ids stay in line order, and the kept slot takes the later line.
        order.sort_by(|&a, &b| st.key(a as usize).cmp(st.key(b as usize)));
        order.dedup_by(|later, kept| {
            let same = st.key(*later as usize) == st.key(*kept as usize);
            if same {
                *kept = *later;
            }
            same
        });
        // A contact whose last line is a tombstone is not in the state.
        order.retain(|&i| st.ms[i as usize] != DELETED);
        st.order = order;
        Ok(Some(st))
    }

    /// Distinct contacts in the state.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.keys[start..self.ends[i] as usize]
    }

    /// The rank of `id` in id order (an index into `order`).
    fn rank(&self, id: &str) -> Option<usize> {
        self.order
            .binary_search_by(|&i| self.key(i as usize).cmp(id))
            .ok()
    }

    /// The last known `dateUpdated` of a contact in the state (`Some(None)`: in the state,
    /// its date unknown; `None`: not in the state).
    pub fn known(&self, id: &str) -> Option<Option<i64>> {
        self.rank(id).map(|r| {
            let ms = self.ms[self.order[r] as usize];
            (ms != UNKNOWN).then_some(ms)
        })
    }

    /// Whether a contact is new or changed since the previous run.
    pub fn changed(&self, id: &str, date_updated: Option<i64>) -> bool {
        let prev = self.rank(id).map(|r| self.ms[self.order[r] as usize]);
        match (prev, date_updated) {
            (Some(before), Some(ms)) => before == UNKNOWN || before != ms,
            _ => true,
        }
    }
}

fn parse_line(line: &str) -> Option<(&str, i64)> {
    let (id, ms) = line.split_once('\t')?;
    let ms = match ms {
        "" => UNKNOWN,
        "-" => DELETED,
        ms => ms.parse().ok()?,
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

/// The contacts of `prev` that a complete `seen` log does not hold, in id order: the
/// deletions, with their last known `dateUpdated`. Streams the log; one bit per previous
/// contact is all it keeps besides the result.
pub fn deletions(prev: Option<&PrevState>, seen: &Path) -> Result<Deletions, StateError> {
    let Some(prev) = prev else {
        return Ok(Vec::new());
    };
    let mut found = vec![0u64; prev.len().div_ceil(64)];
    let f = File::open(seen).map_err(err(seen))?;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(err(seen))?;
        if let Some(r) = parse_line(&line).and_then(|(id, _)| prev.rank(id)) {
            found[r / 64] |= 1 << (r % 64);
        }
    }
    Ok((0..prev.len())
        .filter(|r| found[r / 64] & (1 << (r % 64)) == 0)
        .map(|r| {
            let i = prev.order[r] as usize;
            let ms = prev.ms[i];
            (prev.key(i).to_owned(), (ms != UNKNOWN).then_some(ms))
        })
        .collect())
}

/// Makes a complete `seen` log the state file, atomically, by streaming it.
pub fn save_state(path: &Path, seen: &Path) -> Result<(), StateError> {
    let mut from = File::open(seen).map_err(err(seen))?;
    crate::durable::write_with(path, |to| std::io::copy(&mut from, to).map(|_| ()))
        .map_err(|e| err(path)(e.into()))
}

/// Appends a complete `seen` log of a filtered or events run to the state file, then a
/// tombstone for each of `deleted`, atomically, by streaming (a later line wins when the
/// state is loaded). Safe to repeat.
pub fn append_state(path: &Path, seen: &Path, deleted: &[String]) -> Result<(), StateError> {
    let mut from = File::open(seen).map_err(err(seen))?;
    let old = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(path)(e)),
    };
    crate::durable::write_with(path, |to| {
        if let Some(mut old) = old {
            std::io::copy(&mut old, to)?;
        }
        std::io::copy(&mut from, to)?;
        for id in deleted.iter().filter(|id| !id.contains(['\t', '\n', '\r'])) {
            writeln!(to, "{id}\t-")?;
        }
        Ok(())
    })
    .map_err(|e| err(path)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_removes_a_contact_and_a_later_line_brings_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.tsv");
        let seen = dir.path().join("seen.tsv");
        std::fs::write(&state, "a\t1\nb\t2\nc\t3\n").unwrap();
        std::fs::write(&seen, "b\t5\n").unwrap();
        append_state(&state, &seen, &["c".into(), "x\ty".into()]).unwrap();
        let st = PrevState::load(&state).unwrap().unwrap();
        assert_eq!(
            st.len(),
            2,
            "c is deleted; the id with a tab is not written"
        );
        assert_eq!(st.known("a"), Some(Some(1)));
        assert_eq!(st.known("b"), Some(Some(5)));
        assert_eq!(st.known("c"), None);
        assert!(
            st.changed("c", Some(3)),
            "a deleted contact that reappears is new"
        );
        // A walk that lists no contact finds the two remaining ones deleted, not c again.
        std::fs::write(&seen, "").unwrap();
        let gone: Vec<String> = deletions(Some(&st), &seen)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(gone, ["a", "b"]);
        std::fs::write(&seen, "c\t9\n").unwrap();
        append_state(&state, &seen, &[]).unwrap();
        assert_eq!(
            PrevState::load(&state).unwrap().unwrap().known("c"),
            Some(Some(9))
        );
    }

    #[test]
    fn every_seventh_run_walks_by_default_and_the_others_list_changes_since_the_last_start() {
        let overlap = std::time::Duration::from_secs(600);
        let every = DEFAULT_FULL_WALK_EVERY;
        let choose = |meta: Option<&Meta>, can_filter| {
            RunKind::choose(false, true, meta, can_filter, overlap, every)
        };
        let mut kinds = Vec::new();
        let mut meta = Meta {
            last_started_ms: 1_000_000,
            filtered_since_walk: 0,
            refetch: false,
            events: None,
        };
        for _ in 0..14 {
            let kind = choose(Some(&meta), true);
            meta.filtered_since_walk = match kind {
                RunKind::Filtered { nth, since_ms } => {
                    assert_eq!(since_ms, 1_000_000 - 600_000);
                    nth
                }
                _ => 0,
            };
            kinds.push(kind.name());
        }
        let walks: Vec<usize> = (0..14).filter(|&i| kinds[i] == "walk").collect();
        assert_eq!(walks, vec![6, 13], "{kinds:?}");
        assert_eq!(choose(None, true), RunKind::Walk, "no meta: walk");
        let refetch = Meta {
            refetch: true,
            ..meta.clone()
        };
        assert_eq!(
            choose(Some(&refetch), true),
            RunKind::Walk,
            "skipped requests to fetch again: walk"
        );
        assert_eq!(
            choose(Some(&meta), false),
            RunKind::Walk,
            "GET cannot filter"
        );
        assert_eq!(
            RunKind::choose(true, true, Some(&meta), true, overlap, every),
            RunKind::Full
        );
        assert_eq!(
            RunKind::choose(false, false, Some(&meta), true, overlap, every),
            RunKind::Full,
            "no state: full"
        );
    }

    #[test]
    fn seen_log_becomes_state_and_yields_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let (seen, state) = (dir.path().join("seen.tsv"), dir.path().join("state.tsv"));
        let mut log = SeenLog::open(&seen, 0).unwrap();
        for (id, ms) in [("b", Some(2)), ("a", Some(1)), ("c", None)] {
            log.record(id, ms).unwrap();
        }
        log.sync().unwrap();
        assert!(deletions(None, &seen).unwrap().is_empty());
        save_state(&state, &seen).unwrap();
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
        assert_eq!(
            deletions(Some(&prev), &seen2).unwrap(),
            vec![("b".to_owned(), Some(2)), ("c".to_owned(), None)]
        );
    }

    #[test]
    fn an_id_listed_twice_counts_once_with_its_later_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tsv");
        std::fs::write(&p, "b\t1\na\t2\nb\t3\n").unwrap();
        let prev = PrevState::load(&p).unwrap().unwrap();
        assert_eq!(prev.len(), 2);
        assert!(!prev.changed("b", Some(3)));
        assert!(prev.changed("b", Some(1)));
        let seen = dir.path().join("seen.tsv");
        std::fs::write(&seen, "a\t2\n").unwrap();
        assert_eq!(
            deletions(Some(&prev), &seen).unwrap(),
            vec![("b".to_owned(), Some(3))]
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
        std::fs::write(&p, "b\t1\na\t2\nno tab here\n").unwrap();
        let e = PrevState::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("id<TAB>ms"), "{e}");
    }
}
