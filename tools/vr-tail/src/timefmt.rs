//! RFC 3339 in UTC with milliseconds, and `--since` values, without a date library: the tail
//! only needs the proleptic Gregorian calendar (Howard Hinnant's `days_from_civil`).

use voicerooms_contract::Millis;

/// `2025-11-25T21:30:00.123Z`.
pub fn rfc3339_ms(ms: Millis) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Parses a `--since` value relative to `now`: RFC 3339 (`Z` or `±HH:MM`, optional fraction),
/// epoch milliseconds (12+ digits), or an age such as `90s`, `15m`, `2h`, `1d`, `500ms`.
pub fn parse_since(s: &str, now: Millis) -> Result<Millis, String> {
    let s = s.trim();
    if s.len() >= 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| format!("{s:?} is out of range"));
    }
    if let Some(age) = parse_age(s) {
        return Ok(now.saturating_sub(age));
    }
    parse_rfc3339(s)
        .ok_or_else(|| format!("{s:?} is neither RFC 3339, epoch milliseconds nor an age like 15m"))
}

fn parse_age(s: &str) -> Option<Millis> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

fn parse_rfc3339(s: &str) -> Option<Millis> {
    let b = s.as_bytes();
    let byte = |i: usize| b.get(i).copied();
    if b.len() < 20
        || byte(4) != Some(b'-')
        || byte(7) != Some(b'-')
        || !matches!(byte(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    let num = |range| num_at(s, range);
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if byte(13) != Some(b':') || byte(16) != Some(b':') {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut frac_ms = 0i64;
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", r.get(..digits.min(3))?);
        frac_ms = padded.parse().ok()?;
        rest = r.get(digits..)?;
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.get(3..4) == Some(":") => {
            let sign = match rest.get(..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            let (oh, om) = (num_at(rest, 1..3)?, num_at(rest, 4..6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            oh.checked_mul(3600)?
                .checked_add(om.checked_mul(60)?)?
                .checked_mul(sign)?
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let time_of_day = h
        .checked_mul(3600)?
        .checked_add(mi.checked_mul(60)?)?
        .checked_add(sec)?;
    let secs = days
        .checked_mul(86_400)?
        .checked_add(time_of_day)?
        .checked_sub(offset_secs)?;
    let ms = secs.checked_mul(1000)?.checked_add(frac_ms)?;
    u64::try_from(ms).ok()
}

/// The digits (only ASCII digits, no sign) of `s` in `range` as a number.
fn num_at(s: &str, range: std::ops::Range<usize>) -> Option<i64> {
    let part = s.get(range)?;
    part.bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| part.parse().ok())?
}

// Howard Hinnant's algorithms. Every caller passes a 4-digit year, a month in 1-12 and a day in
// 1-31 (`days_from_civil`), or a day count below 2^64 / 86,400,000 ms ≈ 2.1e11 (`civil_from_days`),
// so every intermediate value stays below 1e15: no overflow, and every division is by a non-zero
// constant.
#[allow(clippy::arithmetic_side_effects)]
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[allow(clippy::arithmetic_side_effects)] // bounded input: see days_from_civil
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_764_102_000_123), "2025-11-25T20:20:00.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn parses_what_it_formats_and_offsets() {
        for ms in [0, 1_764_102_000_123, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_since(&rfc3339_ms(ms), 0), Ok(ms));
        }
        assert_eq!(
            parse_since("2025-11-25T21:20:00.1+01:00", 0),
            Ok(1_764_102_000_100)
        );
        assert_eq!(
            parse_since("2025-11-25T20:20:00Z", 0),
            Ok(1_764_102_000_000)
        );
    }

    #[test]
    fn ages_and_epoch_millis() {
        assert_eq!(parse_since("15m", 1_000_000), Ok(100_000));
        assert_eq!(parse_since("2h", 10_000_000), Ok(2_800_000));
        assert_eq!(parse_since("500ms", 1000), Ok(500));
        assert_eq!(parse_since("1764102000123", 0), Ok(1_764_102_000_123));
    }

    #[test]
    fn garbage_is_rejected_not_guessed() {
        for bad in [
            "",
            "yesterday",
            "15x",
            "2025-13-01T00:00:00Z",
            "2025-11-25T20:20:00",
            "2025-11-25T20:20:00+01:+1",
            "2025-11-25T20:20:00+24:00",
            "2025-11-25T20:20:00.\u{e9}Z",
            "2025-11-25T20:20:00+\u{e9}:00",
            "\u{1d4d0}\u{1d4d0}\u{1d4d0}\u{1d4d0}\u{1d4d0}\u{1d4d0}",
        ] {
            assert!(parse_since(bad, 0).is_err(), "{bad}");
        }
    }
}
