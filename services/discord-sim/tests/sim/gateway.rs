//! The gateway protocol, driven by a raw websocket client.

use std::time::Duration;

use discord_sim::{seed, SimConfig, SimEventKind};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

#[tokio::test]
async fn hello_announces_the_configured_heartbeat_interval_and_heartbeats_are_acked() {
    let sim = start_default().await;
    let (mut gw, interval) = Gw::hello(sim.gateway_url()).await;
    assert_eq!(interval, 500);
    gw.send(json!({"op": 1, "d": null})).await;
    let ack = gw.recv().await.expect("ack");
    assert_eq!(ack["op"], 11);
    assert!(sim
        .events()
        .iter()
        .any(|e| matches!(e.kind, SimEventKind::HeartbeatAck { .. })));
    sim.shutdown().await;
}

#[tokio::test]
async fn identify_gets_ready_then_one_guild_create_per_guild_with_voice_states() {
    let sim = start_default().await;
    let alice = seed::USERS[0].0;
    sim.connect_voice(alice, seed::LOBBY_CHANNEL_ID)
        .expect("alice joins");
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify(&sim.config().bot_token, INTENTS).await;
    let ready = gw.recv().await.expect("ready");
    assert_eq!(ready["t"], "READY");
    assert_eq!(ready["s"], 1);
    let d = &ready["d"];
    assert_eq!(d["v"], 10);
    assert_eq!(d["user"]["bot"], true);
    assert_eq!(d["resume_gateway_url"], sim.gateway_url());
    assert_eq!(d["shard"], json!([0, 1]));
    assert_eq!(
        d["guilds"],
        json!([{"id": seed::GUILD_ID.to_string(), "unavailable": true}])
    );
    let gc = gw.recv().await.expect("guild create");
    assert_eq!(gc["t"], "GUILD_CREATE");
    assert_eq!(gc["s"], 2);
    let vs = gc["d"]["voice_states"].as_array().expect("voice states");
    assert_eq!(vs.len(), 1);
    assert_eq!(vs[0]["user_id"], alice.to_string());
    assert!(
        vs[0].get("guild_id").is_none(),
        "GUILD_CREATE voice states lack guild_id"
    );
    assert!(gc["d"]["channels"].as_array().expect("channels").len() >= 2);
    assert!(gc["d"]["members"].as_array().expect("members").len() >= 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn voice_join_move_leave_and_flag_changes_are_dispatched_in_sequence() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let bob = seed::USERS[1].0;
    sim.connect_voice(bob, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    sim.move_voice(bob, seed::GAMING_CHANNEL_ID).expect("move");
    sim.set_voice_flags(
        bob,
        discord_sim::VoiceFlags {
            self_mute: Some(true),
            ..Default::default()
        },
    )
    .expect("mute");
    sim.disconnect_voice(bob).expect("leave");
    let mut seqs = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..4 {
        let v = gw.dispatch("VOICE_STATE_UPDATE").await;
        seqs.push(v["s"].as_u64().expect("seq"));
        assert_eq!(v["d"]["guild_id"], seed::GUILD_ID.to_string());
        channels.push((v["d"]["channel_id"].clone(), v["d"]["self_mute"].clone()));
    }
    assert_eq!(seqs, [3, 4, 5, 6]);
    assert_eq!(channels[0].0, seed::LOBBY_CHANNEL_ID.to_string());
    assert_eq!(channels[1].0, seed::GAMING_CHANNEL_ID.to_string());
    assert_eq!(
        channels[2],
        (json!(seed::GAMING_CHANNEL_ID.to_string()), json!(true))
    );
    assert!(channels[3].0.is_null());
    sim.shutdown().await;
}

#[tokio::test]
async fn voice_events_are_not_sent_without_the_voice_states_intent() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify(&sim.config().bot_token, 1).await;
    gw.dispatch("GUILD_CREATE").await;
    sim.connect_voice(seed::USERS[0].0, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    sim.create_voice_channel(seed::GUILD_ID, "after")
        .expect("channel");
    let next = gw.dispatch("CHANNEL_CREATE").await;
    assert_eq!(
        next["s"], 3,
        "the voice event was skipped, so CHANNEL_CREATE follows GUILD_CREATE"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_dispatches_then_resumed() {
    let sim = start_default().await;
    let (mut gw, sid) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let seen = gw.last_seq.expect("seq");
    drop(gw);
    assert!(wait_until(Duration::from_secs(5), || sim.connection_count() == 0).await);
    for (id, _) in &seed::USERS[..3] {
        sim.connect_voice(*id, seed::LOBBY_CHANNEL_ID)
            .expect("join");
    }
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(
        json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": seen}}),
    )
    .await;
    let mut got = Vec::new();
    loop {
        let v = gw.recv().await.expect("replay");
        got.push((
            v["s"].as_u64().expect("seq"),
            v["t"].as_str().expect("t").to_owned(),
        ));
        if v["t"] == "RESUMED" {
            break;
        }
    }
    assert_eq!(
        got,
        [
            (seen + 1, "VOICE_STATE_UPDATE".to_owned()),
            (seen + 2, "VOICE_STATE_UPDATE".to_owned()),
            (seen + 3, "VOICE_STATE_UPDATE".to_owned()),
            (seen + 4, "RESUMED".to_owned()),
        ]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_with_a_seq_ahead_of_the_session_is_closed_with_4007() {
    let sim = start_default().await;
    let (gw, sid) = Gw::ready(&sim).await;
    drop(gw);
    assert!(wait_until(Duration::from_secs(5), || sim.connection_count() == 0).await);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(
        json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 999}}),
    )
    .await;
    assert_eq!(gw.ended().await, Ended::Closed(4007));
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_of_an_unknown_session_gets_invalid_session_false() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(
        json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": "nope", "seq": 1}}),
    )
    .await;
    let v = gw.recv().await.expect("op 9");
    assert_eq!(v["op"], 9);
    assert_eq!(v["d"], false);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_session_closed_by_the_client_with_1000_cannot_be_resumed() {
    let sim = start_default().await;
    let (gw, sid) = Gw::ready(&sim).await;
    gw.close(1000).await;
    assert!(wait_until(Duration::from_secs(5), || sim.sessions().is_empty()).await);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 1}}))
        .await;
    assert_eq!(gw.recv().await.expect("op 9")["d"], false);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_session_closed_by_the_client_with_4000_can_be_resumed() {
    let sim = start_default().await;
    let (gw, sid) = Gw::ready(&sim).await;
    gw.close(4000).await;
    assert!(wait_until(Duration::from_secs(5), || sim.connection_count() == 0).await);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 1}}))
        .await;
    gw.dispatch("RESUMED").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_connection_reset_by_the_client_is_a_drop_not_a_decode_error() {
    // Arrange: a session, and a dispatch the client has not read (a reset, not a FIN, on close).
    let sim = start_default().await;
    let (gw, sid) = Gw::ready(&sim).await;
    sim.connect_voice(seed::USERS[0].0, seed::LOBBY_CHANNEL_ID)
        .expect("alice joins");
    assert!(
        wait_until(Duration::from_secs(5), || sim
            .events()
            .iter()
            .any(|e| matches!(&e.kind, SimEventKind::Dispatch { event, .. } if event == "VOICE_STATE_UPDATE")))
        .await
    );

    // Act: the socket is reset (SO_LINGER 0).
    gw.reset();

    // Assert: recorded as the client going away, without a code; the session stays resumable.
    assert!(
        wait_until(Duration::from_secs(5), || sim.connection_count() == 0).await,
        "the connection ends"
    );
    let ends: Vec<_> = sim
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            SimEventKind::Disconnected {
                code, by_server, ..
            } => Some((code, by_server)),
            _ => None,
        })
        .collect();
    assert_eq!(ends, vec![(None, false)]);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 2}}))
        .await;
    assert_eq!(gw.dispatch("VOICE_STATE_UPDATE").await["s"], 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_token_is_closed_with_4004() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify("wrong", INTENTS).await;
    assert_eq!(gw.ended().await, Ended::Closed(4004));
    sim.shutdown().await;
}

#[tokio::test]
async fn malformed_json_is_closed_with_4002() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(gw.ended().await, Ended::Closed(4002));
    sim.shutdown().await;
}

#[tokio::test]
async fn an_unknown_opcode_is_closed_with_4001() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 42, "d": null})).await;
    assert_eq!(gw.ended().await, Ended::Closed(4001));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_payload_over_4096_bytes_is_closed_with_4002() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    let big = "x".repeat(5000);
    gw.send(json!({"op": 1, "d": null, "pad": big})).await;
    assert_eq!(gw.ended().await, Ended::Closed(4002));
    sim.shutdown().await;
}

#[tokio::test]
async fn sending_a_command_before_identify_is_closed_with_4003() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(
        json!({"op": 3, "d": {"since": null, "activities": [], "status": "online", "afk": false}}),
    )
    .await;
    assert_eq!(gw.ended().await, Ended::Closed(4003));
    sim.shutdown().await;
}

#[tokio::test]
async fn identifying_twice_is_closed_with_4005() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.identify(&sim.config().bot_token, INTENTS).await;
    assert_eq!(gw.ended().await, Ended::Closed(4005));
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_and_disallowed_intents_are_closed_with_4013_and_4014() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify(&sim.config().bot_token, 1 << 40).await;
    assert_eq!(gw.ended().await, Ended::Closed(4013));
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify(&sim.config().bot_token, 1 << 8).await; // GUILD_PRESENCES, not allowed by default
    assert_eq!(gw.ended().await, Ended::Closed(4014));
    sim.shutdown().await;
}

#[tokio::test]
async fn binary_frames_are_closed_with_4002() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send_raw(Message::Binary(vec![1, 2, 3])).await;
    assert_eq!(gw.ended().await, Ended::Closed(4002));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_stops_heartbeating_is_closed_with_4009() {
    let sim = start(SimConfig {
        heartbeat_interval: Duration::from_millis(200),
        ..SimConfig::for_tests()
    })
    .await;
    let (mut gw, _) = Gw::ready(&sim).await;
    let started = std::time::Instant::now();
    assert_eq!(gw.ended().await, Ended::Closed(4009));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before interval × 1.5"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn identifies_beyond_max_concurrency_get_invalid_session_false() {
    let sim = start(SimConfig {
        max_concurrency: 1,
        identify_window: Duration::from_secs(5),
        ..test_config()
    })
    .await;
    let (_first, _) = Gw::ready(&sim).await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify(&sim.config().bot_token, INTENTS).await;
    let v = gw.recv().await.expect("op 9");
    assert_eq!((v["op"].clone(), v["d"].clone()), (json!(9), json!(false)));
    sim.shutdown().await;
}

#[tokio::test]
async fn each_rate_limit_key_identifies_once_per_window_and_the_log_says_which() {
    // Arrange: max_concurrency 2: shards 0 and 2 share key 0, shard 1 has key 1.
    let sim = start(SimConfig {
        max_concurrency: 2,
        identify_window: Duration::from_secs(5),
        ..test_config()
    })
    .await;
    let token = sim.config().bot_token.clone();

    // Act
    let mut outcomes = Vec::new();
    let mut keep = Vec::new();
    for shard in [0u64, 1, 2] {
        let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
        gw.identify_shard(&token, [shard, 4]).await;
        let first = gw.recv().await.expect("an answer");
        outcomes.push((first["op"].as_u64(), first["t"].as_str().map(str::to_owned)));
        keep.push(gw);
    }

    // Assert: keys 0 and 1 start at once; shard 2 (key 0 again) must wait.
    assert_eq!(
        outcomes,
        vec![
            (Some(0), Some("READY".into())),
            (Some(0), Some("READY".into())),
            (Some(9), None)
        ]
    );
    let log = sim.events();
    let identified: Vec<([u64; 2], u64)> = log
        .iter()
        .filter_map(|e| match &e.kind {
            SimEventKind::Identify {
                shard,
                rate_limit_key,
                ..
            } => Some((*shard, *rate_limit_key)),
            _ => None,
        })
        .collect();
    assert_eq!(identified, vec![([0, 4], 0), ([1, 4], 1)]);
    assert!(log.iter().any(|e| matches!(
        &e.kind,
        SimEventKind::IdentifyRejected { shard: [2, 4], reason, .. } if reason.contains("rate limit key 0")
    )));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bot_in_too_many_guilds_for_one_shard_is_told_to_shard_with_4011() {
    // Arrange: at most 2 guilds per session; the bot is in 3 (the seeded one and two more).
    let sim = start(SimConfig {
        max_guilds_per_shard: 2,
        ..test_config()
    })
    .await;
    sim.create_guild("second").expect("guild");
    sim.create_guild("third").expect("guild");
    let url = format!("{}/gateway/bot", sim.api_url());
    let bot: serde_json::Value = http()
        .get(&url)
        .header("Authorization", bot_auth(&sim))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");

    // Act: unsharded.
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify(&sim.config().bot_token, INTENTS).await;

    // Assert
    assert_eq!(gw.ended().await, Ended::Closed(4011));
    assert_eq!(bot["shards"], 1, "one shard per 1,000 guilds: {bot}");
    sim.shutdown().await;
}

#[tokio::test]
async fn the_recommended_shard_count_is_configurable() {
    let sim = start(SimConfig {
        recommended_shards: Some(8),
        ..test_config()
    })
    .await;
    let url = format!("{}/gateway/bot", sim.api_url());
    let bot: serde_json::Value = http()
        .get(&url)
        .header("Authorization", bot_auth(&sim))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(bot["shards"], 8);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_session_start_budget_is_reported_and_spent() {
    let sim = start(SimConfig {
        session_start_total: 2,
        ..test_config()
    })
    .await;
    let url = format!("{}/gateway/bot", sim.api_url());
    let before: serde_json::Value = http()
        .get(&url)
        .header("Authorization", bot_auth(&sim))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(before["url"], sim.gateway_url());
    assert_eq!(before["session_start_limit"]["remaining"], 2);
    assert_eq!(before["session_start_limit"]["max_concurrency"], 16);
    let (_a, _) = Gw::ready(&sim).await;
    let (_b, _) = Gw::ready(&sim).await;
    let after: serde_json::Value = http()
        .get(&url)
        .header("Authorization", bot_auth(&sim))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(after["session_start_limit"]["remaining"], 0);
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.identify(&sim.config().bot_token, INTENTS).await;
    assert_eq!(gw.recv().await.expect("op 9")["op"], 9);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_frame_over_the_frame_limit_is_closed_with_4002_not_a_protocol_error() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send_raw(Message::Text("y".repeat(100 * 1024))).await;
    assert_eq!(gw.ended().await, Ended::Closed(4002));
    sim.shutdown().await;
}

#[tokio::test]
async fn more_than_the_gateway_send_limit_is_closed_with_4008() {
    let sim = start(SimConfig {
        gateway_send_limit: 3,
        ..test_config()
    })
    .await;
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    for _ in 0..4 {
        gw.send(json!({"op": 1, "d": null})).await;
    }
    assert_eq!(gw.ended().await, Ended::Closed(4008));
    sim.shutdown().await;
}

#[tokio::test]
async fn resuming_from_a_seq_older_than_the_replay_buffer_gets_invalid_session_false() {
    let sim = start(SimConfig {
        replay_buffer: 2,
        ..test_config()
    })
    .await;
    let (mut gw, sid) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    drop(gw);
    assert!(wait_until(Duration::from_secs(5), || sim.connection_count() == 0).await);
    for (id, _) in &seed::USERS[..4] {
        sim.connect_voice(*id, seed::LOBBY_CHANNEL_ID)
            .expect("join");
    }
    let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
    gw.send(json!({"op": 6, "d": {"token": sim.config().bot_token, "session_id": sid, "seq": 2}}))
        .await;
    assert_eq!(
        gw.recv().await.expect("op 9"),
        json!({"op": 9, "s": null, "t": null, "d": false})
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bad_api_version_is_closed_with_4012() {
    let sim = start_default().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/?v=3", sim.gateway_url()))
        .await
        .expect("connect");
    use futures::StreamExt;
    let mut code = None;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(4012));
    sim.shutdown().await;
}
