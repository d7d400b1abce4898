//! The request pipeline: route, count, authenticate, rate-limit, check the version header,
//! inject faults, dispatch to a handler, then write headers and body.
//!
//! Routing is a match on path segments rather than an axum `Router` per path, so that every
//! request, including unknown paths and rejected ones, passes through the same pipeline and
//! carries the same headers.
//!
//! Writes with a write latency configured are applied in a spawned task after the drawn
//! delay, and the handler awaits the task's reply: hyper drops a handler whose client went
//! away, but the spawned task runs on, so a write the server accepted always lands, as on
//! the real service. [`super::Sim::settle`] waits for such writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde_json::json;

use super::faults::{self, Fault};
use super::http::{ApiError, Kind, Params, Reply, Req, Route};
use super::limit::{RateHeaders, Verdict};
use super::{oauth, read, search, wide, write, Sim};

/// The only API version the simulator (and the real v2 API) accepts, but for calendars.
const API_VERSION: &str = "2021-07-28";
/// The version the calendars routes take (`apps/calendars.json`).
const CALENDARS_VERSION: &str = "2021-04-15";
/// Request bodies above this are refused.
const MAX_BODY: usize = 8 << 20;

impl Kind {
    fn is_oauth(self) -> bool {
        matches!(
            self,
            Kind::Authorize | Kind::OAuthToken | Kind::LocationToken | Kind::InstalledLocations
        )
    }

    fn is_write(self) -> bool {
        !matches!(
            self,
            Kind::List
                | Kind::Search
                | Kind::Duplicate
                | Kind::Business
                | Kind::Get
                | Kind::Tasks
                | Kind::GetTask
                | Kind::Notes
                | Kind::GetNote
                | Kind::Appointments
                | Kind::Location
                | Kind::CustomFields
                | Kind::LocationTasks
                | Kind::Calendars
                | Kind::CalendarEvents
                | Kind::Unknown
        )
    }
}

impl Kind {
    /// The scope a token needs for this route (as the API's spec names it); `None` for the
    /// OAuth routes and unknown paths.
    pub(crate) fn scope(self) -> Option<&'static str> {
        Some(match self {
            Kind::List
            | Kind::Search
            | Kind::Duplicate
            | Kind::Business
            | Kind::Get
            | Kind::Tasks
            | Kind::GetTask
            | Kind::Notes
            | Kind::GetNote
            | Kind::Appointments => "contacts.readonly",
            Kind::Create
            | Kind::Upsert
            | Kind::Update
            | Kind::Delete
            | Kind::CreateTask
            | Kind::UpdateTask
            | Kind::CompleteTask
            | Kind::DeleteTask
            | Kind::CreateNote
            | Kind::UpdateNote
            | Kind::DeleteNote
            | Kind::AddTags
            | Kind::RemoveTags => "contacts.write",
            Kind::Location => "locations.readonly",
            Kind::CustomFields => "locations/customFields.readonly",
            Kind::LocationTasks => "locations/tasks.readonly",
            Kind::Calendars => "calendars.readonly",
            Kind::CalendarEvents => "calendars/events.readonly",
            Kind::Authorize
            | Kind::OAuthToken
            | Kind::LocationToken
            | Kind::InstalledLocations
            | Kind::Unknown => return None,
        })
    }

    /// The `Version` header this route takes; any other is a 400.
    fn version(self) -> &'static str {
        match self {
            Kind::Calendars | Kind::CalendarEvents => CALENDARS_VERSION,
            _ => API_VERSION,
        }
    }
}

fn parse(method: &Method, path: &str) -> Route {
    #[derive(PartialEq)]
    enum M {
        Get,
        Post,
        Put,
        Delete,
        Other,
    }
    let m = match *method {
        Method::GET => M::Get,
        Method::POST => M::Post,
        Method::PUT => M::Put,
        Method::DELETE => M::Delete,
        _ => M::Other,
    };
    let mut segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segs.len() > 1 && segs.last() == Some(&"") {
        segs.pop();
    }
    let (kind, id, child) = match (m, segs.as_slice()) {
        (M::Get, ["contacts"]) => (Kind::List, "", ""),
        (M::Post, ["contacts"]) => (Kind::Create, "", ""),
        (M::Post, ["contacts", "upsert"]) => (Kind::Upsert, "", ""),
        (M::Get, ["contacts", "search", "duplicate"]) => (Kind::Duplicate, "", ""),
        (M::Post, ["contacts", "search"]) => (Kind::Search, "", ""),
        (M::Get, ["contacts", "business", b]) => (Kind::Business, *b, ""),
        (M::Get, ["contacts", id]) => (Kind::Get, *id, ""),
        (M::Put, ["contacts", id]) => (Kind::Update, *id, ""),
        (M::Delete, ["contacts", id]) => (Kind::Delete, *id, ""),
        (M::Get, ["contacts", id, "tasks"]) => (Kind::Tasks, *id, ""),
        (M::Post, ["contacts", id, "tasks"]) => (Kind::CreateTask, *id, ""),
        (M::Get, ["contacts", id, "tasks", t]) => (Kind::GetTask, *id, *t),
        (M::Put, ["contacts", id, "tasks", t]) => (Kind::UpdateTask, *id, *t),
        (M::Put, ["contacts", id, "tasks", t, "completed"]) => (Kind::CompleteTask, *id, *t),
        (M::Delete, ["contacts", id, "tasks", t]) => (Kind::DeleteTask, *id, *t),
        (M::Get, ["contacts", id, "notes"]) => (Kind::Notes, *id, ""),
        (M::Post, ["contacts", id, "notes"]) => (Kind::CreateNote, *id, ""),
        (M::Get, ["contacts", id, "notes", n]) => (Kind::GetNote, *id, *n),
        (M::Put, ["contacts", id, "notes", n]) => (Kind::UpdateNote, *id, *n),
        (M::Delete, ["contacts", id, "notes", n]) => (Kind::DeleteNote, *id, *n),
        (M::Get, ["contacts", id, "appointments"]) => (Kind::Appointments, *id, ""),
        (M::Post, ["contacts", id, "tags"]) => (Kind::AddTags, *id, ""),
        (M::Delete, ["contacts", id, "tags"]) => (Kind::RemoveTags, *id, ""),
        (M::Get, ["locations", id]) => (Kind::Location, *id, ""),
        (M::Get, ["locations", id, "customFields"]) => (Kind::CustomFields, *id, ""),
        (M::Post, ["locations", id, "tasks", "search"]) => (Kind::LocationTasks, *id, ""),
        (M::Get, ["calendars"]) => (Kind::Calendars, "", ""),
        (M::Get, ["calendars", "events"]) => (Kind::CalendarEvents, "", ""),
        (M::Get, ["oauth", "chooselocation"]) => (Kind::Authorize, "", ""),
        (M::Post, ["oauth", "token"]) => (Kind::OAuthToken, "", ""),
        (M::Post, ["oauth", "locationToken"]) => (Kind::LocationToken, "", ""),
        (M::Get, ["oauth", "installedLocations"]) => (Kind::InstalledLocations, "", ""),
        _ => (Kind::Unknown, "", ""),
    };
    Route {
        kind,
        id: id.to_string(),
        child: child.to_string(),
    }
}

/// The one axum handler: every request comes through here.
pub(crate) async fn handle(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if let Some(admin) = path.strip_prefix("/_sim/") {
        return admin_route(&sim, &parts.method, admin);
    }
    let route = parse(&parts.method, path);
    let c = &sim.counters;
    bump(&c.requests);
    if let Some(n) = Kind::ALL
        .iter()
        .position(|&k| k == route.kind)
        .and_then(|i| c.by_route.get(i))
    {
        bump(n);
    }

    if route.kind.is_oauth() {
        let body = axum::body::to_bytes(body, MAX_BODY)
            .await
            .unwrap_or_default();
        let params: Params = Query::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .unwrap_or_default();
        return oauth::handle(&sim, route.kind, &parts.headers, &params, &body);
    }
    let Some(token) = bearer(&parts.headers) else {
        let reply = ApiError::Unauthorized.reply(sim.trace_id());
        return respond(reply.status, reply.body, &sim.limiter.untouched(), None);
    };
    let scope = route.kind.scope();
    let static_scopes = sim
        .config
        .scopes
        .as_deref()
        .filter(|_| !sim.config.oauth.required);
    if let (Some(needed), Some(held)) = (scope, static_scopes) {
        if !held.iter().any(|h| h == needed) {
            let reply = ApiError::Scope.reply(sim.trace_id());
            return respond(reply.status, reply.body, &sim.limiter.untouched(), None);
        }
    }
    if sim.config.oauth.required {
        let params: Params = Query::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .unwrap_or_default();
        let location = match route.kind {
            Kind::Location | Kind::CustomFields | Kind::LocationTasks => Some(route.id.as_str()),
            _ => params.get("locationId").map(String::as_str),
        };
        let refused = match sim.oauth.check(token, location) {
            Ok(()) if scope.is_some_and(|s| !sim.oauth.has_scope(token, s)) => {
                Some(ApiError::Scope)
            }
            Ok(()) => None,
            Err(oauth::Refusal::Invalid) => Some(ApiError::Unauthorized),
            Err(oauth::Refusal::WrongLocation) => Some(ApiError::Forbidden),
        };
        if let Some(e) = refused {
            let reply = e.reply(sim.trace_id());
            return respond(reply.status, reply.body, &sim.limiter.untouched(), None);
        }
    }
    // Read before the limit is applied: a search or a create names its location in the body,
    // and the limit is per location. An unreadable body is answered below, where it was.
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    let params: Params = Query::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let location = limit_location(&sim, &route, &params, body.as_deref().unwrap_or_default());
    let (verdict, rate) = sim
        .limiter
        .admit(token, &location, tokio::time::Instant::now());
    match verdict {
        Verdict::Allowed => {}
        Verdict::Burst(wait) => {
            bump(&c.rate_limited);
            let body = json!({"statusCode": 429, "message": "Too many requests", "traceId": sim.trace_id()});
            let reply = Reply::new(StatusCode::TOO_MANY_REQUESTS, &body);
            return respond(reply.status, reply.body, &rate, Some(wait));
        }
        Verdict::Daily(wait) => {
            bump(&c.quota_exceeded);
            let body = json!({
                "statusCode": 429,
                "message": "Daily request limit exceeded for this location. Try again tomorrow.",
                "traceId": sim.trace_id(),
            });
            let reply = Reply::new(StatusCode::TOO_MANY_REQUESTS, &body);
            return respond(reply.status, reply.body, &rate, Some(wait));
        }
    }
    let version = parts.headers.get("version").and_then(|v| v.to_str().ok());
    if version.map(str::trim) != Some(route.kind.version()) {
        let body = json!({"statusCode": 400, "message": "Version header is missing or invalid", "traceId": sim.trace_id()});
        let reply = Reply::new(StatusCode::BAD_REQUEST, &body);
        return respond(reply.status, reply.body, &rate, None);
    }

    let plan = sim.faults.plan();
    if let Some(delay) = plan.slow {
        bump(&c.faults);
        tokio::time::sleep(delay).await;
    }
    if let Some(Fault::Error(status)) = plan.fault {
        bump(&c.faults);
        let body = json!({
            "statusCode": status.as_u16(),
            "message": status.canonical_reason().unwrap_or("Server error"),
            "traceId": sim.trace_id(),
        });
        return respond(status, Reply::new(status, &body).body, &rate, None);
    }

    let body = match body {
        Ok(b) => b,
        Err(_) => {
            let reply = ApiError::BadRequest("request body is unreadable or too large".into())
                .reply(sim.trace_id());
            return respond(reply.status, reply.body, &rate, None);
        }
    };
    if sim.config.oauth.required && route.kind == Kind::Search {
        // The search names its location in the body: a location token may search only its own.
        let asked = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("locationId")?.as_str().map(String::from));
        if let Some(asked) = asked.filter(|a| !a.is_empty()) {
            if let Err(oauth::Refusal::WrongLocation) = sim.oauth.check(token, Some(&asked)) {
                let reply = ApiError::Forbidden.reply(sim.trace_id());
                return respond(reply.status, reply.body, &rate, None);
            }
        }
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let is_write = route.kind.is_write();
    let mut reply = if is_write && !sim.config.write_latency.end().is_zero() {
        let host = host.to_string();
        apply_later(&sim, route, params, body, host).await
    } else {
        answer(&Req {
            sim: &sim,
            route: &route,
            params: &params,
            body: &body,
            host,
        })
    };
    if is_write && reply.status.is_success() && plan.ambiguous {
        // The write happened; the client is told it failed.
        bump(&c.faults);
        let body = json!({"statusCode": 502, "message": "Bad Gateway", "traceId": sim.trace_id()});
        reply = Reply::new(StatusCode::BAD_GATEWAY, &body);
    }
    if reply.status.is_success() {
        match plan.fault {
            Some(Fault::Truncate(at)) => {
                bump(&c.faults);
                return respond(reply.status, faults::truncate(reply.body, at), &rate, None);
            }
            Some(Fault::Drop(at)) => {
                bump(&c.faults);
                let len = reply.body.len();
                let mut resp = headers(reply.status, len, &rate, None);
                *resp.body_mut() = faults::dropping(reply.body, at);
                return resp;
            }
            _ => {}
        }
    }
    respond(reply.status, reply.body, &rate, None)
}

/// Serves a request now: the handler's reply, or its error as the API shapes it. A listing
/// page served counts towards churn ([`super::SimConfig::churn`]), applied after the page
/// was built.
fn answer(req: &Req<'_>) -> Reply {
    match dispatch(req) {
        Ok(r) => {
            if req.sim.config.churn.is_some() {
                if let Some(location) = page_location(req) {
                    req.sim.page_served(&location);
                }
            }
            r
        }
        Err(e) => e.reply(req.sim.trace_id()),
    }
}

/// The location of a listing page request (`None` for other routes).
fn page_location(req: &Req<'_>) -> Option<String> {
    match req.route.kind {
        Kind::List | Kind::CalendarEvents => req.param("locationId").map(String::from),
        Kind::LocationTasks => Some(req.route.id.clone()),
        Kind::Search => serde_json::from_slice::<serde_json::Value>(req.body)
            .ok()?
            .get("locationId")?
            .as_str()
            .map(String::from),
        _ => None,
    }
}

/// The location a request counts against for the rate limit and the daily quota: the
/// `locationId` of the query or, for a search, a create or an upsert, of the body; the path's
/// location for `/locations/:id/...`; the contact's own location for `/contacts/:id/...`.
/// Empty when none can be told (the request then counts under its token alone).
fn limit_location<'a>(
    sim: &'a Sim,
    route: &'a Route,
    params: &'a Params,
    body: &[u8],
) -> std::borrow::Cow<'a, str> {
    use std::borrow::Cow;
    match route.kind {
        Kind::Location | Kind::CustomFields | Kind::LocationTasks => Cow::Borrowed(&route.id),
        Kind::Search | Kind::Create | Kind::Upsert => {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("locationId")?.as_str().map(String::from))
                .map_or(Cow::Borrowed(""), Cow::Owned)
        }
        _ if !route.id.is_empty() && route.kind != Kind::Business => {
            match sim.store.locate(&route.id) {
                Some((lock, _)) => Cow::Owned(super::store::read(lock).id().to_owned()),
                None => Cow::Borrowed(""),
            }
        }
        _ => params
            .get("locationId")
            .map_or(Cow::Borrowed(""), |l| Cow::Borrowed(l.as_str())),
    }
}

/// Applies a write after the drawn write latency, in a task of its own so that the write
/// lands even if this handler is dropped (its client disconnected or timed out); the reply is
/// ready once the write is applied.
async fn apply_later(
    sim: &Arc<Sim>,
    route: Route,
    params: Params,
    body: axum::body::Bytes,
    host: String,
) -> Reply {
    let delay = sim.write_delay();
    let in_flight = super::InFlight::start(sim.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let sim = &in_flight.sim;
        let reply = answer(&Req {
            sim,
            route: &route,
            params: &params,
            body: &body,
            host: &host,
        });
        if tx.send(reply).is_err() {
            bump(&sim.counters.writes_abandoned);
        }
        // Dropping `in_flight` here marks the write done.
    });
    match rx.await {
        Ok(reply) => reply,
        // The task panicked before answering.
        Err(_) => {
            let body = json!({"statusCode": 500, "message": "Internal server error", "traceId": sim.trace_id()});
            Reply::new(StatusCode::INTERNAL_SERVER_ERROR, &body)
        }
    }
}

fn dispatch(req: &Req<'_>) -> Result<Reply, ApiError> {
    match req.route.kind {
        Kind::List => read::list(req),
        Kind::Search => search::search(req),
        Kind::Business => read::business(req),
        Kind::Get => read::contact(req),
        Kind::Tasks | Kind::GetTask | Kind::Notes | Kind::GetNote | Kind::Appointments => {
            read::children(req)
        }
        Kind::Duplicate => read::duplicate(req),
        Kind::Location => read::location_info(req),
        Kind::CustomFields => wide::custom_fields(req),
        Kind::LocationTasks => wide::tasks(req),
        Kind::Calendars => wide::calendars(req),
        Kind::CalendarEvents => wide::events(req),
        Kind::Create => write::create(req),
        Kind::Upsert => write::upsert(req),
        Kind::Update => write::update(req),
        Kind::Delete => write::delete(req),
        Kind::AddTags | Kind::RemoveTags => write::tags(req),
        Kind::CreateTask | Kind::UpdateTask | Kind::CompleteTask | Kind::DeleteTask => {
            write::task(req)
        }
        Kind::CreateNote | Kind::UpdateNote | Kind::DeleteNote => write::note(req),
        // OAuth routes are answered by `oauth::handle` before dispatch.
        Kind::Unknown
        | Kind::Authorize
        | Kind::OAuthToken
        | Kind::LocationToken
        | Kind::InstalledLocations => Err(ApiError::NoRoute(
            "Cannot handle this method and path".into(),
        )),
    }
}

fn admin_route(sim: &Sim, method: &Method, path: &str) -> Response {
    let no_limits = RateHeaders::default();
    match (method.as_str(), path) {
        ("GET", "stats") => {
            let reply = Reply::ok(&sim.stats());
            respond(reply.status, reply.body, &no_limits, None)
        }
        ("POST", "reset-daily") => {
            sim.reset_daily_quota();
            respond(StatusCode::OK, b"{\"ok\":true}".to_vec(), &no_limits, None)
        }
        // `POST /_sim/mutate/<percent>/<deleted>/<seed>`: edits that share of every location's
        // contacts and deletes that many (as `Sim::mutate`), for benchmarks of incremental runs
        // against a separate simulator process.
        ("POST", p) if p.starts_with("mutate/") => {
            let parts: Vec<&str> = p["mutate/".len()..].split('/').collect();
            let parsed = match parts.as_slice() {
                [share, deleted, seed] => share
                    .parse::<f64>()
                    .ok()
                    .zip(deleted.parse::<usize>().ok())
                    .zip(seed.parse::<u64>().ok()),
                _ => None,
            };
            let Some(((percent, deleted), seed)) = parsed else {
                return respond(
                    StatusCode::BAD_REQUEST,
                    b"{\"statusCode\":400,\"message\":\"use /_sim/mutate/<percent>/<deleted>/<seed>\"}".to_vec(),
                    &no_limits,
                    None,
                );
            };
            let (mut changed, mut gone) = (0, 0);
            for location in &sim.config.locations {
                let (c, d) = sim.mutate(location, percent / 100.0, deleted, seed);
                changed += c.len();
                gone += d.len();
            }
            let body = format!("{{\"changed\":{changed},\"deleted\":{gone}}}");
            respond(StatusCode::OK, body.into_bytes(), &no_limits, None)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            b"{\"statusCode\":404,\"message\":\"unknown admin route\"}".to_vec(),
            &no_limits,
            None,
        ),
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn respond(
    status: StatusCode,
    body: Vec<u8>,
    rate: &RateHeaders,
    retry: Option<Duration>,
) -> Response {
    let len = body.len();
    let mut resp = headers(status, len, rate, retry);
    *resp.body_mut() = Body::from(body);
    resp
}

/// A response with status and headers and an empty body; `len` is the announced length.
fn headers(
    status: StatusCode,
    len: usize,
    rate: &RateHeaders,
    retry: Option<Duration>,
) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let mut put = |name: &'static str, value: u64| {
        h.insert(HeaderName::from_static(name), HeaderValue::from(value));
    };
    if let Some((max, remaining, interval_ms)) = rate.burst {
        put("x-ratelimit-max", u64::from(max));
        put("x-ratelimit-remaining", u64::from(remaining));
        put(
            "x-ratelimit-interval-milliseconds",
            u64::try_from(interval_ms).unwrap_or(u64::MAX),
        );
    }
    if let Some((limit, remaining)) = rate.daily {
        put("x-ratelimit-limit-daily", limit);
        put("x-ratelimit-daily-remaining", remaining);
    }
    if let Some(wait) = retry {
        // Whole seconds, rounded up so that a client waiting this long is let in.
        let secs = wait.as_millis().div_ceil(1000).max(1);
        put("retry-after", u64::try_from(secs).unwrap_or(u64::MAX));
    }
    resp
}
