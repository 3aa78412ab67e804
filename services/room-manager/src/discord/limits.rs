//! Reading Discord's rate-limit answers without trusting them: every number Discord controls
//! (`retry_after`, `X-RateLimit-*`) is parsed with checked conversions and clamped, so no header
//! value can panic the service or make it wait for ever. Also the key the limiter queues a
//! request under, and the share of a bucket one replica may spend.

use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use twilight_http_ratelimiting::RateLimitHeaders;

/// Longest wait a single rate-limit answer may impose before we give up on the request.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest bucket id we keep (Discord's are 32 hex characters).
const MAX_BUCKET_ID: usize = 128;

/// Seconds (as Discord writes them: fractional, possibly garbage) to a bounded duration.
/// `None` for anything that is not a finite, non-negative number.
pub fn seconds(value: f64) -> Option<Duration> {
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    // Above MAX_RETRY_AFTER every value means the same; clamping first keeps the conversion
    // in range (from_secs_f64 panics above ~1.8e19 s).
    let clamped = value.min(MAX_RETRY_AFTER.as_secs_f64());
    Duration::try_from_secs_f64(clamped)
        .ok()
        .map(|d| d.min(MAX_RETRY_AFTER))
}

/// `now + d`, saturating far in the future instead of overflowing.
pub fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(MAX_RETRY_AFTER))
        .unwrap_or(now)
}

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The bucket headers of a response, when all of them are present and sane. `reserve`
/// requests of the bucket's remaining count are left to other replicas (see [`reserve`]).
pub fn bucket_headers(headers: &HeaderMap, now: Instant, reserve: u16) -> Option<RateLimitHeaders> {
    let bucket = header_str(headers, RateLimitHeaders::BUCKET)?;
    if bucket.is_empty() || bucket.len() > MAX_BUCKET_ID {
        return None;
    }
    let limit: u16 = header_str(headers, RateLimitHeaders::LIMIT)?
        .trim()
        .parse()
        .ok()?;
    let remaining: u16 = header_str(headers, RateLimitHeaders::REMAINING)?
        .trim()
        .parse()
        .ok()?;
    let reset_after = header_str(headers, RateLimitHeaders::RESET_AFTER)?
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(seconds)?;
    Some(RateLimitHeaders {
        bucket: bucket.as_bytes().to_vec(),
        limit,
        remaining: remaining.saturating_sub(reserve),
        reset_at: after(now, reset_after),
    })
}

/// How long a 429 says to wait: the body's `retry_after`, else the `Retry-After` header, else
/// one second; always bounded by [`MAX_RETRY_AFTER`].
pub fn retry_after(body_value: Option<f64>, headers: &HeaderMap) -> Duration {
    body_value
        .and_then(seconds)
        .or_else(|| {
            header_str(headers, "retry-after")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .and_then(seconds)
        })
        .unwrap_or(Duration::from_secs(1))
}

/// Requests of a bucket one replica leaves to the others: with `replicas` processes sharing the
/// bot's buckets and each sending at most one request per bucket at a time, a replica that stops
/// when the bucket's remaining count falls to `replicas - 1` can never send into an empty bucket —
/// every other replica has at most one more request to send before it, too, sees the low count.
pub fn reserve(replicas: u32) -> u16 {
    u16::try_from(replicas.saturating_sub(1)).unwrap_or(u16::MAX)
}

/// The path the limiter queues a request under: the route with its major parameter (the
/// channel or guild id) kept and every other id replaced, because Discord's buckets are per
/// route and major parameter. Keyed by the full path, every new member or role would be an
/// unknown route whose first request goes out without regard to the bucket it shares.
pub fn limiter_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let is_id = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
        // Segment 1 is the major parameter of `channels/{id}` and `guilds/{id}`.
        if is_id && i != 1 {
            out.push_str(":id");
        } else {
            out.push_str(segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn seconds_are_bounded_and_garbage_is_none() {
        assert_eq!(seconds(1.5), Some(Duration::from_millis(1500)));
        assert_eq!(seconds(0.0), Some(Duration::ZERO));
        assert_eq!(seconds(1.9e19), Some(MAX_RETRY_AFTER));
        assert_eq!(seconds(f64::MAX), Some(MAX_RETRY_AFTER));
        assert_eq!(seconds(f64::INFINITY), None);
        assert_eq!(seconds(f64::NAN), None);
        assert_eq!(seconds(-1.0), None);
    }

    #[test]
    fn huge_reset_after_and_retry_after_do_not_panic() {
        let now = Instant::now();
        let h = headers(&[
            ("x-ratelimit-bucket", "abc"),
            ("x-ratelimit-limit", "5"),
            ("x-ratelimit-remaining", "4"),
            ("x-ratelimit-reset-after", "18446744073709551616.5"),
            ("retry-after", "1e300"),
        ]);
        let parsed = bucket_headers(&h, now, 0).unwrap();
        assert!(parsed.reset_at <= after(now, MAX_RETRY_AFTER));
        assert_eq!(retry_after(Some(1.0e20), &h), MAX_RETRY_AFTER);
        assert_eq!(retry_after(None, &h), MAX_RETRY_AFTER);
    }

    #[test]
    fn bucket_headers_are_parsed_only_when_complete_and_sane() {
        let now = Instant::now();
        let mut h = headers(&[
            ("x-ratelimit-bucket", "abc"),
            ("x-ratelimit-limit", "5"),
            ("x-ratelimit-remaining", "4"),
        ]);
        assert!(bucket_headers(&h, now, 0).is_none());
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("1.5"));
        let parsed = bucket_headers(&h, now, 0).unwrap();
        assert_eq!((parsed.limit, parsed.remaining), (5, 4));
        assert_eq!(bucket_headers(&h, now, 1).unwrap().remaining, 3);
        assert_eq!(bucket_headers(&h, now, 9).unwrap().remaining, 0);
        for bad in ["NaN", "-1", "inf", "x"] {
            h.insert("x-ratelimit-reset-after", HeaderValue::from_static(bad));
            assert!(bucket_headers(&h, now, 0).is_none(), "{bad}");
        }
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("1"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("70000"));
        assert!(bucket_headers(&h, now, 0).is_none(), "remaining beyond u16");
    }

    #[test]
    fn the_limiter_path_keeps_the_major_parameter_only() {
        assert_eq!(
            limiter_path("guilds/1/members/2/roles/3"),
            "guilds/1/members/:id/roles/:id"
        );
        assert_eq!(limiter_path("guilds/1/members/22"), "guilds/1/members/:id");
        assert_eq!(limiter_path("guilds/1/channels"), "guilds/1/channels");
        assert_eq!(limiter_path("channels/9"), "channels/9");
        assert_eq!(limiter_path("users/@me/guilds"), "users/@me/guilds");
    }

    #[test]
    fn a_replica_reserves_one_request_per_other_replica() {
        assert_eq!(reserve(0), 0);
        assert_eq!(reserve(1), 0);
        assert_eq!(reserve(3), 2);
        assert_eq!(reserve(u32::MAX), u16::MAX);
    }
}
