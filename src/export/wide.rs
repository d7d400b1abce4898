//! The location-wide children phase: after the listing, tasks and appointments from the
//! location-wide routes ([`crate::wide`]) instead of one request per contact.
//!
//! The listing (with `--children-by location|auto`) fetches notes per contact and records
//! every listed contact in the `seen` log (committed with its pages). This phase then, for
//! tasks and for appointments side by side ([`run`] says why and how they share the
//! checkpoint):
//! 1. streams the location's rows, keeping only those whose `contactId` was listed in this run
//!    (a [`ContactSet`] of 8-byte hashes), so the rows are exactly what per-contact requests
//!    would have given; repeats are dropped by id;
//! 2. fetches a deterministic sample of the listed contacts (`--verify-sample`, by hash of the
//!    id) per contact, and compares their rows with the location-wide ones, byte for byte;
//! 3. on a difference, warns, records it in the manifest, discards the entity's location-wide
//!    parts and fetches it per contact for the whole run (the same rows `--children-by
//!    contact` writes). With `auto`, a 401/403 (missing scope) or a 404 on the first
//!    location-wide request of an entity means per contact too, with one warning naming the
//!    scope; with `location` it fails the run.
//!
//! In a full export the listings of step 1 start before the contact listing ends, beside
//! its last notes requests, and wait in a spool for this phase ([`super::ahead`]): the phase
//! reads the same pages, only earlier fetched. Read from the spool, step 1 waits on the
//! server little or not at all, so step 2's requests start beside it (from its first page)
//! and are compared when it ends.
//!
//! # Resuming
//! Each stage commits like the writer does: finish the part (temp, fsync, rename), sync the
//! log of row-id hashes read so far (`wide-<entity>.ids` in the state directory, for the
//! repeat guard), then save the checkpoint with the position ([`Stage`]), the log's length and
//! the sampled rows' digests. A kill between two commits costs the requests since the last
//! one (at most `--commit-interval`): the resumed run deletes the uncommitted part, truncates
//! the log and asks again from the committed position.

use std::cell::{OnceCell, RefCell, RefMut};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::ahead::{Fetched, Task};
use super::{io_err, ExportError, ExportPlan};
use crate::api::{ApiError, Client};
use crate::checkpoint::{self, Checkpoint};
use crate::extract::ExtractError;
use crate::fanout::{self, Include, SkippedRequest};
use crate::incremental::PrevState;
use crate::schema::{BatchBuilder, Entity, RowContext};
use crate::sink::{self, PartWriter, Partition};
use crate::wide::{
    self as engine, ChildrenBy, ContactSet, EntityProgress, EventsPlan, RepeatGuard, Stage,
    WidePos, WideProgress,
};

/// `--verify-sample`'s default: half a percent of the listed contacts.
pub const DEFAULT_VERIFY_SAMPLE: f64 = 0.005;

/// How an entity's children were fetched, as the manifest reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChildrenReport {
    /// `location` or `contact`.
    pub strategy: String,
    /// Why per contact (a missing scope, a difference in the verification sample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The difference the verification sample found (the entity then came per contact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difference: Option<String>,
    /// Contacts whose location-wide rows were checked per contact.
    pub verified_contacts: u64,
    /// Location-wide rows of contacts this run did not list, left out.
    pub unlisted_rows: u64,
    /// Location-wide rows the server repeated, written once.
    pub repeats: u64,
}

/// The manifest's (and the run report's) `childrenBy`: one entry per entity of the phase,
/// as far as `ck` got.
pub fn report(ck: &Checkpoint) -> BTreeMap<String, ChildrenReport> {
    let Some(w) = &ck.wide else {
        return BTreeMap::new();
    };
    w.entities
        .iter()
        .map(|(name, p)| {
            let location = matches!(
                p.stage,
                Stage::Done {
                    location_wide: true
                }
            );
            let report = ChildrenReport {
                strategy: if location { "location" } else { "contact" }.into(),
                reason: p.per_contact_reason.clone(),
                difference: p.difference.clone(),
                verified_contacts: p.verified_contacts,
                unlisted_rows: p.unlisted_rows,
                repeats: p.repeats,
            };
            (name.clone(), report)
        })
        .collect()
}

/// Whether the run needs the list of its listed contacts (the `seen` log) for this phase.
pub(super) fn needs_listed(plan: &ExportPlan) -> bool {
    plan.children_by != ChildrenBy::Contact && (plan.include.tasks || plan.include.appointments)
}

/// The scope the location-wide route of `entity` needs, for messages.
fn scope_of(entity: Entity, calendars_listed: bool) -> &'static str {
    match (entity, calendars_listed) {
        (Entity::Tasks, _) => "locations/tasks.readonly",
        (_, false) => "calendars.readonly",
        (_, true) => "calendars/events.readonly",
    }
}

/// Why a first location-wide request's error means "not available to this token", if it
/// does (a 401 or 403: the scope; a 404: no such route here), with the server's words.
fn unavailable(e: &ApiError) -> Option<(&'static str, String)> {
    let esc = |m: &str| crate::term::Escaped(m).to_string();
    match e {
        ApiError::Unauthorized { message, .. } => Some((
            "the token lacks the scope",
            format!("HTTP 401 {}", esc(message)),
        )),
        ApiError::Fatal {
            status: 403,
            messages,
            ..
        } => Some((
            "the token lacks the scope",
            format!("HTTP 403 {}", esc(&messages.join("; "))),
        )),
        ApiError::NotFound { message, .. } => Some((
            "the API does not offer the route needing the scope",
            format!("HTTP 404 {}", esc(message)),
        )),
        _ => None,
    }
}

/// Runs the phase for every included entity (nothing with `--children-by contact`).
///
/// Tasks and appointments run side by side: each entity's listing is one request at a time
/// (task pages follow each other's offsets) or two (appointment windows), a round trip each,
/// so one entity alone leaves most of the location's pace unused at the end of every export.
/// Both commit into the one checkpoint; each keeps what it has not committed (its open part,
/// its position, the objects it skipped) to itself, so either entity's commit saves only the
/// other's committed state, and a kill resumes both from there. When one entity fails, the
/// other still runs to its end or its own stop (a signal, the budget) and commits it; the
/// first entity's error is the phase's.
pub(super) async fn run(
    client: Arc<Client>,
    plan: &ExportPlan,
    ck: Checkpoint,
    ck_path: &Path,
    seen_path: &Path,
    prev: Option<&PrevState>,
    ahead: Fetched,
) -> Result<Checkpoint, ExportError> {
    if !needs_listed(plan) {
        return Ok(ck);
    }
    let phase = Phase {
        client,
        plan,
        ck: RefCell::new(ck),
        ck_path,
        seen_path,
        prev,
        state_dir: checkpoint::state_dir(plan.out(), &plan.location_id),
        listed: OnceCell::new(),
        ahead: RefCell::new(ahead),
        samples: RefCell::new(Vec::new()),
    };
    let run = |on: bool, entity: Entity| {
        let phase = &phase;
        async move {
            match on {
                true => phase.entity(entity).await,
                false => Ok(()),
            }
        }
    };
    let (tasks, appointments) = futures::join!(
        run(plan.include.tasks, Entity::Tasks),
        run(plan.include.appointments, Entity::Appointments)
    );
    tasks.and(appointments)?;
    Ok(phase.ck.into_inner())
}

/// The phase of one location. Its methods run on the location's one thread, interleaved at
/// their awaits: a borrow of the checkpoint never spans an await.
struct Phase<'a> {
    client: Arc<Client>,
    plan: &'a ExportPlan,
    ck: RefCell<Checkpoint>,
    ck_path: &'a Path,
    seen_path: &'a Path,
    prev: Option<&'a PrevState>,
    state_dir: PathBuf,
    /// The listed contacts (changed ones, in an incremental run), loaded once.
    listed: OnceCell<(ContactSet, u64)>,
    /// The entities' listings fetched ahead, if the listing started them.
    ahead: RefCell<Fetched>,
    /// Verification samples asked while their entity's listing was read from the spool, from
    /// the listing's end until `verify` takes them.
    samples: RefCell<Vec<(Entity, Task<SampleReply>)>>,
}

/// The listed contacts of the committed `seen` log, in listing order (an incremental run's
/// changed ones only).
fn listed_ids<'p>(
    seen: &Path,
    committed: u64,
    prev: Option<&'p PrevState>,
) -> Result<impl Iterator<Item = Result<String, ExportError>> + 'p, ExportError> {
    let f = File::open(seen).map_err(io_err(seen))?;
    let path = seen.to_path_buf();
    Ok(BufReader::new(f.take(committed))
        .lines()
        .filter_map(move |line| {
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(io_err(&path)(e))),
            };
            let (id, ms) = line.split_once('\t')?;
            let ms = ms.parse::<i64>().ok();
            prev.is_none_or(|p| p.changed(id, ms))
                .then(|| Ok(id.to_owned()))
        }))
}

impl Phase<'_> {
    /// The checkpoint, for a step without awaits.
    fn ck(&self) -> RefMut<'_, Checkpoint> {
        self.ck.borrow_mut()
    }

    fn listed(&self) -> Result<&(ContactSet, u64), ExportError> {
        if let Some(l) = self.listed.get() {
            return Ok(l);
        }
        let ids: Vec<String> = self.listed_ids()?.collect::<Result<_, _>>()?;
        let n = ids.len() as u64;
        let set: ContactSet = ids.iter().map(String::as_str).collect();
        Ok(self.listed.get_or_init(|| (set, n)))
    }

    /// The listed contacts' ids, read again from the `seen` log.
    fn listed_ids(
        &self,
    ) -> Result<impl Iterator<Item = Result<String, ExportError>> + '_, ExportError> {
        let seen_bytes = self.ck().seen_bytes;
        listed_ids(self.seen_path, seen_bytes, self.prev)
    }

    fn ids_log(&self, entity: Entity) -> PathBuf {
        self.state_dir.join(format!("wide-{}.ids", entity.name()))
    }

    /// Brings one entity to `Done`, from wherever the checkpoint left it.
    async fn entity(&self, entity: Entity) -> Result<(), ExportError> {
        let name = entity.name().to_owned();
        let mut prog = self
            .ck()
            .wide
            .get_or_insert_with(WideProgress::default)
            .entities
            .get(&name)
            .cloned()
            .unwrap_or(EntityProgress {
                stage: Stage::Listing { pos: None },
                per_contact_reason: None,
                difference: None,
                verify_sample: self.plan.verify_sample.clamp(0.0, 1.0),
                events_plan: None,
                ids_bytes: 0,
                sample: Vec::new(),
                verified_contacts: 0,
                unlisted_rows: 0,
                repeats: 0,
            });
        if let Stage::Listing { pos: None } = prog.stage {
            tracing::info!(
                location = %self.plan.location_id,
                entity = entity.name(),
                "fetching {entity} location-wide (--children-by {})",
                self.plan.children_by.name()
            );
        }
        loop {
            match prog.stage.clone() {
                Stage::Listing { pos } => self.listing(entity, &mut prog, pos).await?,
                Stage::Verify => self.verify(entity, &mut prog).await?,
                Stage::PerContact { next } => self.per_contact(entity, &mut prog, next).await?,
                Stage::Done { .. } => return Ok(()),
            }
        }
    }

    /// Saves `prog` into the checkpoint, and the checkpoint.
    fn save(
        &self,
        ck: &mut Checkpoint,
        entity: Entity,
        prog: &EntityProgress,
    ) -> Result<(), ExportError> {
        ck.wide
            .get_or_insert_with(WideProgress::default)
            .entities
            .insert(entity.name().to_owned(), prog.clone());
        checkpoint::commit(&self.plan.dest, self.ck_path, ck)?;
        Ok(())
    }

    /// Why the run must stop now (a signal, the budget), after committing.
    fn stop(&self) -> Option<ExportError> {
        let contacts = self.ck().contacts_listed;
        if let Some(signal) = self.plan.interrupt.signal() {
            return Some(ExportError::Interrupted { signal, contacts });
        }
        self.plan
            .budget
            .exhausted(&self.client)
            .map(|reason| ExportError::QuotaStop { reason, contacts })
    }

    /// Switches `entity` to per contact for the run, committing that decision.
    fn to_per_contact(
        &self,
        entity: Entity,
        prog: &mut EntityProgress,
        reason: String,
    ) -> Result<(), ExportError> {
        // The location-wide parts leave the checkpoint first; a kill before they are deleted
        // leaves files the resumed run deletes as uncommitted.
        let dropped = {
            let mut ck = self.ck();
            let dropped = ck.entities.remove(entity.name()).unwrap_or_default();
            prog.per_contact_reason = Some(reason);
            prog.stage = Stage::PerContact { next: 0 };
            prog.sample.clear();
            self.save(&mut ck, entity, prog)?;
            dropped
        };
        for f in dropped.files {
            let p = self.plan.out().join(&f.path);
            self.plan.dest.remove(&p).map_err(io_err(&p))?;
        }
        let log = self.ids_log(entity);
        if log.exists() {
            std::fs::remove_file(&log).map_err(io_err(&log))?;
        }
        Ok(())
    }

    async fn listing(
        &self,
        entity: Entity,
        prog: &mut EntityProgress,
        pos: Option<WidePos>,
    ) -> Result<(), ExportError> {
        let client = self.client.clone();
        let plan = self.plan;
        let (set, contacts) = self.listed()?;
        let contacts = *contacts;
        if contacts == 0 {
            // Nothing listed (an incremental night without changes): nothing to ask.
            return self.done(entity, prog, true);
        }
        let fresh_start = pos.is_none() && prog.ids_bytes == 0;
        let (mut log, seen) = IdLog::open(&self.ids_log(entity), prog.ids_bytes)?;
        let guard = RepeatGuard::with_seen(seen);
        let first_request_failed = |e: &ExtractError, scope: &str| -> Option<String> {
            let ExtractError::Api(api) = e else {
                return None;
            };
            let (why, answer) = unavailable(api)?;
            Some(format!("{why} {scope} ({answer})"))
        };
        let mut from_spool = false;
        let mut pages: Pin<Box<dyn Stream<Item = Result<engine::WidePage, ExtractError>> + Send>> =
            match entity {
                Entity::Tasks => {
                    // An incremental run asks for its changed contacts' tasks only (unless
                    // they are a large part of the location), and a `--business` export for
                    // its businesses' contacts: `contactId` batches cost about 2 requests a
                    // hundred contacts, where the whole location's tasks could cost far more.
                    let few = match (&plan.incremental, self.prev) {
                        (Some(_), Some(prev)) => contacts * 3 < prev.len() as u64,
                        _ => false,
                    };
                    let batches = match few || !plan.businesses.is_empty() {
                        true => Some(self.listed_ids()?.collect::<Result<Vec<_>, _>>()?),
                        false => None,
                    };
                    // Fetched ahead: the pages a fresh start without batches would ask for.
                    let ahead = fresh_start.then(|| self.ahead.borrow_mut().tasks.take());
                    match (ahead.flatten(), batches) {
                        (Some(spooled), None) => {
                            from_spool = true;
                            Box::pin(spooled.pages())
                        }
                        (_, batches) => Box::pin(engine::location_tasks(
                            client.clone(),
                            plan.location_id.clone(),
                            batches,
                            pos.clone(),
                            guard,
                        )),
                    }
                }
                _ => {
                    // Fetched ahead: the windows of the plan made for the listing's
                    // announced total, which a fresh start adopts.
                    let ahead = (fresh_start && prog.events_plan.is_none())
                        .then(|| self.ahead.borrow_mut().appointments.take())
                        .flatten();
                    let (planned, spooled) = match ahead {
                        Some(a) => match a.plan().await {
                            Some((plan, spooled)) => (Some(plan), spooled),
                            None => (None, None),
                        },
                        None => (None, None),
                    };
                    let events = match &prog.events_plan {
                        Some(p) => p.clone(),
                        None => {
                            let planned = match planned {
                                Some(p) => p,
                                None => EventsPlan::ask(&client, &plan.location_id, contacts).await,
                            };
                            match planned {
                                Ok(p) => {
                                    if !p.cheaper_than_per_contact(contacts) {
                                        // A small run (an incremental one, most nights): one
                                        // request per contact is fewer than the windows.
                                        tracing::info!(contacts, windows = p.requests(), "appointments per contact: fewer requests than the calendar windows");
                                        return self.to_per_contact(
                                        entity,
                                        prog,
                                        format!("{contacts} contacts cost fewer requests per contact than {} calendar windows", p.requests()),
                                    );
                                    }
                                    prog.events_plan = Some(p.clone());
                                    self.save(&mut self.ck(), entity, prog)?;
                                    p
                                }
                                Err(e) => {
                                    let e = ExtractError::Api(e);
                                    return self.first_failed(
                                        entity,
                                        prog,
                                        first_request_failed(&e, scope_of(entity, false)),
                                        e,
                                    );
                                }
                            }
                        }
                    };
                    match spooled {
                        Some(spooled) => {
                            from_spool = true;
                            Box::pin(spooled.pages())
                        }
                        None => Box::pin(engine::location_events(
                            client.clone(),
                            plan.location_id.clone(),
                            events,
                            pos.clone(),
                            guard,
                        )),
                    }
                }
            };
        // Read from the spool, the listing's pages are (mostly) in already and cost CPU: the
        // verification sample is asked meanwhile, from the first page on (a listing refused
        // at its first request goes per contact and needs no sample), and compared once the
        // listing is done. Until then the task is the listing's: any other way out of it
        // (an error, a stop) drops it, which stops it.
        let mut sample: Option<Task<SampleReply>> = None;
        let mut sink = PartSink::new(plan, &self.ck(), entity);
        let mut first = fresh_start;
        let mut at = pos;
        loop {
            let next = pages.next().await;
            let page = match next {
                None => break,
                Some(Ok(page)) => page,
                Some(Err(e)) => {
                    if first {
                        let why = first_request_failed(&e, scope_of(entity, true));
                        return self.first_failed(entity, prog, why, e);
                    }
                    // What is complete is committed; the run reports the error.
                    self.commit_listing(entity, prog, &mut sink, &mut log, at)?;
                    return Err(e.into());
                }
            };
            first = false;
            if from_spool && sample.is_none() {
                let ids = self.sampled_ids(prog.verify_sample)?;
                let fetch = fetch_sample(client.clone(), ids, entity, plan.window);
                sample = Some(Task::spawn(fetch));
            }
            prog.repeats += page.repeats;
            sink.skipped_objects += page.non_objects;
            for row in page.rows {
                if let Some(k) = row.id_key {
                    log.push(k)?;
                }
                let Some(contact) = row.contact_id.filter(|c| set.contains(c)) else {
                    prog.unlisted_rows += 1;
                    continue;
                };
                if engine::in_sample(&contact, prog.verify_sample) {
                    prog.sample
                        .push([engine::key(&contact), engine::key(row.raw.get())]);
                }
                sink.append(&self.ck(), &row.raw, &contact)?;
            }
            at = page.next;
            if at.is_none() {
                break;
            }
            if sink.due() {
                self.commit_listing(entity, prog, &mut sink, &mut log, at.clone())?;
            }
            if let Some(stop) = self.stop() {
                self.commit_listing(entity, prog, &mut sink, &mut log, at)?;
                return Err(stop);
            }
        }
        let mut ck = self.ck();
        sink.close(&mut ck, false)?;
        prog.ids_bytes = log.sync()?;
        prog.stage = Stage::Verify;
        self.save(&mut ck, entity, prog)?;
        if let Some(task) = sample {
            self.samples.borrow_mut().push((entity, task));
        }
        Ok(())
    }

    /// The first location-wide request of `entity` failed: per contact for the run if the
    /// route is not available to this token and `--children-by auto`, else the error.
    fn first_failed(
        &self,
        entity: Entity,
        prog: &mut EntityProgress,
        unavailable: Option<String>,
        e: ExtractError,
    ) -> Result<(), ExportError> {
        match (unavailable, self.plan.children_by) {
            (Some(why), ChildrenBy::Auto) => {
                tracing::warn!(entity = entity.name(), "{why}: {entity} are fetched per contact (one request per contact)");
                self.to_per_contact(entity, prog, why)
            }
            (Some(why), _) => Err(ExportError::Unsupported(format!(
                "--children-by location: {why}\nhint: grant the token that scope, or run with --children-by auto (per contact where a scope is missing)"
            ))),
            (None, _) => Err(e.into()),
        }
    }

    fn commit_listing(
        &self,
        entity: Entity,
        prog: &mut EntityProgress,
        sink: &mut PartSink<'_>,
        log: &mut IdLog,
        pos: Option<WidePos>,
    ) -> Result<(), ExportError> {
        let mut ck = self.ck();
        sink.close(&mut ck, false)?;
        prog.ids_bytes = log.sync()?;
        prog.stage = Stage::Listing { pos };
        self.save(&mut ck, entity, prog)
    }

    /// The listed contacts in the verification sample (`share` of them, by hash of the id).
    fn sampled_ids(&self, share: f64) -> Result<Vec<String>, ExportError> {
        self.listed_ids()?
            .filter(|id| match id {
                Ok(id) => engine::in_sample(id, share),
                Err(_) => true,
            })
            .collect()
    }

    /// Fetches the sampled contacts per contact (or takes what was asked during the
    /// listing) and compares.
    async fn verify(&self, entity: Entity, prog: &mut EntityProgress) -> Result<(), ExportError> {
        let asked = {
            let mut samples = self.samples.borrow_mut();
            let at = samples.iter().position(|(e, _)| *e == entity);
            at.map(|i| samples.swap_remove(i).1)
        };
        let asked = match asked {
            Some(task) => task.join().await,
            None => None,
        };
        let fetched = match asked {
            Some(reply) => reply,
            None => {
                let ids = self.sampled_ids(prog.verify_sample)?;
                fetch_sample(self.client.clone(), ids, entity, self.plan.window).await
            }
        }
        .map_err(|e| ExportError::Extract(e.into()))?;
        let mut wide: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for [c, d] in &prog.sample {
            wide.entry(*c).or_default().push(*d);
        }
        let mut differing = 0u64;
        let mut first_diff = None;
        let mut checked = 0u64;
        for Sampled { id, keys } in fetched {
            // Refused for good per contact, or deleted around the time the location-wide
            // rows were read: nothing to compare this contact with.
            let Some(per_contact) = keys else {
                continue;
            };
            checked += 1;
            let mut location = wide.remove(&engine::key(&id)).unwrap_or_default();
            location.sort_unstable();
            if per_contact != location {
                differing += 1;
                first_diff.get_or_insert_with(|| {
                    format!(
                        "contact {}: {} per contact, {} location-wide",
                        crate::term::Escaped(&id),
                        per_contact.len(),
                        location.len()
                    )
                });
            }
        }
        prog.verified_contacts = checked;
        match first_diff {
            Some(first) => {
                let diff = format!(
                    "{differing} of {checked} sampled contacts have other {entity} location-wide than per contact (first: {first})"
                );
                tracing::warn!("{diff}: {entity} are fetched per contact for this run");
                prog.difference = Some(diff);
                self.to_per_contact(
                    entity,
                    prog,
                    "the verification sample found a difference".into(),
                )
            }
            None => {
                tracing::info!(
                    entity = entity.name(),
                    sampled = checked,
                    "location-wide rows verified against a per-contact sample"
                );
                self.done(entity, prog, true)
            }
        }
    }

    fn done(
        &self,
        entity: Entity,
        prog: &mut EntityProgress,
        location_wide: bool,
    ) -> Result<(), ExportError> {
        let mut ck = self.ck();
        if ck
            .entities
            .get(entity.name())
            .is_none_or(|r| r.files.is_empty())
        {
            // An empty part, so readers find the schema and a glob is never empty.
            PartSink::new(self.plan, &ck, entity).close(&mut ck, true)?;
        }
        prog.stage = Stage::Done { location_wide };
        self.save(&mut ck, entity, prog)
    }

    fn commit_per_contact(
        &self,
        entity: Entity,
        prog: &mut EntityProgress,
        sink: &mut PartSink<'_>,
        next: u64,
    ) -> Result<(), ExportError> {
        let mut ck = self.ck();
        sink.close(&mut ck, false)?;
        prog.stage = Stage::PerContact { next };
        self.save(&mut ck, entity, prog)
    }

    /// Per contact, for every listed contact from the `next`-th on.
    async fn per_contact(
        &self,
        entity: Entity,
        prog: &mut EntityProgress,
        next: u64,
    ) -> Result<(), ExportError> {
        let only = only(entity);
        let client = self.client.clone();
        let ids = self.listed_ids()?.skip(next as usize);
        let mut fetched = futures::stream::iter(ids)
            .map(|id| {
                let client = client.clone();
                async move {
                    let id = id?;
                    let r = fanout::fetch_children(&client, &id, only)
                        .await
                        .map_err(|e| ExportError::Extract(e.into()))?;
                    Ok::<_, ExportError>((id, r))
                }
            })
            .buffered(self.plan.window.max(1));
        let mut sink = PartSink::new(self.plan, &self.ck(), entity);
        let mut at = next;
        while let Some(r) = fetched.next().await {
            let (id, children) = match r {
                Ok(x) => x,
                Err(e) => {
                    self.commit_per_contact(entity, prog, &mut sink, at)?;
                    return Err(e);
                }
            };
            for raw in rows_of(&children, entity) {
                sink.append(&self.ck(), raw, &id)?;
            }
            if let Some(last) = children.skipped.last() {
                sink.skipped.extend(children.skipped.iter().cloned());
                let count = (self.ck().skipped.len() + sink.skipped.len()) as u64;
                if count > self.plan.max_skipped {
                    // Stops like the listing does: this contact is not committed.
                    return Err(ExportError::TooManySkipped {
                        count,
                        max: self.plan.max_skipped,
                        entity: last.entity.clone(),
                        last: Box::new(last.clone()),
                        contacts: self.ck().contacts_listed,
                    });
                }
            }
            at += 1;
            if sink.due() {
                self.commit_per_contact(entity, prog, &mut sink, at)?;
                if let Some(stop) = self.stop() {
                    return Err(stop);
                }
            }
        }
        sink.close(&mut self.ck(), false)?;
        self.done(entity, prog, false)
    }
}

/// `Include` with only `entity`.
fn only(entity: Entity) -> Include {
    Include {
        tasks: entity == Entity::Tasks,
        notes: entity == Entity::Notes,
        appointments: entity == Entity::Appointments,
    }
}

/// One sampled contact as fetched per contact: its rows' keys, sorted, or `None` when there
/// is nothing to compare (refused for good per contact, or deleted before or while the
/// location-wide rows were read).
struct Sampled {
    id: String,
    keys: Option<Vec<u64>>,
}

type SampleReply = Result<Vec<Sampled>, ApiError>;

/// Fetches `ids`' rows of `entity` per contact, `window` at a time, in order; stops at the
/// first error.
async fn fetch_sample(
    client: Arc<Client>,
    ids: Vec<String>,
    entity: Entity,
    window: usize,
) -> SampleReply {
    let only = only(entity);
    let mut fetched = futures::stream::iter(ids)
        .map(|id| {
            let client = client.clone();
            async move {
                let r = fanout::fetch_children(&client, &id, only).await;
                (id, r)
            }
        })
        .buffered(window.max(1));
    let mut out = Vec::new();
    while let Some((id, r)) = fetched.next().await {
        let children = r?;
        let keys = (children.skipped.is_empty() && !children.vanished).then(|| {
            let mut keys: Vec<u64> = rows_of(&children, entity)
                .iter()
                .map(|r| engine::key(r.get()))
                .collect();
            keys.sort_unstable();
            keys
        });
        out.push(Sampled { id, keys });
    }
    Ok(out)
}

fn rows_of(children: &fanout::Children, entity: Entity) -> &[Box<RawValue>] {
    match entity {
        Entity::Tasks => &children.tasks,
        Entity::Notes => &children.notes,
        _ => &children.appointments,
    }
}

/// The open part of one entity during the phase; committed by [`PartSink::close`].
struct PartSink<'a> {
    plan: &'a ExportPlan,
    partition: Partition,
    entity: Entity,
    builder: BatchBuilder,
    part: Option<Box<dyn PartWriter>>,
    rows: u64,
    since: Instant,
    /// Objects skipped since the last commit (not JSON objects, or not writable), and the
    /// per-contact requests refused for good: they join the checkpoint with the part, so the
    /// other entity's commits never save them ahead of the rows they go with.
    skipped_objects: u64,
    skipped: Vec<SkippedRequest>,
}

impl<'a> PartSink<'a> {
    fn new(plan: &'a ExportPlan, ck: &Checkpoint, entity: Entity) -> PartSink<'a> {
        PartSink {
            plan,
            partition: plan.partition(ck),
            entity,
            builder: BatchBuilder::new(entity),
            part: None,
            rows: 0,
            since: Instant::now(),
            skipped_objects: 0,
            skipped: Vec::new(),
        }
    }

    fn append(
        &mut self,
        ck: &Checkpoint,
        raw: &RawValue,
        contact_id: &str,
    ) -> Result<(), ExportError> {
        let ctx = RowContext {
            location_id: &self.plan.location_id,
            contact_id: Some(contact_id),
        };
        if let Err(e) = self.builder.append(raw, &ctx) {
            self.skipped_objects += 1;
            tracing::warn!(error = %e, "skipping an object that cannot be written");
            return Ok(());
        }
        self.rows += 1;
        if self.builder.is_full(self.plan.batch_rows) {
            self.flush(Self::number(ck, self.entity))?;
        }
        Ok(())
    }

    /// The number of the entity's next part. Only this phase writes the entity's directory
    /// (the listing fetched it not), so its parts are numbered on their own from 0, as the
    /// listing numbers the other entities': every entity then has a `part-00000`.
    fn number(ck: &Checkpoint, entity: Entity) -> u32 {
        ck.entities
            .get(entity.name())
            .map_or(0, |r| r.files.len() as u32)
    }

    fn flush(&mut self, n: u32) -> Result<(), ExportError> {
        if self.builder.is_empty() {
            return Ok(());
        }
        let batch = self.builder.finish();
        let part = match &mut self.part {
            Some(p) => p,
            None => self.part.insert(sink::open_part_at(
                &self.plan.dest,
                self.plan.format,
                self.entity,
                &self.partition,
                n,
            )?),
        };
        part.write(&batch)?;
        Ok(())
    }

    /// Whether a commit is due: `--commit-interval` passed, or a part's worth of rows
    /// (`--part-contacts` rows).
    fn due(&self) -> bool {
        self.since.elapsed() >= self.plan.commit_interval
            || self.rows >= self.plan.part_contacts.max(1)
    }

    /// Completes the open part (an empty one with `empty`, if none is open) and records it,
    /// with what was skipped since the last commit, in `ck`, which the caller then saves.
    fn close(&mut self, ck: &mut Checkpoint, empty: bool) -> Result<(), ExportError> {
        let n = Self::number(ck, self.entity);
        self.flush(n)?;
        let part = match self.part.take() {
            Some(p) => Some(p),
            None if empty => Some(sink::open_part_at(
                &self.plan.dest,
                self.plan.format,
                self.entity,
                &self.partition,
                n,
            )?),
            None => None,
        };
        if let Some(part) = part {
            let info = part.finish()?;
            let report = ck
                .entities
                .entry(self.entity.name().to_owned())
                .or_default();
            report.rows += info.rows;
            report.files.push(info);
        }
        ck.skipped_objects += std::mem::take(&mut self.skipped_objects);
        ck.skipped.append(&mut self.skipped);
        self.rows = 0;
        self.since = Instant::now();
        Ok(())
    }
}

/// The hashes of the row ids a location-wide listing read, 8 bytes each (little-endian),
/// synced at each commit; a resumed run truncates it to the committed length and seeds the
/// repeat guard with it.
struct IdLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl IdLog {
    fn open(path: &Path, committed: u64) -> Result<(IdLog, Vec<u64>), ExportError> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(committed).map_err(io_err(path))?;
        let mut bytes = Vec::with_capacity(committed as usize);
        f.read_to_end(&mut bytes).map_err(io_err(path))?;
        let keys = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        f.seek(SeekFrom::Start(committed)).map_err(io_err(path))?;
        Ok((
            IdLog {
                path: path.to_path_buf(),
                out: BufWriter::new(f),
            },
            keys,
        ))
    }

    fn push(&mut self, k: u64) -> Result<(), ExportError> {
        self.out
            .write_all(&k.to_le_bytes())
            .map_err(io_err(&self.path))
    }

    /// Makes the log durable; returns its length.
    fn sync(&mut self) -> Result<u64, ExportError> {
        self.out.flush().map_err(io_err(&self.path))?;
        let f = self.out.get_ref();
        f.sync_data().map_err(io_err(&self.path))?;
        f.metadata().map(|m| m.len()).map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_log_keeps_only_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wide-tasks.ids");
        let (mut log, seen) = IdLog::open(&p, 0).unwrap();
        assert!(seen.is_empty());
        log.push(1).unwrap();
        log.push(2).unwrap();
        let committed = log.sync().unwrap();
        assert_eq!(committed, 16);
        log.push(3).unwrap();
        log.sync().unwrap();
        drop(log);
        // A kill after the third hash but before its commit: it is forgotten.
        let (_, seen) = IdLog::open(&p, committed).unwrap();
        assert_eq!(seen, [1, 2]);
    }

    #[test]
    fn the_listed_contacts_are_the_committed_seen_log_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seen.tsv");
        std::fs::write(&p, "a\t1\nb\t\nc\t3\nuncommitted\t4\n").unwrap();
        let committed = "a\t1\nb\t\nc\t3\n".len() as u64;
        let ids: Vec<String> = listed_ids(&p, committed, None)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn the_manifest_says_which_strategy_each_entity_used() {
        let prog = |stage, reason: Option<&str>| EntityProgress {
            stage,
            per_contact_reason: reason.map(Into::into),
            difference: None,
            verify_sample: 0.005,
            events_plan: None,
            ids_bytes: 0,
            sample: vec![],
            verified_contacts: 3,
            unlisted_rows: 0,
            repeats: 0,
        };
        let mut w = WideProgress::default();
        w.entities.insert(
            "tasks".into(),
            prog(
                Stage::Done {
                    location_wide: true,
                },
                None,
            ),
        );
        w.entities.insert(
            "appointments".into(),
            prog(
                Stage::Done {
                    location_wide: false,
                },
                Some("the token lacks the scope calendars.readonly"),
            ),
        );
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<WideProgress>(&json).unwrap(), w);
        let ck: Checkpoint = serde_json::from_value(serde_json::json!({
            "settings": {"locationId":"L","businesses":[],"include":"tasks","format":"csv","pageSize":100,"incremental":false},
            "startedAt":"x","resumed":0,"position":null,"nextPart":0,"contactsListed":0,"entities":{},"complete":false,
            "wide": w,
        }))
        .unwrap();
        let r = report(&ck);
        assert_eq!(r["tasks"].strategy, "location");
        assert_eq!(r["appointments"].strategy, "contact");
        assert!(r["appointments"]
            .reason
            .as_deref()
            .unwrap()
            .contains("calendars.readonly"));
    }
}
