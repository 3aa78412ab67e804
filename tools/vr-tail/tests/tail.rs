//! The operator's tail against a private nats-server with the real ROOMS stream: a scripted
//! scenario is shown in order, filters select exactly what they name, and a replay from the
//! stream prints what the live tail printed.

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

use tokio::sync::mpsc;
use voicerooms_contract::event::{
    CloseReason, Event, JoinedVia, RoomCreated, RoomDeleted, RoomMemberAdded, VoiceFlag,
    VoiceFlags, VoiceJoined, VoiceLeft, VoiceUpdated,
};
use voicerooms_contract::{EventKind, GuildId, RoleId, RoomEvent, RoomId, UserId, UserRef};
use voicerooms_platform::nats::ensure_rooms_stream;
use voicerooms_platform::settings::NatsSettings;
use voicerooms_testkit::NatsServer;
use vr_tail::{Line, LiveTail, Options, Start};

const G1: u64 = 111_111_111_111_111_111;
const G2: u64 = 222_222_222_222_222_222;
const R1: u64 = 333_333_333_333_333_331;
const R2: u64 = 333_333_333_333_333_332;
const R3: u64 = 333_333_333_333_333_333;

fn user(id: u64, name: &str) -> UserRef {
    UserRef {
        id: UserId::new(id).unwrap(),
        username: name.to_owned(),
        global_name: None,
        avatar: None,
    }
}

fn ev(guild: u64, room: u64, at: u64, event: Event) -> RoomEvent {
    let mut e = RoomEvent::new(
        GuildId::new(guild).unwrap(),
        RoomId::new(room).unwrap(),
        at,
        event,
    );
    e.id = Some(format!("test:{room}:{at}"));
    e
}

/// Rooms in two guilds, every kind of thing a room goes through.
fn scenario(t0: u64) -> Vec<RoomEvent> {
    let alice = user(901, "alice");
    let bob = user(902, "bob");
    let carol = user(903, "carol");
    vec![
        ev(
            G1,
            R1,
            t0,
            Event::RoomCreated(RoomCreated {
                name: "raid night".into(),
                owner: alice.clone(),
                role: RoleId::new(444).unwrap(),
                capacity: 4,
                invite_expires_at: t0 + 86_400_000,
            }),
        ),
        ev(
            G1,
            R1,
            t0 + 1,
            Event::RoomMemberAdded(RoomMemberAdded {
                user: alice.clone(),
                via: JoinedVia::Owner,
            }),
        ),
        ev(
            G1,
            R1,
            t0 + 2,
            Event::VoiceJoined(VoiceJoined {
                user: alice.clone(),
                flags: VoiceFlags::default(),
                moved_from: None,
            }),
        ),
        ev(
            G1,
            R2,
            t0 + 3,
            Event::VoiceJoined(VoiceJoined {
                user: bob.clone(),
                flags: VoiceFlags::default(),
                moved_from: None,
            }),
        ),
        ev(
            G2,
            R3,
            t0 + 4,
            Event::VoiceJoined(VoiceJoined {
                user: carol.clone(),
                flags: VoiceFlags::default(),
                moved_from: None,
            }),
        ),
        ev(
            G1,
            R1,
            t0 + 5,
            Event::VoiceUpdated(VoiceUpdated {
                user: alice.clone(),
                flags: VoiceFlags {
                    self_mute: true,
                    ..Default::default()
                },
                changed: vec![VoiceFlag::SelfMute],
            }),
        ),
        ev(
            G1,
            R1,
            t0 + 6,
            Event::VoiceJoined(VoiceJoined {
                user: bob.clone(),
                flags: VoiceFlags::default(),
                moved_from: Some(RoomId::new(R2).unwrap()),
            }),
        ),
        ev(
            G1,
            R2,
            t0 + 7,
            Event::VoiceLeft(VoiceLeft {
                user: bob.clone(),
                moved_to: Some(RoomId::new(R1).unwrap()),
            }),
        ),
        ev(
            G1,
            R1,
            t0 + 8,
            Event::VoiceLeft(VoiceLeft {
                user: alice.clone(),
                moved_to: None,
            }),
        ),
        ev(
            G2,
            R3,
            t0 + 9,
            Event::VoiceLeft(VoiceLeft {
                user: carol,
                moved_to: None,
            }),
        ),
        ev(
            G1,
            R1,
            t0 + 10,
            Event::VoiceLeft(VoiceLeft {
                user: bob,
                moved_to: None,
            }),
        ),
        ev(
            G1,
            R1,
            t0 + 11,
            Event::RoomDeleted(RoomDeleted {
                reason: CloseReason::Idle,
            }),
        ),
    ]
}

struct Stack {
    server: NatsServer,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
}

async fn stack() -> Stack {
    let server = NatsServer::start().await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let settings = NatsSettings {
        url: server.url(),
        ..Default::default()
    };
    ensure_rooms_stream(&js, &settings)
        .await
        .expect("ROOMS stream");
    Stack { server, client, js }
}

/// Publishes like the services do (JetStream, `Nats-Msg-Id`), waiting for each ack.
async fn publish(js: &async_nats::jetstream::Context, events: &[RoomEvent]) -> Vec<u64> {
    let mut seqs = Vec::new();
    for e in events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", e.id.clone().unwrap().as_str());
        let ack = js
            .publish_with_headers(e.subject(), headers, e.encode().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
        seqs.push(ack.sequence);
    }
    seqs
}

fn opts(nats: &str) -> Options {
    Options {
        nats_url: nats.to_owned(),
        ..Options::default()
    }
}

/// Starts a live tail; returns once its subscriptions are in place.
async fn live(client: &async_nats::Client, options: Options) -> mpsc::UnboundedReceiver<Line> {
    let (tx, rx) = mpsc::unbounded_channel();
    let tail = LiveTail::start(client, &options).await.expect("live tail");
    tokio::spawn(async move { tail.run(move |line| tx.send(line).is_ok()).await });
    rx
}

/// Receives exactly `n` lines, then checks nothing else arrives for a moment.
async fn take(rx: &mut mpsc::UnboundedReceiver<Line>, n: usize) -> Vec<Line> {
    let mut lines = Vec::new();
    while lines.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(line)) => lines.push(line),
            other => panic!("expected {n} lines, got {} then {other:?}", lines.len()),
        }
    }
    // A filter that lets through too much shows up here (the scenario is fully published).
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("unexpected extra line: {}", extra.text());
    }
    lines
}

async fn replay(client: &async_nats::Client, options: Options) -> Vec<Line> {
    let mut lines = Vec::new();
    vr_tail::run(client, &options, |line| {
        lines.push(line);
        true
    })
    .await
    .expect("replay");
    lines
}

fn without_latency(lines: &[Line]) -> Vec<Line> {
    lines
        .iter()
        .cloned()
        .map(|mut l| {
            l.latency_ms = None;
            l
        })
        .collect()
}

fn summary(lines: &[Line]) -> Vec<(String, u64, Option<String>)> {
    lines
        .iter()
        .map(|l| {
            (
                l.kind.clone(),
                l.room.map(|r| r.get()).unwrap_or(0),
                l.user.as_ref().map(|u| u.username.clone()),
            )
        })
        .collect()
}

#[tokio::test]
async fn live_tail_shows_a_scripted_scenario_in_order_with_filters_and_replay_matches() {
    let s = stack().await;
    let url = s.server.url();
    let everything = opts(&url);
    let room1 = Options {
        room: Some(RoomId::new(R1).unwrap()),
        ..opts(&url)
    };
    let guild1_joins = Options {
        guild: Some(GuildId::new(G1).unwrap()),
        kinds: vec![EventKind::VoiceJoined],
        ..opts(&url)
    };
    let voice_moves = Options {
        kinds: vec![EventKind::VoiceJoined, EventKind::VoiceLeft],
        user: Some(UserId::new(902).unwrap()),
        ..opts(&url)
    };
    let guild2 = Options {
        guild: Some(GuildId::new(G2).unwrap()),
        ..opts(&url)
    };
    let filters = [everything, room1, guild1_joins, voice_moves, guild2];
    let mut tails = Vec::new();
    for f in &filters {
        tails.push(live(&s.client, f.clone()).await);
    }

    let t0 = voicerooms_contract::now_ms();
    let events = scenario(t0);
    let seqs = publish(&s.js, &events).await;

    let expected_counts = [12, 8, 3, 4, 2];
    let mut live_lines = Vec::new();
    for (rx, n) in tails.iter_mut().zip(expected_counts) {
        live_lines.push(take(rx, n).await);
    }

    // Everything, in publish order, each with its stream sequence and a plausible latency.
    let all = &live_lines[0];
    assert_eq!(all.iter().map(|l| l.seq.unwrap()).collect::<Vec<_>>(), seqs);
    for (line, event) in all.iter().zip(&events) {
        assert_eq!(line.subject, event.subject());
        assert_eq!(line.kind, event.kind().as_str());
        let latency = line.latency_ms.unwrap();
        assert!((-50..10_000).contains(&latency), "latency {latency}");
    }
    let u = |n: &str| Some(n.to_owned());
    assert_eq!(
        summary(&live_lines[1]),
        vec![
            ("room.created".into(), R1, u("alice")),
            ("room.member_added".into(), R1, u("alice")),
            ("voice.joined".into(), R1, u("alice")),
            ("voice.updated".into(), R1, u("alice")),
            ("voice.joined".into(), R1, u("bob")),
            ("voice.left".into(), R1, u("alice")),
            ("voice.left".into(), R1, u("bob")),
            ("room.deleted".into(), R1, None),
        ]
    );
    assert_eq!(
        summary(&live_lines[2]),
        vec![
            ("voice.joined".into(), R1, u("alice")),
            ("voice.joined".into(), R2, u("bob")),
            ("voice.joined".into(), R1, u("bob")),
        ]
    );
    assert_eq!(
        summary(&live_lines[3]),
        vec![
            ("voice.joined".into(), R2, u("bob")),
            ("voice.joined".into(), R1, u("bob")),
            ("voice.left".into(), R2, u("bob")),
            ("voice.left".into(), R1, u("bob")),
        ]
    );
    assert_eq!(
        summary(&live_lines[4]),
        vec![
            ("voice.joined".into(), R3, u("carol")),
            ("voice.left".into(), R3, u("carol"))
        ]
    );

    // Replaying the stream from the start prints the same lines, latency aside.
    for (filter, live) in filters.iter().zip(&live_lines) {
        let replayed = replay(
            &s.client,
            Options {
                start: Start::Sequence(1),
                ..filter.clone()
            },
        )
        .await;
        assert_eq!(
            without_latency(&replayed),
            without_latency(live),
            "filter {filter:?}"
        );
        for line in &replayed {
            let stored_after = line.latency_ms.unwrap();
            assert!((-1000..10_000).contains(&stored_after), "{stored_after}");
        }
    }

    // From a sequence in the middle: exactly the suffix.
    let from = Options {
        start: Start::Sequence(seqs[6]),
        ..opts(&url)
    };
    assert_eq!(
        without_latency(&replay(&s.client, from).await),
        without_latency(&all[6..])
    );
    // --limit stops early.
    let limited = Options {
        start: Start::Sequence(1),
        limit: Some(2),
        ..opts(&url)
    };
    assert_eq!(replay(&s.client, limited).await.len(), 2);
}

#[tokio::test]
async fn replay_from_a_time_starts_at_the_first_event_stored_after_it() {
    let s = stack().await;
    let t0 = voicerooms_contract::now_ms();
    let events = scenario(t0);
    publish(&s.js, &events[..5]).await;
    // The stream stores with its own clock; wait until it has moved past the first batch.
    let boundary = voicerooms_contract::now_ms() + 5;
    voicerooms_testkit::wait_until(
        Duration::from_secs(2),
        "the clock to pass the boundary",
        || async { voicerooms_contract::now_ms() > boundary + 5 },
    )
    .await;
    let seqs = publish(&s.js, &events[5..]).await;

    let replayed = replay(
        &s.client,
        Options {
            start: Start::Time(boundary),
            ..opts(&s.server.url())
        },
    )
    .await;
    assert_eq!(
        replayed.iter().map(|l| l.seq.unwrap()).collect::<Vec<_>>(),
        seqs
    );

    let rfc = vr_tail::timefmt::rfc3339_ms(boundary);
    let parsed = vr_tail::parse_args([
        "--since".to_owned(),
        rfc,
        "--nats".to_owned(),
        s.server.url(),
    ])
    .expect("args");
    assert_eq!(parsed.start, Start::Time(boundary));
    assert_eq!(replay(&s.client, parsed).await.len(), seqs.len());
}

#[tokio::test]
async fn a_bad_message_in_the_stream_is_skipped_and_the_tail_goes_on() {
    let s = stack().await;
    let mut rx = live(&s.client, opts(&s.server.url())).await;
    let events = scenario(voicerooms_contract::now_ms());
    publish(&s.js, &events[..1]).await;
    s.js.publish(format!("rooms.{G1}.{R1}.voice.joined"), "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A payload claiming another room than its subject.
    s.js.publish(
        format!("rooms.{G1}.{R2}.room.created"),
        events[0].encode().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    publish(&s.js, &events[1..2]).await;
    let lines = take(&mut rx, 2).await;
    assert_eq!(summary(&lines)[1].0, "room.member_added");
    let replayed = replay(
        &s.client,
        Options {
            start: Start::Sequence(1),
            ..opts(&s.server.url())
        },
    )
    .await;
    assert_eq!(without_latency(&replayed), without_latency(&lines));
}

#[tokio::test]
async fn the_binary_prints_json_lines_and_readable_lines() {
    let s = stack().await;
    let events = scenario(1_764_102_000_123);
    publish(&s.js, &events).await;
    let bin = env!("CARGO_BIN_EXE_vr-tail");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .args(["--nats", &s.server.url()])
            .env_remove("VOICEROOMS__NATS__TOKEN")
            .output()
            .expect("running vr-tail");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (status, stdout, stderr) = run(&["--json", "--since-seq", "1", "--room", &R3.to_string()]);
    assert!(status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect(l))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["kind"], "voice.joined");
    assert_eq!(lines[0]["user"]["username"], "carol");
    assert_eq!(lines[0]["room"], R3.to_string());
    assert_eq!(lines[0]["event"]["seq"], lines[0]["seq"]);
    assert_eq!(lines[0]["time"], "2025-11-25T20:20:00.127Z");

    let (status, stdout, _) = run(&["--since-seq", "1", "--kind", "room.deleted"]);
    assert!(status.success());
    let line = stdout.trim();
    assert!(
        line.starts_with(&format!(
            "2025-11-25T20:20:00.134Z rooms.{G1}.{R1}.room.deleted room.deleted room={R1} guild={G1} seq=12 latency="
        )),
        "{line}"
    );

    let (status, _, stderr) = run(&["--kind", "voice.exploded"]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("unknown event kind"), "{stderr}");
    let (status, _, stderr) = run(&["--help"]);
    assert!(status.success() && stderr.contains("--since-seq"));
}

/// `--ops` starts with every shard's last status from the gateway pool's bucket, noting the
/// shards nobody holds now (issue 15, defect 6: a tail started in steady state showed nothing).
#[tokio::test]
async fn ops_starts_with_every_shards_last_status_and_who_holds_it() {
    use voicerooms_contract::status::{pool_key, GatewayState, GatewayStatus, ShardLease};
    // Arrange: shard 0 held by gw-a (connected); shard 1's holder gw-b is gone (lease expired).
    let s = stack().await;
    let kv = voicerooms_platform::nats::ensure_kv(&s.js, "gateway_leases", 1, 1)
        .await
        .unwrap();
    let now = voicerooms_contract::now_ms();
    for (shard, instance, expires_at) in [(0u32, "gw-a", now + 60_000), (1, "gw-b", now - 12_000)] {
        let status = GatewayStatus {
            v: 1,
            shard,
            shard_count: 2,
            state: GatewayState::Connected,
            attempts: 0,
            resumable: true,
            instance: instance.into(),
            at: now - 20_000,
            detail: None,
        };
        kv.put(pool_key::status(shard, 2), status.encode().into())
            .await
            .unwrap();
        let lease = ShardLease {
            holder: instance.into(),
            expires_at,
        };
        kv.put(
            pool_key::lease(shard, 2),
            serde_json::to_vec(&lease).unwrap().into(),
        )
        .await
        .unwrap();
    }

    // Act
    let mut rx = live(
        &s.client,
        Options {
            ops: true,
            ..opts(&s.server.url())
        },
    )
    .await;
    let lines = take(&mut rx, 2).await;

    // Assert
    let shards: Vec<(u64, Option<String>)> = lines
        .iter()
        .map(|l| (l.event["shard"].as_u64().unwrap(), l.note.clone()))
        .collect();
    assert_eq!(
        shards,
        vec![
            (0, None),
            (1, Some("no holder: lease expired 12 s ago".into()))
        ]
    );
    assert!(
        lines[1].text().contains("note=\"no holder"),
        "{}",
        lines[1].text()
    );
}
