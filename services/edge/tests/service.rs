//! edge as a service: health, readiness, shutdown and configuration.

voicerooms_testkit::service_conformance_tests!(
    crate_name: edge,
    bin: env!("CARGO_BIN_EXE_edge"),
    bad_config: [
        ("VOICEROOMS__HTTP__PORT", "eighty", "http.port"),
        ("VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS", "0", "shutdown.grace_period_ms"),
    ],
);
