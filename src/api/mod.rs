//! The Contacts API client: typed calls, error kinds, the retry policy and request counters.

mod auth;
mod client;
mod error;
mod ids;
mod models;
mod retry;
mod stats;

pub use auth::{StaticToken, TokenSource};
pub(crate) use client::is_loopback;
pub(crate) use client::read_body;
pub use client::{BeforeSend, Location};
pub use client::{
    BusinessPage, Client, ClientBuildError, ClientConfig, ContactsPage, Token,
    DEFAULT_MAX_RESPONSE_BYTES,
};
pub use error::{ApiError, ErrorKind, RequestLabel};
pub use ids::{check_id, MAX_ID_LEN};
pub use models::{Contact, ListMeta, Note, Task};
pub use retry::{Idempotency, RetryPolicy, LONG_WAIT};
pub use stats::{RequestKind, Stats, StatsSnapshot};

/// The API's production base URL.
pub const DEFAULT_BASE_URL: &str = "https://services.leadconnectorhq.com";
/// The `Version` header every Contacts call sends.
pub const API_VERSION: &str = "2021-07-28";
