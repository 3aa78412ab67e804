//! Create and join latency and throughput against a zero-latency simulator, one and two replicas.
//!
//! ```sh
//! cargo run --release -p room-manager --example room_manager_bench            # defaults
//! BENCH_ROOMS=300 BENCH_CONCURRENCY=16 cargo run --release -p room-manager --example room_manager_bench
//! ```
//!
//! Each run starts a private nats-server and the simulator (rate limits off, no latency), then
//! room-manager replicas in-process. Sequential phases measure latency (one request at a time);
//! concurrent phases measure throughput. A join's latency includes the move into voice (every
//! joiner is connected to voice first, so the placement is `moved`): request → placed.

// Benchmark code: a panic here (unwrap, expect, an index or an overflow) stops the benchmark.
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

use discord_sim::{seed, RateLimitConfig, SimConfig, Simulator};
use futures::future::join_all;
use room_manager::settings::{InvitesSettings, RoomManagerSettings, RoomsSettings, TuningSettings};
use room_manager::{Application, Settings};
use voicerooms_contract::command::{
    decode_reply, CreateRoom, Created, JoinRoom, Joined, Placement,
};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::{GuildId, UserId, UserRef};
use voicerooms_platform::settings::{CommonSettings, DiscordSettings};
use voicerooms_platform::Secret;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn user(id: u64) -> UserRef {
    UserRef {
        id: UserId::new(id).unwrap(),
        username: format!("u{id}"),
        global_name: None,
        avatar: None,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(label: &str, mut lat: Vec<Duration>) {
    lat.sort();
    println!(
        "{label:<40} n={:<5} p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().unwrap().as_secs_f64() * 1000.0
    );
}

async fn call<T: serde::de::DeserializeOwned>(
    c: &async_nats::Client,
    kind: CommandKind,
    body: &impl serde::Serialize,
) -> T {
    let reply = c
        .request(kind.subject(), serde_json::to_vec(body).unwrap().into())
        .await
        .expect("request");
    decode_reply::<T>(&reply.payload).expect("ok reply")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rooms_n = env_usize("BENCH_ROOMS", 100).min(120); // Discord: 250 roles per guild
    let conc = env_usize("BENCH_CONCURRENCY", 16);
    println!(
        "room-manager bench: {rooms_n} rooms per phase, concurrency {conc}, {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for replicas in [1usize, 2] {
        run(replicas, rooms_n, conc).await?;
    }
    Ok(())
}

async fn run(replicas: usize, rooms_n: usize, conc: usize) -> anyhow::Result<()> {
    let nats = voicerooms_testkit::NatsServer::start().await;
    let mut sc = SimConfig::for_tests();
    sc.rate_limits = RateLimitConfig {
        enabled: false,
        ..RateLimitConfig::default()
    };
    let sim = Simulator::start(sc).await?;
    let mut apps = Vec::new();
    let mut stops = Vec::new();
    for i in 0..replicas {
        let mut common = CommonSettings::with_port(0);
        common.nats.url = nats.url();
        common.instance = format!("bench-{i}");
        common.log.level = "error".into();
        let s = Settings {
            common,
            service: RoomManagerSettings {
                discord: DiscordSettings {
                    token: Some(Secret::new("sim-bot-token")),
                    api_base: sim.api_url(),
                },
                rooms: RoomsSettings {
                    max_per_user: 100,
                    guilds: seed::GUILD_ID.to_string(),
                    ..RoomsSettings::default()
                },
                invites: InvitesSettings {
                    secret: Some(Secret::new("bench-secret-bench-secret-bench-secret")),
                    ttl_secs: 86_400,
                },
                room_manager: TuningSettings {
                    global_rate_limit: u16::MAX,
                    ..TuningSettings::default()
                },
            },
        };
        let app = Application::build(s).await?;
        while app.core().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        apps.push(tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        })));
    }
    let client = nats.client().await;
    // Owners and joiners: members of the guild, joiners connected to voice (Lobby).
    let owners: Vec<UserRef> = (0..rooms_n * 2)
        .map(|i| {
            let id = sim.create_user(&format!("owner{i}")).unwrap();
            sim.add_member(seed::GUILD_ID, id, &[]).unwrap();
            user(id)
        })
        .collect();
    let joiners: Vec<UserRef> = (0..rooms_n * 6)
        .map(|i| {
            let id = sim.create_user(&format!("joiner{i}")).unwrap();
            sim.add_member(seed::GUILD_ID, id, &[]).unwrap();
            sim.connect_voice(id, seed::LOBBY_CHANNEL_ID).unwrap();
            user(id)
        })
        .collect();
    let guild = GuildId::new(seed::GUILD_ID).unwrap();
    let create = |owner: &UserRef, i: usize| CreateRoom {
        requester: owner.clone(),
        guild,
        name: format!("bench {i}"),
        idempotency_key: None,
    };
    // Warm-up (connections, bot id).
    let _: Created = call(&client, CommandKind::Create, &create(&owners[0], 0)).await;

    // Sequential creates and joins: latency.
    let mut created = Vec::new();
    let mut lat = Vec::new();
    for (i, owner) in owners.iter().enumerate().take(rooms_n).skip(1) {
        let t = Instant::now();
        let c: Created = call(&client, CommandKind::Create, &create(owner, i)).await;
        lat.push(t.elapsed());
        created.push(c);
    }
    report(&format!("{replicas} replica(s): create (sequential)"), lat);
    let mut lat = Vec::new();
    let mut moved = 0;
    for (i, c) in created.iter().enumerate() {
        for j in 0..3 {
            let t = Instant::now();
            let r: Joined = call(
                &client,
                CommandKind::Join,
                &JoinRoom {
                    requester: joiners[i * 3 + j].clone(),
                    invite: c.invite.token.clone(),
                    room: None,
                },
            )
            .await;
            lat.push(t.elapsed());
            if matches!(r.placement, Placement::Moved { .. }) {
                moved += 1;
            }
        }
    }
    let n = lat.len();
    report(
        &format!("{replicas} replica(s): join → placed (sequential)"),
        lat,
    );
    println!("{:<40} {moved}/{n} moved into voice", "");

    // Close them (a guild holds at most 250 roles), not measured.
    for c in &created {
        let _: voicerooms_contract::command::Done = call(
            &client,
            CommandKind::Close,
            &voicerooms_contract::command::RoomCommand {
                requester: c.room.owner.clone(),
                room: c.room.id,
            },
        )
        .await;
    }

    // Concurrent: throughput.
    let t = Instant::now();
    let mut created2: Vec<Created> = Vec::new();
    for chunk in (rooms_n..rooms_n * 2).collect::<Vec<_>>().chunks(conc) {
        let futs = chunk.iter().map(|&i| {
            let (client, cmd) = (client.clone(), create(&owners[i], i));
            async move { call::<Created>(&client, CommandKind::Create, &cmd).await }
        });
        created2.extend(join_all(futs).await);
    }
    let el = t.elapsed();
    println!(
        "{:<40} {} creates in {:.2} s = {:.0}/s",
        format!("{replicas} replica(s): create (x{conc})"),
        created2.len(),
        el.as_secs_f64(),
        created2.len() as f64 / el.as_secs_f64()
    );
    let t = Instant::now();
    let jobs: Vec<(UserRef, String)> = created2
        .iter()
        .enumerate()
        .flat_map(|(i, c)| (0..3).map(move |j| (i, j, c.invite.token.clone())))
        .map(|(i, j, tok)| (joiners[rooms_n * 3 + i * 3 + j].clone(), tok))
        .collect();
    let mut lat = Vec::new();
    for chunk in jobs.chunks(conc) {
        let futs = chunk.iter().map(|(u, tok)| {
            let client = client.clone();
            async move {
                let t = Instant::now();
                let _: Joined = call(
                    &client,
                    CommandKind::Join,
                    &JoinRoom {
                        requester: u.clone(),
                        invite: tok.clone(),
                        room: None,
                    },
                )
                .await;
                t.elapsed()
            }
        });
        lat.extend(join_all(futs).await);
    }
    let el = t.elapsed();
    println!(
        "{:<40} {} joins in {:.2} s = {:.0}/s",
        format!("{replicas} replica(s): join (x{conc})"),
        lat.len(),
        el.as_secs_f64(),
        lat.len() as f64 / el.as_secs_f64()
    );
    report(
        &format!("{replicas} replica(s): join → placed (x{conc})"),
        lat,
    );

    for s in stops {
        let _ = s.send(());
    }
    for a in apps {
        let _ = a.await;
    }
    sim.shutdown().await;
    Ok(())
}
