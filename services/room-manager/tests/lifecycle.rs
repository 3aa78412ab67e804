//! Capacity across replicas, voice placement, idle cleanup and crash recovery.

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

use std::collections::HashSet;
use std::time::{Duration, Instant};

use discord_sim::{seed, RestFault, RestFaultKind};
use room_manager::settings::RoomsSettings;
use room_manager::store::{owner_key, OwnerIndex};
use support::*;
use voicerooms_contract::command::{CreateRoom, JoinRoom, Joined, Placement, RoomState};
use voicerooms_contract::event::{CloseReason, Event, VoiceFlags, VoiceJoined};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::{ErrorCode, EventKind, GuildId, RoomId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_joins_through_two_replicas_never_overbook_a_room_in_a_hundred_rounds() {
    let env = Env::start_with(2, quiet_rooms(), false, 10_000).await;
    let owner = seeded(0);
    let players: Vec<_> = (0..50)
        .map(|i| {
            let id = env.sim.create_user(&format!("player{i}")).unwrap();
            env.sim.add_member(GUILD, id, &[]).unwrap();
            user(id, &format!("player{i}"))
        })
        .collect();
    let started = Instant::now();
    for round in 0..100 {
        let created = env
            .create(&owner, &format!("round {round}"))
            .await
            .expect("create");
        let mut joins = Vec::new();
        for p in &players {
            let client = env.client.clone();
            let cmd = JoinRoom {
                requester: p.clone(),
                invite: created.invite.token.clone(),
                room: None,
            };
            joins.push(tokio::spawn(async move {
                request::<_, Joined>(&client, CommandKind::Join, &cmd).await
            }));
        }
        let (mut ok, mut full) = (0, 0);
        for j in joins {
            match j.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) if e.code == ErrorCode::RoomFull => full += 1,
                Err(e) => panic!("round {round}: unexpected {e}"),
            }
        }
        assert_eq!((ok, full), (3, 47), "round {round}: owner + 3 = capacity 4");
        let (rec, _) = env.replicas[0]
            .app_core
            .record(created.room.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.view.members.len(), 4, "round {round}");
        let ids: HashSet<_> = rec.view.members.iter().map(|m| m.user.id).collect();
        assert_eq!(ids.len(), 4, "no duplicate members");
        let holders = players
            .iter()
            .filter(|p| {
                env.sim
                    .member_roles(GUILD, p.id.get())
                    .contains(&created.room.role.get())
            })
            .count();
        assert_eq!(
            holders, 3,
            "round {round}: only admitted players got the role"
        );
        env.close(&owner, created.room.id).await.expect("close");
    }
    println!(
        "100 rounds of 50 joins through 2 replicas in {:?}",
        started.elapsed()
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_in_voice_is_moved_and_one_not_in_voice_is_moved_when_they_connect() {
    let env = Env::start(2, quiet_rooms(), false).await;
    let (alice, bob, carol) = (seeded(0), seeded(1), seeded(2));
    let created = env.create(&alice, "placement").await.unwrap();
    let room = created.room.id;
    assert!(
        matches!(created.placement, Placement::Pending { .. }),
        "alice is not in voice"
    );
    env.voice_connect(&bob, seed::GAMING_CHANNEL_ID).await;

    let t = Instant::now();
    let joined = env.join(&bob, &created.invite.token).await.unwrap();
    let moved_in = t.elapsed();

    assert_eq!(
        joined.placement,
        Placement::Moved {
            channel: room.cast()
        }
    );
    assert_eq!(
        env.sim.voice_channel_of(bob.id.get()).map(|(_, c)| c),
        Some(room.get())
    );
    assert!(
        moved_in < Duration::from_secs(2),
        "SC-005: placed in {moved_in:?}"
    );

    let joined = env.join(&carol, &created.invite.token).await.unwrap();
    let Placement::Pending {
        channel_url,
        expires_at,
        ..
    } = joined.placement
    else {
        panic!("carol is not in voice: {:?}", joined.placement)
    };
    assert!(channel_url.ends_with(&format!("/{GUILD}/{room}")));
    assert!(expires_at > voicerooms_contract::now_ms());
    // Carol connects to the Lobby; the gateway reports it; room-manager moves her.
    let t = Instant::now();
    env.voice_connect(&carol, seed::LOBBY_CHANNEL_ID).await;
    eventually("carol moved into the room", || async {
        env.sim.voice_channel_of(carol.id.get()).map(|(_, c)| c) == Some(room.get())
    })
    .await;
    let fired_in = t.elapsed();
    println!("placement: moved in {moved_in:?}; pending move fired {fired_in:?} after connecting");
    assert!(
        fired_in < Duration::from_secs(2),
        "pending move fired in {fired_in:?}"
    );
    // The move fired once: a second connect elsewhere does not pull her back (once that join
    // has been applied, nothing is left to fire).
    let applied = || {
        env.replicas
            .iter()
            .map(|r| {
                r.app_core
                    .metrics
                    .events_applied
                    .get_or_create(&vec![("kind".into(), "voice.joined".into())])
                    .get()
            })
            .sum::<u64>()
    };
    let before = applied();
    env.voice_connect(&carol, seed::GAMING_CHANNEL_ID).await;
    eventually("the second join applied", || async { applied() > before }).await;
    assert_eq!(
        env.sim.voice_channel_of(carol.id.get()).map(|(_, c)| c),
        Some(seed::GAMING_CHANNEL_ID)
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_room_is_warned_a_voice_join_cancels_and_a_second_idle_spell_deletes_it() {
    let rooms = RoomsSettings {
        idle_timeout_ms: 400,
        cleanup_interval_ms: 100,
        closing_warning_ms: 700,
        ..quiet_rooms()
    };
    let env = Env::start(2, rooms, false).await;
    let alice = seeded(0);
    let created = env.create(&alice, "idle").await.unwrap();
    let room = created.room.id;

    let closing = env
        .wait_for_event(room, EventKind::RoomClosing, "room.closing")
        .await;
    let Event::RoomClosing(c) = &closing.event else {
        unreachable!()
    };
    assert_eq!(c.reason, CloseReason::Idle);
    // Someone joins voice during the warning.
    env.voice_connect(&alice, room.get()).await;
    env.wait_for_event(
        room,
        EventKind::RoomClosingCancelled,
        "room.closing_cancelled",
    )
    .await;
    let (rec, _) = env.replicas[0]
        .app_core
        .record(room)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.view.state, RoomState::Open);
    assert_eq!(rec.view.voice.len(), 1);
    assert!(rec.view.voice[0].member);
    // Past the old deadline (and two more cleanup scans on each replica) the room still exists.
    voicerooms_testkit::wait_until(
        Duration::from_secs(10),
        "the old deadline passed",
        || async { voicerooms_contract::now_ms() > c.deadline + 100 },
    )
    .await;
    for r in &env.replicas {
        let scans = r.app_core.metrics.cleanup_scans.get();
        eventually("two more cleanup scans", || async {
            r.app_core.metrics.cleanup_scans.get() >= scans + 2
        })
        .await;
    }
    assert!(
        get_channel(&env.sim, room.get()).await.is_some(),
        "cancelled: not deleted"
    );
    assert!(env.events_of(room, EventKind::RoomDeleted).await.is_empty());

    // Alice leaves; the room idles again and is deleted after the warning.
    env.voice_disconnect(&alice).await;
    let deleted = env
        .wait_for_event(room, EventKind::RoomDeleted, "room.deleted")
        .await;
    assert!(matches!(deleted.event, Event::RoomDeleted(ref d) if d.reason == CloseReason::Idle));
    assert_eq!(env.events_of(room, EventKind::RoomClosing).await.len(), 2);
    assert_eq!(
        env.events_of(room, EventKind::RoomDeleted).await.len(),
        1,
        "exactly one replica deleted it"
    );
    assert!(get_channel(&env.sim, room.get()).await.is_none());
    assert!(!role_ids(&env.sim).await.contains(&created.room.role.get()));
    assert!(env.replicas[0]
        .app_core
        .record(room)
        .await
        .unwrap()
        .is_none());
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_joins_the_channel_directly_is_shown_as_not_a_member() {
    let env = Env::start(1, quiet_rooms(), false).await;
    let (alice, erin) = (seeded(0), seeded(4));
    let created = env.create(&alice, "direct").await.unwrap();
    let room = created.room.id;
    // The channel is private: erin cannot connect by herself.
    assert!(env.sim.connect_voice(erin.id.get(), room.get()).is_err());
    // A moderator drags her in; the gateway reports the join.
    env.sim.move_voice(erin.id.get(), room.get()).ok();
    env.publish(
        room.get(),
        Event::VoiceJoined(VoiceJoined {
            user: erin.clone(),
            flags: VoiceFlags::default(),
            moved_from: None,
        }),
    )
    .await;
    eventually("erin shown in voice", || async {
        let rec = env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .unwrap()
            .0;
        rec.view
            .voice
            .iter()
            .any(|o| o.user.id == erin.id && !o.member)
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_in_the_middle_of_a_create_leaves_no_orphans_after_reconciliation() {
    let nats = voicerooms_testkit::NatsServer::start().await;
    let sim = discord_sim::Simulator::start(sim_config(false))
        .await
        .unwrap();
    let client = nats.client().await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_room-manager"))
        .env("VOICEROOMS__NATS__URL", nats.url())
        .env("VOICEROOMS__HTTP__PORT", "0")
        .env("VOICEROOMS__DISCORD__API_BASE", sim.api_url())
        .env("VOICEROOMS__DISCORD__TOKEN", "sim-bot-token")
        .env("VOICEROOMS__INVITES__SECRET", SECRET)
        .env("VOICEROOMS__ROOMS__CREATE_TIMEOUT_MS", "300")
        .env("VOICEROOMS__ROOMS__GUILDS", GUILD.to_string())
        .env("VOICEROOMS__LOG__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn room-manager");
    // Its start-up reconciliation is done once it listed the channels.
    eventually("start-up reconciliation", || async {
        rest_calls(&sim)
            .iter()
            .any(|e| e.0 == "GET" && e.1.ends_with("/channels"))
    })
    .await;
    // And its command endpoints are up (a request sent before would find no responder).
    eventually("the room API answering", || async {
        client
            .request("$SRV.PING.room-manager", "".into())
            .await
            .is_ok()
    })
    .await;
    // The channel POST hangs for 2 s: the replica dies after making the role, mid-channel.
    sim.inject_rest_fault(RestFault {
        kind: RestFaultKind::Slow(Duration::from_secs(2)),
        remaining: 1,
        path_contains: Some(format!("/guilds/{GUILD}/channels")),
    })
    .unwrap();
    let cmd = CreateRoom {
        requester: seeded(0),
        guild: GuildId::new(GUILD).unwrap(),
        name: "doomed".into(),
        idempotency_key: None,
    };
    let c2 = client.clone();
    let pending = tokio::spawn(async move {
        c2.request(
            CommandKind::Create.subject(),
            serde_json::to_vec(&cmd).unwrap().into(),
        )
        .await
    });
    eventually("the role was created", || async {
        rest_calls(&sim)
            .iter()
            .any(|e| e.0 == "POST" && e.1.ends_with("/roles") && e.2 == 200)
    })
    .await;
    // The channel POST is on its way (hung) once the role is noted in the create's slot.
    let state = async_nats::jetstream::new(client.clone())
        .get_key_value(room_manager::store::STATE_BUCKET)
        .await
        .unwrap();
    eventually("the role noted in the slot", || async {
        room_manager::store::get::<OwnerIndex>(&state, &owner_key(seeded(0).id))
            .await
            .unwrap()
            .is_some_and(|(i, _)| i.creating.iter().any(|s| s.role.is_some()))
    })
    .await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    pending.abort();
    // A channel POST already sent when it died still lands (the simulator holds it 2 s from
    // its arrival): wait for it, or for those 2 s to have passed.
    let killed = Instant::now();
    voicerooms_testkit::wait_until(
        Duration::from_secs(10),
        "the hung channel POST settled",
        || async {
            killed.elapsed() > Duration::from_millis(2_500)
                || rest_calls(&sim)
                    .iter()
                    .any(|e| e.0 == "POST" && e.1.ends_with("/channels"))
        },
    )
    .await;

    let seeded_channels: HashSet<u64> = [
        seed::LOBBY_CHANNEL_ID,
        seed::GAMING_CHANNEL_ID,
        seed::TEXT_CHANNEL_ID,
    ]
    .into();
    let before = role_ids(&sim).await;
    assert!(
        before.len() > 2,
        "an orphaned role exists before reconciliation: {before:?}"
    );

    // Another replica starts: its reconciler rolls back the abandoned create.
    let replica = start_replica(settings(
        &nats.url(),
        &sim.api_url(),
        "rm-survivor",
        RoomsSettings {
            create_timeout_ms: 300,
            ..quiet_rooms()
        },
    ))
    .await;
    eventually("no orphaned role or channel", || async {
        let roles = role_ids(&sim).await;
        let channels: Vec<serde_json::Value> = reqwest::Client::new()
            .get(format!("{}/guilds/{GUILD}/channels", sim.api_url()))
            .header("Authorization", "Bot sim-bot-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let extra_channels = channels
            .iter()
            .filter_map(|c| c["id"].as_str()?.parse::<u64>().ok())
            .filter(|id| !seeded_channels.contains(id))
            .count();
        roles.len() == 2 && extra_channels == 0
    })
    .await;
    let core = replica.app_core.clone();
    let idx: Option<(OwnerIndex, u64)> =
        room_manager::store::get(&core.state, &owner_key(seeded(0).id))
            .await
            .unwrap();
    assert!(idx.is_none_or(|(i, _)| i.creating.is_empty() && i.rooms.is_empty()));
    // The user can create again.
    let created: voicerooms_contract::command::Created = request(
        &client,
        CommandKind::Create,
        &CreateRoom {
            requester: seeded(0),
            guild: GuildId::new(GUILD).unwrap(),
            name: "after the crash".into(),
            idempotency_key: None,
        },
    )
    .await
    .expect("create after recovery");
    assert_eq!(created.room.state, RoomState::Open);
    let _ = RoomId::new(1);
    replica.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_closes_a_room_whose_channel_vanished_while_nobody_listened() {
    let rooms = RoomsSettings {
        reconcile_grace_ms: 200,
        ..quiet_rooms()
    };
    let env = Env::start(1, rooms, false).await;
    let alice = seeded(0);
    let created = env.create(&alice, "vanishing").await.unwrap();
    let room = created.room.id;
    // Deleted in Discord, but no channel.deleted event reaches room-manager (gateway down).
    env.sim.delete_channel(room.get()).unwrap();
    let core = env.replicas[0].app_core.clone();
    let reconciler = room_manager::reconcile::Reconciler::default();
    // Younger than the grace period: left alone.
    let young = reconciler.pass(&core).await.expect("reconcile");
    assert_eq!(
        young.closed, 0,
        "a room younger than the grace period is never closed"
    );
    assert!(core.record(room).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(250)).await;

    let report = reconciler.pass(&core).await.expect("reconcile");

    assert_eq!(report.closed, 1, "{report:?}");
    assert_eq!(
        report.deleted, 0,
        "nothing orphaned: the room still owned its role"
    );
    let deleted = env
        .wait_for_event(room, EventKind::RoomDeleted, "room.deleted")
        .await;
    assert!(
        matches!(deleted.event, Event::RoomDeleted(ref d) if d.reason == CloseReason::ChannelDeleted)
    );
    assert!(!role_ids(&env.sim).await.contains(&created.room.role.get()));
    assert!(core.record(room).await.unwrap().is_none());
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_during_the_closing_warning_cancels_the_closing_and_the_room_stays() {
    let rooms = RoomsSettings {
        idle_timeout_ms: 1_500,
        cleanup_interval_ms: 100,
        closing_warning_ms: 1_000,
        ..quiet_rooms()
    };
    let env = Env::start_strict(2, rooms, false).await;
    let (alice, bob) = (seeded(0), seeded(1));
    let created = env.create(&alice, "warned").await.unwrap();
    let room = created.room.id;
    let closing = env
        .wait_for_event(room, EventKind::RoomClosing, "room.closing")
        .await;
    let Event::RoomClosing(warning) = &closing.event else {
        unreachable!()
    };

    // Bob opens the invite during the warning.
    let joined = env.join(&bob, &created.invite.token).await.expect("join");

    assert_eq!(
        joined.room.state,
        RoomState::Open,
        "the join cancelled the closing"
    );
    assert_eq!(joined.room.closing_deadline, None);
    let cancelled = env
        .wait_for_event(
            room,
            EventKind::RoomClosingCancelled,
            "room.closing_cancelled",
        )
        .await;
    assert!(
        matches!(cancelled.event, Event::RoomClosingCancelled(ref c) if c.by.as_ref().map(|u| u.id) == Some(bob.id))
    );
    // Past the old deadline, after the timer and two more scans on each replica, it is still
    // there (it may be warned again, being idle, but not deleted on the old deadline).
    let deadline = warning.deadline;
    voicerooms_testkit::wait_until(
        Duration::from_secs(10),
        "the old deadline passed",
        || async { voicerooms_contract::now_ms() > deadline + 100 },
    )
    .await;
    for r in &env.replicas {
        let scans = r.app_core.metrics.cleanup_scans.get();
        eventually("two more cleanup scans", || async {
            r.app_core.metrics.cleanup_scans.get() >= scans + 2
        })
        .await;
    }
    // Idle again, it may have been warned anew and even deleted since — but only after a new
    // warning, never on the cancelled one.
    let deleted = env.events_of(room, EventKind::RoomDeleted).await;
    let warned_again = env
        .events_of(room, EventKind::RoomClosing)
        .await
        .iter()
        .any(|c| matches!(&c.event, Event::RoomClosing(w) if w.deadline > deadline));
    assert!(
        deleted.is_empty() || warned_again,
        "deleted at the cancelled deadline"
    );
    if deleted.is_empty() {
        let (rec, _) = env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .unwrap();
        assert!(rec.view.members.iter().any(|m| m.user.id == bob.id));
    }
    env.shutdown().await;
}
