//! Shared simulator state and the one path every world change takes to the gateway.
//!
//! Lock order (std mutexes, never held across `.await`): `world` → `gateway` → `log`. The other
//! locks are taken alone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use tokio::sync::{mpsc, Notify};

use crate::config::SimConfig;
use crate::error::SimError;
use crate::log::{EventLog, SimEventKind};
use crate::oauth::OAuthState;
use crate::ratelimit::RateLimiter;
use crate::world::{Dispatch, World};

/// Locks a std mutex, recovering the data if a panicking thread poisoned it (the simulator
/// keeps serving; a test that panicked has already failed).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the simulator asks a live gateway connection to do.
#[derive(Debug)]
pub enum ConnCmd {
    Frame(Arc<str>),
    Close(u16),
    /// End the TCP connection without a close frame (client sees 1006).
    Drop,
    RequestHeartbeat,
}

pub struct ConnHandle {
    pub tx: mpsc::Sender<ConnCmd>,
    /// Wakes the connection when its queue overflowed: it is dropped as too slow.
    pub kill: Arc<Notify>,
    pub session: Option<String>,
}

/// A gateway session: lives across connections until invalidated.
pub struct GwSession {
    pub id: String,
    pub intents: u64,
    pub shard: (u64, u64),
    pub seq: u64,
    /// Dispatches kept for RESUME: (seq, frame).
    pub buffer: VecDeque<(u64, Arc<str>)>,
    pub conn: Option<u64>,
    pub detached_at: Option<Instant>,
}

#[derive(Default)]
pub struct GatewayState {
    pub sessions: HashMap<String, GwSession>,
    pub conns: HashMap<u64, ConnHandle>,
    /// When each rate-limit key (`shard_id % max_concurrency`) last identified.
    pub identify_by_key: HashMap<u64, Instant>,
    pub session_starts_used: u32,
    pub session_starts_reset: Option<Instant>,
}

/// A one-shot or repeated REST fault.
#[derive(Debug, Clone)]
pub enum RestFaultKind {
    /// 429 with this scope (`user`, `global`, `shared`).
    RateLimit { scope: String, retry_after: f64 },
    /// An error status (500, 502, 503...).
    Status(u16),
    /// Answer normally after a delay.
    Slow(Duration),
}

#[derive(Debug, Clone)]
pub struct RestFault {
    pub kind: RestFaultKind,
    pub remaining: u32,
    /// Only paths containing this substring are affected.
    pub path_contains: Option<String>,
}

#[derive(Default)]
pub struct Faults {
    pub stop_heartbeat_acks: bool,
    pub refuse_until: Option<Instant>,
    pub rest: VecDeque<RestFault>,
    pub rest_latency: Duration,
    pub gateway_latency: Duration,
    /// Up to this much extra delay, drawn from the seeded RNG, on top of each latency.
    pub jitter: Duration,
}

/// Most REST faults queued at once.
pub const MAX_REST_FAULTS: usize = 64;

pub struct Sim {
    pub config: SimConfig,
    pub http_url: String,
    pub gateway_url: String,
    pub world: Mutex<World>,
    pub gateway: Mutex<GatewayState>,
    pub log: Mutex<EventLog>,
    pub faults: Mutex<Faults>,
    pub limiter: Mutex<RateLimiter>,
    pub oauth: Mutex<OAuthState>,
    pub rng: Mutex<StdRng>,
    pub next_conn: AtomicU64,
    pub shutting_down: AtomicBool,
    pub load_running: AtomicBool,
}

impl Sim {
    pub fn record(&self, kind: SimEventKind) {
        lock(&self.log).push(kind);
    }

    /// Applies a world change and sends its dispatches, keeping world order = dispatch order.
    pub fn mutate<T>(
        &self,
        op: impl FnOnce(&mut World) -> Result<(T, Vec<Dispatch>), SimError>,
    ) -> Result<T, SimError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(SimError::ShuttingDown);
        }
        let mut world = lock(&self.world);
        let (value, events) = op(&mut world)?;
        if !events.is_empty() {
            let mut gw = lock(&self.gateway);
            self.emit_locked(&world, &mut gw, &events, None);
        }
        Ok(value)
    }

    /// Sequences and delivers dispatches to every live session (or only `only`).
    pub fn emit_locked(
        &self,
        world: &World,
        gw: &mut GatewayState,
        events: &[Dispatch],
        only: Option<&str>,
    ) {
        let GatewayState {
            sessions, conns, ..
        } = gw;
        let mut log = lock(&self.log);
        for ev in events {
            if let Some(g) = ev.guild_id {
                if !world.guilds.get(&g).is_some_and(|g| g.bot_member) {
                    continue;
                }
            }
            // Serialize the payload once per event; only the sequence number differs per session.
            let d = ev.d.to_string();
            for s in sessions.values_mut() {
                if only.is_some_and(|o| o != s.id) {
                    continue;
                }
                if ev.intent != 0 && s.intents & ev.intent == 0 {
                    continue;
                }
                if let Some(g) = ev.guild_id {
                    if crate::gateway::shard_of(g, s.shard.1) != s.shard.0 {
                        continue;
                    }
                }
                s.seq = s.seq.saturating_add(1);
                let frame: Arc<str> =
                    format!(r#"{{"op":0,"s":{},"t":"{}","d":{}}}"#, s.seq, ev.t, d).into();
                if s.buffer.len() >= self.config.replay_buffer.max(1) {
                    s.buffer.pop_front();
                }
                s.buffer.push_back((s.seq, frame.clone()));
                log.push(SimEventKind::Dispatch {
                    session_id: s.id.clone(),
                    seq: s.seq,
                    event: ev.t.to_owned(),
                });
                if let Some(c) = s.conn {
                    if let Some(h) = conns.get(&c) {
                        if h.tx.try_send(ConnCmd::Frame(frame)).is_err() {
                            // Too slow (or already gone): detach; the client may resume.
                            h.kill.notify_one();
                            s.conn = None;
                            s.detached_at = Some(Instant::now());
                        }
                    }
                }
            }
        }
    }

    /// Sends a command to every live connection (or those of one session).
    pub fn command_connections(&self, session: Option<&str>, make: impl Fn() -> ConnCmd) -> usize {
        let gw = lock(&self.gateway);
        let mut n = 0usize;
        for h in gw.conns.values() {
            if session.is_some_and(|s| h.session.as_deref() != Some(s)) {
                continue;
            }
            if h.tx.try_send(make()).is_ok() {
                n = n.saturating_add(1);
            }
        }
        n
    }

    /// Detaches a session from its connection so later dispatches only go to the replay buffer
    /// (after op 7 / op 9 the client is expected to reconnect).
    pub fn detach_session_of_conn(&self, conn: u64) {
        let mut gw = lock(&self.gateway);
        let sid = gw.conns.get_mut(&conn).and_then(|h| h.session.take());
        if let Some(sid) = sid {
            if let Some(s) = gw.sessions.get_mut(&sid) {
                if s.conn == Some(conn) {
                    s.conn = None;
                    s.detached_at = Some(Instant::now());
                }
            }
        }
    }

    pub fn invalidate_session(&self, session_id: &str) {
        lock(&self.gateway).sessions.remove(session_id);
    }

    /// `base` plus a seeded random share of the configured jitter.
    pub fn with_jitter(&self, base: Duration) -> Duration {
        let jitter = lock(&self.faults).jitter;
        if jitter.is_zero() {
            return base;
        }
        use rand::Rng;
        let extra = lock(&self.rng).random_range(0..=jitter.as_micros() as u64);
        base.saturating_add(Duration::from_micros(extra))
    }

    pub fn random_hex(&self, len: usize) -> String {
        crate::util::hex_token(&mut lock(&self.rng), len)
    }

    pub fn random_token(&self, len: usize) -> String {
        crate::util::url_token(&mut lock(&self.rng), len)
    }
}
