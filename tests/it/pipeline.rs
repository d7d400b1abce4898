//! Pipeline files: running them against the simulator, many locations at once, and every
//! way a file can be wrong.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::common::*;
use contacts_etl::app::pipeline;
use contacts_etl::sim::SimConfig;

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

async fn run_bin(args: &[&str], envs: &[(String, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("HL_TOKEN")
        .env_remove("HL_BASE_URL")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyst_pipeline_runs_against_the_simulator_with_only_the_environment_changed() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/analyst-parquet.toml"
    ))
    .unwrap();
    let location = "ve9EPM428h8vShlRW1KT";
    assert!(text.contains(location));
    // The file keeps the real limit (100/10s): a small location keeps the test short.
    let sim = TestSim::start(SimConfig {
        locations: vec![location.into()],
        ..fast_sim(30, 61)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "pipelines/analyst-parquet.toml", &text);
    let o = run_bin(
        &["run", file.to_str().unwrap()],
        &[
            ("HL_BASE_URL".into(), sim.base_url.clone()),
            ("HL_TOKEN".into(), "any".into()),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("analyst-out");
    let rows = read_parquet(&out, contacts_etl::schema::Entity::Contacts, location);
    assert_eq!(
        keyed(contacts_etl::schema::Entity::Contacts, rows).len(),
        30
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_pipeline_report.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_locations_each_stay_within_their_own_limit_while_the_total_exceeds_it() {
    let locations: Vec<String> = (0..20)
        .map(|i| format!("loc{i:02}aaaaaaaaaaaaaaaa"))
        .collect();
    // Per token (= per location): the real limit's shape (100 per window) with a 2 s window
    // instead of 10 s, so the test takes seconds.
    let limit = 100u32;
    let cfg = SimConfig {
        locations: locations.clone(),
        rate_limit: Some((limit, Duration::from_secs(2))),
        daily_quota: None,
        ..fast_sim(100, 71)
    };
    let sim = TestSim::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!("name = \"many\"\n[api]\nrate_limit = \"{limit}/2s\"\nconcurrency = 4\nmax_concurrency = 80\nparallel_locations = 20\n");
    let mut envs = vec![("HL_BASE_URL".to_owned(), sim.base_url.clone())];
    for (i, l) in locations.iter().enumerate() {
        text.push_str(&format!(
            "[[locations]]\nid = \"{l}\"\ntoken_env = \"TOKEN_{i}\"\n"
        ));
        envs.push((format!("TOKEN_{i}"), format!("token-{i}")));
    }
    text.push_str("[export]\nout = \"out\"\n");
    let file = write(dir.path(), "many.toml", &text);
    let o = run_bin(&["run", file.to_str().unwrap()], &envs).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let stats = sim.sim.stats();
    assert_eq!(
        stats.rate_limited, 0,
        "no location was pushed over its limit: {stats:?}"
    );
    assert!(
        stats.max_in_window <= u64::from(limit),
        "busiest 2 s of any one location: {}",
        stats.max_in_window
    );
    // The total exceeds one location's limit because the locations run at once, each paced
    // by its own limiter: every location started before any finished. Each needs over 300
    // requests, at least three of its 2 s windows, so this holds on any machine unless the
    // locations run one after another. (Order of the report's times, not a measured rate.)
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("out/_pipeline_report.json")).unwrap(),
    )
    .unwrap();
    let runs = report["locations"].as_array().unwrap();
    assert_eq!(runs.len(), locations.len());
    let at = |r: &serde_json::Value, key: &str| {
        contacts_etl::timefmt::parse_iso_millis(r[key].as_str().unwrap()).unwrap()
    };
    let last_start = runs.iter().map(|r| at(r, "startedAt")).max().unwrap();
    let first_end = runs.iter().map(|r| at(r, "finishedAt")).min().unwrap();
    assert!(
        last_start < first_end,
        "the twenty locations overlapped: the last started at {last_start}, the first finished at {first_end}"
    );
    for r in runs {
        let req = &r["requests"];
        assert!(
            req["attempts"].as_u64().unwrap() > u64::from(limit),
            "each location needed more than one window of requests: {req}"
        );
        // No 429 because each location's own limiter held requests back, not by luck.
        assert!(
            req["limiterWaitSecs"].as_f64().unwrap() > 0.0 && req["rateLimited"] == 0,
            "the client limiter paced {}: {req}",
            r["locationId"]
        );
    }
    for l in &locations {
        assert_eq!(
            read_parquet(
                &dir.path().join("out"),
                contacts_etl::schema::Entity::Contacts,
                l
            )
            .len(),
            100,
            "{l}"
        );
    }
}

/// The defect: every location of a pipeline ran on one thread, so blocking work in one
/// location (reading its token file, creating and fsyncing its files) held up all the others;
/// with 200 locations each used about 70% of its rate limit. A token file that is a named
/// pipe makes the blocking visible: nothing writes the token until the other location has
/// finished, which it can only do while the first one waits.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_waiting_for_its_token_file_does_not_hold_up_the_others() {
    let (waiting, other) = ("waitsForToken0000001", "runsMeanwhile0000002");
    let sim = TestSim::start(SimConfig {
        locations: vec![waiting.into(), other.into()],
        ..fast_sim(50, 91)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg("-m")
        .arg("600")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let text = format!(
        "parallel_locations = 2\n[[locations]]\nid = \"{waiting}\"\ntoken_file = \"{}\"\n[[locations]]\nid = \"{other}\"\ntoken_env = \"HL_TOKEN\"\n[export]\nout = \"out\"\nformat = \"csv\"\n",
        fifo.display()
    );
    let file = write(dir.path(), "p.toml", &format!("[api]\n{text}"));
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["--quiet", "run", file.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env("HL_BASE_URL", &sim.base_url)
        .env("HL_TOKEN", "t")
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    // The other location completes while the first waits for its token.
    let report = dir
        .path()
        .join(format!("out/_state/location_id={other}/report.json"));
    let deadline = tokio::time::Instant::now() + PROGRESS_DEADLINE;
    while !report.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{other} did not run while {waiting} waited for its token file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(done["status"], "complete", "{done}");
    // Now the token: opening the pipe for writing lets the waiting read finish.
    tokio::task::spawn_blocking(move || std::fs::write(fifo, "t\n").unwrap())
        .await
        .unwrap();
    let o = child.wait_with_output().await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for l in [waiting, other] {
        assert_eq!(
            read_csv(
                &dir.path().join("out"),
                contacts_etl::schema::Entity::Contacts,
                l
            )
            .len(),
            50,
            "{l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_location_does_not_stop_the_others_and_the_exit_code_says_partial() {
    let sim = TestSim::start(SimConfig {
        locations: vec!["goodA000000000000001".into(), "goodB000000000000002".into()],
        ..fast_sim(120, 81)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"goodA000000000000001\"\n[[locations]]\nid = \"notServed00000000003\"\n[[locations]]\nid = \"goodB000000000000002\"\n[export]\nout = \"out\"\nformat = \"csv\"\n";
    let file = write(dir.path(), "partial.toml", text);
    let o = run_bin(
        &["run", file.to_str().unwrap()],
        &[
            ("HL_BASE_URL".into(), sim.base_url.clone()),
            ("HL_TOKEN".into(), "t".into()),
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("out/_pipeline_report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["status"], "partial");
    let locs = report["locations"].as_array().unwrap();
    let failed: Vec<&serde_json::Value> =
        locs.iter().filter(|l| l["status"] != "complete").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["locationId"], "notServed00000000003");
    assert!(
        failed[0]["error"].as_str().unwrap().contains("403"),
        "{}",
        failed[0]
    );
    for l in ["goodA000000000000001", "goodB000000000000002"] {
        assert_eq!(
            read_csv(
                &dir.path().join("out"),
                contacts_etl::schema::Entity::Contacts,
                l
            )
            .len(),
            120
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_runs_of_one_pipeline_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.toml", "name = \"nightly\"\n[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"out\"\n");
    let _held = contacts_etl::durable::lock::RunLock::acquire(
        &dir.path().join("out/_state/pipeline-nightly.lock"),
    )
    .unwrap();
    let o = run_bin(
        &["run", file.to_str().unwrap()],
        &[
            ("HL_TOKEN".into(), "t".into()),
            ("HL_BASE_URL".into(), "http://127.0.0.1:9".into()),
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another run is in progress"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn every_error_in_a_pipeline_file_names_its_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"out\"\n";
    let cases: &[(&str, usize, &str, &str)] = &[
        ("[api]\nconcurency = 4\n", 2, "concurency", "unknown field"),
        (
            "[api]\nconcurrency = \"four\"\n",
            2,
            "concurrency",
            "invalid type",
        ),
        ("[api]\nconcurrency = 0\n", 2, "concurrency", "out of range"),
        ("[api]\nrate_limit = \"fast\"\n", 2, "rate_limit", "100/10s"),
        (
            "[api]\nbase_url = \"not a url\"\n",
            2,
            "base_url",
            "not a URL",
        ),
        (
            "[auth]\ntoken = \"pit-secret\"\n",
            2,
            "token",
            "must not be written",
        ),
    ];
    for (head, line, key, words) in cases {
        // The case's lines come first so its line numbers are the ones asserted.
        let text = if head.starts_with("[auth]") {
            format!("{head}[[locations]]\nid = \"L1\"\n[export]\nout = \"out\"\n")
        } else {
            format!("{head}{base}")
        };
        let p = write(dir.path(), "case.toml", &text);
        let all = pipeline::load(&p).unwrap_err();
        let e = all.first();
        assert_eq!((e.line, e.key.as_str()), (*line, *key), "{all}");
        assert!(
            e.to_string().contains(words)
                && e.to_string()
                    .starts_with(&format!("{}:{line}: {key}:", p.display())),
            "{e}"
        );
    }
    let tail: &[(&str, &str, &str)] = &[
        (
            "[export]\nout = \"out\"\nformat = \"xlsx\"\n",
            "format",
            "parquet or csv",
        ),
        (
            "[export]\nout = \"out\"\ninclude = [\"tasks\", \"deals\"]\n",
            "include",
            "deals",
        ),
        (
            "[export]\nout = \"out\"\ndaily_reserve_percent = 120.0\n",
            "daily_reserve_percent",
            "percentage",
        ),
    ];
    for (export, key, words) in tail {
        let text =
            format!("[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n{export}");
        let p = write(dir.path(), "case.toml", &text);
        let all = pipeline::load(&p).unwrap_err();
        let e = all.first();
        assert_eq!((e.line, e.key.as_str()), (7, *key), "{all}");
        assert!(e.to_string().contains(words), "{e}");
    }
    let p = write(
        dir.path(),
        "case.toml",
        "[[locations]]\nid = \"L1\"\n[export]\nout = \"o\"\n",
    );
    let all = pipeline::load(&p).unwrap_err();
    let e = all.first();
    assert!(
        e.to_string().contains("no token for location L1") && e.line == 2,
        "{e}"
    );
}

#[tokio::test]
async fn the_shipped_pipeline_files_are_valid() {
    for f in [
        "analyst-parquet.toml",
        "nightly-warehouse-export.toml",
        "migration-import.toml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("pipelines")
            .join(f);
        let o = run_bin(&["validate", path.to_str().unwrap()], &[]).await;
        assert!(o.status.success(), "{f}: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("ok"), "{f}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.toml", "[export]\nout = 1\n");
    let o = run_bin(&["validate", bad.to_str().unwrap()], &[]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bad.toml:2: out:"), "{}", stderr(&o));
}

#[tokio::test]
async fn shell_completions_are_printed() {
    let o = run_bin(&["completions", "bash"], &[]).await;
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("contacts-etl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_pipeline_dry_runs_first_then_imports() {
    let location = "ve9EPM428h8vShlRW1KT";
    let sim = TestSim::start(SimConfig {
        locations: vec![location.into()],
        ..fast_sim(0, 91)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    for f in [
        "migration-import.toml",
        "legacy-contacts.csv",
        "legacy-mapping.toml",
    ] {
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::copy(shipped.join(f), dir.path().join("pipelines").join(f)).unwrap();
    }
    let file = dir.path().join("pipelines/migration-import.toml");
    let envs = [
        ("HL_BASE_URL".to_owned(), sim.base_url.clone()),
        ("HL_TOKEN".to_owned(), "t".to_owned()),
    ];
    let o = run_bin(&["run", file.to_str().unwrap()], &envs).await;
    assert!(
        o.status.success(),
        "dry run: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    assert!(
        sim.sim.contacts(location).is_empty(),
        "a dry run writes nothing"
    );

    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("dry_run = true", "dry_run = false");
    std::fs::write(&file, text).unwrap();
    let o = run_bin(&["run", file.to_str().unwrap()], &envs).await;
    assert!(
        o.status.success(),
        "import: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let emails: std::collections::BTreeSet<String> = sim
        .sim
        .contacts(location)
        .iter()
        .filter_map(|c| c["email"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        emails,
        ["ada@example.com", "grace@example.com"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let grace = sim
        .sim
        .contacts(location)
        .into_iter()
        .find(|c| c["email"] == "grace@example.com")
        .unwrap();
    assert_eq!(
        grace["address1"], "1 Cobol Way\r\nSuite 2",
        "quoted newline kept"
    );
    assert!(
        grace["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "legacy-crm"),
        "mapping tags added: {grace}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_pipeline_runs_the_import_job_with_a_token_from_its_own_variable() {
    let sim = TestSim::start(fast_sim(0, 5)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "in.csv",
        "email,firstName\nann@example.com,Ann\nbob@example.com,Bob\nnot-an-email,X\n",
    );
    let file = write(
        dir.path(),
        "import.toml",
        &format!("[api]\nconcurrency = 2\nrate_limit = \"off\"\n[auth]\ntoken_env = \"ACME_TOKEN\"\n[[locations]]\nid = \"{loc}\"\n[import]\ninput = \"in.csv\"\nsettle_secs = 1\n"),
    );
    let envs = [
        ("HL_BASE_URL".to_owned(), sim.base_url.clone()),
        ("ACME_TOKEN".to_owned(), "any".to_owned()),
    ];
    let emails = || {
        let mut e: Vec<String> = sim
            .sim
            .contacts(&loc)
            .iter()
            .filter_map(|c| c["email"].as_str().map(str::to_owned))
            .collect();
        e.sort();
        e
    };
    for run in 0..2 {
        let o = run_bin(&["run", file.to_str().unwrap()], &envs).await;
        // One row rejected: exit 6, as `contacts-etl import` gives; the rerun resumes from the
        // journal and creates nothing twice.
        assert_eq!(o.status.code(), Some(6), "run {run}: {}", stderr(&o));
        assert_eq!(
            emails(),
            ["ann@example.com", "bob@example.com"],
            "run {run}"
        );
    }
    assert!(dir.path().join("in.csv.journal.jsonl").exists());
    let rejects = std::fs::read_to_string(dir.path().join("in.csv.rejects.csv")).unwrap();
    assert!(rejects.contains("not-an-email"), "{rejects}");
}
