//! The one check for ids given by a user (on the command line or in a pipeline file) before
//! they go into a request path or a directory name.
//!
//! HighLevel ids (locations, businesses, contacts) are short ASCII keys. Anything else is a
//! mistake (a pasted URL, a whole file, a stray quote) better reported at once, with the
//! flag that carried it, than sent: a 100 kB id used to fail client-side and be retried for
//! minutes. The same rule keeps a location id safe as a directory name.

/// The longest id accepted; real ids are about 20 characters.
pub const MAX_ID_LEN: usize = 128;

/// Checks one id: 1 to [`MAX_ID_LEN`] ASCII letters, digits, `-`, `_` or `.`, and not `.` or
/// `..`. The error says what is wrong, for a message that names the flag or key.
pub fn check_id(id: &str) -> Result<(), String> {
    const RULE: &str = "ids are 1 to 128 ASCII letters, digits, '-', '_' or '.'";
    if id.is_empty() {
        return Err(format!("the id is empty: {RULE}"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "the id is {} bytes long ('{}'): {RULE}",
            id.len(),
            super::error::printable(id, 40)
        ));
    }
    if let Some((at, c)) = id
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "'{}' has {} at position {}: {RULE}",
            super::error::printable(id, 80),
            if c == ' ' {
                "a space".to_owned()
            } else {
                format!("'{}'", c.escape_default())
            },
            at + 1
        ));
    }
    if id == "." || id == ".." {
        return Err(format!("'{id}' is not an id: {RULE}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_ascii_keys() {
        assert!(check_id("ve9EPM428h8vShlRW1KT").is_ok());
        assert!(check_id("a-b_c.d").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "a\u{1b}[31m", "é", "a?x=1"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(100_000);
        let e = check_id(&long).unwrap_err();
        assert!(e.contains("100000 bytes long"), "{e}");
        assert!(e.len() < 300, "the message does not repeat the id: {e}");
        let e = check_id("a\u{1b}b").unwrap_err();
        assert!(!e.contains('\u{1b}'), "{e:?}");
    }
}
