//! # room-manager
//!
//! Creates, joins and closes rooms — a private Discord voice channel and role per room, capacity 4
//! across replicas, signed invite tokens, automatic voice placement, cleanup of idle rooms — as a
//! request/reply API on `roommgr.v1.<command>`, publishing `room.*` events to the `ROOMS` stream.
//!
//! ## Layout
//! - [`Settings`]: the common sections plus `discord` (token, REST base).
//! - [`Application`]: build (connect NATS, ensure the stream, bind HTTP) and run until stopped.
//!
//! The room API, Discord REST client and cleanup arrive with the room-manager issue; this crate is
//! already a complete service skeleton: settings, NATS, health, metrics and graceful shutdown.

use std::future::Future;

use serde::{Deserialize, Serialize};
use voicerooms_platform::settings::{self, CheckSettings, CommonSettings, DiscordSettings};
use voicerooms_platform::{Service, ServiceBuilder, SettingsError};

/// Service name: logs, metrics, alerts subject, NATS client name.
pub const SERVICE: &str = "room-manager";
/// Default HTTP port (health, readiness, metrics).
pub const DEFAULT_PORT: u16 = 8082;

/// The sections this service reads besides the common ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomManagerSettings {
    pub discord: DiscordSettings,
}

impl CheckSettings for RoomManagerSettings {
    fn check(&self) -> Result<(), SettingsError> {
        self.discord.check()
    }
}

pub type Settings = settings::Settings<RoomManagerSettings>;

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
