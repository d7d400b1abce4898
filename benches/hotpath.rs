//! Microbenchmarks of the export's hot path, per contact: JSON page → Arrow record batch,
//! record batch → Parquet file, record batch → CSV file.
//!
//! `cargo bench --bench hotpath` prints one line per step (median of several rounds over
//! the simulator's own pages, adversarial values included).

use std::time::{Duration, Instant};

use contacts_etl::schema::{BatchBuilder, Entity, RowContext};
use contacts_etl::sim::{Sim, SimConfig};
use contacts_etl::sink::{open_part, Format};
use serde_json::value::RawValue;

const CONTACTS: usize = 20_000;
const ROUNDS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let sim = Sim::new(SimConfig {
        contacts: CONTACTS,
        rate_limit: None,
        daily_quota: None,
        ..SimConfig::default()
    });
    let loc = sim.config().locations[0].clone();
    // Pages of 100 as the API sends them, then split into raw objects as the client does.
    let contacts = sim.contacts(&loc);
    let pages: Vec<String> = contacts
        .chunks(100)
        .map(|c| serde_json::json!({ "contacts": c, "meta": { "total": CONTACTS } }).to_string())
        .collect();
    let bytes: usize = pages.iter().map(String::len).sum();

    #[derive(serde::Deserialize)]
    struct Page<'a> {
        #[serde(borrow)]
        contacts: Vec<&'a RawValue>,
    }
    let ctx = RowContext {
        location_id: &loc,
        contact_id: None,
    };
    let mut decode = Vec::new();
    let mut batches = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut builder = BatchBuilder::new(Entity::Contacts);
        let mut out = Vec::new();
        for page in &pages {
            let p: Page<'_> = serde_json::from_str(page).expect("valid page");
            for raw in p.contacts {
                builder.append(raw, &ctx).expect("an object");
                if builder.len() >= 8192 {
                    out.push(builder.finish());
                }
            }
        }
        out.push(builder.finish());
        decode.push(start.elapsed());
        batches = out;
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / CONTACTS as f64;
    let d = median(decode);
    println!("JSON pages -> Arrow batches : {:>6.2} us/contact  ({:.0} MB/s of JSON, {} contacts, {:.1} MB)", per(d), bytes as f64 / 1e6 / d.as_secs_f64(), CONTACTS, bytes as f64 / 1e6);

    let dir = std::env::temp_dir().join(format!("contacts-etl-hotpath-{}", std::process::id()));
    for format in [Format::Parquet, Format::Csv] {
        let mut times = Vec::new();
        let mut size = 0;
        for round in 0..ROUNDS {
            let start = Instant::now();
            let mut part = open_part(
                &contacts_etl::dest::Dest::local(&dir),
                format,
                Entity::Contacts,
                &loc,
                round as u32,
            )
            .expect("open a part");
            for b in &batches {
                part.write(b).expect("write");
            }
            size = part.finish().expect("finish").bytes;
            times.push(start.elapsed());
        }
        let d = median(times);
        println!(
            "Arrow batches -> {:<11}: {:>6.2} us/contact  ({:.1} MB file, fsync included)",
            format.extension(),
            per(d),
            size as f64 / 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
