//! One trace across services, exported over OTLP/HTTP to an in-process receiver.
//!
//! The edge binary runs with `VOICEROOMS__TELEMETRY__OTLP_ENDPOINT` set. Two hops are checked:
//! - a voice event published with a `traceparent` (as gateway-listener does) is fanned out by
//!   the edge in a span of that trace, child of the publisher's span;
//! - an HTTP room call makes the edge send its request to room-manager with the context of its
//!   own exported span in the NATS headers.
//!
//! Spans inside gateway-listener and room-manager are not asserted: neither service creates any
//! yet (docs/OBSERVABILITY.md lists what they owe).

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use ops_e2e::{bin, new_trace, service_env, sign_in, wait_ready, OtlpReceiver, Player, Service};
use voicerooms_contract::command::{RoomMember, RoomState, RoomView};
use voicerooms_contract::event::{Event, JoinedVia, VoiceFlags, VoiceJoined};
use voicerooms_contract::{GuildId, RoleId, RoomEvent, RoomId, UserId, UserRef};
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
    let ack = watcher.subscribe(ROOM, None).await.unwrap();
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

/// The whole voice path: the simulator's VOICE_STATE_UPDATE → gateway-listener (span
/// `gateway.dispatch`, root of the trace; the event carries its `traceparent`) → NATS → edge
/// (`edge.fanout`, child of `gateway.dispatch`) → the watcher's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discord_voice_event_is_one_trace_from_gateway_listener_to_the_edge() {
    use discord_sim::{seed, SimConfig, Simulator};
    let nats = NatsServer::start().await;
    let receiver = OtlpReceiver::start().await;
    let sim = Simulator::start(SimConfig::for_tests())
        .await
        .expect("simulator");
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    ensure_rooms_stream(&js, &Default::default()).await.unwrap();
    let rooms = ensure_kv(&js, "rooms", 1, 1).await.unwrap();
    let (alice_id, alice_name) = seed::USERS[0];
    let alice = UserRef {
        id: UserId::new(alice_id).unwrap(),
        username: alice_name.into(),
        global_name: None,
        avatar: None,
    };
    // The simulator's Lobby channel stands for a room alice belongs to.
    let view = RoomView {
        id: RoomId::new(seed::LOBBY_CHANNEL_ID).unwrap(),
        guild: GuildId::new(seed::GUILD_ID).unwrap(),
        name: "lobby".into(),
        owner: alice.clone(),
        role: RoleId::new(9).unwrap(),
        capacity: 4,
        state: RoomState::Open,
        members: vec![RoomMember {
            user: alice.clone(),
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
        .put(
            seed::LOBBY_CHANNEL_ID.to_string(),
            serde_json::to_vec(&view).unwrap().into(),
        )
        .await
        .unwrap();
    let cookie = sign_in(&js, &alice, 1).await;

    let traced = |port: u16, name: &str| {
        let mut env = service_env(&nats.url(), port, name);
        env.push(("VOICEROOMS__TELEMETRY__OTLP_ENDPOINT", receiver.endpoint()));
        env.push(("VOICEROOMS__TELEMETRY__SAMPLE_RATIO", "1.0".into()));
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".into()));
        env.push(("VOICEROOMS__DISCORD__TOKEN", "sim-bot-token".into()));
        env.push(("VOICEROOMS__DISCORD__API_BASE", sim.api_url()));
        env.push(("VOICEROOMS__GATEWAY__URL", sim.gateway_url().to_string()));
        env
    };
    let gl_port = free_port();
    let _gateway = Service::spawn(
        bin("gateway-listener").to_str().unwrap(),
        &traced(gl_port, "gl-traced"),
    );
    let edge_port = free_port();
    let _edge = Service::spawn(
        bin("edge").to_str().unwrap(),
        &traced(edge_port, "edge-traced"),
    );
    wait_ready(gl_port, "gateway-listener", Duration::from_secs(30)).await;
    wait_ready(edge_port, "edge", Duration::from_secs(30)).await;

    let mut watcher = Player::connect(edge_port, &cookie).await.expect("player");
    let ack = watcher
        .subscribe(seed::LOBBY_CHANNEL_ID, None)
        .await
        .unwrap();
    assert_eq!(ack["event"], "subscribed", "{ack}");
    sim.connect_voice(alice_id, seed::LOBBY_CHANNEL_ID)
        .expect("alice joins voice");
    let frame = loop {
        let frame = watcher.next(Duration::from_secs(15)).await.unwrap();
        if frame["type"] == "event" {
            break frame;
        }
    };
    assert_eq!(frame["event"], "voice.joined", "{frame}");
    let seq = frame["seq"].as_u64().unwrap().to_string();

    wait_until(
        Duration::from_secs(15),
        "the edge's fan-out span",
        || async { receiver.spans().iter().any(|s| s.name == "edge.fanout") },
    )
    .await;
    let fanout = receiver
        .spans()
        .into_iter()
        .find(|s| s.name == "edge.fanout")
        .unwrap();
    wait_until(
        Duration::from_secs(15),
        "gateway-listener's span in the same trace",
        || async {
            receiver
                .spans()
                .iter()
                .any(|s| s.service == "gateway-listener" && s.span_id == fanout.parent_span_id)
        },
    )
    .await;
    let parent = receiver
        .spans()
        .into_iter()
        .find(|s| s.span_id == fanout.parent_span_id)
        .unwrap();
    assert_eq!(parent.name, "gateway.dispatch");
    assert_eq!(parent.trace_id, fanout.trace_id, "one trace");
    assert!(!seq.is_empty());
}
