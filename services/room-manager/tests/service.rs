//! room-manager as a service: health, readiness, shutdown and configuration.

voicerooms_testkit::service_conformance_tests!(
    crate_name: room_manager,
    bin: env!("CARGO_BIN_EXE_room-manager"),
    bad_config: [
        ("VOICEROOMS__HTTP__PORT", "eighty", "http.port"),
        ("VOICEROOMS__DISCORD__API_BASE", "ftp://discord", "discord.api_base"),
    ],
);
