//! Token sources that renew themselves: [`OAuthTokenSource`] refreshes a stored grant
//! (location or agency), [`LocationTokenSource`] exchanges an agency token for a location
//! token, and [`OAuthProvider`] hands out one source per location, sharing one source per
//! agency (so a refresh token is never spent twice by the same process).
//!
//! Both sources answer [`TokenSource::current`] from a small lock-free-ish fast path (a
//! `std` mutex held for a copy) and do all renewing under one `tokio` mutex, so concurrent
//! requests wait for a single renewal. A 401 renews only if the refused header is still the
//! current one: fifty requests refused with the same expired token cause one refresh.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::HeaderValue;

use super::oauth::{Clock, Endpoints, Grant, InstalledLocation, OAuthApp, SystemClock};
use super::store::{Secret, StoreKey, StoredToken, TokenStore, UserType};
use super::AuthError;
use crate::api::{ApiError, RequestLabel, TokenSource};

/// How long a token must still be valid to be used without renewing it first.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// After a failed early renewal, how long to keep using the still-valid token before trying
/// again.
const RETRY_RENEWAL_AFTER: i64 = 30;

/// Everything a token source needs besides the store entry.
#[derive(Clone, Debug)]
pub struct OAuthSettings {
    /// Base URL of the OAuth endpoints (the API host).
    pub base_url: String,
    pub app: OAuthApp,
    pub store: PathBuf,
    /// Renew when less than this remains.
    pub refresh_margin: Duration,
    /// Timeout of one attempt of an OAuth request.
    pub timeout: Duration,
    /// The retry policy of the OAuth requests ([`super::oauth_retry_policy`] unless set; a run
    /// passes its `--max-retry-wait` and `--request-deadline` here).
    pub retry: crate::api::RetryPolicy,
    pub clock: Arc<dyn Clock>,
}

impl OAuthSettings {
    pub fn new(
        base_url: impl Into<String>,
        app: OAuthApp,
        store: impl Into<PathBuf>,
    ) -> OAuthSettings {
        OAuthSettings {
            base_url: base_url.into(),
            app,
            store: store.into(),
            refresh_margin: DEFAULT_REFRESH_MARGIN,
            timeout: Duration::from_secs(30),
            retry: super::oauth::oauth_retry_policy(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The header a source currently hands out, with its expiry.
struct Live {
    header: Option<HeaderValue>,
    expires_at: i64,
    /// The token's lifetime as issued (0: unknown), to size the margin for short-lived tokens.
    lifetime: i64,
    /// A failed early renewal: keep the valid token until then.
    hold_until: i64,
}

/// The token's lifetime as issued, when the entry tells.
fn lifetime(e: &StoredToken) -> i64 {
    if e.updated_at > 0 {
        (e.expires_at - e.updated_at).max(0)
    } else {
        0
    }
}

impl Live {
    fn new(entry: Option<&StoredToken>) -> Live {
        Live {
            header: entry.map(|e| bearer(&e.access_token)),
            expires_at: entry.map_or(0, |e| e.expires_at),
            lifetime: entry.map_or(0, lifetime),
            hold_until: 0,
        }
    }
}

/// The shared fast path of both sources.
struct Cache {
    live: Mutex<Live>,
    clock: Arc<dyn Clock>,
    margin: i64,
}

impl Cache {
    fn new(entry: Option<&StoredToken>, settings: &OAuthSettings) -> Cache {
        Cache {
            live: Mutex::new(Live::new(entry)),
            clock: settings.clock.clone(),
            margin: i64::try_from(settings.refresh_margin.as_secs()).unwrap_or(i64::MAX / 4),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        // Live is plain data, valid after any panic.
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The header, if it may be used without renewing.
    fn fresh(&self) -> Option<HeaderValue> {
        let now = self.clock.now();
        let l = self.lock();
        let ok = l.expires_at - now > self.margin_for(l.lifetime)
            || (l.hold_until > now && l.expires_at > now);
        if ok {
            l.header.clone()
        } else {
            None
        }
    }

    /// The renewal margin for a token of `lifetime` seconds: the configured margin, but at
    /// most half the lifetime, so a server issuing short-lived tokens does not cause a
    /// refresh before every request.
    fn margin_for(&self, lifetime: i64) -> i64 {
        if lifetime > 0 {
            self.margin.min(lifetime / 2)
        } else {
            self.margin
        }
    }

    fn is_current(&self, h: &HeaderValue) -> bool {
        self.lock().header.as_ref() == Some(h)
    }

    fn publish(&self, entry: &StoredToken) -> HeaderValue {
        let h = bearer(&entry.access_token);
        let mut l = self.lock();
        l.header = Some(h.clone());
        l.expires_at = entry.expires_at;
        l.lifetime = lifetime(entry);
        l.hold_until = 0;
        h
    }

    /// After a failed early renewal: the old header while it is still valid, else `err`.
    fn fallback(&self, err: ApiError) -> Result<HeaderValue, ApiError> {
        let now = self.clock.now();
        let mut l = self.lock();
        match l.header.clone() {
            Some(h) if l.expires_at > now => {
                tracing::warn!(error = %err, expires_in_s = l.expires_at - now, "cannot renew the OAuth token yet; using the current one until it expires");
                l.hold_until = now + RETRY_RENEWAL_AFTER;
                Ok(h)
            }
            _ => Err(err),
        }
    }
}

fn bearer(token: &Secret) -> HeaderValue {
    let mut h = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid-token-characters"));
    h.set_sensitive(true);
    h
}

fn store_failure(label: &str, e: AuthError) -> ApiError {
    ApiError::Transient {
        request: RequestLabel(label.into()),
        // One line: the reason is shown escaped (it usually quotes the server), so the
        // store error's own `hint:` line is joined rather than turned into `\n`.
        reason: e.to_string().replace('\n', "; "),
        retry_after: None,
        maybe_applied: false,
        status: None,
        trace_id: None,
    }
}

/// The renewing state, behind the tokio mutex.
struct Grantee {
    entry: StoredToken,
    /// A refreshed entry that could not be saved yet: the server has spent the old refresh
    /// token, so this one must reach the disk before anything else happens.
    unsaved: bool,
}

/// A stored grant (location or agency) kept fresh with the refresh-token grant.
pub struct OAuthTokenSource {
    key: StoreKey,
    app: OAuthApp,
    endpoints: Arc<Endpoints>,
    store: TokenStore,
    cache: Cache,
    state: tokio::sync::Mutex<Grantee>,
    refreshes: AtomicU64,
}

impl std::fmt::Debug for OAuthTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthTokenSource")
            .field("key", &self.key)
            .field("client_id", &self.app.client_id)
            .field("store", &self.store.path())
            .field("expires_at", &self.cache.lock().expires_at)
            .finish_non_exhaustive()
    }
}

impl OAuthTokenSource {
    /// A source for the stored entry `key`.
    pub fn from_store(
        settings: &OAuthSettings,
        key: StoreKey,
    ) -> Result<OAuthTokenSource, AuthError> {
        let endpoints = Arc::new(Endpoints::new(
            &settings.base_url,
            settings.timeout,
            settings.retry.clone(),
        )?);
        OAuthTokenSource::with_endpoints(settings, endpoints, key)
    }

    pub(crate) fn with_endpoints(
        settings: &OAuthSettings,
        endpoints: Arc<Endpoints>,
        key: StoreKey,
    ) -> Result<OAuthTokenSource, AuthError> {
        let store = TokenStore::new(&settings.store);
        let entry = store.get(&key)?.ok_or_else(|| AuthError::NotFound {
            path: settings.store.clone(),
            what: key.to_string(),
        })?;
        if entry.refresh_token.is_none() {
            return Err(AuthError::Config(format!(
                "the stored token of {key} has no refresh token (it was obtained from an agency token): use the agency's grant"
            )));
        }
        Ok(OAuthTokenSource {
            cache: Cache::new(Some(&entry), settings),
            state: tokio::sync::Mutex::new(Grantee {
                entry,
                unsaved: false,
            }),
            key,
            app: settings.app.clone(),
            endpoints,
            store,
            refreshes: AtomicU64::new(0),
        })
    }

    /// Refreshes done by this source.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// The company id of the grant (agency grants always have one).
    pub async fn company_id(&self) -> Option<String> {
        self.state.lock().await.entry.company_id.clone()
    }

    async fn current_header(&self) -> Result<HeaderValue, ApiError> {
        if let Some(h) = self.cache.fresh() {
            return Ok(h);
        }
        let mut st = self.state.lock().await;
        // Someone else may have renewed while this task waited for the lock.
        if let Some(h) = self.cache.fresh() {
            return Ok(h);
        }
        match self.renew(&mut st, None).await {
            Ok(h) => Ok(h),
            Err(e) => self.cache.fallback(e),
        }
    }

    async fn refresh_after_401(&self, refused: &HeaderValue) -> Result<bool, ApiError> {
        let mut st = self.state.lock().await;
        if !self.cache.is_current(refused) {
            // Already renewed since that request was sent.
            return Ok(true);
        }
        self.renew(&mut st, Some(refused)).await.map(|_| true)
    }

    /// Renews under the state lock: finish an unsaved refresh, adopt a newer grant another
    /// process saved, or refresh. `refused` is the header a 401 refused, if any.
    async fn renew(
        &self,
        st: &mut Grantee,
        refused: Option<&HeaderValue>,
    ) -> Result<HeaderValue, ApiError> {
        let label = "saving the OAuth token store";
        if st.unsaved {
            self.store
                .put(st.entry.clone())
                .map_err(|e| store_failure(label, e))?;
            st.unsaved = false;
            let h = self.cache.publish(&st.entry);
            if self.usable(&st.entry, refused) {
                return Ok(h);
            }
        }
        if self.adopt_newer(st, refused) {
            return Ok(self.cache.publish(&st.entry));
        }
        let reply = match self.refresh_once(st).await {
            Err(ApiError::Unauthorized { .. }) if self.adopt_newer(st, refused) => {
                // Another process rotated the refresh token between our read and our call.
                return Ok(self.cache.publish(&st.entry));
            }
            other => other?,
        };
        let now = self.cache.clock.now();
        let user_type = st.entry.user_type;
        st.entry = reply.into_stored(now, user_type, Some(&st.entry));
        if st.entry.refresh_token.is_none() {
            tracing::warn!(key = %self.key, "the refresh reply carried no new refresh token; keeping the current one");
        }
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        // The new refresh token goes to disk before the new access token is used: the old
        // refresh token is spent now, so a crash after using the new access token but before
        // saving would leave nothing that can refresh.
        if let Err(e) = self.store.put(st.entry.clone()) {
            st.unsaved = true;
            return Err(store_failure(label, e));
        }
        tracing::info!(key = %self.key, expires_at = st.entry.expires_at, "OAuth access token refreshed");
        Ok(self.cache.publish(&st.entry))
    }

    async fn refresh_once(&self, st: &mut Grantee) -> Result<super::oauth::TokenReply, ApiError> {
        let Some(rt) = st.entry.refresh_token.clone() else {
            return Err(ApiError::Unauthorized {
                request: RequestLabel("POST /oauth/token (refresh_token grant)".into()),
                message: format!(
                    "no refresh token stored for {}: run `contacts-etl auth login` again",
                    self.key
                ),
                trace_id: None,
            });
        };
        let mut reply = self
            .endpoints
            .token(&self.app, Grant::RefreshToken(&rt), st.entry.user_type)
            .await?;
        if reply.refresh_token.is_none() {
            reply.refresh_token = Some(rt);
        }
        Ok(reply)
    }

    /// Whether `entry`'s access token can be used now instead of renewing.
    fn usable(&self, entry: &StoredToken, refused: Option<&HeaderValue>) -> bool {
        let fresh =
            entry.expires_at - self.cache.clock.now() > self.cache.margin_for(lifetime(entry));
        let refused_it = refused.is_some_and(|r| *r == bearer(&entry.access_token));
        fresh && !refused_it
    }

    /// Adopts the stored entry if another writer rotated the grant and its access token is
    /// usable. A store that cannot be read is ignored here: the refresh reports the problem.
    fn adopt_newer(&self, st: &mut Grantee, refused: Option<&HeaderValue>) -> bool {
        let Ok(Some(stored)) = self.store.get(&self.key) else {
            return false;
        };
        if stored.refresh_token == st.entry.refresh_token || !self.usable(&stored, refused) {
            return false;
        }
        tracing::info!(key = %self.key, "adopting the OAuth token another process refreshed");
        st.entry = stored;
        true
    }
}

impl TokenSource for OAuthTokenSource {
    fn current(&self) -> BoxFuture<'_, Result<HeaderValue, ApiError>> {
        Box::pin(self.current_header())
    }

    fn refresh<'a>(&'a self, refused: &'a HeaderValue) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(self.refresh_after_401(refused))
    }
}

/// A location token obtained from an agency grant with `POST /oauth/locationToken`, cached
/// in the store and obtained again when it nears expiry or is refused.
pub struct LocationTokenSource {
    agency: Arc<OAuthTokenSource>,
    company_id: String,
    location_id: String,
    endpoints: Arc<Endpoints>,
    store: TokenStore,
    cache: Cache,
    gate: tokio::sync::Mutex<()>,
    exchanges: AtomicU64,
}

impl std::fmt::Debug for LocationTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocationTokenSource")
            .field("company_id", &self.company_id)
            .field("location_id", &self.location_id)
            .field("expires_at", &self.cache.lock().expires_at)
            .finish_non_exhaustive()
    }
}

impl LocationTokenSource {
    /// Exchanges done by this source.
    pub fn exchanges(&self) -> u64 {
        self.exchanges.load(Ordering::Relaxed)
    }

    async fn current_header(&self) -> Result<HeaderValue, ApiError> {
        if let Some(h) = self.cache.fresh() {
            return Ok(h);
        }
        let _g = self.gate.lock().await;
        if let Some(h) = self.cache.fresh() {
            return Ok(h);
        }
        match self.exchange().await {
            Ok(h) => Ok(h),
            Err(e) => self.cache.fallback(e),
        }
    }

    async fn refresh_after_401(&self, refused: &HeaderValue) -> Result<bool, ApiError> {
        let _g = self.gate.lock().await;
        if !self.cache.is_current(refused) {
            return Ok(true);
        }
        self.exchange().await.map(|_| true)
    }

    async fn exchange(&self) -> Result<HeaderValue, ApiError> {
        let agency = self.agency.current().await?;
        let reply = match self
            .endpoints
            .location_token(&agency, &self.company_id, &self.location_id)
            .await
        {
            // The agency token was refused: refresh it once and ask again.
            Err(ApiError::Unauthorized { .. }) if self.agency.refresh(&agency).await? => {
                let agency = self.agency.current().await?;
                self.endpoints
                    .location_token(&agency, &self.company_id, &self.location_id)
                    .await?
            }
            other => other?,
        };
        let now = self.cache.clock.now();
        let mut entry = reply.into_stored(now, UserType::Location, None);
        entry.user_type = UserType::Location;
        entry.location_id = Some(self.location_id.clone());
        entry.company_id = Some(self.company_id.clone());
        // Renewed from the agency grant, never refreshed on its own.
        entry.refresh_token = None;
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        // A cache only: losing it costs one exchange, so a failed save is not an error.
        if let Err(e) = self.store.put(entry.clone()) {
            tracing::warn!(error = %e, location = %self.location_id, "cannot cache the location token");
        }
        tracing::info!(location = %self.location_id, expires_at = entry.expires_at, "location token obtained from the agency token");
        Ok(self.cache.publish(&entry))
    }
}

impl TokenSource for LocationTokenSource {
    fn current(&self) -> BoxFuture<'_, Result<HeaderValue, ApiError>> {
        Box::pin(self.current_header())
    }

    fn refresh<'a>(&'a self, refused: &'a HeaderValue) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(self.refresh_after_401(refused))
    }
}

/// Hands out one token source per location from a token store: the location's own grant
/// when it has one, else a location token from the agency grant. Sources are cached, and
/// all locations of one agency share its grant.
#[derive(Debug)]
pub struct OAuthProvider {
    settings: OAuthSettings,
    endpoints: Arc<Endpoints>,
    store: TokenStore,
    agencies: Mutex<HashMap<String, Arc<OAuthTokenSource>>>,
    locations: Mutex<HashMap<String, Arc<dyn TokenSource>>>,
}

impl OAuthProvider {
    pub fn new(settings: OAuthSettings) -> Result<OAuthProvider, AuthError> {
        let endpoints = Arc::new(Endpoints::new(
            &settings.base_url,
            settings.timeout,
            settings.retry.clone(),
        )?);
        // Fail now, not at the first request, if the store is unusable.
        let store = TokenStore::new(&settings.store);
        store.load()?;
        Ok(OAuthProvider {
            settings,
            endpoints,
            store,
            agencies: Mutex::new(HashMap::new()),
            locations: Mutex::new(HashMap::new()),
        })
    }

    /// The token source of `location_id`.
    pub fn for_location(&self, location_id: &str) -> Result<Arc<dyn TokenSource>, AuthError> {
        let mut cache = self
            .locations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = cache.get(location_id) {
            return Ok(s.clone());
        }
        let key = StoreKey::Location(location_id.to_string());
        let own = self.store.get(&key)?;
        let source: Arc<dyn TokenSource> = match own {
            Some(e) if e.refresh_token.is_some() => Arc::new(OAuthTokenSource::with_endpoints(
                &self.settings,
                self.endpoints.clone(),
                key,
            )?),
            cached => {
                let company = match cached.as_ref().and_then(|c| c.company_id.clone()) {
                    Some(c) => c,
                    None => self.only_company(&format!("location {location_id}"))?,
                };
                Arc::new(self.location_source(&company, location_id, cached.as_ref())?)
            }
        };
        cache.insert(location_id.to_string(), source.clone());
        Ok(source)
    }

    /// The agency grant of `company_id`, or of the only agency in the store.
    pub fn agency(&self, company_id: Option<&str>) -> Result<Arc<OAuthTokenSource>, AuthError> {
        let company = match company_id {
            Some(c) => c.to_string(),
            None => self.only_company("an agency")?,
        };
        let mut agencies = self
            .agencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(a) = agencies.get(&company) {
            return Ok(a.clone());
        }
        let a = Arc::new(OAuthTokenSource::with_endpoints(
            &self.settings,
            self.endpoints.clone(),
            StoreKey::Company(company.clone()),
        )?);
        agencies.insert(company, a.clone());
        Ok(a)
    }

    /// The locations where the app is installed under the agency (all pages).
    pub async fn installed_locations(
        &self,
        company_id: Option<&str>,
    ) -> Result<Vec<InstalledLocation>, AuthError> {
        let agency = self.agency(company_id)?;
        let company = agency.company_id().await.unwrap_or_default();
        let h = agency.current().await?;
        let app_id = self.settings.app.app_id();
        match self
            .endpoints
            .installed_locations(&h, &company, app_id)
            .await
        {
            Err(ApiError::Unauthorized { .. }) if agency.refresh(&h).await? => {
                let h = agency.current().await?;
                Ok(self
                    .endpoints
                    .installed_locations(&h, &company, app_id)
                    .await?)
            }
            other => Ok(other?),
        }
    }

    fn location_source(
        &self,
        company_id: &str,
        location_id: &str,
        cached: Option<&StoredToken>,
    ) -> Result<LocationTokenSource, AuthError> {
        Ok(LocationTokenSource {
            agency: self.agency(Some(company_id))?,
            company_id: company_id.to_string(),
            location_id: location_id.to_string(),
            endpoints: self.endpoints.clone(),
            store: self.store.clone(),
            cache: Cache::new(cached, &self.settings),
            gate: tokio::sync::Mutex::new(()),
            exchanges: AtomicU64::new(0),
        })
    }

    /// The company id of the store's only agency grant.
    fn only_company(&self, what: &str) -> Result<String, AuthError> {
        let companies: Vec<String> = self
            .store
            .entries()?
            .into_iter()
            .filter(|e| e.user_type == UserType::Company && e.refresh_token.is_some())
            .filter_map(|e| e.company_id)
            .collect();
        match companies.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(AuthError::NotFound {
                path: self.settings.store.clone(),
                what: what.to_string(),
            }),
            many => Err(AuthError::Config(format!(
                "the token store {} holds grants of several agencies ({}): name the company id",
                self.settings.store.display(),
                many.join(", ")
            ))),
        }
    }
}

/// The token source of one location from a token store (see [`OAuthProvider`]; build one
/// provider instead when several locations of one agency are used in the same process).
pub fn token_source_from_store(
    settings: &OAuthSettings,
    location_id: &str,
) -> Result<Arc<dyn TokenSource>, AuthError> {
    OAuthProvider::new(settings.clone())?.for_location(location_id)
}
