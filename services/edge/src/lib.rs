//! # edge
//!
//! What browsers talk to: the per-room WebSocket fan-out of the `ROOMS` stream — in order, with
//! recovery after reconnects and a cap on slow clients — plus (with the edge issue's later parts)
//! Discord OAuth2 login, the room HTTP API and the players' page.
//!
//! ## Layout
//! - [`protocol`]: the WebSocket protocol v1 (frames, close codes); docs/WEBSOCKET.md.
//! - [`ws`]: one connection — authentication, subscriptions, pings, session re-checks.
//! - [`hub`]: one pump per room: the edge's single NATS interest in it, catch-up from the
//!   stream, serialise-once fan-out, gap repair.
//! - [`outbox`]: a connection's byte-bounded outgoing queue.
//! - [`session`]: signed session cookies; session data in the KV bucket `sessions`.
//! - [`metrics`]: the Prometheus series (`voicerooms_edge_*`).

pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod session;
pub mod ws;

use std::future::Future;
use std::sync::Arc;

use actix_web::web;
use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use voicerooms_platform::nats::LazyBucket;
use voicerooms_platform::settings::{self, positive, CheckSettings, CommonSettings, Secret};
use voicerooms_platform::{Service, ServiceBuilder, SettingsError};

/// Service name: logs, metrics, alerts subject, NATS client name.
pub const SERVICE: &str = "edge";
/// Default HTTP port (page, API, WebSocket, health, metrics).
pub const DEFAULT_PORT: u16 = 8080;

/// WebSocket limits and timings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketSettings {
    /// A connection must authenticate within this time, else it is closed with 4001.
    pub auth_timeout_ms: u64,
    /// The server pings this often.
    pub ping_interval_ms: u64,
    /// A connection silent for this long (no frame, no pong) is closed with 4009.
    pub idle_timeout_ms: u64,
    /// How often a long-lived connection re-checks its session.
    pub session_check_interval_ms: u64,
    /// Bytes a connection may have queued for sending before it is closed with 1008.
    pub max_queue_bytes: usize,
    /// Largest frame accepted from a client.
    pub max_frame_bytes: usize,
    /// Open connections per edge instance.
    pub max_connections: usize,
    /// Open connections per user on this instance.
    pub max_connections_per_user: usize,
    /// Room subscriptions per connection.
    pub max_subscriptions: usize,
    /// Most events replayed for one `since`; beyond it the client gets a fresh snapshot.
    pub replay_limit: u64,
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        Self {
            auth_timeout_ms: 5_000,
            ping_interval_ms: 15_000,
            idle_timeout_ms: 45_000,
            session_check_interval_ms: 60_000,
            max_queue_bytes: 1024 * 1024,
            max_frame_bytes: 16 * 1024,
            max_connections: 200_000,
            max_connections_per_user: 20,
            max_subscriptions: 16,
            replay_limit: 10_000,
        }
    }
}

/// Session cookies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    pub cookie_name: String,
    /// Mark the cookie `Secure` (HTTPS only). On in production.
    pub cookie_secure: bool,
    /// Signing key, at least 32 bytes (secret). Every edge instance needs the same key; when
    /// unset a random one is used and sessions do not survive a restart.
    pub key: Option<Secret>,
    /// Absolute session lifetime.
    pub ttl_secs: u64,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            cookie_name: "vr_session".into(),
            cookie_secure: false,
            key: None,
            ttl_secs: 7 * 24 * 3600,
        }
    }
}

/// The sections this service reads besides the common ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeSettings {
    pub websocket: WebSocketSettings,
    pub session: SessionSettings,
}

impl CheckSettings for EdgeSettings {
    fn check(&self) -> Result<(), SettingsError> {
        let ws = &self.websocket;
        positive("websocket.auth_timeout_ms", ws.auth_timeout_ms)?;
        positive("websocket.ping_interval_ms", ws.ping_interval_ms)?;
        positive(
            "websocket.session_check_interval_ms",
            ws.session_check_interval_ms,
        )?;
        if ws.idle_timeout_ms <= ws.ping_interval_ms {
            return Err(SettingsError::invalid(
                "websocket.idle_timeout_ms",
                "must be longer than websocket.ping_interval_ms",
            ));
        }
        if ws.max_queue_bytes < 4096 {
            return Err(SettingsError::invalid(
                "websocket.max_queue_bytes",
                "must be at least 4096",
            ));
        }
        if !(256..=1024 * 1024).contains(&ws.max_frame_bytes) {
            return Err(SettingsError::invalid(
                "websocket.max_frame_bytes",
                "must be 256-1048576",
            ));
        }
        positive("websocket.max_connections", ws.max_connections as u64)?;
        positive(
            "websocket.max_connections_per_user",
            ws.max_connections_per_user as u64,
        )?;
        positive("websocket.max_subscriptions", ws.max_subscriptions as u64)?;
        positive("websocket.replay_limit", ws.replay_limit)?;
        let session = &self.session;
        if session.cookie_name.is_empty()
            || !session
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(SettingsError::invalid(
                "session.cookie_name",
                "use [A-Za-z0-9_-]",
            ));
        }
        if let Some(key) = &session.key {
            if key.expose().len() < 32 {
                return Err(SettingsError::invalid(
                    "session.key",
                    "must be at least 32 bytes (value not shown); generate one with `openssl rand -base64 48`",
                ));
            }
        }
        positive("session.ttl_secs", session.ttl_secs)?;
        Ok(())
    }
}

pub type Settings = settings::Settings<EdgeSettings>;

/// Loads settings from the environment (and `VOICEROOMS_CONFIG_FILE`).
pub fn load_settings() -> Result<Settings, SettingsError> {
    settings::load(CommonSettings::with_port(DEFAULT_PORT))
}

/// The session-cookie signing key from settings, or a random one (with a warning).
pub fn session_key(settings: &SessionSettings) -> cookie::Key {
    match &settings.key {
        Some(key) => cookie::Key::derive_from(key.expose().as_bytes()),
        None => {
            tracing::warn!(
                "VOICEROOMS__SESSION__KEY is not set: using a random key; sessions will not \
                 survive a restart or work across edge instances"
            );
            cookie::Key::generate()
        }
    }
}

/// The built service.
pub struct Application {
    service: Service,
    sessions: session::SessionStore,
    hub: hub::Hub,
}

impl Application {
    /// Connects to NATS (retrying in the background), binds HTTP; buckets open on first use.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let mut builder = ServiceBuilder::new(SERVICE, &settings.common).await?;
        let metrics = metrics::EdgeMetrics::default();
        metrics.register(builder.registry_mut());
        let stream_check = builder.ensure_rooms_stream();
        let js = jetstream::new(builder.nats().clone());
        let replicas = settings.common.nats.replicas;
        let rooms_kv = Arc::new(LazyBucket::new(
            js.clone(),
            voicerooms_contract::subject::ROOMS_BUCKET,
            1,
            replicas,
        ));
        let sessions_kv = Arc::new(LazyBucket::new(js, session::SESSIONS_BUCKET, 1, replicas));
        let sessions = session::SessionStore::new(
            sessions_kv,
            session_key(&settings.service.session),
            settings.service.session.cookie_name.clone(),
        );
        let hub = hub::Hub::new(
            builder.nats().clone(),
            rooms_kv,
            builder.nats_events_sender(),
            settings.service.websocket.replay_limit,
            builder.shutdown_token(),
            metrics.clone(),
        );
        let ws_state = web::Data::new(ws::WsState::new(
            hub.clone(),
            sessions.clone(),
            settings.service.websocket.clone(),
            metrics,
            builder.shutdown_token(),
        ));
        let service = builder.start(vec![stream_check], move |cfg| {
            cfg.app_data(ws_state.clone())
                .route("/ws", web::get().to(ws::upgrade));
        })?;
        Ok(Self {
            service,
            sessions,
            hub,
        })
    }

    /// The bound HTTP port.
    pub fn port(&self) -> u16 {
        self.service.port()
    }

    /// The session store (tests and the login flow create sessions through it).
    pub fn sessions(&self) -> session::SessionStore {
        self.sessions.clone()
    }

    /// Rooms with a live NATS interest on this instance.
    pub fn live_rooms(&self) -> usize {
        self.hub.room_count()
    }

    /// Runs until `shutdown` resolves, then stops gracefully.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.service.run_until_stopped(shutdown).await
    }
}
