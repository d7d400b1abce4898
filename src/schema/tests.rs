use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use serde_json::value::RawValue;

use super::*;
use crate::timefmt::parse_iso_millis;

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).expect("test input is valid JSON")
}

const LOC: RowContext<'static> = RowContext {
    location_id: "loc1",
    contact_id: None,
};

/// Appends each object (all must be accepted) and returns the batch.
fn batch(entity: Entity, ctx: &RowContext<'_>, objects: &[&str]) -> RecordBatch {
    let mut b = BatchBuilder::new(entity);
    for o in objects {
        b.append(&raw(o), ctx).expect("object accepted");
    }
    assert_eq!(b.len(), objects.len());
    b.finish()
}

fn text(b: &RecordBatch, col: &str, row: usize) -> Option<String> {
    let a = b
        .column_by_name(col)
        .expect("column exists")
        .as_string::<i32>();
    a.is_valid(row).then(|| a.value(row).to_owned())
}

fn flag(b: &RecordBatch, col: &str, row: usize) -> Option<bool> {
    let a = b.column_by_name(col).expect("column exists").as_boolean();
    a.is_valid(row).then(|| a.value(row))
}

fn ts(b: &RecordBatch, col: &str, row: usize) -> Option<i64> {
    let a = b
        .column_by_name(col)
        .expect("column exists")
        .as_primitive::<TimestampMillisecondType>();
    a.is_valid(row).then(|| a.value(row))
}

fn strs(b: &RecordBatch, col: &str, row: usize) -> Option<Vec<Option<String>>> {
    let a = b
        .column_by_name(col)
        .expect("column exists")
        .as_list::<i32>();
    if !a.is_valid(row) {
        return None;
    }
    let v = a.value(row);
    let v = v.as_string::<i32>();
    Some(
        (0..v.len())
            .map(|i| v.is_valid(i).then(|| v.value(i).to_owned()))
            .collect(),
    )
}

fn fields(b: &RecordBatch, row: usize) -> Option<Vec<(Option<String>, Option<String>)>> {
    let a = b
        .column_by_name("customFields")
        .expect("column exists")
        .as_list::<i32>();
    if !a.is_valid(row) {
        return None;
    }
    let v = a.value(row);
    let s = v.as_struct();
    let (ids, values) = (
        s.column(0).as_string::<i32>(),
        s.column(1).as_string::<i32>(),
    );
    let get = |a: &arrow::array::StringArray, i| a.is_valid(i).then(|| a.value(i).to_owned());
    Some(
        (0..s.len())
            .map(|i| (get(ids, i), get(values, i)))
            .collect(),
    )
}

/// `_extra` of a row as (key, raw value text) pairs in order, parsed back.
fn extra(b: &RecordBatch, row: usize) -> Option<Vec<(String, String)>> {
    let t = text(b, "_extra", row)?;
    let mut out = Vec::new();
    super::decode::for_each_member(&t, |k, v| out.push((k.0.into_owned(), v.get().to_owned())))
        .expect("_extra is a JSON object");
    Some(out)
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn push_json_string_matches_serde_json() {
    let long = "z".repeat(10_000);
    let cases = [
        "plain",
        "quote \" and \\",
        "CR\r LF\n TAB\t",
        "\u{0}\u{1}\u{1f}\u{7f}\u{8}\u{c}",
        "é 🎉 \u{2028} مرحبا",
        "",
        long.as_str(),
    ];
    for s in cases {
        let mut ours = String::new();
        push_json_string(&mut ours, s);
        assert_eq!(ours, serde_json::to_string(s).expect("serializes"), "{s:?}");
    }
}

#[test]
fn schemas_declare_columns_in_order_with_arrow_types() {
    let s = Entity::Contacts.schema();
    assert_eq!(s.fields().len(), 42);
    assert_eq!(s.field(0).name(), "id");
    assert_eq!(s.field(1).name(), "locationId");
    assert_eq!(s.field(41).name(), "_extra");
    let ty = |n: &str| s.field_with_name(n).expect("column").data_type().clone();
    assert_eq!(
        ty("dateAdded"),
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
    );
    assert_eq!(ty("dnd"), DataType::Boolean);
    assert_eq!(ty("dndSettings"), DataType::Utf8);
    assert!(matches!(ty("tags"), DataType::List(f) if f.data_type() == &DataType::Utf8));
    match ty("customFields") {
        DataType::List(f) => match f.data_type() {
            DataType::Struct(fs) => {
                let names: Vec<_> = fs
                    .iter()
                    .map(|f| (f.name().as_str(), f.data_type().clone()))
                    .collect();
                assert_eq!(names, [("id", DataType::Utf8), ("value", DataType::Utf8)]);
            }
            other => panic!("customFields items: {other}"),
        },
        other => panic!("customFields: {other}"),
    }
    assert_eq!(
        s.metadata().get(SCHEMA_VERSION_KEY).map(String::as_str),
        Some("1")
    );
    let names = |e: Entity| {
        e.schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    assert_eq!(names(Entity::Tasks), "id,title,body,assignedTo,dueDate,completed,dateAdded,dateUpdated,contactId,locationId,_extra");
    assert_eq!(
        names(Entity::Notes),
        "id,body,userId,dateAdded,title,color,pinned,contactId,locationId,_extra"
    );
    assert_eq!(
        names(Entity::Appointments),
        "id,calendarId,status,title,assignedUserId,notes,address,startTime,endTime,appointmentStatus,groupId,users,assignedResources,dateAdded,dateUpdated,contactId,locationId,_extra"
    );
    for e in Entity::ALL {
        assert!(e.schema().fields().iter().all(|f| f.is_nullable()), "{e}");
        assert!(
            std::sync::Arc::ptr_eq(&e.schema(), &e.schema()),
            "{e}: cached"
        );
        assert_eq!(BatchBuilder::new(e).entity(), e);
    }
    assert_eq!(
        Entity::ALL.map(Entity::name),
        ["contacts", "tasks", "notes", "appointments"]
    );
}

#[test]
fn typical_contact_fills_every_column() {
    let c = r#"{"id":"c1","locationId":"locX","contactName":"zoë smith","name":"Zoë Smith","firstName":"Zoë","lastName":"Smith",
        "firstNameLowerCase":"zoë","lastNameLowerCase":"smith","fullNameLowerCase":"zoë smith","companyName":"ACME, Inc.",
        "email":"Zoe@x.io","emailLowerCase":"zoe@x.io","phone":"+14155550100","dnd":false,
        "dndSettings":{"SMS":{"status":"active","message":"","code":""}},"inboundDndSettings":{"all":{"status":"inactive"}},
        "type":"lead","source":"form","assignedTo":"u1","address1":"1 Main St","city":"Paris","state":"IDF","country":"FR",
        "postalCode":"75001","website":"https://x.io","timezone":"Europe/Paris","gender":"female","tags":["vip","b2b"],
        "dateOfBirth":"1990-02-03","dateAdded":"2021-07-02T05:18:26.704Z","dateUpdated":"2021-07-03T00:00:00.000Z",
        "lastActivity":1751320500532,"customFields":[{"id":"cf1","value":"abc"},{"id":"cf2","value":12.5},{"id":"cf3","value":["a","b"]}],
        "businessId":"b1","attributions":[{"utmSource":"g","isFirst":true}],"attributionSource":{"medium":"form"},
        "lastAttributionSource":{},"followers":["u2"],"additionalEmails":[{"email":"a@b.c"}],"additionalPhones":[],"visitorId":"v1"}"#;
    let b = batch(Entity::Contacts, &LOC, &[c]);
    assert_eq!(b.num_rows(), 1);
    for (col, want) in [
        ("id", "c1"),
        ("locationId", "locX"),
        ("name", "Zoë Smith"),
        ("companyName", "ACME, Inc."),
        ("email", "Zoe@x.io"),
        ("phone", "+14155550100"),
        (
            "dndSettings",
            r#"{"SMS":{"status":"active","message":"","code":""}}"#,
        ),
        ("inboundDndSettings", r#"{"all":{"status":"inactive"}}"#),
        ("timezone", "Europe/Paris"),
        ("dateOfBirth", "1990-02-03"),
        ("attributions", r#"[{"utmSource":"g","isFirst":true}]"#),
        ("lastAttributionSource", "{}"),
        ("additionalPhones", "[]"),
        ("visitorId", "v1"),
    ] {
        assert_eq!(text(&b, col, 0).as_deref(), Some(want), "{col}");
    }
    assert_eq!(flag(&b, "dnd", 0), Some(false));
    assert_eq!(ts(&b, "dateAdded", 0), Some(1_625_203_106_704));
    assert_eq!(
        ts(&b, "dateUpdated", 0),
        parse_iso_millis("2021-07-03T00:00:00.000Z")
    );
    assert_eq!(ts(&b, "lastActivity", 0), Some(1_751_320_500_532));
    assert_eq!(
        strs(&b, "tags", 0),
        Some(vec![Some("vip".into()), Some("b2b".into())])
    );
    assert_eq!(strs(&b, "followers", 0), Some(vec![Some("u2".into())]));
    let cf = |id: &str, v: &str| (Some(id.to_owned()), Some(v.to_owned()));
    assert_eq!(
        fields(&b, 0),
        Some(vec![
            cf("cf1", "\"abc\""),
            cf("cf2", "12.5"),
            cf("cf3", r#"["a","b"]"#)
        ])
    );
    assert_eq!(text(&b, "_extra", 0), None, "nothing extra");
}

#[test]
fn adversarial_text_is_decoded_exactly() {
    let long = "x".repeat(10 * 1024);
    let cases: Vec<(String, String)> = vec![
        (
            r#""line1\r\nline2\nline3\r""#.into(),
            "line1\r\nline2\nline3\r".into(),
        ),
        (
            r#""she said \"hi\", then left""#.into(),
            "she said \"hi\", then left".into(),
        ),
        (r#""a,b,,c""#.into(), "a,b,,c".into()),
        (r#""🎉 party 👩‍👩‍👧""#.into(), "🎉 party 👩‍👩‍👧".into()),
        (r#""\ud83c\udf89 escaped""#.into(), "🎉 escaped".into()),
        (
            r#""مرحبا بالعالم ‏שלום""#.into(),
            "مرحبا بالعالم \u{200f}שלום".into(),
        ),
        (format!("\"{long}\""), long.clone()),
        (
            r#""=HYPERLINK(\"http://x\")""#.into(),
            "=HYPERLINK(\"http://x\")".into(),
        ),
        (r#""+1 555""#.into(), "+1 555".into()),
        (r#""-2+3""#.into(), "-2+3".into()),
        (r#""@SUM(A1)""#.into(), "@SUM(A1)".into()),
        (
            r#""tab\there \u0000 nul \\ backslash""#.into(),
            "tab\there \0 nul \\ backslash".into(),
        ),
        (r#""""#.into(), String::new()),
        (
            r#"" leading and trailing ""#.into(),
            " leading and trailing ".into(),
        ),
    ];
    let objects: Vec<String> = cases
        .iter()
        .map(|(json, _)| format!(r#"{{"id":"c","firstName":{json},"tags":[{json}]}}"#))
        .collect();
    let refs: Vec<&str> = objects.iter().map(String::as_str).collect();
    let b = batch(Entity::Contacts, &LOC, &refs);
    for (row, (json, want)) in cases.iter().enumerate() {
        assert_eq!(
            text(&b, "firstName", row).as_deref(),
            Some(want.as_str()),
            "{json}"
        );
        assert_eq!(
            strs(&b, "tags", row),
            Some(vec![Some(want.clone())]),
            "{json}"
        );
        assert_eq!(extra(&b, row), None);
    }
}

#[test]
fn nulls_and_absent_keys_are_null() {
    let b = batch(
        Entity::Contacts,
        &LOC,
        &[
            r#"{"id":null,"firstName":null,"dnd":null,"tags":null,"customFields":null,"dndSettings":null,"dateAdded":null}"#,
            "{}",
        ],
    );
    for row in 0..2 {
        for col in ["id", "firstName", "dndSettings", "email", "_extra"] {
            assert_eq!(text(&b, col, row), None, "{col}");
        }
        assert_eq!(flag(&b, "dnd", row), None);
        assert_eq!(ts(&b, "dateAdded", row), None);
        assert_eq!(strs(&b, "tags", row), None);
        assert_eq!(fields(&b, row), None);
        // A contact without locationId gets the export's.
        assert_eq!(text(&b, "locationId", row).as_deref(), Some("loc1"));
    }
}

#[test]
fn scalars_in_text_columns_keep_their_json_text() {
    let b = batch(
        Entity::Contacts,
        &LOC,
        &[r#"{"postalCode":12345,"phone":1.5e3,"city":true,"dateOfBirth":631152000000}"#],
    );
    assert_eq!(text(&b, "postalCode", 0).as_deref(), Some("12345"));
    assert_eq!(text(&b, "phone", 0).as_deref(), Some("1.5e3"));
    assert_eq!(text(&b, "city", 0).as_deref(), Some("true"));
    assert_eq!(text(&b, "dateOfBirth", 0).as_deref(), Some("631152000000"));
    assert_eq!(extra(&b, 0), None);
}

#[test]
fn wrong_types_and_unknown_keys_go_to_extra_as_received() {
    let o = r#"{"id":"c1","unknownA":{"deep": [1, 2, {"x":null}]},"dnd":"yes","firstName":{"first":"Zoë"},
        "dateAdded":"yesterday","dateUpdated":1.5,"lastActivity":"","tags":["a",1],"followers":["u",null],
        "customFields":"oops","email":["a@b.c"],"zeta":-0.0e+1,"_extra":"mine","dndSettings":"text is fine for Json"}"#;
    let b = batch(Entity::Contacts, &LOC, &[o]);
    assert_eq!(text(&b, "id", 0).as_deref(), Some("c1"));
    for col in ["firstName", "email"] {
        assert_eq!(text(&b, col, 0), None, "{col}");
    }
    assert_eq!(flag(&b, "dnd", 0), None);
    assert_eq!(ts(&b, "dateAdded", 0), None);
    assert_eq!(ts(&b, "dateUpdated", 0), None);
    assert_eq!(strs(&b, "tags", 0), None);
    assert_eq!(strs(&b, "followers", 0), None);
    assert_eq!(fields(&b, 0), None);
    assert_eq!(
        text(&b, "dndSettings", 0).as_deref(),
        Some(r#""text is fine for Json""#)
    );
    assert_eq!(
        extra(&b, 0),
        Some(pairs(&[
            ("unknownA", r#"{"deep": [1, 2, {"x":null}]}"#),
            ("dnd", r#""yes""#),
            ("firstName", r#"{"first":"Zoë"}"#),
            ("dateAdded", r#""yesterday""#),
            ("dateUpdated", "1.5"),
            ("lastActivity", r#""""#),
            ("tags", r#"["a",1]"#),
            ("followers", r#"["u",null]"#),
            ("customFields", r#""oops""#),
            ("email", r#"["a@b.c"]"#),
            ("zeta", "-0.0e+1"),
            ("_extra", r#""mine""#),
        ]))
    );
}

#[test]
fn whitespace_around_values_is_not_part_of_them() {
    let o = "{ \"id\" :\t\"c1\" ,\r\n \"dnd\" : true , \"tags\" : [ \"a\" , \"b\" ] , \"odd\" :  { \"k\" : 1 }  }";
    let b = batch(Entity::Contacts, &LOC, &[o]);
    assert_eq!(text(&b, "id", 0).as_deref(), Some("c1"));
    assert_eq!(flag(&b, "dnd", 0), Some(true));
    assert_eq!(
        strs(&b, "tags", 0),
        Some(vec![Some("a".into()), Some("b".into())])
    );
    assert_eq!(
        text(&b, "_extra", 0).as_deref(),
        Some(r#"{"odd":{ "k" : 1 }}"#)
    );
}

#[test]
fn repeated_key_keeps_first_in_column_and_rest_in_extra() {
    let b = batch(
        Entity::Contacts,
        &LOC,
        &[r#"{"email":null,"email":"a@x","email":"b@x","tags":["t"],"tags":["u"]}"#],
    );
    assert_eq!(text(&b, "email", 0).as_deref(), Some("a@x"));
    assert_eq!(strs(&b, "tags", 0), Some(vec![Some("t".into())]));
    assert_eq!(
        extra(&b, 0),
        Some(pairs(&[("email", r#""b@x""#), ("tags", r#"["u"]"#)]))
    );
}

#[test]
fn escaped_keys_are_matched_decoded_and_kept_as_json() {
    let b = batch(
        Entity::Contacts,
        &LOC,
        &[r#"{"fir\u0073tName":"Ann","we\"ird\nkey":1}"#],
    );
    assert_eq!(text(&b, "firstName", 0).as_deref(), Some("Ann"));
    assert_eq!(extra(&b, 0), Some(pairs(&[("we\"ird\nkey", "1")])));
}

#[test]
fn custom_fields_keep_values_raw_and_extra_keys_in_extra() {
    let b = batch(
        Entity::Contacts,
        &LOC,
        &[
            r#"{"customFields":[{"id":"a","value":{"k":[1,"x"]}},{"id":"b"},{"value":true,"id":"c"},{"id":"d","value":null},{"id":"e\u00e9","value":"q\"uote"}]}"#,
            r#"{"customFields":[{"id":"a","value":1,"key":"contact.a","fieldValue":1}]}"#,
            r#"{"customFields":[{"id":"a","value":1},"not an object"]}"#,
            r#"{"customFields":[{"value":1}]}"#,
            r#"{"customFields":[{"id":7,"value":1}]}"#,
            r#"{"customFields":[]}"#,
        ],
    );
    let cf = |id: &str, v: Option<&str>| (Some(id.to_owned()), v.map(str::to_owned));
    assert_eq!(
        fields(&b, 0),
        Some(vec![
            cf("a", Some(r#"{"k":[1,"x"]}"#)),
            cf("b", None),
            cf("c", Some("true")),
            cf("d", Some("null")),
            cf("eé", Some(r#""q\"uote""#)),
        ])
    );
    assert_eq!(extra(&b, 0), None);
    // Decoded, and the original kept because `key`/`fieldValue` are not columns.
    assert_eq!(fields(&b, 1), Some(vec![cf("a", Some("1"))]));
    assert_eq!(
        extra(&b, 1),
        Some(pairs(&[(
            "customFields",
            r#"[{"id":"a","value":1,"key":"contact.a","fieldValue":1}]"#
        )]))
    );
    for row in 2..5 {
        assert_eq!(fields(&b, row), None, "row {row}");
        assert_eq!(extra(&b, row).map(|e| e.len()), Some(1), "row {row}");
    }
    assert_eq!(fields(&b, 5), Some(vec![]));
}

#[test]
fn timestamps_accept_iso_zoneless_and_epoch_ms() {
    let b = batch(
        Entity::Appointments,
        &RowContext {
            location_id: "loc1",
            contact_id: Some("c1"),
        },
        &[
            r#"{"startTime":"2021-07-16 11:00:00","endTime":"2021-07-16T13:30:00+02:00","dateAdded":1625203106704,"dateUpdated":-1}"#,
        ],
    );
    assert_eq!(
        ts(&b, "startTime", 0),
        parse_iso_millis("2021-07-16T11:00:00Z")
    );
    assert_eq!(
        ts(&b, "endTime", 0),
        parse_iso_millis("2021-07-16T11:30:00Z")
    );
    assert_eq!(ts(&b, "dateAdded", 0), Some(1_625_203_106_704));
    assert_eq!(ts(&b, "dateUpdated", 0), Some(-1));
}

#[test]
fn child_ids_come_from_context_and_disagreements_are_kept() {
    let ctx = RowContext {
        location_id: "loc1",
        contact_id: Some("c1"),
    };
    let b = batch(
        Entity::Tasks,
        &ctx,
        &[
            r#"{"id":"t1","title":"Call","completed":true,"dueDate":"2021-07-02T05:18:26.704Z","contactId":"c1","locationId":"loc1"}"#,
            r#"{"id":"t2","contactId":"other","locationId":null}"#,
            r#"{"id":"t3","locationId":"elsewhere"}"#,
        ],
    );
    for row in 0..3 {
        assert_eq!(text(&b, "contactId", row).as_deref(), Some("c1"));
        assert_eq!(text(&b, "locationId", row).as_deref(), Some("loc1"));
    }
    assert_eq!(flag(&b, "completed", 0), Some(true));
    assert_eq!(ts(&b, "dueDate", 0), Some(1_625_203_106_704));
    assert_eq!(extra(&b, 0), None);
    assert_eq!(extra(&b, 1), Some(pairs(&[("contactId", r#""other""#)])));
    assert_eq!(
        extra(&b, 2),
        Some(pairs(&[("locationId", r#""elsewhere""#)]))
    );

    // Without a parent in context, the object's contactId is kept.
    let b = batch(
        Entity::Notes,
        &LOC,
        &[r#"{"id":"n1","contactId":"c9","pinned":false,"color":"red"}"#],
    );
    assert_eq!(text(&b, "contactId", 0).as_deref(), Some("c9"));
    assert_eq!(text(&b, "locationId", 0).as_deref(), Some("loc1"));
    assert_eq!(flag(&b, "pinned", 0), Some(false));
}

#[test]
fn non_objects_are_rejected_without_a_row() {
    let mut b = BatchBuilder::new(Entity::Notes);
    let long = format!("\"{}\"", "y".repeat(10_000));
    for bad in ["[1,2]", "\"text\"", "42", "null", long.as_str()] {
        let err = b.append(&raw(bad), &LOC).expect_err(bad);
        let msg = err.to_string();
        assert!(msg.starts_with("notes: expected a JSON object"), "{msg}");
        assert!(msg.len() < 200, "message stays short: {} bytes", msg.len());
    }
    assert!(b.is_empty());
    b.append(&raw(r#"{"id":"n1"}"#), &LOC).expect("object");
    let batch = b.finish();
    assert_eq!(batch.num_rows(), 1);
    assert!(b.is_empty(), "finish resets");
    let empty = b.finish();
    assert_eq!(empty.num_rows(), 0);
    assert_eq!(empty.schema(), Entity::Notes.schema());
}

#[test]
fn builder_is_reusable_across_batches() {
    let mut b = BatchBuilder::new(Entity::Contacts);
    for round in 0..3 {
        for i in 0..5 {
            let o = format!(
                r#"{{"id":"c{round}-{i}","tags":["t{i}"],"customFields":[{{"id":"f","value":{i}}}],"x":{i}}}"#
            );
            b.append(&raw(&o), &LOC).expect("object");
        }
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 5);
        assert_eq!(
            text(&batch, "id", 4).as_deref(),
            Some(format!("c{round}-4").as_str())
        );
        assert_eq!(strs(&batch, "tags", 3), Some(vec![Some("t3".into())]));
        assert_eq!(
            fields(&batch, 2),
            Some(vec![(Some("f".into()), Some("2".into()))])
        );
        assert_eq!(extra(&batch, 1), Some(pairs(&[("x", "1")])));
    }
}

/// A contact as the API sends it fills its columns and leaves only the keys the schema does
/// not declare in `_extra`. (The append path's speed is measured by `benches/hotpath.rs`,
/// not by a test.)
#[test]
fn api_shaped_contact_leaves_only_undeclared_keys_in_extra() {
    let contact = r#"{"id":"pfj4mrJvmTZkDRSKUbj7","locationId":"ve9EPM428h8vShlRW1KT","contactName":"zoë smith","firstName":"Zoë","lastName":"Smith",
        "firstNameLowerCase":"zoë","lastNameLowerCase":"smith","fullNameLowerCase":"zoë smith","companyName":"ACME","email":"zoe@x.io","emailLowerCase":"zoe@x.io",
        "phone":"+14155550100","dnd":false,"dndSettings":{"SMS":{"status":"active","message":"","code":""},"Email":{"status":"inactive","message":"","code":""}},
        "type":"lead","source":"public api","assignedTo":"u1XyZ","address1":"1 Main St","city":"Paris","state":"IDF","country":"FR","postalCode":"75001",
        "website":null,"timezone":"Europe/Paris","tags":["vip","b2b","newsletter"],"dateOfBirth":null,"dateAdded":"2021-07-02T05:18:26.704Z",
        "dateUpdated":"2021-07-03T00:00:00.000Z","customFields":[{"id":"cf1","value":"abc"},{"id":"cf2","value":12.5}],"businessId":null,
        "attributions":[{"utmSessionSource":"Direct traffic","isFirst":true,"medium":"manual"}],"followers":[],"additionalEmails":[],"additionalPhones":[],"opportunities":[]}"#;
    let batch = batch(Entity::Contacts, &LOC, &[contact]);
    assert_eq!(extra(&batch, 0), Some(pairs(&[("opportunities", "[]")])));
    assert_eq!(text(&batch, "firstName", 0).as_deref(), Some("Zoë"));
    assert_eq!(ts(&batch, "dateAdded", 0), Some(1_625_203_106_704));
}

/// Regression (issue 12): `2021-02-31` was stored as March 3, a day the API never sent;
/// a text that is no calendar date is kept in `_extra` as received, like any other value
/// its column cannot hold.
#[test]
fn impossible_calendar_dates_go_to_extra_as_received() {
    let o = r#"{"id":"c1","dateAdded":"2021-02-31T10:00:00.000Z","dateUpdated":"2023-02-29",
        "lastActivity":"2024-02-29T00:00:00Z"}"#;
    let b = batch(Entity::Contacts, &LOC, &[o]);
    assert_eq!(ts(&b, "dateAdded", 0), None);
    assert_eq!(ts(&b, "dateUpdated", 0), None);
    assert_eq!(
        ts(&b, "lastActivity", 0),
        parse_iso_millis("2024-02-29T00:00:00Z"),
        "a leap day is a date"
    );
    assert_eq!(
        extra(&b, 0),
        Some(pairs(&[
            ("dateAdded", r#""2021-02-31T10:00:00.000Z""#),
            ("dateUpdated", r#""2023-02-29""#),
        ]))
    );
    let ctx = RowContext {
        location_id: "loc1",
        contact_id: Some("c1"),
    };
    let b = batch(
        Entity::Appointments,
        &ctx,
        &[r#"{"id":"a1","startTime":"2021-04-31 11:00:00","endTime":"2021-04-30 25:00:00"}"#],
    );
    assert_eq!(ts(&b, "startTime", 0), None);
    assert_eq!(ts(&b, "endTime", 0), None);
    assert_eq!(
        extra(&b, 0),
        Some(pairs(&[
            ("startTime", r#""2021-04-31 11:00:00""#),
            ("endTime", r#""2021-04-30 25:00:00""#),
        ]))
    );
}

#[test]
fn every_entity_builds_including_deleted_contacts() {
    for entity in Entity::ALL.into_iter().chain([Entity::DeletedContacts]) {
        let mut b = BatchBuilder::new(entity);
        let raw = serde_json::value::RawValue::from_string(
            r#"{"id":"x","dateUpdated":1700000000000}"#.into(),
        )
        .unwrap();
        b.append(
            &raw,
            &RowContext {
                location_id: "L",
                contact_id: Some("c"),
            },
        )
        .unwrap();
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 1, "{entity}");
        assert_eq!(
            batch.schema().fields().len(),
            entity.schema().fields().len()
        );
    }
}
