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

pub async fn start_default() -> SimHandle {
    start(SimConfig::for_tests()).await
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
