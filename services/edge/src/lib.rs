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
//! - [`auth`]: Discord OAuth2 login (code + PKCE), logout, session lookup with silent refresh.
//! - [`api`]: the room HTTP API, forwarded to room-manager over NATS; `/api/openapi.json`.
//! - [`http`]: typed JSON errors, the cross-site request check, safe return paths.
//! - [`metrics`]: the Prometheus series (`voicerooms_edge_*`).
//! - [`page`]: the players' page and the JavaScript client module (embedded static files).

pub mod api;
pub mod auth;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod page;
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
    /// Most bytes of events replayed for one subscribe (or one repair); beyond it the client
    /// gets a fresh snapshot. At most half of `max_queue_bytes`, so a catch-up always fits.
    pub replay_max_bytes: usize,
    /// Bound of each JetStream read of catch-ups and repairs (they are retried).
    pub read_timeout_ms: u64,
    /// Repairs after a NATS reconnect start at a random delay up to this.
    pub repair_jitter_ms: u64,
    /// JetStream API calls per second for catch-ups and repairs, across this edge.
    pub jetstream_rate: u32,
    /// JetStream API calls in flight at once, across this edge.
    pub jetstream_concurrency: usize,
    /// How often the `ROOMS` stream's epoch is checked while rooms are served.
    pub epoch_check_interval_ms: u64,
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
            replay_max_bytes: 256 * 1024,
            read_timeout_ms: 1_000,
            repair_jitter_ms: 1_000,
            jetstream_rate: 1_000,
            jetstream_concurrency: 32,
            epoch_check_interval_ms: 5_000,
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

/// Discord OAuth2 (login).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthSettings {
    /// The application's client id (Discord developer portal → OAuth2).
    pub client_id: String,
    /// The application's client secret (secret).
    pub client_secret: Option<Secret>,
    pub authorize_url: String,
    pub token_url: String,
    pub revoke_url: String,
    /// REST base for `GET /users/@me`.
    pub api_base: String,
    /// Where Discord sends the player back: this edge's `/auth/callback`, as registered.
    pub redirect_url: String,
    /// Scopes requested, space separated (`guilds.join` lets room-manager add players).
    pub scopes: String,
    /// Timeout of calls to Discord's token and user endpoints.
    pub timeout_ms: u64,
}

impl Default for OAuthSettings {
    fn default() -> Self {
        Self {
            client_id: String::new(),
            client_secret: None,
            authorize_url: "https://discord.com/oauth2/authorize".into(),
            token_url: "https://discord.com/api/oauth2/token".into(),
            revoke_url: "https://discord.com/api/oauth2/token/revoke".into(),
            api_base: "https://discord.com/api/v10".into(),
            redirect_url: "http://127.0.0.1:8080/auth/callback".into(),
            scopes: "identify guilds.join".into(),
            timeout_ms: 10_000,
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Origins allowed to make state-changing requests, comma separated (the page's own origin
    /// is always allowed), e.g. `https://rooms.example.com`.
    pub allowed_origins: String,
    /// Guild rooms are created in when the request names none.
    pub default_guild: Option<voicerooms_contract::GuildId>,
    /// How long to wait for room-manager.
    pub request_timeout_ms: u64,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            allowed_origins: String::new(),
            default_guild: None,
            request_timeout_ms: 5_000,
            max_body_bytes: 16 * 1024,
        }
    }
}

impl ApiSettings {
    pub fn origins(&self) -> Vec<String> {
        self.allowed_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect()
    }
}

/// The sections this service reads besides the common ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeSettings {
    pub websocket: WebSocketSettings,
    pub session: SessionSettings,
    pub oauth: OAuthSettings,
    pub edge: ApiSettings,
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
        if ws.replay_max_bytes < 1024 || ws.replay_max_bytes > ws.max_queue_bytes / 2 {
            return Err(SettingsError::invalid(
                "websocket.replay_max_bytes",
                "must be 1024 up to half of websocket.max_queue_bytes",
            ));
        }
        positive("websocket.read_timeout_ms", ws.read_timeout_ms)?;
        positive("websocket.jetstream_rate", u64::from(ws.jetstream_rate))?;
        positive(
            "websocket.jetstream_concurrency",
            ws.jetstream_concurrency as u64,
        )?;
        positive(
            "websocket.epoch_check_interval_ms",
            ws.epoch_check_interval_ms,
        )?;
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
        let oauth = &self.oauth;
        for (key, url) in [
            ("oauth.authorize_url", &oauth.authorize_url),
            ("oauth.token_url", &oauth.token_url),
            ("oauth.revoke_url", &oauth.revoke_url),
            ("oauth.api_base", &oauth.api_base),
            ("oauth.redirect_url", &oauth.redirect_url),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SettingsError::invalid(
                    key,
                    "must be an http:// or https:// URL",
                ));
            }
        }
        positive("oauth.timeout_ms", oauth.timeout_ms)?;
        for origin in self.edge.origins() {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(SettingsError::invalid(
                    "edge.allowed_origins",
                    format!("{origin:?} must be an http(s) origin"),
                ));
            }
        }
        positive("edge.request_timeout_ms", self.edge.request_timeout_ms)?;
        if !(256..=1024 * 1024).contains(&self.edge.max_body_bytes) {
            return Err(SettingsError::invalid(
                "edge.max_body_bytes",
                "must be 256-1048576",
            ));
        }
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
        let sessions_kv = Arc::new(LazyBucket::new(
            js.clone(),
            session::SESSIONS_BUCKET,
            1,
            replicas,
        ));
        let tokens_kv = Arc::new(LazyBucket::new(
            js,
            voicerooms_contract::subject::OAUTH_TOKENS_BUCKET,
            1,
            replicas,
        ));
        let key = session_key(&settings.service.session);
        let sessions = session::SessionStore::new(
            sessions_kv.clone(),
            key.clone(),
            settings.service.session.cookie_name.clone(),
        );
        let origins = settings.service.edge.origins();
        let auth = web::Data::new(auth::Auth::new(
            settings.service.oauth.clone(),
            sessions.clone(),
            tokens_kv,
            key,
            settings.service.session.cookie_secure,
            settings.service.session.ttl_secs.saturating_mul(1000),
            origins.clone(),
        )?);
        let api = web::Data::new(api::Api {
            nats: builder.nats().clone(),
            timeout: std::time::Duration::from_millis(settings.service.edge.request_timeout_ms),
            default_guild: settings.service.edge.default_guild,
            allowed_origins: origins,
        });
        let json = api::json_config(settings.service.edge.max_body_bytes);
        let ws_settings = &settings.service.websocket;
        let hub = hub::Hub::new(
            builder.nats().clone(),
            rooms_kv,
            builder.nats_events_sender(),
            hub::HubConfig {
                replay_limit: ws_settings.replay_limit,
                replay_max_bytes: ws_settings.replay_max_bytes,
                read_timeout: std::time::Duration::from_millis(ws_settings.read_timeout_ms),
                repair_jitter: std::time::Duration::from_millis(ws_settings.repair_jitter_ms),
                epoch_check_interval: std::time::Duration::from_millis(
                    ws_settings.epoch_check_interval_ms,
                ),
                jetstream_rate: ws_settings.jetstream_rate,
                jetstream_concurrency: ws_settings.jetstream_concurrency,
            },
            builder.shutdown_token(),
            builder.tasks().clone(),
            metrics.clone(),
        );
        let ws_state = Arc::new(ws::WsState::new(
            hub.clone(),
            sessions.clone(),
            ws_settings.clone(),
            metrics,
            builder.shutdown_token(),
            builder.tasks().clone(),
            settings.service.edge.origins(),
        ));
        builder
            .tasks()
            .spawn(ws_state.clone().watch_sessions(sessions_kv.clone()));
        let ws_state = web::Data::from(ws_state);
        let service = builder.start(vec![stream_check], move |cfg| {
            cfg.app_data(ws_state.clone())
                .app_data(auth.clone())
                .app_data(api.clone())
                .app_data(json.clone())
                .route("/ws", web::get().to(ws::upgrade))
                .route("/auth/login", web::get().to(auth::login))
                .route("/auth/callback", web::get().to(auth::callback))
                .route("/auth/logout", web::post().to(auth::logout))
                .route("/api/me", web::get().to(auth::me))
                .route("/api/openapi.json", web::get().to(api::openapi))
                .route("/api/rooms", web::get().to(api::list))
                .route("/api/rooms", web::post().to(api::create))
                .route("/api/rooms/join", web::post().to(api::join))
                .route("/api/rooms/{room}", web::get().to(api::get))
                .route("/api/rooms/{room}/{action}", web::post().to(api::action))
                .configure(page::routes);
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
