//! Every environment variable the tool reads, in one place.

/// The API token (a Private Integration Token or a location OAuth access token).
pub const HL_TOKEN: &str = "HL_TOKEN";
/// Overrides the API base URL (tests and the simulator: `http://127.0.0.1:PORT`).
pub const HL_BASE_URL: &str = "HL_BASE_URL";
/// Default location id for `export`.
pub const HL_LOCATION_ID: &str = "HL_LOCATION_ID";
/// Log filter in `tracing` syntax, e.g. `contacts_etl=debug`.
pub const RUST_LOG: &str = "RUST_LOG";
