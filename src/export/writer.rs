//! The writer thread: decodes contacts and children into column builders and writes parts.
//!
//! It runs on its own OS thread (decoding and compression are CPU work that must not stall
//! the async side) and receives items through a bounded channel, so a slow disk slows the
//! extractor rather than filling memory. Parts rotate only at page ends, so every part holds
//! whole pages of contacts with all their children: a part on disk is a unit of progress.

use std::path::PathBuf;

use tokio::sync::mpsc;

use super::{EntityReport, ExportError};
use crate::fanout::{Include, Item};
use crate::schema::{BatchBuilder, Entity, RowContext};
use crate::sink::{open_part, Format, PartInfo, PartWriter};

pub(crate) struct WriterConfig {
    pub out: PathBuf,
    pub format: Format,
    pub location_id: String,
    pub include: Include,
    /// Rows per record batch handed to a sink.
    pub batch_rows: usize,
    /// Contacts per part before rotating (at the next page end).
    pub part_contacts: u64,
    /// Number of the first part to write.
    pub first_part: u32,
}

/// What the writer produced.
#[derive(Debug, Default)]
pub(crate) struct WriterOutput {
    pub entities: Vec<(Entity, EntityReport)>,
    /// Objects that were not JSON objects and could not be written (counted, logged).
    pub skipped: u64,
}

struct Slot {
    entity: Entity,
    builder: BatchBuilder,
    part: Option<Box<dyn PartWriter>>,
    report: EntityReport,
}

struct Writer {
    cfg: WriterConfig,
    slots: Vec<Slot>,
    next_part: u32,
    contacts_in_part: u64,
    skipped: u64,
}

/// Starts the writer thread. Send items; drop the sender to finish; join for the result.
pub(crate) fn spawn(
    cfg: WriterConfig,
    capacity: usize,
) -> (
    mpsc::Sender<Item>,
    std::thread::JoinHandle<Result<WriterOutput, ExportError>>,
) {
    let (tx, mut rx) = mpsc::channel::<Item>(capacity.max(1));
    let handle = std::thread::Builder::new()
        .name("contacts-etl-writer".into())
        .spawn(move || {
            let mut w = Writer::new(cfg);
            while let Some(item) = rx.blocking_recv() {
                w.handle(item)?;
            }
            w.finish()
        })
        // Spawning a thread fails only when the OS is out of resources.
        .expect("cannot spawn the writer thread");
    (tx, handle)
}

impl Writer {
    fn new(cfg: WriterConfig) -> Self {
        let mut entities = vec![Entity::Contacts];
        if cfg.include.tasks {
            entities.push(Entity::Tasks);
        }
        if cfg.include.notes {
            entities.push(Entity::Notes);
        }
        if cfg.include.appointments {
            entities.push(Entity::Appointments);
        }
        let slots = entities
            .into_iter()
            .map(|e| Slot {
                entity: e,
                builder: BatchBuilder::new(e),
                part: None,
                report: EntityReport::default(),
            })
            .collect();
        let next_part = cfg.first_part;
        Writer {
            cfg,
            slots,
            next_part,
            contacts_in_part: 0,
            skipped: 0,
        }
    }

    fn handle(&mut self, item: Item) -> Result<(), ExportError> {
        match item {
            Item::Contact(unit) => {
                let loc = self.cfg.location_id.clone();
                let ctx = RowContext {
                    location_id: &loc,
                    contact_id: None,
                };
                self.append(0, &unit.contact, &ctx)?;
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
            }
            Item::PageEnd { .. } => {
                if self.contacts_in_part >= self.cfg.part_contacts {
                    self.commit()?;
                }
            }
        }
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
            self.skipped += 1;
            tracing::warn!(error = %e, "skipping an object that cannot be written");
            return Ok(());
        }
        if slot.builder.len() >= self.cfg.batch_rows {
            self.flush(i)?;
        }
        Ok(())
    }

    /// Hands the builder's rows to the entity's open part, opening it if needed.
    fn flush(&mut self, i: usize) -> Result<(), ExportError> {
        let n = self.next_part;
        let cfg = &self.cfg;
        let slot = &mut self.slots[i];
        if slot.builder.is_empty() {
            return Ok(());
        }
        let batch = slot.builder.finish();
        if slot.part.is_none() {
            slot.part = Some(open_part(
                &cfg.out,
                cfg.format,
                slot.entity,
                &cfg.location_id,
                n,
            )?);
        }
        if let Some(part) = slot.part.as_mut() {
            part.write(&batch)?;
        }
        Ok(())
    }

    /// Completes the open parts: every row so far is on disk under its final name.
    fn commit(&mut self) -> Result<(), ExportError> {
        for i in 0..self.slots.len() {
            self.flush(i)?;
            if let Some(part) = self.slots[i].part.take() {
                let info = part.finish()?;
                self.slots[i].report.add(info);
            }
        }
        self.next_part += 1;
        self.contacts_in_part = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<WriterOutput, ExportError> {
        self.commit()?;
        // An entity without rows still gets one empty part, so readers find its schema and
        // a glob over the entity's folder never comes up empty.
        for slot in &mut self.slots {
            if slot.report.files.is_empty() {
                let part = open_part(
                    &self.cfg.out,
                    self.cfg.format,
                    slot.entity,
                    &self.cfg.location_id,
                    self.next_part,
                )?;
                slot.report.add(part.finish()?);
            }
        }
        Ok(WriterOutput {
            entities: self
                .slots
                .into_iter()
                .map(|s| (s.entity, s.report))
                .collect(),
            skipped: self.skipped,
        })
    }
}

impl EntityReport {
    fn add(&mut self, info: PartInfo) {
        self.rows += info.rows;
        self.files.push(info);
    }
}
