//! ISO 8601 timestamps <-> epoch milliseconds.
//!
//! The API writes `2021-07-02T05:18:26.704Z` for most dates, `2021-07-16 11:00:00` (no zone,
//! taken as UTC) for appointment times, and sometimes epoch milliseconds. Parsing sits on the
//! hot path of every row, so the text is scanned by hand over bytes rather than by a general
//! date parser; only the calendar question (is `2021-02-31` a day? which day number is it?) is
//! asked of `chrono`, which arrow already builds (no build cost: no feature beyond those arrow
//! enables) and which costs nothing measurable in `benches/hotpath.rs` (BENCHMARKS.md).
//!
//! A text that names no real instant (February 30, April 31, February 29 of a common year,
//! month 13, hour 24, minute 60, an offset of `+24:00` or more) is not a timestamp: parsing
//! returns `None`, so the export keeps the value in `_extra` as received and the import
//! rejects the row, exactly as for any other text. A second of `60` is accepted as a leap
//! second (ISO 8601 allows it) and counts as the next minute's first second.

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian), or `None` when the
/// date does not exist (`2021-02-31`, month 13).
fn days_from_civil(y: u32, m: u32, d: u32) -> Option<i64> {
    /// `num_days_from_ce` of 1970-01-01.
    const EPOCH_FROM_CE: i64 = 719_163;
    let date = chrono::NaiveDate::from_ymd_opt(i32::try_from(y).ok()?, m, d)?;
    Some(i64::from(chrono::Datelike::num_days_from_ce(&date)) - EPOCH_FROM_CE)
}

/// The civil date (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() {
        return None;
    }
    let mut v: u32 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u32::from(c - b'0'))?;
    }
    Some(v)
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS[.fff…]]` with `T` or a space, and an optional
/// `Z` or `±HH:MM` / `±HHMM` offset (none means UTC). Fractions beyond milliseconds are
/// truncated. Returns epoch milliseconds, or `None` when the text is not such a timestamp or
/// names a day, time or offset that does not exist (`2021-02-31`, `25:00`, `+24:00`).
pub fn parse_iso_millis(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y = digits(&b[0..4])?;
    let mo = digits(&b[5..7])?;
    let d = digits(&b[8..10])?;
    let mut ms: i64 = days_from_civil(y, mo, d)? * 86_400_000;
    let rest = &b[10..];
    if rest.is_empty() {
        return Some(ms);
    }
    if rest[0] != b'T' && rest[0] != b' ' {
        return None;
    }
    let t = &rest[1..];
    if t.len() < 5 || t[2] != b':' {
        return None;
    }
    let h = digits(&t[0..2])?;
    let mi = digits(&t[3..5])?;
    let mut i = 5;
    let mut sec = 0;
    if t.len() >= 8 && t[5] == b':' {
        sec = digits(&t[6..8])?;
        i = 8;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    ms += i64::from(h * 3600 + mi * 60 + sec) * 1000;
    if i < t.len() && (t[i] == b'.' || t[i] == b',') {
        i += 1;
        let start = i;
        let mut frac: i64 = 0;
        let mut scale = 100;
        while i < t.len() && t[i].is_ascii_digit() {
            frac += i64::from(t[i] - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
        ms += frac;
    }
    let zone = &t[i..];
    match zone {
        [] | [b'Z'] | [b'z'] => Some(ms),
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (oh, om) = match rest {
                [a, b, b':', c, d] | [a, b, c, d] => (digits(&[*a, *b])?, digits(&[*c, *d])?),
                [a, b] => (digits(&[*a, *b])?, 0),
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let off = i64::from(oh * 60 + om) * 60_000;
            Some(if *sign == b'+' { ms - off } else { ms + off })
        }
        _ => None,
    }
}

/// Formats epoch milliseconds as the API does: `2021-07-02T05:18:26.704Z`.
pub fn format_iso_millis(ms: i64) -> String {
    let mut s = String::with_capacity(24);
    write_iso_millis(&mut s, ms);
    s
}

/// Appends `format_iso_millis(ms)` to `out` without allocating.
pub fn write_iso_millis(out: &mut String, ms: i64) {
    use std::fmt::Write;
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, f) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    // Writing to a String cannot fail.
    let _ = write!(out, "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{f:03}Z");
}

/// Now, in milliseconds since the epoch (0 on a clock before 1970).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_api_timestamps() {
        for s in [
            "2021-07-02T05:18:26.704Z",
            "1970-01-01T00:00:00.000Z",
            "1969-12-31T23:59:59.999Z",
            "2400-02-29T12:00:00.001Z",
        ] {
            let ms = parse_iso_millis(s).unwrap();
            assert_eq!(format_iso_millis(ms), s);
        }
        assert_eq!(
            parse_iso_millis("2021-07-02T05:18:26.704Z"),
            Some(1_625_203_106_704)
        );
    }

    #[test]
    fn parses_zoneless_offsets_and_dates() {
        assert_eq!(
            parse_iso_millis("2021-07-16 11:00:00"),
            parse_iso_millis("2021-07-16T11:00:00.000Z")
        );
        assert_eq!(
            parse_iso_millis("2021-07-16T13:00:00+02:00"),
            parse_iso_millis("2021-07-16T11:00:00Z")
        );
        assert_eq!(
            parse_iso_millis("2021-07-16T06:30:00-0430"),
            parse_iso_millis("2021-07-16T11:00:00Z")
        );
        assert_eq!(
            parse_iso_millis("2021-07-16"),
            parse_iso_millis("2021-07-16T00:00:00Z")
        );
        assert_eq!(
            parse_iso_millis("2021-07-16T11:00:00.123456Z"),
            Some(parse_iso_millis("2021-07-16T11:00:00Z").unwrap() + 123)
        );
    }

    #[test]
    fn rejects_non_timestamps() {
        for s in [
            "",
            "yesterday",
            "2021-13-01",
            "2021-07-16X11:00",
            "2021-07-16T11:00:00Q",
            "1625203106704",
            "2021-07-16T25:00:00Z",
        ] {
            assert_eq!(parse_iso_millis(s), None, "{s}");
        }
    }

    /// Regression (issue 12): `2021-02-31` used to parse as March 3, so the export stored a
    /// day the API never sent instead of keeping the text in `_extra`.
    #[test]
    fn impossible_calendar_dates_are_not_timestamps() {
        for s in [
            "2021-02-31",
            "2021-02-30T10:00:00Z",
            "2021-04-31",
            "2021-06-31 08:00:00",
            "2023-02-29",
            "1900-02-29T00:00:00.000Z",
            "2021-00-10",
            "2021-13-01",
            "2021-01-00",
            "2021-01-32",
            "2021-07-16T24:00:00Z",
            "2021-07-16T11:60:00Z",
            "2021-07-16T11:00:61Z",
            "2021-07-16T11:00:00+24:00",
            "2021-07-16T11:00:00-0060",
            "2021-07-16T11:00:00+99",
        ] {
            assert_eq!(parse_iso_millis(s), None, "{s}");
        }
        // The last day of each month, leap days and a leap second still parse.
        for (s, want) in [
            ("2024-02-29", "2024-02-29T00:00:00.000Z"),
            ("2000-02-29T12:00:00Z", "2000-02-29T12:00:00.000Z"),
            ("2021-04-30", "2021-04-30T00:00:00.000Z"),
            ("2021-12-31T23:59:60Z", "2022-01-01T00:00:00.000Z"),
            ("2021-07-16T11:00:00+23:59", "2021-07-15T11:01:00.000Z"),
        ] {
            assert_eq!(
                parse_iso_millis(s).map(format_iso_millis).as_deref(),
                Some(want),
                "{s}"
            );
        }
    }

    /// The parser's day numbers (chrono) and the formatter's (`civil_from_days`) agree on
    /// every day of every four-digit year.
    #[test]
    fn every_day_of_years_0000_to_9999_round_trips() {
        let first = days_from_civil(0, 1, 1).expect("a day");
        let last = days_from_civil(9999, 12, 31).expect("a day");
        let mut text = String::new();
        for day in first..=last {
            let (y, m, d) = civil_from_days(day);
            let (y, m, d) = (u32::try_from(y).expect("a four-digit year"), m, d);
            assert_eq!(days_from_civil(y, m, d), Some(day), "{y:04}-{m:02}-{d:02}");
            text.clear();
            write_iso_millis(&mut text, day * 86_400_000);
            assert_eq!(parse_iso_millis(&text), Some(day * 86_400_000), "{text}");
        }
    }
}
