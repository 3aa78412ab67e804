//! gateway-listener as a service: health, readiness, shutdown and configuration.

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
    crate_name: gateway_listener,
    bin: env!("CARGO_BIN_EXE_gateway-listener"),
    // A simulator address: without a token, Discord's real API is refused at start-up.
    env: [("VOICEROOMS__DISCORD__API_BASE", "http://127.0.0.1:9/api/v10")],
    bad_config: [
        ("VOICEROOMS__HTTP__PORT", "eighty", "http.port"),
        ("VOICEROOMS__DISCORD__API_BASE", "https://discord.com/api/v10", "discord.token"),
        ("VOICEROOMS__DISCORD__API_BASE", "ftp://discord", "discord.api_base"),
    ],
);
