//! Per-location state: the listing order, and an overlay holding only what writes changed.
//!
//! Memory per base contact is 12 bytes (its dateAdded and its place in the listing), plus a
//! few bytes of business index; contacts and children are generated when served. A write
//! materialises the contact (or its children) into the overlay, where it stays.
//!
//! The duplicate search can read a lagging view ([`View::Search`]): with a search lag set,
//! each location keeps a [`SearchIndex`] of the email and phone the search sees for every
//! written contact, updated only `lag` after the write was applied, as the real API's search
//! index is. Everything else (listing, reads, the create rule against duplicates) reads the
//! primary state.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::gen::{Identity, LocationGen};
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
    /// The duplicate search's lagging view; `None` when the search sees writes at once.
    index: Option<SearchIndex>,
    /// dateUpdated of each base slot, computed on first use (a `dateUpdated` filter of
    /// `POST /contacts/search`): 8 bytes per contact, only in locations searched that way.
    base_updated: OnceLock<Vec<i64>>,
    /// Tasks before each listing position (`len + 1` entries, the last is the location's
    /// total), so that a page of the location-wide task search finds its first contact by
    /// binary search instead of building every contact's tasks. Built on first use (from
    /// the cheap [`LocationGen::task_count`]), then kept up to date by every write that
    /// changes the listing or a contact's tasks.
    task_prefix: OnceLock<Vec<u32>>,
    /// Every appointment as (start ms, slot, index in the contact's events), by start: the
    /// calendar events route reads a time window of it. Built on first use. Appointments
    /// are never written, and created contacts have none, so it stays right; deleted
    /// contacts are skipped on read.
    events: OnceLock<Vec<(i64, u32, u8)>>,
}

/// Which state a duplicate lookup reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    /// What writes applied so far: the create rule against duplicates, upsert's matching.
    Primary,
    /// What `GET /contacts/search/duplicate` sees: writes only `lag` after they were applied.
    Search,
}

/// The email (lower case) and phone a duplicate lookup matches, empty values dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ident {
    email: Option<String>,
    phone: Option<String>,
}

impl Ident {
    fn new(email: &F<Text>, phone: &F<Text>) -> Ident {
        let val = |f: &F<Text>| f.get().filter(|v| !v.is_empty()).map(|v| v.to_string());
        Ident {
            email: val(email).map(|e| e.to_lowercase()),
            phone: val(phone),
        }
    }

    fn of(c: &Contact) -> Ident {
        Ident::new(&c.email, &c.phone)
    }

    fn of_base(i: &Identity) -> Ident {
        Ident::new(&i.email, &i.phone)
    }
}

/// The duplicate search's view of written contacts. Slots absent from `seen` were never
/// written (or their email and phone never changed): the search reads them from the primary
/// state. A slot mapped to `None` is a create the index has not taken in yet.
struct SearchIndex {
    lag: Duration,
    seen: HashMap<u32, Option<Ident>>,
    /// Index updates waiting for their time, in the order they become visible.
    queue: VecDeque<(Instant, u32, Ident)>,
}

impl SearchIndex {
    /// Takes in every update whose time has come.
    fn catch_up(&mut self, now: Instant) {
        while let Some(&(at, _, _)) = self.queue.front() {
            if at > now {
                break;
            }
            if let Some((_, slot, ident)) = self.queue.pop_front() {
                self.seen.insert(slot, Some(ident));
            }
        }
    }
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
            index: None,
            base_updated: OnceLock::new(),
            task_prefix: OnceLock::new(),
            events: OnceLock::new(),
        }
    }

    /// Makes the duplicate search see writes only `lag` after they are applied (zero: at once).
    pub(crate) fn with_search_lag(mut self, lag: Duration) -> Location {
        self.index = (!lag.is_zero()).then(|| SearchIndex {
            lag,
            seen: HashMap::new(),
            queue: VecDeque::new(),
        });
        self
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

    /// dateUpdated of a live slot. The first call for a base contact generates every base
    /// contact of the location once (their dateUpdated comes late in each one's random stream).
    pub(crate) fn updated(&self, slot: u32) -> i64 {
        if let Some(c) = self.overlay.get(&slot) {
            return c.date_updated.0;
        }
        let base = self.base_updated.get_or_init(|| {
            (0..self.base_n)
                .map(|s| {
                    self.gen
                        .contact(s, self.base_added[s as usize])
                        .date_updated
                        .0
                })
                .collect()
        });
        base.get(slot as usize).copied().unwrap_or(0)
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

    /// The contact in a live slot, materialised into the overlay for editing. For edits that
    /// leave email and phone alone (the search index is not told); others use `put_contact`.
    pub(crate) fn contact_mut(&mut self, slot: u32) -> &mut Contact {
        let added = self.added(slot);
        let gen = &self.gen;
        self.overlay
            .entry(slot)
            .or_insert_with(|| gen.contact(slot, added))
    }

    /// Replaces a live contact; a changed email or phone reaches the search index later.
    pub(crate) fn put_contact(&mut self, slot: u32, contact: Contact) {
        if self.index.is_some() {
            let before = self.ident(slot);
            let after = Ident::of(&contact);
            if let Some(index) = self.index.as_mut().filter(|_| before != after) {
                index.seen.entry(slot).or_insert(Some(before));
                index
                    .queue
                    .push_back((Instant::now() + index.lag, slot, after));
            }
        }
        self.overlay.insert(slot, contact);
    }

    /// Email and phone of a live slot in the primary state.
    fn ident(&self, slot: u32) -> Ident {
        match self.overlay.get(&slot) {
            Some(c) => Ident::of(c),
            None => Ident::of_base(&self.gen.identity(slot)),
        }
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

    /// How many tasks a live slot has now.
    fn task_count(&self, slot: u32) -> u32 {
        let n = match self.children.get(&slot) {
            Some(c) => c.tasks.len(),
            None if slot < self.base_n => self.gen.task_count(slot),
            None => 0,
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Tasks before each listing position, and the total last (see the field).
    pub(crate) fn task_prefix(&self) -> &[u32] {
        self.task_prefix.get_or_init(|| {
            let mut prefix = Vec::with_capacity(self.listing.len() + 1);
            let mut n = 0u32;
            prefix.push(0);
            for &s in &self.listing {
                n = n.saturating_add(self.task_count(s));
                prefix.push(n);
            }
            prefix
        })
    }

    /// Brings the task prefix up to date after a write to a contact's tasks.
    pub(crate) fn sync_task_count(&mut self, slot: u32) {
        let Some(pos) = self.listing_position(slot) else {
            return;
        };
        let now = self.task_count(slot);
        if let Some(prefix) = self.task_prefix.get_mut() {
            let before = prefix[pos + 1] - prefix[pos];
            if now != before {
                for p in &mut prefix[pos + 1..] {
                    *p = (*p + now).saturating_sub(before);
                }
            }
        }
    }

    /// Where a live slot is in the listing.
    pub(crate) fn listing_position(&self, slot: u32) -> Option<usize> {
        let key = self.order_key(slot);
        let pos = self.listing.partition_point(|&s| self.order_key(s) < key);
        (self.listing.get(pos) == Some(&slot)).then_some(pos)
    }

    /// Every appointment by start time (see the field).
    pub(crate) fn events_by_start(&self) -> &[(i64, u32, u8)] {
        self.events.get_or_init(|| {
            let mut all = Vec::new();
            for &s in &self.listing {
                for (j, e) in self.children(s).events.iter().enumerate() {
                    let start = crate::timefmt::parse_iso_millis(&e.start_time);
                    if let (Some(start), Ok(j)) = (start, u8::try_from(j)) {
                        all.push((start, s, j));
                    }
                }
            }
            all.sort_unstable();
            all
        })
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
        if let Some(index) = &mut self.index {
            index.seen.insert(slot, None);
            let at = Instant::now() + index.lag;
            index.queue.push_back((at, slot, Ident::of(&contact)));
        }
        self.overlay.insert(slot, contact);
        let key = self.order_key(slot);
        let pos = self.listing.partition_point(|&s| self.order_key(s) < key);
        self.listing.insert(pos, slot);
        if let Some(prefix) = self.task_prefix.get_mut() {
            // A new contact has no tasks.
            prefix.insert(pos + 1, prefix[pos]);
        }
        slot
    }

    pub(crate) fn delete(&mut self, slot: u32) {
        if let Some(pos) = self.listing_position(slot) {
            let tasks = self.task_count(slot);
            self.listing.remove(pos);
            if let Some(prefix) = self.task_prefix.get_mut() {
                prefix.remove(pos + 1);
                for p in &mut prefix[pos + 1..] {
                    *p = p.saturating_sub(tasks);
                }
            }
        }
        self.deleted.insert(slot);
        self.overlay.remove(&slot);
        self.children.remove(&slot);
        // A deleted contact leaves the search at once: it could not be served anyway.
        if let Some(index) = &mut self.index {
            index.seen.remove(&slot);
            index.queue.retain(|&(_, s, _)| s != slot);
        }
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

    /// The first live contact whose email (case-insensitive), else phone, matches, as `view`
    /// sees them: newest first, or oldest first (by dateAdded) with `oldest_first`. A linear
    /// scan that builds only email and phone of base contacts: fine for demo-sized writes.
    /// [`View::Search`] reads the index as it was when last caught up
    /// ([`Location::search_duplicate`] catches up first).
    pub(crate) fn find_duplicate(
        &self,
        email: Option<&str>,
        phone: Option<&str>,
        except: Option<u32>,
        view: View,
        oldest_first: bool,
    ) -> Option<(u32, &'static str)> {
        let email = email.filter(|e| !e.is_empty()).map(str::to_lowercase);
        let phone = phone.filter(|p| !p.is_empty());
        let index = self.index.as_ref().filter(|_| view == View::Search);
        // `Some(hit)` when the index decides, `None` to read the primary state.
        let indexed = |s: u32, pick: fn(&Ident) -> Option<&str>, want: &str| {
            index
                .and_then(|i| i.seen.get(&s))
                .map(|seen| seen.as_ref().and_then(pick) == Some(want))
        };
        let scan = |hit: &dyn Fn(u32) -> bool| {
            let mut found = self
                .listing
                .iter()
                .copied()
                .filter(|&s| Some(s) != except && hit(s));
            if oldest_first {
                // Slots grow with each create: they order contacts added in one millisecond.
                found.min_by_key(|&s| (self.added(s), s))
            } else {
                found.next()
            }
        };
        if let Some(email) = &email {
            let hit = |s: u32| {
                indexed(s, |i| i.email.as_deref(), email).unwrap_or_else(|| {
                    match self.overlay.get(&s) {
                        Some(c) => c.email_matches(email),
                        None => {
                            matches(&self.gen.identity(s).email, |e| e.to_lowercase() == *email)
                        }
                    }
                })
            };
            if let Some(s) = scan(&hit) {
                return Some((s, "email"));
            }
        }
        if let Some(phone) = phone {
            let hit = |s: u32| {
                indexed(s, |i| i.phone.as_deref(), phone).unwrap_or_else(|| {
                    match self.overlay.get(&s) {
                        Some(c) => c.phone_matches(phone),
                        None => matches(&self.gen.identity(s).phone, |p| p == phone),
                    }
                })
            };
            if let Some(s) = scan(&hit) {
                return Some((s, "phone"));
            }
        }
        None
    }

    /// The duplicate search: the search index caught up to now, then [`View::Search`].
    pub(crate) fn search_duplicate(
        &mut self,
        email: Option<&str>,
        phone: Option<&str>,
        oldest_first: bool,
    ) -> Option<(u32, &'static str)> {
        if let Some(index) = &mut self.index {
            index.catch_up(Instant::now());
        }
        self.find_duplicate(email, phone, None, View::Search, oldest_first)
    }

    /// Whether the duplicate search lags writes (then searching needs the write lock).
    pub(crate) fn search_lags(&self) -> bool {
        self.index.is_some()
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
