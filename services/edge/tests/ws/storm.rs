//! Defect 8: a NATS reconnect made every room pump repair at once — four JetStream API calls
//! each, no jitter, no global limit. With 2,500 rooms on one edge, a NATS restart must repair
//! every room while the edge's JetStream API calls stay under `jetstream_rate` per second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use voicerooms_testkit::{wait_until, NatsServer};

use crate::helpers::{settings, user, Client, TestEdge, World};
use crate::metric;

const ROOMS: u64 = 2_500;
const FIRST_ROOM: u64 = 10_000;
const PER_CONNECTION: u64 = 100;
const RATE: u32 = 500;
const CONCURRENCY: u32 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_2500_rooms_repairs_every_room_within_the_api_budget() {
    let mut nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let mut s = settings(&nats);
    s.service.websocket.max_subscriptions = PER_CONNECTION as usize;
    s.service.websocket.jetstream_rate = RATE;
    s.service.websocket.jetstream_concurrency = CONCURRENCY as usize;
    s.service.websocket.max_connections_per_user = 100;
    let edge = TestEdge::start(s).await;
    let alice = user(1);
    for chunk in (0..ROOMS).collect::<Vec<_>>().chunks(100) {
        join_all(
            chunk
                .iter()
                .map(|r| world.put_room(FIRST_ROOM + r, std::slice::from_ref(&alice), 0)),
        )
        .await;
    }

    // 25 connections, 100 rooms each; every event frame is recorded as (room, seq).
    let received: Arc<Mutex<HashMap<u64, Vec<u64>>>> = Arc::default();
    let cookie = edge.login(&alice, 600_000).await;
    let mut readers = Vec::new();
    for c in 0..ROOMS / PER_CONNECTION {
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            for r in 0..PER_CONNECTION {
                let room = FIRST_ROOM + c * PER_CONNECTION + r;
                let ack = client.subscribe(room, None).await;
                assert_eq!(ack["event"], "subscribed", "{ack}");
            }
            // Until the edge goes away at the end of the test.
            while let Some(message) = client.closed_or_frame().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["type"], "event", "unexpected {frame}");
                let room: u64 = frame["room"].as_str().unwrap().parse().unwrap();
                let seq = frame["seq"].as_u64().unwrap();
                received.lock().unwrap().entry(room).or_default().push(seq);
            }
        }));
    }
    let metrics = edge.metrics_url();
    wait_until(Duration::from_secs(120), "2,500 subscriptions", || async {
        metric(&metrics, "voicerooms_edge_subscriptions").await == ROOMS as f64
    })
    .await;
    let repairs_before = metric(&metrics, "voicerooms_edge_repairs_total").await;
    let calls_before = metric(&metrics, "voicerooms_edge_jetstream_calls_total").await;

    nats.stop();
    nats.restart().await;
    // Every JetStream API request crosses the server as a message on `$JS.API.>`: a wildcard
    // subscriber sees each one, independently of the edge's own accounting.
    // The observer runs on a thread of its own, so its clock is not held up by the edge's work.
    let seen: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
    let (ready, observing) = tokio::sync::oneshot::channel();
    let url = nats.url();
    let counting = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let observer = async_nats::connect(url).await.unwrap();
                let mut requests = observer.subscribe("$JS.API.>").await.unwrap();
                observer.flush().await.unwrap();
                let _ = ready.send(());
                while let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_secs(5), requests.next()).await
                {
                    seen.lock().unwrap().push(std::time::Instant::now());
                }
            })
        })
    };
    observing.await.unwrap();
    // One event per room, published as soon as NATS is back: some before the edge has its
    // subscriptions again (only the repair can deliver those), some after.
    let world = World::new(&nats).await;
    let mut published = HashMap::new();
    for chunk in (0..ROOMS).collect::<Vec<_>>().chunks(250) {
        let seqs = join_all(
            chunk
                .iter()
                .map(|r| world.voice(FIRST_ROOM + r, &alice, true)),
        )
        .await;
        for (r, seq) in chunk.iter().zip(seqs) {
            published.insert(FIRST_ROOM + r, seq);
        }
    }
    wait_until(
        Duration::from_secs(180),
        "every room's event delivered",
        || async {
            let received = received.lock().unwrap();
            published
                .iter()
                .all(|(room, seq)| received.get(room).is_some_and(|s| s.contains(seq)))
        },
    )
    .await;
    wait_until(Duration::from_secs(60), "every room repaired", || async {
        metric(&metrics, "voicerooms_edge_repairs_total").await - repairs_before >= ROOMS as f64
    })
    .await;
    for (room, seqs) in received.lock().unwrap().iter() {
        assert_eq!(
            seqs,
            &vec![published[room]],
            "room {room}: once, nothing else"
        );
    }

    // The busiest second and the busiest three seconds of JetStream API requests at the
    // server (the observer stops once they have been quiet for 5 s).
    counting.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let busiest = |window: Duration| {
        let mut most = 0usize;
        let mut start = 0usize;
        for (end, at) in seen.iter().enumerate() {
            while at.duration_since(seen[start]) >= window {
                start += 1;
            }
            most = most.max(end + 1 - start);
        }
        most
    };
    let (one, five) = (
        busiest(Duration::from_secs(1)),
        busiest(Duration::from_secs(5)),
    );
    let calls = metric(&metrics, "voicerooms_edge_jetstream_calls_total").await;
    if let (Some(first), Some(last)) = (seen.first(), seen.last()) {
        println!(
            "STORM {} API requests at the server over {:?} after the restart",
            seen.len(),
            last.duration_since(*first)
        );
    }
    println!(
        "STORM {ROOMS} rooms: at the server, busiest second {one}, busiest 5 s {five} \
         JetStream API requests (rate {RATE}/s); the edge paced {} calls for the repairs",
        calls - calls_before
    );
    // The edge paces its requests at `RATE` per second with a 50 ms burst (so at most 525 in
    // any second leave it). On the way to the server, scheduling on a loaded machine bunches some
    // of them (a request can wait in the client's queue past its timeout, so even the
    // `CONCURRENCY` in-flight limit does not bound that): a single second at the server gets a
    // 50 % allowance (20 % was exceeded twice in four runs while the machine also ran release
    // builds; unpaced, the old code put 4,191 in one second); over five seconds the bunching
    // averages out and the bound stays tight: 2 % over the rate (2,570 against a 10-request slack
    // of 2,567 was seen with 4,810 paced calls; the old code made 4,191 in one second).
    let second = (RATE + RATE / 2) as usize;
    assert!(
        one <= second,
        "{one} API requests in one second (bound {second})"
    );
    let five_seconds = (5 * RATE + RATE / 20 + CONCURRENCY + 5 * RATE / 50) as usize;
    assert!(
        five <= five_seconds,
        "{five} API requests in five seconds (bound {five_seconds})"
    );
    for reader in readers {
        reader.abort();
    }
}
