//! Benchmark (not a test): simulator dispatch → JetStream-stored event, through the real
//! gateway-listener, a private nats-server (file storage) and the simulator on loopback.
//!
//! ```sh
//! cargo run --release -p gateway-listener --example gateway_bench -- [rate_per_sec] [events]
//! cargo run --release -p gateway-listener --example gateway_bench -- 1000 10000   # paced
//! cargo run --release -p gateway-listener --example gateway_bench -- 0 200000     # saturation
//! ```
//!
//! With `BENCH_PROCESS=1` the gateway-listener runs as its own process (the release binary next
//! to this example: `cargo build --release -p gateway-listener --bins --examples` first), as in
//! production, and the bench also reports its CPU time and events per gateway CPU-second — the
//! service's own capacity per core, apart from the generator and NATS sharing the machine.
//!
//! Each voice change is made through the simulator's control API (which enqueues the
//! VOICE_STATE_UPDATE dispatch on the gateway socket) and timed until the stored event comes
//! back on the stream's republish subject `live.rooms.>` — so latencies include one extra hop
//! (republish delivery) beyond the JetStream ack. Events arrive in order, so the i-th message
//! belongs to the i-th change.

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

    let nats = NatsServer::start().await;
    let sim = Simulator::start(SimConfig {
        heartbeat_interval: Duration::from_secs(30),
        replay_buffer: 1_000_000,
        connection_queue: 1_000_000,
        log_capacity: 1_000,
        ..SimConfig::for_tests()
    })
    .await?;
    let gateway = if std::env::var("BENCH_PROCESS").is_ok_and(|v| v == "1") {
        Gateway::Process(spawn_process(&nats, &sim).await?)
    } else {
        Gateway::InProcess(spawn_in_process(&nats, &sim).await?)
    };

    let client = nats.client().await;
    let mut live = client.subscribe("live.rooms.>").await?;
    // Users cycle: join Lobby, then leave: one event per change.
    let users: Vec<u64> = seed::USERS.iter().map(|u| u.0).collect();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let producer = {
        let sim = sim.clone();
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
                let _ = sent_tx.send(Instant::now());
                let r = if in_voice[u] {
                    sim.disconnect_voice(users[u])
                } else {
                    sim.connect_voice(users[u], seed::LOBBY_CHANNEL_ID)
                };
                r.expect("voice change");
                in_voice[u] = !in_voice[u];
            }
        })
    };

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
        if let Ok(e) = voicerooms_contract::RoomEvent::decode(&msg.payload) {
            in_gateway += e.published_at.saturating_sub(e.received_at);
            after_publish += voicerooms_contract::now_ms().saturating_sub(e.published_at);
        }
        let now = Instant::now();
        let sent = sent_rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("producer ended"))?;
        latencies.push(now.duration_since(sent));
        let _ = acked_tx.send(latencies.len());
    }
    let elapsed = started.elapsed();
    let gateway_cpu = gateway.cpu_seconds().map(|c| c - cpu_before.unwrap_or(0.0));
    producer.await?;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "mode={} events={} elapsed={:.2}s throughput={:.0} events/s p50={:.3}ms p99={:.3}ms max={:.3}ms",
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

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    tokio::time::timeout(Duration::from_secs(20), async {
        while status_of(&readyz).await != Some(200) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("gateway-listener not ready within 20 s"))
}

async fn spawn_in_process(
    nats: &NatsServer,
    sim: &discord_sim::SimHandle,
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
    wait_ready(port).await?;
    Ok((stop_tx, service))
}

async fn spawn_process(
    nats: &NatsServer,
    sim: &discord_sim::SimHandle,
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
    wait_ready(port)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; its output:\n{}", process.output()))?;
    Ok(process)
}
