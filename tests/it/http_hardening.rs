//! The HTTP client against small fake servers that misbehave (issue 11, items 8, 9, 11, 12
//! and 13): listings that never end, far-future Retry-After, redirects, huge replies, and ids
//! that cannot go into a request. Each test is named after the defect it guards against.

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use contacts_etl::api::{Client, ClientConfig, ErrorKind, Token};
use contacts_etl::extract::{self, ExtractError};
use futures::TryStreamExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

/// Serves `router` on 127.0.0.1:<free port> for the rest of the test.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// Runs the binary with a token and nothing else from the environment. A run that would
/// never end (the defects here) is killed after a minute, failing the test.
async fn run(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .env("HL_TOKEN", "pit-test-token")
        .env_remove("HL_BASE_URL")
        .env_remove("HL_LOCATION_ID")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(60), child)
        .await
        .expect("the run ends")
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `export` of location L1 into `out` against `base`, without children or pacing.
async fn export(base: &str, out: &std::path::Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "export",
        "--base-url",
        base,
        "--location",
        "L1",
        "--out",
        out.to_str().unwrap(),
        "--include",
        "none",
        "--rate-limit",
        "off",
    ];
    args.extend_from_slice(extra);
    run(&args).await
}

fn contact(id: &str) -> Value {
    json!({ "id": id, "dateAdded": "2024-01-01T00:00:00.000Z", "firstName": "x" })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

fn lib_client(base: String) -> Arc<Client> {
    let mut cfg = ClientConfig::new(base, Token::new("t").unwrap());
    cfg.rate_limit = None;
    Arc::new(Client::new(cfg).unwrap())
}

// ---- item 8: listings that never end ------------------------------------------------------

#[tokio::test]
async fn business_listing_that_repeats_its_page_forever_never_ends() {
    let hits = counter();
    let router = Router::new()
        .route(
            "/contacts/business/{id}",
            get(|State(hits): State<Arc<AtomicUsize>>| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                // The same page whatever the skip, and a count that promises more.
                let contacts: Vec<Value> = (0..10).map(|i| contact(&format!("c{i}"))).collect();
                Json(json!({ "contacts": contacts, "count": 1_000_000 }))
            }),
        )
        .with_state(hits.clone());
    let base = serve(router).await;
    let dir = tempfile::tempdir().unwrap();
    let o = export(&base, dir.path(), &["--business", "B1"]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("GET /contacts/business/B1?locationId=L1&limit="),
        "names the request: {err}"
    );
    assert!(err.contains("not advancing"), "{err}");
    assert!(hits.load(Ordering::SeqCst) <= 3, "stopped promptly");
    assert!(!dir.path().join("_manifest.json").exists());
}

#[tokio::test]
async fn business_listing_cycling_through_pages_already_read_never_ends() {
    let hits = counter();
    let router = Router::new()
        .route(
            "/contacts/business/{id}",
            get(|State(hits): State<Arc<AtomicUsize>>| async move {
                // Two pages in turn, whatever the skip: no page equals the one before it.
                let n = hits.fetch_add(1, Ordering::SeqCst);
                let contacts: Vec<Value> = (0..10)
                    .map(|i| contact(&format!("p{}c{i}", n % 2)))
                    .collect();
                Json(json!({ "contacts": contacts, "count": 1_000_000 }))
            }),
        )
        .with_state(hits.clone());
    let base = serve(router).await;
    let result: Result<Vec<_>, _> =
        extract::business_contacts(lib_client(base), "L1".into(), "B1".into(), 0, true, 0, 10)
            .try_collect()
            .await;
    let Err(ExtractError::PageLoop { request, reason }) = &result else {
        panic!("a loop error: {result:?}");
    };
    assert!(
        request.starts_with("GET /contacts/business/B1?"),
        "{request}"
    );
    assert!(reason.contains("no contact not already read"), "{reason}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2 + extract::STALE_PAGES as usize
    );
}

#[tokio::test]
async fn business_listing_far_beyond_its_announced_count_never_ends() {
    let hits = counter();
    let router = Router::new()
        .route(
            "/contacts/business/{id}",
            get(|State(hits): State<Arc<AtomicUsize>>| async move {
                // New ids on every page, and a count that keeps one page ahead.
                let n = hits.fetch_add(1, Ordering::SeqCst);
                let contacts: Vec<Value> =
                    (0..100).map(|i| contact(&format!("p{n}c{i}"))).collect();
                Json(json!({ "contacts": contacts, "count": 100 * (n + 2) }))
            }),
        )
        .with_state(hits.clone());
    let base = serve(router).await;
    let result: Result<Vec<_>, _> =
        extract::business_contacts(lib_client(base), "L1".into(), "B1".into(), 0, true, 0, 100)
            .try_collect()
            .await;
    let Err(ExtractError::PageLoop { reason, .. }) = &result else {
        panic!("a loop error: {result:?}");
    };
    assert!(reason.contains("the 200 the server announced"), "{reason}");
    assert!(hits.load(Ordering::SeqCst) <= 15, "stopped promptly");
}

#[tokio::test]
async fn contacts_listing_serving_one_page_under_ever_new_cursors_never_ends() {
    let hits = counter();
    let router = Router::new()
        .route(
            "/contacts/",
            get(|State(hits): State<Arc<AtomicUsize>>| async move {
                // The same contacts each time, under a cursor that moves (and no total).
                let n = hits.fetch_add(1, Ordering::SeqCst) as i64;
                let contacts: Vec<Value> = (0..10).map(|i| contact(&format!("c{i}"))).collect();
                Json(json!({ "contacts": contacts, "meta": {
                    "startAfter": 1_700_000_000_000i64 - n, "startAfterId": format!("c{n}"), "nextPage": 2 } }))
            }),
        )
        .with_state(hits.clone());
    let base = serve(router).await;
    let result: Result<Vec<_>, _> =
        extract::location_contacts(lib_client(base), "L1".into(), None, 10)
            .try_collect()
            .await;
    let Err(ExtractError::PageLoop { request, reason }) = &result else {
        panic!("a loop error: {result:?}");
    };
    assert!(
        request.starts_with("GET /contacts/?locationId=L1&limit=10&startAfter="),
        "{request}"
    );
    assert!(reason.contains("same 10 contacts"), "{reason}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

// ---- item 9: far-future Retry-After -------------------------------------------------------

/// A server that answers every listing request 429 with `retry_after`.
async fn always_429(retry_after: &'static str, hits: Arc<AtomicUsize>) -> String {
    let router = Router::new()
        .route(
            "/contacts/",
            get(move |State(hits): State<Arc<AtomicUsize>>| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, retry_after)],
                    Json(json!({ "statusCode": 429, "message": "Too many requests" })),
                )
            }),
        )
        .with_state(hits);
    serve(router).await
}

/// The time after "retry after " in `text`, as epoch ms.
fn named_retry_time(text: &str) -> i64 {
    let at = text
        .split("retry after ")
        .nth(1)
        .unwrap_or_else(|| panic!("names a retry time: {text}"));
    let stamp = at.split_whitespace().next().unwrap();
    contacts_etl::timefmt::parse_iso_millis(stamp)
        .unwrap_or_else(|| panic!("'{stamp}' is a UTC time: {text}"))
}

#[tokio::test]
async fn far_future_retry_after_waited_an_hour_per_attempt_40_times_saying_nothing() {
    let hits = counter();
    let base = always_429("3600", hits.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let before = now_ms();
    let o = export(
        &base,
        dir.path(),
        &["--max-retry-wait", "1", "--request-deadline", "3"],
    )
    .await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("GET /contacts/?locationId=L1"), "{err}");
    assert!(err.contains("request deadline"), "{err}");
    let at = named_retry_time(&err);
    assert!(
        (before + 3_590_000..=now_ms() + 3_610_000).contains(&at),
        "the server's Retry-After as an absolute time: {err}"
    );
    // Said at the default log level: the cut wait, and its end.
    assert!(err.contains("asked for 1h00m"), "{err}");
    assert!(err.contains("--max-retry-wait"), "{err}");
    assert!(err.contains("wait over"), "{err}");
    let n = hits.load(Ordering::SeqCst);
    assert!((2..=4).contains(&n), "{n} attempts within the deadline");
}

#[tokio::test]
async fn retry_after_dated_2100_is_named_when_the_run_gives_up() {
    let hits = counter();
    let base = always_429("Fri, 01 Jan 2100 00:00:00 GMT", hits.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let o = export(
        &base,
        dir.path(),
        &["--max-retry-wait", "1", "--request-deadline", "2"],
    )
    .await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("retry after 2100-01-01T00:00:0"), "{err}");
}

#[tokio::test]
async fn pipeline_http_limits_reach_each_locations_client() {
    let hits = counter();
    let base = always_429("3600", hits.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        format!(
            "[api]\nbase_url = \"{base}\"\nrate_limit = \"off\"\nmax_retry_wait_secs = 1\nrequest_deadline_secs = 2\n\
             [auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"out\"\ninclude = []\n"
        ),
    )
    .unwrap();
    let o = run(&["run", file.to_str().unwrap()]).await;
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    let report = std::fs::read_to_string(dir.path().join("out/_pipeline_report.json")).unwrap();
    assert!(report.contains("retry after"), "{report}");
}

// ---- item 11: redirects -------------------------------------------------------------------

#[tokio::test]
async fn redirect_to_another_host_was_followed_and_its_data_exported_as_the_locations() {
    let elsewhere_hits = counter();
    let elsewhere = serve(
        Router::new()
            .route(
                "/contacts/",
                get(|State(hits): State<Arc<AtomicUsize>>| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    Json(json!({ "contacts": [contact("intruder")], "meta": { "total": 1, "nextPage": null } }))
                }),
            )
            .with_state(elsewhere_hits.clone()),
    )
    .await;
    let target = format!("{elsewhere}/contacts/?locationId=L1&limit=100");
    let api = serve(Router::new().route(
        "/contacts/",
        get(move || {
            let target = target.clone();
            async move { (StatusCode::FOUND, [(header::LOCATION, target)]).into_response() }
        }),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let o = export(&api, dir.path(), &[]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("GET /contacts/?locationId=L1"), "{err}");
    assert!(err.contains("HTTP 302 redirect to"), "{err}");
    assert!(err.contains(&elsewhere), "names the Location: {err}");
    assert!(err.contains("hint:"), "{err}");
    assert_eq!(elsewhere_hits.load(Ordering::SeqCst), 0, "not followed");
    assert!(!dir.path().join("_manifest.json").exists());
}

// ---- item 12: huge replies ----------------------------------------------------------------

/// A listing page of about 2 MiB: one contact with a long name.
fn big_page() -> String {
    json!({ "contacts": [{ "id": "c1", "firstName": "x".repeat(2 << 20) }], "meta": { "total": 1, "nextPage": null } })
        .to_string()
}

#[tokio::test]
async fn a_400_mb_reply_with_content_length_was_read_whole_into_memory() {
    let hits = counter();
    let base = serve(
        Router::new()
            .route(
                "/contacts/",
                get(|State(hits): State<Arc<AtomicUsize>>| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    ([(header::CONTENT_TYPE, "application/json")], big_page())
                }),
            )
            .with_state(hits.clone()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let o = export(&base, dir.path(), &["--max-response-bytes", "1M"]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("GET /contacts/?locationId=L1"), "{err}");
    assert!(err.contains("1048576-byte cap"), "{err}");
    assert!(err.contains("Content-Length"), "{err}");
    assert!(
        err.contains("--max-response-bytes"),
        "says how to raise it: {err}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test]
async fn a_400_mb_reply_without_content_length_was_read_whole_into_memory() {
    let hits = counter();
    let base = serve(
        Router::new()
            .route(
                "/contacts/",
                get(|State(hits): State<Arc<AtomicUsize>>| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    // Streamed in chunks: no Content-Length to go by.
                    let body = big_page().into_bytes();
                    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                        body.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
                    Response::builder()
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from_stream(futures::stream::iter(chunks)))
                        .unwrap()
                }),
            )
            .with_state(hits.clone()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let o = export(&base, dir.path(), &["--max-response-bytes", "1M"]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("1048576-byte cap"), "{err}");
    assert!(err.contains("passed it after"), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test]
async fn a_reply_under_a_raised_cap_is_accepted() {
    let base = serve(Router::new().route(
        "/contacts/",
        get(|| async { ([(header::CONTENT_TYPE, "application/json")], big_page()) }),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let o = export(
        &base,
        dir.path(),
        &["--max-response-bytes", "8M", "--format", "csv"],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[tokio::test]
async fn a_petabyte_content_length_under_a_raised_cap_aborted_the_process() {
    // A raw server: announces 10^15 bytes, sends a few, hangs up. Reserving the announced
    // length up front aborts the process (no allocator gives a petabyte).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000000000000000\r\n\r\n{\"contacts\": [")
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let o = export(
        &base,
        dir.path(),
        &[
            "--max-response-bytes",
            "1000000G",
            "--request-deadline",
            "2",
        ],
    )
    .await;
    let err = stderr(&o);
    assert!(o.status.code().is_some(), "killed by a signal: {err}");
    assert!(err.contains("POST /contacts/search"), "{err}");
    assert!(err.contains("reading the reply failed"), "{err}");
}

// ---- item 13: ids that cannot go into a request -------------------------------------------

#[tokio::test]
async fn a_100_kb_business_id_was_retried_8_times_and_exited_5() {
    let hits = counter();
    let base = serve(
        Router::new()
            .fallback(|State(hits): State<Arc<AtomicUsize>>| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                StatusCode::NOT_FOUND
            })
            .with_state(hits.clone()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let long = "b".repeat(100_000);
    let o = export(&base, dir.path(), &["--business", &long]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}", &err[..err.len().min(2000)]);
    assert!(
        err.contains("--business") && err.contains("100000 bytes long"),
        "{err}"
    );
    assert!(
        err.len() < 2000,
        "the id is not echoed whole: {} bytes",
        err.len()
    );

    let o = export(
        &base,
        dir.path(),
        &["--business", "B1", "--business", "a/../b"],
    )
    .await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--business") && err.contains("'/'"), "{err}");

    let o = run(&[
        "export",
        "--base-url",
        &base,
        "--location",
        "L 1",
        "--out",
        dir.path().to_str().unwrap(),
    ])
    .await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--location") && err.contains("a space"),
        "{err}"
    );

    let csv = dir.path().join("in.csv");
    std::fs::write(&csv, "email\na@example.com\n").unwrap();
    let o = run(&[
        "import",
        "contacts",
        "--base-url",
        &base,
        "--location",
        &long,
        "--input",
        csv.to_str().unwrap(),
    ])
    .await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}", &err[..err.len().min(2000)]);
    assert!(err.contains("--location"), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was sent");
}

#[tokio::test]
async fn a_bad_business_id_in_a_pipeline_file_is_refused_by_validate() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"out\"\nbusinesses = [\"B1\", \"B 2\"]\n",
    )
    .unwrap();
    let o = run(&["validate", file.to_str().unwrap()]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("p.toml:7: businesses:"), "{err}");
}

#[tokio::test]
async fn a_request_that_cannot_be_built_was_retried_as_transient() {
    let hits = counter();
    let base = serve(
        Router::new()
            .fallback(|State(hits): State<Arc<AtomicUsize>>| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                StatusCode::NOT_FOUND
            })
            .with_state(hits.clone()),
    )
    .await;
    let client = lib_client(base);
    // The library does not check ids (the command line does): the client must still refuse.
    let err = client
        .business_contacts("L1", &"b".repeat(100_000), 0, 100)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fatal, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("cannot be built"), "{msg}");
    assert!(
        msg.len() < 2000,
        "the label is shortened: {} bytes",
        msg.len()
    );
    assert_eq!(client.stats().snapshot().attempts, 1, "tried once");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_create_answered_201_with_a_reply_over_the_cap_was_taken_as_refused() {
    // The create happened (201); only its reply was too large to read. Taken as "refused",
    // the importer would put the row in its rejects and a re-import would create it again.
    let base = serve(Router::new().route(
        "/contacts/",
        axum::routing::post(|| async {
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                json!({"contact": {"id": "c1", "source": "x".repeat(4_096)}}).to_string(),
            )
        }),
    ))
    .await;
    let mut cfg = ClientConfig::new(base, Token::new("t").unwrap());
    cfg.rate_limit = None;
    cfg.max_response_bytes = 1_024;
    let client = Client::new(cfg).unwrap();
    let err = client
        .create_contact(&json!({"locationId": "L", "email": "a@b.co"}), None)
        .await
        .unwrap_err();
    assert!(
        err.maybe_applied(),
        "a 2xx create whose reply could not be read is ambiguous: {err}"
    );
}

/// A server whose certificate this machine does not trust (a wrong `--base-url`, a proxy that
/// inspects TLS): the run stops at the first handshake with the host named and what to do,
/// instead of retrying for tens of seconds and suggesting to run again.
#[tokio::test]
async fn an_untrusted_certificate_is_refused_at_once_with_what_to_do() {
    use std::io::Read;

    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let cert = std::fs::read(data.join("tls-untrusted-localhost.cert.der")).unwrap();
    let key = std::fs::read(data.join("tls-untrusted-localhost.pk8.der")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(cert)],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let seen = handshakes.clone();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().map_while(Result::ok) {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut tls = rustls::ServerConnection::new(config.clone()).unwrap();
            // The client refuses the certificate and closes: the handshake ends in an error.
            let _ = rustls::Stream::new(&mut tls, &mut tcp).read(&mut [0; 1]);
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let base = format!("https://localhost:{port}");
    let o = export(&base, dir.path(), &[]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("the TLS certificate of localhost was refused"),
        "{err}"
    );
    assert!(err.contains("--base-url"), "says what to check: {err}");
    assert!(!err.contains("run again later"), "{err}");
    assert_eq!(handshakes.load(Ordering::SeqCst), 1, "not retried: {err}");
    assert!(!dir.path().join("_manifest.json").exists());
}
