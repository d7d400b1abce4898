//! This process's own CPU time and peak memory, for the run report and the benchmarks.

/// CPU seconds (user + system) and peak resident memory of this process so far.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    pub cpu_seconds: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

impl Resources {
    /// Reads `/proc/self` (Linux); fields are `None` elsewhere.
    pub fn now() -> Resources {
        Resources {
            cpu_seconds: cpu_seconds(),
            peak_rss_bytes: peak_rss(),
        }
    }
}

fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks are 100 per second on every Linux platform this runs on.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn reads_own_usage() {
        let r = super::Resources::now();
        assert!(r.peak_rss_bytes.unwrap() > 1_000_000);
        assert!(r.cpu_seconds.unwrap() >= 0.0);
    }
}
