//! The `auth` jobs: log in with a Marketplace app, read the token store, list an agency's
//! installed locations. They return data; the command line prints it.

use std::path::PathBuf;
use std::time::Duration;

use super::outcome::{auth_outcome, Outcome};
use crate::auth::{
    InstalledLocation, LoginRequest, OAuthApp, OAuthProvider, OAuthSettings, PendingLogin,
    StoredToken, TokenStore, UserType,
};

/// The app's credentials, named (the secret is read from the environment or a file).
#[derive(Clone, Debug)]
pub struct AppRef {
    pub client_id: String,
    pub client_secret_env: String,
    pub client_secret_file: Option<PathBuf>,
    /// The API host, where the OAuth endpoints live.
    pub base_url: String,
}

impl AppRef {
    fn load(&self) -> Result<OAuthApp, Outcome> {
        OAuthApp::load(
            &self.client_id,
            &self.client_secret_env,
            self.client_secret_file.as_deref(),
        )
        .map_err(auth_outcome)
    }
}

/// The token store to use: the given file, or the default place.
pub fn store_path(given: Option<&PathBuf>) -> Result<PathBuf, Outcome> {
    match given {
        Some(p) => Ok(p.clone()),
        None => TokenStore::default_path().ok_or_else(|| {
            Outcome::usage("cannot tell where the token store goes (neither HOME nor XDG_CONFIG_HOME is set): pass --token-store FILE")
        }),
    }
}

/// `auth login`.
#[derive(Clone, Debug)]
pub struct LoginJob {
    pub app: AppRef,
    pub store: PathBuf,
    pub scopes: Vec<String>,
    pub user_type: UserType,
    pub redirect_port: u16,
    pub authorize_url: String,
    /// How long to wait for the browser's redirect.
    pub timeout: Duration,
}

impl LoginJob {
    /// Runs the login. `show` is called once the loopback listener is up, with the pending
    /// login (its consent URL and redirect URI), before waiting for the browser.
    pub async fn run(&self, show: impl FnOnce(&PendingLogin)) -> Result<StoredToken, Outcome> {
        let req = LoginRequest {
            app: self.app.load()?,
            base_url: self.app.base_url.clone(),
            authorize_url: self.authorize_url.clone(),
            scopes: self.scopes.clone(),
            user_type: self.user_type,
            redirect_port: self.redirect_port,
            store: self.store.clone(),
            timeout: self.timeout.max(Duration::from_secs(1)),
        };
        let pending = PendingLogin::start(req).await.map_err(auth_outcome)?;
        show(&pending);
        pending.finish().await.map_err(auth_outcome)
    }
}

/// `auth status`: the grants the store holds (never the tokens).
pub fn status(store: &std::path::Path) -> Result<Vec<StoredToken>, Outcome> {
    TokenStore::new(store).entries().map_err(auth_outcome)
}

/// `auth locations`: where the app is installed, from the agency grant in the store.
pub async fn locations(
    app: &AppRef,
    store: PathBuf,
    company: Option<&str>,
) -> Result<Vec<InstalledLocation>, Outcome> {
    let settings = OAuthSettings::new(app.base_url.clone(), app.load()?, store);
    let provider = OAuthProvider::new(settings).map_err(auth_outcome)?;
    provider
        .installed_locations(company)
        .await
        .map_err(auth_outcome)
}
