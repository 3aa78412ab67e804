//! Takeovers of a shard by another replica under load, with real processes (kill -9).

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

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use discord_sim::{SimConfig, SimEventKind};
use support::*;
use voicerooms_contract::status::{GatewayState, GatewayStatus};
use voicerooms_testkit::{wait_until, ServiceProcess};

fn decoded(raw: &std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) -> Vec<GatewayStatus> {
    raw.lock()
        .unwrap()
        .iter()
        .filter_map(|b| GatewayStatus::decode(b).ok())
        .collect()
}

/// Defect 5 of issue 15: a non-resumable takeover converged against the previous holder's
/// checkpoint, which trails the stored events by up to ~100 ms: a move stored just before the
/// kill was never undone, a `voice.left` was stored a second time. Three takeovers (kill -9)
/// while 100 changes/s flow and Discord keeps only 20 dispatches (the resume is refused): after
/// each, the stored events replayed per user must fit (no event twice, nothing left undone) and
/// equal Discord's voice states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_resumable_takeovers_under_load_leave_the_stream_equal_to_discord() {
    // Arrange: two replicas of shard 0 (lease 1 s), 20 players cycling Lobby → Gaming → out.
    let gw = prepare(SimConfig {
        replay_buffer: 20,
        ..SimConfig::for_tests()
    })
    .await;
    let statuses = collect(&gw.client, "gateway.0.status").await;
    let bin = env!("CARGO_BIN_EXE_gateway-listener");
    let env = |instance: &str| {
        vec![
            ("VOICEROOMS__NATS__URL", gw.nats.url()),
            ("VOICEROOMS__DISCORD__TOKEN", TOKEN.to_owned()),
            ("VOICEROOMS__DISCORD__API_BASE", gw.sim.api_url()),
            ("VOICEROOMS__HTTP__PORT", "0".to_owned()),
            ("VOICEROOMS__INSTANCE", instance.to_owned()),
            // Static mode: both replicas run shard 0 of 1, one holds it, the other stands by.
            ("VOICEROOMS__GATEWAY__SHARD_ID", "0".to_owned()),
            ("VOICEROOMS__GATEWAY__SHARD_COUNT", "1".to_owned()),
            ("VOICEROOMS__GATEWAY__LEASE_TTL_MS", "1000".to_owned()),
            ("VOICEROOMS__GATEWAY__LEASE_RENEW_MS", "200".to_owned()),
        ]
    };
    let connected_since = |since: Instant, seen: &[(Instant, GatewayStatus)]| {
        seen.iter()
            .rev()
            .find(|(at, s)| *at >= since && s.state == GatewayState::Connected)
            .map(|(_, s)| s.instance.clone())
    };
    let timeline: std::sync::Arc<std::sync::Mutex<Vec<(Instant, GatewayStatus)>>> =
        Default::default();
    {
        let raw = statuses.clone();
        let timeline = timeline.clone();
        tokio::spawn(async move {
            let mut read = 0;
            loop {
                let all = decoded(&raw);
                let now = Instant::now();
                timeline
                    .lock()
                    .unwrap()
                    .extend(all.iter().skip(read).map(|s| (now, s.clone())));
                read = all.len();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    let players = new_players(&gw.sim, discord_sim::seed::GUILD_ID, 20);
    let cycles: Vec<(u64, Vec<u64>)> = players.iter().map(|p| (*p, vec![LOBBY, GAMING])).collect();
    let mut processes: BTreeMap<&str, ServiceProcess> = BTreeMap::new();
    let start = Instant::now();
    processes.insert("gw-a", ServiceProcess::spawn(bin, &env("gw-a")));
    wait_until(Duration::from_secs(20), "gw-a connected", || async {
        connected_since(start, &timeline.lock().unwrap()).is_some()
    })
    .await;
    processes.insert("gw-b", ServiceProcess::spawn(bin, &env("gw-b")));
    wait_until(Duration::from_secs(20), "gw-b on standby", || async {
        decoded(&statuses)
            .iter()
            .any(|s| s.instance == "gw-b" && s.state == GatewayState::Standby)
    })
    .await;

    let mut rounds = Vec::new();
    for round in 0..3 {
        // Act: load; kill -9 the holder; the other one takes over.
        let holder = connected_since(start, &timeline.lock().unwrap()).expect("a holder");
        let load = Load::start_with(&gw.sim, cycles.clone(), 100);
        let before = stored_all(&gw.client).await.len();
        wait_until(Duration::from_secs(20), "events flowing", || async {
            stored_all(&gw.client).await.len() >= before + 100
        })
        .await;
        let killed = Instant::now();
        drop(processes.remove(holder.as_str()));
        wait_until(
            Duration::from_secs(20),
            "another replica connected",
            || async {
                connected_since(killed, &timeline.lock().unwrap()).is_some_and(|i| i != holder)
            },
        )
        .await;
        let took = killed.elapsed();
        let after = stored_all(&gw.client).await.len();
        wait_until(
            Duration::from_secs(20),
            "the new holder publishing",
            || async { stored_all(&gw.client).await.len() >= after + 50 },
        )
        .await;
        load.stop().await;

        // Assert: the stream, replayed per user, fits and equals Discord (nobody in voice).
        let settled = wait_for(Duration::from_secs(20), || async {
            let (state, bad) = replay_voice(&stored_all(&gw.client).await);
            !bad.is_empty() || state == discord_voice(&gw.sim, &players)
        })
        .await;
        let events = stored_all(&gw.client).await;
        let (state, bad) = replay_voice(&events);
        rounds.push((round, holder.clone(), took));
        assert!(
            bad.is_empty(),
            "round {round}: stored events that do not fit: {bad:#?}"
        );
        assert!(
            settled,
            "round {round}: stored state {state:?} never equalled Discord's"
        );
        assert_eq!(dispatch_order_violation(&events), None);

        // The killed replica comes back as a standby.
        let name = if holder == "gw-a" { "gw-a" } else { "gw-b" };
        let back = Instant::now();
        processes.insert(name, ServiceProcess::spawn(bin, &env(name)));
        wait_until(
            Duration::from_secs(20),
            "the killed replica back on standby",
            || async {
                timeline.lock().unwrap().iter().any(|(at, s)| {
                    *at >= back && s.instance == name && s.state == GatewayState::Standby
                })
            },
        )
        .await;
    }
    let refused = gw.count(|k| matches!(k, SimEventKind::ResumeRejected { .. }));
    eprintln!("takeovers {rounds:?}; resumes refused: {refused}");
    assert!(
        refused >= 3,
        "each takeover's resume was refused ({refused})"
    );
}
