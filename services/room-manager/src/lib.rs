//! # room-manager
//!
//! Creates, joins and closes rooms — a private Discord voice channel and role per room, capacity
//! across any number of replicas, signed invite tokens, automatic voice placement, cleanup of idle
//! rooms — as a request/reply API on `roommgr.v1.<command>`, publishing `room.*` events to the
//! `ROOMS` stream. State lives in JetStream KV and changes only by compare-and-set.
//!
//! ## Layout
//! - [`settings`]: the `discord`, `rooms`, `invites` and `room_manager` sections.
//! - [`discord`]: the Discord REST client — twilight's rate-limit manager, 429 waits from the
//!   headers, exponential backoff for 5xx and timeouts, a bounded queue.
//! - [`store`]: KV records (`rooms/<room>`, `room_manager/owner.<user>`,
//!   `room_manager/pending.<guild>.<user>`) and the CAS loop.
//! - [`invite`]: HS256 invite tokens.
//! - [`rooms`]: the handlers (create, join, leave, close, get, list_mine, rotate_invite),
//!   placement, and the one deletion path.
//! - [`events`]: the durable consumer applying voice/channel events, firing pending moves.
//! - [`cleanup`]: idle scan (warning → deletion) and the orphan reconciler.
//! - [`api`]: the NATS service adapter.
//! - [`metrics`]: operation latency, placement, rooms by state.
//! - [`Application`]: build (connect, then set up KV, API and loops in the background) and run.

pub mod api;
pub mod cleanup;
pub mod discord;
pub mod events;
pub mod invite;
pub mod metrics;
pub mod rooms;
pub mod settings;
pub mod store;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use voicerooms_contract::subject;
use voicerooms_platform::settings::{self as platform_settings, CommonSettings};
use voicerooms_platform::{nats, Secret, Service, ServiceBuilder, SettingsError};

pub use settings::RoomManagerSettings;

use crate::discord::{DiscordClient, DiscordMetrics, RetryPolicy};
use crate::invite::InviteSigner;
use crate::metrics::Metrics;
use crate::rooms::Core;

/// Service name: logs, metrics, alerts subject, NATS client name.
pub const SERVICE: &str = "room-manager";
/// Default HTTP port (health, readiness, metrics).
pub const DEFAULT_PORT: u16 = 8082;
/// The simulator's bot token, used when no token is configured (the dev stack runs the simulator).
pub const SIM_BOT_TOKEN: &str = "sim-bot-token";

pub type Settings = platform_settings::Settings<RoomManagerSettings>;

/// Loads settings from the environment (and `VOICEROOMS_CONFIG_FILE`).
pub fn load_settings() -> Result<Settings, SettingsError> {
    platform_settings::load(CommonSettings::with_port(DEFAULT_PORT))
}

/// The built service.
pub struct Application {
    service: Service,
    core: Arc<OnceLock<Arc<Core>>>,
}

impl Application {
    /// Connects to NATS (retrying in the background), binds HTTP, and sets up the buckets, the
    /// room API, the event consumer, cleanup and the reconciler in the background (the service
    /// reports not ready until that is done).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let mut builder = ServiceBuilder::new(SERVICE, &settings.common).await?;
        let svc = settings.service.clone();
        tracing::info!(
            discord_api = %svc.discord.api_base,
            discord_token_set = svc.discord.token.is_some(),
            invite_secret_set = svc.invites.secret.is_some(),
            "configured"
        );
        let metrics = Metrics::default();
        metrics.register(builder.registry_mut());
        let discord_metrics = DiscordMetrics::new();
        discord_metrics.register(builder.registry_mut());
        let token = svc.discord.token.clone().unwrap_or_else(|| {
            tracing::warn!("no discord.token: using the simulator's bot token");
            Secret::new(SIM_BOT_TOKEN)
        });
        let tuning = &svc.room_manager;
        let discord = DiscordClient::new(
            &svc.discord.api_base,
            &token,
            RetryPolicy {
                base: Duration::from_millis(tuning.retry_base_ms),
                max_retries: tuning.max_retries,
                max_rate_limit_waits: tuning.max_rate_limit_waits,
                timeout: Duration::from_millis(tuning.request_timeout_ms),
            },
            tuning.global_rate_limit,
            tuning.max_queued_requests,
            discord_metrics,
        )
        .map_err(|e| anyhow::anyhow!("discord client: {e}"))?;
        let secret: Vec<u8> = match &svc.invites.secret {
            Some(s) => s.expose().as_bytes().to_vec(),
            None => {
                tracing::warn!("no invites.secret: invites signed with a random per-process secret (one replica only)");
                (0..32).map(|_| rand::random::<u8>()).collect()
            }
        };
        let signer = InviteSigner::new(&secret);

        let stream_check = builder.ensure_rooms_stream();
        let ready = Arc::new(AtomicBool::new(false));
        let core_cell: Arc<OnceLock<Arc<Core>>> = Arc::new(OnceLock::new());
        {
            let client = builder.nats().clone();
            let nats_settings = settings.common.nats.clone();
            let instance = builder.instance().to_owned();
            let tasks = builder.tasks().clone();
            let token = builder.shutdown_token();
            let ready = ready.clone();
            let cell = core_cell.clone();
            builder.tasks().spawn(async move {
                let js = async_nats::jetstream::new(client.clone());
                let mut delay = Duration::from_millis(100);
                let (rooms, state, tokens) = loop {
                    let setup = async {
                        nats::ensure_rooms_stream(&js, &nats_settings).await?;
                        let r = nats_settings.replicas;
                        let rooms = nats::ensure_kv(&js, subject::ROOMS_BUCKET, 1, r).await?;
                        let state = nats::ensure_kv(&js, store::STATE_BUCKET, 1, r).await?;
                        let tokens = nats::ensure_kv(&js, subject::OAUTH_TOKENS_BUCKET, 1, r).await?;
                        anyhow::Ok((rooms, state, tokens))
                    };
                    match setup.await {
                        Ok(v) => break v,
                        Err(e) => tracing::warn!(error = %e, retry_ms = delay.as_millis() as u64, "state buckets not ready"),
                    }
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                };
                let core = Core::new(
                    instance,
                    rooms,
                    state,
                    tokens,
                    js,
                    discord,
                    signer,
                    svc.rooms.clone(),
                    Duration::from_secs(svc.invites.ttl_secs),
                    metrics,
                );
                let _ = cell.set(core.clone());
                tasks.spawn({
                    let (core, client, tasks, token) = (core.clone(), client.clone(), tasks.clone(), token.clone());
                    let max = svc.room_manager.max_inflight_commands;
                    async move {
                        if let Err(e) = api::serve(core, client, max, tasks, token).await {
                            tracing::error!(error = %e, "room API stopped");
                        }
                    }
                });
                tasks.spawn(events::run(core.clone(), svc.room_manager.consumer.clone(), token.clone()));
                tasks.spawn(cleanup::run_cleanup(core.clone(), tasks.clone(), token.clone()));
                tasks.spawn(cleanup::run_reconciler(core.clone(), token.clone()));
                ready.store(true, Ordering::SeqCst);
            });
        }
        let api_check: voicerooms_platform::ops::ReadinessCheck = Box::new(move || {
            if ready.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("room API not yet started".into())
            }
        });
        let service = builder.start(vec![stream_check, ("room_api", api_check)], |_| {})?;
        Ok(Self {
            service,
            core: core_cell,
        })
    }

    /// The bound HTTP port.
    pub fn port(&self) -> u16 {
        self.service.port()
    }

    /// The handlers' shared state, once set up (tests and benchmarks use it).
    pub fn core(&self) -> Option<Arc<Core>> {
        self.core.get().cloned()
    }

    /// Runs until `shutdown` resolves, then stops gracefully.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.service.run_until_stopped(shutdown).await
    }
}
