//! Exports into a bucket (`--out s3://…`) against an S3-compatible server the test starts on
//! loopback (`s3s-fs`, in this process, storing objects as files under a temporary
//! directory): killed and resumed, read back row for row, never a part visible before its
//! upload completed, two runs of one location refusing each other through the bucket.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::common::*;
use contacts_etl::schema::Entity;

use crate::common::s3::*;

/// Every part file in `dir` (recursively) is a whole Parquet file: its footer reads.
fn every_visible_part_is_whole(dir: &Path) -> Result<usize, String> {
    let mut seen = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("part-") && name.ends_with(".parquet")) {
                continue;
            }
            // The server renames a completed object into place; a file gone meanwhile was
            // deleted (an uncommitted part of a killed attempt) and is not a torn read.
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(
                |e| {
                    format!(
                        "{} is visible but not a whole Parquet file: {e}",
                        p.display()
                    )
                },
            )?;
            seen += 1;
        }
    }
    Ok(seen)
}

/// Kills an export into a bucket three times at points of its progress, each attempt on a
/// new work directory (a new machine: the state comes from the bucket alone), then lets it
/// finish: the bucket holds exactly the rows of the simulator, each once, and while it ran
/// no part was ever visible before its upload completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_to_s3_killed_three_times_and_resumed_holds_exactly_the_rows_of_a_clean_run() {
    let sim = TestSim::start(fast_sim(2_000, 31)).await;
    let s3 = S3::start().await;
    let contacts = 2_000u64;
    // Per contact children: 3 requests a contact, 20 list pages.
    let needed = contacts.div_ceil(100) + 3 * contacts;
    let flags = [
        "--children-by",
        "contact",
        "--listing",
        "get",
        "--part-contacts",
        "200",
        "--commit-interval",
        "1",
    ];
    // Watches the bucket the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, dir) = (stop.clone(), s3.dir("nightly"));
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::Relaxed) {
                most = most.max(every_visible_part_is_whole(&dir)?);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok::<usize, String>(most)
        })
    };
    let mut rng = Lcg(0x53);
    for i in 0..3 {
        let work = tempfile::tempdir().unwrap();
        let start = sim.sim.stats().requests;
        // Each attempt gets at most a sixth of the work done: all three are mid-run.
        let mark = start + 200 + rng.next(needed / 6 - 200);
        let mut child = s3_export(&sim, &s3, "nightly", work.path(), &flags)
            .spawn()
            .unwrap();
        let what = format!("attempt {i}'s kill mark");
        tokio::select! {
            status = child.wait() => panic!("attempt {i} ended ({:?}) before its kill mark", status.unwrap()),
            () = until_requests(&sim.sim, mark, &what) => {
                child.start_kill().unwrap(); // SIGKILL
                child.wait().await.unwrap();
            }
        }
    }
    assert!(
        sim.sim.stats().requests < needed,
        "the killed attempts together did less than one export"
    );
    let work = tempfile::tempdir().unwrap();
    let o = s3_export(&sim, &s3, "nightly", work.path(), &flags)
        .output()
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let most = watcher.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(most > 0, "the watcher saw parts while the export ran");

    let out = s3.dir("nightly");
    assert_exactly_the_truth(&out, &sim);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_report.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "complete");
    assert_eq!(report["out"], format!("s3://{BUCKET}/nightly"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert!(manifest["resumed"].as_u64().unwrap() >= 1, "{manifest}");
    // The manifest lists exactly the part objects in the bucket.
    let listed: Vec<String> = manifest["entities"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|e| e["files"].as_array().unwrap().iter())
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect();
    for entity in Entity::ALL {
        for f in part_files(&out, entity, &sim.location(), "parquet") {
            let rel = f
                .strip_prefix(&out)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            assert!(
                listed.contains(&rel),
                "{rel} is in the bucket but not in the manifest"
            );
        }
    }
    // The lease is released; no upload of a killed attempt became an object.
    assert!(!out
        .join(format!("_state/location_id={}/export.lock", sim.location()))
        .exists());
}

/// Incremental state lives in the bucket: a second run on a new machine (an empty work
/// directory) lists only what changed, and writes exactly the changed contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_run_on_a_new_machine_continues_from_the_state_in_the_bucket() {
    let sim = TestSim::start(fast_sim(1_500, 7)).await;
    let s3 = S3::start().await;
    let flags = ["--incremental"];
    let first = tempfile::tempdir().unwrap();
    let o = s3_export(&sim, &s3, "inc", first.path(), &flags)
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let (changed, deleted) = sim.sim.mutate(&sim.location(), 0.02, 3, 99);
    // `plan` on a machine without a work directory reads the state from the bucket too.
    let fresh = tempfile::tempdir().unwrap();
    let mut cmd = s3_location_cmd(
        "plan",
        &sim,
        &s3,
        "inc",
        fresh.path(),
        &["--incremental", "--json"],
    );
    let o = cmd.output().await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["runKind"], "filtered", "{p}");
    assert_eq!(p["changed"].as_u64(), Some(changed.len() as u64), "{p}");
    let second = tempfile::tempdir().unwrap();
    let o = s3_export(&sim, &s3, "inc", second.path(), &flags)
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = s3.dir("inc");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["runKind"], "filtered", "{manifest}");
    let ids: std::collections::BTreeSet<String> =
        read_parquet(&out, Entity::Contacts, &sim.location())
            .into_iter()
            .map(|r| r["id"].clone().unwrap())
            .collect();
    let want: std::collections::BTreeSet<String> = changed.into_iter().collect();
    assert_eq!(
        ids, want,
        "the second run wrote exactly the changed contacts"
    );
    assert!(!deleted.is_empty());
}

/// Two runs of one location into one bucket at once, from two machines (two work
/// directories): the second is refused through the lease in the bucket (exit 8) and writes
/// nothing; the first completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_of_one_location_into_one_bucket_refuse_each_other_through_the_bucket() {
    let sim = TestSim::start(fast_sim(600, 3)).await;
    let s3 = S3::start().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Paced so it is still running when the second starts.
    let slow = [
        "--children-by",
        "contact",
        "--listing",
        "get",
        "--rate-limit",
        "100/1s",
    ];
    let mut first = s3_export(&sim, &s3, "shared", a.path(), &slow)
        .spawn()
        .unwrap();
    let lease = s3
        .dir("shared")
        .join(format!("_state/location_id={}/export.lock", sim.location()));
    let deadline = std::time::Instant::now() + PROGRESS_DEADLINE;
    while !lease.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never took the lease"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let o = s3_export(&sim, &s3, "shared", b.path(), &[])
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("another run is in progress"), "{err}");
    assert!(
        err.contains(&format!("s3://{BUCKET}/shared/_state")),
        "{err}"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run was still running"
    );
    let status = first.wait().await.unwrap();
    assert!(status.success());
    assert_exactly_the_truth(&s3.dir("shared"), &sim);
}

/// Wrong credentials: a clear error naming the bucket, before any API request, and the
/// secret never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_refuses_the_credentials_fails_first_and_never_shows_the_secret() {
    let sim = TestSim::start(fast_sim(50, 1)).await;
    let s3 = S3::start().await;
    let work = tempfile::tempdir().unwrap();
    let o = s3_export(&sim, &s3, "x", work.path(), &[])
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-0000")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(&format!("s3://{BUCKET}/x")), "{err}");
    assert!(err.contains("hint:"), "{err}");
    assert!(
        !err.contains("wrong-secret-0000") && !err.contains(SECRET_KEY),
        "{err}"
    );
    assert_eq!(
        sim.sim.stats().requests,
        0,
        "no API request before the bucket answered"
    );
}

/// A pipeline over three locations into one bucket: every location's rows, its manifest and
/// state in the bucket, and the pipeline report beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_into_a_bucket_lands_every_location_with_its_manifest_and_the_report() {
    let locations: Vec<String> = (1..=3).map(|i| format!("bucketLoc{i:011}")).collect();
    let sim = TestSim::start(contacts_etl::sim::SimConfig {
        locations: locations.clone(),
        ..fast_sim(300, 17)
    })
    .await;
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut text =
        "name = \"agency\"\n[api]\nrate_limit = \"off\"\n[auth]\ntoken_env = \"HL_TOKEN\"\n"
            .to_owned();
    for l in &locations {
        text.push_str(&format!("[[locations]]\nid = \"{l}\"\n"));
    }
    text.push_str(&format!("[export]\nout = \"s3://{BUCKET}/agency\"\n"));
    let file = dir.path().join("agency.toml");
    std::fs::write(&file, text).unwrap();
    let o = s3_cmd(&s3, &dir.path().join("work"))
        .args(["--quiet", "run", file.to_str().unwrap()])
        .env("HL_TOKEN", "test-token")
        .env("HL_BASE_URL", &sim.base_url)
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = s3.dir("agency");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_pipeline_report.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "complete", "{report}");
    for l in &locations {
        let truth = truth(&sim.sim, l);
        for entity in Entity::ALL {
            let got = keyed(entity, read_parquet(&out, entity, l));
            assert_same_rows(
                &format!("{l} {}", entity.name()),
                &truth.get(&entity).cloned().unwrap_or_default(),
                &got,
            );
        }
        let state = out.join(format!("_state/location_id={l}"));
        for f in ["manifest.json", "checkpoint.json", "report.json"] {
            assert!(state.join(f).is_file(), "{l}: no {f} in the bucket");
        }
    }
}
