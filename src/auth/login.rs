//! The authorization-code flow: a loopback listener receives the browser's redirect with
//! the code, which is exchanged at `/oauth/token` and saved to the token store.
//!
//! [`PendingLogin::start`] binds the listener first, so the redirect URI (with its port) is
//! known when the consent URL is printed; [`PendingLogin::finish`] waits for the redirect.
//! The URL carries a random `state` (128 bits from a CSPRNG). A redirect must bring it
//! back: one without it, or with another, is answered with an error page and ignored, and
//! its code is never exchanged (RFC 9700 §2.1). RFC 6749 §4.1.2 requires the consent screen
//! to return `state` unchanged; HighLevel's documentation does not mention it, so if a real
//! redirect ever came back without it, the login would time out with the page saying why
//! rather than accept a code anyone could have planted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::header::CACHE_CONTROL;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::oauth::{oauth_retry_policy, Endpoints, Grant, OAuthApp};
use super::store::{StoredToken, TokenStore, UserType};
use super::AuthError;
use crate::term;

/// HighLevel's consent screen ("choose location").
pub const DEFAULT_AUTHORIZE_URL: &str = "https://marketplace.gohighlevel.com/oauth/chooselocation";
/// The path of the redirect URI on the loopback listener.
const CALLBACK_PATH: &str = "/callback";

/// What a login asks for.
#[derive(Clone, Debug)]
pub struct LoginRequest {
    pub app: OAuthApp,
    /// Base URL of the token endpoint (the API host).
    pub base_url: String,
    /// The consent screen.
    pub authorize_url: String,
    pub scopes: Vec<String>,
    pub user_type: UserType,
    /// Port of the loopback listener; 0 picks a free one. The redirect URI
    /// `http://127.0.0.1:PORT/callback` must be registered with the app.
    pub redirect_port: u16,
    pub store: PathBuf,
    /// How long to wait for the redirect.
    pub timeout: Duration,
}

/// A login waiting for the browser's redirect.
#[derive(Debug)]
pub struct PendingLogin {
    req: LoginRequest,
    listener: TcpListener,
    redirect_uri: String,
    consent_url: String,
    state: String,
    endpoints: Endpoints,
}

impl PendingLogin {
    /// Checks the store and URLs, binds the listener and builds the consent URL.
    pub async fn start(req: LoginRequest) -> Result<PendingLogin, AuthError> {
        // A store that would be refused later is reported before the user consents.
        TokenStore::new(&req.store).load()?;
        let endpoints =
            Endpoints::new(&req.base_url, Duration::from_secs(30), oauth_retry_policy())?;
        let authorize = reqwest::Url::parse(&req.authorize_url).map_err(|e| {
            AuthError::Config(format!(
                "invalid authorize URL '{}': {e}",
                req.authorize_url
            ))
        })?;
        let listener = TcpListener::bind(("127.0.0.1", req.redirect_port))
            .await
            .map_err(|e| {
                AuthError::Login(format!(
                    "cannot listen on 127.0.0.1:{}: {e}",
                    req.redirect_port
                ))
            })?;
        let port = listener
            .local_addr()
            .map_err(|e| AuthError::Login(format!("cannot read the listener's address: {e}")))?
            .port();
        let redirect_uri = format!("http://127.0.0.1:{port}{CALLBACK_PATH}");
        let state = random_state()?;
        let mut consent = authorize;
        consent.query_pairs_mut().extend_pairs([
            ("response_type", "code"),
            ("redirect_uri", redirect_uri.as_str()),
            ("client_id", req.app.client_id.as_str()),
            ("scope", req.scopes.join(" ").as_str()),
            ("state", state.as_str()),
        ]);
        let consent_url = consent.to_string();
        Ok(PendingLogin {
            req,
            listener,
            redirect_uri,
            consent_url,
            state,
            endpoints,
        })
    }

    /// The URL to open in a browser. It holds no secret.
    pub fn consent_url(&self) -> &str {
        &self.consent_url
    }

    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Waits for the redirect, exchanges the code and saves the grant; returns what was
    /// saved.
    ///
    /// The listener is served by axum, one task per connection: a connection that never
    /// sends a request (a browser's speculative preconnect, a port scanner) cannot hold up
    /// the real redirect. Only a redirect bringing back this login's `state` can end the
    /// wait; anything else is answered with an error page and the wait goes on until the
    /// timeout.
    pub async fn finish(self) -> Result<StoredToken, AuthError> {
        let deadline = tokio::time::Instant::now() + self.req.timeout;
        let (outcome_tx, outcome_rx) = oneshot::channel();
        let redirects = Arc::new(Redirects {
            state: self.state.clone(),
            outcome: Mutex::new(Some(outcome_tx)),
        });
        let app = Router::new()
            .route(CALLBACK_PATH, get(callback))
            .fallback(not_found)
            .with_state(redirects);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        // Detached: once told to stop it closes the listener at once, and each open
        // connection ends when hyper has closed it; the login does not wait for them.
        let server = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            let _ = stop_rx.await;
        });
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::debug!(error = %e, "the redirect listener stopped");
            }
        });
        let outcome = tokio::time::timeout_at(deadline, outcome_rx).await;
        let _ = stop_tx.send(());
        let code = match outcome {
            Err(_) => {
                return Err(AuthError::Login(format!(
                    "no redirect reached {} within {}s\nhint: open the consent URL in a browser on this machine; the app's redirect URI must be {}",
                    self.redirect_uri,
                    self.req.timeout.as_secs(),
                    self.redirect_uri
                )))
            }
            Ok(Err(_)) => {
                return Err(AuthError::Login(
                    "the redirect listener stopped before a redirect arrived".into(),
                ))
            }
            Ok(Ok(Outcome::Refused(msg))) => return Err(AuthError::Login(msg)),
            Ok(Ok(Outcome::Code(c))) => c,
        };
        let reply = self
            .endpoints
            .token(
                &self.req.app,
                Grant::AuthorizationCode {
                    code: &code,
                    redirect_uri: &self.redirect_uri,
                },
                self.req.user_type,
            )
            .await?;
        let now = super::oauth::Clock::now(&super::oauth::SystemClock);
        let entry = reply.into_stored(now, self.req.user_type, None);
        TokenStore::new(&self.req.store).put(entry.clone())?;
        Ok(entry)
    }
}

/// What the redirect handler shares with [`PendingLogin::finish`].
struct Redirects {
    /// The `state` of the consent URL this login printed.
    state: String,
    /// Taken by the first redirect that carries this login's state and ends the login.
    outcome: Mutex<Option<oneshot::Sender<Outcome>>>,
}

/// How a redirect with this login's state ended it.
enum Outcome {
    Code(String),
    Refused(String),
}

/// `GET /callback?code=…&state=…` (or `?error=…&error_description=…&state=…`).
///
/// `state` is required: without it anyone able to make the user's browser load
/// `http://127.0.0.1:PORT/callback?code=THEIRS` during the login (a link, a page's image)
/// would have their own grant saved as the user's (login CSRF), and the user's exports and
/// imports would go to the attacker's location. It is compared in constant time.
async fn callback(State(redirects): State<Arc<Redirects>>, RawQuery(query): RawQuery) -> Response {
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    match param("state") {
        None => {
            tracing::warn!("ignored a redirect without a state: it was not started by this login; still waiting for the redirect of the consent URL");
            return page(
                StatusCode::BAD_REQUEST,
                "Login not accepted",
                "This redirect carries no state, so it was not started by the login running in the terminal. It was ignored.",
            );
        }
        Some(state) if !same_secret(state.as_bytes(), redirects.state.as_bytes()) => {
            tracing::warn!("ignored a redirect carrying another login's state; still waiting for the redirect of the consent URL");
            return page(
                StatusCode::BAD_REQUEST,
                "Login not accepted",
                "This redirect belongs to another login attempt. It was ignored.",
            );
        }
        Some(_) => {}
    }
    // The guarded value is an Option, valid whatever a panicking holder left.
    let mut slot = redirects
        .outcome
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(tx) = slot.take() else {
        return page(
            StatusCode::CONFLICT,
            "Login already finished",
            "This login has already received its redirect. Return to the terminal.",
        );
    };
    if let Some(error) = param("error") {
        let detail = param("error_description").unwrap_or("");
        // The reason reaches the terminal: it is text from the redirect, so escaped.
        let reason = format!(
            "the authorization was refused: {} {}",
            term::escape(error),
            term::escape(detail)
        );
        let _ = tx.send(Outcome::Refused(reason.trim().to_string()));
        return page(
            StatusCode::BAD_REQUEST,
            "Login refused",
            "The authorization was refused. Return to the terminal.",
        );
    }
    match param("code").filter(|c| !c.is_empty()) {
        Some(code) => {
            let _ = tx.send(Outcome::Code(code.to_string()));
            page(
                StatusCode::OK,
                "Logged in",
                "contacts-etl received the authorization. You can close this tab and return to the terminal.",
            )
        }
        None => {
            *slot = Some(tx);
            page(
                StatusCode::BAD_REQUEST,
                "No code",
                "The redirect carried no authorization code.",
            )
        }
    }
}

async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        "This listener only receives the OAuth redirect.",
    )
}

/// A small HTML page. Only our own text goes into it, never a query value.
fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body><h1>{title}</h1><p>{text}</p></body></html>"
    );
    (status, [(CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

/// Byte strings compared in time that depends on their length only, so the answer time
/// does not tell a guesser how much of the state it got right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// 128 bits from a CSPRNG, as hex: the system's generator through ring (`SystemRandom`,
/// getrandom underneath), as the TLS stack already links it, so no RNG crate is added.
fn random_state() -> Result<String, AuthError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| {
            AuthError::Login(
                "the system's random number generator failed: no login state can be drawn".into(),
            )
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(store: PathBuf) -> LoginRequest {
        LoginRequest {
            app: OAuthApp::new("app1-x", "secret"),
            base_url: "http://127.0.0.1:9".into(),
            authorize_url: DEFAULT_AUTHORIZE_URL.into(),
            scopes: vec!["contacts.readonly".into(), "contacts.write".into()],
            user_type: UserType::Location,
            redirect_port: 0,
            store,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn consent_url_names_client_redirect_scope_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingLogin::start(request(dir.path().join("t.json")))
            .await
            .unwrap();
        let url = p.consent_url();
        assert!(url.starts_with("https://marketplace.gohighlevel.com/oauth/chooselocation?response_type=code&redirect_uri=http%3A%2F%2F127.0.0.1%3A"), "{url}");
        assert!(
            url.contains(&format!(
                "%2Fcallback&client_id=app1-x&scope=contacts.readonly+contacts.write&state={}",
                p.state
            )),
            "{url}"
        );
        // Form-encoded as RFC 6749 (4.1.1) asks: the pairs decode to what was meant.
        let pairs: Vec<(String, String)> = reqwest::Url::parse(url)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        assert!(pairs.contains(&("scope".into(), "contacts.readonly contacts.write".into())));
        assert!(pairs.contains(&("redirect_uri".into(), p.redirect_uri.clone())));
        assert!(!url.contains("secret"));
        let (a, b) = (random_state().unwrap(), random_state().unwrap());
        assert_ne!(a, b);
        assert!(
            a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
    }

    #[test]
    fn states_compare_equal_only_when_every_byte_matches() {
        assert!(same_secret(b"0123abcd", b"0123abcd"));
        assert!(!same_secret(b"0123abcd", b"0123abce"));
        assert!(!same_secret(b"0123abcd", b"0123abc"));
        assert!(!same_secret(b"", b"x"));
    }

    #[tokio::test]
    async fn a_refused_consent_ends_the_login_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingLogin::start(request(dir.path().join("t.json")))
            .await
            .unwrap();
        let base = p.redirect_uri().trim_end_matches(CALLBACK_PATH).to_string();
        let state = p.state.clone();
        let browser = tokio::spawn(async move {
            let http = reqwest::Client::new();
            // A stray request first: ignored.
            let r = http
                .get(format!("{base}/favicon.ico"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 404);
            let r = http
                .get(format!(
                    "{base}{CALLBACK_PATH}?error=access_denied&error_description=no%1B%5B2J%0Aerror%3A+forged&state={state}"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 400);
            r.text().await.unwrap()
        });
        let err = p.finish().await.unwrap_err().to_string();
        assert!(err.contains("access_denied"), "{err}");
        // The description is the redirect's text: escaped, on the error's own line.
        assert!(err.contains("no\\u{1b}[2J\\nerror: forged"), "{err}");
        assert!(!err.contains('\x1b') && !err.contains('\n'), "{err}");
        assert!(browser.await.unwrap().contains("Login refused"));
    }
}
