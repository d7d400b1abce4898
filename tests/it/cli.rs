//! The binary as a user runs it: help, exit codes, messages, and secrets kept out of output.

use std::process::Output;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

async fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("HL_TOKEN")
        .env_remove("HL_BASE_URL")
        .env_remove("HL_LOCATION_ID")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().await.expect("the binary runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn help_teaches_the_commands_and_flags() {
    let o = run(&["--help"], &[]).await;
    let (out, _) = text(&o);
    assert!(o.status.success());
    for word in ["export", "sim", "demo", "HL_TOKEN"] {
        assert!(out.contains(word), "--help mentions {word}:\n{out}");
    }
    let o = run(&["export", "--help"], &[]).await;
    let (out, _) = text(&o);
    for flag in [
        "--location",
        "--business",
        "--include",
        "--format",
        "--out",
        "--concurrency",
        "--rate-limit",
        "--base-url",
        "--token-file",
        "HL_BASE_URL",
        "location_id=",
        "_manifest.json",
    ] {
        assert!(out.contains(flag), "export --help mentions {flag}:\n{out}");
    }
}

#[tokio::test]
async fn missing_token_is_a_usage_error_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "export",
            "--location",
            "L",
            "--out",
            dir.path().to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("HL_TOKEN") && err.contains("--token-file"),
        "{err}"
    );
}

#[tokio::test]
async fn token_is_never_sent_over_plain_http_to_a_remote_host() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "export",
            "--location",
            "L",
            "--out",
            dir.path().to_str().unwrap(),
            "--base-url",
            "http://services.leadconnectorhq.com",
        ],
        &[("HL_TOKEN", "pit-abc")],
    )
    .await;
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("plain http"), "{err}");
    assert!(!err.contains("pit-abc"));
}

#[tokio::test]
async fn bad_flag_values_name_the_flag() {
    let o = run(
        &[
            "export",
            "--location",
            "L",
            "--out",
            "x",
            "--rate-limit",
            "fast",
        ],
        &[],
    )
    .await;
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("--rate-limit") && err.contains("100/10s"),
        "{err}"
    );
    let o = run(
        &[
            "export",
            "--location",
            "L",
            "--out",
            "x",
            "--include",
            "tasks,deals",
        ],
        &[],
    )
    .await;
    let (_, err) = text(&o);
    assert!(err.contains("--include") && err.contains("deals"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_through_the_binary_logs_no_token_and_writes_the_layout() {
    let sim = TestSim::start(fast_sim(300, 9)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let token = "pit-SUPER-SECRET-TOKEN-123";
    let o = run(
        &[
            "-vv",
            "export",
            "--location",
            &sim.location(),
            "--out",
            out.to_str().unwrap(),
            "--format",
            "csv",
            "--rate-limit",
            "off",
        ],
        &[("HL_TOKEN", token), ("HL_BASE_URL", &sim.base_url)],
    )
    .await;
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        !stdout.contains("SUPER-SECRET") && !stderr.contains("SUPER-SECRET"),
        "the token leaked into output"
    );
    assert!(
        stderr.contains("export complete"),
        "closing summary:\n{stderr}"
    );
    for entity in ["contacts", "tasks", "notes", "appointments"] {
        let dir = out
            .join(entity)
            .join(format!("location_id={}", sim.location()));
        assert!(dir.join("part-00000.csv").exists(), "{}", dir.display());
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["entities"]["contacts"]["rows"], 300);
    assert!(!serde_json::to_string(&manifest)
        .unwrap()
        .contains("SUPER-SECRET"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_the_token_cannot_access_exits_3_and_writes_no_manifest() {
    let sim = TestSim::start(fast_sim(10, 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "export",
            "--location",
            "someoneElsesLocation",
            "--out",
            dir.path().to_str().unwrap(),
        ],
        &[("HL_TOKEN", "t"), ("HL_BASE_URL", &sim.base_url)],
    )
    .await;
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("403") && err.contains("POST /contacts/search"),
        "names the request and status: {err}"
    );
    assert!(
        !err.contains("scope"),
        "no access to the location is not a missing scope: {err}"
    );
    assert!(!dir.path().join("_manifest.json").exists());
}

#[tokio::test]
async fn demo_runs_without_credentials_and_says_how_to_read_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo-out");
    let o = run(
        &["demo", "--contacts", "400", "--out", out.to_str().unwrap()],
        &[],
    )
    .await;
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("read_parquet") && stdout.contains("pandas"),
        "{stdout}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["entities"]["contacts"]["rows"], 400);
}
