//! Small helpers: clocks, timestamps, seeded randomness.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, fractional (as in `X-RateLimit-Reset`).
pub fn unix_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// ISO 8601 / RFC 3339 timestamp (UTC, millisecond precision) as Discord sends them.
pub fn iso8601(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let millis = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    civil_iso8601(days, h, m, s, millis)
}

// Civil-from-days (Howard Hinnant's algorithm). `days` is below 2^64 ms / 86,400,000 ≈ 2.1e11, so
// every intermediate value stays below 1e15 (no overflow), and every division is by a non-zero
// constant.
#[allow(clippy::arithmetic_side_effects)]
fn civil_iso8601(days: i64, h: u64, m: u64, s: u64, millis: u64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}000+00:00")
}

/// How far away a deadline of an absurd duration lands instead (about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `from + d` without the overflow panic: durations come from configuration and control
/// requests, and an absurd one means "practically never".
pub fn instant_after(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(FAR_FUTURE))
        .unwrap_or(from)
}

/// [`instant_after`] on tokio's clock (which tests may pause), from now.
pub fn tokio_deadline(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Sets `key` on a JSON object. Every caller builds `value` with `json!({..})` itself; on anything
/// but an object this does nothing (where `value[key] = ..` would panic).
pub fn set(value: &mut serde_json::Value, key: &str, v: serde_json::Value) {
    if let Some(map) = value.as_object_mut() {
        map.insert(key.to_owned(), v);
    }
}

/// The simulator's random source: seeded when the config says so, else from the OS.
pub fn make_rng(seed: Option<u64>) -> StdRng {
    match seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_os_rng(),
    }
}

/// A random lowercase hex string of `len` characters.
pub fn hex_token(rng: &mut StdRng, len: usize) -> String {
    const HEX: &[u8] = b"0123456789abcdef";
    (0..len).map(|_| char::from(pick(rng, HEX))).collect()
}

/// A random URL-safe token of `len` characters (OAuth codes and tokens).
pub fn url_token(rng: &mut StdRng, len: usize) -> String {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..len).map(|_| char::from(pick(rng, ALPHA))).collect()
}

/// A random byte of the non-empty `alphabet`.
fn pick(rng: &mut StdRng, alphabet: &[u8]) -> u8 {
    alphabet
        .get(rng.random_range(0..alphabet.len()))
        .copied()
        .unwrap_or(b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(
            iso8601(1_700_000_000_123),
            "2023-11-14T22:13:20.123000+00:00"
        );
    }

    #[test]
    fn seeded_tokens_repeat() {
        let a = hex_token(&mut make_rng(Some(1)), 16);
        let b = hex_token(&mut make_rng(Some(1)), 16);
        assert_eq!(a, b);
    }
}
