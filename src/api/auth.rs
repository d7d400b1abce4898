//! Where the bearer token comes from: a static token (Private Integration Token, or an access
//! token from the environment), or a source that can refresh it (OAuth, see `crate::auth`).

use futures::future::BoxFuture;
use reqwest::header::HeaderValue;

use super::client::Token;
use super::error::ApiError;

/// Supplies the `Authorization` header of every request.
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    /// The header to send now (`Bearer …`, marked sensitive). A refreshing source renews the
    /// token here shortly before it expires.
    fn current(&self) -> BoxFuture<'_, Result<HeaderValue, ApiError>>;

    /// The server answered 401 to `refused`. Return `true` when a new token is now current
    /// (the request is then sent once more), `false` when there is no way to get one. Many
    /// requests may report the same refused token: refresh once, not once each.
    fn refresh<'a>(&'a self, refused: &'a HeaderValue) -> BoxFuture<'a, Result<bool, ApiError>>;
}

/// A token that never changes.
#[derive(Debug)]
pub struct StaticToken(HeaderValue);

impl StaticToken {
    pub fn new(token: &Token) -> StaticToken {
        StaticToken(token.header_value())
    }
}

impl TokenSource for StaticToken {
    fn current(&self) -> BoxFuture<'_, Result<HeaderValue, ApiError>> {
        let h = self.0.clone();
        Box::pin(async move { Ok(h) })
    }

    fn refresh<'a>(&'a self, _refused: &'a HeaderValue) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(async { Ok(false) })
    }
}
