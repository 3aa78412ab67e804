//! A local Discord for tests, benchmarks and the dev stack.
//!
//! The simulator speaks Discord's gateway (API v10, JSON over plain `ws://`), the REST routes
//! voicerooms uses (under `/api` and `/api/v10`), OAuth2 (authorize, token, refresh, revoke,
//! PKCE), and Discord's rate limits; it keeps one consistent world (what REST changes, the
//! gateway dispatches) and lets tests inject faults and observe everything it did.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use discord_sim::{SimConfig, Simulator, seed};
//! let sim = Simulator::start(SimConfig::for_tests()).await?;
//! // Point a client at sim.http_url() (REST) — it finds sim.gateway_url() via GET /gateway/bot.
//! sim.connect_voice(seed::USERS[0].0, seed::LOBBY_CHANNEL_ID)?;
//! sim.send_reconnect(None);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`config`]: [`SimConfig`] with defaults, `for_tests()`, and `DISCORD_SIM__*` env parsing.
//! - `world`: users, guilds, roles, channels, members, voice states, permission maths; every
//!   mutation returns the dispatches it causes.
//! - `state`: the shared state behind one `Arc`, lock order, and `mutate`/`emit` — the single
//!   path from a world change to sequenced dispatches in every session's replay buffer.
//! - `gateway`: the websocket: HELLO, heartbeats, IDENTIFY/READY/GUILD_CREATE, RESUME, close codes.
//! - `rest`: `/api[/v10]` routing, authentication, Discord JSON errors, REST faults.
//! - `ratelimit`: per-route buckets, the global limit, invalid-request counting.
//! - `oauth`: `/oauth2/authorize`, the token endpoint, revocation, bearer lookups.
//! - `handle`: [`SimHandle`], the control surface (world, faults, OAuth settings, log, load).
//! - `control`: the same control surface over HTTP under `/_sim`.
//! - `log`: the bounded event log ([`SimEvent`]).
//! - `util`: clocks, timestamps, seeded randomness.

pub mod config;
mod control;
mod error;
mod gateway;
mod handle;
mod log;
mod oauth;
mod ratelimit;
mod rest;
mod state;
mod util;
mod world;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpServer};

pub use config::{OAuthConfig, RateLimitConfig, SimConfig};
pub use error::{ConfigError, SimError, StartError};
pub use gateway::close as close_codes;
pub use handle::{LoadSpec, SessionInfo, SimHandle};
pub use log::{SimEvent, SimEventKind};
pub use state::{RestFault, RestFaultKind};
pub use world::{channel_type, seed, ChannelSpec, Overwrite, VoiceFlags};

/// Largest request body the simulator reads (REST, OAuth, control).
const MAX_BODY: usize = 256 * 1024;

/// Entry point: binds, seeds the world, starts serving.
pub struct Simulator;

impl Simulator {
    /// Binds `config.bind` (port 0 allowed), seeds the default world if asked, and serves REST,
    /// the gateway, OAuth2 and `/_sim` on one port until [`SimHandle::shutdown`].
    ///
    /// Must be called inside a tokio runtime.
    pub async fn start(config: SimConfig) -> Result<SimHandle, StartError> {
        let listener = TcpListener::bind(config.bind).map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        let addr = listener.local_addr().map_err(StartError::Server)?;
        let host = config
            .public_host
            .clone()
            .unwrap_or_else(|| addr.ip().to_string());
        let http_url = format!("http://{host}:{}", addr.port());
        let gateway_url = format!("ws://{host}:{}", addr.port());
        let mut rng = util::make_rng(config.seed);
        let id_base = {
            use rand::Rng;
            // Snowflake-sized ids; seeded runs get the same ids every time.
            // At most 1.1e18 + 1e12: far below u64::MAX.
            rng.random_range(0..1_000_000_000u64)
                .saturating_mul(1_000)
                .saturating_add(1_100_000_000_000_000_000)
        };
        let mut world = world::World::new(
            config.bot_user_id,
            &config.bot_username,
            config.bot_permissions,
            id_base,
        );
        if config.seed_world {
            world
                .seed_default()
                .map_err(|e| StartError::Server(std::io::Error::other(e.to_string())))?;
        }
        let sim = Arc::new(state::Sim {
            http_url,
            gateway_url,
            world: Mutex::new(world),
            gateway: Mutex::new(state::GatewayState::default()),
            log: Mutex::new(log::EventLog::new(config.log_capacity)),
            faults: Mutex::new(state::Faults::default()),
            limiter: Mutex::new(ratelimit::RateLimiter::new(config.rate_limits.clone())),
            oauth: Mutex::new(oauth::OAuthState::new(config.oauth.max_grants)),
            rng: Mutex::new(rng),
            next_conn: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            load_running: AtomicBool::new(false),
            config,
        });
        let mut handle = SimHandle {
            sim: sim.clone(),
            server: None,
            addr,
        };
        let app_handle = handle.clone();
        let workers = sim.config.workers.max(1);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(sim.clone()))
                .app_data(web::Data::new(app_handle.clone()))
                .app_data(web::PayloadConfig::new(MAX_BODY))
                .app_data(web::JsonConfig::default().limit(MAX_BODY).error_handler(|e, _| {
                    let body = serde_json::json!({"error": "bad_request", "message": e.to_string()});
                    actix_web::error::InternalError::from_response(
                        e,
                        actix_web::HttpResponse::BadRequest().json(body),
                    )
                    .into()
                }))
                .configure(control::configure)
                .route("/oauth2/authorize", web::get().to(oauth::authorize))
                .route("/api/oauth2/authorize", web::get().to(oauth::authorize))
                .service(web::resource("/api{tail:.*}").to(rest::api))
                .route("/", web::get().to(gateway::connect))
                .route("/gateway", web::get().to(gateway::connect))
        })
        // Gateway dispatches are small frames: Nagle's algorithm meeting the client's delayed
        // ACKs would hold them for up to ~40 ms, as Discord's own edge does not.
        .on_connect(|conn, _| {
            if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(2)
        .listen(listener)
        .map_err(StartError::Server)?
        .run();
        handle.server = Some(server.handle());
        tokio::spawn(server);
        tracing::info!(http = %handle.http_url(), gateway = %handle.gateway_url(), "discord simulator started");
        Ok(handle)
    }
}
