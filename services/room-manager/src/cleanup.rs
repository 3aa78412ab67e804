//! Idle cleanup and the reconciler, run by every replica.
//!
//! - **Cleanup scan** (every `rooms.cleanup_interval_ms`): an open room whose channel has been
//!   empty for `rooms.idle_timeout_ms` gets `room.closing` (deadline `closing_warning_ms` ahead);
//!   the replica that sent it finishes the room at the deadline unless a voice join cancelled it;
//!   any replica's scan finishes a closing room past its deadline or a `deleting` room whose
//!   lease ran out (its replica died halfway). Every step is a CAS, so one replica acts at a time.
//! - **Reconciler** (at start-up and every `rooms.reconcile_interval_ms`): rolls back creates that
//!   outlived `create_timeout_ms`, deletes Discord roles tagged `vr-…` and the channels whose
//!   overwrite names them when no room or live create owns them, and closes rooms whose channel
//!   disappeared while nobody was listening.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicerooms_contract::command::RoomState;
use voicerooms_contract::event::CloseReason;
use voicerooms_contract::{now_ms, ApiError, GuildId, RoomId};

use crate::rooms::{begin_closing, finish_room, rollback, Core, MAX_SCAN};
use crate::store::{self, Change, OwnerIndex, RoomRecord};

/// Role names carry this tag followed by the create's nonce.
pub const ROLE_TAG: &str = "vr-";

/// The periodic cleanup scan.
pub async fn run_cleanup(core: Arc<Core>, tasks: TaskTracker, token: CancellationToken) {
    let every = Duration::from_millis(core.settings.cleanup_interval_ms);
    loop {
        // Dropped on shutdown: every step is a CAS, so an interrupted pass is resumed later.
        tokio::select! {
            _ = token.cancelled() => return,
            r = scan(&core, &tasks, &token) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cleanup scan failed");
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One cleanup pass over every room.
pub async fn scan(
    core: &Arc<Core>,
    tasks: &TaskTracker,
    token: &CancellationToken,
) -> Result<(), ApiError> {
    let now = now_ms();
    let mut by_state = [0i64; 4];
    for key in store::keys(&core.rooms, MAX_SCAN).await? {
        let Some((rec, _)) = store::get::<RoomRecord>(&core.rooms, &key).await? else {
            continue;
        };
        let room = rec.view.id;
        by_state[state_index(rec.view.state)] += 1;
        match rec.view.state {
            RoomState::Open
                if rec.view.voice.is_empty()
                    && now.saturating_sub(rec.view.last_activity)
                        >= core.settings.idle_timeout_ms =>
            {
                if let Some(deadline) = begin_closing(core, room).await? {
                    schedule_finish(core.clone(), tasks, token.clone(), room, deadline);
                }
            }
            RoomState::Closing if rec.view.closing_deadline.is_some_and(|d| d <= now) => {
                finish_logged(core, room, CloseReason::Idle).await;
            }
            RoomState::Deleting if rec.lease.as_ref().is_none_or(|l| l.until <= now) => {
                finish_logged(core, room, CloseReason::Idle).await;
            }
            _ => {}
        }
    }
    core.metrics.set_rooms_by_state(by_state);
    Ok(())
}

fn state_index(s: RoomState) -> usize {
    match s {
        RoomState::Creating => 0,
        RoomState::Open => 1,
        RoomState::Closing => 2,
        RoomState::Deleting => 3,
    }
}

async fn finish_logged(core: &Core, room: RoomId, reason: CloseReason) {
    if let Err(e) = finish_room(core, room, reason, false).await {
        tracing::warn!(room = %room, error = %e, "finishing room failed; a later scan retries");
    }
}

/// Finishes the room at its deadline (unless cancelled meanwhile: the CAS in `finish_room` sees
/// the room open again and does nothing).
pub fn schedule_finish(
    core: Arc<Core>,
    tasks: &TaskTracker,
    token: CancellationToken,
    room: RoomId,
    deadline: u64,
) {
    tasks.spawn(async move {
        let wait = Duration::from_millis(deadline.saturating_sub(now_ms()) + 5);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            _ = token.cancelled() => {}
            _ = finish_logged(&core, room, CloseReason::Idle) => {}
        }
    });
}

/// The periodic reconciler.
pub async fn run_reconciler(core: Arc<Core>, token: CancellationToken) {
    let every = Duration::from_millis(core.settings.reconcile_interval_ms);
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => return,
            r = reconcile(&core) => r,
        };
        match result {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "reconciler removed orphans"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconciliation failed"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One reconciliation pass. Returns how many Discord objects it deleted.
///
/// Order matters: Discord is listed *before* KV is read. A create writes its slot before making
/// anything in Discord and writes the room before dropping its slot, so every object seen in
/// Discord is accounted for by what KV says afterwards.
pub async fn reconcile(core: &Core) -> Result<usize, ApiError> {
    let now = now_ms();
    let guilds = core.discord.my_guilds().await.map_err(|e| e.to_api())?;
    let mut listed = Vec::new();
    for g in guilds {
        let Ok(guild) = GuildId::parse(&g.id) else {
            continue;
        };
        let roles = core
            .discord
            .guild_roles(guild.get())
            .await
            .map_err(|e| e.to_api())?;
        let channels = core
            .discord
            .guild_channels(guild.get())
            .await
            .map_err(|e| e.to_api())?;
        listed.push((guild, roles, channels));
    }
    // What KV accounts for.
    let mut live_nonces = HashSet::new();
    let mut deleted = 0usize;
    for key in store::keys(&core.state, MAX_SCAN).await? {
        if !key.starts_with("owner.") {
            continue;
        }
        let Some((idx, _)) = store::get::<OwnerIndex>(&core.state, &key).await? else {
            continue;
        };
        for slot in &idx.creating {
            if slot.started_at + core.settings.create_timeout_ms > now {
                live_nonces.insert(slot.nonce.clone());
                continue;
            }
            tracing::warn!(nonce = %slot.nonce, instance = %slot.instance, "rolling back an abandoned create");
            rollback(core, slot.guild, slot.role, slot.channel).await;
            let nonce = slot.nonce.clone();
            store::update::<OwnerIndex, (), ApiError, _>(&core.state, &key, |cur| {
                let Some(mut i) = cur else {
                    return Ok(Change::Keep(()));
                };
                i.creating.retain(|s| s.nonce != nonce);
                Ok(Change::Put(i, ()))
            })
            .await??;
        }
    }
    let mut room_ids = HashSet::new();
    let mut room_roles = HashSet::new();
    let mut rooms = Vec::new();
    for key in store::keys(&core.rooms, MAX_SCAN).await? {
        if let Some((rec, _)) = store::get::<RoomRecord>(&core.rooms, &key).await? {
            room_ids.insert(rec.view.id.get());
            room_roles.insert(rec.view.role.get());
            rooms.push(rec);
        }
    }
    for (guild, roles, channels) in &listed {
        let ours: Vec<u64> = roles
            .iter()
            .filter_map(|r| {
                let nonce = r.name.strip_prefix(ROLE_TAG)?.split(' ').next()?;
                let id: u64 = r.id.parse().ok()?;
                (!room_roles.contains(&id) && !live_nonces.contains(nonce)).then_some(id)
            })
            .collect();
        for c in channels {
            let Ok(cid) = c.id.parse::<u64>() else {
                continue;
            };
            if c.kind != 2 || room_ids.contains(&cid) {
                continue;
            }
            let orphan = c
                .permission_overwrites
                .iter()
                .any(|o| o.kind == 0 && o.id.parse::<u64>().is_ok_and(|id| ours.contains(&id)));
            if orphan {
                tracing::warn!(channel = cid, guild = %guild, "deleting orphaned channel");
                core.discord
                    .delete_channel(cid)
                    .await
                    .map_err(|e| e.to_api())?;
                deleted += 1;
            }
        }
        for role in ours {
            tracing::warn!(role, guild = %guild, "deleting orphaned role");
            core.discord
                .delete_role(guild.get(), role)
                .await
                .map_err(|e| e.to_api())?;
            deleted += 1;
        }
        // Rooms whose channel vanished while no event reached us.
        let existing: HashSet<u64> = channels.iter().filter_map(|c| c.id.parse().ok()).collect();
        for rec in rooms.iter().filter(|r| r.view.guild == *guild) {
            if !existing.contains(&rec.view.id.get()) && rec.view.state != RoomState::Deleting {
                tracing::warn!(room = %rec.view.id, "room's channel is gone; closing it");
                if let Err(e) =
                    finish_room(core, rec.view.id, CloseReason::ChannelDeleted, true).await
                {
                    tracing::warn!(room = %rec.view.id, error = %e, "closing room without channel failed");
                }
            }
        }
    }
    Ok(deleted)
}
