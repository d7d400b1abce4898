//! How a job reaches the API: the base URL, where its token comes from, and the HTTP limits.
//! One [`Connection`] value serves commands (built from their flags) and pipelines (from the
//! file's `[api]` and `[auth]` sections); [`Connection::client_config`] is the one place that
//! turns it into the client's settings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::env;
use super::outcome::{client_outcome, FailKind, Outcome};
use crate::api::{Client, ClientConfig, Token, DEFAULT_BASE_URL, DEFAULT_MAX_RESPONSE_BYTES};
use crate::ratelimit::Quota;

/// Where a token comes from. The token itself is never written in settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRef {
    /// An environment variable (`HL_TOKEN` unless a pipeline names another).
    Env(String),
    /// A file holding the token.
    File(PathBuf),
    /// A pipeline's OAuth token store (a location grant, or the agency's).
    OAuth,
    /// No token at all: an offline dry run, which sends nothing.
    None,
    /// The built-in simulator's (the demo): it accepts any bearer token.
    Simulator,
}

impl Default for TokenRef {
    fn default() -> Self {
        TokenRef::Env(env::HL_TOKEN.into())
    }
}

impl TokenRef {
    /// `--token-file FILE`, or `HL_TOKEN`.
    pub fn from_flag(file: Option<PathBuf>) -> TokenRef {
        file.map_or_else(TokenRef::default, TokenRef::File)
    }

    /// Reads the token. Problems are usage errors (exit 2) whose message never shows a token.
    pub fn load(&self) -> Result<Token, String> {
        match self {
            TokenRef::File(path) => {
                // A token pasted as the path would be echoed by every message below (and the
                // report): refused without showing it.
                if crate::auth::looks_like_secret(&path.to_string_lossy()) {
                    return Err("--token-file: the value looks like a secret (a token), not a file path; it is not shown here\nhint: put the token in a file (mode 0600) and pass its path, or set HL_TOKEN; treat the token as exposed if this command line was logged or shared".into());
                }
                crate::auth::warn_if_exposed(path, "token file");
                let raw = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
                Token::new(&raw).map_err(|e| format!("token file {}: {e}", path.display()))
            }
            TokenRef::Env(var) if var == env::HL_TOKEN => match std::env::var(var) {
                Ok(raw) => Token::new(&raw).map_err(|e| format!("{var}: {e}")),
                Err(_) => Err(format!(
                    "no API token: set {} or pass --token-file FILE (in a pipeline file: token_env or token_file)\nhint: use a Private Integration Token or a location OAuth access token with the contacts.readonly scope",
                    env::HL_TOKEN
                )),
            },
            TokenRef::Env(var) => {
                let raw = std::env::var(var).map_err(|_| {
                    format!(
                        "the environment variable {var} (named by the pipeline file) is not set"
                    )
                })?;
                Token::new(&raw).map_err(|e| format!("{var}: {e}"))
            }
            TokenRef::OAuth => Err("an OAuth location has no static token".into()),
            TokenRef::None => Err("no token: this run was meant to send nothing".into()),
            TokenRef::Simulator => Token::new("demo-token"),
        }
    }
}

/// How to reach the API, with the limits every request keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    pub base_url: String,
    pub token: TokenRef,
    /// The rate to keep (`None`: no pacing beyond what the server's headers announce).
    pub rate_limit: Option<Quota>,
    /// Requests in flight at once for this location.
    pub concurrency: usize,
    pub timeout: Duration,
    pub max_retry_wait: Duration,
    pub request_deadline: Duration,
    pub max_response_bytes: u64,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            base_url: DEFAULT_BASE_URL.into(),
            token: TokenRef::default(),
            rate_limit: Some(Quota::API_DEFAULT),
            concurrency: 8,
            timeout: Duration::from_secs(60),
            max_retry_wait: Duration::from_secs(300),
            request_deadline: Duration::from_secs(900),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

impl Connection {
    /// The client's settings for `token`: the one translation.
    pub fn client_config(&self, token: Token) -> ClientConfig {
        let mut cfg = ClientConfig::new(self.base_url.clone(), token);
        cfg.rate_limit = self.rate_limit;
        cfg.concurrency = self.concurrency;
        cfg.timeout = self.timeout.max(Duration::from_secs(1));
        self.limit_retries(&mut cfg.retry);
        cfg.max_response_bytes = self.max_response_bytes;
        cfg
    }

    /// The retry limits of this connection (`--max-retry-wait`, `--request-deadline`), for the
    /// API client and the OAuth calls alike.
    pub fn limit_retries(&self, retry: &mut crate::api::RetryPolicy) {
        retry.max_wait = self.max_retry_wait;
        retry.deadline = self.request_deadline;
    }

    /// A client with the token this connection names (not an OAuth one: see the pipeline).
    pub fn client(&self) -> Result<Arc<Client>, Outcome> {
        let token = self.token.load().map_err(Outcome::usage)?;
        self.client_with(token, None, None)
    }

    /// A client with a given token, or a refreshing source, sharing `global` permits.
    pub fn client_with(
        &self,
        token: Token,
        source: Option<Arc<dyn crate::api::TokenSource>>,
        global: Option<Arc<Semaphore>>,
    ) -> Result<Arc<Client>, Outcome> {
        let mut cfg = self.client_config(token);
        if let Some(source) = source {
            cfg.token = source;
        }
        cfg.global_permits = global;
        Client::new(cfg).map(Arc::new).map_err(client_outcome)
    }

    /// The settle time an import waits, with this connection's request timeout.
    pub fn settle(&self, settle_secs: u64) -> crate::import::Settle {
        crate::import::Settle {
            timeout: self.timeout,
            settle: Duration::from_secs(settle_secs),
        }
    }
}

/// Checks ids given with `flag` before anything is sent (a usage error naming the flag).
pub fn check_ids(flag: &str, ids: &[String]) -> Result<(), Outcome> {
    for id in ids {
        crate::api::check_id(id).map_err(|e| {
            Outcome::Failed(
                FailKind::Usage,
                anyhow::anyhow!(
                    "{flag}: {e}\nhint: give the id as HighLevel shows it, e.g. ve9EPM428h8vShlRW1KT"
                ),
            )
        })?;
    }
    Ok(())
}
