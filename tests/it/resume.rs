//! Resumable, exactly-once exports: SIGKILL at random instants, the daily quota, incremental
//! nightly runs, and the run report.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use contacts_etl::schema::Entity;
use contacts_etl::sim::SimConfig;

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("_report.json")).unwrap()).unwrap()
}

/// Kills an export with SIGKILL twenty times, then lets it finish, and checks every row
/// arrived exactly once.
///
/// Each kill instant is a point of the run's own progress, not a delay: attempt `i` is
/// killed once the simulator has received `step` more requests than before it started, with
/// `step` drawn (seeded, so a failure replays) from `0..=max_step`. A full export of `n`
/// contacts needs at least `n / 100` list pages and `3 n` child requests, and `max_step` is a
/// thirtieth of that, so the twenty killed attempts together cannot do two thirds of the
/// work: every attempt is still mid-run when its mark is reached, on any machine and at any
/// simulator speed. Parts of a sixth of `max_step` contacts (half of its requests), or one
/// listing page, make attempts commit, so kills land before, during and after commits.
async fn kill_9_twenty_times_then_resume(sim: &TestSim, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let contacts = sim.sim.config().contacts as u64;
    let needed = contacts.div_ceil(100) + 3 * contacts;
    let max_step = needed / 30;
    // Parts end at a listing page (100 contacts) at the earliest.
    let part = (max_step / 6).max(100).to_string();
    // Per contact: `needed` counts three child requests a contact.
    let flags = [
        "--children-by",
        "contact",
        "--part-contacts",
        part.as_str(),
        "--commit-interval",
        "1",
    ];
    let mut rng = Lcg(seed);
    for i in 0..20 {
        let start = sim.sim.stats().requests;
        let mark = start + rng.next(max_step + 1);
        let what = format!("attempt {i}'s kill mark");
        let mut child = export_cmd(sim, &out, &flags).spawn().unwrap();
        tokio::select! {
            status = child.wait() => panic!(
                "attempt {i} ended ({:?}) before its kill mark, request {} of the simulator \
                 (it had served {} when the attempt started)",
                status.unwrap(), mark, start
            ),
            () = until_requests(&sim.sim, mark, &what) => {
                child.start_kill().unwrap(); // SIGKILL
                child.wait().await.unwrap();
            }
        }
    }
    assert!(
        sim.sim.stats().requests < needed,
        "the killed attempts made fewer requests than one export needs, so each was mid-run"
    );
    let o = run_to_end(sim, &out, &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&out);
    assert_eq!(r["status"], "complete");
    assert_exactly_the_truth(&out, sim);
    // No temporary or orphaned files remain.
    for entity in Entity::ALL {
        let dir = out
            .join(entity.name())
            .join(format!("location_id={}", sim.location()));
        for f in std::fs::read_dir(&dir).unwrap() {
            let name = f.unwrap().file_name().into_string().unwrap();
            assert!(
                name.starts_with("part-") && name.ends_with(".parquet"),
                "{name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_kill_9_at_20_instants_of_progress_writes_each_row_exactly_once() {
    let sim = TestSim::start(fast_sim(20_000, 21)).await;
    kill_9_twenty_times_then_resume(&sim, 0x5eed).await;
}

/// The same kills and resume against a simulator that answers every request after 4 ms, then
/// against one twice as fast (2 ms): the kill marks follow the run's progress, so the kills
/// land mid-run whatever the speed. (The test above runs the simulator unpaced, as fast as
/// this machine allows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_kill_9_is_exact_with_the_simulator_twice_as_fast() {
    for (ms, seed) in [(4, 0x5eed_0004), (2, 0x5eed_0002)] {
        let sim = TestSim::start(SimConfig {
            faults: contacts_etl::sim::Faults {
                slow_rate: 1.0,
                slow_delay: Duration::from_millis(ms),
                ..Default::default()
            },
            ..fast_sim(4_000, 22)
        })
        .await;
        kill_9_twenty_times_then_resume(&sim, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_quota_stops_with_exit_75_and_resumes_after_reset() {
    let cfg = SimConfig {
        daily_quota: Some(9_000),
        ..fast_sim(5_000, 31)
    };
    let sim = TestSim::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut stops = 0;
    loop {
        let o = run_to_end(
            &sim,
            &out,
            // Pages of 100 (GET): the 5% reserve (450 requests) is more than a page costs,
            // so the run stops at the reserve rather than at the server's refusal.
            &[
                "--children-by",
                "contact",
                "--listing",
                "get",
                "--part-contacts",
                "1000",
            ],
        )
        .await;
        match o.status.code() {
            Some(0) => break,
            Some(75) => {
                stops += 1;
                let err = stderr(&o);
                assert!(
                    err.contains("daily quota") && err.contains("rerun the same command"),
                    "{err}"
                );
                let r = report(&out);
                assert_eq!(r["status"], "stopped");
                assert_eq!(r["exitCode"], 75);
                assert!(
                    r["dailyRemaining"].as_u64().unwrap() <= 9_000 / 20 + 1,
                    "stopped at the 5% reserve: {r}"
                );
                assert!(
                    !out.join("_manifest.json").exists(),
                    "an unfinished run has no manifest"
                );
                assert!(
                    sim.sim.stats().quota_exceeded == 0,
                    "the reserve kept the run from hitting the quota"
                );
                sim.sim.reset_daily_quota(); // the next day
            }
            other => panic!("unexpected exit {other:?}: {}", stderr(&o)),
        }
        assert!(stops < 5, "too many stops");
    }
    assert!(stops >= 1, "the quota interrupted the run");
    let r = report(&out);
    assert_eq!(r["status"], "complete");
    assert_exactly_the_truth(&out, &sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_other_settings_is_refused_until_restart() {
    let sim = TestSim::start(fast_sim(2_000, 41)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run_to_end(
        &sim,
        &out,
        &["--daily-budget", "300", "--part-contacts", "50"],
    )
    .await;
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    let o = run_to_end(&sim, &out, &["--format", "csv"]).await;
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("--format csv (checkpoint: parquet)") && err.contains("--restart"),
        "{err}"
    );
    let o = run_to_end(&sim, &out, &["--format", "csv", "--restart"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = read_csv(&out, Entity::Contacts, &sim.location());
    assert_eq!(keyed(Entity::Contacts, rows).len(), 2_000);
    assert!(
        part_files(&out, Entity::Contacts, &sim.location(), "parquet").is_empty(),
        "the discarded run's parts are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_run_through_get_walks_every_contact_fetches_only_changed_ones_and_reports_deletions(
) {
    let n = 5_000;
    let sim = TestSim::start(fast_sim(n, 51)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let night1 = dir.path().join("night1");
    let o = run_to_end(
        &sim,
        &night1,
        &[
            "--children-by",
            "contact",
            "--incremental",
            "--listing",
            "get",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(report(&night1)["rows"]["contacts"], n as u64);

    let loc = sim.location();
    let (changed, deleted) = sim.sim.mutate(&loc, 0.01, 7, 99);
    assert!(
        (20..=80).contains(&changed.len()),
        "about 1% changed: {}",
        changed.len()
    );
    let night2 = dir.path().join("night2");
    let o = run_to_end(
        &sim,
        &night2,
        &[
            "--children-by",
            "contact",
            "--incremental",
            "--listing",
            "get",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));

    let r = report(&night2);
    let req = &r["requests"];
    let pages = (n - deleted.len()).div_ceil(100) as u64;
    assert!(
        req["list"].as_u64().unwrap() <= pages + 1,
        "about N/100 list calls: {req}"
    );
    for kind in ["tasks", "notes", "appointments"] {
        assert_eq!(
            req[kind].as_u64().unwrap(),
            changed.len() as u64,
            "one {kind} call per changed contact: {req}"
        );
    }
    let got: std::collections::BTreeSet<String> = keyed(
        Entity::Contacts,
        read_parquet(&night2, Entity::Contacts, &loc),
    )
    .into_keys()
    .collect();
    assert_eq!(got, changed.iter().cloned().collect());
    // Children: exactly the changed contacts' children, as the simulator has them.
    let truth = truth(&sim.sim, &loc);
    for entity in [Entity::Tasks, Entity::Notes, Entity::Appointments] {
        let expected = truth[&entity]
            .iter()
            .filter(|(k, _)| changed.iter().any(|c| k.starts_with(&format!("{c}/"))))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_same_rows(
            entity.name(),
            &expected,
            &keyed(entity, read_parquet(&night2, entity, &loc)),
        );
    }
    let deleted_rows = read_ids(&night2, "deleted_contacts", &loc);
    assert_eq!(
        deleted_rows,
        deleted
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    );

    // Nothing changed since: a third night lists, fetches no children, writes no contacts.
    let night3 = dir.path().join("night3");
    let o = run_to_end(
        &sim,
        &night3,
        &[
            "--children-by",
            "contact",
            "--incremental",
            "--listing",
            "get",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&night3);
    assert_eq!(r["rows"]["contacts"], 0);
    assert_eq!(r["requests"]["tasks"], 0);
    assert_eq!(r["rows"]["deleted_contacts"], 0);
}

/// Regression: a budget running out on the listing's last page used to stop the run with a
/// checkpoint that meant "start over", and the resumed run exported everything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_spent_on_the_last_page_finishes_instead_of_starting_over() {
    use contacts_etl::export::{self, Budget, ExportPlan, Progress};
    let sim = TestSim::start(fast_sim(250, 33)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut plan = ExportPlan::new(
        sim.location(),
        contacts_etl::sink::Format::Parquet,
        dir.path(),
    );
    // Pages of 100 (GET): the budget below is placed between the ends of its pages.
    plan.listing = contacts_etl::extract::Listing::Get;
    plan.window = 1; // no lookahead: the budget is checked exactly at each page end
                     // 3 list pages + 750 child requests; page 2 ends near 602, page 3 (the last) at 753.
    plan.budget = Budget {
        max_requests: Some(700),
        reserve: 0.05,
    };
    let first = export::run(
        sim.client(None, 4),
        &plan,
        std::sync::Arc::new(Progress::default()),
    )
    .await;
    let m =
        first.expect("the run finishes: only the finishing steps remained when the budget ran out");
    assert_eq!(m.entities["contacts"].rows, 250);
    assert_exactly_the_truth(dir.path(), &sim);
    plan.budget = Budget::default();
    let again = export::run(
        sim.client(None, 4),
        &plan,
        std::sync::Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert_eq!(
        again.entities["contacts"].rows, 250,
        "a finished run's rerun starts afresh, once"
    );
    assert_exactly_the_truth(dir.path(), &sim);
}
