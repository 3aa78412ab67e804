//! The edge's HTTP side against the Discord simulator and a real nats-server: login with
//! Discord OAuth2 (code + PKCE), silent refresh, refresh failure, logout, the room API forwarded
//! over NATS, cross-site refusal, and no secret in any response or log line.

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
mod refresh;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use discord_sim::{seed, SimConfig, SimHandle, Simulator};
use futures::StreamExt;
use helpers::{settings, Client, TestEdge, World};
use reqwest::header::{COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use voicerooms_contract::command::{encode_reply, Done, RoomCommand};
use voicerooms_contract::{ApiError, ErrorCode};
use voicerooms_testkit::{free_port, NatsServer};

/// Every log line of this test binary, to scan for secrets.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter("debug")
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Stack {
    nats: NatsServer,
    sim: SimHandle,
    edge: TestEdge,
    base: String,
    http: reqwest::Client,
}

async fn stack() -> Stack {
    logs();
    let nats = NatsServer::start().await;
    World::new(&nats).await;
    let sim = Simulator::start(SimConfig::for_tests()).await.unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let edge = TestEdge::start(edge_settings(&nats, &sim, port)).await;
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    Stack {
        nats,
        sim,
        edge,
        base,
        http,
    }
}

/// An edge on `port` using the simulator's OAuth2 (every edge of a test shares the session key).
fn edge_settings(nats: &NatsServer, sim: &SimHandle, port: u16) -> edge::Settings {
    let base = format!("http://127.0.0.1:{port}");
    let mut s = settings(nats);
    s.common.http.port = port;
    s.service.oauth.client_id = sim.config().oauth.client_id.clone();
    s.service.oauth.client_secret = Some(voicerooms_platform::Secret::new(
        sim.config().oauth.client_secret.clone(),
    ));
    s.service.oauth.authorize_url = format!("{}/oauth2/authorize", sim.http_url());
    s.service.oauth.token_url = format!("{}/api/oauth2/token", sim.http_url());
    s.service.oauth.revoke_url = format!("{}/api/oauth2/token/revoke", sim.http_url());
    s.service.oauth.api_base = sim.api_url();
    s.service.oauth.redirect_url = format!("{base}/auth/callback");
    s.service.edge.default_guild = Some(voicerooms_contract::GuildId::new(seed::GUILD_ID).unwrap());
    s.service.edge.request_timeout_ms = 1000;
    s
}

fn cookie_value(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| {
            c[name.len() + 1..]
                .split(';')
                .next()
                .unwrap_or("")
                .to_owned()
        })
}

impl Stack {
    /// The whole browser dance; returns the session cookie value.
    async fn login_as(&self, user: u64, return_to: &str) -> String {
        self.sim.set_next_login(user);
        let start = self
            .http
            .get(format!(
                "{}/auth/login?return_to={}",
                self.base,
                urlencode(return_to)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(start.status(), 302);
        let flow = cookie_value(&start, "vr_oauth").expect("flow cookie");
        let authorize = start.headers()[LOCATION].to_str().unwrap().to_owned();
        assert!(
            authorize.contains("code_challenge_method=S256"),
            "{authorize}"
        );
        assert!(
            authorize.contains("scope=identify+guilds.join")
                || authorize.contains("scope=identify%20guilds.join")
        );
        let consent = self.http.get(&authorize).send().await.unwrap();
        assert_eq!(consent.status(), 302, "{:?}", consent.text().await);
        let callback = consent.headers()[LOCATION].to_str().unwrap().to_owned();
        assert!(callback.starts_with(&format!("{}/auth/callback", self.base)));
        let done = self
            .http
            .get(&callback)
            .header(COOKIE, format!("vr_oauth={flow}"))
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 303, "{:?}", done.text().await);
        assert_eq!(done.headers()[LOCATION], return_to);
        let set = done
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .find(|c| c.starts_with("vr_session="))
            .expect("session cookie");
        assert!(set.contains("HttpOnly"), "{set}");
        assert!(set.contains("SameSite=Lax"), "{set}");
        cookie_value(&done, "vr_session").unwrap()
    }

    async fn get(&self, path: &str, session: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header(COOKIE, format!("vr_session={session}"))
            .send()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str, session: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, format!("vr_session={session}"))
            .header(ORIGIN, &self.base)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Edits the stored session behind a cookie.
    async fn edit_session(
        &self,
        cookie: &str,
        edit: impl FnOnce(&mut edge::session::StoredSession),
    ) {
        let (id, mut session) = self.edge.sessions.load(cookie).await.unwrap();
        edit(&mut session);
        self.edge.sessions.update(&id, &session).await.unwrap();
    }
}

fn urlencode(s: &str) -> String {
    s.replace('/', "%2F")
}

#[tokio::test]
async fn login_with_discord_creates_a_session_and_returns_to_the_page() {
    let stack = stack().await;
    let (alice, _) = seed::USERS[0];
    let session = stack.login_as(alice, "/rooms/5").await;
    let me: Value = stack.get("/api/me", &session).await.json().await.unwrap();
    assert_eq!(me["user"]["id"], alice.to_string());
    assert_eq!(me["user"]["username"], "alice");
    // The player's token is where room-manager reads it, not in any response.
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let tokens = js.get_key_value("oauth_tokens").await.unwrap();
    let stored: Value =
        serde_json::from_slice(&tokens.get(alice.to_string()).await.unwrap().unwrap()).unwrap();
    let token = stored["access_token"].as_str().unwrap();
    assert!(stored["scope"].as_str().unwrap().contains("guilds.join"));
    assert!(!me.to_string().contains(token));
    // The session also opens the WebSocket.
    Client::authed(&stack.edge.ws_url(), &session).await;
}

#[tokio::test]
async fn a_tampered_state_or_a_missing_flow_cookie_is_refused() {
    let stack = stack().await;
    let start = stack
        .http
        .get(format!("{}/auth/login", stack.base))
        .send()
        .await
        .unwrap();
    let flow = cookie_value(&start, "vr_oauth").unwrap();
    let consent = stack
        .http
        .get(start.headers()[LOCATION].to_str().unwrap())
        .send()
        .await
        .unwrap();
    let callback = consent.headers()[LOCATION].to_str().unwrap().to_owned();
    let tampered = callback.replace("state=", "state=x");
    let refused = stack
        .http
        .get(&tampered)
        .header(COOKIE, format!("vr_oauth={flow}"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["code"],
        "oauth_state"
    );
    let no_cookie = stack.http.get(&callback).send().await.unwrap();
    assert_eq!(no_cookie.status(), 401);
    // Open redirects are not possible.
    let evil = stack
        .http
        .get(format!(
            "{}/auth/login?return_to=https://evil.example/",
            stack.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 302);
}

#[tokio::test]
async fn an_expired_access_token_is_refreshed_silently() {
    let stack = stack().await;
    let (bob, _) = seed::USERS[1];
    let session = stack.login_as(bob, "/").await;
    let (_, before) = stack.edge.sessions.load(&session).await.unwrap();
    stack
        .edit_session(&session, |s| s.access_expires_at = 0)
        .await;

    let me = stack.get("/api/me", &session).await;
    assert_eq!(me.status(), 200);
    let (_, after) = stack.edge.sessions.load(&session).await.unwrap();
    assert_ne!(
        after.access_token, before.access_token,
        "a new access token"
    );
    assert_ne!(
        after.refresh_token, before.refresh_token,
        "the refresh token rotated"
    );
    assert!(after.access_expires_at > voicerooms_contract::now_ms());
}

#[tokio::test]
async fn a_failed_refresh_answers_401_with_a_login_url_that_returns_to_the_page() {
    let stack = stack().await;
    let session = stack.login_as(seed::USERS[2].0, "/").await;
    stack
        .edit_session(&session, |s| {
            s.access_expires_at = 0;
            s.refresh_token = "revoked".into();
        })
        .await;
    let response = stack
        .http
        .get(format!("{}/api/me", stack.base))
        .header(COOKIE, format!("vr_session={session}"))
        .header("X-Return-To", "/rooms/7")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(
        body["error"]["login_url"],
        "/auth/login?return_to=%2Frooms%2F7"
    );
    // The session is gone.
    assert_eq!(stack.get("/api/me", &session).await.status(), 401);
}

#[tokio::test]
async fn logout_ends_the_session_and_needs_a_same_site_request() {
    let stack = stack().await;
    let session = stack.login_as(seed::USERS[3].0, "/").await;
    let cross_site = stack
        .http
        .post(format!("{}/auth/logout", stack.base))
        .header(COOKIE, format!("vr_session={session}"))
        .header(ORIGIN, "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    assert_eq!(stack.get("/api/me", &session).await.status(), 200);

    let out = stack.post("/auth/logout", &session, json!({})).await;
    assert_eq!(out.status(), 204);
    assert!(out.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("vr_session=;"));
    assert_eq!(stack.get("/api/me", &session).await.status(), 401);
}

#[tokio::test]
async fn the_room_api_forwards_to_room_manager_and_maps_its_errors() {
    let stack = stack().await;
    let session = stack.login_as(seed::USERS[0].0, "/").await;
    // Nobody answers yet.
    let none = stack.post("/api/rooms/1/leave", &session, json!({})).await;
    assert_eq!(none.status(), 503);
    assert_eq!(
        none.json::<Value>().await.unwrap()["error"]["code"],
        "unavailable"
    );

    // A stand-in room-manager: leave succeeds, close says not_owner.
    let nats = stack.nats.client().await;
    let mut leave = nats.subscribe("roommgr.v1.leave").await.unwrap();
    let mut close = nats.subscribe("roommgr.v1.close").await.unwrap();
    nats.flush().await.unwrap();
    let responder = tokio::spawn(async move {
        let request = leave.next().await.unwrap();
        let command: RoomCommand = serde_json::from_slice(&request.payload).unwrap();
        assert_eq!(command.requester.id.get(), seed::USERS[0].0);
        assert_eq!(command.room.get(), 42);
        nats.publish(request.reply.unwrap(), encode_reply(&Ok(Done {})).into())
            .await
            .unwrap();
        let request = close.next().await.unwrap();
        let err: Result<Done, ApiError> = Err(ApiError::new(
            ErrorCode::NotOwner,
            "only the owner can close",
        ));
        nats.publish(request.reply.unwrap(), encode_reply(&err).into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
    });
    let ok = stack.post("/api/rooms/42/leave", &session, json!({})).await;
    assert_eq!(ok.status(), 200);
    let refused = stack.post("/api/rooms/42/close", &session, json!({})).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["code"],
        "not_owner"
    );
    responder.await.unwrap();

    // Validation happens before anything is sent.
    let long = stack
        .post("/api/rooms", &session, json!({"name": "n".repeat(101)}))
        .await;
    assert_eq!(long.status(), 400);
    assert_eq!(
        long.json::<Value>().await.unwrap()["error"]["code"],
        "validation"
    );
    let unknown_field = stack
        .post("/api/rooms", &session, json!({"name": "ok", "admin": true}))
        .await;
    assert_eq!(unknown_field.status(), 400);
    let huge = stack
        .post(
            "/api/rooms/join",
            &session,
            json!({"invite": "x".repeat(64 * 1024)}),
        )
        .await;
    assert_eq!(huge.status(), 400);
    let bad_id = stack.get("/api/rooms/12.*", &session).await;
    assert_eq!(bad_id.status(), 400);
    // Cross-site writes are refused; reads without a session are 401.
    let cross = stack
        .http
        .post(format!("{}/api/rooms", stack.base))
        .header(COOKIE, format!("vr_session={session}"))
        .header(ORIGIN, "https://evil.example")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    assert_eq!(
        cross.json::<Value>().await.unwrap()["error"]["code"],
        "csrf"
    );
    let anonymous = stack
        .http
        .get(format!("{}/api/rooms", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    // The API describes itself.
    let spec: Value = stack
        .http
        .get(format!("{}/api/openapi.json", stack.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(spec["openapi"], "3.0.3");
    assert!(spec["paths"]["/api/rooms"]["post"].is_object());
}

#[tokio::test]
async fn no_response_frame_or_log_line_contains_a_token_or_secret() {
    let stack = stack().await;
    let (alice, _) = seed::USERS[0];
    let session = stack.login_as(alice, "/").await;
    stack
        .edit_session(&session, |s| s.access_expires_at = 0)
        .await;
    let me = stack.get("/api/me", &session).await.text().await.unwrap();
    let (_, stored) = stack.edge.sessions.load(&session).await.unwrap();
    let mut ws = Client::authed(&stack.edge.ws_url(), &session).await;
    ws.send(json!({"v":1,"type":"ping"})).await;
    let frames = ws.next_json().await.to_string();
    let bad_login = stack
        .http
        .get(format!("{}/auth/callback?code=x&state=y", stack.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    let secrets = [
        stored.access_token.as_str(),
        stored.refresh_token.as_str(),
        stack.sim.config().oauth.client_secret.as_str(),
        helpers::SESSION_KEY,
    ];
    for secret in secrets {
        assert!(!secret.is_empty());
        for (what, text) in [
            ("me", &me),
            ("frames", &frames),
            ("callback", &bad_login),
            ("logs", &logs),
        ] {
            assert!(!text.contains(secret), "{what} leaks a secret");
        }
    }
    assert!(logs.contains("logged in"), "logs were captured");
}

#[tokio::test]
async fn the_page_and_the_client_module_are_served_with_a_strict_policy_and_no_secret() {
    let stack = stack().await;
    for path in ["/", "/rooms/1187716447235293214", "/invite/abc.def"] {
        let res = stack
            .http
            .get(format!("{}{path}", stack.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let headers = res.headers().clone();
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        let body = res.text().await.unwrap();
        assert!(body.contains(r#"<script type="module" src="/static/app.js">"#));
    }
    for (path, kind, marker) in [
        ("/static/app.js", "text/javascript", "VoiceroomsClient"),
        ("/static/style.css", "text/css", "--accent"),
        (
            "/js/voicerooms.js",
            "text/javascript",
            "export class VoiceroomsClient",
        ),
    ] {
        let res = stack
            .http
            .get(format!("{}{path}", stack.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
        assert_eq!(res.headers()["cache-control"], "no-cache");
        let body = res.text().await.unwrap();
        assert!(body.contains(marker), "{path}");
        for secret in [
            "sim-client-secret",
            helpers::SESSION_KEY,
            "secret-access-token",
        ] {
            assert!(!body.contains(secret), "{path} contains a secret");
        }
    }
    let missing = stack
        .http
        .get(format!("{}/static/nope.js", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}
