//! gateway-listener as a service: health, readiness, shutdown and configuration.

voicerooms_testkit::service_conformance_tests!(
    crate_name: gateway_listener,
    bin: env!("CARGO_BIN_EXE_gateway-listener"),
    bad_config: [
        ("VOICEROOMS__HTTP__PORT", "eighty", "http.port"),
        ("VOICEROOMS__DISCORD__API_BASE", "ftp://discord", "discord.api_base"),
    ],
);
