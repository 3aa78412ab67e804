//! Property tests over everything room-manager reads from Discord or from its own state: rate
//! limit headers and 429 bodies (any string, any number), error bodies, the limiter's route key,
//! invite tokens, and stored records. None may panic; every number stays bounded.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects,
    clippy::unreachable
)]

use std::time::{Duration, Instant};

use proptest::prelude::*;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use room_manager::discord::limits::{self, MAX_RETRY_AFTER};
use room_manager::discord::{Channel, Role};
use room_manager::invite::InviteSigner;
use room_manager::store::{CleanupEntry, OwnerIndex, RoomRecord};

/// A header value as Discord (or anything between us) could send it: numbers of every size and
/// form, and arbitrary visible text.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|f| f.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (any::<u64>(), 0u32..400).prop_map(|(m, e)| format!("{m}e{e}")),
        Just("1.8446744073709552e19".to_owned()),
        Just("NaN".to_owned()),
        Just("-inf".to_owned()),
        "[ -~]{0,40}",
    ]
}

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(HeaderName::from_static(k), v);
        }
    }
    h
}

proptest! {
    #[test]
    fn any_rate_limit_headers_parse_without_panic_and_stay_bounded(
        bucket in "[ -~]{0,200}",
        limit in header_value(),
        remaining in header_value(),
        reset_after in header_value(),
        reserve in any::<u16>(),
    ) {
        let now = Instant::now();
        let h = headers(&[
            ("x-ratelimit-bucket", bucket),
            ("x-ratelimit-limit", limit),
            ("x-ratelimit-remaining", remaining),
            ("x-ratelimit-reset-after", reset_after),
        ]);
        if let Some(parsed) = limits::bucket_headers(&h, now, reserve) {
            prop_assert!(parsed.reset_at <= now + MAX_RETRY_AFTER);
            prop_assert!(!parsed.bucket.is_empty() && parsed.bucket.len() <= 128);
        }
    }

    #[test]
    fn any_retry_after_is_a_bounded_wait(body in proptest::option::of(any::<f64>()), header in header_value()) {
        let h = headers(&[("retry-after", header)]);
        let wait = limits::retry_after(body, &h);
        prop_assert!(wait <= MAX_RETRY_AFTER);
    }

    #[test]
    fn any_number_of_seconds_converts_without_panic(secs in any::<f64>()) {
        if let Some(d) = limits::seconds(secs) {
            prop_assert!(d <= MAX_RETRY_AFTER);
            prop_assert!(secs >= 0.0);
        } else {
            prop_assert!(!secs.is_finite() || secs < 0.0);
        }
    }

    #[test]
    fn any_path_has_a_limiter_key_with_the_same_segments(path in "[ -~]{0,200}") {
        let key = limits::limiter_path(&path);
        prop_assert_eq!(key.split('/').count(), path.split('/').count());
    }

    #[test]
    fn any_discord_body_decodes_to_a_value_or_an_error(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<Vec<Channel>>(&body);
        let _ = serde_json::from_slice::<Vec<Role>>(&body);
        let _ = serde_json::from_slice::<Channel>(&body);
    }

    #[test]
    fn any_invite_token_is_verified_or_refused(token in "[ -~]{0,600}") {
        let signer = InviteSigner::new(b"test-invite-secret-0123456789abcdef");
        let _ = signer.verify(&token);
    }

    #[test]
    fn any_stored_value_decodes_to_a_record_or_an_error(value in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = serde_json::from_slice::<RoomRecord>(&value);
        let _ = serde_json::from_slice::<OwnerIndex>(&value);
        let _ = serde_json::from_slice::<CleanupEntry>(&value);
    }
}

#[test]
fn discords_own_headers_parse() {
    let now = Instant::now();
    let h = headers(&[
        (
            "x-ratelimit-bucket",
            "abcd1234cdef1234abcd1234cdef1234".into(),
        ),
        ("x-ratelimit-limit", "5".into()),
        ("x-ratelimit-remaining", "4".into()),
        ("x-ratelimit-reset-after", "1.234".into()),
    ]);
    let parsed = limits::bucket_headers(&h, now, 0).unwrap();
    assert_eq!((parsed.limit, parsed.remaining), (5, 4));
    assert!(parsed.reset_at >= now + Duration::from_millis(1_200));
}
