//! Webhook receiver throughput (BENCHMARKS.md, "Webhook receiver"): events per second that
//! `contacts-etl listen` lands (each answered 200 only after its fsync), and the receiver's
//! CPU per event (getrusage of the child: user + system, the roll at shutdown included).
//!
//! Usage: cargo bench --bench listen [-- EVENTS [CONCURRENCY...]]
//!        (defaults 20000 events at concurrency 1, 16 and 64; at concurrency 1 a tenth of them)
//!
//! Senders keep their connection open (as HighLevel's delivery workers do) and send signed
//! ContactUpdate bodies of about 300 bytes, signed before the clock starts. The journal and
//! the events table are under `target/` (CARGO_TARGET_TMPDIR), not /tmp, which may be a
//! tmpfs where an fsync costs nothing.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

fn cpu_of_children() -> f64 {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Sends `requests[i]` for each index it takes, on one kept-alive connection; returns how
/// many were answered 200.
async fn worker(
    addr: std::net::SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    next: Arc<AtomicUsize>,
) -> usize {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).ok();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut ok = 0;
    let mut line = String::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(req) = requests.get(i) else {
            return ok;
        };
        write.write_all(req).await.expect("send");
        line.clear();
        read.read_line(&mut line).await.expect("status line");
        if line.starts_with("HTTP/1.1 200") {
            ok += 1;
        }
        let mut length = 0;
        loop {
            line.clear();
            read.read_line(&mut line).await.expect("header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await.expect("body");
    }
}

async fn run(
    events: usize,
    concurrency: usize,
    work: &Path,
    key_pem: &Path,
    keys: &Ed25519KeyPair,
) {
    let out = work.join(format!("out-{concurrency}"));
    let now = contacts_etl::timefmt::now_millis();
    let requests: Vec<Vec<u8>> = (0..events)
        .map(|i| {
            let body = format!(
                r#"{{"type":"ContactUpdate","locationId":"benchLocation0001","webhookId":"bench-{concurrency}-{i:08}","timestamp":"{}","id":"contact{i:08}","firstName":"Ada","lastName":"Lovelace","email":"ada{i}@example.com","phone":"+15550100{:03}","tags":["vip","newsletter"],"dateUpdated":"{}"}}"#,
                contacts_etl::timefmt::format_iso_millis(now),
                i % 1000,
                contacts_etl::timefmt::format_iso_millis(now)
            );
            let sig = base64::engine::general_purpose::STANDARD.encode(keys.sign(body.as_bytes()));
            let mut r = format!(
                "POST /webhook HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nX-GHL-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body.as_bytes());
            r
        })
        .collect();
    let cpu_before = cpu_of_children();
    let mut child = tokio::process::Command::new(BIN)
        .args(["listen", "--port", "0", "--rate-limit", "0", "--out"])
        .arg(&out)
        .arg("--public-key")
        .arg(key_pem)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the receiver");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: std::net::SocketAddr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the receiver listens");
        if let Some(rest) = line.strip_prefix("listening on http://") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(addr, requests.clone(), next.clone())))
        .collect();
    let mut ok = 0;
    for w in workers {
        ok += w.await.unwrap();
    }
    let landed = started.elapsed().as_secs_f64();
    let pid = child.id().unwrap() as libc::pid_t;
    let stopping = Instant::now();
    // SAFETY: kill(2) with our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().await.unwrap();
    let rolled = stopping.elapsed().as_secs_f64();
    let cpu = cpu_of_children() - cpu_before;
    assert!(status.success(), "the receiver exited {status}");
    assert_eq!(ok, events, "every delivery answered 200");
    let mut rows = 0;
    contacts_etl::events::scan(&contacts_etl::dest::Dest::local(&out), None, None, |_| {
        rows += 1
    })
    .unwrap();
    assert_eq!(rows, events, "every event in the table once");
    println!(
        "listen: {events} events, concurrency {concurrency:>2}: {:>7.0} events/s landed (fsync before each 200), {:>5.1} us CPU/event (receiver user+sys, roll included), roll at shutdown {rolled:.2}s",
        events as f64 / landed,
        cpu / events as f64 * 1e6,
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let mut levels: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    if levels.is_empty() {
        levels = vec![1, 16, 64];
    }
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a work directory");
    let keys = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
    let key_pem = work.path().join("key.pem");
    std::fs::write(
        &key_pem,
        contacts_etl::events::verify::ed25519_public_pem(keys.public_key().as_ref()),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for c in levels {
        let n = if c == 1 { (events / 10).max(1) } else { events };
        rt.block_on(run(n, c, work.path(), &key_pem, &keys));
    }
}
