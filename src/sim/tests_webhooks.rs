//! Webhook tests: the simulator on 127.0.0.1:0 takes writes over HTTP, and a small axum
//! receiver on 127.0.0.1:0 records every delivery (headers and raw body) and answers as each
//! test tells it. Tests wait on [`Sim::webhooks_settled`] and on the receiver's notifications,
//! never on the clock.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use ring::signature::{UnparsedPublicKey, ED25519, RSA_PKCS1_2048_8192_SHA256};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use super::{serve, EmittedEvent, Sim, SimConfig, WebhookConfig};

const LOC: &str = "demoLocation00000001";
const RSA_KEY: &[u8] = include_bytes!("../../tests/data/webhook-rsa-test.pk8.der");
const RSA_PUB: &str = include_str!("../../tests/data/webhook-rsa-test.pub.pem");

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Delivery {
    headers: HeaderMap,
    body: Bytes,
    /// What the receiver answered.
    status: u16,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn webhook_id(&self) -> String {
        self.json()["webhookId"]
            .as_str()
            .expect("webhookId")
            .to_string()
    }

    fn header(&self, name: &str) -> Option<Vec<u8>> {
        let v = self.headers.get(name)?.to_str().ok()?;
        base64::engine::general_purpose::STANDARD.decode(v).ok()
    }
}

#[derive(Default)]
struct Inbox {
    got: Mutex<Vec<Delivery>>,
    /// Answer 500 to this many more requests.
    fail_next: AtomicU64,
    /// Answer 503 while set.
    down: AtomicBool,
    /// Woken at each request.
    arrived: Notify,
}

struct Receiver {
    url: String,
    inbox: Arc<Inbox>,
    _stop: oneshot::Sender<()>,
}

async fn hook(State(inbox): State<Arc<Inbox>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let failing = inbox
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else if inbox.down.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    inbox.got.lock().unwrap().push(Delivery {
        headers,
        body,
        status: status.as_u16(),
    });
    inbox.arrived.notify_waiters();
    status
}

impl Receiver {
    /// A receiver that first drops `drop_connections` connections without answering.
    async fn start_dropping(drop_connections: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inbox = Arc::new(Inbox::default());
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(hook))
            .with_state(inbox.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            for _ in 0..drop_connections {
                // Accepted and closed at once: the sender sees a connection error.
                drop(listener.accept().await);
            }
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Receiver {
            url: format!("http://{addr}/hooks"),
            inbox,
            _stop: stop,
        }
    }

    async fn start() -> Receiver {
        Receiver::start_dropping(0).await
    }

    fn got(&self) -> Vec<Delivery> {
        self.inbox.got.lock().unwrap().clone()
    }

    /// Returns once at least `n` requests have arrived.
    async fn until_requests(&self, n: usize) {
        loop {
            let arrived = self.inbox.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.inbox.got.lock().unwrap().len() >= n {
                return;
            }
            arrived.await;
        }
    }
}

/// The simulator's API, over HTTP.
struct Api {
    base: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("authorization", "Bearer pit-test")
            .header("version", "2021-07-28")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("the simulator answers");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }

    /// A write that must succeed; returns the reply.
    async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, reply) = self.call(method, path, body.clone()).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path} {body}: {status} {reply}"
        );
        reply
    }
}

fn config(contacts: usize, hooks: Option<WebhookConfig>) -> SimConfig {
    SimConfig {
        contacts,
        rate_limit: None,
        daily_quota: None,
        webhooks: hooks,
        ..SimConfig::default()
    }
}

async fn start(config: SimConfig) -> (Arc<Sim>, Api) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sim = Sim::new(config);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, sim.clone(), async move {
        let _ = stopped.await;
    }));
    let api = Api {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        _stop: stop,
    };
    (sim, api)
}

/// The body of the first `-----BEGIN PUBLIC KEY-----` block.
fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("PEM base64")
}

/// One DER element: (tag, content, rest).
fn tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (input[0], input[1]);
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        (len, 2 + n)
    };
    (tag, &input[head..head + len], &input[head + len..])
}

/// The key inside a SubjectPublicKeyInfo: ring wants the raw Ed25519 key or the PKCS#1
/// RSAPublicKey, not the SPKI wrapping.
fn spki_key(der: &[u8]) -> Vec<u8> {
    let (tag, spki, _) = tlv(der);
    assert_eq!(tag, 0x30, "SPKI is a SEQUENCE");
    let (tag, _algorithm, rest) = tlv(spki);
    assert_eq!(tag, 0x30, "AlgorithmIdentifier is a SEQUENCE");
    let (tag, bits, _) = tlv(rest);
    assert_eq!(tag, 0x03, "subjectPublicKey is a BIT STRING");
    assert_eq!(bits[0], 0, "no unused bits");
    bits[1..].to_vec()
}

fn ed25519_verifies(pem: &str, d: &Delivery) -> bool {
    let key = spki_key(&pem_der(pem));
    let sig = d
        .header("x-ghl-signature")
        .expect("X-GHL-Signature, base64");
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&d.body, &sig)
        .is_ok()
}

fn rsa_verifies(d: &Delivery) -> bool {
    let key = spki_key(&pem_der(RSA_PUB));
    let sig = d.header("x-wh-signature").expect("X-WH-Signature, base64");
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
        .verify(&d.body, &sig)
        .is_ok()
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

/// Every received body by webhookId (the first copy of each).
fn by_webhook_id(got: &[Delivery]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for d in got {
        out.entry(d.webhook_id()).or_insert_with(|| d.json());
    }
    out
}

#[tokio::test]
async fn every_kind_of_write_sends_its_event_with_the_documented_fields() {
    let rx = Receiver::start().await;
    let mut cfg = config(30, Some(WebhookConfig::new(&rx.url)));
    // Applied 20 ms after arrival: the event must carry the apply time.
    let latency = Duration::from_millis(20);
    cfg.write_latency = latency..=latency;
    let (sim, api) = start(cfg).await;
    let before_ms = crate::timefmt::now_millis();

    let ada = api
        .ok(
            "POST",
            "/contacts/",
            json!({"locationId": LOC, "firstName": "Ada", "email": "ada.hooks@example.org", "tags": ["a"]}),
        )
        .await;
    let ada = id_of(&ada["contact"]);
    api.ok(
        "POST",
        "/contacts/upsert",
        json!({"locationId": LOC, "email": "ada.hooks@example.org", "city": "Paris"}),
    )
    .await;
    let bob = api
        .ok(
            "POST",
            "/contacts/upsert",
            json!({"locationId": LOC, "email": "bob.hooks@example.org", "firstName": "Bob"}),
        )
        .await;
    let bob = id_of(&bob["contact"]);
    let contact = format!("/contacts/{ada}");
    api.ok("PUT", &contact, json!({"lastName": "Lovelace"}))
        .await;
    api.ok("PUT", &contact, json!({"dnd": true})).await;
    api.ok("POST", &format!("{contact}/tags"), json!({"tags": ["vip"]}))
        .await;
    api.ok("DELETE", &format!("{contact}/tags"), json!({"tags": ["a"]}))
        .await;
    let task = api
        .ok(
            "POST",
            &format!("{contact}/tasks"),
            json!({"title": "Call", "dueDate": "2026-12-01T10:00:00.000Z", "completed": false}),
        )
        .await;
    let task = id_of(&task["task"]);
    let task_path = format!("{contact}/tasks/{task}");
    api.ok("PUT", &task_path, json!({"title": "Call back"}))
        .await;
    api.ok(
        "PUT",
        &format!("{task_path}/completed"),
        json!({"completed": true}),
    )
    .await;
    api.ok("DELETE", &task_path, json!({})).await;
    let note = api
        .ok(
            "POST",
            &format!("{contact}/notes"),
            json!({"body": "hello"}),
        )
        .await;
    let note = id_of(&note["note"]);
    let note_path = format!("{contact}/notes/{note}");
    api.ok("PUT", &note_path, json!({"body": "hello again"}))
        .await;
    api.ok("DELETE", &note_path, json!({})).await;
    api.ok("DELETE", &contact, json!({})).await;
    // Refused writes change nothing and send nothing.
    let (status, _) = api.call("PUT", &contact, json!({"city": "Gone"})).await;
    assert_eq!(status, 400, "the contact is deleted");
    let (status, _) = api
        .call("POST", "/contacts/", json!({"locationId": LOC, "bogus": 1}))
        .await;
    assert_eq!(status, 422);
    // Writes outside the API (an incremental export test's day of edits) send events too.
    let (changed, deleted) = sim.mutate(LOC, 0.2, 1, 7);
    assert!(!changed.is_empty() && deleted.len() == 1);

    sim.webhooks_settled().await;
    let emitted = sim.emitted_events();
    let kinds: Vec<&str> = emitted.iter().map(|e| e.kind.as_str()).collect();
    let mut expected = vec![
        "ContactCreate",
        "ContactUpdate",
        "ContactCreate",
        "ContactUpdate",
        "ContactDndUpdate",
        "ContactTagUpdate",
        "ContactTagUpdate",
        "TaskCreate",
        "TaskUpdate",
        "TaskComplete",
        "TaskDelete",
        "NoteCreate",
        "NoteUpdate",
        "NoteDelete",
        "ContactDelete",
    ];
    expected.extend(changed.iter().map(|_| "ContactUpdate"));
    expected.push("ContactDelete");
    assert_eq!(kinds, expected);
    let tail: Vec<&str> = emitted[15..]
        .iter()
        .filter_map(|e| e.record_id.as_deref())
        .collect();
    let mut named: Vec<&str> = changed.iter().map(String::as_str).collect();
    named.extend(deleted.iter().map(String::as_str));
    assert_eq!(tail, named, "mutate's events name its contacts");

    let got = rx.got();
    assert!(got.iter().all(|d| d.status == 200));
    let bodies = by_webhook_id(&got);
    let ids: HashSet<&String> = emitted.iter().map(|e| &e.webhook_id).collect();
    assert_eq!(ids.len(), emitted.len(), "webhookIds are unique");
    assert_eq!(bodies.keys().collect::<HashSet<_>>(), ids);
    for d in &got {
        assert!(
            d.body.starts_with(b"{\"type\":\"") && !d.body.contains(&b'\n'),
            "compact, type first: {}",
            String::from_utf8_lossy(&d.body)
        );
        assert_eq!(
            d.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
    }

    let body = |i: usize| -> &Value { &bodies[&emitted[i].webhook_id] };
    for (i, e) in emitted.iter().enumerate() {
        let b = body(i);
        assert_eq!(b["type"], e.kind.as_str());
        assert_eq!(b["locationId"], LOC);
        let ts = b["timestamp"].as_str().expect("timestamp");
        assert_eq!(ts.len(), 24, "ISO 8601 with milliseconds: {ts}");
        assert_eq!(crate::timefmt::parse_iso_millis(ts), Some(e.timestamp_ms));
        assert!(e.acknowledged);
        assert_eq!(b["id"].as_str(), e.record_id.as_deref());
    }
    // Applied (and stamped) no earlier than the write latency after the first request left.
    assert!(emitted[0].timestamp_ms >= before_ms + 20);

    let create = body(0);
    assert_eq!(create["id"], ada.as_str());
    assert_eq!(create["firstName"], "Ada");
    assert_eq!(create["email"], "ada.hooks@example.org");
    assert_eq!(create["tags"], json!(["a"]));
    assert!(create["dateAdded"].is_string() && create["dateUpdated"].is_string());
    assert_eq!(body(1)["city"], "Paris");
    assert_eq!(body(2)["id"], bob.as_str());
    assert_eq!(body(3)["lastName"], "Lovelace");
    assert_eq!(
        (&body(4)["id"], &body(4)["dnd"]),
        (&json!(ada), &json!(true))
    );
    assert_eq!(body(5)["tags"], json!(["a", "vip"]));
    assert_eq!(body(6)["tags"], json!(["vip"]));
    for (i, title, completed) in [
        (7, "Call", false),
        (8, "Call back", false),
        (9, "Call back", true),
        (10, "Call back", true),
    ] {
        let t = body(i);
        assert_eq!(t["id"], task.as_str());
        assert_eq!(t["contactId"], ada.as_str());
        assert_eq!(t["title"], title);
        assert_eq!(t["completed"], completed);
        assert_eq!(t["dueDate"], "2026-12-01T10:00:00.000Z");
        assert_eq!(emitted[i].contact_id.as_deref(), Some(ada.as_str()));
    }
    for (i, text) in [(11, "hello"), (12, "hello again"), (13, "hello again")] {
        let n = body(i);
        assert_eq!(n["id"], note.as_str());
        assert_eq!(n["contactId"], ada.as_str());
        assert_eq!(n["body"], text);
        assert!(n["dateAdded"].is_string());
    }
    assert_eq!(body(14)["id"], ada.as_str());
    assert_eq!(emitted[14].contact_id.as_deref(), Some(ada.as_str()));
}

#[tokio::test]
async fn signatures_verify_over_the_raw_body_with_the_published_keys() {
    let rx = Receiver::start().await;
    let key = super::rsa_key_pkcs8(RSA_KEY).expect("the test key is PKCS#8");
    let hooks = WebhookConfig {
        rsa_key_pkcs8: Some(key),
        ..WebhookConfig::new(&rx.url)
    };
    let (sim, api) = start(config(10, Some(hooks))).await;
    for i in 0..3 {
        api.ok(
            "POST",
            "/contacts/",
            json!({"locationId": LOC, "firstName": format!("Zoë {i} \u{1F600}"), "email": format!("z{i}@example.com")}),
        )
        .await;
    }
    sim.webhooks_settled().await;
    let pem = sim.webhook_public_key_pem();
    let got = rx.got();
    assert_eq!(got.len(), 3);
    for d in &got {
        assert!(ed25519_verifies(&pem, d), "X-GHL-Signature verifies");
        assert!(rsa_verifies(d), "X-WH-Signature verifies");
        // Over the raw bytes: the same JSON re-serialised or one byte changed does not.
        let mut forged = d.clone();
        let reserialised = serde_json::to_vec(&d.json()).expect("json");
        assert_ne!(
            reserialised,
            d.body.to_vec(),
            "key order differs once re-serialised"
        );
        forged.body = Bytes::from(reserialised);
        assert!(!ed25519_verifies(&pem, &forged));
        assert!(!rsa_verifies(&forged));
    }
    // Another seed signs with another key.
    let other = Sim::new(SimConfig {
        seed: 43,
        ..config(1, None)
    });
    assert!(!ed25519_verifies(&other.webhook_public_key_pem(), &got[0]));
}

#[test]
fn the_public_key_is_an_ed25519_spki_pem_that_depends_on_the_seed_only() {
    let a = Sim::new(config(1, None)).webhook_public_key_pem();
    let b = Sim::new(config(5, Some(WebhookConfig::new("http://127.0.0.1:9/"))))
        .webhook_public_key_pem();
    let c = Sim::new(SimConfig {
        seed: 7,
        ..config(1, None)
    })
    .webhook_public_key_pem();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert!(a.ends_with("-----END PUBLIC KEY-----\n"));
    let der = pem_der(&a);
    assert_eq!(der.len(), 44);
    assert_eq!(spki_key(&der).len(), 32);
    // OID 1.3.101.112 (Ed25519).
    assert!(der.windows(5).any(|w| w == [0x06, 0x03, 0x2b, 0x65, 0x70]));
}

#[test]
fn the_rsa_key_is_taken_as_pkcs8_der_or_pem_and_pkcs1_is_refused_with_a_hint() {
    let der = super::rsa_key_pkcs8(RSA_KEY).expect("DER");
    let b64 = base64::engine::general_purpose::STANDARD.encode(RSA_KEY);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    );
    assert_eq!(super::rsa_key_pkcs8(pem.as_bytes()).expect("PEM"), der);
    let pkcs1 = pem.replace("PRIVATE KEY", "RSA PRIVATE KEY");
    let e = super::rsa_key_pkcs8(pkcs1.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("PKCS#1") && e.contains("openssl pkcs8"), "{e}");
    assert!(super::rsa_key_pkcs8(b"not a key").is_err());
    assert!(
        super::rsa_key_pkcs8(b"-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----")
            .is_err()
    );
    // The key never shows in the config's Debug.
    let cfg = WebhookConfig {
        rsa_key_pkcs8: Some(der),
        ..WebhookConfig::new("http://127.0.0.1:9/")
    };
    assert!(format!("{cfg:?}").contains("<redacted>"));
}

#[tokio::test]
async fn refused_deliveries_are_redelivered_with_the_same_body_and_signature() {
    let rx = Receiver::start().await;
    rx.inbox.fail_next.store(3, Ordering::SeqCst);
    let (sim, api) = start(config(5, Some(WebhookConfig::new(&rx.url)))).await;
    api.ok(
        "POST",
        "/contacts/",
        json!({"locationId": LOC, "firstName": "Retry"}),
    )
    .await;
    sim.webhooks_settled().await;
    let got = rx.got();
    let statuses: Vec<u16> = got.iter().map(|d| d.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    for d in &got[1..] {
        assert_eq!(
            d.body, got[0].body,
            "the same body, webhookId and timestamp"
        );
        assert_eq!(
            d.headers.get("x-ghl-signature"),
            got[0].headers.get("x-ghl-signature")
        );
    }
    let stats = sim.webhook_stats();
    assert_eq!(
        (
            stats.emitted,
            stats.deliveries,
            stats.failures,
            stats.redeliveries,
            stats.acknowledged_events
        ),
        (1, 4, 3, 3, 1)
    );
    assert_eq!(sim.stats().webhooks, Some(stats), "also in GET /_sim/stats");
}

#[tokio::test]
async fn a_connection_error_is_redelivered_too() {
    let rx = Receiver::start_dropping(2).await;
    let (sim, api) = start(config(5, Some(WebhookConfig::new(&rx.url)))).await;
    api.ok(
        "POST",
        "/contacts/",
        json!({"locationId": LOC, "firstName": "Drop"}),
    )
    .await;
    sim.webhooks_settled().await;
    let got = rx.got();
    assert_eq!(
        got.len(),
        1,
        "the dropped attempts never reached the handler"
    );
    let stats = sim.webhook_stats();
    assert_eq!(
        (stats.deliveries, stats.failures, stats.acknowledged_events),
        (3, 2, 1)
    );
    assert_eq!(got[0].webhook_id(), sim.emitted_events()[0].webhook_id);
}

/// Sequential writes, so that the seeded draws meet the same serials on every run.
async fn run_with_rates(rx: &Receiver, writes: usize) -> (Vec<EmittedEvent>, super::WebhookStats) {
    let hooks = WebhookConfig {
        redelivery_rate: 0.3,
        duplicate_rate: 0.3,
        ..WebhookConfig::new(&rx.url)
    };
    let (sim, api) = start(config(writes, Some(hooks))).await;
    let ids: Vec<String> = sim.contacts(LOC).iter().map(id_of).collect();
    for id in &ids {
        api.ok("PUT", &format!("/contacts/{id}"), json!({"city": "Rome"}))
            .await;
    }
    sim.webhooks_settled().await;
    (sim.emitted_events(), sim.webhook_stats())
}

#[tokio::test]
async fn duplicates_and_lost_acknowledgements_repeat_the_same_webhook_id() {
    let rx = Receiver::start().await;
    let (emitted, stats) = run_with_rates(&rx, 40).await;
    let got = rx.got();
    assert_eq!(stats.emitted, 40);
    assert_eq!(stats.acknowledged_events, 40);
    assert_eq!(stats.failures, 0);
    assert!(stats.duplicates > 0, "{stats:?}");
    assert!(stats.redeliveries > 0, "{stats:?}");
    // Every attempt reached the receiver: one per event, one more per duplicate, one more
    // per lost acknowledgement.
    assert_eq!(got.len() as u64, stats.deliveries);
    assert_eq!(
        stats.deliveries,
        stats.emitted + stats.duplicates + stats.redeliveries
    );
    let mut copies: BTreeMap<String, Vec<&Delivery>> = BTreeMap::new();
    for d in &got {
        copies.entry(d.webhook_id()).or_default().push(d);
    }
    let emitted_ids: HashSet<&String> = emitted.iter().map(|e| &e.webhook_id).collect();
    assert_eq!(copies.keys().collect::<HashSet<_>>(), emitted_ids);
    let repeated = copies.values().filter(|c| c.len() > 1).count() as u64;
    assert!(repeated >= stats.duplicates);
    for c in copies.values() {
        assert!(c.iter().all(|d| d.body == c[0].body), "identical copies");
    }

    // Reproducible: the same writes in the same order repeat the same draws.
    let rx2 = Receiver::start().await;
    let (_, again) = run_with_rates(&rx2, 40).await;
    assert_eq!(
        (again.duplicates, again.redeliveries, again.deliveries),
        (stats.duplicates, stats.redeliveries, stats.deliveries)
    );
}

#[tokio::test]
async fn webhooks_settled_waits_until_a_receiver_that_was_down_acknowledges() {
    let rx = Receiver::start().await;
    rx.inbox.down.store(true, Ordering::SeqCst);
    let (sim, api) = start(config(5, Some(WebhookConfig::new(&rx.url)))).await;
    for name in ["One", "Two"] {
        api.ok(
            "POST",
            "/contacts/",
            json!({"locationId": LOC, "firstName": name}),
        )
        .await;
    }
    // Both events refused at least once, and one of them twice: redeliveries are under way.
    rx.until_requests(3).await;
    let settled = sim.webhooks_settled();
    tokio::pin!(settled);
    assert!(
        futures::poll!(settled.as_mut()).is_pending(),
        "nothing is acknowledged yet"
    );
    assert_eq!(sim.webhook_stats().acknowledged_events, 0);
    assert!(sim.emitted_events().iter().all(|e| !e.acknowledged));
    rx.inbox.down.store(false, Ordering::SeqCst);
    sim.webhooks_acknowledged(2).await;
    settled.await;
    let stats = sim.webhook_stats();
    assert_eq!((stats.emitted, stats.acknowledged_events), (2, 2));
    assert!(stats.failures >= 3);
    assert!(sim.emitted_events().iter().all(|e| e.acknowledged));
}

#[tokio::test]
async fn without_webhooks_nothing_is_emitted_or_awaited() {
    let (sim, api) = start(config(5, None)).await;
    api.ok(
        "POST",
        "/contacts/",
        json!({"locationId": LOC, "firstName": "Quiet"}),
    )
    .await;
    sim.webhooks_settled().await;
    assert!(sim.emitted_events().is_empty());
    assert_eq!(sim.webhook_stats(), super::WebhookStats::default());
    assert_eq!(sim.stats().webhooks, None);
    let stats = serde_json::to_value(sim.stats()).expect("stats");
    assert!(stats.get("webhooks").is_none(), "GET /_sim/stats unchanged");
}
