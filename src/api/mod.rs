//! The Contacts API client: typed calls, error kinds, the retry policy and request counters,
//! over the one HTTP transport of the crate (`transport`), which the OAuth endpoints
//! (`crate::auth`) use too.

mod auth;
mod client;
mod custom_fields;
mod error;
mod ids;
mod location_wide;
mod models;
mod retry;
mod stats;
mod transport;

pub use auth::{StaticToken, Token, TokenSource};
pub use client::{BeforeSend, Location};
pub use client::{
    BusinessPage, Client, ClientBuildError, ClientConfig, ContactsPage, SearchPage,
    DEFAULT_MAX_RESPONSE_BYTES,
};
pub use custom_fields::CUSTOM_FIELDS_SCOPE;
pub use error::{ApiError, ErrorKind, RequestLabel};
pub use ids::{check_id, MAX_ID_LEN};
pub use location_wide::{CalendarRef, ChildKey, LooseRows};
pub use models::{Contact, ListMeta, Note, Task};
pub use retry::{Idempotency, RetryPolicy, LONG_WAIT};
pub use stats::{RequestKind, Stats, StatsSnapshot};
pub(crate) use transport::{
    checked_base, form, is_loopback, join, path_and_query, BaseUrlError, Body, Outgoing, Transport,
    TransportConfig, Watch,
};

/// The API's production base URL.
pub const DEFAULT_BASE_URL: &str = "https://services.leadconnectorhq.com";
/// The `Version` header every Contacts call sends.
pub const API_VERSION: &str = "2021-07-28";
/// The `Version` header of the calendars routes (`apps/calendars.json` names this one).
pub const CALENDARS_API_VERSION: &str = "2021-04-15";
