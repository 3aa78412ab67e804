//! Hostile and unlucky clients (issue 14): cross-site handshakes, impossible `since` values,
//! multi-byte text where byte limits are applied, connections that die abnormally, invalid UTF-8.

use std::time::Duration;

use futures::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use voicerooms_testkit::{wait_until, NatsServer};

use crate::helpers::{own_origin, seqs, settings, user, Client, TestEdge, World};
use crate::metric;

fn refused_with(result: Result<Client, WsError>) -> u16 {
    match result {
        Ok(_) => panic!("the handshake was accepted"),
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// Defect 1: `GET /ws` checked no `Origin`, so any site (or a same-site origin on another port)
/// could open the player's socket with their cookie.
#[tokio::test]
async fn a_foreign_origin_is_refused_at_the_upgrade_and_own_and_configured_origins_work() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let mut s = settings(&nats);
    s.service.edge.allowed_origins = "https://rooms.example.com".into();
    let edge = TestEdge::start(s).await;
    let alice = user(1);
    world.put_room(40, std::slice::from_ref(&alice), 0).await;
    let cookie = edge.login(&alice, 60_000).await;
    let url = edge.ws_url();

    for foreign in [
        "https://evil.example",
        "null",
        "http://127.0.0.1:1",
        "http://localhost.evil.example",
        "https://rooms.example.com.evil.example",
    ] {
        let status = refused_with(Client::connect_from(&url, Some(&cookie), Some(foreign)).await);
        assert_eq!(status, 403, "Origin {foreign}");
    }
    // No Origin and no Sec-Fetch-Site: not a page of ours either.
    assert_eq!(
        refused_with(Client::connect_from(&url, Some(&cookie), None).await),
        403
    );

    for ours in [own_origin(&url), "https://rooms.example.com".to_owned()] {
        let mut client = Client::connect_from(&url, Some(&cookie), Some(&ours))
            .await
            .unwrap_or_else(|e| panic!("Origin {ours} refused: {e}"));
        assert_eq!(
            client.next_json().await["event"],
            "auth.ok",
            "Origin {ours}"
        );
        let ack = client.subscribe(40, None).await;
        assert_eq!(ack["event"], "subscribed", "{ack}");
    }
    // The refusals never counted as connections.
    let metrics = edge.metrics_url();
    wait_until(Duration::from_secs(10), "connections back to 0", || async {
        metric(&metrics, "voicerooms_edge_connections").await == 0.0
    })
    .await;
}

/// Defect 3: a `since` ahead of the stream answered `recovered: true` and then nothing, ever;
/// u64::MAX overflowed (a panic in debug builds).
#[tokio::test]
async fn a_since_beyond_the_stream_gets_a_fresh_snapshot_then_live_events() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    let before = world.voice(41, &alice, true).await;
    world
        .put_room(41, std::slice::from_ref(&alice), before)
        .await;
    let cookie = edge.login(&alice, 60_000).await;

    let mut latest = before;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let epoch = client.subscribe(41, None).await["payload"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // Without an epoch (as clients before epochs sent it) and with the current one.
    for epoch in [None, Some(epoch.as_str())] {
        for since in [1_000_000_000_000_000u64, u64::MAX - 1, u64::MAX] {
            let mut client = Client::authed(&edge.ws_url(), &cookie).await;
            let ack = client.subscribe_at(41, Some(since), epoch).await;
            assert_eq!(ack["event"], "subscribed", "since {since}: {ack}");
            assert_eq!(ack["payload"]["recovered"], false, "since {since}: {ack}");
            assert_eq!(ack["payload"]["seq"], latest, "since {since}: {ack}");
            assert_eq!(ack["payload"]["snapshot"]["seq"], latest, "since {since}");
            let live = world.voice(41, &alice, false).await;
            assert_eq!(
                seqs(&client.events(1).await),
                vec![live],
                "since {since}: then live events"
            );
            latest = live;
            world
                .put_room(41, std::slice::from_ref(&alice), latest)
                .await;
        }
    }
}

/// Defect 4: byte-limited messages were cut inside a multi-byte character (a panic: the
/// connection dropped with no answer).
#[tokio::test]
async fn multi_byte_text_in_frames_and_bodies_gets_typed_errors_at_every_length() {
    let nats = NatsServer::start().await;
    World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let cookie = edge.login(&user(1), 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    for text in ["é", "😀", "\u{1D4D0}", "ab€"] {
        for n in [1usize, 49, 50, 51, 66, 67, 100, 101, 150, 199, 200, 201] {
            let long = text.repeat(n);
            for frame in [
                json!({"v":1,"type":"subscribe","payload":{"room":"1","since":long}}),
                json!({"v":1,"type":"subscribe","payload":{"room":long}}),
                json!({"v":1,"type":long}),
                json!({"v":1,"type":"auth","payload":{"session":1,"x":long}}),
            ] {
                client.send(frame.clone()).await;
                let error = client.next_json().await;
                assert_eq!(error["error"]["code"], "invalid_frame", "{frame}: {error}");
            }
        }
    }
    client.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(client.next_json().await["event"], "pong");

    // The same over HTTP: JSON errors quoting the body.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", edge.port);
    for text in ["é", "\u{1D4D0}"] {
        for n in (0..=110).step_by(1) {
            let key = text.repeat(n);
            let body = format!(r#"{{"{key}":1}}"#);
            let response = http
                .post(format!("{base}/api/rooms"))
                .header("Cookie", format!("vr_session={cookie}"))
                .header("Origin", &base)
                .header("Content-Type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("no answer to {body}: {e}"));
            assert_eq!(response.status(), 400, "{body}");
            let error: serde_json::Value = response.json().await.unwrap();
            assert_eq!(error["error"]["code"], "validation", "{body}: {error}");
        }
    }
}

/// Defect 5: a connection that ended abnormally kept its per-user slot; after 20 the player got
/// `connection_limit` until the edge restarted.
#[tokio::test]
async fn connections_that_end_abnormally_give_back_their_slots() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    world.put_room(42, std::slice::from_ref(&alice), 0).await;
    let cookie = edge.login(&alice, 60_000).await;
    let limit = 20;
    for i in 0..limit + 5 {
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        if i % 2 == 0 {
            // A frame that used to panic the connection's task.
            client
                .send(json!({"v":1,"type":"subscribe","payload":{"room":"42","since":"😀".repeat(50)}}))
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), client.closed_or_frame()).await;
        } else {
            // The client vanishes without a close handshake (TCP reset).
            client.subscribe(42, None).await;
            client.reset();
        }
    }
    let metrics = edge.metrics_url();
    wait_until(Duration::from_secs(10), "every connection gone", || async {
        metric(&metrics, "voicerooms_edge_connections").await == 0.0
    })
    .await;
    // Every slot came back: the player can open the full number again.
    let mut open = Vec::new();
    for _ in 0..limit {
        open.push(Client::authed(&edge.ws_url(), &cookie).await);
    }
    assert_eq!(
        metric(&metrics, "voicerooms_edge_connections").await,
        limit as f64
    );
}

/// Defect 6: invalid UTF-8 in a text frame closed with 1009 ("frame too large"); RFC 6455 says
/// 1007.
#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let nats = NatsServer::start().await;
    World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let cookie = edge.login(&user(1), 60_000).await;
    for bytes in [
        vec![0xff],
        vec![b'{', 0xc3, b'}'],
        "é".as_bytes()[..1].to_vec(),
        b"{\"v\":1,\"type\":\"ping\"}\xed\xa0\x80".to_vec(),
    ] {
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        client
            .socket
            .send(Message::Frame(Frame::message(
                bytes.clone(),
                OpCode::Data(Data::Text),
                true,
            )))
            .await
            .unwrap();
        assert_eq!(
            client.closed_with(Duration::from_secs(5)).await,
            Some(CloseCode::Invalid),
            "{bytes:?}"
        );
    }
}
