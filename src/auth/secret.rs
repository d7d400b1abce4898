//! Telling a pasted credential from a name or a path, so that a secret written where a
//! variable name or a file path belongs is refused without being echoed.

/// Whether a value written where a variable name or a path belongs looks like a credential:
/// a Private Integration Token (`pit-…`), a JWT (`eyJ….….…`, the form of OAuth access
/// tokens), a bearer header, a UUID, or long random-looking text (hex, or letters of both
/// cases and digits changing class at almost every other character, as generated keys do and
/// names like `HL_TOKEN_Acme2024` do not).
pub fn looks_like_secret(value: &str) -> bool {
    let v = value.trim();
    let lower = v.to_ascii_lowercase();
    let digits = v.bytes().filter(u8::is_ascii_digit).count();
    if lower.starts_with("bearer ")
        || (lower.starts_with("pit-") && v.len() >= 20 && digits >= 4 && !v.contains(['/', '.']))
    {
        return true;
    }
    if v.starts_with("eyJ") && v.len() >= 30 && v.split('.').count() >= 3 {
        return true;
    }
    let is_uuid = v.len() == 36
        && v.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    if is_uuid {
        return true;
    }
    if v.len() < 24 || v.contains(['/', '\\', ' ', '.']) {
        return false;
    }
    if v.len() >= 32
        && v.bytes().all(|b| b.is_ascii_hexdigit())
        && v.bytes().any(|b| b.is_ascii_digit())
        && v.bytes().any(|b| b.is_ascii_alphabetic())
    {
        return true;
    }
    let class = |b: u8| match b {
        b'a'..=b'z' => 0,
        b'A'..=b'Z' => 1,
        b'0'..=b'9' => 2,
        _ => 3,
    };
    let bytes = v.as_bytes();
    let has = |c| bytes.iter().any(|&b| class(b) == c);
    let changes = bytes
        .windows(2)
        .filter(|w| class(w[0]) != class(w[1]))
        .count();
    has(0) && has(1) && has(2) && changes * 100 >= (bytes.len() - 1) * 45
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_told_from_names_and_paths() {
        for secret in [
            "pit-7d3f2a9e-1b4c-4e8a-9f21-0c5d6b7a8e90",
            "PIT-7D3F2A9E-1B4C-4E8A-9F21-0C5D6B7A8E90",
            "7d3f2a9e-1b4c-4e8a-9f21-0c5d6b7a8e90",
            "eyJhbGciOiJIUzI1NiJ9.eyJsb2NhdGlvbklkIjoiTDEifQ.c2lnbmF0dXJl",
            "Bearer abc",
            "8d938f9b0f0239e089feeef1c664096a0a4b43a3",
            "aEVkWGqIEh5S-KzpZNrdw2X6",
            "9a_wBeOpnVb40m8ArjBnAZZM",
        ] {
            assert!(looks_like_secret(secret), "{secret}");
        }
        for name in [
            "HL_TOKEN",
            "HL_TOKEN_ACME",
            "HL_TOKEN_AGENCY_LOCATION_0001",
            "HL_TOKEN_Acme2024_Location",
            "MyCompanyToken2024Production",
            "tokens/acme.token",
            "pit-token.txt",
            "/run/secrets/hl-token-location-2024",
            "hl-token-location-2024.txt",
        ] {
            assert!(!looks_like_secret(name), "{name}");
        }
    }
}
