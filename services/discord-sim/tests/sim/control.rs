//! The HTTP control API under /_sim and the load generator.

use std::time::Duration;

use discord_sim::{seed, SimConfig, SimEventKind};
use serde_json::{json, Value};

use crate::helpers::*;

async fn control(
    sim: &discord_sim::SimHandle,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let resp = http()
        .request(method, format!("{}/_sim{path}", sim.http_url()))
        .json(&body)
        .send()
        .await
        .expect("control request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(sim: &discord_sim::SimHandle, path: &str, body: Value) -> (u16, Value) {
    control(sim, reqwest::Method::POST, path, body).await
}

#[tokio::test]
async fn the_control_api_builds_a_world_and_drives_voice() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let (s, g) = post(&sim, "/guilds", json!({"name": "second"})).await;
    assert_eq!(s, 200);
    let gid = g["id"].as_str().expect("id").to_owned();
    assert_eq!(gw.dispatch("GUILD_CREATE").await["d"]["id"], gid);
    let (s, u) = post(&sim, "/users", json!({"username": "zoe", "guilds": [gid]})).await;
    assert_eq!(s, 200);
    let uid = u["id"].as_str().expect("id").to_owned();
    let (s, c) = post(
        &sim,
        &format!("/guilds/{gid}/channels"),
        json!({"name": "talk", "user_limit": 2}),
    )
    .await;
    assert_eq!(s, 200);
    let cid = c["id"].as_str().expect("id").to_owned();
    assert_eq!(
        post(
            &sim,
            "/voice/connect",
            json!({"user_id": uid, "channel_id": cid})
        )
        .await
        .0,
        200
    );
    let join = gw.dispatch("VOICE_STATE_UPDATE").await;
    assert_eq!(join["d"]["channel_id"], cid);
    assert_eq!(
        post(
            &sim,
            "/voice/state",
            json!({"user_id": uid, "self_deaf": true, "self_video": true})
        )
        .await
        .0,
        200
    );
    let flags = gw.dispatch("VOICE_STATE_UPDATE").await;
    assert_eq!(
        (
            flags["d"]["self_deaf"].clone(),
            flags["d"]["self_video"].clone()
        ),
        (json!(true), json!(true))
    );
    assert_eq!(
        post(&sim, "/voice/disconnect", json!({"user_id": uid}))
            .await
            .0,
        200
    );
    assert!(gw.dispatch("VOICE_STATE_UPDATE").await["d"]["channel_id"].is_null());
    let (s, state) = control(&sim, reqwest::Method::GET, "/state", Value::Null).await;
    assert_eq!(s, 200);
    assert_eq!(state["guilds"].as_array().expect("guilds").len(), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_control_api_refuses_a_private_channel_join_with_a_clear_error() {
    let sim = start_default().await;
    let g = seed::GUILD_ID.to_string();
    let deny = ((1u64 << 10) | (1u64 << 20)).to_string();
    let (_, c) = post(
        &sim,
        &format!("/guilds/{g}/channels"),
        json!({"name": "secret", "permission_overwrites": [{"id": g, "type": 0, "deny": deny}]}),
    )
    .await;
    let (s, e) = post(
        &sim,
        "/voice/connect",
        json!({"user_id": seed::USERS[0].0, "channel_id": c["id"]}),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(e["error"], "missing_permission");
    assert!(e["message"]
        .as_str()
        .expect("message")
        .contains("VIEW_CHANNEL"));
    let (s, e) = post(
        &sim,
        "/voice/move",
        json!({"user_id": seed::USERS[0].0, "channel_id": c["id"]}),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (400, Some("not_connected")));
    sim.shutdown().await;
}

#[tokio::test]
async fn faults_and_logs_are_reachable_over_http() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    let (s, body) = post(&sim, "/faults/close", json!({"code": 4000})).await;
    assert_eq!((s, body["connections"].clone()), (200, json!(1)));
    assert_eq!(gw.ended().await, Ended::Closed(4000));
    for path in [
        "/faults/request_heartbeat",
        "/faults/reconnect",
        "/faults/drop",
        "/faults/clear",
        "/ratelimits/reset",
    ] {
        assert_eq!(post(&sim, path, json!({})).await.0, 200, "{path}");
    }
    assert_eq!(
        post(&sim, "/faults/invalid_session", json!({"resumable": true}))
            .await
            .0,
        200
    );
    assert_eq!(
        post(&sim, "/faults/heartbeat_acks", json!({"enabled": false}))
            .await
            .0,
        200
    );
    assert_eq!(
        post(&sim, "/faults/refuse_connections", json!({"seconds": 0.1}))
            .await
            .0,
        200
    );
    assert_eq!(
        post(
            &sim,
            "/faults/rest",
            json!({"kind": "status", "status": 500, "count": 1})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(&sim, "/faults/rest", json!({"kind": "bogus"})).await.0,
        400
    );
    assert_eq!(
        post(
            &sim,
            "/faults/latency",
            json!({"rest_ms": 0, "gateway_ms": 0})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(&sim, "/oauth/next_login", json!({"user": "bob"}))
            .await
            .0,
        200
    );
    assert_eq!(
        post(&sim, "/oauth/next_error", json!({"error": "access_denied"}))
            .await
            .0,
        200
    );
    let (s, log) = control(&sim, reqwest::Method::GET, "/log?since=0", Value::Null).await;
    assert_eq!(s, 200);
    let kinds: Vec<&str> = log
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"identify") && kinds.contains(&"fault"),
        "{kinds:?}"
    );
    let (s, sessions) = control(&sim, reqwest::Method::GET, "/sessions", Value::Null).await;
    assert_eq!(s, 200);
    assert!(sessions["sessions"].is_array());
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_control_input_gets_a_400_not_a_panic() {
    let sim = start_default().await;
    let resp = http()
        .post(format!("{}/_sim/voice/connect", sim.http_url()))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 400);
    assert_eq!(
        post(
            &sim,
            "/voice/connect",
            json!({"user_id": "x", "channel_id": 1})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(&sim, "/faults/close", json!({"code": 12})).await.0,
        400
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_load_generator_emits_the_requested_number_of_voice_events_and_stops() {
    let sim = start(SimConfig {
        heartbeat_interval: Duration::from_secs(5),
        ..test_config()
    })
    .await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let started = std::time::Instant::now();
    let (s, _) = post(
        &sim,
        "/load",
        json!({"events_per_sec": 200, "count": 50, "max_seconds": 10}),
    )
    .await;
    assert_eq!(s, 200);
    let mut got = 0;
    while got < 50 {
        gw.dispatch("VOICE_STATE_UPDATE").await;
        got += 1;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(240),
        "50 events at 200/s take about 250 ms, not less"
    );
    assert!(wait_until(Duration::from_secs(5), || !sim.load_running()).await);
    assert!(sim.events().iter().any(
        |e| matches!(&e.kind, SimEventKind::Control { op } if op == "load finished after 50 events")
    ));
    assert_eq!(
        post(&sim, "/load", json!({"events_per_sec": 0, "count": 1}))
            .await
            .0,
        400
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn seeded_simulators_hand_out_the_same_ids_and_session_ids() {
    let a = start_default().await;
    let b = start_default().await;
    assert_eq!(
        a.create_user("x").expect("a"),
        b.create_user("x").expect("b")
    );
    let (_, sa) = Gw::ready(&a).await;
    let (_, sb) = Gw::ready(&b).await;
    assert_eq!(sa, sb);
    a.shutdown().await;
    b.shutdown().await;
}
