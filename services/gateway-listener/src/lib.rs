//! # gateway-listener
//!
//! Holds the bot's Discord Gateway connection and publishes normalized voice and room events to
//! the `ROOMS` stream (`rooms.<guild>.<room>.<kind>`), its connection state on
//! `gateway.<shard>.status` and operator alerts on `ops.alerts.gateway-listener`.
//!
//! This service owns the gateway connection loop (rather than serenity's shard runner, whose
//! reconnection policy cannot be changed from outside; see docs/GATEWAY.md) and uses serenity's
//! model types to decode Discord's payloads.
//!
//! ```text
//! Discord ──ws──▶ connection (state machine, heartbeats, resume/identify, backoff)
//!                   │ VoiceCache: join / leave / move / flags; GUILD_CREATE diff
//!                   ▼ bounded queue (one batch per dispatch)
//!                 publisher ──JetStream (Nats-Msg-Id = <session>:<seq>:<part>)──▶ ROOMS
//!                   │ shadow cache + acked seq
//!                   ▼
//!                 lease (KV): who holds the shard; session checkpoint for the standby
//! ```
//!
//! ## Layout
//! - [`config`]: the `gateway` settings section and the backoff schedule.
//! - [`protocol`]: gateway opcodes, payload envelope, close-code policy.
//! - [`discord`]: serenity model types → our voice updates and channel changes.
//! - [`cache`]: the voice-state cache and the convergence diff (pure, unit tested).
//! - [`connection`]: the connection loop and its state machine, status and alerts.
//! - [`publisher`]: ordered, pipelined, retried JetStream publishing and the checkpoint.
//! - [`lease`]: the shard lease and checkpoint in JetStream KV.
//! - [`metrics`]: the `voicerooms_gateway_*` metrics.
//! - [`Application`]: it builds (connect NATS, ensure the stream, bind HTTP, start the supervisor)
//!   and run until stopped.

pub mod cache;
pub mod config;
pub mod connection;
pub mod discord;
pub mod identify;
pub mod lease;
pub mod metrics;
pub mod protocol;
pub mod publisher;
pub mod status;
pub mod takeover;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use voicerooms_contract::status::GatewayState;
use voicerooms_platform::settings::Secret;

pub use config::GatewayConfig;
use connection::{Gateway, Health, Reporter};
use lease::{Lease, LeaseError};
use publisher::{Shadow, SharedShadow};

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
    pub gateway: GatewayConfig,
}

impl CheckSettings for GatewaySettings {
    fn check(&self) -> Result<(), SettingsError> {
        self.discord.check()?;
        self.gateway.check()
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
    health: Arc<Health>,
}

impl Application {
    /// Connects to NATS (retrying in the background), ensures the ROOMS stream, binds HTTP.
    ///
    /// Without a Discord token the gateway stays off (logged); with one, a supervisor task takes
    /// the shard's lease (or waits as a standby) and runs the connection loop.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let mut builder = ServiceBuilder::new(SERVICE, &settings.common).await?;
        let gw = settings.service.gateway.clone();
        tracing::info!(
            discord_api = %settings.service.discord.api_base,
            discord_token_set = settings.service.discord.token.is_some(),
            shard = gw.shard_id,
            shard_count = gw.shard_count,
            "configured"
        );
        let metrics = metrics::Metrics::default();
        metrics.register(builder.registry_mut());
        let health = Arc::new(Health::default());
        let mut checks = vec![builder.ensure_rooms_stream()];
        match settings.service.discord.token.clone() {
            None => tracing::warn!("no discord.token configured: the gateway connection is off"),
            Some(token) => {
                metrics.cover_pool(gw.shard_count);
                let report = Reporter {
                    nats: builder.nats().clone(),
                    metrics: metrics.shard(gw.shard_id),
                    all: metrics,
                    health: health.clone(),
                    instance: builder.instance().to_owned(),
                    shard: gw.shard_id,
                    shard_count: gw.shard_count,
                    latest: Arc::new(tokio::sync::watch::channel(None).0),
                };
                let sup = Supervisor {
                    config: gw,
                    token,
                    api_base: settings.service.discord.api_base.clone(),
                    replicas: settings.common.nats.replicas,
                    report,
                    tasks: builder.tasks().clone(),
                };
                let shutdown = builder.shutdown_token();
                builder.tasks().spawn(sup.run(shutdown));
                let h = health.clone();
                checks.push(("gateway", Box::new(move || h.ready())));
            }
        }
        let service = builder.start(checks, |_| {})?;
        Ok(Self { service, health })
    }

    /// The gateway's current state (tests, diagnostics).
    pub fn gateway_state(&self) -> GatewayState {
        self.health.state()
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

/// Holds the shard's lease (or waits for it) and runs the gateway while holding it.
struct Supervisor {
    config: GatewayConfig,
    token: Secret,
    api_base: String,
    replicas: usize,
    report: Reporter,
    tasks: tokio_util::task::TaskTracker,
}

impl Supervisor {
    async fn run(self, shutdown: CancellationToken) {
        let js = async_nats::jetstream::new(self.report.nats.clone());
        let renew_every = Duration::from_millis(self.config.lease_renew_ms);
        let api = Arc::new(identify::DiscordApi::new(
            &self.api_base,
            self.token.clone(),
        ));
        let (mut lease, identify) = loop {
            let opened = async {
                let lease =
                    Lease::open(&js, &self.config, &self.report.instance, self.replicas).await?;
                let identify = identify::IdentifyQueue::open(
                    &js,
                    &self.config,
                    api.clone(),
                    &self.report.instance,
                    self.replicas,
                )
                .await?;
                anyhow::Ok((lease, identify))
            };
            match opened.await {
                Ok(opened) => break opened,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "lease bucket not ready; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(renew_every) => {}
            }
        };
        self.tasks.spawn(status::run(
            self.report.nats.clone(),
            lease.store(),
            self.report.latest.subscribe(),
            Duration::from_millis(self.config.status_interval_ms),
            shutdown.clone(),
        ));
        loop {
            // Standby until the lease is ours.
            let mut announced = false;
            loop {
                match lease.try_acquire().await {
                    Ok(true) => break,
                    Ok(false) if !announced => {
                        announced = true;
                        self.report
                            .state(
                                GatewayState::Standby,
                                false,
                                Some("another replica holds the shard".into()),
                            )
                            .await;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "lease not acquired"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(renew_every) => {}
                }
            }
            tracing::info!(instance = %self.report.instance, "shard lease acquired");
            let checkpoint = match lease.claim_checkpoint().await {
                Ok(c) => c,
                Err(e) => {
                    // Without the claim our checkpoint writes would be refused: step back.
                    tracing::warn!(error = %e, "could not claim the session checkpoint; releasing the lease");
                    lease.release().await;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(renew_every) => {}
                    }
                    continue;
                }
            };
            // What was actually stored: the checkpoint plus the stream after it.
            let restored = match takeover::restore(
                &js,
                checkpoint,
                self.config.shard_id,
                self.config.shard_count,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "could not read what the stream holds; releasing the lease"
                    );
                    lease.release().await;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(renew_every) => {}
                    }
                    continue;
                }
            };
            let shadow: SharedShadow = Arc::new(Mutex::new(Shadow {
                cache: restored.cache.clone(),
                session: restored.session.clone(),
                seq: restored.seq,
                stream_seq: restored.stream_seq,
                dirty: true,
                ..Shadow::default()
            }));
            let (tx, rx) = tokio::sync::mpsc::channel(self.config.publish_buffer);
            let mut gateway = Gateway::new(
                self.config.clone(),
                self.token.clone(),
                self.report.clone(),
                tx,
                identify.clone(),
            );
            gateway.restore(restored);
            let publisher_stop = CancellationToken::new();
            let mut publish_js = async_nats::jetstream::new(self.report.nats.clone());
            publish_js.set_timeout(Duration::from_millis(self.config.publish_timeout_ms));
            let publisher = self.tasks.spawn(publisher::run(
                publish_js,
                rx,
                shadow.clone(),
                self.report.metrics.clone(),
                publisher_stop.clone(),
            ));
            let term = shutdown.child_token();
            let renewer = self.tasks.spawn(renew(
                lease,
                shadow.clone(),
                js.clone(),
                renew_every,
                term.clone(),
            ));
            let fatal = gateway.run(&term).await;
            if let Err(e) = &fatal {
                tracing::error!(error = %e, "gateway stopped");
                // Keep the lease (a standby would fail the same way) until shutdown.
                shutdown.cancelled().await;
            }
            term.cancel();
            drop(gateway); // closes the queue: the publisher drains it and ends
            publisher_stop.cancel();
            let _ = publisher.await;
            let Ok(mut returned) = renewer.await else {
                return;
            };
            // Every stop, whatever its cause, ends with a final checkpoint of what the drained
            // publisher stored: exact for whoever resumes next (possibly us). If another replica
            // has taken the shard meanwhile, the write is refused (fencing) and nothing changes.
            let checkpoint = shadow.lock().ok().map(|s| s.checkpoint());
            if let Some(c) = checkpoint {
                match returned.save_checkpoint(&c).await {
                    Ok(()) => tracing::info!(seq = c.seq, "final checkpoint written"),
                    Err(e) => tracing::warn!(error = %e, "final checkpoint not saved"),
                }
            }
            if shutdown.is_cancelled() {
                returned.release().await;
                tracing::info!("shard lease released");
                return;
            }
            tracing::warn!("shard lease lost to another replica; back to standby");
            lease = returned;
        }
    }
}

/// Renews the lease and writes the checkpoint while `term` runs; cancels `term` when the lease
/// is lost. Returns the lease for release or re-acquisition.
///
/// The checkpoint is written as soon as the publisher reports progress (at most every
/// [`CHECKPOINT_MIN_INTERVAL`]), so a standby that takes over finds a session to resume even if
/// the holder died a moment after identifying.
async fn renew(
    mut lease: Lease,
    shadow: SharedShadow,
    js: async_nats::jetstream::Context,
    every: Duration,
    term: CancellationToken,
) -> Lease {
    let changed = match shadow.lock() {
        Ok(s) => s.changed.clone(),
        Err(_) => Arc::new(tokio::sync::Notify::new()),
    };
    // Fencing: a standby may take the lease once the written expiry has passed, so the holder
    // stops one renewal interval before the expiry of its last successful write, measured from
    // when that write was sent. Without it, a holder cut off from NATS (or starved) would keep
    // the Discord connection and publish beside the replica that took over.
    let hold = lease.ttl().saturating_sub(every);
    let mut valid_until = tokio::time::Instant::now() + hold;
    let mut next_renewal = tokio::time::Instant::now() + every;
    let mut next_position = tokio::time::Instant::now() + IDLE_POSITION_EVERY;
    loop {
        tokio::select! {
            biased;
            _ = term.cancelled() => return lease,
            _ = tokio::time::sleep_until(valid_until) => {
                tracing::error!(
                    "shard lease not renewed before it expires; closing our connection so a standby can take over"
                );
                term.cancel();
                return lease;
            }
            _ = tokio::time::sleep_until(next_renewal) => {
                next_renewal += every;
                let sent = tokio::time::Instant::now();
                match lease.renew().await {
                    Ok(()) => valid_until = sent + hold,
                    Err(LeaseError::Lost) => {
                        tracing::error!("another replica took the shard lease; closing our connection");
                        term.cancel();
                        return lease;
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
                }
                // A renewal that came back too late must not extend a lease that has expired.
                if tokio::time::Instant::now() >= valid_until {
                    continue;
                }
            }
            _ = changed.notified() => {}
            _ = tokio::time::sleep_until(next_position) => {
                next_position += IDLE_POSITION_EVERY;
                advance_idle_position(&shadow, &js).await;
            }
        }
        let checkpoint = match shadow.lock() {
            Ok(mut s) if s.dirty => {
                s.dirty = false;
                Some(s.checkpoint())
            }
            _ => None,
        };
        if let Some(c) = checkpoint {
            match lease.save_checkpoint(&c).await {
                Ok(()) => {}
                Err(LeaseError::Lost) => {
                    tracing::error!("another replica took the shard over; closing our connection");
                    term.cancel();
                    return lease;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "session checkpoint not saved");
                    if let Ok(mut s) = shadow.lock() {
                        s.dirty = true;
                    }
                }
            }
            tokio::select! {
                _ = term.cancelled() => return lease,
                _ = tokio::time::sleep(CHECKPOINT_MIN_INTERVAL) => {}
            }
        }
    }
}

/// While the shard publishes nothing, the checkpoint's stream position moves up to the stream's
/// end every [`IDLE_POSITION_EVERY`], so a takeover reads only a short tail of other shards'
/// events. Only when nothing of ours can land in between: no publish under way or queued, and
/// none started while the stream's end was read.
async fn advance_idle_position(shadow: &SharedShadow, js: &async_nats::jetstream::Context) {
    let before = match shadow.lock() {
        Ok(s) if !s.busy && !s.dirty => s.started,
        _ => return,
    };
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        IDLE_POSITION_EVERY,
        js.get_stream(voicerooms_contract::subject::ROOMS_STREAM),
    )
    .await
    else {
        return;
    };
    let Ok(Ok(info)) = tokio::time::timeout(IDLE_POSITION_EVERY, stream.info()).await else {
        return;
    };
    let end = info.state.last_sequence;
    if let Ok(mut s) = shadow.lock() {
        if !s.busy && s.started == before && end > s.stream_seq {
            s.stream_seq = end;
            s.dirty = true;
            s.changed.notify_one();
        }
    }
}

/// How often an idle shard's checkpoint position is moved to the stream's end.
pub const IDLE_POSITION_EVERY: Duration = Duration::from_secs(5);

/// Shortest time between two checkpoint writes (bounds KV writes under load).
pub const CHECKPOINT_MIN_INTERVAL: Duration = Duration::from_millis(100);
