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
//!                 lease (KV): who holds the shard; session checkpoint for the next holder
//! ```
//!
//! One replica runs that chain once per shard it holds. Which shards: the pool ([`pool`]) —
//! every replica runs the same configuration, and they balance the bot's shards between them
//! through KV (members, leases), handing shards over on joins and leaves and resuming a dead
//! replica's shards. A static `gateway.shard_id` runs one shard as holder or standby instead.
//!
//! ## Layout
//! - [`config`]: the `gateway` settings section and the backoff schedule.
//! - [`protocol`]: gateway opcodes, payload envelope, close-code policy.
//! - [`discord`]: serenity model types → our voice updates and channel changes.
//! - [`cache`]: the voice-state cache and the convergence diff (pure, unit tested).
//! - [`connection`]: the connection loop and its state machine, status and alerts.
//! - [`publisher`]: pipelined JetStream publishing, ordered per room and per user, retried, and
//!   the checkpoint.
//! - [`lease`]: the shard lease and checkpoint in JetStream KV.
//! - [`pool`]: the shard pool's balance, members and shard count.
//! - [`takeover`]: a new holder's starting point (checkpoint + stream; a new shard count's first
//!   start from the previous count's checkpoints).
//! - [`identify`]: identify turns across replicas.
//! - [`status`]: every shard's status, observable at any time.
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
pub mod pool;
pub mod protocol;
pub mod publisher;
pub mod status;
pub mod takeover;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use voicerooms_contract::status::GatewayState;
use voicerooms_platform::settings::Secret;

pub use config::{GatewayConfig, ShardCount};
use connection::{Gateway, Health, Reporter};
use lease::{Lease, LeaseError};
use publisher::{Shadow, SharedShadow};

use serde::{Deserialize, Serialize};
use voicerooms_platform::retry::{self, Backoff, Jitter};
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
    health: PoolHealth,
}

/// Every shard slot's health: the readiness check and [`Application::gateway_state`].
#[derive(Clone, Default)]
pub struct PoolHealth {
    shards: Arc<Mutex<BTreeMap<u32, Arc<Health>>>>,
    /// Pool mode: why this replica does not run its share of the pool yet (`None`: it does).
    balance: Arc<Mutex<Option<String>>>,
}

impl PoolHealth {
    fn set_balance(&self, pending: Option<String>) {
        if let Ok(mut b) = self.balance.lock() {
            *b = pending;
        }
    }

    fn add(&self, shard: u32) -> Arc<Health> {
        let health = Arc::new(Health::default());
        health.set_state(GatewayState::Standby);
        if let Ok(mut all) = self.shards.lock() {
            all.insert(shard, health.clone());
        }
        health
    }

    fn all(&self) -> Vec<(u32, Arc<Health>)> {
        self.shards
            .lock()
            .map(|all| all.iter().map(|(s, h)| (*s, h.clone())).collect())
            .unwrap_or_default()
    }

    /// Ready when this replica runs its share of the pool (pool mode) and every shard it runs
    /// is ready (a shard it does not run is on standby).
    fn ready(&self) -> Result<(), String> {
        if let Some(pending) = self.balance.lock().ok().and_then(|b| b.clone()) {
            return Err(pending);
        }
        for (shard, health) in self.all() {
            health.ready().map_err(|e| format!("shard {shard}: {e}"))?;
        }
        Ok(())
    }

    /// The state of the lowest shard this replica runs; `Standby` when it runs none.
    fn state(&self) -> GatewayState {
        self.all()
            .into_iter()
            .map(|(_, h)| h.state())
            .find(|s| *s != GatewayState::Standby)
            .unwrap_or(GatewayState::Standby)
    }
}

impl Application {
    /// Connects to NATS (retrying in the background), ensures the ROOMS stream, binds HTTP.
    ///
    /// Without a Discord token the gateway stays off (logged); with one, a supervisor task joins
    /// the shard pool (or, with a static `gateway.shard_id`, takes that shard's lease or waits
    /// as its standby) and runs a connection loop per shard held.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let mut builder = ServiceBuilder::new(SERVICE, &settings.common).await?;
        let gw = settings.service.gateway.clone();
        tracing::info!(
            discord_api = %settings.service.discord.api_base,
            discord_token_set = settings.service.discord.token.is_some(),
            shard = ?gw.shard_id,
            shard_count = %gw.shard_count,
            "configured"
        );
        let metrics = metrics::Metrics::default();
        metrics.register(builder.registry_mut());
        let health = PoolHealth::default();
        let mut checks = vec![builder.ensure_rooms_stream()];
        match settings.service.discord.token.clone() {
            None => tracing::warn!("no discord.token configured: the gateway connection is off"),
            Some(token) => {
                let sup = Supervisor {
                    config: gw,
                    token,
                    api_base: settings.service.discord.api_base.clone(),
                    replicas: settings.common.nats.replicas,
                    nats: builder.nats().clone(),
                    metrics,
                    health: health.clone(),
                    instance: builder.instance().to_owned(),
                    tasks: builder.tasks().clone(),
                };
                // Not ready until the shard (static) or this replica's share of the pool runs.
                health.set_balance(Some("starting: opening the shard pool".into()));
                let shutdown = builder.shutdown_token();
                builder.tasks().spawn(sup.run(shutdown));
                let h = health.clone();
                checks.push(("gateway", Box::new(move || h.ready())));
            }
        }
        let service = builder.start(checks, |_| {})?;
        Ok(Self { service, health })
    }

    /// The gateway's current state (the lowest shard this replica runs; tests, diagnostics).
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

/// Opens the pool, then runs the static shard or the pool's share of shards.
struct Supervisor {
    config: GatewayConfig,
    token: Secret,
    api_base: String,
    replicas: usize,
    nats: async_nats::Client,
    metrics: metrics::Metrics,
    health: PoolHealth,
    instance: String,
    tasks: tokio_util::task::TaskTracker,
}

impl Supervisor {
    /// The reporter of shard `shard` of `count` (its health joins the readiness check).
    fn reporter(&self, shard: u32, count: u32) -> Reporter {
        Reporter {
            nats: self.nats.clone(),
            metrics: self.metrics.shard(shard),
            all: self.metrics.clone(),
            health: self.health.add(shard),
            instance: self.instance.clone(),
            shard,
            shard_count: count,
            latest: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }

    async fn run(self, shutdown: CancellationToken) {
        let js = async_nats::jetstream::new(self.nats.clone());
        let renew_every = Duration::from_millis(self.config.lease_renew_ms);
        let api = Arc::new(identify::DiscordApi::new(
            &self.api_base,
            self.token.clone(),
        ));
        // The bucket (and with it the identify queue), retried until NATS answers.
        let opened = retry::retry(
            "opening the gateway pool bucket",
            &Backoff::new(renew_every, renew_every.saturating_mul(5)).with_jitter(Jitter::Equal),
            &shutdown,
            retry::always,
            || async {
                let kv = voicerooms_platform::nats::ensure_kv(
                    &js,
                    &self.config.lease_bucket,
                    1,
                    self.replicas,
                )
                .await?;
                let identify = identify::IdentifyQueue::open(
                    &js,
                    &self.config,
                    api.clone(),
                    &self.instance,
                    self.replicas,
                )
                .await?;
                anyhow::Ok((kv, identify))
            },
        )
        .await;
        let Ok((kv, identify)) = opened else { return };
        let store = pool::PoolStore::new(
            kv.clone(),
            &self.instance,
            Duration::from_millis(self.config.lease_ttl_ms),
            renew_every,
        );
        let count = match (self.config.shard_id, self.config.shard_count) {
            (Some(_), ShardCount::Fixed(n)) => n,
            (_, configured) => {
                let resolved = retry::retry(
                    "resolving the pool's shard count",
                    &Backoff::new(renew_every, Duration::from_secs(16)).with_jitter(Jitter::Equal),
                    &shutdown,
                    |e: &anyhow::Error| {
                        if matches!(
                            e.downcast_ref::<identify::BotError>(),
                            Some(identify::BotError::Unauthorized)
                        ) {
                            retry::Decision::Stop
                        } else {
                            retry::Decision::Retry
                        }
                    },
                    || store.shard_count(configured, &identify),
                )
                .await;
                match resolved {
                    Ok(n) => n,
                    Err(retry::RetryError::Permanent(e)) => {
                        // The token is wrong: an IDENTIFY would get 4004. Say so and stop.
                        let report = self.reporter(0, 1);
                        report
                            .state(GatewayState::Stopped, false, Some(format!("{e:#}")))
                            .await;
                        report
                            .alert(
                                voicerooms_contract::status::Severity::Critical,
                                connection::ALERT_FATAL_CLOSE,
                                format!("{e:#}: the bot token was refused; not connecting until restarted"),
                            )
                            .await;
                        return;
                    }
                    Err(_) => return,
                }
            }
        };
        self.metrics.cover_pool(count);
        let slot = |shard: u32| Slot {
            report: self.reporter(shard, count),
            shard,
            count,
            config: self.config.clone(),
            token: self.token.clone(),
            js: js.clone(),
            kv: kv.clone(),
            identify: identify.clone(),
            tasks: self.tasks.clone(),
            instance: self.instance.clone(),
        };
        if let Some(shard) = self.config.shard_id {
            tracing::info!(shard, shard_count = count, "static shard");
            let slot = slot(shard);
            slot.report.health.begin();
            self.health.set_balance(None);
            slot.run_static(shutdown).await;
            return;
        }
        tracing::info!(shard_count = count, instance = %self.instance, "joining the shard pool");
        self.health
            .set_balance(Some("joining the shard pool".into()));
        let ctls: Vec<Arc<SlotCtl>> = (0..count)
            .map(|shard| {
                let ctl = Arc::new(SlotCtl::default());
                self.tasks
                    .spawn(slot(shard).run_pooled(ctl.clone(), shutdown.clone()));
                ctl
            })
            .collect();
        self.run_pool(store, count, renew_every, &ctls, &shutdown)
            .await;
    }

    /// The pool loop (see [`pool`]): every tick, write ourselves into the members, read the
    /// leases, claim free shards up to our target, hand over those above it.
    async fn run_pool(
        &self,
        store: pool::PoolStore,
        count: u32,
        every: Duration,
        ctls: &[Arc<SlotCtl>],
        shutdown: &CancellationToken,
    ) {
        let (instance, metrics, health) = (self.instance.as_str(), &self.metrics, &self.health);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut target = 0u32;
        // Claims wait for two ticks after joining (and after a failed tick: NATS may have been
        // away long enough for every member entry to lapse), so replicas starting together see
        // each other before the first one claims the whole pool.
        let mut settle = POOL_SETTLE_TICKS;
        let states = |want: &[SlotState]| -> BTreeSet<u32> {
            ctls.iter()
                .zip(0u32..)
                .filter(|(c, _)| want.contains(&c.state()))
                .map(|(_, s)| s)
                .collect()
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let held = states(&[SlotState::Holding]);
            let members = match store.heartbeat(count, &held, target, false).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "pool members not written; skipping this tick"
                    );
                    settle = POOL_SETTLE_TICKS;
                    continue;
                }
            };
            let holders = match store.holders(count).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "shard leases not read; skipping this tick"
                    );
                    settle = POOL_SETTLE_TICKS;
                    continue;
                }
            };
            let view = pool::View {
                count,
                members,
                holders,
                mine: states(&[SlotState::Claiming, SlotState::Holding]),
            };
            let plan = pool::plan(instance, &view);
            target = plan.target;
            metrics
                .pool_members
                .set(i64::try_from(view.members.len()).unwrap_or(i64::MAX));
            metrics.pool_target.set(i64::from(target));
            metrics
                .pool_held
                .set(i64::try_from(held.len()).unwrap_or(i64::MAX));
            for shard in &plan.release {
                if let Some(ctl) = usize::try_from(*shard).ok().and_then(|i| ctls.get(i)) {
                    if ctl.hand_over() {
                        metrics.handovers.inc();
                        tracing::info!(
                            shard,
                            target,
                            members = view.members.len(),
                            "handing the shard over to rebalance the pool"
                        );
                    }
                }
            }
            let running = held.len() == usize::try_from(target).unwrap_or(usize::MAX)
                && view.mine.len() == held.len()
                && plan.release.is_empty();
            health.set_balance((!running || settle > 0).then(|| {
                format!(
                    "taking its share of the shard pool: holds {} of {target}",
                    held.len()
                )
            }));
            if settle > 0 {
                settle = settle.saturating_sub(1);
                continue;
            }
            for shard in &plan.claim {
                if let Some(ctl) = usize::try_from(*shard).ok().and_then(|i| ctls.get(i)) {
                    ctl.claim();
                }
            }
        }
        // Leaving: our slots release their leases themselves (they watch the same shutdown).
        let _ = store.heartbeat(count, &BTreeSet::new(), 0, true).await;
    }
}

/// Ticks a new replica waits before its first claim.
const POOL_SETTLE_TICKS: u32 = 2;

/// Where a pooled shard slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum SlotState {
    #[default]
    Idle,
    /// Asked to take the lease.
    Claiming,
    /// Holds the lease and runs the shard.
    Holding,
    /// Handing the shard over.
    Releasing,
}

/// The pool's handle on one shard slot.
#[derive(Default)]
struct SlotCtl {
    state: Mutex<SlotState>,
    wake: tokio::sync::Notify,
    handover: Mutex<Option<CancellationToken>>,
}

impl SlotCtl {
    fn state(&self) -> SlotState {
        self.state.lock().map(|s| *s).unwrap_or_default()
    }

    fn set(&self, state: SlotState) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
    }

    /// Asks an idle slot to take its lease.
    fn claim(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        if *s == SlotState::Idle {
            *s = SlotState::Claiming;
            self.wake.notify_one();
        }
    }

    /// Asks a holding slot to hand its shard over; `true` if it was holding.
    fn hand_over(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if *s != SlotState::Holding {
            return false;
        }
        *s = SlotState::Releasing;
        if let Ok(token) = self.handover.lock() {
            if let Some(t) = token.as_ref() {
                t.cancel();
            }
        }
        true
    }
}

/// One shard of this replica: its lease, and its connection loop while held.
struct Slot {
    shard: u32,
    count: u32,
    config: GatewayConfig,
    token: Secret,
    js: async_nats::jetstream::Context,
    kv: async_nats::jetstream::kv::Store,
    identify: identify::IdentifyQueue,
    report: Reporter,
    tasks: tokio_util::task::TaskTracker,
    instance: String,
}

/// How a holding period ended.
enum Held {
    /// Stopped on purpose (shutdown or handover): final checkpoint written, lease released.
    Released,
    /// Another replica took the lease.
    Lost,
}

impl Slot {
    fn lease(&self) -> Lease {
        Lease::new(
            self.kv.clone(),
            &self.config,
            self.shard,
            self.count,
            &self.instance,
        )
    }

    fn spawn_status(&self, shutdown: &CancellationToken) {
        self.tasks.spawn(status::run(
            self.report.nats.clone(),
            self.kv.clone(),
            self.report.latest.subscribe(),
            Duration::from_millis(self.config.status_interval_ms),
            shutdown.clone(),
        ));
    }

    /// Static mode: this shard only, as holder or standby, until shutdown.
    async fn run_static(self, shutdown: CancellationToken) {
        let renew_every = Duration::from_millis(self.config.lease_renew_ms);
        self.spawn_status(&shutdown);
        let mut lease = self.lease();
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
            let (returned, held) = self.hold(lease, shutdown.child_token()).await;
            lease = returned;
            if shutdown.is_cancelled() {
                return;
            }
            if let Some(Held::Released) = held {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(renew_every) => {}
            }
        }
    }

    /// Pool mode: idle until the pool asks for a claim; holds the shard until the pool asks for
    /// a handover, the lease is lost or shutdown.
    async fn run_pooled(self, ctl: Arc<SlotCtl>, shutdown: CancellationToken) {
        self.spawn_status(&shutdown);
        let mut lease = self.lease();
        loop {
            while ctl.state() != SlotState::Claiming {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ctl.wake.notified() => {}
                }
            }
            match lease.try_acquire().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(shard = self.shard, "claim lost to another replica");
                    ctl.set(SlotState::Idle);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(shard = self.shard, error = %e, "lease not acquired");
                    ctl.set(SlotState::Idle);
                    continue;
                }
            }
            self.report.health.begin();
            let handover = shutdown.child_token();
            if let Ok(mut h) = ctl.handover.lock() {
                *h = Some(handover.clone());
            }
            ctl.set(SlotState::Holding);
            let (returned, held) = self.hold(lease, handover).await;
            lease = returned;
            if let Ok(mut h) = ctl.handover.lock() {
                *h = None;
            }
            let detail = match held {
                Some(Held::Released) if !shutdown.is_cancelled() => {
                    "handed over to rebalance the pool"
                }
                Some(Held::Released) => "released at shutdown",
                _ => "another replica took the shard",
            };
            self.report
                .state(GatewayState::Standby, false, Some(detail.into()))
                .await;
            self.report.latest.send_replace(None);
            self.report.metrics.release();
            ctl.set(SlotState::Idle);
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Runs the shard while the lease is ours: claim the checkpoint, restore from the stream,
    /// connect, publish, renew. Ends when `stop` fires (shutdown or handover: final checkpoint,
    /// lease released) or the lease is lost. `None`: it could not start (lease released).
    async fn hold(&self, mut lease: Lease, stop: CancellationToken) -> (Lease, Option<Held>) {
        let renew_every = Duration::from_millis(self.config.lease_renew_ms);
        let shard = self.shard;
        tracing::info!(instance = %self.instance, shard, "shard lease acquired");
        self.report.health.begin();
        self.report.metrics.held.set(1);
        let checkpoint = match lease.claim_checkpoint().await {
            Ok(c) => c,
            Err(e) => {
                // Without the claim our checkpoint writes would be refused: step back.
                tracing::warn!(shard, error = %e, "could not claim the session checkpoint; releasing the lease");
                lease.release().await;
                self.report.metrics.held.set(0);
                return (lease, None);
            }
        };
        // What was actually stored: the checkpoint plus the stream after it.
        let restored = match checkpoint {
            // A shard count's first start: from the previous count's checkpoints, if any.
            None => {
                match takeover::restore_resharded(&self.js, &self.kv, shard, self.count).await {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => takeover::restore(&self.js, None, shard, self.count).await,
                    Err(e) => Err(e),
                }
            }
            Some(c) => takeover::restore(&self.js, Some(c), shard, self.count).await,
        };
        let restored = match restored {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    shard,
                    error = format!("{e:#}"),
                    "could not read what the stream holds; releasing the lease"
                );
                lease.release().await;
                self.report.metrics.held.set(0);
                return (lease, None);
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
            self.identify.clone(),
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
            self.config.publish_in_flight,
        ));
        let term = stop.child_token();
        let renewer = self.tasks.spawn(renew(
            lease,
            shadow.clone(),
            self.js.clone(),
            renew_every,
            term.clone(),
        ));
        let fatal = gateway.run(&term).await;
        if let Err(e) = &fatal {
            tracing::error!(shard, error = %e, "gateway stopped");
            // Keep the lease (another replica would fail the same way) until told to stop.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = term.cancelled() => {}
            }
        }
        term.cancel();
        drop(gateway); // closes the queue: the publisher drains it and ends
        publisher_stop.cancel();
        let _ = publisher.await;
        let mut returned = match renewer.await {
            Ok(l) => l,
            Err(_) => {
                self.report.metrics.held.set(0);
                return (self.lease(), Some(Held::Lost));
            }
        };
        // Every stop, whatever its cause, ends with a final checkpoint of what the drained
        // publisher stored: exact for whoever resumes next (possibly us). If another replica
        // has taken the shard meanwhile, the write is refused (fencing) and nothing changes.
        let checkpoint = shadow.lock().ok().map(|s| s.checkpoint());
        if let Some(c) = checkpoint {
            match returned.save_checkpoint(&c).await {
                Ok(()) => tracing::info!(shard, seq = c.seq, "final checkpoint written"),
                Err(e) => tracing::warn!(shard, error = %e, "final checkpoint not saved"),
            }
        }
        self.report.metrics.held.set(0);
        if stop.is_cancelled() {
            returned.release().await;
            tracing::info!(shard, "shard lease released");
            return (returned, Some(Held::Released));
        }
        tracing::warn!(shard, "shard lease lost to another replica");
        (returned, Some(Held::Lost))
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
    let mut valid_until = later(tokio::time::Instant::now(), hold);
    let mut next_renewal = later(tokio::time::Instant::now(), every);
    let mut next_position = later(tokio::time::Instant::now(), IDLE_POSITION_EVERY);
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
                next_renewal = later(next_renewal, every);
                let sent = tokio::time::Instant::now();
                match lease.renew().await {
                    Ok(()) => valid_until = later(sent, hold),
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
                next_position = later(next_position, IDLE_POSITION_EVERY);
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

/// `at + d`, saturating (a year ahead at most).
pub(crate) fn later(at: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(at)
}

/// How often an idle shard's checkpoint position is moved to the stream's end.
pub const IDLE_POSITION_EVERY: Duration = Duration::from_secs(5);

/// Shortest time between two checkpoint writes (bounds KV writes under load).
pub const CHECKPOINT_MIN_INTERVAL: Duration = Duration::from_millis(100);
