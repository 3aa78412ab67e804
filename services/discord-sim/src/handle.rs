//! [`SimHandle`]: the in-process control surface (the HTTP control API calls the same methods).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::SimConfig;
use crate::error::SimError;
use crate::log::{SimEvent, SimEventKind};
use crate::state::{lock, ConnCmd, RestFault, Sim, MAX_REST_FAULTS};
use crate::util::{instant_after, tokio_deadline};
use crate::world::{self, channel_type, Actor, ChannelSpec, VoiceFlags};

/// A running simulator. Dropping it does not stop the server: call [`SimHandle::shutdown`].
#[derive(Clone)]
pub struct SimHandle {
    pub(crate) sim: Arc<Sim>,
    pub(crate) server: Option<actix_web::dev::ServerHandle>,
    pub(crate) addr: SocketAddr,
}

/// A live gateway session as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub session_id: String,
    pub seq: u64,
    pub intents: u64,
    pub connected: bool,
    pub buffered: usize,
}

/// Load generator settings: `count` voice events at `events_per_sec`, stopping after
/// `max_seconds` at the latest.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadSpec {
    pub events_per_sec: u32,
    pub count: u32,
    #[serde(default = "default_load_secs")]
    pub max_seconds: u64,
    #[serde(default, deserialize_with = "crate::control::de_opt_id")]
    pub guild_id: Option<u64>,
}

fn default_load_secs() -> u64 {
    60
}

/// Hard caps on the load generator (bounded in count and time).
pub const MAX_LOAD_RATE: u32 = 10_000;
pub const MAX_LOAD_COUNT: u32 = 1_000_000;
pub const MAX_LOAD_SECONDS: u64 = 3_600;

impl SimHandle {
    /// `http://host:port` (REST is under `/api/v10`, control under `/_sim`).
    pub fn http_url(&self) -> &str {
        &self.sim.http_url
    }

    /// `http://host:port/api/v10`.
    pub fn api_url(&self) -> String {
        format!("{}/api/v10", self.sim.http_url)
    }

    /// `ws://host:port` — the gateway URL, as `GET /gateway/bot` reports it.
    pub fn gateway_url(&self) -> &str {
        &self.sim.gateway_url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &SimConfig {
        &self.sim.config
    }

    // ----- world ----------------------------------------------------------------------------

    /// Creates a guild the bot is in; returns its id.
    pub fn create_guild(&self, name: &str) -> Result<u64, SimError> {
        self.create_guild_with(None, name, true)
    }

    pub fn create_guild_with(
        &self,
        id: Option<u64>,
        name: &str,
        bot_member: bool,
    ) -> Result<u64, SimError> {
        self.control("create_guild");
        self.sim.mutate(|w| w.create_guild(id, name, bot_member))
    }

    /// Creates a simulated user (not yet in any guild); returns its id.
    pub fn create_user(&self, username: &str) -> Result<u64, SimError> {
        self.create_user_with(None, username)
    }

    pub fn create_user_with(&self, id: Option<u64>, username: &str) -> Result<u64, SimError> {
        self.control("create_user");
        self.sim
            .mutate(|w| w.create_user(id, username))
            .map(|u| u.id)
    }

    /// Adds a user to a guild (GUILD_MEMBER_ADD); `false` when already a member.
    pub fn add_member(&self, guild: u64, user: u64, roles: &[u64]) -> Result<bool, SimError> {
        self.control("add_member");
        self.sim.mutate(|w| w.add_member(guild, user, roles, None))
    }

    pub fn create_channel(&self, guild: u64, spec: ChannelSpec) -> Result<u64, SimError> {
        self.control("create_channel");
        self.sim
            .mutate(|w| w.create_channel(guild, spec))
            .map(|c| c.id)
    }

    /// An ordinary voice channel open to everyone.
    pub fn create_voice_channel(&self, guild: u64, name: &str) -> Result<u64, SimError> {
        self.create_channel(
            guild,
            ChannelSpec {
                id: None,
                name: name.to_owned(),
                kind: channel_type::GUILD_VOICE,
                parent_id: None,
                user_limit: 0,
                bitrate: None,
                position: None,
                overwrites: Vec::new(),
            },
        )
    }

    pub fn delete_channel(&self, channel: u64) -> Result<(), SimError> {
        self.control("delete_channel");
        self.sim.mutate(|w| w.delete_channel(channel)).map(|_| ())
    }

    pub fn create_role(&self, guild: u64, name: &str, permissions: u64) -> Result<u64, SimError> {
        self.control("create_role");
        self.sim
            .mutate(|w| w.create_role(guild, name, permissions, 0, false, false))
            .map(|r| r.id)
    }

    pub fn set_member_role(
        &self,
        guild: u64,
        user: u64,
        role: u64,
        add: bool,
    ) -> Result<(), SimError> {
        self.control("set_member_role");
        self.sim
            .mutate(|w| w.set_member_role(guild, user, role, add))
    }

    /// Changes the bot role's guild permissions (to provoke 50013).
    pub fn set_bot_permissions(&self, guild: u64, permissions: u64) -> Result<(), SimError> {
        self.control("set_bot_permissions");
        self.sim.mutate(|w| {
            let bot = w.bot_id;
            let g = w
                .guilds
                .get_mut(&guild)
                .ok_or(SimError::UnknownGuild(guild))?;
            let roles = g
                .members
                .get(&bot)
                .map(|m| m.roles.clone())
                .unwrap_or_default();
            for r in roles {
                if let Some(role) = g.roles.get_mut(&r) {
                    role.permissions = permissions;
                }
            }
            Ok(((), Vec::new()))
        })
    }

    fn guild_of(&self, channel: u64) -> Result<u64, SimError> {
        Ok(lock(&self.sim.world).channel(channel)?.guild_id)
    }

    /// The user joins (or switches to) a voice channel by themself: permissions and user_limit
    /// apply.
    pub fn connect_voice(&self, user: u64, channel: u64) -> Result<(), SimError> {
        self.control("voice_connect");
        let guild = self.guild_of(channel)?;
        self.sim
            .mutate(|w| w.voice_join(guild, user, channel, Actor::User))
    }

    /// A moderator moves a connected user (no permission or user_limit checks).
    pub fn move_voice(&self, user: u64, channel: u64) -> Result<(), SimError> {
        self.control("voice_move");
        let guild = self.guild_of(channel)?;
        let connected = lock(&self.sim.world).voice_of(user).map(|(g, _)| g);
        if connected != Some(guild) {
            return Err(SimError::NotConnected(user));
        }
        self.sim
            .mutate(|w| w.voice_join(guild, user, channel, Actor::Moderator))
    }

    /// The user leaves voice.
    pub fn disconnect_voice(&self, user: u64) -> Result<(), SimError> {
        self.control("voice_disconnect");
        let guild = lock(&self.sim.world)
            .voice_of(user)
            .map(|(g, _)| g)
            .ok_or(SimError::NotConnected(user))?;
        self.sim.mutate(|w| w.voice_leave(guild, user))
    }

    /// Mute / deafen / stream / video changes of a connected user.
    pub fn set_voice_flags(&self, user: u64, flags: VoiceFlags) -> Result<(), SimError> {
        self.control("voice_state");
        let guild = lock(&self.sim.world)
            .voice_of(user)
            .map(|(g, _)| g)
            .ok_or(SimError::NotConnected(user))?;
        self.sim.mutate(|w| w.voice_flags(guild, user, &flags))
    }

    /// Where a user is in voice: (guild, channel).
    pub fn voice_channel_of(&self, user: u64) -> Option<(u64, u64)> {
        lock(&self.sim.world)
            .voice_of(user)
            .map(|(g, v)| (g, v.channel_id))
    }

    /// Whether a channel exists.
    pub fn channel_exists(&self, channel: u64) -> bool {
        lock(&self.sim.world).channel(channel).is_ok()
    }

    /// Roles of a member (empty when not a member).
    pub fn member_roles(&self, guild: u64, user: u64) -> Vec<u64> {
        lock(&self.sim.world)
            .guilds
            .get(&guild)
            .and_then(|g| g.members.get(&user))
            .map(|m| m.roles.clone())
            .unwrap_or_default()
    }

    /// The whole world as JSON (guilds with channels, roles, members, voice states; users).
    pub fn snapshot(&self) -> Value {
        let world = lock(&self.sim.world);
        json!({
            "users": world.users.values().map(world::user_json).collect::<Vec<_>>(),
            "guilds": world.guilds.values().map(|g| world.guild_json(g)).collect::<Vec<_>>(),
        })
    }

    // ----- gateway faults -------------------------------------------------------------------

    fn fault(&self, description: String) {
        self.sim.record(SimEventKind::Fault { description });
    }

    fn control(&self, op: &str) {
        self.sim.record(SimEventKind::Control { op: op.to_owned() });
    }

    /// Drops every gateway connection (or one session's) without a close frame (client sees 1006).
    pub fn drop_connections(&self, session: Option<&str>) -> usize {
        self.fault("drop connections".into());
        self.sim.command_connections(session, || ConnCmd::Drop)
    }

    /// Closes connections with `code` (4000-4014, 1000, ...).
    pub fn close_connections(&self, code: u16, session: Option<&str>) -> usize {
        self.fault(format!("close connections with {code}"));
        self.sim
            .command_connections(session, || ConnCmd::Close(code))
    }

    /// Sends op 1 (the server asks for a heartbeat).
    pub fn request_heartbeat(&self) -> usize {
        self.fault("request heartbeat".into());
        self.sim
            .command_connections(None, || ConnCmd::RequestHeartbeat)
    }

    /// Sends op 7 RECONNECT; later dispatches wait in the replay buffer for the RESUME.
    pub fn send_reconnect(&self, session: Option<&str>) -> usize {
        self.fault("send RECONNECT".into());
        self.op_to_sessions(
            session,
            json!({"op": 7, "s": null, "t": null, "d": null}),
            |sim, conn, _| {
                sim.record(SimEventKind::Reconnect { conn });
                sim.detach_session_of_conn(conn);
            },
        )
    }

    /// Sends op 9 INVALID_SESSION; `resumable = false` also ends the session.
    pub fn invalidate_sessions(&self, resumable: bool, session: Option<&str>) -> usize {
        self.fault(format!("send INVALID_SESSION d={resumable}"));
        self.op_to_sessions(
            session,
            json!({"op": 9, "s": null, "t": null, "d": resumable}),
            move |sim, conn, sid| {
                sim.record(SimEventKind::InvalidSession { conn, resumable });
                sim.detach_session_of_conn(conn);
                if !resumable {
                    sim.invalidate_session(sid);
                }
            },
        )
    }

    fn op_to_sessions(
        &self,
        session: Option<&str>,
        frame: Value,
        after: impl Fn(&Sim, u64, &str),
    ) -> usize {
        let frame: Arc<str> = frame.to_string().into();
        let targets: Vec<(u64, String)> = {
            let gw = lock(&self.sim.gateway);
            gw.conns
                .iter()
                .filter_map(|(id, h)| {
                    let sid = h.session.clone()?;
                    if session.is_some_and(|s| s != sid) {
                        return None;
                    }
                    h.tx.try_send(ConnCmd::Frame(frame.clone())).ok()?;
                    Some((*id, sid))
                })
                .collect()
        };
        for (conn, sid) in &targets {
            after(&self.sim, *conn, sid);
        }
        targets.len()
    }

    /// Stops (false) or resumes (true) answering heartbeats with op 11.
    pub fn set_heartbeat_acks(&self, enabled: bool) {
        self.fault(format!("heartbeat acks {enabled}"));
        lock(&self.sim.faults).stop_heartbeat_acks = !enabled;
    }

    /// Refuses new gateway connections (HTTP 503 on the upgrade) for `d`.
    pub fn refuse_connections_for(&self, d: Duration) {
        self.fault(format!("refuse connections for {d:?}"));
        lock(&self.sim.faults).refuse_until = Some(instant_after(Instant::now(), d));
    }

    /// Queues a REST fault (429, 5xx or slow answers) for the next matching requests.
    pub fn inject_rest_fault(&self, fault: RestFault) -> Result<(), SimError> {
        let mut f = lock(&self.sim.faults);
        if f.rest.len() >= MAX_REST_FAULTS {
            return Err(SimError::BadRequest(format!(
                "at most {MAX_REST_FAULTS} REST faults queued"
            )));
        }
        f.rest.push_back(fault.clone());
        drop(f);
        self.fault(format!("REST fault {:?}", fault.kind));
        Ok(())
    }

    /// Adds latency to every REST answer and every gateway dispatch.
    pub fn set_latency(&self, rest: Duration, gateway: Duration) {
        self.fault(format!("latency rest {rest:?} gateway {gateway:?}"));
        let mut f = lock(&self.sim.faults);
        f.rest_latency = rest;
        f.gateway_latency = gateway;
    }

    /// Adds up to `jitter` of seeded random delay to every latency (REST and gateway), so
    /// seeded runs see the same delays in the same order.
    pub fn set_jitter(&self, jitter: Duration) {
        self.fault(format!("jitter {jitter:?}"));
        lock(&self.sim.faults).jitter = jitter;
    }

    /// Clears every fault (acks on, connections accepted, no REST faults, no latency).
    pub fn clear_faults(&self) {
        self.fault("clear faults".into());
        *lock(&self.sim.faults) = Default::default();
    }

    /// Forgets every rate-limit bucket and invalid-request count.
    pub fn reset_rate_limits(&self) {
        lock(&self.sim.limiter).reset();
    }

    /// Invalid requests (401/403/429) counted in the current window.
    pub fn invalid_request_count(&self) -> usize {
        lock(&self.sim.limiter).invalid_count()
    }

    // ----- OAuth ----------------------------------------------------------------------------

    /// The next `/oauth2/authorize` logs in as this user.
    pub fn set_next_login(&self, user: u64) {
        lock(&self.sim.oauth).next_user = Some(user);
    }

    /// The next `/oauth2/authorize` redirects with `error=<error>`.
    pub fn set_next_authorize_error(&self, error: &str) {
        lock(&self.sim.oauth).next_error = Some(error.to_owned());
    }

    /// Expires every access token now (refresh tokens stay valid).
    pub fn expire_access_tokens(&self) {
        crate::oauth::expire_all_access_tokens(&self.sim);
    }

    // ----- observation ----------------------------------------------------------------------

    /// Every logged event (bounded by `log_capacity`).
    pub fn events(&self) -> Vec<SimEvent> {
        lock(&self.sim.log).since(0)
    }

    /// Events with id greater than `since`.
    pub fn events_since(&self, since: u64) -> Vec<SimEvent> {
        lock(&self.sim.log).since(since)
    }

    pub fn clear_events(&self) {
        lock(&self.sim.log).clear();
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        let gw = lock(&self.sim.gateway);
        let mut v: Vec<SessionInfo> = gw
            .sessions
            .values()
            .map(|s| SessionInfo {
                session_id: s.id.clone(),
                seq: s.seq,
                intents: s.intents,
                connected: s.conn.is_some(),
                buffered: s.buffer.len(),
            })
            .collect();
        v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        v
    }

    /// Open gateway connections.
    pub fn connection_count(&self) -> usize {
        lock(&self.sim.gateway).conns.len()
    }

    // ----- load -----------------------------------------------------------------------------

    /// Starts the load generator: voice joins, moves and leaves of the guild's members across
    /// its voice channels. One run at a time.
    pub fn start_load(&self, spec: LoadSpec) -> Result<(), SimError> {
        if spec.events_per_sec == 0 || spec.events_per_sec > MAX_LOAD_RATE {
            return Err(SimError::BadRequest(format!(
                "events_per_sec must be 1..={MAX_LOAD_RATE}"
            )));
        }
        if spec.count > MAX_LOAD_COUNT || spec.max_seconds > MAX_LOAD_SECONDS {
            return Err(SimError::BadRequest(format!(
                "count <= {MAX_LOAD_COUNT} and max_seconds <= {MAX_LOAD_SECONDS}"
            )));
        }
        let (guild, users, channels) = {
            let world = lock(&self.sim.world);
            let g = match spec.guild_id {
                Some(id) => world.guild(id)?,
                None => world
                    .guilds
                    .values()
                    .next()
                    .ok_or(SimError::BadRequest("no guild".into()))?,
            };
            let users: Vec<u64> = g
                .members
                .keys()
                .copied()
                .filter(|u| *u != world.bot_id)
                .collect();
            let channels: Vec<u64> = g
                .channels
                .values()
                .filter(|c| c.is_voice())
                .map(|c| c.id)
                .collect();
            (g.id, users, channels)
        };
        if users.is_empty() || channels.is_empty() {
            return Err(SimError::BadRequest(
                "the guild needs members and voice channels".into(),
            ));
        }
        if self.sim.load_running.swap(true, Ordering::SeqCst) {
            return Err(SimError::BadRequest("a load run is already going".into()));
        }
        self.control("load start");
        let sim = self.sim.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / f64::from(spec.events_per_sec));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let end = tokio_deadline(Duration::from_secs(spec.max_seconds));
            let mut sent = 0u32;
            let mut i = 0usize;
            while sent < spec.count && tokio::time::Instant::now() < end {
                if sim.shutting_down.load(Ordering::Relaxed)
                    || !sim.load_running.load(Ordering::Relaxed)
                {
                    break;
                }
                tick.tick().await;
                // Both lists were checked non-empty above.
                let step = i.checked_div(users.len()).unwrap_or(0);
                let pick = |list: &[u64], k: usize| {
                    k.checked_rem(list.len()).and_then(|k| list.get(k)).copied()
                };
                let (Some(user), Some(target)) = (pick(&users, i), pick(&channels, step)) else {
                    break;
                };
                i = i.wrapping_add(1);
                let current = lock(&sim.world)
                    .guild(guild)
                    .ok()
                    .and_then(|g| g.voice.get(&user).map(|v| v.channel_id));
                let r = match current {
                    Some(c) if c == target || step % 3 == 2 => {
                        sim.mutate(|w| w.voice_leave(guild, user))
                    }
                    _ => sim.mutate(|w| w.voice_join(guild, user, target, Actor::Moderator)),
                };
                if r.is_ok() {
                    sent = sent.saturating_add(1);
                }
            }
            sim.load_running.store(false, Ordering::SeqCst);
            sim.record(SimEventKind::Control {
                op: format!("load finished after {sent} events"),
            });
        });
        Ok(())
    }

    /// Stops a running load generator.
    pub fn stop_load(&self) {
        self.sim.load_running.store(false, Ordering::SeqCst);
    }

    pub fn load_running(&self) -> bool {
        self.sim.load_running.load(Ordering::SeqCst)
    }

    /// Closes every gateway connection with 1001 and stops the HTTP server (graceful, bounded).
    pub async fn shutdown(self) {
        self.sim.shutting_down.store(true, Ordering::SeqCst);
        self.sim.load_running.store(false, Ordering::SeqCst);
        self.sim.command_connections(None, || ConnCmd::Close(1001));
        let deadline = instant_after(Instant::now(), Duration::from_secs(2));
        while self.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(s) = &self.server {
            s.stop(true).await;
        }
    }
}
