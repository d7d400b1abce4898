//! `--table delta`: nightly runs into one Delta table per entity, read back through the
//! `deltalake` crate (the table's latest snapshot, its file list read with the Parquet reader
//! of `common`), and compared with what the runs' manifests list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use contacts_etl::dest::Dest;
use contacts_etl::schema::Entity;
use serde_json::Value;

fn manifest(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap()
}

/// The table's latest snapshot: its version and its files (paths relative to OUT).
async fn snapshot(out: &Path, entity: &str) -> Option<(i64, BTreeSet<String>)> {
    let table = contacts_etl::delta::open_table(&Dest::local(out), entity)
        .await
        .unwrap()?;
    let version = table.version().unwrap() as i64;
    let root = std::fs::canonicalize(out).unwrap();
    let files = table
        .get_file_uris()
        .unwrap()
        .map(|uri| {
            let path = url::Url::parse(&uri)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .unwrap_or_else(|| PathBuf::from(&uri));
            path.strip_prefix(&root)
                .unwrap_or_else(|_| panic!("{uri} is not under {}", root.display()))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    Some((version, files))
}

/// Every action of the table's log, in version order.
fn log_actions(out: &Path, entity: &str) -> Vec<Value> {
    let dir = out.join(entity).join("_delta_log");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    logs.sort();
    logs.iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn entity(name: &str) -> Entity {
    Entity::ALL
        .into_iter()
        .chain([Entity::DeletedContacts, Entity::CustomFields])
        .find(|e| e.name() == name)
        .unwrap()
}

/// What one manifest lists per entity: files and rows.
fn listed(m: &Value) -> BTreeMap<String, (Vec<String>, u64)> {
    m["entities"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, e)| {
            let files = e["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["path"].as_str().unwrap().to_owned())
                .collect();
            (name.clone(), (files, e["rows"].as_u64().unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nightly_runs_one_killed_and_resumed_make_exactly_five_commits_of_the_manifests_rows()
{
    let sim = TestSim::start(fast_sim(2_000, 141)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lake");
    let flags = [
        "--incremental",
        "--full-walk-every",
        "1",
        "--table",
        "delta",
        "--part-contacts",
        "300",
    ];
    // Per entity: every file the runs' manifests list, the rows they hold, and the runs.
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rows: BTreeMap<String, u64> = BTreeMap::new();
    let mut runs: BTreeMap<String, i64> = BTreeMap::new();
    for night in 1..=5u64 {
        if night > 1 {
            sim.sim.mutate(&loc, 0.05, 4, 500 + night);
        }
        if night == 3 {
            let before = snapshot(&out, "contacts").await.unwrap().0;
            // Slow answers, so that the kill lands in the listing, long before the commit.
            sim.sim.set_faults(contacts_etl::sim::Faults {
                slow_rate: 1.0,
                slow_delay: Duration::from_millis(5),
                ..Default::default()
            });
            let mark = sim.sim.stats().requests + 4;
            let mut child = export_cmd(&sim, &out, &flags).spawn().unwrap();
            tokio::select! {
                status = child.wait() => panic!("night 3 ended ({:?}) before its kill", status.unwrap()),
                () = until_requests(&sim.sim, mark, "night 3's kill mark") => {
                    child.start_kill().unwrap(); // SIGKILL
                    child.wait().await.unwrap();
                }
            }
            sim.sim.set_faults(Default::default());
            assert!(!out.join("_manifest.json").exists());
            // Readers still see night 2's snapshot: nothing of the killed attempt.
            assert_eq!(snapshot(&out, "contacts").await.unwrap().0, before);
        }
        let o = run_to_end(&sim, &out, &flags).await;
        assert!(o.status.success(), "night {night}: {}", stderr(&o));
        let m = manifest(&out);
        if night == 3 {
            assert_eq!(m["resumed"], 1, "night 3 resumed the killed attempt: {m}");
        }
        for (name, (f, r)) in listed(&m) {
            files.entry(name.clone()).or_default().extend(f);
            *rows.entry(name.clone()).or_default() += r;
            *runs.entry(name).or_default() += 1;
        }
    }
    assert_eq!(runs["contacts"], 5);
    for (name, listed_files) in &files {
        let (version, in_table) = snapshot(&out, name).await.unwrap();
        // One commit per run that wrote the entity: versions 0..runs.
        assert_eq!(version + 1, runs[name], "{name}: one commit per run");
        let listed_set: BTreeSet<String> = listed_files.iter().cloned().collect();
        assert_eq!(
            listed_set.len(),
            listed_files.len(),
            "{name}: no file in two runs"
        );
        assert_eq!(
            in_table, listed_set,
            "{name}: the table holds exactly the runs' files"
        );
        let paths: Vec<PathBuf> = in_table.iter().map(|f| out.join(f)).collect();
        let read = read_parquet_files(entity(name), &paths);
        assert_eq!(read.len() as u64, rows[name], "{name}: rows");
        // Partition values and the exactly-once markers in the log.
        let actions = log_actions(&out, name);
        let app = format!("contacts-etl:{loc}:{name}");
        let txns: Vec<i64> = actions
            .iter()
            .filter(|a| a["txn"]["appId"] == app.as_str())
            .map(|a| a["txn"]["version"].as_i64().unwrap())
            .collect();
        assert_eq!(txns.len() as i64, runs[name], "{name}: {txns:?}");
        for add in actions.iter().filter_map(|a| a.get("add")) {
            let pv = &add["partitionValues"];
            assert_eq!(pv["location_id"], loc.as_str(), "{add}");
            assert_eq!(pv["export_date"].as_str().unwrap().len(), 10, "{add}");
            assert!(
                add["stats"].as_str().unwrap().contains("numRecords"),
                "{add}"
            );
        }
    }
    // The contacts table's rows: every night's new and changed contacts, each row once.
    let paths: Vec<PathBuf> = files["contacts"].iter().map(|f| out.join(f)).collect();
    let all = read_parquet_files(Entity::Contacts, &paths);
    let truth = truth(&sim.sim, &loc);
    let latest: BTreeSet<String> = all.iter().map(|r| r["id"].clone().unwrap()).collect();
    // Every live contact has at least one row (the first night's full run wrote them all).
    for id in truth[&Entity::Contacts].keys() {
        assert!(
            latest.contains(id),
            "contact {id} is missing from the table"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumed_after_its_delta_commit_does_not_commit_again() {
    let sim = TestSim::start(fast_sim(500, 142)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lake");
    let flags = ["--table", "delta"];
    let o = run_to_end(&sim, &out, &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let first = manifest(&out);
    let before = snapshot(&out, "contacts").await.unwrap();
    assert_eq!(before.0, 0);
    // What a kill between the Delta commit and the manifest leaves: the commit made, the
    // manifest not written, the checkpoint not marked complete.
    std::fs::remove_file(out.join("_manifest.json")).unwrap();
    let ck_path = out
        .join("_state")
        .join(format!("location_id={loc}"))
        .join("checkpoint.json");
    let mut ck: Value = serde_json::from_slice(&std::fs::read(&ck_path).unwrap()).unwrap();
    ck["complete"] = Value::Bool(false);
    std::fs::write(&ck_path, serde_json::to_vec(&ck).unwrap()).unwrap();

    let o = run_to_end(&sim, &out, &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = manifest(&out);
    assert_eq!(resumed["resumed"], 1);
    assert_eq!(resumed["entities"], first["entities"]);
    // No second commit: the same version, the same files.
    assert_eq!(snapshot(&out, "contacts").await.unwrap(), before);

    // The next run is a new one: its own commit, beside the first run's files.
    let o = run_to_end(&sim, &out, &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let (version, files) = snapshot(&out, "contacts").await.unwrap();
    assert_eq!(version, 1);
    assert!(
        files.is_superset(&before.1),
        "the first run's files stay in the table"
    );
    assert_eq!(files.len(), 2 * before.1.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_locations_committing_into_one_table_at_once_both_land() {
    let (a, b) = ("deltaA00000000000001", "deltaB00000000000002");
    let sim = TestSim::start(contacts_etl::sim::SimConfig {
        locations: vec![a.into(), b.into()],
        ..fast_sim(400, 143)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lake");
    let cmd = |loc: &str| {
        let mut c = tokio::process::Command::new(BIN);
        c.args([
            "--quiet",
            "export",
            "--location",
            loc,
            "--out",
            out.to_str().unwrap(),
            "--rate-limit",
            "off",
            "--table",
            "delta",
            "--report",
        ])
        .arg(dir.path().join(format!("{loc}.json")))
        .env("HL_TOKEN", "test-token")
        .env("HL_BASE_URL", &sim.base_url)
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
        c
    };
    let (oa, ob) = tokio::join!(cmd(a).output(), cmd(b).output());
    let (oa, ob) = (oa.unwrap(), ob.unwrap());
    assert!(oa.status.success(), "{}", stderr(&oa));
    assert!(ob.status.success(), "{}", stderr(&ob));
    let (version, files) = snapshot(&out, "contacts").await.unwrap();
    assert_eq!(version, 1, "two commits, one per location");
    for loc in [a, b] {
        assert!(
            files
                .iter()
                .any(|f| f.contains(&format!("location_id={loc}/"))),
            "{loc}'s files are in the table: {files:?}"
        );
    }
}

#[tokio::test]
async fn table_delta_with_csv_is_refused_before_any_request() {
    let sim = TestSim::start(fast_sim(10, 144)).await;
    let dir = tempfile::tempdir().unwrap();
    let o = run_to_end(&sim, dir.path(), &["--table", "delta", "--format", "csv"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--format parquet"), "{}", stderr(&o));
    assert_eq!(sim.sim.stats().requests, 0);
}

/// The rows of the location in a current-state table `OUT/current/<entity>`.
async fn current_rows(out: &Path, e: Entity) -> (i64, Vec<Row>) {
    let (version, files) = snapshot(out, &format!("current/{}", e.name()))
        .await
        .unwrap();
    let paths: Vec<PathBuf> = files.iter().map(|f| out.join(f)).collect();
    (version, read_parquet_files(e, &paths))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merged_current_state_table_equals_a_fresh_full_export() {
    let sim = TestSim::start(fast_sim(1_500, 145)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lake");
    let flags = [
        "--incremental",
        "--full-walk-every",
        "1",
        "--table",
        "delta",
        "--merge",
        "--part-contacts",
        "400",
    ];
    for night in 1..=4u64 {
        if night > 1 {
            let (_, deleted) = sim.sim.mutate(&loc, 0.05, 6, 700 + night);
            assert!(!deleted.is_empty());
        }
        let o = run_to_end(&sim, &out, &flags).await;
        assert!(o.status.success(), "night {night}: {}", stderr(&o));
    }
    let truth = truth(&sim.sim, &loc);
    for e in Entity::ALL {
        let (version, rows) = current_rows(&out, e).await;
        assert_eq!(version, 3, "{}: one commit per night", e.name());
        assert_same_rows(
            &format!("current/{}", e.name()),
            &truth[&e],
            &keyed(e, rows),
        );
    }
    // A resumed run whose merge already landed does not merge twice.
    std::fs::remove_file(out.join("_manifest.json")).unwrap();
    let ck_path = out
        .join("_state")
        .join(format!("location_id={loc}"))
        .join("checkpoint.json");
    let mut ck: Value = serde_json::from_slice(&std::fs::read(&ck_path).unwrap()).unwrap();
    ck["complete"] = Value::Bool(false);
    std::fs::write(&ck_path, serde_json::to_vec(&ck).unwrap()).unwrap();
    let o = run_to_end(&sim, &out, &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let (version, rows) = current_rows(&out, Entity::Contacts).await;
    assert_eq!(version, 3);
    assert_same_rows(
        "current/contacts after the resume",
        &truth[&Entity::Contacts],
        &keyed(Entity::Contacts, rows),
    );
}

#[tokio::test]
async fn merge_without_table_delta_is_refused() {
    let sim = TestSim::start(fast_sim(10, 146)).await;
    let dir = tempfile::tempdir().unwrap();
    let o = run_to_end(&sim, dir.path(), &["--merge"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--table"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_tables_in_a_bucket_read_back_as_tables() {
    let sim = TestSim::start(fast_sim(600, 147)).await;
    let loc = sim.location();
    let s3 = crate::common::s3::S3::start().await;
    let work = tempfile::tempdir().unwrap();
    let flags = [
        "--incremental",
        "--full-walk-every",
        "1",
        "--table",
        "delta",
        "--merge",
    ];
    let mut files = BTreeSet::new();
    for night in 1..=2u64 {
        if night == 2 {
            sim.sim.mutate(&loc, 0.05, 3, 900);
        }
        let o = crate::common::s3::s3_export(&sim, &s3, "lake", work.path(), &flags)
            .output()
            .await
            .unwrap();
        assert!(o.status.success(), "night {night}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("ERROR"),
            "night {night}: {}",
            stderr(&o)
        );
        let (f, _) = listed(&manifest(&s3.dir("lake")))
            .remove("contacts")
            .unwrap();
        files.extend(f);
    }
    // The bucket's objects are files under the server's root: the bucket's prefix reads as
    // OUT.
    let out = s3.dir("lake");
    let (version, in_table) = snapshot(&out, "contacts").await.unwrap();
    assert_eq!(version, 1);
    assert_eq!(in_table, files);
    let truth = truth(&sim.sim, &loc);
    for e in Entity::ALL {
        let (version, rows) = current_rows(&out, e).await;
        assert_eq!(version, 1, "{}", e.name());
        assert_same_rows(
            &format!("current/{} in the bucket", e.name()),
            &truth[&e],
            &keyed(e, rows),
        );
    }
}
