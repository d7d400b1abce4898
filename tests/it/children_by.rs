//! `--children-by`: tasks and appointments through the location-wide routes give exactly the
//! rows of per-contact requests, at a third of the requests; a missing scope, a route that
//! hides rows, and a kill in the location-wide phase still end in the exact output.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use contacts_etl::export::Manifest;
use contacts_etl::schema::Entity;
use contacts_etl::sim::{Sim, SimConfig};
use serde_json::Value;

fn manifest(out: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap()
}

/// Every entity's rows, keyed by id (a row written twice fails [`keyed`]).
fn rows(out: &Path, location: &str) -> BTreeMap<Entity, BTreeMap<String, Row>> {
    Entity::ALL
        .into_iter()
        .map(|e| (e, keyed(e, read_csv(out, e, location))))
        .collect()
}

fn assert_same_output(expected: &Path, actual: &Path, location: &str) {
    let (e, a) = (rows(expected, location), rows(actual, location));
    for entity in Entity::ALL {
        assert!(
            !e[&entity].is_empty(),
            "{entity}: the reference export has rows"
        );
        assert_same_rows(entity.name(), &e[&entity], &a[&entity]);
    }
}

/// The reference: every child per contact.
async fn per_contact(sim: &TestSim, out: &Path) {
    let o = run_to_end(sim, out, &["--format", "csv", "--children-by", "contact"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
}

const NOTES_ROUTE: &str = "GET /contacts/:id/notes";
const TASK_SEARCH_ROUTE: &str = "POST /locations/:locationId/tasks/search";

fn route_count(sim: &Sim, route: &str) -> u64 {
    sim.stats().by_route.get(route).copied().unwrap_or(0)
}

/// Until the simulator has served `route` `n` times in all.
async fn until_route(sim: &Sim, route: &str, n: u64, what: &str) {
    until(|| match route_count(sim, route) {
        got if got >= n => Ok(()),
        got => Err(format!("{what}: {route} served {got} of {n} times")),
    })
    .await
}

/// Until the checkpoint at `path` satisfies `pred`.
async fn until_checkpoint(path: &Path, pred: impl Fn(&Value) -> bool) {
    until(|| {
        let ck = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        match ck.as_ref().is_some_and(&pred) {
            true => Ok(()),
            false => Err(format!(
                "{} is not in the awaited state: {ck:?}",
                path.display()
            )),
        }
    })
    .await
}

fn strategy(m: &Manifest, entity: &str) -> String {
    m.children_by
        .get(entity)
        .unwrap_or_else(|| panic!("the manifest reports {entity}'s strategy: {m:?}"))
        .strategy
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_by_location_equals_children_by_contact_row_for_row_at_under_1_1_requests_per_contact(
) {
    let n = 3_000;
    let sim = TestSim::start(fast_sim(n, 131)).await;
    let dir = tempfile::tempdir().unwrap();
    let (by_contact, by_location) = (dir.path().join("contact"), dir.path().join("location"));
    per_contact(&sim, &by_contact).await;
    let o = run_to_end(
        &sim,
        &by_location,
        &["--format", "csv", "--children-by", "location"],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_output(&by_contact, &by_location, &sim.location());

    let m = manifest(&by_location);
    assert_eq!(strategy(&m, "tasks"), "location");
    assert_eq!(strategy(&m, "appointments"), "location");
    assert!(m.children_by["tasks"].verified_contacts > 0, "{m:?}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(by_location.join("_report.json")).unwrap()).unwrap();
    assert_eq!(report["childrenBy"]["appointments"]["strategy"], "location");
    let spent = m.requests.succeeded();
    assert!(
        spent as f64 <= 1.1 * n as f64,
        "the issue's bound: at most 1.1 N requests; spent {spent} for {n} contacts ({:?})",
        m.requests
    );
    assert!(m.requests.location_tasks > 0 && m.requests.location_events > 0);
    let reference = manifest(&by_contact).requests.succeeded();
    assert!(
        reference >= 3 * n as u64,
        "per contact costs 3 N: {reference}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_task_scope_exports_tasks_per_contact_with_one_warning_naming_it() {
    let n = 2_000;
    let scopes = [
        "contacts.readonly",
        "calendars.readonly",
        "calendars/events.readonly",
    ];
    let sim = TestSim::start(SimConfig {
        scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
        ..fast_sim(n, 132)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (by_contact, auto) = (dir.path().join("contact"), dir.path().join("auto"));
    per_contact(&sim, &by_contact).await;
    // --children-by auto is the default.
    let o = loud_export_cmd(&sim, &auto, &["--format", "csv"])
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(
        err.matches("locations/tasks.readonly").count(),
        1,
        "one warning naming the scope:\n{err}"
    );
    assert!(
        !err.contains("calendars"),
        "no other scope is missing:\n{err}"
    );
    assert_same_output(&by_contact, &auto, &sim.location());
    let m = manifest(&auto);
    assert_eq!(strategy(&m, "tasks"), "contact");
    assert!(
        m.children_by["tasks"]
            .reason
            .as_deref()
            .unwrap()
            .contains("locations/tasks.readonly"),
        "{m:?}"
    );
    assert_eq!(strategy(&m, "appointments"), "location");
    assert_eq!(m.requests.tasks, n as u64, "tasks came per contact");
    assert_eq!(m.requests.location_tasks, 0, "the 401 is not a success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_location_wide_listings_are_asked_beside_the_listings_last_notes_not_after_them() {
    let n = 3_000u64;
    let sim = TestSim::start(fast_sim(n as usize, 137)).await;
    let dir = tempfile::tempdir().unwrap();
    let (by_contact, by_location) = (dir.path().join("contact"), dir.path().join("location"));
    per_contact(&sim, &by_contact).await;
    let (notes0, tasks0) = (
        route_count(&sim.sim, NOTES_ROUTE),
        route_count(&sim.sim, TASK_SEARCH_ROUTE),
    );
    let flags = ["--format", "csv", "--children-by", "location"];
    let mut child = export_cmd(&sim, &by_location, &flags)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // With the last 50 contacts' notes still to ask, the task search is under way.
    tokio::select! {
        status = child.wait() => panic!("the export ended ({:?}) before its last notes", status.unwrap()),
        () = until_route(&sim.sim, NOTES_ROUTE, notes0 + n - 50, "the listing's last notes") => {}
    }
    let early = route_count(&sim.sim, TASK_SEARCH_ROUTE) - tasks0;
    let o = child.wait_with_output().await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        early > 0,
        "no task search before the listing's last 50 contacts' notes"
    );
    // Fetched early, the rows are still exactly those of the contacts listed, each once.
    assert_same_output(&by_contact, &by_location, &sim.location());
    let m = manifest(&by_location);
    assert_eq!(strategy(&m, "tasks"), "location");
    assert_eq!(strategy(&m, "appointments"), "location");
    assert_eq!(
        m.requests.location_tasks,
        route_count(&sim.sim, TASK_SEARCH_ROUTE) - tasks0,
        "every task search the server answered is one the run counts"
    );
}

/// A proxy in front of the simulator that hides every fifth task (by id) from the
/// location-wide task search: the per-contact routes still show them.
async fn hiding_proxy(upstream: String) -> String {
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::response::Response;
    async fn forward(State(up): State<Arc<(String, reqwest::Client)>>, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut rb =
            up.1.request(parts.method.clone(), format!("{}{pq}", up.0))
                .body(body);
        for (k, v) in &parts.headers {
            if k != "host" && k != "content-length" {
                rb = rb.header(k, v);
            }
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut bytes = resp.bytes().await.unwrap().to_vec();
        if parts.uri.path().ends_with("/tasks/search") && status.is_success() {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            if let Some(tasks) = v["tasks"].as_array_mut() {
                tasks.retain(|t| {
                    let id = t["id"].as_str().unwrap_or_default();
                    id.bytes().map(u64::from).sum::<u64>() % 5 != 0
                });
            }
            bytes = serde_json::to_vec(&v).unwrap();
        }
        let mut out = Response::builder().status(status);
        for (k, v) in &headers {
            if !["content-length", "transfer-encoding", "content-encoding"].contains(&k.as_str()) {
                out = out.header(k, v);
            }
        }
        out.body(Body::from(bytes)).unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // reqwest is built without a default TLS provider (plain http here, but it insists).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = Arc::new((upstream, reqwest::Client::new()));
    let app = axum::Router::new().fallback(forward).with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_search_that_hides_tasks_is_caught_by_the_sample_and_tasks_fall_back_to_per_contact()
{
    let sim = TestSim::start(fast_sim(2_000, 134)).await;
    let dir = tempfile::tempdir().unwrap();
    let (by_contact, hidden) = (dir.path().join("contact"), dir.path().join("hidden"));
    per_contact(&sim, &by_contact).await;
    let proxy = hiding_proxy(sim.base_url.clone()).await;
    let o = loud_export_cmd(
        &sim,
        &hidden,
        &[
            "--format",
            "csv",
            "--children-by",
            "location",
            "--verify-sample",
            "0.05",
        ],
    )
    .env("HL_BASE_URL", &proxy)
    .output()
    .await
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("sampled contacts have other tasks"),
        "a warning reports the difference:\n{}",
        stderr(&o)
    );
    // Still exactly the per-contact rows: the location-wide tasks were discarded.
    assert_same_output(&by_contact, &hidden, &sim.location());
    let m = manifest(&hidden);
    let tasks = &m.children_by["tasks"];
    assert_eq!(tasks.strategy, "contact");
    assert!(tasks.difference.is_some(), "{m:?}");
    assert_eq!(strategy(&m, "appointments"), "location");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_location_wide_phase_then_resume_gives_the_exact_output() {
    let n = 3_000u64;
    let sim = TestSim::start(fast_sim(n as usize, 135)).await;
    let dir = tempfile::tempdir().unwrap();
    let (by_contact, killed) = (dir.path().join("contact"), dir.path().join("killed"));
    per_contact(&sim, &by_contact).await;
    // Every request answered after 20 ms: the task pages, one after another, take about a
    // second, and the kill lands among them.
    sim.sim.set_faults(contacts_etl::sim::Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_millis(20),
        ..Default::default()
    });
    let flags = [
        "--format",
        "csv",
        "--children-by",
        "location",
        "--part-contacts",
        "200",
    ];
    let ck_path = killed
        .join("_state")
        .join(format!("location_id={}", sim.location()))
        .join("checkpoint.json");
    let mut child = export_cmd(&sim, &killed, &flags).spawn().unwrap();
    // The task pages fetched ahead of the phase (beside the listing's last notes) wait in
    // their spool; the phase reads the rest as they come. From the first task search on,
    // every reply takes 50 ms: the task pages, one after another, then outlast the last
    // notes (asked many at once), and the kill lands when the phase has committed task
    // pages with the listing still to page on.
    let tasks = route_count(&sim.sim, TASK_SEARCH_ROUTE) + 1;
    tokio::select! {
        status = child.wait() => panic!("the export ended ({:?}) before its kill mark", status.unwrap()),
        () = until_route(&sim.sim, TASK_SEARCH_ROUTE, tasks, "the first task search") => {}
    }
    sim.sim.set_faults(contacts_etl::sim::Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_millis(50),
        ..Default::default()
    });
    // Both entities in the one checkpoint: the appointments run beside the tasks.
    let paging = |ck: &Value| {
        let (tasks, appointments) = (
            &ck["wide"]["entities"]["tasks"],
            &ck["wide"]["entities"]["appointments"],
        );
        tasks["stage"] == "listing" && tasks["pos"].is_object() && appointments["stage"].is_string()
    };
    tokio::select! {
        status = child.wait() => panic!("the export ended ({:?}) before its kill mark", status.unwrap()),
        _ = until_checkpoint(&ck_path, paging) => {
            child.start_kill().unwrap(); // SIGKILL
            child.wait().await.unwrap();
        }
    }
    let ck: Value = serde_json::from_slice(&std::fs::read(&ck_path).unwrap()).unwrap();
    assert_eq!(ck["complete"], false);
    assert!(
        paging(&ck),
        "killed while the task search was paged, the appointments under way: {ck}"
    );
    sim.sim.set_faults(Default::default());
    let o = run_to_end(&sim, &killed, &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_output(&by_contact, &killed, &sim.location());
    let m = manifest(&killed);
    assert_eq!(m.resumed, 1);
    assert_eq!(strategy(&m, "tasks"), "location");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_run_fetches_the_changed_contacts_tasks_in_contact_id_batches() {
    let n = 3_000;
    let sim = TestSim::start(fast_sim(n, 136)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let flags = [
        "--incremental",
        "--state-dir",
        state.to_str().unwrap(),
        "--children-by",
        "location",
    ];
    let o = run_to_end(&sim, &dir.path().join("night1"), &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let loc = sim.location();
    let (changed, _) = sim.sim.mutate(&loc, 0.01, 5, 77);
    assert!(changed.len() > 10, "{}", changed.len());
    let night2 = dir.path().join("night2");
    let o = run_to_end(&sim, &night2, &flags).await;
    assert!(o.status.success(), "{}", stderr(&o));

    // Exactly the changed contacts' children, as the simulator holds them.
    let changed_set: std::collections::BTreeSet<&str> =
        changed.iter().map(String::as_str).collect();
    let truth = truth(&sim.sim, &loc);
    for entity in [Entity::Tasks, Entity::Appointments, Entity::Notes] {
        let expected: BTreeMap<String, Row> = truth[&entity]
            .iter()
            .filter(|(_, r)| changed_set.contains(r["contactId"].as_deref().unwrap_or_default()))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        assert!(!expected.is_empty());
        let got = keyed(entity, read_parquet(&night2, entity, &loc));
        assert_same_rows(entity.name(), &expected, &got);
    }
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(night2.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(strategy(&m, "tasks"), "location");
    // One batch of contact ids: a page or two, and the empty page that ends it.
    assert!(
        m.requests.location_tasks <= 3,
        "the changed contacts' tasks in one contactId batch: {:?}",
        m.requests
    );
    assert!(
        m.requests.tasks < changed.len() as u64,
        "not one task request per changed contact: {:?}",
        m.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_export_asks_for_its_contacts_tasks_in_batches_not_the_whole_locations() {
    let sim = TestSim::start(fast_sim(3_000, 137)).await;
    let loc = sim.location();
    let business = sim
        .sim
        .contacts(&loc)
        .iter()
        .find_map(|c| c["businessId"].as_str().map(str::to_owned))
        .expect("some contact has a business");
    let dir = tempfile::tempdir().unwrap();
    let (by_contact, by_location) = (dir.path().join("contact"), dir.path().join("location"));
    for (out, mode) in [(&by_contact, "contact"), (&by_location, "location")] {
        let o = run_to_end(
            &sim,
            out,
            &[
                "--format",
                "csv",
                "--business",
                &business,
                "--children-by",
                mode,
            ],
        )
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (e, a) = (rows(&by_contact, &loc), rows(&by_location, &loc));
    for entity in Entity::ALL {
        assert_same_rows(entity.name(), &e[&entity], &a[&entity]);
    }
    let m = manifest(&by_location);
    let listed = m.contacts_listed;
    assert!(listed > 0 && listed < 1_000, "{listed}");
    // The whole location's tasks would take about 45 pages.
    assert!(
        m.requests.location_tasks <= 2 * listed.div_ceil(100) + 2,
        "{listed} contacts' tasks in contactId batches: {:?}",
        m.requests
    );
}
