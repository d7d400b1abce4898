//! Snapshot tests (insta): what a user reads and what downstream tools parse, pinned as text
//! in `tests/it/snapshots/*.snap` so that any change to it shows up as a diff in review.
//!
//! Covered: every command's `--help` (the list comes from clap's command tree, so a new
//! command is covered without touching this file), the typical error messages with their exit
//! codes, each entity's Arrow schema, and the manifest and run report of a small export with
//! the run-dependent values (times, durations, temporary paths, CPU and memory) replaced.
//!
//! # When a snapshot changes
//! A test fails with a diff of the snapshot against the new output. If the change is intended:
//!
//! ```text
//! INSTA_UPDATE=always cargo test --release --locked --test it snapshots::   # rewrite the .snap files
//! git diff tests/it/snapshots/                                               # review, then commit
//! ```
//!
//! Without `INSTA_UPDATE`, a failing snapshot writes `NAME.snap.new` next to `NAME.snap`
//! (outside CI; with `CI` set nothing is written): review it with `diff`, accept it by renaming
//! it over the `.snap` file, or install `cargo-insta` and run `cargo insta review`. Do not
//! commit `.snap.new` files. `INSTA_FORCE_PASS=1` lets every assertion of a run pass (new
//! files are still written), to collect all the changes of a test that asserts several
//! snapshots in one run; `INSTA_UPDATE=no` writes nothing.
//!
//! Every snapshot must be the same on every run and machine: the binary runs with a cleared
//! environment, stdin not a terminal and `COLUMNS=100`; temporary directories are shown as
//! `[TMP]`, and values that vary between runs as `[…]` placeholders.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Output, Stdio};

use crate::common::*;
use arrow::datatypes::{DataType, Field, Schema};
use clap::CommandFactory;
use contacts_etl::cli::Cli;
use contacts_etl::schema::Entity;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

/// Asserts `text` against `tests/it/snapshots/<name>.snap`, with `description` in its header.
fn assert_snap(name: &str, description: &str, text: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_description(description);
    settings.bind(|| insta::assert_snapshot!(name, text));
}

/// The release binary as a user starts it, but reproducibly: nothing from this machine's
/// environment (HL_TOKEN, HL_BASE_URL, COLUMNS, NO_COLOR, RUST_LOG, ...), no terminal on
/// stdin (clap would take its width), and the width clap uses without a terminal.
fn bin(args: &[&str], envs: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("COLUMNS", "100")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // Windows cannot open a socket without it.
    if let Some(root) = std::env::var_os("SYSTEMROOT") {
        cmd.env("SYSTEMROOT", root);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// A run as a transcript: the command line, the exit code, stdout and stderr, with `tmp`
/// shown as `[TMP]`.
fn transcript(args: &[&str], o: &Output, tmp: &Path) -> String {
    let tmp = tmp.to_str().expect("a UTF-8 temporary directory");
    let mask = |s: &str| mask_log_times(&s.replace(tmp, "[TMP]"));
    format!(
        "$ contacts-etl {}\nexit code: {}\n--- stdout ---\n{}--- stderr ---\n{}",
        mask(&args.join(" ")),
        o.status
            .code()
            .map_or_else(|| "none (killed by a signal)".into(), |c| c.to_string()),
        mask(&String::from_utf8_lossy(&o.stdout)),
        mask(&String::from_utf8_lossy(&o.stderr)),
    )
}

/// `text` with the time that starts a log line (`2026-11-30T15:00:49.404323Z  INFO ...`) shown
/// as `[time]`.
fn mask_log_times(text: &str) -> String {
    let is_time = |t: &str| {
        t.len() >= 20
            && t.ends_with('Z')
            && t.as_bytes()[4] == b'-'
            && t.as_bytes()[10] == b'T'
            && t[..4].bytes().all(|b| b.is_ascii_digit())
    };
    text.split_inclusive('\n')
        .map(|line| match line.split_once(' ') {
            Some((first, rest)) if is_time(first) => format!("[time] {rest}"),
            _ => line.to_owned(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// --help

/// Every command path below the top level (`["import", "contacts"]`, ...), depth first, in
/// declaration order. clap adds the `help` subcommand only when the command is built, so it is
/// not among them.
fn command_paths(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
    for sub in cmd.get_subcommands() {
        let mut path = prefix.to_vec();
        path.push(sub.get_name().to_owned());
        out.push(path.clone());
        command_paths(sub, &path, out);
    }
}

#[tokio::test]
async fn help_of_every_command() {
    let mut paths = vec![vec![]];
    command_paths(&Cli::command(), &[], &mut paths);
    // The tree is read, not listed here; a guard that it was read at all.
    assert!(paths.len() > 10, "commands found: {paths:?}");
    let tmp = tempfile::tempdir().unwrap();
    for path in paths {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = bin(&args, &[]).output().await.unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            transcript(&args, &o, tmp.path())
        );
        let name = if path.is_empty() {
            "help".to_owned()
        } else {
            format!("help_{}", path.join("_"))
        };
        assert_snap(
            &name,
            &format!("contacts-etl {}", args.join(" ")),
            &transcript(&args, &o, tmp.path()),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Typical errors

#[tokio::test]
async fn error_no_token() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = ["export", "--location", "L", "--out", out.to_str().unwrap()];
    let o = bin(&args, &[]).output().await.unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_snap(
        "error_no_token",
        "export without HL_TOKEN or --token-file",
        &transcript(&args, &o, tmp.path()),
    );
}

#[tokio::test]
async fn error_insecure_url() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = [
        "export",
        "--location",
        "L",
        "--out",
        out.to_str().unwrap(),
        "--base-url",
        "http://services.leadconnectorhq.com",
    ];
    let o = bin(&args, &[("HL_TOKEN", "pit-secret")])
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let text = transcript(&args, &o, tmp.path());
    assert!(!text.contains("pit-secret"), "the token leaked: {text}");
    assert_snap(
        "error_insecure_url",
        "export to plain http on a host other than loopback (HL_TOKEN=pit-secret)",
        &text,
    );
}

#[tokio::test]
async fn error_unknown_pipeline_key() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("nightly.toml");
    std::fs::write(
        &file,
        "name = \"nightly\"\n\n[api]\nconcurency = 4\n\n[auth]\ntoken_env = \"HL_TOKEN\"\n\n\
         [[locations]]\nid = \"L\"\n\n[export]\nout = \"out\"\n",
    )
    .unwrap();
    let args = ["run", file.to_str().unwrap()];
    let o = bin(&args, &[("HL_TOKEN", "t")]).output().await.unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_snap(
        "error_unknown_pipeline_key",
        "a pipeline file with `concurency` for `concurrency`",
        &transcript(&args, &o, tmp.path()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_checkpoint_mismatch() {
    let sim = TestSim::start(fast_sim(2_000, 41)).await;
    let loc = sim.location();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let envs = [("HL_TOKEN", "t"), ("HL_BASE_URL", sim.base_url.as_str())];
    let export = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "export",
            "--location",
            &loc,
            "--out",
            out.to_str().unwrap(),
            "--rate-limit",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // Stopped by its budget: an unfinished checkpoint made with --format parquet.
    let first = export(&["--daily-budget", "300", "--part-contacts", "50", "--quiet"]);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let o = bin(&first, &envs).output().await.unwrap();
    assert_eq!(
        o.status.code(),
        Some(75),
        "{}",
        transcript(&first, &o, tmp.path())
    );
    let args = export(&["--format", "csv"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = bin(&args, &envs).output().await.unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_snap(
        "error_checkpoint_mismatch",
        "resuming a parquet export (stopped by --daily-budget) with --format csv",
        &transcript(&args, &o, tmp.path()).replace(&sim.base_url, "[SIM]"),
    );
}

// ---------------------------------------------------------------------------------------------
// Arrow schemas

/// Every entity. The match fails to compile when a variant is added: add it to the list.
fn all_entities() -> Vec<Entity> {
    let all = vec![
        Entity::Contacts,
        Entity::Tasks,
        Entity::Notes,
        Entity::Appointments,
        Entity::DeletedContacts,
        Entity::CustomFields,
    ];
    for e in &all {
        match e {
            Entity::Contacts
            | Entity::Tasks
            | Entity::Notes
            | Entity::Appointments
            | Entity::DeletedContacts
            | Entity::CustomFields => {}
        }
    }
    all
}

/// A type as a reader of the files would name it; independent of arrow's own `Display`, so an
/// arrow upgrade alone does not change the snapshot.
fn type_name(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "Utf8".into(),
        DataType::Boolean => "Boolean".into(),
        DataType::Int64 => "Int64".into(),
        DataType::Float64 => "Float64".into(),
        DataType::Timestamp(unit, tz) => format!(
            "Timestamp({unit:?}, {})",
            tz.as_deref()
                .map_or("no time zone".into(), |z| format!("\"{z}\""))
        ),
        DataType::List(item) => format!("List<{}>", field_text(item)),
        DataType::Struct(fields) => format!(
            "Struct{{{}}}",
            fields
                .iter()
                .map(|f| field_text(f))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other:?}"),
    }
}

/// `key=value, ...` sorted by key.
fn metadata_text<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let sorted: BTreeMap<&String, &String> = m.into_iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A nested field: `name: type`, `NOT NULL` when it is not nullable, then its metadata.
fn field_text(f: &Field) -> String {
    let mut s = format!("{}: {}", f.name(), type_name(f.data_type()));
    if !f.is_nullable() {
        s.push_str(" NOT NULL");
    }
    if !f.metadata().is_empty() {
        s.push_str(&format!(" {{{}}}", metadata_text(f.metadata().iter())));
    }
    s
}

/// The schema's metadata, then one line per column: number, name, nullability, type (nested
/// fields as [`field_text`]) and the column's metadata.
fn schema_text(schema: &Schema) -> String {
    let mut s = format!(
        "schema metadata: {}\n",
        metadata_text(schema.metadata().iter())
    );
    let width = schema
        .fields()
        .iter()
        .map(|f| f.name().len())
        .max()
        .unwrap_or(0);
    s.push_str(&format!("  #  {:width$}  nullable  type\n", "column"));
    for (i, f) in schema.fields().iter().enumerate() {
        let nullable = if f.is_nullable() { "yes" } else { "no" };
        s.push_str(&format!(
            "{i:>3}  {:width$}  {nullable:8}  {}",
            f.name(),
            type_name(f.data_type())
        ));
        if !f.metadata().is_empty() {
            s.push_str(&format!("  {{{}}}", metadata_text(f.metadata().iter())));
        }
        s.push('\n');
    }
    s
}

#[test]
fn arrow_schema_of_every_entity() {
    for entity in all_entities() {
        assert_snap(
            &format!("schema_{}", entity.name()),
            &format!("Arrow schema of {}", entity.name()),
            &schema_text(&entity.schema()),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Manifest and run report

/// Keys whose values differ between runs or machines, and what they are shown as.
const VARYING: &[(&str, &str)] = &[
    ("startedAt", "[timestamp]"),
    ("finishedAt", "[timestamp]"),
    ("durationSecs", "[seconds]"),
    ("limiterWaitSecs", "[seconds]"),
    ("rateLimitShare", "[share]"),
    ("cpuSeconds", "[seconds]"),
    ("peakRssBytes", "[bytes]"),
];

/// `value` with the [`VARYING`] keys replaced and `tmp` in strings shown as `[TMP]`.
fn redact(value: &Value, tmp: &str) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = match VARYING.iter().find(|(key, _)| key == k) {
                        Some((_, shown)) if !v.is_null() => Value::String((*shown).into()),
                        _ => redact(v, tmp),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact(v, tmp)).collect()),
        Value::String(s) => Value::String(s.replace(tmp, "[TMP]")),
        other => other.clone(),
    }
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_and_run_report_of_a_small_export() {
    let sim = TestSim::start(fast_sim(120, 7)).await;
    let loc = sim.location();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // CSV: its bytes depend only on the data, not on the Parquet writer's version.
    let args = [
        "--quiet",
        "export",
        "--location",
        &loc,
        "--out",
        out.to_str().unwrap(),
        "--format",
        "csv",
        "--rate-limit",
        "off",
        "--part-contacts",
        "50",
    ];
    let envs = [("HL_TOKEN", "t"), ("HL_BASE_URL", sim.base_url.as_str())];
    let o = bin(&args, &envs).output().await.unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        transcript(&args, &o, tmp.path())
    );
    let tmp_text = tmp.path().to_str().unwrap();
    for (name, file) in [
        ("manifest", "_manifest.json"),
        ("run_report", "_report.json"),
    ] {
        let value = redact(&read_json(&out.join(file)), tmp_text);
        assert_snap(
            name,
            &format!("{file} of a 120-contact CSV export of the simulator (seed 7)"),
            &serde_json::to_string_pretty(&value).unwrap(),
        );
    }
}
