//! The room handlers: plain async functions over typed commands returning typed errors.
//!
//! - [`create`]: a room's Discord objects (role, channel), made idempotently and fenced against
//!   the reconciler, and the durable cleanup queue for what a failed create leaves behind.
//! - [`membership`]: join (capacity, invites, placement into voice), leave, get, list, invites.
//! - [`lifecycle`]: closing warnings and the one deletion path every close goes through.
//!
//! Capacity and the per-user limit are enforced by compare-and-set on one KV entry each (the
//! room's record, the owner's index), so any number of replicas can serve the same room. Every
//! state change queues its events in the same write ([`crate::outbox`]).

pub mod create;
pub mod lifecycle;
pub mod membership;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use tokio::sync::{OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicerooms_contract::command::Invite;
use voicerooms_contract::{
    now_ms, subject, ApiError, ErrorCode, GuildId, Millis, RoomId, StreamEpoch,
};

use crate::discord::DiscordClient;
use crate::invite::{secs, InviteClaims, InviteSigner};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::settings::{RoomsSettings, TuningSettings};
use crate::store::{self, Change, RoomRecord};

pub use create::create;
pub use lifecycle::{begin_closing, close, finish_room};
pub use membership::{get, join, leave, list_mine, place, placement_label, rotate_invite};

/// Longest room list returned by `list_mine`, and most rooms scanned.
pub const MAX_SCAN: usize = 10_000;

/// How long a guild Discord refused (10004 Unknown Guild, 50001 Missing Access: the bot is not
/// in it) is refused here without asking Discord again. Each refusal is an invalid request.
pub const GUILD_REFUSED_FOR: Duration = Duration::from_secs(60);

/// The KV buckets room-manager works on.
#[derive(Clone)]
pub struct Buckets {
    pub rooms: kv::Store,
    pub state: kv::Store,
    pub cleanup: kv::Store,
    pub tokens: kv::Store,
}

/// Everything a handler needs. Shared by every task of a replica.
pub struct Core {
    pub instance: String,
    pub rooms: kv::Store,
    pub state: kv::Store,
    /// The durable cleanup queue ([`crate::store::CLEANUP_BUCKET`]).
    pub cleanup: kv::Store,
    pub tokens: kv::Store,
    pub js: jetstream::Context,
    pub discord: DiscordClient,
    pub invites: InviteSigner,
    pub settings: RoomsSettings,
    pub tuning: TuningSettings,
    pub invite_ttl: Duration,
    pub metrics: Metrics,
    pub outbox: Arc<Outbox>,
    /// Guilds rooms may be created in.
    pub guilds: Vec<GuildId>,
    /// Background work is tracked here (awaited at shutdown) and stops on `shutdown`.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Bounds background Discord work (pending moves, deletions).
    jobs: Arc<Semaphore>,
    /// The `ROOMS` stream's epoch as last seen by the event consumer (0: not yet known).
    epoch: AtomicU64,
    bot_id: OnceCell<u64>,
    /// Guilds Discord refused, and when (see [`GUILD_REFUSED_FOR`]). A std mutex: held for a
    /// lookup or an update, never across an await. Bounded: only allow-listed guilds and
    /// guilds of stored rooms are ever noted, and expired entries are dropped.
    refused_guilds: Mutex<HashMap<GuildId, Instant>>,
}

/// What [`Core::new`] is built from.
pub struct CoreParts {
    pub instance: String,
    pub buckets: Buckets,
    pub js: jetstream::Context,
    pub discord: DiscordClient,
    pub invites: InviteSigner,
    pub settings: RoomsSettings,
    pub tuning: TuningSettings,
    pub invite_ttl: Duration,
    pub metrics: Metrics,
    pub guilds: Vec<GuildId>,
    pub dedup_window: Duration,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl Core {
    pub fn new(p: CoreParts) -> Arc<Self> {
        let jobs = Arc::new(Semaphore::new(p.tuning.max_background_jobs.max(1)));
        Arc::new(Self {
            instance: p.instance,
            rooms: p.buckets.rooms,
            state: p.buckets.state,
            cleanup: p.buckets.cleanup,
            tokens: p.buckets.tokens,
            js: p.js,
            discord: p.discord,
            invites: p.invites,
            settings: p.settings,
            tuning: p.tuning,
            invite_ttl: p.invite_ttl,
            metrics: p.metrics,
            outbox: Arc::new(Outbox::new(p.dedup_window)),
            guilds: p.guilds,
            tasks: p.tasks,
            shutdown: p.shutdown,
            jobs,
            epoch: AtomicU64::new(0),
            bot_id: OnceCell::new(),
            refused_guilds: Mutex::new(HashMap::new()),
        })
    }

    /// The bot's user id (asked once).
    pub async fn bot_id(&self) -> Result<u64, ApiError> {
        self.bot_id
            .get_or_try_init(|| async { self.discord.me().await })
            .await
            .copied()
            .map_err(|e| e.to_api())
    }

    /// Notes that Discord refused `guild` as a whole (the bot is not in it, or it does not
    /// exist): creates there are refused without a Discord call for [`GUILD_REFUSED_FOR`].
    pub fn note_guild_refused(&self, guild: GuildId) {
        let mut refused = self
            .refused_guilds
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        refused.retain(|_, at| now.saturating_duration_since(*at) < GUILD_REFUSED_FOR);
        refused.insert(guild, now);
    }

    /// Whether Discord refused `guild` within the last [`GUILD_REFUSED_FOR`].
    pub fn guild_refused(&self, guild: GuildId) -> bool {
        let refused = self
            .refused_guilds
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        refused
            .get(&guild)
            .is_some_and(|at| at.elapsed() < GUILD_REFUSED_FOR)
    }

    pub async fn record(&self, room: RoomId) -> Result<Option<(RoomRecord, u64)>, ApiError> {
        Ok(store::get(&self.rooms, &subject::room_key(room)).await?)
    }

    /// The `ROOMS` stream's epoch, once the consumer has seen the stream.
    pub fn stream_epoch(&self) -> Option<StreamEpoch> {
        match self.epoch.load(Ordering::Relaxed) {
            0 => None,
            e => Some(StreamEpoch::from_unix_nanos(e)),
        }
    }

    pub fn set_stream_epoch(&self, epoch: StreamEpoch) {
        self.epoch.store(epoch.unix_nanos(), Ordering::Relaxed);
    }

    /// Changes a room by compare-and-set; `f` may queue events into the record's outbox.
    /// Returns `f`'s result and whether it wrote.
    pub async fn change_room<R, F>(&self, room: RoomId, f: F) -> Result<(R, bool), ApiError>
    where
        F: FnMut(Option<RoomRecord>) -> Result<Change<RoomRecord, R>, ApiError>,
    {
        let (r, revision) =
            store::update::<RoomRecord, R, ApiError, _>(&self.rooms, &subject::room_key(room), f)
                .await??;
        Ok((r, revision.is_some()))
    }

    /// Publishes what the room's outbox holds (retrying in the background on failure).
    pub async fn flush(self: &Arc<Self>, room: RoomId) {
        self.outbox.flush(self, room).await;
    }

    /// Runs Discord work in the background, bounded by `max_background_jobs` and tracked for
    /// shutdown. Used where the caller must not wait on Discord (the event consumer).
    pub fn spawn_job<F>(&self, name: &'static str, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let jobs = self.jobs.clone();
        self.tasks.spawn(async move {
            let Ok(_permit) = jobs.acquire_owned().await else {
                return;
            };
            tracing::debug!(job = name, "background job started");
            job.await;
        });
    }

    fn invite_claims(&self, rec: &RoomRecord) -> InviteClaims {
        InviteClaims {
            room: rec.view.id.to_string(),
            guild: rec.view.guild.to_string(),
            channel: rec.view.id.to_string(),
            role: rec.view.role.to_string(),
            sub: rec.view.owner.id.to_string(),
            iat: secs(rec.invite_issued_at),
            exp: secs(rec.view.invite_expires_at),
            jti: rec.invite_id.clone(),
        }
    }

    pub fn invite(&self, rec: &RoomRecord) -> Result<Invite, ApiError> {
        Ok(Invite {
            token: self.invites.sign(&self.invite_claims(rec))?,
            expires_at: rec.view.invite_expires_at,
        })
    }

    fn new_invite_fields(&self) -> (String, Millis, Millis) {
        let now = now_ms();
        // Whole seconds, so the token's iat/exp and the record agree exactly.
        let issued = now.saturating_sub(now.checked_rem(1000).unwrap_or(0));
        let ttl = u64::try_from(self.invite_ttl.as_millis()).unwrap_or(u64::MAX);
        (
            uuid::Uuid::new_v4().simple().to_string(),
            issued,
            issued.saturating_add(ttl),
        )
    }
}

fn not_found(room: RoomId) -> ApiError {
    ApiError::new(
        ErrorCode::RoomNotFound,
        format!("room {room} does not exist"),
    )
}
