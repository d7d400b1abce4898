//! `contacts-etl plan`: what an export with the same flags will cost, for one or two
//! requests, before it spends a day's quota.
//!
//! The first request is the listing with a page of one (the search's `total`, or `GET
//! /contacts/`'s `meta.total` where the search is refused). The second, when it tells
//! something the estimate needs: for an incremental run, the same search filtered by
//! `dateUpdated` (how many contacts changed since the last run); otherwise, for location-wide
//! appointments, `GET /calendars/` (how many calendars, and whether the token may read them).
//! The estimate itself is [`crate::estimate`].

use serde::Serialize;

use super::export::ExportJob;
use super::outcome::{api_outcome, Outcome};
use crate::api::{ApiError, Client, ErrorKind};
use crate::estimate::{CostInput, Estimate};
use crate::export::{ExportPlan, Interrupt};
use crate::extract::{Listing, SearchQuery};
use crate::incremental::{Meta, RunKind};
use crate::wide::ChildrenBy;

/// The API's documented daily limit per location, when the server does not announce one.
const DAILY_DEFAULT: u64 = 200_000;

/// One way to run the export, and what it costs.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Strategy {
    pub name: String,
    pub estimate: Estimate,
    /// Hours at the rate limit in force.
    pub hours_at_limit: f64,
    /// Days of the location's daily quota.
    pub days_of_quota: f64,
}

/// What `contacts-etl plan` found and estimates.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaPlan {
    pub location_id: String,
    /// Contacts in the location (the listing's total).
    pub contacts: u64,
    /// `full`, `walk` or `filtered`: what the export would list.
    pub run_kind: String,
    /// Contacts updated since the last run (incremental runs with a state).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<String>,
    /// `search` or `get`: how the export would list.
    pub listing: String,
    /// Calendars of the location, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calendars: Option<u64>,
    /// Requests this plan spent.
    pub requests_spent: u64,
    pub rate_limit: Option<String>,
    pub daily_limit: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_remaining: Option<u64>,
    /// Every strategy the flags allow, cheapest last.
    pub strategies: Vec<Strategy>,
    /// What the export with these flags will do.
    pub chosen: Strategy,
    /// What the estimate assumes or could not know.
    pub notes: Vec<String>,
}

/// Estimates the export `job` describes.
pub async fn run(job: &ExportJob) -> Result<QuotaPlan, Outcome> {
    let prepared = job.prepare(&Interrupt::default())?;
    let (plan, client) = (&prepared.plan, &prepared.client);
    let mut notes = Vec::new();
    let failed = |e: ApiError| {
        api_outcome(e, |e| {
            e.context(format!(
                "cannot plan the export of location {}",
                crate::term::escape(&plan.location_id)
            ))
        })
    };

    // 1. How many contacts, and whether the search is there.
    let first = SearchQuery {
        location_id: plan.location_id.clone(),
        page_limit: 1,
        updated_since: None,
    };
    let (contacts, search) = match plan.listing {
        Listing::Get => (get_total(client, plan).await.map_err(failed)?, false),
        Listing::Search | Listing::Auto => {
            match crate::extract::probe_search(client, &first).await {
                Ok(Some(page)) => (page.total.unwrap_or(0.0) as u64, true),
                Ok(None) if plan.listing == Listing::Auto => {
                    notes.push("the API refused the search: the export lists through GET /contacts/ (100 a request)".into());
                    (get_total(client, plan).await.map_err(failed)?, false)
                }
                Ok(None) => {
                    return Err(Outcome::usage("the API refused POST /contacts/search, and --listing search allows no other listing\nhint: use --listing auto or get"));
                }
                Err(crate::extract::ExtractError::Api(e)) => return Err(failed(e)),
                Err(e) => return Err(Outcome::from(anyhow::Error::from(e))),
            }
        }
    };

    // 2. What an incremental run would list; or the calendars.
    let kind = match &plan.incremental {
        None => RunKind::Full,
        Some(inc) => {
            // From the destination itself: a bucket's state, not a work directory's copy.
            let state = inc.state_file(&plan.location_id);
            let has_state = plan.dest.exists(&state).map_err(|e| {
                Outcome::from(anyhow::anyhow!(
                    "cannot read {}: {e}",
                    plan.dest.show(&state)
                ))
            })?;
            RunKind::choose(
                inc.full_refresh,
                has_state,
                Meta::load_from(&plan.dest, &inc.meta_file(&plan.location_id)).as_ref(),
                search,
                inc.overlap,
                inc.full_walk_every.max(1),
            )
        }
    };
    let since = match (kind, &plan.incremental) {
        (RunKind::Filtered { since_ms, .. }, _) => Some(since_ms),
        (RunKind::Walk, Some(inc)) if search => {
            Meta::load_from(&plan.dest, &inc.meta_file(&plan.location_id)).map(|m| {
                m.last_started_ms
                    .saturating_sub(inc.overlap.as_millis() as i64)
            })
        }
        _ => None,
    };
    let wide_wanted = plan.children_by != ChildrenBy::Contact;
    let mut appointments_by_location = wide_wanted && plan.include.appointments;
    let mut changed = None;
    let mut calendars = None;
    if let Some(since) = since {
        let query = SearchQuery {
            updated_since: Some(since),
            ..first
        };
        let page = client
            .search_contacts(&query.body(None))
            .await
            .map_err(failed)?;
        changed = Some(page.total.unwrap_or(0.0) as u64);
    } else if let RunKind::Walk = kind {
        notes.push("a walk through GET /contacts/ cannot count the changed contacts beforehand: children are estimated for every contact".into());
    } else if appointments_by_location {
        match client.calendars(&plan.location_id).await {
            Ok(list) => calendars = Some(list.len() as u64),
            Err(e) if e.is_scope_refusal() && plan.children_by == ChildrenBy::Auto => {
                notes.push("the token may not read calendars (scope calendars.readonly): appointments come per contact".into());
                appointments_by_location = false;
            }
            Err(e) if e.kind() == ErrorKind::Reauth || e.kind() == ErrorKind::QuotaExhausted => {
                return Err(failed(e))
            }
            Err(e) => notes.push(format!("cannot count the calendars ({e})")),
        }
    }
    if calendars.is_none() && appointments_by_location {
        notes.push("calendars not counted: the estimate assumes one".into());
    }
    let tasks_by_location = wide_wanted && plan.include.tasks;
    if plan.children_by == ChildrenBy::Auto && (tasks_by_location || appointments_by_location) {
        notes.push("--children-by auto: tasks and appointments are estimated location-wide; a token without locations/tasks.readonly (or the calendars scopes) fetches them per contact (about one request a contact each)".into());
    }
    if tasks_by_location && plan.include.tasks {
        notes.push(format!(
            "location-wide tasks are estimated at {} per contact (the API gives no count)",
            crate::estimate::TASKS_PER_CONTACT
        ));
    }

    let quota = client.limiter().effective_quota();
    let per_second = quota.map_or(0.0, |q| q.per_second());
    let (daily_remaining, daily_limit) = client.limiter().daily();
    let daily_limit = daily_limit.unwrap_or(DAILY_DEFAULT);
    let now_ms = crate::export::now_millis();
    let input = |search: bool, tasks: bool, appointments: bool| CostInput {
        contacts,
        changed,
        kind: if search { kind } else { kind.unfiltered() },
        search,
        search_page: plan.search_page,
        include: plan.include,
        tasks_by_location: tasks,
        appointments_by_location: appointments,
        verify_sample: plan.verify_sample,
        calendars,
        now_ms,
    };
    let strategy = |name: String, c: CostInput| {
        let estimate = Estimate::of(&c);
        Strategy {
            name,
            hours_at_limit: estimate.seconds_at(per_second) / 3600.0,
            days_of_quota: estimate.days_of(daily_limit),
            estimate,
        }
    };
    let mut strategies = vec![strategy(
        "GET /contacts/, children per contact".into(),
        input(false, false, false),
    )];
    if search {
        strategies.push(strategy(
            "search, children per contact".into(),
            input(true, false, false),
        ));
        strategies.push(strategy(
            "search, tasks and appointments location-wide".into(),
            input(true, plan.include.tasks, plan.include.appointments),
        ));
    }
    let chosen = strategy(
        format!(
            "{}, {}",
            if search { "search" } else { "GET /contacts/" },
            match (tasks_by_location, appointments_by_location) {
                (false, false) => "children per contact",
                (true, true) => "tasks and appointments location-wide, notes per contact",
                (true, false) => "tasks location-wide, notes and appointments per contact",
                (false, true) => "appointments location-wide, tasks and notes per contact",
            }
        ),
        input(search, tasks_by_location, appointments_by_location),
    );
    Ok(QuotaPlan {
        location_id: plan.location_id.clone(),
        contacts,
        run_kind: (if search { kind } else { kind.unfiltered() })
            .name()
            .into(),
        changed,
        changed_since: match kind {
            RunKind::Filtered { since_ms, .. } if search => {
                Some(crate::timefmt::format_iso_millis(since_ms))
            }
            _ => None,
        },
        listing: if search { "search" } else { "get" }.into(),
        calendars,
        requests_spent: client.stats().snapshot().attempts,
        rate_limit: quota.map(|q| q.to_string()),
        daily_limit,
        daily_remaining,
        strategies,
        chosen,
        notes,
    })
}

/// The location's total through `GET /contacts/?limit=1`.
async fn get_total(client: &Client, plan: &ExportPlan) -> Result<u64, ApiError> {
    let page = client.list_contacts(&plan.location_id, 1, None).await?;
    Ok(page
        .meta
        .and_then(|m| m.total)
        .map_or(page.contacts.len() as u64, |t| t as u64))
}
