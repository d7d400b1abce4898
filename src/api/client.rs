//! Typed calls of the Contacts API over one [`Transport`].
//!
//! Every call goes through the same path: the token, then [`Transport::request`] (the one
//! place a request is sent, read, classified and retried: see `transport.rs` for what it
//! refuses and why), with this client's gate before each attempt: a concurrency permit, the
//! location's rate limiter, then the permit shared across locations (if any). A 401 renews
//! the token once and sends the request again. List and child calls return the objects as
//! raw JSON so the export can decode them straight into columns; single-record calls and
//! writes return lenient models.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::auth::{StaticToken, Token, TokenSource};
use super::error::{ApiError, RequestLabel};
use super::models::{Contact, ListMeta, Note, Task};
use super::retry::{Idempotency, RetryPolicy};
use super::stats::{RequestKind, Stats};
use super::transport::{self, path_and_query, Body, Outgoing, Transport, TransportConfig, Watch};
use super::API_VERSION;
use crate::ratelimit::{Quota, RateLimiter};

/// Called right before each attempt of a create goes on the wire, after the waits for the pace
/// and a permit. The importer makes its intent durable there, stamped with the real send time:
/// a create held back by a 429 or the pace is then never taken for older than it is, and a run
/// after a crash knows how long such a create may still be in flight. An error stops the
/// request unsent.
pub type BeforeSend<'a> =
    &'a (dyn Fn() -> futures::future::BoxFuture<'a, Result<(), ApiError>> + Send + Sync);

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
    /// Timeout of one attempt (connect, send, read the body); `retry.deadline` bounds the
    /// whole request.
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

/// One page of `POST /contacts/search`: `{contacts, total}`. Each contact may carry the
/// `searchAfter` values that continue after it.
#[derive(Debug, Deserialize)]
pub struct SearchPage {
    #[serde(default)]
    pub contacts: Vec<Box<RawValue>>,
    /// Contacts matching the search's filters, all pages together.
    #[serde(default, deserialize_with = "super::models::lenient_number")]
    pub total: Option<f64>,
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
    transport: Transport,
    /// The checked base URL, parsed once: each request only sets its path and query (no
    /// re-parsing of the host on the hot path).
    base_url: reqwest::Url,
    auth: Arc<dyn TokenSource>,
    limiter: Arc<RateLimiter>,
    permits: Semaphore,
    /// Turns for per-contact requests to queue for `permits`, as many as it has (see
    /// [`Client::gate`]).
    turns: Semaphore,
    /// What `permits` started with.
    concurrency: usize,
    global_permits: Option<Arc<Semaphore>>,
    stats: Arc<Stats>,
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
    let limit = limit.to_string();
    let mut query = vec![("locationId", location_id), ("limit", &limit)];
    let start_after;
    if let Some((ms, id)) = after {
        start_after = ms.to_string();
        query.extend([("startAfter", start_after.as_str()), ("startAfterId", id)]);
    }
    path_and_query(&["contacts", ""], &query)
}

/// Path and query of `GET /contacts/business/:businessId`.
fn business_path(location_id: &str, business_id: &str, skip: u64, limit: u32) -> String {
    path_and_query(
        &["contacts", "business", business_id],
        &[
            ("locationId", location_id),
            ("limit", &limit.to_string()),
            ("skip", &skip.to_string()),
        ],
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
        let base = transport::checked_base(&config.base_url).map_err(|e| match e {
            transport::BaseUrlError::Bad(why) => {
                ClientBuildError::BadUrl(config.base_url.clone(), why)
            }
            transport::BaseUrlError::Insecure => {
                ClientBuildError::InsecureUrl(config.base_url.clone())
            }
        })?;
        let concurrency = config.concurrency.max(1);
        let transport = Transport::new(TransportConfig {
            timeout: config.timeout,
            max_idle_per_host: concurrency,
            retry: config.retry,
            max_response_bytes: config.max_response_bytes,
        })
        .map_err(ClientBuildError::Http)?;
        Ok(Client {
            transport,
            base_url: base,
            auth: config.token,
            limiter,
            permits: Semaphore::new(concurrency),
            turns: Semaphore::new(concurrency),
            concurrency,
            global_permits: config.global_permits,
            stats: Arc::new(Stats::default()),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Most requests this client has in flight at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
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

    /// `POST /contacts/search`: one page of the location's contacts matching `body`
    /// (`locationId`, `pageLimit` up to 500, `searchAfter`, `sort`, `filters`).
    pub async fn search_contacts(&self, body: &serde_json::Value) -> Result<SearchPage, ApiError> {
        self.read_json(
            RequestKind::Search,
            Method::POST,
            path_and_query(&["contacts", "search"], &[]),
            Some(body),
            API_VERSION,
        )
        .await
    }

    /// The request [`Client::search_contacts`] sends, as errors name it (the body is not part
    /// of the label).
    pub fn search_contacts_label() -> RequestLabel {
        RequestLabel::new(&Method::POST, &path_and_query(&["contacts", "search"], &[]))
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

    /// `GET /contacts/:id`, the contact as received (every field kept, for the export's
    /// decoder).
    pub async fn contact_raw(&self, contact_id: &str) -> Result<Box<RawValue>, ApiError> {
        #[derive(Deserialize)]
        struct RawContactEnv {
            contact: Box<RawValue>,
        }
        let env: RawContactEnv = self
            .get_json(
                RequestKind::Contact,
                path_and_query(&["contacts", contact_id], &[]),
            )
            .await?;
        Ok(env.contact)
    }

    pub async fn get_contact(&self, contact_id: &str) -> Result<Contact, ApiError> {
        let env: ContactEnv = self
            .get_json(
                RequestKind::Contact,
                path_and_query(&["contacts", contact_id], &[]),
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
                path_and_query(&["locations", location_id], &[]),
            )
            .await?;
        Ok(env.location)
    }

    /// `GET /contacts/:id/tasks`, objects as received.
    pub async fn tasks_raw(&self, contact_id: &str) -> Result<Vec<Box<RawValue>>, ApiError> {
        let env: TasksEnv = self
            .get_json(
                RequestKind::Tasks,
                path_and_query(&["contacts", contact_id, "tasks"], &[]),
            )
            .await?;
        Ok(env.tasks)
    }

    /// `GET /contacts/:id/notes`, objects as received.
    pub async fn notes_raw(&self, contact_id: &str) -> Result<Vec<Box<RawValue>>, ApiError> {
        let env: NotesEnv = self
            .get_json(
                RequestKind::Notes,
                path_and_query(&["contacts", contact_id, "notes"], &[]),
            )
            .await?;
        Ok(env.notes)
    }

    /// `GET /contacts/:id/appointments` (the reply's `events`), objects as received.
    pub async fn appointments_raw(&self, contact_id: &str) -> Result<Vec<Box<RawValue>>, ApiError> {
        let env: EventsEnv = self
            .get_json(
                RequestKind::Appointments,
                path_and_query(&["contacts", contact_id, "appointments"], &[]),
            )
            .await?;
        Ok(env.events)
    }

    pub async fn get_task(&self, contact_id: &str, task_id: &str) -> Result<Task, ApiError> {
        let env: TaskEnv = self
            .get_json(
                RequestKind::Other,
                path_and_query(&["contacts", contact_id, "tasks", task_id], &[]),
            )
            .await?;
        Ok(env.task)
    }

    pub async fn get_note(&self, contact_id: &str, note_id: &str) -> Result<Note, ApiError> {
        let env: NoteEnv = self
            .get_json(
                RequestKind::Other,
                path_and_query(&["contacts", contact_id, "notes", note_id], &[]),
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
        let mut query = vec![("locationId", location_id)];
        query.extend(email.map(|e| ("email", e)));
        query.extend(phone.map(|p| ("number", p)));
        let pq = path_and_query(&["contacts", "search", "duplicate"], &query);
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
                path_and_query(&["contacts", contact_id], &[]),
                body,
                Idempotency::Idempotent,
            )
            .await?;
        Ok(env.contact)
    }

    pub async fn delete_contact(&self, contact_id: &str) -> Result<(), ApiError> {
        self.delete(path_and_query(&["contacts", contact_id], &[]))
            .await
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
                path_and_query(&["contacts", contact_id, "tags"], &[]),
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
                path_and_query(&["contacts", contact_id, "tasks"], &[]),
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
        let path = path_and_query(&["contacts", contact_id, "tasks", task_id], &[]);
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
        let path = path_and_query(
            &["contacts", contact_id, "tasks", task_id, "completed"],
            &[],
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
        self.delete(path_and_query(
            &["contacts", contact_id, "tasks", task_id],
            &[],
        ))
        .await
    }

    /// `DELETE /contacts/:id/notes/:noteId`.
    pub async fn delete_note(&self, contact_id: &str, note_id: &str) -> Result<(), ApiError> {
        self.delete(path_and_query(
            &["contacts", contact_id, "notes", note_id],
            &[],
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
                path_and_query(&["contacts", contact_id, "notes"], &[]),
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
        self.read_json(kind, Method::GET, path_and_query, None, API_VERSION)
            .await
    }

    /// A request that only reads (a `GET`, or a search sent as a `POST` with a JSON body):
    /// retried like any read, counted under `kind`, sent with `Version: version`. The
    /// location-wide listings (`POST /contacts/search`, task search, calendars) go through it.
    pub(crate) async fn read_json<T: DeserializeOwned>(
        &self,
        kind: RequestKind,
        method: Method,
        path_and_query: String,
        body: Option<&serde_json::Value>,
        version: &'static str,
    ) -> Result<T, ApiError> {
        // Serialising a Value cannot fail.
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).unwrap_or_default()));
        self.call(
            kind,
            method,
            path_and_query,
            body,
            Idempotency::Idempotent,
            None,
            version,
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
        self.call(
            RequestKind::Write,
            method,
            path,
            body,
            idem,
            before_send,
            API_VERSION,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn call<T: DeserializeOwned>(
        &self,
        kind: RequestKind,
        method: Method,
        path_and_query: String,
        body: Option<Bytes>,
        idem: Idempotency,
        before_send: Option<BeforeSend<'_>>,
        version: &'static str,
    ) -> Result<T, ApiError> {
        let label = RequestLabel::new(&method, &path_and_query);
        let url = transport::join(&self.base_url, &path_and_query);
        let watch = Watch {
            stats: Some(&self.stats),
            kind: Some(kind),
            limiter: Some(&self.limiter),
        };
        let mut refreshed = false;
        let result = loop {
            let auth = self.auth.current().await?;
            let out = Outgoing {
                method: &method,
                url: &url,
                label: &label,
                bearer: Some(&auth),
                version: Some(version),
                body: body.clone().map(Body::Json),
                grant_hint: None,
                close: kind.brings_pages(),
            };
            let result = self
                .transport
                .request(
                    &out,
                    idem,
                    watch,
                    || self.gate(kind, &label, before_send),
                    |err, delay| {
                        self.stats.retry();
                        tracing::debug!(error = %err, delay_ms = delay.as_millis() as u64, "retrying");
                    },
                )
                .await;
            // One refresh per call on a 401: an expired access token is renewed and the
            // request sent again; a second 401 is final.
            if let Err(e @ ApiError::Unauthorized { .. }) = &result {
                if !refreshed && !e.names_a_scope() && self.auth.refresh(&auth).await? {
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

    /// What each attempt waits for, and holds while on the wire: a concurrency permit, the
    /// location's pace, the permit shared across locations, then the caller's
    /// [`BeforeSend`].
    ///
    /// Listing pages go ahead of the other requests waiting for a permit. Each page is one
    /// link of a chain (the next page's request waits for its reply), while the per-contact
    /// requests are many and independent: queued behind a fan-out's window of them, every link
    /// waited about a window's worth of the pace, and a location-wide listing of 16 pages
    /// took 25 s beside the notes of the listing's last pages. Other requests first take a
    /// turn (as many turns as permits, held with the permit), so at most the permits' number
    /// of them ever wait for a permit, and a page waits behind no more than those.
    #[allow(clippy::type_complexity)] // the permits an attempt holds, each from its own gate
    async fn gate(
        &self,
        kind: RequestKind,
        label: &RequestLabel,
        before_send: Option<BeforeSend<'_>>,
    ) -> Result<
        (
            Option<SemaphorePermit<'_>>,
            SemaphorePermit<'_>,
            Option<SemaphorePermit<'_>>,
        ),
        ApiError,
    > {
        // The semaphores are never closed, so acquire cannot fail.
        let shut = |_| transport::transient(label, "client shut down".into(), None, false, None);
        let turn = match kind.brings_pages() {
            true => None,
            false => Some(self.turns.acquire().await.map_err(shut)?),
        };
        let permit = self.permits.acquire().await.map_err(shut)?;
        // The shared permit is taken after this location's pacing wait: a request waiting
        // for its turn here must not hold a slot another location could send with now.
        let (waited, global) = self
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
        Ok((turn, permit, global))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(Client::new(ClientConfig::new(
            "http://127.0.0.1:9",
            Token::new("t").unwrap()
        ))
        .is_ok());
        assert!(matches!(
            Client::new(ClientConfig::new(
                "http://10.0.0.1",
                Token::new("t").unwrap()
            )),
            Err(ClientBuildError::InsecureUrl(_))
        ));
        assert!(matches!(
            Client::new(ClientConfig::new("ftp://x", Token::new("t").unwrap())),
            Err(ClientBuildError::BadUrl(..))
        ));
    }

    #[tokio::test]
    async fn a_listing_page_takes_the_next_permit_ahead_of_waiting_per_contact_requests() {
        let client = Client::new(ClientConfig {
            rate_limit: None,
            concurrency: 2,
            ..ClientConfig::new("http://127.0.0.1:9", Token::new("t").unwrap())
        })
        .unwrap();
        let label = RequestLabel("GET /x".into());
        let gate = |kind| client.gate(kind, &label, None);
        // Two notes requests on the wire, two more waiting.
        let (first, second) = (
            gate(RequestKind::Notes).await,
            gate(RequestKind::Notes).await,
        );
        let mut waiting = std::pin::pin!(futures::future::join(
            gate(RequestKind::Notes),
            gate(RequestKind::Notes)
        ));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // A task search page comes after them, and a permit is freed.
        let mut page = std::pin::pin!(gate(RequestKind::LocationTasks));
        assert!(
            futures::poll!(page.as_mut()).is_pending(),
            "every permit is taken"
        );
        drop(first);
        let std::task::Poll::Ready(sent) = futures::poll!(page.as_mut()) else {
            panic!("the page waited behind the notes requests queued before it");
        };
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // Per-contact requests still go in their own order once pages leave permits free.
        drop((sent, second));
        assert!(futures::poll!(waiting.as_mut()).is_ready());
    }

    #[test]
    fn ids_and_cursors_are_encoded_in_paths_and_queries() {
        assert_eq!(
            list_path("L 1", 100, Some((5, "a&b"))),
            "/contacts/?locationId=L+1&limit=100&startAfter=5&startAfterId=a%26b"
        );
        assert_eq!(
            business_path("L1", "b/1", 200, 100),
            "/contacts/business/b%2F1?locationId=L1&limit=100&skip=200"
        );
    }

    #[test]
    fn a_dot_or_dot_dot_id_stays_in_its_path_segment_instead_of_changing_the_route() {
        assert_eq!(
            path_and_query(&["contacts", "..", "tasks"], &[]),
            "/contacts/%2E%2E/tasks"
        );
        assert_eq!(path_and_query(&["contacts", "."], &[]), "/contacts/%2E");
        assert_eq!(
            path_and_query(&["contacts", "a.b", ".."], &[("q", "..")]),
            "/contacts/a.b/%2E%2E?q=.."
        );
        // A segment that merely looks like a placeholder is encoded as itself.
        assert_eq!(
            path_and_query(&["contacts", "%01D1%01"], &[]),
            "/contacts/%2501D1%2501"
        );
    }
}
