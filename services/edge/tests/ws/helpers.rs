//! Test harness: a private NATS, edges on port 0, rooms in KV, sessions, WebSocket clients.
//! Shared by the `ws` and `http` test binaries; each uses a part of it.
#![allow(dead_code)]

use std::time::Duration;

use async_nats::jetstream;
use edge::session::StoredSession;
use edge::{Application, Settings};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use voicerooms_contract::command::{RoomMember, RoomState, RoomView};
use voicerooms_contract::event::{Event, JoinedVia, VoiceFlags, VoiceJoined, VoiceLeft};
use voicerooms_contract::{GuildId, RoleId, RoomEvent, RoomId, UserId, UserRef};
use voicerooms_platform::nats::{ensure_kv, ensure_rooms_stream};
use voicerooms_testkit::NatsServer;

pub const SESSION_KEY: &str = "test-session-key-0123456789abcdef0123456789";
pub const GUILD: u64 = 200000000000000001;

pub fn user(n: u64) -> UserRef {
    UserRef {
        id: UserId::new(300000000000000000 + n).unwrap(),
        username: format!("user{n}"),
        global_name: None,
        avatar: None,
    }
}

pub fn settings(nats: &NatsServer) -> Settings {
    let mut s = Settings::default();
    s.common.nats.url = nats.url();
    s.common.http.port = 0;
    s.common.shutdown.grace_period_ms = 2000;
    s.service.session.key = Some(voicerooms_platform::Secret::new(SESSION_KEY));
    s.service.websocket.auth_timeout_ms = 500;
    s
}

/// A running edge.
pub struct TestEdge {
    pub port: u16,
    pub sessions: edge::session::SessionStore,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestEdge {
    pub async fn start(settings: Settings) -> TestEdge {
        let app = Application::build(settings).await.unwrap();
        let port = app.port();
        let sessions = app.sessions();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let edge = TestEdge {
            port,
            sessions,
            stop: Some(stop),
            task: Some(task),
        };
        voicerooms_testkit::wait_until(Duration::from_secs(10), "edge ready", || async {
            voicerooms_testkit::conformance::status_of(&format!("http://127.0.0.1:{port}/readyz"))
                .await
                == Some(200)
        })
        .await;
        edge
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// A session cookie value for `user`, valid for `ttl_ms`.
    pub async fn login(&self, user: &UserRef, ttl_ms: u64) -> String {
        let now = voicerooms_contract::now_ms();
        self.sessions
            .create(&StoredSession {
                v: 1,
                user: user.clone(),
                access_token: "secret-access-token".into(),
                refresh_token: "secret-refresh-token".into(),
                access_expires_at: now + ttl_ms,
                scope: "identify guilds.join".into(),
                created_at: now,
                expires_at: now + ttl_ms,
                refreshing_until: None,
            })
            .await
            .unwrap()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.port)
    }
}

/// Stream, buckets and publishing, as gateway-listener and room-manager would.
pub struct World {
    pub js: jetstream::Context,
    pub rooms: jetstream::kv::Store,
}

impl World {
    pub async fn new(nats: &NatsServer) -> World {
        let js = jetstream::new(nats.client().await);
        ensure_rooms_stream(&js, &voicerooms_platform::settings::NatsSettings::default())
            .await
            .unwrap();
        let rooms = ensure_kv(&js, "rooms", 1, 1).await.unwrap();
        World { js, rooms }
    }

    /// Writes a room snapshot with `members` (the first is the owner) at sequence `seq`.
    pub async fn put_room(&self, room: u64, members: &[UserRef], seq: u64) -> RoomView {
        let view = RoomView {
            id: RoomId::new(room).unwrap(),
            guild: GuildId::new(GUILD).unwrap(),
            name: format!("room {room}"),
            owner: members[0].clone(),
            role: RoleId::new(9).unwrap(),
            capacity: 4,
            state: RoomState::Open,
            members: members
                .iter()
                .map(|u| RoomMember {
                    user: u.clone(),
                    via: JoinedVia::Invite,
                    joined_at: 1,
                })
                .collect(),
            voice: vec![],
            created_at: 1,
            last_activity: 1,
            invite_expires_at: 2,
            closing_deadline: None,
            seq,
        };
        self.rooms
            .put(room.to_string(), serde_json::to_vec(&view).unwrap().into())
            .await
            .unwrap();
        view
    }

    /// Publishes `event` in `room`; returns its stream sequence.
    pub async fn publish(&self, room: u64, event: Event) -> u64 {
        let event = RoomEvent::new(
            GuildId::new(GUILD).unwrap(),
            RoomId::new(room).unwrap(),
            voicerooms_contract::now_ms(),
            event,
        );
        self.js
            .publish(event.subject(), event.encode().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// Publishes `n` voice events in `room` quickly (acks awaited in batches); the last sequence.
    pub async fn voice_burst(&self, room: u64, who: &UserRef, n: usize) -> u64 {
        let mut last = 0;
        let mut acks = Vec::new();
        for i in 0..n {
            let event = RoomEvent::new(
                GuildId::new(GUILD).unwrap(),
                RoomId::new(room).unwrap(),
                voicerooms_contract::now_ms(),
                voice_event(who, i % 2 == 0),
            );
            acks.push(
                self.js
                    .publish(event.subject(), event.encode().into())
                    .await
                    .unwrap(),
            );
            if acks.len() >= 500 || i + 1 == n {
                for ack in acks.drain(..) {
                    last = last.max(ack.await.unwrap().sequence);
                }
            }
        }
        last
    }

    /// Consumers the `ROOMS` stream has now (catch-ups read through short-lived ones).
    pub async fn consumer_count(&self) -> usize {
        let mut stream = self.js.get_stream("ROOMS").await.unwrap();
        stream.info().await.unwrap().state.consumer_count
    }

    /// Deletes the `ROOMS` stream and creates it again (sequences restart: a new epoch).
    pub async fn recreate_stream(&self) {
        self.js.delete_stream("ROOMS").await.unwrap();
        ensure_rooms_stream(
            &self.js,
            &voicerooms_platform::settings::NatsSettings::default(),
        )
        .await
        .unwrap();
    }

    /// Publishes a voice join/leave of `who` in `room`; returns its stream sequence.
    pub async fn voice(&self, room: u64, who: &UserRef, joined: bool) -> u64 {
        self.publish(room, voice_event(who, joined)).await
    }
}

fn voice_event(who: &UserRef, joined: bool) -> Event {
    if joined {
        Event::VoiceJoined(VoiceJoined {
            user: who.clone(),
            flags: VoiceFlags::default(),
            moved_from: None,
        })
    } else {
        Event::VoiceLeft(VoiceLeft {
            user: who.clone(),
            moved_to: None,
        })
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the edge protocol.
pub struct Client {
    pub socket: Socket,
}

impl Client {
    /// Connects as a page served by the edge would: `Origin` is the edge's own origin.
    pub async fn connect(url: &str, cookie: Option<&str>) -> Client {
        let origin = own_origin(url);
        Client::connect_from(url, cookie, Some(&origin))
            .await
            .unwrap_or_else(|e| panic!("handshake refused: {e}"))
    }

    /// Connects with the given `Origin` (none: no header); the handshake error if refused.
    pub async fn connect_from(
        url: &str,
        cookie: Option<&str>,
        origin: Option<&str>,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut request = url.into_client_request().unwrap();
        if let Some(cookie) = cookie {
            request
                .headers_mut()
                .insert("Cookie", format!("vr_session={cookie}").parse().unwrap());
        }
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { socket })
    }

    /// Like [`Client::authed`] over a socket with a small receive buffer, so that a client that
    /// stops reading fills the server's queue quickly.
    pub async fn authed_small_buffer(port: u16, cookie: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let mut request = format!("ws://127.0.0.1:{port}/ws")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Cookie", format!("vr_session={cookie}").parse().unwrap());
        request.headers_mut().insert(
            "Origin",
            format!("http://127.0.0.1:{port}").parse().unwrap(),
        );
        let (socket, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        let mut client = Client { socket };
        let ack = client.next_json().await;
        assert_eq!(ack["event"], "auth.ok", "{ack}");
        client
    }

    /// Connects and authenticates with the cookie, waiting for `auth.ok`.
    pub async fn authed(url: &str, cookie: &str) -> Client {
        let mut client = Client::connect(url, Some(cookie)).await;
        let ack = client.next_json().await;
        assert_eq!(ack["event"], "auth.ok", "{ack}");
        client
    }

    pub async fn send(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::Text(text.to_owned()))
            .await
            .unwrap();
    }

    pub async fn subscribe(&mut self, room: u64, since: Option<u64>) -> Value {
        self.subscribe_at(room, since, None).await
    }

    /// Subscribes from `since` in stream `epoch` (as a `subscribed` ack gave it).
    pub async fn subscribe_at(
        &mut self,
        room: u64,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Value {
        let mut payload = json!({"room": room.to_string()});
        if let Some(since) = since {
            payload["since"] = json!(since);
        }
        if let Some(epoch) = epoch {
            payload["epoch"] = json!(epoch);
        }
        self.send(json!({"v":1,"type":"subscribe","payload":payload}))
            .await;
        self.next_json().await
    }

    /// The next JSON text frame (skipping pings), within 10 s.
    pub async fn next_json(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a frame within 10 s")
                .expect("socket open")
                .expect("valid frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next `n` event frames.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let frame = self.next_json().await;
            if frame["type"] == "event" {
                out.push(frame);
            }
        }
        out
    }

    /// The next message of any kind (None: the socket ended).
    pub async fn closed_or_frame(&mut self) -> Option<Message> {
        self.socket.next().await.and_then(|m| m.ok())
    }

    /// Vanishes without a close handshake: the TCP connection is reset.
    pub fn reset(self) {
        if let MaybeTlsStream::Plain(tcp) = self.socket.get_ref() {
            // Deprecated because a non-zero linger blocks on drop; zero resets at once.
            #[allow(deprecated)]
            tcp.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(self);
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed_with(&mut self, within: Duration) -> Option<CloseCode> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => panic!("not closed within {within:?}"),
                Ok(None) => return None,
                Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

/// `ws://host:port/...` → `http://host:port`, the origin of a page served by that edge.
pub fn own_origin(ws_url: &str) -> String {
    let rest = ws_url.strip_prefix("ws://").unwrap_or(ws_url);
    let host = rest.split('/').next().unwrap_or(rest);
    format!("http://{host}")
}

/// Sequences of event frames.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect()
}
