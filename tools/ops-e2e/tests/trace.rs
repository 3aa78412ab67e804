//! One trace across services, exported over OTLP/HTTP to an in-process receiver.
//!
//! The edge binary runs with `VOICEROOMS__TELEMETRY__OTLP_ENDPOINT` set. Two hops are checked:
//! - a voice event published with a `traceparent` (as gateway-listener does) is fanned out by
//!   the edge in a span of that trace, child of the publisher's span;
//! - an HTTP room call makes the edge send its request to room-manager with the context of its
//!   own exported span in the NATS headers.
//!
//! A second test runs every service (simulator, gateway-listener, room-manager, edge) and follows
//! a room call and a Discord voice event through all of them.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use ops_e2e::{bin, new_trace, service_env, sign_in, wait_ready, OtlpReceiver, Player, Service};
use voicerooms_contract::command::{RoomMember, RoomState, RoomView};
use voicerooms_contract::event::{Event, JoinedVia, VoiceFlags, VoiceJoined};
use voicerooms_contract::{subject, GuildId, RoleId, RoomEvent, RoomId, UserId, UserRef};
use voicerooms_platform::nats::{ensure_kv, ensure_rooms_stream};
use voicerooms_testkit::{free_port, wait_until, NatsServer};

const GUILD: u64 = 810_000_000_000_000_001;
const ROOM: u64 = 820_000_000_000_000_001;

fn player() -> UserRef {
    UserRef {
        id: UserId::new(830_000_000_000_000_001).unwrap(),
        username: "tracy".into(),
        global_name: None,
        avatar: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voice_event_and_a_room_call_carry_one_trace_across_nats_into_the_edge() {
    let nats = NatsServer::start().await;
    let receiver = OtlpReceiver::start().await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    ensure_rooms_stream(&js, &Default::default()).await.unwrap();
    let rooms = ensure_kv(&js, "rooms", 1, 1).await.unwrap();
    let user = player();
    let view = RoomView {
        id: RoomId::new(ROOM).unwrap(),
        guild: GuildId::new(GUILD).unwrap(),
        name: "traced".into(),
        owner: user.clone(),
        role: RoleId::new(9).unwrap(),
        capacity: 4,
        state: RoomState::Open,
        members: vec![RoomMember {
            user: user.clone(),
            via: JoinedVia::Owner,
            joined_at: 1,
        }],
        voice: vec![],
        created_at: 1,
        last_activity: 1,
        invite_expires_at: 2,
        closing_deadline: None,
        seq: 0,
    };
    rooms
        .put(ROOM.to_string(), serde_json::to_vec(&view).unwrap().into())
        .await
        .unwrap();
    let cookie = sign_in(&js, &user, 1).await;

    let port = free_port();
    let mut env = service_env(&nats.url(), port, "edge-traced");
    env.push(("VOICEROOMS__TELEMETRY__OTLP_ENDPOINT", receiver.endpoint()));
    env.push(("VOICEROOMS__TELEMETRY__SAMPLE_RATIO", "1.0".into()));
    // The batch exporter's delay (5 s by default) would only slow the test down.
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".into()));
    let edge = Service::spawn(bin("edge").to_str().unwrap(), &env);
    wait_ready(port, "edge", Duration::from_secs(20)).await;

    // A player watches the room.
    let mut watcher = Player::connect(port, &cookie).await.expect("player");
    let ack = watcher.subscribe(ROOM, None, None).await.unwrap();
    assert_eq!(ack["event"], "subscribed", "{ack}");

    // "gateway-listener" publishes a voice event inside its span.
    let (trace, gateway_span) = new_trace();
    let traceparent = format!("00-{trace}-{gateway_span}-01");
    let mut event = RoomEvent::new(
        GuildId::new(GUILD).unwrap(),
        RoomId::new(ROOM).unwrap(),
        voicerooms_contract::now_ms(),
        Event::VoiceJoined(VoiceJoined {
            user: user.clone(),
            flags: VoiceFlags::default(),
            moved_from: None,
        }),
    );
    event.traceparent = Some(traceparent.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", traceparent.as_str());
    js.publish_with_headers(event.subject(), headers, event.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let frame = loop {
        let frame = watcher.next(Duration::from_secs(10)).await.unwrap();
        if frame["type"] == "event" {
            break frame;
        }
    };
    assert_eq!(frame["event"], "voice.joined", "{frame}");

    wait_until(
        Duration::from_secs(15),
        "the edge's fan-out span",
        || async {
            receiver
                .spans()
                .iter()
                .any(|s| s.name == "edge.fanout" && s.trace_id == trace)
        },
    )
    .await;
    let fanout = receiver
        .spans()
        .into_iter()
        .find(|s| s.name == "edge.fanout" && s.trace_id == trace)
        .unwrap();
    assert_eq!(fanout.service, "edge");
    assert_eq!(
        fanout.parent_span_id, gateway_span,
        "child of the publisher's span"
    );

    // A room call: the test answers as room-manager and keeps the headers it got.
    let mut requests = client.subscribe("roommgr.v1.list_mine").await.unwrap();
    client.flush().await.unwrap();
    let http = reqwest::Client::new();
    let call = tokio::spawn({
        let url = format!("http://127.0.0.1:{port}/api/rooms");
        let cookie = cookie.clone();
        async move {
            http.get(url)
                .header("Cookie", format!("vr_session={cookie}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let request = tokio::time::timeout(Duration::from_secs(10), requests.next())
        .await
        .expect("a roommgr.v1.list_mine request")
        .unwrap();
    let sent = request
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .expect("traceparent in the request headers");
    client
        .publish(
            request.reply.unwrap(),
            r#"{"v":1,"ok":{"rooms":[]}}"#.into(),
        )
        .await
        .unwrap();
    call.await.unwrap().expect("HTTP answer");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    let (request_trace, request_span) = (parts[1].to_owned(), parts[2].to_owned());
    wait_until(
        Duration::from_secs(15),
        "the edge's request span",
        || async {
            receiver
                .spans()
                .iter()
                .any(|s| s.name == "edge.roommgr_request" && s.span_id == request_span)
        },
    )
    .await;
    let span = receiver
        .spans()
        .into_iter()
        .find(|s| s.span_id == request_span)
        .unwrap();
    assert_eq!(span.trace_id, request_trace);
    assert_eq!(span.service, "edge");
    drop(edge);
}

/// Every service, over the real binaries, each exporting to the receiver:
/// - a room created over HTTP: the edge's `edge.roommgr_request` → room-manager's
///   `roommgr.command` (its child, context in the request's NATS headers) with its Discord
///   calls as `discord.request` children → the `room.created` event it stores carries that
///   trace on;
/// - a Discord voice event: the simulator's VOICE_STATE_UPDATE → gateway-listener's
///   `gateway.dispatch` (root; the event carries its `traceparent` in headers and payload) →
///   room-manager's `roommgr.apply` and the edge's `edge.fanout` (both its children) → the
///   watcher's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_call_and_a_discord_voice_event_are_traced_through_every_service() {
    use discord_sim::{seed, SimConfig, Simulator};
    let nats = NatsServer::start().await;
    let receiver = OtlpReceiver::start().await;
    let sim = Simulator::start(SimConfig::for_tests())
        .await
        .expect("simulator");
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let (alice_id, alice_name) = seed::USERS[0];
    let alice = UserRef {
        id: UserId::new(alice_id).unwrap(),
        username: alice_name.into(),
        global_name: None,
        avatar: None,
    };
    let cookie = sign_in(&js, &alice, 1).await;

    let traced = |port: u16, name: &str| {
        let mut env = service_env(&nats.url(), port, name);
        env.push(("VOICEROOMS__TELEMETRY__OTLP_ENDPOINT", receiver.endpoint()));
        env.push(("VOICEROOMS__TELEMETRY__SAMPLE_RATIO", "1.0".into()));
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".into()));
        env.push(("VOICEROOMS__DISCORD__TOKEN", "sim-bot-token".into()));
        env.push(("VOICEROOMS__DISCORD__API_BASE", sim.api_url()));
        env.push(("VOICEROOMS__GATEWAY__URL", sim.gateway_url().to_string()));
        env.push((
            "VOICEROOMS__INVITES__SECRET",
            "trace-test-invite-secret-0123456789abcdef".into(),
        ));
        env
    };
    let mut services = Vec::new();
    for name in ["gateway-listener", "room-manager", "edge"] {
        let port = free_port();
        let service = Service::spawn(bin(name).to_str().unwrap(), &traced(port, name));
        services.push((name, port, service));
    }
    for (name, port, _) in &services {
        wait_ready(*port, name, Duration::from_secs(30)).await;
    }
    let edge_port = services[2].1;

    // 1. alice creates a room through the edge's HTTP API.
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{edge_port}/api/rooms"))
        .header("Cookie", format!("vr_session={cookie}"))
        .header("Origin", format!("http://127.0.0.1:{edge_port}"))
        .json(&serde_json::json!({"name": "traced", "guild": seed::GUILD_ID.to_string()}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    assert!(created["room"]["id"].is_string(), "created: {created}");
    let room_id: u64 = created["room"]["id"].as_str().unwrap().parse().unwrap();
    let span_named = |name: &'static str, service: &'static str| {
        let receiver = &receiver;
        move || async move {
            receiver
                .spans()
                .iter()
                .any(|s| s.name == name && s.service == service)
        }
    };
    wait_until(
        Duration::from_secs(15),
        "room-manager's command span",
        span_named("roommgr.command", "room-manager"),
    )
    .await;
    let command = receiver
        .spans()
        .into_iter()
        .find(|s| s.name == "roommgr.command")
        .unwrap();
    wait_until(
        Duration::from_secs(15),
        "the edge's request span, parent of the command's",
        || async {
            receiver
                .spans()
                .iter()
                .any(|s| s.span_id == command.parent_span_id)
        },
    )
    .await;
    let request = receiver
        .spans()
        .into_iter()
        .find(|s| s.span_id == command.parent_span_id)
        .unwrap();
    assert_eq!(request.name, "edge.roommgr_request");
    assert_eq!(request.service, "edge");
    assert_eq!(request.trace_id, command.trace_id, "one trace");
    // The Discord calls it made (role, channel, member role) are its children.
    wait_until(
        Duration::from_secs(15),
        "room-manager's Discord calls under the command",
        || async {
            receiver
                .spans()
                .iter()
                .filter(|s| {
                    s.name == "discord.request"
                        && s.parent_span_id == command.span_id
                        && s.trace_id == command.trace_id
                })
                .count()
                >= 2
        },
    )
    .await;
    // The stored room.created event continues the command's trace.
    let stream = js.get_stream(subject::ROOMS_STREAM).await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&format!(
            "rooms.{}.{room_id}.room.created",
            seed::GUILD_ID
        ))
        .await
        .expect("room.created stored");
    let event = RoomEvent::decode(&stored.payload).expect("room event");
    let traceparent = event
        .traceparent
        .expect("room.created carries a traceparent");
    assert_eq!(
        traceparent.split('-').nth(1),
        Some(command.trace_id.as_str()),
        "room.created is in the command's trace: {traceparent}"
    );

    // 2. alice watches her room and joins its voice channel in "Discord".
    let mut watcher = Player::connect(edge_port, &cookie).await.expect("player");
    let ack = watcher.subscribe(room_id, None, None).await.unwrap();
    assert_eq!(ack["event"], "subscribed", "{ack}");
    sim.connect_voice(alice_id, room_id)
        .expect("alice joins the room's voice channel");
    let frame = loop {
        let frame = watcher.next(Duration::from_secs(15)).await.unwrap();
        if frame["type"] == "event" && frame["event"] == "voice.joined" {
            break frame;
        }
    };
    assert_eq!(frame["room"], room_id.to_string(), "{frame}");

    // The fan-out and the apply of that event are children of one gateway.dispatch span.
    let dispatch_with_children = || {
        let spans = receiver.spans();
        spans
            .iter()
            .filter(|d| d.name == "gateway.dispatch" && d.service == "gateway-listener")
            .find(|d| {
                let child = |name: &str, service: &str| {
                    spans.iter().any(|s| {
                        s.name == name
                            && s.service == service
                            && s.parent_span_id == d.span_id
                            && s.trace_id == d.trace_id
                    })
                };
                child("edge.fanout", "edge") && child("roommgr.apply", "room-manager")
            })
            .cloned()
    };
    wait_until(
        Duration::from_secs(15),
        "gateway.dispatch with edge.fanout and roommgr.apply as children",
        || async { dispatch_with_children().is_some() },
    )
    .await;
    let dispatch = dispatch_with_children().unwrap();
    assert!(
        dispatch.parent_span_id.is_empty() || dispatch.parent_span_id.chars().all(|c| c == '0'),
        "gateway.dispatch is the root: {dispatch:?}"
    );
    drop(services);
}
