//! The authorization-code flow: a loopback listener receives the browser's redirect with
//! the code, which is exchanged at `/oauth/token` and saved to the token store.
//!
//! [`PendingLogin::start`] binds the listener first, so the redirect URI (with its port) is
//! known when the consent URL is printed; [`PendingLogin::finish`] waits for the redirect.
//! The URL carries a random `state`; a redirect that brings back a different one is
//! answered 400 and ignored (HighLevel's consent screen is not documented to echo `state`,
//! so a redirect without one is accepted).

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::oauth::{decode, encode, Endpoints, Grant, OAuthApp};
use super::store::{StoredToken, TokenStore, UserType};
use super::AuthError;

/// HighLevel's consent screen ("choose location").
pub const DEFAULT_AUTHORIZE_URL: &str = "https://marketplace.gohighlevel.com/oauth/chooselocation";
/// The path of the redirect URI on the loopback listener.
const CALLBACK_PATH: &str = "/callback";
/// Longest request head the listener reads.
const MAX_HEAD: usize = 16 * 1024;

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
        let endpoints = Endpoints::new(&req.base_url, Duration::from_secs(30))?;
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
        let state = random_state();
        let sep = if authorize.query().is_some() {
            '&'
        } else {
            '?'
        };
        let consent_url = format!(
            "{}{sep}response_type=code&redirect_uri={}&client_id={}&scope={}&state={state}",
            authorize.as_str(),
            encode(&redirect_uri),
            encode(&req.app.client_id),
            encode(&req.scopes.join(" ")),
        );
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
    pub async fn finish(self) -> Result<StoredToken, AuthError> {
        let deadline = tokio::time::Instant::now() + self.req.timeout;
        let code = loop {
            let accepted = tokio::time::timeout_at(deadline, self.listener.accept()).await;
            let (stream, _) = match accepted {
                Err(_) => {
                    return Err(AuthError::Login(format!(
                        "no redirect reached {} within {}s\nhint: open the consent URL in a browser on this machine; the app's redirect URI must be {}",
                        self.redirect_uri,
                        self.req.timeout.as_secs(),
                        self.redirect_uri
                    )))
                }
                Ok(Err(e)) => return Err(AuthError::Login(format!("accepting the redirect failed: {e}"))),
                Ok(Ok(s)) => s,
            };
            match self.serve(stream).await {
                Callback::Code(c) => break c,
                Callback::Refused(msg) => return Err(AuthError::Login(msg)),
                Callback::Ignored => continue,
            }
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

    /// Answers one connection to the listener.
    async fn serve(&self, mut stream: TcpStream) -> Callback {
        let target =
            match tokio::time::timeout(Duration::from_secs(10), read_target(&mut stream)).await {
                Ok(Some(t)) => t,
                _ => return Callback::Ignored,
            };
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        if path != CALLBACK_PATH {
            reply(
                &mut stream,
                "404 Not Found",
                "Not found",
                "This listener only receives the OAuth redirect.",
            )
            .await;
            return Callback::Ignored;
        }
        let params: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(state) = get("state") {
            if state != self.state {
                tracing::warn!("ignored a redirect carrying another login's state");
                reply(
                    &mut stream,
                    "400 Bad Request",
                    "Login not accepted",
                    "This redirect belongs to another login attempt.",
                )
                .await;
                return Callback::Ignored;
            }
        }
        if let Some(error) = get("error") {
            let detail = get("error_description").unwrap_or("");
            reply(
                &mut stream,
                "400 Bad Request",
                "Login refused",
                "The authorization was refused. Return to the terminal.",
            )
            .await;
            return Callback::Refused(
                format!("the authorization was refused: {error} {detail}")
                    .trim()
                    .to_string(),
            );
        }
        match get("code").filter(|c| !c.is_empty()) {
            Some(code) => {
                reply(&mut stream, "200 OK", "Logged in", "contacts-etl received the authorization. You can close this tab and return to the terminal.").await;
                Callback::Code(code.to_string())
            }
            None => {
                reply(
                    &mut stream,
                    "400 Bad Request",
                    "No code",
                    "The redirect carried no authorization code.",
                )
                .await;
                Callback::Ignored
            }
        }
    }
}

enum Callback {
    Code(String),
    Refused(String),
    Ignored,
}

/// Reads a request head and returns its target (`/callback?code=…`), or `None` for
/// anything that is not an HTTP GET.
async fn read_target(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n)?);
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next()?.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.to_string()),
        _ => None,
    }
}

async fn reply(stream: &mut TcpStream, status: &str, title: &str, text: &str) {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body><h1>{title}</h1><p>{text}</p></body></html>"
    );
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The browser going away early changes nothing for the login.
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// 128 random bits as hex, from std's randomly keyed SipHash (no RNG dependency needed).
fn random_state() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (0..2u64)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            h.write_u128(nanos);
            format!("{:016x}", h.finish())
        })
        .collect()
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
            url.contains(
                "%2Fcallback&client_id=app1-x&scope=contacts.readonly%20contacts.write&state="
            ),
            "{url}"
        );
        assert!(!url.contains("secret"));
        assert_ne!(random_state(), random_state());
    }

    #[tokio::test]
    async fn a_refused_consent_ends_the_login_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingLogin::start(request(dir.path().join("t.json")))
            .await
            .unwrap();
        let addr = p
            .redirect_uri()
            .trim_start_matches("http://")
            .trim_end_matches(CALLBACK_PATH)
            .to_string();
        let browser = tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            // A stray request first: ignored.
            s.write_all(b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 404"));
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"GET /callback?error=access_denied HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        });
        let err = p.finish().await.unwrap_err().to_string();
        assert!(err.contains("access_denied"), "{err}");
        assert!(browser.await.unwrap().contains("Login refused"));
    }
}
