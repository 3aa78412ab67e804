//! The player's Discord token under pressure: concurrent calls near its expiry on two edges
//! (defect 11), a token Discord expired early (defect 12), and logout closing the player's sockets
//! everywhere (defect 2).

use std::time::Duration;

use discord_sim::{SimEventKind, SimHandle};
use futures::future::join_all;
use reqwest::header::COOKIE;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use voicerooms_platform::Secret;
use voicerooms_testkit::{free_port, wait_until};

use super::{edge_settings, seed, stack, Client, TestEdge};

/// Outcomes of refresh-token grants at the simulator's token endpoint so far.
fn refresh_outcomes(sim: &SimHandle) -> Vec<String> {
    sim.events()
        .into_iter()
        .filter_map(|e| match e.kind {
            SimEventKind::Oauth { endpoint, outcome }
                if endpoint == "token" && outcome.starts_with("refresh_token") =>
            {
                Some(outcome)
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_near_expiry_on_two_edges_refresh_once_and_keep_the_session() {
    let stack = stack().await;
    let second_port = free_port();
    let _second = TestEdge::start(edge_settings(&stack.nats, &stack.sim, second_port)).await;
    let bases = [
        stack.base.clone(),
        format!("http://127.0.0.1:{second_port}"),
    ];
    let session = stack.login_as(seed::USERS[1].0, "/").await;

    // Expiring (the token still works for 30 s) and already expired.
    for (case, left_ms) in [("expiring", 30_000i64), ("expired", -1_000)] {
        let now = voicerooms_contract::now_ms() as i64;
        stack
            .edit_session(&session, |s| s.access_expires_at = (now + left_ms) as u64)
            .await;
        let (_, before) = stack.edge.sessions.load(&session).await.unwrap();
        let seen = refresh_outcomes(&stack.sim).len();
        // Discord's token endpoint answers in 250 ms: the calls overlap the refresh.
        stack
            .sim
            .set_latency(Duration::from_millis(250), Duration::ZERO);
        let calls = (0..10).map(|i| {
            stack
                .http
                .get(format!("{}/api/me", bases[i % 2]))
                .header(COOKIE, format!("vr_session={session}"))
                .send()
        });
        let answers = join_all(calls).await;
        stack.sim.set_latency(Duration::ZERO, Duration::ZERO);
        for answer in answers {
            let answer = answer.unwrap();
            let status = answer.status();
            let body = answer.text().await.unwrap();
            assert_eq!(status, 200, "{case}: {body}");
        }
        let outcomes = refresh_outcomes(&stack.sim)[seen..].to_vec();
        assert_eq!(
            outcomes,
            vec!["refresh_token ok".to_owned()],
            "{case}: one refresh at Discord"
        );
        let (_, after) = stack
            .edge
            .sessions
            .load(&session)
            .await
            .expect("the session is kept");
        assert_ne!(after.refresh_token, before.refresh_token, "{case}: rotated");
        assert!(after.access_expires_at > voicerooms_contract::now_ms() + 60_000);
        assert!(
            after.refreshing_until.is_none(),
            "{case}: the claim is released"
        );
    }
}

/// room-manager, in-process, on the stack's NATS and simulator.
async fn room_manager(stack: &super::Stack) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut rm = room_manager::Settings::default();
    rm.common.nats.url = stack.nats.url();
    rm.common.http.port = 0;
    rm.service.discord.api_base = stack.sim.api_url();
    rm.service.discord.token = Some(Secret::new(stack.sim.config().bot_token.clone()));
    rm.service.invites.secret = Some(Secret::new("room-manager-invite-secret-0123456789abcdef"));
    let app = room_manager::Application::build(rm).await.unwrap();
    let handle = tokio::spawn(app.run_until_stopped(std::future::pending()));
    let nats = stack.nats.client().await;
    wait_until(Duration::from_secs(30), "room-manager answers", || {
        let nats = nats.clone();
        async move {
            let request = json!({"requester": {"id": "300000000000000001", "username": "alice"}});
            nats.request("roommgr.v1.list_mine", request.to_string().into())
                .await
                .is_ok_and(|reply| String::from_utf8_lossy(&reply.payload).contains("\"ok\""))
        }
    })
    .await;
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_discord_expired_early_is_refreshed_once_and_the_join_goes_through() {
    let stack = stack().await;
    let _rm = room_manager(&stack).await;
    let owner = stack.login_as(seed::USERS[0].0, "/").await;
    let created = stack
        .post("/api/rooms", &owner, json!({"name": "early expiry"}))
        .await;
    assert_eq!(created.status(), 201, "{:?}", created.text().await);
    let created: Value = created.json().await.unwrap();
    let invite = created["invite"]["token"].as_str().unwrap().to_owned();

    // Players who are not in the guild yet: room-manager adds them with their own token.
    let zed = stack.sim.create_user("zed").unwrap();
    let zed_session = stack.login_as(zed, "/").await;
    let yan = stack.sim.create_user("yan").unwrap();
    let yan_session = stack.login_as(yan, "/").await;
    // Discord ends every access token before its recorded expiry.
    stack.sim.expire_access_tokens();

    let seen = refresh_outcomes(&stack.sim).len();
    let joined = stack
        .post("/api/rooms/join", &zed_session, json!({"invite": invite}))
        .await;
    let status = joined.status();
    let body: Value = joined.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["room"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["user"]["id"].as_str() == Some(zed.to_string().as_str())),
        "{body}"
    );
    assert_eq!(
        refresh_outcomes(&stack.sim)[seen..].to_vec(),
        vec!["refresh_token ok".to_owned()]
    );
    assert_eq!(stack.get("/api/me", &zed_session).await.status(), 200);

    // Yan's refresh token no longer works either: the session ends, with the way back.
    stack
        .edit_session(&yan_session, |s| s.refresh_token = "revoked".into())
        .await;
    let refused = stack
        .http
        .post(format!("{}/api/rooms/join", stack.base))
        .header(COOKIE, format!("vr_session={yan_session}"))
        .header("Origin", &stack.base)
        .header("X-Return-To", format!("/invite/{invite}"))
        .json(&json!({"invite": invite}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let login = body["error"]["login_url"].as_str().unwrap_or_default();
    assert!(
        login.starts_with("/auth/login?return_to=%2Finvite%2F"),
        "{body}"
    );
    assert_eq!(stack.get("/api/me", &yan_session).await.status(), 401);
}

#[tokio::test]
async fn logout_closes_the_player_s_sockets_on_every_edge() {
    let stack = stack().await;
    let second_port = free_port();
    let second = TestEdge::start(edge_settings(&stack.nats, &stack.sim, second_port)).await;
    let session = stack.login_as(seed::USERS[2].0, "/").await;
    let mut here = Client::authed(&stack.edge.ws_url(), &session).await;
    let mut there = Client::authed(&second.ws_url(), &session).await;
    let out = stack.post("/auth/logout", &session, json!({})).await;
    assert_eq!(out.status(), 204);
    for (name, ws) in [("this edge", &mut here), ("the other edge", &mut there)] {
        let frame = ws.next_json().await;
        assert_eq!(frame["error"]["code"], "session_ended", "{name}: {frame}");
        assert_eq!(
            ws.closed_with(Duration::from_secs(10)).await,
            Some(CloseCode::Library(4003)),
            "{name}"
        );
    }
}
