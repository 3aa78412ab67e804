//! Test harness: a private nats-server, the Discord simulator in-process and the service
//! in-process, plus readers for what reached the ROOMS stream.

#![allow(dead_code)]

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

/// Fast timings for tests: 20 ms backoff base, short lease.
pub fn fast_gateway() -> GatewayConfig {
    GatewayConfig {
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
