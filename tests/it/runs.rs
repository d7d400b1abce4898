//! Runs as an operator sees them (issue 11): what an export may delete under a shared OUT,
//! SIGTERM and SIGINT, a run refused by the lock, and pipeline files that are wrong in
//! several places or carry a pasted secret.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::common::*;
use contacts_etl::schema::Entity;
use contacts_etl::sim::SimConfig;

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

fn bin(args: &[&str], envs: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("HL_TOKEN")
        .env_remove("HL_BASE_URL")
        .env_remove("HL_LOCATION_ID")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

async fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    bin(args, envs).output().await.expect("the binary runs")
}

fn export_args<'a>(loc: &'a str, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--quiet",
        "export",
        "--location",
        loc,
        "--out",
        out.to_str().unwrap(),
        "--concurrency",
        "16",
    ];
    a.extend_from_slice(extra);
    a
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Every entity's rows of `loc` equal the simulator's, each exactly once.
fn assert_exactly_the_truth(out: &Path, sim: &TestSim, loc: &str) {
    let truth = truth(&sim.sim, loc);
    for entity in Entity::ALL {
        let got = keyed(entity, read_parquet(out, entity, loc));
        assert_same_rows(
            entity.name(),
            &truth.get(&entity).cloned().unwrap_or_default(),
            &got,
        );
    }
}

/// Names in `dir` ending in `.tmp`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the export of `loc` into `out` has committed some contacts.
async fn until_committed(out: &Path, loc: &str) -> u64 {
    let ck = out.join(format!("_state/location_id={loc}/checkpoint.json"));
    for _ in 0..600 {
        if let Some(n) = std::fs::read(&ck)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["contactsListed"].as_u64())
            .filter(|&n| n > 0)
        {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no commit within 30 s in {}", ck.display());
}

fn signal(child: &tokio::process::Child, sig: libc::c_int) {
    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) with the pid of our own child process; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_leaves_another_locations_temp_parts_and_other_tools_tmp_files_alone() {
    let (a, b) = ("locA0000000000000001", "locB0000000000000002");
    let sim = TestSim::start(SimConfig {
        locations: vec![a.into()],
        ..fast_sim(400, 11)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Location B's export in progress into the same OUT, and other tools' files.
    let theirs = [
        out.join(format!("contacts/location_id={b}/.part-00003.parquet.tmp")),
        out.join(format!(
            "deleted_contacts/location_id={b}/.part-00001.parquet.tmp"
        )),
        out.join(".part-x.tmp"),
        out.join("staging/.part-00000.parquet.tmp"),
        out.join(format!("contacts/location_id={a}/.part-x.tmp")),
    ];
    for f in &theirs {
        write(f, "not yours");
    }
    // What a killed export of A left: this one is A's to remove.
    let ours = write(
        &out.join(format!("tasks/location_id={a}/.part-00009.parquet.tmp")),
        "left by a killed run",
    );
    let envs = [("HL_TOKEN", "t"), ("HL_BASE_URL", sim.base_url.as_str())];
    let runs: [&[&str]; 3] = [
        // Stopped by its budget, then resumed, then started over.
        &[
            "--rate-limit",
            "off",
            "--daily-budget",
            "200",
            "--part-contacts",
            "50",
        ],
        &["--rate-limit", "off", "--part-contacts", "50"],
        &["--rate-limit", "off", "--part-contacts", "50", "--restart"],
    ];
    for (i, extra) in runs.into_iter().enumerate() {
        let o = run(&export_args(a, &out, extra), &envs).await;
        assert!(
            matches!(o.status.code(), Some(0 | 75)),
            "run {i}: {}",
            stderr(&o)
        );
        for f in &theirs {
            assert_eq!(
                std::fs::read_to_string(f).ok().as_deref(),
                Some("not yours"),
                "run {i} deleted {}",
                f.display()
            );
        }
        assert!(
            !ours.exists(),
            "run {i}: A's own leftover temp part is cleaned"
        );
    }
    assert_exactly_the_truth(&out, &sim, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_export_commits_reports_interrupted_exits_143_and_resumes() {
    let sim = TestSim::start(fast_sim(1_000, 12)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let envs = [("HL_TOKEN", "t"), ("HL_BASE_URL", sim.base_url.as_str())];
    // Paced so the run takes far longer than the wait for its first commit.
    let slow = [
        "--rate-limit",
        "200/1s",
        "--part-contacts",
        "50",
        "--commit-interval",
        "1",
    ];
    let mut child = bin(&export_args(&loc, &out, &slow), &envs).spawn().unwrap();
    let before = until_committed(&out, &loc).await;
    signal(&child, libc::SIGTERM);
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(143));

    let r = json(&out.join("_report.json"));
    assert_eq!(r["status"], "interrupted", "{r}");
    assert_eq!(r["exitCode"], 143);
    assert!(r["error"].as_str().unwrap().contains("SIGTERM"), "{r}");
    let ck = json(&out.join(format!("_state/location_id={loc}/checkpoint.json")));
    let committed = ck["contactsListed"].as_u64().unwrap();
    assert!(committed >= before && committed < 1_000, "{committed}");
    assert_eq!(r["contactsListed"].as_u64(), Some(committed));
    assert!(!out.join("_manifest.json").exists());
    for entity in Entity::ALL {
        let d = out.join(entity.name()).join(format!("location_id={loc}"));
        assert!(
            temp_files(&d).is_empty(),
            "parts were committed: {:?}",
            temp_files(&d)
        );
    }

    let o = run(
        &export_args(
            &loc,
            &out,
            &["--rate-limit", "off", "--part-contacts", "50"],
        ),
        &envs,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = json(&out.join("_report.json"));
    assert_eq!(r["status"], "complete");
    assert_eq!(r["resumed"], true);
    assert_exactly_the_truth(&out, &sim, &loc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_143_at_once_and_the_export_resumes_as_after_a_kill() {
    let sim = TestSim::start(fast_sim(600, 15)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let envs = [("HL_TOKEN", "t"), ("HL_BASE_URL", sim.base_url.as_str())];
    let slow = [
        "--rate-limit",
        "200/1s",
        "--part-contacts",
        "50",
        "--commit-interval",
        "1",
    ];
    let mut child = bin(&export_args(&loc, &out, &slow), &envs).spawn().unwrap();
    until_committed(&out, &loc).await;
    signal(&child, libc::SIGTERM);
    signal(&child, libc::SIGTERM);
    assert_eq!(child.wait().await.unwrap().code(), Some(143));
    let o = run(
        &export_args(
            &loc,
            &out,
            &["--rate-limit", "off", "--part-contacts", "50"],
        ),
        &envs,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_the_truth(&out, &sim, &loc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_a_pipeline_with_interrupted_reports_and_exit_130() {
    let locations = ["pipeA000000000000001", "pipeB000000000000002"];
    let sim = TestSim::start(SimConfig {
        locations: locations.map(String::from).to_vec(),
        ..fast_sim(600, 13)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let pipeline = |rate: &str| {
        format!(
            "name = \"p\"\n[api]\nrate_limit = \"{rate}\"\nconcurrency = 8\nparallel_locations = 1\n\
             [auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"{}\"\n[[locations]]\nid = \"{}\"\n\
             [export]\nout = \"out\"\npart_contacts = 50\ncommit_interval_secs = 1\n",
            locations[0], locations[1]
        )
    };
    let file = write(&dir.path().join("p.toml"), &pipeline("200/1s"));
    let out = dir.path().join("out");
    let envs = [("HL_TOKEN", "t"), ("HL_BASE_URL", sim.base_url.as_str())];
    let mut child = bin(&["--quiet", "run", file.to_str().unwrap()], &envs)
        .spawn()
        .unwrap();
    until_committed(&out, locations[0]).await;
    signal(&child, libc::SIGINT);
    assert_eq!(child.wait().await.unwrap().code(), Some(130));

    let r = json(&out.join("_pipeline_report.json"));
    assert_eq!(r["status"], "interrupted", "{r}");
    assert_eq!(r["exitCode"], 130);
    for l in r["locations"].as_array().unwrap() {
        assert_eq!(l["status"], "interrupted", "{l}");
    }
    let first = json(&out.join(format!("_state/location_id={}/report.json", locations[0])));
    assert_eq!(first["status"], "interrupted");

    write(&file, &pipeline("off"));
    let o = run(&["--quiet", "run", file.to_str().unwrap()], &envs).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        json(&out.join("_pipeline_report.json"))["status"],
        "complete"
    );
    for l in locations {
        assert_exactly_the_truth(&out, &sim, l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_refused_by_the_lock_leaves_the_running_exports_report_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let loc = "busy0000000000000001";
    let _running = contacts_etl::durable::lock::RunLock::acquire(
        &out.join(format!("_state/location_id={loc}/export.lock")),
    )
    .unwrap();
    let theirs = write(&out.join("_report.json"), "{\"status\":\"running's\"}");
    let custom = dir.path().join("custom-report.json");
    let o = run(
        &export_args(loc, &out, &["--report", custom.to_str().unwrap()]),
        &[("HL_TOKEN", "t"), ("HL_BASE_URL", "http://127.0.0.1:9")],
    )
    .await;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    let o = run(
        &export_args(loc, &out, &[]),
        &[("HL_TOKEN", "t"), ("HL_BASE_URL", "http://127.0.0.1:9")],
    )
    .await;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another run is in progress"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&theirs).unwrap(),
        "{\"status\":\"running's\"}"
    );
    assert!(!custom.exists());
}

#[tokio::test]
async fn validate_refuses_a_plain_http_base_url_to_a_remote_host_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let text = |url: &str| {
        format!("[api]\nbase_url = \"{url}\"\n[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"out\"\n")
    };
    let file = write(&dir.path().join("p.toml"), &text("http://203.0.113.7:8080"));
    let o = run(&["validate", file.to_str().unwrap()], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}:2: base_url:", file.display()))
            && err.contains("refusing to send the API token over plain http"),
        "{err}"
    );
    // `run` refuses it with the same words, before any request.
    let o = run(&["run", file.to_str().unwrap()], &[("HL_TOKEN", "t")]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing to send the API token over plain http"));

    for ok in [
        "http://127.0.0.1:8080",
        "http://localhost:1",
        "https://example.com",
    ] {
        write(&file, &text(ok));
        let o = run(&["validate", file.to_str().unwrap()], &[]).await;
        assert!(o.status.success(), "{ok}: {}", stderr(&o));
    }
}

#[tokio::test]
async fn validate_reports_every_problem_of_a_pipeline_file_not_only_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("p.toml"),
        "[api]\n\
         concurrency = 0\n\
         concurency = 4\n\
         timeout_secs = \"soon\"\n\
         [auth]\n\
         token_env = \"HL_TOKEN\"\n\
         [[locations]]\n\
         id = \"bad id\"\n\
         [[locations]]\n\
         id = \"L2\"\n\
         [export]\n\
         out = \"out\"\n\
         format = \"xlsx\"\n\
         daily_reserve_percent = 120.0\n",
    );
    let o = run(&["validate", file.to_str().unwrap()], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    let f = file.display();
    for (line, key) in [
        (2, "concurrency"),
        (3, "concurency"),
        (4, "timeout_secs"),
        (8, "id"),
        (13, "format"),
        (14, "daily_reserve_percent"),
    ] {
        assert!(
            err.contains(&format!("{f}:{line}: {key}:")),
            "{line} {key}:\n{err}"
        );
    }
    // In file order, one per line.
    let lines: Vec<usize> = err
        .lines()
        .filter_map(|l| l.split(&format!("{f}:")).nth(1))
        .filter_map(|rest| rest.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(lines, [2, 3, 4, 8, 13, 14], "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pasted_into_token_env_or_token_file_is_refused_and_never_echoed() {
    let sim = TestSim::start(fast_sim(10, 14)).await;
    let loc = sim.location();
    let pit = "pit-7d3f2a9e-1b4c-4e8a-9f21-0c5d6b7a8e90";
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJsb2NhdGlvbklkIjoiTDEifQ.c2lnbmF0dXJlc2lnbmF0dXJl";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases = [
        (
            format!("[[locations]]\nid = \"{loc}\"\ntoken_env = \"{pit}\"\n"),
            pit,
            3,
            "token_env",
        ),
        (
            format!("[auth]\ntoken_env = \"{pit}\"\n[[locations]]\nid = \"{loc}\"\n"),
            pit,
            2,
            "token_env",
        ),
        (
            format!("[[locations]]\nid = \"{loc}\"\ntoken_file = \"{jwt}\"\n"),
            jwt,
            3,
            "token_file",
        ),
    ];
    for (head, secret, line, key) in cases {
        let file = write(
            &dir.path().join("p.toml"),
            &format!("{head}[export]\nout = \"out\"\n"),
        );
        let where_ = format!("{}:{line}: {key}:", file.display());
        for cmd in ["validate", "run"] {
            let o = run(
                &[cmd, file.to_str().unwrap()],
                &[("HL_TOKEN", "t"), ("HL_BASE_URL", sim.base_url.as_str())],
            )
            .await;
            assert_eq!(o.status.code(), Some(2), "{cmd}: {}", stderr(&o));
            let (so, se) = (
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
            );
            assert!(
                se.contains(&where_) && se.contains("looks like a secret"),
                "{cmd}: {se}"
            );
            for (name, text) in [("stdout", &so), ("stderr", &se)] {
                assert!(
                    !text.contains(secret),
                    "{cmd} echoed the secret on {name}: {text}"
                );
                assert!(
                    !text.contains(&secret[..12]),
                    "{cmd} echoed part of the secret on {name}"
                );
            }
        }
        for entry in walk(&out) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(secret),
                "{} holds the secret",
                entry.display()
            );
        }
    }
    assert_eq!(sim.sim.stats().requests, 0, "nothing was run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pasted_as_token_file_was_echoed_on_stderr_and_in_the_report() {
    let sim = TestSim::start(fast_sim(5, 15)).await;
    let loc = sim.location();
    let pit = "pit-7d3f2a9e-1b4c-4e8a-9f21-0c5d6b7a8e90";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let input = write(
        &dir.path().join("in.csv"),
        "firstName,email\nAda,ada@example.com\n",
    );
    let base = sim.base_url.as_str();
    let runs: [Vec<&str>; 3] = [
        ["export", "--base-url", base, "--location", &loc, "--out"]
            .into_iter()
            .chain([out.to_str().unwrap(), "--token-file", pit])
            .collect(),
        [
            "import",
            "contacts",
            "--base-url",
            base,
            "--location",
            &loc,
            "--input",
        ]
        .into_iter()
        .chain([input.to_str().unwrap(), "--token-file", pit])
        .collect(),
        vec![
            "auth",
            "locations",
            "--client-id",
            "app-1",
            "--client-secret-file",
            pit,
            "--token-store",
            "tokens.json",
            "--base-url",
            base,
        ],
    ];
    for args in runs {
        let o = bin(&args, &[])
            .current_dir(dir.path())
            .output()
            .await
            .unwrap();
        let (so, se) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert_eq!(o.status.code(), Some(2), "{args:?}: {se}");
        assert!(se.contains("looks like a secret"), "{args:?}: {se}");
        for (name, text) in [("stdout", &so), ("stderr", &se)] {
            assert!(
                !text.contains(&pit[..12]),
                "{args:?} echoed the token on {name}: {text}"
            );
        }
    }
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&pit[..12]),
            "{} holds the token",
            entry.display()
        );
    }
    assert_eq!(sim.sim.stats().requests, 0, "nothing was run");
}

/// Every file under `dir` (none if it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}
