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
//! - `ContactDelete` names a deleted contact: written to `deleted_contacts`, never fetched;
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
//! The receiver refuses deliveries older than its `--max-age`, so while it is down for
//! longer than that, HighLevel's redeliveries are refused and events are lost. Every row
//! carries when its receiver started: a row whose receiver started more than `--max-gap`
//! after the previous row was received follows such a downtime, and the run walks (every
//! contact listed, deletions found by absence) instead. So does a first events run whose
//! receiver started after the last run did (the events before it were never received), and
//! every `--full-walk-every`-th run, as for filtered runs.

use std::collections::BTreeSet;
use std::time::Duration;

use super::ExportError;
use crate::dest::{Dest, Target};
use crate::incremental::{EventsMark, EventsRange, Meta, RunKind};

/// How much later than the previous stored event a restarted receiver may start before the
/// events are taken to have a gap, by default: the receiver's default `--max-age`.
pub const DEFAULT_MAX_GAP: Duration = Duration::from_secs(300);

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
    });
    mark.part = after;
    let mut gap = None;
    // The earliest start of a receiver that stored a row, and whether a row is in range.
    let mut first_started: Option<i64> = None;
    let mut any_counted = false;
    let (mut changed, mut deleted) = (BTreeSet::new(), BTreeSet::new());
    let mut rows = 0;
    let fail = |message: String| ExportError::Events {
        dir: source.target.to_string(),
        message,
    };
    let dest = Dest::open(&source.target).map_err(|e| fail(e.to_string()))?;
    let last = crate::events::table::scan(&dest, None, after, |row| {
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
        };
        if !counts || row.location_id.as_deref() != Some(location) {
            return;
        }
        rows += 1;
        let Some(contact) = row.contact_id.filter(|c| !c.is_empty()) else {
            return;
        };
        if row.kind == "ContactDelete" {
            deleted.insert(contact);
        } else {
            changed.insert(contact);
        }
    })
    .map_err(|e| fail(e.to_string()))?;
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
    let changed = changed.difference(&deleted).cloned().collect();
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
    let scanned = scan(
        source,
        location,
        after,
        None,
        since_ms,
        meta.map_or(i64::MIN, |m| m.last_started_ms),
        meta.and_then(|m| m.events.as_ref()),
        source.max_gap,
    )?;
    let range = EventsRange {
        after,
        since_ms,
        mark: scanned.mark,
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
    if let Some(gap) = &scanned.gap {
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
