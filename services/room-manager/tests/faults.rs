//! Discord faults against two replicas and the simulator (strict bot permissions): lost create
//! answers, 429/5xx storms, foreign guilds, and the invalid-request budget under the
//! simulator's default rate limits.

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

use std::collections::HashMap;
use std::time::Duration;

use discord_sim::{RestFault, RestFaultKind};
use room_manager::settings::RoomsSettings;
use support::*;
use voicerooms_contract::command::{CreateRoom, Created, JoinRoom, Joined};
use voicerooms_contract::subject::CommandKind;
use voicerooms_contract::{ErrorCode, GuildId, UserRef};

/// `n` new guild members.
fn members(env: &Env, prefix: &str, n: usize) -> Vec<UserRef> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let id = env.sim.create_user(&name).unwrap();
            env.sim.add_member(GUILD, id, &[]).unwrap();
            user(id, &name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_in_foreign_and_unknown_guilds_are_refused_before_any_discord_call() {
    let env = Env::start_strict(2, quiet_rooms(), false).await;
    let alice = seeded(0);
    let foreign = env
        .sim
        .create_guild_with(None, "not ours", false)
        .expect("foreign guild");
    env.wait_startup_reconcile().await;
    env.sim.clear_events();

    for guild in [foreign, 987_654_321_987_654_321] {
        let err = env
            .request::<_, Created>(
                CommandKind::Create,
                &CreateRoom {
                    requester: alice.clone(),
                    guild: GuildId::new(guild).unwrap(),
                    name: "elsewhere".into(),
                    idempotency_key: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Validation, "guild {guild}: {err}");
        assert!(!err.code.retryable());
    }

    assert_eq!(
        rest_calls(&env.sim),
        vec![],
        "no Discord call for a guild not on the allow-list"
    );
    // The configured guild still works.
    env.create(&alice, "home").await.expect("create at home");
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_listed_guild_the_bot_is_not_in_is_refused_without_discord_calls_and_the_others_are_reconciled(
) {
    // The operator lists a guild the bot was never added to (or was removed from).
    let mut env = Env::start_tuned(0, quiet_rooms(), false, |_| {}).await;
    let absent = env
        .sim
        .create_guild_with(None, "bot not here", false)
        .expect("guild");
    let rooms = RoomsSettings {
        guilds: format!("{GUILD},{absent}"),
        reconcile_grace_ms: 200,
        ..quiet_rooms()
    };
    env.add_replica("rm-0", rooms.clone()).await;
    env.add_replica("rm-1", rooms).await;
    // Each replica's start-up pass completes: the refused guild is skipped, not fatal (before,
    // its 403 failed every pass, so no guild was ever reconciled).
    env.wait_startup_reconcile().await;
    for r in &env.replicas {
        assert_eq!(r.app_core.metrics.reconcile_unreachable_guilds.get(), 1);
    }
    let alice = seeded(0);
    env.sim.clear_events();
    for i in 0..10 {
        let err = env
            .request::<_, Created>(
                CommandKind::Create,
                &CreateRoom {
                    requester: alice.clone(),
                    guild: GuildId::new(absent).unwrap(),
                    name: format!("nowhere {i}"),
                    idempotency_key: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Validation, "{err}");
        assert!(!err.code.retryable());
    }
    assert_eq!(
        rest_calls(&env.sim),
        vec![],
        "a guild Discord refused a moment ago is not asked again"
    );
    // The guild the bot is in: creates work, and an orphan there is still found and deleted.
    env.create(&alice, "home").await.expect("create at home");
    let orphan = env
        .sim
        .create_role(GUILD, "vr-0123456789ab lost", 0)
        .expect("role");
    let core = env.replicas[0].app_core.clone();
    let reconciler = room_manager::reconcile::Reconciler::default();
    let first = reconciler
        .pass(&core)
        .await
        .expect("a pass despite the refused guild");
    assert_eq!(
        (first.suspects, first.unreachable_guilds),
        (1, 1),
        "{first:?}"
    );
    let seen = std::time::Instant::now();
    voicerooms_testkit::wait_until(Duration::from_secs(5), "the grace period over", || async {
        seen.elapsed() > Duration::from_millis(300)
    })
    .await;
    let second = reconciler
        .pass(&core)
        .await
        .expect("a pass despite the refused guild");
    assert_eq!(second.deleted, 1, "{second:?}");
    assert!(!role_ids(&env.sim).await.contains(&orphan));
    env.shutdown().await;
}

/// Runs `n` creates at once; checks each room has exactly one role and one channel.
async fn creates_with_a_slow_answer(env: &Env, owners: &[UserRef], what: &str) -> Vec<Created> {
    let mut tasks = Vec::new();
    for (i, owner) in owners.iter().enumerate() {
        let client = env.client.clone();
        let cmd = CreateRoom {
            requester: owner.clone(),
            guild: GuildId::new(GUILD).unwrap(),
            name: format!("{what} {i}"),
            idempotency_key: None,
        };
        tasks.push(tokio::spawn(async move {
            request_within::<_, Created>(
                &client,
                CommandKind::Create,
                &cmd,
                Duration::from_secs(30),
            )
            .await
        }));
    }
    let mut created = Vec::new();
    for t in tasks {
        created.push(t.await.unwrap().expect("create despite the slow answer"));
    }
    assert_one_each(env, &created, what);
    created
}

/// Exactly one role (by the room's tagged name) and one channel (granting the room's role) for
/// each room.
fn assert_one_each(env: &Env, created: &[Created], what: &str) {
    for c in created {
        let role = c.room.role.get();
        let nonce_roles = tagged_roles(&env.sim)
            .iter()
            .filter(|r| {
                r["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(&format!(" {}", c.room.name)))
            })
            .count();
        assert_eq!(nonce_roles, 1, "{what}: one role for {}", c.room.name);
        assert_eq!(
            channels_naming_role(&env.sim, role),
            1,
            "{what}: one channel for {}",
            c.room.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_times_out_is_looked_up_not_sent_again_so_nothing_is_duplicated() {
    let rooms = RoomsSettings {
        reconcile_grace_ms: 300,
        ..quiet_rooms()
    };
    let env = Env::start_tuned(2, rooms, false, |t| {
        // The setting: Discord answers after 2.5 s, we give up waiting at 1.5 s.
        t.request_timeout_ms = 1_500;
        t.retry_base_ms = 300;
    })
    .await;
    let owners = members(&env, "slow", 6);
    env.wait_startup_reconcile().await;

    let mut all = Vec::new();
    for (path, what) in [
        (format!("/guilds/{GUILD}/channels"), "channel"),
        (format!("/guilds/{GUILD}/roles"), "role"),
    ] {
        env.sim
            .inject_rest_fault(RestFault {
                kind: RestFaultKind::Slow(Duration::from_millis(2_500)),
                remaining: 6,
                path_contains: Some(path),
            })
            .unwrap();
        all.extend(creates_with_a_slow_answer(&env, &owners, what).await);
        let posts = rest_calls(&env.sim)
            .iter()
            .filter(|c| c.0 == "POST" && c.1.ends_with(&format!("/guilds/{GUILD}/{what}s")))
            .count();
        assert!(posts >= 6, "{what}: the slow POSTs were answered: {posts}");
    }
    // The slow answers have all arrived (a duplicate would exist in Discord by now).
    env.sim.clear_faults();
    assert_eq!(all.len(), 12);
    assert_eq!(
        room_channels(&env.sim).len(),
        12,
        "{:?}",
        room_channels(&env.sim)
    );
    assert_eq!(
        tagged_roles(&env.sim).len(),
        12,
        "{:?}",
        tagged_roles(&env.sim)
    );

    // The reconciler, with every room open, finds nothing unaccounted for — not now, and not
    // past its grace period (when it would delete what it found): there was never a duplicate.
    let core = env.replicas[0].app_core.clone();
    let reconciler = room_manager::reconcile::Reconciler::default();
    let first = reconciler.pass(&core).await.expect("reconcile");
    assert_eq!(first.suspects, 0, "{first:?}");
    let passed = std::time::Instant::now();
    voicerooms_testkit::wait_until(Duration::from_secs(5), "the grace period over", || async {
        passed.elapsed() > Duration::from_millis(400)
    })
    .await;
    let second = reconciler.pass(&core).await.expect("reconcile");
    assert_eq!(
        second,
        room_manager::reconcile::Report::default(),
        "{second:?}"
    );
    assert_one_each(&env, &all, "after reconcile");
    for c in &all {
        assert!(
            core.record(c.room.id).await.unwrap().is_some(),
            "room {} kept",
            c.room.id
        );
    }

    // Closing them leaves nothing behind.
    for owner in &owners {
        let mine: voicerooms_contract::command::RoomList = env
            .request(
                CommandKind::ListMine,
                &voicerooms_contract::command::ListMine {
                    requester: owner.clone(),
                },
            )
            .await
            .unwrap();
        assert_eq!(mine.rooms.len(), 2, "two rooms each");
        for r in mine.rooms {
            env.close(owner, r.id).await.expect("close");
        }
    }
    assert!(
        tagged_roles(&env.sim).is_empty(),
        "{:?}",
        tagged_roles(&env.sim)
    );
    assert!(room_channels(&env.sim).is_empty());
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_under_a_429_and_5xx_storm_leaves_nothing_within_30_s() {
    let env = Env::start_strict(2, quiet_rooms(), false).await;
    let alice = seeded(0);
    env.wait_startup_reconcile().await;
    let roles_before = role_ids(&env.sim).await;
    // The channel cannot be made (503s: it may or may not exist, so the role is kept until the
    // lost answer has settled)...
    env.sim
        .inject_rest_fault(RestFault {
            kind: RestFaultKind::Status(503),
            remaining: 1_000,
            path_contains: Some(format!("/guilds/{GUILD}/channels")),
        })
        .unwrap();
    let started = std::time::Instant::now();

    let err = env.create(&alice, "stormy").await.unwrap_err();

    assert_eq!(err.code, ErrorCode::DiscordUnavailable, "{err}");
    assert_eq!(tagged_roles(&env.sim).len(), 1, "the role exists for now");
    // ...and then deleting the role meets ten 502s and twenty-five 429s.
    env.sim.clear_faults();
    for kind in [
        RestFaultKind::Status(502),
        RestFaultKind::RateLimit {
            scope: "user".into(),
            retry_after: 0.3,
        },
    ] {
        let remaining = if matches!(kind, RestFaultKind::Status(_)) {
            10
        } else {
            25
        };
        env.sim
            .inject_rest_fault(RestFault {
                kind,
                remaining,
                path_contains: Some(format!("/guilds/{GUILD}/roles/")),
            })
            .unwrap();
    }
    voicerooms_testkit::wait_until(Duration::from_secs(30), "no object left", || async {
        role_ids(&env.sim).await == roles_before && room_channels(&env.sim).is_empty()
    })
    .await;
    println!(
        "storm: nothing left {:?} after the create started",
        started.elapsed()
    );
    let deletes = rest_calls(&env.sim)
        .iter()
        .filter(|c| c.0 == "DELETE" && c.1.contains("/roles/"))
        .count();
    assert!(
        deletes > 1,
        "the role deletion was retried through the storm: {deletes}"
    );
    // The queue is empty again.
    let core = env.replicas[0].app_core.clone();
    eventually("cleanup queue empty", || async {
        room_manager::rooms::create::retry_cleanup_queue(&core)
            .await
            .is_ok_and(|pending| pending == 0)
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_simulators_default_limits_fifty_creates_and_fifty_joins_meet_at_most_1_percent_429s(
) {
    // The simulator's default limits: 5 requests per 5 s per route and guild, 50/s global.
    let env = Env::start_strict(2, quiet_rooms(), true).await;
    let owners = members(&env, "owner", 17);
    let joiners = members(&env, "joiner", 50);
    env.wait_startup_reconcile().await;
    env.sim.clear_events();
    let started = std::time::Instant::now();

    let creates: Vec<CreateRoom> = (0..50)
        .map(|i| CreateRoom {
            requester: owners[i % owners.len()].clone(),
            guild: GuildId::new(GUILD).unwrap(),
            name: format!("limits {i}"),
            idempotency_key: Some(format!("limits-{i}")),
        })
        .collect();
    let mut rooms: Vec<Created> = Vec::new();
    for chunk in creates.chunks(6) {
        let calls = chunk.iter().map(|cmd| {
            let (client, cmd) = (env.client.clone(), cmd.clone());
            async move {
                request_retrying::<_, Created>(
                    &client,
                    CommandKind::Create,
                    &cmd,
                    Duration::from_secs(120),
                )
                .await
            }
        });
        for r in futures::future::join_all(calls).await {
            rooms.push(r.expect("create"));
        }
    }
    let mut per_room: HashMap<usize, usize> = HashMap::new();
    let joins: Vec<JoinRoom> = joiners
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let room = i % rooms.len();
            *per_room.entry(room).or_default() += 1;
            JoinRoom {
                requester: j.clone(),
                invite: rooms[room].invite.token.clone(),
                room: None,
            }
        })
        .collect();
    assert!(
        per_room.values().all(|n| *n <= 3),
        "capacity 4 with the owner"
    );
    for chunk in joins.chunks(6) {
        let calls = chunk.iter().map(|cmd| {
            let (client, cmd) = (env.client.clone(), cmd.clone());
            async move {
                request_retrying::<_, Joined>(
                    &client,
                    CommandKind::Join,
                    &cmd,
                    Duration::from_secs(120),
                )
                .await
            }
        });
        for r in futures::future::join_all(calls).await {
            r.expect("join");
        }
    }

    let calls = rest_calls(&env.sim);
    let limited = calls.iter().filter(|c| c.2 == 429).count();
    let invalid = env.sim.invalid_request_count();
    let mut by_route: HashMap<String, (usize, usize)> = HashMap::new();
    for (method, path, status) in &calls {
        let route = path
            .split('/')
            .map(|s| {
                if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
                    "{id}"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let e = by_route.entry(format!("{method} {route}")).or_default();
        e.0 += 1;
        if *status == 429 {
            e.1 += 1;
        }
    }
    println!(
        "default limits, 2 replicas: 50 creates + 50 joins in {:.1} s: {} Discord calls, {} answered 429 ({:.2} %), invalid requests {} = {:.1} per 1,000 operations; by route: {by_route:?}",
        started.elapsed().as_secs_f64(),
        calls.len(),
        limited,
        limited as f64 * 100.0 / calls.len() as f64,
        invalid,
        invalid as f64 * 1000.0 / 100.0,
    );
    assert!(
        limited * 100 <= calls.len(),
        "{limited} of {} calls answered 429: {by_route:?}",
        calls.len()
    );
    env.shutdown().await;
}
