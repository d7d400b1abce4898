//! The OAuth endpoints of the API, as `spec/apps/oauth.json` describes them:
//! `POST /oauth/token` (form-encoded, no `Version` header), `POST /oauth/locationToken` and
//! `GET /oauth/installedLocations` (both with `Version` and an agency bearer token).
//!
//! Every call goes through the crate's one HTTP transport ([`crate::api::Transport`]): the
//! same retry policy as the Contacts calls (`Retry-After` honoured and capped, an overall
//! deadline per request), the same capped body reader, no redirects (one would resend the
//! form, client secret included, elsewhere), and the same error kinds: a refused grant (400
//! or 401 from `/oauth/token`) is `Unauthorized` (log in again), network errors, 429 and 5xx
//! are `Transient` (retried, then reported), anything else is `Fatal`. Messages come from
//! `message`, else OAuth's `error_description` or `error`. No error carries a request body or
//! a header: they hold the client secret and the tokens.
//!
//! The `installedLocations` paging goes through the business listing's loop guard
//! ([`crate::extract::OffsetGuard`]); a refusal is `Refused`, never retried.

use std::time::Duration;

use reqwest::header::HeaderValue;
use serde::Deserialize;

use super::store::{Secret, StoredToken, UserType};
use super::AuthError;
use crate::api::{
    ApiError, BaseUrlError, Body, Idempotency, Outgoing, RequestLabel, RetryPolicy, Transport,
    TransportConfig, Watch,
};

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

/// The retry policy of the OAuth calls unless the settings give another: fewer attempts
/// than a Contacts call (a token call that keeps failing is better reported soon), with the
/// same caps on one wait and on the whole request.
pub fn oauth_retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        max_rate_limited_attempts: 6,
        base_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(10),
        ..RetryPolicy::default()
    }
}

/// The HTTP side of the OAuth endpoints.
#[derive(Debug)]
pub(crate) struct Endpoints {
    transport: Transport,
    base: reqwest::Url,
}

impl Endpoints {
    pub(crate) fn new(
        base_url: &str,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> Result<Endpoints, AuthError> {
        let base = crate::api::checked_base(base_url).map_err(|e| match e {
            BaseUrlError::Insecure => AuthError::Config(format!(
                "refusing to send OAuth credentials over plain http to '{base_url}': use https (plain http is allowed only to a loopback address)"
            )),
            BaseUrlError::Bad(why) => AuthError::Config(format!("invalid URL '{base_url}': {why}")),
        })?;
        let transport = Transport::new(TransportConfig {
            timeout,
            max_idle_per_host: 2,
            retry,
            // OAuth replies are small: the API client's default cap is plenty.
            max_response_bytes: crate::api::DEFAULT_MAX_RESPONSE_BYTES,
        })
        .map_err(|e| AuthError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Endpoints { transport, base })
    }

    /// `POST /oauth/token`.
    ///
    /// Retried like any call (a 429 after its `Retry-After`, 5xx, timeouts), although a
    /// refresh token (and a code) is single-use and an attempt whose reply was lost may have
    /// spent it. A retry cannot spend a token the server rotated: it presents the same refresh
    /// token as the first attempt, and the rotated one was only in the lost reply. So the
    /// retry either is the attempt the server applies, or is refused with 400 `invalid_grant`
    /// (`Unauthorized`: log in again), after which the token source adopts a grant another
    /// process saved meanwhile, if any. What keeps a rotated token from being lost is in
    /// `source.rs` and unchanged: one renewal at a time per grant, and the new refresh token
    /// saved before the new access token is used.
    pub(crate) async fn token(
        &self,
        app: &OAuthApp,
        grant: Grant<'_>,
        user_type: UserType,
    ) -> Result<TokenReply, ApiError> {
        let mut pairs = vec![
            ("client_id", app.client_id.as_str()),
            ("client_secret", app.client_secret.expose()),
        ];
        let (label, hint) = match grant {
            Grant::AuthorizationCode { code, redirect_uri } => {
                pairs.extend([
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                ]);
                (
                    "POST /oauth/token (authorization_code grant)",
                    "check the client id and secret, and that the redirect URI is registered with the app; then log in again",
                )
            }
            Grant::RefreshToken(token) => {
                pairs.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.expose()),
                ]);
                (
                    "POST /oauth/token (refresh_token grant)",
                    "the refresh token was refused: run `contacts-etl auth login` again",
                )
            }
        };
        pairs.push(("user_type", user_type.as_str()));
        let label = RequestLabel(label.into());
        self.send(
            &label,
            reqwest::Method::POST,
            "/oauth/token",
            Some(crate::api::form(&pairs)),
            None,
            Some(hint),
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
        let body = crate::api::form(&[("companyId", company_id), ("locationId", location_id)]);
        let label = RequestLabel(format!(
            "POST /oauth/locationToken (location {location_id})"
        ));
        self.send(
            &label,
            reqwest::Method::POST,
            "/oauth/locationToken",
            Some(body),
            Some(agency),
            None,
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
            let path = crate::api::path_and_query(
                &["oauth", "installedLocations"],
                &[
                    ("companyId", company_id),
                    ("appId", app_id),
                    ("isInstalled", "true"),
                    ("skip", &skip.to_string()),
                    ("limit", &PAGE.to_string()),
                ],
            );
            let label = RequestLabel(format!("GET {path}"));
            let page: InstalledPage = self
                .send(
                    &label,
                    reqwest::Method::GET,
                    &path,
                    None,
                    Some(agency),
                    None,
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

    /// One OAuth request through the transport, with its retries. An agency call (`bearer`)
    /// carries the `Version` header; the token call does not.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        label: &RequestLabel,
        method: reqwest::Method,
        path_and_query: &str,
        form: Option<String>,
        bearer: Option<&HeaderValue>,
        grant_hint: Option<&str>,
    ) -> Result<T, ApiError> {
        let url = crate::api::join(&self.base, path_and_query);
        let out = Outgoing {
            method: &method,
            url: &url,
            label,
            bearer,
            version: bearer.is_some().then_some(crate::api::API_VERSION),
            body: form.map(Body::Form),
            grant_hint,
            close: false,
        };
        self.transport
            .request(
                &out,
                Idempotency::Idempotent,
                Watch::default(),
                || async { Ok(()) },
                |e, delay| {
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "retrying the OAuth request");
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_id_is_the_client_id_prefix() {
        let app = OAuthApp::new("65f0c0ffee-abc123", "s3cret");
        assert_eq!(app.app_id(), "65f0c0ffee");
        assert!(!format!("{app:?}").contains("s3cret"));
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        let new = |url: &str| Endpoints::new(url, Duration::from_secs(1), oauth_retry_policy());
        assert!(new("http://127.0.0.1:9/").is_ok());
        assert!(new("http://localhost:9").is_ok());
        assert!(new("https://services.leadconnectorhq.com").is_ok());
        let err = new("http://services.leadconnectorhq.com").unwrap_err();
        assert!(
            err.to_string()
                .contains("refusing to send OAuth credentials"),
            "{err}"
        );
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
