//! Child requests the API refuses for good (403 on one contact's tasks, notes or
//! appointments): the export completes with exit 9, lists each refused request once under
//! `skipped` in the report and the manifest, and every other row is exact — also across
//! kills, and with a cap on how many refusals a run accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::*;
use contacts_etl::schema::Entity;
use contacts_etl::sim::{Faults, SimConfig};
use serde_json::Value;

const CHILDREN: [Entity; 3] = [Entity::Tasks, Entity::Notes, Entity::Appointments];

fn refusing_sim(contacts: usize, seed: u64, rate: f64) -> SimConfig {
    SimConfig {
        faults: Faults {
            child_refusal_rate: rate,
            ..Faults::default()
        },
        ..fast_sim(contacts, seed)
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The (entity, contact id) pairs the simulator refuses, recomputed from its own rule.
fn refused_by_sim(sim: &TestSim) -> BTreeSet<(String, String)> {
    let mut refused = BTreeSet::new();
    for c in sim.sim.contacts(&sim.location()) {
        let id = c["id"].as_str().unwrap();
        for e in CHILDREN {
            if sim.sim.refuses_child(id, e.name()) {
                refused.insert((e.name().to_owned(), id.to_owned()));
            }
        }
    }
    refused
}

/// Checks a `skipped` list: each entry is one refused request, fully described, listed once;
/// returns them as (entity, contact id).
fn listed(skipped: &Value) -> BTreeSet<(String, String)> {
    let list = skipped.as_array().expect("`skipped` is an array");
    let mut set = BTreeSet::new();
    for s in list {
        let (entity, contact) = (
            s["entity"].as_str().unwrap().to_owned(),
            s["contactId"].as_str().unwrap().to_owned(),
        );
        assert_eq!(
            s["request"],
            format!("GET /contacts/{contact}/{entity}"),
            "{s}"
        );
        assert_eq!(s["status"], 403, "{s}");
        assert!(
            s["traceId"].as_str().is_some_and(|t| !t.is_empty()),
            "the API's traceId is kept: {s}"
        );
        assert!(
            s["message"]
                .as_str()
                .unwrap()
                .contains("does not have access"),
            "{s}"
        );
        assert!(
            !s.to_string().contains("test-token"),
            "no token in the record"
        );
        assert!(set.insert((entity, contact)), "listed twice: {s}");
    }
    set
}

/// Every row equals what a clean run of the same data writes, minus exactly the children of
/// the refused requests.
fn assert_rows_exact_except(out: &Path, sim: &TestSim, refused: &BTreeSet<(String, String)>) {
    let loc = sim.location();
    let truth = truth(&sim.sim, &loc);
    let mut dropped = 0;
    for entity in Entity::ALL {
        let expected: BTreeMap<String, Row> = truth
            .get(&entity)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| {
                let contact = key.split('/').next().unwrap().to_owned();
                let keep = entity == Entity::Contacts
                    || !refused.contains(&(entity.name().to_owned(), contact));
                dropped += usize::from(!keep);
                keep
            })
            .collect();
        let got = keyed(entity, read_parquet(out, entity, &loc));
        assert_same_rows(entity.name(), &expected, &got);
    }
    assert!(
        dropped > 0,
        "some refused requests would have returned rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_20k_contacts_with_0_1_percent_child_refusals_exits_9_and_lists_each_refusal() {
    let sim = TestSim::start(refusing_sim(20_000, 12, 0.001)).await;
    let refused = refused_by_sim(&sim);
    assert!(
        (20..=120).contains(&refused.len()),
        "about 0.1% of 60,000 child requests: {}",
        refused.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");

    let o = run_to_end(&sim, &out, &["--children-by", "contact"]).await;
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "completed except {} child requests",
            refused.len()
        )) && err.contains("_report.json"),
        "{err}"
    );

    let report = json(&out.join("_report.json"));
    assert_eq!(report["status"], "partial");
    assert_eq!(report["exitCode"], 9);
    assert_eq!(listed(&report["skipped"]), refused);
    let manifest = json(&out.join("_manifest.json"));
    assert_eq!(listed(&manifest["skipped"]), refused);
    assert_eq!(manifest["contactsListed"], 20_000);
    assert_rows_exact_except(&out, &sim, &refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_export_has_an_empty_skipped_list_and_exits_0() {
    let sim = TestSim::start(fast_sim(300, 5)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run_to_end(&sim, &out, &["--children-by", "contact"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        json(&out.join("_manifest.json"))["skipped"],
        Value::Array(vec![])
    );
    let report = json(&out.join("_report.json"));
    assert_eq!(report["status"], "complete");
    assert_eq!(report["skipped"], Value::Array(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_resume_with_refusals_lists_each_skip_once_and_rows_are_exact() {
    let sim = TestSim::start(refusing_sim(5_000, 23, 0.01)).await;
    let refused = refused_by_sim(&sim);
    assert!(refused.len() > 50, "{}", refused.len());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Small parts and frequent commits; each attempt is killed after a number of requests
    // served (the run's own progress, not the clock), so kills land mid-run on any machine.
    let flags = [
        "--children-by",
        "contact",
        "--part-contacts",
        "300",
        "--commit-interval",
        "1",
    ];
    let mut rng = Lcg(0x5c1d);
    let kills = 6;
    for i in 0..kills {
        let start = sim.sim.stats().requests;
        let after = 600 + rng.next(1_800);
        let mut child = export_cmd(&sim, &out, &flags).spawn().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("attempt {i} ended ({status}) before its kill at {after} requests");
            }
            if sim.sim.stats().requests - start >= after {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
    }
    let o = run_to_end(&sim, &out, &flags).await;
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    let manifest = json(&out.join("_manifest.json"));
    assert_eq!(manifest["resumed"], kills);
    assert_eq!(listed(&manifest["skipped"]), refused);
    assert_eq!(listed(&json(&out.join("_report.json"))["skipped"]), refused);
    assert_rows_exact_except(&out, &sim, &refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_refusals_than_max_skipped_fail_the_run_with_exit_4_and_say_why() {
    let sim = TestSim::start(refusing_sim(2_000, 31, 0.05)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run_to_end(
        &sim,
        &out,
        // Pages of 100 (GET), so that pages with refusals commit before the cap is passed.
        &[
            "--children-by",
            "contact",
            "--listing",
            "get",
            "--max-skipped",
            "40",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("child requests for good, more than --max-skipped 40 allows")
            && err.contains("hint:")
            && err.contains("scope")
            && err.contains("GET /contacts/"),
        "{err}"
    );
    assert!(!out.join("_manifest.json").exists(), "not complete");
    let report = json(&out.join("_report.json"));
    assert_eq!(report["status"], "failed");
    assert_eq!(report["exitCode"], 4);
    // The pages committed before the stop keep their refusals (at most the cap).
    let committed = report["skipped"].as_array().unwrap().len();
    assert!(
        (2..=40).contains(&committed),
        "{committed} refusals committed"
    );

    // A rerun allowing fewer than are committed stops at once, spending no request.
    let before = sim.sim.stats().requests;
    let o = run_to_end(
        &sim,
        &out,
        &[
            "--children-by",
            "contact",
            "--listing",
            "get",
            "--max-skipped",
            "1",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("more than --max-skipped 1 allows"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        sim.sim.stats().requests,
        before,
        "no request after the check"
    );

    // Accepting more resumes the run and completes it.
    let o = run_to_end(
        &sim,
        &out,
        &[
            "--children-by",
            "contact",
            "--listing",
            "get",
            "--max-skipped",
            "100000",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    let refused = refused_by_sim(&sim);
    assert_eq!(
        listed(&json(&out.join("_manifest.json"))["skipped"]),
        refused
    );
    assert_rows_exact_except(&out, &sim, &refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_incremental_run_fetches_again_the_contacts_whose_children_were_skipped() {
    let sim = TestSim::start(refusing_sim(1_000, 41, 0.01)).await;
    let refused = refused_by_sim(&sim);
    assert!(!refused.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run_to_end(&sim, &out, &["--children-by", "contact", "--incremental"]).await;
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));

    // The refusals are lifted (the token got its access back); nothing else changed.
    sim.sim.set_faults(Faults::default());
    let o = run_to_end(&sim, &out, &["--children-by", "contact", "--incremental"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let loc = sim.location();
    let contacts_written = |out: &Path| -> BTreeSet<String> {
        keyed(Entity::Contacts, read_parquet(out, Entity::Contacts, &loc))
            .into_keys()
            .collect()
    };
    let again = contacts_written(&out);
    let children: Vec<_> = CHILDREN
        .iter()
        .map(|&e| keyed(e, read_parquet(&out, e, &loc)))
        .collect();
    // A run with nothing changed fetches only the contacts it cannot compare (no readable
    // dateUpdated): the baseline the skipped contacts add to.
    let o = run_to_end(&sim, &out, &["--children-by", "contact", "--incremental"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let always = contacts_written(&out);
    let skipped_contacts: BTreeSet<String> = refused.iter().map(|(_, c)| c.clone()).collect();
    assert!(
        skipped_contacts.difference(&always).count() > 0,
        "some skipped contacts have a readable dateUpdated (else the state alone refetches them)"
    );
    let expected: BTreeSet<String> = skipped_contacts.union(&always).cloned().collect();
    assert_eq!(
        again, expected,
        "the contacts with a skipped request are fetched again"
    );
    // And their children come complete this time.
    let truth = truth(&sim.sim, &loc);
    for (entity, got) in CHILDREN.into_iter().zip(&children) {
        let want: BTreeMap<String, Row> = truth
            .get(&entity)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| expected.contains(k.split('/').next().unwrap()))
            .collect();
        assert_same_rows(entity.name(), &want, got);
    }
}
