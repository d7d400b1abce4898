//! Edits and deletions that stand in for a day of CRM activity, for incremental exports
//! ([`mutate`]), and the writes that happen while a client pages ([`churn`]). Each write
//! sends its webhook as a write through the API would (`ContactUpdate`, `ContactDelete`,
//! `ContactCreate`), so an event-driven export sees them.

use std::collections::HashSet;

use super::model::{Ms, Text, F};
use super::now_ms;
use super::rng::{hash, Rng};
use super::store::Location;
use super::webhooks::{EventType, Webhooks};
use super::Churn;

/// A real edit of a live contact: `city` and a tag change, `dateUpdated` moves to now
/// (strictly forward). Email and phone stay, so the duplicate search needs no news of it.
fn edit(
    l: &mut Location,
    slot: u32,
    city: String,
    tag: String,
    now: i64,
    hooks: Option<&Webhooks>,
) {
    let c = l.contact_mut(slot);
    c.city = F::Val(Text::Owned(city));
    let mut tags = c.tags.get().cloned().unwrap_or_default();
    tags.push(Text::Owned(tag));
    tags.dedup();
    c.tags = F::Val(tags);
    c.date_updated = Ms(now.max(c.date_updated.0 + 1));
    if let Some(h) = hooks {
        h.emit(EventType::ContactUpdate, &c.location_id, &*c);
    }
}

/// Deletes a live contact, with its webhook (the contact as it was).
fn delete(l: &mut Location, slot: u32, hooks: Option<&Webhooks>) {
    if let Some(h) = hooks {
        h.emit(EventType::ContactDelete, l.id(), &*l.contact(slot));
    }
    l.delete(slot);
}

/// One round of churn in a location: edits `update` live contacts, deletes `delete` others
/// (both drawn at random from the listing, seeded by `seed` and `round`) and creates
/// `create` new ones (newest, so first in the listing). Returns the ids it touched.
pub(crate) fn churn(
    l: &mut Location,
    churn: Churn,
    seed: u64,
    round: u64,
    hooks: Option<&Webhooks>,
) -> Vec<String> {
    let mut r = Rng::new(hash(&[seed, 82, u64::from(l.gen.loc), round]));
    let len = l.listing().len();
    let want = (churn.update + churn.delete).min(len);
    let mut picked = HashSet::new();
    let mut slots = Vec::with_capacity(want);
    while slots.len() < want {
        let slot = l.listing()[r.below(len as u64) as usize];
        if picked.insert(slot) {
            slots.push(slot);
        }
    }
    let now = now_ms();
    let mut touched: Vec<String> = slots.iter().map(|&s| l.contact_id(s)).collect();
    let (edited, doomed) = slots.split_at(churn.update.min(slots.len()));
    for &s in edited {
        edit(
            l,
            s,
            format!("Churned City {round}"),
            format!("churn-{round}"),
            now,
            hooks,
        );
    }
    for &s in doomed {
        delete(l, s, hooks);
    }
    for i in 0..churn.create {
        let location_id = l.id().to_string();
        let slot = l.create(|id| {
            let mut c = super::write::new_contact(&location_id);
            c.id = id;
            c.first_name = F::Val(Text::Owned(format!("Churn{round}")));
            c.last_name = F::Val(Text::Owned(format!("New{i}")));
            c.email = F::Val(Text::Owned(format!("churn-{round}-{i}@example.com")));
            c.refresh_derived();
            c
        });
        if let Some(h) = hooks {
            h.emit(EventType::ContactCreate, &location_id, &*l.contact(slot));
        }
        touched.push(l.contact_id(slot));
    }
    touched
}

/// Changes about `share` of the live contacts (chosen from `seed`): `city` and a tag change
/// and `dateUpdated` moves to now. Then deletes `deleted` of the other contacts. Returns the
/// ids (changed, deleted), each in listing order.
pub(crate) fn mutate(
    l: &mut Location,
    share: f64,
    deleted: usize,
    seed: u64,
    hooks: Option<&Webhooks>,
) -> (Vec<String>, Vec<String>) {
    let loc = u64::from(l.gen.loc);
    let listing = l.listing().to_vec();
    let changed: Vec<u32> = listing
        .iter()
        .copied()
        .filter(|&s| Rng::new(hash(&[seed, 80, loc, u64::from(s)])).chance(share))
        .collect();
    let changed_set: HashSet<u32> = changed.iter().copied().collect();
    let mut doomed: Vec<u32> = listing
        .iter()
        .copied()
        .filter(|s| !changed_set.contains(s))
        .collect();
    doomed.sort_by_key(|&s| hash(&[seed, 81, loc, u64::from(s)]));
    doomed.truncate(deleted);
    let doomed_set: HashSet<u32> = doomed.iter().copied().collect();

    let now = now_ms();
    for &s in &changed {
        edit(
            l,
            s,
            format!("Mutated City {seed}"),
            format!("edited-{seed}"),
            now,
            hooks,
        );
    }
    let changed_ids = changed.iter().map(|&s| l.contact_id(s)).collect();
    let deleted_ids = listing
        .iter()
        .filter(|s| doomed_set.contains(s))
        .map(|&s| l.contact_id(s))
        .collect();
    for s in doomed {
        delete(l, s, hooks);
    }
    (changed_ids, deleted_ids)
}
