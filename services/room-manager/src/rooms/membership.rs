//! Membership: `join` (invite, capacity, placement), `leave`, `get`, `list_mine`,
//! `rotate_invite`.
//!
//! A join reserves the place by compare-and-set on the room's record (with `room.member_added`
//! queued in the same write), then gives the Discord role; if Discord refuses, the place is given
//! back (with `room.member_removed`). A join during a closing warning cancels the closing: the
//! player is plainly using the room, and deleting it under them 30 s after they were let in
//! would be the surprise (docs/ROOM_MANAGER.md).

use std::sync::Arc;
use std::time::Instant;

use voicerooms_contract::command::{
    Done, Invite, JoinRoom, Joined, ListMine, Placement, RoomCommand, RoomList, RoomMember,
    RoomState, RoomView, UserToken,
};
use voicerooms_contract::event::{
    Event, JoinedVia, RemovedReason, RoomClosingCancelled, RoomMemberAdded, RoomMemberRemoved,
};
use voicerooms_contract::{now_ms, subject, ApiError, ErrorCode, GuildId, RoomId, UserRef};

use super::{not_found, Core, MAX_SCAN};
use crate::discord::{NOT_IN_VOICE, UNKNOWN_MEMBER};
use crate::outbox;
use crate::store::{self, pending_key, Change, PendingMove, RoomRecord};

/// Gives `user` the role, first adding them to the guild with their OAuth token if needed.
pub(crate) async fn ensure_member_with_role(
    core: &Core,
    guild: GuildId,
    user: &UserRef,
    role: u64,
) -> Result<(), ApiError> {
    match core
        .discord
        .add_member_role(guild.get(), user.id.get(), role)
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if e.json_code() == Some(UNKNOWN_MEMBER) || e.is_not_found() => {
            let token = store::get::<UserToken>(&core.tokens, &subject::user_token_key(user.id))
                .await?
                .map(|(t, _)| t)
                .filter(|t| t.expires_at > now_ms() && t.scope.split(' ').any(|s| s == "guilds.join"))
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::Unauthorized,
                        "not a member of the guild and no valid guilds.join authorisation: log in again",
                    )
                })?;
            core.discord
                .add_guild_member(guild.get(), user.id.get(), &token.access_token, &[role])
                .await
                .map_err(|e| match e.status() {
                    Some(401) | Some(403) => ApiError::new(
                        ErrorCode::Unauthorized,
                        "Discord refused to add you to the guild: log in again",
                    ),
                    _ => e.to_api(),
                })?;
            // 204 (already a member after all) does not apply roles: make sure.
            core.discord
                .add_member_role(guild.get(), user.id.get(), role)
                .await
                .map_err(|e| e.to_api())
        }
        Err(e) => Err(e.to_api()),
    }
}

/// What the join's reservation did.
struct Reserved {
    newly: bool,
    rec: RoomRecord,
}

/// `join`: verify the invite, reserve a place (CAS), give the role, place in voice.
pub async fn join(core: &Arc<Core>, cmd: JoinRoom) -> Result<Joined, ApiError> {
    let started = Instant::now();
    let claims = core.invites.verify(&cmd.invite)?;
    let room = RoomId::parse(&claims.room)
        .map_err(|_| ApiError::new(ErrorCode::InviteInvalid, "the invite is not valid"))?;
    if let Some(expected) = cmd.room {
        if expected != room {
            return Err(ApiError::new(
                ErrorCode::InviteWrongRoom,
                "the invite is for another room",
            ));
        }
    }
    let user = cmd.requester.clone();
    let (rec, _) = core.record(room).await?.ok_or_else(|| not_found(room))?;
    if claims.guild != rec.view.guild.to_string()
        || claims.role != rec.view.role.to_string()
        || claims.channel != rec.view.id.to_string()
    {
        return Err(ApiError::new(
            ErrorCode::InviteWrongRoom,
            "the invite does not match this room",
        ));
    }
    if claims.jti != rec.invite_id {
        return Err(ApiError::new(
            ErrorCode::InviteInvalid,
            "the invite was replaced by a newer one",
        ));
    }
    let capacity = usize::from(rec.view.capacity);
    let (reserved, _) = core
        .change_room(room, |cur| {
            let mut r = cur.ok_or_else(|| not_found(room))?;
            if matches!(r.view.state, RoomState::Deleting | RoomState::Creating) || r.fence {
                return Err(ApiError::new(ErrorCode::RoomClosing, "the room is closing"));
            }
            if r.invite_id != claims.jti {
                return Err(ApiError::new(
                    ErrorCode::InviteInvalid,
                    "the invite was replaced by a newer one",
                ));
            }
            let member = r.view.members.iter().any(|m| m.user.id == user.id);
            if !member && r.view.members.len() >= capacity {
                return Err(ApiError::new(
                    ErrorCode::RoomFull,
                    format!("the room is full ({capacity})"),
                ));
            }
            let mut changed = false;
            if r.view.state == RoomState::Closing {
                // Someone is joining: the room is in use again.
                r.view.state = RoomState::Open;
                r.view.closing_deadline = None;
                r.view.last_activity = now_ms();
                outbox::queue(
                    &mut r,
                    Event::RoomClosingCancelled(RoomClosingCancelled {
                        by: Some(user.clone()),
                    }),
                )?;
                changed = true;
            }
            if !member {
                r.view.members.push(RoomMember {
                    user: user.clone(),
                    via: JoinedVia::Invite,
                    joined_at: now_ms(),
                });
                for o in r.view.voice.iter_mut() {
                    if o.user.id == user.id {
                        o.member = true;
                    }
                }
                outbox::queue(
                    &mut r,
                    Event::RoomMemberAdded(RoomMemberAdded {
                        user: user.clone(),
                        via: JoinedVia::Invite,
                    }),
                )?;
                changed = true;
            }
            let reserved = Reserved {
                newly: !member,
                rec: r.clone(),
            };
            Ok(if changed {
                Change::Put(r, reserved)
            } else {
                Change::Keep(reserved)
            })
        })
        .await?;
    core.flush(room).await;
    if reserved.newly {
        if let Err(e) =
            ensure_member_with_role(core, rec.view.guild, &user, rec.view.role.get()).await
        {
            give_back(core, room, &user).await;
            return Err(e);
        }
    }
    let placement = place(core, &reserved.rec, &user).await;
    core.metrics.placement(placement_label(&placement), started);
    tracing::info!(room = %room, user = %user.id, placement = placement_label(&placement), elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "joined");
    let rec = core
        .record(room)
        .await?
        .map(|(r, _)| r)
        .unwrap_or(reserved.rec);
    Ok(Joined {
        room: rec.view,
        placement,
    })
}

/// Gives a reserved place back after Discord refused the role.
async fn give_back(core: &Arc<Core>, room: RoomId, user: &UserRef) {
    let r = core
        .change_room(room, |cur| {
            let Some(mut r) = cur else {
                return Ok(Change::Keep(()));
            };
            if !r.view.members.iter().any(|m| m.user.id == user.id) {
                return Ok(Change::Keep(()));
            }
            r.view.members.retain(|m| m.user.id != user.id);
            outbox::queue(
                &mut r,
                Event::RoomMemberRemoved(RoomMemberRemoved {
                    user: user.clone(),
                    reason: RemovedReason::Removed,
                }),
            )?;
            Ok(Change::Put(r, ()))
        })
        .await;
    match r {
        Ok(_) => core.flush(room).await,
        Err(e) => {
            tracing::error!(room = %room, user = %user.id, error = %e, "giving a place back failed")
        }
    }
}

pub fn placement_label(p: &Placement) -> &'static str {
    match p {
        Placement::Moved { .. } => "moved",
        Placement::AlreadyThere { .. } => "already_there",
        Placement::Pending { .. } => "pending",
        Placement::Failed { .. } => "failed",
    }
}

/// Puts `user` in the room's voice channel. The pending move is registered *before* the move is
/// tried: if they are not in voice (Discord cannot move them) it stays and fires when they
/// connect; if the move works it is withdrawn. One Discord call, and no window in which a
/// connect goes unnoticed.
pub async fn place(core: &Core, rec: &RoomRecord, user: &UserRef) -> Placement {
    let channel = rec.view.id.cast();
    let guild = rec.view.guild;
    if rec.view.voice.iter().any(|o| o.user.id == user.id) {
        return Placement::AlreadyThere { channel };
    }
    let now = now_ms();
    let expires_at = now.saturating_add(core.settings.pending_move_window_ms);
    let pending = PendingMove {
        room: rec.view.id,
        registered_at: now,
        expires_at,
    };
    let key = pending_key(guild, user.id);
    let registered = store::update::<PendingMove, (), ApiError, _>(&core.state, &key, |_| {
        Ok(Change::Put(pending.clone(), ()))
    })
    .await;
    let revision = match registered {
        Ok(Ok(((), rev))) => rev,
        Ok(Err(api)) => return failed(api),
        Err(e) => return failed(e.into()),
    };
    let moved = core
        .discord
        .move_member(guild.get(), user.id.get(), Some(rec.view.id.get()))
        .await;
    let withdraw = || async {
        // Only our registration: a voice.joined may have claimed it meanwhile.
        let _ = core.state.delete_expect_revision(&key, revision).await;
    };
    match moved {
        Ok(()) => {
            withdraw().await;
            Placement::Moved { channel }
        }
        Err(e) if e.json_code() == Some(NOT_IN_VOICE) => Placement::Pending {
            channel,
            channel_url: format!("https://discord.com/channels/{guild}/{}", rec.view.id),
            expires_at,
        },
        Err(e) => {
            withdraw().await;
            failed(e.to_api())
        }
    }
}

fn failed(api: ApiError) -> Placement {
    Placement::Failed {
        code: api.code,
        message: api.message,
    }
}

/// `get`: members of the room only (and its owner).
pub async fn get(core: &Arc<Core>, cmd: RoomCommand) -> Result<RoomView, ApiError> {
    let (rec, _) = core
        .record(cmd.room)
        .await?
        .ok_or_else(|| not_found(cmd.room))?;
    if rec.fence {
        return Err(not_found(cmd.room));
    }
    if !rec
        .view
        .members
        .iter()
        .any(|m| m.user.id == cmd.requester.id)
    {
        return Err(ApiError::new(
            ErrorCode::NotMember,
            "you are not a member of this room",
        ));
    }
    Ok(rec.view)
}

/// `list_mine`: rooms the requester owns or belongs to (a scan of the bucket, bounded).
pub async fn list_mine(core: &Arc<Core>, cmd: ListMine) -> Result<RoomList, ApiError> {
    let mut rooms = Vec::new();
    for (_, rec, _) in store::scan::<RoomRecord>(&core.rooms, "", MAX_SCAN).await? {
        if !rec.fence
            && rec
                .view
                .members
                .iter()
                .any(|m| m.user.id == cmd.requester.id)
        {
            rooms.push(rec.view);
        }
    }
    rooms.sort_by_key(|r| r.created_at);
    Ok(RoomList { rooms })
}

/// `rotate_invite`: a new token id; older links stop working.
pub async fn rotate_invite(core: &Arc<Core>, cmd: RoomCommand) -> Result<Invite, ApiError> {
    let (invite_id, issued, expires) = core.new_invite_fields();
    let (rec, _) = core
        .change_room(cmd.room, |cur| {
            let mut r = cur
                .filter(|r| !r.fence)
                .ok_or_else(|| not_found(cmd.room))?;
            if r.view.owner.id != cmd.requester.id {
                return Err(ApiError::new(
                    ErrorCode::NotOwner,
                    "only the owner can renew the invite",
                ));
            }
            if r.view.state == RoomState::Deleting {
                return Err(ApiError::new(ErrorCode::RoomClosing, "the room is closing"));
            }
            r.invite_id = invite_id.clone();
            r.invite_issued_at = issued;
            r.view.invite_expires_at = expires;
            Ok(Change::Put(r.clone(), r))
        })
        .await?;
    core.invite(&rec)
}

/// `leave`: drop the role (and the voice connection to the room's channel). The owner closes.
pub async fn leave(core: &Arc<Core>, cmd: RoomCommand) -> Result<Done, ApiError> {
    let user = cmd.requester.id;
    let (rec, _) = core
        .change_room(cmd.room, |cur| {
            let mut r = cur
                .filter(|r| !r.fence)
                .ok_or_else(|| not_found(cmd.room))?;
            if r.view.owner.id == user {
                return Err(ApiError::new(
                    ErrorCode::Validation,
                    "the owner closes the room instead of leaving it",
                ));
            }
            if !r.view.members.iter().any(|m| m.user.id == user) {
                return Err(ApiError::new(
                    ErrorCode::NotMember,
                    "you are not a member of this room",
                ));
            }
            r.view.members.retain(|m| m.user.id != user);
            for o in r.view.voice.iter_mut() {
                if o.user.id == user {
                    o.member = false;
                }
            }
            outbox::queue(
                &mut r,
                Event::RoomMemberRemoved(RoomMemberRemoved {
                    user: cmd.requester.clone(),
                    reason: RemovedReason::Left,
                }),
            )?;
            Ok(Change::Put(r.clone(), r))
        })
        .await?;
    core.flush(cmd.room).await;
    let guild = rec.view.guild.get();
    if let Err(e) = core
        .discord
        .remove_member_role(guild, user.get(), rec.view.role.get())
        .await
    {
        tracing::warn!(room = %cmd.room, user = %user, error = %e, "removing the role failed");
    }
    if rec.view.voice.iter().any(|o| o.user.id == user) {
        let _ = core.discord.move_member(guild, user.get(), None).await;
    }
    Ok(Done {})
}
