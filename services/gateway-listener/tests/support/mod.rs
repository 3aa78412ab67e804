//! Test harness: a private nats-server, the Discord simulator in-process and the service
//! in-process, plus readers for what reached the ROOMS stream.

#![allow(dead_code)]
// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects,
    clippy::unreachable
)]

use std::time::Duration;

use discord_sim::{seed, SimConfig, SimEvent, SimEventKind, SimHandle, Simulator};
use futures::StreamExt;
use gateway_listener::{Application, GatewayConfig, GatewaySettings, Settings};
use tokio::task::JoinHandle;
use voicerooms_contract::event::Event;
use voicerooms_contract::status::OperatorAlert;
use voicerooms_contract::RoomEvent;
use voicerooms_platform::settings::{CommonSettings, DiscordSettings, Secret};
use voicerooms_testkit::{wait_until, NatsServer};

pub const TOKEN: &str = "sim-bot-token";
pub const LOBBY: u64 = seed::LOBBY_CHANNEL_ID;
pub const GAMING: u64 = seed::GAMING_CHANNEL_ID;
pub const ALICE: u64 = seed::USERS[0].0;
pub const BOB: u64 = seed::USERS[1].0;
pub const CAROL: u64 = seed::USERS[2].0;
pub const DAVE: u64 = seed::USERS[3].0;

/// Fast timings for tests: 20 ms backoff base, short lease, publishes retried after 1 s.
pub fn fast_gateway() -> GatewayConfig {
    GatewayConfig {
        publish_timeout_ms: 1_000,
        backoff_base_ms: 20,
        backoff_max_ms: 320,
        connect_timeout_ms: 2_000,
        lease_ttl_ms: 1_000,
        lease_renew_ms: 200,
        ..GatewayConfig::default()
    }
}

pub fn settings(
    nats: &NatsServer,
    sim: &SimHandle,
    gateway: GatewayConfig,
    token: &str,
) -> Settings {
    let mut common = CommonSettings::with_port(0);
    common.nats.url = nats.url();
    common.shutdown.grace_period_ms = 3_000;
    Settings {
        common,
        service: GatewaySettings {
            discord: DiscordSettings {
                token: Some(Secret::new(token)),
                api_base: sim.api_url(),
            },
            gateway,
        },
    }
}

pub struct TestGateway {
    pub nats: NatsServer,
    pub sim: SimHandle,
    pub client: async_nats::Client,
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Starts NATS, the simulator and the service (fast timings) and waits until it is connected.
pub async fn spawn() -> TestGateway {
    spawn_with(fast_gateway(), SimConfig::for_tests(), TOKEN).await
}

pub async fn spawn_with(gateway: GatewayConfig, sim: SimConfig, token: &str) -> TestGateway {
    let mut t = prepare(sim).await;
    t.start_app(gateway, token).await;
    t
}

/// NATS and the simulator, without the service yet.
pub async fn prepare(sim: SimConfig) -> TestGateway {
    let nats = NatsServer::start().await;
    let sim = Simulator::start(sim).await.expect("simulator starts");
    let client = nats.client().await;
    TestGateway {
        nats,
        sim,
        client,
        port: 0,
        stop: None,
        task: None,
    }
}

impl TestGateway {
    pub async fn start_app(&mut self, gateway: GatewayConfig, token: &str) {
        let app = Application::build(settings(&self.nats, &self.sim, gateway, token))
            .await
            .expect("service builds");
        self.port = app.port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        })));
    }

    /// One more replica of the service against the same NATS and simulator.
    pub async fn another_app(&self, gateway: GatewayConfig, token: &str) -> AppHandle {
        let app = Application::build(settings(&self.nats, &self.sim, gateway, token))
            .await
            .expect("service builds");
        let port = app.port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        }));
        AppHandle {
            port,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn wait_connected(&self) {
        let readyz = format!("http://127.0.0.1:{}/readyz", self.port);
        wait_until(Duration::from_secs(10), "gateway ready", || async {
            voicerooms_testkit::conformance::status_of(&readyz).await == Some(200)
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub async fn stop_app(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Every event stored in ROOMS, in stream order.
    pub async fn stored(&self) -> Vec<RoomEvent> {
        stored_events(&self.client).await
    }

    /// Waits until at least `n` events are stored and gives every stored event. Tests end with a
    /// sentinel event: events are published in order, so a duplicate of anything earlier would
    /// be stored before the sentinel and show up in the exact comparison.
    pub async fn wait_events(&self, n: usize) -> Vec<RoomEvent> {
        wait_until(
            Duration::from_secs(20),
            &format!("{n} events stored"),
            || async { self.stored().await.len() >= n },
        )
        .await;
        self.stored().await
    }

    /// The simulator's log of gateway connection events since `since`.
    pub fn log(&self) -> Vec<SimEvent> {
        self.sim.events()
    }

    pub fn count(&self, f: impl Fn(&SimEventKind) -> bool) -> usize {
        self.sim.events().iter().filter(|e| f(&e.kind)).count()
    }
}

/// A replica started with [`TestGateway::another_app`].
pub struct AppHandle {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl AppHandle {
    /// Stops it gracefully (SIGTERM-like) and waits.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }
}

impl Drop for AppHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn stored_events(client: &async_nats::Client) -> Vec<RoomEvent> {
    let js = async_nats::jetstream::new(client.clone());
    let Ok(mut stream) = js.get_stream("ROOMS").await else {
        return vec![];
    };
    let Ok(info) = stream.info().await else {
        return vec![];
    };
    let last = info.state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            let mut e = RoomEvent::decode_on(msg.subject.as_str(), &msg.payload)
                .expect("stored events decode");
            e.seq = Some(seq);
            out.push(e);
        }
    }
    out
}

/// `(kind, room, user)` of each event: what the assertions compare.
pub fn summary(events: &[RoomEvent]) -> Vec<(&'static str, u64, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e.kind().as_str(),
                e.room.get(),
                e.event.user().map(|u| u.id.get()).unwrap_or(0),
            )
        })
        .collect()
}

pub fn joined(room: u64, user: u64) -> (&'static str, u64, u64) {
    ("voice.joined", room, user)
}
pub fn left(room: u64, user: u64) -> (&'static str, u64, u64) {
    ("voice.left", room, user)
}
pub fn updated(room: u64, user: u64) -> (&'static str, u64, u64) {
    ("voice.updated", room, user)
}

/// Collects messages of a core subject in the background.
pub async fn collect(
    client: &async_nats::Client,
    subject: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>> {
    let mut sub = client
        .subscribe(subject.to_owned())
        .await
        .expect("subscribe");
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = out.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            sink.lock().unwrap().push(m.payload.to_vec());
        }
    });
    out
}

pub fn alerts(raw: &std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) -> Vec<OperatorAlert> {
    raw.lock()
        .unwrap()
        .iter()
        .filter_map(|b| OperatorAlert::decode(b).ok())
        .collect()
}

pub fn is_voice(e: &RoomEvent) -> bool {
    matches!(
        e.event,
        Event::VoiceJoined(_) | Event::VoiceLeft(_) | Event::VoiceUpdated(_)
    )
}

/// Every event stored in ROOMS, in stream order, read through one ordered consumer (fast for
/// thousands of events). Retries while the stream is unavailable (NATS restarting).
pub async fn stored_all(client: &async_nats::Client) -> Vec<RoomEvent> {
    use async_nats::jetstream::consumer;
    let js = async_nats::jetstream::new(client.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut stream = js.get_stream("ROOMS").await?;
            let last = stream.info().await?.state.last_sequence;
            let mut out = Vec::new();
            if last == 0 {
                return Ok::<_, anyhow::Error>(out);
            }
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer.messages().await?;
            loop {
                let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("replay ended"))?
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let seq = m
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                let mut e = RoomEvent::decode_on(m.subject.as_str(), &m.payload)?;
                e.seq = Some(seq);
                out.push(e);
                if seq >= last {
                    return Ok(out);
                }
            }
        };
        match attempt.await {
            Ok(events) => return events,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("reading ROOMS: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("reading ROOMS: {e:#}"),
        }
    }
}

/// `(session, gateway seq, part)` from an event id `<session>:<seq>:<part>`.
pub fn id_parts(e: &RoomEvent) -> (String, u64, String) {
    let id = e.id.as_deref().expect("gateway events carry an id");
    let mut it = id.splitn(3, ':');
    let session = it.next().expect("session").to_owned();
    let seq = it.next().and_then(|s| s.parse().ok()).expect("seq");
    let part = it.next().expect("part").to_owned();
    (session, seq, part)
}

/// Stored order = dispatch order **for every room and every user** — what consumers apply
/// events by (the edge and room-manager per room, the voice cache per user): along the stream,
/// the events of one room, and those of one user, never go back to an earlier dispatch of their
/// session, and once a later session has reached that room or user an earlier one never
/// reappears there; no id twice. Events of unrelated rooms and users may be stored out of
/// dispatch order after a publish failure (the publisher's window, docs/GATEWAY.md). Returns
/// the first violation.
pub fn dispatch_order_violation(events: &[RoomEvent]) -> Option<String> {
    use std::collections::{HashMap, HashSet};
    #[derive(Hash, PartialEq, Eq, Debug, Clone)]
    enum Key {
        Room(u64, u64),
        User(u64, u64),
    }
    let mut seen_ids = HashSet::new();
    // Per key: the current (session, seq, stream seq) and the sessions it has finished with.
    let mut current: HashMap<Key, (String, u64, u64)> = HashMap::new();
    let mut finished: HashMap<Key, HashSet<String>> = HashMap::new();
    for e in events.iter().filter(|e| e.id.is_some()) {
        let id = e.id.clone().unwrap_or_default();
        if !seen_ids.insert(id.clone()) {
            return Some(format!("id {id} stored twice (stream seq {:?})", e.seq));
        }
        let (session, seq, _) = id_parts(e);
        let stream_seq = e.seq.unwrap_or(0);
        let mut keys = vec![Key::Room(e.guild.get(), e.room.get())];
        if let Some(u) = e.event.user() {
            keys.push(Key::User(e.guild.get(), u.id.get()));
        }
        for key in keys {
            match current.get(&key) {
                Some((s, prev_seq, prev_stream)) if *s == session && seq < *prev_seq => {
                    return Some(format!(
                        "{key:?}: dispatch {seq} (stream seq {stream_seq}) stored after dispatch {prev_seq} (stream seq {prev_stream}) of session {session}"
                    ));
                }
                Some((s, ..)) if *s == session => {}
                Some((s, ..)) => {
                    let done = finished.entry(key.clone()).or_default();
                    if done.contains(&session) {
                        return Some(format!(
                            "{key:?}: session {session} reappears at stream seq {stream_seq} after session {s}"
                        ));
                    }
                    done.insert(s.clone());
                }
                None => {}
            }
            current.insert(key, (session.clone(), seq, stream_seq));
        }
    }
    None
}

/// Players cycling through voice at a fixed overall rate: each joins its first channel, moves
/// through its other channels, leaves, and starts again. Every step is one dispatch; the
/// expected events per user are recorded (a move is a `voice.left` and a `voice.joined`).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<std::collections::BTreeMap<u64, Vec<&'static str>>>,
}

impl Load {
    /// `users` new members of `guild`, each with a voice channel of `channels` (round robin),
    /// toggling in turn so that `per_sec` changes happen per second overall.
    pub async fn start(
        sim: &SimHandle,
        guild: u64,
        channels: &[u64],
        users: usize,
        per_sec: u32,
    ) -> Load {
        let players = new_players(sim, guild, users)
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, vec![channels[i % channels.len()]]))
            .collect();
        Self::start_with(sim, players, per_sec)
    }

    /// Cycles the given players, each through its channels (one channel: join / leave).
    pub fn start_with(sim: &SimHandle, players: Vec<(u64, Vec<u64>)>, per_sec: u32) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sim = sim.clone();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut made: std::collections::BTreeMap<u64, Vec<&'static str>> = Default::default();
            // Where each player is in its cycle: None = out of voice, Some(i) = in channels[i].
            let mut at: std::collections::BTreeMap<u64, usize> = Default::default();
            let mut tick = tokio::time::interval(Duration::from_nanos(
                1_000_000_000 / u64::from(per_sec.max(1)),
            ));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0usize;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                let (user, channels) = &players[i % players.len()];
                i += 1;
                let events = made.entry(*user).or_default();
                match at.get(user).copied() {
                    None => {
                        sim.connect_voice(*user, channels[0]).expect("connect");
                        at.insert(*user, 0);
                        events.push("voice.joined");
                    }
                    Some(c) if c + 1 < channels.len() => {
                        sim.move_voice(*user, channels[c + 1]).expect("move");
                        at.insert(*user, c + 1);
                        events.extend(["voice.left", "voice.joined"]);
                    }
                    Some(_) => {
                        sim.disconnect_voice(*user).expect("disconnect");
                        at.remove(user);
                        events.push("voice.left");
                    }
                }
            }
            for user in at.keys() {
                sim.disconnect_voice(*user).expect("disconnect");
                made.entry(*user).or_default().push("voice.left");
            }
            made
        });
        Load { stop, task }
    }

    /// Stops (everyone leaves voice) and gives each user's expected events, in order.
    pub async fn stop(self) -> std::collections::BTreeMap<u64, Vec<&'static str>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("load task")
    }
}

/// `n` new members of `guild`.
pub fn new_players(sim: &SimHandle, guild: u64, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let id = sim
                .create_user(&format!("player{guild}x{i}x{}", rand_suffix()))
                .expect("user");
            sim.add_member(guild, id, &[]).expect("member");
            id
        })
        .collect()
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Replays stored voice events as each user's state: where they are (room), and every event
/// that does not fit the state it finds (a join while already in voice, a leave of a room they
/// are not in: an event stored twice, or a change consumers never got undone).
pub fn replay_voice(events: &[RoomEvent]) -> (std::collections::BTreeMap<u64, u64>, Vec<String>) {
    let mut state: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut bad = Vec::new();
    for e in events.iter().filter(|e| is_voice(e)) {
        let Some(user) = e.event.user().map(|u| u.id.get()) else {
            continue;
        };
        let room = e.room.get();
        match &e.event {
            Event::VoiceJoined(_) => {
                if let Some(prev) = state.insert(user, room) {
                    bad.push(format!(
                        "stream seq {:?}: {user} joined {room} while in {prev} ({:?})",
                        e.seq, e.id
                    ));
                }
            }
            Event::VoiceLeft(_) => match state.get(&user) {
                Some(r) if *r == room => {
                    state.remove(&user);
                }
                other => bad.push(format!(
                    "stream seq {:?}: {user} left {room} while in {other:?} ({:?})",
                    e.seq, e.id
                )),
            },
            _ => {}
        }
    }
    (state, bad)
}

/// Discord's voice state of `users` (user → channel), from the simulator.
pub fn discord_voice(sim: &SimHandle, users: &[u64]) -> std::collections::BTreeMap<u64, u64> {
    users
        .iter()
        .filter_map(|u| sim.voice_channel_of(*u).map(|(_, c)| (*u, c)))
        .collect()
}

/// Each user's stored voice events, in stream order.
pub fn per_user(events: &[RoomEvent]) -> std::collections::BTreeMap<u64, Vec<&'static str>> {
    let mut out: std::collections::BTreeMap<u64, Vec<&'static str>> = Default::default();
    for e in events.iter().filter(|e| is_voice(e)) {
        if let Some(u) = e.event.user() {
            out.entry(u.id.get()).or_default().push(e.kind().as_str());
        }
    }
    out
}

/// Polls `condition` every 10 ms until it holds (`true`) or `timeout` passes (`false`), for
/// assertions that want to report what they found rather than only time out.
pub async fn wait_for<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
