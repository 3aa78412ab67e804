//! The scale-out story on one machine, over the real binaries:
//! 3 `nats-server` nodes clustered on loopback (JetStream, ROOMS and buckets R3), the Discord
//! simulator, 2 gateway-listeners (leader + standby), 2 room-managers, 2 edges, players in
//! voice and watching over WebSockets on both edges; then, one at a time and with load running,
//! kill one NATS node, the leader gateway-listener, one room-manager and one edge.
//!
//! Checked at the end: every voice change made in the simulator is in the stream exactly once
//! (none lost, none duplicated); every watcher saw exactly its room's stored events, in order
//! (watchers of the killed edge reconnect to the other one with `since`); no room has more
//! members than its capacity; every Discord channel and role the bot created belongs to a live
//! room. The figures are printed (`SCALEOUT …` lines) and recorded in docs/SCALEOUT.md.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use discord_sim::{seed, SimConfig, Simulator};
use futures::StreamExt;
use ops_e2e::{bin, service_env, sign_in, wait_ready, NatsCluster, Player, Service};
use serde::de::DeserializeOwned;
use serde::Serialize;
use voicerooms_contract::command::{decode_reply, CreateRoom, Created, JoinRoom, Joined};
use voicerooms_contract::status::{GatewayState, GatewayStatus};
use voicerooms_contract::subject::{self, CommandKind, ROOMS_STREAM};
use voicerooms_contract::{ApiError, EventKind, GuildId, RoomEvent, RoomId, UserId, UserRef};
use voicerooms_platform::settings::NatsSettings;
use voicerooms_testkit::{free_port, wait_until};

const GUILD: u64 = seed::GUILD_ID;
const INVITE_SECRET: &str = "scaleout-invite-secret-0123456789abcdef";

fn user(id: u64, name: &str) -> UserRef {
    UserRef {
        id: UserId::new(id).unwrap(),
        username: name.into(),
        global_name: None,
        avatar: None,
    }
}

async fn request<C: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    kind: CommandKind,
    cmd: &C,
) -> Result<R, ApiError> {
    let body = serde_json::to_vec(cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(kind.subject(), body.clone().into()),
        )
        .await;
        match attempt {
            Ok(Ok(reply)) => return decode_reply::<R>(&reply.payload),
            // No responder for a moment (a replica just died), or NATS failing over: retry.
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("request {} failed: {other:?}", kind.as_str()),
        }
    }
}

/// What one watcher received, with the ports it used.
#[derive(Default)]
struct Seen {
    subscribed: bool,
    last_error: String,
    events: Vec<(u64, String)>,
    reconnects: Vec<Duration>,
    latencies_ms: Vec<i64>,
    /// Resubscriptions answered `recovered: false` with a fresh snapshot at `seq`: (the
    /// `since` asked, the snapshot's seq). Events up to the snapshot are in its state.
    snapshots: Vec<(u64, u64)>,
}

/// A watcher: follows one room over WebSocket; on a lost socket, reconnects to the other edges
/// with `since` = the last sequence it got.
fn watch(room: u64, cookie: String, ports: Vec<u16>, first: usize, seen: Arc<Mutex<Seen>>) {
    tokio::spawn(async move {
        let mut index = first;
        let mut since: Option<u64> = None;
        let mut epoch: Option<String> = None;
        let mut lost_at: Option<Instant> = None;
        loop {
            let port = ports[index % ports.len()];
            let mut player = match Player::connect(port, &cookie).await {
                Ok(p) => p,
                Err(_) => {
                    index += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match player.subscribe(room, since, epoch.as_deref()).await {
                Ok(ack) if ack["event"] == "subscribed" => {
                    epoch = ack["payload"]["epoch"].as_str().map(str::to_owned);
                    let mut s = seen.lock().unwrap();
                    s.subscribed = true;
                    let recovered = ack["payload"]["recovered"].as_bool().unwrap_or(false);
                    if let (Some(asked), false) = (since, recovered) {
                        // As a client does: replace the state with the snapshot; the events
                        // after its seq follow (again, when we had some of them).
                        let at = ack["payload"]["seq"].as_u64().unwrap_or(0);
                        s.events.retain(|(seq, _)| *seq <= at);
                        s.snapshots.push((asked, at));
                    }
                }
                other => {
                    seen.lock().unwrap().last_error = format!("{other:?}");
                    index += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            if let Some(at) = lost_at.take() {
                seen.lock().unwrap().reconnects.push(at.elapsed());
            }
            loop {
                match player.next(Duration::from_secs(3600)).await {
                    Ok(frame) if frame["type"] == "event" => {
                        let seq = frame["seq"].as_u64().unwrap_or(0);
                        let kind = frame["event"].as_str().unwrap_or_default().to_owned();
                        let received_at = frame["received_at"].as_i64().unwrap_or(0);
                        let mut s = seen.lock().unwrap();
                        s.latencies_ms
                            .push(voicerooms_contract::now_ms() as i64 - received_at);
                        s.events.push((seq, kind));
                        since = Some(seq);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        lost_at = Some(Instant::now());
                        index += 1;
                        break;
                    }
                }
            }
        }
    });
}

/// The stored events of one room, in order (retrying while the cluster elects leaders).
async fn stored(js: &jetstream::Context, room: u64) -> Vec<(u64, RoomEvent)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match try_stored(js, room).await {
            Ok(events) => return events,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reading room {room} from ROOMS: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("reading room {room} from ROOMS: {e}"),
        }
    }
}

async fn try_stored(js: &jetstream::Context, room: u64) -> anyhow::Result<Vec<(u64, RoomEvent)>> {
    let stream = js.get_stream(ROOMS_STREAM).await?;
    let filter = subject::filter::room(GuildId::new(GUILD).unwrap(), RoomId::new(room).unwrap());
    let Ok(last) = stream.get_last_raw_message_by_subject(&filter).await else {
        return Ok(Vec::new());
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("replay ended"))??;
        let seq = m
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        out.push((seq, RoomEvent::decode_on(&m.subject, &m.payload)?));
        if seq >= last.sequence {
            return Ok(out);
        }
    }
}

fn percentile(values: &mut [i64], p: f64) -> i64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p).round() as usize]
}

// ~1.5-2 min of both cores; part of `scripts/test` (the cluster runs nats-server 2.10+, see
// `ops_e2e::CLUSTER_NATS_VAR`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_system_survives_losing_one_of_everything_without_losing_an_event() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let client = cluster.client().await;
    let js = jetstream::new(client.clone());
    let nats_settings = NatsSettings {
        url: urls.clone(),
        replicas: 3,
        ..Default::default()
    };
    cluster.create_rooms_stream(&js, &nats_settings).await;
    let info = js
        .get_stream(ROOMS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "ROOMS is R3");

    // The simulator keeps 1,024 dispatches per session for RESUME by default; at this load
    // (≈ 100 voice changes/s) that is 10 s, less than a leader's unacknowledged backlog after the
    // node loss plus the lease TTL on a busy machine. Discord documents no count (its sessions
    // stay resumable for a while), so the run allows 20,000 (≈ 200 s): the standby resumes.
    let sim = Simulator::start(SimConfig {
        replay_buffer: 20_000,
        ..SimConfig::for_tests()
    })
    .await
    .expect("simulator");

    // Gateway status from the start: which gateway-listener leads (says connected).
    let statuses: Arc<Mutex<Vec<(Instant, GatewayStatus)>>> = Arc::default();
    {
        let mut sub = client
            .subscribe(subject::filter::gateway_status())
            .await
            .unwrap();
        let statuses = statuses.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok(s) = GatewayStatus::decode(&m.payload) {
                    statuses.lock().unwrap().push((Instant::now(), s));
                }
            }
        });
    }
    // Services.
    let common = |port: u16, name: &str| {
        let mut env = service_env(&urls, port, name);
        env.push(("VOICEROOMS__NATS__REPLICAS", "3".into()));
        env.push(("VOICEROOMS__DISCORD__TOKEN", "sim-bot-token".into()));
        env.push(("VOICEROOMS__DISCORD__API_BASE", sim.api_url()));
        env.push(("VOICEROOMS__INVITES__SECRET", INVITE_SECRET.into()));
        env.push(("VOICEROOMS__GATEWAY__URL", sim.gateway_url().to_string()));
        env.push(("VOICEROOMS__LOG__LEVEL", "info".into()));
        env
    };
    let mut gateways = Vec::new();
    for name in ["gl-a", "gl-b"] {
        let port = free_port();
        gateways.push((
            name,
            port,
            Some(Service::spawn(
                bin("gateway-listener").to_str().unwrap(),
                &common(port, name),
            )),
        ));
    }
    let mut managers = Vec::new();
    for name in ["rm-a", "rm-b"] {
        let port = free_port();
        managers.push((
            name,
            port,
            Some(Service::spawn(
                bin("room-manager").to_str().unwrap(),
                &common(port, name),
            )),
        ));
    }
    let mut edges = Vec::new();
    for name in ["edge-a", "edge-b"] {
        let port = free_port();
        edges.push((
            name,
            port,
            Some(Service::spawn(
                bin("edge").to_str().unwrap(),
                &common(port, name),
            )),
        ));
    }
    for (name, port, _) in managers.iter().chain(edges.iter()) {
        wait_ready(*port, name, Duration::from_secs(60)).await;
    }

    let connected_instance = |since: Instant| {
        statuses
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(at, s)| *at >= since && s.state == GatewayState::Connected)
            .map(|(_, s)| s.instance.clone())
    };
    let t0 = Instant::now() - Duration::from_secs(3600);
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected_instance(t0).is_none() {
        if Instant::now() > deadline {
            for (name, _, p) in &gateways {
                eprintln!(
                    "--- {name}\n{}",
                    p.as_ref().map(|p| p.output()).unwrap_or_default()
                );
            }
            panic!("no gateway-listener connected within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = connected_instance(t0).unwrap();
    println!(
        "SCALEOUT stack up in {:?}; gateway leader {leader}",
        started.elapsed()
    );

    // Rooms, one per owner; owners watch their room from both edges.
    let owners: Vec<UserRef> = (0..4)
        .map(|i| user(seed::USERS[i].0, seed::USERS[i].1))
        .collect();
    let mut rooms = Vec::new();
    for (i, owner) in owners.iter().enumerate() {
        let created: Created = request(
            &client,
            CommandKind::Create,
            &CreateRoom {
                requester: owner.clone(),
                guild: GuildId::new(GUILD).unwrap(),
                name: format!("scale room {i}"),
                idempotency_key: None,
            },
        )
        .await
        .expect("create room");
        rooms.push(created);
    }
    let edge_ports: Vec<u16> = edges.iter().map(|(_, p, _)| *p).collect();
    let mut watchers = Vec::new();
    for (i, created) in rooms.iter().enumerate() {
        let cookie = sign_in(&js, &owners[i], 3).await;
        for first in 0..2 {
            let seen: Arc<Mutex<Seen>> = Arc::default();
            watch(
                created.room.id.get(),
                cookie.clone(),
                edge_ports.clone(),
                first,
                seen.clone(),
            );
            watchers.push((created.room.id.get(), first, seen));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !watchers
        .iter()
        .all(|(_, _, s)| s.lock().unwrap().subscribed)
    {
        if Instant::now() > deadline {
            for (room, first, s) in &watchers {
                eprintln!("watcher {room}/{first}: {}", s.lock().unwrap().last_error);
            }
            panic!("watchers not subscribed within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load: each owner toggles voice in their room; every toggle is one expected event.
    let toggles: Arc<Mutex<BTreeMap<u64, Vec<EventKind>>>> = Arc::default();
    let stop = tokio_util_like_stop();
    let load = {
        let sim = sim.clone();
        let toggles = toggles.clone();
        let rooms: Vec<(u64, u64)> = rooms
            .iter()
            .zip(&owners)
            .map(|(r, o)| (r.room.id.get(), o.id.get()))
            .collect();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut in_voice = BTreeSet::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for (room, owner) in &rooms {
                    let kind = if in_voice.remove(owner) {
                        sim.disconnect_voice(*owner).expect("disconnect");
                        EventKind::VoiceLeft
                    } else {
                        sim.connect_voice(*owner, *room).expect("connect");
                        in_voice.insert(*owner);
                        EventKind::VoiceJoined
                    };
                    toggles.lock().unwrap().entry(*room).or_default().push(kind);
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            // Leave voice so the end state is quiet.
            for (room, owner) in &rooms {
                if in_voice.remove(owner) {
                    sim.disconnect_voice(*owner).expect("disconnect");
                    toggles
                        .lock()
                        .unwrap()
                        .entry(*room)
                        .or_default()
                        .push(EventKind::VoiceLeft);
                    n += 1;
                }
            }
            n
        })
    };
    let phases: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let phase = |what: &str| {
        phases
            .lock()
            .unwrap()
            .push((what.to_owned(), voicerooms_contract::now_ms()));
        println!("SCALEOUT {:>7.1}s {what}", started.elapsed().as_secs_f64())
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. One NATS node.
    phase("kill NATS node n0");
    cluster.kill(0);
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 2. The leader gateway-listener.
    let killed_at = Instant::now();
    phase(&format!("kill leader gateway-listener {leader}"));
    for g in gateways.iter_mut().filter(|g| g.0 == leader) {
        g.2.take();
    }
    wait_until(
        Duration::from_secs(30),
        "the standby gateway-listener to take over",
        || async { connected_instance(killed_at).is_some_and(|i| i != leader) },
    )
    .await;
    let takeover = killed_at.elapsed();
    phase(&format!("standby connected after {takeover:?}"));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 3. One room-manager, while players join rooms by invite (capacity 4 each).
    phase("kill room-manager rm-a");
    managers[0].2.take();
    let mut joiners = Vec::new();
    for i in 0..6u64 {
        let id = sim.create_user(&format!("joiner{i}")).unwrap();
        sim.add_member(GUILD, id, &[]).unwrap();
        joiners.push(user(id, &format!("joiner{i}")));
    }
    let mut joins = Vec::new();
    for j in &joiners {
        let client = client.clone();
        let invite = rooms[0].invite.token.clone();
        let j = j.clone();
        joins.push(tokio::spawn(async move {
            request::<_, Joined>(
                &client,
                CommandKind::Join,
                &JoinRoom {
                    requester: j,
                    invite,
                    room: None,
                },
            )
            .await
        }));
    }
    let mut join_ok = 0;
    let mut join_full = 0;
    let mut ok_but_not_member = 0;
    for (j, joiner) in joins.into_iter().zip(&joiners) {
        match j.await.unwrap() {
            Ok(joined) => {
                join_ok += 1;
                if !joined.room.members.iter().any(|m| m.user.id == joiner.id) {
                    ok_but_not_member += 1;
                }
                assert!(
                    joined.room.members.len() <= joined.room.capacity as usize,
                    "join reply shows an overbooked room"
                );
            }
            Err(e) if e.code.as_str() == "room_full" => join_full += 1,
            Err(e) => panic!("join failed unexpectedly: {e:?}"),
        }
    }
    phase(&format!(
        "joins with one room-manager: {join_ok} accepted, {join_full} room_full"
    ));

    // 4. One edge: its watchers move to the other with `since`.
    phase("kill edge edge-a");
    edges[0].2.take();
    tokio::time::sleep(Duration::from_secs(3)).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let total_toggles = load.await.unwrap();
    phase(&format!("load stopped after {total_toggles} voice changes"));

    // Every voice change is stored once, in order, per room.
    let expected = toggles.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut counts = Vec::new();
        for (room, kinds) in &expected {
            let voice = stored(&js, *room)
                .await
                .iter()
                .filter(|(_, e)| matches!(e.kind(), EventKind::VoiceJoined | EventKind::VoiceLeft))
                .count();
            counts.push((*room, kinds.len(), voice));
        }
        if counts.iter().all(|(_, want, got)| got >= want) {
            break;
        }
        if Instant::now() > deadline {
            for (name, _, p) in &gateways {
                if let Some(p) = p {
                    let out = p.output();
                    let lines: Vec<&str> = out.lines().collect();
                    let notable: Vec<&str> = lines
                        .iter()
                        .copied()
                        .filter(|l| !l.contains("\"voice state\""))
                        .collect();
                    let notable = notable[notable.len().saturating_sub(80)..].join("\n");
                    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
                    eprintln!("--- {name} (last 80 lines but voice states)\n{notable}\n--- {name} (last 10 lines)\n{tail}");
                }
            }
            panic!("voice changes not all stored after 120 s: (room, made, stored) {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stored_total = 0;
    let mut violations: Vec<String> = Vec::new();
    for (room, kinds) in &expected {
        let events = stored(&js, *room).await;
        let voice: Vec<EventKind> = events
            .iter()
            .map(|(_, e)| e.kind())
            .filter(|k| matches!(k, EventKind::VoiceJoined | EventKind::VoiceLeft))
            .collect();
        assert_eq!(&voice, kinds, "room {room}: stored voice events = the simulator's changes (none lost, none duplicated)");
        stored_total += events.len();
        let ids: Vec<_> = events.iter().filter_map(|(_, e)| e.id.clone()).collect();
        assert_eq!(
            ids.len(),
            ids.iter().collect::<BTreeSet<_>>().len(),
            "room {room}: no event id twice"
        );
        // Every watcher of the room got exactly the stored events after its start, in order.
        let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
        for (r, first, seen) in watchers.iter().filter(|(r, _, _)| r == room) {
            let wanted_last = *seqs.last().unwrap();
            wait_until(Duration::from_secs(20), "watchers caught up", || async {
                seen.lock().unwrap().events.last().map(|(s, _)| *s) == Some(wanted_last)
            })
            .await;
            let got: Vec<u64> = seen
                .lock()
                .unwrap()
                .events
                .iter()
                .map(|(s, _)| *s)
                .collect();
            let start = seqs
                .iter()
                .position(|s| *s == got[0])
                .expect("first seq is stored");
            let got_set: BTreeSet<u64> = got.iter().copied().collect();
            let snapshots = seen.lock().unwrap().snapshots.clone();
            let in_snapshot = |seq: u64| snapshots.iter().any(|(a, at)| *a < seq && seq <= *at);
            let missing: Vec<(u64, u64)> = events[start..]
                .iter()
                .filter(|(s, _)| !got_set.contains(s) && !in_snapshot(*s))
                .map(|(s, e)| (*s, e.received_at))
                .collect();
            if !missing.is_empty() || got.len() != got_set.len() {
                println!(
                    "SCALEOUT LOSS room {r} watcher {first}: missing (seq, received_at) {missing:?}; duplicates {}; phases {:?}",
                    got.len() - got_set.len(),
                    phases.lock().unwrap()
                );
            }
            let wanted: Vec<u64> = seqs[start..]
                .iter()
                .copied()
                .filter(|s| got_set.contains(s) || !in_snapshot(*s))
                .collect();
            if !snapshots.is_empty() {
                println!(
                    "SCALEOUT room {r} watcher {first}: fresh snapshots (since, seq) {snapshots:?}"
                );
            }
            if got != wanted {
                violations.push(format!(
                    "room {r} watcher {first}: {} of {} stored events missing, {} duplicated",
                    missing.len(),
                    seqs.len() - start,
                    got.len() - got_set.len()
                ));
            }
        }
    }

    // No room overbooked.
    let kv = js.get_key_value("rooms").await.unwrap();
    for created in &rooms {
        let entry = kv
            .get(created.room.id.get().to_string())
            .await
            .unwrap()
            .expect("room state");
        let view: voicerooms_contract::command::RoomView = serde_json::from_slice(&entry).unwrap();
        println!(
            "SCALEOUT room {} members {} capacity {}",
            view.id,
            view.members.len(),
            view.capacity
        );
        assert!(
            view.members.len() <= view.capacity as usize,
            "room {} overbooked: {}",
            view.id,
            view.members.len()
        );
    }
    let room0 = kv
        .get(rooms[0].room.id.get().to_string())
        .await
        .unwrap()
        .unwrap();
    let room0: voicerooms_contract::command::RoomView = serde_json::from_slice(&room0).unwrap();
    let joined_members = room0
        .members
        .iter()
        .filter(|m| joiners.iter().any(|j| j.id == m.user.id))
        .count();
    assert!(
        joined_members <= 3,
        "room 0 (owner + capacity 4) took {joined_members} joiners"
    );
    // Every accepted join is a member: no join acknowledged and then lost.
    assert_eq!(
        ok_but_not_member, 0,
        "{ok_but_not_member} joins answered ok whose reply does not list the joiner"
    );
    assert_eq!(
        join_ok, joined_members,
        "accepted joins ({join_ok}) = joiners in the room ({joined_members})"
    );

    // No orphaned Discord object: every channel/role the bot made belongs to a live room.
    let snapshot = sim.snapshot();
    let room_channels: BTreeSet<String> = rooms.iter().map(|r| r.room.id.to_string()).collect();
    let room_roles: BTreeSet<String> = rooms.iter().map(|r| r.room.role.to_string()).collect();
    let text = snapshot.to_string();
    for c in &room_channels {
        assert!(text.contains(c.as_str()), "room channel {c} exists");
    }
    let guild = snapshot["guilds"]
        .as_array()
        .and_then(|g| {
            g.iter()
                .find(|g| g["id"].as_str() == Some(&GUILD.to_string()))
        })
        .cloned()
        .expect("the guild in the simulator's snapshot");
    let seeded_channels: BTreeSet<String> = [
        seed::LOBBY_CHANNEL_ID,
        seed::GAMING_CHANNEL_ID,
        seed::TEXT_CHANNEL_ID,
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let channels = guild["channels"].as_array().expect("channels");
    assert_eq!(
        channels.len(),
        seeded_channels.len() + rooms.len(),
        "channels: {channels:?}"
    );
    for c in channels {
        let id = c["id"].as_str().unwrap_or_default().to_owned();
        assert!(
            room_channels.contains(&id) || seeded_channels.contains(&id),
            "orphaned channel {c}"
        );
    }
    let seeded_roles: BTreeSet<String> = [GUILD, seed::BOT_ROLE_ID]
        .iter()
        .map(|r| r.to_string())
        .collect();
    let roles = guild["roles"].as_array().expect("roles");
    for r in roles {
        let id = r["id"].as_str().unwrap_or_default().to_owned();
        assert!(
            room_roles.contains(&id) || seeded_roles.contains(&id),
            "orphaned role {r}"
        );
    }
    assert_eq!(
        roles.len(),
        seeded_roles.len() + rooms.len(),
        "roles: {roles:?}"
    );

    // Figures.
    let mut latencies: Vec<i64> = watchers
        .iter()
        .flat_map(|(_, _, s)| s.lock().unwrap().latencies_ms.clone())
        .collect();
    let reconnects: Vec<Duration> = watchers
        .iter()
        .flat_map(|(_, _, s)| s.lock().unwrap().reconnects.clone())
        .collect();
    let delivered: usize = watchers
        .iter()
        .map(|(_, _, s)| s.lock().unwrap().events.len())
        .sum();
    println!("SCALEOUT voice changes {total_toggles}, events stored {stored_total}, frames delivered {delivered} to {} watchers", watchers.len());
    println!(
        "SCALEOUT delivery latency (received_at to watcher) p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.95),
        percentile(&mut latencies, 0.99),
        latencies.last().copied().unwrap_or(0)
    );
    let sessions: Vec<String> = sim
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            discord_sim::SimEventKind::Identify { .. } => Some("identify".to_owned()),
            discord_sim::SimEventKind::Resume { replayed, .. } => {
                Some(format!("resume (replayed {replayed})"))
            }
            discord_sim::SimEventKind::InvalidSession { resumable, .. } => {
                Some(format!("invalid session (resumable {resumable})"))
            }
            _ => None,
        })
        .collect();
    println!("SCALEOUT gateway takeover {takeover:?}; watcher reconnects {reconnects:?}");
    println!("SCALEOUT gateway sessions: {}", sessions.join(", "));
    println!(
        "SCALEOUT joins into a room of capacity 4 (owner + 6 players, one room-manager dead): {join_ok} ok, {join_full} room_full, {joined_members} members added, {ok_but_not_member} ok replies whose room does not list the joiner"
    );
    println!("SCALEOUT total {:?}", started.elapsed());
    assert!(
        violations.is_empty(),
        "watchers did not get every stored event exactly once: {violations:#?}"
    );
    cluster.restart(0).await;
}

fn tokio_util_like_stop() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}
