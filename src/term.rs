//! Text from outside (the API's `message`, `traceId` and ids, OAuth's `error_description`, a
//! redirect's query, a file's contents) made safe to print on a terminal.
//!
//! A server that puts `ESC ] 0 ; … BEL` or `ESC [ 2J` in an error message could otherwise
//! retitle or clear the user's terminal, hide lines, or (through a terminal's answerback and
//! paste features) do worse; a newline in it could forge a line such as `error: …` or
//! `hint: …`; a bidi override could make a printed name read backwards. [`escape`] shows
//! every such character as a visible Rust-style escape (`\u{1b}`), so the text still says
//! what the server sent.
//!
//! Where it is applied, and why there:
//! - at the source, where server text is captured into an error
//!   ([`crate::api::ApiError`]'s `Display`, the OAuth redirect's error): only there can a
//!   newline the server sent be told from the newline before our own `hint:` line;
//! - at the printing boundary, with [`escape_text`], which keeps our newlines: the final
//!   error line in `main`, the text log formatter ([`log_fields`]) and the reports printed
//!   for people. JSON output is left alone: JSON escapes control characters itself.
//!
//! Escaping is idempotent (a backslash is not escaped), so text escaped at the source and
//! again at the boundary reads the same.

use std::borrow::Cow;
use std::fmt::Write as _;

/// True for a character that must not reach a terminal raw: C0 controls (tab and newline
/// included), DEL, C1 controls, and the Unicode bidirectional formatting characters
/// (embeddings, overrides, isolates and marks).
pub fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}')
}

/// Escapes every unsafe character (see [`is_unsafe`]), newlines and tabs included: for one
/// value from outside (a message, an id, a name) that must stay on its line.
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_except(s, |_| false)
}

/// Escapes unsafe characters but keeps newlines and tabs: for whole messages whose line
/// structure is ours (an error chain with `hint:` lines, a report), where values from
/// outside were escaped with [`escape`] when they were captured.
pub fn escape_text(s: &str) -> Cow<'_, str> {
    escape_except(s, |c| c == '\n' || c == '\t')
}

fn escape_except(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_unsafe(c) && !keep(c) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                // Writing to a String cannot fail.
                _ => {
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A `Display` of a value from outside, escaped with [`escape`]: for `format!` and error
/// attributes without an intermediate `String`.
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&escape(self.0))
    }
}

/// The field formatter of the text logs: `name=value` pairs separated by spaces, the
/// `message` field bare, every field escaped with [`escape`] (one event stays one line).
///
/// tracing-subscriber 0.3.23 escapes ESC, BEL, BS, FF, DEL and C1 controls in the
/// `message` field and in fields recorded as `&dyn Error`, but writes every other field
/// raw: `error = %e` (how this crate logs errors) put a server's escape sequences on the
/// terminal. It never escapes newlines or bidi overrides.
pub fn log_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static
{
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(
        |w: &mut tracing_subscriber::fmt::format::Writer<'_>,
         field: &tracing::field::Field,
         value: &dyn std::fmt::Debug| {
            let text = format!("{value:?}");
            match field.name() {
                "message" => w.write_str(&escape(&text)),
                name => write!(w, "{}={}", name.trim_start_matches("r#"), escape(&text)),
            }
        },
    )
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_shows_terminal_sequences_as_visible_text() {
        let hostile = "bad\x1b]0;pwned\x07\x1b[2J\r\nerror: forged\u{9b}31m\u{202e}txt.exe\u{7f}";
        let shown = escape(hostile);
        assert_eq!(
            shown,
            "bad\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\\nerror: forged\\u{9b}31m\\u{202e}txt.exe\\u{7f}"
        );
        assert!(!shown.chars().any(is_unsafe));
    }

    #[test]
    fn escape_text_keeps_our_newlines_and_tabs_only() {
        assert_eq!(
            escape_text("a\x1b[2J\tb\nhint: c\r"),
            "a\\u{1b}[2J\tb\nhint: c\\r"
        );
    }

    #[test]
    fn escaping_is_idempotent_and_leaves_plain_text_borrowed() {
        let once = escape("x\x1by\u{2066}").into_owned();
        assert_eq!(escape(&once), once);
        assert!(matches!(
            escape("plain, ünïcödé, 日本, C:\\path"),
            Cow::Borrowed(_)
        ));
        assert_eq!(Escaped("a\x07").to_string(), "a\\u{7}");
    }
}
