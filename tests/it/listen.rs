//! `contacts-etl listen` as HighLevel and an operator see it (issue 15): the release binary
//! started as a child on a free port, deliveries signed with a test key (Ed25519 from a fixed
//! seed, written as a SubjectPublicKeyInfo PEM; the committed RSA test pair for the legacy
//! header), answers and counters checked, and the events table read back after SIGTERM.
//!
//! The HTTP client here is a few lines over a TCP stream, not a library: the fuzz test sends
//! header values and bodies a client library would refuse to build.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::{Lcg, BIN};
use arrow::array::AsArray;
use arrow::datatypes::TimestampMillisecondType;
use base64::Engine as _;
use contacts_etl::dest::Dest;
use contacts_etl::events::table::{schema, EventRow};
use contacts_etl::timefmt::{format_iso_millis, now_millis};
use futures::StreamExt;
use ring::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The seed of the test's Ed25519 key (a test key: nothing signed with it is trusted).
const SEED: [u8; 32] = [42; 32];

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The keys deliveries are signed with, and their public halves as files.
struct Keys {
    ed: Ed25519KeyPair,
    /// The Ed25519 public key, PEM.
    public_pem: PathBuf,
    _dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let ed = Ed25519KeyPair::from_seed_unchecked(&SEED).unwrap();
        let public_pem = dir.path().join("webhook-public.pem");
        std::fs::write(
            &public_pem,
            contacts_etl::events::verify::ed25519_public_pem(ed.public_key().as_ref()),
        )
        .unwrap();
        Keys {
            ed,
            public_pem,
            _dir: dir,
        }
    }

    /// `X-GHL-Signature` of `body`.
    fn sign(&self, body: &[u8]) -> String {
        b64(self.ed.sign(body).as_ref())
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// `X-WH-Signature` of `body` with the committed RSA test key.
fn rsa_sign(body: &[u8]) -> String {
    let der = std::fs::read(data("webhook-rsa-test.pk8.der")).unwrap();
    let key = RsaKeyPair::from_pkcs8(&der).unwrap();
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        body,
        &mut sig,
    )
    .unwrap();
    b64(&sig)
}

/// A delivery body as HighLevel sends it (compact JSON, one object).
fn event(id: &str, timestamp_ms: i64) -> String {
    format!(
        r#"{{"type":"ContactUpdate","locationId":"loc1","webhookId":"{id}","timestamp":"{}","id":"c-{id}","firstName":"Zoë","tags":["a","b"]}}"#,
        format_iso_millis(timestamp_ms)
    )
}

/// One HTTP/1.1 request, `Connection: close`.
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: receiver\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends `raw` on a new connection: the status and body of the answer, `None` when there was
/// none (the receiver was killed).
async fn send(addr: SocketAddr, raw: &[u8]) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    // A receiver that answers before reading the whole body (413) may close early.
    let _ = stream.write_all(raw).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

/// A receiver started as a child process.
struct Receiver {
    child: tokio::process::Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    /// Reads stderr to its end (the child's exit).
    drain: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(out: &Path, keys: &Keys, extra: &[&str]) -> Receiver {
        let mut child = tokio::process::Command::new(BIN)
            .args(["listen", "--port", "0", "--out"])
            .arg(out)
            .arg("--public-key")
            .arg(&keys.public_pem)
            .args(extra)
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let addr = loop {
            let line =
                lines.next_line().await.unwrap().unwrap_or_else(|| {
                    panic!("the receiver ended before listening; stderr:\n{seen}")
                });
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.strip_prefix("listening on http://") {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        let stderr = Arc::new(Mutex::new(seen));
        let sink = stderr.clone();
        // Drained for the whole run, so the child never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Receiver {
            child,
            addr,
            stderr,
            drain,
        }
    }

    async fn post(&self, body: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
        send(self.addr, &request("POST", "/webhook", headers, body))
            .await
            .expect("an answer")
    }

    async fn deliver(&self, keys: &Keys, body: &str) -> (u16, String) {
        let sig = keys.sign(body.as_bytes());
        self.post(body.as_bytes(), &[("X-GHL-Signature", &sig)])
            .await
    }

    async fn get(&self, path: &str) -> (u16, String) {
        send(self.addr, &request("GET", path, &[], b""))
            .await
            .expect("an answer")
    }

    async fn stats(&self) -> serde_json::Value {
        let (status, body) = self.get("/stats").await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) with the pid of our own child process; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// SIGTERM, then the exit status; the receiver's stderr for messages.
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().await.unwrap();
        // The pipe ends with the child.
        let _ = (&mut self.drain).await;
        let text = self.stderr.lock().unwrap().clone();
        (status, text)
    }

    async fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// Every row of the events table under `out`.
fn rows(out: &Path) -> Vec<EventRow> {
    let mut rows = Vec::new();
    contacts_etl::events::scan(&Dest::local(out), None, None, |r| rows.push(r)).unwrap();
    rows
}

/// How many times each webhookId is in the table.
fn id_counts(out: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in rows(out) {
        *counts.entry(r.webhook_id).or_insert(0) += 1;
    }
    counts
}

fn report(out: &Path) -> serde_json::Value {
    let path = out.join("_state/events/listen-report.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[tokio::test]
async fn an_accepted_event_lands_in_a_part_with_every_column_after_sigterm() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = Receiver::start(&out, &keys, &[]).await;
    assert_eq!(r.get("/healthz").await.0, 200);
    assert_eq!(r.get("/readyz").await.0, 200);
    let before = now_millis();
    let ts = before - 1_500;
    let body = event("wh-1", ts);
    let (status, answer) = r.deliver(&keys, &body).await;
    assert_eq!((status, answer.as_str()), (200, r#"{"status":"stored"}"#));
    // The same path without /webhook is the same handler.
    let second = event("wh-2", ts);
    let sig = keys.sign(second.as_bytes());
    let answer = send(
        r.addr,
        &request("POST", "/", &[("X-GHL-Signature", &sig)], second.as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(answer.0, 200);
    let after = now_millis();
    let (status, stderr) = r.stop().await;
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("accepted=2"), "{stderr}");

    let part = out.join("events/part-00000001.parquet");
    let file = std::fs::File::open(&part).unwrap_or_else(|e| panic!("{}: {e}", part.display()));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(
        b.schema().fields(),
        schema().fields(),
        "the declared columns"
    );
    assert_eq!(b.num_rows(), 2);
    let text = |name: &str| b.column_by_name(name).unwrap().as_string::<i32>().clone();
    let time = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<TimestampMillisecondType>()
            .clone()
    };
    assert_eq!(text("webhookId").value(0), "wh-1");
    assert_eq!(text("type").value(0), "ContactUpdate");
    assert_eq!(text("locationId").value(0), "loc1");
    assert_eq!(time("timestamp").value(0), ts);
    assert_eq!(text("recordId").value(0), "c-wh-1");
    assert_eq!(text("contactId").value(0), "c-wh-1");
    assert_eq!(text("raw").value(0), body, "the body byte for byte");
    let received = time("receivedAt").value(0);
    assert!((before..=after).contains(&received), "{received}");
    let started = time("receiverStartedAt").value(0);
    assert!(started <= received && started >= before - 120_000);
    assert_eq!(time("receiverStartedAt").value(1), started);
    assert_eq!(text("webhookId").value(1), "wh-2");

    let rep = report(&out);
    assert_eq!(rep["status"], "stopped");
    assert_eq!(rep["counters"]["accepted"], 2);
    assert_eq!(rep["counters"]["eventsRolled"], 2);
    assert_eq!(rep["rolledThrough"], 1);
}

#[tokio::test]
async fn forged_altered_truncated_unsigned_stale_and_replayed_deliveries_are_refused_and_counted() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = Receiver::start(&out, &keys, &["--max-body", "4K", "--format", "csv"]).await;
    let now = now_millis();
    let good = event("good", now);
    let sig = keys.sign(good.as_bytes());
    let other = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
    let forged = b64(other.sign(good.as_bytes()).as_ref());
    let mut altered = good.clone().into_bytes();
    let at = altered.iter().position(|&c| c == b'Z').unwrap();
    altered[at] = b'z';
    let truncated = &good.as_bytes()[..good.len() - 1];
    let stale = event("stale", now - 10 * 60_000);
    let future = event("future", now + 10 * 60_000);
    let not_object = "[\"type\",\"webhookId\"]";
    let no_id = format!(
        r#"{{"type":"ContactCreate","timestamp":"{}"}}"#,
        format_iso_millis(now)
    );
    let too_big = format!(
        r#"{{"type":"NoteCreate","webhookId":"big","timestamp":{now},"body":"{}"}}"#,
        "x".repeat(5000)
    );

    // (what, body, headers, expected status, expected counter)
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "forged",
            good.clone().into_bytes(),
            vec![("X-GHL-Signature", forged)],
            401,
            "signature",
        ),
        (
            "one byte altered",
            altered,
            vec![("X-GHL-Signature", sig.clone())],
            401,
            "signature",
        ),
        (
            "truncated",
            truncated.to_vec(),
            vec![("X-GHL-Signature", sig.clone())],
            401,
            "signature",
        ),
        (
            "unsigned",
            good.clone().into_bytes(),
            vec![],
            401,
            "signature",
        ),
        (
            "malformed base64",
            good.clone().into_bytes(),
            vec![("X-GHL-Signature", "not*base64!".into())],
            401,
            "signature",
        ),
        (
            "legacy header without its key",
            good.clone().into_bytes(),
            vec![("X-WH-Signature", rsa_sign(good.as_bytes()))],
            401,
            "signature",
        ),
        (
            "stale",
            stale.clone().into_bytes(),
            vec![("X-GHL-Signature", keys.sign(stale.as_bytes()))],
            401,
            "stale",
        ),
        (
            "from the future",
            future.clone().into_bytes(),
            vec![("X-GHL-Signature", keys.sign(future.as_bytes()))],
            401,
            "stale",
        ),
        (
            "not an object",
            not_object.into(),
            vec![("X-GHL-Signature", keys.sign(not_object.as_bytes()))],
            400,
            "malformed",
        ),
        (
            "no webhookId",
            no_id.clone().into_bytes(),
            vec![("X-GHL-Signature", keys.sign(no_id.as_bytes()))],
            400,
            "malformed",
        ),
        (
            "too large",
            too_big.clone().into_bytes(),
            vec![("X-GHL-Signature", keys.sign(too_big.as_bytes()))],
            413,
            "too_large",
        ),
    ];
    for (what, body, headers, want, reason) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut raw = request("POST", "/webhook", &headers, body);
        if *want == 413 {
            // Refused from Content-Length alone: the body is not sent (a server closing a
            // socket with unread bytes resets it, and the answer could be lost).
            raw.truncate(raw.len() - body.len());
        }
        let (status, answer) = send(r.addr, &raw).await.expect("an answer");
        assert_eq!(status, *want, "{what}: {answer}");
        assert!(
            answer.contains(&format!("\"reason\":\"{reason}\"")),
            "{what}: {answer}"
        );
    }
    assert_eq!(
        r.deliver(&keys, &good).await,
        (200, r#"{"status":"stored"}"#.into())
    );
    for _ in 0..3 {
        assert_eq!(
            r.deliver(&keys, &good).await,
            (200, r#"{"status":"duplicate"}"#.into()),
            "a replay within max-age"
        );
    }
    let stats = r.stats().await;
    assert_eq!(stats["accepted"], 1, "{stats}");
    assert_eq!(stats["duplicates"], 3, "{stats}");
    let refused = &stats["refused"];
    assert_eq!(
        (
            &refused["signature"],
            &refused["stale"],
            &refused["malformed"],
            &refused["tooLarge"],
            &refused["rateLimited"]
        ),
        (&6.into(), &2.into(), &2.into(), &1.into(), &0.into()),
        "{stats}"
    );
    let (status, stderr) = r.stop().await;
    assert!(status.success(), "{stderr}");
    assert!(out.join("events/part-00000001.csv").exists());
    assert_eq!(
        id_counts(&out).into_iter().collect::<Vec<_>>(),
        [("good".to_owned(), 1)]
    );
    assert_eq!(report(&out)["counters"]["refused"]["signature"], 6);
}

#[tokio::test]
async fn the_legacy_rsa_signature_is_accepted_only_with_its_key() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let body = event("legacy-1", now_millis());
    let rsa = rsa_sign(body.as_bytes());

    let r = Receiver::start(&out, &keys, &[]).await;
    assert_eq!(
        r.post(body.as_bytes(), &[("X-WH-Signature", &rsa)]).await.0,
        401
    );
    assert!(r.stop().await.0.success());

    let key = data("webhook-rsa-test.pub.pem");
    let r = Receiver::start(&out, &keys, &["--legacy-rsa-key", key.to_str().unwrap()]).await;
    let other = event("legacy-2", now_millis());
    assert_eq!(
        r.post(other.as_bytes(), &[("X-WH-Signature", &rsa)])
            .await
            .0,
        401,
        "an RSA signature of another body"
    );
    // An Ed25519 header, when present, decides: a wrong one is not rescued by a right RSA one.
    assert_eq!(
        r.post(
            body.as_bytes(),
            &[
                ("X-GHL-Signature", &keys.sign(other.as_bytes())),
                ("X-WH-Signature", &rsa)
            ]
        )
        .await
        .0,
        401
    );
    assert_eq!(
        r.post(body.as_bytes(), &[("X-WH-Signature", &rsa)]).await.0,
        200
    );
    assert!(r.stop().await.0.success());
    assert_eq!(
        id_counts(&out).into_iter().collect::<Vec<_>>(),
        [("legacy-1".to_owned(), 1)]
    );
}

#[tokio::test]
async fn concurrent_deliveries_of_one_webhook_id_store_it_once() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = Receiver::start(&out, &keys, &[]).await;
    let body = event("twice", now_millis());
    let answers: Vec<(u16, String)> = futures::stream::iter(0..32)
        .map(|_| r.deliver(&keys, &body))
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let stored = answers.iter().filter(|(_, b)| b.contains("stored")).count();
    assert_eq!(stored, 1, "{answers:?}");
    assert!(r.stop().await.0.success());
    assert_eq!(id_counts(&out).get("twice"), Some(&1));
}

#[tokio::test]
async fn acknowledged_events_survive_sigkill_and_land_exactly_once() {
    const EVENTS: usize = 400;
    const KILL_AFTER: usize = 150;
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let now = now_millis();
    let bodies: Vec<(String, String)> = (0..EVENTS)
        .map(|i| {
            let id = format!("wh-{i:04}");
            let body = event(&id, now);
            (id, body)
        })
        .collect();

    // Small segments, so some are rolled before the kill and one is cut off by it.
    let r = Receiver::start(&out, &keys, &["--roll-events", "40"]).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(tokio::sync::Notify::new());
    let addr = r.addr;
    let first_run: Vec<(String, Option<(u16, String)>)> = {
        let deliveries = futures::stream::iter(bodies.iter().cloned())
            .map(|(id, body)| {
                let sig = keys.sign(body.as_bytes());
                let (acked, killed) = (acked.clone(), killed.clone());
                async move {
                    let answer = send(
                        addr,
                        &request(
                            "POST",
                            "/webhook",
                            &[("X-GHL-Signature", &sig)],
                            body.as_bytes(),
                        ),
                    )
                    .await;
                    if answer.as_ref().is_some_and(|(s, _)| *s == 200)
                        && acked.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER
                    {
                        killed.notify_one();
                    }
                    (id, answer)
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>();
        let killer = {
            let killed = killed.clone();
            async move {
                killed.notified().await;
                r.kill().await;
            }
        };
        let (answers, ()) = tokio::join!(deliveries, killer);
        answers
    };
    let acknowledged: BTreeSet<String> = first_run
        .iter()
        .filter(|(_, a)| a.as_ref().is_some_and(|(s, _)| *s == 200))
        .map(|(id, _)| id.clone())
        .collect();
    assert!(acknowledged.len() >= KILL_AFTER, "{}", acknowledged.len());
    assert!(
        acknowledged.len() < EVENTS,
        "the kill came after every delivery: nothing was cut off"
    );

    // The sender redelivers everything it has no 200 for, and (5% redelivery, duplicates)
    // some it has: here, all of them.
    let r = Receiver::start(&out, &keys, &["--roll-events", "40"]).await;
    for (id, body) in &bodies {
        let (status, answer) = r.deliver(&keys, body).await;
        assert_eq!(status, 200, "{id}: {answer}");
        if acknowledged.contains(id) {
            assert_eq!(
                answer, r#"{"status":"duplicate"}"#,
                "{id} was acknowledged before the kill"
            );
        }
    }
    let (status, stderr) = r.stop().await;
    assert!(status.success(), "{stderr}");

    let counts = id_counts(&out);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let all: BTreeSet<String> = bodies.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), all);
    // The restart shows in the table: two receiver start times.
    let starts: BTreeSet<i64> = rows(&out).iter().map(|r| r.receiver_started_ms).collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
}

/// One random delivery that must be refused: random or damaged bodies, missing, random or
/// misplaced signatures, odd headers, methods and paths.
fn hostile_request(rng: &mut Lcg, keys: &Keys, now: i64) -> Vec<u8> {
    let random_bytes =
        |rng: &mut Lcg, n: usize| -> Vec<u8> { (0..n).map(|_| rng.next(256) as u8).collect() };
    let printable = |rng: &mut Lcg, n: usize| -> String {
        (0..n)
            .map(|_| char::from(b' ' + rng.next(95) as u8))
            .collect()
    };
    let good = event(&format!("fz-{}", rng.next(1_000_000)), now);
    let body: Vec<u8> = match rng.next(6) {
        0 => {
            let n = rng.next(2048) as usize;
            random_bytes(rng, n)
        }
        1 => {
            let n = rng.next(300) as usize;
            printable(rng, n).into_bytes()
        }
        2 => {
            // A real delivery with one byte changed after signing.
            let mut b = good.clone().into_bytes();
            let at = rng.next(b.len() as u64) as usize;
            b[at] ^= 1 + rng.next(255) as u8;
            b
        }
        3 => good.as_bytes()[..rng.next(good.len() as u64) as usize].to_vec(),
        4 => br#"{"type":"ContactCreate","webhookId":"x","timestamp":0}"#.to_vec(),
        _ => good.clone().into_bytes(),
    };
    let sig = match rng.next(6) {
        0 => None,
        1 => Some({
            let n = rng.next(120) as usize;
            printable(rng, n)
        }),
        2 => Some(b64(&random_bytes(rng, 64))),
        // Signed, but a different body than the one sent.
        3 => Some(keys.sign(good.as_bytes())).filter(|_| body != good.as_bytes()),
        4 => Some(b64(&{
            let n = rng.next(600) as usize;
            random_bytes(rng, n)
        })),
        _ => Some(format!("{}=", keys.sign(&body))),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(s) = sig {
        let name = if rng.next(4) == 0 {
            "X-WH-Signature"
        } else {
            "X-GHL-Signature"
        };
        headers.push((name.into(), s));
    }
    for _ in 0..rng.next(4) {
        let name: String = (0..1 + rng.next(20))
            .map(|_| char::from(b'a' + rng.next(26) as u8))
            .collect();
        headers.push((
            format!("x-{name}"),
            {
                let n = rng.next(200) as usize;
                printable(rng, n)
            }
            .trim()
            .into(),
        ));
    }
    let (method, path) = match rng.next(10) {
        0 => ("GET", "/webhook"),
        1 => ("PUT", "/"),
        2 => ("POST", "/nowhere"),
        3 => ("POST", "/webhook?x=1"),
        4 => ("POST", "/"),
        _ => ("POST", "/webhook"),
    };
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    request(method, path, &headers, &body)
}

#[tokio::test]
async fn a_thousand_random_and_malformed_deliveries_are_all_4xx_and_store_nothing() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = Receiver::start(&out, &keys, &["--rate-limit", "0"]).await;
    let mut rng = Lcg(20_261_130);
    let now = now_millis();
    let requests: Vec<Vec<u8>> = (0..1000)
        .map(|_| hostile_request(&mut rng, &keys, now))
        .collect();
    let answers: Vec<Option<(u16, String)>> = futures::stream::iter(&requests)
        .map(|raw| send(r.addr, raw))
        .buffer_unordered(8)
        .collect()
        .await;
    for (raw, answer) in requests.iter().zip(&answers) {
        let status = answer.as_ref().map(|(s, _)| *s);
        assert!(
            status.is_some_and(|s| (400..500).contains(&s)),
            "{status:?} for {}",
            String::from_utf8_lossy(&raw[..raw.len().min(400)])
        );
    }
    assert_eq!(r.get("/healthz").await.0, 200, "alive after the fuzz");
    let stats = r.stats().await;
    assert_eq!(
        (&stats["accepted"], &stats["duplicates"]),
        (&0.into(), &0.into()),
        "{stats}"
    );
    let (status, stderr) = r.stop().await;
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(rows(&out).is_empty());
}

#[tokio::test]
async fn a_second_receiver_on_one_journal_is_refused_and_a_bad_key_is_a_usage_error() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = Receiver::start(&out, &keys, &[]).await;
    let second = tokio::process::Command::new(BIN)
        .args(["listen", "--port", "0", "--out"])
        .arg(&out)
        .arg("--public-key")
        .arg(&keys.public_pem)
        .output()
        .await
        .unwrap();
    assert_eq!(
        second.status.code(),
        Some(8),
        "{}",
        crate::common::stderr(&second)
    );
    assert!(r.stop().await.0.success());

    let bad = tokio::process::Command::new(BIN)
        .args(["listen", "--port", "0", "--out"])
        .arg(&out)
        .arg("--public-key")
        .arg(data("webhook-rsa-test.pub.pem"))
        .output()
        .await
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        crate::common::stderr(&bad)
    );
    assert!(
        crate::common::stderr(&bad).contains("another algorithm"),
        "{}",
        crate::common::stderr(&bad)
    );
}
