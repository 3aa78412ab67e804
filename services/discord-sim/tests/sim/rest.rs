//! REST behaviour and the one-consistent-world rules, with raw HTTP and a raw gateway client.

use discord_sim::seed;
use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn requests_without_the_bot_token_get_401_in_discords_error_shape() {
    let sim = start_default().await;
    let resp = http()
        .get(format!(
            "{}/guilds/{}/channels",
            sim.api_url(),
            seed::GUILD_ID
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"message": "401: Unauthorized", "code": 0}));
    sim.shutdown().await;
}

#[tokio::test]
async fn routes_are_served_under_api_and_api_v10_alike() {
    let sim = start_default().await;
    for prefix in ["/api", "/api/v10"] {
        let resp = http()
            .get(format!("{}{prefix}/gateway", sim.http_url()))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(body["url"], sim.gateway_url());
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn an_invalid_channel_body_gets_50035_with_field_errors() {
    let sim = start_default().await;
    let (status, _, body) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{}/channels", seed::GUILD_ID),
        Some(json!({"type": 2})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], 50035);
    assert_eq!(
        body["errors"]["name"]["_errors"][0]["code"],
        "BASE_TYPE_REQUIRED"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_channel_created_over_rest_is_dispatched_as_channel_create() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let (status, _, body) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{}/channels", seed::GUILD_ID),
        Some(json!({"name": "room", "type": 2, "user_limit": 4})),
    )
    .await;
    assert_eq!(status, 201);
    let ev = gw.dispatch("CHANNEL_CREATE").await;
    assert_eq!(ev["d"]["id"], body["id"]);
    assert_eq!(ev["d"]["user_limit"], 4);
    let (status, _, _) = api(
        &sim,
        Method::PATCH,
        &format!("/channels/{}", body["id"].as_str().expect("id")),
        Some(json!({"name": "renamed"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(gw.dispatch("CHANNEL_UPDATE").await["d"]["name"], "renamed");
    sim.shutdown().await;
}

#[tokio::test]
async fn deleting_a_channel_disconnects_its_voice_members_then_dispatches_channel_delete() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let alice = seed::USERS[0].0;
    sim.connect_voice(alice, seed::GAMING_CHANNEL_ID)
        .expect("join");
    gw.dispatch("VOICE_STATE_UPDATE").await;
    let (status, _, _) = api(
        &sim,
        Method::DELETE,
        &format!("/channels/{}", seed::GAMING_CHANNEL_ID),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let leave = gw.recv().await.expect("leave");
    assert_eq!(leave["t"], "VOICE_STATE_UPDATE");
    assert!(leave["d"]["channel_id"].is_null());
    assert_eq!(leave["d"]["user_id"], alice.to_string());
    assert_eq!(gw.recv().await.expect("delete")["t"], "CHANNEL_DELETE");
    let (status, _, body) = api(
        &sim,
        Method::GET,
        &format!("/channels/{}", seed::GAMING_CHANNEL_ID),
        None,
    )
    .await;
    assert_eq!((status, body["code"].clone()), (404, json!(10003)));
    sim.shutdown().await;
}

#[tokio::test]
async fn roles_created_assigned_and_deleted_over_rest_are_dispatched() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let (status, _, role) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{}/roles", seed::GUILD_ID),
        Some(json!({"name": "room"})),
    )
    .await;
    assert_eq!(status, 200);
    let rid = role["id"].as_str().expect("id").to_owned();
    assert_eq!(
        gw.dispatch("GUILD_ROLE_CREATE").await["d"]["role"]["id"],
        rid
    );
    let bob = seed::USERS[1].0;
    let (status, _, _) = api(
        &sim,
        Method::PUT,
        &format!("/guilds/{}/members/{bob}/roles/{rid}", seed::GUILD_ID),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let upd = gw.dispatch("GUILD_MEMBER_UPDATE").await;
    assert_eq!(upd["d"]["roles"], json!([rid]));
    let (status, _, _) = api(
        &sim,
        Method::DELETE,
        &format!("/guilds/{}/roles/{rid}", seed::GUILD_ID),
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(gw.dispatch("GUILD_ROLE_DELETE").await["d"]["role_id"], rid);
    assert!(sim.member_roles(seed::GUILD_ID, bob).is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_rest_move_is_dispatched_and_moving_someone_not_in_voice_gets_40032() {
    let sim = start_default().await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let carol = seed::USERS[2].0;
    let path = format!("/guilds/{}/members/{carol}", seed::GUILD_ID);
    let (status, _, body) = api(
        &sim,
        Method::PATCH,
        &path,
        Some(json!({"channel_id": seed::LOBBY_CHANNEL_ID.to_string()})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"message": "Target user is not connected to voice", "code": 40032})
    );
    sim.connect_voice(carol, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    gw.dispatch("VOICE_STATE_UPDATE").await;
    let (status, _, _) = api(
        &sim,
        Method::PATCH,
        &path,
        Some(json!({"channel_id": seed::GAMING_CHANNEL_ID.to_string()})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        gw.dispatch("VOICE_STATE_UPDATE").await["d"]["channel_id"],
        seed::GAMING_CHANNEL_ID.to_string()
    );
    let (status, _, _) = api(
        &sim,
        Method::PATCH,
        &path,
        Some(json!({"channel_id": null})),
    )
    .await;
    assert_eq!(status, 200);
    assert!(gw.dispatch("VOICE_STATE_UPDATE").await["d"]["channel_id"].is_null());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bot_move_ignores_user_limit_but_a_user_cannot_join_a_full_channel() {
    let sim = start_default().await;
    let (_, _, ch) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{}/channels", seed::GUILD_ID),
        Some(json!({"name": "duo", "type": 2, "user_limit": 1})),
    )
    .await;
    let duo: u64 = ch["id"].as_str().expect("id").parse().expect("u64");
    let (a, b) = (seed::USERS[0].0, seed::USERS[1].0);
    sim.connect_voice(a, duo).expect("first fits");
    assert_eq!(
        sim.connect_voice(b, duo).expect_err("full").code(),
        "channel_full"
    );
    sim.connect_voice(b, seed::LOBBY_CHANNEL_ID).expect("lobby");
    let (status, _, _) = api(
        &sim,
        Method::PATCH,
        &format!("/guilds/{}/members/{b}", seed::GUILD_ID),
        Some(json!({"channel_id": duo.to_string()})),
    )
    .await;
    assert_eq!(status, 200, "MOVE_MEMBERS bypasses user_limit");
    sim.shutdown().await;
}

#[tokio::test]
async fn private_channel_overwrites_decide_who_may_join() {
    let sim = start_default().await;
    let g = seed::GUILD_ID;
    let (_, _, role) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{g}/roles"),
        Some(json!({"name": "room"})),
    )
    .await;
    let rid = role["id"].as_str().expect("id").to_owned();
    let dave = seed::USERS[3].0;
    let erin = seed::USERS[4].0;
    let (_, _, ch) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{g}/channels"),
        Some(json!({"name": "private", "type": 2, "permission_overwrites": [
            {"id": g.to_string(), "type": 0, "allow": "0", "deny": ((1u64 << 10) | (1u64 << 20)).to_string()},
            {"id": rid, "type": 0, "allow": ((1u64 << 10) | (1u64 << 20)).to_string(), "deny": "0"},
            {"id": erin.to_string(), "type": 1, "allow": (1u64 << 10).to_string(), "deny": "0"},
        ]})),
    )
    .await;
    let private: u64 = ch["id"].as_str().expect("id").parse().expect("u64");
    let err = sim.connect_voice(dave, private).expect_err("no role");
    assert_eq!(err.code(), "missing_permission");
    assert!(err.to_string().contains("VIEW_CHANNEL"), "{err}");
    let err = sim
        .connect_voice(erin, private)
        .expect_err("can see, cannot connect");
    assert!(err.to_string().contains("CONNECT"), "{err}");
    let (status, _, _) = api(
        &sim,
        Method::PUT,
        &format!("/guilds/{g}/members/{dave}/roles/{rid}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    sim.connect_voice(dave, private)
        .expect("the role lets dave in");
    sim.shutdown().await;
}

#[tokio::test]
async fn adding_a_member_needs_a_valid_guilds_join_token_of_that_user() {
    let sim = start_default().await;
    let gina = sim.create_user("gina").expect("user");
    let path = format!("/guilds/{}/members/{gina}", seed::GUILD_ID);
    let (status, _, body) = api(
        &sim,
        Method::PUT,
        &path,
        Some(json!({"access_token": "bogus"})),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (403, json!(50025)));
    let token = access_token(&sim, gina).await;
    let (mut gw, _) = Gw::ready(&sim).await;
    gw.dispatch("GUILD_CREATE").await;
    let (status, _, body) = api(
        &sim,
        Method::PUT,
        &path,
        Some(json!({"access_token": token})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(body["user"]["id"], gina.to_string());
    assert_eq!(
        gw.dispatch("GUILD_MEMBER_ADD").await["d"]["user"]["id"],
        gina.to_string()
    );
    let (status, _, _) = api(
        &sim,
        Method::PUT,
        &path,
        Some(json!({"access_token": token})),
    )
    .await;
    assert_eq!(status, 204);
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_404_and_405() {
    let sim = start_default().await;
    let (status, _, _) = api(&sim, Method::GET, "/nothing/here", None).await;
    assert_eq!(status, 404);
    let (status, _, _) = api(&sim, Method::POST, "/gateway", None).await;
    assert_eq!(status, 405);
    let (status, _, body) = api(&sim, Method::GET, "/guilds/1/members/2", None).await;
    assert_eq!((status, body["code"].clone()), (404, json!(10004)));
    sim.shutdown().await;
}

#[tokio::test]
async fn with_strict_bot_permissions_a_private_channel_must_grant_the_bot_access() {
    let sim = start(discord_sim::SimConfig {
        strict_bot_permissions: true,
        ..test_config()
    })
    .await;
    let g = seed::GUILD_ID;
    let hide = ((1u64 << 10) | (1u64 << 20)).to_string();
    let create = |extra: Vec<serde_json::Value>| {
        let mut ow = vec![json!({"id": g.to_string(), "type": 0, "allow": "0", "deny": hide})];
        ow.extend(extra);
        json!({"name": "private", "type": 2, "permission_overwrites": ow})
    };
    let (_, _, locked) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{g}/channels"),
        Some(create(vec![])),
    )
    .await;
    let locked = locked["id"].as_str().expect("id").to_owned();
    let (status, _, body) = api(&sim, Method::GET, &format!("/channels/{locked}"), None).await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, json!(50001)),
        "the bot locked itself out"
    );
    let bob = seed::USERS[1].0;
    sim.connect_voice(bob, seed::LOBBY_CHANNEL_ID)
        .expect("join");
    let (status, _, body) = api(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/members/{bob}"),
        Some(json!({"channel_id": locked})),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (403, json!(50001)));

    let bot = sim.config().bot_user_id.to_string();
    let grant = json!({"id": bot, "type": 1, "allow": hide, "deny": "0"});
    let (_, _, open) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{g}/channels"),
        Some(create(vec![grant])),
    )
    .await;
    let open = open["id"].as_str().expect("id").to_owned();
    let (status, _, _) = api(
        &sim,
        Method::PATCH,
        &format!("/guilds/{g}/members/{bob}"),
        Some(json!({"channel_id": open})),
    )
    .await;
    assert_eq!(
        status, 200,
        "a member overwrite for the bot lets it move people in"
    );
    sim.shutdown().await;
}
