//! edge as a service: health, readiness, shutdown and configuration.

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

voicerooms_testkit::service_conformance_tests!(
    crate_name: edge,
    bin: env!("CARGO_BIN_EXE_edge"),
    bad_config: [
        ("VOICEROOMS__HTTP__PORT", "eighty", "http.port"),
        ("VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS", "0", "shutdown.grace_period_ms"),
    ],
);
