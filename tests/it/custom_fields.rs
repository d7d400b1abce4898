//! Custom field names (issue 13, item 4) against the simulator: the `custom_fields` table,
//! `--custom-fields wide` in CSV and Parquet, a token without the scope, `customField.<key>`
//! import columns, and a resumed run writing the table once.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use contacts_etl::schema::{Entity, WIDE_COLUMNS_KEY};
use contacts_etl::sim::SimConfig;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

/// The route the simulator counts the definitions' requests under.
const DEFINITIONS_ROUTE: &str = "GET /locations/:locationId/customFields";

/// The location's definitions, as the API serves them.
async fn definitions(sim: &TestSim) -> Vec<Value> {
    let raw = sim
        .client(None, 1)
        .custom_fields(&sim.location())
        .await
        .unwrap();
    serde_json::from_str(raw.get()).unwrap()
}

/// Runs the binary without `--quiet` (warnings are what some tests check); returns its exit
/// code and its stdout and stderr together.
async fn run(sim: &TestSim, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env("HL_TOKEN", "test-token")
        .env("HL_BASE_URL", &sim.base_url)
        .env_remove("RUST_LOG")
        .env_remove("HL_LOCATION_ID")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `export` of the simulator's location into `out`, unpaced, with `extra` flags.
async fn export(sim: &TestSim, out: &Path, extra: &[&str]) -> (i32, String) {
    let loc = sim.location();
    let mut args = vec![
        "export",
        "--location",
        &loc,
        "--out",
        out.to_str().unwrap(),
        "--rate-limit",
        "off",
    ];
    args.extend_from_slice(extra);
    run(sim, &args).await
}

fn manifest(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap()
}

fn by_id(rows: Vec<Row>) -> BTreeMap<String, Row> {
    let mut m = BTreeMap::new();
    for row in rows {
        let id = row["id"].clone().expect("every definition has an id");
        assert!(
            m.insert(id.clone(), row).is_none(),
            "definition {id} written twice"
        );
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_fields_table_rows_equal_the_simulators_definitions_in_parquet_and_csv() {
    let sim = TestSim::start(fast_sim(30, 11)).await;
    let loc = sim.location();
    let defs = definitions(&sim).await;
    assert!(
        defs.len() >= 5,
        "the simulator serves definitions: {defs:?}"
    );
    let expected: BTreeMap<String, Row> = defs
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_owned(),
                expected_row(Entity::CustomFields, d, &loc, None),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    for format in ["parquet", "csv"] {
        let out = dir.path().join(format);
        let (code, stderr) = export(&sim, &out, &["--format", format, "--include", "none"]).await;
        assert_eq!(code, 0, "{stderr}");
        let rows = if format == "parquet" {
            read_parquet(&out, Entity::CustomFields, &loc)
        } else {
            read_csv(&out, Entity::CustomFields, &loc)
        };
        let expected = if format == "csv" {
            expected
                .iter()
                .map(|(k, r)| (k.clone(), as_csv(r.clone())))
                .collect()
        } else {
            expected.clone()
        };
        assert_same_rows(
            &format!("custom_fields ({format})"),
            &expected,
            &by_id(rows),
        );
        let m = manifest(&out);
        assert_eq!(m["entities"]["custom_fields"]["rows"], defs.len(), "{m}");
        assert_eq!(
            m["entities"]["custom_fields"]["files"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
    assert_eq!(
        sim.sim.stats().by_route.get(DEFINITIONS_ROUTE),
        Some(&3),
        "one request per export (and the test's own)"
    );
}

/// What a wide cell must hold, computed from the contact's value as the API sends it.
#[derive(Debug, PartialEq)]
enum Cell {
    Null,
    Text(String),
    Number(f64),
}

fn expected_cell(value: Option<&Value>, number: bool) -> Cell {
    match (value, number) {
        (None | Some(Value::Null), _) => Cell::Null,
        (Some(Value::String(s)), false) => Cell::Text(s.clone()),
        (Some(v), false) => Cell::Text(v.to_string()),
        (Some(Value::Number(n)), true) => {
            let digits: String = n.to_string().chars().filter(char::is_ascii_digit).collect();
            if digits.trim_matches('0').len() <= 15 {
                Cell::Number(n.as_f64().unwrap())
            } else {
                Cell::Null
            }
        }
        (Some(Value::String(s)), true) => match s.parse::<f64>() {
            Ok(f) if f.is_finite() && s.trim() == s => Cell::Number(f),
            _ => Cell::Null,
        },
        (Some(_), true) => Cell::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_columns_hold_exactly_each_contacts_values_in_parquet_and_csv_with_the_mapping_in_the_metadata(
) {
    let sim = TestSim::start(fast_sim(400, 12)).await;
    let loc = sim.location();
    let defs = definitions(&sim).await;
    // name → (id, number column)
    let columns: BTreeMap<String, (String, bool)> = defs
        .iter()
        .map(|d| {
            let key = d["fieldKey"].as_str().unwrap();
            let number = matches!(
                d["dataType"].as_str().unwrap(),
                "NUMERICAL" | "FLOAT" | "MONETORY" | "MONETARY" | "NUMBER"
            );
            (
                key.strip_prefix("contact.").unwrap().to_owned(),
                (d["id"].as_str().unwrap().to_owned(), number),
            )
        })
        .collect();
    assert!(columns.values().any(|c| c.1) && columns.values().any(|c| !c.1));
    // contact id → column name → expected cell
    let truth: BTreeMap<String, BTreeMap<String, Cell>> = sim
        .sim
        .contacts(&loc)
        .iter()
        .map(|c| {
            let values = c["customFields"].as_array().cloned().unwrap_or_default();
            let cells = columns
                .iter()
                .map(|(name, (id, number))| {
                    let v = values
                        .iter()
                        .find(|e| e["id"] == id.as_str())
                        .map(|e| &e["value"]);
                    (name.clone(), expected_cell(v, *number))
                })
                .collect();
            (c["id"].as_str().unwrap().to_owned(), cells)
        })
        .collect();
    assert!(truth
        .values()
        .flat_map(|r| r.values())
        .any(|c| matches!(c, Cell::Number(_))));

    let dir = tempfile::tempdir().unwrap();
    let base = Entity::Contacts.schema();
    for format in ["parquet", "csv"] {
        let out = dir.path().join(format);
        let (code, stderr) = export(
            &sim,
            &out,
            &[
                "--format",
                format,
                "--include",
                "none",
                "--custom-fields",
                "wide",
            ],
        )
        .await;
        assert_eq!(code, 0, "{stderr}");
        let mut got: BTreeMap<String, BTreeMap<String, Cell>> = BTreeMap::new();
        for path in part_files(&out, Entity::Contacts, &loc, format) {
            if format == "parquet" {
                let file = std::fs::File::open(&path).unwrap();
                let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
                // The mapping, in the file's own key-value metadata and in the Arrow schema.
                let kv: BTreeMap<String, String> = builder
                    .metadata()
                    .file_metadata()
                    .key_value_metadata()
                    .unwrap()
                    .iter()
                    .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
                    .collect();
                let mapping: Value = serde_json::from_str(&kv[WIDE_COLUMNS_KEY]).unwrap();
                assert_eq!(
                    builder.schema().metadata()[WIDE_COLUMNS_KEY],
                    kv[WIDE_COLUMNS_KEY]
                );
                for (name, (id, _)) in &columns {
                    assert_eq!(mapping[name]["id"], id.as_str(), "{name}");
                    assert_eq!(mapping[name]["fieldKey"], format!("contact.{name}"));
                }
                assert_eq!(mapping.as_object().unwrap().len(), columns.len());
                let schema = builder.schema().clone();
                // The declared columns first, customFields as it is; then one per field.
                assert_eq!(&schema.fields()[..base.fields().len()], &base.fields()[..]);
                assert_eq!(schema.fields().len(), base.fields().len() + columns.len());
                for batch in builder.build().unwrap() {
                    let batch = batch.unwrap();
                    let ids = batch.column_by_name("id").unwrap().as_string::<i32>();
                    for r in 0..batch.num_rows() {
                        let mut cells = BTreeMap::new();
                        for (name, (_, number)) in &columns {
                            let a = batch.column_by_name(name).unwrap();
                            let cell = if a.is_null(r) {
                                Cell::Null
                            } else if *number {
                                assert_eq!(a.data_type(), &DataType::Float64);
                                Cell::Number(a.as_primitive::<Float64Type>().value(r))
                            } else {
                                assert_eq!(a.data_type(), &DataType::Utf8);
                                Cell::Text(a.as_string::<i32>().value(r).to_owned())
                            };
                            cells.insert(name.clone(), cell);
                        }
                        got.insert(ids.value(r).to_owned(), cells);
                    }
                }
            } else {
                let mut rdr = csv::Reader::from_path(&path).unwrap();
                let headers: Vec<String> =
                    rdr.headers().unwrap().iter().map(str::to_owned).collect();
                let names: Vec<&str> = base.fields().iter().map(|f| f.name().as_str()).collect();
                assert_eq!(headers[..names.len()], names[..]);
                assert_eq!(
                    headers[names.len()..],
                    columns.keys().cloned().collect::<Vec<_>>()[..]
                );
                for rec in rdr.records() {
                    let rec = rec.unwrap();
                    let mut cells = BTreeMap::new();
                    for (name, (_, number)) in &columns {
                        let i = headers.iter().position(|h| h == name).unwrap();
                        let text = &rec[i];
                        let cell = match (text.is_empty(), number) {
                            (true, _) => Cell::Null,
                            (false, true) => Cell::Number(text.parse().unwrap()),
                            (false, false) => Cell::Text(text.to_owned()),
                        };
                        cells.insert(name.clone(), cell);
                    }
                    got.insert(rec[0].to_owned(), cells);
                }
            }
        }
        // CSV cannot tell an empty string from a null.
        let expected: BTreeMap<&String, BTreeMap<&String, &Cell>> = truth
            .iter()
            .map(|(id, cells)| {
                let cells = cells
                    .iter()
                    .map(|(n, c)| {
                        let c = match c {
                            Cell::Text(t) if t.is_empty() && format == "csv" => &Cell::Null,
                            c => c,
                        };
                        (n, c)
                    })
                    .collect();
                (id, cells)
            })
            .collect();
        let got: BTreeMap<&String, BTreeMap<&String, &Cell>> = got
            .iter()
            .map(|(id, cells)| (id, cells.iter().collect()))
            .collect();
        assert_eq!(expected.len(), got.len(), "{format}: contacts");
        for (id, cells) in &expected {
            assert_eq!(Some(cells), got.get(id), "{format}: contact {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_custom_fields_scope_exports_everything_else_with_one_warning() {
    let sim = TestSim::start(SimConfig {
        scopes: Some(vec![
            "contacts.readonly".into(),
            "locations.readonly".into(),
        ]),
        ..fast_sim(150, 13)
    })
    .await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, stderr) = export(&sim, &out, &["--custom-fields", "wide"]).await;
    assert_eq!(code, 0, "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("locations/customFields.readonly"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("WARN"), "{stderr}");
    assert!(!out.join("custom_fields").exists());
    assert!(manifest(&out)["entities"].get("custom_fields").is_none());
    // Everything else, as with every scope; the contacts without wide columns.
    let truth = truth(&sim.sim, &loc);
    for entity in Entity::ALL {
        let got = keyed(entity, read_parquet(&out, entity, &loc));
        assert_same_rows(
            entity.name(),
            &truth.get(&entity).cloned().unwrap_or_default(),
            &got,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_with_custom_field_key_columns_sets_the_fields_and_an_unknown_key_is_refused_before_any_write(
) {
    let sim = TestSim::start(fast_sim(5, 14)).await;
    let loc = sim.location();
    let defs = definitions(&sim).await;
    let id_of = |key: &str| {
        defs.iter()
            .find(|d| d["fieldKey"] == format!("contact.{key}").as_str())
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.jsonl");
    let rejects = dir.path().join("rejects.csv");
    let import = |input: &Path, dry: bool| {
        let mut args: Vec<String> = [
            "import",
            "contacts",
            "--location",
            &loc,
            "--input",
            input.to_str().unwrap(),
            "--journal",
            journal.to_str().unwrap(),
            "--rejects",
            rejects.to_str().unwrap(),
            "--rate-limit",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if dry {
            args.push("--dry-run".into());
        }
        args
    };

    // An unknown key: the dry run names the column and the known keys, and nothing is sent.
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "email,customField.favourite_color,customField.shoe_size\nkey1@example.com,teal,44\n",
    )
    .unwrap();
    let writes_before: u64 = write_count(&sim);
    let args = import(&bad, true);
    let (code, stderr) = run(&sim, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("customField.shoe_size") && stderr.contains("favourite_color"),
        "{stderr}"
    );
    let args = import(&bad, false);
    let (code, stderr) = run(&sim, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("shoe_size"), "{stderr}");
    assert_eq!(write_count(&sim), writes_before, "nothing written");

    // Keys, a full fieldKey and an id, side by side.
    let good = dir.path().join("good.csv");
    std::fs::write(
        &good,
        format!(
            "email,firstName,customField.favourite_color,customField.contact.employees,customField.{}\nkey2@example.com,Kay,teal,42,golf\n",
            id_of("interests")
        ),
    )
    .unwrap();
    let _ = std::fs::remove_file(&journal);
    let args = import(&good, false);
    let (code, stderr) = run(&sim, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(code, 0, "{stderr}");
    let contact = sim
        .sim
        .contacts(&loc)
        .into_iter()
        .find(|c| c["email"] == "key2@example.com")
        .expect("the contact was created");
    let value = |key: &str| {
        contact["customFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id_of(key).as_str())
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        value("favourite_color"),
        Some(Value::from("teal")),
        "{contact}"
    );
    assert!(
        matches!(value("employees"), Some(v) if v == "42" || v == 42),
        "{contact}"
    );
    assert!(value("interests").is_some(), "{contact}");
}

fn write_count(sim: &TestSim) -> u64 {
    sim.sim
        .stats()
        .by_route
        .iter()
        .filter(|(route, _)| !route.starts_with("GET "))
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_after_writing_the_custom_fields_table_writes_it_once_when_resumed() {
    let sim = TestSim::start(fast_sim(3000, 15)).await;
    let loc = sim.location();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let flags = [
        "--custom-fields",
        "wide",
        "--part-contacts",
        "100",
        "--commit-interval",
        "1",
    ];
    let mut child = export_cmd(&sim, &out, &flags).spawn().unwrap();
    // Killed mid-listing: the table is committed before the listing starts, and a few
    // hundred requests later several contacts parts are too.
    until_requests(&sim.sim, 400, "the run to kill").await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let ck: Value = serde_json::from_slice(
        &std::fs::read(out.join(format!("_state/location_id={loc}/checkpoint.json"))).unwrap(),
    )
    .unwrap();
    assert!(
        ck["entities"].get("custom_fields").is_some(),
        "committed before the kill: {ck}"
    );
    assert!(!out.join("_manifest.json").exists(), "killed mid-run");

    let o = run_to_end(&sim, &out, &flags).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let defs = definitions(&sim).await;
    let files = part_files(&out, Entity::CustomFields, &loc, "parquet");
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        read_parquet(&out, Entity::CustomFields, &loc).len(),
        defs.len()
    );
    // One request by the runs (the kill came after it), one by this test.
    assert_eq!(sim.sim.stats().by_route.get(DEFINITIONS_ROUTE), Some(&2));
    assert_eq!(manifest(&out)["resumed"], 1);
    // Every contacts part has the same wide schema.
    let schemas: Vec<_> = part_files(&out, Entity::Contacts, &loc, "parquet")
        .iter()
        .map(|p| {
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(p).unwrap())
                .unwrap()
                .schema()
                .clone()
        })
        .collect();
    assert!(schemas.len() > 2, "several parts");
    assert!(schemas.windows(2).all(|w| w[0] == w[1]));
    assert!(schemas[0].fields().len() > Entity::Contacts.schema().fields().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_fetches_each_locations_definitions_once_and_widens_its_contacts() {
    let locations = ["cfPipeA0000000000001", "cfPipeB0000000000002"];
    let sim = TestSim::start(SimConfig {
        locations: locations.iter().map(|l| l.to_string()).collect(),
        ..fast_sim(120, 16)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let mut text = String::from("[api]\nrate_limit = \"off\"\n[auth]\ntoken_env = \"HL_TOKEN\"\n");
    for l in locations {
        text.push_str(&format!("[[locations]]\nid = \"{l}\"\n"));
    }
    text.push_str("[export]\nout = \"out\"\ninclude = [\"none\"]\ncustom_fields = \"wide\"\n");
    std::fs::write(&file, text).unwrap();
    let (code, output) = run(&sim, &["run", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{output}");
    let out = dir.path().join("out");
    let client = sim.client(None, 1);
    for l in locations {
        let served = client.custom_fields(l).await.unwrap();
        let defs = serde_json::from_str::<Vec<Value>>(served.get())
            .unwrap()
            .len();
        assert_eq!(
            read_parquet(&out, Entity::CustomFields, l).len(),
            defs,
            "{l}"
        );
        for path in part_files(&out, Entity::Contacts, l, "parquet") {
            let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
                .unwrap();
            let mapping: Value =
                serde_json::from_str(&b.schema().metadata()[WIDE_COLUMNS_KEY]).unwrap();
            assert_eq!(mapping.as_object().unwrap().len(), defs, "{l}");
        }
    }
    assert_eq!(
        sim.sim.stats().by_route.get(DEFINITIONS_ROUTE),
        Some(&4),
        "once per location (and once each by this test)"
    );
}
