//! The event-driven incremental run (`--incremental --from-events DIR`): which contacts the
//! webhook events stored by `contacts-etl listen` named since the last run, and whether those
//! events can be trusted to be all of them.
//!
//! # What a run reads
//! The events table is a sequence of parts numbered in the order the receiver rolled them
//! (`DIR/events/part-<seq>.<ext>`, see `crate::events`). A run fixes its range when it
//! starts: the parts after the last part the previous run covered ([`EventsMark`] in the
//! meta file), up to the newest part there is now. Parts are immutable once published (a
//! receiver that crashed before recording a roll rewrites the same part identically), so a
//! resumed run reads the same events again and fetches the same contacts in the same order.
//! Events that land after the range are the next run's.
//!
//! The first events run after a walk (or after `--from-events` was first given) has no part
//! to start after: it takes every event stamped at or after the start of the last complete
//! run minus `--overlap`, as a filtered run would.
//!
//! A walk decided with `--from-events` (on the schedule, or after a gap) covers a range too:
//! it fetches the children of the contacts the range's events named even when their
//! `dateUpdated` did not move (a note's change does not move it), and the next events run
//! reads after it.
//!
//! Of the events of the location in the range:
//! - a contact whose last event in the range is `ContactDelete` is deleted: written to
//!   `deleted_contacts` (when the previous state knew it), never fetched;
//! - every other event names a contact to fetch again with its children: a contact's own
//!   events (`ContactCreate`, `ContactUpdate`, `ContactTagUpdate`, `ContactDndUpdate`) by
//!   their `id`, a note's, task's or appointment's by its `contactId` (a child's delete
//!   changes its contact's children: fetching them again is how the export sees it).
//!
//! Each named contact costs `GET /contacts/:id` and one request per included child entity
//! (4 with tasks, notes and appointments), against a filtered run's search pages plus its
//! children; the run report shows both.
//!
//! # When the events cannot be trusted: a walk instead
//! HighLevel sends an event once and retries it only when it was answered 429 (about ten
//! minutes later, at most six times): what it sent while no receiver was up, or what a
//! receiver refused as stale, is lost. The receiver's heartbeat (`events/_receiver.json`,
//! rewritten every 30 s at most) says which receiver runs, when it was last alive, and how
//! many signed deliveries it refused as stale or could not journal. The run walks (every
//! contact listed, deletions found by absence) instead when:
//! - there is no heartbeat, or it is older than three of its intervals plus a minute (the
//!   receiver is down);
//! - another receiver runs than at the previous run (it restarted), or a row of the range
//!   was stored by a receiver that started after the previous row (a restart within the
//!   range): with `--max-gap` 0, the default, every restart; with more, only one that came
//!   more than that after the last stored event;
//! - the receiver refused deliveries since the previous run (stale, or its journal full);
//! - a first events run's receiver started after the previous run began;
//! - every `--full-walk-every`-th run, as for filtered runs.

use std::collections::BTreeSet;
use std::time::Duration;

use super::ExportError;
use crate::dest::{Dest, Target};
use crate::events::table::Heartbeat;
use crate::incremental::{EventsMark, EventsRange, Meta, RunKind};

/// How much later than the previous stored event a restarted receiver may start before the
/// events are taken to have a gap, by default: none, every restart is a gap (HighLevel does
/// not send again what it could not deliver).
pub const DEFAULT_MAX_GAP: Duration = Duration::ZERO;

/// Where an event-driven run reads its events (`--from-events`).
#[derive(Clone, Debug)]
pub struct EventsSource {
    /// The receiver's `--out`: a directory or a bucket holding `events/part-*`.
    pub target: Target,
    /// See the [module docs](self).
    pub max_gap: Duration,
}

/// What the events of a run's range say for one location.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Named {
    /// Contacts to fetch again, in id order (deleted ones excluded).
    pub changed: Vec<String>,
    /// Contacts deleted, in id order.
    pub deleted: Vec<String>,
}

impl Named {
    /// Whether the events named `id` as changed.
    pub fn names(&self, id: &str) -> bool {
        self.changed
            .binary_search_by(|c| c.as_str().cmp(id))
            .is_ok()
    }
}

/// The events table read over a range.
struct Scanned {
    /// Where the table stood: the last part and its last row.
    mark: EventsMark,
    /// Why the events of the range may be incomplete, if they may.
    gap: Option<String>,
    named: Named,
    /// Rows of the location in the range.
    rows: u64,
}

/// Reads the parts after `after` up to `through` (all newer ones when `None`): the mark at
/// the end, a gap since `prev` (the previous run's mark), and the contacts named for
/// `location`. With no `after`, only rows stamped at or after `since_ms` count, and a
/// receiver must have been running at `running_at` (when the previous run started).
#[allow(clippy::too_many_arguments)] // a range, a bound, and what the previous run left
fn scan(
    source: &EventsSource,
    dest: &Dest,
    location: &str,
    after: Option<u64>,
    through: Option<u64>,
    since_ms: i64,
    running_at: i64,
    prev: Option<&EventsMark>,
    max_gap: Duration,
) -> Result<Scanned, ExportError> {
    let gap_ms = i64::try_from(max_gap.as_millis()).unwrap_or(i64::MAX);
    let mut mark = prev.copied().unwrap_or(EventsMark {
        part: after,
        received_ms: None,
        receiver_started_ms: None,
        beat_started_ms: None,
        beat_refusals: None,
    });
    mark.part = after;
    let mut gap = None;
    // The earliest start of a receiver that stored a row, and whether a row is in range.
    let mut first_started: Option<i64> = None;
    let mut any_counted = false;
    let (mut changed, mut deleted) = (BTreeSet::new(), BTreeSet::new());
    let mut rows = 0;
    let last = crate::events::table::scan(dest, None, after, |row| {
        if through.is_some_and(|t| row.part > t) {
            return;
        }
        let counts = after.is_some() || row.timestamp_ms.is_none_or(|t| t >= since_ms);
        first_started = Some(first_started.map_or(row.receiver_started_ms, |s: i64| {
            s.min(row.receiver_started_ms)
        }));
        any_counted |= counts;
        if counts && gap.is_none() {
            if let (Some(received), Some(started)) = (mark.received_ms, mark.receiver_started_ms) {
                if row.receiver_started_ms != started
                    && row.receiver_started_ms.saturating_sub(received) > gap_ms
                {
                    gap = Some(format!(
                        "the receiver restarted at {} after storing nothing since {} (more than --max-gap {}s): events sent meanwhile may have been refused as stale",
                        crate::timefmt::format_iso_millis(row.receiver_started_ms),
                        crate::timefmt::format_iso_millis(received),
                        max_gap.as_secs()
                    ));
                }
            }
        }
        mark = EventsMark {
            part: Some(row.part),
            received_ms: Some(row.received_at_ms),
            receiver_started_ms: Some(row.receiver_started_ms),
            ..mark
        };
        if !counts || row.location_id.as_deref() != Some(location) {
            return;
        }
        rows += 1;
        let Some(contact) = row.contact_id.filter(|c| !c.is_empty()) else {
            return;
        };
        // The contact's last event in the range decides: deleted, or to fetch (a contact
        // restored or re-created after its delete is fetched).
        if row.kind == "ContactDelete" {
            changed.remove(&contact);
            deleted.insert(contact);
        } else {
            deleted.remove(&contact);
            changed.insert(contact);
        }
    })
    .map_err(|e| failed(source, e.to_string()))?;
    // The newest part, even when its rows were all before `since_ms` or it was empty.
    mark.part = match (last, through) {
        (Some(l), Some(t)) => Some(l.min(t)),
        (l, None) => l,
        (None, t) => t,
    }
    .or(after);
    // A first events run: were the events since `since_ms` received at all?
    if after.is_none() && gap.is_none() {
        match first_started.filter(|_| any_counted) {
            Some(s) if s > running_at => {
                gap = Some(format!(
                    "the first receiver that stored events started at {}, after the previous run began ({}): changes before it were not received",
                    crate::timefmt::format_iso_millis(s),
                    crate::timefmt::format_iso_millis(running_at)
                ))
            }
            None if prev.is_none() => {
                gap = Some("the events table holds no event since the previous run began, and no run has read it yet: nothing says the receiver was running".into())
            }
            _ => {}
        }
    }
    let changed = changed.into_iter().collect();
    Ok(Scanned {
        mark,
        gap,
        named: Named {
            changed,
            deleted: deleted.into_iter().collect(),
        },
        rows,
    })
}

/// The events table's destination, opened once per decision (for a bucket, a client).
fn open(source: &EventsSource) -> Result<Dest, ExportError> {
    Dest::open(&source.target).map_err(|e| failed(source, e.to_string()))
}

/// An error reading the events table of `source`.
fn failed(source: &EventsSource, message: String) -> ExportError {
    ExportError::Events {
        dir: source.target.to_string(),
        message,
    }
}

/// Chooses the kind of an incremental run with `--from-events` (the run's own decision,
/// made once and kept in its checkpoint with the range it returns): an events run, or a
/// walk on the schedule, after a gap, or when the previous run left contacts to fetch again.
/// `Full` without a state, as any incremental run.
pub(super) fn choose(
    source: &EventsSource,
    location: &str,
    full_refresh: bool,
    has_state: bool,
    meta: Option<&Meta>,
    overlap: Duration,
    full_walk_every: u32,
) -> Result<(RunKind, EventsRange), ExportError> {
    let after = meta.and_then(|m| m.events).and_then(|e| e.part);
    let since_ms = meta.map_or(i64::MIN, |m| {
        m.last_started_ms
            .saturating_sub(i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX))
    });
    let dest = open(source)?;
    let scanned = scan(
        source,
        &dest,
        location,
        after,
        None,
        since_ms,
        meta.map_or(i64::MIN, |m| m.last_started_ms),
        meta.and_then(|m| m.events.as_ref()),
        source.max_gap,
    )?;
    let beat =
        crate::events::table::read_heartbeat(&dest).map_err(|e| failed(source, e.to_string()))?;
    let prev = meta.and_then(|m| m.events);
    let beat_gap = heartbeat_gap(
        beat.as_ref(),
        prev.as_ref(),
        meta.map_or(i64::MIN, |m| m.last_started_ms),
        crate::timefmt::now_millis(),
        source.max_gap,
    );
    let mut mark = scanned.mark;
    mark.beat_started_ms = beat.map(|b| b.started_ms);
    mark.beat_refusals = beat.map(|b| b.lossy_refusals);
    let range = EventsRange {
        after,
        since_ms,
        mark,
    };
    let walk = |why: &str| {
        tracing::info!(location = %location, "--from-events: this run walks every contact: {why}");
        Ok((RunKind::Walk, range))
    };
    if full_refresh || !has_state {
        return Ok((RunKind::Full, range));
    }
    let Some(meta) = meta else {
        return walk("no record of the previous run (incremental.json)");
    };
    if meta.refetch {
        return walk("the previous run left refused child requests to fetch again");
    }
    if meta.filtered_since_walk.saturating_add(1) >= full_walk_every {
        return walk(&format!(
            "every --full-walk-every {full_walk_every} runs one walks"
        ));
    }
    if let Some(gap) = scanned.gap.as_ref().or(beat_gap.as_ref()) {
        tracing::warn!(location = %location, "--from-events: the events show a gap: {gap}");
        return walk("the events show a gap");
    }
    Ok((
        RunKind::Events {
            nth: meta.filtered_since_walk + 1,
        },
        range,
    ))
}

/// Why the receiver's heartbeat says events may be missing since the previous run (whose
/// mark is `prev` and which started at `prev_run_started_ms`), if it does: HighLevel retries a
/// delivery only when it was answered 429, so whatever it sent while no receiver was up, or
/// that a receiver refused as stale, is lost.
fn heartbeat_gap(
    beat: Option<&Heartbeat>,
    prev: Option<&EventsMark>,
    prev_run_started_ms: i64,
    now_ms: i64,
    max_gap: Duration,
) -> Option<String> {
    let iso = crate::timefmt::format_iso_millis;
    let Some(b) = beat else {
        return Some(format!(
            "the events table has no receiver heartbeat ({}/{}): no receiver is running on it",
            crate::events::table::TABLE_DIR,
            crate::events::table::HEARTBEAT
        ));
    };
    if let Some(stopped) = b.stopped_ms {
        return Some(format!(
            "the receiver stopped at {}: what HighLevel sent since is lost",
            iso(stopped)
        ));
    }
    // Three missed beats, and a minute for the clocks of two machines.
    let late = now_ms.saturating_sub(b.alive_ms);
    if late > b.interval_ms.saturating_mul(3).saturating_add(60_000) {
        return Some(format!(
            "the receiver was last alive at {}, {} s ago: what HighLevel sent since is lost",
            iso(b.alive_ms),
            late / 1000
        ));
    }
    let refused_since = match prev.and_then(|p| p.beat_started_ms) {
        Some(started) if started == b.started_ms => {
            prev.and_then(|p| p.beat_refusals).unwrap_or(0)
        }
        // Another receiver than at the previous run: it restarted in between.
        Some(_) if max_gap.is_zero() => {
            return Some(format!(
                "the receiver restarted at {}, after the previous run (--max-gap 0: any restart may have lost what HighLevel sent while it was down)",
                iso(b.started_ms)
            ))
        }
        Some(_) => 0,
        // The first events run: the receiver must have been up since the previous run began.
        None if b.started_ms > prev_run_started_ms => {
            return Some(format!(
                "the receiver started at {}, after the previous run began ({}): changes before it were not received",
                iso(b.started_ms),
                iso(prev_run_started_ms)
            ))
        }
        None => 0,
    };
    (b.lossy_refusals > refused_since).then(|| {
        format!(
            "the receiver refused {} signed deliveries since the previous run, as stale (outside its --max-age) or because its journal could not take them",
            b.lossy_refusals - refused_since
        )
    })
}

/// The contacts the events of `range` name for `location`: the same on every attempt of a
/// run (its range is fixed).
pub(super) fn named(
    source: &EventsSource,
    location: &str,
    range: &EventsRange,
) -> Result<Named, ExportError> {
    if range.mark.part.is_none() || range.mark.part == range.after {
        return Ok(Named::default());
    }
    let s = scan(
        source,
        &open(source)?,
        location,
        range.after,
        range.mark.part,
        range.since_ms,
        i64::MIN,
        None,
        source.max_gap,
    )?;
    tracing::info!(
        location = %location,
        events = s.rows,
        contacts = s.named.changed.len(),
        deleted = s.named.deleted.len(),
        "--from-events: the contacts the events named"
    );
    Ok(s.named)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn beat(started_ms: i64, alive_ms: i64, lossy_refusals: u64) -> Heartbeat {
        Heartbeat {
            started_ms,
            alive_ms,
            interval_ms: 30_000,
            lossy_refusals,
            stopped_ms: None,
        }
    }

    fn mark(beat_started_ms: i64, beat_refusals: u64) -> EventsMark {
        EventsMark {
            part: Some(3),
            received_ms: Some(beat_started_ms + MIN),
            receiver_started_ms: Some(beat_started_ms),
            beat_started_ms: Some(beat_started_ms),
            beat_refusals: Some(beat_refusals),
        }
    }

    /// The gap `heartbeat_gap` finds at `now` (default --max-gap 0), the previous run having
    /// started at minute 100.
    fn gap(b: Option<Heartbeat>, prev: Option<EventsMark>, now: i64) -> Option<String> {
        heartbeat_gap(b.as_ref(), prev.as_ref(), 100 * MIN, now, DEFAULT_MAX_GAP)
    }

    #[test]
    fn the_same_live_receiver_without_refusals_since_the_last_run_is_no_gap() {
        let now = 200 * MIN;
        assert_eq!(
            gap(
                Some(beat(10 * MIN, now - MIN, 4)),
                Some(mark(10 * MIN, 4)),
                now
            ),
            None
        );
        // A first events run, its receiver up since before the previous run.
        assert_eq!(gap(Some(beat(10 * MIN, now, 0)), None, now), None);
    }

    #[test]
    fn a_missing_late_or_stopped_receiver_is_a_gap() {
        let now = 200 * MIN;
        let prev = Some(mark(10 * MIN, 0));
        assert!(gap(None, prev, now)
            .unwrap()
            .contains("no receiver heartbeat"));
        // Three intervals (90 s) and a minute: 150 s late is still alive, 151 s is not.
        assert_eq!(gap(Some(beat(10 * MIN, now - 150_000, 0)), prev, now), None);
        let late = gap(Some(beat(10 * MIN, now - 151_000, 0)), prev, now).unwrap();
        assert!(late.contains("last alive"), "{late}");
        let mut stopped = beat(10 * MIN, now, 0);
        stopped.stopped_ms = Some(now - 1);
        assert!(gap(Some(stopped), prev, now).unwrap().contains("stopped"));
    }

    #[test]
    fn a_restart_since_the_last_run_is_a_gap_unless_max_gap_allows_it() {
        let now = 200 * MIN;
        let restarted = beat(150 * MIN, now, 0);
        let prev = mark(10 * MIN, 0);
        let g = gap(Some(restarted), Some(prev), now).unwrap();
        assert!(g.contains("restarted"), "{g}");
        let tolerant = heartbeat_gap(
            Some(&restarted),
            Some(&prev),
            100 * MIN,
            now,
            Duration::from_secs(300),
        );
        assert_eq!(tolerant, None);
        // A first events run whose receiver started after the previous run began.
        let g = gap(Some(restarted), None, now).unwrap();
        assert!(g.contains("after the previous run began"), "{g}");
    }

    #[test]
    fn deliveries_refused_since_the_last_run_are_a_gap() {
        let now = 200 * MIN;
        let g = gap(Some(beat(10 * MIN, now, 5)), Some(mark(10 * MIN, 4)), now).unwrap();
        assert!(g.contains("refused 1 signed deliveries"), "{g}");
        // A first events run: any refusal of the running receiver.
        assert!(gap(Some(beat(10 * MIN, now, 1)), None, now).is_some());
    }
}
