//! Scale-out: `contacts-etl run FILE --shard K/N` runs worker K's share of a pipeline's
//! locations, so N workers (a Kubernetes Indexed Job, an Airflow task per shard) cover an
//! agency without a scheduler of our own.
//!
//! A location belongs to shard `fnv1a64(id) mod N`: FNV-1a, 64 bit, over the id's UTF-8
//! bytes. The hash is written out here rather than taken from `std` because the split must
//! never change between versions, platforms or processes (std's `DefaultHasher` is allowed to
//! change and `RandomState` is seeded per process): workers built from different releases, or
//! a rerun next night, must agree on who owns a location. The split needs no coordination and
//! no list shared between workers, and each location lands in exactly one shard.
//!
//! Sharding is a deployment choice, so it comes from the flag (and `JOB_COMPLETION_INDEX`),
//! never from the pipeline file. Each shard has its own pipeline lock and report
//! ([`lock_file`], [`report_file`]) so N workers of one pipeline never refuse or overwrite each
//! other; a location's own export lock still refuses two workers handed the same location.

use std::fmt;

use serde::Serialize;

use crate::app::env::JOB_COMPLETION_INDEX;

/// Worker `index` of `count` (0 <= index < count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

/// `--shard` as written: `K/N`, or `/N` with K taken from `JOB_COMPLETION_INDEX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    pub index: Option<u32>,
    pub count: u32,
}

const FORMS: &str = "write K/N for worker K of N (counted from 0, e.g. 0/4 to 3/4), or /N to take K from JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job)";

/// A non-negative decimal number, digits only (`u32::from_str` would also take `+1`).
fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl std::str::FromStr for ShardSpec {
    type Err = String;

    /// Parses `K/N` or `/N`; the message says what is wrong and which forms are accepted.
    fn from_str(s: &str) -> Result<ShardSpec, String> {
        let Some((k, n)) = s.split_once('/') else {
            return Err(format!("'{s}' is not a shard: {FORMS}"));
        };
        let count = number(n).ok_or_else(|| format!("'{s}': N is not a number: {FORMS}"))?;
        if count == 0 {
            return Err(format!("'{s}': N is the number of workers, at least 1"));
        }
        let index = match k {
            "" => None,
            k => Some(number(k).ok_or_else(|| format!("'{s}': K is not a number: {FORMS}"))?),
        };
        if let Some(index) = index {
            check_index(index, count).map_err(|m| format!("'{s}': {m}"))?;
        }
        Ok(ShardSpec { index, count })
    }
}

fn check_index(index: u32, count: u32) -> Result<(), String> {
    if index >= count {
        return Err(format!(
            "worker {index} is not below N = {count}: the workers of {count} are numbered 0 to {}",
            count - 1
        ));
    }
    Ok(())
}

impl ShardSpec {
    /// The shard this worker runs: K as given, else from `JOB_COMPLETION_INDEX` (`env` is that
    /// variable's value, if set). The error is a usage error's message with its `hint:`.
    pub fn resolve(self, env: Option<&str>) -> Result<Shard, String> {
        let count = self.count;
        let index = match (self.index, env) {
            (Some(index), _) => index,
            (None, None) => {
                return Err(format!(
                    "--shard /{count} takes the worker index from {JOB_COMPLETION_INDEX}, which is not set\nhint: run it as a Kubernetes Indexed Job (completionMode: Indexed sets {JOB_COMPLETION_INDEX}), set {JOB_COMPLETION_INDEX} to a number from 0 to {}, or give the index as --shard K/{count}",
                    count - 1
                ))
            }
            (None, Some(v)) => {
                let index = number(v).ok_or_else(|| {
                    format!(
                        "{JOB_COMPLETION_INDEX}='{}' is not a worker index for --shard /{count}\nhint: set it to a number from 0 to {}, or give the index as --shard K/{count}",
                        crate::term::escape(&v.chars().take(40).collect::<String>()),
                        count - 1
                    )
                })?;
                check_index(index, count).map_err(|m| {
                    format!("{JOB_COMPLETION_INDEX}={index} with --shard /{count}: {m}\nhint: the Job's completions must equal N ({count}), or give the index as --shard K/{count}")
                })?;
                index
            }
        };
        Ok(Shard { index, count })
    }
}

/// FNV-1a, 64 bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3): fixed forever,
/// whatever the platform or release.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shard (0..count) that owns a location: `fnv1a64(id) mod count`.
pub fn shard_of(location_id: &str, count: u32) -> u32 {
    (fnv1a64(location_id.as_bytes()) % u64::from(count.max(1))) as u32
}

impl Shard {
    /// Whether this shard runs the location.
    pub fn owns(&self, location_id: &str) -> bool {
        shard_of(location_id, self.count) == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The name of the pipeline's lock file in `OUT/_state`: one per shard, so the workers of
/// one pipeline do not refuse each other (`pipeline-<name>.lock` unsharded).
pub fn lock_file(pipeline: &str, shard: Option<Shard>) -> String {
    match shard {
        None => format!("pipeline-{pipeline}.lock"),
        Some(s) => format!("pipeline-{pipeline}.shard-{}-of-{}.lock", s.index, s.count),
    }
}

/// The name of the pipeline report in `OUT`: one per shard, so the workers do not overwrite
/// each other's (`_pipeline_report.json` unsharded).
pub fn report_file(shard: Option<Shard>) -> String {
    match shard {
        None => "_pipeline_report.json".to_owned(),
        Some(s) => format!("_pipeline_report.shard-{}-of-{}.json", s.index, s.count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_64() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn locations_keep_their_shard_for_seven_workers() {
        // Pinned: a change of hash moves locations between workers, so it must fail here.
        let pinned = [
            ("ve9EPM428h8vShlRW1KT", 5),
            ("loc00aaaaaaaaaaaaaaaa", 6),
            ("goodA000000000000001", 4),
            ("L1", 0),
            ("zzzzzzzzzzzzzzzzzzzz", 5),
        ];
        let got: Vec<u32> = pinned.iter().map(|(id, _)| shard_of(id, 7)).collect();
        let want: Vec<u32> = pinned.iter().map(|(_, k)| *k).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn every_location_is_in_exactly_one_shard_for_one_to_eight_workers() {
        let ids: Vec<String> = (0..300).map(|i| format!("location{i:04}xyz")).collect();
        for count in 1..=8u32 {
            let mut sizes = vec![0usize; count as usize];
            for id in &ids {
                let owners: Vec<u32> = (0..count)
                    .filter(|&index| Shard { index, count }.owns(id))
                    .collect();
                assert_eq!(owners.len(), 1, "{id} with {count} workers: {owners:?}");
                sizes[owners[0] as usize] += 1;
            }
            // Spread, not all in one: every worker gets some of 300 locations.
            assert!(sizes.iter().all(|&n| n > 0), "{count}: {sizes:?}");
        }
    }

    #[test]
    fn the_flag_takes_k_of_n_or_n_alone() {
        let spec = |s: &str| s.parse::<ShardSpec>();
        assert_eq!(
            spec("0/4"),
            Ok(ShardSpec {
                index: Some(0),
                count: 4
            })
        );
        assert_eq!(
            spec("3/4"),
            Ok(ShardSpec {
                index: Some(3),
                count: 4
            })
        );
        assert_eq!(
            spec("/4"),
            Ok(ShardSpec {
                index: None,
                count: 4
            })
        );
        for bad in [
            "4", "4/4", "5/4", "0/0", "/0", "a/4", "1/b", "", "/", "1/", "+1/4", "-1/4", " 1/4",
            "1/4/", "1/ 4", "1.0/4",
        ] {
            assert!(spec(bad).is_err(), "{bad:?} is refused");
        }
        let e = spec("4").unwrap_err();
        assert!(e.contains("K/N") && e.contains("/N"), "{e}");
        let e = spec("4/4").unwrap_err();
        assert!(e.contains("0 to 3"), "{e}");
    }

    #[test]
    fn the_index_comes_from_job_completion_index_when_k_is_omitted() {
        let n = |count| ShardSpec { index: None, count };
        assert_eq!(n(3).resolve(Some("2")), Ok(Shard { index: 2, count: 3 }));
        assert_eq!(n(1).resolve(Some("0")), Ok(Shard { index: 0, count: 1 }));
        // A given K wins over the variable.
        let given = ShardSpec {
            index: Some(1),
            count: 3,
        };
        assert_eq!(given.resolve(Some("x")), Ok(Shard { index: 1, count: 3 }));
        for bad in [
            None,
            Some(""),
            Some("x"),
            Some("-1"),
            Some("3"),
            Some(" 1"),
            Some("1.0"),
        ] {
            let e = n(3).resolve(bad).unwrap_err();
            assert!(
                e.contains("JOB_COMPLETION_INDEX") && e.contains("hint:"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn each_shard_has_its_own_lock_and_report_and_the_unsharded_names_stay() {
        let s = Some(Shard { index: 2, count: 5 });
        assert_eq!(lock_file("nightly", None), "pipeline-nightly.lock");
        assert_eq!(
            lock_file("nightly", s),
            "pipeline-nightly.shard-2-of-5.lock"
        );
        assert_eq!(report_file(None), "_pipeline_report.json");
        assert_eq!(report_file(s), "_pipeline_report.shard-2-of-5.json");
    }
}
