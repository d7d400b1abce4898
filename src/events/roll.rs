//! Rolling: sealed journal segments become parts of the events table, in order, and old
//! segments go once no delivery they could deduplicate can still be accepted.
//!
//! # Order of writes
//! For segment `n`: the part `events/part-<n:08>.<ext>` (temporary name, then rename, or a
//! multipart upload: [`crate::sink`]), then `roll-state.json` saying `n` is rolled
//! ([`crate::durable::write`]), then the report. A crash after the part and before the state
//! rolls `n` again at the next start: the segment is sealed, so the part comes out the same,
//! and replaces the first one. Segments are rolled one at a time, in number order, so the
//! state is one number: everything up to it is in the table.
//!
//! A roll that fails (a full disk, a bucket that is down) is logged and tried again every
//! [`RETRY`]; appends go on meanwhile, into new segments. At shutdown a roll still failing
//! after [`SHUTDOWN_ATTEMPTS`] attempts ends the receiver with the error: the segments stay,
//! and the next start rolls them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::journal::{self, SegmentInfo};
use super::table::{self, TABLE_DIR};
use super::{EventsError, Stats, REPORT_FILE};
use crate::dest::Dest;
use crate::sink::Format;

/// The roll state file in the journal directory.
pub const STATE_FILE: &str = "roll-state.json";

/// Wait between attempts at a roll that failed.
const RETRY: Duration = Duration::from_secs(5);
/// Attempts at a failing roll once the receiver is stopping.
const SHUTDOWN_ATTEMPTS: u32 = 3;
/// Rows per batch handed to the part writer.
const BATCH_ROWS: usize = 8 * 1024;

/// What has been rolled. Versioned, so a later layout can still read this one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "version")]
pub enum RollStateFile {
    #[serde(rename = "1")]
    V1 {
        #[serde(rename = "rolledThrough")]
        rolled_through: Option<u64>,
    },
}

/// The roll state: every segment up to `rolled_through` is in the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RollState {
    pub rolled_through: Option<u64>,
}

impl RollState {
    /// Reads `JOURNAL/roll-state.json`; none yet is nothing rolled.
    pub fn load(dir: &Path) -> Result<RollState, EventsError> {
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RollState::default()),
            Err(e) => return Err(EventsError::io("read", &path)(e)),
        };
        match serde_json::from_slice::<RollStateFile>(&bytes) {
            Ok(RollStateFile::V1 { rolled_through }) => Ok(RollState { rolled_through }),
            Err(e) => Err(EventsError::State {
                path,
                detail: e.to_string(),
            }),
        }
    }

    fn save(&self, dir: &Path) -> Result<(), EventsError> {
        let path = dir.join(STATE_FILE);
        let file = RollStateFile::V1 {
            rolled_through: self.rolled_through,
        };
        let bytes = serde_json::to_vec(&file).unwrap_or_default();
        Ok(crate::durable::write(&path, &bytes)?)
    }
}

/// The report `JOURNAL/listen-report.json`, rewritten at every roll.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenReport {
    pub version: u32,
    /// `running`, or `stopped` once the receiver has rolled everything at shutdown.
    pub status: String,
    pub started_at: String,
    pub updated_at: String,
    pub out: String,
    pub rolled_through: Option<u64>,
    pub counters: super::Counters,
}

/// The roller thread.
pub struct Roller {
    pub dir: PathBuf,
    pub out: Dest,
    pub format: Format,
    pub horizon_ms: i64,
    /// Rolled segments still on disk for the duplicate set.
    pub kept: Vec<SegmentInfo>,
    pub state: RollState,
    pub stats: Arc<Stats>,
    pub started_ms: i64,
    /// Raised when the receiver is shutting down.
    pub stopping: Arc<AtomicBool>,
}

impl Roller {
    /// Rolls each segment number received, in order, until the writer is gone.
    pub fn run(mut self, rx: std::sync::mpsc::Receiver<u64>) -> Result<(), EventsError> {
        self.expire();
        for seq in rx {
            let mut attempts = 0;
            loop {
                match self.roll(seq) {
                    Ok(()) => break,
                    Err(e) => {
                        attempts += 1;
                        let stopping = self.stopping.load(Ordering::SeqCst);
                        if stopping && attempts >= SHUTDOWN_ATTEMPTS {
                            return Err(e);
                        }
                        tracing::error!(segment = seq, error = %e, "cannot roll a journal segment into the events table; retrying in {}s (the events are safe in the journal)", RETRY.as_secs());
                        std::thread::sleep(RETRY);
                    }
                }
            }
        }
        self.report("stopped")
    }

    /// Segment `seq` into part `seq`, then the state, the report, and old segments removed.
    fn roll(&mut self, seq: u64) -> Result<(), EventsError> {
        if self.state.rolled_through.is_some_and(|r| r >= seq) {
            return Ok(());
        }
        let path = journal::segment_path(&self.dir, seq);
        let (records, valid, len) = journal::read_segment(&path)?;
        if valid < len {
            return Err(EventsError::Corrupt {
                path,
                offset: valid,
            });
        }
        if !records.is_empty() {
            let name = table::part_name(seq, self.format);
            let mut part = crate::sink::open_table_part(
                &self.out,
                self.format,
                TABLE_DIR,
                TABLE_DIR,
                &name,
                table::schema(),
            )?;
            for chunk in records.chunks(BATCH_ROWS) {
                part.write(&table::batch(chunk)?)?;
            }
            let info = part.finish()?;
            tracing::info!(part = %info.path, rows = info.rows, "rolled journal segment {seq} into the events table");
            self.stats.parts_written.fetch_add(1, Ordering::Relaxed);
            self.stats
                .events_rolled
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        self.state.rolled_through = Some(seq);
        self.state.save(&self.dir)?;
        self.kept.push(SegmentInfo {
            seq,
            newest_ms: records.iter().map(|r| r.timestamp_ms).max(),
        });
        self.report("running")?;
        self.expire();
        Ok(())
    }

    /// Removes rolled segments whose newest event is older than the horizon (no delivery they
    /// could deduplicate is accepted any more) and empty ones.
    fn expire(&mut self) {
        let horizon = crate::timefmt::now_millis() - self.horizon_ms;
        let dir = self.dir.clone();
        self.kept.retain(|s| {
            if s.newest_ms.is_some_and(|t| t >= horizon) {
                return true;
            }
            let path = journal::segment_path(&dir, s.seq);
            match std::fs::remove_file(&path) {
                Ok(()) => false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => {
                    tracing::warn!(segment = %path.display(), error = %e, "cannot remove an old journal segment");
                    true
                }
            }
        });
    }

    fn report(&self, status: &str) -> Result<(), EventsError> {
        let report = ListenReport {
            version: 1,
            status: status.to_owned(),
            started_at: crate::timefmt::format_iso_millis(self.started_ms),
            updated_at: crate::timefmt::format_iso_millis(crate::timefmt::now_millis()),
            out: self.out.describe(),
            rolled_through: self.state.rolled_through,
            counters: self.stats.snapshot(),
        };
        let path = self.dir.join(REPORT_FILE);
        let bytes = serde_json::to_vec_pretty(&report).unwrap_or_default();
        Ok(crate::durable::write(&path, &bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roll_state_reads_back_and_a_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RollState::load(dir.path()).unwrap(), RollState::default());
        let s = RollState {
            rolled_through: Some(7),
        };
        s.save(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap(),
            r#"{"version":"1","rolledThrough":7}"#
        );
        assert_eq!(RollState::load(dir.path()).unwrap(), s);
        std::fs::write(dir.path().join(STATE_FILE), r#"{"version":"9"}"#).unwrap();
        assert!(matches!(
            RollState::load(dir.path()),
            Err(EventsError::State { .. })
        ));
    }
}
