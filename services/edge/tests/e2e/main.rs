//! End to end, all real: Discord simulator → gateway-listener → NATS (ROOMS stream) → edge →
//! WebSocket clients. A simulated voice join reaches every subscribed client as `voice.joined`
//! with its stream sequence; ten clients see the same events in the same order and derive the
//! same member list.

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

#[path = "../ws/helpers.rs"]
mod helpers;

use std::collections::BTreeSet;
use std::time::Duration;

use discord_sim::{seed, SimConfig, Simulator};
use helpers::{seqs, settings, Client, TestEdge, World};
use voicerooms_contract::UserRef;
use voicerooms_platform::Secret;
use voicerooms_testkit::NatsServer;

fn sim_user(i: usize) -> UserRef {
    let (id, name) = seed::USERS[i];
    UserRef {
        id: voicerooms_contract::UserId::new(id).unwrap(),
        username: name.into(),
        global_name: None,
        avatar: None,
    }
}

#[tokio::test]
async fn a_simulated_voice_join_reaches_ten_clients_in_the_same_order() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let sim = Simulator::start(SimConfig::for_tests()).await.unwrap();

    let mut gw = gateway_listener::Settings::default();
    gw.common.nats.url = nats.url();
    gw.common.http.port = 0;
    gw.service.discord.api_base = sim.api_url();
    gw.service.discord.token = Some(Secret::new(sim.config().bot_token.clone()));
    gw.service.gateway.url = sim.gateway_url().to_owned();
    let gateway = gateway_listener::Application::build(gw).await.unwrap();
    let (stop_gw, gw_stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(gateway.run_until_stopped(async {
        let _ = gw_stopped.await;
    }));
    voicerooms_testkit::wait_until(Duration::from_secs(20), "a gateway session", || async {
        !sim.sessions().is_empty()
    })
    .await;

    let edge = TestEdge::start(settings(&nats)).await;
    // The room is the simulator's Lobby channel; alice owns it, bob is a member.
    let (alice, bob, carol) = (sim_user(0), sim_user(1), sim_user(2));
    world
        .put_room(seed::LOBBY_CHANNEL_ID, &[alice.clone(), bob.clone()], 0)
        .await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let who = if i % 2 == 0 { &alice } else { &bob };
        let cookie = edge.login(who, 60_000).await;
        let mut client = Client::authed(&edge.ws_url(), &cookie).await;
        assert_eq!(
            client.subscribe(seed::LOBBY_CHANNEL_ID, None).await["event"],
            "subscribed"
        );
        clients.push(client);
    }

    // Voice changes in Discord: joins, a mute (never a join), a move out, a leave.
    sim.connect_voice(alice.id.get(), seed::LOBBY_CHANNEL_ID)
        .unwrap();
    sim.connect_voice(bob.id.get(), seed::LOBBY_CHANNEL_ID)
        .unwrap();
    sim.connect_voice(carol.id.get(), seed::LOBBY_CHANNEL_ID)
        .unwrap();
    sim.set_voice_flags(
        bob.id.get(),
        discord_sim::VoiceFlags {
            self_mute: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    sim.move_voice(carol.id.get(), seed::GAMING_CHANNEL_ID)
        .unwrap();
    sim.disconnect_voice(alice.id.get()).unwrap();

    let expected_kinds = [
        "voice.joined",
        "voice.joined",
        "voice.joined",
        "voice.updated",
        "voice.left",
        "voice.left",
    ];
    let mut orders = Vec::new();
    let mut lists = Vec::new();
    for client in &mut clients {
        let events = client.events(expected_kinds.len()).await;
        let kinds: Vec<_> = events
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kinds, expected_kinds);
        assert_eq!(events[0]["payload"]["user"]["id"], alice.id.to_string());
        assert_eq!(events[0]["room"], seed::LOBBY_CHANNEL_ID.to_string());
        assert_eq!(
            events[4]["payload"]["moved_to"],
            seed::GAMING_CHANNEL_ID.to_string()
        );
        let order = seqs(&events);
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing: {order:?}"
        );
        let mut in_voice = BTreeSet::new();
        for e in &events {
            let id = e["payload"]["user"]["id"].as_str().unwrap().to_owned();
            match e["event"].as_str().unwrap() {
                "voice.joined" => {
                    in_voice.insert(id);
                }
                "voice.left" => {
                    in_voice.remove(&id);
                }
                _ => {}
            }
        }
        orders.push(order);
        lists.push(in_voice);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "same order everywhere"
    );
    assert!(
        lists.windows(2).all(|w| w[0] == w[1]),
        "same member list everywhere"
    );
    assert_eq!(lists[0], BTreeSet::from([bob.id.to_string()]));

    let _ = stop_gw.send(());
    let _ = gateway.await;
}
