//! Shared test helpers: start a simulator, a raw gateway client, HTTP helpers, condition waits.

use std::time::Duration;

use discord_sim::{SimConfig, SimHandle, Simulator};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const INTENTS: u64 = (1 << 0) | (1 << 7) | (1 << 1);

pub async fn start(config: SimConfig) -> SimHandle {
    Simulator::start(config).await.expect("simulator starts")
}

/// The test config with a generous heartbeat timeout: raw clients in these tests do not
/// heartbeat, and a loaded CI machine must not turn that into a 4009 mid-test. Tests of the
/// timeout itself set their own config.
pub async fn start_default() -> SimHandle {
    start(test_config()).await
}

/// `SimConfig::for_tests()` with a heartbeat timeout of 10 s (see `start_default`) and no
/// identify window: these tests open many sessions of shard 0 one after another, and Discord's
/// one IDENTIFY per rate-limit key per 5 s would refuse them. Tests of identify pacing set the
/// window back to 5 s.
pub fn test_config() -> SimConfig {
    SimConfig {
        heartbeat_timeout_factor: 20.0,
        identify_window: Duration::ZERO,
        ..SimConfig::for_tests()
    }
}

/// Polls `cond` until it holds or `within` passes; returns whether it held.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn bot_auth(sim: &SimHandle) -> String {
    format!("Bot {}", sim.config().bot_token)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// What the raw client saw instead of a message.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// A close frame with this code.
    Closed(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
    Timeout,
}

pub struct Gw {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub last_seq: Option<u64>,
}

impl Gw {
    pub async fn connect(url: &str) -> Gw {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{url}/?v=10&encoding=json"))
            .await
            .expect("gateway connects");
        Gw { ws, last_seq: None }
    }

    /// Connects and reads HELLO; returns the client and the heartbeat interval.
    pub async fn hello(url: &str) -> (Gw, u64) {
        let mut gw = Gw::connect(url).await;
        let hello = gw.recv().await.expect("hello");
        assert_eq!(hello["op"], 10, "first payload is HELLO: {hello}");
        let interval = hello["d"]["heartbeat_interval"].as_u64().expect("interval");
        (gw, interval)
    }

    /// Tears the socket down with a TCP reset (SO_LINGER 0), as a crashed client's kernel may.
    pub fn reset(self) {
        if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = self.ws.get_ref() {
            socket2::SockRef::from(tcp)
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER");
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        let _ = self.ws.send(m).await;
    }

    /// Next JSON payload within 5 s.
    pub async fn recv(&mut self) -> Result<Value, Ended> {
        self.recv_within(Duration::from_secs(5)).await
    }

    pub async fn recv_within(&mut self, within: Duration) -> Result<Value, Ended> {
        loop {
            let next = tokio::time::timeout(within, self.ws.next()).await;
            match next {
                Err(_) => return Err(Ended::Timeout),
                Ok(None) => return Err(Ended::Dropped),
                Ok(Some(Err(_))) => return Err(Ended::Dropped),
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).expect("server sends JSON");
                    if let Some(s) = v["s"].as_u64() {
                        self.last_seq = Some(s);
                    }
                    return Ok(v);
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Err(frame.map_or(Ended::Dropped, |f| Ended::Closed(u16::from(f.code))));
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads until a dispatch named `t`, skipping others (and heartbeat traffic).
    pub async fn dispatch(&mut self, t: &str) -> Value {
        loop {
            let v = self
                .recv()
                .await
                .unwrap_or_else(|e| panic!("waiting for {t}: {e:?}"));
            if v["op"] == 0 && v["t"] == t {
                return v;
            }
        }
    }

    /// Reads until the connection ends; returns how.
    pub async fn ended(&mut self) -> Ended {
        loop {
            match self.recv().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    pub async fn identify(&mut self, token: &str, intents: u64) {
        self.send(json!({"op": 2, "d": {"token": token, "intents": intents, "properties": {"os": "linux", "browser": "test", "device": "test"}}}))
            .await;
    }

    pub async fn identify_shard(&mut self, token: &str, shard: [u64; 2]) {
        self.send(json!({"op": 2, "d": {"token": token, "intents": INTENTS, "shard": shard, "properties": {"os": "linux", "browser": "test", "device": "test"}}}))
            .await;
    }

    /// HELLO + IDENTIFY + READY; returns (client, session_id).
    pub async fn ready(sim: &SimHandle) -> (Gw, String) {
        let (mut gw, _) = Gw::hello(sim.gateway_url()).await;
        gw.identify(&sim.config().bot_token, INTENTS).await;
        let ready = gw.dispatch("READY").await;
        let sid = ready["d"]["session_id"]
            .as_str()
            .expect("session id")
            .to_owned();
        (gw, sid)
    }

    pub async fn close(mut self, code: u16) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::from(code),
                reason: "".into(),
            }))
            .await;
        // Drain until the server answers the close.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

pub const REDIRECT: &str = "http://localhost:3000/callback";

/// Query parameters of a redirect `Location`.
pub fn location_params(resp: &reqwest::Response) -> std::collections::HashMap<String, String> {
    let loc = resp
        .headers()
        .get("location")
        .and_then(|h| h.to_str().ok())
        .expect("redirect location")
        .to_owned();
    let query = loc
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    serde_urlencoded::from_str(&query).expect("query")
}

/// Runs /oauth2/authorize for `user` and returns the code.
pub async fn authorize_code(sim: &SimHandle, user: u64, extra: &str) -> String {
    let url = format!(
        "{}/oauth2/authorize?response_type=code&client_id={}&scope=identify%20guilds%20guilds.join&state=s1&redirect_uri={}&sim_user={user}{extra}",
        sim.http_url(),
        sim.config().oauth.client_id,
        REDIRECT
    );
    let resp = http().get(url).send().await.expect("authorize");
    assert_eq!(resp.status(), 302);
    let p = location_params(&resp);
    assert_eq!(p.get("state").map(String::as_str), Some("s1"));
    p.get("code")
        .cloned()
        .unwrap_or_else(|| panic!("code in {p:?}"))
}

/// POSTs a form to the token endpoint with body client credentials.
pub async fn token_request(sim: &SimHandle, form: &[(&str, &str)]) -> (u16, Value) {
    let mut all: Vec<(&str, &str)> = form.to_vec();
    all.push(("client_id", &sim.config().oauth.client_id));
    all.push(("client_secret", &sim.config().oauth.client_secret));
    let resp = http()
        .post(format!("{}/api/oauth2/token", sim.http_url()))
        .form(&all)
        .send()
        .await
        .expect("token");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

/// A fresh access token for `user` (scopes identify, guilds, guilds.join).
pub async fn access_token(sim: &SimHandle, user: u64) -> String {
    let code = authorize_code(sim, user, "").await;
    let (status, body) = token_request(
        sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().expect("token").to_owned()
}

/// A bot-authenticated REST request; returns (status, headers, JSON body or null).
pub async fn api(
    sim: &SimHandle,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = http()
        .request(method, format!("{}{path}", sim.api_url()))
        .header("Authorization", bot_auth(sim));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).expect("JSON body")
    };
    (status, headers, v)
}

pub fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}
