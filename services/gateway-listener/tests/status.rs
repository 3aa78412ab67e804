//! What operators see of the shards: status at any time (`vr-tail --ops`), metrics per shard.

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

use discord_sim::SimConfig;
use support::*;
use voicerooms_contract::status::{GatewayState, GatewayStatus};
use voicerooms_testkit::wait_until;

fn shard(id: u32, count: u32) -> gateway_listener::GatewayConfig {
    gateway_listener::GatewayConfig {
        shard_id: Some(id),
        shard_count: gateway_listener::ShardCount::Fixed(count),
        ..fast_gateway()
    }
}

/// The `gateway.status` lines a tail started now prints within `within`.
async fn tail_statuses(gw: &TestGateway, within: Duration) -> Vec<GatewayStatus> {
    let options = vr_tail::Options {
        nats_url: gw.nats.url(),
        ops: true,
        ..vr_tail::Options::default()
    };
    let tail = vr_tail::LiveTail::start(&gw.client, &options)
        .await
        .expect("tail starts");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    let run = tail.run(move |line| {
        sink.lock().unwrap().push(line);
        true
    });
    let _ = tokio::time::timeout(within, run).await;
    let out = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.kind == "gateway.status")
        .filter_map(|l| serde_json::from_value(l.event.clone()).ok())
        .collect();
    out
}

fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Defect 6 of issue 15: status was published only on state changes, so a tail started in
/// steady state showed nothing.
#[tokio::test]
async fn a_tail_started_in_steady_state_shows_every_shards_state() {
    // Arrange: two shards in two replicas, both connected.
    let mut gw = prepare(SimConfig::for_tests()).await;
    gw.start_app(shard(0, 2), TOKEN).await;
    let mut other = gw.another_app(shard(1, 2), TOKEN).await;
    gw.wait_connected().await;
    let readyz = format!("http://127.0.0.1:{}/readyz", other.port);
    wait_until(Duration::from_secs(15), "shard 1 connected", || async {
        voicerooms_testkit::conformance::status_of(&readyz).await == Some(200)
    })
    .await;

    // Act: an operator starts the tail now.
    let statuses = tail_statuses(&gw, Duration::from_secs(2)).await;

    // Assert: both shards, connected, at once.
    let mut seen: Vec<(u32, GatewayState)> = statuses.iter().map(|s| (s.shard, s.state)).collect();
    seen.sort_by_key(|(s, _)| *s);
    seen.dedup();
    assert_eq!(
        seen,
        vec![(0, GatewayState::Connected), (1, GatewayState::Connected)],
        "{statuses:?}"
    );
    other.stop().await;
    gw.stop_app().await;
}

/// Defect 6 of issue 15: gateway metrics had no shard label and the alert summed `connected`
/// over replicas, so a shard without a holder went unnoticed while others were connected.
/// Every replica reports every shard: 1 where it holds the shard connected, 0 elsewhere, so
/// `max by (shard)` is 0 exactly for a shard nobody holds connected.
#[tokio::test]
async fn every_replica_reports_every_shard_and_a_shard_without_a_holder_reads_zero() {
    // Arrange
    let mut gw = prepare(SimConfig::for_tests()).await;
    gw.start_app(shard(0, 2), TOKEN).await;
    let mut other = gw.another_app(shard(1, 2), TOKEN).await;
    gw.wait_connected().await;
    wait_until(Duration::from_secs(15), "shard 1 connected", || async {
        metric(
            &other.metrics().await,
            "voicerooms_gateway_connected{shard=\"1\"}",
        ) == Some(1.0)
    })
    .await;
    let a = gw.metrics().await;

    // Act: shard 1's only replica goes away.
    other.stop().await;

    // Assert
    assert_eq!(
        metric(&a, "voicerooms_gateway_connected{shard=\"0\"}"),
        Some(1.0),
        "{a}"
    );
    assert_eq!(
        metric(&a, "voicerooms_gateway_connected{shard=\"1\"}"),
        Some(0.0),
        "{a}"
    );
    assert!(
        a.contains("voicerooms_gateway_state{shard=\"0\",state=\"connected\"} 1"),
        "{a}"
    );
    assert!(
        a.contains("voicerooms_gateway_identifies_total{shard=\"0\"} 1"),
        "{a}"
    );
    let after = gw.metrics().await;
    assert_eq!(
        metric(&after, "voicerooms_gateway_connected{shard=\"1\"}"),
        Some(0.0),
        "nobody holds shard 1: every remaining replica says 0"
    );
    gw.stop_app().await;
}
