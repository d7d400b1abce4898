//! Every environment variable the tool reads, in one place.

/// The API token (a Private Integration Token or a location OAuth access token).
pub const HL_TOKEN: &str = "HL_TOKEN";
/// Overrides the API base URL (tests and the simulator: `http://127.0.0.1:PORT`), for
/// commands and pipeline files alike.
pub const HL_BASE_URL: &str = "HL_BASE_URL";
/// Default location id for `export` and `import`.
pub const HL_LOCATION_ID: &str = "HL_LOCATION_ID";
/// Log filter in `tracing` syntax, e.g. `contacts_etl=debug`.
pub const RUST_LOG: &str = "RUST_LOG";
/// The Marketplace app's client id.
pub const HL_CLIENT_ID: &str = "HL_CLIENT_ID";
/// The default variable holding the app's client secret (`--client-secret-env` names another).
pub const HL_CLIENT_SECRET: &str = "HL_CLIENT_SECRET";
/// The token store file (default `~/.config/contacts-etl/tokens.json`).
pub const HL_TOKEN_STORE: &str = "HL_TOKEN_STORE";
/// The consent screen URL (a white-label marketplace, or the simulator in tests).
pub const HL_AUTHORIZE_URL: &str = "HL_AUTHORIZE_URL";
/// The worker index of `run --shard /N` (set by a Kubernetes Indexed Job in each pod).
pub const JOB_COMPLETION_INDEX: &str = "JOB_COMPLETION_INDEX";

/// The base URL to use: `HL_BASE_URL` when set and not empty, else `configured`. Commands get
/// the same rule from their `--base-url` flag's `env`; pipeline files through this.
pub fn base_url(configured: &str) -> String {
    std::env::var(HL_BASE_URL)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| configured.to_owned())
}
