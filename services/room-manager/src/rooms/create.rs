//! `create`, and what makes it impossible to lose a room or leave a Discord object behind.
//!
//! 1. The guild must be on the allow-list (`rooms.guilds`) — checked before any Discord call.
//! 2. A *create slot* is claimed in `owner.<user>` by compare-and-set (per-user limit,
//!    idempotency key). The slot exists before anything is made in Discord.
//! 3. The role `vr-<nonce> <name>` is created — idempotently: a lost answer is looked up by
//!    that unique name, never posted twice blindly — and its id noted in the slot.
//! 4. The voice channel is created the same way (looked up by the role its overwrites name), and
//!    its id noted in the slot. Noting fails once the reconciler has claimed an expired slot,
//!    which stops the create.
//! 5. The creator gets the role; the room record is *created* (it must not exist: the
//!    reconciler fences an abandoned create by creating the key first) with `room.created` in
//!    its outbox — the commit point. Then the slot becomes an owned room.
//!
//! A failure before the commit queues the create's objects in the durable cleanup queue
//! (`room_manager_cleanup`, key = nonce) *before* the slot is freed, and deletes them in the
//! background; every replica retries the queue every `retry_interval_ms` until Discord lets
//! it, so nothing is left behind even when the rollback itself fails (429/5xx storms, shutdown,
//! a crash).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use voicerooms_contract::command::{CreateRoom, Created, RoomMember, RoomState, RoomView};
use voicerooms_contract::event::{Event, JoinedVia, RoomCreated};
use voicerooms_contract::{
    now_ms, subject, ApiError, ErrorCode, GuildId, Millis, RoleId, RoomId, UserId,
};

use super::membership::{ensure_member_with_role, place, placement_label};
use super::{not_found, Core};
use crate::discord::{DiscordError, MAX_CHANNELS, MAX_ROLES, MISSING_ACCESS, UNKNOWN_GUILD};
use crate::outbox;
use crate::store::{self, owner_key, Change, CleanupEntry, CreateSlot, OwnerIndex, RoomRecord};

/// Role names carry this tag followed by the create's nonce.
pub const ROLE_TAG: &str = "vr-";
/// Longest role name Discord accepts.
const MAX_ROLE_NAME: usize = 100;

/// The role name of a create: `vr-<nonce> <room name>`, cut to Discord's limit.
pub fn role_name(nonce: &str, name: &str) -> String {
    format!("{ROLE_TAG}{nonce} {}", name.trim())
        .chars()
        .take(MAX_ROLE_NAME)
        .collect()
}

/// The nonce in a role name made by [`role_name`].
pub fn nonce_of(role_name: &str) -> Option<&str> {
    role_name.strip_prefix(ROLE_TAG)?.split(' ').next()
}

/// What a failed create had made.
struct Failed {
    error: ApiError,
    role: Option<u64>,
    channel: Option<u64>,
    /// A create attempt's outcome is unknown: an object may still appear.
    unsettled: bool,
}

impl Failed {
    fn at(error: ApiError, role: Option<u64>, channel: Option<u64>) -> Self {
        Self {
            error,
            role,
            channel,
            unsettled: false,
        }
    }

    fn discord(e: &DiscordError, role: Option<u64>, channel: Option<u64>) -> Self {
        Self {
            error: create_error(e),
            role,
            channel,
            unsettled: matches!(
                e,
                DiscordError::Unavailable { .. } | DiscordError::ShuttingDown
            ),
        }
    }
}

/// Whether Discord refused a guild-level call because the guild is unknown or the bot is not in
/// it.
pub fn guild_refused(e: &DiscordError) -> bool {
    matches!(e.json_code(), Some(UNKNOWN_GUILD) | Some(MISSING_ACCESS))
}

fn bot_not_in_guild() -> ApiError {
    ApiError::new(
        ErrorCode::Validation,
        "rooms cannot be created in this guild (the bot is not in it)",
    )
}

/// A Discord failure as the creator sees it: a guild the bot cannot use is not worth retrying,
/// a guild at Discord's limits is full.
fn create_error(e: &DiscordError) -> ApiError {
    match e.json_code() {
        Some(UNKNOWN_GUILD) | Some(MISSING_ACCESS) => bot_not_in_guild(),
        Some(MAX_ROLES) | Some(MAX_CHANNELS) => ApiError::new(
            ErrorCode::RoomLimitReached,
            "the guild is at Discord's limit of roles or channels",
        ),
        _ => e.to_api(),
    }
}

/// `create`: see the module documentation for the steps.
pub async fn create(core: &Arc<Core>, cmd: CreateRoom) -> Result<Created, ApiError> {
    let started = Instant::now();
    if !core.guilds.contains(&cmd.guild) {
        return Err(ApiError::new(
            ErrorCode::Validation,
            format!("rooms cannot be created in guild {}", cmd.guild),
        ));
    }
    // Discord refused this guild a moment ago: asking again would only spend the bot's
    // invalid-request budget.
    if core.guild_refused(cmd.guild) {
        return Err(bot_not_in_guild());
    }
    let user = cmd.requester.id;
    let nonce: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(12)
        .collect();
    let key = cmd.idempotency_key.clone();
    let claim = claim_slot(core, &cmd, &nonce).await?;
    if let Claim::Existing(room) = claim {
        let (rec, _) = core.record(room).await?.ok_or_else(|| not_found(room))?;
        let placement = place(core, &rec, &cmd.requester).await;
        return Ok(Created {
            invite: core.invite(&rec)?,
            room: rec.view,
            placement,
        });
    }
    let rec = match build(core, &cmd, &nonce).await {
        Ok(rec) => rec,
        Err(failed) => {
            discard(core, cleanup_entry(cmd.guild, &nonce, &cmd.name, &failed)).await;
            release_slot(core, user, &nonce, None).await;
            return Err(failed.error);
        }
    };
    let room = rec.view.id;
    release_slot(core, user, &nonce, Some((room, key.as_deref()))).await;
    core.flush(room).await;
    let placement = place(core, &rec, &cmd.requester).await;
    let rec = core.record(room).await?.map(|(r, _)| r).unwrap_or(rec);
    tracing::info!(room = %room, guild = %rec.view.guild, owner = %user, elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), placement = placement_label(&placement), "room created");
    Ok(Created {
        invite: core.invite(&rec)?,
        room: rec.view,
        placement,
    })
}

enum Claim {
    New,
    Existing(RoomId),
}

/// Claims a slot in the owner's index (the per-user limit and idempotency, race-free).
async fn claim_slot(core: &Core, cmd: &CreateRoom, nonce: &str) -> Result<Claim, ApiError> {
    let max = core.settings.max_per_user;
    let key = cmd.idempotency_key.clone();
    let user = cmd.requester.id;
    let claim =
        store::update::<OwnerIndex, Claim, ApiError, _>(&core.state, &owner_key(user), |cur| {
            let mut idx = cur.unwrap_or_default();
            if let Some(k) = &key {
                if let Some(r) = idx.recent.iter().find(|r| &r.key == k) {
                    return Ok(Change::Keep(Claim::Existing(r.room)));
                }
                if idx
                    .creating
                    .iter()
                    .any(|s| s.idempotency_key.as_deref() == Some(k))
                {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        "a create with this idempotency key is in progress",
                    ));
                }
            }
            if idx.rooms.len().saturating_add(idx.creating.len()) >= max {
                return Err(ApiError::new(
                    ErrorCode::RoomLimitReached,
                    format!("at most {max} rooms per user"),
                ));
            }
            idx.creating.push(CreateSlot {
                nonce: nonce.to_owned(),
                guild: cmd.guild,
                idempotency_key: key.clone(),
                started_at: now_ms(),
                instance: core.instance.clone(),
                role: None,
                channel: None,
                name: cmd.name.trim().to_owned(),
            });
            Ok(Change::Put(idx, Claim::New))
        })
        .await??
        .0;
    Ok(claim)
}

/// Steps 3–5: the Discord objects, the creator's role, the commit.
async fn build(core: &Core, cmd: &CreateRoom, nonce: &str) -> Result<RoomRecord, Failed> {
    let guild = cmd.guild.get();
    let user = cmd.requester.id;
    let bot = core.bot_id().await.map_err(|e| Failed::at(e, None, None))?;
    let name = role_name(nonce, &cmd.name);
    let role = core.discord.create_role(guild, &name).await.map_err(|e| {
        if guild_refused(&e) {
            core.note_guild_refused(cmd.guild);
        }
        Failed::discord(&e, None, None)
    })?;
    let role_id = role
        .id_u64()
        .ok_or_else(|| Failed::at(bad_id("role"), None, None))?;
    note_in_slot(core, user, nonce, Some(role_id), None)
        .await
        .map_err(|e| Failed::at(e, Some(role_id), None))?;
    let channel = core
        .discord
        .create_room_channel(guild, cmd.name.trim(), core.settings.capacity, role_id, bot)
        .await
        .map_err(|e| Failed::discord(&e, Some(role_id), None))?;
    let channel_id = channel
        .id_u64()
        .ok_or_else(|| Failed::at(bad_id("channel"), Some(role_id), None))?;
    let fail = |e: ApiError| Failed::at(e, Some(role_id), Some(channel_id));
    note_in_slot(core, user, nonce, Some(role_id), Some(channel_id))
        .await
        .map_err(fail)?;
    let room = RoomId::new(channel_id).map_err(|_| fail(bad_id("channel")))?;
    let role_ref = RoleId::new(role_id).map_err(|_| fail(bad_id("role")))?;
    ensure_member_with_role(core, cmd.guild, &cmd.requester, role_id)
        .await
        .map_err(fail)?;
    let started_at = slot_started(core, user, nonce).await.map_err(fail)?;
    if now_ms().saturating_sub(started_at) >= core.settings.create_timeout_ms {
        return Err(fail(ApiError::new(
            ErrorCode::Timeout,
            "creating the room took too long; try again",
        )));
    }
    let (invite_id, issued, expires) = core.new_invite_fields();
    let now = now_ms();
    let mut rec = RoomRecord {
        view: RoomView {
            id: room,
            guild: cmd.guild,
            name: cmd.name.trim().to_owned(),
            owner: cmd.requester.clone(),
            role: role_ref,
            capacity: core.settings.capacity,
            state: RoomState::Open,
            members: vec![RoomMember {
                user: cmd.requester.clone(),
                via: JoinedVia::Owner,
                joined_at: now,
            }],
            voice: Vec::new(),
            created_at: now,
            last_activity: now,
            invite_expires_at: expires,
            closing_deadline: None,
            seq: 0,
        },
        invite_id,
        invite_issued_at: issued,
        lease: None,
        close_reason: None,
        voice_seq: Default::default(),
        stream_epoch: core.stream_epoch(),
        nonce: Some(nonce.to_owned()),
        outbox: Vec::new(),
        next_event: 0,
        deleted_queued: false,
        fence: false,
    };
    let created = Event::RoomCreated(RoomCreated {
        name: rec.view.name.clone(),
        owner: rec.view.owner.clone(),
        role: rec.view.role,
        capacity: rec.view.capacity,
        invite_expires_at: rec.view.invite_expires_at,
    });
    outbox::queue(&mut rec, created).map_err(fail)?;
    commit(core, &rec).await.map_err(fail)?;
    Ok(rec)
}

fn bad_id(what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::DiscordUnavailable,
        format!("Discord answered a {what} without a valid id"),
    )
}

/// Creates the room record; fails if the key exists (a fence: the reconciler gave the create
/// up).
async fn commit(core: &Core, rec: &RoomRecord) -> Result<(), ApiError> {
    let bytes = Bytes::from(
        serde_json::to_vec(rec).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?,
    );
    core.rooms
        .create(subject::room_key(rec.view.id), bytes)
        .await
        .map(|_| ())
        .map_err(|e| match e.kind() {
            async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => ApiError::new(
                ErrorCode::Timeout,
                "creating the room took too long and was given up; try again",
            ),
            _ => ApiError::new(ErrorCode::Timeout, format!("storing the room: {e}")),
        })
}

/// When the create's slot was claimed; fails if the slot is gone (the reconciler gave it up).
async fn slot_started(core: &Core, user: UserId, nonce: &str) -> Result<Millis, ApiError> {
    let idx = store::get::<OwnerIndex>(&core.state, &owner_key(user))
        .await?
        .map(|(i, _)| i)
        .unwrap_or_default();
    idx.creating
        .iter()
        .find(|s| s.nonce == nonce)
        .map(|s| s.started_at)
        .ok_or_else(abandoned)
}

fn abandoned() -> ApiError {
    ApiError::new(
        ErrorCode::Timeout,
        "creating the room took too long and was given up; try again",
    )
}

/// Notes Discord ids in the create slot, so a crash from here on can be rolled back by anyone.
/// Fails when the slot is gone: the reconciler claimed it, and this create must stop.
async fn note_in_slot(
    core: &Core,
    user: UserId,
    nonce: &str,
    role: Option<u64>,
    channel: Option<u64>,
) -> Result<(), ApiError> {
    store::update::<OwnerIndex, (), ApiError, _>(&core.state, &owner_key(user), |cur| {
        let mut idx = cur.ok_or_else(abandoned)?;
        let slot = idx
            .creating
            .iter_mut()
            .find(|s| s.nonce == nonce)
            .ok_or_else(abandoned)?;
        slot.role = role;
        slot.channel = channel;
        Ok(Change::Put(idx, ()))
    })
    .await??;
    Ok(())
}

/// Removes a create slot; with a room, records it as owned (and its idempotency key).
async fn release_slot(
    core: &Core,
    user: UserId,
    nonce: &str,
    done: Option<(RoomId, Option<&str>)>,
) {
    let r = store::update::<OwnerIndex, (), ApiError, _>(&core.state, &owner_key(user), |cur| {
        let mut idx = cur.unwrap_or_default();
        idx.creating.retain(|s| s.nonce != nonce);
        if let Some((room, key)) = done {
            if !idx.rooms.contains(&room) {
                idx.rooms.push(room);
            }
            idx.remember(key, room);
        }
        Ok(Change::Put(idx, ()))
    })
    .await;
    if let Err(e) = r {
        // The reconciler finds the slot when it expires: with a committed room it adopts it,
        // without one it rolls it back.
        tracing::error!(error = %e, user = %user, "updating the owner index failed");
    }
}

fn cleanup_entry(guild: GuildId, nonce: &str, name: &str, failed: &Failed) -> CleanupEntry {
    CleanupEntry {
        guild,
        nonce: nonce.to_owned(),
        role_name: role_name(nonce, name),
        role: failed.role,
        channel: failed.channel,
        queued_at: now_ms(),
        settle_at: if failed.unsettled {
            None
        } else {
            Some(now_ms())
        },
        attempts: 0,
    }
}

/// Queues a failed or abandoned create's objects for deletion — durably, first — and deletes
/// them in the background. The queue entry is removed only once Discord holds none of them.
pub async fn discard(core: &Arc<Core>, mut entry: CleanupEntry) {
    if entry.settle_at.is_none() {
        // An object whose create answer was lost shows up within the request timeout, or not
        // at all: keep looking until then.
        let wait = core.tuning.request_timeout_ms;
        entry.settle_at = Some(now_ms().saturating_add(wait));
    }
    let stored = match serde_json::to_vec(&entry) {
        Ok(b) => core.cleanup.put(&entry.nonce, Bytes::from(b)).await.is_ok(),
        Err(_) => false,
    };
    if !stored {
        tracing::error!(nonce = %entry.nonce, "queueing a failed create's cleanup failed; the reconciler removes its objects as orphans");
    }
    let core2 = core.clone();
    core.spawn_job("cleanup", async move {
        if let Err(e) = process_entry(&core2, entry).await {
            tracing::debug!(error = %e, "cleanup deferred to the queue");
        }
    });
}

/// Why a cleanup entry is not done yet.
#[derive(Debug, thiserror::Error)]
pub enum CleanupPending {
    #[error("discord: {0}")]
    Discord(#[from] DiscordError),
    #[error("waiting until a lost create answer has settled")]
    Settling,
    #[error("state store: {0}")]
    Store(String),
}

/// Deletes an entry's objects (channels first: they name the role), including any its create
/// made without us learning of it; removes the entry when nothing is left.
pub async fn process_entry(core: &Core, entry: CleanupEntry) -> Result<(), CleanupPending> {
    let guild = entry.guild.get();
    let d = &core.discord;
    let mut roles: Vec<u64> = entry.role.into_iter().collect();
    for r in d.roles_named(guild, &entry.role_name).await? {
        if let Some(id) = r.id_u64().filter(|id| !roles.contains(id)) {
            roles.push(id);
        }
    }
    let settled = entry.settle_at.is_some_and(|t| now_ms() >= t);
    let mut channels: Vec<u64> = entry.channel.into_iter().collect();
    if !roles.is_empty() {
        for c in d.guild_channels(guild).await? {
            let Some(id) = c.id_u64() else { continue };
            if !channels.contains(&id) && roles.iter().any(|r| c.names_role(*r)) {
                channels.push(id);
            }
        }
    }
    for c in &channels {
        d.delete_channel(*c).await?;
    }
    if !settled {
        // A channel whose create answer was lost may still appear, naming the role: keep the
        // role (it is how the channel is found) until then.
        bump_attempts(core, &entry).await;
        return Err(CleanupPending::Settling);
    }
    for r in &roles {
        d.delete_role(guild, *r).await?;
    }
    core.cleanup
        .delete(&entry.nonce)
        .await
        .map_err(|e| CleanupPending::Store(e.to_string()))?;
    tracing::info!(nonce = %entry.nonce, roles = roles.len(), channels = channels.len(), "failed create cleaned up");
    Ok(())
}

async fn bump_attempts(core: &Core, entry: &CleanupEntry) {
    let mut e = entry.clone();
    e.attempts = e.attempts.saturating_add(1);
    if let Ok(b) = serde_json::to_vec(&e) {
        let _ = core.cleanup.put(&e.nonce, Bytes::from(b)).await;
    }
}

/// One pass over the durable cleanup queue. Returns how many entries are still pending.
pub async fn retry_cleanup_queue(core: &Core) -> Result<usize, ApiError> {
    let mut pending = 0usize;
    for (key, entry, _) in store::scan::<CleanupEntry>(&core.cleanup, "", super::MAX_SCAN).await? {
        if let Err(e) = process_entry(core, entry).await {
            pending = pending.saturating_add(1);
            match e {
                CleanupPending::Settling => {}
                e => {
                    tracing::warn!(nonce = %key, error = %e, "cleanup of a failed create still pending")
                }
            }
        }
    }
    core.metrics.set_cleanup_pending(pending);
    Ok(pending)
}

/// Retries the durable cleanup queue every `retry_interval_ms` until shutdown.
pub async fn run_cleanup_queue(
    core: Arc<Core>,
    token: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let every = Duration::from_millis(core.tuning.retry_interval_ms);
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = retry_cleanup_queue(&core) => r,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cleanup queue pass failed");
        }
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
