//! OAuth 2.0 for Marketplace apps: the login (authorization-code flow with a loopback
//! redirect), the token store, and token sources that refresh themselves.
//!
//! # Layout
//! - `store`: the token store file (mode 0600, atomic writes, versioned layout) and
//!   [`Secret`], a string whose `Debug` shows nothing.
//! - `oauth`: the OAuth endpoints (`/oauth/token`, `/oauth/locationToken`,
//!   `/oauth/installedLocations`), the app credentials and the clock.
//! - `source`: [`OAuthTokenSource`] (refresh before expiry and once on a 401),
//!   [`LocationTokenSource`] (agency token → location token) and [`OAuthProvider`] (one
//!   source per location of a store).
//! - `login`: the authorization-code flow.
//!
//! The `auth` commands themselves are in `crate::app::auth`.
//!
//! # Using it from a run
//! ```no_run
//! # fn demo() -> Result<(), contacts_etl::auth::AuthError> {
//! use contacts_etl::auth::{OAuthApp, OAuthProvider, OAuthSettings};
//! let app = OAuthApp::new("appid-suffix", std::env::var("HL_CLIENT_SECRET").unwrap_or_default());
//! let settings = OAuthSettings::new("https://services.leadconnectorhq.com", app, "/home/me/.config/contacts-etl/tokens.json");
//! let provider = OAuthProvider::new(settings)?;
//! let token = provider.for_location("ve9EPM428h8vShlRW1KT")?; // Arc<dyn TokenSource>
//! # let _ = token; Ok(()) }
//! ```
//! Put the source in [`crate::api::ClientConfig::token`]; the client asks it for the header
//! of each call and reports 401s to it.

mod login;
mod oauth;
mod secret;
mod source;
mod store;

use std::path::PathBuf;

pub use login::{LoginRequest, PendingLogin, DEFAULT_AUTHORIZE_URL};
pub use oauth::{
    oauth_retry_policy, Clock, InstalledLocation, ManualClock, OAuthApp, SystemClock, TokenReply,
};
pub use secret::looks_like_secret;
pub use source::{
    token_source_from_store, LocationTokenSource, OAuthProvider, OAuthSettings, OAuthTokenSource,
    DEFAULT_REFRESH_MARGIN,
};
pub use store::{warn_if_exposed, Secret, StoreKey, StoredToken, TokenStore, UserType};

use crate::api::ApiError;

/// What can go wrong with the token store, the app credentials or a login. None of the
/// messages contains a token or the client secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token store {}: {source}", path.display())]
    StoreIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token store {} may be read or changed by other users (mode {mode:04o}); it holds refresh tokens, so it is not used\nhint: chmod 600 {}", path.display(), path.display())]
    StorePermissions { path: PathBuf, mode: u32 },
    /// Where the store lies (a directory others may write) would let someone else replace it.
    #[error("token store {}: {reason}\nhint: {hint}", path.display())]
    StoreUnsafe {
        path: PathBuf,
        reason: String,
        hint: String,
    },
    #[error("token store {} is damaged: {message}\nhint: move it away and run `contacts-etl auth login` again", path.display())]
    StoreCorrupt { path: PathBuf, message: String },
    #[error("token store {} holds no OAuth grant for {what}\nhint: run `contacts-etl auth login --token-store {}` (with --user-type Company for an agency)", path.display(), path.display())]
    NotFound { path: PathBuf, what: String },
    /// Missing or unusable settings (client secret, URLs).
    #[error("{0}")]
    Config(String),
    #[error("login failed: {0}")]
    Login(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}
