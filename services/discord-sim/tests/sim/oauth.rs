//! OAuth2: authorize, both grants, expiry, reuse, rotation, PKCE, revocation, bearer calls.

use std::time::Duration;

use base64::Engine;
use discord_sim::seed;
use sha2::Digest;

use crate::helpers::*;

const ALICE: u64 = seed::USERS[0].0;

async fn me(sim: &discord_sim::SimHandle, token: &str, path: &str) -> (u16, serde_json::Value) {
    let resp = http()
        .get(format!("{}{path}", sim.http_url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("get");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test]
async fn the_code_grant_issues_tokens_that_work_on_users_me_under_both_prefixes() {
    let sim = start_default().await;
    let code = authorize_code(&sim, ALICE, "").await;
    let (status, body) = token_request(
        &sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 604_800);
    assert_eq!(body["scope"], "identify guilds guilds.join");
    let token = body["access_token"].as_str().expect("token");
    for path in ["/api/users/@me", "/api/v10/users/@me"] {
        let (status, user) = me(&sim, token, path).await;
        assert_eq!(status, 200);
        assert_eq!(user["username"], "alice");
    }
    let (status, guilds) = me(&sim, token, "/api/users/@me/guilds").await;
    assert_eq!(status, 200);
    assert_eq!(guilds[0]["id"], seed::GUILD_ID.to_string());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_code_can_be_used_once() {
    let sim = start_default().await;
    let code = authorize_code(&sim, ALICE, "").await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];
    assert_eq!(token_request(&sim, &form).await.0, 200);
    let (status, body) = token_request(&sim, &form).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_expired_code_is_an_invalid_grant() {
    let mut c = test_config();
    c.oauth.code_lifetime = Duration::from_millis(100);
    let sim = start(c).await;
    let code = authorize_code(&sim, ALICE, "").await;
    tokio::time::sleep(Duration::from_millis(150)).await; // letting the code expire is the behaviour under test
    let (status, body) = token_request(
        &sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn refresh_rotates_the_refresh_token_and_reuse_is_an_invalid_grant() {
    let sim = start_default().await;
    let code = authorize_code(&sim, ALICE, "").await;
    let (_, first) = token_request(
        &sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    let rt = first["refresh_token"].as_str().expect("rt").to_owned();
    let (status, second) = token_request(
        &sim,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_ne!(second["access_token"], first["access_token"]);
    let (status, body) = token_request(
        &sim,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn access_and_refresh_tokens_expire_after_their_configured_lifetimes() {
    let mut c = test_config();
    c.oauth.access_token_lifetime = Duration::from_secs(1);
    c.oauth.refresh_token_lifetime = Duration::from_secs(2);
    let sim = start(c).await;
    let code = authorize_code(&sim, ALICE, "").await;
    let (_, t) = token_request(
        &sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    let access = t["access_token"].as_str().expect("a").to_owned();
    assert_eq!(me(&sim, &access, "/api/users/@me").await.0, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await; // expiry is the behaviour under test
    assert_eq!(me(&sim, &access, "/api/users/@me").await.0, 401);
    let (status, body) = token_request(
        &sim,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t["refresh_token"].as_str().expect("r")),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn pkce_s256_is_verified_at_the_token_endpoint() {
    let sim = start_default().await;
    let verifier = "a".repeat(20) + &"b".repeat(30);
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    let extra = format!("&code_challenge={challenge}&code_challenge_method=S256");
    let code = authorize_code(&sim, ALICE, &extra).await;
    let base = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];
    let mut wrong = base.to_vec();
    let bad = "c".repeat(50);
    wrong.push(("code_verifier", &bad));
    let (status, body) = token_request(&sim, &wrong).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    // A failed attempt burns the code? No: Discord-like, the code stays until used; use it right.
    let code = authorize_code(&sim, ALICE, &extra).await;
    let mut right = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];
    right.push(("code_verifier", &verifier));
    assert_eq!(token_request(&sim, &right).await.0, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn client_credentials_are_accepted_by_basic_auth_and_refused_when_wrong() {
    let sim = start_default().await;
    let code = authorize_code(&sim, ALICE, "").await;
    let url = format!("{}/api/v10/oauth2/token", sim.http_url());
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];
    let bad = http()
        .post(&url)
        .basic_auth(&sim.config().oauth.client_id, Some("nope"))
        .form(&form)
        .send()
        .await
        .expect("post");
    assert_eq!(bad.status(), 401);
    let good = http()
        .post(&url)
        .basic_auth(
            &sim.config().oauth.client_id,
            Some(&sim.config().oauth.client_secret),
        )
        .form(&form)
        .send()
        .await
        .expect("post");
    assert_eq!(good.status(), 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn revoking_an_access_token_revokes_its_refresh_token_too() {
    let sim = start_default().await;
    let code = authorize_code(&sim, ALICE, "").await;
    let (_, t) = token_request(
        &sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    let access = t["access_token"].as_str().expect("a");
    let resp = http()
        .post(format!("{}/api/oauth2/token/revoke", sim.http_url()))
        .form(&[
            ("token", access),
            ("client_id", &sim.config().oauth.client_id),
            ("client_secret", &sim.config().oauth.client_secret),
        ])
        .send()
        .await
        .expect("revoke");
    assert_eq!(resp.status(), 200);
    assert_eq!(me(&sim, access, "/api/users/@me").await.0, 401);
    let (status, _) = token_request(
        &sim,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t["refresh_token"].as_str().expect("r")),
        ],
    )
    .await;
    assert_eq!(status, 400);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_login_user_comes_from_the_control_setting_or_defaults_to_the_first_seeded_user() {
    let sim = start_default().await;
    let authorize = |extra: &str| {
        format!(
            "{}/oauth2/authorize?response_type=code&client_id={}&scope=identify&state=x&redirect_uri={REDIRECT}{extra}",
            sim.http_url(),
            sim.config().oauth.client_id
        )
    };
    let resp = http().get(authorize("")).send().await.expect("get");
    let code = location_params(&resp)["code"].clone();
    assert_eq!(login_as(&sim, code).await, "alice");
    sim.set_next_login(seed::USERS[2].0);
    let resp = http().get(authorize("")).send().await.expect("get");
    let code = location_params(&resp)["code"].clone();
    assert_eq!(login_as(&sim, code).await, "carol");
    let resp = http()
        .get(authorize("&sim_user=dave"))
        .send()
        .await
        .expect("get");
    let code = location_params(&resp)["code"].clone();
    assert_eq!(login_as(&sim, code).await, "dave");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_denied_authorization_redirects_back_with_an_error_and_the_state() {
    let sim = start_default().await;
    sim.set_next_authorize_error("access_denied");
    let url = format!(
        "{}/oauth2/authorize?response_type=code&client_id={}&scope=identify&state=keep-me&redirect_uri={REDIRECT}",
        sim.http_url(),
        sim.config().oauth.client_id
    );
    let resp = http().get(url).send().await.expect("get");
    assert_eq!(resp.status(), 302);
    let p = location_params(&resp);
    assert_eq!(p["error"], "access_denied");
    assert_eq!(p["state"], "keep-me");
    assert!(!p.contains_key("code"));
    sim.shutdown().await;
}

async fn login_as(sim: &discord_sim::SimHandle, code: String) -> serde_json::Value {
    let (_, t) = token_request(
        sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    me(
        sim,
        t["access_token"].as_str().expect("t"),
        "/api/users/@me",
    )
    .await
    .1["username"]
        .clone()
}
