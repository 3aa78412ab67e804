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
use tokio::time::{interval, Instant, MissedTickBehavior};
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
    let over_limit = open > state.settings.max_connections;
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let cookie = req
        .cookie(state.sessions.cookie_name())
        .map(|c| c.value().to_owned());
    let stream = stream
        .max_frame_size(state.settings.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.settings.max_frame_bytes);
    actix_web::rt::spawn(async move {
        if over_limit {
            state.metrics.rejected_connections.inc();
            let mut session = session;
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
        } else {
            state.metrics.connections.inc();
            Connection::run(state.clone(), session, stream, cookie).await;
            state.metrics.connections.dec();
        }
        state.open.fetch_sub(1, Ordering::AcqRel);
    });
    Ok(response)
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
    async fn run(
        state: Arc<WsState>,
        session: actix_ws::Session,
        mut stream: actix_ws::AggregatedMessageStream,
        cookie: Option<String>,
    ) {
        let (outbox, inbox) = outbox(
            state.settings.max_queue_bytes,
            state.metrics.queued_bytes.clone(),
        );
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let writer =
            actix_web::rt::spawn(write_loop(session.clone(), inbox, state.metrics.clone()));
        let mut conn = Connection {
            id,
            state: state.clone(),
            outbox,
            auth: None,
            rooms: HashSet::new(),
            last_seen: Instant::now(),
        };
        let settings = &state.settings;
        let mut flow = Flow::Continue;
        if let Some(cookie) = cookie {
            flow = conn.authenticate(&cookie).await;
        }
        let auth_deadline = tokio::time::sleep(Duration::from_millis(settings.auth_timeout_ms));
        tokio::pin!(auth_deadline);
        let mut pings = interval(Duration::from_millis(settings.ping_interval_ms));
        pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
        pings.tick().await;
        let mut session_checks =
            interval(Duration::from_millis(settings.session_check_interval_ms));
        session_checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        session_checks.tick().await;
        let idle = Duration::from_millis(settings.idle_timeout_ms);

        while matches!(flow, Flow::Continue) {
            flow = tokio::select! {
                message = stream.recv() => match message {
                    Some(Ok(message)) => { conn.last_seen = Instant::now(); conn.on_message(message).await }
                    Some(Err(e)) => {
                        tracing::debug!(conn = conn.id, error = %e, "websocket protocol error");
                        conn.state.metrics.bad_frames.inc();
                        Flow::Close(close::TOO_BIG, "frame too large or invalid")
                    }
                    None => break,
                },
                _ = &mut auth_deadline, if conn.auth.is_none() => {
                    conn.state.metrics.auth_failures.inc();
                    conn.send(protocol::error_code("auth_timeout", "authentication timeout", None));
                    Flow::Close(close::UNAUTHENTICATED, "authentication timeout")
                }
                _ = pings.tick() => {
                    if conn.last_seen.elapsed() > idle {
                        Flow::Close(close::IDLE, "no answer to pings")
                    } else {
                        conn.outbox.control(Out::Ping);
                        Flow::Continue
                    }
                }
                _ = session_checks.tick(), if conn.auth.is_some() => conn.recheck_session().await,
                _ = conn.state.shutdown.cancelled() => Flow::Close(close::GOING_AWAY, "server shutting down"),
            };
            if conn.outbox.is_closed() {
                break;
            }
        }
        if let Flow::Close(code, why) = flow {
            conn.outbox.control(Out::Close(code, why));
        }
        for room in conn.rooms.drain() {
            state.hub.detach(room, conn.id).await;
        }
        if let Some(auth) = &conn.auth {
            state.release_user(auth.user.id);
        }
        drop(conn);
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

async fn write_loop(mut session: actix_ws::Session, mut inbox: Inbox, metrics: EdgeMetrics) {
    let overflow = inbox.overflow_signal();
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
