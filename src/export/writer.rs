//! The writer thread: decodes contacts and children into column builders, writes parts, and
//! commits them together with the checkpoint.
//!
//! It runs on its own OS thread (decoding and compression are CPU work that must not stall
//! the async side) and receives items through a bounded channel, so a slow disk slows the
//! extractor rather than filling memory. Contacts are held back until their page ends: the
//! builders only ever hold whole pages, so a commit (at a rotation, at the end, or when the
//! run stops early) always matches a listing position the next run can continue from.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::ExportError;
use crate::checkpoint::{self, Checkpoint};
use crate::extract::Position;
use crate::fanout::{ContactUnit, Include, Item};
use crate::incremental::SeenLog;
use crate::schema::{BatchBuilder, Entity, RowContext, WideColumns};
use crate::sink::{open_part_with, Format, PartWriter, Partition};

pub(crate) struct WriterConfig {
    pub dest: crate::dest::Dest,
    pub format: Format,
    pub location_id: String,
    pub partition: Partition,
    pub include: Include,
    /// Rows per record batch handed to a sink.
    pub batch_rows: usize,
    /// Contacts per part before rotating (at the next page end).
    pub part_contacts: u64,
    /// Longest time between commits (at the next page end).
    pub commit_interval: Duration,
    pub checkpoint_path: PathBuf,
    /// The incremental run's log of listed contacts.
    pub seen: Option<SeenLog>,
    /// `--custom-fields wide`: the contacts parts get these columns too.
    pub wide: Option<Arc<WideColumns>>,
}

/// Messages to the writer.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A page's contacts, then its `PageEnd`. One message per page rather than per contact:
    /// each message can wake this thread, and a wake-up costs more than a contact's columns.
    Items(Vec<Item>),
    /// Commit what is complete and stop. `listing_done`: the listing reached its end.
    Finish { listing_done: bool },
}

struct Slot {
    entity: Entity,
    builder: BatchBuilder,
    part: Option<Box<dyn PartWriter>>,
}

struct Writer {
    cfg: WriterConfig,
    ck: Checkpoint,
    slots: Vec<Slot>,
    pending: Vec<ContactUnit>,
    position: Option<Position>,
    contacts_in_part: u64,
    last_commit: Instant,
    /// The last page of the listing has been received and written to the builders.
    listing_finished: bool,
}

/// Starts the writer thread from a saved checkpoint. Send items, then `Finish`; join for the
/// final checkpoint. If the channel closes without `Finish`, complete pages are committed.
pub(crate) fn spawn(
    cfg: WriterConfig,
    ck: Checkpoint,
    capacity: usize,
) -> (
    mpsc::Sender<Msg>,
    std::thread::JoinHandle<Result<Checkpoint, ExportError>>,
) {
    let (tx, mut rx) = mpsc::channel::<Msg>(capacity.max(1));
    let handle = std::thread::Builder::new()
        .name("contacts-etl-writer".into())
        .spawn(move || {
            let mut w = Writer::new(cfg, ck);
            let mut listing_done = false;
            while let Some(msg) = rx.blocking_recv() {
                match msg {
                    Msg::Items(items) => {
                        for item in items {
                            w.handle(item)?;
                        }
                    }
                    Msg::Finish { listing_done: done } => {
                        listing_done = done;
                        break;
                    }
                }
            }
            w.commit(listing_done)?;
            Ok(w.ck)
        })
        // Spawning a thread fails only when the OS is out of resources.
        .expect("cannot spawn the writer thread");
    (tx, handle)
}

impl Writer {
    fn new(cfg: WriterConfig, ck: Checkpoint) -> Self {
        let mut entities = vec![Entity::Contacts];
        for (on, e) in [
            (cfg.include.tasks, Entity::Tasks),
            (cfg.include.notes, Entity::Notes),
            (cfg.include.appointments, Entity::Appointments),
        ] {
            if on {
                entities.push(e);
            }
        }
        let slots = entities
            .into_iter()
            .map(|e| Slot {
                entity: e,
                builder: BatchBuilder::new(e),
                part: None,
            })
            .collect();
        let position = ck.position.clone();
        Writer {
            cfg,
            ck,
            slots,
            pending: Vec::new(),
            position,
            contacts_in_part: 0,
            last_commit: Instant::now(),
            listing_finished: false,
        }
    }

    fn handle(&mut self, item: Item) -> Result<(), ExportError> {
        match item {
            Item::Contact(unit) => self.pending.push(unit),
            Item::PageEnd { next, .. } => {
                for unit in std::mem::take(&mut self.pending) {
                    self.write_contact(&unit)?;
                }
                // A page end without a next position is the end of the listing: from here on
                // every commit says so, or a resume would start the listing over.
                self.listing_finished |= next.is_none();
                self.position = next;
                let due = self.contacts_in_part >= self.cfg.part_contacts
                    || self.last_commit.elapsed() >= self.cfg.commit_interval;
                if due {
                    self.commit(false)?;
                }
            }
        }
        Ok(())
    }

    fn write_contact(&mut self, unit: &ContactUnit) -> Result<(), ExportError> {
        self.ck.contacts_listed += 1;
        // Committed with the page, like its rows (the checkpoint is saved at the next commit).
        self.ck
            .skipped
            .extend(unit.children.skipped.iter().cloned());
        if let (Some(seen), Some(id)) = (self.cfg.seen.as_mut(), unit.id.as_deref()) {
            // A contact with a skipped child request is recorded without its `dateUpdated`,
            // so the next incremental run takes it as changed and fetches it again.
            let date_updated = if unit.children.skipped.is_empty() {
                unit.date_updated
            } else {
                None
            };
            seen.record(id, date_updated)?;
        }
        if !unit.changed {
            return Ok(());
        }
        let loc = self.cfg.location_id.clone();
        self.append(
            0,
            &unit.contact,
            &RowContext {
                location_id: &loc,
                contact_id: None,
            },
        )?;
        let child = RowContext {
            location_id: &loc,
            contact_id: unit.id.as_deref(),
        };
        for (entity, rows) in [
            (Entity::Tasks, &unit.children.tasks),
            (Entity::Notes, &unit.children.notes),
            (Entity::Appointments, &unit.children.appointments),
        ] {
            if rows.is_empty() {
                continue;
            }
            let Some(i) = self.slots.iter().position(|s| s.entity == entity) else {
                continue;
            };
            for raw in rows {
                self.append(i, raw, &child)?;
            }
        }
        self.contacts_in_part += 1;
        Ok(())
    }

    fn append(
        &mut self,
        i: usize,
        raw: &serde_json::value::RawValue,
        ctx: &RowContext<'_>,
    ) -> Result<(), ExportError> {
        let slot = &mut self.slots[i];
        if let Err(e) = slot.builder.append(raw, ctx) {
            self.ck.skipped_objects += 1;
            tracing::warn!(error = %e, "skipping an object that cannot be written");
            return Ok(());
        }
        if slot.builder.is_full(self.cfg.batch_rows) {
            self.flush(i)?;
        }
        Ok(())
    }

    /// Hands the builder's rows to the entity's open part, opening it if needed.
    fn flush(&mut self, i: usize) -> Result<(), ExportError> {
        let n = self.ck.next_part;
        let cfg = &self.cfg;
        let slot = &mut self.slots[i];
        if slot.builder.is_empty() {
            return Ok(());
        }
        let mut batch = slot.builder.finish();
        if let (Entity::Contacts, Some(wide)) = (slot.entity, &cfg.wide) {
            batch = wide.widen(&batch);
        }
        let part = match &mut slot.part {
            Some(p) => p,
            None => slot.part.insert(open_part(cfg, slot.entity, n)?),
        };
        part.write(&batch)?;
        Ok(())
    }

    /// Completes the open parts, then records them and the listing position in the
    /// checkpoint. When the listing is done, every entity without a file gets an empty part.
    fn commit(&mut self, listing_done: bool) -> Result<(), ExportError> {
        let listing_done = listing_done || self.listing_finished;
        let mut wrote = false;
        for i in 0..self.slots.len() {
            self.flush(i)?;
            let slot = &mut self.slots[i];
            let report = self
                .ck
                .entities
                .entry(slot.entity.name().to_owned())
                .or_default();
            let part = match slot.part.take() {
                Some(p) => Some(p),
                // An empty part, so readers find the schema and a glob is never empty.
                None if listing_done && report.files.is_empty() => {
                    Some(open_part(&self.cfg, slot.entity, self.ck.next_part)?)
                }
                None => None,
            };
            if let Some(part) = part {
                let info = part.finish()?;
                report.rows += info.rows;
                report.files.push(info);
                wrote = true;
            }
        }
        if let Some(seen) = self.cfg.seen.as_mut() {
            self.ck.seen_bytes = seen.sync()?;
        }
        if wrote {
            self.ck.next_part += 1;
        }
        self.ck.position = if listing_done {
            None
        } else {
            self.position.clone()
        };
        self.ck.listing_done = listing_done;
        checkpoint::commit(&self.cfg.dest, &self.cfg.checkpoint_path, &self.ck)?;
        self.contacts_in_part = 0;
        self.last_commit = Instant::now();
        Ok(())
    }
}

/// Opens part `n` of `entity`: with the wide custom field columns for contacts when the run
/// has them, else with the entity's declared schema.
fn open_part(
    cfg: &WriterConfig,
    entity: Entity,
    n: u32,
) -> Result<Box<dyn PartWriter>, crate::sink::SinkError> {
    let schema = match (entity, &cfg.wide) {
        (Entity::Contacts, Some(wide)) => wide.schema(),
        _ => entity.schema(),
    };
    open_part_with(&cfg.dest, cfg.format, entity, &cfg.partition, n, schema)
}
