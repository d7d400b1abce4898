//! Reading and checking a pipeline file into a [`Pipeline`]: every problem is collected
//! (not only the first) and named by file, line and key; secrets are named, never held.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{self, ConfigError, ConfigErrors, Source};
use super::{Job, LocationTarget, OAuthConf, Pipeline};
use crate::api::DEFAULT_BASE_URL;
use crate::app::conn::{Connection, TokenRef};
use crate::app::export::ExportSettings;
use crate::app::import::{ImportJob, ImportSource, ImportWhat};
use crate::auth::looks_like_secret;
use crate::export::Budget;
use crate::extract::Listing;
use crate::fanout::Include;
use crate::import::{Country, Entity, InputEncoding, OnDuplicate};
use crate::ratelimit::Quota;
use crate::sink::Format;

/// Reads and checks a pipeline file. Every problem found is returned, not only the first.
pub fn load(path: &Path) -> Result<Pipeline, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        key: "-".into(),
        message: format!("cannot read the file: {e}"),
    })?;
    let src = Source {
        file: path,
        text: &text,
    };
    let (parsed, mut problems) = parse_all(&src);
    if let Some((f, semantics)) = parsed {
        match check(&src, f) {
            Ok(p) if problems.is_empty() => return Ok(p),
            Ok(_) => {}
            Err(mut e) if semantics => problems.append(&mut e.0),
            Err(_) => {}
        }
    }
    problems.sort_by_key(|e| e.line);
    Err(ConfigErrors(problems))
}

/// Most key-level problems reported from one file (the rest are found on the next run).
const MAX_PARSE_PROBLEMS: usize = 50;

/// Parses the file, collecting every key-level problem (unknown keys, wrong types) rather than
/// stopping at the first: a key in error is blanked out (its line, or a whole table for a bad
/// table header) and the file parsed again. Returns the file as parsed without those keys, and
/// whether checking its values can add problems that are not mere consequences of the blanking
/// (not once a table or a required key was dropped). A syntax error stops the collection: the
/// first one is reported, later ones may come from the blanking itself and are not.
fn parse_all(src: &Source<'_>) -> (Option<(config::PipelineFile, bool)>, Vec<ConfigError>) {
    let mut text = src.text.to_owned();
    let mut problems: Vec<ConfigError> = Vec::new();
    let mut semantics = true;
    while problems.len() < MAX_PARSE_PROBLEMS {
        let s = Source {
            file: src.file,
            text: &text,
        };
        let e = match config::parse(&s) {
            Ok(f) => return (Some((f, semantics)), problems),
            Err(e) => e,
        };
        let syntax = text.parse::<toml::Table>().is_err();
        if !problems.is_empty() {
            // A required key the blanking removed, or broken syntax the blanking left
            // behind (a multi-line value): nothing more can be learnt reliably.
            let consequence = e
                .message
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
                .is_some_and(|k| problems.iter().any(|p| p.key == k));
            if syntax || consequence {
                break;
            }
        }
        let line = e.line;
        let header = src
            .text
            .lines()
            .nth(line.saturating_sub(1))
            .is_some_and(|l| l.trim_start().starts_with('['));
        // A dropped table or required key makes later checks of the values misleading.
        if header || e.message.starts_with("missing field") {
            semantics = false;
        }
        problems.push(e);
        if syntax || line == 0 || !blank(&mut text, line) {
            break;
        }
    }
    (None, problems)
}

/// Replaces line `line` (1-based) with spaces, and when it is a table header, the table's
/// lines up to the next header. False when there is nothing left to blank there.
fn blank(text: &mut String, line: usize) -> bool {
    let mut out = String::with_capacity(text.len());
    let mut blanked = false;
    let mut in_table = false;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        let header = l.trim_start().starts_with('[');
        let this = i + 1 == line;
        if this {
            in_table = header;
        } else if header {
            in_table = false;
        }
        if (this || in_table) && !l.trim().is_empty() {
            blanked = true;
            out.extend(
                l.chars()
                    .map(|c| if c == '\n' || c == '\r' { c } else { ' ' }),
            );
        } else {
            out.push_str(l);
        }
    }
    *text = out;
    blanked
}

fn positive(
    src: &Source<'_>,
    v: &Option<toml::Spanned<i64>>,
    key: &str,
    default: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    in_range(src, v, key, default, 1..=max)
}

fn in_range(
    src: &Source<'_>,
    v: &Option<toml::Spanned<i64>>,
    key: &str,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if range.contains(s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(src.at(
            s,
            key,
            format!(
                "{} is out of range: expected {} to {}",
                s.get_ref(),
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Relative paths in a pipeline file are relative to the file's own directory, so a scheduled
/// run finds them whatever its working directory.
fn resolve(src: &Source<'_>, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    src.file
        .parent()
        .map_or_else(|| p.to_path_buf(), |d| d.join(p))
}

/// Keeps `r`'s value, or records its problem and gives `None`.
fn keep<T>(problems: &mut Vec<ConfigError>, r: Result<T, ConfigError>) -> Option<T> {
    r.map_err(|e| problems.push(e)).ok()
}

/// Checks the parsed file's values. Every problem is collected; a value in error takes its
/// default so the checks after it still run.
fn check(src: &Source<'_>, f: config::PipelineFile) -> Result<Pipeline, ConfigErrors> {
    let mut problems = Vec::new();
    let p = &mut problems;
    let stem = || {
        src.file
            .file_stem()
            .map_or_else(|| "pipeline".into(), |s| s.to_string_lossy().into_owned())
    };
    let name = match &f.name {
        Some(n)
            if n.get_ref().trim().is_empty()
                || !n
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            p.push(src.at(
                n,
                "name",
                "use letters, digits, '-', '_' or '.' (it names the lock and report files)",
            ));
            stem()
        }
        Some(n) => n.get_ref().clone(),
        None => stem(),
    };
    let api = &f.api;
    let rate_limit = match &api.rate_limit {
        None => Some(Quota::API_DEFAULT),
        Some(r) if r.get_ref().trim().eq_ignore_ascii_case("off") => None,
        Some(r) => Some(
            keep(
                p,
                r.get_ref()
                    .parse::<Quota>()
                    .map_err(|e| src.at(r, "rate_limit", e)),
            )
            .unwrap_or(Quota::API_DEFAULT),
        ),
    };
    let base_url = match &api.base_url {
        Some(u) => match reqwest::Url::parse(u.get_ref()) {
            Err(_) => {
                p.push(src.at(u, "base_url", format!("'{}' is not a URL", u.get_ref())));
                DEFAULT_BASE_URL.into()
            }
            // The rule `run` applies when it builds the client, and its message.
            Ok(url) if url.scheme() == "http" && !crate::api::is_loopback(&url) => {
                p.push(src.at(
                    u,
                    "base_url",
                    crate::api::ClientBuildError::InsecureUrl(u.get_ref().clone()).to_string(),
                ));
                DEFAULT_BASE_URL.into()
            }
            Ok(_) => u.get_ref().clone(),
        },
        None => DEFAULT_BASE_URL.into(),
    };
    let concurrency = keep(p, positive(src, &api.concurrency, "concurrency", 4, 256)).unwrap_or(4);
    let max_concurrency = keep(
        p,
        positive(src, &api.max_concurrency, "max_concurrency", 64, 4096),
    )
    .unwrap_or(64);
    let parallel_locations = keep(
        p,
        positive(src, &api.parallel_locations, "parallel_locations", 8, 1024),
    )
    .unwrap_or(8);
    let timeout = keep(
        p,
        positive(src, &api.timeout_secs, "timeout_secs", 60, 3600),
    )
    .unwrap_or(60);
    let max_retry_wait = keep(
        p,
        positive(
            src,
            &api.max_retry_wait_secs,
            "max_retry_wait_secs",
            300,
            86_400,
        ),
    )
    .unwrap_or(300);
    let request_deadline = keep(
        p,
        positive(
            src,
            &api.request_deadline_secs,
            "request_deadline_secs",
            900,
            604_800,
        ),
    )
    .unwrap_or(900);
    let max_response_bytes = keep(
        p,
        positive(
            src,
            &api.max_response_bytes,
            "max_response_bytes",
            crate::api::DEFAULT_MAX_RESPONSE_BYTES as i64,
            1 << 40,
        ),
    )
    .unwrap_or(crate::api::DEFAULT_MAX_RESPONSE_BYTES as i64);

    if let Some(t) = &f.auth.token {
        p.push(src.at(t, "token", "a token must not be written in a pipeline file: name an environment variable (token_env) or a file (token_file)"));
    }
    let oauth = match &f.auth.oauth {
        None => None,
        Some(o) => {
            let conf = o.get_ref();
            let client_id = match (&conf.client_id, &conf.client_id_env) {
                (Some(id), None) => Some(id.get_ref().clone()),
                (None, Some(var)) => keep(p, secret_name(src, var, "client_id_env"))
                    .map(|()| std::env::var(var.get_ref()).unwrap_or_default()),
                _ => {
                    p.push(src.at(o, "oauth", "give client_id or client_id_env (exactly one)"));
                    None
                }
            };
            if let Some(v) = &conf.client_secret_env {
                keep(p, secret_name(src, v, "client_secret_env"));
            }
            if let Some(v) = &conf.client_secret_file {
                keep(p, secret_path(src, v, "client_secret_file"));
            }
            client_id.map(|client_id| OAuthConf {
                token_store: resolve(src, conf.token_store.get_ref()),
                client_id,
                client_secret_env: conf
                    .client_secret_env
                    .as_ref()
                    .map_or_else(|| "HL_CLIENT_SECRET".to_owned(), |v| v.get_ref().clone()),
                client_secret_file: conf
                    .client_secret_file
                    .as_ref()
                    .map(|p| resolve(src, p.get_ref())),
                company_id: conf.company_id.as_ref().map(|c| c.get_ref().clone()),
                all_installed_locations: conf.all_installed_locations,
            })
        }
    };
    let oauth_given = f.auth.oauth.is_some();
    let default_token = token_ref(src, p, &f.auth.token_env, &f.auth.token_file)
        .or_else(|| oauth_given.then_some(TokenRef::OAuth));
    let all_installed = f
        .auth
        .oauth
        .as_ref()
        .is_some_and(|o| o.get_ref().all_installed_locations);
    if f.locations.is_empty() && !all_installed {
        p.push(src.error(
            src.text.len(),
            "locations",
            "no locations: add a [[locations]] table with an id for each location to run",
        ));
    }
    let mut locations: Vec<LocationTarget> = Vec::new();
    for l in &f.locations {
        let id = l.id.get_ref().trim().to_owned();
        let mut ok = true;
        if let Err(e) = crate::api::check_id(&id) {
            p.push(src.at(&l.id, "id", format!("not a location id: {e}")));
            ok = false;
        } else if locations.iter().any(|x| x.id == id) {
            p.push(src.at(&l.id, "id", format!("location {id} is listed twice")));
            ok = false;
        }
        let given = l.token_env.is_some() || l.token_file.is_some();
        let token = match token_ref(src, p, &l.token_env, &l.token_file) {
            Some(t) => Some(t),
            // Its own token is in error (already reported): not the default's business.
            None if given => None,
            None => {
                if default_token.is_none() && ok {
                    p.push(src.at(
                        &l.id,
                        "id",
                        format!("no token for location {id}: set token_env or token_file here or in [auth]"),
                    ));
                }
                default_token.clone()
            }
        };
        if let (true, Some(token)) = (ok, token) {
            locations.push(LocationTarget { id, token });
        }
    }

    let conn = Connection {
        // The environment overrides the file, so one file runs against the simulator too.
        base_url: crate::app::env::base_url(&base_url),
        // Each location's own, from its target.
        token: TokenRef::None,
        rate_limit,
        concurrency: concurrency as usize,
        timeout: Duration::from_secs(timeout as u64),
        max_retry_wait: Duration::from_secs(max_retry_wait as u64),
        request_deadline: Duration::from_secs(request_deadline as u64),
        max_response_bytes: max_response_bytes as u64,
    };
    let job = match (&f.export, &f.import) {
        (Some(e), None) => check_export(src, p, e).map(Job::Export),
        (None, Some(i)) => {
            if f.locations.len() != 1 {
                p.push(src.error(
                    0,
                    "locations",
                    "an import pipeline loads into exactly one location",
                ));
            }
            match locations.first() {
                Some(target) if target.token == TokenRef::OAuth => {
                    p.push(src.error(
                        0,
                        "oauth",
                        "an import pipeline reads its token from an environment variable (token_env) or a token_file",
                    ));
                    None
                }
                Some(target) => {
                    let conn = Connection {
                        token: target.token.clone(),
                        ..conn.clone()
                    };
                    check_import(src, p, i, &target.id, conn).map(|j| Job::Import(Box::new(j)))
                }
                None => None,
            }
        }
        (Some(_), Some(i)) => {
            p.push(src.at(
                &i.input,
                "import",
                "a pipeline has an [export] or an [import] section, not both",
            ));
            None
        }
        (None, None) => {
            p.push(src.error(
                src.text.len(),
                "export",
                "nothing to do: add an [export] or an [import] section",
            ));
            None
        }
    };
    match job {
        Some(job) if problems.is_empty() => Ok(Pipeline {
            name,
            file: src.file.to_path_buf(),
            conn,
            max_concurrency: max_concurrency as usize,
            parallel_locations: parallel_locations as usize,
            locations,
            oauth,
            job,
        }),
        _ => Err(ConfigErrors(problems)),
    }
}

/// The token source a `token_env` / `token_file` pair names, if it names one correctly.
fn token_ref(
    src: &Source<'_>,
    p: &mut Vec<ConfigError>,
    env: &Option<toml::Spanned<String>>,
    file: &Option<toml::Spanned<PathBuf>>,
) -> Option<TokenRef> {
    match (env, file) {
        (Some(e), Some(_)) => {
            p.push(src.at(e, "token_env", "give token_env or token_file, not both"));
            None
        }
        (Some(e), None) => {
            keep(p, secret_name(src, e, "token_env")).map(|()| TokenRef::Env(e.get_ref().clone()))
        }
        (None, Some(f)) => keep(p, secret_path(src, f, "token_file"))
            .map(|()| TokenRef::File(resolve(src, f.get_ref()))),
        (None, None) => None,
    }
}

/// Checks a key that names the environment variable holding a secret. The value is never
/// quoted in the message: when it is wrong, it is often the secret itself, pasted in.
fn secret_name(src: &Source<'_>, v: &toml::Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let name = v.get_ref();
    if looks_like_secret(name) {
        return Err(src.at(v, key, format!("the value looks like a secret (a token), not the name of an environment variable; it is not shown here. Put the secret in an environment variable and write its name here (e.g. {key} = \"HL_TOKEN\"), and treat the secret as exposed if this file was shared")));
    }
    let valid = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(src.at(v, key, "the value is not an environment variable name (letters, digits and '_', not starting with a digit); it is not shown here in case it is a secret. Write the name of the variable that holds the secret (e.g. HL_TOKEN)"));
    }
    Ok(())
}

/// Checks a key that names the file holding a secret (never quoted, as for [`secret_name`]).
fn secret_path(src: &Source<'_>, v: &toml::Spanned<PathBuf>, key: &str) -> Result<(), ConfigError> {
    let path = v.get_ref().to_string_lossy();
    if looks_like_secret(&path) {
        return Err(src.at(v, key, "the value looks like a secret (a token), not a file path; it is not shown here. Put the secret in a file (mode 0600) and write its path here, and treat the secret as exposed if this file was shared"));
    }
    if path.trim().is_empty() {
        return Err(src.at(v, key, "the file path is empty"));
    }
    Ok(())
}

fn check_export(
    src: &Source<'_>,
    p: &mut Vec<ConfigError>,
    e: &config::ExportSection,
) -> Option<ExportSettings> {
    let before = p.len();
    let format = match &e.format {
        None => Format::Parquet,
        Some(f) => match f.get_ref().as_str() {
            "parquet" => Format::Parquet,
            "csv" => Format::Csv,
            other => {
                p.push(src.at(
                    f,
                    "format",
                    format!("'{other}' is not a format: use parquet or csv"),
                ));
                Format::Parquet
            }
        },
    };
    let include = match &e.include {
        None => Include::ALL,
        Some(list) => keep(
            p,
            list.get_ref()
                .join(",")
                .parse::<Include>()
                .map_err(|m| src.at(list, "include", m)),
        )
        .unwrap_or(Include::ALL),
    };
    let reserve = match &e.daily_reserve_percent {
        None => 0.05,
        Some(r) if (0.0..100.0).contains(r.get_ref()) => r.get_ref() / 100.0,
        Some(r) => {
            p.push(src.at(
                r,
                "daily_reserve_percent",
                format!("{} is not a percentage below 100", r.get_ref()),
            ));
            0.05
        }
    };
    let daily_budget = match &e.daily_budget {
        None => None,
        Some(_) => keep(
            p,
            positive(src, &e.daily_budget, "daily_budget", 1, i64::MAX),
        )
        .map(|n| n as u64),
    };
    if e.out.get_ref().as_os_str().is_empty() {
        p.push(src.at(&e.out, "out", "the output directory is empty"));
    }
    // A directory (relative to this file), or a bucket URL; credentials never come from here.
    let out = match e
        .out
        .get_ref()
        .to_string_lossy()
        .parse::<crate::dest::Target>()
    {
        Ok(crate::dest::Target::Dir(d)) => Some(crate::dest::Target::Dir(resolve(src, &d))),
        Ok(store) => Some(store),
        Err(m) => {
            p.push(src.at(&e.out, "out", m));
            None
        }
    };
    let part_contacts = keep(
        p,
        positive(src, &e.part_contacts, "part_contacts", 250_000, i64::MAX),
    )
    .unwrap_or(250_000);
    let commit_interval = keep(
        p,
        positive(
            src,
            &e.commit_interval_secs,
            "commit_interval_secs",
            600,
            86_400,
        ),
    )
    .unwrap_or(600);
    // 0 is allowed: any refusal then fails the location.
    let max_skipped = match &e.max_skipped {
        None => crate::export::DEFAULT_MAX_SKIPPED,
        Some(v) if *v.get_ref() >= 0 => *v.get_ref() as u64,
        Some(v) => {
            p.push(src.at(v, "max_skipped", "use 0 or a positive number"));
            crate::export::DEFAULT_MAX_SKIPPED
        }
    };
    let listing = match &e.listing {
        None => Listing::Auto,
        Some(l) => keep(
            p,
            l.get_ref()
                .parse::<Listing>()
                .map_err(|m| src.at(l, "listing", m)),
        )
        .unwrap_or(Listing::Auto),
    };
    let overlap = keep(
        p,
        positive(
            src,
            &e.overlap_secs,
            "overlap_secs",
            crate::export::DEFAULT_OVERLAP.as_secs() as i64,
            7 * 86_400,
        ),
    )
    .unwrap_or(600);
    let full_walk_every = keep(
        p,
        positive(
            src,
            &e.full_walk_every,
            "full_walk_every",
            i64::from(crate::export::DEFAULT_FULL_WALK_EVERY),
            i64::from(u32::MAX),
        ),
    )
    .unwrap_or(1);
    // Like `out`: a directory (relative to this file) or a bucket URL.
    let from_events = e.from_events.as_ref().and_then(|f| {
        if !e.incremental {
            p.push(src.at(
                f,
                "from_events",
                "from_events drives incremental runs: add incremental = true",
            ));
            return None;
        }
        match f.get_ref().to_string_lossy().parse::<crate::dest::Target>() {
            Ok(crate::dest::Target::Dir(d)) => Some(crate::dest::Target::Dir(resolve(src, &d))),
            Ok(store) => Some(store),
            Err(m) => {
                p.push(src.at(f, "from_events", m));
                None
            }
        }
    });
    let max_gap = keep(
        p,
        in_range(
            src,
            &e.max_gap_secs,
            "max_gap_secs",
            crate::export::DEFAULT_MAX_GAP.as_secs() as i64,
            0..=7 * 86_400,
        ),
    )
    .unwrap_or(0);
    let children_by = match &e.children_by {
        None => crate::wide::ChildrenBy::Auto,
        Some(v) => keep(
            p,
            v.get_ref()
                .parse()
                .map_err(|m: String| src.at(v, "children_by", m)),
        )
        .unwrap_or_default(),
    };
    let verify_sample = match &e.verify_sample {
        None => crate::export::DEFAULT_VERIFY_SAMPLE,
        Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref(),
        Some(v) => {
            p.push(src.at(
                v,
                "verify_sample",
                format!("{} is not a share between 0 and 1", v.get_ref()),
            ));
            crate::export::DEFAULT_VERIFY_SAMPLE
        }
    };
    let custom_fields = match &e.custom_fields {
        None => Default::default(),
        Some(v) => keep(
            p,
            v.get_ref()
                .parse()
                .map_err(|m| src.at(v, "custom_fields", m)),
        )
        .unwrap_or_default(),
    };
    let table: crate::delta::TableFormat = match &e.table {
        None => Default::default(),
        Some(v) => {
            keep(p, v.get_ref().parse().map_err(|m| src.at(v, "table", m))).unwrap_or_default()
        }
    };
    let table = match (&e.table, e.merge) {
        (None, true) => {
            p.push(src.at(&e.out, "merge", "merge = true needs table = \"delta\""));
            table
        }
        (_, merge) => table.with_merge(merge).unwrap_or_default(),
    };
    let businesses: Vec<String> = e
        .businesses
        .iter()
        .filter_map(|b| {
            let checked = crate::api::check_id(b.get_ref())
                .map(|()| b.get_ref().clone())
                .map_err(|m| src.at(b, "businesses", format!("not a business id: {m}")));
            keep(p, checked)
        })
        .collect();
    let out = out?;
    (p.len() == before).then(|| ExportSettings {
        out,
        format,
        include,
        businesses,
        part_contacts: part_contacts as u64,
        commit_interval: Duration::from_secs(commit_interval as u64),
        restart: false,
        budget: Budget {
            max_requests: daily_budget,
            reserve,
        },
        incremental: e.incremental,
        full_refresh: false,
        listing,
        overlap: Duration::from_secs(overlap as u64),
        full_walk_every: full_walk_every as u32,
        from_events,
        max_gap: Duration::from_secs(max_gap as u64),
        state_dir: e.state_dir.as_ref().map(|s| resolve(src, s.get_ref())),
        partition_by_date: e.partition_by_date,
        max_skipped,
        children_by,
        verify_sample,
        custom_fields,
        table,
    })
}

/// The import job the section describes: the one `contacts-etl import` runs.
fn check_import(
    src: &Source<'_>,
    p: &mut Vec<ConfigError>,
    i: &config::ImportSection,
    location: &str,
    conn: Connection,
) -> Option<ImportJob> {
    let before = p.len();
    let entity = match &i.entity {
        None => Entity::Contacts,
        Some(e) => match e.get_ref().as_str() {
            "contacts" => Entity::Contacts,
            "tasks" => Entity::Tasks,
            "notes" => Entity::Notes,
            other => {
                p.push(src.at(
                    e,
                    "entity",
                    format!("'{other}' cannot be imported: use contacts, tasks or notes"),
                ));
                Entity::Contacts
            }
        },
    };
    let path = |v: &Option<toml::Spanned<PathBuf>>| v.as_ref().map(|p| resolve(src, p.get_ref()));
    let mut source = ImportSource::new(resolve(src, i.input.get_ref()));
    source.mapping = path(&i.mapping);
    source.journal = path(&i.journal);
    source.rejects = path(&i.rejects);
    source.dry_run = i.dry_run.then_some(crate::import::DryRun::Lookup);
    if let Some(c) = &i.default_country {
        source.default_country = keep(
            p,
            c.get_ref()
                .parse::<Country>()
                .map_err(|m| src.at(c, "default_country", m)),
        );
    }
    if let Some(e) = &i.encoding {
        source.encoding = keep(
            p,
            e.get_ref()
                .parse::<InputEncoding>()
                .map_err(|_| src.at(e, "encoding", "use utf-8, latin1 or windows-1252")),
        )
        .unwrap_or_default();
    }
    if let Some(secs) = keep(p, positive(src, &i.settle_secs, "settle_secs", 10, 3_600)) {
        source.settle_secs = secs as u64;
    }
    let mut what = match entity {
        Entity::Contacts => ImportWhat::contacts(),
        other => ImportWhat::Children {
            entity: other,
            id_map: None,
        },
    };
    if let Some(d) = &i.on_duplicate {
        match (&mut what, d.get_ref().parse::<OnDuplicate>()) {
            (ImportWhat::Contacts { on_duplicate, .. }, Ok(v)) => *on_duplicate = v,
            _ => p.push(src.at(
                d,
                "on_duplicate",
                "use update, skip or fail (contacts imports only)",
            )),
        }
    }
    (p.len() == before).then(|| ImportJob {
        location: location.to_owned(),
        what,
        source,
        conn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(usize, String)> {
        let src = Source {
            file: Path::new("p.toml"),
            text,
        };
        let (parsed, mut found) = parse_all(&src);
        if let Some((f, true)) = parsed {
            if let Err(e) = check(&src, f) {
                found.extend(e.0);
            }
        }
        found.sort_by_key(|e| e.line);
        found.into_iter().map(|e| (e.line, e.key)).collect()
    }

    #[test]
    fn import_pipelines_reach_the_encoding_and_settle_options_of_import() {
        let base = "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[import]\ninput = \"in.csv\"\n";
        let good = format!("{base}encoding = \"windows-1252\"\nsettle_secs = 3\n");
        assert_eq!(problems(&good), []);
        let src = Source {
            file: Path::new("p.toml"),
            text: &good,
        };
        let (Some((f, true)), _) = parse_all(&src) else {
            panic!("parses")
        };
        let Job::Import(job) = check(&src, f).unwrap().job else {
            panic!("an import job")
        };
        assert_eq!(job.source.encoding, InputEncoding::Windows1252);
        assert_eq!(job.source.settle_secs, 3);
        let bad = format!("{base}encoding = \"ebcdic\"\nsettle_secs = 0\n");
        assert_eq!(
            problems(&bad),
            [(7, "encoding".to_owned()), (8, "settle_secs".to_owned())]
        );
    }

    #[test]
    fn export_pipelines_reach_the_custom_fields_layout_of_export() {
        let base =
            "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"o\"\n";
        let good = format!("{base}custom_fields = \"wide\"\n");
        let src = Source {
            file: Path::new("p.toml"),
            text: &good,
        };
        let (Some((f, true)), _) = parse_all(&src) else {
            panic!("parses")
        };
        let Job::Export(settings) = check(&src, f).unwrap().job else {
            panic!("an export job")
        };
        assert_eq!(
            settings.custom_fields,
            crate::export::CustomFieldsMode::Wide
        );
        let bad = format!("{base}custom_fields = \"names\"\n");
        assert_eq!(problems(&bad), [(7, "custom_fields".to_owned())]);
    }

    #[test]
    fn export_pipelines_reach_the_delta_tables_of_export() {
        let base =
            "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"o\"\n";
        let table = |extra: &str| {
            let text = format!("{base}{extra}");
            let src = Source {
                file: Path::new("p.toml"),
                text: &text,
            };
            let (Some((f, true)), _) = parse_all(&src) else {
                panic!("parses")
            };
            let Job::Export(settings) = check(&src, f).unwrap().job else {
                panic!("an export job")
            };
            settings.table
        };
        use crate::delta::TableFormat;
        assert_eq!(table(""), TableFormat::Files);
        assert_eq!(table("table = \"delta\"\n"), TableFormat::Delta);
        assert_eq!(
            table("table = \"delta\"\nmerge = true\n"),
            TableFormat::DeltaMerge
        );
        assert_eq!(
            problems(&format!("{base}table = \"iceberg\"\n")),
            [(7, "table".to_owned())]
        );
        assert_eq!(
            problems(&format!("{base}merge = true\n")).len(),
            1,
            "merge without table = \"delta\""
        );
    }

    #[test]
    fn every_key_level_problem_is_collected_without_follow_on_noise() {
        let base = "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n";
        // Two unknown keys and a wrong type, then a bad value the checks find.
        let text = format!("[api]\nconcurency = 4\ntimeout_secs = \"x\"\nfoo = 1\n{base}[export]\nout = \"o\"\nformat = \"xlsx\"\n");
        assert_eq!(
            problems(&text),
            [
                (2, "concurency".to_owned()),
                (3, "timeout_secs".to_owned()),
                (4, "foo".to_owned()),
                (11, "format".to_owned())
            ]
        );
        // A required key of the wrong type is reported once, not again as missing.
        let text = format!("{base}[export]\nout = 1\nformat = \"xlsx\"\n");
        assert_eq!(problems(&text), [(6, "out".to_owned())]);
        // Syntax errors stop the collection at the first.
        let text =
            format!("[api]\nconcurency = 4\nrate_limit = \"x\n{base}[export]\nout = \"o\"\n");
        assert_eq!(problems(&text).len(), 1, "{:?}", problems(&text));
    }

    #[test]
    fn export_pipelines_take_children_by_and_verify_sample_and_name_a_bad_value() {
        let base =
            "[auth]\ntoken_env = \"HL_TOKEN\"\n[[locations]]\nid = \"L1\"\n[export]\nout = \"o\"\n";
        let good = format!("{base}children_by = \"location\"\nverify_sample = 0.02\n");
        assert_eq!(problems(&good), []);
        let src = Source {
            file: Path::new("p.toml"),
            text: &good,
        };
        let (Some((f, true)), _) = parse_all(&src) else {
            panic!("parses")
        };
        let Job::Export(settings) = check(&src, f).unwrap().job else {
            panic!("an export job")
        };
        assert_eq!(settings.children_by, crate::wide::ChildrenBy::Location);
        assert_eq!(settings.verify_sample, 0.02);
        let bad = format!("{base}children_by = \"sideways\"\nverify_sample = 2.0\n");
        assert_eq!(
            problems(&bad),
            [
                (7, "children_by".to_owned()),
                (8, "verify_sample".to_owned())
            ]
        );
    }
}
