//! The OAuth 2.0 side of the API: the consent redirect, `POST /oauth/token` (authorization
//! code and refresh token grants), `POST /oauth/locationToken` and
//! `GET /oauth/installedLocations`, as `spec/apps/oauth.json` describes them.
//!
//! Like the real server, every refresh rotates the refresh token: the old one is refused
//! from then on (400 `invalid_grant`), so a client that loses the newest one must log in
//! again. Access tokens expire after [`SimOAuth::expires_in`] seconds of the simulator's
//! OAuth clock, which tests move forward with [`super::Sim::oauth_advance`]. With
//! [`SimOAuth::required`] on, the contacts routes accept only unexpired location access
//! tokens issued here; off (the default), any bearer token is accepted as before.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::http::{Kind, Params};
use super::{rng, Sim};

/// OAuth settings of the simulator.
#[derive(Clone, Debug)]
pub struct SimOAuth {
    /// When on, contacts routes accept only unexpired location access tokens issued by the
    /// simulator (401 otherwise; 403 for a token of another location or an agency token).
    pub required: bool,
    /// The Marketplace app's client id (`<appId>-<suffix>`, as the real ones).
    pub client_id: String,
    pub client_secret: String,
    /// Lifetime of issued access tokens, in seconds.
    pub expires_in: u64,
    /// The agency (company) that owns every served location.
    pub company_id: String,
}

impl Default for SimOAuth {
    fn default() -> SimOAuth {
        SimOAuth {
            required: false,
            client_id: "65f0c0ffee0000000000cafe-simclient".into(),
            client_secret: "sim-client-secret".into(),
            expires_in: 86_399,
            company_id: "simCompany0000000001".into(),
        }
    }
}

/// What an issued access token may do.
#[derive(Clone, Debug)]
pub(crate) struct Grant {
    /// `"Location"` or `"Company"`.
    user_type: &'static str,
    company_id: String,
    /// Set for location tokens.
    location_id: Option<String>,
    scope: String,
}

struct Issued {
    grant: Grant,
    expires_at: i64,
}

/// An authorization code waiting to be exchanged (single use).
struct Pending {
    redirect_uri: String,
    scope: String,
}

#[derive(Default)]
struct State {
    codes: HashMap<String, Pending>,
    access: HashMap<String, Issued>,
    /// Live refresh tokens and the grant each renews.
    refresh: HashMap<String, Grant>,
    /// Refresh tokens already exchanged: refused if presented again.
    spent: HashSet<String>,
}

/// Issued codes and tokens, and the OAuth clock.
#[derive(Default)]
pub(crate) struct OAuthState {
    state: Mutex<State>,
    /// Seconds added to the wall clock (tests move time forward without sleeping).
    offset: AtomicI64,
}

/// Why a contacts request's token is refused.
pub(crate) enum Refusal {
    /// 401: unknown or expired.
    Invalid,
    /// 403: an agency token, or a token of another location.
    WrongLocation,
}

impl OAuthState {
    pub(crate) fn now(&self) -> i64 {
        super::now_ms() / 1000 + self.offset.load(Ordering::Relaxed)
    }

    pub(crate) fn advance(&self, secs: i64) {
        self.offset.fetch_add(secs, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves only maps behind: still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes every issued access token expired now (a revocation, or a day passing).
    pub(crate) fn expire_access_tokens(&self) {
        let now = self.now();
        for t in self.lock().access.values_mut() {
            t.expires_at = t.expires_at.min(now);
        }
    }

    /// Checks a contacts request's bearer token; `location` is the request's `locationId`.
    pub(crate) fn check(&self, token: &str, location: Option<&str>) -> Result<(), Refusal> {
        let now = self.now();
        let st = self.lock();
        let issued = st.access.get(token).ok_or(Refusal::Invalid)?;
        if issued.expires_at <= now {
            return Err(Refusal::Invalid);
        }
        match (&issued.grant.location_id, location) {
            (None, _) => Err(Refusal::WrongLocation),
            (Some(mine), Some(asked)) if mine != asked => Err(Refusal::WrongLocation),
            _ => Ok(()),
        }
    }

    /// Whether an issued access token's grant lists `scope` (scopes are space-separated, as
    /// asked for at the consent screen). The pipeline checks each route's scope with it.
    pub(crate) fn has_scope(&self, token: &str, scope: &str) -> bool {
        self.lock()
            .access
            .get(token)
            .is_some_and(|t| t.grant.scope.split_whitespace().any(|s| s == scope))
    }

    /// The grant of an unexpired access token.
    fn grant_of(&self, token: &str) -> Option<Grant> {
        let now = self.now();
        let st = self.lock();
        st.access
            .get(token)
            .filter(|t| t.expires_at > now)
            .map(|t| t.grant.clone())
    }
}

/// Serves one OAuth route (already counted by the caller).
pub(crate) fn handle(
    sim: &Sim,
    kind: Kind,
    headers: &axum::http::HeaderMap,
    params: &Params,
    body: &[u8],
) -> Response {
    let result = match kind {
        Kind::Authorize => return authorize(sim, params),
        Kind::OAuthToken => token(sim, &form(body)),
        Kind::LocationToken => {
            agency(sim, headers).and_then(|g| location_token(sim, &g, &form(body)))
        }
        Kind::InstalledLocations => agency(sim, headers).and_then(|g| installed(sim, &g, params)),
        _ => Err(err(
            StatusCode::NOT_FOUND,
            "Cannot handle this method and path",
            "Not Found",
        )),
    };
    let (status, body) = match result {
        Ok(v) => (StatusCode::OK, v),
        Err((status, mut v)) => {
            if let Some(o) = v.as_object_mut() {
                o.insert("traceId".into(), Value::String(sim.trace_id()));
            }
            (status, v)
        }
    };
    json_response(status, &body)
}

type Outcome = Result<Value, (StatusCode, Value)>;

fn err(status: StatusCode, message: &str, error: &str) -> (StatusCode, Value) {
    (
        status,
        json!({"statusCode": status.as_u16(), "message": message, "error": error}),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(axum::body::Body::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// The consent screen, answered at once as if the user approved: a 302 to `redirect_uri`
/// with a fresh code (and the `state` sent).
fn authorize(sim: &Sim, params: &Params) -> Response {
    let cfg = &sim.config.oauth;
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    let redirect_uri = get("redirect_uri");
    if get("client_id") != cfg.client_id
        || get("response_type") != "code"
        || redirect_uri.is_empty()
    {
        let (status, body) = err(
            StatusCode::BAD_REQUEST,
            "client_id, response_type=code and redirect_uri are required",
            "Bad Request",
        );
        return json_response(status, &body);
    }
    let code = secret_id(sim, 'c');
    sim.oauth.lock().codes.insert(
        code.clone(),
        Pending {
            redirect_uri: redirect_uri.to_string(),
            scope: get("scope").to_string(),
        },
    );
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("code", &code);
    if let Some(state) = params.get("state") {
        query.append_pair("state", state);
    }
    let location = format!("{redirect_uri}{sep}{}", query.finish());
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// `POST /oauth/token`.
fn token(sim: &Sim, f: &HashMap<String, String>) -> Outcome {
    let cfg = &sim.config.oauth;
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
    if get("client_id") != cfg.client_id || get("client_secret") != cfg.client_secret {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "Invalid client credentials",
            "Unauthorized",
        ));
    }
    let user_type = match get("user_type") {
        "" | "Location" => "Location",
        "Company" => "Company",
        _ => {
            return Err(err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "user_type must be one of Company, Location",
                "Unprocessable Entity",
            ))
        }
    };
    match get("grant_type") {
        "authorization_code" => {
            let pending = sim.oauth.lock().codes.remove(get("code"));
            let Some(p) = pending else {
                return Err(invalid_grant(
                    "Invalid grant: authorization code is invalid",
                ));
            };
            if p.redirect_uri != get("redirect_uri") {
                return Err(invalid_grant("Invalid grant: redirect_uri does not match"));
            }
            let grant = Grant {
                user_type,
                company_id: cfg.company_id.clone(),
                location_id: (user_type == "Location")
                    .then(|| sim.config.locations.first().cloned().unwrap_or_default()),
                scope: p.scope,
            };
            Ok(issue(sim, grant, true))
        }
        "refresh_token" => {
            let presented = get("refresh_token");
            let grant = {
                let mut st = sim.oauth.lock();
                match st.refresh.remove(presented) {
                    Some(g) => {
                        st.spent.insert(presented.to_string());
                        g
                    }
                    None => return Err(invalid_grant("Invalid grant: refresh token is invalid")),
                }
            };
            Ok(issue(sim, grant, true))
        }
        "" => Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "grant_type should not be empty",
            "Unprocessable Entity",
        )),
        _ => Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "grant_type must be one of authorization_code, refresh_token",
            "Unprocessable Entity",
        )),
    }
}

fn invalid_grant(message: &str) -> (StatusCode, Value) {
    err(StatusCode::BAD_REQUEST, message, "invalid_grant")
}

/// Issues an access token (and a refresh token when `with_refresh`) for `grant` and returns
/// the reply body.
fn issue(sim: &Sim, grant: Grant, with_refresh: bool) -> Value {
    let cfg = &sim.config.oauth;
    let access = secret_id(sim, 'a');
    let refresh = with_refresh.then(|| secret_id(sim, 'r'));
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": cfg.expires_in,
        "scope": grant.scope,
        "userType": grant.user_type,
        "companyId": grant.company_id,
        "userId": "simUser0000000000001",
    });
    if let Some(o) = body.as_object_mut() {
        if let Some(r) = &refresh {
            o.insert("refresh_token".into(), Value::String(r.clone()));
        }
        match &grant.location_id {
            Some(l) => {
                o.insert("locationId".into(), Value::String(l.clone()));
            }
            None => {
                o.insert("approvedLocations".into(), json!(sim.config.locations));
            }
        }
    }
    let expires_at = sim.oauth.now() + i64::try_from(cfg.expires_in).unwrap_or(i64::MAX / 2);
    let mut st = sim.oauth.lock();
    if let Some(r) = refresh {
        st.refresh.insert(r, grant.clone());
    }
    st.access.insert(access, Issued { grant, expires_at });
    body
}

/// The grant of the request's bearer token, which must be an unexpired agency token.
fn agency(sim: &Sim, headers: &axum::http::HeaderMap) -> Result<Grant, (StatusCode, Value)> {
    let version = headers.get("version").and_then(|v| v.to_str().ok());
    if version.map(str::trim) != Some("2021-07-28") {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "Version header is missing or invalid",
            "Bad Request",
        ));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let grant = sim
        .oauth
        .grant_of(token)
        .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "Invalid JWT", "Unauthorized"))?;
    if grant.user_type != "Company" {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "This route is only accessible with an agency access token",
            "Unauthorized",
        ));
    }
    Ok(grant)
}

/// `POST /oauth/locationToken`: a location token (no refresh token) from an agency token.
fn location_token(sim: &Sim, agency: &Grant, f: &HashMap<String, String>) -> Outcome {
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
    if get("companyId") != agency.company_id {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "companyId does not match the token",
            "Bad Request",
        ));
    }
    let location = get("locationId");
    if !sim.config.locations.iter().any(|l| l == location) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "The app is not installed on this location",
            "Bad Request",
        ));
    }
    let grant = Grant {
        user_type: "Location",
        company_id: agency.company_id.clone(),
        location_id: Some(location.to_string()),
        scope: agency.scope.clone(),
    };
    let mut body = issue(sim, grant, false);
    if let Some(o) = body.as_object_mut() {
        o.remove("companyId");
        o.remove("userType");
    }
    Ok(body)
}

/// `GET /oauth/installedLocations` with `skip`/`limit` paging.
fn installed(sim: &Sim, agency: &Grant, params: &Params) -> Outcome {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    if get("companyId") != agency.company_id {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "companyId does not match the token",
            "Bad Request",
        ));
    }
    let app_id = sim.config.oauth.client_id.split('-').next().unwrap_or("");
    if get("appId") != app_id {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "appId is missing or unknown",
            "Bad Request",
        ));
    }
    let skip: usize = get("skip").parse().unwrap_or(0);
    let limit: usize = get("limit").parse().unwrap_or(20).clamp(1, 100);
    let all = &sim.config.locations;
    let page: Vec<Value> = all
        .iter()
        .enumerate()
        .skip(skip)
        .take(limit)
        .map(|(i, id)| {
            json!({
                "_id": id,
                "name": format!("Simulated location {}", i + 1),
                "address": format!("{} Simulation Way", i + 1),
                "isInstalled": true,
            })
        })
        .collect();
    Ok(json!({"locations": page, "count": all.len(), "installToFutureLocations": false}))
}

/// A fresh 32-character token or code, unique within this simulator.
fn secret_id(sim: &Sim, kind: char) -> String {
    let h = rng::hash(&[sim.config.seed, 96, u64::from(kind), sim.next_serial()]);
    format!("sim{kind}{}", rng::hex_id(h, 28))
}

/// Decodes an `application/x-www-form-urlencoded` body.
fn form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}
