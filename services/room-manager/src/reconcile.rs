//! The reconciler: every replica, at start-up and every `rooms.reconcile_interval_ms`, makes
//! Discord and KV agree — against a consistent view, so it can never take a live room or a create
//! in flight for garbage.
//!
//! One pass:
//! 1. **Expired create slots** (older than `create_timeout_ms`) are claimed by compare-and-set
//!    (removing the slot, which stops the create if it is still running: it can no longer note
//!    its progress). If the create had made its channel, the room key is *created* as a fence; if
//!    that fails the create had committed and the room is adopted into its owner's index instead.
//!    Otherwise its objects go to the durable cleanup queue.
//! 2. **KV is read** (slots, then rooms — a create writes its room before dropping its slot, so
//!    in that order nothing is missed), **then Discord is listed**, **then KV is read again**.
//!    A guild Discord refuses (the bot is not in it) is skipped and noted, so creates there are
//!    refused without a Discord call; a guild whose listing fails otherwise is skipped this pass.
//!    Either way the other guilds are reconciled.
//! 3. **Vanished channels:** a room present in both reads, older than `reconcile_grace_ms`,
//!    whose channel is missing from the listing *and* answers 404 when asked directly is closed
//!    (`channel_deleted`). Its channel was made before its record, so reading KV first means a
//!    room that was just created can never look like one whose channel is gone.
//! 4. **Orphans:** a role tagged `vr-<nonce>` or a voice channel whose overwrites name such a
//!    role is accounted for by a room (its role; its channel, by id) or a live slot (its nonce,
//!    the ids it noted). Anything unaccounted for in both reads is remembered; it is deleted
//!    (channels first) only when a later pass, at least `reconcile_grace_ms` later, still finds
//!    it unaccounted for. Duplicates (a second channel naming a room's role) are orphans too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::command::{RoomState, RoomView};
use voicerooms_contract::event::CloseReason;
use voicerooms_contract::{
    now_ms, subject, ApiError, ErrorCode, GuildId, RoleId, RoomId, UserId, UserRef,
};

use crate::discord::{Channel, DiscordError, Role, GUILD_VOICE};
use crate::rooms::create::{discard, guild_refused, nonce_of, role_name};
use crate::rooms::lifecycle::complete_deletion;
use crate::rooms::{finish_room, Core, MAX_SCAN};
use crate::store::{
    self, owner_key, Change, CleanupEntry, CreateSlot, Lease, OwnerIndex, RoomRecord,
};

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Expired create slots rolled back.
    pub rolled_back: usize,
    /// Expired slots whose create had committed: the room was kept.
    pub adopted: usize,
    /// Orphaned Discord objects deleted.
    pub deleted: usize,
    /// Unaccounted objects seen, not yet old enough to delete.
    pub suspects: usize,
    /// Rooms closed because their channel is gone.
    pub closed: usize,
    /// Guilds skipped because Discord refuses them (10004 / 50001: the bot is not in them).
    pub unreachable_guilds: usize,
}

/// Per-process memory of unaccounted objects: when each was first seen so.
#[derive(Default)]
pub struct Reconciler {
    /// A std mutex: held for a lookup or an update, never across an await.
    suspects: Mutex<HashMap<u64, Instant>>,
}

/// What KV accounts for.
#[derive(Default)]
struct Accounting {
    rooms: HashMap<u64, RoomRecord>,
    room_roles: HashSet<u64>,
    /// Live slots by nonce: (role, channel) as noted.
    slots: HashMap<String, (Option<u64>, Option<u64>)>,
}

impl Accounting {
    async fn read(core: &Core) -> Result<Self, ApiError> {
        let mut a = Accounting::default();
        // Slots first, then rooms: a create writes its room before dropping its slot.
        for (_, idx, _) in store::scan::<OwnerIndex>(&core.state, "owner.", MAX_SCAN).await? {
            for s in idx.creating {
                a.slots.insert(s.nonce, (s.role, s.channel));
            }
        }
        for (_, rec, _) in store::scan::<RoomRecord>(&core.rooms, "", MAX_SCAN).await? {
            a.room_roles.insert(rec.view.role.get());
            a.rooms.insert(rec.view.id.get(), rec);
        }
        Ok(a)
    }

    fn role_accounted(&self, role: &Role, id: u64) -> bool {
        self.room_roles.contains(&id)
            || nonce_of(&role.name)
                .and_then(|n| self.slots.get(n))
                .is_some_and(|(r, _)| r.is_none_or(|r| r == id))
    }

    fn channel_accounted(&self, c: &Channel, id: u64) -> bool {
        self.rooms.contains_key(&id)
            || c.roles().any(|r| {
                self.slots
                    .values()
                    .any(|(sr, sc)| *sr == Some(r) && sc.is_none_or(|sc| sc == id))
            })
    }

    fn our_roles(&self) -> impl Iterator<Item = u64> + '_ {
        self.room_roles
            .iter()
            .copied()
            .chain(self.slots.values().filter_map(|(r, _)| *r))
    }
}

impl Reconciler {
    /// One pass; see the module documentation.
    pub async fn pass(&self, core: &Arc<Core>) -> Result<Report, ApiError> {
        let mut report = Report::default();
        expire_slots(core, &mut report).await?;
        let first = Accounting::read(core).await?;
        let mut guilds: Vec<GuildId> = core.guilds.clone();
        for rec in first.rooms.values() {
            if !guilds.contains(&rec.view.guild) {
                guilds.push(rec.view.guild);
            }
        }
        // A guild that cannot be listed is skipped; the others are reconciled all the same.
        let mut listed = Vec::new();
        let mut failed = None;
        for guild in guilds {
            let listing = async {
                let roles = core.discord.guild_roles(guild.get()).await?;
                let channels = core.discord.guild_channels(guild.get()).await?;
                Ok::<_, DiscordError>((roles, channels))
            };
            match listing.await {
                Ok((roles, channels)) => listed.push((guild, roles, channels)),
                Err(e) if guild_refused(&e) => {
                    core.note_guild_refused(guild);
                    report.unreachable_guilds = report.unreachable_guilds.saturating_add(1);
                    tracing::warn!(guild = %guild, error = %e, "Discord refuses this guild (the bot is not in it, or it does not exist): not reconciled; add the bot or remove the guild from rooms.guilds");
                }
                Err(e) => {
                    tracing::warn!(guild = %guild, error = %e, "listing the guild failed; it is reconciled next pass");
                    failed.get_or_insert(e.to_api());
                }
            }
        }
        let second = Accounting::read(core).await?;
        let now = Instant::now();
        let grace = Duration::from_millis(core.settings.reconcile_grace_ms);
        let mut unaccounted = HashSet::new();
        for (guild, roles, channels) in &listed {
            report.closed = report
                .closed
                .saturating_add(close_vanished(core, &first, &second, *guild, channels).await);
            let tagged: HashSet<u64> = roles
                .iter()
                .filter(|r| nonce_of(&r.name).is_some())
                .filter_map(Role::id_u64)
                .chain(first.our_roles())
                .chain(second.our_roles())
                .collect();
            let existing: HashSet<u64> = roles.iter().filter_map(Role::id_u64).collect();
            let bot = core.bot_id().await.ok();
            let mut doomed_channels = Vec::new();
            for c in channels {
                let Some(id) = c.id_u64() else { continue };
                let ours = c.roles().any(|r| tagged.contains(&r))
                    || bot.is_some_and(|b| c.is_ours_without_role(guild.get(), b, &existing));
                if c.kind != GUILD_VOICE || !ours {
                    continue;
                }
                if first.channel_accounted(c, id) || second.channel_accounted(c, id) {
                    continue;
                }
                unaccounted.insert(id);
                if self.old_enough(id, now, grace) {
                    doomed_channels.push(id);
                }
            }
            let mut doomed_roles = Vec::new();
            for r in roles {
                let Some(id) = r.id_u64() else { continue };
                if nonce_of(&r.name).is_none()
                    || first.role_accounted(r, id)
                    || second.role_accounted(r, id)
                {
                    continue;
                }
                unaccounted.insert(id);
                if self.old_enough(id, now, grace) {
                    doomed_roles.push(id);
                }
            }
            for id in doomed_channels {
                tracing::warn!(channel = id, guild = %guild, "deleting orphaned channel");
                core.discord
                    .delete_channel(id)
                    .await
                    .map_err(|e| e.to_api())?;
                report.deleted = report.deleted.saturating_add(1);
            }
            for id in doomed_roles {
                tracing::warn!(role = id, guild = %guild, "deleting orphaned role");
                core.discord
                    .delete_role(guild.get(), id)
                    .await
                    .map_err(|e| e.to_api())?;
                report.deleted = report.deleted.saturating_add(1);
            }
        }
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        suspects.retain(|id, _| unaccounted.contains(id));
        report.suspects = suspects.len();
        drop(suspects);
        match failed {
            // The pass did not see every guild: not a completed pass.
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Whether `id` has been unaccounted for since at least `grace` ago (remembering it now if
    /// it is new).
    fn old_enough(&self, id: u64, now: Instant, grace: Duration) -> bool {
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        let first = *suspects.entry(id).or_insert(now);
        now.saturating_duration_since(first) >= grace
    }
}

/// Closes the rooms of `guild` whose channel is gone (step 3).
async fn close_vanished(
    core: &Arc<Core>,
    first: &Accounting,
    second: &Accounting,
    guild: GuildId,
    channels: &[Channel],
) -> usize {
    let listed: HashSet<u64> = channels.iter().filter_map(Channel::id_u64).collect();
    let grace = core.settings.reconcile_grace_ms;
    let now = now_ms();
    let mut closed = 0usize;
    for (id, rec) in &first.rooms {
        if rec.view.guild != guild
            || rec.fence
            || listed.contains(id)
            || !matches!(rec.view.state, RoomState::Open | RoomState::Closing)
            || now.saturating_sub(rec.view.created_at) < grace
            || !second.rooms.contains_key(id)
        {
            continue;
        }
        // The listing says it is gone; ask for it directly before believing it.
        match core.discord.channel(*id).await {
            Ok(None) => {}
            Ok(Some(_)) => continue,
            Err(e) => {
                tracing::warn!(room = %rec.view.id, error = %e, "could not confirm a missing channel");
                continue;
            }
        }
        tracing::warn!(room = %rec.view.id, "room's channel is gone; closing it");
        match finish_room(core, rec.view.id, CloseReason::ChannelDeleted, true).await {
            Ok(true) => closed = closed.saturating_add(1),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(room = %rec.view.id, error = %e, "closing room without channel failed")
            }
        }
    }
    closed
}

/// Step 1: claims and rolls back (or adopts) every create slot older than `create_timeout_ms`.
async fn expire_slots(core: &Arc<Core>, report: &mut Report) -> Result<(), ApiError> {
    let now = now_ms();
    for (key, idx, _) in store::scan::<OwnerIndex>(&core.state, "owner.", MAX_SCAN).await? {
        let Some(user) = key
            .strip_prefix("owner.")
            .and_then(|u| UserId::parse(u).ok())
        else {
            continue;
        };
        for slot in idx.creating {
            if slot
                .started_at
                .saturating_add(core.settings.create_timeout_ms)
                > now
            {
                continue;
            }
            match expire_slot(core, user, &slot).await {
                Ok(Expired::RolledBack) => {
                    report.rolled_back = report.rolled_back.saturating_add(1)
                }
                Ok(Expired::Adopted) => report.adopted = report.adopted.saturating_add(1),
                Ok(Expired::Gone) => {}
                Err(e) => {
                    tracing::warn!(nonce = %slot.nonce, error = %e, "rolling back an abandoned create failed")
                }
            }
        }
    }
    Ok(())
}

enum Expired {
    RolledBack,
    Adopted,
    Gone,
}

async fn expire_slot(
    core: &Arc<Core>,
    user: UserId,
    slot: &CreateSlot,
) -> Result<Expired, ApiError> {
    let nonce = slot.nonce.clone();
    let timeout = core.settings.create_timeout_ms;
    let (claimed, _) =
        store::update::<OwnerIndex, bool, ApiError, _>(&core.state, &owner_key(user), |cur| {
            let Some(mut idx) = cur else {
                return Ok(Change::Keep(false));
            };
            let expired = idx
                .creating
                .iter()
                .any(|s| s.nonce == nonce && s.started_at.saturating_add(timeout) <= now_ms());
            if !expired {
                return Ok(Change::Keep(false));
            }
            idx.creating.retain(|s| s.nonce != nonce);
            Ok(Change::Put(idx, true))
        })
        .await??;
    if !claimed {
        return Ok(Expired::Gone);
    }
    tracing::warn!(nonce = %slot.nonce, instance = %slot.instance, "giving up an abandoned create");
    if let (Some(channel), Some(role)) = (slot.channel, slot.role) {
        match fence(core, user, slot, channel, role).await? {
            None => {
                adopt(core, user, slot, channel).await?;
                return Ok(Expired::Adopted);
            }
            // Delete the fenced room's objects and the fence itself now (the cleanup scan
            // takes over if this fails: the fence is `deleting` with a lease).
            Some(fenced) => {
                let core2 = core.clone();
                core.spawn_job("remove fence", async move {
                    if let Err(e) = complete_deletion(&core2, fenced).await {
                        tracing::warn!(error = %e, "removing a fence failed; the cleanup scan retries");
                    }
                });
            }
        }
    }
    discard(
        core,
        CleanupEntry {
            guild: slot.guild,
            nonce: slot.nonce.clone(),
            role_name: role_name(&slot.nonce, &slot.name),
            role: slot.role,
            channel: slot.channel,
            queued_at: now_ms(),
            // Its last create may still be in flight somewhere.
            settle_at: None,
            attempts: 0,
        },
    )
    .await;
    Ok(Expired::RolledBack)
}

/// Creates the room key of an abandoned create, so it can never commit; returns the fence.
/// `None` when the key exists: the create committed after all.
async fn fence(
    core: &Core,
    user: UserId,
    slot: &CreateSlot,
    channel: u64,
    role: u64,
) -> Result<Option<RoomRecord>, ApiError> {
    let bad = |_| ApiError::new(ErrorCode::Internal, "a create slot holds an invalid id");
    let now = now_ms();
    let rec = RoomRecord {
        view: RoomView {
            id: RoomId::new(channel).map_err(bad)?,
            guild: slot.guild,
            name: slot.name.clone(),
            owner: UserRef {
                id: user,
                username: String::new(),
                global_name: None,
                avatar: None,
            },
            role: RoleId::new(role).map_err(bad)?,
            capacity: core.settings.capacity,
            state: RoomState::Deleting,
            members: Vec::new(),
            voice: Vec::new(),
            created_at: slot.started_at,
            last_activity: now,
            invite_expires_at: now,
            closing_deadline: None,
            seq: 0,
        },
        invite_id: String::new(),
        invite_issued_at: now,
        lease: Some(Lease {
            instance: core.instance.clone(),
            until: now.saturating_add(core.settings.lease_ms),
        }),
        close_reason: None,
        voice_seq: Default::default(),
        stream_epoch: None,
        nonce: Some(slot.nonce.clone()),
        outbox: Vec::new(),
        next_event: 0,
        deleted_queued: true,
        fence: true,
    };
    let bytes = Bytes::from(
        serde_json::to_vec(&rec).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?,
    );
    match core
        .rooms
        .create(subject::room_key(rec.view.id), bytes)
        .await
    {
        Ok(_) => Ok(Some(rec)),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(ApiError::new(ErrorCode::Timeout, e.to_string())),
    }
}

/// Records a committed create's room in its owner's index (its replica died before doing so).
async fn adopt(core: &Core, user: UserId, slot: &CreateSlot, channel: u64) -> Result<(), ApiError> {
    let room = RoomId::new(channel)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "a create slot holds an invalid id"))?;
    store::update::<OwnerIndex, (), ApiError, _>(&core.state, &owner_key(user), |cur| {
        let mut idx = cur.unwrap_or_default();
        if !idx.rooms.contains(&room) {
            idx.rooms.push(room);
        }
        idx.remember(slot.idempotency_key.as_deref(), room);
        Ok(Change::Put(idx, ()))
    })
    .await??;
    tracing::info!(room = %room, nonce = %slot.nonce, "kept the room of a create whose replica stopped after committing it");
    Ok(())
}

/// Runs a pass at start-up and every `reconcile_interval_ms` until shutdown.
pub async fn run(
    core: Arc<Core>,
    reconciler: Arc<Reconciler>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let every = Duration::from_millis(core.settings.reconcile_interval_ms);
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = reconciler.pass(&core) => r,
        };
        tracing::debug!(
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "reconcile pass done"
        );
        match result {
            Ok(report) => {
                core.metrics.reconciled(&report);
                if report != Report::default()
                    && (report.deleted > 0
                        || report.rolled_back > 0
                        || report.adopted > 0
                        || report.closed > 0)
                {
                    tracing::info!(?report, "reconciler acted");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reconciliation failed"),
        }
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
