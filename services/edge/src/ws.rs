//! One WebSocket connection: the upgrade's origin check, authentication, subscriptions and
//! liveness in one task per connection; its writing in the response body.
//!
//! ```text
//! the connection's task
//!   frames from the client ──▶ handle ──┐
//!   auth deadline, pings, session checks ├─▶ Outbox ──▶ OutboxBody ──▶ socket (in order)
//!   room pumps (other tasks) ────────────┘      │       (actix-http's dispatcher writes it)
//!                                    overflow ──▶ close 1008
//!   session ended (any edge) ──▶ kick ──▶ close 4003
//! ```
//!
//! Every count a connection takes — the edge's connection count, the user's slot, its place in
//! the session index — is held by a guard that gives it back when dropped, so no path out of a
//! connection (a panic included) can leak one.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, ProtocolError};
use bytestring::ByteString;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicerooms_contract::{ErrorCode, Millis, RoomId, UserId, UserRef};
use voicerooms_platform::nats::LazyBucket;
use voicerooms_platform::retry::{Backoff, Jitter};

use crate::hub::{Attached, ConnId, Hub, Since, Subscription};
use crate::metrics::EdgeMetrics;
use crate::outbox::{outbox, reason, Inbox, Kick, Out, Outbox, Wrote};
use crate::protocol::{self, close, ClientMessage, Epoch};
use crate::session::{SessionError, SessionStore};
use crate::WebSocketSettings;

/// What every connection shares.
pub struct WsState {
    pub hub: Hub,
    pub sessions: SessionStore,
    pub settings: WebSocketSettings,
    pub metrics: EdgeMetrics,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
    allowed_origins: Vec<String>,
    next_id: AtomicU64,
    open: AtomicUsize,
    per_user: Mutex<HashMap<UserId, usize>>,
    /// Open connections by session id, to close them when the session ends.
    by_session: Mutex<HashMap<String, Vec<Outbox>>>,
}

/// Closes the connections of a session that ended.
const SESSION_ENDED: Kick = Kick {
    code: close::SESSION_EXPIRED,
    error: "session_ended",
    message: "your session ended (logged out); log in again",
};

impl WsState {
    pub fn new(
        hub: Hub,
        sessions: SessionStore,
        settings: WebSocketSettings,
        metrics: EdgeMetrics,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        allowed_origins: Vec<String>,
    ) -> Self {
        Self {
            hub,
            sessions,
            settings,
            metrics,
            shutdown,
            tasks,
            allowed_origins,
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            per_user: Mutex::new(HashMap::new()),
            by_session: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one of the user's connection slots; `None` past the per-user limit.
    fn admit_user(self: &Arc<Self>, user: UserId) -> Option<UserSlot> {
        let mut map = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        let count = map.entry(user).or_insert(0);
        if *count >= self.settings.max_connections_per_user {
            return None;
        }
        *count = count.saturating_add(1);
        Some(UserSlot {
            state: self.clone(),
            user,
        })
    }

    /// Indexes a connection under its session, so that the session's end closes it.
    fn register_session(self: &Arc<Self>, session: String, outbox: &Outbox) -> SessionSlot {
        self.by_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(session.clone())
            .or_default()
            .push(outbox.clone());
        SessionSlot {
            state: self.clone(),
            session,
            outbox: outbox.clone(),
        }
    }

    /// Closes every connection of `session` on this edge (4003 after `error session_ended`).
    pub fn end_session(&self, session: &str) {
        let ended = self
            .by_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(session)
            .unwrap_or_default();
        for outbox in &ended {
            self.metrics.sessions_ended.inc();
            outbox.kick(SESSION_ENDED);
        }
        if !ended.is_empty() {
            tracing::info!(
                connections = ended.len(),
                "session ended; its connections close"
            );
        }
    }

    /// Watches the `sessions` bucket and closes the connections of every session deleted on any
    /// edge (logout, failed refresh), within moments. The periodic session re-check of each
    /// connection stays the fallback while the watch is down.
    pub async fn watch_sessions(self: Arc<Self>, bucket: Arc<LazyBucket>) {
        use async_nats::jetstream::kv::Operation;
        // 50-100 ms after a failure, doubling to 2.5-5 s; back to the start once watching.
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
            .with_jitter(Jitter::Equal)
            .schedule();
        loop {
            let watch = match bucket.get().await {
                Ok(store) => store.watch_all().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match watch {
                Ok(mut entries) => {
                    retry.reset();
                    loop {
                        let entry = tokio::select! {
                            _ = self.shutdown.cancelled() => return,
                            entry = entries.next() => entry,
                        };
                        match entry {
                            Some(Ok(entry)) => {
                                if matches!(entry.operation, Operation::Delete | Operation::Purge) {
                                    self.end_session(&entry.key);
                                }
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "session watch failed; restarting it");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch sessions yet"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry.next_delay().unwrap_or(Duration::from_secs(5))) => {}
            }
        }
    }
}

/// One of a user's connection slots, given back on drop.
struct UserSlot {
    state: Arc<WsState>,
    user: UserId,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self
            .state
            .per_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// A connection's place in the session index, removed on drop.
struct SessionSlot {
    state: Arc<WsState>,
    session: String,
    outbox: Outbox,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut map = self
            .state
            .by_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = map.get_mut(&self.session) {
            list.retain(|o| !o.same_connection(&self.outbox));
            if list.is_empty() {
                map.remove(&self.session);
            }
        }
    }
}

/// `GET /ws`: checks the origin, then upgrades and spawns the connection.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<WsState>,
) -> Result<HttpResponse, actix_web::Error> {
    let state = state.into_inner();
    // The same rule as state-changing requests: a cookie-authenticated socket opened by another
    // site (or another port of this host) would act as the player.
    if let Err(refused) = crate::http::check_origin(&req, &state.allowed_origins) {
        state.metrics.refused_origins.inc();
        return Err(refused.into());
    }
    let open = state.open.fetch_add(1, Ordering::AcqRel).saturating_add(1);
    let mut open_slot = OpenSlot {
        state: state.clone(),
        admitted: false,
    };
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    if open > state.settings.max_connections {
        state.metrics.rejected_connections.inc();
        state.tasks.spawn_local(refuse(session, open_slot));
        return Ok(response);
    }
    // The connection writes through its own body, not actix-ws' session (one queue, one
    // chunk per wake-up; docs/BENCHMARKS.md, edge). actix-ws' body is kept inside it: its drop
    // is what tells the message stream that the connection ended.
    drop(session);
    let (outbox, inbox) = outbox(
        state.settings.max_queue_bytes,
        state.metrics.queued_bytes.clone(),
    );
    let latency = state.metrics.delivery_latency.clone();
    let response = response.map_body(|_, ws_body| inbox.body(latency, ws_body).boxed());
    let cookie = req
        .cookie(state.sessions.cookie_name())
        .map(|c| c.value().to_owned());
    let stream = stream
        .max_frame_size(state.settings.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.settings.max_frame_bytes);
    state.metrics.connections.inc();
    open_slot.admitted = true;
    state
        .tasks
        .spawn_local(Connection::run(open_slot, outbox, inbox, stream, cookie));
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

/// The close a broken frame earns: 1007 for text that is not UTF-8, 1009 for a frame over the
/// size limit, 1002 for anything else that breaks the protocol.
fn protocol_close(error: &ProtocolError) -> (u16, &'static str) {
    match error {
        ProtocolError::Overflow => (close::TOO_BIG, "frame too large"),
        ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            (close::INVALID_DATA, "text frame is not valid UTF-8")
        }
        // actix-ws reports an over-long fragmented message this way.
        ProtocolError::Io(e) if e.to_string().contains("maximum continuation size") => {
            (close::TOO_BIG, "frame too large")
        }
        _ => (close::PROTOCOL_ERROR, "websocket protocol error"),
    }
}

struct Authenticated {
    user: UserRef,
    cookie: String,
    expires_at: Millis,
    _slot: UserSlot,
    _session: SessionSlot,
}

struct Connection {
    id: ConnId,
    state: Arc<WsState>,
    outbox: Outbox,
    auth: Option<Authenticated>,
    /// Subscribed rooms and the id of each subscription.
    rooms: HashMap<RoomId, u64>,
    next_sub: u64,
    last_seen: Instant,
}

enum Flow {
    Continue,
    Close(u16, &'static str),
    /// The outgoing queue overflowed: close with 1008 without sending the backlog.
    SlowConsumer,
    /// The socket is gone: nothing more can be sent.
    Gone,
}

/// Waits until what is queued, up to and including a queued close, is handed to the socket,
/// or the socket is gone.
async fn drain(inbox: &mut Inbox) {
    loop {
        match poll_fn(|cx| inbox.poll_event(cx)).await {
            Wrote::Closed | Wrote::Gone => return,
            // Too late to act on: the connection is closing already.
            Wrote::Kicked(_) => {}
            Wrote::Overflowed => {
                inbox.clear();
                return;
            }
        }
    }
}

impl Connection {
    /// The connection's one task: reads client frames, runs its timers and acts on what ends
    /// the writing (a kick, the overflow, the socket gone); the response body writes the queue.
    ///
    /// Not an `async fn`: the future lives as long as the connection, and an `async fn` keeps its
    /// arguments twice (as arguments and as the locals they are moved into); the block below
    /// captures each once. For the same reason the rarely taken awaits (authentication, session
    /// re-checks, client messages, the end) are boxed: inlined, their largest state would be
    /// reserved for the whole life of every connection (docs/BENCHMARKS.md, edge). One task,
    /// not a reader and a writer: a task costs about 1 KiB per connection.
    fn run(
        slot: OpenSlot,
        outbox: Outbox,
        mut inbox: Inbox,
        mut stream: actix_ws::AggregatedMessageStream,
        cookie: Option<String>,
    ) -> impl std::future::Future<Output = ()> {
        let state = slot.state.clone();
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let mut conn = Connection {
            id,
            state,
            outbox,
            auth: None,
            rooms: HashMap::new(),
            next_sub: 1,
            last_seen: Instant::now(),
        };
        async move {
            // One timer for the auth deadline, pings and session checks (memory per connection).
            let settings = &conn.state.settings;
            let started = Instant::now();
            let after = |ms: u64| {
                started
                    .checked_add(Duration::from_millis(ms))
                    .unwrap_or(started)
            };
            let auth_deadline = after(settings.auth_timeout_ms);
            let ping_every = Duration::from_millis(settings.ping_interval_ms);
            let check_every = Duration::from_millis(settings.session_check_interval_ms);
            let mut next_ping = after(settings.ping_interval_ms);
            let mut next_check = after(settings.session_check_interval_ms);
            let idle = Duration::from_millis(settings.idle_timeout_ms);
            let mut flow = Flow::Continue;
            if let Some(cookie) = cookie {
                flow = Box::pin(conn.authenticate(&cookie)).await;
            }
            let timer = tokio::time::sleep_until(next_ping.min(auth_deadline));
            tokio::pin!(timer);

            while matches!(flow, Flow::Continue) {
                flow = tokio::select! {
                    wrote = poll_fn(|cx| inbox.poll_event(cx)) => match wrote {
                        Wrote::Kicked(kick) => {
                            conn.send(protocol::error_code(kick.error, kick.message, None));
                            Flow::Close(kick.code, kick.message)
                        }
                        Wrote::Overflowed => Flow::SlowConsumer,
                        Wrote::Gone | Wrote::Closed => Flow::Gone,
                    },
                    message = stream.recv() => match message {
                        Some(Ok(message)) => {
                            conn.last_seen = Instant::now();
                            Box::pin(conn.on_message(message)).await
                        }
                        Some(Err(e)) => {
                            tracing::debug!(conn = conn.id, error = %e, "websocket protocol error");
                            conn.state.metrics.bad_frames.inc();
                            let (code, why) = protocol_close(&e);
                            Flow::Close(code, why)
                        }
                        None => Flow::Gone,
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
                            next_ping = now.checked_add(ping_every).unwrap_or(now);
                            if conn.last_seen.elapsed() > idle {
                                flow = Flow::Close(close::IDLE, "no answer to pings");
                            } else {
                                // An idle connection holds no queue memory between pings.
                                inbox.trim();
                                conn.outbox.control(Out::Ping);
                            }
                        }
                        if matches!(flow, Flow::Continue) && now >= next_check {
                            next_check = now.checked_add(check_every).unwrap_or(now);
                            if conn.auth.is_some() {
                                flow = Box::pin(conn.recheck_session()).await;
                            }
                        }
                        flow
                    },
                    _ = conn.state.shutdown.cancelled() => Flow::Close(close::GOING_AWAY, "server shutting down"),
                };
                let mut wake = next_ping.min(next_check);
                if conn.auth.is_none() {
                    wake = wake.min(auth_deadline);
                }
                if timer.deadline() != wake {
                    timer.as_mut().reset(wake);
                }
            }
            Box::pin(conn.finish(inbox, flow)).await;
            drop(slot);
        }
    }

    /// Leaves the rooms, then sends (bounded) what is queued and the close the connection
    /// ended with.
    async fn finish(mut self, mut inbox: Inbox, flow: Flow) {
        for (room, _) in std::mem::take(&mut self.rooms) {
            self.state.hub.detach(room, self.id).await;
        }
        // Shutdown waits for connections: do not let one slow client hold it.
        let mut wait = if self.state.shutdown.is_cancelled() {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        match flow {
            Flow::Close(code, why) => {
                self.outbox.control(Out::Close(code, why));
            }
            Flow::SlowConsumer => {
                self.state.metrics.slow_consumer_closes.inc();
                tracing::info!("closing a slow consumer (outgoing queue over its limit)");
                // Its backlog is dropped; the close waits for room in the socket, bounded: a
                // client that never reads again cannot hold this task.
                inbox.clear();
                self.outbox.control(Out::Close(
                    close::SLOW_CONSUMER,
                    "outgoing queue over its limit; reconnect with since",
                ));
                wait = wait.max(Duration::from_secs(10));
            }
            Flow::Continue | Flow::Gone => return,
        }
        // Gives back the user's slot and the session index entry.
        drop(self);
        let _ = tokio::time::timeout(wait, drain(&mut inbox)).await;
    }

    fn send(&self, frame: ByteString) {
        self.outbox.push(&frame);
    }

    /// Forgets subscriptions the server ended (their frames are already queued).
    fn forget_ended(&mut self) {
        for (room, id) in self.outbox.take_ended() {
            if self.rooms.get(&room) == Some(&id) {
                self.rooms.remove(&room);
            }
        }
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
            ClientMessage::Subscribe { room, since, epoch } => {
                self.subscribe(room, since, epoch).await;
                Flow::Continue
            }
            ClientMessage::Unsubscribe { room } => {
                self.forget_ended();
                if self.rooms.remove(&room).is_some() {
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
            Ok((session_id, session)) => {
                let Some(slot) = self.state.admit_user(session.user.id) else {
                    self.state.metrics.rejected_connections.inc();
                    self.send(protocol::error_code(
                        "connection_limit",
                        "connection limit exceeded for this user",
                        None,
                    ));
                    return Flow::Close(close::CONNECTION_LIMIT, "connection limit exceeded");
                };
                self.send(protocol::ack(
                    "auth.ok",
                    None,
                    protocol::AuthOk {
                        user: &session.user,
                        session_expires_at: session.expires_at,
                    },
                ));
                let registered = self.state.register_session(session_id, &self.outbox);
                self.auth = Some(Authenticated {
                    user: session.user,
                    cookie: cookie.to_owned(),
                    expires_at: session.expires_at,
                    _slot: slot,
                    _session: registered,
                });
                Flow::Continue
            }
            Err(e) => {
                self.state.metrics.auth_failures.inc();
                let (code, message) = match e {
                    SessionError::Expired => ("session_expired", "session expired"),
                    SessionError::Store(_) | SessionError::Conflict => {
                        ("unavailable", "session store unavailable")
                    }
                    SessionError::BadCookie | SessionError::NotFound => {
                        ("invalid_token", "invalid token")
                    }
                };
                self.send(protocol::error_code(code, message, None));
                match e {
                    SessionError::Expired => Flow::Close(close::SESSION_EXPIRED, "session expired"),
                    // Not the player's fault: they should come back, not log in again.
                    SessionError::Store(_) | SessionError::Conflict => {
                        Flow::Close(close::TRY_AGAIN_LATER, "session store unavailable")
                    }
                    SessionError::BadCookie | SessionError::NotFound => {
                        Flow::Close(close::UNAUTHENTICATED, "authentication failed")
                    }
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

    async fn subscribe(&mut self, room: RoomId, since: Option<u64>, epoch: Option<Epoch>) {
        let Some(user) = self.auth.as_ref().map(|a| a.user.id) else {
            return;
        };
        self.forget_ended();
        if !self.rooms.contains_key(&room)
            && self.rooms.len() >= self.state.settings.max_subscriptions
        {
            self.send(protocol::error_code(
                "subscription_limit",
                "too many subscriptions on this connection",
                Some(room),
            ));
            return;
        }
        let snapshot = match self.state.hub.room_view(room).await {
            Ok(Some(snapshot)) => snapshot,
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
        let view = &snapshot.view;
        let owner = view.owner.id == user;
        let allowed = owner || view.members.iter().any(|m| m.user.id == user);
        if !allowed {
            self.send(protocol::error(
                ErrorCode::NotMember,
                "only the room's members and owner can follow it",
                Some(room),
            ));
            return;
        }
        let id = self.next_sub;
        self.next_sub = self.next_sub.wrapping_add(1);
        // A re-subscribe (e.g. with a new `since`) replaces the subscription in the pump.
        self.rooms.insert(room, id);
        let sub = Subscription {
            conn: self.id,
            id,
            outbox: self.outbox.clone(),
            user,
            owner,
        };
        let since = since.map(|seq| Since { seq, epoch });
        match self.state.hub.attach(sub, snapshot, since).await {
            Ok(Attached::Live) => {}
            Ok(Attached::Ended) => {
                self.forget_ended();
            }
            Err(e) => {
                if self.rooms.get(&room) == Some(&id) {
                    self.rooms.remove(&room);
                }
                self.send(protocol::error(e.code, &e.message, Some(room)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_frames_get_the_close_code_rfc_6455_names() {
        let invalid = ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid utf-8 sequence",
        ));
        assert_eq!(protocol_close(&invalid).0, 1007);
        assert_eq!(protocol_close(&ProtocolError::Overflow).0, 1009);
        let continuation =
            ProtocolError::Io(std::io::Error::other("Exceeded maximum continuation size"));
        assert_eq!(protocol_close(&continuation).0, 1009);
        assert_eq!(protocol_close(&ProtocolError::UnmaskedFrame).0, 1002);
    }
}
