//! The event path: the consumer (concurrency, supervision, stream recreation) and the outbox
//! (a state change and its event never diverge).

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

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use discord_sim::{seed, RestFault, RestFaultKind, SimEventKind};
use futures::StreamExt;
use support::*;
use voicerooms_contract::event::{Event, VoiceFlags, VoiceJoined, VoiceLeft};
use voicerooms_contract::{subject, EventKind, RoomEvent, RoomId, UserRef};

/// How many events of `kind` the replica has applied.
async fn applied(port: u16, kind: &str) -> u64 {
    metric(
        port,
        &format!("voicerooms_room_events_applied_total{{kind=\"{kind}\"}}"),
    )
    .await
}

async fn metric(port: u16, name: &str) -> u64 {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

async fn readyz(port: u16) -> (u16, String) {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn joined(user: &UserRef) -> Event {
    Event::VoiceJoined(VoiceJoined {
        user: user.clone(),
        flags: VoiceFlags::default(),
        moved_from: None,
    })
}

fn left(user: &UserRef) -> Event {
    Event::VoiceLeft(VoiceLeft {
        user: user.clone(),
        moved_to: None,
    })
}

async fn in_voice(env: &Env, room: RoomId, user: &UserRef) -> bool {
    env.replicas[0]
        .app_core
        .record(room)
        .await
        .unwrap()
        .is_some_and(|(r, _)| r.view.voice.iter().any(|o| o.user.id == user.id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_one_rooms_discord_call_is_stuck_for_20_s_other_rooms_events_are_applied_at_once() {
    // One replica: every event goes through the replica whose Discord call is stuck. Discord
    // takes 20 s to answer, and we wait for it (a request timeout above that).
    let env = Env::start_tuned(1, quiet_rooms(), false, |t| t.request_timeout_ms = 25_000).await;
    let port = env.replicas[0].port;
    let (alice, bob) = (seeded(0), seeded(1));
    // Alice is not in voice: her room's placement is a pending move.
    let stuck = env.create(&alice, "stuck").await.unwrap();
    let others: Vec<(UserRef, RoomId)> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let owner = user(
                env.sim.create_user(&format!("other{i}")).unwrap(),
                &format!("other{i}"),
            );
            env.sim.add_member(GUILD, owner.id.get(), &[]).unwrap();
            let c = env.create(&owner, &format!("other {i}")).await.unwrap();
            v.push((owner, c.room.id));
        }
        v
    };
    // Moving alice will take Discord 20 s.
    env.sim.clear_events();
    env.sim
        .inject_rest_fault(RestFault {
            kind: RestFaultKind::Slow(Duration::from_secs(20)),
            remaining: 1,
            path_contains: Some(format!("/members/{}", alice.id)),
        })
        .unwrap();
    let before = applied(port, "voice.joined").await;
    // Alice connects to the Lobby: her pending move fires (and hangs in Discord).
    env.voice_connect(&alice, seed::LOBBY_CHANNEL_ID).await;
    eventually("the Lobby join applied", || async {
        applied(port, "voice.joined").await > before
    })
    .await;

    let mut worst = Duration::ZERO;
    for (owner, room) in &others {
        let t = Instant::now();
        env.publish(room.get(), joined(owner)).await;
        voicerooms_testkit::wait_until(Duration::from_secs(5), "voice event applied", || async {
            in_voice(&env, *room, owner).await
        })
        .await;
        worst = worst.max(t.elapsed());
    }
    let moved = |env: &Env| {
        env.sim.events().into_iter().any(|e| {
            matches!(e.kind, SimEventKind::Rest { ref method, ref path, .. }
                if method == "PATCH" && path.ends_with(&format!("/members/{}", alice.id)))
        })
    };
    assert!(!moved(&env), "the stuck move is still in Discord's hands");
    println!("other rooms' voice events applied within {worst:?} while a move was stuck");
    assert!(
        worst < Duration::from_millis(100),
        "applied within {worst:?}, not within 100 ms"
    );
    // The stuck move completes once, and nothing was delivered twice.
    voicerooms_testkit::wait_until(Duration::from_secs(30), "the stuck move done", || async {
        moved(&env)
    })
    .await;
    assert_eq!(
        env.sim.voice_channel_of(alice.id.get()).map(|(_, c)| c),
        Some(stuck.room.id.get())
    );
    assert_eq!(
        metric(port, "voicerooms_room_events_redelivered_total").await,
        0
    );
    let patches = env
        .sim
        .events()
        .into_iter()
        .filter(|e| {
            matches!(e.kind, SimEventKind::Rest { ref method, ref path, .. }
                if method == "PATCH" && path.ends_with(&format!("/members/{}", alice.id)))
        })
        .count();
    assert_eq!(patches, 1, "the pending move, once");
    let _ = bob;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_is_restarted_and_readyz_answers_503_while_it_is_down() {
    let env = Env::start_tuned(1, quiet_rooms(), false, |t| t.restart_backoff_ms = 3_000).await;
    let replica = &env.replicas[0];
    let port = replica.port;
    eventually("ready", || async { readyz(port).await.0 == 200 }).await;
    // Ready means the room API answers now: one request, no retry on "no responders".
    let alice = seeded(0);
    let created: voicerooms_contract::command::Created = request_within(
        &env.client,
        voicerooms_contract::subject::CommandKind::Create,
        &voicerooms_contract::command::CreateRoom {
            requester: alice.clone(),
            guild: voicerooms_contract::GuildId::new(GUILD).unwrap(),
            name: "alive".into(),
            idempotency_key: None,
        },
        Duration::from_secs(10),
    )
    .await
    .expect("create once ready");

    assert!(replica.health.abort("events"), "the consumer was running");

    voicerooms_testkit::wait_until(Duration::from_secs(5), "readyz 503", || async {
        let (status, body) = readyz(port).await;
        status == 503 && body.contains("events")
    })
    .await;
    eventually("ready again", || async { readyz(port).await.0 == 200 }).await;
    assert_eq!(replica.health.restarts("events"), 1);
    // The restarted consumer applies events.
    let bob = seeded(1);
    env.publish(created.room.id.get(), joined(&bob)).await;
    eventually("event applied after the restart", || async {
        in_voice(&env, created.room.id, &bob).await
    })
    .await;
    env.shutdown().await;
}

/// The `stream_epoch` of the room's record in the `rooms` bucket, read the way the edge reads
/// it (services/edge/src/hub.rs `StoredRoom`: a top-level string field beside the view, parsed
/// with `StreamEpoch::parse`), from the raw JSON rather than room-manager's own type.
async fn stored_epoch(
    js: &jetstream::Context,
    room: RoomId,
) -> Option<voicerooms_contract::StreamEpoch> {
    let kv = js.get_key_value("rooms").await.unwrap();
    let bytes = kv.get(subject::room_key(room)).await.unwrap()?;
    let raw: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let field = raw.get("stream_epoch")?;
    let text = field
        .as_str()
        .unwrap_or_else(|| panic!("stream_epoch is not a string: {field}"));
    Some(voicerooms_contract::StreamEpoch::parse(text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_rooms_stream_is_deleted_and_recreated_voice_events_are_applied_again() {
    let env = Env::start_strict(1, quiet_rooms(), false).await;
    let (alice, bob, carol) = (seeded(0), seeded(1), seeded(2));
    let created = env.create(&alice, "epochs").await.unwrap();
    let room = created.room.id;
    // Bob's sequence climbs well above where a new stream starts.
    env.publish(room.get(), joined(&bob)).await;
    for _ in 0..20 {
        env.publish(
            room.get(),
            Event::VoiceUpdated(voicerooms_contract::event::VoiceUpdated {
                user: bob.clone(),
                flags: VoiceFlags {
                    self_mute: true,
                    ..VoiceFlags::default()
                },
                changed: vec![voicerooms_contract::event::VoiceFlag::SelfMute],
            }),
        )
        .await;
    }
    let js = jetstream::new(env.client.clone());
    let last = js
        .get_stream(subject::ROOMS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert!(last > 20);
    eventually("every event applied", || async {
        env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .is_some_and(|(r, _)| {
                r.view.seq >= last
                    && r.view
                        .voice
                        .iter()
                        .any(|o| o.user.id == bob.id && o.flags.self_mute)
            })
    })
    .await;
    let old_seq = env.replicas[0]
        .app_core
        .record(room)
        .await
        .unwrap()
        .unwrap()
        .0
        .view
        .seq;
    let old_epoch = voicerooms_platform::nats::rooms_stream_epoch(&js)
        .await
        .unwrap();
    assert_eq!(
        stored_epoch(&js, room).await,
        Some(old_epoch),
        "the record names the stream its seq counts in, as the edge reads it"
    );

    // An operator deletes ROOMS; a service recreates it: sequences restart at 1.
    js.delete_stream(subject::ROOMS_STREAM)
        .await
        .expect("delete ROOMS");
    voicerooms_platform::nats::ensure_rooms_stream(&js, &Default::default())
        .await
        .expect("recreate ROOMS");
    env.publish(room.get(), left(&bob)).await;
    env.publish(room.get(), joined(&carol)).await;

    eventually("bob's leave and carol's join applied", || async {
        let rec = env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .unwrap()
            .0;
        !rec.view.voice.iter().any(|o| o.user.id == bob.id)
            && rec.view.voice.iter().any(|o| o.user.id == carol.id)
    })
    .await;
    let rec = env.replicas[0]
        .app_core
        .record(room)
        .await
        .unwrap()
        .unwrap()
        .0;
    assert!(
        rec.view.seq < old_seq,
        "the snapshot's sequence belongs to the new stream: {} (was {old_seq})",
        rec.view.seq
    );
    let new_epoch = voicerooms_platform::nats::rooms_stream_epoch(&js)
        .await
        .unwrap();
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(
        stored_epoch(&js, room).await,
        Some(new_epoch),
        "the record's stream_epoch moved to the new stream with its seq"
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stored_in_a_recreated_stream_before_the_consumer_restarts_records_the_new_epoch()
{
    // The consumer stays down once killed (a minute's restart delay): only the outbox sees the
    // new stream.
    let env = Env::start_tuned(1, quiet_rooms(), false, |t| t.restart_backoff_ms = 60_000).await;
    let replica = &env.replicas[0];
    let (alice, bob, carol) = (seeded(0), seeded(1), seeded(2));
    let created = env.create(&alice, "epochs").await.unwrap();
    let room = created.room.id;
    for _ in 0..10 {
        env.publish(room.get(), joined(&bob)).await;
    }
    let js = jetstream::new(env.client.clone());
    let last = js
        .get_stream(subject::ROOMS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    eventually("every event applied", || async {
        env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .is_some_and(|(r, _)| r.view.seq >= last)
    })
    .await;
    assert!(replica.health.abort("events"), "the consumer was running");
    js.delete_stream(subject::ROOMS_STREAM)
        .await
        .expect("delete ROOMS");
    voicerooms_platform::nats::ensure_rooms_stream(&js, &Default::default())
        .await
        .expect("recreate ROOMS");
    let new_epoch = voicerooms_platform::nats::rooms_stream_epoch(&js)
        .await
        .unwrap();

    env.join(&carol, &created.invite.token).await.expect("join");

    let added = env.events_of(room, EventKind::RoomMemberAdded).await;
    assert_eq!(added.len(), 1, "the join's event is in the new stream");
    let new_last = js
        .get_stream(subject::ROOMS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert!(new_last < last, "the new stream's sequences start again");
    eventually("the outbox emptied", || async {
        env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .is_some_and(|(r, _)| r.outbox.is_empty())
    })
    .await;
    let rec = env.replicas[0]
        .app_core
        .record(room)
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(
        stored_epoch(&js, room).await,
        Some(new_epoch),
        "the snapshot's seq is counted in the new stream"
    );
    assert_eq!(
        rec.view.seq, new_last,
        "the snapshot reflects the join's event"
    );
    assert!(
        rec.voice_seq.is_empty(),
        "old-stream voice sequences dropped"
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_publish_failed_is_stored_once_in_order_and_reaches_live_clients() {
    let env = Env::start_strict(2, quiet_rooms(), false).await;
    let (alice, bob, carol) = (seeded(0), seeded(1), seeded(2));
    let created = env.create(&alice, "outbox").await.unwrap();
    let room = created.room.id;
    env.wait_for_event(room, EventKind::RoomCreated, "room.created")
        .await;
    // A live client of the room (the edge's feed: the stream's republish).
    let mut live = env
        .client
        .subscribe(format!("live.rooms.{GUILD}.{room}.>"))
        .await
        .unwrap();
    let js = jetstream::new(env.client.clone());
    let settings = voicerooms_platform::settings::NatsSettings::default();
    // The stream stops taking room events for a moment (full, as if it were being re-created
    // or its leader moved); KV keeps working.
    let held = js
        .get_stream(subject::ROOMS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    let mut paused = voicerooms_platform::nats::rooms_stream_config(&settings);
    paused.max_messages = i64::try_from(held).unwrap();
    paused.discard = jetstream::stream::DiscardPolicy::New;
    js.update_stream(paused).await.expect("pause ROOMS");

    env.join(&bob, &created.invite.token)
        .await
        .expect("join while paused");
    env.join(&carol, &created.invite.token)
        .await
        .expect("join while paused");

    let rec = env.replicas[0]
        .app_core
        .record(room)
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(rec.view.members.len(), 3, "the state changed");
    assert_eq!(rec.outbox.len(), 2, "its events wait in the outbox");
    js.update_stream(voicerooms_platform::nats::rooms_stream_config(&settings))
        .await
        .expect("resume ROOMS");

    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), live.next())
            .await
            .expect("live event within 10 s")
            .expect("subscription");
        let ev = RoomEvent::decode(&msg.payload).unwrap();
        if let Event::RoomMemberAdded(a) = &ev.event {
            got.push(a.user.id);
        }
    }
    assert_eq!(got, vec![bob.id, carol.id], "in order");
    let stored: Vec<_> = env
        .events_of(room, EventKind::RoomMemberAdded)
        .await
        .into_iter()
        .map(|e| match e.event {
            Event::RoomMemberAdded(a) => a.user.id,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(stored, vec![bob.id, carol.id], "stored once each, in order");
    eventually("outbox empty", || async {
        env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .is_some_and(|(r, _)| r.outbox.is_empty())
    })
    .await;
    env.shutdown().await;
}
