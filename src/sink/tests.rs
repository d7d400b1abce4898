use std::fs;
use std::path::Path;

use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use arrow::record_batch::RecordBatch;
use serde_json::value::RawValue;

use super::{clean_temp_parts, open_part, Format, PartInfo, PartWriter, Partition, SinkError};
use crate::dest::Dest;
use crate::schema::{BatchBuilder, Entity, RowContext};

const CTX: RowContext<'static> = RowContext {
    location_id: "loc1",
    contact_id: None,
};

/// Text a spreadsheet or a naive CSV writer would mangle.
fn nasty_strings() -> Vec<String> {
    vec![
        "plain".into(),
        "comma, inside".into(),
        "quote \" inside \"\"".into(),
        "CRLF\r\nLF\nCR\r".into(),
        "=1+1".into(),
        "+33 1 23".into(),
        "-5".into(),
        "@cmd".into(),
        "🎉 emoji 👩‍👩‍👧".into(),
        "مرحبا \u{200f}שלום".into(),
        " padded ".into(),
        "tab\tand\u{0}nul and \\ backslash".into(),
        "y".repeat(10 * 1024),
        String::new(),
    ]
}

/// A contacts batch with one row per nasty string, plus a row of nulls.
fn contacts_batch() -> RecordBatch {
    let mut b = BatchBuilder::new(Entity::Contacts);
    for (i, s) in nasty_strings().iter().enumerate() {
        let js = serde_json::to_string(s).expect("string serializes");
        let o = format!(
            r#"{{"id":"c{i}","firstName":{js},"dnd":{dnd},"tags":[{js},"t"],"dateAdded":{ms},
            "customFields":[{{"id":"f1","value":{js}}},{{"id":"f2","value":[1, 2.5]}},{{"id":"f3"}}],
            "dndSettings":{{"note":{js}}},"unknown":{js}}}"#,
            dnd = i % 2 == 0,
            ms = 1_625_203_106_704_i64 + i as i64,
        );
        b.append(&RawValue::from_string(o).expect("valid JSON"), &CTX)
            .expect("object");
    }
    b.append(
        &RawValue::from_string("{}".into()).expect("valid JSON"),
        &CTX,
    )
    .expect("object");
    b.finish()
}

/// A part of location `loc1` in `out`.
fn open_loc1(out: &Path, format: Format, entity: Entity, n: u32) -> Box<dyn PartWriter> {
    open_part(&Dest::local(out), format, entity, "loc1", n).expect("open")
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = fs::File::open(path).expect("part exists");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("valid parquet")
        .build()
        .expect("reader");
    reader.collect::<Result<Vec<_>, _>>().expect("batches read")
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("dir exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn parquet_round_trips_batches_and_types() {
    let out = tempfile::tempdir().expect("tempdir");
    let batch = contacts_batch();
    let mut part = open_loc1(out.path(), Format::Parquet, Entity::Contacts, 7);
    part.write(&batch).expect("write");
    part.write(&batch.slice(2, 3)).expect("write a slice");
    let info = part.finish().expect("finish");

    assert_eq!(info.path, "contacts/location_id=loc1/part-00007.parquet");
    assert_eq!(info.rows, batch.num_rows() as u64 + 3);
    let path = out.path().join(&info.path);
    assert_eq!(info.bytes, fs::metadata(&path).expect("final file").len());
    assert_eq!(
        names_in(path.parent().expect("dir")),
        ["part-00007.parquet"]
    );

    let back = read_parquet(&path);
    let back =
        arrow::compute::concat_batches(&Entity::Contacts.schema(), &back).expect("same schema");
    let want = arrow::compute::concat_batches(
        &Entity::Contacts.schema(),
        &[batch.clone(), batch.slice(2, 3)],
    )
    .expect("concat");
    assert_eq!(
        back.schema().fields(),
        Entity::Contacts.schema().fields(),
        "embedded Arrow schema restores the types"
    );
    assert_eq!(back, want);
}

/// The caller hands in small batches (a page's worth); a part gathers them into row groups of
/// up to 8Ki rows or its share of the memory budget, and writes every row once, in order.
#[test]
fn parquet_gathers_small_batches_into_row_groups() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut part = open_loc1(out.path(), Format::Parquet, Entity::Contacts, 0);
    let (batches, per_batch) = (400_usize, 50_usize);
    let mut want = Vec::new();
    for b in 0..batches {
        let mut builder = BatchBuilder::new(Entity::Contacts);
        for r in 0..per_batch {
            let id = format!("c{b:04}-{r:02}");
            let o = format!(
                r#"{{"id":"{id}","firstName":"n{r}","tags":["t{}"]}}"#,
                r % 3
            );
            builder
                .append(&RawValue::from_string(o).expect("valid JSON"), &CTX)
                .expect("object");
            want.push(id);
        }
        part.write(&builder.finish()).expect("write");
    }
    let info = part.finish().expect("finish");
    assert_eq!(info.rows, (batches * per_batch) as u64);

    let path = out.path().join(&info.path);
    let file = fs::File::open(&path).expect("part");
    let meta = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("valid parquet")
        .metadata()
        .clone();
    let groups: Vec<i64> = meta.row_groups().iter().map(|g| g.num_rows()).collect();
    assert!(
        groups.len() >= (batches * per_batch).div_ceil(8 * 1024),
        "no group over 8Ki rows: {groups:?}"
    );
    assert!(groups.iter().all(|&n| n <= 8 * 1024), "{groups:?}");
    // Gathered: a group holds many batches, whatever other parts the test run has open.
    assert!(groups.len() * 4 <= batches, "{} groups", groups.len());

    let ids: Vec<String> = read_parquet(&path)
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name("id")
                .expect("id column")
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .expect("id is text")
                .clone();
            (0..arrow::array::Array::len(&col)).map(move |i| col.value(i).to_owned())
        })
        .collect();
    assert_eq!(ids, want, "every row once, in the order written");
}

#[test]
fn parquet_metadata_has_utc_millis_zstd_and_v1() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut part = open_loc1(out.path(), Format::Parquet, Entity::Contacts, 0);
    part.write(&contacts_batch()).expect("write");
    let info = part.finish().expect("finish");
    let file = fs::File::open(out.path().join(&info.path)).expect("part");
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("valid parquet");
    let version = crate::schema::SCHEMA_VERSION.to_string();
    assert_eq!(
        builder
            .schema()
            .metadata()
            .get("contacts_etl.schema_version"),
        Some(&version)
    );
    assert_eq!(
        builder.schema().fields(),
        Entity::Contacts.schema().fields()
    );
    let meta = builder.metadata();
    assert_eq!(meta.file_metadata().version(), 1);
    let rg = meta.row_group(0);
    assert!(rg
        .columns()
        .iter()
        .all(|c| matches!(c.compression(), ::parquet::basic::Compression::ZSTD(_))));
    let pschema = builder.parquet_schema();
    let date_added = pschema
        .columns()
        .iter()
        .find(|c| c.path().string() == "dateAdded")
        .expect("column");
    assert_eq!(
        date_added.logical_type_ref(),
        Some(&::parquet::basic::LogicalType::timestamp(
            true,
            ::parquet::basic::TimeUnit::MILLIS
        ))
    );
}

#[test]
fn csv_cells_follow_the_conventions() {
    let out = tempfile::tempdir().expect("tempdir");
    let batch = contacts_batch();
    let mut part = open_loc1(out.path(), Format::Csv, Entity::Contacts, 1);
    part.write(&batch).expect("write");
    let info = part.finish().expect("finish");
    assert_eq!(info.path, "contacts/location_id=loc1/part-00001.csv");
    assert_eq!(info.rows, batch.num_rows() as u64);
    let path = out.path().join(&info.path);
    let bytes = fs::read(&path).expect("part");
    assert_eq!(info.bytes, bytes.len() as u64);
    assert!(
        bytes.starts_with(b"id,locationId,contactName,"),
        "header first"
    );
    assert!(bytes.ends_with(b"\r\n"), "CRLF terminators");

    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(&path)
        .expect("csv");
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_owned)
        .collect();
    let names: Vec<String> = Entity::Contacts
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(header, names);
    let col = |name: &str| names.iter().position(|n| n == name).expect("column");
    let rows: Vec<::csv::StringRecord> =
        reader.records().collect::<Result<_, _>>().expect("records");
    let nasty = nasty_strings();
    assert_eq!(rows.len(), nasty.len() + 1);

    for (i, (row, s)) in rows.iter().zip(&nasty).enumerate() {
        let js = serde_json::to_string(s).expect("string serializes");
        assert_eq!(row.len(), names.len());
        assert_eq!(&row[col("id")], format!("c{i}"));
        assert_eq!(&row[col("locationId")], "loc1");
        assert_eq!(
            &row[col("firstName")],
            s.as_str(),
            "byte for byte, no formula escaping"
        );
        assert_eq!(&row[col("dnd")], if i % 2 == 0 { "true" } else { "false" });
        let ms = 1_625_203_106_704_i64 + i as i64;
        assert_eq!(
            &row[col("dateAdded")],
            crate::timefmt::format_iso_millis(ms)
        );
        assert_eq!(&row[col("dateUpdated")], "", "null is an empty cell");
        let tags: Vec<String> =
            serde_json::from_str(&row[col("tags")]).expect("tags cell is a JSON array");
        assert_eq!(tags, [s.clone(), "t".to_owned()]);
        assert_eq!(&row[col("tags")], format!("[{js},\"t\"]"), "compact JSON");
        assert_eq!(
            &row[col("customFields")],
            format!(
                r#"[{{"id":"f1","value":{js}}},{{"id":"f2","value":[1, 2.5]}},{{"id":"f3","value":null}}]"#
            )
        );
        assert_eq!(&row[col("dndSettings")], format!(r#"{{"note":{js}}}"#));
        assert_eq!(&row[col("_extra")], format!(r#"{{"unknown":{js}}}"#));
    }
    let last = rows.last().expect("null row");
    for (k, cell) in last.iter().enumerate() {
        let want = if names[k] == "locationId" { "loc1" } else { "" };
        assert_eq!(cell, want, "{}", names[k]);
    }
}

#[test]
fn every_entity_writes_and_reads_in_both_formats() {
    let out = tempfile::tempdir().expect("tempdir");
    for entity in Entity::ALL {
        let mut b = BatchBuilder::new(entity);
        let o = r#"{"id":"x","users":["u1"],"dateAdded":"2021-07-02T05:18:26.704Z","completed":true,"pinned":false}"#;
        b.append(
            &RawValue::from_string(o.into()).expect("JSON"),
            &RowContext {
                location_id: "L",
                contact_id: Some("c"),
            },
        )
        .expect("object");
        let batch = b.finish();
        for format in [Format::Parquet, Format::Csv] {
            let mut part =
                open_part(&Dest::local(out.path()), format, entity, "L", 0).expect("open");
            part.write(&batch).expect("write");
            let info = part.finish().expect("finish");
            assert_eq!(
                info.path,
                format!(
                    "{}/location_id=L/part-00000.{}",
                    entity.name(),
                    format.extension()
                )
            );
            assert_eq!(info.rows, 1);
        }
        let back = read_parquet(&out.path().join(format!(
            "{}/location_id=L/part-00000.parquet",
            entity.name()
        )));
        assert_eq!(back.len(), 1);
        // The reader's batches carry the fields only; the schema metadata is checked on the
        // reader builder in `parquet_metadata_has_utc_millis_zstd_and_v1`.
        assert_eq!(back[0].schema().fields(), batch.schema().fields());
        assert_eq!(back[0].columns(), batch.columns());
    }
}

#[test]
fn empty_parts_are_valid_files() {
    let out = tempfile::tempdir().expect("tempdir");
    let info = open_loc1(out.path(), Format::Parquet, Entity::Notes, 0)
        .finish()
        .expect("finish");
    assert_eq!(info.rows, 0);
    let back = read_parquet(&out.path().join(&info.path));
    assert_eq!(back.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
    let info = open_loc1(out.path(), Format::Csv, Entity::Notes, 0)
        .finish()
        .expect("finish");
    let text = fs::read_to_string(out.path().join(&info.path)).expect("csv");
    assert_eq!(
        text,
        "id,body,userId,dateAdded,title,color,pinned,contactId,locationId,_extra\r\n"
    );
}

#[test]
fn part_is_written_under_temp_name_until_finish() {
    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().join("contacts/location_id=loc1");
    for format in [Format::Parquet, Format::Csv] {
        let ext = format.extension();
        let mut part = open_part(
            &Dest::local(out.path()),
            format,
            Entity::Contacts,
            "loc1",
            3,
        )
        .expect("open");
        part.write(&contacts_batch()).expect("write");
        assert!(dir.join(format!(".part-00003.{ext}.tmp")).is_file());
        assert!(
            !dir.join(format!("part-00003.{ext}")).exists(),
            "{ext}: no final name before finish"
        );
        part.finish().expect("finish");
        assert!(!dir.join(format!(".part-00003.{ext}.tmp")).exists());
        assert!(dir.join(format!("part-00003.{ext}")).is_file());
    }
}

#[test]
fn cleaning_removes_only_this_partitions_own_temp_parts() {
    let out = tempfile::tempdir().expect("tempdir");
    let loc1 = Partition::location("loc1");
    assert_eq!(
        clean_temp_parts(&Dest::local(out.path().join("missing")), &loc1)
            .expect("missing dir is clean"),
        0
    );

    let done = open_loc1(out.path(), Format::Csv, Entity::Tasks, 0)
        .finish()
        .expect("finish");
    let mut abandoned = open_loc1(out.path(), Format::Parquet, Entity::Tasks, 1);
    abandoned
        .write(&BatchBuilder::new(Entity::Tasks).finish())
        .expect("write");
    drop(abandoned);
    drop(open_loc1(
        out.path(),
        Format::Csv,
        Entity::DeletedContacts,
        2,
    ));
    // Another location's export in progress, and files that are not ours.
    drop(
        open_part(
            &Dest::local(out.path()),
            Format::Csv,
            Entity::Notes,
            "loc2",
            0,
        )
        .expect("open"),
    );
    let dir1 = out.path().join("tasks/location_id=loc1");
    fs::write(dir1.join(".part-x.tmp"), b"other tool").expect("foreign temp file");
    fs::write(out.path().join(".part-00001.csv.tmp"), b"other tool").expect("foreign temp file");

    assert_eq!(
        clean_temp_parts(&Dest::local(out.path()), &loc1).expect("clean"),
        2
    );
    assert_eq!(names_in(&dir1), [".part-x.tmp", "part-00000.csv"]);
    assert!(names_in(&out.path().join("deleted_contacts/location_id=loc1")).is_empty());
    assert_eq!(
        names_in(&out.path().join("notes/location_id=loc2")),
        [".part-00000.csv.tmp"],
        "another location's part in progress is left alone"
    );
    assert!(out.path().join(&done.path).is_file());
    assert!(out.path().join(".part-00001.csv.tmp").is_file());
    assert_eq!(
        clean_temp_parts(&Dest::local(out.path()), &loc1).expect("clean"),
        0
    );
}

#[test]
fn unsafe_location_ids_are_rejected() {
    let root = tempfile::tempdir().expect("tempdir");
    let out = root.path().join("out");
    for bad in [
        "", ".", "..", "../x", "a/b", "a\\b", "a\0b", "/abs", "ü", "a b", "C:x",
    ] {
        for format in [Format::Parquet, Format::Csv] {
            match open_part(&Dest::local(&out), format, Entity::Contacts, bad, 0) {
                Err(SinkError::UnsafeLocationId { .. }) => {}
                Err(e) => panic!("{bad:?}: unexpected error {e}"),
                Ok(_) => panic!("{bad:?}: accepted"),
            }
        }
    }
    assert!(!out.exists(), "nothing written for rejected ids");
    assert!(names_in(root.path()).is_empty());
    open_part(
        &Dest::local(&out),
        Format::Csv,
        Entity::Contacts,
        "ve9EPM428h8vShlRW1KT",
        0,
    )
    .expect("a real id is fine");
}

#[test]
fn batch_of_another_entity_is_refused_with_the_file_named() {
    let out = tempfile::tempdir().expect("tempdir");
    let tasks = BatchBuilder::new(Entity::Tasks).finish();
    for format in [Format::Parquet, Format::Csv] {
        let mut part = open_part(
            &Dest::local(out.path()),
            format,
            Entity::Contacts,
            "loc1",
            0,
        )
        .expect("open");
        let err = part.write(&tasks).expect_err("schema mismatch");
        assert!(matches!(err, SinkError::SchemaMismatch { .. }), "{err}");
        assert!(err.to_string().contains(".part-00000."), "{err}");
    }
}

#[test]
fn format_extensions_and_part_info_serde() {
    assert_eq!(Format::Parquet.extension(), "parquet");
    assert_eq!(Format::Csv.extension(), "csv");
    let info = PartInfo {
        path: "a/b.csv".into(),
        rows: 2,
        bytes: 10,
    };
    let json = serde_json::to_string(&info).expect("serializes");
    assert_eq!(
        serde_json::from_str::<PartInfo>(&json).expect("parses"),
        info
    );
}
