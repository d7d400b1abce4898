//! An in-process simulator of the HighLevel (LeadConnector) Contacts API, for the demo, the
//! tests and the benchmarks.
//!
//! It speaks the same HTTP as `https://services.leadconnectorhq.com` for contacts: the same
//! paths, envelopes, status codes, `X-RateLimit-*` headers, 429s and validation errors (see
//! `/work/shared/API-NOTES.md`), plus seeded faults ([`Faults`]).
//!
//! # Layout
//! - `rng`: splitmix64 and the reversible contact id codec.
//! - `model`: the served records, serialised directly to bytes.
//! - `gen`: base data, a pure function of (seed, location, slot); ~10% adversarial values.
//! - `store`: per-location listing order and the overlay of written records.
//! - `limit`: burst window and daily quota per token and location.
//! - `faults`: seeded 5xx, truncated bodies, dropped connections, slow and ambiguous replies.
//! - `oauth`: the consent redirect, `/oauth/token` (rotating refresh tokens),
//!   `/oauth/locationToken`, `/oauth/installedLocations`, and the token check of
//!   [`SimOAuth::required`].
//! - `routes`: the request pipeline (auth, limits, faults) and dispatch; `read` and `write`
//!   hold the handlers; `mutate` the incremental-export helper and churn.
//! - `search`: `POST /contacts/search` (the listing's successor: the same index, a
//!   `searchAfter` cursor, a `dateUpdated` range filter).
//! - `wide`: location-wide reads: custom field definitions, task search, calendars and
//!   their events.
//! - `webhooks`: signed webhooks for applied writes ([`SimConfig::webhooks`]), delivered with
//!   redeliveries and duplicates as HighLevel's sender does.
//!
//! Memory stays small because base contacts are never stored: a location of N contacts costs
//! about 12 bytes per contact until it is written to.
//!
//! # What it models of the real service's timing
//! Off by default (every write applied the instant it arrives, the search sees it at once),
//! and turned on for the crash-and-resume import tests, because a client that is only
//! correct against an instant server creates duplicates against the real one:
//! - **Write latency** ([`SimConfig::write_latency`]): each write (create, upsert, update,
//!   delete, tags, task and note writes) is applied after a seeded delay drawn uniformly from
//!   the range, whether or not the client is still connected: a request in flight when its
//!   client dies (SIGKILL, timeout) still lands. The reply is sent once the write is applied;
//!   `dateAdded` and `dateUpdated` are the apply time. An ambiguous write fault is applied,
//!   then answered 502. [`Sim::settle`] waits until every accepted write has been applied.
//! - **Search lag** ([`SimConfig::search_lag`]): `GET /contacts/search/duplicate` reads an
//!   index that takes in a create, or an update's new email or phone, only this long after it
//!   was applied (until then an updated contact is found by its old values); a delete leaves
//!   it at once. The rule that refuses a duplicate create (400 "This location does not allow
//!   duplicated contacts.") and upsert's matching read the primary state and see every
//!   applied write at once; so do the listing and per-contact reads: the real listing is also
//!   index-backed, but a lagging listing would only slow the export tests down without
//!   catching anything the duplicate search does not.
//! - **Duplicates allowed** ([`SimConfig::allow_duplicates`]): no duplicate 400 at all; the
//!   duplicate search answers the oldest matching contact (by `dateAdded`; the real API does
//!   not document which one it answers), and upsert updates that one.
//! - `GET /locations/:locationId` serves the location's `country` ([`SimConfig::country`]),
//!   timezone and duplicate setting.
//! - **Churn** ([`SimConfig::churn`]): contacts edited, deleted and created while a client
//!   pages, every so many listing pages, for the client's paging guards (a cursor listing
//!   loses no unchanged contact; offset paging of tasks can miss or repeat rows).
//!
//! # Scopes
//! Every route needs the scope the API's spec names for it (`contacts.readonly` for contact
//! reads and the search, `contacts.write` for writes, `locations.readonly`,
//! `locations/customFields.readonly`, ...; see `Kind::scope` in `routes`); a token without
//! it gets 401 "The token is not authorized for this scope.", before the rate limit counts
//! the request. Static bearer tokens hold [`SimConfig::scopes`] (all by default), OAuth
//! tokens the scopes they were granted, so a client's fallback for a missing scope can be
//! tested either way.

mod faults;
mod gen;
mod http;
mod limit;
mod model;
mod mutate;
mod oauth;
mod read;
mod rng;
mod routes;
mod search;
mod store;
mod webhooks;
mod wide;
mod write;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_webhooks;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Kind;
pub use limit::LocationTraffic;
pub use oauth::SimOAuth;
use store::{read as read_lock, Location, Store};
pub use webhooks::{rsa_key_pkcs8, EmittedEvent, WebhookConfig, WebhookKeyError, WebhookStats};

/// What the simulator serves and how strictly. Build it with `..SimConfig::default()`: fields
/// get added.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Location ids served; any other id gets 403.
    pub locations: Vec<String>,
    /// Contacts per location.
    pub contacts: usize,
    /// Seed of all generated data and of fault draws.
    pub seed: u64,
    /// Businesses per location; about one contact in three belongs to one.
    pub businesses: usize,
    /// Per token and location: at most this many requests per interval; `None` turns the
    /// limit off.
    pub rate_limit: Option<(u32, Duration)>,
    /// Per token and location, per day; `None` turns the quota off.
    pub daily_quota: Option<u64>,
    pub faults: Faults,
    /// Largest `limit` honoured on `GET /contacts/`.
    pub max_page: usize,
    /// The OAuth app and token lifetimes; off by default (any bearer token is accepted).
    pub oauth: SimOAuth,
    /// Each write is applied after a delay drawn (seeded, uniform) from this range, even if
    /// its client has gone; zero (the default) applies writes at once.
    pub write_latency: RangeInclusive<Duration>,
    /// The duplicate search sees a write only this long after it was applied; zero (the
    /// default) sees it at once.
    pub search_lag: Duration,
    /// Whether the locations allow duplicate contacts (default: no, creates of an existing
    /// email or phone are refused with 400).
    pub allow_duplicates: bool,
    /// The locations' country (ISO 3166 alpha-2) served by `GET /locations/:id`.
    pub country: String,
    /// The scopes every static bearer token holds (e.g. `contacts.readonly`); `None` (the
    /// default) holds every scope. A route whose scope the token lacks answers 401. OAuth
    /// tokens hold what they were granted instead.
    pub scopes: Option<Vec<String>>,
    /// Writes while a client pages (see [`Churn`]); `None` (the default): none.
    pub churn: Option<Churn>,
    /// Signed webhooks for every applied write, to a receiver (see `webhooks`); `None` (the
    /// default): none are sent.
    pub webhooks: Option<WebhookConfig>,
}

/// Writes during a run, so that a client's paging guards meet what they guard against:
/// after every `every` listing pages served (`GET /contacts/`, `POST /contacts/search`, the
/// task search, calendar events; counted over all locations), the location of that page
/// gets `update` contacts edited (`dateUpdated` moves to now, `city` and a tag change),
/// `delete` deleted and `create` created. [`Sim::churned`] tells which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Churn {
    pub every: u64,
    pub update: usize,
    pub delete: usize,
    pub create: usize,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            locations: vec!["demoLocation00000001".into()],
            contacts: 5_000,
            seed: 42,
            businesses: 20,
            rate_limit: Some((100, Duration::from_secs(10))),
            daily_quota: Some(200_000),
            faults: Faults::default(),
            max_page: 100,
            oauth: SimOAuth::default(),
            write_latency: Duration::ZERO..=Duration::ZERO,
            search_lag: Duration::ZERO,
            allow_duplicates: false,
            country: "US".into(),
            scopes: None,
            churn: None,
            webhooks: None,
        }
    }
}

/// Shares (0..1) of requests that fail in each way. Error, truncate and drop exclude each
/// other; slow combines with any of them.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answered 500/502/503/504 with a JSON error body, without serving the request.
    pub error_rate: f64,
    /// Answered 200 with the JSON body cut part-way (`Content-Length` matches the cut body).
    pub truncate_rate: f64,
    /// Delayed by `slow_delay` before being answered.
    pub slow_rate: f64,
    pub slow_delay: Duration,
    /// The connection breaks after the headers and part of the body.
    pub drop_rate: f64,
    /// Successful writes that are applied but answered 502.
    pub ambiguous_write_rate: f64,
    /// Share of child list requests (`GET /contacts/:id/tasks|notes|appointments`) answered
    /// 403 for good. Chosen per contact id, entity and seed (not per draw), so a rerun or a
    /// resume meets the same refusals; see [`Sim::refuses_child`].
    pub child_refusal_rate: f64,
}

/// Counters since start, also served at `GET /_sim/stats`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SimStats {
    /// API requests received (not counting `/_sim/`).
    pub requests: u64,
    /// Requests per route, e.g. `"GET /contacts/:id/tasks"`.
    pub by_route: BTreeMap<String, u64>,
    /// Requests answered 429 for the burst limit.
    pub rate_limited: u64,
    /// Requests answered 429 for the daily quota.
    pub quota_exceeded: u64,
    /// Requests that got a fault (error, truncation, drop, delay or ambiguous write).
    pub faults_injected: u64,
    /// The most requests accepted for one token at one location within any sliding window of
    /// the rate-limit interval (10 s when the limit is off): a well-paced client keeps it at
    /// or below the max.
    pub max_in_window: u64,
    /// Writes accepted but not applied yet (only with a write latency).
    pub writes_in_flight: u64,
    /// Writes applied after their client had gone (disconnected or timed out).
    pub writes_abandoned: u64,
    /// Per location: requests accepted and the seconds from the first to the last (the
    /// agency bench's share of each location's limit, as the server sees it).
    pub by_location: BTreeMap<String, LocationTraffic>,
    /// Webhook deliveries, when [`SimConfig::webhooks`] is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhookStats>,
}

/// The simulator's shared state; serve it with [`serve`].
pub struct Sim {
    config: SimConfig,
    store: Store,
    limiter: limit::Limiter,
    faults: faults::Injector,
    counters: Counters,
    /// Numbers trace ids and the ids of created children.
    serial: AtomicU64,
    oauth: oauth::OAuthState,
    /// Numbers write-latency draws.
    latency_draws: AtomicU64,
    /// Woken when the last write in flight has been applied.
    idle: tokio::sync::Notify,
    /// Listing pages served, for [`SimConfig::churn`].
    listing_pages: AtomicU64,
    /// Ids touched by churn so far.
    churned: std::sync::Mutex<BTreeSet<String>>,
    /// The webhook sender, when [`SimConfig::webhooks`] is set.
    webhooks: Option<webhooks::Webhooks>,
}

struct Counters {
    requests: AtomicU64,
    by_route: [AtomicU64; Kind::COUNT],
    rate_limited: AtomicU64,
    quota_exceeded: AtomicU64,
    faults: AtomicU64,
    writes_in_flight: AtomicU64,
    writes_abandoned: AtomicU64,
}

// Not derived: `Default` stops at arrays of 32.
impl Default for Counters {
    fn default() -> Counters {
        Counters {
            requests: AtomicU64::default(),
            by_route: std::array::from_fn(|_| AtomicU64::default()),
            rate_limited: AtomicU64::default(),
            quota_exceeded: AtomicU64::default(),
            faults: AtomicU64::default(),
            writes_in_flight: AtomicU64::default(),
            writes_abandoned: AtomicU64::default(),
        }
    }
}

/// One write between being accepted and being applied; dropping it (also on a panic) marks
/// it done.
struct InFlight {
    sim: Arc<Sim>,
}

impl InFlight {
    fn start(sim: Arc<Sim>) -> InFlight {
        sim.counters.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight { sim }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self
            .sim
            .counters
            .writes_in_flight
            .fetch_sub(1, Ordering::SeqCst)
            == 1
        {
            self.sim.idle.notify_waiters();
        }
    }
}

impl Sim {
    /// Builds the listing index of every location (sorting `contacts` timestamps each).
    pub fn new(config: SimConfig) -> Arc<Sim> {
        let codec = rng::IdCodec::new(config.seed);
        let locations = config
            .locations
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let gen = gen::LocationGen::new(config.seed, i as u32, id, config.businesses);
                Location::new(gen, config.contacts).with_search_lag(config.search_lag)
            })
            .collect();
        Arc::new(Sim {
            store: Store::new(locations, codec),
            limiter: limit::Limiter::new(config.rate_limit, config.daily_quota),
            faults: faults::Injector::new(config.faults.clone(), config.seed),
            counters: Counters::default(),
            serial: AtomicU64::new(0),
            oauth: oauth::OAuthState::default(),
            latency_draws: AtomicU64::new(0),
            idle: tokio::sync::Notify::new(),
            listing_pages: AtomicU64::new(0),
            churned: std::sync::Mutex::default(),
            webhooks: config.webhooks.as_ref().and_then(|w| {
                webhooks::Webhooks::new(w, config.seed)
                    .map_err(|e| tracing::error!("webhooks are off: {e}"))
                    .ok()
            }),
            config,
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            requests: get(&c.requests),
            by_route: Kind::ALL
                .iter()
                .zip(&c.by_route)
                .filter(|(_, n)| get(n) > 0)
                .map(|(k, n)| (k.name().to_string(), get(n)))
                .collect(),
            rate_limited: get(&c.rate_limited),
            quota_exceeded: get(&c.quota_exceeded),
            faults_injected: get(&c.faults),
            max_in_window: self.limiter.max_in_window(),
            writes_in_flight: get(&c.writes_in_flight),
            writes_abandoned: get(&c.writes_abandoned),
            by_location: self.limiter.by_location(),
            webhooks: self.webhooks.as_ref().map(webhooks::Webhooks::stats),
        }
    }

    /// The public key that verifies `X-GHL-Signature`, as a SubjectPublicKeyInfo PEM
    /// (`-----BEGIN PUBLIC KEY-----`). Derived from [`SimConfig::seed`]: the same for every
    /// simulator with that seed, whether or not it sends webhooks.
    pub fn webhook_public_key_pem(&self) -> String {
        webhooks::public_key_pem(self.config.seed)
    }

    /// Webhook counters (all zero without [`SimConfig::webhooks`]).
    pub fn webhook_stats(&self) -> WebhookStats {
        self.webhooks
            .as_ref()
            .map(webhooks::Webhooks::stats)
            .unwrap_or_default()
    }

    /// Returns once every write accepted so far has been applied ([`Sim::settle`]) and every
    /// event emitted has been acknowledged, including the redeliveries after lost
    /// acknowledgements: nothing more will be sent until the next write. Waits for ever while
    /// the receiver is down. Returns at once without webhooks.
    pub async fn webhooks_settled(&self) {
        self.settle().await;
        if let Some(w) = &self.webhooks {
            w.settled().await;
        }
    }

    /// Returns once at least `n` events have been acknowledged (at once without webhooks):
    /// a test acts at a point of the webhook stream's own progress, e.g. kills its receiver.
    pub async fn webhooks_acknowledged(&self, n: u64) {
        if let Some(w) = &self.webhooks {
            w.acknowledged(n).await;
        }
    }

    /// Test truth: every event emitted so far, in emit order.
    pub fn emitted_events(&self) -> Vec<EmittedEvent> {
        self.webhooks
            .as_ref()
            .map(webhooks::Webhooks::emitted)
            .unwrap_or_default()
    }

    /// The webhook sender, if any: write handlers emit through it.
    pub(crate) fn hooks(&self) -> Option<&webhooks::Webhooks> {
        self.webhooks.as_ref()
    }

    /// Writes accepted but not applied yet.
    pub fn writes_in_flight(&self) -> u64 {
        self.counters.writes_in_flight.load(Ordering::SeqCst)
    }

    /// Returns once no write is in flight: every write the simulator accepted so far has been
    /// applied, whether or not its client is still there. Tests call it after killing a
    /// client and before comparing the simulator's contacts with what they expect.
    pub async fn settle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.writes_in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The next write's latency: uniform in [`SimConfig::write_latency`], numbered draws.
    fn write_delay(&self) -> Duration {
        let (lo, hi) = (
            *self.config.write_latency.start(),
            *self.config.write_latency.end(),
        );
        if hi <= lo {
            return hi;
        }
        let n = self.latency_draws.fetch_add(1, Ordering::Relaxed);
        let mut r = rng::Rng::new(rng::hash(&[self.config.seed, 91, n]));
        let span = i64::try_from((hi - lo).as_micros())
            .unwrap_or(i64::MAX)
            .min(i64::MAX - 1);
        lo + Duration::from_micros(r.range(0, span).unsigned_abs())
    }

    /// Starts a new day for every token's quota.
    pub fn reset_daily_quota(&self) {
        self.limiter.reset_daily();
    }

    /// Moves the OAuth clock forward: issued access tokens get closer to expiry.
    pub fn oauth_advance(&self, by: Duration) {
        self.oauth
            .advance(i64::try_from(by.as_secs()).unwrap_or(i64::MAX / 4));
    }

    /// Expires every access token issued so far (a revocation); refresh tokens stay valid.
    pub fn oauth_expire_access_tokens(&self) {
        self.oauth.expire_access_tokens();
    }

    /// The OAuth clock, in epoch seconds.
    pub fn oauth_now(&self) -> i64 {
        self.oauth.now()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.faults.set(faults);
    }

    /// Test truth: whether `GET /contacts/<contact_id>/<entity>` (`tasks`, `notes` or
    /// `appointments`) is refused with 403 under the current `child_refusal_rate`.
    pub fn refuses_child(&self, contact_id: &str, entity: &str) -> bool {
        self.faults.refuses_child(contact_id, entity)
    }

    /// Test truth: the exact JSON objects `GET /contacts/` serves for this location, in
    /// listing order, including writes. Empty for an unknown location.
    pub fn contacts(&self, location_id: &str) -> Vec<serde_json::Value> {
        let Some(lock) = self.store.location(location_id) else {
            return Vec::new();
        };
        let l = read_lock(lock);
        l.listing()
            .iter()
            .map(|&s| as_served(&*l.contact(s)))
            .collect()
    }

    /// Test truth: what `GET /contacts/:id/tasks` serves in `tasks` (empty if no such contact).
    pub fn tasks(&self, contact_id: &str) -> Vec<serde_json::Value> {
        self.children(contact_id, |c| c.tasks.iter().map(as_served).collect())
    }

    /// Test truth: what `GET /contacts/:id/notes` serves in `notes`.
    pub fn notes(&self, contact_id: &str) -> Vec<serde_json::Value> {
        self.children(contact_id, |c| c.notes.iter().map(as_served).collect())
    }

    /// Test truth: what `GET /contacts/:id/appointments` serves in `events`.
    pub fn appointments(&self, contact_id: &str) -> Vec<serde_json::Value> {
        self.children(contact_id, |c| c.events.iter().map(as_served).collect())
    }

    fn children(
        &self,
        contact_id: &str,
        f: impl FnOnce(&model::Children) -> Vec<serde_json::Value>,
    ) -> Vec<serde_json::Value> {
        let Some((lock, slot)) = self.store.locate(contact_id) else {
            return Vec::new();
        };
        let l = read_lock(lock);
        if !l.exists(slot) {
            return Vec::new();
        }
        f(&l.children(slot))
    }

    /// Edits `share` (0..1) of a location's contacts as a real edit would (dateUpdated moves
    /// to now, `city` and a tag change) and deletes `deleted` other contacts, chosen from
    /// `seed`. Returns (changed ids, deleted ids), for incremental-export tests.
    pub fn mutate(
        &self,
        location_id: &str,
        share: f64,
        deleted: usize,
        seed: u64,
    ) -> (Vec<String>, Vec<String>) {
        match self.store.location(location_id) {
            Some(lock) => {
                mutate::mutate(&mut store::write(lock), share, deleted, seed, self.hooks())
            }
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Test truth: the ids of the contacts churn edited, deleted or created so far.
    pub fn churned(&self) -> BTreeSet<String> {
        self.churned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts a listing page served from `location_id` and, when [`SimConfig::churn`] is
    /// due, applies a round of it to that location (after the page was built).
    fn page_served(&self, location_id: &str) {
        let Some(churn) = self.config.churn.filter(|c| c.every > 0) else {
            return;
        };
        let served = self.listing_pages.fetch_add(1, Ordering::SeqCst) + 1;
        if !served.is_multiple_of(churn.every) {
            return;
        }
        let Some(lock) = self.store.location(location_id) else {
            return;
        };
        let touched = mutate::churn(
            &mut store::write(lock),
            churn,
            self.config.seed,
            served / churn.every,
            self.hooks(),
        );
        self.churned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(touched);
    }

    fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh trace id, formatted like a UUID.
    fn trace_id(&self) -> String {
        let h = rng::hex_id(rng::hash(&[self.config.seed, 98, self.next_serial()]), 32);
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }

    /// A fresh 20-character id for a created task or note.
    fn new_child_id(&self) -> String {
        rng::opaque_id(rng::hash(&[self.config.seed, 97, self.next_serial()]))
    }
}

/// A record as a client sees it: serialised, then parsed back.
fn as_served<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_vec(v)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Milliseconds since the epoch, now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Serves the API on a bound listener until `shutdown` resolves. Tests bind `127.0.0.1:0`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Arc<Sim>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().fallback(routes::handle).with_state(sim);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
