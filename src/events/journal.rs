//! The journal: every accepted event appended and fsynced before it is acknowledged.
//!
//! # Files
//! ```text
//! JOURNAL/seg-00000007.log    records, appended; one segment is open at a time
//! JOURNAL/roll-state.json     the highest segment rolled into a part (crate::durable)
//! JOURNAL/listen.lock         one receiver per journal
//! ```
//!
//! # Records
//! A record is framed as `len: u32 LE | crc32: u32 LE | payload`, the CRC-32 (IEEE, as zlib
//! and Ethernet compute it, written out below: 20 lines against a dependency) over the payload.
//! The payload is `version: u8 = 1 | receivedAt: i64 LE | receiverStartedAt: i64 LE |
//! timestamp: i64 LE | webhookId length: u32 LE | webhookId | raw body`. The id and timestamp
//! are copied out of the body so a restart rebuilds the duplicate set without parsing JSON.
//!
//! A process killed in the middle of an append leaves a *torn tail*: a record cut short, or
//! bytes that never reached the disk (after a power loss, anything since the last fsync).
//! Reading stops at the first record whose frame is short or whose CRC does not match, and
//! [`recover`] truncates the last segment there. Every acknowledged record was fsynced before
//! its answer, and records are only ever appended, so what was acknowledged lies before any
//! torn tail and is intact. A bad record in a segment that is *not* the last cannot come from
//! a kill (a segment is sealed only after its last fsync) and is reported as corruption
//! instead of being cut away.
//!
//! # Group commit
//! One writer thread owns the open segment ([`Writer`]): requests hand it their record and
//! wait for the answer; it takes every record waiting, appends them with one write, fsyncs
//! once and answers them all. Throughput then grows with concurrency while each event still
//! costs one fsync at most. Because this one thread also checks and updates the duplicate
//! set, two concurrent deliveries of one `webhookId` cannot both be stored: the second one the
//! writer sees is answered as a duplicate, after the first is durable.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::EventsError;

/// Payload format version.
const RECORD_VERSION: u8 = 1;
/// Frame header: length and CRC.
const FRAME: usize = 8;
/// Fixed payload fields before the id: version, three timestamps, the id's length.
const FIXED: usize = 1 + 8 + 8 + 8 + 4;
/// A frame claiming more than this is a torn or corrupt one (bodies are limited far below).
const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

/// One stored event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Receiver clock when it was accepted, epoch milliseconds.
    pub received_at_ms: i64,
    /// When the receiver process that stored it started.
    pub started_ms: i64,
    /// The delivery's `timestamp`, epoch milliseconds.
    pub timestamp_ms: i64,
    pub webhook_id: String,
    /// The body exactly as received.
    pub raw: Vec<u8>,
}

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let id = self.webhook_id.as_bytes();
        let len = FIXED + id.len() + self.raw.len();
        let start = out.len();
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.received_at_ms.to_le_bytes());
        out.extend_from_slice(&self.started_ms.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&(id.len() as u32).to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&self.raw);
        let crc = crc32(&out[start + FRAME..]);
        out[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
    }

    /// The record framed in `input`, with the bytes it took; `None` for a short, oversized or
    /// damaged frame (a torn tail).
    pub fn decode(input: &[u8]) -> Option<(Record, usize)> {
        let len = u32::from_le_bytes(input.get(0..4)?.try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(input.get(4..FRAME)?.try_into().ok()?);
        if !(FIXED..=MAX_PAYLOAD).contains(&len) {
            return None;
        }
        let payload = input.get(FRAME..FRAME + len)?;
        if crc32(payload) != crc || payload[0] != RECORD_VERSION {
            return None;
        }
        let i64_at = |at: usize| -> Option<i64> {
            Some(i64::from_le_bytes(
                payload.get(at..at + 8)?.try_into().ok()?,
            ))
        };
        let id_len = u32::from_le_bytes(payload.get(25..29)?.try_into().ok()?) as usize;
        let id = payload.get(FIXED..FIXED.checked_add(id_len)?)?;
        let record = Record {
            received_at_ms: i64_at(1)?,
            started_ms: i64_at(9)?,
            timestamp_ms: i64_at(17)?,
            webhook_id: String::from_utf8(id.to_vec()).ok()?,
            raw: payload.get(FIXED + id_len..)?.to_vec(),
        };
        Some((record, FRAME + len))
    }
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as zlib's `crc32`.
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut c = !0u32;
    for &b in bytes {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// `seg-<seq:08>.log`.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:08}.log"))
}

/// The sequence number of a segment file name.
fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The records of a segment, and the length of its valid prefix.
pub fn read_segment(path: &Path) -> Result<(Vec<Record>, u64, u64), EventsError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(EventsError::io("read", path))?;
    let mut records = Vec::new();
    let mut at = 0;
    while let Some((record, used)) = bytes.get(at..).and_then(Record::decode) {
        records.push(record);
        at += used;
    }
    Ok((records, at as u64, bytes.len() as u64))
}

/// A segment on disk, as found at start.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    pub seq: u64,
    /// Newest delivery timestamp in it (`None` when it is empty).
    pub newest_ms: Option<i64>,
}

/// What a start finds in the journal.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every segment, in order.
    pub segments: Vec<SegmentInfo>,
    /// `webhookId` → delivery timestamp of every record newer than the horizon.
    pub seen: HashMap<String, i64>,
    /// Bytes cut from the last segment's torn tail.
    pub truncated: u64,
}

/// Reads every segment in `dir`: truncates the last one's torn tail (see the module doc),
/// fails on damage anywhere else, and collects the ids of records whose timestamp is at or
/// after `horizon_ms`.
pub fn recover(dir: &Path, horizon_ms: i64) -> Result<Recovered, EventsError> {
    let mut seqs: Vec<u64> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| segment_seq(&e.file_name().to_string_lossy()))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(EventsError::io("list", dir)(e)),
    };
    seqs.sort_unstable();
    let mut found = Recovered::default();
    for (i, &seq) in seqs.iter().enumerate() {
        let path = segment_path(dir, seq);
        let (records, valid, len) = read_segment(&path)?;
        if valid < len {
            if i + 1 < seqs.len() {
                return Err(EventsError::Corrupt {
                    path,
                    offset: valid,
                });
            }
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(EventsError::io("open", &path))?;
            file.set_len(valid)
                .and_then(|()| file.sync_all())
                .map_err(EventsError::io("truncate", &path))?;
            found.truncated = len - valid;
            tracing::warn!(
                segment = %path.display(),
                bytes = len - valid,
                "cut a torn record from the journal's tail (an append the kill interrupted; it was never acknowledged)"
            );
        }
        let newest_ms = records.iter().map(|r| r.timestamp_ms).max();
        for r in records {
            if r.timestamp_ms >= horizon_ms {
                found.seen.insert(r.webhook_id, r.timestamp_ms);
            }
        }
        found.segments.push(SegmentInfo { seq, newest_ms });
    }
    Ok(found)
}

/// The open segment: appended to by the writer thread only.
pub struct Segment {
    pub seq: u64,
    file: File,
    path: PathBuf,
    /// Records in it.
    pub records: u64,
}

impl Segment {
    /// Creates segment `seq` (it must not exist) and makes its name durable.
    pub fn create(dir: &Path, seq: u64) -> Result<Segment, EventsError> {
        let path = segment_path(dir, seq);
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(EventsError::io("create", &path))?;
        crate::durable::sync_dir(dir)?;
        Ok(Segment {
            seq,
            file,
            path,
            records: 0,
        })
    }

    /// Appends framed records and fsyncs: once this returns, they survive a crash.
    pub fn append(&mut self, framed: &[u8], records: u64) -> io::Result<()> {
        self.file.write_all(framed)?;
        self.file.sync_data()?;
        self.records += records;
        Ok(())
    }

    /// After a failed append: cuts what it may have left, so the segment ends on a record.
    pub fn rewind(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.seek(SeekFrom::End(0))?;
        self.file.sync_all()
    }

    /// The current length of the file.
    pub fn file_len(&self) -> io::Result<u64> {
        self.file.metadata().map(|m| m.len())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Most records the writer queue holds; a full queue is answered 429 (HighLevel retries that).
pub const QUEUE: usize = 16 * 1024;
/// Most records, and bytes, one group commit takes.
const MAX_BATCH: usize = 4096;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// What the writer answers a record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Appended and fsynced.
    Stored,
    /// Its `webhookId` was stored before (or earlier in the same commit, now durable).
    Duplicate,
}

/// A record waiting for the writer, and where its answer goes. A dropped answer means the
/// journal failed: the request is answered 429.
pub struct Pending {
    pub record: Record,
    pub reply: tokio::sync::oneshot::Sender<Appended>,
}

/// What the writer thread receives.
pub enum Msg {
    Append(Pending),
    /// Seal the segment, hand it to the roller, and end.
    Stop,
}

/// The writer thread: the one owner of the open segment and of the duplicate set.
pub struct Writer {
    pub dir: PathBuf,
    pub segment: Segment,
    /// `webhookId` → delivery timestamp of every stored event newer than the horizon.
    pub seen: HashMap<String, i64>,
    pub horizon_ms: i64,
    pub roll_every: std::time::Duration,
    pub roll_events: u64,
    /// Sealed segment numbers, to the roller, in order.
    pub roller: std::sync::mpsc::Sender<u64>,
    /// Counted here, where they happen: a request that went away before its answer still
    /// stored its event.
    pub stats: std::sync::Arc<super::Stats>,
}

impl Writer {
    /// Appends until [`Msg::Stop`] (or every sender is gone), sealing segments as they fill
    /// or age. An append that fails ends the writer with the error: the requests waiting are
    /// answered 429, and the receiver stops (the journal is what a restart recovers from).
    pub fn run(mut self, rx: std::sync::mpsc::Receiver<Msg>) -> Result<(), EventsError> {
        use std::sync::mpsc::RecvTimeoutError;
        use std::time::Instant;
        let mut deadline = Instant::now() + self.roll_every;
        let mut batch: Vec<Pending> = Vec::new();
        let mut stop = false;
        while !stop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Append(p)) => {
                    batch.push(p);
                    let mut bytes = 0;
                    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(Msg::Append(p)) => {
                                bytes += p.record.raw.len();
                                batch.push(p);
                            }
                            Ok(Msg::Stop) => {
                                stop = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(&mut batch)?;
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => stop = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let due = Instant::now() >= deadline;
            if stop || due || self.segment.records >= self.roll_events {
                if self.segment.records > 0 || stop {
                    self.seal(!stop)?;
                }
                self.forget_old();
                deadline = Instant::now() + self.roll_every;
            }
        }
        Ok(())
    }

    /// Appends the new records of `batch` with one write and one fsync, then answers all.
    fn commit(&mut self, batch: &mut Vec<Pending>) -> Result<(), EventsError> {
        let mut framed = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        let mut stored = 0;
        for p in batch.iter() {
            let id = &p.record.webhook_id;
            if self.seen.contains_key(id) {
                answers.push(Appended::Duplicate);
            } else {
                self.seen.insert(id.clone(), p.record.timestamp_ms);
                p.record.encode(&mut framed);
                answers.push(Appended::Stored);
                stored += 1;
            }
        }
        if stored > 0 {
            let before = self.segment.file_len();
            if let Err(e) = self.segment.append(&framed, stored) {
                // Answers are dropped with the batch: 429, the sender retries elsewhere or
                // later. Cut what the failed write may have left, if the disk lets us.
                if let Ok(len) = before {
                    let _ = self.segment.rewind(len);
                }
                batch.clear();
                let path = self.segment.path().to_path_buf();
                return Err(EventsError::io("append to", &path)(e));
            }
        }
        let duplicates = answers.len() as u64 - stored;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.stats.accepted.fetch_add(stored, relaxed);
        self.stats.duplicates.fetch_add(duplicates, relaxed);
        for (p, answer) in batch.drain(..).zip(answers) {
            // A request that went away meanwhile needs no answer; its event is stored.
            let _ = p.reply.send(answer);
        }
        Ok(())
    }

    /// Hands the open segment to the roller and, unless stopping, opens the next one.
    fn seal(&mut self, reopen: bool) -> Result<(), EventsError> {
        let seq = self.segment.seq;
        if reopen {
            self.segment = Segment::create(&self.dir, seq + 1)?;
        }
        self.roller
            .send(seq)
            .map_err(|_| EventsError::Thread("roll"))
    }

    /// Drops the ids that left the window in which a delivery is still accepted.
    fn forget_old(&mut self) {
        let horizon = crate::timefmt::now_millis() - self.horizon_ms;
        self.seen.retain(|_, ts| *ts >= horizon);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, ts: i64) -> Record {
        Record {
            received_at_ms: 1_000,
            started_ms: 500,
            timestamp_ms: ts,
            webhook_id: id.into(),
            raw: format!("{{\"webhookId\":\"{id}\"}}").into_bytes(),
        }
    }

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_record_reads_back_and_any_damage_or_cut_is_detected() {
        let r = record("w1", 42);
        let mut framed = Vec::new();
        r.encode(&mut framed);
        assert_eq!(Record::decode(&framed), Some((r, framed.len())));
        for cut in 0..framed.len() {
            assert_eq!(Record::decode(&framed[..cut]), None, "cut at {cut}");
        }
        for at in 0..framed.len() {
            let mut bad = framed.clone();
            bad[at] ^= 0x10;
            assert!(
                Record::decode(&bad)
                    .is_none_or(|(r, _)| r.webhook_id != "w1" || r.timestamp_ms != 42),
                "flip at {at} went unnoticed"
            );
        }
    }

    #[test]
    fn recover_cuts_the_last_segments_torn_tail_and_refuses_damage_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut seg = Segment::create(d, 1).unwrap();
        let mut buf = Vec::new();
        record("a", 10).encode(&mut buf);
        record("b", 20).encode(&mut buf);
        seg.append(&buf, 2).unwrap();
        let whole = seg.file_len().unwrap();
        let mut torn = Vec::new();
        record("c", 30).encode(&mut torn);
        seg.append(&torn[..torn.len() - 3], 1).unwrap();
        drop(seg);
        let found = recover(d, 15).unwrap();
        assert_eq!(found.truncated, torn.len() as u64 - 3);
        assert_eq!(fs::metadata(segment_path(d, 1)).unwrap().len(), whole);
        assert_eq!(
            found.seen.keys().collect::<Vec<_>>(),
            ["b"],
            "a is older than the horizon"
        );
        assert_eq!(found.segments[0].newest_ms, Some(20));

        // A later segment makes the first one sealed: damage there is corruption.
        let mut f = OpenOptions::new()
            .append(true)
            .open(segment_path(d, 1))
            .unwrap();
        f.write_all(&torn[..5]).unwrap();
        Segment::create(d, 2).unwrap();
        assert!(matches!(
            recover(d, 0),
            Err(EventsError::Corrupt { offset, .. }) if offset == whole
        ));
    }

    #[test]
    fn the_writer_stores_an_id_once_even_within_one_commit_and_seals_at_stop() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (roll_tx, roll_rx) = std::sync::mpsc::channel();
        let stats = std::sync::Arc::new(super::super::Stats::default());
        let mut seen = HashMap::new();
        seen.insert("old".to_owned(), i64::MAX);
        let writer = Writer {
            dir: d.to_path_buf(),
            segment: Segment::create(d, 5).unwrap(),
            seen,
            horizon_ms: 60_000,
            roll_every: std::time::Duration::from_secs(3600),
            roll_events: 1000,
            roller: roll_tx,
            stats: stats.clone(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let mut answers = Vec::new();
        // Queued before the writer starts: one commit takes them all.
        for id in ["a", "b", "a", "old", "b"] {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(Msg::Append(Pending {
                record: record(id, i64::MAX),
                reply,
            }))
            .unwrap();
            answers.push(answer);
        }
        tx.send(Msg::Stop).unwrap();
        writer.run(rx).unwrap();
        let got: Vec<Appended> = answers
            .into_iter()
            .map(|a| a.blocking_recv().unwrap())
            .collect();
        use Appended::*;
        assert_eq!(got, [Stored, Stored, Duplicate, Duplicate, Duplicate]);
        assert_eq!(
            roll_rx.try_iter().collect::<Vec<_>>(),
            [5],
            "sealed for the roller"
        );
        let (records, _, _) = read_segment(&segment_path(d, 5)).unwrap();
        let ids: Vec<&str> = records.iter().map(|r| r.webhook_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let counted = stats.snapshot();
        assert_eq!((counted.accepted, counted.duplicates), (2, 3));
    }
}
