//! `contacts-etl run --shard K/N`, the real binary against the simulator: N workers cover a
//! pipeline's locations exactly once, the worker index comes from JOB_COMPLETION_INDEX when
//! omitted, bad values are refused before anything is done, and two workers handed one
//! location do not both run it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;
use contacts_etl::app::pipeline::shard::shard_of;
use contacts_etl::schema::Entity;
use contacts_etl::sim::SimConfig;
use serde_json::{json, Value};

/// Contacts per location: tiny, so 36 worker runs take seconds.
const CONTACTS: usize = 3;

fn location_ids() -> Vec<String> {
    (0..10)
        .map(|i| format!("shard{i:02}location0000"))
        .collect()
}

/// An export pipeline "agency" over `locations` into `out` (relative to the file), CSV
/// without children, unpaced.
fn pipeline(dir: &Path, file: &str, locations: &[String], out: &str) -> PathBuf {
    let mut text = String::from(
        "name = \"agency\"\n[api]\nrate_limit = \"off\"\nconcurrency = 4\n[auth]\ntoken_env = \"HL_TOKEN\"\n",
    );
    for l in locations {
        text.push_str(&format!("[[locations]]\nid = \"{l}\"\n"));
    }
    text.push_str(&format!(
        "[export]\nout = \"{out}\"\nformat = \"csv\"\ninclude = [\"none\"]\n"
    ));
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

/// The binary with `args`, against `base_url`, JOB_COMPLETION_INDEX as given (unset if
/// `None`).
fn cmd(args: &[&str], base_url: &str, index: Option<&str>) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.args(args)
        .env("HL_TOKEN", "test-token")
        .env("HL_BASE_URL", base_url)
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    if let Some(i) = index {
        c.env("JOB_COMPLETION_INDEX", i);
    }
    c
}

async fn run(args: &[&str], base_url: &str, index: Option<&str>) -> Output {
    cmd(args, base_url, index).output().await.unwrap()
}

fn json_file(p: &Path) -> Value {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap()
}

fn shard_report(out: &Path, k: u32, n: u32) -> Value {
    json_file(&out.join(format!("_pipeline_report.shard-{k}-of-{n}.json")))
}

fn location_ids_in(report: &Value) -> Vec<String> {
    report["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["locationId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_workers_cover_every_location_exactly_once_for_n_from_1_to_8() {
    let locations = location_ids();
    let sim = TestSim::start(SimConfig {
        locations: locations.clone(),
        ..fast_sim(CONTACTS, 14)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut empty_shards = 0;
    for n in 1..=8u32 {
        let out = dir.path().join(format!("out{n}"));
        let file = pipeline(
            dir.path(),
            &format!("p{n}.toml"),
            &locations,
            &format!("out{n}"),
        );
        let mut ran_by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for k in 0..n {
            let shard = format!("{k}/{n}");
            let o = run(
                &["run", file.to_str().unwrap(), "--shard", &shard],
                &sim.base_url,
                None,
            )
            .await;
            assert_eq!(o.status.code(), Some(0), "{shard}: {}", stderr(&o));
            let r = shard_report(&out, k, n);
            assert_eq!(r["shard"], json!({"index": k, "count": n}), "{shard}");
            assert_eq!(
                (&r["status"], &r["exitCode"]),
                (&json!("complete"), &json!(0))
            );
            let ids = location_ids_in(&r);
            if ids.is_empty() {
                empty_shards += 1;
                assert!(
                    stderr(&o).contains(&format!("shard {shard} has no location")),
                    "a worker with nothing to do says so: {}",
                    stderr(&o)
                );
            }
            for id in ids {
                ran_by.entry(id).or_default().push(k);
            }
        }
        // Every location ran, in exactly one worker: the one its hash names.
        assert_eq!(
            ran_by.keys().collect::<Vec<_>>(),
            locations.iter().collect::<Vec<_>>(),
            "N = {n}"
        );
        for (id, workers) in &ran_by {
            assert_eq!(workers, &[shard_of(id, n)], "{id} with N = {n}");
            assert_eq!(
                read_csv(&out, Entity::Contacts, id).len(),
                CONTACTS,
                "{id} with N = {n}"
            );
            let own = json_file(&out.join(format!("_state/location_id={id}/report.json")));
            assert_eq!(own["status"], "complete", "{id} with N = {n}");
        }
        // The unsharded report is not written by a sharded worker.
        assert!(!out.join("_pipeline_report.json").exists(), "N = {n}");
    }
    // These ids leave some workers without a location (N = 5 and 7): that path ran too.
    assert!(empty_shards > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_index_comes_from_job_completion_index_when_k_is_omitted() {
    let locations = location_ids();
    let sim = TestSim::start(SimConfig {
        locations: locations.clone(),
        ..fast_sim(CONTACTS, 15)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline(dir.path(), "p.toml", &locations, "out");
    let out = dir.path().join("out");
    let mut covered = Vec::new();
    for k in 0..3u32 {
        let index = k.to_string();
        let o = run(
            &["--quiet", "run", file.to_str().unwrap(), "--shard", "/3"],
            &sim.base_url,
            Some(&index),
        )
        .await;
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let r = shard_report(&out, k, 3);
        assert_eq!(r["shard"], json!({"index": k, "count": 3}));
        let ids = location_ids_in(&r);
        assert!(ids.iter().all(|id| shard_of(id, 3) == k), "{ids:?}");
        covered.extend(ids);
    }
    covered.sort();
    assert_eq!(covered, locations);

    // A K given on the command line wins over the variable, with a warning (an Indexed Job
    // whose pods all name one shard runs none of the others).
    let o = run(
        &["run", file.to_str().unwrap(), "--shard", "0/3"],
        &sim.base_url,
        Some("2"),
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("runs worker 0, not the JOB_COMPLETION_INDEX=2"),
        "{}",
        stderr(&o)
    );
    assert_eq!(shard_report(&out, 0, 3)["shard"]["index"], 0);

    // `validate --shard` shows the same split.
    let o = run(
        &["validate", file.to_str().unwrap(), "--shard", "/3"],
        &sim.base_url,
        Some("1"),
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mine: Vec<&String> = locations.iter().filter(|l| shard_of(l, 3) == 1).collect();
    let listed = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        listed.contains(&format!("shard 1/3: {} of 10 location(s): ", mine.len()))
            && mine.iter().all(|l| listed.contains(l.as_str())),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_malformed_shard_is_refused_with_exit_2_before_anything_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline(dir.path(), "p.toml", &location_ids(), "out");
    let file = file.to_str().unwrap();
    // Nothing listens there: a refused run sends nothing anyway.
    let nowhere = "http://127.0.0.1:9";
    for index in [None, Some(""), Some("x"), Some("-1"), Some("3"), Some(" 1")] {
        let o = run(&["run", file, "--shard", "/3"], nowhere, index).await;
        assert_eq!(o.status.code(), Some(2), "{index:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("JOB_COMPLETION_INDEX") && e.contains("hint:"),
            "{index:?}: {e}"
        );
    }
    for shard in ["3", "3/3", "0/0", "/0", "a/3", "1/", "-1/3", ""] {
        let flag = format!("--shard={shard}");
        let o = run(&["run", file, &flag], nowhere, Some("0")).await;
        assert_eq!(o.status.code(), Some(2), "{shard:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--shard"), "{shard:?}: {}", stderr(&o));
    }
    // An import pipeline has one location: nothing to split.
    std::fs::write(dir.path().join("in.csv"), "email\nann@example.com\n").unwrap();
    let import = dir.path().join("import.toml");
    std::fs::write(
        &import,
        "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[import]\ninput = \"in.csv\"\n",
    )
    .unwrap();
    let o = run(
        &["run", import.to_str().unwrap(), "--shard", "0/1"],
        nowhere,
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--shard"), "{}", stderr(&o));
    assert!(!dir.path().join("out").exists(), "nothing was written");
}

/// A loopback TCP gate in front of the simulator: connections are accepted at once but
/// forwarded only once it is opened, so a run waits on its first reply, holding its locks,
/// for exactly as long as the test wants.
struct Gate {
    url: String,
    open: tokio::sync::watch::Sender<bool>,
}

async fn gate(to: &str) -> Gate {
    let target = to.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (open, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut rx = rx.clone();
            let target = target.clone();
            tokio::spawn(async move {
                if rx.wait_for(|open| *open).await.is_err() {
                    return;
                }
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Gate { url, open }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_handed_the_same_location_one_runs_and_the_other_exits_8() {
    // A location that shard 0 of 2 and shard 0 of 3 both own: two workers of differently
    // sized deployments (a resize while one still runs) are handed it.
    let loc = (0..100)
        .map(|i| format!("busy{i:02}location00000"))
        .find(|l| shard_of(l, 2) == 0 && shard_of(l, 3) == 0)
        .expect("some id hashes to shard 0 of both");
    let sim = TestSim::start(SimConfig {
        locations: vec![loc.clone()],
        ..fast_sim(CONTACTS, 16)
    })
    .await;
    let gate = gate(&sim.base_url).await;
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline(dir.path(), "p.toml", std::slice::from_ref(&loc), "out");
    let file = file.to_str().unwrap();
    let out = dir.path().join("out");

    // The first worker takes the location's lock, then waits at the closed gate.
    let mut first = cmd(&["run", file, "--shard", "0/2"], &gate.url, None)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lock = out.join(format!("_state/location_id={loc}/export.lock"));
    let deadline = tokio::time::Instant::now() + PROGRESS_DEADLINE;
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first worker ended before taking the location's lock"
        );
        assert!(tokio::time::Instant::now() < deadline, "no lock taken");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    // The second is refused by the location's lock: nothing done, exit 8.
    let o = run(&["run", file, "--shard", "0/3"], &sim.base_url, None).await;
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another run is in progress"),
        "{}",
        stderr(&o)
    );
    let r = shard_report(&out, 0, 3);
    assert_eq!((&r["status"], &r["exitCode"]), (&json!("busy"), &json!(8)));
    assert_eq!(r["locations"][0]["status"], "busy");
    assert!(first.try_wait().unwrap().is_none(), "the first still runs");

    // The first, let through, completes the location.
    gate.open.send(true).unwrap();
    let o = first.wait_with_output().await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(shard_report(&out, 0, 2)["status"], "complete");
    assert_eq!(read_csv(&out, Entity::Contacts, &loc).len(), CONTACTS);
    let own = json_file(&out.join(format!("_state/location_id={loc}/report.json")));
    assert_eq!(
        own["status"], "complete",
        "the refused worker left it alone"
    );
}
