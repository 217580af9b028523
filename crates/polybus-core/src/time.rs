//! RFC 3339 timestamps (the CloudEvents `time` attribute) without a date-time dependency.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Formats `t` as RFC 3339 in UTC with microsecond precision, e.g. `2026-11-21T23:25:10.123456Z`.
/// Times before 1970 are clamped to the epoch, times after 9999 to `9999-12-31T23:59:59.999999Z`
/// (RFC 3339 has four-digit years: anything later would not parse back).
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
/// assert_eq!(polybus_core::time::format_rfc3339(t), "2023-11-14T22:13:20.123456Z");
/// ```
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let (hh, mm, ss, us) = (rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros());
    let year = match u32::try_from(y) {
        Ok(year) if year <= 9999 => year,
        _ => return LATEST.to_owned(),
    };
    // Every event carries its time, so this runs once per publish: digits by hand rather than
    // through `format!` (about twenty times fewer instructions).
    let mut buf = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, u64::from(year));
    put(5, 2, u64::from(m));
    put(8, 2, u64::from(day));
    put(11, 2, hh);
    put(14, 2, mm);
    put(17, 2, ss);
    put(20, 6, u64::from(us));
    // ASCII digits and separators only, so this never falls back to the empty string.
    std::str::from_utf8(&buf)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// The latest time [`format_rfc3339`] writes.
const LATEST: &str = "9999-12-31T23:59:59.999999Z";

/// Parses an RFC 3339 timestamp (`T` or `t` or space separator, optional fraction of up to 9
/// digits, `Z` or a `±HH:MM` offset). Returns `None` for anything else, never panics.
///
/// ```
/// use polybus_core::time::{format_rfc3339, parse_rfc3339};
/// let t = parse_rfc3339("2023-11-14T23:13:20.5+01:00").unwrap();
/// assert_eq!(format_rfc3339(t), "2023-11-14T22:13:20.500000Z");
/// assert!(parse_rfc3339("yesterday").is_none());
/// ```
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || !s.is_ascii() {
        return None;
    }
    // Digits by hand rather than `str::parse` (this runs for every received event).
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        b.get(r)?.iter().try_fold(0u64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || min > 59
        || sec > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: u64 = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        let kept = &digits[..digits.len().min(9)];
        nanos = kept.parse::<u64>().ok()? * 10u64.pow(9 - kept.len() as u32);
    }
    let offset_secs: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)? as i64, num(i + 4..i + 6)? as i64);
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = days * 86_400 + (hour * 3600 + min * 60 + sec) as i64 - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos as u32))
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// About 30 years: where [`deadline_after`] puts a deadline too far for the clock.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `Instant::now() + after`, without the panic of `Instant + Duration` when `after` is too
/// large for the clock (`Duration::MAX` as a timeout, a nack delay or a TTL): such a deadline
/// lies about 30 years ahead, which every caller treats as "never".
///
/// ```
/// use std::time::Duration;
/// let soon = polybus_core::time::deadline_after(Duration::from_secs(1));
/// let never = polybus_core::time::deadline_after(Duration::MAX);
/// assert!(never > soon);
/// ```
pub fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found by the `kafka` fuzz target: a record timestamp in the year 2285384 became the
    /// event time, written as `2285384-04-02T23:52:07.941000Z`, which no consumer parses (a
    /// `Codec` error on every binding). So is an instant past 9999 given with an offset.
    #[test]
    fn times_after_9999_are_clamped_to_the_last_representable_one() {
        let far = UNIX_EPOCH + Duration::from_millis(72_057_594_037_927_941);
        assert_eq!(format_rfc3339(far), LATEST);
        let t = parse_rfc3339("9999-12-31T23:30:00-01:00").expect("valid RFC 3339");
        assert_eq!(format_rfc3339(t), LATEST);
        let latest = parse_rfc3339(LATEST).expect("parses");
        assert_eq!(format_rfc3339(latest), LATEST);
        assert_eq!(
            format_rfc3339(SystemTime::UNIX_EPOCH + Duration::MAX / 2),
            LATEST
        );
    }

    #[test]
    fn formats_like_format_macro() {
        for secs in [
            0u64,
            59,
            86_399,
            951_782_400,
            1_700_000_000,
            4_102_444_800,
            253_402_300_799,
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, 123_456_789);
            let d = t.duration_since(UNIX_EPOCH).unwrap();
            let (days, rem) = (d.as_secs() / 86_400, d.as_secs() % 86_400);
            let (y, m, day) = civil_from_days(days as i64);
            let expected = format!(
                "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60,
                d.subsec_micros()
            );
            assert_eq!(format_rfc3339(t), expected);
        }
        // Past year 9999: the last time RFC 3339 can write (see the clamping test).
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(format_rfc3339(far), LATEST);
    }

    #[test]
    fn known_dates() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = parse_rfc3339("2024-02-29T12:00:00Z").unwrap();
        assert_eq!(format_rfc3339(leap), "2024-02-29T12:00:00.000000Z");
        assert!(parse_rfc3339("2023-02-29T12:00:00Z").is_none());
        assert!(parse_rfc3339("2023-13-01T00:00:00Z").is_none());
        assert!(parse_rfc3339("2023-01-01T00:00:00").is_none());
        assert!(parse_rfc3339("2023-01-01T00:00:00.Z").is_none());
        assert!(parse_rfc3339("1969-12-31T23:59:59Z").is_none());
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(micros in 0u64..8_000_000_000_000_000) {
            let t = UNIX_EPOCH + Duration::from_micros(micros);
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_rfc3339(&s);
        }
    }
}
