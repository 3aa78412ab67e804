//! Identify limits kept across replicas: Discord's `max_concurrency` (one IDENTIFY per 5 s per
//! rate-limit key `shard_id % max_concurrency`) and the daily session-start budget.

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

use std::time::Duration;

use discord_sim::{SimConfig, SimEventKind};
use support::*;
use voicerooms_testkit::wait_until;

/// An accepted IDENTIFY: (shard, rate-limit key, at_ms).
type Accepted = (u64, u64, u64);

/// (accepted identifies, refused identifies as (shard, reason)).
fn identifies(gw: &TestGateway) -> (Vec<Accepted>, Vec<(u64, String)>) {
    let mut ok = Vec::new();
    let mut rejected = Vec::new();
    for e in gw.log() {
        match e.kind {
            SimEventKind::Identify {
                shard,
                rate_limit_key,
                ..
            } => ok.push((shard[0], rate_limit_key, e.at_ms)),
            SimEventKind::IdentifyRejected { shard, reason, .. } => {
                rejected.push((shard[0], reason))
            }
            _ => {}
        }
    }
    (ok, rejected)
}

/// Per rate-limit key, the gaps between accepted identifies must be at least Discord's 5 s.
fn too_close(ok: &[Accepted]) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for (i, (_, key, at)) in ok.iter().enumerate() {
        if let Some((_, _, prev)) = ok[..i].iter().rev().find(|(_, k, _)| k == key) {
            if at - prev < 5_000 {
                out.push((*key, *prev, *at));
            }
        }
    }
    out
}

/// Defect 4 of issue 15: identifies were paced per process only. Four shards in four replicas
/// with `max_concurrency` 1 sent four identifies within milliseconds; Discord refused three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_shards_in_four_replicas_identify_one_per_5_s_without_refusals() {
    // Arrange: Discord allows one identify per 5 s.
    let mut first = prepare(SimConfig {
        max_concurrency: 1,
        ..SimConfig::for_tests()
    })
    .await;
    let mut replicas = Vec::new();

    // Act: four replicas start at once, one shard each.
    for shard in 0..4 {
        let config = gateway_listener::GatewayConfig {
            shard_id: Some(shard),
            shard_count: gateway_listener::ShardCount::Fixed(4),
            ..fast_gateway()
        };
        if shard == 0 {
            first.start_app(config, TOKEN).await;
        } else {
            replicas.push(first.another_app(config, TOKEN).await);
        }
    }
    wait_until(Duration::from_secs(40), "four sessions", || async {
        identifies(&first).0.len() >= 4
    })
    .await;

    // Assert
    let (ok, rejected) = identifies(&first);
    eprintln!("identified (shard, key, at_ms): {ok:?}");
    assert_eq!(rejected, vec![], "identifies Discord refused");
    assert_eq!(
        too_close(&ok),
        vec![],
        "identifies of one key less than 5 s apart"
    );
    let mut shards: Vec<u64> = ok.iter().map(|(s, _, _)| *s).collect();
    shards.sort();
    assert_eq!(shards, vec![0, 1, 2, 3]);
    for mut r in replicas {
        r.stop().await;
    }
    first.stop_app().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identify_takes_the_session_start_budget_below_the_reserve() {
    // Arrange: three session starts left today, a reserve of one; three shards want a session.
    let mut gw = prepare(SimConfig {
        session_start_total: 3,
        max_concurrency: 4,
        ..SimConfig::for_tests()
    })
    .await;
    let alerts_raw = collect(&gw.client, "ops.alerts.gateway-listener").await;
    let config = |shard| gateway_listener::GatewayConfig {
        shard_id: Some(shard),
        shard_count: gateway_listener::ShardCount::Fixed(3),
        session_start_reserve: 1,
        ..fast_gateway()
    };

    // Act
    gw.start_app(config(0), TOKEN).await;
    let mut others = Vec::new();
    for shard in 1..3 {
        others.push(gw.another_app(config(shard), TOKEN).await);
    }
    wait_until(Duration::from_secs(20), "the reserve alert", || async {
        alerts(&alerts_raw)
            .iter()
            .any(|a| a.code == "gateway_session_start_reserve")
    })
    .await;

    // Assert: two identifies (3 → 1 left), none refused by Discord, a critical alert, and no
    // third identify while the budget stays at the reserve.
    let alert = alerts(&alerts_raw)
        .into_iter()
        .find(|a| a.code == "gateway_session_start_reserve")
        .unwrap();
    assert_eq!(
        alert.severity,
        voicerooms_contract::status::Severity::Critical
    );
    assert!(alert.message.contains("reserve of 1"), "{}", alert.message);
    let third = wait_for(Duration::from_secs(2), || async {
        identifies(&gw).0.len() > 2
    })
    .await;
    let (ok, rejected) = identifies(&gw);
    assert!(!third, "a third identify: {ok:?}");
    assert_eq!(ok.len(), 2);
    assert_eq!(rejected, vec![]);
    for mut o in others {
        o.stop().await;
    }
    gw.stop_app().await;
}
