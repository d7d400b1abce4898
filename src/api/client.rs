//! Typed calls of the Contacts API over one pooled HTTP client.
//!
//! Every call goes through the same path: a concurrency permit, the location's rate limiter,
//! then the permit shared across locations (if any), one HTTP attempt, classification of the
//! reply into an [`ApiError`] kind, and the single [`RetryPolicy`]. List and child calls return the objects as raw JSON so the export can
//! decode them straight into columns; single-record calls and writes return lenient models.
//!
//! What the client refuses, and why (each is [`ApiError::Refused`]: fatal, never retried):
//! - Redirects. The API does not send them; following one would export another host's data
//!   as the location's. A 3xx names its `Location`.
//! - A reply body over [`ClientConfig::max_response_bytes`], checked against `Content-Length`
//!   first, then while streaming (a compressed or unannounced body cannot swell memory).
//! - A request that cannot be built (a URL too long for HTTP): sending it again would fail
//!   the same way.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use super::auth::{StaticToken, TokenSource};
use super::error::{ApiError, RequestLabel};
use super::models::{Contact, ErrorBody, ListMeta, Note, Task};
use super::retry::{Idempotency, RetryPolicy};
use super::stats::{RequestKind, Stats};
use crate::ratelimit::{Quota, RateHeaders, RateLimiter};

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// The `Authorization` header value for this token, marked sensitive so it is never
    /// printed by the HTTP stack.
    pub fn header_value(&self) -> HeaderValue {
        // Token::new admits only visible ASCII, which is always a valid header value.
        let mut h = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .unwrap_or(HeaderValue::from_static("Bearer"));
        h.set_sensitive(true);
        h
    }

    /// The token itself, for code that must send it elsewhere (an OAuth token store).
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Accepts a token as read from a variable or file (surrounding whitespace removed).
    pub fn new(raw: &str) -> Result<Token, String> {
        let t = raw.trim();
        if t.is_empty() {
            return Err("the token is empty".into());
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token contains spaces or non-ASCII characters".into());
        }
        Ok(Token(t.to_owned()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Called right before each attempt of a create goes on the wire, after the waits for the pace
/// and a permit. The importer makes its intent durable there, stamped with the real send time:
/// a create held back by a 429 or the pace is then never taken for older than it is, and a run
/// after a crash knows how long such a create may still be in flight. An error stops the
/// request unsent.
pub type BeforeSend<'a> =
    &'a (dyn Fn() -> futures::future::BoxFuture<'a, Result<(), ApiError>> + Send + Sync);

/// What one attempt sends, besides the token and the body.
struct Outgoing<'a, 'h> {
    kind: RequestKind,
    method: &'a Method,
    url: &'a reqwest::Url,
    label: &'a RequestLabel,
    before_send: Option<BeforeSend<'h>>,
}

/// Settings of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Scheme, host and optional port (and path prefix), e.g. `https://services.leadconnectorhq.com`.
    pub base_url: String,
    /// Supplies the bearer token (static, or refreshing).
    pub token: Arc<dyn TokenSource>,
    /// The pace to keep for this location (`None`: only what the server announces).
    pub rate_limit: Option<Quota>,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Whole-request timeout (connect, send, read the body).
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// A cap shared with other clients (a pipeline's global concurrency across locations).
    pub global_permits: Option<Arc<Semaphore>>,
    /// The largest reply body accepted (`--max-response-bytes`); a larger one fails the request.
    pub max_response_bytes: u64,
}

/// The default cap on one reply body: a page of 100 contacts is well under 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 << 20;

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, token: Token) -> Self {
        ClientConfig {
            base_url: base_url.into(),
            token: Arc::new(StaticToken::new(&token)),
            rate_limit: Some(Quota::API_DEFAULT),
            concurrency: 16,
            timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            global_permits: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// Errors building a client: bad settings, reported before any request.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("invalid base URL '{0}': {1}")]
    BadUrl(String, String),
    #[error("refusing to send the API token over plain http to '{0}': use https (plain http is allowed only to a loopback address such as 127.0.0.1 or localhost)")]
    InsecureUrl(String),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// One page of `GET /contacts/`.
#[derive(Debug, Deserialize)]
pub struct ContactsPage {
    pub contacts: Vec<Box<RawValue>>,
    #[serde(default)]
    pub meta: Option<ListMeta>,
}

/// One page of `GET /contacts/business/:businessId`; `count` is the business's total.
#[derive(Debug, Deserialize)]
pub struct BusinessPage {
    pub contacts: Vec<Box<RawValue>>,
    #[serde(default, deserialize_with = "super::models::lenient_number")]
    pub count: Option<f64>,
}

/// A client for one location's token: one connection pool, one rate limiter, one set of counters.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    /// The checked base URL, parsed once: each request only sets its path and query (no
    /// re-parsing of the host on the hot path).
    base_url: reqwest::Url,
    auth: Arc<dyn TokenSource>,
    limiter: Arc<RateLimiter>,
    permits: Semaphore,
    global_permits: Option<Arc<Semaphore>>,
    retry: RetryPolicy,
    stats: Arc<Stats>,
    max_response_bytes: u64,
}

/// Installs ring as the process's TLS crypto provider (reqwest is built without one).
fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether a URL's host is a loopback address (`localhost`, 127.0.0.0/8, `::1`): the only
/// place a token may travel over plain http.
pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks the base URL and returns it without a trailing slash.
fn checked_base(url: &str) -> Result<String, ClientBuildError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ClientBuildError::BadUrl(url.into(), e.to_string()))?;
    match parsed.scheme() {
        "https" => {}
        "http" => {
            if !is_loopback(&parsed) {
                return Err(ClientBuildError::InsecureUrl(url.into()));
            }
        }
        other => {
            return Err(ClientBuildError::BadUrl(
                url.into(),
                format!("unsupported scheme '{other}'"),
            ))
        }
    }
    if parsed.query().is_some() || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ClientBuildError::BadUrl(
            url.into(),
            "the base URL must not carry credentials or a query".into(),
        ));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// Percent-encodes a path segment or query value (everything but RFC 3986 unreserved characters).
fn enc(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.into()
}

/// A location (sub-account) as `GET /locations/:id` returns it: the fields this tool reads,
/// every other field kept as received.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Location {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// ISO 3166 alpha-2 code (`US`), as the location's settings hold it.
    #[serde(default)]
    pub country: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Path and query of `GET /contacts/`.
fn list_path(location_id: &str, limit: u32, after: Option<(i64, &str)>) -> String {
    let mut pq = format!("/contacts/?locationId={}&limit={limit}", enc(location_id));
    if let Some((ms, id)) = after {
        pq.push_str(&format!("&startAfter={ms}&startAfterId={}", enc(id)));
    }
    pq
}

/// Path and query of `GET /contacts/business/:businessId`.
fn business_path(location_id: &str, business_id: &str, skip: u64, limit: u32) -> String {
    format!(
        "/contacts/business/{}?locationId={}&limit={limit}&skip={skip}",
        enc(business_id),
        enc(location_id)
    )
}

#[derive(Deserialize)]
struct TasksEnv {
    tasks: Vec<Box<RawValue>>,
}
#[derive(Deserialize)]
struct NotesEnv {
    notes: Vec<Box<RawValue>>,
}
#[derive(Deserialize)]
struct EventsEnv {
    events: Vec<Box<RawValue>>,
}
#[derive(Deserialize)]
struct ContactEnv {
    contact: Contact,
}
#[derive(Deserialize)]
struct MaybeContactEnv {
    #[serde(default)]
    contact: Option<Contact>,
}
#[derive(Deserialize)]
struct TaskEnv {
    task: Task,
}
#[derive(Deserialize)]
struct NoteEnv {
    note: Note,
}
#[derive(Deserialize)]
struct TagsEnv {
    #[serde(default)]
    tags: Vec<String>,
}
#[derive(Deserialize)]
struct UpsertEnv {
    #[serde(default)]
    new: bool,
    contact: Contact,
}
#[derive(Deserialize)]
struct Ignored {}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, ClientBuildError> {
        Self::with_limiter(
            config.clone(),
            Arc::new(RateLimiter::new(config.rate_limit)),
        )
    }

    /// A client sharing `limiter` with others for the same location.
    pub fn with_limiter(
        config: ClientConfig,
        limiter: Arc<RateLimiter>,
    ) -> Result<Client, ClientBuildError> {
        install_crypto_provider();
        let base = checked_base(&config.base_url)?;
        let concurrency = config.concurrency.max(1);
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(concurrency)
            .tcp_nodelay(true)
            // The API never redirects: a 3xx is an error, not a hop to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("contacts-etl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientBuildError::Http(e.to_string()))?;
        Ok(Client {
            http,
            base_url: reqwest::Url::parse(&base)
                .map_err(|e| ClientBuildError::BadUrl(base.clone(), e.to_string()))?,
            auth: config.token,
            limiter,
            permits: Semaphore::new(concurrency),
            global_permits: config.global_permits,
            retry: config.retry,
            stats: Arc::new(Stats::default()),
            max_response_bytes: config.max_response_bytes.max(1),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    /// `GET /contacts/`: one page, newest first. `after` is the cursor (`meta.startAfter` in
    /// epoch ms, `meta.startAfterId`) of the previous page.
    pub async fn list_contacts(
        &self,
        location_id: &str,
        limit: u32,
        after: Option<(i64, &str)>,
    ) -> Result<ContactsPage, ApiError> {
        self.get_json(RequestKind::List, list_path(location_id, limit, after))
            .await
    }

    /// The request [`Client::list_contacts`] sends, as errors name it.
    pub fn list_contacts_label(
        location_id: &str,
        limit: u32,
        after: Option<(i64, &str)>,
    ) -> RequestLabel {
        RequestLabel::new(&Method::GET, &list_path(location_id, limit, after))
    }

    /// `GET /contacts/business/:businessId` with offset paging.
    pub async fn business_contacts(
        &self,
        location_id: &str,
        business_id: &str,
        skip: u64,
        limit: u32,
    ) -> Result<BusinessPage, ApiError> {
        let pq = business_path(location_id, business_id, skip, limit);
        self.get_json(RequestKind::Business, pq).await
    }

    /// The request [`Client::business_contacts`] sends, as errors name it.
    pub fn business_contacts_label(
        location_id: &str,
        business_id: &str,
        skip: u64,
        limit: u32,
    ) -> RequestLabel {
        RequestLabel::new(
            &Method::GET,
            &business_path(location_id, business_id, skip, limit),
        )
    }

    pub async fn get_contact(&self, contact_id: &str) -> Result<Contact, ApiError> {
        let env: ContactEnv = self
            .get_json(
                RequestKind::Contact,
                format!("/contacts/{}", enc(contact_id)),
            )
            .await?;
        Ok(env.contact)
    }

    /// `GET /locations/:locationId` (scope `locations.readonly`): the location (sub-account)
    /// itself. The import reads its `country` as the default of national phone numbers.
    pub async fn get_location(&self, location_id: &str) -> Result<Location, ApiError> {
        /// `{"location": {...}}`.
        #[derive(Deserialize)]
        struct LocationEnv {
            location: Location,
        }
        let env: LocationEnv = self
            .get_json(
                RequestKind::Other,
                format!("/locations/{}", enc(location_id)),
            )
            .await?;
        Ok(env.location)
    }

    /// `GET /contacts/:id/tasks`, objects as received.
    pub async fn tasks_raw(&self, contact_id: &str) -> Result<Vec<Box<RawValue>>, ApiError> {
        let env: TasksEnv = self
            .get_json(
                RequestKind::Tasks,
                format!("/contacts/{}/tasks", enc(contact_id)),
            )
            .await?;
        Ok(env.tasks)
    }

    /// `GET /contacts/:id/notes`, objects as received.
    pub async fn notes_raw(&self, contact_id: &str) -> Result<Vec<Box<RawValue>>, ApiError> {
        let env: NotesEnv = self
            .get_json(
                RequestKind::Notes,
                format!("/contacts/{}/notes", enc(contact_id)),
            )
            .await?;
        Ok(env.notes)
    }

    /// `GET /contacts/:id/appointments` (the reply's `events`), objects as received.
    pub async fn appointments_raw(&self, contact_id: &str) -> Result<Vec<Box<RawValue>>, ApiError> {
        let env: EventsEnv = self
            .get_json(
                RequestKind::Appointments,
                format!("/contacts/{}/appointments", enc(contact_id)),
            )
            .await?;
        Ok(env.events)
    }

    pub async fn get_task(&self, contact_id: &str, task_id: &str) -> Result<Task, ApiError> {
        let env: TaskEnv = self
            .get_json(
                RequestKind::Other,
                format!("/contacts/{}/tasks/{}", enc(contact_id), enc(task_id)),
            )
            .await?;
        Ok(env.task)
    }

    pub async fn get_note(&self, contact_id: &str, note_id: &str) -> Result<Note, ApiError> {
        let env: NoteEnv = self
            .get_json(
                RequestKind::Other,
                format!("/contacts/{}/notes/{}", enc(contact_id), enc(note_id)),
            )
            .await?;
        Ok(env.note)
    }

    /// `GET /contacts/search/duplicate`: the contact the location's duplicate rule would match.
    pub async fn find_duplicate(
        &self,
        location_id: &str,
        email: Option<&str>,
        phone: Option<&str>,
    ) -> Result<Option<Contact>, ApiError> {
        let mut pq = format!("/contacts/search/duplicate?locationId={}", enc(location_id));
        if let Some(e) = email {
            pq.push_str(&format!("&email={}", enc(e)));
        }
        if let Some(p) = phone {
            pq.push_str(&format!("&number={}", enc(p)));
        }
        let env: MaybeContactEnv = self.get_json(RequestKind::Other, pq).await?;
        Ok(env.contact)
    }

    /// `POST /contacts/`. Not retried after an ambiguous failure: look the contact up first.
    /// `before_send` runs before each attempt is sent ([`BeforeSend`]).
    pub async fn create_contact(
        &self,
        body: &serde_json::Value,
        before_send: Option<BeforeSend<'_>>,
    ) -> Result<Contact, ApiError> {
        let env: ContactEnv = self
            .write_with(
                Method::POST,
                "/contacts/".into(),
                body,
                Idempotency::NonIdempotent,
                before_send,
            )
            .await?;
        Ok(env.contact)
    }

    /// `PUT /contacts/:id` (no `locationId` in the body; `tags` here replace all tags).
    pub async fn update_contact(
        &self,
        contact_id: &str,
        body: &serde_json::Value,
    ) -> Result<Contact, ApiError> {
        let env: ContactEnv = self
            .write(
                Method::PUT,
                format!("/contacts/{}", enc(contact_id)),
                body,
                Idempotency::Idempotent,
            )
            .await?;
        Ok(env.contact)
    }

    pub async fn delete_contact(&self, contact_id: &str) -> Result<(), ApiError> {
        self.delete(format!("/contacts/{}", enc(contact_id))).await
    }

    /// `POST /contacts/upsert`: returns whether a contact was created, and the contact.
    pub async fn upsert_contact(
        &self,
        body: &serde_json::Value,
    ) -> Result<(bool, Contact), ApiError> {
        let env: UpsertEnv = self
            .write(
                Method::POST,
                "/contacts/upsert".into(),
                body,
                Idempotency::Idempotent,
            )
            .await?;
        Ok((env.new, env.contact))
    }

    /// `POST /contacts/:id/tags`: adds tags (additive, so safe to repeat); returns all tags.
    pub async fn add_tags(
        &self,
        contact_id: &str,
        tags: &[String],
    ) -> Result<Vec<String>, ApiError> {
        let body = serde_json::json!({ "tags": tags });
        let env: TagsEnv = self
            .write(
                Method::POST,
                format!("/contacts/{}/tags", enc(contact_id)),
                &body,
                Idempotency::Idempotent,
            )
            .await?;
        Ok(env.tags)
    }

    /// `POST /contacts/:id/tasks`. Tasks have no natural key: not retried after an ambiguous failure.
    pub async fn create_task(
        &self,
        contact_id: &str,
        body: &serde_json::Value,
        before_send: Option<BeforeSend<'_>>,
    ) -> Result<Task, ApiError> {
        let env: TaskEnv = self
            .write_with(
                Method::POST,
                format!("/contacts/{}/tasks", enc(contact_id)),
                body,
                Idempotency::NonIdempotent,
                before_send,
            )
            .await?;
        Ok(env.task)
    }

    pub async fn update_task(
        &self,
        contact_id: &str,
        task_id: &str,
        body: &serde_json::Value,
    ) -> Result<Task, ApiError> {
        let path = format!("/contacts/{}/tasks/{}", enc(contact_id), enc(task_id));
        let env: TaskEnv = self
            .write(Method::PUT, path, body, Idempotency::Idempotent)
            .await?;
        Ok(env.task)
    }

    pub async fn complete_task(
        &self,
        contact_id: &str,
        task_id: &str,
        completed: bool,
    ) -> Result<Task, ApiError> {
        let path = format!(
            "/contacts/{}/tasks/{}/completed",
            enc(contact_id),
            enc(task_id)
        );
        let env: TaskEnv = self
            .write(
                Method::PUT,
                path,
                &serde_json::json!({ "completed": completed }),
                Idempotency::Idempotent,
            )
            .await?;
        Ok(env.task)
    }

    pub async fn delete_task(&self, contact_id: &str, task_id: &str) -> Result<(), ApiError> {
        self.delete(format!(
            "/contacts/{}/tasks/{}",
            enc(contact_id),
            enc(task_id)
        ))
        .await
    }

    /// `DELETE /contacts/:id/notes/:noteId`.
    pub async fn delete_note(&self, contact_id: &str, note_id: &str) -> Result<(), ApiError> {
        self.delete(format!(
            "/contacts/{}/notes/{}",
            enc(contact_id),
            enc(note_id)
        ))
        .await
    }

    /// `POST /contacts/:id/notes`. Not retried after an ambiguous failure.
    pub async fn create_note(
        &self,
        contact_id: &str,
        body: &serde_json::Value,
        before_send: Option<BeforeSend<'_>>,
    ) -> Result<Note, ApiError> {
        let env: NoteEnv = self
            .write_with(
                Method::POST,
                format!("/contacts/{}/notes", enc(contact_id)),
                body,
                Idempotency::NonIdempotent,
                before_send,
            )
            .await?;
        Ok(env.note)
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        kind: RequestKind,
        path_and_query: String,
    ) -> Result<T, ApiError> {
        self.call(
            kind,
            Method::GET,
            path_and_query,
            None,
            Idempotency::Idempotent,
            None,
        )
        .await
    }

    /// A `DELETE` without a body; the reply's content does not matter.
    async fn delete(&self, path: String) -> Result<(), ApiError> {
        let _: Ignored = self
            .write(
                Method::DELETE,
                path,
                &serde_json::Value::Null,
                Idempotency::Idempotent,
            )
            .await?;
        Ok(())
    }

    async fn write<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: &serde_json::Value,
        idem: Idempotency,
    ) -> Result<T, ApiError> {
        self.write_with(method, path, body, idem, None).await
    }

    async fn write_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: &serde_json::Value,
        idem: Idempotency,
        before_send: Option<BeforeSend<'_>>,
    ) -> Result<T, ApiError> {
        let body = if body.is_null() {
            None
        } else {
            // Serialising a Value cannot fail.
            Some(Bytes::from(serde_json::to_vec(body).unwrap_or_default()))
        };
        self.call(RequestKind::Write, method, path, body, idem, before_send)
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        kind: RequestKind,
        method: Method,
        path_and_query: String,
        body: Option<Bytes>,
        idem: Idempotency,
        before_send: Option<BeforeSend<'_>>,
    ) -> Result<T, ApiError> {
        let label = RequestLabel::new(&method, &path_and_query);
        let (path, query) = path_and_query
            .split_once('?')
            .map_or((path_and_query.as_str(), None), |(p, q)| (p, Some(q)));
        let mut url = self.base_url.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{prefix}{path}"));
        url.set_query(query);
        let mut refreshed = false;
        let out = Outgoing {
            kind,
            method: &method,
            url: &url,
            label: &label,
            before_send,
        };
        let result = loop {
            let auth = self.auth.current().await?;
            let result = self
                .retry
                .run(
                    idem,
                    || self.attempt(&out, &auth, body.clone()),
                    |err, delay| {
                        self.stats.retry();
                        tracing::debug!(error = %err, delay_ms = delay.as_millis() as u64, "retrying");
                    },
                )
                .await;
            // One refresh per call on a 401: an expired access token is renewed and the
            // request sent again; a second 401 is final.
            if let Err(ApiError::Unauthorized { .. }) = &result {
                if !refreshed && self.auth.refresh(&auth).await? {
                    refreshed = true;
                    continue;
                }
            }
            break result;
        };
        if let Err(e) = &result {
            tracing::debug!(error = %e, "request failed");
        }
        result
    }

    /// Reads a reply body under this client's cap ([`read_body`]).
    async fn read_body(
        &self,
        resp: &mut reqwest::Response,
        label: &RequestLabel,
        status: u16,
    ) -> Result<Vec<u8>, ApiError> {
        read_body(
            resp,
            label,
            status,
            self.max_response_bytes,
            Some(&self.stats),
        )
        .await
    }

    /// One HTTP attempt: permit, pace, the caller's [`BeforeSend`], send, read, classify.
    async fn attempt<T: DeserializeOwned>(
        &self,
        out: &Outgoing<'_, '_>,
        auth: &HeaderValue,
        body: Option<Bytes>,
    ) -> Result<T, ApiError> {
        let Outgoing {
            kind,
            method,
            url,
            label,
            before_send,
        } = *out;
        // The semaphore is never closed, so acquire cannot fail.
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| transient(label, "client shut down".into(), None, false, None))?;
        // The shared permit is taken after this location's pacing wait: a request waiting
        // for its turn here must not hold a slot another location could send with now.
        let (waited, _global) = self
            .limiter
            .acquire_then(|| async {
                match &self.global_permits {
                    // Never closed, so `ok()` never drops a permit it should have held.
                    Some(g) => g.acquire().await.ok(),
                    None => None,
                }
            })
            .await;
        self.stats.waited(waited);
        if let Some(hook) = before_send {
            hook().await?;
        }
        self.stats.attempt();
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, auth.clone())
            .header("Version", super::API_VERSION)
            .header(ACCEPT, "application/json");
        if let Some(b) = body {
            req = req.header(CONTENT_TYPE, "application/json").body(b);
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_builder() => return Err(unbuildable(label, url, &e)),
            Err(e) => {
                self.stats.network_error();
                // A connection that was never made cannot have applied anything.
                let applied = !e.is_connect();
                return Err(transient(label, describe_reqwest(&e), None, applied, None));
            }
        };
        let status = resp.status().as_u16();
        let rate = RateHeaders::from_headers(resp.headers());
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        // The location-wide pause a 429 sets is held to the same cap as one retry wait.
        self.limiter.observe(
            status,
            &rate,
            retry_after.map(|d| d.min(self.retry.max_wait)),
        );
        if (300..400).contains(&status) {
            return Err(redirected(label, status, resp.headers()));
        }
        let bytes = match self.read_body(&mut resp, label, status).await {
            Ok(b) => b,
            // A POST answered 2xx took effect, whatever its reply: one too large to read is
            // ambiguous, so a create is looked up, never taken as refused and made again.
            Err(e) if *method == Method::POST && (200..300).contains(&status) => {
                return Err(transient(label, e.to_string(), None, true, Some(status)))
            }
            Err(e) => return Err(e),
        };
        if (200..300).contains(&status) {
            return match serde_json::from_slice::<T>(&bytes) {
                Ok(v) => {
                    self.stats.ok(kind, bytes.len());
                    Ok(v)
                }
                Err(e) => {
                    self.stats.malformed();
                    Err(transient(
                        label,
                        format!(
                            "HTTP {status} with a malformed body ({e}, {} bytes)",
                            bytes.len()
                        ),
                        None,
                        true,
                        Some(status),
                    ))
                }
            };
        }
        let err_body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
        let trace_id = err_body.trace_id.clone();
        let messages = err_body.messages();
        let first = messages
            .first()
            .cloned()
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(match status {
            401 => ApiError::Unauthorized {
                request: label.clone(),
                message: first,
                trace_id,
            },
            404 => ApiError::NotFound {
                request: label.clone(),
                message: first,
                trace_id,
            },
            400 if err_body
                .meta
                .as_ref()
                .and_then(|m| m.contact_id.as_ref())
                .is_some() =>
            {
                let meta = err_body.meta.unwrap_or_default();
                ApiError::Duplicate {
                    request: label.clone(),
                    contact_id: meta.contact_id.unwrap_or_default(),
                    matching_field: meta.matching_field,
                    trace_id,
                }
            }
            400 if first.to_ascii_lowercase().contains("not found") => ApiError::NotFound {
                request: label.clone(),
                message: first,
                trace_id,
            },
            429 if rate.daily_remaining == Some(0) => {
                self.stats.rate_limited();
                ApiError::QuotaExhausted {
                    request: label.clone(),
                    trace_id,
                }
            }
            429 => {
                self.stats.rate_limited();
                transient(
                    label,
                    "HTTP 429 rate limited".into(),
                    retry_after,
                    false,
                    Some(status),
                )
                .with_trace(trace_id)
            }
            408 | 500..=599 => {
                self.stats.server_error();
                transient(
                    label,
                    format!("HTTP {status} {first}"),
                    retry_after,
                    true,
                    Some(status),
                )
                .with_trace(trace_id)
            }
            _ => ApiError::Fatal {
                request: label.clone(),
                status,
                messages,
                trace_id,
            },
        })
    }
}

/// A 3xx: never followed (see the module doc).
fn redirected(label: &RequestLabel, status: u16, headers: &reqwest::header::HeaderMap) -> ApiError {
    let location = headers
        .get(reqwest::header::LOCATION)
        .map(|v| super::error::printable(&String::from_utf8_lossy(v.as_bytes()), 200));
    ApiError::Refused {
        request: label.clone(),
        status: Some(status),
        reason: match location {
            Some(l) => format!("HTTP {status} redirect to '{l}', not followed"),
            None => format!("HTTP {status} redirect (no Location), not followed"),
        },
        hint: "the API does not redirect: check --base-url (HL_BASE_URL, or base_url in a pipeline file); it must name the API itself, e.g. https://services.leadconnectorhq.com, or a proxy that forwards requests rather than redirecting them".into(),
    }
}

/// At most this much is reserved up front for a reply body, whatever its `Content-Length`
/// says: a raised cap must not let one announced length allocate (and abort on) terabytes;
/// a body that really is larger grows as its bytes arrive.
const MAX_BODY_RESERVATION: u64 = 8 << 20;

/// Reads a reply body, refusing one over `cap`: by its `Content-Length` before reading
/// anything, else as soon as the bytes received pass the cap. The one body reader of the
/// crate: the API client and the OAuth endpoints both read through it. A failed read counts
/// as a network error in `stats`, when given.
pub(crate) async fn read_body(
    resp: &mut reqwest::Response,
    label: &RequestLabel,
    status: u16,
    cap: u64,
    stats: Option<&Stats>,
) -> Result<Vec<u8>, ApiError> {
    let announced = resp.content_length();
    if let Some(len) = announced.filter(|&len| len > cap) {
        return Err(too_large(
            label,
            status,
            cap,
            format!("announces {len} bytes (Content-Length)"),
        ));
    }
    let reserve = announced.unwrap_or(0).min(MAX_BODY_RESERVATION);
    let mut body = Vec::with_capacity(reserve as usize);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if (body.len() + chunk.len()) as u64 > cap {
                    return Err(too_large(
                        label,
                        status,
                        cap,
                        format!("passed it after {} bytes", body.len() + chunk.len()),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                if let Some(stats) = stats {
                    stats.network_error();
                }
                return Err(transient(
                    label,
                    format!("reading the reply failed: {}", describe_reqwest(&e)),
                    None,
                    true,
                    Some(status),
                ));
            }
        }
    }
}

/// A reply over the body cap.
fn too_large(label: &RequestLabel, status: u16, cap: u64, what: String) -> ApiError {
    ApiError::Refused {
        request: label.clone(),
        status: Some(status),
        reason: format!("the HTTP {status} reply is larger than the {cap}-byte cap on one reply: it {what}"),
        hint: "a page of contacts is normally well under 1 MiB, so this is likely a misbehaving server or proxy; if such replies are expected, raise the cap with --max-response-bytes (max_response_bytes in a pipeline file's [api])".into(),
    }
}

/// A request reqwest cannot build (the URL does not fit an HTTP request line).
fn unbuildable(label: &RequestLabel, url: &reqwest::Url, e: &reqwest::Error) -> ApiError {
    // The http crate's limit on a request target.
    const MAX_URI: usize = 65_534;
    let len = url.as_str().len();
    let reason = if len > MAX_URI {
        format!("the request cannot be built: its URL is {len} bytes, more than HTTP allows ({MAX_URI})")
    } else {
        format!("the request cannot be built: {}", describe_reqwest(e))
    };
    ApiError::Refused {
        request: label.clone(),
        status: None,
        reason,
        hint: "an id or value in the request is malformed or far too long: check the ids and values given on the command line, in the pipeline file or in the input".into(),
    }
}

fn transient(
    label: &RequestLabel,
    reason: String,
    retry_after: Option<Duration>,
    maybe_applied: bool,
    status: Option<u16>,
) -> ApiError {
    ApiError::Transient {
        request: label.clone(),
        reason,
        retry_after,
        maybe_applied,
        status,
        trace_id: None,
    }
}

impl ApiError {
    fn with_trace(mut self, id: Option<String>) -> Self {
        if let ApiError::Transient { trace_id, .. } = &mut self {
            *trace_id = id;
        }
        self
    }
}

/// A reqwest error without its URL (which is ours to print, and safe) or any header.
fn describe_reqwest(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the reply body broke off"
    } else if e.is_request() {
        "the request failed"
    } else {
        "HTTP error"
    };
    let mut detail = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail = s.to_string();
        src = s.source();
    }
    if detail.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {detail}")
    }
}

/// `Retry-After` as seconds (`120`, `1.5`) or an HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`),
/// as a wait from `now`. The value is kept as the server said it (up to a century, so the
/// arithmetic cannot overflow): the retry policy caps each wait (`RetryPolicy::max_wait`) and
/// names the server's time when it gives up. A date that is not in the future says nothing
/// usable (clocks differ): `None`, so the caller's own pause applies.
pub(crate) fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(100 * 366 * 86_400);
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(CAP.as_secs_f64())));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    at.duration_since(now)
        .ok()
        .filter(|wait| !wait.is_zero())
        .map(|wait| wait.min(CAP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_never_printed() {
        let t = Token::new(" pit-secret-123 \n").unwrap();
        assert_eq!(format!("{t:?}"), "Token(***)");
        assert!(Token::new("  ").is_err());
        assert!(Token::new("a b").is_err());
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(checked_base("https://services.leadconnectorhq.com").is_ok());
        assert!(checked_base("http://127.0.0.1:8080/").is_ok());
        assert!(checked_base("http://localhost:1").is_ok());
        assert!(checked_base("http://[::1]:1").is_ok());
        assert!(matches!(
            checked_base("http://services.leadconnectorhq.com"),
            Err(ClientBuildError::InsecureUrl(_))
        ));
        assert!(matches!(
            checked_base("http://10.0.0.1"),
            Err(ClientBuildError::InsecureUrl(_))
        ));
        assert!(checked_base("ftp://x").is_err());
        assert!(checked_base("not a url").is_err());
        assert_eq!(
            checked_base("http://127.0.0.1:9/api/").unwrap(),
            "http://127.0.0.1:9/api"
        );
    }

    #[test]
    fn encodes_path_segments() {
        assert_eq!(enc("abcXYZ09-_.~"), "abcXYZ09-_.~");
        assert_eq!(enc("a/b c?&"), "a%2Fb%20c%3F%26");
    }

    #[test]
    fn retry_after_as_seconds_or_http_date() {
        use std::time::{Duration as D, UNIX_EPOCH};
        // Sun, 06 Nov 1994 08:49:37 GMT
        let now = UNIX_EPOCH + D::from_secs(784_111_777);
        assert_eq!(parse_retry_after("7", now), Some(D::from_secs(7)));
        assert_eq!(parse_retry_after(" 1.5 ", now), Some(D::from_millis(1500)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(D::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            None,
            "a date in the past leaves the pause to the caller"
        );
        assert_eq!(
            parse_retry_after("999999", now),
            Some(D::from_secs(999_999))
        );
        assert_eq!(
            parse_retry_after("1e300", now),
            Some(D::from_secs(100 * 366 * 86_400))
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
