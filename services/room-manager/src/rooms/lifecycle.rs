//! A room's end: the idle warning, and the one deletion path every close (idle, owner, channel
//! deleted, a fence left by the reconciler) goes through.
//!
//! [`claim_deletion`] sets the room to `deleting` with a lease by compare-and-set (one replica
//! at a time; a lease that ran out is taken over by the next cleanup scan), then
//! [`complete_deletion`] deletes the channel and the role (404 counts as done), queues
//! `room.deleted` in the outbox, publishes it, removes the room from its owner's index and
//! deletes the record — only once its outbox is empty, so no event is lost with it.

use std::sync::Arc;

use voicerooms_contract::command::{Done, RoomCommand, RoomState};
use voicerooms_contract::event::{CloseReason, Event, RoomClosing, RoomDeleted};
use voicerooms_contract::{now_ms, subject, ApiError, ErrorCode, Millis, RoomId};

use super::{not_found, Core};
use crate::outbox;
use crate::store::{self, owner_key, Change, Lease, OwnerIndex, RoomRecord};

/// `close`: the owner deletes the room now (same path as idle cleanup, without the warning).
pub async fn close(core: &Arc<Core>, cmd: RoomCommand) -> Result<Done, ApiError> {
    let (rec, _) = core
        .record(cmd.room)
        .await?
        .filter(|(r, _)| !r.fence)
        .ok_or_else(|| not_found(cmd.room))?;
    if rec.view.owner.id != cmd.requester.id {
        return Err(ApiError::new(
            ErrorCode::NotOwner,
            "only the owner can close the room",
        ));
    }
    finish_room(core, cmd.room, CloseReason::Owner, true).await?;
    Ok(Done {})
}

/// Starts the idle warning if the room is (still) idle. Returns the deadline when it did.
pub async fn begin_closing(core: &Arc<Core>, room: RoomId) -> Result<Option<Millis>, ApiError> {
    let now = now_ms();
    let idle = core.settings.idle_timeout_ms;
    let deadline = now.saturating_add(core.settings.closing_warning_ms);
    let (started, _) = core
        .change_room(room, |cur| {
            let Some(mut r) = cur else {
                return Ok(Change::Keep(false));
            };
            if r.view.state != RoomState::Open
                || !r.view.voice.is_empty()
                || now.saturating_sub(r.view.last_activity) < idle
            {
                return Ok(Change::Keep(false));
            }
            r.view.state = RoomState::Closing;
            r.view.closing_deadline = Some(deadline);
            outbox::queue(
                &mut r,
                Event::RoomClosing(RoomClosing {
                    deadline,
                    reason: CloseReason::Idle,
                }),
            )?;
            Ok(Change::Put(r, true))
        })
        .await?;
    if !started {
        return Ok(None);
    }
    core.flush(room).await;
    tracing::info!(room = %room, deadline, "room idle: closing warning sent");
    Ok(Some(deadline))
}

/// Claims the room for deletion (state `deleting` with this replica's lease) unless another
/// replica holds a live lease, or (for idle closes, `force` false) the warning was cancelled or
/// has not run out. Returns the claimed record.
pub async fn claim_deletion(
    core: &Arc<Core>,
    room: RoomId,
    reason: CloseReason,
    force: bool,
) -> Result<Option<RoomRecord>, ApiError> {
    let now = now_ms();
    let lease_until = now.saturating_add(core.settings.lease_ms);
    let me = core.instance.clone();
    let (claimed, _) = core
        .change_room(room, |cur| {
            let Some(mut r) = cur else {
                return Ok(Change::Keep(None));
            };
            match r.view.state {
                RoomState::Deleting => {
                    if let Some(l) = &r.lease {
                        if l.until > now && l.instance != me {
                            return Ok(Change::Keep(None));
                        }
                    }
                }
                RoomState::Closing if !force && r.view.closing_deadline.is_none_or(|d| d > now) => {
                    return Ok(Change::Keep(None));
                }
                RoomState::Closing if !force => {}
                _ if !force => return Ok(Change::Keep(None)),
                _ => {}
            }
            r.view.state = RoomState::Deleting;
            if r.close_reason.is_none() {
                r.close_reason = Some(reason);
            }
            r.lease = Some(Lease {
                instance: me.clone(),
                until: lease_until,
            });
            Ok(Change::Put(r.clone(), Some(r)))
        })
        .await?;
    Ok(claimed)
}

/// Deletes a claimed room's Discord objects, announces it and removes its state.
pub async fn complete_deletion(core: &Arc<Core>, rec: RoomRecord) -> Result<(), ApiError> {
    let room = rec.view.id;
    let guild = rec.view.guild;
    let reason = rec.close_reason.unwrap_or(CloseReason::Owner);
    core.discord
        .delete_channel(room.get())
        .await
        .map_err(|e| e.to_api())?;
    core.discord
        .delete_role(guild.get(), rec.view.role.get())
        .await
        .map_err(|e| e.to_api())?;
    core.change_room(room, |cur| {
        let Some(mut r) = cur else {
            return Ok(Change::Keep(()));
        };
        if r.view.state != RoomState::Deleting || r.deleted_queued {
            return Ok(Change::Keep(()));
        }
        // A fence was never announced: nothing to say about its end either.
        if !r.fence {
            outbox::queue(&mut r, Event::RoomDeleted(RoomDeleted { reason }))?;
        }
        r.deleted_queued = true;
        Ok(Change::Put(r, ()))
    })
    .await?;
    core.outbox.drain(core, room).await?;
    let owner = rec.view.owner.id;
    store::update::<OwnerIndex, (), ApiError, _>(&core.state, &owner_key(owner), |cur| {
        let Some(mut idx) = cur else {
            return Ok(Change::Keep(()));
        };
        if !idx.rooms.contains(&room) {
            return Ok(Change::Keep(()));
        }
        idx.rooms.retain(|r| *r != room);
        Ok(Change::Put(idx, ()))
    })
    .await??;
    store::update::<RoomRecord, (), ApiError, _>(&core.rooms, &subject::room_key(room), |cur| {
        match cur {
            Some(r) if r.view.state == RoomState::Deleting && r.outbox.is_empty() => {
                Ok(Change::Delete(()))
            }
            _ => Ok(Change::Keep(())),
        }
    })
    .await??;
    if !rec.fence {
        core.metrics.rooms_deleted(reason);
        tracing::info!(room = %room, reason = ?reason, "room deleted");
    }
    Ok(())
}

/// The one deletion path: claim, then complete. Returns whether this call claimed the room.
/// Safe to repeat: a replica dying halfway leaves `deleting` with a lease that another replica
/// takes over when it ends.
pub async fn finish_room(
    core: &Arc<Core>,
    room: RoomId,
    reason: CloseReason,
    force: bool,
) -> Result<bool, ApiError> {
    let Some(rec) = claim_deletion(core, room, reason, force).await? else {
        return Ok(false);
    };
    complete_deletion(core, rec).await?;
    Ok(true)
}
