//! The one HTTP transport of the crate: where every request (the Contacts API's and the OAuth
//! endpoints' alike) is built, sent, read, classified and retried.
//!
//! [`Transport::request`] runs the single [`RetryPolicy`] around [`Transport::attempt`]; the
//! API client ([`super::Client`]) adds its permits, pacing and counters through the `gate`
//! each attempt waits for, and its token refresh around the whole request. The OAuth
//! endpoints (`crate::auth`) use it as it is. So both get the same behaviour:
//! - `Retry-After` honoured, each wait capped by [`RetryPolicy::max_wait`], no attempt after
//!   [`RetryPolicy::deadline`]; a create (or any call marked non-idempotent) is not resent
//!   after a failure that may have been applied.
//! - One classification of replies into [`ApiError`] kinds ([`classify`]); messages from
//!   `message` (string or array), else OAuth's `error_description` or `error`.
//! - What is refused, and why (each is [`ApiError::Refused`]: fatal, never retried):
//!   redirects (the API does not send them; following one would export another host's data
//!   as the location's, or resend an OAuth form, client secret included, elsewhere; a 3xx
//!   names its `Location`); a reply body over the cap, checked against `Content-Length`
//!   first, then while streaming ([`read_body`]); a request that cannot be built (a URL too
//!   long for HTTP): sending it again would fail the same way.
//! - No error carries a header or a request body (tokens, the client secret).
//!
//! URLs are built with `url`'s encoders ([`path_and_query`]): path segments with the path
//! segment set, query pairs and form bodies as `application/x-www-form-urlencoded`.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use serde::de::DeserializeOwned;

use super::error::{ApiError, RequestLabel};
use super::models::ErrorBody;
use super::retry::{Idempotency, RetryPolicy};
use super::stats::{RequestKind, Stats};
use crate::ratelimit::{RateHeaders, RateLimiter};

/// Settings of a [`Transport`].
#[derive(Clone, Debug)]
pub(crate) struct TransportConfig {
    /// Whole-attempt timeout (connect, send, read the body).
    pub timeout: Duration,
    /// Idle connections kept per host (the client's concurrency).
    pub max_idle_per_host: usize,
    pub retry: RetryPolicy,
    /// The largest reply body accepted; a larger one fails the request.
    pub max_response_bytes: u64,
}

/// One pooled HTTP client, the retry policy and the reply cap.
#[derive(Debug)]
pub(crate) struct Transport {
    http: reqwest::Client,
    retry: RetryPolicy,
    max_response_bytes: u64,
}

/// A request body.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    Json(Bytes),
    /// `application/x-www-form-urlencoded` (build it with [`form`]).
    Form(String),
}

/// What one request sends. Headers other than these are never set.
pub(crate) struct Outgoing<'a> {
    pub method: &'a Method,
    pub url: &'a reqwest::Url,
    pub label: &'a RequestLabel,
    /// The `Authorization` header (marked sensitive), if any.
    pub bearer: Option<&'a HeaderValue>,
    /// The API's `Version` header, if any (`/oauth/token` takes none; the calendars
    /// routes want their own).
    pub version: Option<&'static str>,
    pub body: Option<Body>,
    /// The grant endpoint's advice when it refuses the grant (400 or 401): set for
    /// `/oauth/token`, whose 400 `invalid_grant` means the same as a 401 (log in again).
    pub grant_hint: Option<&'a str>,
    /// Ask for the connection to close after the reply (`Connection: close`): set for
    /// listing pages. The HTTP client grows a connection's read buffer to fit the largest
    /// reply it carried and keeps it for the connection's life: a page of 500 contacts left
    /// up to 400 KB per pooled connection, for every running location (BENCHMARKS.md,
    /// "Agency scale"). A new connection per page is a few pages per thousand contacts.
    pub close: bool,
}

/// Who watches each attempt: the API client's counters and its location's rate limiter
/// (the OAuth endpoints have neither).
#[derive(Clone, Copy, Default)]
pub(crate) struct Watch<'a> {
    pub stats: Option<&'a Stats>,
    pub kind: Option<RequestKind>,
    pub limiter: Option<&'a RateLimiter>,
}

/// What the checks of a base URL refuse.
#[derive(Debug)]
pub(crate) enum BaseUrlError {
    /// Not a URL, another scheme, or carrying credentials or a query.
    Bad(String),
    /// Plain http to a host other than a loopback address.
    Insecure,
}

/// Checks a base URL: https, or plain http to a loopback host only (a token or the client
/// secret must not cross a network in clear); no credentials, no query. A trailing slash is
/// dropped.
pub(crate) fn checked_base(url: &str) -> Result<reqwest::Url, BaseUrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| BaseUrlError::Bad(e.to_string()))?;
    match parsed.scheme() {
        "https" => {}
        "http" if is_loopback(&parsed) => {}
        "http" => return Err(BaseUrlError::Insecure),
        other => return Err(BaseUrlError::Bad(format!("unsupported scheme '{other}'"))),
    }
    if parsed.query().is_some() || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(BaseUrlError::Bad(
            "the base URL must not carry credentials or a query".into(),
        ));
    }
    let trimmed = parsed.as_str().trim_end_matches('/').to_owned();
    reqwest::Url::parse(&trimmed).map_err(|e| BaseUrlError::Bad(e.to_string()))
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

/// A path and query, encoded by `url`: each of `segments` is one path segment (a `/`, `?`,
/// `#`, `%` or space in an id is escaped, never read as structure; a last segment `""`
/// gives a trailing slash), `query` pairs are form-encoded. The result starts with `/`.
///
/// An id of `.` or `..` (from a reply or an input file: ids from flags are checked first) is
/// sent as `%2E` / `%2E%2E`: `url` drops such segments, which would send the request to
/// another route (`DELETE /contacts/..` becoming `DELETE /contacts`); encoded, the server
/// sees an id it does not know and refuses the request.
pub(crate) fn path_and_query(segments: &[&str], query: &[(&str, &str)]) -> String {
    // Placeholders `url` encodes as `%01D1%01` and `%01D2%01`, replaced below: it has no
    // way to encode a dot itself.
    const DOT: &str = "\u{1}D1\u{1}";
    const DOTS: &str = "\u{1}D2\u{1}";
    let dotted = segments.iter().any(|s| matches!(*s, "." | ".."));
    let segments = segments.iter().map(|s| match *s {
        "." => DOT,
        ".." => DOTS,
        other => other,
    });
    // Any base does: only the path and query are kept.
    let mut url = reqwest::Url::parse("http://localhost/").expect("a valid URL");
    if let Ok(mut path) = url.path_segments_mut() {
        path.clear().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    let out = url[url::Position::BeforePath..].to_owned();
    if !dotted {
        return out;
    }
    // Only the path: a query keeps what it was given.
    let (path, rest) = out.split_at(out.find('?').unwrap_or(out.len()));
    let path = path
        .split('/')
        .map(|seg| match seg {
            "%01D1%01" => "%2E",
            "%01D2%01" => "%2E%2E",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/");
    format!("{path}{rest}")
}

/// `base` with `path_and_query` (from [`path_and_query`]) appended to its own path.
pub(crate) fn join(base: &reqwest::Url, path_and_query: &str) -> reqwest::Url {
    let (path, query) = path_and_query
        .split_once('?')
        .map_or((path_and_query, None), |(p, q)| (p, Some(q)));
    let mut url = base.clone();
    let prefix = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{prefix}{path}"));
    url.set_query(query);
    url
}

/// An `application/x-www-form-urlencoded` body of `pairs`.
pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Installs ring as the process's TLS crypto provider (reqwest is built without one).
fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS settings every client of the process shares: what reqwest would build for each
/// (the platform's root certificates through `rustls-platform-verifier`, TLS 1.2 and 1.3,
/// ALPN for HTTP/2 and HTTP/1.1), built once. Each client building its own parsed the system's
/// root store again, about 100 KB a client: 20 MB for a pipeline of 200 locations.
fn tls_config() -> Result<rustls::ClientConfig, String> {
    static SHARED: std::sync::OnceLock<Result<rustls::ClientConfig, String>> =
        std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
                .map_err(|e| format!("cannot load the system's root certificates: {e}"))?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(config)
        })
        .clone()
}

impl Transport {
    pub(crate) fn new(config: TransportConfig) -> Result<Transport, String> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config()?)
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(config.max_idle_per_host.max(1))
            .tcp_nodelay(true)
            // Never followed: see the module doc.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("contacts-etl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Transport {
            http,
            retry: config.retry,
            max_response_bytes: config.max_response_bytes.max(1),
        })
    }

    /// Sends `out` until it succeeds, fails for good, or the retry policy gives up (attempts
    /// or deadline). Each attempt first waits for `gate` and holds what it returns while on
    /// the wire (the API client's permits and pacing; an error from it stops the request
    /// unsent). `on_retry` hears of each retry before its wait.
    pub(crate) async fn request<T, G, F, Fut>(
        &self,
        out: &Outgoing<'_>,
        idempotency: Idempotency,
        watch: Watch<'_>,
        mut gate: F,
        on_retry: impl FnMut(&ApiError, Duration),
    ) -> Result<T, ApiError>
    where
        T: DeserializeOwned,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<G, ApiError>>,
    {
        self.retry
            .run(
                idempotency,
                || {
                    let held = gate();
                    async move {
                        let _held = held.await?;
                        self.attempt(out, watch).await
                    }
                },
                on_retry,
            )
            .await
    }

    /// One attempt: send, refuse a redirect, read the reply under the cap, classify.
    async fn attempt<T: DeserializeOwned>(
        &self,
        out: &Outgoing<'_>,
        watch: Watch<'_>,
    ) -> Result<T, ApiError> {
        let label = out.label;
        if let Some(s) = watch.stats {
            s.attempt();
        }
        let mut req = self
            .http
            .request(out.method.clone(), out.url.clone())
            .header(ACCEPT, "application/json");
        if let Some(b) = out.bearer {
            req = req.header(AUTHORIZATION, b.clone());
        }
        if let Some(v) = out.version {
            req = req.header("Version", v);
        }
        if out.close {
            req = req.header(CONNECTION, "close");
        }
        match &out.body {
            Some(Body::Json(b)) => {
                req = req.header(CONTENT_TYPE, "application/json").body(b.clone())
            }
            Some(Body::Form(f)) => {
                req = req
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(f.clone());
            }
            None => {}
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_builder() => return Err(unbuildable(label, out.url, &e)),
            Err(e) => {
                if let Some(tls) = untrusted_server(&e) {
                    return Err(untrusted(label, out.url, tls));
                }
                if let Some(s) = watch.stats {
                    s.network_error();
                }
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
        if let Some(limiter) = watch.limiter {
            // The location-wide pause a 429 sets is held to the same cap as one retry wait.
            limiter.observe(
                status,
                &rate,
                retry_after.map(|d| d.min(self.retry.max_wait)),
            );
        }
        if (300..400).contains(&status) {
            return Err(redirected(label, status, resp.headers()));
        }
        let bytes = match read_body(
            &mut resp,
            label,
            status,
            self.max_response_bytes,
            watch.stats,
        )
        .await
        {
            Ok(b) => b,
            // A POST answered 2xx took effect, whatever its reply: one too large to read is
            // ambiguous, so a create is looked up, never taken as refused and made again.
            Err(e) if *out.method == Method::POST && (200..300).contains(&status) => {
                return Err(transient(label, e.to_string(), None, true, Some(status)))
            }
            Err(e) => return Err(e),
        };
        if (200..300).contains(&status) {
            return match serde_json::from_slice::<T>(&bytes) {
                Ok(v) => {
                    if let (Some(s), Some(kind)) = (watch.stats, watch.kind) {
                        s.ok(kind, bytes.len());
                    }
                    Ok(v)
                }
                Err(e) => {
                    if let Some(s) = watch.stats {
                        s.malformed();
                    }
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
        Err(classify(
            label,
            status,
            &bytes,
            &rate,
            retry_after,
            out.grant_hint,
            watch.stats,
        ))
    }
}

/// The error a non-2xx, non-3xx reply stands for.
fn classify(
    label: &RequestLabel,
    status: u16,
    bytes: &[u8],
    rate: &RateHeaders,
    retry_after: Option<Duration>,
    grant_hint: Option<&str>,
    stats: Option<&Stats>,
) -> ApiError {
    let err_body: ErrorBody = serde_json::from_slice(bytes).unwrap_or_default();
    let trace_id = err_body.trace_id.clone();
    let messages = err_body.messages();
    let first = messages
        .first()
        .cloned()
        .unwrap_or_else(|| format!("HTTP {status}"));
    let with_hint = |m: String| match grant_hint {
        Some(h) => format!("{m} ({h})"),
        None => m,
    };
    match status {
        401 => ApiError::Unauthorized {
            request: label.clone(),
            message: with_hint(first),
            trace_id,
        },
        // The token endpoint answers 400 invalid_grant for a spent or revoked refresh
        // token or code: the remedy is the same as for a 401.
        400 if grant_hint.is_some() => ApiError::Unauthorized {
            request: label.clone(),
            message: with_hint(first),
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
            if let Some(s) = stats {
                s.rate_limited();
            }
            ApiError::QuotaExhausted {
                request: label.clone(),
                trace_id,
            }
        }
        429 => {
            if let Some(s) = stats {
                s.rate_limited();
            }
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
            if let Some(s) = stats {
                s.server_error();
            }
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
            messages: if messages.is_empty() {
                vec![first]
            } else {
                messages
            },
            trace_id,
        },
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
/// anything, else as soon as the bytes received pass the cap. A failed read counts as a
/// network error in `stats`, when given.
async fn read_body(
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

/// The TLS failure in `e` that no retry can mend: the server's certificate refused (an
/// unknown issuer, another host's name, expired), or no protocol both sides speak. A network
/// that drops the handshake is an I/O error instead, and stays transient.
fn untrusted_server(e: &reqwest::Error) -> Option<&rustls::Error> {
    // hyper-rustls hands rustls's error on inside `io::Error`s (two deep), whose `source`
    // skips the error they carry.
    fn carried<'a>(mut err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        loop {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return Some(tls);
            }
            err = err.downcast_ref::<std::io::Error>()?.get_ref()?;
        }
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(
            tls @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::PeerIncompatible(_)
            | rustls::Error::UnsupportedNameType),
        ) = carried(s)
        {
            return Some(tls);
        }
        src = s.source();
    }
    None
}

/// A request refused for the server's TLS certificate (see [`untrusted_server`]).
fn untrusted(label: &RequestLabel, url: &reqwest::Url, why: &rustls::Error) -> ApiError {
    ApiError::Refused {
        request: label.clone(),
        status: None,
        reason: format!(
            "the TLS certificate of {} was refused: {why}",
            url.host_str().unwrap_or("the server")
        ),
        hint: "check that --base-url (or HL_BASE_URL) names the API (https://services.leadconnectorhq.com); behind a proxy that inspects TLS, add its CA certificate to this machine's trusted certificates. Running again will not help".into(),
    }
}

pub(crate) fn transient(
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
    fn plain_http_only_to_loopback() {
        assert!(checked_base("https://services.leadconnectorhq.com").is_ok());
        assert!(checked_base("http://127.0.0.1:8080/").is_ok());
        assert!(checked_base("http://localhost:1").is_ok());
        assert!(checked_base("http://[::1]:1").is_ok());
        assert!(matches!(
            checked_base("http://services.leadconnectorhq.com"),
            Err(BaseUrlError::Insecure)
        ));
        assert!(matches!(
            checked_base("http://10.0.0.1"),
            Err(BaseUrlError::Insecure)
        ));
        assert!(checked_base("ftp://x").is_err());
        assert!(checked_base("not a url").is_err());
        assert!(checked_base("https://u:p@host").is_err());
        assert_eq!(
            checked_base("http://127.0.0.1:9/api/").unwrap().as_str(),
            "http://127.0.0.1:9/api"
        );
    }

    #[test]
    fn reserved_characters_in_ids_and_values_round_trip() {
        let odd = "a/b c?&=#%+é~";
        let pq = path_and_query(&["contacts", odd, "tasks"], &[("q", odd), ("n", "1")]);
        assert!(pq.starts_with("/contacts/"), "{pq}");
        assert_eq!(pq.matches('/').count(), 3, "the id stays one segment: {pq}");
        assert_eq!(pq.matches('?').count(), 1, "{pq}");
        let url = join(&checked_base("http://127.0.0.1:9/api").unwrap(), &pq);
        assert_eq!(
            url.path(),
            "/api/contacts/a%2Fb%20c%3F&=%23%25+%C3%A9~/tasks",
            "only what would change the path's structure is escaped"
        );
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [("q".to_string(), odd.to_string()), ("n".into(), "1".into())]
        );
        assert_eq!(path_and_query(&["contacts", ""], &[]), "/contacts/");
        let body = form(&[
            ("redirect_uri", "http://127.0.0.1:8080/cb?x=1&y"),
            ("s", "a b"),
        ]);
        assert_eq!(
            body,
            "redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2Fcb%3Fx%3D1%26y&s=a+b"
        );
        let back: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(back[0].1, "http://127.0.0.1:8080/cb?x=1&y");
        assert_eq!(back[1].1, "a b");
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

    #[test]
    fn oauth_error_fields_give_the_message() {
        let label = RequestLabel("POST /oauth/token".into());
        let none = RateHeaders::default();
        let e = classify(
            &label,
            400,
            br#"{"error":"invalid_grant","error_description":"spent","traceId":"t1"}"#,
            &none,
            None,
            Some("log in again"),
            None,
        );
        assert_eq!(e.kind(), super::super::ErrorKind::Reauth);
        let msg = e.to_string();
        assert!(msg.contains("spent (log in again)"), "{msg}");
        assert!(msg.contains("traceId t1"), "{msg}");
        let e = classify(&label, 502, b"<html>", &none, None, None, None);
        assert_eq!(e.kind(), super::super::ErrorKind::Retry);
        assert!(e.maybe_applied());
    }
}
