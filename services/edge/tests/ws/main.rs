//! The edge's WebSocket against a real nats-server: fan-out, order, recovery, backpressure, auth.

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

mod fanout;
mod helpers;
mod security;
mod storm;

use std::time::Duration;

use futures::StreamExt;
use helpers::{seqs, settings, user, Client, TestEdge, World};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use voicerooms_testkit::{wait_until, NatsServer};

#[tokio::test]
async fn a_voice_join_reaches_a_subscribed_member_with_its_sequence() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let (alice, bob) = (user(1), user(2));
    let view = world.put_room(10, &[alice.clone(), bob.clone()], 0).await;

    let cookie = edge.login(&alice, 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = client.subscribe(10, None).await;
    assert_eq!(ack["event"], "subscribed", "{ack}");
    assert_eq!(ack["payload"]["recovered"], false);
    assert_eq!(ack["payload"]["snapshot"]["name"], view.name);
    assert_eq!(ack["payload"]["seq"], 0);

    let seq = world.voice(10, &bob, true).await;
    let event = &client.events(1).await[0];
    assert_eq!(event["event"], "voice.joined");
    assert_eq!(event["room"], "10");
    assert_eq!(event["seq"], seq);
    assert_eq!(event["payload"]["user"]["id"], bob.id.to_string());
    assert_eq!(event["v"], 1);
    assert!(event["ts"].as_u64().unwrap() >= event["received_at"].as_u64().unwrap());
}

#[tokio::test]
async fn ten_clients_of_a_room_receive_every_event_in_the_same_order() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let members: Vec<_> = (1..=4).map(user).collect();
    world.put_room(11, &members, 0).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let cookie = edge.login(&members[i % 4], 60_000).await;
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        assert_eq!(client.subscribe(11, None).await["event"], "subscribed");
        clients.push(client);
    }
    // Events of another room are interleaved in the stream; they must not show up here.
    let mut expected = Vec::new();
    for round in 0..10 {
        let who = &members[round % 4];
        expected.push(world.voice(11, who, round % 2 == 0).await);
        world.voice(99, who, true).await;
    }

    let mut orders = Vec::new();
    let mut member_lists = Vec::new();
    for client in &mut clients {
        let events = client.events(10).await;
        assert_eq!(seqs(&events), expected, "every event, in stream order");
        let mut in_voice = std::collections::BTreeSet::new();
        for e in &events {
            let id = e["payload"]["user"]["id"].as_str().unwrap().to_owned();
            if e["event"] == "voice.joined" {
                in_voice.insert(id);
            } else {
                in_voice.remove(&id);
            }
        }
        orders.push(seqs(&events));
        member_lists.push(in_voice);
    }
    assert!(orders.windows(2).all(|w| w[0] == w[1]));
    assert!(member_lists.windows(2).all(|w| w[0] == w[1]));
    assert!(seqs(&[]).is_empty());
}

#[tokio::test]
async fn resubscribing_with_since_replays_exactly_the_missed_events() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    world.put_room(12, std::slice::from_ref(&alice), 0).await;
    let cookie = edge.login(&alice, 60_000).await;

    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = client.subscribe(12, None).await;
    let epoch = ack["payload"]["epoch"].as_str().unwrap().to_owned();
    let first = world.voice(12, &alice, true).await;
    assert_eq!(seqs(&client.events(1).await), vec![first]);
    drop(client);

    // While away: three events of this room, some of another.
    let mut missed = Vec::new();
    for i in 0..3 {
        missed.push(world.voice(12, &alice, i % 2 == 1).await);
        world.voice(98, &alice, true).await;
    }
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = client.subscribe_at(12, Some(first), Some(&epoch)).await;
    assert_eq!(ack["payload"]["recovered"], true, "{ack}");
    assert_eq!(ack["payload"]["replayed"], 3);
    assert!(ack["payload"].get("snapshot").is_none());
    assert_eq!(seqs(&client.events(3).await), missed);
    let live = world.voice(12, &alice, true).await;
    assert_eq!(
        seqs(&client.events(1).await),
        vec![live],
        "then live, no duplicates"
    );
}

#[tokio::test]
async fn a_since_older_than_the_stream_gets_a_fresh_snapshot_not_a_partial_replay() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    for i in 0..5 {
        world.voice(13, &alice, i % 2 == 0).await;
    }
    // Events 1..=3 age out of the stream.
    let mut stream = world.js.get_stream("ROOMS").await.unwrap();
    stream.purge().sequence(4).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.first_sequence, 4);
    world.put_room(13, std::slice::from_ref(&alice), 5).await;

    let cookie = edge.login(&alice, 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = client.subscribe(13, Some(1)).await;
    assert_eq!(ack["payload"]["recovered"], false, "{ack}");
    assert_eq!(ack["payload"]["seq"], 5);
    assert_eq!(ack["payload"]["snapshot"]["seq"], 5);
    assert_eq!(ack["payload"]["replayed"], 0);
}

#[tokio::test]
async fn a_client_that_does_not_authenticate_in_time_is_closed_with_4001() {
    let nats = NatsServer::start().await;
    let edge = TestEdge::start(settings(&nats)).await;
    let mut client = Client::connect(&edge.ws_url(), None).await;
    let error = client.next_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "auth_timeout");
    assert_eq!(
        client.closed_with(Duration::from_secs(5)).await,
        Some(CloseCode::Library(4001))
    );
}

#[tokio::test]
async fn authentication_by_message_works_and_bad_or_expired_sessions_are_refused() {
    let nats = NatsServer::start().await;
    World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    let cookie = edge.login(&alice, 60_000).await;

    let mut client = Client::connect(&edge.ws_url(), None).await;
    client
        .send(json!({"v":1,"type":"auth","payload":{"session":cookie}}))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["event"], "auth.ok");
    assert_eq!(ack["payload"]["user"]["id"], alice.id.to_string());
    assert!(!ack.to_string().contains("secret-access-token"));

    // A forged cookie: right shape, wrong signature.
    let mut forged = cookie.clone();
    forged.replace_range(0..4, "AAAA");
    let mut client = Client::connect(&edge.ws_url(), Some(&forged)).await;
    assert_eq!(client.next_json().await["error"]["code"], "invalid_token");
    assert_eq!(
        client.closed_with(Duration::from_secs(5)).await,
        Some(CloseCode::Library(4001))
    );

    let expired = edge.login(&alice, 0).await;
    let mut client = Client::connect(&edge.ws_url(), Some(&expired)).await;
    assert_eq!(client.next_json().await["error"]["code"], "session_expired");
    assert_eq!(
        client.closed_with(Duration::from_secs(5)).await,
        Some(CloseCode::Library(4003))
    );
}

#[tokio::test]
async fn only_members_and_the_owner_can_subscribe() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    world.put_room(14, &[user(1), user(2)], 0).await;

    let stranger = edge.login(&user(7), 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &stranger).await;
    let refused = client.subscribe(14, None).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["error"]["code"], "not_member");
    assert_eq!(refused["room"], "14");
    let missing = client.subscribe(15, None).await;
    assert_eq!(missing["error"]["code"], "room_not_found");
    // The connection is still usable.
    client.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(client.next_json().await["event"], "pong");
}

#[tokio::test]
async fn malformed_frames_get_typed_errors_and_the_connection_survives() {
    let nats = NatsServer::start().await;
    World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let cookie = edge.login(&user(1), 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    for bad in [
        "not json".to_owned(),
        json!({"v":2,"type":"ping"}).to_string(),
        json!({"v":1,"type":"explode"}).to_string(),
        json!({"v":1,"type":"subscribe","payload":{"room":"1.>"}}).to_string(),
    ] {
        client.send_text(&bad).await;
        let error = client.next_json().await;
        assert_eq!(
            error["error"]["code"], "invalid_frame",
            "for {bad}: {error}"
        );
    }
    client.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(client.next_json().await["event"], "pong");

    // A frame over the size limit closes the connection with 1009.
    let huge = "x".repeat(64 * 1024);
    client.send_text(&huge).await;
    assert_eq!(
        client.closed_with(Duration::from_secs(5)).await,
        Some(CloseCode::Size)
    );
}

/// An edge whose connections may queue at most 64 KiB, and alice's session for a room she owns.
async fn small_queue_edge_with_room(room: u64) -> (NatsServer, World, TestEdge, String) {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let mut s = settings(&nats);
    s.service.websocket.max_queue_bytes = 64 * 1024;
    let edge = TestEdge::start(s).await;
    let alice = user(1);
    world.put_room(room, std::slice::from_ref(&alice), 0).await;
    let cookie = edge.login(&alice, 60_000).await;
    (nats, world, edge, cookie)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_1008_and_others_keep_receiving() {
    let (_nats, world, edge, cookie) = small_queue_edge_with_room(16).await;
    let alice = user(1);

    let mut slow = Client::authed_small_buffer(edge.port, &cookie).await;
    slow.subscribe(16, None).await;
    let mut fast = Client::authed(&edge.ws_url(), &cookie).await;
    fast.subscribe(16, None).await;
    // The fast client reads continuously, as a browser does.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let reader = tokio::spawn(async move {
        loop {
            let frame = fast.next_json().await;
            if frame["type"] == "event" {
                sink.lock().unwrap().push(frame["seq"].as_u64().unwrap());
            }
        }
    });

    // The slow client never reads: publish until the edge gives up on it.
    let metrics = edge.metrics_url();
    let mut published = Vec::new();
    let mut closed = false;
    while !closed && published.len() < 40_000 {
        for i in 0..200 {
            published.push(world.voice(16, &alice, i % 2 == 0).await);
        }
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        closed = text.contains("voicerooms_edge_slow_consumer_closes_total 1");
    }
    assert!(closed, "the slow client was never closed");
    let next = world.voice(16, &alice, true).await;
    published.push(next);
    // The reading client got every event, in order, unaffected.
    wait_until(Duration::from_secs(30), "the fast client caught up", || {
        let received = received.clone();
        let want = published.len();
        async move { received.lock().unwrap().len() >= want }
    })
    .await;
    assert_eq!(*received.lock().unwrap(), published);
    reader.abort();
    // When the slow client reads again it finds its backlog, then the 1008 close.
    assert_eq!(
        slow.closed_with(Duration::from_secs(30)).await,
        Some(CloseCode::Policy)
    );
}

/// The value of an unlabelled series on `/metrics`.
pub(crate) async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| {
            let (series, value) = line.split_once(' ')?;
            (series == name).then(|| value.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{name} not exported:\n{text}"))
}

#[tokio::test]
async fn queued_bytes_rise_while_a_client_stops_reading_and_return_to_zero_after_its_close() {
    let (_nats, world, edge, cookie) = small_queue_edge_with_room(17).await;
    let alice = user(1);
    let metrics = edge.metrics_url();
    const QUEUED: &str = "voicerooms_edge_queued_bytes";

    let mut slow = Client::authed_small_buffer(edge.port, &cookie).await;
    slow.subscribe(17, None).await;
    wait_until(Duration::from_secs(5), "an empty queue", || async {
        metric(&metrics, QUEUED).await == 0.0
    })
    .await;

    // The client stops reading; events pile up once the sockets' buffers are full.
    let mut highest = 0.0_f64;
    let mut published = 0;
    while metric(&metrics, "voicerooms_edge_slow_consumer_closes_total").await < 1.0 {
        assert!(published < 40_000, "the slow client was never closed");
        for i in 0..20 {
            world.voice(17, &alice, i % 2 == 0).await;
        }
        published += 20;
        highest = highest.max(metric(&metrics, QUEUED).await);
    }
    assert!(
        highest >= 1024.0,
        "the queue depth never rose while the client did not read (highest {highest})"
    );
    assert!(highest <= 64.0 * 1024.0, "over the queue limit: {highest}");

    assert_eq!(
        slow.closed_with(Duration::from_secs(30)).await,
        Some(CloseCode::Policy)
    );
    wait_until(
        Duration::from_secs(10),
        "queued bytes back to 0",
        || async { metric(&metrics, QUEUED).await == 0.0 },
    )
    .await;
}

/// Server pings every `ping_interval_ms`; a client that answers stays, one that stops answering
/// for `idle_timeout_ms` is closed with 4009.
#[tokio::test]
async fn the_server_pings_and_closes_a_client_that_stops_answering_with_4009() {
    let nats = NatsServer::start().await;
    let mut s = settings(&nats);
    s.service.websocket.ping_interval_ms = 100;
    s.service.websocket.idle_timeout_ms = 400;
    let edge = TestEdge::start(s).await;
    let cookie = edge.login(&user(1), 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;

    // Reading (tungstenite answers each ping with a pong) keeps the connection open well past
    // the idle timeout.
    let until = tokio::time::Instant::now() + Duration::from_millis(1_500);
    let mut pings = 0;
    while let Ok(message) = tokio::time::timeout_at(until, client.socket.next()).await {
        match message.expect("socket open").expect("valid frame") {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (5..=20).contains(&pings),
        "{pings} pings in 1.5 s at a 100 ms interval"
    );

    // Not reading: no pongs, so the edge gives up after the idle timeout.
    let metrics = edge.metrics_url();
    wait_until(
        Duration::from_secs(5),
        "the edge closed the silent client",
        || async { metric(&metrics, "voicerooms_edge_connections").await == 0.0 },
    )
    .await;
    assert_eq!(
        client.closed_with(Duration::from_secs(5)).await,
        Some(CloseCode::Library(4009))
    );
}

#[tokio::test]
async fn a_nats_restart_leaves_no_subscriber_missing_an_event() {
    let mut nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    world.put_room(17, std::slice::from_ref(&alice), 0).await;
    let cookie = edge.login(&alice, 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    client.subscribe(17, None).await;
    let before = world.voice(17, &alice, true).await;
    assert_eq!(seqs(&client.events(1).await), vec![before]);

    nats.stop();
    nats.restart().await;
    // Published as soon as NATS is back: possibly before the edge has re-subscribed.
    let world = World::new(&nats).await;
    let mut after = Vec::new();
    for i in 0..5 {
        after.push(world.voice(17, &alice, i % 2 == 1).await);
    }
    assert_eq!(seqs(&client.events(5).await), after);
    // The reconnect made the pump re-read the stream (whether or not live delivery raced it).
    let metrics = reqwest::get(edge.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let repairs: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("voicerooms_edge_repairs_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(repairs >= 1, "{metrics}");
}

#[tokio::test]
async fn clients_on_two_edges_see_identical_streams_and_survive_an_edge_restart() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let mut edge_a = TestEdge::start(settings(&nats)).await;
    let edge_b = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    world.put_room(18, std::slice::from_ref(&alice), 0).await;
    // Same signing key: a session made on one edge works on the other.
    let cookie = edge_a.login(&alice, 60_000).await;
    let mut on_a = Client::authed(&edge_a.ws_url(), &cookie).await;
    let mut on_b = Client::authed(&edge_b.ws_url(), &cookie).await;
    let epoch = on_a.subscribe(18, None).await["payload"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        on_b.subscribe(18, None).await["payload"]["epoch"],
        epoch.as_str(),
        "both edges name the same stream"
    );
    let mut sent = Vec::new();
    for i in 0..6 {
        sent.push(world.voice(18, &alice, i % 2 == 0).await);
    }
    let a = on_a.events(6).await;
    let b = on_b.events(6).await;
    assert_eq!(seqs(&a), sent);
    assert_eq!(seqs(&a), seqs(&b));

    // Edge A goes away; its client reconnects to B with the last sequence it saw.
    edge_a.stop().await;
    let missed = world.voice(18, &alice, true).await;
    let mut moved = Client::authed(&edge_b.ws_url(), &cookie).await;
    let ack = moved
        .subscribe_at(18, Some(*sent.last().unwrap()), Some(&epoch))
        .await;
    assert_eq!(ack["payload"]["recovered"], true);
    assert_eq!(seqs(&moved.events(1).await), vec![missed]);
    assert_eq!(seqs(&on_b.events(1).await), vec![missed]);
}
