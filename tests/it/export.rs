//! End-to-end exports against the in-process simulator, read back and compared with the
//! simulator's own data row by row.

use std::sync::Arc;

use crate::common::*;
use contacts_etl::export::{self, ExportPlan, Manifest, Progress};
use contacts_etl::ratelimit::Quota;
use contacts_etl::schema::Entity;
use contacts_etl::sim::{Faults, SimConfig};
use contacts_etl::sink::Format;

async fn export_to(
    sim: &TestSim,
    client: Arc<contacts_etl::api::Client>,
    format: Format,
    out: &std::path::Path,
) -> Manifest {
    let plan = ExportPlan::new(sim.location(), format, out);
    export::run(client, &plan, Arc::new(Progress::default()))
        .await
        .expect("export completes")
}

fn check_against_truth(out: &std::path::Path, format: Format, sim: &TestSim, manifest: &Manifest) {
    let loc = sim.location();
    let truth = truth(&sim.sim, &loc);
    for entity in Entity::ALL {
        let rows = match format {
            Format::Parquet => read_parquet(out, entity, &loc),
            Format::Csv => read_csv(out, entity, &loc),
        };
        assert_eq!(
            manifest.entities[entity.name()].rows as usize,
            rows.len(),
            "{} rows in the manifest",
            entity.name()
        );
        let actual = keyed(entity, rows);
        let mut expected = truth.get(&entity).cloned().unwrap_or_default();
        if format == Format::Csv {
            expected = expected.into_iter().map(|(k, r)| (k, as_csv(r))).collect();
        }
        assert_same_rows(
            &format!("{:?} {}", format, entity.name()),
            &expected,
            &actual,
        );
    }
}

/// Guards the comparison above: the data must actually contain what it claims to test.
fn assert_data_is_adversarial(sim: &TestSim) {
    let all: Vec<String> = sim
        .sim
        .contacts(&sim.location())
        .iter()
        .flat_map(|c| {
            c.as_object()
                .unwrap()
                .values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    let has = |pred: &dyn Fn(&str) -> bool| all.iter().any(|s| pred(s));
    assert!(has(&|s| s.contains("\r\n")), "CRLF inside a value");
    assert!(
        has(&|s| s.contains('\n') && !s.contains('\r')),
        "LF inside a value"
    );
    assert!(
        has(&|s| s.contains('"') && s.contains(',')),
        "quotes and commas"
    );
    assert!(
        has(&|s| s.starts_with('=') || s.starts_with('+') || s.starts_with('@')),
        "formula-like values"
    );
    assert!(has(&|s| s.len() >= 10_000), "10 KB strings");
    assert!(
        has(&|s| s.chars().any(|c| ('\u{1F300}'..='\u{1FAFF}').contains(&c))),
        "emoji"
    );
    assert!(
        has(&|s| s.chars().any(|c| ('\u{0590}'..='\u{06FF}').contains(&c))),
        "right-to-left text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_20k_contacts_to_parquet_and_csv_matches_the_simulator_row_for_row() {
    let sim = TestSim::start(fast_sim(20_000, 7)).await;
    assert_data_is_adversarial(&sim);
    let dir = tempfile::tempdir().unwrap();

    let pq = dir.path().join("parquet");
    let m = export_to(&sim, sim.client(None, 32), Format::Parquet, &pq).await;
    assert_eq!(m.entities["contacts"].rows, 20_000);
    assert!(pq.join(export::MANIFEST).exists());
    check_against_truth(&pq, Format::Parquet, &sim, &m);

    let csv = dir.path().join("csv");
    let m = export_to(&sim, sim.client(None, 32), Format::Csv, &csv).await;
    check_against_truth(&csv, Format::Csv, &sim, &m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_and_a_stricter_server_limit_give_exactly_the_clean_output() {
    let contacts = 2_000;
    let clean_sim = TestSim::start(fast_sim(contacts, 11)).await;
    let dir = tempfile::tempdir().unwrap();
    let clean_out = dir.path().join("clean");
    export_to(
        &clean_sim,
        clean_sim.client(None, 16),
        Format::Parquet,
        &clean_out,
    )
    .await;

    let faulty = SimConfig {
        rate_limit: Some((1_000, std::time::Duration::from_secs(1))),
        faults: Faults {
            error_rate: 0.02,
            truncate_rate: 0.01,
            ..Faults::default()
        },
        ..fast_sim(contacts, 11)
    };
    let sim = TestSim::start(faulty).await;
    let out = dir.path().join("faulty");
    // The client believes it may send 3,000/s; the server allows 1,000/s.
    let client = sim.client(Some("3000/1s".parse::<Quota>().unwrap()), 16);
    let m = export_to(&sim, client, Format::Parquet, &out).await;

    let stats = sim.sim.stats();
    assert!(
        stats.faults_injected > 50,
        "faults were injected: {stats:?}"
    );
    assert!(
        m.requests.retries >= stats.faults_injected,
        "every fault was retried: {:?}",
        m.requests
    );
    let ok_requests = m.requests.succeeded();
    assert!(
        (m.requests.rate_limited as f64) < 0.01 * ok_requests as f64,
        "the client adapted to the server's limit: {:?}",
        m.requests
    );

    let loc = sim.location();
    for entity in Entity::ALL {
        let clean = keyed(entity, read_parquet(&clean_out, entity, &loc));
        let got = keyed(entity, read_parquet(&out, entity, &loc));
        assert_same_rows(&format!("faulty vs clean {}", entity.name()), &clean, &got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_filter_exports_exactly_that_business() {
    let sim = TestSim::start(fast_sim(1_500, 3)).await;
    let loc = sim.location();
    let all = sim.sim.contacts(&loc);
    let business = all
        .iter()
        .find_map(|c| c["businessId"].as_str())
        .expect("some contact has a business")
        .to_owned();
    let expected: std::collections::BTreeSet<String> = all
        .iter()
        .filter(|c| c["businessId"].as_str() == Some(business.as_str()))
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let mut plan = ExportPlan::new(loc.clone(), Format::Csv, dir.path());
    plan.businesses = vec![business];
    plan.include = "tasks".parse().unwrap();
    export::run(sim.client(None, 8), &plan, Arc::new(Progress::default()))
        .await
        .unwrap();
    let got: std::collections::BTreeSet<String> = keyed(
        Entity::Contacts,
        read_csv(dir.path(), Entity::Contacts, &loc),
    )
    .into_keys()
    .collect();
    assert_eq!(got, expected);
    assert!(
        !dir.path().join("notes").exists(),
        "notes were not requested"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_into_the_same_directory_replaces_rather_than_duplicates() {
    let sim = TestSim::start(fast_sim(700, 5)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut plan = ExportPlan::new(sim.location(), Format::Parquet, dir.path());
    plan.part_contacts = 200; // several parts (a part holds whole pages)
    plan.search_page = 100;
    for _ in 0..2 {
        export::run(sim.client(None, 8), &plan, Arc::new(Progress::default()))
            .await
            .unwrap();
    }
    let rows = read_parquet(dir.path(), Entity::Contacts, &sim.location());
    assert_eq!(rows.len(), 700);
    keyed(Entity::Contacts, rows);
    assert!(part_files(dir.path(), Entity::Contacts, &sim.location(), "parquet").len() >= 3);
}
