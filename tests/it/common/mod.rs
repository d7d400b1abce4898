//! Test support: an in-process simulator on loopback, a client for it, and readers that turn
//! exported Parquet and CSV back into comparable rows.
#![allow(dead_code)]

pub mod s3;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type, TimestampMillisecondType};
use contacts_etl::api::{Client, ClientConfig, Token};
use contacts_etl::ratelimit::Quota;
use contacts_etl::schema::Entity;
use contacts_etl::sim::{Sim, SimConfig};
use contacts_etl::timefmt::{format_iso_millis, parse_iso_millis};
use serde_json::Value;

/// The release binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

/// `contacts-etl --quiet export` of the simulator's location into `out`, unpaced, with
/// `extra` flags; killed when dropped.
pub fn export_cmd(sim: &TestSim, out: &Path, extra: &[&str]) -> tokio::process::Command {
    export_command(sim, out, true, extra)
}

/// [`export_cmd`] without `--quiet`: for tests that read its warnings.
pub fn loud_export_cmd(sim: &TestSim, out: &Path, extra: &[&str]) -> tokio::process::Command {
    export_command(sim, out, false, extra)
}

fn export_command(
    sim: &TestSim,
    out: &Path,
    quiet: bool,
    extra: &[&str],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    if quiet {
        cmd.arg("--quiet");
    }
    cmd.args([
        "export",
        "--location",
        &sim.location(),
        "--out",
        out.to_str().unwrap(),
        "--rate-limit",
        "off",
        "--concurrency",
        "16",
    ])
    .args(extra)
    .env("HL_TOKEN", "test-token")
    .env("HL_BASE_URL", &sim.base_url)
    .env_remove("RUST_LOG")
    .kill_on_drop(true);
    cmd
}

/// A finished command's standard error, for assertion messages.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every entity's rows of the simulator's (first) location in `out` equal the simulator's,
/// each exactly once.
pub fn assert_exactly_the_truth(out: &Path, sim: &TestSim) {
    let loc = sim.location();
    let truth = truth(&sim.sim, &loc);
    for entity in Entity::ALL {
        let got = keyed(entity, read_parquet(out, entity, &loc));
        assert_same_rows(
            entity.name(),
            &truth.get(&entity).cloned().unwrap_or_default(),
            &got,
        );
    }
}

/// [`export_cmd`], run to its end.
pub async fn run_to_end(sim: &TestSim, out: &Path, extra: &[&str]) -> std::process::Output {
    export_cmd(sim, out, extra).output().await.unwrap()
}

/// A simulator serving on 127.0.0.1:<free port> until dropped.
pub struct TestSim {
    pub sim: Arc<Sim>,
    pub base_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestSim {
    pub async fn start(config: SimConfig) -> TestSim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sim = Sim::new(config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(contacts_etl::sim::serve(listener, sim.clone(), async {
            let _ = rx.await;
        }));
        TestSim {
            sim,
            base_url: format!("http://{addr}"),
            stop: Some(tx),
        }
    }

    pub fn location(&self) -> String {
        self.sim.config().locations[0].clone()
    }

    pub fn client(&self, rate: Option<Quota>, concurrency: usize) -> Arc<Client> {
        let mut cfg = ClientConfig::new(self.base_url.clone(), Token::new("test-token").unwrap());
        cfg.rate_limit = rate;
        cfg.concurrency = concurrency;
        Arc::new(Client::new(cfg).unwrap())
    }
}

impl Drop for TestSim {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A tiny deterministic generator (an LCG) for kill instants and test data: the same seed
/// gives the same run.
pub struct Lcg(pub u64);

impl Lcg {
    /// A number in `0..n`.
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// A simulator configuration without limits or faults.
pub fn fast_sim(contacts: usize, seed: u64) -> SimConfig {
    SimConfig {
        contacts,
        seed,
        rate_limit: None,
        daily_quota: None,
        ..SimConfig::default()
    }
}

/// How long [`until`] waits before failing: a bound so a broken run fails with a message
/// instead of hanging, never a measure of speed (a run reaches its mark in well under a
/// second here).
pub const PROGRESS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Returns once `state` gives `Ok`: a point of the run's own progress, so a test acts there
/// rather than after a guessed delay. Panics with the last `Err` if that takes longer than
/// [`PROGRESS_DEADLINE`].
pub async fn until(state: impl Fn() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + PROGRESS_DEADLINE;
    while let Err(why) = state() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{why} within {PROGRESS_DEADLINE:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// [`until`] the simulator has received at least `n` API requests; `what` names the mark.
pub async fn until_requests(sim: &Sim, n: u64, what: &str) {
    until(|| match sim.stats().requests {
        served if served >= n => Ok(()),
        served => Err(format!(
            "{what}: the simulator received {served} of {n} requests"
        )),
    })
    .await
}

/// Columns holding JSON text (Utf8 in the schema, compared as parsed JSON).
pub const JSON_COLUMNS: &[&str] = &[
    "dndSettings",
    "inboundDndSettings",
    "attributions",
    "attributionSource",
    "lastAttributionSource",
    "additionalEmails",
    "additionalPhones",
    "_extra",
];

/// What a column holds, derived from the Arrow schema.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Kind {
    Str,
    Json,
    Bool,
    Int,
    Ts,
    StrList,
    CustomFields,
}

pub fn columns(entity: Entity) -> Vec<(String, Kind)> {
    entity
        .schema()
        .fields()
        .iter()
        .map(|f| {
            let kind = match f.data_type() {
                DataType::Utf8 if JSON_COLUMNS.contains(&f.name().as_str()) => Kind::Json,
                DataType::Utf8 => Kind::Str,
                DataType::Boolean => Kind::Bool,
                DataType::Int64 => Kind::Int,
                DataType::Timestamp(..) => Kind::Ts,
                DataType::List(item) if matches!(item.data_type(), DataType::Utf8) => Kind::StrList,
                DataType::List(_) => Kind::CustomFields,
                other => panic!("unexpected column type {other:?} for {}", f.name()),
            };
            (f.name().clone(), kind)
        })
        .collect()
}

/// A row as canonical text cells (None = null). JSON-bearing cells are re-serialised from a
/// parsed value so byte-level formatting differences do not matter, only content.
pub type Row = BTreeMap<String, Option<String>>;

fn canon_json(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => v.to_string(),
        Err(_) => format!("<invalid JSON: {text}>"),
    }
}

/// All part files of an entity for a location.
pub fn part_files(out: &Path, entity: Entity, location: &str, ext: &str) -> Vec<PathBuf> {
    let dir = out
        .join(entity.name())
        .join(format!("location_id={location}"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

pub fn read_parquet(out: &Path, entity: Entity, location: &str) -> Vec<Row> {
    read_parquet_files(entity, &part_files(out, entity, location, "parquet"))
}

/// The rows of these Parquet part files of `entity`, file after file.
pub fn read_parquet_files(entity: Entity, paths: &[PathBuf]) -> Vec<Row> {
    let cols = columns(entity);
    let mut rows = Vec::new();
    for path in paths {
        let file = std::fs::File::open(path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            assert_eq!(
                batch.schema().fields().len(),
                cols.len(),
                "{}",
                path.display()
            );
            for r in 0..batch.num_rows() {
                let mut row = Row::new();
                for (i, (name, kind)) in cols.iter().enumerate() {
                    let a = batch.column(i);
                    let cell = if a.is_null(r) {
                        None
                    } else {
                        Some(match kind {
                            Kind::Str => a.as_string::<i32>().value(r).to_owned(),
                            Kind::Json => canon_json(a.as_string::<i32>().value(r)),
                            Kind::Bool => a.as_boolean().value(r).to_string(),
                            Kind::Int => a.as_primitive::<Int64Type>().value(r).to_string(),
                            Kind::Ts => format_iso_millis(
                                a.as_primitive::<TimestampMillisecondType>().value(r),
                            ),
                            Kind::StrList => {
                                let l = a.as_list::<i32>().value(r);
                                let s = l.as_string::<i32>();
                                let v: Vec<&str> = (0..s.len()).map(|j| s.value(j)).collect();
                                serde_json::to_string(&v).unwrap()
                            }
                            Kind::CustomFields => {
                                let l = a.as_list::<i32>().value(r);
                                let st = l.as_struct();
                                let ids = st.column(0).as_string::<i32>();
                                let vals = st.column(1).as_string::<i32>();
                                let v: Vec<Value> = (0..st.len())
                                    .map(|j| {
                                        let value = if vals.is_null(j) {
                                            Value::Null
                                        } else {
                                            serde_json::from_str(vals.value(j)).unwrap_or_else(
                                                |_| {
                                                    Value::String(format!(
                                                        "<invalid JSON: {}>",
                                                        vals.value(j)
                                                    ))
                                                },
                                            )
                                        };
                                        let id = if ids.is_null(j) {
                                            Value::Null
                                        } else {
                                            Value::String(ids.value(j).to_owned())
                                        };
                                        serde_json::json!({ "id": id, "value": value })
                                    })
                                    .collect();
                                Value::Array(v).to_string()
                            }
                        })
                    };
                    row.insert(name.clone(), cell);
                }
                rows.push(row);
            }
        }
    }
    rows
}

pub fn read_csv(out: &Path, entity: Entity, location: &str) -> Vec<Row> {
    let cols = columns(entity);
    let mut rows = Vec::new();
    for path in part_files(out, entity, location, "csv") {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_path(&path)
            .unwrap();
        let headers: Vec<String> = rdr.headers().unwrap().iter().map(str::to_owned).collect();
        let names: Vec<String> = cols.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(headers, names, "{}: header row", path.display());
        for rec in rdr.records() {
            let rec = rec.unwrap();
            let mut row = Row::new();
            for (i, (name, kind)) in cols.iter().enumerate() {
                let cell = rec.get(i).unwrap_or("");
                let v = if cell.is_empty() {
                    None
                } else {
                    Some(match kind {
                        Kind::Json | Kind::StrList | Kind::CustomFields => canon_json(cell),
                        _ => cell.to_owned(),
                    })
                };
                row.insert(name.clone(), v);
            }
            rows.push(row);
        }
    }
    rows
}

/// The row the exporter should write for an API object, computed independently from the
/// column types: values that do not fit a column go to `_extra` with unknown keys.
pub fn expected_row(entity: Entity, obj: &Value, location: &str, contact_id: Option<&str>) -> Row {
    let cols = columns(entity);
    let map = obj.as_object().expect("an object");
    let mut row = Row::new();
    let mut extra = serde_json::Map::new();
    for (k, v) in map {
        if !cols.iter().any(|(n, _)| n == k) || k == "_extra" {
            extra.insert(k.clone(), v.clone());
        }
    }
    for (name, kind) in &cols {
        if name == "_extra" {
            continue;
        }
        let is_child_key =
            entity != Entity::Contacts && (name == "contactId" || name == "locationId");
        if is_child_key {
            let v = if name == "contactId" {
                contact_id.map(str::to_owned)
            } else {
                Some(location.to_owned())
            };
            row.insert(name.clone(), v);
            continue;
        }
        let v = map.get(name).unwrap_or(&Value::Null);
        let cell: Result<Option<String>, ()> = match (kind, v) {
            (_, Value::Null) => Ok(None),
            (Kind::Str, Value::String(s)) => Ok(Some(s.clone())),
            (Kind::Str, Value::Number(_) | Value::Bool(_)) => Ok(Some(v.to_string())),
            (Kind::Json, _) => Ok(Some(v.to_string())),
            (Kind::Bool, Value::Bool(b)) => Ok(Some(b.to_string())),
            (Kind::Int, Value::Number(n)) if n.is_i64() => Ok(Some(n.to_string())),
            (Kind::Ts, Value::String(s)) => parse_iso_millis(s)
                .map(|ms| Some(format_iso_millis(ms)))
                .ok_or(()),
            (Kind::Ts, Value::Number(n)) if n.is_i64() => {
                Ok(Some(format_iso_millis(n.as_i64().unwrap())))
            }
            (Kind::StrList, Value::Array(a)) if a.iter().all(Value::is_string) => {
                Ok(Some(v.to_string()))
            }
            (Kind::CustomFields, Value::Array(a))
                if a.iter().all(|e| {
                    e.as_object()
                        .is_some_and(|o| o.keys().all(|k| k == "id" || k == "value"))
                }) =>
            {
                let items: Vec<Value> = a.iter().map(|e| serde_json::json!({ "id": e.get("id").cloned().unwrap_or(Value::Null), "value": e.get("value").cloned().unwrap_or(Value::Null) })).collect();
                Ok(Some(Value::Array(items).to_string()))
            }
            _ => Err(()),
        };
        match cell {
            Ok(c) => {
                row.insert(name.clone(), c);
            }
            Err(()) => {
                row.insert(name.clone(), None);
                extra.insert(name.clone(), v.clone());
            }
        }
    }
    if entity == Entity::Contacts && row.get("locationId").is_some_and(Option::is_none) {
        row.insert("locationId".into(), Some(location.to_owned()));
    }
    row.insert(
        "_extra".into(),
        (!extra.is_empty()).then(|| Value::Object(extra).to_string()),
    );
    row
}

/// In CSV, null and "" are both an empty cell; make a row comparable with a CSV row.
pub fn as_csv(mut row: Row) -> Row {
    for v in row.values_mut() {
        if v.as_deref() == Some("") {
            *v = None;
        }
    }
    row
}

/// The rows a simulator location should export, per entity, keyed for comparison.
pub fn truth(sim: &Sim, location: &str) -> BTreeMap<Entity, BTreeMap<String, Row>> {
    let mut out: BTreeMap<Entity, BTreeMap<String, Row>> = BTreeMap::new();
    for c in sim.contacts(location) {
        let id = c["id"].as_str().unwrap().to_owned();
        out.entry(Entity::Contacts).or_default().insert(
            id.clone(),
            expected_row(Entity::Contacts, &c, location, None),
        );
        for (entity, list) in [
            (Entity::Tasks, sim.tasks(&id)),
            (Entity::Notes, sim.notes(&id)),
            (Entity::Appointments, sim.appointments(&id)),
        ] {
            for child in list {
                let key = format!("{id}/{}", child["id"].as_str().unwrap());
                out.entry(entity)
                    .or_default()
                    .insert(key, expected_row(entity, &child, location, Some(&id)));
            }
        }
    }
    out
}

/// Keys rows the way [`truth`] does and checks each key appears once.
pub fn keyed(entity: Entity, rows: Vec<Row>) -> BTreeMap<String, Row> {
    let mut m = BTreeMap::new();
    for row in rows {
        let id = row["id"].clone().expect("every row has an id");
        let key = if entity == Entity::Contacts {
            id
        } else {
            format!("{}/{id}", row["contactId"].clone().unwrap_or_default())
        };
        let dup = m.insert(key.clone(), row);
        assert!(dup.is_none(), "{} row {key} exported twice", entity.name());
    }
    m
}

/// Asserts two keyed row sets are identical, printing the first differences.
pub fn assert_same_rows(
    what: &str,
    expected: &BTreeMap<String, Row>,
    actual: &BTreeMap<String, Row>,
) {
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let unexpected: Vec<&String> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let mut diffs = Vec::new();
    for (k, e) in expected {
        if let Some(a) = actual.get(k) {
            for (col, ev) in e {
                let av = a.get(col).cloned().flatten();
                if *ev != av {
                    diffs.push(format!(
                        "{k}.{col}: expected {:?}, got {:?}",
                        ev.as_deref().map(trunc),
                        av.as_deref().map(trunc)
                    ));
                }
            }
        }
    }
    assert!(
        missing.is_empty() && unexpected.is_empty() && diffs.is_empty(),
        "{what}: {} missing (e.g. {:?}), {} unexpected (e.g. {:?}), {} cells differ:\n{}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(5).collect::<Vec<_>>(),
        diffs.len(),
        diffs
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn trunc(s: &str) -> String {
    if s.len() > 120 {
        let mut end = 120;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…({} bytes)", &s[..end], s.len())
    } else {
        s.to_owned()
    }
}

/// The `id` column of a table that is not one of the four API tables (`deleted_contacts`)
/// under `out`, for one location; empty when the run wrote none.
pub fn read_ids(out: &Path, table: &str, loc: &str) -> std::collections::BTreeSet<String> {
    let dir = out.join(table).join(format!("location_id={loc}"));
    let mut ids = std::collections::BTreeSet::new();
    let Ok(files) = std::fs::read_dir(&dir) else {
        return ids;
    };
    for f in files {
        let file = std::fs::File::open(f.unwrap().path()).unwrap();
        for batch in parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let col = batch.column_by_name("id").unwrap().as_string::<i32>();
            ids.extend(col.iter().flatten().map(str::to_owned));
        }
    }
    ids
}

/// Runs the binary against the API at `base_url` (token `test-token`); returns its exit
/// code, stdout and stderr.
pub async fn run_bin(base_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env("HL_TOKEN", "test-token")
        .env("HL_BASE_URL", base_url)
        .env_remove("HL_LOCATION_ID")
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
