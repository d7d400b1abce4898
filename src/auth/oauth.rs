//! The OAuth endpoints of the API, as `spec/apps/oauth.json` describes them:
//! `POST /oauth/token` (form-encoded, no `Version` header), `POST /oauth/locationToken` and
//! `GET /oauth/installedLocations` (both with `Version` and an agency bearer token).
//!
//! Failures map onto [`ApiError`] kinds the rest of the crate already acts on: a refused
//! grant (400 or 401 from `/oauth/token`) is `Unauthorized` (log in again), network errors,
//! 429 and 5xx are `Transient` (retried a few times here, then reported), anything else is
//! `Fatal`. No error carries a request body: it holds the client secret and the tokens.
//!
//! Replies are read through the API client's capped reader ([`crate::api::read_body`]), and
//! the `installedLocations` paging through the business listing's loop guard
//! ([`crate::extract::OffsetGuard`]); either refusal is `Refused`, never retried.

use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;

use super::store::{Secret, StoredToken, UserType};
use super::AuthError;
use crate::api::{ApiError, Idempotency, RequestLabel, RetryPolicy};

/// A Marketplace app's credentials. `Debug` hides the secret.
#[derive(Clone, Debug)]
pub struct OAuthApp {
    pub client_id: String,
    client_secret: Secret,
}

impl OAuthApp {
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> OAuthApp {
        OAuthApp {
            client_id: client_id.into().trim().to_string(),
            client_secret: Secret::new(client_secret.into().trim().to_string()),
        }
    }

    /// Credentials from the environment or a file, never from a pipeline file: the secret
    /// comes from `secret_file` when given, else from the environment variable `secret_var`.
    pub fn load(
        client_id: &str,
        secret_var: &str,
        secret_file: Option<&std::path::Path>,
    ) -> Result<OAuthApp, AuthError> {
        if client_id.trim().is_empty() {
            return Err(AuthError::Config("the OAuth client id is empty".into()));
        }
        let secret = match secret_file {
            Some(path) => {
                // A secret pasted as the path would be echoed below: refused unshown.
                if crate::auth::looks_like_secret(&path.to_string_lossy()) {
                    return Err(AuthError::Config("the client secret file path looks like a secret itself; it is not shown here. Put the secret in a file (mode 0600) and pass its path, and treat the secret as exposed if this command line or file was shared".into()));
                }
                super::store::warn_if_exposed(path, "client secret file");
                std::fs::read_to_string(path).map_err(|e| {
                    AuthError::Config(format!(
                        "cannot read the client secret file {}: {e}",
                        path.display()
                    ))
                })?
            }
            None => std::env::var(secret_var).map_err(|_| {
                AuthError::Config(format!(
                    "no OAuth client secret: set the environment variable {secret_var} or pass --client-secret-file FILE"
                ))
            })?,
        };
        if secret.trim().is_empty() {
            return Err(AuthError::Config("the OAuth client secret is empty".into()));
        }
        Ok(OAuthApp::new(client_id, secret))
    }

    /// The app id, which `installedLocations` asks for: the part of the client id before
    /// its first `-` (client ids look like `<appId>-<suffix>`).
    pub fn app_id(&self) -> &str {
        self.client_id.split('-').next().unwrap_or(&self.client_id)
    }
}

/// Seconds since the epoch, from a clock tests can move.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }
}

/// The system clock plus an offset that tests advance.
#[derive(Debug, Default)]
pub struct ManualClock {
    offset: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX / 4);
        self.offset
            .fetch_add(secs, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        SystemClock.now() + self.offset.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A successful reply of `/oauth/token` or `/oauth/locationToken`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenReply {
    #[serde(rename = "access_token")]
    pub access_token: Secret,
    #[serde(rename = "refresh_token", default)]
    pub refresh_token: Option<Secret>,
    #[serde(rename = "expires_in", default)]
    pub expires_in: Option<f64>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub user_type: Option<String>,
    #[serde(default)]
    pub location_id: Option<String>,
    #[serde(default)]
    pub company_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    /// Agency tokens: the locations the installer approved.
    #[serde(default)]
    pub approved_locations: Option<Vec<String>>,
}

/// Assumed lifetime when a reply leaves `expires_in` out (the API's documented value).
const DEFAULT_EXPIRES_IN: i64 = 86_399;

impl TokenReply {
    /// The entry to store, issued at `now`. Ids the reply leaves out come from `fallback`.
    pub fn into_stored(
        self,
        now: i64,
        requested: UserType,
        fallback: Option<&StoredToken>,
    ) -> StoredToken {
        let user_type = match self.user_type.as_deref() {
            Some("Company") => UserType::Company,
            Some("Location") => UserType::Location,
            _ => fallback.map_or(requested, |f| f.user_type),
        };
        let expires_in = self
            .expires_in
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(DEFAULT_EXPIRES_IN, |s| {
                s.min(10.0 * 365.0 * 86_400.0) as i64
            });
        StoredToken {
            user_type,
            company_id: self
                .company_id
                .or_else(|| fallback.and_then(|f| f.company_id.clone())),
            location_id: self
                .location_id
                .or_else(|| fallback.and_then(|f| f.location_id.clone())),
            access_token: self.access_token,
            refresh_token: self.refresh_token,
            expires_at: now.saturating_add(expires_in),
            scope: self
                .scope
                .or_else(|| fallback.and_then(|f| f.scope.clone())),
            user_id: self
                .user_id
                .or_else(|| fallback.and_then(|f| f.user_id.clone())),
            updated_at: now,
        }
    }
}

/// One installed location of an agency (`GET /oauth/installedLocations`).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct InstalledLocation {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default, rename = "isInstalled")]
    pub is_installed: Option<bool>,
}

#[derive(Deserialize)]
struct InstalledPage {
    #[serde(default)]
    locations: Vec<InstalledLocation>,
    #[serde(default)]
    count: Option<f64>,
}

/// The grant of a `/oauth/token` call.
pub(crate) enum Grant<'a> {
    AuthorizationCode {
        code: &'a str,
        redirect_uri: &'a str,
    },
    RefreshToken(&'a Secret),
}

/// The HTTP side of the OAuth endpoints.
#[derive(Debug)]
pub(crate) struct Endpoints {
    http: reqwest::Client,
    base: String,
    retry: RetryPolicy,
    /// The cap on one reply body (the API client's default: OAuth replies are small).
    max_response_bytes: u64,
}

impl Endpoints {
    pub(crate) fn new(base_url: &str, timeout: Duration) -> Result<Endpoints, AuthError> {
        // Err means a TLS provider is installed already, which is all that is needed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = checked_base(base_url)?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(15))
            .user_agent(concat!("contacts-etl/", env!("CARGO_PKG_VERSION")))
            // A redirect would resend the form (client secret included) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AuthError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Endpoints {
            http,
            base,
            retry: RetryPolicy {
                max_attempts: 4,
                max_rate_limited_attempts: 6,
                base_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(10),
                ..RetryPolicy::default()
            },
            max_response_bytes: crate::api::DEFAULT_MAX_RESPONSE_BYTES,
        })
    }

    /// `POST /oauth/token`.
    ///
    /// Retried on transient failures even though a lost reply may have spent the refresh
    /// token: without a retry the run fails anyway, and a spent token then answers 400,
    /// which says to log in again.
    pub(crate) async fn token(
        &self,
        app: &OAuthApp,
        grant: Grant<'_>,
        user_type: UserType,
    ) -> Result<TokenReply, ApiError> {
        let mut form = Form::default();
        form.add("client_id", &app.client_id);
        form.add("client_secret", app.client_secret.expose());
        let (label, hint) = match grant {
            Grant::AuthorizationCode { code, redirect_uri } => {
                form.add("grant_type", "authorization_code");
                form.add("code", code);
                form.add("redirect_uri", redirect_uri);
                (
                    "POST /oauth/token (authorization_code grant)",
                    "check the client id and secret, and that the redirect URI is registered with the app; then log in again",
                )
            }
            Grant::RefreshToken(token) => {
                form.add("grant_type", "refresh_token");
                form.add("refresh_token", token.expose());
                (
                    "POST /oauth/token (refresh_token grant)",
                    "the refresh token was refused: run `contacts-etl auth login` again",
                )
            }
        };
        form.add("user_type", user_type.as_str());
        let label = RequestLabel(label.into());
        let body = form.finish();
        self.retry
            .run(
                Idempotency::Idempotent,
                || self.send(&label, reqwest::Method::POST, "/oauth/token", Some(body.clone()), None, Some(hint)),
                |e, delay| tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "retrying the OAuth token request"),
            )
            .await
    }

    /// `POST /oauth/locationToken`: a location token from an agency token.
    pub(crate) async fn location_token(
        &self,
        agency: &HeaderValue,
        company_id: &str,
        location_id: &str,
    ) -> Result<TokenReply, ApiError> {
        let mut form = Form::default();
        form.add("companyId", company_id);
        form.add("locationId", location_id);
        let body = form.finish();
        let label = RequestLabel(format!(
            "POST /oauth/locationToken (location {location_id})"
        ));
        self.retry
            .run(
                Idempotency::Idempotent,
                || self.send(&label, reqwest::Method::POST, "/oauth/locationToken", Some(body.clone()), Some(agency), None),
                |e, delay| tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "retrying the location token request"),
            )
            .await
    }

    /// `GET /oauth/installedLocations`, every page.
    pub(crate) async fn installed_locations(
        &self,
        agency: &HeaderValue,
        company_id: &str,
        app_id: &str,
    ) -> Result<Vec<InstalledLocation>, ApiError> {
        const PAGE: usize = 100;
        let mut all: Vec<InstalledLocation> = Vec::new();
        let mut skip = 0;
        // The same guard as the business listing: a server serving one page forever, or
        // pages of locations already read, stops the listing with an error.
        let mut guard = crate::extract::OffsetGuard::new("location", "locations");
        loop {
            let path = format!(
                "/oauth/installedLocations?companyId={}&appId={}&isInstalled=true&skip={skip}&limit={PAGE}",
                encode(company_id),
                encode(app_id),
            );
            let label = RequestLabel(format!("GET {path}"));
            let page: InstalledPage = self
                .retry
                .run(
                    Idempotency::Idempotent,
                    || self.send(&label, reqwest::Method::GET, &path, None, Some(agency), None),
                    |e, delay| tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "retrying"),
                )
                .await?;
            let n = page.locations.len();
            let count = page.count.map(|c| c.max(0.0) as u64);
            let ids: Vec<Option<String>> =
                page.locations.iter().map(|l| Some(l.id.clone())).collect();
            let fresh = guard.page(&ids, count).map_err(|reason| ApiError::Refused {
                request: label.clone(),
                status: Some(200),
                reason: format!("the listing is not advancing: {reason}; stopping rather than looping"),
                hint: "retry later; if it persists, report it to HighLevel support (with the request above)".into(),
            })?;
            // A location served twice (the listing shifted under the offsets) is kept once.
            let mut fresh = fresh.into_iter();
            all.extend(
                page.locations
                    .into_iter()
                    .filter(|_| fresh.next().unwrap_or(true)),
            );
            skip += n;
            if n < PAGE || count.is_some_and(|c| skip as u64 >= c) {
                return Ok(all);
            }
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        label: &RequestLabel,
        method: reqwest::Method,
        path: &str,
        form: Option<String>,
        bearer: Option<&HeaderValue>,
        refused_hint: Option<&str>,
    ) -> Result<T, ApiError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(ACCEPT, "application/json");
        if let Some(b) = bearer {
            req = req
                .header(AUTHORIZATION, b.clone())
                .header("Version", crate::api::API_VERSION);
        }
        if let Some(f) = form {
            req = req
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(f);
        }
        let transient = |reason: String, status: Option<u16>| ApiError::Transient {
            request: label.clone(),
            reason,
            retry_after: None,
            maybe_applied: true,
            status,
            trace_id: None,
        };
        let resp = req
            .send()
            .await
            // Without the URL: reqwest's Display of a request error names it, and the
            // query of installedLocations is harmless, but keep errors uniform.
            .map_err(|e| transient(format!("request failed: {}", e.without_url()), None))?;
        let status = resp.status().as_u16();
        let mut resp = resp;
        // The API client's reader and cap: an endless or huge reply is refused, not buffered.
        let bytes =
            crate::api::read_body(&mut resp, label, status, self.max_response_bytes, None).await?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| {
                transient(
                    format!("HTTP {status} with a malformed body ({e})"),
                    Some(status),
                )
            });
        }
        let (message, trace_id) = error_message(&bytes, status);
        Err(match status {
            401 => ApiError::Unauthorized {
                request: label.clone(),
                message: with_hint(message, refused_hint),
                trace_id,
            },
            // The token endpoint answers 400 invalid_grant for a spent or revoked refresh
            // token or code: the remedy is the same as for a 401.
            400 if refused_hint.is_some() => ApiError::Unauthorized {
                request: label.clone(),
                message: with_hint(message, refused_hint),
                trace_id,
            },
            408 | 429 | 500..=599 => ApiError::Transient {
                request: label.clone(),
                reason: format!("HTTP {status} {message}"),
                retry_after: None,
                maybe_applied: status != 429,
                status: Some(status),
                trace_id,
            },
            _ => ApiError::Fatal {
                request: label.clone(),
                status,
                messages: vec![message],
                trace_id,
            },
        })
    }
}

fn with_hint(message: String, hint: Option<&str>) -> String {
    match hint {
        Some(h) => format!("{message} ({h})"),
        None => message,
    }
}

/// The message of an error reply (`message` as string or array, or OAuth's
/// `error_description`/`error`), and its trace id.
fn error_message(bytes: &[u8], status: u16) -> (String, Option<String>) {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    let text = |k: &str| v.get(k).and_then(|m| m.as_str()).map(str::to_string);
    let message = match v.get("message") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .filter_map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => None,
    }
    .or_else(|| text("error_description"))
    .or_else(|| text("error"))
    .unwrap_or_else(|| format!("HTTP {status}"));
    (message, text("traceId"))
}

/// Checks the base URL (https, or http to a loopback host) and drops a trailing slash.
pub(crate) fn checked_base(url: &str) -> Result<String, AuthError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| AuthError::Config(format!("invalid URL '{url}': {e}")))?;
    let loopback = crate::api::is_loopback(&parsed);
    match parsed.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(AuthError::Config(format!(
                "refusing to send OAuth credentials over plain http to '{url}': use https (plain http is allowed only to a loopback address)"
            )))
        }
        other => return Err(AuthError::Config(format!("invalid URL '{url}': unsupported scheme '{other}'"))),
    }
    if parsed.query().is_some() || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(AuthError::Config(format!(
            "invalid URL '{url}': it must not carry credentials or a query"
        )));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// An `application/x-www-form-urlencoded` body (reqwest's `form` feature is off).
#[derive(Default)]
pub(crate) struct Form(String);

impl Form {
    pub(crate) fn add(&mut self, key: &str, value: &str) {
        if !self.0.is_empty() {
            self.0.push('&');
        }
        self.0.push_str(&encode(key));
        self.0.push('=');
        self.0.push_str(&encode(value));
    }

    pub(crate) fn finish(self) -> String {
        self.0
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (valid in a query and in
/// a form body alike).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a query or form value (`+` is a space; a bad escape is kept as text).
pub(crate) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', ..) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (c, ..) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encodes_reserved_characters_and_round_trips() {
        let mut f = Form::default();
        f.add("redirect_uri", "http://127.0.0.1:8080/callback?x=1&y");
        f.add("scope", "contacts.readonly contacts.write");
        let body = f.finish();
        assert_eq!(
            body,
            "redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2Fcallback%3Fx%3D1%26y&scope=contacts.readonly%20contacts.write"
        );
        assert_eq!(decode("a+b%20c%2x%"), "a b c%2x%");
        assert_eq!(decode(&encode("é ü/&=")), "é ü/&=");
    }

    #[test]
    fn app_id_is_the_client_id_prefix() {
        let app = OAuthApp::new("65f0c0ffee-abc123", "s3cret");
        assert_eq!(app.app_id(), "65f0c0ffee");
        assert!(!format!("{app:?}").contains("s3cret"));
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        assert!(checked_base("http://127.0.0.1:9/").is_ok());
        assert!(checked_base("http://localhost:9").is_ok());
        assert!(checked_base("https://services.leadconnectorhq.com").is_ok());
        assert!(checked_base("http://services.leadconnectorhq.com").is_err());
    }

    #[test]
    fn error_messages_come_from_message_or_oauth_fields() {
        let (m, t) = error_message(
            br#"{"statusCode":400,"message":"Invalid grant","traceId":"t1"}"#,
            400,
        );
        assert_eq!((m.as_str(), t.as_deref()), ("Invalid grant", Some("t1")));
        let (m, _) = error_message(
            br#"{"error":"invalid_grant","error_description":"spent"}"#,
            400,
        );
        assert_eq!(m, "spent");
        let (m, _) = error_message(b"<html>", 502);
        assert_eq!(m, "HTTP 502");
    }

    #[test]
    fn token_reply_debug_hides_tokens() {
        let r: TokenReply = serde_json::from_str(
            r#"{"access_token":"AAA-secret","refresh_token":"RRR-secret","expires_in":86399,"userType":"Location","locationId":"L1","companyId":"C1"}"#,
        )
        .unwrap();
        assert!(!format!("{r:?}").contains("secret"));
        let s = r.into_stored(1000, UserType::Location, None);
        assert_eq!(s.expires_at, 1000 + 86_399);
        assert_eq!(s.location_id.as_deref(), Some("L1"));
    }
}
