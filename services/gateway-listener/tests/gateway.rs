//! gateway-listener against the Discord simulator and a real nats-server: normalized events,
//! connection faults, convergence, status and alerts.

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

use std::time::Duration;

use discord_sim::{SimEventKind, VoiceFlags};
use support::*;
use voicerooms_contract::event::{Event, VoiceFlag};
use voicerooms_contract::status::{GatewayState, GatewayStatus, Severity};
use voicerooms_testkit::wait_until;

#[tokio::test]
async fn join_move_mute_and_leave_are_published_in_order_with_their_payloads() {
    // Arrange
    let gw = spawn().await;
    gw.wait_connected().await;

    // Act
    gw.sim.connect_voice(ALICE, LOBBY).unwrap();
    gw.sim.move_voice(ALICE, GAMING).unwrap();
    gw.sim
        .set_voice_flags(
            ALICE,
            VoiceFlags {
                self_mute: Some(true),
                ..Default::default()
            },
        )
        .unwrap();
    gw.sim.disconnect_voice(ALICE).unwrap();

    // Assert
    let events = gw.wait_events(5).await;
    assert_eq!(
        summary(&events),
        vec![
            joined(LOBBY, ALICE),
            left(LOBBY, ALICE),
            joined(GAMING, ALICE),
            updated(GAMING, ALICE),
            left(GAMING, ALICE),
        ]
    );
    let Event::VoiceJoined(j) = &events[0].event else {
        panic!("a join")
    };
    assert_eq!(j.user.username, "alice");
    assert_eq!(j.moved_from, None);
    let Event::VoiceLeft(l) = &events[1].event else {
        panic!("a leave")
    };
    assert_eq!(l.moved_to.map(|c| c.get()), Some(GAMING));
    let Event::VoiceJoined(j) = &events[2].event else {
        panic!("a join")
    };
    assert_eq!(j.moved_from.map(|c| c.get()), Some(LOBBY));
    let Event::VoiceUpdated(u) = &events[3].event else {
        panic!("an update")
    };
    assert!(u.flags.self_mute);
    assert_eq!(u.changed, vec![VoiceFlag::SelfMute]);
    for e in &events {
        assert_eq!(e.guild.get(), discord_sim::seed::GUILD_ID);
        assert!(e.received_at > 0 && e.published_at >= e.received_at);
        let id = e.id.as_deref().expect("a dedup id");
        assert_eq!(id.split(':').count(), 3, "{id}");
    }
    // The two halves of a move come from one dispatch: same session and sequence, parts 0 and 1.
    let (a, b) = (
        events[1].id.as_deref().unwrap(),
        events[2].id.as_deref().unwrap(),
    );
    assert_eq!(a.rsplit_once(':').unwrap().0, b.rsplit_once(':').unwrap().0);
}

#[tokio::test]
async fn a_deleted_or_renamed_voice_channel_is_published_for_its_room() {
    // Arrange
    let gw = spawn().await;
    gw.wait_connected().await;
    let room = gw
        .sim
        .create_voice_channel(discord_sim::seed::GUILD_ID, "room-1")
        .unwrap();
    gw.sim.connect_voice(BOB, room).unwrap();

    // Act: a moderator deletes the room's channel while bob is in it.
    gw.sim.delete_channel(room).unwrap();

    // Assert: bob leaves, then the channel is gone.
    let events = gw.wait_events(3).await;
    assert_eq!(
        summary(&events),
        vec![
            joined(room, BOB),
            left(room, BOB),
            ("channel.deleted", room, 0)
        ]
    );
}

/// A fault, then a change while it is in effect or right after, then a sentinel: the stream
/// must hold each event exactly once, in order.
async fn survives(fault: impl FnOnce(&TestGateway), expect_resume: bool) {
    // Arrange
    let gw = spawn().await;
    gw.wait_connected().await;
    gw.sim.connect_voice(ALICE, LOBBY).unwrap();
    gw.wait_events(1).await;
    let identifies = gw.count(|k| matches!(k, SimEventKind::Identify { .. }));

    // Act
    fault(&gw);
    gw.sim.connect_voice(BOB, LOBBY).unwrap();
    gw.sim.move_voice(ALICE, GAMING).unwrap();
    wait_until(Duration::from_secs(10), "reconnected", || async {
        gw.count(|k| {
            matches!(
                k,
                SimEventKind::Resume { .. } | SimEventKind::Identify { .. }
            )
        }) > identifies
    })
    .await;
    gw.sim.connect_voice(DAVE, GAMING).unwrap();

    // Assert
    let events = gw.wait_events(5).await;
    let mut got = summary(&events);
    let mut want = vec![
        joined(LOBBY, ALICE),
        joined(LOBBY, BOB),
        left(LOBBY, ALICE),
        joined(GAMING, ALICE),
        joined(GAMING, DAVE),
    ];
    if !expect_resume {
        // Changes missed while the session was lost are rebuilt from GUILD_CREATE: the same
        // set, in user order rather than Discord's.
        got[1..4].sort();
        want[1..4].sort();
    }
    assert_eq!(got, want);
    let resumes = gw.count(|k| matches!(k, SimEventKind::Resume { .. }));
    let identifies_after = gw.count(|k| matches!(k, SimEventKind::Identify { .. }));
    if expect_resume {
        assert!(resumes >= 1, "resumed");
        assert_eq!(identifies_after, identifies, "no new identify");
    } else {
        assert!(identifies_after > identifies, "identified anew");
    }
}

#[tokio::test]
async fn a_dropped_connection_resumes_without_loss_or_duplicates() {
    survives(
        |gw| {
            gw.sim.drop_connections(None);
        },
        true,
    )
    .await;
}

#[tokio::test]
async fn a_reconnect_request_resumes_without_loss_or_duplicates() {
    survives(
        |gw| {
            gw.sim.send_reconnect(None);
        },
        true,
    )
    .await;
}

#[tokio::test]
async fn a_resumable_invalid_session_resumes_without_loss_or_duplicates() {
    survives(
        |gw| {
            gw.sim.invalidate_sessions(true, None);
        },
        true,
    )
    .await;
}

#[tokio::test]
async fn close_4000_resumes_without_loss_or_duplicates() {
    survives(
        |gw| {
            gw.sim.close_connections(4000, None);
        },
        true,
    )
    .await;
}

#[tokio::test]
async fn a_non_resumable_invalid_session_reidentifies_and_converges() {
    survives(
        |gw| {
            gw.sim.invalidate_sessions(false, None);
        },
        false,
    )
    .await;
}

#[tokio::test]
async fn close_4009_reidentifies_and_converges() {
    survives(
        |gw| {
            gw.sim.close_connections(4009, None);
        },
        false,
    )
    .await;
}

#[tokio::test]
async fn a_zombied_connection_is_closed_and_resumed() {
    survives(
        |gw| {
            gw.sim.set_heartbeat_acks(false);
            let sim = gw.sim.clone();
            tokio::spawn(async move {
                // Acks come back once our side has noticed and reconnected.
                wait_until(Duration::from_secs(10), "zombie noticed", || async {
                    sim.events().iter().any(|e| {
                        matches!(
                            e.kind,
                            SimEventKind::Disconnected {
                                by_server: false,
                                ..
                            }
                        )
                    })
                })
                .await;
                sim.set_heartbeat_acks(true);
            });
        },
        true,
    )
    .await;
}

#[tokio::test]
async fn a_bad_token_stops_with_an_alert_and_no_retries() {
    // Arrange
    let mut gw = prepare(discord_sim::SimConfig::for_tests()).await;
    let alerts_raw2 = collect(&gw.client, "ops.alerts.gateway-listener").await;
    let status_raw2 = collect(&gw.client, "gateway.0.status").await;
    // A configured gateway URL skips GET /gateway/bot, so the token meets the gateway itself.
    let config = gateway_listener::GatewayConfig {
        url: gw.sim.gateway_url().to_owned(),
        shard_count: gateway_listener::ShardCount::Fixed(1),
        ..fast_gateway()
    };
    gw.start_app(config, "wrong-token").await;

    // Act: the service identifies with a bad token: 4004.
    wait_until(Duration::from_secs(10), "the fatal-close alert", || async {
        alerts(&alerts_raw2)
            .iter()
            .any(|a| a.code == "gateway_fatal_close")
    })
    .await;

    // Assert: stopped, not ready, exactly one identify, and nothing more within a while.
    let alert = alerts(&alerts_raw2)
        .into_iter()
        .find(|a| a.code == "gateway_fatal_close")
        .unwrap();
    assert_eq!(alert.severity, Severity::Critical);
    assert!(alert.message.contains("4004"), "{}", alert.message);
    assert!(!alert.message.contains("wrong-token"));
    let statuses: Vec<GatewayStatus> = status_raw2
        .lock()
        .unwrap()
        .iter()
        .filter_map(|b| GatewayStatus::decode(b).ok())
        .collect();
    assert_eq!(
        statuses.last().map(|s| s.state),
        Some(GatewayState::Stopped)
    );
    let readyz = format!("http://127.0.0.1:{}/readyz", gw.port);
    assert_eq!(
        voicerooms_testkit::conformance::status_of(&readyz).await,
        Some(503)
    );
    let connects = gw.count(|k| matches!(k, SimEventKind::Connected { .. }));
    let quiet = tokio::time::timeout(Duration::from_secs(2), async {
        wait_until(Duration::from_secs(3), "another connection", || async {
            gw.count(|k| matches!(k, SimEventKind::Connected { .. })) > connects
        })
        .await
    })
    .await;
    assert!(quiet.is_err(), "no retry after a fatal close");
    assert_eq!(connects, 1);
    gw.stop_app().await;
}

/// With `shard_count = "auto"` the pool asks `GET /gateway/bot` for the shard count first; a
/// refused token there is as fatal as a 4004: an alert, not ready, no connection, no retries.
#[tokio::test]
async fn a_bad_token_refused_while_asking_the_shard_count_stops_with_an_alert() {
    // Arrange
    let mut gw = prepare(discord_sim::SimConfig::for_tests()).await;
    let alerts_raw = collect(&gw.client, "ops.alerts.gateway-listener").await;

    // Act
    gw.start_app(fast_gateway(), "wrong-token").await;
    wait_until(Duration::from_secs(10), "the fatal-close alert", || async {
        alerts(&alerts_raw)
            .iter()
            .any(|a| a.code == "gateway_fatal_close")
    })
    .await;

    // Assert
    let alert = alerts(&alerts_raw)
        .into_iter()
        .find(|a| a.code == "gateway_fatal_close")
        .unwrap();
    assert_eq!(alert.severity, Severity::Critical);
    assert!(alert.message.contains("401"), "{}", alert.message);
    assert!(!alert.message.contains("wrong-token"));
    let readyz = format!("http://127.0.0.1:{}/readyz", gw.port);
    assert_eq!(
        voicerooms_testkit::conformance::status_of(&readyz).await,
        Some(503)
    );
    let asked =
        gw.count(|k| matches!(k, SimEventKind::Rest { route, .. } if route == "GET /gateway/bot"));
    // No retry within 2 s (the retry policy would ask again after 200-400 ms).
    let retried = wait_for(Duration::from_secs(2), || async {
        gw.count(|k| matches!(k, SimEventKind::Rest { route, .. } if route == "GET /gateway/bot"))
            > asked
    })
    .await;
    assert!(!retried, "no retries after a refused token");
    assert_eq!(gw.count(|k| matches!(k, SimEventKind::Connected { .. })), 0);
    gw.stop_app().await;
}
