//! The fan-out against hostile and unlucky conditions (issue 14): revocation, stream epochs,
//! catch-ups larger than a client's queue, catch-ups beside live delivery, a pump's failure.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use voicerooms_contract::event::{
    CloseReason, Event, RemovedReason, RoomDeleted, RoomMemberRemoved,
};
use voicerooms_testkit::{wait_until, NatsServer};

use crate::helpers::{seqs, settings, user, Client, TestEdge, World};
use crate::metric;

/// The next frame that is not an event of `room` (skipping pings), within 10 s.
async fn next_non_event(client: &mut Client) -> Value {
    loop {
        let frame = client.next_json().await;
        if frame["type"] != "event" {
            return frame;
        }
    }
}

/// Asserts that nothing but `pong` comes before the answer to a ping: no event leaked.
async fn only_pong(client: &mut Client, who: &str) {
    client.send(json!({"v":1,"type":"ping"})).await;
    let frame = client.next_json().await;
    assert_eq!(frame["event"], "pong", "{who} got {frame}");
}

fn epoch_of(ack: &Value) -> String {
    ack["payload"]["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch in {ack}"))
        .to_owned()
}

/// Defect 2: membership was checked only at subscribe, so a removed member (or everyone, after a
/// deletion) kept receiving the room's events.
#[tokio::test]
async fn removal_and_deletion_end_the_affected_subscriptions_with_documented_frames() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let (alice, bob, carol) = (user(1), user(2), user(3));
    world
        .put_room(50, &[alice.clone(), bob.clone(), carol.clone()], 0)
        .await;
    let mut clients = Vec::new();
    for who in [&alice, &carol, &bob, &bob] {
        let cookie = edge.login(who, 60_000).await;
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        assert_eq!(client.subscribe(50, None).await["event"], "subscribed");
        clients.push(client);
    }
    let [alice_ws, carol_ws, bob_ws, bob_ws2] = &mut clients[..] else {
        unreachable!()
    };

    // Bob leaves: room-manager updates the room, then publishes the event.
    world.put_room(50, &[alice.clone(), carol.clone()], 0).await;
    let published = Instant::now();
    let removed = world
        .publish(
            50,
            Event::RoomMemberRemoved(RoomMemberRemoved {
                user: bob.clone(),
                reason: RemovedReason::Left,
            }),
        )
        .await;
    for (name, ws) in [("bob", &mut *bob_ws), ("bob again", &mut *bob_ws2)] {
        let event = ws.events(1).await;
        assert_eq!(seqs(&event), vec![removed], "{name} sees his removal");
        let ended = ws.next_json().await;
        let took = published.elapsed();
        assert_eq!(ended["type"], "error", "{name}: {ended}");
        assert_eq!(ended["error"]["code"], "not_member", "{name}: {ended}");
        assert_eq!(ended["room"], "50", "{name}: {ended}");
        println!("REVOCATION {name}: subscription ended {took:?} after the publish");
    }
    for ws in [&mut *alice_ws, &mut *carol_ws] {
        assert_eq!(seqs(&ws.events(1).await), vec![removed]);
    }
    let after = world.voice(50, &carol, true).await;
    for ws in [&mut *alice_ws, &mut *carol_ws] {
        assert_eq!(seqs(&ws.events(1).await), vec![after], "members go on");
    }
    only_pong(bob_ws, "bob").await;
    only_pong(bob_ws2, "bob again").await;
    // He cannot come back without being a member again.
    assert_eq!(
        bob_ws.subscribe(50, None).await["error"]["code"],
        "not_member"
    );

    // The room is deleted: every subscription of it ends, after the event itself.
    let deleted = world
        .publish(
            50,
            Event::RoomDeleted(RoomDeleted {
                reason: CloseReason::Owner,
            }),
        )
        .await;
    for (name, ws) in [("alice", &mut *alice_ws), ("carol", &mut *carol_ws)] {
        assert_eq!(seqs(&ws.events(1).await), vec![deleted], "{name}");
        let ended = ws.next_json().await;
        assert_eq!(ended["error"]["code"], "room_deleted", "{name}: {ended}");
        assert_eq!(ended["room"], "50", "{name}: {ended}");
    }
    world.voice(50, &carol, false).await;
    only_pong(alice_ws, "alice").await;
    only_pong(carol_ws, "carol").await;
    assert_eq!(
        metric(&edge.metrics_url(), "voicerooms_edge_revocations_total").await,
        4.0
    );
    let metrics = edge.metrics_url();
    wait_until(
        Duration::from_secs(10),
        "the room's pump retired",
        || async { metric(&metrics, "voicerooms_edge_rooms").await == 0.0 },
    )
    .await;
}

/// Defect 2 (logout): a session deleted anywhere (logout on another edge, a failed refresh)
/// closes its sockets at once, not at the next minute's re-check.
#[tokio::test]
async fn a_session_deleted_on_another_edge_closes_its_sockets_with_4003() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge_a = TestEdge::start(settings(&nats)).await;
    let edge_b = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    world.put_room(51, std::slice::from_ref(&alice), 0).await;
    let cookie = edge_a.login(&alice, 600_000).await;
    let other = edge_a.login(&alice, 600_000).await;
    let mut on_a = Client::authed(&edge_a.ws_url(), &cookie).await;
    let mut on_b = Client::authed(&edge_b.ws_url(), &cookie).await;
    let mut other_session = Client::authed(&edge_b.ws_url(), &other).await;
    on_b.subscribe(51, None).await;

    let id = edge_a.sessions.verify(&cookie).unwrap();
    let deleted = Instant::now();
    edge_a.sessions.delete(&id).await.unwrap();
    for (name, ws) in [("edge a", &mut on_a), ("edge b", &mut on_b)] {
        let error = next_non_event(ws).await;
        assert_eq!(error["error"]["code"], "session_ended", "{name}: {error}");
        assert_eq!(
            ws.closed_with(Duration::from_secs(10)).await,
            Some(CloseCode::Library(4003)),
            "{name}"
        );
        println!(
            "LOGOUT {name}: socket closed {:?} after the delete",
            deleted.elapsed()
        );
    }
    // Another session of the same player is not touched.
    only_pong(&mut other_session, "the other session").await;
}

/// Defect 3: a `since` of another stream epoch is not trusted.
#[tokio::test]
async fn a_since_from_another_epoch_gets_a_fresh_snapshot() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    let first = world.voice(52, &alice, true).await;
    let second = world.voice(52, &alice, false).await;
    world
        .put_room(52, std::slice::from_ref(&alice), second)
        .await;
    let cookie = edge.login(&alice, 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let epoch = epoch_of(&client.subscribe(52, None).await);
    let mut latest = second;
    for other in ["1", "0", "18446744073709551615"] {
        assert_ne!(other, epoch);
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        let ack = client.subscribe_at(52, Some(first), Some(other)).await;
        assert_eq!(ack["payload"]["recovered"], false, "epoch {other}: {ack}");
        assert_eq!(ack["payload"]["seq"], latest);
        assert_eq!(ack["payload"]["epoch"], epoch.as_str());
        let live = world.voice(52, &alice, true).await;
        assert_eq!(seqs(&client.events(1).await), vec![live]);
        latest = live;
        world.put_room(52, std::slice::from_ref(&alice), live).await;
    }
}

/// Defect 3: when the ROOMS stream is recreated, sequences restart; live subscribers are asked to
/// resubscribe and recover with a snapshot of the new epoch, then live events.
#[tokio::test]
async fn a_recreated_stream_makes_subscribers_resubscribe_and_they_recover() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let mut s = settings(&nats);
    s.service.websocket.epoch_check_interval_ms = 200;
    let edge = TestEdge::start(s).await;
    let alice = user(1);
    for i in 0..3 {
        world.voice(53, &alice, i % 2 == 0).await;
    }
    let old_last = world.voice(53, &alice, true).await;
    world
        .put_room(53, std::slice::from_ref(&alice), old_last)
        .await;
    let cookie = edge.login(&alice, 60_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = client.subscribe(53, None).await;
    let old_epoch = epoch_of(&ack);

    world.recreate_stream().await;
    let fresh = world.voice(53, &alice, false).await;
    assert!(fresh < old_last, "sequences restarted");
    let told = next_non_event(&mut client).await;
    assert_eq!(told["error"]["code"], "resubscribe", "{told}");
    assert_eq!(told["room"], "53");

    // As the client does: subscribe again from its saved position. The snapshot in KV is still
    // of the old epoch, so every stored event of the room in the new stream follows it.
    let ack = client
        .subscribe_at(53, Some(old_last), Some(&old_epoch))
        .await;
    assert_eq!(ack["payload"]["recovered"], false, "{ack}");
    assert_ne!(epoch_of(&ack), old_epoch);
    let start = ack["payload"]["seq"].as_u64().unwrap();
    assert!(start < fresh, "{ack}");
    assert_eq!(seqs(&client.events(1).await), vec![fresh]);
    let live = world.voice(53, &alice, true).await;
    assert_eq!(seqs(&client.events(1).await), vec![live], "then live");
}

/// Defect 7: a catch-up larger than the client's queue closed it with 1008, and it came back
/// with the same `since`, for ever. Now it gets a snapshot, at 5,000 and at 50,000 events.
#[tokio::test]
async fn a_gap_larger_than_the_queue_gets_a_snapshot_not_a_1008_loop() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    world.put_room(54, std::slice::from_ref(&alice), 0).await;
    let cookie = edge.login(&alice, 600_000).await;
    let mut client = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = client.subscribe(54, None).await;
    let (since, epoch) = (ack["payload"]["seq"].as_u64().unwrap(), epoch_of(&ack));
    drop(client);

    for gap in [5_000usize, 45_000] {
        let last = world.voice_burst(54, &alice, gap).await;
        world.put_room(54, std::slice::from_ref(&alice), last).await;
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        let ack = client.subscribe_at(54, Some(since), Some(&epoch)).await;
        assert_eq!(ack["event"], "subscribed", "{ack}");
        assert_eq!(ack["payload"]["recovered"], false, "gap {gap}: {ack}");
        assert_eq!(ack["payload"]["seq"], last);
        assert_eq!(ack["payload"]["replayed"], 0);
        let live = world.voice(54, &alice, true).await;
        assert_eq!(seqs(&client.events(1).await), vec![live], "gap {gap}");
        only_pong(&mut client, "the caught-up client").await;
    }
    assert!(
        metric(
            &edge.metrics_url(),
            "voicerooms_edge_slow_consumer_closes_total"
        )
        .await
            == 0.0
    );
    assert!(
        metric(
            &edge.metrics_url(),
            "voicerooms_edge_snapshot_fallbacks_total"
        )
        .await
            >= 2.0
    );
}

/// Defect 9: a subscriber's catch-up ran inside the room's pump, so every other subscriber of the
/// room waited for it. Now live events reach the others while it is read.
#[tokio::test]
async fn a_catch_up_does_not_delay_live_events_to_the_room_s_other_subscribers() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let mut s = settings(&nats);
    // Slow catch-ups: a handful of JetStream calls take about a second.
    s.service.websocket.jetstream_rate = 4;
    let edge = TestEdge::start(s).await;
    let (alice, bob) = (user(1), user(2));
    let before = world.voice_burst(55, &alice, 600).await;
    world.put_room(55, &[alice.clone(), bob.clone()], 1).await;
    let mut watcher = Client::authed(&edge.ws_url(), &edge.login(&alice, 60_000).await).await;
    assert_eq!(watcher.subscribe(55, None).await["event"], "subscribed");
    watcher.events(599).await;

    let mut newcomer = Client::authed(&edge.ws_url(), &edge.login(&bob, 60_000).await).await;
    let consumers = world.consumer_count().await;
    newcomer
        .send(json!({"v":1,"type":"subscribe","payload":{"room":"55"}}))
        .await;
    // The newcomer's catch-up is reading (through a consumer of its own) when this is published.
    wait_until(Duration::from_secs(30), "the catch-up reading", || async {
        world.consumer_count().await > consumers
    })
    .await;
    let live = world.voice(55, &bob, true).await;
    let delivered = watcher.events(1).await;
    assert_eq!(seqs(&delivered), vec![live]);
    // Only after that does the newcomer's catch-up finish (the edge's own clock says so): its
    // ack, the catch-up, then the live event, each once and in order.
    let ack = newcomer.next_json().await;
    assert_eq!(ack["event"], "subscribed", "{ack}");
    assert!(
        delivered[0]["ts"].as_u64() < ack["ts"].as_u64(),
        "the live event waited for the catch-up: sent at {} ms, the ack at {} ms",
        delivered[0]["ts"],
        ack["ts"]
    );
    assert_eq!(ack["payload"]["seq"], 1);
    let events = newcomer.events(600).await;
    let expected: Vec<u64> = (2..=before).chain([live]).collect();
    assert_eq!(seqs(&events), expected);
    only_pong(&mut newcomer, "the newcomer").await;
}

/// Defect 10 (and 3): a `since` that overflowed killed the room's pump; the room then stayed
/// dead on that edge for everyone.
#[tokio::test]
async fn a_hostile_since_does_not_kill_the_room_for_others() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let (alice, bob) = (user(1), user(2));
    world.put_room(56, &[alice.clone(), bob.clone()], 0).await;
    let mut hostile = Client::authed(&edge.ws_url(), &edge.login(&bob, 60_000).await).await;
    hostile
        .send(json!({"v":1,"type":"subscribe","payload":{"room":"56","since":u64::MAX}}))
        .await;
    let _ = hostile.closed_or_frame().await;
    let mut honest = Client::authed(&edge.ws_url(), &edge.login(&alice, 60_000).await).await;
    let ack = honest.subscribe(56, None).await;
    assert_eq!(ack["event"], "subscribed", "{ack}");
    let live = world.voice(56, &alice, true).await;
    assert_eq!(seqs(&honest.events(1).await), vec![live]);
}

/// JetStream API requests that concern the `ROOMS` stream (stream info, message gets, consumers)
/// seen on `$JS.API.>` so far. Everything the edge asked before the client got its answer was
/// handled by the server before this function's own marker request, so the observer sees it
/// before the marker: the read stops there (no quiet-period guess).
async fn rooms_stream_requests(
    observer: &async_nats::Client,
    api: &mut async_nats::Subscriber,
) -> Vec<String> {
    const MARKER: &str = "$JS.API.STREAM.INFO.TEST_MARKER";
    // A stream that does not exist: the answer is an error, the request is what counts.
    let _ = observer.request(MARKER, "".into()).await;
    let mut seen = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), api.next())
            .await
            .expect("the marker request within 10 s")
            .expect("the observer's subscription");
        let subject = message.subject.to_string();
        if subject == MARKER {
            return seen;
        }
        if subject.ends_with(".ROOMS") || subject.contains(".ROOMS.") {
            seen.push(format!(
                "{subject} {}",
                String::from_utf8_lossy(&message.payload)
            ));
        }
    }
}

/// A room already followed on this edge, whose snapshot is current (at or past every event the
/// room's pump has seen, in the same stream epoch), is subscribed to without reading the stream:
/// only the room's state is read. A snapshot behind the pump still reads the stream, and every
/// subscriber gets each later event once. Before, every subscribe read the stream's info and the
/// room's last event.
#[tokio::test]
async fn a_second_subscriber_with_a_current_snapshot_is_served_without_stream_reads() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    let first = world.voice(80, &alice, true).await;
    let last = world.voice(80, &alice, false).await;
    let view = world.put_room(80, std::slice::from_ref(&alice), last).await;
    let cookie = edge.login(&alice, 60_000).await;

    // The first subscriber primes the room's pump (its snapshot carries no epoch: read path).
    let mut a = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = a.subscribe(80, None).await;
    assert_eq!(ack["event"], "subscribed", "{ack}");
    let epoch = ack["payload"]["epoch"].as_str().unwrap().to_owned();
    // room-manager's record: the view with the stream epoch it belongs to.
    let put = |seq: u64| {
        let mut record = serde_json::to_value(&view).unwrap();
        record["seq"] = json!(seq);
        record["stream_epoch"] = json!(epoch);
        let rooms = world.rooms.clone();
        async move {
            rooms
                .put("80", serde_json::to_vec(&record).unwrap().into())
                .await
                .unwrap();
        }
    };
    put(last).await;

    let observer = nats.client().await;
    let mut api = observer.subscribe("$JS.API.>").await.unwrap();
    observer.flush().await.unwrap();

    let mut b = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = b.subscribe(80, None).await;
    assert_eq!(ack["event"], "subscribed", "{ack}");
    assert_eq!(ack["payload"]["recovered"], false);
    assert_eq!(ack["payload"]["seq"], last);
    assert_eq!(ack["payload"]["epoch"], epoch.as_str());
    let mut c = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = c.subscribe_at(80, Some(last), Some(epoch.as_str())).await;
    assert_eq!(ack["payload"]["recovered"], true, "{ack}");
    assert_eq!(ack["payload"]["replayed"], 0, "{ack}");
    let reads = rooms_stream_requests(&observer, &mut api).await;
    assert!(
        reads.is_empty(),
        "current snapshots are served from the pump: {reads:?}"
    );

    // A snapshot behind the pump reads the stream and gets the event it lacks.
    put(first).await;
    let mut d = Client::authed(&edge.ws_url(), &cookie).await;
    let ack = d.subscribe(80, None).await;
    assert_eq!(ack["payload"]["seq"], first, "{ack}");
    assert_eq!(ack["payload"]["replayed"], 1, "{ack}");
    assert_eq!(seqs(&d.events(1).await), vec![last]);
    let reads = rooms_stream_requests(&observer, &mut api).await;
    assert!(
        !reads.is_empty(),
        "a snapshot behind the pump reads the stream"
    );

    // Live: each subscriber gets the next events once, in order.
    let next = vec![
        world.voice(80, &alice, true).await,
        world.voice(80, &alice, false).await,
    ];
    for client in [&mut a, &mut b, &mut c, &mut d] {
        assert_eq!(seqs(&client.events(2).await), next);
    }
}

/// A burst of subscribes to one room (its clients coming back at once) reads the stream once:
/// the others wait for that read and are answered from the pump it primed. Each then gets every
/// later event once. Before, each subscribe read the stream's info and the room's last event.
#[tokio::test]
async fn a_burst_of_subscribes_to_one_room_reads_the_stream_once() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let edge = TestEdge::start(settings(&nats)).await;
    let alice = user(1);
    let cookie = edge.login(&alice, 60_000).await;
    // The stream's epoch, as room-manager records it with each room.
    world.put_room(90, std::slice::from_ref(&alice), 0).await;
    let mut probe = Client::authed(&edge.ws_url(), &cookie).await;
    let epoch = probe.subscribe(90, None).await["payload"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();

    let last = world.voice_burst(81, &alice, 3).await;
    let view = world.put_room(81, std::slice::from_ref(&alice), last).await;
    let mut record = serde_json::to_value(&view).unwrap();
    record["stream_epoch"] = json!(epoch);
    world
        .rooms
        .put("81", serde_json::to_vec(&record).unwrap().into())
        .await
        .unwrap();

    let observer = nats.client().await;
    let mut api = observer.subscribe("$JS.API.>").await.unwrap();
    observer.flush().await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(Client::authed(&edge.ws_url(), &cookie).await);
    }
    let acks = futures::future::join_all(clients.iter_mut().map(|c| c.subscribe(81, None))).await;
    for ack in &acks {
        assert_eq!(ack["event"], "subscribed", "{ack}");
        assert_eq!(ack["payload"]["seq"], last, "{ack}");
    }
    let reads = rooms_stream_requests(&observer, &mut api).await;
    let last_gets = reads.iter().filter(|r| r.contains("last_by_subj")).count();
    assert_eq!(last_gets, 1, "one read for 8 subscribes: {reads:?}");

    let next = world.voice(81, &alice, true).await;
    for client in &mut clients {
        assert_eq!(seqs(&client.events(1).await), vec![next]);
    }
}
