//! # gateway-listener
//!
//! Holds the bot's Discord Gateway connection and publishes normalized voice and room events to
//! the `ROOMS` stream (`rooms.<guild>.<room>.<kind>`), its connection state on
//! `gateway.<shard>.status` and operator alerts on `ops.alerts.gateway-listener`.
//!
//! ## Layout
//! - [`Settings`]: the common sections plus `discord` (token, REST base).
//! - [`Application`]: build (connect NATS, ensure the stream, bind HTTP) and run until stopped.
//!
//! The gateway connection loop, voice-state cache and failover arrive with the gateway-listener
//! issue; this crate is already a complete service skeleton: settings, NATS, health, metrics and
//! graceful shutdown.

use std::future::Future;

use serde::{Deserialize, Serialize};
use voicerooms_platform::settings::{self, CheckSettings, CommonSettings, DiscordSettings};
use voicerooms_platform::{Service, ServiceBuilder, SettingsError};

/// Service name: logs, metrics, alerts subject, NATS client name.
pub const SERVICE: &str = "gateway-listener";
/// Default HTTP port (health, readiness, metrics).
pub const DEFAULT_PORT: u16 = 8081;

/// The sections this service reads besides the common ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewaySettings {
    pub discord: DiscordSettings,
}

impl CheckSettings for GatewaySettings {
    fn check(&self) -> Result<(), SettingsError> {
        self.discord.check()
    }
}

pub type Settings = settings::Settings<GatewaySettings>;

/// Loads settings from the environment (and `VOICEROOMS_CONFIG_FILE`).
pub fn load_settings() -> Result<Settings, SettingsError> {
    settings::load(CommonSettings::with_port(DEFAULT_PORT))
}

/// The built service.
pub struct Application {
    service: Service,
}

impl Application {
    /// Connects to NATS (retrying in the background), ensures the ROOMS stream, binds HTTP.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let builder = ServiceBuilder::new(SERVICE, &settings.common).await?;
        tracing::info!(
            discord_api = %settings.service.discord.api_base,
            discord_token_set = settings.service.discord.token.is_some(),
            "configured"
        );
        let stream_check = builder.ensure_rooms_stream();
        let service = builder.start(vec![stream_check], |_| {})?;
        Ok(Self { service })
    }

    /// The bound HTTP port.
    pub fn port(&self) -> u16 {
        self.service.port()
    }

    /// Runs until `shutdown` resolves, then stops gracefully.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.service.run_until_stopped(shutdown).await
    }
}
