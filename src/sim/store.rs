//! Per-location state: the listing order, and an overlay holding only what writes changed.
//!
//! Memory per base contact is 12 bytes (its dateAdded and its place in the listing), plus a
//! few bytes of business index; contacts and children are generated when served. A write
//! materialises the contact (or its children) into the overlay, where it stays.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::gen::LocationGen;
use super::model::{Children, Contact, Text, F};
use super::rng::{hash, IdCodec, Rng};

/// dateAdded of the newest base contact: 2025-06-30T21:55:00.532Z. Base data is fixed in
/// time so that every run serves the same bytes; contacts created by writes are newer.
const NEWEST_ADDED_MS: i64 = 1_751_320_500_532;
/// Base contacts are spread over about three years before that.
const SPAN_MS: i64 = 3 * 365 * 86_400_000;

pub(crate) struct Location {
    pub gen: LocationGen,
    base_n: u32,
    /// dateAdded of each base slot; slot 0 is the newest.
    base_added: Vec<i64>,
    /// Live slots in listing order: dateAdded descending, then id ascending.
    listing: Vec<u32>,
    overlay: HashMap<u32, Contact>,
    children: HashMap<u32, Children>,
    deleted: HashSet<u32>,
    next_slot: u32,
    /// Base slots of each business, in listing order (deleted ones are filtered on read).
    by_business: Vec<Vec<u32>>,
}

/// Why a contact in the listing comes where it does.
type OrderKey = (Reverse<i64>, u64);

impl Location {
    pub(crate) fn new(gen: LocationGen, contacts: usize) -> Location {
        let n = u32::try_from(contacts).unwrap_or(u32::MAX);
        let base_added = base_timestamps(gen.seed, gen.loc, n);
        let codec = gen.codec;
        let loc = gen.loc;
        let mut listing: Vec<u32> = (0..n).collect();
        listing
            .sort_unstable_by_key(|&s| (Reverse(base_added[s as usize]), codec.sort_key(loc, s)));
        let mut by_business = vec![Vec::new(); gen.businesses.len()];
        for &s in &listing {
            if let Some(b) = gen.business_of(s) {
                by_business[b].push(s);
            }
        }
        Location {
            gen,
            base_n: n,
            base_added,
            listing,
            overlay: HashMap::new(),
            children: HashMap::new(),
            deleted: HashSet::new(),
            next_slot: n,
            by_business,
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.gen.location_id
    }

    pub(crate) fn listing(&self) -> &[u32] {
        &self.listing
    }

    fn codec(&self) -> &IdCodec {
        &self.gen.codec
    }

    pub(crate) fn exists(&self, slot: u32) -> bool {
        slot < self.next_slot
            && !self.deleted.contains(&slot)
            && (slot < self.base_n || self.overlay.contains_key(&slot))
    }

    /// dateAdded of a live slot.
    pub(crate) fn added(&self, slot: u32) -> i64 {
        match self.overlay.get(&slot) {
            Some(c) => c.date_added.0,
            None => self.base_added.get(slot as usize).copied().unwrap_or(0),
        }
    }

    fn order_key(&self, slot: u32) -> OrderKey {
        (
            Reverse(self.added(slot)),
            self.codec().sort_key(self.gen.loc, slot),
        )
    }

    pub(crate) fn contact_id(&self, slot: u32) -> String {
        self.codec().encode(self.gen.loc, slot)
    }

    /// The contact in a live slot, as served.
    pub(crate) fn contact(&self, slot: u32) -> Cow<'_, Contact> {
        match self.overlay.get(&slot) {
            Some(c) => Cow::Borrowed(c),
            None => Cow::Owned(self.gen.contact(slot, self.added(slot))),
        }
    }

    /// The contact in a live slot, materialised into the overlay for editing.
    pub(crate) fn contact_mut(&mut self, slot: u32) -> &mut Contact {
        let added = self.added(slot);
        let gen = &self.gen;
        self.overlay
            .entry(slot)
            .or_insert_with(|| gen.contact(slot, added))
    }

    pub(crate) fn put_contact(&mut self, slot: u32, contact: Contact) {
        self.overlay.insert(slot, contact);
    }

    pub(crate) fn children(&self, slot: u32) -> Cow<'_, Children> {
        match self.children.get(&slot) {
            Some(c) => Cow::Borrowed(c),
            None if slot < self.base_n => Cow::Owned(self.gen.children(slot, self.added(slot))),
            None => Cow::Owned(Children::default()),
        }
    }

    pub(crate) fn children_mut(&mut self, slot: u32) -> &mut Children {
        if !self.children.contains_key(&slot) {
            let base = self.children(slot).into_owned();
            self.children.insert(slot, base);
        }
        self.children.entry(slot).or_default()
    }

    /// Index in the listing of the first contact strictly after the cursor (`ms`, `id`) in
    /// listing order. Without an id, the first contact added before `ms`.
    pub(crate) fn position_after(&self, ms: i64, id: Option<&str>) -> usize {
        self.listing.partition_point(|&s| {
            let added = self.added(s);
            added > ms || (added == ms && id.is_none_or(|id| self.contact_id(s).as_str() <= id))
        })
    }

    /// Adds a new contact (newest first) and returns its slot.
    pub(crate) fn create(&mut self, build: impl FnOnce(String) -> Contact) -> u32 {
        let slot = self.next_slot;
        self.next_slot += 1;
        let contact = build(self.contact_id(slot));
        self.overlay.insert(slot, contact);
        let key = self.order_key(slot);
        let pos = self.listing.partition_point(|&s| self.order_key(s) < key);
        self.listing.insert(pos, slot);
        slot
    }

    pub(crate) fn delete(&mut self, slot: u32) {
        let key = self.order_key(slot);
        let pos = self.listing.partition_point(|&s| self.order_key(s) < key);
        if self.listing.get(pos) == Some(&slot) {
            self.listing.remove(pos);
        }
        self.deleted.insert(slot);
        self.overlay.remove(&slot);
        self.children.remove(&slot);
    }

    /// Live contacts of a business, in listing order.
    pub(crate) fn business(&self, business_id: &str) -> Vec<u32> {
        let Some(b) = self.gen.businesses.iter().position(|x| x == business_id) else {
            return Vec::new();
        };
        self.by_business[b]
            .iter()
            .copied()
            .filter(|s| !self.deleted.contains(s))
            .collect()
    }

    /// The first live contact whose email (case-insensitive), else phone, matches. A linear
    /// scan that builds only email and phone of base contacts: fine for demo-sized writes.
    pub(crate) fn find_duplicate(
        &self,
        email: Option<&str>,
        phone: Option<&str>,
        except: Option<u32>,
    ) -> Option<(u32, &'static str)> {
        let email = email.filter(|e| !e.is_empty()).map(str::to_lowercase);
        let phone = phone.filter(|p| !p.is_empty());
        let candidates = self.listing.iter().copied().filter(|&s| Some(s) != except);
        if let Some(email) = &email {
            for s in candidates.clone() {
                let hit = match self.overlay.get(&s) {
                    Some(c) => c.email_matches(email),
                    None => matches(&self.gen.identity(s).email, |e| e.to_lowercase() == *email),
                };
                if hit {
                    return Some((s, "email"));
                }
            }
        }
        if let Some(phone) = phone {
            for s in candidates {
                let hit = match self.overlay.get(&s) {
                    Some(c) => c.phone_matches(phone),
                    None => matches(&self.gen.identity(s).phone, |p| p == phone),
                };
                if hit {
                    return Some((s, "phone"));
                }
            }
        }
        None
    }
}

fn matches(f: &F<Text>, pred: impl Fn(&str) -> bool) -> bool {
    f.get().is_some_and(|v| !v.is_empty() && pred(v))
}

/// dateAdded of each base slot, newest first. About 30% of contacts share the millisecond of
/// the one before (groups of 2 to 5), as bulk imports do on the real API.
fn base_timestamps(seed: u64, loc: u32, n: u32) -> Vec<i64> {
    let mut r = Rng::new(hash(&[seed, 60, u64::from(loc)]));
    let avg_gap = (SPAN_MS / i64::from(n.max(1))).max(2);
    let mut out = Vec::with_capacity(n as usize);
    let mut t = NEWEST_ADDED_MS;
    let mut group = 0;
    for i in 0..n {
        if i > 0 && group < 5 && r.chance(0.3) {
            group += 1;
        } else {
            if i > 0 {
                t -= r.range(1, 2 * avg_gap);
            }
            group = 1;
        }
        out.push(t);
    }
    out
}

/// All locations, addressable by id or by the index a contact id decodes to.
pub(crate) struct Store {
    locations: Vec<RwLock<Location>>,
    by_id: HashMap<String, usize>,
    codec: IdCodec,
}

impl Store {
    pub(crate) fn new(locations: Vec<Location>, codec: IdCodec) -> Store {
        let by_id = locations
            .iter()
            .enumerate()
            .map(|(i, l)| (l.id().to_string(), i))
            .collect();
        Store {
            locations: locations.into_iter().map(RwLock::new).collect(),
            by_id,
            codec,
        }
    }

    pub(crate) fn location(&self, id: &str) -> Option<&RwLock<Location>> {
        self.by_id.get(id).and_then(|&i| self.locations.get(i))
    }

    /// The location and slot a contact id names, if it decodes; the slot may be dead.
    pub(crate) fn locate(&self, contact_id: &str) -> Option<(&RwLock<Location>, u32)> {
        let (loc, slot) = self.codec.decode(contact_id)?;
        Some((self.locations.get(loc as usize)?, slot))
    }
}

/// Lock helpers: a panic while holding a lock must not take the whole simulator down.
pub(crate) fn read(l: &RwLock<Location>) -> RwLockReadGuard<'_, Location> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write(l: &RwLock<Location>) -> RwLockWriteGuard<'_, Location> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
