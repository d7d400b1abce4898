//! Change capture end to end: the simulator's writes become signed webhooks, `contacts-etl
//! listen` lands them in its events table, and `export --incremental --from-events` fetches
//! only the contacts they named. Its output merged into the previous export must equal a
//! fresh full export, for a handful of requests per changed contact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use reqwest::Method;

use crate::common::s3::{s3_cmd, s3_export, BUCKET, S3};
use crate::common::*;
use contacts_etl::schema::Entity;
use contacts_etl::sim::WebhookConfig;

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("_report.json")).unwrap()).unwrap()
}

/// A port free at the moment (the receiver binds it right after; the simulator, started
/// before the receiver, needs its URL).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A simulator whose writes are sent as webhooks to 127.0.0.1:`port`.
async fn sim_with_webhooks(contacts: usize, seed: u64, port: u16) -> TestSim {
    let mut config = fast_sim(contacts, seed);
    config.webhooks = Some(WebhookConfig::new(format!(
        "http://127.0.0.1:{port}/webhook"
    )));
    TestSim::start(config).await
}

/// `contacts-etl listen` on `port`, verifying with the simulator's key, writing to `events`.
struct Receiver {
    child: tokio::process::Child,
    port: u16,
    /// Events the simulator had seen acknowledged when this receiver started.
    acked_before: u64,
}

impl Receiver {
    async fn start(sim: &TestSim, port: u16, events: &Path, extra: &[&str]) -> Receiver {
        let key = events.with_extension("pem");
        let out = events.to_str().unwrap();
        Receiver::spawn(
            tokio::process::Command::new(BIN),
            sim,
            port,
            out,
            &key,
            extra,
        )
        .await
    }

    /// `cmd` (the binary, with its environment) as `listen --out OUT`, verifying with the
    /// simulator's key written to `key`; returns once it is ready.
    async fn spawn(
        mut cmd: tokio::process::Command,
        sim: &TestSim,
        port: u16,
        out: &str,
        key: &Path,
        extra: &[&str],
    ) -> Receiver {
        std::fs::write(key, sim.sim.webhook_public_key_pem()).unwrap();
        let child = cmd
            .args([
                "--quiet",
                "listen",
                "--port",
                &port.to_string(),
                "--out",
                out,
            ])
            .arg("--public-key")
            .arg(key)
            .args(extra)
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Ready once /readyz answers 200 (a bound so a broken start fails, not a speed).
        let url = format!("http://127.0.0.1:{port}/readyz");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + PROGRESS_DEADLINE;
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Receiver {
            child,
            port,
            acked_before: sim.sim.webhook_stats().acknowledged_events,
        }
    }

    /// Returns once every event the simulator sent since this receiver started is
    /// acknowledged and rolled into the events table by it (started with a short `--roll-every`), where a run
    /// reads it; the receiver keeps running.
    async fn until_rolled(&self, sim: &TestSim) {
        within("every delivery settled", sim.sim.webhooks_settled()).await;
        let want = sim.sim.webhook_stats().acknowledged_events - self.acked_before;
        let url = format!("http://127.0.0.1:{}/stats", self.port);
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + PROGRESS_DEADLINE;
        loop {
            let stats: serde_json::Value = serde_json::from_slice(
                &http.get(&url).send().await.unwrap().bytes().await.unwrap(),
            )
            .unwrap();
            if stats["eventsRolled"].as_u64().unwrap() >= want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{want} events acknowledged, not rolled: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) with the pid of our own child process; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// SIGTERM: the receiver rolls what it holds into the events table and exits 0.
    async fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "the receiver exited with {status}");
    }

    /// SIGKILL: no chance to roll or flush anything.
    async fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// Writes through the simulator's API, as another integration would: `update` contacts
/// renamed, `notes` and `tasks` contacts given a new note or task, `deleted` deleted, and
/// `created` contacts created. Returns the ids touched (changed, deleted).
async fn write_changes(
    sim: &TestSim,
    seed: u64,
    (update, notes, tasks, deleted, created): (usize, usize, usize, usize, usize),
) -> (BTreeSet<String>, BTreeSet<String>) {
    let loc = sim.location();
    let ids: Vec<String> = sim
        .sim
        .contacts(&loc)
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    let mut rng = Lcg(seed);
    let mut pick = |taken: &mut BTreeSet<String>| loop {
        let id = &ids[rng.next(ids.len() as u64) as usize];
        if taken.insert(id.clone()) {
            return id.clone();
        }
    };
    let http = reqwest::Client::new();
    let base = &sim.base_url;
    let (mut taken, mut changed, mut gone) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for i in 0..update {
        let id = pick(&mut taken);
        let body = serde_json::json!({"firstName": format!("Renamed{i}")});
        api(
            &http,
            Method::PUT,
            format!("{base}/contacts/{id}"),
            Some(body),
        )
        .await;
        changed.insert(id);
    }
    for i in 0..notes {
        let id = pick(&mut taken);
        let body = serde_json::json!({"body": format!("note {i}")});
        api(
            &http,
            Method::POST,
            format!("{base}/contacts/{id}/notes"),
            Some(body),
        )
        .await;
        changed.insert(id);
    }
    for i in 0..tasks {
        let id = pick(&mut taken);
        api(
            &http,
            Method::POST,
            format!("{base}/contacts/{id}/tasks"),
            Some(task(i)),
        )
        .await;
        changed.insert(id);
    }
    for _ in 0..deleted {
        let id = pick(&mut taken);
        api(&http, Method::DELETE, format!("{base}/contacts/{id}"), None).await;
        gone.insert(id);
    }
    for i in 0..created {
        let body = serde_json::json!({
            "locationId": loc,
            "firstName": "New",
            "email": format!("new{seed}-{i}@example.com"),
        });
        let answer = api(&http, Method::POST, format!("{base}/contacts/"), Some(body)).await;
        changed.insert(answer["contact"]["id"].as_str().unwrap().to_owned());
    }
    (changed, gone)
}

fn task(i: usize) -> serde_json::Value {
    serde_json::json!({
        "title": format!("task {i}"),
        "dueDate": "2027-01-01T10:00:00.000Z",
        "completed": false,
    })
}

/// One write through the simulator's API, as another integration makes it; the answer's
/// JSON body (`null` when it has none).
async fn api(
    http: &reqwest::Client,
    method: Method,
    url: String,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut req = http
        .request(method, &url)
        .bearer_auth("test-token")
        .header("Version", "2021-07-28");
    if let Some(body) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(&body).unwrap());
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let bytes = r.bytes().await.unwrap();
    assert!(
        status.is_success(),
        "{url}: {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}

type Rows = BTreeMap<Entity, BTreeMap<String, Row>>;

fn rows_of(out: &Path, loc: &str) -> Rows {
    Entity::ALL
        .into_iter()
        .map(|e| (e, keyed(e, read_parquet(out, e, loc))))
        .collect()
}

/// What a warehouse does with an incremental run: its contacts replace the old rows and
/// their children replace all the old children; deleted contacts go with their children.
fn merge(prev: &Rows, run: &Rows, deleted: &BTreeSet<String>) -> Rows {
    let fetched: BTreeSet<&str> = run[&Entity::Contacts].keys().map(String::as_str).collect();
    let owner = |key: &str| key.split('/').next().unwrap_or("").to_owned();
    let mut out = Rows::new();
    for entity in Entity::ALL {
        let mut rows: BTreeMap<String, Row> = prev[&entity]
            .iter()
            .filter(|(k, _)| {
                let o = owner(k);
                !fetched.contains(o.as_str()) && !deleted.contains(&o)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        rows.extend(run[&entity].iter().map(|(k, v)| (k.clone(), v.clone())));
        out.insert(entity, rows);
    }
    out
}

/// A fresh full export into `out` has exactly the rows of `warehouse` (the merged runs).
async fn assert_equals_a_fresh_full_export(sim: &TestSim, out: &Path, warehouse: &Rows) {
    let o = run_to_end(sim, out, &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let fresh = rows_of(out, &sim.location());
    assert_same("merged against a fresh full export", &fresh, warehouse);
}

fn assert_same(what: &str, expected: &Rows, got: &Rows) {
    for entity in Entity::ALL {
        assert_same_rows(
            &format!("{what}: {}", entity.name()),
            &expected[&entity],
            &got[&entity],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_run_after_1_percent_changed_fetches_only_those_and_merges_into_a_fresh_full_export(
) {
    let n = 20_000;
    let port = free_port();
    let sim = sim_with_webhooks(n, 151, port).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    let state = dir.path().join("state");
    let night = |i: u32| dir.path().join(format!("night{i}"));
    let flags = [
        "--incremental",
        "--state-dir",
        state.to_str().unwrap(),
        "--from-events",
        events.to_str().unwrap(),
        "--full-walk-every",
        "4",
    ];
    // Up for the whole test, as in production: the runs read what it has rolled.
    let receiver = Receiver::start(&sim, port, &events, &["--roll-every", "1"]).await;

    let o = run_to_end(&sim, &night(1), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(report(&night(1))["runKind"], "full");
    let mut warehouse = rows_of(&night(1), &loc);

    // 1% of 20,000: renamed, a note or a task added, deleted, created.
    let (changed, gone) = write_changes(&sim, 7, (120, 30, 20, 10, 20)).await;
    receiver.until_rolled(&sim).await;

    let o = run_to_end(&sim, &night(2), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&night(2));
    assert_eq!(r["runKind"], "events", "{r}");
    assert_eq!(r["listing"], "events", "{r}");
    let run = rows_of(&night(2), &loc);
    let fetched: BTreeSet<String> = run[&Entity::Contacts].keys().cloned().collect();
    assert_eq!(fetched, changed, "exactly the contacts the events named");
    assert_eq!(read_ids(&night(2), "deleted_contacts", &loc), gone);
    // At most 4 requests per changed contact (the contact, its tasks, notes and
    // appointments), plus the custom-field definitions.
    let attempts = r["requests"]["attempts"].as_u64().unwrap();
    let bound = 4 * changed.len() as u64 + 1;
    assert!(
        attempts <= bound,
        "{attempts} requests for {} changed contacts (bound {bound}): {}",
        changed.len(),
        r["requests"]
    );
    let listing = r["listingEstimate"]["total"].as_u64().unwrap();
    assert!(
        listing > 0,
        "the report compares with a listing-based run: {r}"
    );
    warehouse = merge(&warehouse, &run, &gone);
    assert_same("merged", &truth(&sim.sim, &loc), &warehouse);

    // No change since: the next events run fetches nothing.
    let o = run_to_end(&sim, &night(3), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&night(3));
    assert_eq!(r["runKind"], "events", "{r}");
    assert_eq!(r["rows"]["contacts"], 0, "{r}");

    // A night read after the previous runs' mark: only the events since.
    let (changed, gone) = write_changes(&sim, 8, (15, 5, 5, 4, 3)).await;
    receiver.until_rolled(&sim).await;
    let o = run_to_end(&sim, &night(4), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&night(4));
    assert_eq!(r["runKind"], "events", "{r}");
    let run = rows_of(&night(4), &loc);
    let fetched: BTreeSet<String> = run[&Entity::Contacts].keys().cloned().collect();
    assert_eq!(fetched, changed, "only the contacts named since night 3");
    assert_eq!(read_ids(&night(4), "deleted_contacts", &loc), gone);
    warehouse = merge(&warehouse, &run, &gone);
    assert_equals_a_fresh_full_export(&sim, &dir.path().join("fresh"), &warehouse).await;

    // Every fourth run walks, and finds no deletion the events had not already reported.
    let o = run_to_end(&sim, &night(5), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&night(5));
    assert_eq!(r["runKind"], "walk", "{r}");
    assert_eq!(r["rows"]["contacts"], 0, "{r}");
    assert!(
        read_ids(&night(5), "deleted_contacts", &loc).is_empty(),
        "the events runs already deleted them"
    );
    receiver.stop().await;
}

/// HighLevel does not send again what it could not deliver: after a receiver restart
/// (`--max-gap` 0, the default) and while the receiver is stopped, the next run walks instead
/// of trusting the events; in between, with the same receiver up, events runs resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_or_stopped_receiver_makes_the_next_run_walk() {
    let port = free_port();
    let sim = sim_with_webhooks(500, 152, port).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let events: PathBuf = dir.path().join("events");
    let state = dir.path().join("state");
    let night = |i: u32| dir.path().join(format!("night{i}"));
    let flags = [
        "--incremental",
        "--state-dir",
        state.to_str().unwrap(),
        "--from-events",
        events.to_str().unwrap(),
    ];
    let roll = ["--roll-every", "1"];
    let run = |i: u32| {
        let (sim, out, flags) = (&sim, night(i), &flags);
        async move {
            let o = run_to_end(sim, &out, flags).await;
            assert!(o.status.success(), "{}", stderr(&o));
            report(&out)
        }
    };
    let contacts_of = |i: u32| -> BTreeSet<String> {
        keyed(
            Entity::Contacts,
            read_parquet(&night(i), Entity::Contacts, &loc),
        )
        .into_keys()
        .collect()
    };

    let receiver = Receiver::start(&sim, port, &events, &roll).await;
    assert_eq!(run(1).await["runKind"], "full");
    let (changed, _) = write_changes(&sim, 8, (3, 0, 0, 0, 0)).await;
    receiver.until_rolled(&sim).await;
    assert_eq!(run(2).await["runKind"], "events");
    assert_eq!(contacts_of(2), changed);

    // Restarted: what was sent while it was down is gone, so the next run walks, and the
    // walk writes exactly the changed contacts (by their dateUpdated).
    receiver.stop().await;
    let receiver = Receiver::start(&sim, port, &events, &roll).await;
    let (changed, _) = write_changes(&sim, 9, (2, 0, 0, 0, 0)).await;
    receiver.until_rolled(&sim).await;
    assert_eq!(run(3).await["runKind"], "walk");
    assert_eq!(contacts_of(3), changed);

    // The same receiver since: events again.
    let (changed, _) = write_changes(&sim, 10, (2, 0, 0, 0, 0)).await;
    receiver.until_rolled(&sim).await;
    assert_eq!(run(4).await["runKind"], "events");
    assert_eq!(contacts_of(4), changed);

    // Stopped: a walk.
    receiver.stop().await;
    assert_eq!(run(5).await["runKind"], "walk");
}

/// The whole loop under the sender's and the operator's worst: 10,000 writes through the
/// simulator's API become signed webhooks, 5% of the acknowledged ones are delivered again
/// (a lost acknowledgement) and 1% are sent twice at once, and the receiver is SIGKILLed twice
/// while deliveries are in flight and restarted on its port. Every event the simulator
/// emitted (each acknowledged in the end) is in the events table exactly once; forged and
/// truncated deliveries sent meanwhile are refused and counted. (Stale and replayed
/// deliveries, which need a body signed with the sender's key, are in `listen.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_writes_through_redeliveries_duplicates_and_two_sigkills_land_exactly_once() {
    const WRITES: usize = 10_000;
    let port = free_port();
    let mut config = fast_sim(2_000, 153);
    let mut hooks = WebhookConfig::new(format!("http://127.0.0.1:{port}/webhook"));
    hooks.redelivery_rate = 0.05;
    hooks.duplicate_rate = 0.01;
    config.webhooks = Some(hooks);
    let sim = TestSim::start(config).await;
    let ids: Vec<String> = sim
        .sim
        .contacts(&sim.location())
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    // Small parts, so parts are rolled between the kills too.
    let roll = ["--roll-events", "500", "--rate-limit", "0"];
    let receiver = Receiver::start(&sim, port, &events, &roll).await;

    // The writes: renames, notes and tasks over the location's contacts, 32 at a time.
    let writer = {
        let (base, ids) = (sim.base_url.clone(), ids.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            futures::stream::iter(0..WRITES)
                .map(|i| {
                    let (http, base) = (http.clone(), base.clone());
                    let id = ids[i % ids.len()].clone();
                    async move {
                        let (method, url, body) = match i % 5 {
                            0..=2 => (
                                Method::PUT,
                                format!("{base}/contacts/{id}"),
                                serde_json::json!({"firstName": format!("W{i}")}),
                            ),
                            3 => (
                                Method::POST,
                                format!("{base}/contacts/{id}/notes"),
                                serde_json::json!({"body": format!("note {i}")}),
                            ),
                            _ => (Method::POST, format!("{base}/contacts/{id}/tasks"), task(i)),
                        };
                        api(&http, method, url, Some(body)).await;
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<()>>()
                .await;
        })
    };

    // Two kills at points of the webhook stream's own progress, each followed by a restart
    // on the same port (the sender keeps retrying what was not acknowledged).
    let mut receiver = receiver;
    for at in [2_500, 6_000] {
        within(
            "acknowledgements before a kill",
            sim.sim.webhooks_acknowledged(at),
        )
        .await;
        receiver.kill().await;
        receiver = Receiver::start(&sim, port, &events, &roll).await;
    }
    within("the writes", writer).await.unwrap();
    within("every delivery settled", sim.sim.webhooks_settled()).await;

    // Forged (another key) and truncated deliveries: 401, counted, nothing stored.
    let other = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let body = format!(
        r#"{{"type":"ContactUpdate","locationId":"{}","webhookId":"forged-1","timestamp":"{}","id":"{}"}}"#,
        sim.location(),
        contacts_etl::timefmt::format_iso_millis(contacts_etl::timefmt::now_millis()),
        ids[0]
    );
    let forged_sig = base64::engine::general_purpose::STANDARD.encode(other.sign(body.as_bytes()));
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/webhook");
    for payload in [body.as_str(), &body[..body.len() / 2]] {
        let r = http
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-GHL-Signature", &forged_sig)
            .body(payload.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{payload}");
    }
    let stats: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("http://127.0.0.1:{port}/stats"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stats["refused"]["signature"], 2, "{stats}");
    receiver.stop().await;

    let emitted = sim.sim.emitted_events();
    let sent = sim.sim.webhook_stats();
    assert!(
        emitted.len() >= WRITES,
        "{} events for {WRITES} writes",
        emitted.len()
    );
    assert!(emitted.iter().all(|e| e.acknowledged));
    assert!(sent.redeliveries > 0 && sent.duplicates > 0, "{sent:?}");
    assert!(sent.failures > 0, "the kills cut no delivery off: {sent:?}");
    let mut stored: BTreeMap<String, usize> = BTreeMap::new();
    let mut starts = BTreeSet::new();
    contacts_etl::events::scan(
        &contacts_etl::dest::Dest::local(&events),
        None,
        None,
        |row| {
            *stored.entry(row.webhook_id).or_insert(0) += 1;
            starts.insert(row.receiver_started_ms);
        },
    )
    .unwrap();
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let want: BTreeSet<&str> = emitted.iter().map(|e| e.webhook_id.as_str()).collect();
    let got: BTreeSet<&str> = stored.keys().map(String::as_str).collect();
    assert_eq!(
        want.difference(&got).count() + got.difference(&want).count(),
        0,
        "missing: {:?}; not emitted: {:?}",
        want.difference(&got).take(5).collect::<Vec<_>>(),
        got.difference(&want).take(5).collect::<Vec<_>>()
    );
    assert_eq!(starts.len(), 3, "three receivers stored events: {starts:?}");
}

/// Awaits `f`, failing the test naming `what` after a generous bound (a broken receiver or
/// sender fails instead of hanging; not a measure of speed).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(600), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within 600 s"))
}

/// The loop as a migration meets it, into a bucket: `contacts-etl import` creates and updates
/// contacts in the simulator, their webhooks reach a receiver whose events table is in S3,
/// and the next events run (reading its events from the bucket, writing to it) fetches
/// exactly those contacts; merged into the previous export, it equals a fresh full export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_reaches_an_events_run_through_a_receiver_writing_to_a_bucket() {
    let port = free_port();
    let sim = sim_with_webhooks(300, 154, port).await;
    let loc = sim.location();
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (work, journal, state) = (
        dir.path().join("work"),
        dir.path().join("journal"),
        dir.path().join("state"),
    );
    std::fs::create_dir(&work).unwrap();
    let events = format!("s3://{BUCKET}/events");
    let journal_flag = ["--journal", journal.to_str().unwrap()];
    let receiver = Receiver::spawn(
        s3_cmd(&s3, &work),
        &sim,
        port,
        &events,
        &dir.path().join("hl.pem"),
        &[journal_flag[0], journal_flag[1], "--roll-every", "1"],
    )
    .await;
    let flags = [
        "--incremental",
        "--state-dir",
        state.to_str().unwrap(),
        "--from-events",
        &events,
    ];
    let o = s3_export(&sim, &s3, "night1", &work, &flags)
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut warehouse = rows_of(&s3.dir("night1"), &loc);

    // 12 new contacts and one existing contact renamed, by email, through the import command.
    let existing = sim
        .sim
        .contacts(&loc)
        .into_iter()
        .find(|c| {
            c["email"]
                .as_str()
                .is_some_and(|e| e.is_ascii() && e.contains('@'))
        })
        .expect("a contact with an email");
    let mut csv = String::from("email,firstName\n");
    for i in 0..12 {
        csv.push_str(&format!("imported{i}@example.com,Imported {i}\n"));
    }
    csv.push_str(&format!(
        "{},Renamed\n",
        existing["email"].as_str().unwrap()
    ));
    let input = dir.path().join("in.csv");
    std::fs::write(&input, csv).unwrap();
    let journal = dir.path().join("import.jsonl");
    let (code, out, err) = run_bin(
        &sim.base_url,
        &[
            "import",
            "contacts",
            "--location",
            &loc,
            "--input",
            input.to_str().unwrap(),
            "--journal",
            journal.to_str().unwrap(),
            "--rate-limit",
            "off",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    receiver.until_rolled(&sim).await;
    let imported: BTreeSet<String> = sim
        .sim
        .contacts(&loc)
        .into_iter()
        .filter(|c| {
            c["email"]
                .as_str()
                .is_some_and(|e| e.starts_with("imported"))
                || c["id"] == existing["id"]
        })
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(imported.len(), 13);

    let o = s3_export(&sim, &s3, "night2", &work, &flags)
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let night2 = s3.dir("night2");
    assert_eq!(report(&night2)["runKind"], "events", "{}", report(&night2));
    let run = rows_of(&night2, &loc);
    let fetched: BTreeSet<String> = run[&Entity::Contacts].keys().cloned().collect();
    assert_eq!(fetched, imported, "exactly the contacts the import wrote");
    warehouse = merge(&warehouse, &run, &BTreeSet::new());
    assert_equals_a_fresh_full_export(&sim, &dir.path().join("fresh"), &warehouse).await;
    receiver.stop().await;
}

/// A killed events run resumes where it committed and writes what an uninterrupted one
/// writes: the same range of events, the same contacts, no part twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_run_killed_after_commits_and_resumed_writes_what_a_clean_one_does() {
    let port = free_port();
    let sim = sim_with_webhooks(3_000, 155, port).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    let receiver = Receiver::start(&sim, port, &events, &["--roll-every", "1"]).await;
    // Two states, one for the clean run and one for the killed one, from the same full run.
    let states = [
        dir.path().join("state-clean"),
        dir.path().join("state-killed"),
    ];
    let flags = |state: &Path| -> Vec<String> {
        [
            "--incremental",
            "--state-dir",
            state.to_str().unwrap(),
            "--from-events",
            events.to_str().unwrap(),
            "--part-contacts",
            "100",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    for (i, state) in states.iter().enumerate() {
        let f = flags(state);
        let f: Vec<&str> = f.iter().map(String::as_str).collect();
        let o = run_to_end(&sim, &dir.path().join(format!("full{i}")), &f).await;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (changed, gone) = write_changes(&sim, 11, (500, 50, 50, 12, 10)).await;
    receiver.until_rolled(&sim).await;

    let clean = dir.path().join("clean");
    let f = flags(&states[0]);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let o = run_to_end(&sim, &clean, &f).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(report(&clean)["runKind"], "events");

    // Each attempt is SIGKILLed as soon as its checkpoint shows one more commit (a page of
    // 100 contacts with their children): a point of the run's own progress, not a time. Two
    // attempts commit at most four of the seven pages, so each is still mid-run when killed.
    let killed = dir.path().join("killed");
    let f = flags(&states[1]);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    assert_eq!(changed.len(), 610);
    let ck = killed.join(format!("_state/location_id={loc}/checkpoint.json"));
    let committed = || -> u64 {
        std::fs::read(&ck)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["contactsListed"].as_u64())
            .unwrap_or(0)
    };
    for i in 0..2 {
        let before = committed();
        let mut child = export_cmd(&sim, &killed, &f).spawn().unwrap();
        let progress = async {
            while committed() <= before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            status = child.wait() => panic!(
                "attempt {i} ended ({:?}) before it committed a page",
                status.unwrap()
            ),
            () = within("a commit of the attempt", progress) => {
                child.start_kill().unwrap(); // SIGKILL
                child.wait().await.unwrap();
            }
        }
    }
    assert!(committed() < 610, "the attempts finished the run");
    let o = run_to_end(&sim, &killed, &f).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&killed);
    assert_eq!(r["runKind"], "events", "{r}");
    assert_eq!(r["resumed"], true, "{r}");
    assert_same(
        "killed and resumed against clean",
        &rows_of(&clean, &loc),
        &rows_of(&killed, &loc),
    );
    let fetched: BTreeSet<String> = rows_of(&killed, &loc)[&Entity::Contacts]
        .keys()
        .cloned()
        .collect();
    assert_eq!(fetched, changed);
    assert_eq!(read_ids(&killed, "deleted_contacts", &loc), gone);
    assert_eq!(read_ids(&clean, "deleted_contacts", &loc), gone);
    receiver.stop().await;
}
