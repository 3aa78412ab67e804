//! room-manager against a real nats-server and the Discord simulator: create, invites, join,
//! placement, capacity across replicas, cleanup, reconciliation and Discord failures.

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

use discord_sim::{seed, RestFault, RestFaultKind, SimEventKind};
use room_manager::discord::{CONNECT, MOVE_MEMBERS, VIEW_CHANNEL};
use room_manager::invite::{InviteClaims, InviteSigner};
use support::*;
use voicerooms_contract::command::{
    CreateRoom, Invite, JoinRoom, ListMine, Placement, RoomCommand, RoomList, RoomState, RoomView,
};
use voicerooms_contract::event::{ChannelDeleted, CloseReason, Event};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::{now_ms, ErrorCode, EventKind, GuildId, RoomId};

fn overwrite(channel: &serde_json::Value, id: u64) -> &serde_json::Value {
    channel["permission_overwrites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"].as_str() == Some(id.to_string().as_str()))
        .unwrap_or_else(|| panic!("no overwrite for {id}: {channel}"))
}

fn bits(v: &serde_json::Value) -> u64 {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_a_private_channel_and_role_moves_the_creator_and_the_invite_works() {
    let env = Env::start(1, quiet_rooms(), true).await;
    let alice = seeded(0);
    let bob = seeded(1);
    env.voice_connect(&alice, seed::LOBBY_CHANNEL_ID).await;

    let created = env.create(&alice, "Friday raid").await.expect("create");

    let room = created.room.id;
    let role = created.room.role.get();
    let channel = get_channel(&env.sim, room.get())
        .await
        .expect("channel exists");
    assert_eq!(channel["type"], 2);
    assert_eq!(channel["user_limit"], 4);
    assert_eq!(channel["name"], "Friday raid");
    let everyone = overwrite(&channel, GUILD);
    assert_eq!(
        bits(&everyone["deny"]) & (VIEW_CHANNEL | CONNECT),
        VIEW_CHANNEL | CONNECT
    );
    let role_ow = overwrite(&channel, role);
    assert_eq!(
        bits(&role_ow["allow"]) & (VIEW_CHANNEL | CONNECT),
        VIEW_CHANNEL | CONNECT
    );
    let bot_ow = overwrite(&channel, env.sim.config().bot_user_id);
    assert_eq!(bot_ow["type"], 1);
    assert_ne!(bits(&bot_ow["allow"]) & MOVE_MEMBERS, 0);
    assert!(env.sim.member_roles(GUILD, alice.id.get()).contains(&role));
    assert_eq!(
        created.placement,
        Placement::Moved {
            channel: room.cast()
        }
    );
    assert_eq!(
        env.sim.voice_channel_of(alice.id.get()).map(|(_, c)| c),
        Some(room.get())
    );
    assert_eq!(created.room.state, RoomState::Open);
    assert_eq!(created.room.capacity, 4);
    env.wait_for_event(room, EventKind::RoomCreated, "room.created")
        .await;

    let joined = env.join(&bob, &created.invite.token).await.expect("join");
    assert!(env.sim.member_roles(GUILD, bob.id.get()).contains(&role));
    assert_eq!(joined.room.members.len(), 2);
    assert!(matches!(joined.placement, Placement::Pending { .. }));

    let got: RoomView = env
        .request(
            CommandKind::Get,
            &RoomCommand {
                requester: bob.clone(),
                room,
            },
        )
        .await
        .expect("get");
    assert_eq!(got.members.len(), 2);
    assert!(
        got.seq > 0,
        "the snapshot records the sequence of the last event"
    );
    let listed: RoomList = env
        .request(
            CommandKind::ListMine,
            &ListMine {
                requester: bob.clone(),
            },
        )
        .await
        .expect("list");
    assert_eq!(
        listed.rooms.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![room]
    );
    let carol = seeded(2);
    let denied = env
        .request::<_, RoomView>(
            CommandKind::Get,
            &RoomCommand {
                requester: carol,
                room,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(denied.code, ErrorCode::NotMember);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_channel_create_rolls_back_the_role_and_frees_the_slot() {
    let env = Env::start(1, quiet_rooms(), true).await;
    let alice = seeded(0);
    env.wait_startup_reconcile().await;
    let roles_before = role_ids(&env.sim).await;
    // Every channel request (the POST and the lookups after it) fails with 500 past the
    // retries.
    env.sim
        .inject_rest_fault(RestFault {
            kind: RestFaultKind::Status(500),
            remaining: 1_000,
            path_contains: Some(format!("/guilds/{GUILD}/channels")),
        })
        .unwrap();

    let err = env.create(&alice, "doomed").await.unwrap_err();

    assert_eq!(err.code, ErrorCode::DiscordUnavailable);
    env.sim.clear_faults();
    // Whether the channel was made is unknown (a 5xx): the role is kept until the lost
    // answer has settled (request_timeout_ms), then removed with anything it names.
    eventually("the role was rolled back", || async {
        role_ids(&env.sim).await == roles_before
    })
    .await;
    // The slot is free again: three more creates fit (max_per_user = 3).
    for i in 0..3 {
        env.create(&alice, &format!("ok {i}"))
            .await
            .expect("create after rollback");
    }
    let over = env.create(&alice, "one too many").await.unwrap_err();
    assert_eq!(over.code, ErrorCode::RoomLimitReached);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_by_one_user_with_one_key_make_one_room() {
    let env = Env::start(2, quiet_rooms(), false).await;
    let alice = seeded(0);
    let cmd = CreateRoom {
        requester: alice.clone(),
        guild: GuildId::new(GUILD).unwrap(),
        name: "once".into(),
        idempotency_key: Some("key-1".into()),
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = env.client.clone();
        let cmd = cmd.clone();
        tasks.push(tokio::spawn(async move {
            request::<_, voicerooms_contract::command::Created>(&client, CommandKind::Create, &cmd)
                .await
        }));
    }
    let mut rooms = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => rooms.push(c.room.id),
            Err(e) => assert_eq!(e.code, ErrorCode::Conflict, "{e}"),
        }
    }
    // A retry after the first finished returns the same room.
    let again: voicerooms_contract::command::Created = env
        .request(CommandKind::Create, &cmd)
        .await
        .expect("repeat");
    rooms.push(again.room.id);
    rooms.dedup();
    assert_eq!(rooms.len(), 1, "one room for one key: {rooms:?}");
    let mine: RoomList = env
        .request(CommandKind::ListMine, &ListMine { requester: alice })
        .await
        .unwrap();
    assert_eq!(mine.rooms.len(), 1);
    env.shutdown().await;
}

fn signer() -> InviteSigner {
    InviteSigner::new(SECRET.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_invites_are_refused_each_with_its_own_code() {
    let env = Env::start(1, quiet_rooms(), false).await;
    let alice = seeded(0);
    let bob = seeded(1);
    let a = env.create(&alice, "A").await.expect("create A");
    let b = env.create(&alice, "B").await.expect("create B");
    let claims: InviteClaims = {
        // Decode the real token's claims by re-verifying with the shared secret.
        signer().verify(&a.invite.token).expect("valid")
    };
    let now = now_ms() / 1000;

    let expired = signer()
        .sign(&InviteClaims {
            iat: now - 100,
            exp: now - 10,
            ..claims.clone()
        })
        .unwrap();
    assert_eq!(
        env.join(&bob, &expired).await.unwrap_err().code,
        ErrorCode::InviteExpired
    );

    let mut parts: Vec<String> = a.invite.token.split('.').map(str::to_owned).collect();
    // Change one character of the claims: the signature no longer matches.
    let mut payload: Vec<char> = parts[1].chars().collect();
    payload[10] = if payload[10] == 'A' { 'B' } else { 'A' };
    parts[1] = payload.into_iter().collect();
    let tampered = parts.join(".");
    assert_eq!(
        env.join(&bob, &tampered).await.unwrap_err().code,
        ErrorCode::InviteInvalid
    );

    let none = {
        let p: Vec<&str> = a.invite.token.split('.').collect();
        // {"alg":"none","typ":"JWT"}
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", p[1])
    };
    assert_eq!(
        env.join(&bob, &none).await.unwrap_err().code,
        ErrorCode::InviteInvalid
    );

    let foreign = InviteSigner::new(b"some-other-secret-some-other-secret")
        .sign(&claims)
        .unwrap();
    assert_eq!(
        env.join(&bob, &foreign).await.unwrap_err().code,
        ErrorCode::InviteInvalid
    );

    // A valid invite for room A presented for room B.
    let wrong = env
        .request::<_, serde_json::Value>(
            CommandKind::Join,
            &JoinRoom {
                requester: bob.clone(),
                invite: a.invite.token.clone(),
                room: Some(b.room.id),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(wrong.code, ErrorCode::InviteWrongRoom);
    // Claims that name room A with room B's role.
    let mixed = signer()
        .sign(&InviteClaims {
            role: b.room.role.to_string(),
            ..claims.clone()
        })
        .unwrap();
    assert_eq!(
        env.join(&bob, &mixed).await.unwrap_err().code,
        ErrorCode::InviteWrongRoom
    );

    // Rotation: the old link stops working, the new one works; only the owner may rotate.
    let not_owner = env
        .request::<_, Invite>(
            CommandKind::RotateInvite,
            &RoomCommand {
                requester: bob.clone(),
                room: a.room.id,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(not_owner.code, ErrorCode::NotOwner);
    let fresh: Invite = env
        .request(
            CommandKind::RotateInvite,
            &RoomCommand {
                requester: alice.clone(),
                room: a.room.id,
            },
        )
        .await
        .expect("rotate");
    assert_eq!(
        env.join(&bob, &a.invite.token).await.unwrap_err().code,
        ErrorCode::InviteInvalid
    );
    env.join(&bob, &fresh.token)
        .await
        .expect("new invite works");

    // Malformed requests get `validation`.
    let reply = env
        .client
        .request(CommandKind::Join.subject(), "{\"nope\":1}".into())
        .await
        .unwrap();
    let err = voicerooms_contract::command::decode_reply::<serde_json::Value>(&reply.payload)
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Validation);
    env.shutdown().await;
}

/// REST calls logged by the simulator: (monotonic ms, method, path, status).
fn rest_log(env: &Env) -> Vec<(u64, String, String, u16)> {
    env.sim
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            SimEventKind::Rest {
                method,
                path,
                status,
                ..
            } => Some((e.at_ms, method, path, status)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_and_global_429_storms_delay_operations_as_told_and_lose_none() {
    // The simulator's own bucket limits are off here so that every 429 is an injected one.
    let env = Env::start(1, quiet_rooms(), false).await;
    let alice = seeded(0);
    let users: Vec<_> = (1..5).map(seeded).collect();
    // Warm up (the bot id), then storm: per-bucket 429s on role adds, global 429s on channels.
    let first = env.create(&alice, "warm").await.expect("create");
    env.wait_startup_reconcile().await;
    env.sim.clear_events();
    env.sim
        .inject_rest_fault(RestFault {
            kind: RestFaultKind::RateLimit {
                scope: "user".into(),
                retry_after: 0.3,
            },
            remaining: 3,
            path_contains: Some("/roles/".into()),
        })
        .unwrap();
    env.sim
        .inject_rest_fault(RestFault {
            kind: RestFaultKind::RateLimit {
                scope: "global".into(),
                retry_after: 0.4,
            },
            remaining: 2,
            path_contains: Some(format!("/guilds/{GUILD}/channels")),
        })
        .unwrap();
    env.sim
        .inject_rest_fault(RestFault {
            kind: RestFaultKind::Status(502),
            remaining: 2,
            path_contains: Some("/members/".into()),
        })
        .unwrap();
    let started = Instant::now();

    let second = env
        .create(&alice, "storm")
        .await
        .expect("create through the storm");
    let mut joins = Vec::new();
    for u in &users[..3] {
        let client = env.client.clone();
        let cmd = JoinRoom {
            requester: u.clone(),
            invite: first.invite.token.clone(),
            room: None,
        };
        joins.push(tokio::spawn(async move {
            request::<_, voicerooms_contract::command::Joined>(&client, CommandKind::Join, &cmd)
                .await
        }));
    }
    for j in joins {
        j.await.unwrap().expect("join through the storm");
    }

    let log = rest_log(&env);
    let limited: Vec<_> = log.iter().filter(|e| e.3 == 429).collect();
    assert_eq!(limited.len(), 5, "every injected 429 was hit: {log:?}");
    // After each 429, the next request to the same path came no sooner than retry_after.
    for (at, method, path, _) in &limited {
        let next = log
            .iter()
            .find(|e| e.0 > *at && &e.1 == method && &e.2 == path)
            .expect("the request was retried");
        let min = if path.contains("/channels") { 400 } else { 300 };
        assert!(
            next.0 - at >= min - 5,
            "{method} {path} retried after {} ms",
            next.0 - at
        );
    }
    // Global 429: nothing at all was sent during its window.
    let global_at = limited
        .iter()
        .find(|e| e.2.contains("/channels"))
        .unwrap()
        .0;
    assert!(
        log.iter()
            .all(|e| e.0 <= global_at || e.0 >= global_at + 395),
        "{log:?}"
    );
    assert_eq!(second.room.members.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(env.sim.invalid_request_count() <= 5);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_server_errors_end_in_a_typed_error_after_five_retries() {
    let env = Env::start(1, quiet_rooms(), false).await;
    let alice = seeded(0);
    env.create(&alice, "warm").await.expect("create");
    env.wait_startup_reconcile().await;
    env.sim.clear_events();
    env.sim
        .inject_rest_fault(RestFault {
            kind: RestFaultKind::Status(503),
            remaining: 20,
            path_contains: Some("/roles".into()),
        })
        .unwrap();

    let err = env.create(&alice, "never").await.unwrap_err();

    assert_eq!(err.code, ErrorCode::DiscordUnavailable);
    let calls: Vec<(u64, String)> = rest_log(&env)
        .into_iter()
        .filter(|e| e.2.ends_with("/roles"))
        .map(|e| (e.0, e.1))
        .collect();
    // A 5xx may have created the role: each retry looks it up (GET) instead of posting again.
    let methods: Vec<&str> = calls.iter().take(6).map(|c| c.1.as_str()).collect();
    assert_eq!(
        methods,
        ["POST", "GET", "GET", "GET", "GET", "GET"],
        "one try and five retries, looked up: {calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| c.1 == "POST").count(),
        1,
        "never posted twice"
    );
    let times: Vec<u64> = calls.iter().take(6).map(|c| c.0).collect();
    // Backoff doubles: 20, 40, 80, 160, 320 ms (retry_base_ms = 20 in tests).
    for (i, w) in times.windows(2).enumerate() {
        let expected = 20u64 << i;
        assert!(
            w[1] - w[0] >= expected - 2,
            "retry {i} after {} ms, expected {expected}",
            w[1] - w[0]
        );
    }
    env.sim.clear_faults();
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_close_and_a_moderator_deleting_the_channel_remove_channel_role_and_state() {
    let env = Env::start(1, quiet_rooms(), false).await;
    let alice = seeded(0);
    let bob = seeded(1);
    let a = env.create(&alice, "closing").await.unwrap();
    let b = env.create(&alice, "moderated").await.unwrap();
    let not_owner = env.close(&bob, a.room.id).await.unwrap_err();
    assert_eq!(not_owner.code, ErrorCode::NotOwner);

    env.close(&alice, a.room.id).await.expect("close");

    assert!(get_channel(&env.sim, a.room.id.get()).await.is_none());
    assert!(!role_ids(&env.sim).await.contains(&a.room.role.get()));
    let deleted = env
        .wait_for_event(a.room.id, EventKind::RoomDeleted, "room.deleted")
        .await;
    assert!(matches!(deleted.event, Event::RoomDeleted(ref d) if d.reason == CloseReason::Owner));
    let gone = env
        .request::<_, RoomView>(
            CommandKind::Get,
            &RoomCommand {
                requester: alice.clone(),
                room: a.room.id,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(gone.code, ErrorCode::RoomNotFound);

    // A moderator deletes room B's channel in Discord; gateway-listener reports channel.deleted.
    env.sim.delete_channel(b.room.id.get()).unwrap();
    env.publish(b.room.id.get(), Event::ChannelDeleted(ChannelDeleted {}))
        .await;
    let deleted = env
        .wait_for_event(b.room.id, EventKind::RoomDeleted, "room.deleted")
        .await;
    assert!(
        matches!(deleted.event, Event::RoomDeleted(ref d) if d.reason == CloseReason::ChannelDeleted)
    );
    assert!(!role_ids(&env.sim).await.contains(&b.room.role.get()));
    let core = env.replicas[0].app_core.clone();
    assert!(core.record(b.room.id).await.unwrap().is_none());
    let _ = RoomId::new(1);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_a_bucket_wait_for_its_reset_instead_of_hitting_429() {
    let nats = voicerooms_testkit::NatsServer::start().await;
    let mut config = sim_config(true);
    config.rate_limits.route_limit = 3;
    config.rate_limits.route_window = Duration::from_millis(600);
    let sim = discord_sim::Simulator::start(config).await.unwrap();
    let replica = start_replica(settings(&nats.url(), &sim.api_url(), "rm-b", quiet_rooms())).await;
    let core = replica.app_core.clone();
    // Let the start-up reconciler finish its calls (its completed pass), then start counting.
    eventually("start-up reconciliation", || async {
        core.metrics.reconcile_passes.get() >= 1
    })
    .await;
    sim.clear_events();
    sim.reset_rate_limits();

    let mut calls = Vec::new();
    for _ in 0..7 {
        let c = core.clone();
        calls.push(tokio::spawn(
            async move { c.discord.guild_roles(GUILD).await },
        ));
    }
    for c in calls {
        c.await.unwrap().expect("every queued request completes");
    }

    let log: Vec<(u64, u16)> = sim
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            SimEventKind::Rest { path, status, .. } if path.ends_with("/roles") => {
                Some((e.at_ms, status))
            }
            _ => None,
        })
        .collect();
    assert_eq!(log.len(), 7, "{log:?}");
    // The first request teaches the limiter the bucket; it never sends into an empty bucket.
    assert!(log.iter().filter(|e| e.1 == 429).count() <= 1, "{log:?}");
    let span = log.last().unwrap().0 - log.first().unwrap().0;
    assert!(
        span >= 550,
        "7 requests through a 3-per-600 ms bucket took only {span} ms"
    );
    replica.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_drops_the_role_and_voice_and_the_owner_cannot_leave() {
    let env = Env::start(1, quiet_rooms(), false).await;
    let (alice, bob) = (seeded(0), seeded(1));
    let created = env.create(&alice, "leave").await.unwrap();
    let room = created.room.id;
    env.voice_connect(&bob, seed::GAMING_CHANNEL_ID).await;
    env.join(&bob, &created.invite.token).await.unwrap();
    env.publish(
        room.get(),
        Event::VoiceJoined(voicerooms_contract::event::VoiceJoined {
            user: bob.clone(),
            flags: Default::default(),
            moved_from: None,
        }),
    )
    .await;
    eventually("bob shown in voice", || async {
        let rec = env.replicas[0]
            .app_core
            .record(room)
            .await
            .unwrap()
            .unwrap()
            .0;
        rec.view.voice.iter().any(|o| o.user.id == bob.id)
    })
    .await;

    let owner = env
        .request::<_, serde_json::Value>(
            CommandKind::Leave,
            &RoomCommand {
                requester: alice.clone(),
                room,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(owner.code, ErrorCode::Validation);
    env.request::<_, serde_json::Value>(
        CommandKind::Leave,
        &RoomCommand {
            requester: bob.clone(),
            room,
        },
    )
    .await
    .expect("leave");

    assert!(!env
        .sim
        .member_roles(GUILD, bob.id.get())
        .contains(&created.room.role.get()));
    assert_eq!(
        env.sim.voice_channel_of(bob.id.get()),
        None,
        "disconnected from the room's channel"
    );
    env.wait_for_event(room, EventKind::RoomMemberRemoved, "room.member_removed")
        .await;
    let again = env
        .request::<_, serde_json::Value>(
            CommandKind::Leave,
            &RoomCommand {
                requester: bob.clone(),
                room,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(again.code, ErrorCode::NotMember);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_operations_placements_and_discord_calls_without_the_token() {
    let env = Env::start(1, quiet_rooms(), false).await;
    let alice = seeded(0);
    env.create(&alice, "metrics").await.unwrap();
    let _ = env.create(&alice, &"x".repeat(101)).await.unwrap_err();

    let body = reqwest::get(format!("http://127.0.0.1:{}/metrics", env.replicas[0].port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    assert!(
        body.contains(r#"voicerooms_room_operation_seconds_count{op="create",outcome="ok"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"op="create",outcome="validation""#),
        "{body}"
    );
    assert!(body.contains(r#"voicerooms_discord_calls_total{route="/guilds/{g}/channels",method="POST",status="201"}"#), "{body}");
    assert!(body.contains("voicerooms_discord_queue_depth"), "{body}");
    assert!(!body.contains("sim-bot-token") && !body.contains(SECRET));
    env.shutdown().await;
}
