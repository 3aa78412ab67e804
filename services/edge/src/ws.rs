//! One WebSocket connection: authentication, subscriptions, liveness and its writer.
//!
//! ```text
//! reader loop (this task)                        writer task
//!   frames from the client ──▶ handle ──┐          Inbox ──▶ socket (in order)
//!   auth deadline, pings, session checks ├─▶ Outbox ─┘   overflow ──▶ close 1008
//!   room pumps ──────────────────────────┘
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use bytestring::ByteString;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::{ErrorCode, Millis, RoomId, UserId, UserRef};

use crate::hub::{ConnId, Hub};
use crate::metrics::EdgeMetrics;
use crate::outbox::{outbox, Inbox, Out, Outbox, OverflowSignal};
use crate::protocol::{self, close, ClientMessage};
use crate::session::{SessionError, SessionStore};
use crate::WebSocketSettings;

/// What every connection shares.
pub struct WsState {
    pub hub: Hub,
    pub sessions: SessionStore,
    pub settings: WebSocketSettings,
    pub metrics: EdgeMetrics,
    pub shutdown: CancellationToken,
    next_id: AtomicU64,
    open: AtomicUsize,
    per_user: Mutex<std::collections::HashMap<UserId, usize>>,
}

impl WsState {
    pub fn new(
        hub: Hub,
        sessions: SessionStore,
        settings: WebSocketSettings,
        metrics: EdgeMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            hub,
            sessions,
            settings,
            metrics,
            shutdown,
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            per_user: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Counts a user's connection; false past the per-user limit.
    fn admit_user(&self, user: UserId) -> bool {
        let Ok(mut map) = self.per_user.lock() else {
            return false;
        };
        let count = map.entry(user).or_insert(0);
        if *count >= self.settings.max_connections_per_user {
            return false;
        }
        *count += 1;
        true
    }

    fn release_user(&self, user: UserId) {
        if let Ok(mut map) = self.per_user.lock() {
            if let Some(count) = map.get_mut(&user) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&user);
                }
            }
        }
    }
}

/// `GET /ws`: upgrades and spawns the connection.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<WsState>,
) -> Result<HttpResponse, actix_web::Error> {
    let state = state.into_inner();
    let open = state.open.fetch_add(1, Ordering::AcqRel) + 1;
    let mut open_slot = OpenSlot {
        state: state.clone(),
        admitted: false,
    };
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    if open > state.settings.max_connections {
        state.metrics.rejected_connections.inc();
        actix_web::rt::spawn(refuse(session, open_slot));
        return Ok(response);
    }
    let cookie = req
        .cookie(state.sessions.cookie_name())
        .map(|c| c.value().to_owned());
    let stream = stream
        .max_frame_size(state.settings.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.settings.max_frame_bytes);
    state.metrics.connections.inc();
    open_slot.admitted = true;
    actix_web::rt::spawn(Connection::run(open_slot, session, stream, cookie));
    Ok(response)
}

/// One place in the edge's connection count (and, once admitted, the connections gauge), given
/// back when dropped — also when the handshake fails.
struct OpenSlot {
    state: Arc<WsState>,
    admitted: bool,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        if self.admitted {
            self.state.metrics.connections.dec();
        }
        self.state.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Over the edge's connection limit: say so and close (4008).
async fn refuse(mut session: actix_ws::Session, _slot: OpenSlot) {
    let _ = session
        .text(protocol::error_code(
            "connection_limit",
            "connection limit exceeded",
            None,
        ))
        .await;
    let _ = session
        .close(Some(reason(
            close::CONNECTION_LIMIT,
            "connection limit exceeded",
        )))
        .await;
}

fn reason(code: u16, description: &str) -> CloseReason {
    CloseReason {
        code: CloseCode::from(code),
        description: Some(description.to_owned()),
    }
}

struct Authenticated {
    user: UserRef,
    cookie: String,
    expires_at: Millis,
}

struct Connection {
    id: ConnId,
    state: Arc<WsState>,
    outbox: Outbox,
    auth: Option<Authenticated>,
    rooms: HashSet<RoomId>,
    last_seen: Instant,
}

enum Flow {
    Continue,
    Close(u16, &'static str),
}

impl Connection {
    /// The connection's task: its reader loop (a writer task is spawned beside it).
    ///
    /// Not an `async fn`: the future lives as long as the connection, and an `async fn` keeps its
    /// arguments twice (as arguments and as the locals they are moved into); the block below
    /// captures each once. For the same reason the rarely taken awaits (authentication, session
    /// re-checks, client messages, the end) are boxed: inlined, their largest state would be
    /// reserved for the whole life of every connection (docs/BENCHMARKS.md, edge).
    fn run(
        slot: OpenSlot,
        session: actix_ws::Session,
        mut stream: actix_ws::AggregatedMessageStream,
        cookie: Option<String>,
    ) -> impl std::future::Future<Output = ()> {
        let state = slot.state.clone();
        let (outbox, inbox) = outbox(
            state.settings.max_queue_bytes,
            state.metrics.queued_bytes.clone(),
        );
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let writer = actix_web::rt::spawn(write_loop(session, inbox, state.clone()));
        let mut conn = Connection {
            id,
            state,
            outbox,
            auth: None,
            rooms: HashSet::new(),
            last_seen: Instant::now(),
        };
        async move {
            // One timer for the auth deadline, pings and session checks (memory per connection).
            let settings = &conn.state.settings;
            let started = Instant::now();
            let auth_deadline = started + Duration::from_millis(settings.auth_timeout_ms);
            let ping_every = Duration::from_millis(settings.ping_interval_ms);
            let check_every = Duration::from_millis(settings.session_check_interval_ms);
            let mut next_ping = started + ping_every;
            let mut next_check = started + check_every;
            let idle = Duration::from_millis(settings.idle_timeout_ms);
            let mut flow = Flow::Continue;
            if let Some(cookie) = cookie {
                flow = Box::pin(conn.authenticate(&cookie)).await;
            }
            let timer = tokio::time::sleep_until(next_ping.min(auth_deadline));
            tokio::pin!(timer);

            while matches!(flow, Flow::Continue) {
                flow = tokio::select! {
                    message = stream.recv() => match message {
                        Some(Ok(message)) => {
                            conn.last_seen = Instant::now();
                            Box::pin(conn.on_message(message)).await
                        }
                        Some(Err(e)) => {
                            tracing::debug!(conn = conn.id, error = %e, "websocket protocol error");
                            conn.state.metrics.bad_frames.inc();
                            Flow::Close(close::TOO_BIG, "frame too large or invalid")
                        }
                        None => break,
                    },
                    () = &mut timer => {
                        let now = Instant::now();
                        let mut flow = Flow::Continue;
                        if conn.auth.is_none() && now >= auth_deadline {
                            conn.state.metrics.auth_failures.inc();
                            conn.send(protocol::error_code("auth_timeout", "authentication timeout", None));
                            flow = Flow::Close(close::UNAUTHENTICATED, "authentication timeout");
                        } else if now >= next_ping {
                            // A late tick delays the next one (no burst of pings).
                            next_ping = now + ping_every;
                            if conn.last_seen.elapsed() > idle {
                                flow = Flow::Close(close::IDLE, "no answer to pings");
                            } else {
                                conn.outbox.control(Out::Ping);
                            }
                        }
                        if matches!(flow, Flow::Continue) && now >= next_check {
                            next_check = now + check_every;
                            if conn.auth.is_some() {
                                flow = Box::pin(conn.recheck_session()).await;
                            }
                        }
                        flow
                    },
                    _ = conn.state.shutdown.cancelled() => Flow::Close(close::GOING_AWAY, "server shutting down"),
                };
                if conn.outbox.is_closed() {
                    break;
                }
                let mut wake = next_ping.min(next_check);
                if conn.auth.is_none() {
                    wake = wake.min(auth_deadline);
                }
                if timer.deadline() != wake {
                    timer.as_mut().reset(wake);
                }
            }
            if let Flow::Close(code, why) = flow {
                conn.outbox.control(Out::Close(code, why));
            }
            Box::pin(conn.finish(writer)).await;
            drop(slot);
        }
    }

    /// Leaves the rooms, releases the user's slot and waits for the writer.
    async fn finish(mut self, writer: actix_web::rt::task::JoinHandle<()>) {
        for room in std::mem::take(&mut self.rooms) {
            self.state.hub.detach(room, self.id).await;
        }
        if let Some(auth) = &self.auth {
            self.state.release_user(auth.user.id);
        }
        drop(self);
        // The writer ends after the close frame, or when the socket is gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }

    fn send(&self, frame: ByteString) {
        self.outbox.push(&frame);
    }

    async fn on_message(&mut self, message: AggregatedMessage) -> Flow {
        match message {
            AggregatedMessage::Text(text) => match ClientMessage::parse(&text) {
                Ok(message) => self.on_client_message(message).await,
                Err(e) => {
                    self.state.metrics.bad_frames.inc();
                    self.send(protocol::error_code("invalid_frame", &e.to_string(), None));
                    Flow::Continue
                }
            },
            AggregatedMessage::Binary(_) => {
                self.state.metrics.bad_frames.inc();
                self.send(protocol::error_code(
                    "invalid_frame",
                    "binary frames are not supported; send JSON text",
                    None,
                ));
                Flow::Continue
            }
            AggregatedMessage::Ping(_) | AggregatedMessage::Pong(_) => Flow::Continue,
            AggregatedMessage::Close(_) => Flow::Close(close::NORMAL, "bye"),
        }
    }

    async fn on_client_message(&mut self, message: ClientMessage) -> Flow {
        match message {
            ClientMessage::Auth { session } => {
                if self.auth.is_some() {
                    self.send(protocol::error_code(
                        "already_authenticated",
                        "already authenticated",
                        None,
                    ));
                    return Flow::Continue;
                }
                self.authenticate(&session).await
            }
            ClientMessage::Ping => {
                self.send(protocol::ack("pong", None, serde_json::json!({})));
                Flow::Continue
            }
            _ if self.auth.is_none() => {
                self.send(protocol::error_code(
                    "unauthenticated",
                    "authenticate first",
                    None,
                ));
                Flow::Continue
            }
            ClientMessage::Subscribe { room, since } => {
                self.subscribe(room, since).await;
                Flow::Continue
            }
            ClientMessage::Unsubscribe { room } => {
                if self.rooms.remove(&room) {
                    self.state.hub.detach(room, self.id).await;
                }
                self.send(protocol::ack(
                    "unsubscribed",
                    Some(room),
                    serde_json::json!({}),
                ));
                Flow::Continue
            }
        }
    }

    async fn authenticate(&mut self, cookie: &str) -> Flow {
        match self.state.sessions.load(cookie).await {
            Ok((_, session)) => {
                if !self.state.admit_user(session.user.id) {
                    self.state.metrics.rejected_connections.inc();
                    self.send(protocol::error_code(
                        "connection_limit",
                        "connection limit exceeded for this user",
                        None,
                    ));
                    return Flow::Close(close::CONNECTION_LIMIT, "connection limit exceeded");
                }
                self.send(protocol::ack(
                    "auth.ok",
                    None,
                    protocol::AuthOk {
                        user: &session.user,
                        session_expires_at: session.expires_at,
                    },
                ));
                self.auth = Some(Authenticated {
                    user: session.user,
                    cookie: cookie.to_owned(),
                    expires_at: session.expires_at,
                });
                Flow::Continue
            }
            Err(e) => {
                self.state.metrics.auth_failures.inc();
                let (code, message) = match e {
                    SessionError::Expired => ("session_expired", "session expired"),
                    SessionError::Store(_) => ("unavailable", "session store unavailable"),
                    SessionError::BadCookie | SessionError::NotFound => {
                        ("invalid_token", "invalid token")
                    }
                };
                self.send(protocol::error_code(code, message, None));
                if matches!(e, SessionError::Expired) {
                    Flow::Close(close::SESSION_EXPIRED, "session expired")
                } else {
                    Flow::Close(close::UNAUTHENTICATED, "authentication failed")
                }
            }
        }
    }

    async fn recheck_session(&mut self) -> Flow {
        let Some(auth) = &self.auth else {
            return Flow::Continue;
        };
        match self.state.sessions.load(&auth.cookie).await {
            Ok((_, session)) => {
                if let Some(auth) = self.auth.as_mut() {
                    auth.expires_at = session.expires_at;
                }
                Flow::Continue
            }
            Err(SessionError::Store(e)) => {
                // Do not drop players because NATS blinked; check again next time.
                tracing::warn!(conn = self.id, error = %e, "session re-check failed");
                Flow::Continue
            }
            Err(_) => {
                self.send(protocol::error_code(
                    "session_expired",
                    "session expired; log in again",
                    None,
                ));
                Flow::Close(close::SESSION_EXPIRED, "session expired")
            }
        }
    }

    async fn subscribe(&mut self, room: RoomId, since: Option<u64>) {
        let Some(user) = self.auth.as_ref().map(|a| a.user.id) else {
            return;
        };
        if !self.rooms.contains(&room) && self.rooms.len() >= self.state.settings.max_subscriptions
        {
            self.send(protocol::error_code(
                "subscription_limit",
                "too many subscriptions on this connection",
                Some(room),
            ));
            return;
        }
        let view = match self.state.hub.room_view(room).await {
            Ok(Some(view)) => view,
            Ok(None) => {
                self.send(protocol::error(
                    ErrorCode::RoomNotFound,
                    "no such room",
                    Some(room),
                ));
                return;
            }
            Err(e) => {
                self.send(protocol::error(e.code, &e.message, Some(room)));
                return;
            }
        };
        let allowed = view.owner.id == user || view.members.iter().any(|m| m.user.id == user);
        if !allowed {
            self.send(protocol::error(
                ErrorCode::NotMember,
                "only the room's members and owner can follow it",
                Some(room),
            ));
            return;
        }
        if self.rooms.contains(&room) {
            // Re-subscribing (e.g. with a new `since`): start over.
            self.state.hub.detach(room, self.id).await;
        }
        match self
            .state
            .hub
            .attach(self.id, self.outbox.clone(), view, since)
            .await
        {
            Ok(()) => {
                self.rooms.insert(room);
            }
            Err(e) => {
                self.rooms.remove(&room);
                self.send(protocol::error(e.code, &e.message, Some(room)));
            }
        }
    }
}

/// What sending one frame came to.
enum Sent {
    Ok,
    /// The socket is gone.
    Closed,
    /// The queue overflowed while we waited on the socket.
    Overflowed,
}

async fn send_frame(
    session: &mut actix_ws::Session,
    inbox: &Inbox,
    overflow: &OverflowSignal,
    frame: ByteString,
) -> Sent {
    let len = frame.len();
    // A client that stops reading blocks this send; the overflow notice unblocks us.
    let sent = tokio::select! {
        biased;
        _ = overflow.wait() => None,
        r = session.text(frame) => Some(r),
    };
    inbox.written(len);
    match sent {
        Some(Ok(())) => Sent::Ok,
        Some(Err(_)) => Sent::Closed,
        None => Sent::Overflowed,
    }
}

/// The writer task. Not an `async fn`, so that its arguments are held once (see
/// [`Connection::run`]).
fn write_loop(
    mut session: actix_ws::Session,
    mut inbox: Inbox,
    state: Arc<WsState>,
) -> impl std::future::Future<Output = ()> {
    let overflow = inbox.overflow_signal();
    async move {
        let metrics = &state.metrics;
        loop {
            let out = tokio::select! {
                biased;
                _ = overflow.wait() => None,
                out = inbox.rx.recv() => out,
            };
            let Some(out) = out else { break };
            if inbox.is_overflowed() {
                break;
            }
            let sent = match out {
                Out::Frame(frame) => send_frame(&mut session, &inbox, &overflow, frame).await,
                Out::Event(frame, received_at) => {
                    let sent = send_frame(&mut session, &inbox, &overflow, frame).await;
                    let now = voicerooms_contract::now_ms();
                    metrics
                        .delivery_latency
                        .observe(now.saturating_sub(received_at) as f64 / 1000.0);
                    sent
                }
                Out::Ping => match session.ping(b"").await {
                    Ok(()) => Sent::Ok,
                    Err(_) => Sent::Closed,
                },
                Out::Close(code, why) => {
                    let _ = session.close(Some(reason(code, why))).await;
                    return;
                }
            };
            match sent {
                Sent::Ok => {}
                Sent::Closed => return,
                Sent::Overflowed => break,
            }
        }
        if inbox.is_overflowed() {
            metrics.slow_consumer_closes.inc();
            tracing::info!("closing a slow consumer (outgoing queue over its limit)");
            // Bounded: a client that never reads again cannot hold this task.
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                session.close(Some(reason(
                    close::SLOW_CONSUMER,
                    "outgoing queue over its limit; reconnect with since",
                ))),
            )
            .await;
        }
    }
}
