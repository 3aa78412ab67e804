//! The platform's NATS pieces against a real, private nats-server.

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

use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use voicerooms_contract::event::{CloseReason, Event, RoomDeleted};
use voicerooms_contract::{GuildId, RoomEvent, RoomId};
use voicerooms_platform::nats::{
    ensure_kv, ensure_rooms_stream, rooms_stream_epoch, stream_epoch, NatsMetrics, StreamEpochError,
};
use voicerooms_platform::settings::NatsSettings;
use voicerooms_testkit::{wait_until, NatsServer};

fn settings(server: &NatsServer) -> NatsSettings {
    NatsSettings {
        url: server.url(),
        ..Default::default()
    }
}

fn deleted_event(room: u64) -> RoomEvent {
    RoomEvent::new(
        GuildId::new(1).unwrap(),
        RoomId::new(room).unwrap(),
        1,
        Event::RoomDeleted(RoomDeleted {
            reason: CloseReason::Owner,
        }),
    )
}

#[tokio::test]
async fn a_jetstream_publish_is_acked_stored_once_and_consumed_in_order() {
    let server = NatsServer::start().await;
    let client = server.client().await;
    let js = jetstream::new(client);
    let stream = ensure_rooms_stream(&js, &settings(&server)).await.unwrap();

    let mut acks = Vec::new();
    for room in [10u64, 11, 10] {
        let event = deleted_event(room);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("test-{room}-{}", acks.len()).as_str(),
        );
        let ack = js
            .publish_with_headers(event.subject(), headers, event.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
        acks.push(ack.sequence);
    }
    assert_eq!(acks, vec![1, 2, 3]);

    // The same message id again is de-duplicated: stored once.
    let event = deleted_event(10);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "test-10-0");
    let dup = js
        .publish_with_headers(event.subject(), headers, event.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.sequence, 1);

    // One room's events, from the start, in stream order.
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "rooms.1.10.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap().take(2);
    let mut seqs = Vec::new();
    while let Some(msg) = messages.next().await {
        let msg = msg.unwrap();
        let event = RoomEvent::decode_on(&msg.subject, &msg.payload).unwrap();
        assert_eq!(event.room.get(), 10);
        seqs.push(msg.info().unwrap().stream_sequence);
    }
    assert_eq!(seqs, vec![1, 3]);
}

#[tokio::test]
async fn the_stream_republishes_each_event_with_its_sequence_on_the_live_subject() {
    let server = NatsServer::start().await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    ensure_rooms_stream(&js, &settings(&server)).await.unwrap();
    let mut live = client.subscribe("live.rooms.1.20.>").await.unwrap();
    client.flush().await.unwrap();

    let event = deleted_event(20);
    js.publish(event.subject(), event.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();

    let msg = tokio::time::timeout(Duration::from_secs(5), live.next())
        .await
        .expect("republished message within 5 s")
        .unwrap();
    assert_eq!(msg.subject.as_str(), "live.rooms.1.20.room.deleted");
    let headers = msg.headers.expect("republish headers");
    assert_eq!(headers.get("Nats-Sequence").unwrap().as_str(), "1");
    assert_eq!(
        RoomEvent::decode_on(&msg.subject, &msg.payload).unwrap(),
        event
    );
}

#[tokio::test]
async fn ensuring_the_stream_twice_is_harmless() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    ensure_rooms_stream(&js, &settings(&server)).await.unwrap();
    let mut stream = ensure_rooms_stream(&js, &settings(&server)).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.subjects,
        vec!["rooms.>"]
    );
}

#[tokio::test]
async fn a_kv_compare_and_set_conflict_is_detected() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    let store = ensure_kv(&js, "cas-test", 5, 1).await.unwrap();

    let rev = store.create("room.1", "members=1".into()).await.unwrap();
    // Two writers read the same revision; the first update wins.
    let first = store.update("room.1", "members=2".into(), rev).await;
    let second = store.update("room.1", "members=2b".into(), rev).await;
    assert!(first.is_ok());
    let err = second.unwrap_err();
    assert_eq!(err.kind(), kv::UpdateErrorKind::WrongLastRevision);
    // Creating an existing key also conflicts.
    assert!(store.create("room.1", "again".into()).await.is_err());
    let entry = store.entry("room.1").await.unwrap().unwrap();
    assert_eq!(&entry.value[..], b"members=2");
}

#[tokio::test]
async fn the_client_reconnects_after_the_server_restarts() {
    let mut server = NatsServer::start().await;
    let metrics = NatsMetrics::default();
    let client = voicerooms_platform::nats::connect(&settings(&server), "test", metrics.clone())
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "connected", || async {
        voicerooms_platform::nats::is_connected(&client)
    })
    .await;
    assert_eq!(metrics.connected.get(), 1);

    server.stop();
    wait_until(Duration::from_secs(10), "disconnected", || async {
        !voicerooms_platform::nats::is_connected(&client)
    })
    .await;
    server.restart().await;
    wait_until(Duration::from_secs(15), "reconnected", || async {
        voicerooms_platform::nats::is_connected(&client)
    })
    .await;
    // JetStream state survived the restart (same store dir).
    let js = jetstream::new(client);
    let store = ensure_kv(&js, "survivor", 1, 1).await.unwrap();
    store.put("k", "v".into()).await.unwrap();
    server.restart().await;
    wait_until(
        Duration::from_secs(15),
        "kv readable after restart",
        || async { matches!(store.get("k").await, Ok(Some(v)) if &v[..] == b"v") },
    )
    .await;
}

#[tokio::test]
async fn the_rooms_stream_epoch_survives_updates_and_restarts_and_changes_when_recreated() {
    let mut server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    assert!(matches!(
        rooms_stream_epoch(&js).await,
        Err(StreamEpochError::NotFound)
    ));

    let stream = ensure_rooms_stream(&js, &settings(&server)).await.unwrap();
    let epoch = rooms_stream_epoch(&js).await.unwrap();
    assert_eq!(stream_epoch(stream.cached_info()).unwrap(), epoch);
    // The creation time, in nanoseconds: within a minute of now.
    let now_ns = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap();
    assert!(
        now_ns.abs_diff(epoch.unix_nanos()) < 60_000_000_000,
        "{epoch:?}"
    );

    // Every service start updates the stream's configuration: the epoch stays.
    ensure_rooms_stream(
        &js,
        &NatsSettings {
            stream_max_age_secs: 3600,
            ..settings(&server)
        },
    )
    .await
    .unwrap();
    assert_eq!(rooms_stream_epoch(&js).await.unwrap(), epoch);

    // A server restart (same store) keeps it too.
    server.restart().await;
    let js = jetstream::new(server.client().await);
    assert_eq!(rooms_stream_epoch(&js).await.unwrap(), epoch);

    // Deleted and created again: sequences restart, and the epoch says so.
    js.delete_stream(voicerooms_contract::subject::ROOMS_STREAM)
        .await
        .unwrap();
    ensure_rooms_stream(&js, &settings(&server)).await.unwrap();
    let recreated = rooms_stream_epoch(&js).await.unwrap();
    assert_ne!(recreated, epoch);
}

#[tokio::test]
async fn the_epoch_read_is_bounded_by_the_request_timeout() {
    let server = NatsServer::start().await;
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_millis(300)))
        .connect(server.url())
        .await
        .unwrap();
    // A JetStream domain whose API a silent subscriber holds: requests are delivered and never
    // answered (a stalled JetStream), rather than failing fast with "no responders".
    // (Subscribed on the requesting connection itself, so the server has the interest before
    // the request arrives.)
    let _held = client.subscribe("$JS.stalled.API.>").await.unwrap();
    let js = jetstream::with_domain(client, "stalled");
    let started = std::time::Instant::now();
    let result = rooms_stream_epoch(&js).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(StreamEpochError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(300),
        "{elapsed:?} {result:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}
