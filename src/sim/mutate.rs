//! Edits and deletions that stand in for a day of CRM activity, for incremental exports.

use std::collections::HashSet;

use super::model::{Ms, Text, F};
use super::now_ms;
use super::rng::{hash, Rng};
use super::store::Location;

/// Changes about `share` of the live contacts (chosen from `seed`): `city` and a tag change
/// and `dateUpdated` moves to now. Then deletes `deleted` of the other contacts. Returns the
/// ids (changed, deleted), each in listing order.
pub(crate) fn mutate(
    l: &mut Location,
    share: f64,
    deleted: usize,
    seed: u64,
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
        let c = l.contact_mut(s);
        c.city = F::Val(Text::Owned(format!("Mutated City {seed}")));
        let mut tags = c.tags.get().cloned().unwrap_or_default();
        tags.push(Text::Owned(format!("edited-{seed}")));
        tags.dedup();
        c.tags = F::Val(tags);
        c.date_updated = Ms(now.max(c.date_updated.0 + 1));
    }
    let changed_ids = changed.iter().map(|&s| l.contact_id(s)).collect();
    let deleted_ids = listing
        .iter()
        .filter(|s| doomed_set.contains(s))
        .map(|&s| l.contact_id(s))
        .collect();
    for s in doomed {
        l.delete(s);
    }
    (changed_ids, deleted_ids)
}
