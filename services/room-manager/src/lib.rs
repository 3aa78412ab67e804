//! # room-manager
//!
//! Creates, joins and closes rooms — a private Discord voice channel and role per room, capacity
//! across any number of replicas, signed invite tokens, automatic voice placement, cleanup of idle
//! rooms — as a request/reply API on `roommgr.v1.<command>`, publishing `room.*` events to the
//! `ROOMS` stream. State lives in JetStream KV and changes only by compare-and-set; events are
//! written with the state they describe (an outbox) and published from there.
//!
//! ## Layout
//! - [`settings`]: the `discord`, `rooms`, `invites` and `room_manager` sections.
//! - [`discord`]: the Discord REST client — twilight's rate-limit manager shared fairly across
//!   replicas, 429 waits from the headers (checked, bounded), exponential backoff for 5xx and
//!   timeouts, creates that are looked up instead of re-sent, a bounded queue, a shutdown cut-off.
//! - [`store`]: KV records and the CAS loop.
//! - [`outbox`]: events queued with the state change, published in order, re-driven.
//! - [`invite`]: HS256 invite tokens.
//! - [`rooms`]: the handlers — [`rooms::create`] (idempotent Discord creates, the durable cleanup
//!   queue), [`rooms::membership`] (join, leave, placement), [`rooms::lifecycle`] (closing and
//!   the one deletion path).
//! - [`events`]: the durable consumer applying voice/channel events, per-room ordered lanes.
//! - [`cleanup`]: the idle scan (warning → deletion).
//! - [`reconcile`]: the reconciler (abandoned creates, orphans, vanished channels).
//! - [`replicas`]: replica heartbeats, for the rate-limit share.
//! - [`supervisor`]: restarts long-running tasks; readiness reflects what runs.
//! - [`api`]: the NATS service adapter.
//! - [`metrics`]: operation latency, placement, rooms by state, consumer and reconciler.
//! - [`Application`]: build (connect, then set up KV, API and loops in the background) and run.

pub mod api;
pub mod cleanup;
pub mod discord;
pub mod events;
pub mod invite;
pub mod metrics;
pub mod outbox;
pub mod reconcile;
pub mod replicas;
pub mod rooms;
pub mod settings;
pub mod store;
pub mod supervisor;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use voicerooms_contract::{subject, GuildId};
use voicerooms_platform::runtime::SETUP_BACKOFF;
use voicerooms_platform::settings::{self as platform_settings, CommonSettings};
use voicerooms_platform::{nats, retry, Secret, Service, ServiceBuilder, SettingsError};

pub use settings::RoomManagerSettings;

use crate::discord::{DiscordClient, DiscordMetrics, RetryPolicy};
use crate::invite::InviteSigner;
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::rooms::{Buckets, Core, CoreParts};
use crate::supervisor::{Health, Supervisor};

/// Service name: logs, metrics, alerts subject, NATS client name.
pub const SERVICE: &str = "room-manager";
/// Default HTTP port (health, readiness, metrics).
pub const DEFAULT_PORT: u16 = 8082;
/// The simulator's bot token, used when no token is configured (the dev stack runs the simulator).
pub const SIM_BOT_TOKEN: &str = "sim-bot-token";
/// Discord's own REST API: with it, `rooms.guilds` must be configured.
pub const DISCORD_API: &str = "https://discord.com/";
/// The simulator's seeded guild: the allow-list when none is configured against a simulator.
pub const SIM_GUILD: u64 = 200_000_000_000_000_001;
/// Components `/readyz` requires to be running.
pub const REQUIRED: &[&str] = &["room_api", "events"];

pub type Settings = platform_settings::Settings<RoomManagerSettings>;

/// Loads settings from the environment (and `VOICEROOMS_CONFIG_FILE`).
pub fn load_settings() -> Result<Settings, SettingsError> {
    let settings: Settings = platform_settings::load(CommonSettings::with_port(DEFAULT_PORT))?;
    allowed_guilds(&settings.service)?;
    Ok(settings)
}

/// The guild allow-list: `rooms.guilds`; when empty, the simulator's guild if `discord.api_base`
/// is not Discord's own (the dev stack, tests), else an error — against Discord every guild the
/// bot may create rooms in must be named.
pub fn allowed_guilds(s: &RoomManagerSettings) -> Result<Vec<GuildId>, SettingsError> {
    let guilds = s.rooms.guild_list()?;
    if !guilds.is_empty() {
        return Ok(guilds);
    }
    if s.discord.api_base.starts_with(DISCORD_API) {
        return Err(SettingsError::invalid(
            "rooms.guilds",
            "must list the guild ids rooms may be created in (comma separated) against Discord",
        ));
    }
    GuildId::new(SIM_GUILD)
        .map(|g| vec![g])
        .map_err(|_| SettingsError::invalid("rooms.guilds", "no default guild"))
}

/// The built service.
pub struct Application {
    service: Service,
    core: Arc<OnceLock<Arc<Core>>>,
    health: Health,
}

impl Application {
    /// Connects to NATS (retrying in the background), binds HTTP, and sets up the buckets, the
    /// room API, the event consumer, cleanup and the reconciler in the background (the service
    /// reports not ready until the room API and the consumer actually run).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let mut builder = ServiceBuilder::new(SERVICE, &settings.common).await?;
        let svc = settings.service.clone();
        // `load_settings` refuses to start without an allow-list against Discord; settings built
        // in code get an empty one (every create refused) and an error in the log.
        let guilds = allowed_guilds(&svc).unwrap_or_else(|e| {
            tracing::error!(error = %e, "no guild allow-list: every create will be refused");
            Vec::new()
        });
        tracing::info!(
            discord_api = %svc.discord.api_base,
            discord_token_set = svc.discord.token.is_some(),
            invite_secret_set = svc.invites.secret.is_some(),
            guilds = ?guilds.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
            "configured"
        );
        let metrics = Metrics::default();
        metrics.register(builder.registry_mut());
        let discord_metrics = DiscordMetrics::new();
        discord_metrics.register(builder.registry_mut());
        let health = Health::default();
        health.register(builder.registry_mut());
        let token = svc.discord.token.clone().unwrap_or_else(|| {
            tracing::warn!("no discord.token: using the simulator's bot token");
            Secret::new(SIM_BOT_TOKEN)
        });
        let tuning = &svc.room_manager;
        let discord = DiscordClient::new(
            &svc.discord.api_base,
            &token,
            RetryPolicy::new(
                Duration::from_millis(tuning.retry_base_ms),
                tuning.max_retries,
                tuning.max_rate_limit_waits,
                Duration::from_millis(tuning.request_timeout_ms),
            ),
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
        let grace = Duration::from_millis(settings.common.shutdown.grace_period_ms);
        let dedup_window = Duration::from_secs(settings.common.nats.duplicate_window_secs);

        let stream_check = builder.ensure_rooms_stream();
        let setup_done = Arc::new(AtomicBool::new(false));
        let core_cell: Arc<OnceLock<Arc<Core>>> = Arc::new(OnceLock::new());
        let token = builder.shutdown_token();
        let tasks = builder.tasks().clone();
        let supervisor = Supervisor::new(
            health.clone(),
            tasks.clone(),
            token.clone(),
            Duration::from_millis(tuning.restart_backoff_ms),
        );
        // Shutdown's cut-off for Discord: commands still waiting on Discord then fail fast and
        // answer (their creates rolled back) before the grace period ends.
        {
            let (stop, token) = (discord.stop().clone(), token.clone());
            let margin = grace
                .checked_div(4)
                .unwrap_or_default()
                .min(Duration::from_secs(2));
            // Not on the task tracker: shutdown must not wait for this timer when every command
            // has already answered.
            tokio::spawn(async move {
                token.cancelled().await;
                tokio::time::sleep(grace.saturating_sub(margin)).await;
                stop.cancel();
            });
        }
        {
            let client = builder.nats().clone();
            let nats_settings = settings.common.nats.clone();
            let instance = builder.instance().to_owned();
            let done = setup_done.clone();
            let cell = core_cell.clone();
            let (tasks2, token2) = (tasks.clone(), token.clone());
            builder.tasks().spawn(async move {
                let js = async_nats::jetstream::new(client.clone());
                let setup = || async {
                    nats::ensure_rooms_stream(&js, &nats_settings).await?;
                    let r = nats_settings.replicas;
                    anyhow::Ok(Buckets {
                        rooms: nats::ensure_kv(&js, subject::ROOMS_BUCKET, 1, r).await?,
                        state: nats::ensure_kv(&js, store::STATE_BUCKET, 1, r).await?,
                        cleanup: nats::ensure_kv(&js, store::CLEANUP_BUCKET, 1, r).await?,
                        tokens: nats::ensure_kv(&js, subject::OAUTH_TOKENS_BUCKET, 1, r).await?,
                    })
                };
                let Ok(buckets) = retry::retry(
                    "setting up the state buckets",
                    &SETUP_BACKOFF,
                    &token2,
                    retry::always,
                    setup,
                )
                .await
                .map_err(|e| format!("{e:#}")) else {
                    // Only shutdown ends an unlimited retry.
                    return;
                };
                // Known to the others before the first Discord call (the rate-limit share).
                match replicas::beat(&buckets.state, &instance, true).await {
                    Ok(n) => discord.replicas().store(n, Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "first replica heartbeat failed"),
                }
                let core = Core::new(CoreParts {
                    instance,
                    buckets,
                    js,
                    discord,
                    invites: signer,
                    settings: svc.rooms.clone(),
                    tuning: svc.room_manager.clone(),
                    invite_ttl: Duration::from_secs(svc.invites.ttl_secs),
                    metrics,
                    guilds,
                    dedup_window,
                    tasks: tasks2,
                    shutdown: token2.clone(),
                });
                let _ = cell.set(core.clone());
                start_components(&supervisor, &core, &client, &svc);
                done.store(true, Ordering::SeqCst);
            });
        }
        let ready_health = health.clone();
        let api_check: voicerooms_platform::ops::ReadinessCheck = Box::new(move || {
            if !setup_done.load(Ordering::SeqCst) {
                return Err("state buckets not yet set up".into());
            }
            ready_health.check(REQUIRED)
        });
        let service = builder.start(vec![stream_check, ("room_manager", api_check)], |_| {})?;
        Ok(Self {
            service,
            core: core_cell,
            health,
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

    /// Which long-running tasks run (tests use it to kill one).
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Runs until `shutdown` resolves, then stops gracefully.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.service.run_until_stopped(shutdown).await
    }
}

/// Starts every long-running task under the supervisor.
fn start_components(
    supervisor: &Supervisor,
    core: &Arc<Core>,
    client: &async_nats::Client,
    svc: &RoomManagerSettings,
) {
    let token = core.shutdown.clone();
    {
        let (core, client, token) = (core.clone(), client.clone(), token.clone());
        let max = svc.room_manager.max_inflight_commands;
        supervisor.spawn("room_api", move |up| {
            api::serve(core.clone(), client.clone(), max, token.clone(), up)
        });
    }
    {
        let (core, token) = (core.clone(), token.clone());
        let (durable, lanes) = (
            svc.room_manager.consumer.clone(),
            svc.room_manager.event_lanes,
        );
        supervisor.spawn("events", move |up| {
            events::run(core.clone(), durable.clone(), lanes, token.clone(), up)
        });
    }
    {
        let (core, token) = (core.clone(), token.clone());
        supervisor.spawn("cleanup", move |up| {
            up.set(true);
            cleanup::run_cleanup(core.clone(), token.clone())
        });
    }
    {
        let (core, token) = (core.clone(), token.clone());
        let reconciler = Arc::new(Reconciler::default());
        supervisor.spawn("reconciler", move |up| {
            up.set(true);
            reconcile::run(core.clone(), reconciler.clone(), token.clone())
        });
    }
    {
        let (core, token) = (core.clone(), token.clone());
        supervisor.spawn("cleanup_queue", move |up| {
            up.set(true);
            rooms::create::run_cleanup_queue(core.clone(), token.clone())
        });
    }
    {
        let (core, token) = (core.clone(), token.clone());
        supervisor.spawn("outbox", move |up| {
            up.set(true);
            outbox::run_sweeper(core.clone(), token.clone())
        });
    }
    {
        let (core, token) = (core.clone(), token.clone());
        supervisor.spawn("replicas", move |up| {
            replicas::run(core.clone(), token.clone(), up)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guild_allow_list_is_required_against_discord_and_defaults_to_the_simulators_guild() {
        let mut s = RoomManagerSettings::default();
        let err = allowed_guilds(&s).unwrap_err().to_string();
        assert!(err.contains("rooms.guilds"), "{err}");
        s.discord.api_base = "http://127.0.0.1:8790/api/v10".into();
        assert_eq!(
            allowed_guilds(&s).unwrap(),
            vec![GuildId::new(SIM_GUILD).unwrap()]
        );
        s.rooms.guilds = " 11, 22 ".into();
        assert_eq!(
            allowed_guilds(&s).unwrap(),
            vec![GuildId::new(11).unwrap(), GuildId::new(22).unwrap()]
        );
        s.rooms.guilds = "11,x".into();
        assert!(allowed_guilds(&s)
            .unwrap_err()
            .to_string()
            .contains("rooms.guilds"));
    }
}
