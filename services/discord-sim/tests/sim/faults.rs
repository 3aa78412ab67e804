//! Fault injection on the gateway and REST.

use std::time::{Duration, Instant};

use discord_sim::{seed, RestFault, RestFaultKind, SimEventKind};
use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn dropping_the_socket_sends_no_close_frame_and_keeps_the_session_resumable() {
    let sim = start_default().await;
    let (mut gw, sid) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    assert_eq!(sim.drop_connections(None), 1);
    assert_eq!(gw.ended().await, Ended::Dropped);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 2}}))
        .await;
    gw.dispatch("RESUMED").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn reconnect_sends_op_7_and_holds_later_dispatches_for_the_resume() {
    let sim = start_default().await;
    let (mut gw, sid) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    sim.send_reconnect(None);
    sim.connect_voice(seed::USERS[0].0, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    let v = gw.recv().await.expect("op 7");
    assert_eq!(v["op"], 7);
    assert_eq!(
        gw.recv_within(Duration::from_millis(200)).await,
        Err(Ended::Timeout),
        "nothing after op 7"
    );
    drop(gw);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 2}}))
        .await;
    assert_eq!(gw.recv().await.expect("replay")["t"], "VOICE_STATE_UPDATE");
    assert_eq!(gw.recv().await.expect("resumed")["t"], "RESUMED");
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_session_resumable_keeps_the_session_and_not_resumable_ends_it() {
    let sim = start_default().await;
    let (mut gw, sid) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    sim.invalidate_sessions(true, None);
    assert_eq!(
        gw.recv().await.expect("op 9"),
        json!({"op": 9, "s": null, "t": null, "d": true})
    );
    assert_eq!(sim.sessions().len(), 1);
    drop(gw);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 2}}))
        .await;
    gw.dispatch("RESUMED").await;
    sim.invalidate_sessions(false, None);
    assert_eq!(gw.recv().await.expect("op 9")["d"], false);
    assert!(sim.sessions().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn closing_with_any_code_reaches_the_client() {
    let sim = start_default().await;
    for code in [4000, 4008, 4011, 1001] {
        let (mut gw, _) = Gw::ready(&sim).await;
        sim.close_connections(code, None);
        assert_eq!(gw.ended().await, Ended::Closed(code));
        assert!(wait_until(Duration::from_secs(5), || sim.connection_count() == 0).await);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn the_server_can_request_a_heartbeat() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    sim.request_heartbeat();
    assert_eq!(gw.recv().await.expect("op 1")["op"], 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn heartbeats_stop_being_acked_until_acks_are_turned_back_on() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    sim.set_heartbeat_acks(false);
    gw.send(json!({"op": 1, "d": null})).await;
    assert_eq!(
        gw.recv_within(Duration::from_millis(200)).await,
        Err(Ended::Timeout)
    );
    sim.set_heartbeat_acks(true);
    gw.send(json!({"op": 1, "d": null})).await;
    assert_eq!(gw.recv().await.expect("ack")["op"], 11);
    sim.shutdown().await;
}

#[tokio::test]
async fn new_connections_are_refused_for_the_given_time() {
    let sim = start_default().await;
    sim.refuse_connections_for(Duration::from_secs(1));
    let url = format!("{}/?v=10&encoding=json", sim.gateway_url());
    assert!(tokio_tungstenite::connect_async(&url).await.is_err());
    assert!(sim
        .events()
        .iter()
        .any(|e| matches!(e.kind, SimEventKind::Refused { .. })));
    let ok = wait_until_async(Duration::from_secs(5), || {
        let url = url.clone();
        async move { tokio_tungstenite::connect_async(&url).await.is_ok() }
    })
    .await;
    assert!(ok, "accepted again after the window");
    sim.shutdown().await;
}

async fn wait_until_async<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn rest_faults_answer_429_5xx_or_slowly_for_the_given_count() {
    let sim = start_default().await;
    let path = format!("/guilds/{}/channels", seed::GUILD_ID);
    sim.inject_rest_fault(RestFault {
        kind: RestFaultKind::RateLimit {
            scope: "global".into(),
            retry_after: 2.5,
        },
        remaining: 1,
        path_contains: None,
    })
    .expect("fault");
    let (status, h, body) = api(&sim, Method::GET, &path, None).await;
    assert_eq!(status, 429);
    assert_eq!(body["retry_after"], 2.5);
    assert_eq!(body["global"], true);
    assert_eq!(header(&h, "x-ratelimit-global"), "true");
    assert_eq!(header(&h, "retry-after"), "3");
    sim.inject_rest_fault(RestFault {
        kind: RestFaultKind::RateLimit {
            scope: "shared".into(),
            retry_after: 1.0,
        },
        remaining: 1,
        path_contains: Some("/channels".into()),
    })
    .expect("fault");
    let (status, h, _) = api(&sim, Method::GET, &path, None).await;
    assert_eq!((status, header(&h, "x-ratelimit-scope")), (429, "shared"));
    assert_eq!(
        sim.invalid_request_count(),
        1,
        "shared-scope 429s are not invalid requests"
    );
    sim.inject_rest_fault(RestFault {
        kind: RestFaultKind::Status(503),
        remaining: 2,
        path_contains: None,
    })
    .expect("fault");
    assert_eq!(api(&sim, Method::GET, &path, None).await.0, 503);
    assert_eq!(api(&sim, Method::GET, &path, None).await.0, 503);
    assert_eq!(api(&sim, Method::GET, &path, None).await.0, 200);
    sim.inject_rest_fault(RestFault {
        kind: RestFaultKind::Slow(Duration::from_millis(300)),
        remaining: 1,
        path_contains: None,
    })
    .expect("fault");
    let started = Instant::now();
    assert_eq!(api(&sim, Method::GET, &path, None).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    sim.shutdown().await;
}

#[tokio::test]
async fn latency_delays_rest_answers_and_gateway_dispatches() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    sim.set_latency(Duration::from_millis(200), Duration::from_millis(200));
    let started = Instant::now();
    api(&sim, Method::GET, "/gateway", None).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    let started = Instant::now();
    sim.connect_voice(seed::USERS[0].0, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    gw.dispatch("VOICE_STATE_UPDATE").await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    sim.clear_faults();
    sim.shutdown().await;
}

#[tokio::test]
async fn every_rest_call_and_gateway_step_is_in_the_event_log() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.send(json!({"op": 1, "d": 2})).await;
    gw.dispatch("GUILD_CREATE").await;
    assert_eq!(gw.recv().await.expect("ack")["op"], 11);
    api(
        &sim,
        Method::GET,
        &format!("/guilds/{}/roles", seed::GUILD_ID),
        None,
    )
    .await;
    let kinds: Vec<_> = sim.events().into_iter().map(|e| e.kind).collect();
    assert!(kinds
        .iter()
        .any(|k| matches!(k, SimEventKind::Connected { .. })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, SimEventKind::Identify { .. })));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, SimEventKind::Heartbeat { seq: Some(2), .. })));
    assert!(kinds.iter().any(|k| matches!(k, SimEventKind::Rest { route, status: 200, .. } if route == "GET /guilds/{guild_id}/roles")));
    let ids: Vec<u64> = sim.events().iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    sim.shutdown().await;
}

#[tokio::test]
async fn after_invalid_session_false_the_client_may_identify_again_on_the_same_socket() {
    let sim = start_default().await;
    let (mut gw, first) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    sim.invalidate_sessions(false, None);
    assert_eq!(gw.recv().await.expect("op 9")["d"], false);
    gw.identify(&sim.config().bot_token, INTENTS).await;
    let ready = gw.dispatch("READY").await;
    assert_ne!(ready["d"]["session_id"], first.as_str());
    assert_eq!(ready["s"], 1, "a new session starts its sequence at 1");
    sim.shutdown().await;
}
