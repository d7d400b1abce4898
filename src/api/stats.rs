//! Request counters shared by every task of a run, read by progress and the run report.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What a request was for, to count requests by kind.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    List,
    Business,
    Contact,
    Tasks,
    Notes,
    Appointments,
    Write,
    Other,
    /// `POST /contacts/search`.
    Search,
    /// `POST /locations/:id/tasks/search`.
    LocationTasks,
    /// `GET /calendars/` and `GET /calendars/events`.
    LocationEvents,
}

impl RequestKind {
    /// Whether the reply is a listing page (up to 500 objects, hundreds of KB).
    pub(crate) fn brings_pages(self) -> bool {
        matches!(
            self,
            RequestKind::List
                | RequestKind::Business
                | RequestKind::Search
                | RequestKind::LocationTasks
                | RequestKind::LocationEvents
        )
    }
}

/// How many kinds [`RequestKind`] has.
const KINDS: usize = 11;

/// Counters; all updated with relaxed atomics (they are statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct Stats {
    by_kind: [AtomicU64; KINDS],
    attempts: AtomicU64,
    retries: AtomicU64,
    rate_limited: AtomicU64,
    server_errors: AtomicU64,
    network_errors: AtomicU64,
    malformed: AtomicU64,
    bytes: AtomicU64,
    wait_nanos: AtomicU64,
}

/// A point-in-time copy of [`Stats`], serialisable into the run report.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    /// Successful requests by kind.
    pub list: u64,
    pub business: u64,
    pub contact: u64,
    pub tasks: u64,
    pub notes: u64,
    pub appointments: u64,
    pub writes: u64,
    pub other: u64,
    /// Contacts search pages (`POST /contacts/search`).
    #[serde(default)]
    pub search: u64,
    /// Location-wide task search pages.
    #[serde(default)]
    pub location_tasks: u64,
    /// Calendar listings and location-wide calendar event windows.
    #[serde(default)]
    pub location_events: u64,
    /// Every request sent, retries included.
    pub attempts: u64,
    pub retries: u64,
    /// 429 answers.
    pub rate_limited: u64,
    pub server_errors: u64,
    pub network_errors: u64,
    pub malformed_bodies: u64,
    pub bytes_received: u64,
    /// Time requests spent waiting for the rate limiter, summed over concurrent requests (so
    /// it can exceed the run's wall time).
    pub limiter_wait_secs: f64,
}

impl StatsSnapshot {
    pub fn succeeded(&self) -> u64 {
        self.list
            + self.business
            + self.contact
            + self.tasks
            + self.notes
            + self.appointments
            + self.writes
            + self.other
            + self.search
            + self.location_tasks
            + self.location_events
    }
}

impl Stats {
    pub(crate) fn ok(&self, kind: RequestKind, bytes: usize) {
        self.by_kind[kind as usize].fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes as u64, Relaxed);
    }
    pub(crate) fn attempt(&self) {
        self.attempts.fetch_add(1, Relaxed);
    }
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }
    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Relaxed);
    }
    pub(crate) fn server_error(&self) {
        self.server_errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn network_error(&self) {
        self.network_errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn malformed(&self) {
        self.malformed.fetch_add(1, Relaxed);
    }
    pub(crate) fn waited(&self, d: std::time::Duration) {
        self.wait_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let k = |i: RequestKind| self.by_kind[i as usize].load(Relaxed);
        StatsSnapshot {
            list: k(RequestKind::List),
            business: k(RequestKind::Business),
            contact: k(RequestKind::Contact),
            tasks: k(RequestKind::Tasks),
            notes: k(RequestKind::Notes),
            appointments: k(RequestKind::Appointments),
            writes: k(RequestKind::Write),
            other: k(RequestKind::Other),
            search: k(RequestKind::Search),
            location_tasks: k(RequestKind::LocationTasks),
            location_events: k(RequestKind::LocationEvents),
            attempts: self.attempts.load(Relaxed),
            retries: self.retries.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            server_errors: self.server_errors.load(Relaxed),
            network_errors: self.network_errors.load(Relaxed),
            malformed_bodies: self.malformed.load(Relaxed),
            bytes_received: self.bytes.load(Relaxed),
            limiter_wait_secs: self.wait_nanos.load(Relaxed) as f64 / 1e9,
        }
    }
}
