//! Test harness: a private nats-server, the Discord simulator in-process, and room-manager
//! replicas in-process on port 0, with typed helpers for the API and for voice events.

#![allow(dead_code)]

use std::time::Duration;

use discord_sim::{seed, RateLimitConfig, SimConfig, SimHandle, Simulator};
use futures::StreamExt;
use room_manager::settings::{InvitesSettings, RoomManagerSettings, RoomsSettings, TuningSettings};
use room_manager::{Application, Settings};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use voicerooms_contract::command::{
    decode_reply, CreateRoom, Created, JoinRoom, Joined, RoomCommand,
};
use voicerooms_contract::event::{Event, VoiceFlags, VoiceJoined, VoiceLeft};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::{
    now_ms, ApiError, ChannelId, EventKind, GuildId, RoomEvent, RoomId, UserId, UserRef,
};
use voicerooms_platform::settings::{CommonSettings, DiscordSettings};
use voicerooms_platform::Secret;
use voicerooms_testkit::NatsServer;

pub const SECRET: &str = "test-invite-secret-0123456789abcdef";
pub const GUILD: u64 = seed::GUILD_ID;

pub struct Replica {
    pub port: u16,
    pub app_core: std::sync::Arc<room_manager::rooms::Core>,
    pub health: room_manager::supervisor::Health,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.handle).await;
    }
    /// Like a crash: the tasks are dropped without a graceful shutdown.
    pub fn abort(self) {
        self.handle.abort();
    }
}

pub struct Env {
    pub nats: NatsServer,
    pub sim: SimHandle,
    pub client: async_nats::Client,
    pub replicas: Vec<Replica>,
}

pub fn sim_config(rate_limits: bool) -> SimConfig {
    let mut c = SimConfig::for_tests();
    c.rate_limits = RateLimitConfig {
        enabled: rate_limits,
        ..RateLimitConfig::default()
    };
    c
}

pub fn settings(nats_url: &str, api: &str, instance: &str, mut rooms: RoomsSettings) -> Settings {
    if rooms.guilds.is_empty() {
        rooms.guilds = GUILD.to_string();
    }
    let mut common = CommonSettings::with_port(0);
    common.nats.url = nats_url.to_owned();
    common.instance = instance.to_owned();
    common.shutdown.grace_period_ms = 3_000;
    Settings {
        common,
        service: RoomManagerSettings {
            discord: DiscordSettings {
                token: Some(Secret::new("sim-bot-token")),
                api_base: api.to_owned(),
            },
            rooms,
            invites: InvitesSettings {
                secret: Some(Secret::new(SECRET)),
                ttl_secs: 86_400,
            },
            room_manager: TuningSettings {
                retry_base_ms: 20,
                request_timeout_ms: 3_000,
                retry_interval_ms: 300,
                outbox_sweep_interval_ms: 500,
                ..TuningSettings::default()
            },
        },
    }
}

/// Short durations, long enough not to fire during ordinary tests.
pub fn quiet_rooms() -> RoomsSettings {
    RoomsSettings {
        idle_timeout_ms: 3_600_000,
        cleanup_interval_ms: 3_600_000,
        reconcile_interval_ms: 3_600_000,
        pending_move_window_ms: 30_000,
        max_per_user: 3,
        ..RoomsSettings::default()
    }
}

impl Env {
    pub async fn start(replicas: usize, rooms: RoomsSettings, rate_limits: bool) -> Env {
        Self::start_with(replicas, rooms, rate_limits, 50).await
    }

    /// With our own global limit (per second) raised, for tests that make many calls.
    pub async fn start_with(
        replicas: usize,
        rooms: RoomsSettings,
        rate_limits: bool,
        global_limit: u16,
    ) -> Env {
        Self::start_custom(replicas, rooms, sim_config(rate_limits), |t| {
            t.global_rate_limit = global_limit;
        })
        .await
    }

    /// Against a simulator that checks the bot's permissions per channel, as Discord does.
    pub async fn start_strict(replicas: usize, rooms: RoomsSettings, rate_limits: bool) -> Env {
        Self::start_tuned(replicas, rooms, rate_limits, |_| {}).await
    }

    /// Strict simulator, and `tune` applied to every replica's `room_manager` settings.
    pub async fn start_tuned(
        replicas: usize,
        rooms: RoomsSettings,
        rate_limits: bool,
        tune: impl Fn(&mut TuningSettings),
    ) -> Env {
        let mut config = sim_config(rate_limits);
        config.strict_bot_permissions = true;
        Self::start_custom(replicas, rooms, config, tune).await
    }

    pub async fn start_custom(
        replicas: usize,
        rooms: RoomsSettings,
        config: SimConfig,
        tune: impl Fn(&mut TuningSettings),
    ) -> Env {
        let nats = NatsServer::start().await;
        let sim = Simulator::start(config).await.expect("simulator");
        let client = nats.client().await;
        let mut env = Env {
            nats,
            sim,
            client,
            replicas: Vec::new(),
        };
        for i in 0..replicas {
            let mut s = settings(
                &env.nats.url(),
                &env.sim.api_url(),
                &format!("rm-{i}"),
                rooms.clone(),
            );
            tune(&mut s.service.room_manager);
            env.replicas.push(start_replica(s).await);
        }
        env
    }

    pub async fn add_replica(&mut self, instance: &str, rooms: RoomsSettings) {
        let s = settings(&self.nats.url(), &self.sim.api_url(), instance, rooms);
        self.replicas.push(start_replica(s).await);
    }

    pub async fn request<C: Serialize, R: DeserializeOwned>(
        &self,
        kind: CommandKind,
        cmd: &C,
    ) -> Result<R, ApiError> {
        request(&self.client, kind, cmd).await
    }

    pub async fn create(&self, owner: &UserRef, name: &str) -> Result<Created, ApiError> {
        self.request(
            CommandKind::Create,
            &CreateRoom {
                requester: owner.clone(),
                guild: GuildId::new(GUILD).unwrap(),
                name: name.into(),
                idempotency_key: None,
            },
        )
        .await
    }

    pub async fn join(&self, user: &UserRef, invite: &str) -> Result<Joined, ApiError> {
        self.request(
            CommandKind::Join,
            &JoinRoom {
                requester: user.clone(),
                invite: invite.into(),
                room: None,
            },
        )
        .await
    }

    pub async fn close(&self, owner: &UserRef, room: RoomId) -> Result<(), ApiError> {
        self.request::<_, serde_json::Value>(
            CommandKind::Close,
            &RoomCommand {
                requester: owner.clone(),
                room,
            },
        )
        .await
        .map(|_| ())
    }

    /// Publishes a voice event as gateway-listener would, into the ROOMS stream.
    pub async fn publish(&self, channel: u64, event: Event) {
        let ev = RoomEvent::new(
            GuildId::new(GUILD).unwrap(),
            RoomId::new(channel).unwrap(),
            now_ms(),
            event,
        );
        let js = async_nats::jetstream::new(self.client.clone());
        js.publish(ev.subject(), ev.encode().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    /// The simulator moves/connects `user` to `channel`; we publish the events the gateway would.
    pub async fn voice_connect(&self, user: &UserRef, channel: u64) {
        let before = self.sim.voice_channel_of(user.id.get()).map(|(_, c)| c);
        self.sim
            .connect_voice(user.id.get(), channel)
            .expect("connect voice");
        if let Some(old) = before {
            self.publish(
                old,
                Event::VoiceLeft(VoiceLeft {
                    user: user.clone(),
                    moved_to: Some(ChannelId::new(channel).unwrap()),
                }),
            )
            .await;
        }
        self.publish(
            channel,
            Event::VoiceJoined(VoiceJoined {
                user: user.clone(),
                flags: VoiceFlags::default(),
                moved_from: before.map(|c| ChannelId::new(c).unwrap()),
            }),
        )
        .await;
    }

    pub async fn voice_disconnect(&self, user: &UserRef) {
        let before = self.sim.voice_channel_of(user.id.get()).map(|(_, c)| c);
        self.sim
            .disconnect_voice(user.id.get())
            .expect("disconnect");
        if let Some(old) = before {
            self.publish(
                old,
                Event::VoiceLeft(VoiceLeft {
                    user: user.clone(),
                    moved_to: None,
                }),
            )
            .await;
        }
    }

    /// Room events of one kind seen on the stream so far (reads the ROOMS stream).
    pub async fn events_of(&self, room: RoomId, kind: EventKind) -> Vec<RoomEvent> {
        stream_events(&self.client, room, kind).await
    }

    pub async fn wait_for_event(&self, room: RoomId, kind: EventKind, what: &str) -> RoomEvent {
        let mut found = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(e) = self.events_of(room, kind).await.pop() {
                found = Some(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        found.unwrap_or_else(|| panic!("timed out waiting for {what}"))
    }

    /// Waits until every replica's start-up reconciliation has listed channels (so injected REST
    /// faults hit the calls under test, not the reconciler's).
    pub async fn wait_startup_reconcile(&self) {
        eventually("start-up reconciliation", || async {
            self.replicas
                .iter()
                .all(|r| r.app_core.metrics.reconcile_passes.get() >= 1)
        })
        .await;
    }

    pub async fn shutdown(self) {
        for r in self.replicas {
            r.stop().await;
        }
        self.sim.shutdown().await;
    }
}

/// Logs of the in-process replicas on stderr when `RUST_LOG` is set (debugging a test).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub async fn start_replica(s: Settings) -> Replica {
    init_logs();
    let app = Application::build(s).await.expect("build room-manager");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let core = loop {
        if let Some(c) = app.core() {
            break Some(c);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "room-manager not set up in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let port = app.port();
    let health = app.health();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    // Readiness: the API answers.
    Replica {
        port,
        app_core: core.expect("core"),
        health,
        stop: Some(tx),
        handle,
    }
}

/// Room events of one kind the `ROOMS` stream holds for `room`, in stream order.
pub async fn stream_events(
    client: &async_nats::Client,
    room: RoomId,
    kind: EventKind,
) -> Vec<RoomEvent> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("ROOMS").await.expect("stream");
    let subject = format!("rooms.{GUILD}.{room}.{}", kind.as_str());
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return out;
    }
    let mut msgs = consumer.messages().await.expect("messages");
    while out.len() < pending as usize {
        match tokio::time::timeout(Duration::from_secs(2), msgs.next()).await {
            Ok(Some(Ok(m))) => out.push(RoomEvent::decode(&m.payload).expect("event")),
            _ => break,
        }
    }
    out
}

/// A request with its own reply timeout (commands that wait for Discord's rate limits).
pub async fn request_within<C: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    kind: CommandKind,
    cmd: &C,
    timeout: Duration,
) -> Result<R, ApiError> {
    let body = serde_json::to_vec(cmd).expect("encode");
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(timeout));
    match client.send_request(kind.subject(), request).await {
        Ok(reply) => decode_reply::<R>(&reply.payload),
        Err(e) => panic!("request {} failed: {e}", kind.as_str()),
    }
}

/// Like a real client: repeats a request (same body, so the same idempotency key) while the
/// answer is a retryable error (`timeout`, `unavailable`, `conflict`, …), at most 5 times.
pub async fn request_retrying<C: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    kind: CommandKind,
    cmd: &C,
    timeout: Duration,
) -> Result<R, ApiError> {
    let mut attempt = 0;
    loop {
        match request_within::<C, R>(client, kind, cmd, timeout).await {
            Err(e) if e.code.retryable() && attempt < 5 => {
                attempt += 1;
                let wait = e.retry_after_ms.unwrap_or(200).min(5_000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            other => return other,
        }
    }
}

pub async fn request<C: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    kind: CommandKind,
    cmd: &C,
) -> Result<R, ApiError> {
    let body = serde_json::to_vec(cmd).expect("encode");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client.request(kind.subject(), body.clone().into()).await {
            Ok(reply) => return decode_reply::<R>(&reply.payload),
            // No responders yet (the API is still starting): try again until the deadline.
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("request {} failed: {e}", kind.as_str()),
        }
    }
}

pub fn user(id: u64, name: &str) -> UserRef {
    UserRef {
        id: UserId::new(id).unwrap(),
        username: name.into(),
        global_name: None,
        avatar: None,
    }
}

pub fn seeded(i: usize) -> UserRef {
    let (id, name) = seed::USERS[i];
    user(id, name)
}

/// The guild as the simulator holds it (no REST call: no rate limit, nothing in its log).
fn guild_state(sim: &SimHandle) -> serde_json::Value {
    sim.snapshot()["guilds"]
        .as_array()
        .and_then(|gs| {
            gs.iter()
                .find(|g| g["id"].as_str() == Some(GUILD.to_string().as_str()))
                .cloned()
        })
        .expect("the test guild")
}

fn id_of(v: &serde_json::Value) -> Option<u64> {
    v["id"].as_str().and_then(|s| s.parse().ok())
}

/// A channel as the simulator holds it.
pub async fn get_channel(sim: &SimHandle, channel: u64) -> Option<serde_json::Value> {
    guild_state(sim)["channels"]
        .as_array()?
        .iter()
        .find(|c| id_of(c) == Some(channel))
        .cloned()
}

/// Role ids of the guild.
pub async fn role_ids(sim: &SimHandle) -> Vec<u64> {
    let mut ids: Vec<u64> = roles(sim).iter().filter_map(id_of).collect();
    ids.sort_unstable();
    ids
}

/// Roles of the guild (id, name, …).
pub fn roles(sim: &SimHandle) -> Vec<serde_json::Value> {
    guild_state(sim)["roles"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Channels of the guild.
pub fn channels(sim: &SimHandle) -> Vec<serde_json::Value> {
    guild_state(sim)["channels"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Channels that are not the seeded ones (Lobby, Gaming, general).
pub fn room_channels(sim: &SimHandle) -> Vec<serde_json::Value> {
    channels(sim)
        .into_iter()
        .filter(|c| {
            !matches!(
                id_of(c),
                Some(seed::LOBBY_CHANNEL_ID | seed::GAMING_CHANNEL_ID | seed::TEXT_CHANNEL_ID)
            )
        })
        .collect()
}

/// (method, path, status) of every REST call the simulator answered.
pub fn rest_calls(sim: &SimHandle) -> Vec<(String, String, u16)> {
    sim.events()
        .into_iter()
        .filter_map(|e| match e.kind {
            discord_sim::SimEventKind::Rest {
                method,
                path,
                status,
                ..
            } => Some((method, path, status)),
            _ => None,
        })
        .collect()
}

/// Room channels whose overwrites name `role`.
pub fn channels_naming_role(sim: &SimHandle, role: u64) -> usize {
    room_channels(sim)
        .iter()
        .filter(|c| {
            c["permission_overwrites"].as_array().is_some_and(|ows| {
                ows.iter()
                    .any(|o| o["id"].as_str() == Some(role.to_string().as_str()))
            })
        })
        .count()
}

/// Roles made by room-manager (`vr-<nonce> …`).
pub fn tagged_roles(sim: &SimHandle) -> Vec<serde_json::Value> {
    roles(sim)
        .into_iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with("vr-")))
        .collect()
}

/// Polls an async condition until it holds or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    voicerooms_testkit::wait_until(Duration::from_secs(10), what, &mut f).await
}
