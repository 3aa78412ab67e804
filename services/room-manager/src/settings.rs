//! room-manager's own settings sections: `rooms` (lifecycle), `invites` (token signing) and
//! `room_manager` (Discord REST client and internal limits). Durations are in milliseconds so
//! tests can shrink an hour to a moment.

use serde::{Deserialize, Serialize};
use voicerooms_contract::GuildId;
use voicerooms_platform::settings::{positive, CheckSettings, DiscordSettings};
use voicerooms_platform::{Secret, SettingsError};

/// The sections this service reads besides the common ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomManagerSettings {
    pub discord: DiscordSettings,
    pub rooms: RoomsSettings,
    pub invites: InvitesSettings,
    pub room_manager: TuningSettings,
}

impl CheckSettings for RoomManagerSettings {
    fn check(&self) -> Result<(), SettingsError> {
        self.discord.check()?;
        self.rooms.check()?;
        self.invites.check()?;
        self.room_manager.check()
    }
}

/// Room lifecycle: capacity, per-user limit, idle cleanup, pending moves, reconciliation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsSettings {
    /// Members per room; also the voice channel's `user_limit`.
    pub capacity: u8,
    /// Rooms one user may own at once (open rooms plus creates in progress).
    pub max_per_user: usize,
    /// A room whose channel has been empty this long gets a closing warning.
    pub idle_timeout_ms: u64,
    /// How often each replica scans for idle rooms.
    pub cleanup_interval_ms: u64,
    /// Time between the `room.closing` warning and deletion.
    pub closing_warning_ms: u64,
    /// How long a pending move waits for the player to connect to voice.
    pub pending_move_window_ms: u64,
    /// A create older than this that has not finished is treated as crashed and rolled back.
    pub create_timeout_ms: u64,
    /// How often the reconciler looks for orphaned Discord channels and roles (also at start-up).
    pub reconcile_interval_ms: u64,
    /// How long a replica holds a room while deleting it before another may take over.
    pub lease_ms: u64,
    /// The reconciler never closes a room younger than this, and deletes a Discord object only
    /// after it has been unaccounted for (no room, no create in progress) for at least this long.
    pub reconcile_grace_ms: u64,
    /// Guilds rooms may be created in, comma separated. A create naming any other guild is
    /// refused with `validation` before any Discord call. Empty: the simulator's seeded guild
    /// when `discord.api_base` is a simulator (the dev stack, tests); against Discord it must be
    /// set.
    pub guilds: String,
}

impl Default for RoomsSettings {
    fn default() -> Self {
        Self {
            capacity: 4,
            max_per_user: 3,
            idle_timeout_ms: 3_600_000,
            cleanup_interval_ms: 300_000,
            closing_warning_ms: 30_000,
            pending_move_window_ms: 300_000,
            create_timeout_ms: 60_000,
            reconcile_interval_ms: 600_000,
            lease_ms: 30_000,
            reconcile_grace_ms: 60_000,
            guilds: String::new(),
        }
    }
}

impl CheckSettings for RoomsSettings {
    fn check(&self) -> Result<(), SettingsError> {
        if self.capacity == 0 || self.capacity > 99 {
            return Err(SettingsError::invalid("rooms.capacity", "must be 1-99"));
        }
        if self.max_per_user == 0 || self.max_per_user > 100 {
            return Err(SettingsError::invalid(
                "rooms.max_per_user",
                "must be 1-100",
            ));
        }
        positive("rooms.idle_timeout_ms", self.idle_timeout_ms)?;
        positive("rooms.cleanup_interval_ms", self.cleanup_interval_ms)?;
        positive("rooms.closing_warning_ms", self.closing_warning_ms)?;
        positive("rooms.pending_move_window_ms", self.pending_move_window_ms)?;
        positive("rooms.create_timeout_ms", self.create_timeout_ms)?;
        positive("rooms.reconcile_interval_ms", self.reconcile_interval_ms)?;
        positive("rooms.lease_ms", self.lease_ms)?;
        positive("rooms.reconcile_grace_ms", self.reconcile_grace_ms)?;
        self.guild_list().map(|_| ())
    }
}

impl RoomsSettings {
    /// The configured guild allow-list (may be empty; see [`RoomsSettings::guilds`]).
    pub fn guild_list(&self) -> Result<Vec<GuildId>, SettingsError> {
        self.guilds
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(|g| {
                GuildId::parse(g).map_err(|_| {
                    SettingsError::invalid("rooms.guilds", format!("{g:?} is not a guild id"))
                })
            })
            .collect()
    }
}

/// Invite tokens: HS256 JWTs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InvitesSettings {
    /// HS256 signing secret shared by every replica (at least 32 bytes). When unset, a random
    /// secret is made per process: fine for one replica in development, wrong for several.
    pub secret: Option<Secret>,
    /// Invite lifetime.
    pub ttl_secs: u64,
}

impl Default for InvitesSettings {
    fn default() -> Self {
        Self {
            secret: None,
            ttl_secs: 86_400,
        }
    }
}

impl CheckSettings for InvitesSettings {
    fn check(&self) -> Result<(), SettingsError> {
        positive("invites.ttl_secs", self.ttl_secs)?;
        if let Some(secret) = &self.secret {
            if secret.expose().len() < 32 {
                return Err(SettingsError::invalid(
                    "invites.secret",
                    "must be at least 32 bytes (value not shown)",
                ));
            }
        }
        Ok(())
    }
}

/// Discord REST client and internal bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TuningSettings {
    /// First retry delay for 5xx and timeouts; doubles each retry (1, 2, 4, 8, 16 s).
    pub retry_base_ms: u64,
    /// Retries of one Discord request after 5xx or timeouts, then a typed error.
    pub max_retries: u32,
    /// 429 answers one request may wait out (each waits what Discord's headers say).
    pub max_rate_limit_waits: u32,
    /// Time allowed for one Discord HTTP request.
    pub request_timeout_ms: u64,
    /// Requests per second across all routes (Discord's global limit is 50).
    pub global_rate_limit: u16,
    /// Discord requests waiting for a rate-limit permit at once; beyond it requests fail with
    /// `rate_limited` instead of queueing without bound.
    pub max_queued_requests: usize,
    /// NATS requests handled at once by this replica.
    pub max_inflight_commands: usize,
    /// Name of the durable JetStream consumer shared by all replicas.
    pub consumer: String,
    /// Lanes applying room events in parallel (events of one room always go to the same lane,
    /// in stream order).
    pub event_lanes: usize,
    /// Discord work done in the background (pending moves, deleting a closed room's channel and
    /// role) at once per replica; more waits.
    pub max_background_jobs: usize,
    /// How often the durable cleanup queue (Discord objects a failed create could not delete) is
    /// retried; also the longest wait between retries of a failed event publish.
    pub retry_interval_ms: u64,
    /// How often each replica looks through every room for events left unpublished (a replica
    /// died between a state change and its publish). Keep it well under
    /// `nats.duplicate_window_secs`, so a re-publish is recognised as a duplicate.
    pub outbox_sweep_interval_ms: u64,
    /// First delay before a failed long-running task (room API, event consumer, loops) is
    /// restarted; doubles up to 30 s.
    pub restart_backoff_ms: u64,
}

impl Default for TuningSettings {
    fn default() -> Self {
        Self {
            retry_base_ms: 1_000,
            max_retries: 5,
            max_rate_limit_waits: 10,
            request_timeout_ms: 10_000,
            global_rate_limit: 50,
            max_queued_requests: 1_024,
            max_inflight_commands: 256,
            consumer: "room-manager".into(),
            event_lanes: 16,
            max_background_jobs: 64,
            retry_interval_ms: 5_000,
            outbox_sweep_interval_ms: 30_000,
            restart_backoff_ms: 1_000,
        }
    }
}

impl CheckSettings for TuningSettings {
    fn check(&self) -> Result<(), SettingsError> {
        positive("room_manager.retry_base_ms", self.retry_base_ms)?;
        if self.max_retries > 10 {
            return Err(SettingsError::invalid(
                "room_manager.max_retries",
                "must be at most 10",
            ));
        }
        positive("room_manager.request_timeout_ms", self.request_timeout_ms)?;
        positive(
            "room_manager.global_rate_limit",
            self.global_rate_limit as u64,
        )?;
        positive(
            "room_manager.max_queued_requests",
            self.max_queued_requests as u64,
        )?;
        positive(
            "room_manager.max_inflight_commands",
            self.max_inflight_commands as u64,
        )?;
        if self.event_lanes == 0 || self.event_lanes > 256 {
            return Err(SettingsError::invalid(
                "room_manager.event_lanes",
                "must be 1-256",
            ));
        }
        positive(
            "room_manager.max_background_jobs",
            self.max_background_jobs as u64,
        )?;
        positive("room_manager.retry_interval_ms", self.retry_interval_ms)?;
        positive(
            "room_manager.outbox_sweep_interval_ms",
            self.outbox_sweep_interval_ms,
        )?;
        positive("room_manager.restart_backoff_ms", self.restart_backoff_ms)?;
        if self.consumer.is_empty()
            || !self
                .consumer
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(SettingsError::invalid(
                "room_manager.consumer",
                "must be [A-Za-z0-9_-]+",
            ));
        }
        Ok(())
    }
}
