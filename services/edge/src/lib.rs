//! # edge
//!
//! What browsers talk to: Discord OAuth2 login, the room HTTP API (forwarded to room-manager over
//! NATS), the players' page, and per-room WebSocket fan-out of the `ROOMS` stream — in order, with
//! recovery after reconnects and a cap on slow clients.
//!
//! ## Layout
//! - [`Settings`]: the common sections plus `discord` (token, REST base).
//! - [`Application`]: build (connect NATS, ensure the stream, bind HTTP) and run until stopped.
//!
//! Login, the API and the WebSocket arrive with the edge issue; this crate is already a complete
//! service skeleton: settings, NATS, health, metrics and graceful shutdown.

use std::future::Future;

use serde::{Deserialize, Serialize};
use voicerooms_platform::settings::{self, CheckSettings, CommonSettings};
use voicerooms_platform::{Service, ServiceBuilder, SettingsError};

/// Service name: logs, metrics, alerts subject, NATS client name.
pub const SERVICE: &str = "edge";
/// Default HTTP port (health, readiness, metrics).
pub const DEFAULT_PORT: u16 = 8080;

/// The sections this service reads besides the common ones (none yet).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeSettings {}

impl CheckSettings for EdgeSettings {
    fn check(&self) -> Result<(), SettingsError> {
        Ok(())
    }
}

pub type Settings = settings::Settings<EdgeSettings>;

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
