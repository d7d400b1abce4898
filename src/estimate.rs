//! What an export will cost in requests, said before it runs (`contacts-etl plan`) and
//! beside what it spent in every run report.
//!
//! Requests are the scarce resource (100 per 10 s and 200,000 a day per location), so the
//! model counts them the way the export sends them:
//! - the listing: `ceil(listed / page) + 1` (the search has no end mark: an empty page ends
//!   it; `GET /contacts/` ends on `meta.nextPage: null`, so no extra page); an events run
//!   (`--from-events`) lists nothing and fetches each named contact (`GET /contacts/:id`);
//! - per-contact children: one request per listed contact (changed contact, in an
//!   incremental run) and entity;
//! - location-wide tasks: pages of [`TASK_PAGE`](crate::wide::TASK_PAGE) tasks, each starting
//!   [`TASK_OVERLAP`](crate::wide::TASK_OVERLAP) rows early, at an assumed
//!   [`TASKS_PER_CONTACT`] (the API announces no count), plus the empty last page; in an
//!   incremental run, one search per batch of changed contacts;
//! - location-wide appointments: the calendars listing plus one request per calendar and
//!   time window ([`EventsPlan`](crate::wide::EventsPlan));
//! - the verification sample: the sampled contacts' location-wide entities once more per
//!   contact;
//! - one request for the location's custom-field definitions.
//!
//! Retries are not in the estimate: they depend on the server's health, not the plan. What a
//! run spent, retries included, is `requests.attempts` in its report.

use serde::Serialize;

use crate::fanout::Include;
use crate::incremental::RunKind;

/// Tasks per contact the estimate assumes for location-wide task pages.
pub const TASKS_PER_CONTACT: f64 = 1.0;

/// What the export will do, as far as requests go.
#[derive(Clone, Debug, PartialEq)]
pub struct CostInput {
    /// Contacts the listing holds (the search's `total`).
    pub contacts: u64,
    /// Contacts updated since the last run: what a filtered run lists, and the contacts whose
    /// children a walk fetches. `None` outside incremental runs.
    pub changed: Option<u64>,
    pub kind: RunKind,
    /// The search listing (`search_page` a page) or `GET /contacts/` (100 a page).
    pub search: bool,
    /// The search's page: the API's 500, smaller in a pipeline of many locations
    /// (`app::export::search_page_for`).
    pub search_page: u32,
    pub include: Include,
    /// Tasks and appointments through the location-wide routes.
    pub tasks_by_location: bool,
    pub appointments_by_location: bool,
    pub verify_sample: f64,
    /// Calendars of the location (for appointment windows); `None` when unknown.
    pub calendars: Option<u64>,
    /// Now, in epoch ms (the appointment windows end two years after it).
    pub now_ms: i64,
}

/// Requests an export will send, by what they are for.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    pub listing: u64,
    pub tasks: u64,
    pub notes: u64,
    pub appointments: u64,
    /// The verification sample's per-contact requests.
    pub verify: u64,
    /// The custom-field definitions.
    pub other: u64,
    pub total: u64,
}

impl Estimate {
    pub fn of(c: &CostInput) -> Estimate {
        let (listed, with_children) = match c.kind {
            RunKind::Full => (c.contacts, c.contacts),
            RunKind::Walk => (c.contacts, c.changed.unwrap_or(c.contacts)),
            RunKind::Filtered { .. } | RunKind::Events { .. } => {
                let changed = c.changed.unwrap_or(c.contacts);
                (changed, changed)
            }
        };
        let listing = if matches!(c.kind, RunKind::Events { .. }) {
            // No listing: `GET /contacts/:id` for each contact the events named.
            listed
        } else if c.search {
            listed.div_ceil(u64::from(c.search_page.max(1))) + 1
        } else {
            listed.div_ceil(100).max(1)
        };
        let incremental = c.kind != RunKind::Full;
        let per_contact = |on: bool| if on { with_children } else { 0 };
        let tasks = match (c.include.tasks, c.tasks_by_location) {
            (false, _) => 0,
            (true, false) => per_contact(true),
            // Two searches per batch of changed contacts: their tasks fit a page, and the
            // second (short) page says the batch ended.
            (true, true) if incremental => {
                with_children.div_ceil(crate::wide::CONTACT_BATCH as u64) * 2
            }
            (true, true) => {
                let tasks = (c.contacts as f64 * TASKS_PER_CONTACT).ceil() as u64;
                // Each page starts `TASK_OVERLAP` rows early; the last brings only those.
                let step = u64::from(crate::wide::TASK_PAGE) - crate::wide::TASK_OVERLAP;
                tasks.div_ceil(step) + 1
            }
        };
        let appointments = match (c.include.appointments, c.appointments_by_location) {
            (false, _) => 0,
            (true, false) => per_contact(true),
            (true, true) => {
                let calendars = c.calendars.unwrap_or(1);
                let plan = crate::wide::EventsPlan::new(
                    (0..calendars).map(|i| i.to_string()).collect(),
                    c.contacts,
                    c.now_ms,
                );
                1 + plan.requests()
            }
        };
        let notes = per_contact(c.include.notes);
        let wide_entities = u64::from(c.include.tasks && c.tasks_by_location)
            + u64::from(c.include.appointments && c.appointments_by_location);
        let verify = if wide_entities > 0 {
            (with_children as f64 * c.verify_sample.clamp(0.0, 1.0)).ceil() as u64 * wide_entities
        } else {
            0
        };
        Estimate {
            listing,
            tasks,
            notes,
            appointments,
            verify,
            other: 1,
            total: listing + tasks + notes + appointments + verify + 1,
        }
    }

    /// Seconds the estimate takes at `per_second` requests a second.
    pub fn seconds_at(&self, per_second: f64) -> f64 {
        if per_second > 0.0 {
            self.total as f64 / per_second
        } else {
            0.0
        }
    }

    /// Days of a daily quota of `daily` requests the estimate uses.
    pub fn days_of(&self, daily: u64) -> f64 {
        self.total as f64 / daily.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> CostInput {
        CostInput {
            contacts: 100_000,
            changed: None,
            kind: RunKind::Full,
            search: true,
            search_page: crate::extract::SEARCH_PAGE_MAX,
            include: Include::ALL,
            tasks_by_location: false,
            appointments_by_location: false,
            verify_sample: 0.005,
            calendars: Some(3),
            now_ms: 1_780_000_000_000,
        }
    }

    #[test]
    fn per_contact_children_cost_three_requests_a_contact_plus_the_pages() {
        let e = Estimate::of(&input());
        assert_eq!(e.listing, 201);
        assert_eq!(
            (e.tasks, e.notes, e.appointments, e.verify),
            (100_000, 100_000, 100_000, 0)
        );
        assert_eq!(e.total, 300_202);
        let get = Estimate::of(&CostInput {
            search: false,
            ..input()
        });
        assert_eq!(get.listing, 1_000);
    }

    /// A pipeline of many locations searches in smaller pages; the estimate counts those
    /// (200 locations of 1,000 contacts: 11 searches each, as the agency bench sees them).
    #[test]
    fn smaller_search_pages_cost_more_listing_requests() {
        let e = Estimate::of(&CostInput {
            contacts: 1_000,
            search_page: 100,
            ..input()
        });
        assert_eq!(e.listing, 11);
        let full_pages = Estimate::of(&CostInput {
            contacts: 1_000,
            ..input()
        });
        assert_eq!(full_pages.listing, 3);
    }

    #[test]
    fn location_wide_children_cost_about_one_request_a_contact() {
        let e = Estimate::of(&CostInput {
            tasks_by_location: true,
            appointments_by_location: true,
            ..input()
        });
        assert_eq!(e.notes, 100_000);
        assert_eq!(e.tasks, 1_251);
        assert_eq!(e.verify, 1_000);
        assert!(e.appointments < 200, "{e:?}");
        assert!(e.total <= 110_000, "{e:?}");
    }

    #[test]
    fn a_filtered_run_costs_what_changed() {
        let e = Estimate::of(&CostInput {
            changed: Some(1_000),
            kind: RunKind::Filtered {
                since_ms: 0,
                nth: 1,
            },
            tasks_by_location: true,
            ..input()
        });
        assert_eq!(e.listing, 3);
        assert_eq!(e.tasks, 20);
        assert_eq!((e.notes, e.appointments), (1_000, 1_000));
        assert_eq!(e.verify, 5);
    }
}
