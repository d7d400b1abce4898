//! The import's input side (issue 11, items 3-6): rows of one file naming the same person,
//! outputs that would overwrite an input, dry runs that exit as the real run would, control
//! characters, ragged rows and other encodings in the rejects file, and the location's country
//! as the default of national phone numbers.

use std::path::Path;

use crate::common::{fast_sim, run_bin, TestSim};
use contacts_etl::import::{self, ContactImportOptions, OnDuplicate, SourceOptions};
use serde_json::Value;

/// `import contacts --location L --input FILE` plus `extra`, offline dry run unless `extra`
/// says otherwise.
fn contacts_args<'a>(loc: &'a str, input: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "import",
        "contacts",
        "--location",
        loc,
        "--input",
        input.to_str().unwrap(),
        "--rate-limit",
        "off",
    ];
    a.extend_from_slice(extra);
    a
}

fn opts(dir: &Path, input: &Path, loc: &str, mode: OnDuplicate) -> ContactImportOptions {
    let mut src = SourceOptions::new(input);
    src.journal = dir.join("j.jsonl");
    src.rejects = dir.join("rejects.csv");
    let mut o = ContactImportOptions::new(loc, src);
    o.on_duplicate = mode;
    o
}

/// A CSV file's header and rows as raw cells (ragged rows kept ragged).
fn raw_csv(path: &Path) -> (Vec<Vec<u8>>, Vec<Vec<Vec<u8>>>) {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .from_path(path)
        .unwrap();
    let mut rows: Vec<Vec<Vec<u8>>> = rdr
        .byte_records()
        .map(|r| r.unwrap().iter().map(<[u8]>::to_vec).collect())
        .collect();
    let header = rows.remove(0);
    (header, rows)
}

fn by_email(sim: &TestSim, email: &str) -> Vec<Value> {
    sim.sim
        .contacts(&sim.location())
        .into_iter()
        .filter(|c| {
            c["email"]
                .as_str()
                .is_some_and(|e| e.eq_ignore_ascii_case(email))
        })
        .collect()
}

fn journal_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// Item 3 --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_naming_the_same_person_are_merged_into_one_write_not_rejected() {
    let sim = TestSim::start(fast_sim(0, 3)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,phone,firstName,lastName,tags\n\
         ann@example.com,,Ann,,vip\n\
         bob@example.com,+15550100002,Bob,,\n\
         ANN@example.com,+15550100001,,Lee,\"new, vip\"\n\
         ,+1 555 010 0001,Anna,,late\n",
    )
    .unwrap();
    let report = import::import_contacts(
        sim.client(None, 4),
        &opts(dir.path(), &input, &loc, OnDuplicate::Update),
    )
    .await
    .unwrap();
    assert_eq!(
        (report.created, report.rejected, report.merged),
        (2, 0, 2),
        "{}",
        report.render()
    );
    assert!(report.complete(), "{}", report.render());
    let ann = by_email(&sim, "ann@example.com");
    assert_eq!(ann.len(), 1, "one contact for the person: {ann:?}");
    let ann = &ann[0];
    assert_eq!(ann["firstName"], "Anna", "a later non-empty cell wins");
    assert_eq!(ann["lastName"], "Lee");
    assert_eq!(ann["phone"], "+15550100001");
    let tags: Vec<String> = serde_json::from_value(ann["tags"].clone()).unwrap();
    for t in ["vip", "new", "late"] {
        assert!(tags.contains(&t.to_owned()), "tags are unioned: {tags:?}");
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["merged"], 2);
    assert_eq!(
        json["mergedLines"],
        serde_json::json!([{"into": 2, "lines": [4, 5]}])
    );
    // One write, journaled under the first row's line, keyed by what it sent.
    let done: Vec<Value> = journal_lines(&dir.path().join("j.jsonl"))
        .into_iter()
        .filter(|r| r["t"] == "done")
        .collect();
    let rows: Vec<u64> = done.iter().filter_map(|r| r["row"].as_u64()).collect();
    assert!(
        rows.contains(&2) && !rows.contains(&4) && !rows.contains(&5),
        "{done:?}"
    );
    let ann_done = done.iter().find(|r| r["row"] == 2).unwrap();
    assert_eq!(ann_done["key"], "email:ann@example.com|phone:+15550100001");

    // A rerun with the same journal finds the merged write done.
    let again = import::import_contacts(
        sim.client(None, 4),
        &opts(dir.path(), &input, &loc, OnDuplicate::Update),
    )
    .await
    .unwrap();
    assert_eq!(
        (again.created, again.already_done),
        (0, 2),
        "{}",
        again.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_naming_the_same_person_follow_on_duplicate_skip_and_fail() {
    let sim = TestSim::start(fast_sim(0, 3)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,firstName\nann@example.com,Ann\nAnn@Example.com,Later\ncy@example.com,Cy\n",
    )
    .unwrap();
    let skip = import::import_contacts(
        sim.client(None, 4),
        &opts(dir.path(), &input, &loc, OnDuplicate::Skip),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            skip.created,
            skip.skipped,
            skip.skipped_in_file,
            skip.rejected
        ),
        (2, 1, 1, 0),
        "{}",
        skip.render()
    );
    assert_eq!(by_email(&sim, "ann@example.com")[0]["firstName"], "Ann");

    let sim = TestSim::start(fast_sim(0, 3)).await;
    let dir = tempfile::tempdir().unwrap();
    let fail = import::import_contacts(
        sim.client(None, 4),
        &opts(dir.path(), &input, &loc, OnDuplicate::Fail),
    )
    .await
    .unwrap();
    assert_eq!(fail.rejected, 1, "{}", fail.render());
    assert!(
        fail.problems
            .iter()
            .any(|p| p.line == 3 && p.message.contains("line 2")),
        "{:?}",
        fail.problems
    );
    let (header, rows) = raw_csv(&dir.path().join("rejects.csv"));
    assert_eq!(header[..2], [b"line".to_vec(), b"reason".to_vec()]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], b"3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_says_how_many_rows_merged_and_which() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,phone,firstName\na@example.com,+15550100001,A\nb@example.com,,B\nA@example.com,,A2\n,+15550100001,A3\n",
    )
    .unwrap();
    let summary = dir.path().join("summary.json");
    let args = contacts_args(
        "L1",
        &input,
        &[
            "--dry-run",
            "--offline",
            "--summary",
            summary.to_str().unwrap(),
        ],
    );
    let (code, stdout, stderr) = run_bin("http://127.0.0.1:9", &args).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("merged 2 rows"), "{stdout}");
    assert!(stdout.contains("4, 5 into 2"), "{stdout}");
    let s: Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(s["merged"], 2);
    assert_eq!(s["mergedLines"][0]["into"], 2);
}

// Item 4 --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_summary_or_journal_naming_an_input_or_a_link_to_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let original = "email,firstName\nbad-address,Ann\n";
    std::fs::write(&input, original).unwrap();
    let mapping = dir.path().join("map.toml");
    let mapping_text = "[constants]\nsource = \"crm\"\n";
    std::fs::write(&mapping, mapping_text).unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let via_dots = sub.join("..").join("in.csv");
    let hard = dir.path().join("hard.csv");
    std::fs::hard_link(&input, &hard).unwrap();
    let soft = dir.path().join("soft.toml");
    std::os::unix::fs::symlink(&mapping, &soft).unwrap();
    let cases: Vec<(&str, &Path)> = vec![
        ("--rejects", &input),
        ("--rejects", &via_dots),
        ("--summary", &hard),
        ("--summary", &soft),
        ("--journal", &input),
    ];
    for (flag, path) in cases {
        for dry in [true, false] {
            let mut extra = vec![
                "--mapping",
                mapping.to_str().unwrap(),
                flag,
                path.to_str().unwrap(),
            ];
            if dry {
                extra.extend(["--dry-run", "--offline"]);
            }
            let args = contacts_args("L1", &input, &extra);
            let (code, stdout, stderr) = run_bin("http://127.0.0.1:9", &args).await;
            assert_eq!(code, 2, "{flag} {}: {stdout}{stderr}", path.display());
            assert!(
                stderr.contains(flag) && stderr.contains(&*path.to_string_lossy()),
                "names the output: {stderr}"
            );
            assert!(
                stderr.contains("in.csv") || stderr.contains("map.toml"),
                "names the input: {stderr}"
            );
            assert_eq!(std::fs::read_to_string(&input).unwrap(), original);
            assert_eq!(std::fs::read_to_string(&mapping).unwrap(), mapping_text);
        }
    }
}

// Item 5 --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_exits_2_like_the_real_run_on_a_duplicate_header_and_lists_every_problem() {
    let sim = TestSim::start(fast_sim(0, 3)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,Email,firstName\nnot-an-email,,A\nb@example.com,,B\n",
    )
    .unwrap();
    let (real, _, real_err) = run_bin(&sim.base_url, &contacts_args(&loc, &input, &[])).await;
    assert_eq!(real, 2, "{real_err}");
    for extra in [&["--dry-run", "--offline"][..], &["--dry-run"][..]] {
        let (code, stdout, stderr) =
            run_bin(&sim.base_url, &contacts_args(&loc, &input, extra)).await;
        assert_eq!(code, real, "{extra:?}: {stdout}{stderr}");
        assert!(
            stdout.contains("line 1, Email: a second column"),
            "{stdout}"
        );
        assert!(stdout.contains("line 2, email: 'not-an-email'"), "{stdout}");
        assert!(stderr.contains("a real run would refuse"), "{stderr}");
    }
    assert_eq!(sim.sim.contacts(&loc).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_exits_2_like_the_real_run_on_a_journal_of_another_location() {
    let sim = TestSim::start(fast_sim(0, 3)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "email\na@example.com\n").unwrap();
    let journal = dir.path().join("j.jsonl");
    let j = journal.to_str().unwrap();
    let (code, _, stderr) = run_bin(
        &sim.base_url,
        &contacts_args(&loc, &input, &["--journal", j]),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let other = "otherLocation0000001";
    let (real, _, real_err) = run_bin(
        &sim.base_url,
        &contacts_args(other, &input, &["--journal", j]),
    )
    .await;
    assert_eq!(real, 2, "{real_err}");
    for extra in [&["--dry-run", "--offline"][..], &["--dry-run"][..]] {
        let mut args = contacts_args(other, &input, &["--journal", j]);
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = run_bin(&sim.base_url, &args).await;
        assert_eq!(code, real, "{extra:?}: {stdout}{stderr}");
        assert!(
            stdout.contains(&format!("location {loc}, not {other}")),
            "{stdout}"
        );
    }
    assert_eq!(sim.sim.contacts(&loc).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_cells_are_rejected_with_line_and_column_not_sent() {
    let sim = TestSim::start(fast_sim(0, 3)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,First Name,city\nnul@example.com,A\0nn,Paris\nesc@example.com,Bob,\x1b]0;x\x07\nc1@example.com,C\u{85}y,\nok@example.com,\"Multi\r\nLine\tTab\",Rome\n",
    )
    .unwrap();
    let mapping = dir.path().join("map.toml");
    std::fs::write(&mapping, "[columns]\n\"First Name\" = \"firstName\"\n").unwrap();
    let args = contacts_args(&loc, &input, &["--mapping", mapping.to_str().unwrap()]);
    let (code, stdout, stderr) = run_bin(&sim.base_url, &args).await;
    assert_eq!(code, 6, "{stdout}{stderr}");
    assert!(
        stdout.contains("line 2, firstName: column 'First Name' has the control character U+0000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 3, city: column 'city' has the control character U+001B"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 4, firstName: column 'First Name' has the control character U+0085"),
        "{stdout}"
    );
    let contacts = sim.sim.contacts(&loc);
    assert_eq!(
        contacts.len(),
        1,
        "only the clean row was sent: {contacts:?}"
    );
    assert_eq!(contacts[0]["firstName"], "Multi\r\nLine\tTab");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_keep_ragged_rows_under_their_headers_with_line_and_reason_first() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,firstName,lastName\nshort@example.com\nlong@example.com,Lo,Ng,extra,more\nbad,Ann,Lee\n",
    )
    .unwrap();
    let rejects = dir.path().join("rejects.csv");
    let args = contacts_args(
        "L1",
        &input,
        &[
            "--dry-run",
            "--offline",
            "--rejects",
            rejects.to_str().unwrap(),
        ],
    );
    let (code, stdout, stderr) = run_bin("http://127.0.0.1:9", &args).await;
    assert_eq!(code, 6, "{stdout}{stderr}");
    let (header, rows) = raw_csv(&rejects);
    let text = |v: &[Vec<u8>]| -> Vec<String> {
        v.iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    };
    assert_eq!(
        text(&header),
        ["line", "reason", "email", "firstName", "lastName"]
    );
    assert_eq!(rows.len(), 3);
    assert_eq!(text(&rows[0][..1]), ["2"]);
    assert!(
        text(&rows[0])[1].contains("1 cells"),
        "{:?}",
        text(&rows[0])
    );
    assert_eq!(text(&rows[0][2..]), ["short@example.com"]);
    assert_eq!(
        text(&rows[1][2..]),
        ["long@example.com", "Lo", "Ng", "extra", "more"]
    );
    assert_eq!(text(&rows[2][2..]), ["bad", "Ann", "Lee"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_file_is_refused_naming_the_line_and_imports_with_encoding_latin1() {
    let sim = TestSim::start(fast_sim(0, 3)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("latin1.csv");
    // Written by a Windows CRM: é is 0xE9, € is 0x80 (windows-1252).
    std::fs::write(
        &input,
        b"email;firstName;city\nrenee@example.com;Ren\xe9e;Z\xfcrich \x80\nbad-address;Jos\xe9;\n",
    )
    .unwrap();
    let before = std::fs::read(&input).unwrap();

    let (code, stdout, stderr) = run_bin(&sim.base_url, &contacts_args(&loc, &input, &[])).await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains(":2:") && stderr.contains("--encoding") && stderr.contains("firstName"),
        "{stderr}"
    );
    assert_eq!(sim.sim.stats().requests, 0, "nothing sent");
    let (code, _, stderr) = run_bin(
        &sim.base_url,
        &contacts_args(&loc, &input, &["--dry-run", "--offline"]),
    )
    .await;
    assert_eq!(code, 2, "the dry run exits as the real run: {stderr}");
    let rejects = dir.path().join("latin1.csv.rejects.csv");
    let (_, rows) = raw_csv(&rejects);
    assert_eq!(rows[0][3], b"Ren\xe9e", "the original bytes, not U+FFFD");

    let (code, stdout, stderr) = run_bin(
        &sim.base_url,
        &contacts_args(&loc, &input, &["--encoding", "latin1"]),
    )
    .await;
    assert_eq!(code, 6, "one row has a bad email: {stdout}{stderr}");
    let c = by_email(&sim, "renee@example.com");
    assert_eq!(c[0]["firstName"], "Renée");
    assert_eq!(c[0]["city"], "Zürich €");
    let (header, rows) = raw_csv(&rejects);
    assert_eq!(
        header[2..],
        [b"email".to_vec(), b"firstName".to_vec(), b"city".to_vec()]
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0][3], b"Jos\xe9",
        "the rejected row keeps its latin1 bytes"
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

// Item 6 --------------------------------------------------------------------------------------

/// A fake of the two read-only calls a contacts dry run makes: `GET /locations/:id` answers
/// `status` with `country`, and the duplicate search finds nothing. Counts location calls.
struct FakeApi {
    base_url: String,
    location_calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn fake_api(status: u16, country: &'static str) -> FakeApi {
    use axum::extract::Path as UrlPath;
    use axum::http::StatusCode;
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new()
        .route(
            "/locations/{id}",
            get(move |UrlPath(id): UrlPath<String>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    let code = StatusCode::from_u16(status).unwrap();
                    let body = if status == 200 {
                        serde_json::json!({"location": {"id": id, "name": "Fake", "country": country, "timezone": "Europe/London"}})
                    } else {
                        serde_json::json!({"statusCode": status, "message": "The token is not authorized for this scope."})
                    };
                    (code, axum::Json(body))
                }
            }),
        )
        .route(
            "/contacts/search/duplicate",
            get(|| async { axum::Json(serde_json::json!({"contact": null})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    FakeApi {
        base_url: format!("http://{addr}"),
        location_calls: calls,
        _stop: tx,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn national_numbers_use_the_locations_country_without_default_country() {
    let api = fake_api(200, "GB").await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "email,phone\nann@example.com,07700 900123\n").unwrap();
    let summary = dir.path().join("s.json");
    let args = contacts_args(
        "locGB",
        &input,
        &["--dry-run", "--summary", summary.to_str().unwrap()],
    );
    let (code, stdout, stderr) = run_bin(&api.base_url, &args).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("default country GB (from the location)"),
        "{stdout}"
    );
    let s: Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(s["valid"], 1, "{s:#}");
    assert_eq!(
        s["defaultCountry"],
        serde_json::json!({"code": "GB", "from": "location"})
    );

    // --default-country wins, and an offline dry run asks nothing.
    let calls = api.location_calls.load(std::sync::atomic::Ordering::SeqCst);
    let args = contacts_args("locGB", &input, &["--dry-run", "--default-country", "GB"]);
    let (code, stdout, _) = run_bin(&api.base_url, &args).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("default country GB (from --default-country)"),
        "{stdout}"
    );
    let args = contacts_args("locGB", &input, &["--dry-run", "--offline"]);
    let (code, _, _) = run_bin(&api.base_url, &args).await;
    assert_eq!(
        code, 6,
        "offline: no country, the national number is rejected"
    );
    assert_eq!(
        api.location_calls.load(std::sync::atomic::Ordering::SeqCst),
        calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_country_refused_by_scope_warns_once_and_goes_on_without() {
    let api = fake_api(403, "").await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,phone\nann@example.com,07700 900123\nbob@example.com,+447700900124\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_bin(
        &api.base_url,
        &contacts_args("locX", &input, &["--dry-run"]),
    )
    .await;
    assert_eq!(code, 6, "the national number is rejected: {stdout}{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("country")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("--default-country"), "{stderr}");
    assert!(stdout.contains("1 valid"), "{stdout}");
    assert!(!stderr.contains("test-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_merged_into_a_write_the_api_refuses_were_missing_from_the_rejects_file() {
    // Every create is refused for good (422): the rejects file must hold every line of the
    // file, the lines merged into another one included, so that fixing and re-importing the
    // rejects loses none of their values.
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/locations/{id}",
            get(|| async {
                axum::Json(serde_json::json!({"location": {"id": "L", "country": "US"}}))
            }),
        )
        .route(
            "/contacts/",
            post(|| async {
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(serde_json::json!({
                        "statusCode": 422,
                        "message": ["property firstName should not exist"],
                        "error": "Unprocessable Entity"
                    })),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(
        &input,
        "email,firstName,tags\na@x.io,Ann,vip\nzed@x.io,Zed,\nA@X.IO,Anna,new\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_bin(&base, &contacts_args("L", &input, &[])).await;
    assert_eq!(code, 6, "{stdout}{stderr}");
    let rejects = std::fs::read_to_string(dir.path().join("in.csv.rejects.csv")).unwrap();
    let mut rdr = csv::Reader::from_reader(rejects.as_bytes());
    let rows: Vec<Vec<String>> = rdr
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect();
    let lines: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(sorted, ["2", "3", "4"], "{rejects}");
    let merged = rows.iter().find(|r| r[0] == "4").unwrap();
    assert!(merged[1].contains("merged into line 2"), "{merged:?}");
    assert_eq!(
        &merged[2..],
        ["A@X.IO", "Anna", "new"],
        "the line's own cells"
    );
}
