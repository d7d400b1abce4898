//! Signed webhooks for the simulator's own writes, as HighLevel sends them to an app's URL,
//! so that a receiver (`contacts-etl listen`) and event-driven exports can be tested end to
//! end against the simulator ([`super::SimConfig::webhooks`]; off by default).
//!
//! # What is sent
//! When a write is applied (after the write latency, whether or not its client is still
//! there; also the writes of [`super::Sim::mutate`] and of churn), the handler that applied
//! it emits one event: a compact JSON object whose first fields are `type`, `locationId`,
//! `webhookId` and `timestamp` (the apply time, ISO 8601 UTC with milliseconds), followed by
//! the record's fields as the API serves them, in the served order: the contact for
//! `Contact*` events (`id` is the contact id; the contact's own `type`, lead or customer,
//! gives way to the event's), the task or note for `Task*` and `Note*` events (`id` is the
//! task or note id, `contactId` its contact). A delete carries the record as it was just
//! before. Which writes send which type: see [`EventType`].
//!
//! The `webhookId` is unique per event, also across simulator runs with the same seed (it
//! hashes the seed, a per-instance nonce and the event's serial), because a receiver kept
//! across two runs would otherwise take the second run's events for replays and drop them.
//!
//! # Signatures
//! `X-GHL-Signature` is the standard base64 of the Ed25519 signature over the exact body
//! bytes, with a key derived from [`super::SimConfig::seed`] (so a test, or a second process
//! started with the same seed, knows the public key: [`super::Sim::webhook_public_key_pem`]
//! serves it as a SubjectPublicKeyInfo PEM). With [`WebhookConfig::rsa_key_pkcs8`] set, the
//! legacy `X-WH-Signature` (RSASSA-PKCS1-v1_5, SHA-256) is sent too. Both are computed once
//! per event, so every redelivery and duplicate carries the same body and the same headers.
//!
//! # Delivery
//! Events go through an unbounded channel (emitting happens under a location's write lock
//! and must never wait) to a dispatcher task that spawns one task per event; each POST
//! attempt holds one of [`MAX_IN_FLIGHT`] permits, so a fast receiver gets many events at
//! once while a dead one costs a few sockets. HighLevel's sender retries, so this one does:
//! a non-2xx answer or a connection error is retried with the same body after a backoff
//! (50 ms doubling to at most 2 s, no jitter so that runs are comparable), without limit,
//! until acknowledged or the simulator is dropped. This is not the client's retry policy
//! (`crate::api::retry`): it is the simulated sender's, and it must never give up. Two seeded
//! draws make a receiver meet what the real sender does: [`WebhookConfig::duplicate_rate`]
//! of events are sent twice at the same time, and [`WebhookConfig::redelivery_rate`] of
//! acknowledged deliveries are delivered again anyway (the acknowledgement was lost). The
//! draws are functions of the seed and the event's serial, so a run with the same writes in
//! the same order repeats the same ones.
//!
//! The dispatcher starts on the first event emitted inside a tokio runtime (or at
//! [`super::Sim::webhooks_settled`]), so a simulator built outside one still works. Dropping
//! the simulator ends every delivery.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use ring::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use super::rng::{hash, hex_id, Rng};

/// POST attempts in flight at once, over all events.
pub(crate) const MAX_IN_FLIGHT: usize = 16;
/// The first wait before a redelivery; it doubles after each failure, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// One delivery attempt gives up (and counts as a failure) after this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how the simulator sends webhooks ([`super::SimConfig::webhooks`]).
#[derive(Clone)]
pub struct WebhookConfig {
    /// The receiver's URL (`http://` or `https://`); every event is POSTed to it.
    pub url: String,
    /// A PKCS#8 DER RSA private key (2048 bits or more): when set, deliveries also carry the
    /// legacy `X-WH-Signature`. [`rsa_key_pkcs8`] reads one from DER or PEM.
    pub rsa_key_pkcs8: Option<Vec<u8>>,
    /// Share (0..1) of deliveries answered 2xx that are delivered again anyway, as after a
    /// lost acknowledgement.
    pub redelivery_rate: f64,
    /// Share (0..1) of events sent twice at the same time.
    pub duplicate_rate: f64,
}

impl WebhookConfig {
    /// Webhooks to `url`, Ed25519 only, no redeliveries or duplicates but on failure.
    pub fn new(url: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            rsa_key_pkcs8: None,
            redelivery_rate: 0.0,
            duplicate_rate: 0.0,
        }
    }
}

// Not derived: the private key must never reach a log.
impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field(
                "rsa_key_pkcs8",
                &self.rsa_key_pkcs8.as_ref().map(|_| "<redacted>"),
            )
            .field("redelivery_rate", &self.redelivery_rate)
            .field("duplicate_rate", &self.duplicate_rate)
            .finish()
    }
}

/// Webhook counters since start ([`super::Sim::webhook_stats`], `GET /_sim/stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    /// Events emitted (one per applied write).
    pub emitted: u64,
    /// POST attempts made, of every copy of every event.
    pub deliveries: u64,
    /// Events answered 2xx at least once.
    pub acknowledged_events: u64,
    /// Attempts after the first of a copy: after a failure, or after a lost acknowledgement.
    pub redeliveries: u64,
    /// Events sent twice at the same time ([`WebhookConfig::duplicate_rate`]).
    pub duplicates: u64,
    /// Attempts answered non-2xx, or that failed to connect or timed out.
    pub failures: u64,
}

/// One event the simulator emitted, as a test compares it with what a receiver stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmittedEvent {
    pub webhook_id: String,
    /// The event `type`, e.g. `ContactUpdate`.
    pub kind: String,
    pub location_id: String,
    /// The record's `id`: the contact's for `Contact*` events, else the task's or note's.
    pub record_id: Option<String>,
    /// The contact the record belongs to (for `Contact*` events, the record itself).
    pub contact_id: Option<String>,
    /// The body's `timestamp`, in epoch milliseconds.
    pub timestamp_ms: i64,
    /// Whether some delivery of it was answered 2xx.
    pub acknowledged: bool,
}

/// The event types the simulator sends, and the writes that send them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    /// `POST /contacts/`, an upsert that created, a contact created by churn.
    ContactCreate,
    /// `PUT /contacts/:id` (but a DND-only one), an upsert that updated, a mutate or churn
    /// edit.
    ContactUpdate,
    /// `DELETE /contacts/:id`, a mutate or churn deletion.
    ContactDelete,
    /// `POST` and `DELETE /contacts/:id/tags`.
    ContactTagUpdate,
    /// `PUT /contacts/:id` whose body holds only `dnd`, `dndSettings`, `inboundDndSettings`.
    ContactDndUpdate,
    NoteCreate,
    NoteUpdate,
    NoteDelete,
    TaskCreate,
    /// A task update or completion route that leaves the task completed.
    TaskComplete,
    /// Any other task update (not among HighLevel's documented types, sent so that an
    /// event-driven export misses no change; receivers store unknown types as they come).
    TaskUpdate,
    TaskDelete,
}

impl EventType {
    pub(crate) fn name(self) -> &'static str {
        match self {
            EventType::ContactCreate => "ContactCreate",
            EventType::ContactUpdate => "ContactUpdate",
            EventType::ContactDelete => "ContactDelete",
            EventType::ContactTagUpdate => "ContactTagUpdate",
            EventType::ContactDndUpdate => "ContactDndUpdate",
            EventType::NoteCreate => "NoteCreate",
            EventType::NoteUpdate => "NoteUpdate",
            EventType::NoteDelete => "NoteDelete",
            EventType::TaskCreate => "TaskCreate",
            EventType::TaskComplete => "TaskComplete",
            EventType::TaskUpdate => "TaskUpdate",
            EventType::TaskDelete => "TaskDelete",
        }
    }

    fn is_contact(self) -> bool {
        matches!(
            self,
            EventType::ContactCreate
                | EventType::ContactUpdate
                | EventType::ContactDelete
                | EventType::ContactTagUpdate
                | EventType::ContactDndUpdate
        )
    }
}

/// Why a `--webhook-rsa-key` file cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum WebhookKeyError {
    #[error("the RSA key is PKCS#1 ('BEGIN RSA PRIVATE KEY'), not PKCS#8\nhint: convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -outform DER -out KEY.pk8.der`")]
    Pkcs1,
    #[error("the PEM block '-----BEGIN PRIVATE KEY-----' is not valid base64")]
    BadPem,
    #[error("not a usable PKCS#8 RSA private key of 2048 to 8192 bits ({0})\nhint: make one with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -outform DER -out KEY.pk8.der`")]
    Rejected(String),
}

/// The PKCS#8 DER of an RSA private key given as DER or as a PEM `PRIVATE KEY` block,
/// checked to be one `ring` signs with.
pub fn rsa_key_pkcs8(file: &[u8]) -> Result<Vec<u8>, WebhookKeyError> {
    let text = std::str::from_utf8(file).ok();
    let der = match text {
        Some(t) if t.contains("-----BEGIN RSA PRIVATE KEY-----") => {
            return Err(WebhookKeyError::Pkcs1)
        }
        Some(t) if t.contains("-----BEGIN PRIVATE KEY-----") => {
            pem_block(t, "PRIVATE KEY").ok_or(WebhookKeyError::BadPem)?
        }
        _ => file.to_vec(),
    };
    RsaKeyPair::from_pkcs8(&der)
        .map_err(|e| WebhookKeyError::Rejected(e.to_string()))
        .map(|_| der)
}

/// The base64 body of the first `-----BEGIN <label>-----` block, decoded.
fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let len = text.get(start..)?.find(&end)?;
    let b64: String = text
        .get(start..start + len)?
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// The simulator's Ed25519 webhook key: a pure function of the seed.
fn signing_key(seed: u64) -> Ed25519KeyPair {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&hash(&[seed, 100, i as u64]).to_le_bytes());
    }
    Ed25519KeyPair::from_seed_unchecked(&bytes)
        .expect("any 32 bytes are an Ed25519 seed: ring checks only the length")
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (no unused bits) }, followed by the 32 raw key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// `-----BEGIN PUBLIC KEY-----` PEM of the seed's Ed25519 key (SubjectPublicKeyInfo).
pub(crate) fn public_key_pem(seed: u64) -> String {
    let key = signing_key(seed);
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key.public_key().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// The record's top-level fields in served order, each value as its JSON text.
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Fields, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, Box<RawValue>>()? {
                    out.push(entry);
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Fields {
    fn str(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
    }
}

/// The event's own fields; a record field of the same name gives way.
const EVENT_FIELDS: [&str; 4] = ["type", "locationId", "webhookId", "timestamp"];

/// The delivery body: the event fields first, then the record's.
fn body(ty: EventType, location_id: &str, webhook_id: &str, ts_ms: i64, record: &Fields) -> Bytes {
    let mut out = Vec::with_capacity(
        256 + record
            .0
            .iter()
            .map(|(_, v)| v.get().len() + 24)
            .sum::<usize>(),
    );
    /// `{"key":"value"` or `,"key":"value"`.
    fn field(out: &mut Vec<u8>, key: &str, value: &str) {
        out.push(if out.is_empty() { b'{' } else { b',' });
        // Serialising a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, key);
        out.push(b':');
        let _ = serde_json::to_writer(&mut *out, value);
    }
    field(&mut out, "type", ty.name());
    field(&mut out, "locationId", location_id);
    field(&mut out, "webhookId", webhook_id);
    let timestamp = crate::timefmt::format_iso_millis(ts_ms);
    field(&mut out, "timestamp", &timestamp);
    for (k, v) in &record.0 {
        if EVENT_FIELDS.contains(&k.as_str()) {
            continue;
        }
        out.push(b',');
        let _ = serde_json::to_writer(&mut out, k);
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    out.push(b'}');
    Bytes::from(out)
}

/// A `webhookId`: 32 hex digits in UUID groups.
fn webhook_id(seed: u64, nonce: u64, serial: u64) -> String {
    let h = format!(
        "{:016x}{}",
        hash(&[seed, nonce, 94, serial]),
        hex_id(hash(&[seed, nonce, 95, serial]), 16)
    );
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// One event on its way to the dispatcher.
struct Outgoing {
    /// Its place in [`Shared::log`] (also its serial).
    serial: u64,
    body: Bytes,
    duplicate: bool,
}

/// The signed request of one event, the same for every attempt.
struct Signed {
    body: Bytes,
    ed25519: HeaderValue,
    rsa: Option<HeaderValue>,
}

/// What the delivery tasks share with the simulator.
struct Shared {
    url: String,
    client: reqwest::Client,
    seed: u64,
    redelivery_rate: f64,
    ed25519: Ed25519KeyPair,
    rsa: Option<RsaKeyPair>,
    slots: Semaphore,
    counters: Counters,
    log: Mutex<Vec<EmittedEvent>>,
    /// Event tasks not finished (queued, delivering, or redelivering after a lost ack).
    pending: AtomicU64,
    /// Woken when `pending` drops to zero.
    idle: Notify,
    /// Woken at each event's first acknowledgement.
    acked: Notify,
}

#[derive(Default)]
struct Counters {
    emitted: AtomicU64,
    deliveries: AtomicU64,
    acknowledged_events: AtomicU64,
    redeliveries: AtomicU64,
    duplicates: AtomicU64,
    failures: AtomicU64,
}

/// The simulator's webhook sender (one per [`super::Sim`] with webhooks configured).
pub(crate) struct Webhooks {
    shared: Arc<Shared>,
    duplicate_rate: f64,
    nonce: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Taken by the dispatcher when it starts.
    rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    started: AtomicBool,
    /// Dropped with the simulator: every delivery task stops then.
    stop: watch::Sender<()>,
}

impl Webhooks {
    /// The sender for `config`; `Err` says why it cannot send (no HTTP client). An unusable
    /// RSA key is left out with a warning ([`rsa_key_pkcs8`] checks one beforehand).
    pub(crate) fn new(config: &WebhookConfig, seed: u64) -> Result<Webhooks, String> {
        let rsa = config
            .rsa_key_pkcs8
            .as_ref()
            .and_then(|der| match RsaKeyPair::from_pkcs8(der) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::warn!(
                        "the webhook RSA key is unusable ({e}): X-WH-Signature is left out"
                    );
                    None
                }
            });
        // An https URL needs a TLS provider; reqwest is built without one (see api::transport).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("contacts-etl-sim-webhooks")
            .build()
            .map_err(|e| format!("cannot build the webhook HTTP client: {e}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Webhooks {
            shared: Arc::new(Shared {
                url: config.url.clone(),
                client,
                seed,
                redelivery_rate: config.redelivery_rate,
                ed25519: signing_key(seed),
                rsa,
                slots: Semaphore::new(MAX_IN_FLIGHT),
                counters: Counters::default(),
                log: Mutex::default(),
                pending: AtomicU64::new(0),
                idle: Notify::new(),
                acked: Notify::new(),
            }),
            duplicate_rate: config.duplicate_rate,
            nonce,
            tx,
            rx: Mutex::new(Some(rx)),
            started: AtomicBool::new(false),
            stop: watch::channel(()).0,
        })
    }

    /// Emits the event of an applied write: `record` is what the API serves for it (the
    /// contact, task or note). Called under the location's write lock: never waits.
    pub(crate) fn emit<T: Serialize + ?Sized>(&self, ty: EventType, location_id: &str, record: &T) {
        let fields = serde_json::to_vec(record)
            .ok()
            .and_then(|b| serde_json::from_slice::<Fields>(&b).ok())
            .unwrap_or(Fields(Vec::new()));
        let s = &self.shared;
        let record_id = fields.str("id");
        let contact_id = if ty.is_contact() {
            record_id.clone()
        } else {
            fields.str("contactId")
        };
        // The serial is the event's index in the log: take both under the log's lock.
        let (serial, body) = {
            let mut log = s.log.lock().unwrap_or_else(PoisonError::into_inner);
            let serial = log.len() as u64;
            let ts_ms = super::now_ms();
            let webhook_id = webhook_id(s.seed, self.nonce, serial);
            let body = body(ty, location_id, &webhook_id, ts_ms, &fields);
            log.push(EmittedEvent {
                webhook_id,
                kind: ty.name().to_string(),
                location_id: location_id.to_string(),
                record_id,
                contact_id,
                timestamp_ms: ts_ms,
                acknowledged: false,
            });
            (serial, body)
        };
        let duplicate = Rng::new(hash(&[s.seed, 95, serial])).chance(self.duplicate_rate);
        s.counters.emitted.fetch_add(1, Ordering::Relaxed);
        s.pending.fetch_add(1, Ordering::SeqCst);
        // Cannot fail while `self` holds the receiver or the dispatcher runs.
        let _ = self.tx.send(Outgoing {
            serial,
            body,
            duplicate,
        });
        self.ensure_started();
    }

    /// Starts the dispatcher if it is not running and a tokio runtime is at hand.
    fn ensure_started(&self) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(rx) = self
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        self.started.store(true, Ordering::Release);
        runtime.spawn(dispatch(self.shared.clone(), rx, self.stop.subscribe()));
    }

    pub(crate) fn stats(&self) -> WebhookStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        WebhookStats {
            emitted: get(&c.emitted),
            deliveries: get(&c.deliveries),
            acknowledged_events: get(&c.acknowledged_events),
            redeliveries: get(&c.redeliveries),
            duplicates: get(&c.duplicates),
            failures: get(&c.failures),
        }
    }

    pub(crate) fn emitted(&self) -> Vec<EmittedEvent> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns once at least `n` events have been acknowledged.
    pub(crate) async fn acknowledged(&self, n: u64) {
        self.ensure_started();
        let s = &self.shared;
        loop {
            let acked = s.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if s.counters.acknowledged_events.load(Ordering::SeqCst) >= n {
                return;
            }
            acked.await;
        }
    }

    /// Returns once no event is pending: each was acknowledged, and each redelivery after a
    /// lost acknowledgement was acknowledged too.
    pub(crate) async fn settled(&self) {
        self.ensure_started();
        let s = &self.shared;
        loop {
            let idle = s.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if s.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Hands each event to a task of its own until the simulator is dropped.
async fn dispatch(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    stop: watch::Receiver<()>,
) {
    while let Some(event) = rx.recv().await {
        let shared = shared.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _done = Done(&shared);
            tokio::select! {
                // Resolves only when the sender is dropped, with the simulator.
                _ = stop.changed() => {}
                () = shared.deliver(event) => {}
            }
        });
    }
}

/// Marks an event task finished, however it ends.
struct Done<'a>(&'a Shared);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Shared {
    /// Signs `event` once, then delivers its copies (two for a duplicate) until each is
    /// acknowledged.
    async fn deliver(&self, event: Outgoing) {
        let signed = self.sign(event.body);
        if event.duplicate {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            futures::join!(
                self.deliver_copy(event.serial, 0, &signed),
                self.deliver_copy(event.serial, 1, &signed)
            );
        } else {
            self.deliver_copy(event.serial, 0, &signed).await;
        }
    }

    fn sign(&self, body: Bytes) -> Signed {
        let b64 = |sig: &[u8]| {
            HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(sig))
                .expect("base64 is a valid header value")
        };
        let ed25519 = b64(self.ed25519.sign(&body).as_ref());
        let rsa = self.rsa.as_ref().and_then(|key| {
            let mut sig = vec![0u8; key.public().modulus_len()];
            let rng = ring::rand::SystemRandom::new();
            match key.sign(&RSA_PKCS1_SHA256, &rng, &body, &mut sig) {
                Ok(()) => Some(b64(&sig)),
                Err(_) => {
                    tracing::warn!("webhook RSA signing failed; X-WH-Signature left out");
                    None
                }
            }
        });
        Signed { body, ed25519, rsa }
    }

    /// Delivers one copy until it is acknowledged and no lost acknowledgement is drawn.
    async fn deliver_copy(&self, serial: u64, copy: u64, signed: &Signed) {
        let c = &self.counters;
        let mut wait = FIRST_BACKOFF;
        for attempt in 0u64.. {
            if attempt > 0 {
                c.redeliveries.fetch_add(1, Ordering::Relaxed);
            }
            let ok = self.post(signed).await;
            c.deliveries.fetch_add(1, Ordering::Relaxed);
            if ok {
                self.acknowledge(serial);
                let lost = Rng::new(hash(&[self.seed, 96, serial, copy, attempt]))
                    .chance(self.redelivery_rate);
                if !lost {
                    return;
                }
                wait = FIRST_BACKOFF;
                tokio::time::sleep(wait).await;
            } else {
                c.failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// One POST; true when answered 2xx.
    async fn post(&self, signed: &Signed) -> bool {
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        let mut req = self
            .client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header("x-ghl-signature", signed.ed25519.clone())
            .body(signed.body.clone());
        if let Some(rsa) = &signed.rsa {
            req = req.header("x-wh-signature", rsa.clone());
        }
        match req.send().await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                // Read the (small) answer so the connection goes back to the pool.
                let _ = resp.bytes().await;
                ok
            }
            Err(_) => false,
        }
    }

    fn acknowledge(&self, serial: u64) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = usize::try_from(serial).ok().and_then(|i| log.get_mut(i));
        if let Some(e) = entry.filter(|e| !e.acknowledged) {
            e.acknowledged = true;
            self.counters
                .acknowledged_events
                .fetch_add(1, Ordering::SeqCst);
            self.acked.notify_waiters();
        }
    }
}
