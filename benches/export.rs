//! End-to-end benchmark of `contacts-etl export` against the built-in simulator.
//!
//! ```sh
//! cargo bench --bench export                 # the default suite (about 4 minutes)
//! cargo bench --bench export -- --quick      # small sizes, short rate-limit runs
//! cargo bench --bench export -- --full       # adds the 1M-contact list-only run and makes
//!                                             # the paced run 10 minutes long
//! cargo bench --bench export -- rate         # only scenarios whose name contains "rate"
//! ```
//!
//! Each scenario starts the simulator as its own process on a free loopback port
//! (`--port 0`, the address is read from its stderr), waits until it answers, runs
//! one exporter process against it (the Rust binary, or `benches/baseline.py`),
//! and reads three sources of truth:
//!
//! - the exporter's `_manifest.json` (rows, retries, and the exporter's own CPU
//!   seconds and peak RSS), or the baseline's JSON summary line;
//! - the simulator's `GET /_sim/stats` counters, before, at the end of the first
//!   rate-limit window and after the run: the server's view of requests and 429s;
//! - the simulator's CPU time from `/proc/<pid>/stat`, so the table says which
//!   side of the loopback connection is the bottleneck.
//!
//! Every child process sits in a guard that kills it on drop, so a failed
//! scenario, a timeout or a panic never leaves a simulator behind. One markdown
//! row goes to stdout per scenario as soon as it is measured; a detail table and
//! notes follow at the end. Progress goes to stderr.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");
const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baseline.py");
const LOCATION: &str = "demoLocation00000001";
const SEED: &str = "42";
/// Children fetched per contact when a scenario includes them all.
const CHILDREN: &str = "tasks,notes,appointments";
/// How long the simulator may take to print its address and then answer.
const SIM_STARTUP: Duration = Duration::from_secs(30);
const MIB: f64 = 1024.0 * 1024.0;

fn main() -> ExitCode {
    let opts = Options::parse(std::env::args().skip(1));
    let ticks = clock_ticks();
    let scenarios: Vec<Scenario> = suite(opts.size)
        .into_iter()
        .filter(|s| {
            opts.filter
                .as_ref()
                .is_none_or(|f| s.name.contains(f.as_str()))
        })
        .collect();

    println!("{}", machine_line());
    println!();
    println!("{}", Row::HEADER);
    println!("{}", Row::RULE);

    let mut measured = Vec::new();
    let mut notes = Vec::new();
    let mut failed = 0;
    let mut failed_names: Vec<&str> = Vec::new();
    for scenario in &scenarios {
        if let Client::Python { .. } = scenario.client {
            if let Err(why) = python_available() {
                let note = format!(
                    "{}: skipped, the baseline needs Python 3 with requests and pyarrow \
                     ({why}); install them with `pip install requests pyarrow`",
                    scenario.name
                );
                eprintln!("bench: {note}");
                notes.push(note);
                continue;
            }
        }
        eprintln!("bench: {} ...", scenario.name);
        match run(scenario, ticks) {
            Ok(m) => {
                println!("{}", Row::from(&m).markdown());
                // Flushed per row so a long suite shows progress when piped.
                let _ = std::io::stdout().flush();
                measured.push(m);
            }
            Err(err) => {
                failed += 1;
                failed_names.push(scenario.name);
                let note = format!("{}: FAILED: {err:#}", scenario.name);
                eprintln!("bench: {note}");
                notes.push(note);
            }
        }
    }

    println!();
    println!("{}", Detail::HEADER);
    println!("{}", Detail::RULE);
    for m in &measured {
        println!("{}", Detail::from(m).markdown());
    }
    notes.extend(cross_checks(&measured));
    let wants_sim_alone = opts
        .filter
        .as_ref()
        .is_none_or(|f| "simulator alone".contains(f.as_str()));
    let mut sim_alone = None;
    if wants_sim_alone {
        eprintln!("bench: simulator alone ...");
        match SimAlone::measure(ticks) {
            Ok(a) => sim_alone = Some(a),
            Err(err) => {
                failed += 1;
                notes.push(format!("simulator alone: FAILED: {err:#}"));
            }
        }
    }
    if let Some(a) = &sim_alone {
        println!();
        println!("{}", SimAlone::HEADER);
        println!("{}", SimAlone::RULE);
        println!("{}", a.markdown());
        println!();
        println!("{}", a.verdict(&measured));
    }
    let goals = goals(&measured, &failed_names);
    if !goals.is_empty() {
        println!();
        println!("Goals:");
        println!();
        for g in &goals {
            println!("- {g}");
        }
    }
    if !notes.is_empty() {
        println!();
        for note in &notes {
            println!("- {note}");
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// How big a suite to run.
#[derive(Clone, Copy, PartialEq)]
enum Size {
    /// Small sizes and 20-second rate-limit runs, for a smoke check.
    Quick,
    /// The default suite.
    Default,
    /// The default suite plus the 1M-contact list-only run.
    Full,
}

struct Options {
    size: Size,
    filter: Option<String>,
}

impl Options {
    /// Reads `--quick`, `--full` and an optional name filter. Anything else that
    /// starts with `-` (cargo passes `--bench`) is ignored.
    fn parse(args: impl Iterator<Item = String>) -> Options {
        let mut opts = Options {
            size: Size::Default,
            filter: None,
        };
        for arg in args {
            match arg.as_str() {
                "--quick" => opts.size = Size::Quick,
                "--full" => opts.size = Size::Full,
                a if a.starts_with('-') => {}
                _ => opts.filter = Some(arg),
            }
        }
        opts
    }
}

/// A rate limit as REQUESTS per SECONDS, the shape of the API's 100/10s.
#[derive(Clone, Copy)]
struct Limit {
    max: u32,
    secs: u32,
}

impl Limit {
    fn arg(self) -> String {
        format!("{}/{}s", self.max, self.secs)
    }

    fn per_sec(self) -> f64 {
        f64::from(self.max) / f64::from(self.secs)
    }
}

/// The API's real window shape (100/10s) at ten times the rate, so a run that
/// shows steady-state pacing fits in about a minute.
const SIM_LIMIT: Limit = Limit {
    max: 1000,
    secs: 10,
};

#[derive(Clone, Copy)]
enum Format {
    Parquet,
    Csv,
}

impl Format {
    fn arg(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
        }
    }
}

enum Client {
    Rust {
        format: Format,
        include: &'static str,
        concurrency: u32,
        /// `None` is `--rate-limit off`.
        rate_limit: Option<Limit>,
    },
    Python {
        threads: u32,
    },
}

struct Scenario {
    name: &'static str,
    contacts: u64,
    /// The simulator's limit; `None` is `--rate-limit off`.
    server_limit: Option<Limit>,
    client: Client,
    /// The exporter is killed, and the scenario failed, past this.
    timeout: Duration,
}

fn suite(size: Size) -> Vec<Scenario> {
    let quick = size == Size::Quick;
    let unlimited = |format, include| Client::Rust {
        format,
        include,
        concurrency: 32,
        rate_limit: None,
    };
    // At 100 requests/s, 3 children per contact plus a page per 100 contacts:
    // 2,000 contacts are 6,020 requests, about 60 s; with --full, 20,000 contacts make the
    // 10-minute run the rate-limit target is stated for.
    let paced_contacts = match size {
        Size::Quick => 660,
        Size::Default => 2_000,
        Size::Full => 20_000,
    };
    let stricter_contacts = if quick { 660 } else { 1_000 };
    let mut s = vec![
        Scenario {
            name: "throughput 10k",
            contacts: 10_000,
            server_limit: None,
            client: unlimited(Format::Parquet, CHILDREN),
            timeout: Duration::from_secs(300),
        },
        Scenario {
            name: "throughput 10k csv",
            contacts: 10_000,
            server_limit: None,
            client: unlimited(Format::Csv, CHILDREN),
            timeout: Duration::from_secs(300),
        },
    ];
    if !quick {
        s.push(Scenario {
            name: "throughput 100k",
            contacts: 100_000,
            server_limit: None,
            client: unlimited(Format::Parquet, CHILDREN),
            timeout: Duration::from_secs(900),
        });
        s.push(Scenario {
            name: "throughput 100k csv",
            contacts: 100_000,
            server_limit: None,
            client: unlimited(Format::Csv, CHILDREN),
            timeout: Duration::from_secs(900),
        });
    }
    // List-only runs at growing sizes, in both formats: the memory-flatness goal compares them.
    let mut list_sizes = vec![("10k", 10_000, 300)];
    if !quick {
        list_sizes.push(("100k", 100_000, 600));
    }
    if size == Size::Full {
        list_sizes.push(("1M", 1_000_000, 1800));
    }
    for (format, suffix) in [(Format::Parquet, ""), (Format::Csv, " csv")] {
        for &(label, contacts, timeout) in &list_sizes {
            s.push(Scenario {
                name: leak(format!("list-only {label}{suffix}")),
                contacts,
                server_limit: None,
                client: unlimited(format, "none"),
                timeout: Duration::from_secs(timeout),
            });
        }
    }
    s.push(Scenario {
        name: "rate limit 1000/10s",
        contacts: paced_contacts,
        server_limit: Some(SIM_LIMIT),
        client: Client::Rust {
            format: Format::Parquet,
            include: CHILDREN,
            concurrency: 8,
            rate_limit: Some(SIM_LIMIT),
        },
        timeout: Duration::from_secs(if size == Size::Full { 900 } else { 300 }),
    });
    s.push(Scenario {
        name: "stricter server (client 2000/10s)",
        contacts: stricter_contacts,
        server_limit: Some(SIM_LIMIT),
        client: Client::Rust {
            format: Format::Parquet,
            include: CHILDREN,
            concurrency: 8,
            rate_limit: Some(Limit {
                max: 2000,
                secs: 10,
            }),
        },
        timeout: Duration::from_secs(300),
    });
    s.push(Scenario {
        name: "python baseline 10k",
        contacts: 10_000,
        server_limit: None,
        client: Client::Python { threads: 16 },
        timeout: Duration::from_secs(900),
    });
    s
}

/// Scenario names are built once per run and live as long as it.
fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

/// What one scenario measured.
struct Measured {
    name: &'static str,
    format: &'static str,
    /// Contacts written by the exporter.
    contacts: u64,
    /// Rows per entity, in a fixed order: contacts, tasks, notes, appointments.
    rows: [Option<u64>; 4],
    wall: f64,
    client_cpu: f64,
    client_rss: u64,
    /// Simulator CPU seconds spent while the exporter ran (startup excluded).
    sim_cpu: f64,
    retries: u64,
    /// 429s the exporter counted, to compare with the server's count.
    client_429: u64,
    /// Request attempts the exporter counted, to compare with the server's.
    client_attempts: u64,
    /// Server counters over the run.
    server: Counts,
    /// Server counters over the first rate-limit window, when the server has one.
    first_window: Option<Counts>,
    server_limit: Option<Limit>,
    /// Contacts the simulator holds: what the exporter must write.
    expected_contacts: u64,
}

impl Measured {
    fn served_ok(&self) -> u64 {
        self.server.served_ok()
    }
}

/// The simulator's `/_sim/stats` counters, or the difference of two readings.
#[derive(Clone, Copy, Default)]
struct Counts {
    requests: u64,
    rate_limited: u64,
    quota_exceeded: u64,
    faults: u64,
    /// Most requests seen in one window since the simulator started (not a delta).
    max_in_window: u64,
}

impl Counts {
    fn from_json(v: &Value) -> Result<Counts> {
        let field = |name: &str| v.get(name).and_then(Value::as_u64);
        Ok(Counts {
            requests: field("requests").context("/_sim/stats has no `requests` counter")?,
            rate_limited: field("rate_limited").unwrap_or(0),
            quota_exceeded: field("quota_exceeded").unwrap_or(0),
            faults: field("faults_injected").unwrap_or(0),
            max_in_window: field("max_in_window").unwrap_or(0),
        })
    }

    fn since(self, before: Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(before.requests),
            rate_limited: self.rate_limited.saturating_sub(before.rate_limited),
            quota_exceeded: self.quota_exceeded.saturating_sub(before.quota_exceeded),
            faults: self.faults.saturating_sub(before.faults),
            max_in_window: self.max_in_window,
        }
    }

    /// Requests the server answered normally: not refused, not faulted.
    fn served_ok(self) -> u64 {
        self.requests
            .saturating_sub(self.rate_limited + self.quota_exceeded + self.faults)
    }
}

/// Runs one scenario from simulator start to simulator kill.
fn run(scenario: &Scenario, ticks: f64) -> Result<Measured> {
    let sim = Sim::start(scenario.contacts, scenario.server_limit)?;
    let dir = tempfile::Builder::new()
        .prefix("contacts-etl-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let out = dir.path().join("out");
    let stdout_path = dir.path().join("client.stdout");
    let stderr_path = dir.path().join("client.stderr");

    let mut cmd = match &scenario.client {
        Client::Rust {
            format,
            include,
            concurrency,
            rate_limit,
        } => {
            let mut c = Command::new(BIN);
            c.env("HL_TOKEN", "bench")
                .arg("export")
                .args(["--base-url", &format!("http://{}", sim.addr)])
                .args(["--location", LOCATION, "--format", format.arg()])
                .args(["--include", include, "--quiet"])
                .args(["--concurrency", &concurrency.to_string()])
                .args(["--rate-limit", &rate_limit.map_or("off".into(), Limit::arg)])
                .arg("--out")
                .arg(&out);
            c
        }
        Client::Python { threads } => {
            let mut c = Command::new("python3");
            c.env("HL_TOKEN", "bench")
                .arg(BASELINE)
                .args(["--base-url", &format!("http://{}", sim.addr)])
                .args(["--location", LOCATION, "--threads", &threads.to_string()])
                .arg("--out")
                .arg(&out);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(File::create(&stdout_path).context("creating the client's stdout file")?)
        .stderr(File::create(&stderr_path).context("creating the client's stderr file")?);

    let before = sim.counts()?;
    let cpu_before = proc_cpu_secs(sim.pid(), ticks)?;
    let window = scenario
        .server_limit
        .map(|l| Duration::from_secs(u64::from(l.secs)));
    let mut first_window = None;

    let start = Instant::now();
    let mut client = Guard(cmd.spawn().context("starting the exporter")?);
    let status = loop {
        if let Some(status) = client.0.try_wait().context("waiting for the exporter")? {
            break status;
        }
        let elapsed = start.elapsed();
        if elapsed > scenario.timeout {
            bail!(
                "the exporter ran past the {:?} timeout and was killed",
                scenario.timeout
            );
        }
        if let Some(w) = window {
            if first_window.is_none() && elapsed >= w {
                first_window = Some(sim.counts()?.since(before));
            }
        }
        thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed().as_secs_f64();
    let sim_cpu = proc_cpu_secs(sim.pid(), ticks)? - cpu_before;
    let server = sim.counts()?.since(before);
    drop(sim);
    check_exit(status, &stderr_path)?;

    let mut m = Measured {
        name: scenario.name,
        format: "parquet",
        contacts: 0,
        rows: [None; 4],
        wall,
        client_cpu: 0.0,
        client_rss: 0,
        sim_cpu,
        retries: 0,
        client_429: 0,
        client_attempts: 0,
        server,
        first_window,
        server_limit: scenario.server_limit,
        expected_contacts: scenario.contacts,
    };
    match &scenario.client {
        Client::Rust { format, .. } => {
            m.format = format.arg();
            read_manifest(&out.join("_manifest.json"), &mut m)?;
        }
        Client::Python { .. } => read_baseline_summary(&stdout_path, &mut m)?,
    }
    Ok(m)
}

fn check_exit(status: ExitStatus, stderr_path: &Path) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    let log = fs::read_to_string(stderr_path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!(
        "the exporter exited with {status}; its stderr ends:\n{}",
        tail.join("\n")
    )
}

const ENTITIES: [&str; 4] = ["contacts", "tasks", "notes", "appointments"];

fn read_manifest(path: &Path, m: &mut Measured) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let num = |ptr: &str| {
        v.pointer(ptr)
            .and_then(Value::as_f64)
            .with_context(|| format!("{}: no number at {ptr}", path.display()))
    };
    for (slot, entity) in m.rows.iter_mut().zip(ENTITIES) {
        *slot = v
            .pointer(&format!("/entities/{entity}/rows"))
            .and_then(Value::as_u64);
    }
    m.contacts = m.rows[0].context("the manifest has no contacts row count")?;
    m.client_cpu = num("/resources/cpuSeconds")?;
    m.client_rss = num("/resources/peakRssBytes")? as u64;
    m.retries = num("/requests/retries")? as u64;
    m.client_429 = num("/requests/rateLimited")? as u64;
    m.client_attempts = num("/requests/attempts")? as u64;
    Ok(())
}

/// The baseline prints one JSON line: rows, requests, retries, cpuSeconds, peakRssBytes.
fn read_baseline_summary(path: &Path, m: &mut Measured) -> Result<()> {
    let text = fs::read_to_string(path).context("reading the baseline's stdout")?;
    let line = text
        .lines()
        .last()
        .context("the baseline printed nothing")?;
    let v: Value = serde_json::from_str(line).context("parsing the baseline's summary")?;
    let num = |key: &str| {
        v.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("the baseline's summary has no `{key}`"))
    };
    for (slot, entity) in m.rows.iter_mut().zip(ENTITIES) {
        *slot = v
            .pointer(&format!("/rows/{entity}"))
            .and_then(Value::as_u64);
    }
    m.contacts = m.rows[0].context("the baseline's summary has no contacts count")?;
    m.client_cpu = num("cpuSeconds")?;
    m.client_rss = num("peakRssBytes")? as u64;
    m.retries = num("retries")? as u64;
    m.client_attempts = num("requests")? as u64;
    m.client_429 = m.server.rate_limited;
    Ok(())
}

/// A child process that is killed and reaped when dropped, whatever the path out.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // Either may fail because the process already exited; nothing to do then.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running simulator on a loopback port of its choosing.
struct Sim {
    child: Guard,
    /// `127.0.0.1:PORT`.
    addr: String,
}

impl Sim {
    fn start(contacts: u64, limit: Option<Limit>) -> Result<Sim> {
        let mut child = Guard(
            Command::new(BIN)
                .args(["sim", "--host", "127.0.0.1", "--port", "0", "--seed", SEED])
                .args([
                    "--contacts",
                    &contacts.to_string(),
                    "--daily-quota",
                    "0",
                    "--quiet",
                ])
                .args(["--rate-limit", &limit.map_or("off".into(), Limit::arg)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting the simulator")?,
        );
        let stderr = child
            .0
            .stderr
            .take()
            .expect("stderr was set to piped above");
        let (tx, rx) = mpsc::channel();
        // Reads the address, then keeps draining so the simulator never blocks on
        // a full pipe; with --quiet anything else it says is an error, worth showing.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                match listen_addr(&line) {
                    Some(addr) => {
                        let _ = tx.send(addr);
                    }
                    // The start banner's usage hint is printed even with --quiet.
                    None if line.starts_with("try:") => {}
                    None => eprintln!("sim: {line}"),
                }
            }
        });
        let addr = rx
            .recv_timeout(SIM_STARTUP)
            .context("the simulator did not print its address (did it exit?)")?;
        let sim = Sim { child, addr };
        let deadline = Instant::now() + SIM_STARTUP;
        loop {
            match sim.counts() {
                Ok(_) => return Ok(sim),
                Err(err) if Instant::now() > deadline => {
                    return Err(err.context(format!("the simulator at {} never answered", sim.addr)))
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn counts(&self) -> Result<Counts> {
        let body = http_get(&self.addr, "/_sim/stats")?;
        let v: Value = serde_json::from_str(&body).context("parsing /_sim/stats")?;
        Counts::from_json(&v)
    }
}

/// `simulator listening on http://127.0.0.1:PORT (...)` -> `127.0.0.1:PORT`.
fn listen_addr(line: &str) -> Option<String> {
    let rest = line.split_once("listening on http://")?.1;
    let addr = rest.split_whitespace().next()?;
    Some(addr.trim_end_matches('/').to_owned())
}

/// A bare HTTP/1.1 GET (with the API's headers), enough for the simulator's admin endpoint
/// and a first page of contacts.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer bench\r\n\
         Version: 2021-07-28\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .with_context(|| format!("reading GET {path}"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: reply without a header end"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("GET {path}: {status}");
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("GET {path}: chunked replies are not supported by this bench");
    }
    Ok(body.to_owned())
}

/// User plus system CPU seconds of a live process, from `/proc/<pid>/stat`.
fn proc_cpu_secs(pid: u32, ticks: f64) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces; fields
    // restart after the last ')', at field 3, so utime (14) and stime (15) are 11, 12.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        let raw = fields
            .get(i)
            .with_context(|| format!("{path}: too few fields"))?;
        Ok(raw
            .parse::<u64>()
            .with_context(|| format!("{path}: field {}", i + 3))? as f64)
    };
    Ok((tick(11)? + tick(12)?) / ticks)
}

/// Clock ticks per second for `/proc` times; 100 on every Linux in practice.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

fn python_available() -> Result<()> {
    let out = Command::new("python3")
        .args(["-c", "import requests, pyarrow"])
        .stdin(Stdio::null())
        .output()
        .context("python3 not found")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{}", err.lines().last().unwrap_or("import failed"));
    }
    Ok(())
}

fn cpu_count() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

fn machine_line() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or("?".into(), |kib| format!("{:.1}", kib / MIB));
    format!("machine: {} CPUs ({model}), {mem_gib} GiB RAM", cpu_count())
}

/// One row of the main table.
struct Row {
    cells: [String; 12],
}

impl Row {
    const HEADER: &'static str =
        "| scenario | contacts | format | wall s | contacts/s | requests/s \
        | client CPU s per 10k contacts | client peak RSS MB | sim CPU s | retries | 429s \
        | share of limit used |";
    const RULE: &'static str = "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|";

    fn markdown(&self) -> String {
        format!("| {} |", self.cells.join(" | "))
    }
}

impl From<&Measured> for Row {
    fn from(m: &Measured) -> Row {
        let share = m.server_limit.map_or("—".into(), |l| {
            pct(m.served_ok() as f64 / (l.per_sec() * m.wall))
        });
        Row {
            cells: [
                m.name.to_owned(),
                m.contacts.to_string(),
                m.format.to_owned(),
                format!("{:.2}", m.wall),
                format!("{:.0}", m.contacts as f64 / m.wall),
                format!("{:.0}", m.served_ok() as f64 / m.wall),
                format!("{:.2}", cpu_per_10k(m)),
                format!("{:.1}", m.client_rss as f64 / MIB),
                format!("{:.2}", m.sim_cpu),
                m.retries.to_string(),
                m.server.rate_limited.to_string(),
                share,
            ],
        }
    }
}

/// One row of the detail table: where the time went, and the rate-limit windows.
struct Detail {
    cells: [String; 9],
}

impl Detail {
    const HEADER: &'static str = "| scenario | client CPU s | client cores | sim cores \
        | bound by | server max in a window | 429s in first window \
        | 429 share after first window | rows contacts/tasks/notes/appointments |";
    const RULE: &'static str = "|---|--:|--:|--:|---|--:|--:|--:|---|";

    fn markdown(&self) -> String {
        format!("| {} |", self.cells.join(" | "))
    }
}

impl From<&Measured> for Detail {
    fn from(m: &Measured) -> Detail {
        let client_cores = m.client_cpu / m.wall;
        let sim_cores = m.sim_cpu / m.wall;
        let rows = m
            .rows
            .iter()
            .map(|r| r.map_or("-".into(), |n| n.to_string()))
            .collect::<Vec<_>>()
            .join("/");
        let (max_window, first, after) = match m.first_window {
            Some(first) => {
                let after_requests = m.server.requests.saturating_sub(first.requests);
                let after_429 = m.server.rate_limited.saturating_sub(first.rate_limited);
                let share = if after_requests == 0 {
                    "n/a (run ended within the first window)".into()
                } else {
                    format!(
                        "{} ({after_429} of {after_requests})",
                        pct(after_429 as f64 / after_requests as f64)
                    )
                };
                (
                    m.server.max_in_window.to_string(),
                    first.rate_limited.to_string(),
                    share,
                )
            }
            None if m.server_limit.is_some() => (
                m.server.max_in_window.to_string(),
                "n/a".into(),
                "n/a".into(),
            ),
            None => ("—".into(), "—".into(), "—".into()),
        };
        Detail {
            cells: [
                m.name.to_owned(),
                format!("{:.2}", m.client_cpu),
                format!("{client_cores:.2}"),
                format!("{sim_cores:.2}"),
                bound_by(m.server_limit.is_some(), client_cores, sim_cores),
                max_window,
                first,
                after,
                rows,
            ],
        }
    }
}

/// A rough verdict on what held the run back, from CPU use on each side.
fn bound_by(paced: bool, client_cores: f64, sim_cores: f64) -> String {
    let cpus = cpu_count() as f64;
    if paced {
        "rate limit".into()
    } else if client_cores + sim_cores >= 0.85 * cpus {
        let side = if client_cores >= sim_cores {
            "client"
        } else {
            "simulator"
        };
        format!("machine CPU ({side} uses most)")
    } else if client_cores >= 0.85 && client_cores >= sim_cores {
        "client (about one core busy)".into()
    } else if sim_cores >= 0.85 {
        "simulator (about one core busy)".into()
    } else {
        "latency (no side CPU-saturated)".into()
    }
}

/// Client CPU seconds per 10,000 contacts exported.
fn cpu_per_10k(m: &Measured) -> f64 {
    m.client_cpu / (m.contacts.max(1) as f64 / 10_000.0)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Agreement between the exporter's own accounting and the server's, and
/// between the baseline's output and the Rust exporter's.
fn cross_checks(measured: &[Measured]) -> Vec<String> {
    let mut notes = Vec::new();
    for m in measured {
        if m.client_attempts != m.server.requests {
            notes.push(format!(
                "{}: the client counted {} request attempts, the server {}",
                m.name, m.client_attempts, m.server.requests
            ));
        }
        if m.client_429 != m.server.rate_limited {
            notes.push(format!(
                "{}: the client counted {} 429s, the server sent {}",
                m.name, m.client_429, m.server.rate_limited
            ));
        }
    }
    let rust = measured.iter().find(|m| m.name == "throughput 10k");
    let python = measured.iter().find(|m| m.name == "python baseline 10k");
    if let (Some(rust), Some(python)) = (rust, python) {
        if rust.rows == python.rows {
            notes.push(
                "python baseline 10k wrote the same row counts per entity as throughput 10k".into(),
            );
        } else {
            notes.push(format!(
                "python baseline 10k row counts {:?} differ from throughput 10k {:?}",
                python.rows, rust.rows
            ));
        }
    }
    notes
}

/// The simulator served alone, by a load generator far cheaper per request than any real
/// client: how many requests per second it can serve, and its CPU per request. Compared with
/// the exporter's CPU per request, it says which side limits an unlimited run.
struct SimAlone {
    threads: usize,
    secs: f64,
    requests: u64,
    sim_cpu: f64,
    load_cpu: f64,
}

impl SimAlone {
    const HEADER: &'static str = "| simulator alone | load threads | seconds | requests/s \
        | sim cores | sim CPU µs per request |";
    const RULE: &'static str = "|---|--:|--:|--:|--:|--:|";
    const THREADS: usize = 8;
    const DURATION: Duration = Duration::from_secs(5);

    /// Child-list requests (`/tasks`, `/notes`, `/appointments` of listed contacts) over
    /// keep-alive connections, for a few seconds, against a 10k-contact simulator.
    fn measure(ticks: f64) -> Result<SimAlone> {
        let sim = Sim::start(10_000, None)?;
        let page = http_get(
            &sim.addr,
            &format!("/contacts/?locationId={LOCATION}&limit=100"),
        )?;
        let page: Value = serde_json::from_str(&page).context("parsing the first page")?;
        let ids: Vec<String> = page["contacts"]
            .as_array()
            .context("the first page has no contacts")?
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect();
        if ids.is_empty() {
            bail!("the simulator listed no contacts");
        }
        let cpu_before = proc_cpu_secs(sim.pid(), ticks)?;
        let self_before = self_cpu_secs(ticks)?;
        let start = Instant::now();
        let deadline = start + Self::DURATION;
        let workers: Vec<_> = (0..Self::THREADS)
            .map(|t| {
                let addr = sim.addr.clone();
                let ids = ids.clone();
                thread::spawn(move || load(&addr, &ids, t, deadline))
            })
            .collect();
        let mut requests = 0;
        for w in workers {
            requests += w
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(SimAlone {
            threads: Self::THREADS,
            secs,
            requests,
            sim_cpu: proc_cpu_secs(sim.pid(), ticks)? - cpu_before,
            load_cpu: self_cpu_secs(ticks)? - self_before,
        })
    }

    fn sim_us_per_request(&self) -> f64 {
        1e6 * self.sim_cpu / self.requests.max(1) as f64
    }

    fn markdown(&self) -> String {
        format!(
            "| child lists, keep-alive | {} | {:.1} | {:.0} | {:.2} | {:.1} |",
            self.threads,
            self.secs,
            self.requests as f64 / self.secs,
            self.sim_cpu / self.secs,
            self.sim_us_per_request()
        )
    }

    /// Which side limits an unlimited export: CPU per request on each side.
    fn verdict(&self, measured: &[Measured]) -> String {
        let sim_us = self.sim_us_per_request();
        let mut line = format!(
            "The simulator spends {sim_us:.1} µs of CPU per request (so one core serves about \
             {:.0} requests/s; the load generator itself used {:.2} cores).",
            1e6 / sim_us,
            self.load_cpu / self.secs
        );
        if let Some(m) = measured.iter().find(|m| m.name == "throughput 10k") {
            let client_us = 1e6 * m.client_cpu / m.server.requests.max(1) as f64;
            let side = if client_us > sim_us {
                "the exporter, not the simulator, limits an unlimited run"
            } else {
                "the simulator limits an unlimited run"
            };
            line.push_str(&format!(
                " In throughput 10k the exporter spent {client_us:.1} µs per request: {side}."
            ));
        }
        line
    }
}

/// One load thread: GETs round-robin over ids and child kinds on one keep-alive
/// connection until the deadline; returns the requests answered with 200.
fn load(addr: &str, ids: &[String], seed: usize, deadline: Instant) -> Result<u64> {
    const KINDS: [&str; 3] = ["tasks", "notes", "appointments"];
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut n = 0u64;
    let mut i = seed;
    let mut body = Vec::new();
    while Instant::now() < deadline {
        let id = &ids[i % ids.len()];
        let kind = KINDS[i % KINDS.len()];
        i += 7;
        write!(
            writer,
            "GET /contacts/{id}/{kind} HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer bench\r\nVersion: 2021-07-28\r\n\r\n"
        )?;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut length = None;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.context("a reply without Content-Length")?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        if !status.contains(" 200 ") {
            bail!("GET /contacts/{id}/{kind}: {}", status.trim_end());
        }
        n += 1;
    }
    Ok(n)
}

/// This process's own user plus system CPU seconds.
fn self_cpu_secs(ticks: f64) -> Result<f64> {
    proc_cpu_secs(std::process::id(), ticks)
}

/// The issue's goals, each checked against this run's own figures. A goal whose scenarios
/// did not all run (a filter, `--quick`, a failure) is left out; one whose figures cannot
/// show it is "not measured", never "met".
fn goals(measured: &[Measured], failed: &[&str]) -> Vec<String> {
    let find = |name: &str| measured.iter().find(|m| m.name == name);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut out = Vec::new();

    for suffix in ["", " csv"] {
        let lists: Vec<&Measured> = ["10k", "100k", "1M"]
            .iter()
            .filter_map(|size| find(&format!("list-only {size}{suffix}")))
            .collect();
        if let (Some(first), Some(last)) = (lists.first(), lists.last()) {
            if lists.len() > 1 {
                let growth = last.client_rss as f64 / first.client_rss.max(1) as f64 - 1.0;
                let complete = lists.iter().all(|m| m.contacts == m.expected_contacts);
                out.push(format!(
                    "flat memory ({}): peak RSS {:.1} MB at {} contacts, {:.1} MB at {}: {:+.1}% \
                     (goal: within 20%, every contact written): {}",
                    first.format,
                    first.client_rss as f64 / MIB,
                    first.contacts,
                    last.client_rss as f64 / MIB,
                    last.contacts,
                    100.0 * growth,
                    verdict(growth.abs() <= 0.20 && complete)
                ));
            }
        }
    }
    let rust_failed = failed.iter().any(|name| !name.starts_with("python"));
    if let Some(max) = measured
        .iter()
        .filter(|m| !m.name.starts_with("python") && !rust_failed)
        .max_by_key(|m| m.client_rss)
    {
        out.push(format!(
            "memory under 150 MB (default settings but for --concurrency 32 in the unlimited runs): highest peak {:.1} MB ({}): {}",
            max.client_rss as f64 / MIB,
            max.name,
            verdict((max.client_rss as f64) < 150.0 * MIB)
        ));
    }
    if let Some(m) = find("rate limit 1000/10s") {
        if let Some(l) = m.server_limit {
            let share = m.served_ok() as f64 / (l.per_sec() * m.wall);
            out.push(format!(
                "rate limit: {} of the limit over {:.0} s with {} 429s (goal: at least 97%, no \
                 429s): {}",
                pct(share),
                m.wall,
                m.server.rate_limited,
                verdict(
                    share >= 0.97
                        && m.server.rate_limited == 0
                        && m.contacts == m.expected_contacts
                )
            ));
        }
    }
    if let Some(m) = find("stricter server (client 2000/10s)") {
        let first_429 = m.first_window.map_or(0, |f| f.rate_limited);
        let after_requests = m
            .server
            .requests
            .saturating_sub(m.first_window.map_or(0, |f| f.requests));
        let after_429 = m.server.rate_limited.saturating_sub(first_429);
        let share = after_429 as f64 / after_requests.max(1) as f64;
        let status = if m.first_window.is_none() || after_requests == 0 {
            "not measured (the run ended within the first window)"
        } else {
            verdict(share < 0.01 && m.contacts == m.expected_contacts)
        };
        out.push(format!(
            "stricter server: {} 429s after the first window ({after_429} of {after_requests}), \
             {} of {} contacts written (goal: under 1%, no lost rows): {status}",
            pct(share),
            m.contacts,
            m.expected_contacts,
        ));
    }
    if let (Some(rust), Some(py)) = (find("throughput 10k"), find("python baseline 10k")) {
        let ratio = cpu_per_10k(py) / cpu_per_10k(rust).max(1e-9);
        let speed = (rust.contacts as f64 / rust.wall) / (py.contacts as f64 / py.wall);
        let same_rows = rust.rows == py.rows && rust.contacts == rust.expected_contacts;
        out.push(format!(
            "CPU against the Python baseline: {:.2} vs {:.2} CPU s per 10k contacts, {ratio:.1}× \
             less (goal: at least 10×, the same rows): {}",
            cpu_per_10k(rust),
            cpu_per_10k(py),
            verdict(ratio >= 10.0 && same_rows)
        ));
        out.push(format!(
            "throughput against the Python baseline: {:.0} vs {:.0} contacts/s, {speed:.1}× \
             (goal: at least 1×, the same rows): {}",
            rust.contacts as f64 / rust.wall,
            py.contacts as f64 / py.wall,
            verdict(speed >= 1.0 && same_rows)
        ));
    }
    out
}
