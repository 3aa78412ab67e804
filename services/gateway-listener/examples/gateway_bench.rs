//! Benchmark (not a test): simulator dispatch → JetStream-stored event, through the real
//! gateway-listener, a private nats-server (file storage) and the simulator on loopback.
//!
//! ```sh
//! cargo run --release -p gateway-listener --example gateway_bench -- [rate_per_sec] [events]
//! cargo run --release -p gateway-listener --example gateway_bench -- 1000 10000   # paced
//! cargo run --release -p gateway-listener --example gateway_bench -- 0 200000     # saturation
//! ```
//!
//! With `BENCH_SHARDS=8` the bot has 8 shards (the simulator recommends 8, the listener's
//! `shard_count` is "auto"): one guild per shard, its users spread over them, and one
//! gateway-listener holding all 8 (the pool with one replica). Default: 1 shard.
//!
//! With `BENCH_PROCESS=1` the gateway-listener runs as its own process (the release binary next
//! to this example: `cargo build --release -p gateway-listener --bins --examples` first), as in
//! production, and the bench also reports its CPU time and events per gateway CPU-second — the
//! service's own capacity per core, apart from the generator and NATS sharing the machine.
//!
//! Each voice change is made through the simulator's control API (which enqueues the
//! VOICE_STATE_UPDATE dispatch on the gateway socket) and timed until the stored event comes
//! back on the stream's republish subject `live.rooms.>` — so latencies include one extra hop
//! (republish delivery) beyond the JetStream ack. Each user's events arrive in order (a user's
//! guild is on one shard), so a message belongs to its user's oldest change not yet seen.

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

use std::time::{Duration, Instant};

use discord_sim::{seed, SimConfig, Simulator};
use futures::StreamExt;
use gateway_listener::{Application, GatewayConfig, GatewaySettings, Settings};
use voicerooms_platform::settings::{CommonSettings, DiscordSettings, Secret};
use voicerooms_testkit::conformance::status_of;
use voicerooms_testkit::{free_port, NatsServer, ServiceProcess};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rate: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let total: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    // Changes in flight at most (saturation mode), below the simulator's socket queue.
    let window: usize = 4_000;

    let shards: u32 = std::env::var("BENCH_SHARDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);

    let nats = NatsServer::start().await;
    let sim = Simulator::start(SimConfig {
        heartbeat_interval: Duration::from_secs(30),
        replay_buffer: 1_000_000,
        connection_queue: 1_000_000,
        log_capacity: 1_000,
        recommended_shards: Some(shards),
        ..SimConfig::for_tests()
    })
    .await?;
    // Users and their voice channel: the seeded guild for one shard; one guild per shard else.
    let mut users: Vec<(u64, u64)> = Vec::new();
    if shards == 1 {
        users.extend(seed::USERS.iter().map(|u| (u.0, seed::LOBBY_CHANNEL_ID)));
    } else {
        for k in 0..u64::from(shards) {
            let guild =
                sim.create_guild_with(Some(((1_000 + k) << 22) | 1), &format!("bench {k}"), true)?;
            // Guild ids route to shard (id >> 22) % shards: 1000 + k covers every shard once.
            let channel = sim.create_voice_channel(guild, "lobby")?;
            for i in 0..5 {
                let user = sim.create_user(&format!("bench{k}x{i}"))?;
                sim.add_member(guild, user, &[])?;
                users.push((user, channel));
            }
        }
    }
    let gateway = if std::env::var("BENCH_PROCESS").is_ok_and(|v| v == "1") {
        Gateway::Process(spawn_process(&nats, &sim, shards).await?)
    } else {
        Gateway::InProcess(spawn_in_process(&nats, &sim, shards).await?)
    };

    let client = nats.client().await;
    let mut live = client.subscribe("live.rooms.>").await?;
    // Users cycle: join their channel, then leave: one event per change.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let producer = {
        let sim = sim.clone();
        let users = users.clone();
        tokio::spawn(async move {
            let mut in_voice = vec![false; users.len()];
            let mut ticker = (rate > 0).then(|| {
                let mut t = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            for i in 0..total {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                } else {
                    while i >= *acked_rx.borrow() + window {
                        if acked_rx.changed().await.is_err() {
                            return;
                        }
                    }
                }
                let u = i % users.len();
                let (user, channel) = users[u];
                let _ = sent_tx.send((user, Instant::now()));
                let r = if in_voice[u] {
                    sim.disconnect_voice(user)
                } else {
                    sim.connect_voice(user, channel)
                };
                r.expect("voice change");
                in_voice[u] = !in_voice[u];
            }
        })
    };
    // Each user's changes not yet seen on the feed, oldest first.
    let mut pending: std::collections::HashMap<u64, std::collections::VecDeque<Instant>> =
        std::collections::HashMap::new();

    let started = Instant::now();
    let cpu_before = gateway.cpu_seconds();
    let mut latencies = Vec::with_capacity(total);
    // Where the time goes (ms resolution): gateway receive → publish, publish → our receipt.
    let (mut in_gateway, mut after_publish) = (0u64, 0u64);
    while latencies.len() < total {
        let msg = tokio::time::timeout(Duration::from_secs(30), live.next()).await?;
        let Some(msg) = msg else {
            anyhow::bail!("live feed ended")
        };
        let now = Instant::now();
        let e = voicerooms_contract::RoomEvent::decode(&msg.payload)?;
        in_gateway += e.published_at.saturating_sub(e.received_at);
        after_publish += voicerooms_contract::now_ms().saturating_sub(e.published_at);
        let user = e
            .event
            .user()
            .map(|u| u.id.get())
            .ok_or_else(|| anyhow::anyhow!("a voice event without a user"))?;
        while let Ok((u, at)) = sent_rx.try_recv() {
            pending.entry(u).or_default().push_back(at);
        }
        let sent = match pending.get_mut(&user).and_then(|q| q.pop_front()) {
            Some(at) => at,
            None => loop {
                // Sent but not yet drained from the producer's channel.
                let (u, at) = sent_rx
                    .recv()
                    .await
                    .ok_or_else(|| anyhow::anyhow!("producer ended"))?;
                if u == user && pending.get(&u).is_none_or(|q| q.is_empty()) {
                    break at;
                }
                pending.entry(u).or_default().push_back(at);
            },
        };
        latencies.push(now.duration_since(sent));
        let _ = acked_tx.send(latencies.len());
    }
    let elapsed = started.elapsed();
    let gateway_cpu = gateway.cpu_seconds().map(|c| c - cpu_before.unwrap_or(0.0));
    producer.await?;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "shards={shards} mode={} events={} elapsed={:.2}s throughput={:.0} events/s p50={:.3}ms p99={:.3}ms max={:.3}ms",
        if rate == 0 { "saturation".to_owned() } else { format!("{rate}/s") },
        total,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
    );
    println!(
        "mean ms: gateway receive→publish {:.3}, publish→live receipt {:.3}",
        in_gateway as f64 / total as f64,
        after_publish as f64 / total as f64
    );
    if let Some(cpu) = gateway_cpu {
        println!(
            "gateway-listener CPU {:.2} s over {:.2} s ({:.0} % of one core); {:.0} events per gateway CPU-second",
            cpu,
            elapsed.as_secs_f64(),
            100.0 * cpu / elapsed.as_secs_f64(),
            total as f64 / cpu.max(1e-9)
        );
    }
    gateway.stop().await;
    sim.shutdown().await;
    Ok(())
}

/// The service under test: in this process, or the release binary as a child process.
enum Gateway {
    InProcess(
        (
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<anyhow::Result<()>>,
        ),
    ),
    Process(ServiceProcess),
}

impl Gateway {
    /// The child's CPU time so far (the in-process service shares this process's).
    fn cpu_seconds(&self) -> Option<f64> {
        match self {
            Gateway::InProcess(_) => None,
            Gateway::Process(p) => Some(p.cpu_seconds()),
        }
    }

    async fn stop(self) {
        match self {
            Gateway::InProcess((stop, task)) => {
                let _ = stop.send(());
                let _ = task.await;
            }
            Gateway::Process(mut p) => {
                p.terminate();
                let _ = p.wait_exit(Duration::from_secs(10)).await;
            }
        }
    }
}

/// Ready, and every shard connected (`voicerooms_gateway_connected{shard} 1` for each).
async fn wait_ready(port: u16, shards: u32) -> anyhow::Result<()> {
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if status_of(&readyz).await == Some(200) {
                let text = match reqwest::get(&metrics).await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let connected = text
                    .lines()
                    .filter(|l| l.starts_with("voicerooms_gateway_connected{") && l.ends_with(" 1"))
                    .count();
                if connected == shards as usize {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("gateway-listener not connected on every shard within 30 s"))
}

async fn spawn_in_process(
    nats: &NatsServer,
    sim: &discord_sim::SimHandle,
    shards: u32,
) -> anyhow::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let mut common = CommonSettings::with_port(0);
    common.nats.url = nats.url();
    common.log.level = "warn".into();
    let settings = Settings {
        common,
        service: GatewaySettings {
            discord: DiscordSettings {
                token: Some(Secret::new("sim-bot-token")),
                api_base: sim.api_url(),
            },
            gateway: GatewayConfig::default(),
        },
    };
    let app = Application::build(settings).await?;
    let port = app.port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(app.run_until_stopped(async {
        let _ = stop_rx.await;
    }));
    wait_ready(port, shards).await?;
    Ok((stop_tx, service))
}

async fn spawn_process(
    nats: &NatsServer,
    sim: &discord_sim::SimHandle,
    shards: u32,
) -> anyhow::Result<ServiceProcess> {
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("gateway-listener"))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "BENCH_PROCESS=1 needs the binary beside the example: cargo build --release -p gateway-listener --bins --examples"
            )
        })?;
    let port = free_port();
    let process = ServiceProcess::spawn(
        &bin.to_string_lossy(),
        &[
            ("VOICEROOMS__NATS__URL", nats.url()),
            ("VOICEROOMS__HTTP__PORT", port.to_string()),
            ("VOICEROOMS__LOG__LEVEL", "warn".into()),
            ("VOICEROOMS__DISCORD__TOKEN", "sim-bot-token".into()),
            ("VOICEROOMS__DISCORD__API_BASE", sim.api_url()),
        ],
    );
    wait_ready(port, shards)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; its output:\n{}", process.output()))?;
    Ok(process)
}
