//! Pipeline files: TOML, checked strictly. Every error names the file, the line and the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// The file as written. Unknown keys are errors (`deny_unknown_fields`); values that need
/// checking beyond their type keep their span so the error can point at them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Names the pipeline in logs, reports and its lock file. Default: the file's stem.
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub locations: Vec<LocationEntry>,
    pub export: Option<ExportSection>,
    pub import: Option<ImportSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Overridden by the HL_BASE_URL environment variable.
    pub base_url: Option<Spanned<String>>,
    /// Per location, as REQUESTS/INTERVAL or "off".
    pub rate_limit: Option<Spanned<String>>,
    /// Requests in flight per location.
    pub concurrency: Option<Spanned<i64>>,
    /// Requests in flight across all locations.
    pub max_concurrency: Option<Spanned<i64>>,
    /// Locations exported at once.
    pub parallel_locations: Option<Spanned<i64>>,
    pub timeout_secs: Option<Spanned<i64>>,
    /// The longest single wait before a retry (`--max-retry-wait`), in seconds.
    pub max_retry_wait_secs: Option<Spanned<i64>>,
    /// The longest one request may take with its retries (`--request-deadline`), in seconds.
    pub request_deadline_secs: Option<Spanned<i64>>,
    /// The largest reply body accepted (`--max-response-bytes`), in bytes.
    pub max_response_bytes: Option<Spanned<i64>>,
}

/// Where tokens come from. Secrets never sit in the file: it names variables or files.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<PathBuf>>,
    /// The token itself is refused with a message (it would be a secret in a file).
    pub token: Option<Spanned<toml::Value>>,
    /// OAuth (Marketplace app): tokens from a store written by `contacts-etl auth login`.
    pub oauth: Option<Spanned<OAuthSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthSection {
    pub token_store: Spanned<PathBuf>,
    /// The app's client id (not a secret), or the variable holding it.
    pub client_id: Option<Spanned<String>>,
    pub client_id_env: Option<Spanned<String>>,
    /// The variable (default HL_CLIENT_SECRET) or file holding the client secret.
    pub client_secret_env: Option<Spanned<String>>,
    pub client_secret_file: Option<Spanned<PathBuf>>,
    /// The agency whose grant exchanges location tokens (when the store holds several).
    pub company_id: Option<Spanned<String>>,
    /// Run every location where the app is installed under the agency.
    #[serde(default)]
    pub all_installed_locations: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationEntry {
    pub id: Spanned<String>,
    /// A token for this location only (overrides `[auth]`).
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    pub out: Spanned<PathBuf>,
    pub format: Option<Spanned<String>>,
    pub include: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub businesses: Vec<Spanned<String>>,
    #[serde(default)]
    pub incremental: bool,
    pub state_dir: Option<Spanned<PathBuf>>,
    /// Hive-style `export_date=YYYY-MM-DD` partitions (the run's start date, UTC).
    #[serde(default)]
    pub partition_by_date: bool,
    pub daily_reserve_percent: Option<Spanned<f64>>,
    pub daily_budget: Option<Spanned<i64>>,
    pub part_contacts: Option<Spanned<i64>>,
    pub commit_interval_secs: Option<Spanned<i64>>,
    /// `--max-skipped`: child requests refused for good that are skipped before a location
    /// fails.
    pub max_skipped: Option<Spanned<i64>>,
    /// `--listing`: `auto`, `search` or `get`.
    pub listing: Option<Spanned<String>>,
    /// `--overlap` in seconds (incremental).
    pub overlap_secs: Option<Spanned<i64>>,
    /// `--full-walk-every` (incremental).
    pub full_walk_every: Option<Spanned<i64>>,
    /// `--from-events` (incremental): the `--out` of `contacts-etl listen`.
    pub from_events: Option<Spanned<PathBuf>>,
    /// `--max-gap` in seconds (with `from_events`).
    pub max_gap_secs: Option<Spanned<i64>>,
    /// `--children-by`: contact, location or auto.
    pub children_by: Option<Spanned<String>>,
    /// `--verify-sample`: a share between 0 and 1.
    pub verify_sample: Option<Spanned<f64>>,
    /// `--custom-fields`: `ids` (default) or `wide`.
    pub custom_fields: Option<Spanned<String>>,
    /// `--table`: `delta` commits each run to the entities' Delta tables.
    pub table: Option<Spanned<String>>,
    /// `--merge` (with `table = "delta"`): the current-state tables.
    #[serde(default)]
    pub merge: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSection {
    pub input: Spanned<PathBuf>,
    /// `contacts`, `tasks` or `notes`.
    pub entity: Option<Spanned<String>>,
    pub mapping: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub dry_run: bool,
    pub on_duplicate: Option<Spanned<String>>,
    pub default_country: Option<Spanned<String>>,
    pub journal: Option<Spanned<PathBuf>>,
    pub rejects: Option<Spanned<PathBuf>>,
    /// `utf-8`, `latin1` or `windows-1252` (`--encoding`).
    pub encoding: Option<Spanned<String>>,
    /// `--settle-secs`: how long a write may take to land and show in searches.
    pub settle_secs: Option<Spanned<i64>>,
}

/// A problem in a pipeline file, located.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// Every problem found in a pipeline file, in line order (never empty), one per line when
/// displayed.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The problem on the earliest line.
    pub fn first(&self) -> &ConfigError {
        &self.0[0]
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The source text, for turning byte offsets into lines and keys.
pub struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    /// The key on the line holding `offset` (`name = …`), else the enclosing `[table]`.
    fn key_at(&self, offset: usize) -> String {
        let start = self.text[..offset.min(self.text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next().unwrap_or("").trim();
        if let Some((k, _)) = line.split_once('=') {
            return k.trim().to_owned();
        }
        line.trim_matches(|c| c == '[' || c == ']').to_owned()
    }

    pub fn error(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.display().to_string(),
            line: self.line_of(offset),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    pub fn at<T>(&self, v: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.error(v.span().start, key, message)
    }
}

/// Parses a pipeline file; syntax and type errors come back located.
pub fn parse(src: &Source<'_>) -> Result<PipelineFile, ConfigError> {
    toml::from_str::<PipelineFile>(src.text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let message = e.message().trim().to_owned();
        // serde names an unknown key in its message; otherwise take it from the line.
        let key = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_owned)
            .unwrap_or_else(|| src.key_at(offset));
        src.error(offset, &key, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        parse(&Source {
            file: Path::new("p.toml"),
            text,
        })
        .unwrap_err()
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = err("[api]\nrate_limit = \"100/10s\"\nconcurency = 4\n");
        assert_eq!((e.line, e.key.as_str()), (3, "concurency"), "{e}");
        assert!(
            e.to_string()
                .starts_with("p.toml:3: concurency: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_name_the_key_and_line() {
        let e = err("[export]\nout = \"x\"\nincremental = \"yes\"\n");
        assert_eq!(e.line, 3, "{e}");
        assert_eq!(e.key, "incremental", "{e}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = err("[export]\nout = \"x\n");
        assert_eq!(e.line, 2, "{e}");
    }
}
