//! Request economy: the search listing, and incremental runs that list only what changed.
//! (The location-wide children and the quota plan have their own files.)

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::*;
use contacts_etl::schema::Entity;

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("_report.json")).unwrap()).unwrap()
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap()
}

fn all_rows(out: &Path, loc: &str) -> Vec<(Entity, std::collections::BTreeMap<String, Row>)> {
    Entity::ALL
        .into_iter()
        .map(|e| (e, keyed(e, read_parquet(out, e, loc))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_listing_exports_exactly_what_the_get_listing_does_in_a_fifth_of_the_list_requests(
) {
    let n = 20_000;
    let sim = TestSim::start(fast_sim(n, 131)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let (by_get, by_search) = (dir.path().join("get"), dir.path().join("search"));
    let o = run_to_end(&sim, &by_get, &["--listing", "get"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_to_end(&sim, &by_search, &["--listing", "search"]).await;
    assert!(o.status.success(), "{}", stderr(&o));

    let (g, s) = (all_rows(&by_get, &loc), all_rows(&by_search, &loc));
    for ((entity, g), (_, s)) in g.iter().zip(&s) {
        assert_same_rows(entity.name(), g, s);
    }
    // And both are the simulator's truth, each row once.
    let truth = truth(&sim.sim, &loc);
    for (entity, s) in &s {
        assert_same_rows(entity.name(), &truth[entity], s);
    }

    let (rg, rs) = (report(&by_get), report(&by_search));
    assert_eq!(rg["listing"], "get");
    assert_eq!(rs["listing"], "search");
    assert_eq!(manifest(&by_search)["listing"], "search");
    assert_eq!(rs["requests"]["list"], 0, "{}", rs["requests"]);
    // 40 pages of 500, and the empty page that ends the listing.
    assert_eq!(
        rs["requests"]["search"].as_u64().unwrap(),
        (n as u64).div_ceil(500) + 1,
        "{}",
        rs["requests"]
    );
    // GET ends on `meta.nextPage: null`; the search has no such mark.
    assert_eq!(
        rg["requests"]["list"].as_u64().unwrap(),
        (n as u64).div_ceil(100),
        "{}",
        rg["requests"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_listing_uses_the_search_and_spends_no_extra_request_on_choosing() {
    let n = 1_200;
    let sim = TestSim::start(fast_sim(n, 132)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run_to_end(&sim, &out, &["--include", "none"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&out);
    assert_eq!(r["listing"], "search");
    // 3 pages of at most 500 and the empty one: the probe was the first page. The one other
    // request is the custom-field definitions.
    assert_eq!(r["requests"]["search"], 4, "{}", r["requests"]);
    assert_eq!(r["requests"]["other"], 1, "{}", r["requests"]);
    assert_eq!(r["requests"]["attempts"], 5, "{}", r["requests"]);
    assert_eq!(sim.sim.stats().requests, 5);
}

/// Nightly runs: a full one, then runs that list only the contacts updated since the last
/// run started (minus the overlap), then a walk of every contact that reports the deletions
/// of all the nights since the last walk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_incremental_runs_list_only_changed_contacts_and_every_nth_run_walks_and_reports_deletions(
) {
    let n = 20_000;
    let sim = TestSim::start(fast_sim(n, 133)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let night = |i: u32| dir.path().join(format!("night{i}"));
    let flags = [
        "--incremental",
        "--state-dir",
        state.to_str().unwrap(),
        "--full-walk-every",
        "3",
    ];

    let o = run_to_end(&sim, &night(1), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(report(&night(1))["runKind"], "full");
    assert_eq!(manifest(&night(1))["runKind"], "full");

    let mut deleted_since_walk = BTreeSet::new();
    for i in 2..=3u32 {
        let (changed, deleted) = sim.sim.mutate(&loc, 0.01, 5, 1000 + u64::from(i));
        deleted_since_walk.extend(deleted.iter().cloned());
        let changed: BTreeSet<String> = changed.into_iter().collect();
        let o = run_to_end(&sim, &night(i), &flags).await;
        assert!(o.status.success(), "night {i}: {}", stderr(&o));
        let r = report(&night(i));
        assert_eq!(r["runKind"], "filtered", "night {i}");
        assert!(r["changedSince"].is_string(), "night {i}: {r}");
        let req = &r["requests"];
        let c = changed.len() as u64;
        assert!(
            req["search"].as_u64().unwrap() <= c / 500 + 2,
            "night {i}: the listing costs pages of changed contacts only: {req}"
        );
        assert_eq!(req["list"], 0, "night {i}: {req}");
        // The bound for an incremental run after about 1% changed.
        let bound = c / 500 + (1.2 * c as f64) as u64 + 20;
        assert!(
            req["attempts"].as_u64().unwrap() <= bound,
            "night {i}: {} requests for {c} changed contacts (bound {bound}): {req}",
            req["attempts"]
        );
        // Exactly the changed contacts and their children.
        let got: BTreeSet<String> = keyed(
            Entity::Contacts,
            read_parquet(&night(i), Entity::Contacts, &loc),
        )
        .into_keys()
        .collect();
        assert_eq!(got, changed, "night {i}");
        let truth = truth(&sim.sim, &loc);
        for entity in [Entity::Tasks, Entity::Notes, Entity::Appointments] {
            let expected = truth[&entity]
                .iter()
                .filter(|(k, _)| changed.contains(k.split('/').next().unwrap()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_same_rows(
                entity.name(),
                &expected,
                &keyed(entity, read_parquet(&night(i), entity, &loc)),
            );
        }
        // A filter cannot see deletions: none are claimed.
        assert!(
            !night(i).join("deleted_contacts").exists(),
            "night {i} wrote a deleted_contacts table"
        );
    }

    // The third run since the walk: every contact listed, deletions of both nights reported.
    let o = run_to_end(&sim, &night(4), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&night(4));
    assert_eq!(r["runKind"], "walk");
    assert_eq!(r["rows"]["contacts"], 0, "nothing changed since night 3");
    assert_eq!(
        r["requests"]["search"].as_u64().unwrap(),
        ((n - deleted_since_walk.len()) as u64).div_ceil(500) + 1
    );
    let deleted: BTreeSet<String> = read_ids(&night(4), "deleted_contacts", &loc);
    assert_eq!(deleted, deleted_since_walk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_prints_its_figures_after_two_requests_and_the_export_then_spends_within_five_percent()
{
    let n = 100_000;
    let sim = TestSim::start(fast_sim(n, 134)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = tokio::process::Command::new(BIN)
        .args([
            "plan",
            "--json",
            "--location",
            &sim.location(),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("HL_TOKEN", "test-token")
        .env("HL_BASE_URL", &sim.base_url)
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(sim.sim.stats().requests <= 2, "{:?}", sim.sim.stats());
    assert_eq!(plan["requestsSpent"], sim.sim.stats().requests);
    assert_eq!(plan["contacts"], n as u64);
    assert_eq!(plan["listing"], "search");
    let strategies = plan["strategies"].as_array().unwrap();
    assert_eq!(strategies.len(), 3, "{plan}");
    for s in strategies {
        assert!(s["hoursAtLimit"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["daysOfQuota"].as_f64().unwrap() > 0.0, "{s}");
    }
    let estimate = plan["chosen"]["estimate"]["total"].as_u64().unwrap();

    let before = sim.sim.stats().requests;
    let o = run_to_end(&sim, &out, &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let spent = report(&out)["requests"]["attempts"].as_u64().unwrap();
    assert_eq!(spent, sim.sim.stats().requests - before);
    let off = (spent as f64 - estimate as f64).abs() / spent as f64;
    assert!(
        off <= 0.05,
        "the plan said {estimate} requests, the export spent {spent} ({:.1}% off)",
        off * 100.0
    );
    // The location-wide strategy: about one request a contact (notes), not three.
    assert!(
        spent as f64 <= 1.1 * n as f64,
        "{spent} requests for {n} contacts"
    );
    assert_eq!(
        report(&out)["estimate"]["total"].as_u64(),
        Some(estimate),
        "the run report holds the estimate beside what it spent"
    );
}

/// Contacts edited, deleted and created while the export pages (the simulator's churn): every
/// contact the churn did not touch is exported exactly as the simulator holds it, with its
/// children, and nothing is exported twice (`keyed` refuses a repeated row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_changed_and_deleted_while_the_export_pages_leave_every_other_contact_exact_and_nothing_twice(
) {
    let n = 20_000;
    let sim = TestSim::start(contacts_etl::sim::SimConfig {
        churn: Some(contacts_etl::sim::Churn {
            every: 4,
            update: 10,
            delete: 4,
            create: 4,
        }),
        ..fast_sim(n, 135)
    })
    .await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run_to_end(&sim, &out, &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let churned = sim.sim.churned();
    // Deletions shift the task search's offsets back while it pages; the overlapping pages
    // catch the rows that slid under the next page's start, so the sample finds no
    // difference and tasks stay location-wide.
    let by = &manifest(&out)["childrenBy"];
    assert_eq!(by["tasks"]["strategy"], "location", "{by}");
    assert_eq!(by["appointments"]["strategy"], "location", "{by}");
    assert!(
        churned.len() > 200,
        "the churn touched {} contacts",
        churned.len()
    );

    let truth = truth(&sim.sim, &loc);
    for entity in Entity::ALL {
        // `keyed` panics on a row exported twice.
        let got = keyed(entity, read_parquet(&out, entity, &loc));
        let untouched = |k: &String| !churned.contains(k.split('/').next().unwrap());
        let expected = truth[&entity]
            .iter()
            .filter(|(k, _)| untouched(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let got = got.into_iter().filter(|(k, _)| untouched(k)).collect();
        assert_same_rows(entity.name(), &expected, &got);
    }
}

/// A token holding only `contacts.readonly`: everything is still exported (tasks and
/// appointments per contact, no custom_fields table), with one warning per missing scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_extra_scopes_exports_everything_per_contact_with_one_warning_per_missing_scope(
) {
    let n = 2_000;
    let sim = TestSim::start(contacts_etl::sim::SimConfig {
        scopes: Some(vec!["contacts.readonly".into()]),
        ..fast_sim(n, 136)
    })
    .await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = loud_export_cmd(&sim, &out, &[]).output().await.unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let truth = truth(&sim.sim, &loc);
    for (entity, got) in all_rows(&out, &loc) {
        assert_same_rows(entity.name(), &truth[&entity], &got);
    }
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("WARN")).collect();
    for scope in [
        "locations/tasks.readonly",
        "calendars.readonly",
        "locations/customFields.readonly",
    ] {
        let naming = warnings.iter().filter(|l| l.contains(scope)).count();
        assert_eq!(naming, 1, "one warning names {scope}: {warnings:#?}");
    }
    let r = report(&out);
    assert_eq!(r["requests"]["tasks"], n as u64, "{}", r["requests"]);
    assert_eq!(r["requests"]["appointments"], n as u64, "{}", r["requests"]);
}
