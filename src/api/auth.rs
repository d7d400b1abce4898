//! Where the bearer token comes from: a static token (Private Integration Token, or an access
//! token from the environment), or a source that can refresh it (OAuth, see `crate::auth`).

use futures::future::BoxFuture;
use reqwest::header::HeaderValue;

use super::error::ApiError;

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// The `Authorization` header value for this token, marked sensitive so it is never
    /// printed by the HTTP stack.
    pub fn header_value(&self) -> HeaderValue {
        // Token::new admits only visible ASCII, which is always a valid header value.
        let mut h = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .unwrap_or(HeaderValue::from_static("Bearer"));
        h.set_sensitive(true);
        h
    }

    /// The token itself, for code that must send it elsewhere (an OAuth token store).
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Accepts a token as read from a variable or file (surrounding whitespace removed).
    pub fn new(raw: &str) -> Result<Token, String> {
        let t = raw.trim();
        if t.is_empty() {
            return Err("the token is empty".into());
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token contains spaces or non-ASCII characters".into());
        }
        Ok(Token(t.to_owned()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_never_printed() {
        let t = Token::new(" pit-secret-123 \n").unwrap();
        assert_eq!(format!("{t:?}"), "Token(***)");
        assert!(Token::new("  ").is_err());
        assert!(Token::new("a b").is_err());
    }
}
