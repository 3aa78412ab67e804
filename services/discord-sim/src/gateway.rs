//! The gateway websocket (API v10, JSON): HELLO, heartbeats, IDENTIFY/READY, RESUME, close
//! codes and the faults that act on live connections.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use crate::config::intents;
use crate::log::SimEventKind;
use crate::state::{lock, ConnCmd, ConnHandle, GwSession, Sim};
use crate::util::{instant_after, set, tokio_deadline};
use crate::world::Dispatch;

/// Discord's limit on one client payload.
pub const MAX_CLIENT_PAYLOAD: usize = 4096;

/// Close codes (Discord's gateway close event codes).
pub mod close {
    pub const UNKNOWN_ERROR: u16 = 4000;
    pub const UNKNOWN_OPCODE: u16 = 4001;
    pub const DECODE_ERROR: u16 = 4002;
    pub const NOT_AUTHENTICATED: u16 = 4003;
    pub const AUTHENTICATION_FAILED: u16 = 4004;
    pub const ALREADY_AUTHENTICATED: u16 = 4005;
    pub const INVALID_SEQ: u16 = 4007;
    pub const RATE_LIMITED: u16 = 4008;
    pub const SESSION_TIMED_OUT: u16 = 4009;
    pub const INVALID_SHARD: u16 = 4010;
    pub const SHARDING_REQUIRED: u16 = 4011;
    pub const INVALID_API_VERSION: u16 = 4012;
    pub const INVALID_INTENTS: u16 = 4013;
    pub const DISALLOWED_INTENTS: u16 = 4014;

    /// Whether the session survives a close with this code (Discord's "Resume" column; 1000 and
    /// 1001 end the session; anything else, e.g. a dropped TCP connection, keeps it).
    pub fn keeps_session(code: u16) -> bool {
        !matches!(code, 1000 | 1001 | 4001 | 4003..=4007 | 4009..=4014)
    }

    pub fn reason(code: u16) -> &'static str {
        match code {
            4000 => "Unknown error",
            4001 => "Unknown opcode",
            4002 => "Decode error",
            4003 => "Not authenticated",
            4004 => "Authentication failed",
            4005 => "Already authenticated",
            4007 => "Invalid seq",
            4008 => "Rate limited",
            4009 => "Session timed out",
            4010 => "Invalid shard",
            4011 => "Sharding required",
            4012 => "Invalid API version",
            4013 => "Invalid intent(s)",
            4014 => "Disallowed intent(s)",
            1000 => "Normal closure",
            1001 => "Going away",
            _ => "Closed by simulator",
        }
    }
}

/// `GET /` (and `/gateway`) upgraded to a websocket.
pub async fn connect(
    req: HttpRequest,
    body: web::Payload,
    sim: web::Data<Arc<Sim>>,
) -> Result<HttpResponse, actix_web::Error> {
    let sim = sim.get_ref().clone();
    {
        let faults = lock(&sim.faults);
        if faults.refuse_until.is_some_and(|t| Instant::now() < t) {
            drop(faults);
            sim.record(SimEventKind::Refused {
                reason: "fault: refusing connections".into(),
            });
            return Ok(HttpResponse::ServiceUnavailable().finish());
        }
    }
    if lock(&sim.gateway).conns.len() >= sim.config.max_connections
        || sim.shutting_down.load(Ordering::Relaxed)
    {
        sim.record(SimEventKind::Refused {
            reason: "connection limit".into(),
        });
        return Ok(HttpResponse::ServiceUnavailable().finish());
    }
    let query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .map(|q| q.into_inner())
            .unwrap_or_default();
    let (resp, session, stream) = actix_ws::handle(&req, body)?;
    // Frames up to 64 KiB reach us, so oversize payloads get Discord's 4002 instead of a protocol error.
    let stream = stream
        .max_frame_size(64 * 1024)
        .aggregate_continuations()
        .max_continuation_size(64 * 1024);
    let conn = sim
        .next_conn
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(1);
    let (tx, rx) = mpsc::channel(sim.config.connection_queue.max(1));
    let kill = Arc::new(Notify::new());
    lock(&sim.gateway).conns.insert(
        conn,
        ConnHandle {
            tx,
            kill: kill.clone(),
            session: None,
        },
    );
    sim.record(SimEventKind::Connected { conn });
    let version_ok = query.get("v").is_none_or(|v| v == "10" || v == "9");
    let encoding_ok = query.get("encoding").is_none_or(|e| e == "json");
    actix_web::rt::spawn(async move {
        let mut c = Connection {
            sim: sim.clone(),
            conn,
            ws: session,
            session: None,
            sends: VecDeque::new(),
        };
        let end = if !version_ok {
            End::Close(close::INVALID_API_VERSION)
        } else if !encoding_ok {
            End::Close(close::DECODE_ERROR)
        } else {
            c.run(stream, rx, kill).await
        };
        c.finish(end).await;
    });
    Ok(resp)
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server closes with this code.
    Close(u16),
    /// The server drops TCP without a close frame.
    Drop,
    /// The client closed (code if any) or vanished.
    ClientGone(Option<u16>),
}

struct Connection {
    sim: Arc<Sim>,
    conn: u64,
    ws: actix_ws::Session,
    session: Option<String>,
    /// Times of recent client payloads (gateway send limit).
    sends: VecDeque<Instant>,
}

impl Connection {
    /// Whether this connection currently carries a session. After op 7 / op 9 the session is
    /// detached, so the client may IDENTIFY or RESUME again on the same socket.
    fn attached(&self) -> bool {
        lock(&self.sim.gateway)
            .conns
            .get(&self.conn)
            .is_some_and(|h| h.session.is_some())
    }

    async fn send(&mut self, v: &Value) -> bool {
        self.ws.text(v.to_string()).await.is_ok()
    }

    async fn run(
        &mut self,
        mut stream: actix_ws::AggregatedMessageStream,
        mut rx: mpsc::Receiver<ConnCmd>,
        kill: Arc<Notify>,
    ) -> End {
        let interval = self.sim.config.heartbeat_interval;
        let timeout = interval.mul_f64(self.sim.config.heartbeat_timeout_factor.max(1.0));
        if !self
            .send(&json!({"op": 10, "s": null, "t": null, "d": {"heartbeat_interval": interval.as_millis() as u64}}))
            .await
        {
            return End::ClientGone(None);
        }
        self.sim.record(SimEventKind::Hello { conn: self.conn });
        let mut deadline = tokio_deadline(timeout);
        loop {
            tokio::select! {
                biased;
                _ = kill.notified() => return End::Drop,
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return End::Drop };
                    match cmd {
                        ConnCmd::Frame(f) => {
                            let base = lock(&self.sim.faults).gateway_latency;
                            let latency = self.sim.with_jitter(base);
                            if !latency.is_zero() {
                                tokio::time::sleep(latency).await;
                            }
                            if self.ws.text(f.to_string()).await.is_err() {
                                return End::ClientGone(None);
                            }
                        }
                        ConnCmd::Close(code) => return End::Close(code),
                        ConnCmd::Drop => return End::Drop,
                        ConnCmd::RequestHeartbeat => {
                            self.sim.record(SimEventKind::HeartbeatRequested { conn: self.conn });
                            if !self.send(&json!({"op": 1, "s": null, "t": null, "d": null})).await {
                                return End::ClientGone(None);
                            }
                        }
                    }
                }
                msg = stream.recv() => {
                    match msg {
                        None => return End::ClientGone(None),
                        // The socket failed (e.g. reset by a client that went away): a drop.
                        Some(Err(ProtocolError::Io(e))) if e.kind() != std::io::ErrorKind::InvalidData => {
                            return End::ClientGone(None);
                        }
                        // Oversized or malformed frames: Discord answers with a decode error.
                        Some(Err(_)) => return End::Close(close::DECODE_ERROR),
                        Some(Ok(AggregatedMessage::Close(reason))) => {
                            return End::ClientGone(reason.map(|r| u16::from(r.code)));
                        }
                        Some(Ok(AggregatedMessage::Ping(p))) => {
                            let _ = self.ws.pong(&p).await;
                        }
                        Some(Ok(AggregatedMessage::Pong(_))) => {}
                        Some(Ok(AggregatedMessage::Binary(_))) => return End::Close(close::DECODE_ERROR),
                        Some(Ok(AggregatedMessage::Text(text))) => {
                            match self.on_text(&text).await {
                                Ok(heartbeat) => if heartbeat {
                                    deadline = tokio_deadline(timeout);
                                },
                                Err(end) => return end,
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return End::Close(close::SESSION_TIMED_OUT),
            }
        }
    }

    /// Handles one client payload; `Ok(true)` when it was a heartbeat.
    async fn on_text(&mut self, text: &str) -> Result<bool, End> {
        if text.len() > MAX_CLIENT_PAYLOAD {
            return Err(End::Close(close::DECODE_ERROR));
        }
        let now = Instant::now();
        while self
            .sends
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.sends.pop_front();
        }
        self.sends.push_back(now);
        if self.sends.len() > self.sim.config.gateway_send_limit as usize {
            return Err(End::Close(close::RATE_LIMITED));
        }
        let v: Value = serde_json::from_str(text).map_err(|_| End::Close(close::DECODE_ERROR))?;
        let Some(op) = v.get("op").and_then(Value::as_u64) else {
            return Err(End::Close(close::DECODE_ERROR));
        };
        let d = v.get("d").cloned().unwrap_or(Value::Null);
        match op {
            1 => {
                let seq = match &d {
                    Value::Null => None,
                    Value::Number(n) => n.as_u64(),
                    _ => return Err(End::Close(close::DECODE_ERROR)),
                };
                self.sim.record(SimEventKind::Heartbeat {
                    conn: self.conn,
                    seq,
                });
                if !lock(&self.sim.faults).stop_heartbeat_acks {
                    if !self
                        .send(&json!({"op": 11, "s": null, "t": null, "d": null}))
                        .await
                    {
                        return Err(End::ClientGone(None));
                    }
                    self.sim
                        .record(SimEventKind::HeartbeatAck { conn: self.conn });
                }
                Ok(true)
            }
            2 => self.identify(&d).await.map(|_| false),
            6 => self.resume(&d).await.map(|_| false),
            3 | 4 | 8 | 31 => {
                if !self.attached() {
                    return Err(End::Close(close::NOT_AUTHENTICATED));
                }
                Ok(false)
            }
            _ => Err(End::Close(close::UNKNOWN_OPCODE)),
        }
    }

    fn token_ok(&self, d: &Value) -> Result<(), End> {
        let token = d
            .get("token")
            .and_then(Value::as_str)
            .ok_or(End::Close(close::DECODE_ERROR))?;
        let token = token.strip_prefix("Bot ").unwrap_or(token);
        if token != self.sim.config.bot_token {
            return Err(End::Close(close::AUTHENTICATION_FAILED));
        }
        Ok(())
    }

    async fn invalid_session(&mut self, resumable: bool) -> Result<(), End> {
        self.sim.record(SimEventKind::InvalidSession {
            conn: self.conn,
            resumable,
        });
        if !self
            .send(&json!({"op": 9, "s": null, "t": null, "d": resumable}))
            .await
        {
            return Err(End::ClientGone(None));
        }
        Ok(())
    }

    async fn identify(&mut self, d: &Value) -> Result<(), End> {
        if self.attached() {
            return Err(End::Close(close::ALREADY_AUTHENTICATED));
        }
        if !d.is_object() {
            return Err(End::Close(close::DECODE_ERROR));
        }
        self.token_ok(d)?;
        let wanted = d
            .get("intents")
            .and_then(Value::as_u64)
            .ok_or(End::Close(close::DECODE_ERROR))?;
        if wanted & !intents::ALL_KNOWN != 0 {
            return Err(End::Close(close::INVALID_INTENTS));
        }
        if wanted & intents::PRIVILEGED & !self.sim.config.allowed_privileged_intents != 0 {
            return Err(End::Close(close::DISALLOWED_INTENTS));
        }
        let shard = match d.get("shard") {
            None | Some(Value::Null) => (0, 1),
            Some(Value::Array(a)) => match a.as_slice() {
                [id, n] => match (id.as_u64(), n.as_u64()) {
                    (Some(id), Some(n)) if n >= 1 && id < n => (id, n),
                    _ => return Err(End::Close(close::INVALID_SHARD)),
                },
                _ => return Err(End::Close(close::INVALID_SHARD)),
            },
            _ => return Err(End::Close(close::INVALID_SHARD)),
        };
        // A session may handle at most `max_guilds_per_shard` guilds (Discord: 2,500).
        let guilds_here = {
            let world = lock(&self.sim.world);
            world
                .guilds
                .values()
                .filter(|g| {
                    g.bot_member && (g.id >> 22).checked_rem(shard.1).unwrap_or(0) == shard.0
                })
                .count()
        };
        if guilds_here > self.sim.config.max_guilds_per_shard {
            self.sim.record(SimEventKind::IdentifyRejected {
                conn: self.conn,
                reason: format!(
                    "sharding required: {guilds_here} guilds for one shard (at most {})",
                    self.sim.config.max_guilds_per_shard
                ),
                shard: [shard.0, shard.1],
            });
            return Err(End::Close(close::SHARDING_REQUIRED));
        }
        // Identify concurrency and the daily session-start budget. Discord's rule: shards are
        // grouped by rate-limit key `shard_id % max_concurrency`, and each key allows one
        // IDENTIFY per 5 s (so at most `max_concurrency` per 5 s in all).
        let max_concurrency = u64::from(self.sim.config.max_concurrency.max(1));
        let key = shard.0.checked_rem(max_concurrency).unwrap_or(0);
        let rejected = {
            let mut gw = lock(&self.sim.gateway);
            let now = Instant::now();
            let window = self.sim.config.identify_window;
            if gw.session_starts_reset.is_none_or(|t| now >= t) {
                gw.session_starts_used = 0;
                gw.session_starts_reset = Some(instant_after(now, Duration::from_secs(86_400)));
            }
            let busy = gw
                .identify_by_key
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < window);
            if busy {
                Some(format!(
                    "max_concurrency exceeded: rate limit key {key} identified less than {} ms ago",
                    window.as_millis()
                ))
            } else if gw.session_starts_used >= self.sim.config.session_start_total {
                Some("session start limit exhausted".to_owned())
            } else {
                gw.identify_by_key.insert(key, now);
                gw.session_starts_used = gw.session_starts_used.saturating_add(1);
                None
            }
        };
        if let Some(reason) = rejected {
            self.sim.record(SimEventKind::IdentifyRejected {
                conn: self.conn,
                reason,
                shard: [shard.0, shard.1],
            });
            return self.invalid_session(false).await;
        }
        let session_id = self.sim.random_hex(32);
        let frames = {
            let world = lock(&self.sim.world);
            let mut gw = lock(&self.sim.gateway);
            gw.sessions.insert(
                session_id.clone(),
                GwSession {
                    id: session_id.clone(),
                    intents: wanted,
                    shard,
                    seq: 0,
                    buffer: VecDeque::new(),
                    conn: Some(self.conn),
                    detached_at: None,
                },
            );
            if let Some(h) = gw.conns.get_mut(&self.conn) {
                h.session = Some(session_id.clone());
            }
            let bot = world
                .users
                .get(&world.bot_id)
                .map(crate::world::user_json)
                .unwrap_or(Value::Null);
            let mut user = bot;
            set(&mut user, "verified", json!(true));
            set(&mut user, "mfa_enabled", json!(false));
            let guild_ids: Vec<u64> = world
                .guilds
                .values()
                .filter(|g| g.bot_member && shard_of(g.id, shard.1) == shard.0)
                .map(|g| g.id)
                .collect();
            let mut events = vec![Dispatch {
                t: "READY",
                d: json!({
                    "v": 10,
                    "user": user,
                    "guilds": guild_ids.iter().map(|g| json!({"id": g.to_string(), "unavailable": true})).collect::<Vec<_>>(),
                    "session_id": session_id,
                    "resume_gateway_url": self.sim.gateway_url,
                    "shard": [shard.0, shard.1],
                    "application": {"id": self.sim.config.oauth.client_id, "flags": 0},
                    "private_channels": [],
                    "presences": [],
                    "relationships": [],
                    "user_settings": {},
                    "guild_join_requests": [],
                    "geo_ordered_rtc_regions": [],
                }),
                intent: 0,
                guild_id: None,
            }];
            for g in &guild_ids {
                if let Some(guild) = world.guilds.get(g) {
                    let mut d = world.guild_json(guild);
                    if wanted & intents::GUILD_VOICE_STATES == 0 {
                        set(&mut d, "voice_states", json!([]));
                    }
                    events.push(Dispatch {
                        t: "GUILD_CREATE",
                        d,
                        // Sent regardless of intents, like Discord's initial guild burst.
                        intent: 0,
                        guild_id: Some(*g),
                    });
                }
            }
            // Frames go through the session's own queue (our rx), after READY is sequenced.
            self.sim
                .emit_locked(&world, &mut gw, &events, Some(&session_id));
            events.len()
        };
        self.sim.record(SimEventKind::Identify {
            conn: self.conn,
            session_id: session_id.clone(),
            intents: wanted,
            shard: [shard.0, shard.1],
            rate_limit_key: key,
        });
        tracing::debug!(conn = self.conn, frames, "identified");
        self.session = Some(session_id);
        Ok(())
    }

    async fn resume(&mut self, d: &Value) -> Result<(), End> {
        if self.attached() {
            return Err(End::Close(close::ALREADY_AUTHENTICATED));
        }
        if !d.is_object() {
            return Err(End::Close(close::DECODE_ERROR));
        }
        self.token_ok(d)?;
        let sid = d
            .get("session_id")
            .and_then(Value::as_str)
            .ok_or(End::Close(close::DECODE_ERROR))?
            .to_owned();
        let seq = match d.get("seq") {
            Some(Value::Null) | None => 0,
            Some(v) => v.as_u64().ok_or(End::Close(close::DECODE_ERROR))?,
        };
        enum Outcome {
            Unknown,
            BadSeq,
            TooOld,
            Ok(Vec<Arc<str>>),
        }
        let outcome = {
            let world = lock(&self.sim.world);
            let mut gw = lock(&self.sim.gateway);
            match gw.sessions.get_mut(&sid) {
                None => Outcome::Unknown,
                Some(s) if seq > s.seq => Outcome::BadSeq,
                Some(s)
                    if s.buffer
                        .front()
                        .is_some_and(|(first, _)| seq.saturating_add(1) < *first) =>
                {
                    Outcome::TooOld
                }
                Some(s) => {
                    let old = s.conn.replace(self.conn);
                    s.detached_at = None;
                    let replay: Vec<Arc<str>> = s
                        .buffer
                        .iter()
                        .filter(|(n, _)| *n > seq)
                        .map(|(_, f)| f.clone())
                        .collect();
                    if let Some(h) = gw.conns.get_mut(&self.conn) {
                        h.session = Some(sid.clone());
                    }
                    if let Some(o) = old.filter(|o| *o != self.conn) {
                        if let Some(h) = gw.conns.get_mut(&o) {
                            h.session = None;
                            let _ = h.tx.try_send(ConnCmd::Drop);
                        }
                    }
                    // RESUMED is sequenced like any dispatch, after the replayed ones, and
                    // queued on our channel, so it follows the replay written below.
                    self.sim.emit_locked(
                        &world,
                        &mut gw,
                        &[Dispatch {
                            t: "RESUMED",
                            d: json!({}),
                            intent: 0,
                            guild_id: None,
                        }],
                        Some(&sid),
                    );
                    Outcome::Ok(replay)
                }
            }
        };
        match outcome {
            Outcome::Unknown | Outcome::TooOld => {
                self.sim.record(SimEventKind::ResumeRejected {
                    conn: self.conn,
                    reason: "unknown, invalidated or expired session".into(),
                });
                self.invalid_session(false).await
            }
            Outcome::BadSeq => {
                self.sim.record(SimEventKind::ResumeRejected {
                    conn: self.conn,
                    reason: format!("seq {seq} is ahead of the session"),
                });
                self.sim.invalidate_session(&sid);
                Err(End::Close(close::INVALID_SEQ))
            }
            Outcome::Ok(replay) => {
                self.sim.record(SimEventKind::Resume {
                    conn: self.conn,
                    session_id: sid.clone(),
                    seq,
                    replayed: replay.len(),
                });
                self.session = Some(sid);
                for f in replay {
                    if self.ws.text(f.to_string()).await.is_err() {
                        return Err(End::ClientGone(None));
                    }
                }
                Ok(())
            }
        }
    }

    /// Closes (or drops) the socket and settles the session.
    async fn finish(self, end: End) {
        let Connection {
            sim,
            conn,
            ws,
            session,
            ..
        } = self;
        let (code, by_server) = match end {
            End::Close(code) => {
                let _ = ws
                    .close(Some(CloseReason {
                        code: CloseCode::Other(code),
                        description: Some(close::reason(code).to_owned()),
                    }))
                    .await;
                (Some(code), true)
            }
            End::Drop => {
                drop(ws);
                (None, true)
            }
            End::ClientGone(code) => {
                let _ = ws.close(None).await;
                (code, false)
            }
        };
        {
            let mut gw = lock(&sim.gateway);
            let handle_session = gw.conns.remove(&conn).and_then(|h| h.session);
            let sid = handle_session.or(session);
            if let Some(sid) = sid {
                let keep = code.is_none_or(close::keeps_session);
                let attached_here = gw.sessions.get(&sid).is_some_and(|s| s.conn == Some(conn));
                if !keep && (attached_here || by_server) {
                    gw.sessions.remove(&sid);
                } else if let Some(s) = gw.sessions.get_mut(&sid) {
                    if s.conn == Some(conn) {
                        s.conn = None;
                        s.detached_at = Some(Instant::now());
                    }
                }
            }
            prune_detached(
                &mut gw,
                sim.config.max_connections.max(16).saturating_mul(4),
            );
        }
        sim.record(SimEventKind::Disconnected {
            conn,
            code,
            by_server,
        });
    }
}

/// Keeps at most `max` sessions; the longest-detached go first.
/// The shard a guild belongs to, as Discord computes it: `(guild_id >> 22) % shard_count` (a count
/// of 0 is treated as 1).
pub(crate) fn shard_of(guild_id: u64, shard_count: u64) -> u64 {
    (guild_id >> 22).checked_rem(shard_count).unwrap_or(0)
}

fn prune_detached(gw: &mut crate::state::GatewayState, max: usize) {
    while gw.sessions.len() > max {
        let oldest = gw
            .sessions
            .values()
            .filter_map(|s| s.detached_at.map(|t| (t, s.id.clone())))
            .min();
        match oldest {
            Some((_, id)) => {
                gw.sessions.remove(&id);
            }
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::close::keeps_session;

    #[test]
    fn close_codes_follow_discords_resume_column() {
        for code in [4000, 4002, 4008, 1006, 3000] {
            assert!(keeps_session(code), "{code}");
        }
        for code in [1000, 1001, 4001, 4003, 4004, 4005, 4007, 4009, 4010, 4014] {
            assert!(!keeps_session(code), "{code}");
        }
    }
}
