//! The room handlers: plain async functions over typed commands returning typed errors, plus
//! placement and the one deletion path every close (idle, owner, channel deleted) goes through.
//!
//! Capacity and the per-user limit are enforced by compare-and-set on one KV entry each (the
//! room's record, the owner's index), so any number of replicas can serve the same room.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use tokio::sync::OnceCell;
use voicerooms_contract::command::{
    CreateRoom, Created, Done, Invite, JoinRoom, Joined, ListMine, Placement, RoomCommand,
    RoomList, RoomMember, RoomState, RoomView, UserToken,
};
use voicerooms_contract::event::{
    CloseReason, Event, JoinedVia, RemovedReason, RoomClosing, RoomCreated, RoomDeleted,
    RoomMemberAdded, RoomMemberRemoved,
};
use voicerooms_contract::{
    now_ms, subject, ApiError, ErrorCode, GuildId, Millis, RoleId, RoomEvent, RoomId, UserId,
    UserRef,
};

use crate::discord::{DiscordClient, DiscordError, NOT_IN_VOICE, UNKNOWN_MEMBER};
use crate::invite::{secs, InviteClaims, InviteSigner};
use crate::metrics::Metrics;
use crate::settings::RoomsSettings;
use crate::store::{
    self, owner_key, pending_key, Change, CreateSlot, Lease, OwnerIndex, PendingMove, RoomRecord,
};

/// Longest room list returned by `list_mine`, and most rooms scanned.
pub const MAX_SCAN: usize = 10_000;

/// Everything a handler needs. Shared by every task of a replica.
pub struct Core {
    pub instance: String,
    pub rooms: kv::Store,
    pub state: kv::Store,
    pub tokens: kv::Store,
    pub js: jetstream::Context,
    pub discord: DiscordClient,
    pub invites: InviteSigner,
    pub settings: RoomsSettings,
    pub invite_ttl: Duration,
    pub metrics: Metrics,
    bot_id: OnceCell<u64>,
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        instance: String,
        rooms: kv::Store,
        state: kv::Store,
        tokens: kv::Store,
        js: jetstream::Context,
        discord: DiscordClient,
        invites: InviteSigner,
        settings: RoomsSettings,
        invite_ttl: Duration,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            instance,
            rooms,
            state,
            tokens,
            js,
            discord,
            invites,
            settings,
            invite_ttl,
            metrics,
            bot_id: OnceCell::new(),
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

    pub async fn record(&self, room: RoomId) -> Result<Option<(RoomRecord, u64)>, ApiError> {
        Ok(store::get(&self.rooms, &subject::room_key(room)).await?)
    }

    /// Publishes a room event to the ROOMS stream; returns its sequence.
    pub async fn publish(
        &self,
        guild: GuildId,
        room: RoomId,
        event: Event,
        msg_id: Option<String>,
    ) -> Result<u64, ApiError> {
        let now = now_ms();
        let mut ev = RoomEvent::new(guild, room, now, event);
        let id = msg_id.unwrap_or_else(|| {
            format!(
                "rm:{room}:{}:{}",
                ev.kind().as_str(),
                uuid::Uuid::new_v4().simple()
            )
        });
        ev.id = Some(id.clone());
        // The command's or event's trace continues in whoever reads this event.
        ev.traceparent = voicerooms_platform::telemetry::current_traceparent();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        if let Some(tp) = ev.traceparent.as_deref() {
            headers.insert("traceparent", tp);
        }
        let ack = self
            .js
            .publish_with_headers(ev.subject(), headers, ev.encode().into())
            .await
            .map_err(|e| ApiError::new(ErrorCode::Timeout, format!("publishing event: {e}")))?
            .await
            .map_err(|e| ApiError::new(ErrorCode::Timeout, format!("event not stored: {e}")))?;
        Ok(ack.sequence)
    }

    /// Records that the snapshot reflects events up to `seq`.
    pub async fn bump_seq(&self, room: RoomId, seq: u64) -> Result<(), ApiError> {
        store::update::<RoomRecord, (), ApiError, _>(
            &self.rooms,
            &subject::room_key(room),
            |cur| match cur {
                Some(mut r) if r.view.seq < seq => {
                    r.view.seq = seq;
                    Ok(Change::Put(r, ()))
                }
                _ => Ok(Change::Keep(())),
            },
        )
        .await??;
        Ok(())
    }

    async fn publish_and_bump(&self, guild: GuildId, room: RoomId, event: Event) {
        match self.publish(guild, room, event, None).await {
            Ok(seq) => {
                if let Err(e) = self.bump_seq(room, seq).await {
                    tracing::warn!(room = %room, error = %e, "recording event sequence failed");
                }
            }
            Err(e) => tracing::error!(room = %room, error = %e, "publishing room event failed"),
        }
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

    fn invite(&self, rec: &RoomRecord) -> Result<Invite, ApiError> {
        Ok(Invite {
            token: self.invites.sign(&self.invite_claims(rec))?,
            expires_at: rec.view.invite_expires_at,
        })
    }

    fn new_invite_fields(&self) -> (String, Millis, Millis) {
        let now = now_ms();
        // Whole seconds, so the token's iat/exp and the record agree exactly.
        let issued = now / 1000 * 1000;
        (
            uuid::Uuid::new_v4().simple().to_string(),
            issued,
            issued + self.invite_ttl.as_millis() as Millis,
        )
    }
}

fn not_found(room: RoomId) -> ApiError {
    ApiError::new(
        ErrorCode::RoomNotFound,
        format!("room {room} does not exist"),
    )
}

fn id_u64(s: &str) -> Result<u64, DiscordError> {
    s.parse()
        .map_err(|_| DiscordError::Decode(format!("bad snowflake {s:?}")))
}

/// `create`: role, then channel (its overwrite names the role), then the creator's role, then the
/// record; any failure before the record exists deletes what was made.
pub async fn create(core: &Core, cmd: CreateRoom) -> Result<Created, ApiError> {
    let started = Instant::now();
    let user = cmd.requester.id;
    let nonce = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let max = core.settings.max_per_user;
    let key = cmd.idempotency_key.clone();
    // 1. Claim a slot in the owner's index (the per-user limit and idempotency, race-free).
    enum Claim {
        New,
        Existing(RoomId),
    }
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
            if idx.rooms.len() + idx.creating.len() >= max {
                return Err(ApiError::new(
                    ErrorCode::RoomLimitReached,
                    format!("at most {max} rooms per user"),
                ));
            }
            idx.creating.push(CreateSlot {
                nonce: nonce.clone(),
                guild: cmd.guild,
                idempotency_key: key.clone(),
                started_at: now_ms(),
                instance: core.instance.clone(),
                role: None,
                channel: None,
            });
            Ok(Change::Put(idx, Claim::New))
        })
        .await??
        .0;
    if let Claim::Existing(room) = claim {
        let (rec, _) = core.record(room).await?.ok_or_else(|| not_found(room))?;
        let placement = place(core, &rec, &cmd.requester).await;
        return Ok(Created {
            invite: core.invite(&rec)?,
            room: rec.view,
            placement,
        });
    }
    let result = create_in_discord(core, &cmd, &nonce).await;
    let rec = match result {
        Ok(rec) => rec,
        Err((e, role, channel)) => {
            rollback(core, cmd.guild, role, channel).await;
            release_slot(core, user, &nonce, None).await;
            return Err(e);
        }
    };
    let room = rec.view.id;
    release_slot(core, user, &nonce, Some((room, key.as_deref()))).await;
    let created = Event::RoomCreated(RoomCreated {
        name: rec.view.name.clone(),
        owner: rec.view.owner.clone(),
        role: rec.view.role,
        capacity: rec.view.capacity,
        invite_expires_at: rec.view.invite_expires_at,
    });
    core.publish_and_bump(rec.view.guild, room, created).await;
    let placement = place(core, &rec, &cmd.requester).await;
    let rec = core.record(room).await?.map(|(r, _)| r).unwrap_or(rec);
    tracing::info!(room = %room, guild = %rec.view.guild, owner = %user, elapsed_ms = started.elapsed().as_millis() as u64, placement = placement_label(&placement), "room created");
    Ok(Created {
        invite: core.invite(&rec)?,
        room: rec.view,
        placement,
    })
}

type Partial = (ApiError, Option<u64>, Option<u64>);

async fn create_in_discord(
    core: &Core,
    cmd: &CreateRoom,
    nonce: &str,
) -> Result<RoomRecord, Partial> {
    let guild = cmd.guild.get();
    let user = cmd.requester.id;
    let bot = core.bot_id().await.map_err(|e| (e, None, None))?;
    let role_name: String = format!("vr-{nonce} {}", cmd.name)
        .chars()
        .take(100)
        .collect();
    let role = core
        .discord
        .create_role(guild, &role_name)
        .await
        .map_err(|e| (e.to_api(), None, None))?;
    let role_id = id_u64(&role.id).map_err(|e| (e.to_api(), None, None))?;
    record_slot(core, user, nonce, Some(role_id), None).await;
    let channel = core
        .discord
        .create_room_channel(guild, cmd.name.trim(), core.settings.capacity, role_id, bot)
        .await
        .map_err(|e| (e.to_api(), Some(role_id), None))?;
    let channel_id = id_u64(&channel.id).map_err(|e| (e.to_api(), Some(role_id), None))?;
    record_slot(core, user, nonce, Some(role_id), Some(channel_id)).await;
    let fail = |e: ApiError| (e, Some(role_id), Some(channel_id));
    let room = RoomId::new(channel_id)
        .map_err(|e| fail(ApiError::new(ErrorCode::Internal, e.to_string())))?;
    let role_ref = RoleId::new(role_id)
        .map_err(|e| fail(ApiError::new(ErrorCode::Internal, e.to_string())))?;
    ensure_member_with_role(core, cmd.guild, &cmd.requester, role_id)
        .await
        .map_err(fail)?;
    let (invite_id, issued, expires) = core.new_invite_fields();
    let now = now_ms();
    let rec = RoomRecord {
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
    };
    store::update::<RoomRecord, (), ApiError, _>(&core.rooms, &subject::room_key(room), |cur| {
        match cur {
            None => Ok(Change::Put(rec.clone(), ())),
            Some(_) => Err(ApiError::new(ErrorCode::Conflict, "room already exists")),
        }
    })
    .await
    .map_err(|e| fail(e.into()))?
    .map_err(fail)?;
    Ok(rec)
}

/// Notes Discord ids in the create slot, so a crash from here on can be rolled back by anyone.
async fn record_slot(
    core: &Core,
    user: UserId,
    nonce: &str,
    role: Option<u64>,
    channel: Option<u64>,
) {
    let r = store::update::<OwnerIndex, (), ApiError, _>(&core.state, &owner_key(user), |cur| {
        let Some(mut idx) = cur else {
            return Ok(Change::Keep(()));
        };
        match idx.creating.iter_mut().find(|s| s.nonce == nonce) {
            Some(slot) => {
                slot.role = role;
                slot.channel = channel;
                Ok(Change::Put(idx, ()))
            }
            None => Ok(Change::Keep(())),
        }
    })
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "recording create progress failed; the reconciler will find it by tag");
    }
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
        tracing::error!(error = %e, user = %user, "updating the owner index failed");
    }
}

/// Deletes Discord objects of a failed or abandoned create: channel first, then role.
pub async fn rollback(core: &Core, guild: GuildId, role: Option<u64>, channel: Option<u64>) {
    if let Some(c) = channel {
        if let Err(e) = core.discord.delete_channel(c).await {
            tracing::error!(channel = c, error = %e, "rollback: deleting channel failed; the reconciler retries");
        }
    }
    if let Some(r) = role {
        if let Err(e) = core.discord.delete_role(guild.get(), r).await {
            tracing::error!(role = r, error = %e, "rollback: deleting role failed; the reconciler retries");
        }
    }
}

/// Gives `user` the role, first adding them to the guild with their OAuth token if needed.
async fn ensure_member_with_role(
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

/// The `join` payload: the contract's [`JoinRoom`] plus an optional `room` — the room the invite
/// link names, when the caller knows it; a valid token for another room is then
/// `invite_wrong_room`. A plain `JoinRoom` decodes as this with `room: None`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinRequest {
    pub requester: UserRef,
    pub invite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomId>,
}

impl From<JoinRoom> for JoinRequest {
    fn from(j: JoinRoom) -> Self {
        Self {
            requester: j.requester,
            invite: j.invite,
            room: None,
        }
    }
}

impl voicerooms_contract::wire::Validate for JoinRequest {
    fn validate(&self) -> Result<(), voicerooms_contract::DecodeError> {
        self.requester.validate()?;
        voicerooms_contract::wire::check_token(
            "invite",
            &self.invite,
            voicerooms_contract::command::MAX_INVITE_BYTES,
        )
    }
}

/// `join`: verify the invite, reserve a place (CAS), give the role, place in voice.
pub async fn join(core: &Core, cmd: JoinRequest) -> Result<Joined, ApiError> {
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
    // Reserve the place.
    let capacity = rec.view.capacity as usize;
    let newly = store::update::<RoomRecord, bool, ApiError, _>(
        &core.rooms,
        &subject::room_key(room),
        |cur| {
            let mut r = cur.ok_or_else(|| not_found(room))?;
            if r.view.state == RoomState::Deleting || r.view.state == RoomState::Creating {
                return Err(ApiError::new(ErrorCode::RoomClosing, "the room is closing"));
            }
            if r.invite_id != claims.jti {
                return Err(ApiError::new(
                    ErrorCode::InviteInvalid,
                    "the invite was replaced by a newer one",
                ));
            }
            if r.view.members.iter().any(|m| m.user.id == user.id) {
                return Ok(Change::Keep(false));
            }
            if r.view.members.len() >= capacity {
                return Err(ApiError::new(
                    ErrorCode::RoomFull,
                    format!("the room is full ({capacity})"),
                ));
            }
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
            Ok(Change::Put(r, true))
        },
    )
    .await?;
    let newly = match newly {
        Ok((n, _)) => n,
        Err(e) => {
            return Err(e);
        }
    };
    if newly {
        if let Err(e) =
            ensure_member_with_role(core, rec.view.guild, &user, rec.view.role.get()).await
        {
            // Give the place back.
            let _ = store::update::<RoomRecord, (), ApiError, _>(
                &core.rooms,
                &subject::room_key(room),
                |cur| match cur {
                    Some(mut r) => {
                        r.view.members.retain(|m| m.user.id != user.id);
                        Ok(Change::Put(r, ()))
                    }
                    None => Ok(Change::Keep(())),
                },
            )
            .await;
            return Err(e);
        }
        core.publish_and_bump(
            rec.view.guild,
            room,
            Event::RoomMemberAdded(RoomMemberAdded {
                user: user.clone(),
                via: JoinedVia::Invite,
            }),
        )
        .await;
    }
    let (rec, _) = core.record(room).await?.ok_or_else(|| not_found(room))?;
    let placement = place(core, &rec, &user).await;
    core.metrics.placement(placement_label(&placement), started);
    tracing::info!(room = %room, user = %user.id, placement = placement_label(&placement), elapsed_ms = started.elapsed().as_millis() as u64, "joined");
    let rec = core.record(room).await?.map(|(r, _)| r).unwrap_or(rec);
    Ok(Joined {
        room: rec.view,
        placement,
    })
}

pub fn placement_label(p: &Placement) -> &'static str {
    match p {
        Placement::Moved { .. } => "moved",
        Placement::AlreadyThere { .. } => "already_there",
        Placement::Pending { .. } => "pending",
        Placement::Failed { .. } => "failed",
    }
}

/// Puts `user` in the room's voice channel: move if connected, else a pending move.
pub async fn place(core: &Core, rec: &RoomRecord, user: &UserRef) -> Placement {
    let channel = rec.view.id.cast();
    let guild = rec.view.guild;
    if rec.view.voice.iter().any(|o| o.user.id == user.id) {
        return Placement::AlreadyThere { channel };
    }
    match core
        .discord
        .move_member(guild.get(), user.id.get(), Some(rec.view.id.get()))
        .await
    {
        Ok(()) => return Placement::Moved { channel },
        Err(e) if e.json_code() == Some(NOT_IN_VOICE) => {}
        Err(e) => {
            let api = e.to_api();
            return Placement::Failed {
                code: api.code,
                message: api.message,
            };
        }
    }
    let now = now_ms();
    let expires_at = now + core.settings.pending_move_window_ms;
    let pending = PendingMove {
        room: rec.view.id,
        registered_at: now,
        expires_at,
    };
    let key = pending_key(guild, user.id);
    let put = store::update::<PendingMove, (), ApiError, _>(&core.state, &key, |_| {
        Ok(Change::Put(pending.clone(), ()))
    })
    .await;
    if let Err(e) = put {
        let api: ApiError = e.into();
        return Placement::Failed {
            code: api.code,
            message: api.message,
        };
    }
    // They may have connected between the failed move and the registration: try once more.
    if core
        .discord
        .move_member(guild.get(), user.id.get(), Some(rec.view.id.get()))
        .await
        .is_ok()
    {
        let _ = store::update::<PendingMove, (), ApiError, _>(&core.state, &key, |_| {
            Ok(Change::Delete(()))
        })
        .await;
        return Placement::Moved { channel };
    }
    Placement::Pending {
        channel,
        channel_url: format!("https://discord.com/channels/{guild}/{}", rec.view.id),
        expires_at,
    }
}

/// `get`: members of the room only (and its owner).
pub async fn get(core: &Core, cmd: RoomCommand) -> Result<RoomView, ApiError> {
    let (rec, _) = core
        .record(cmd.room)
        .await?
        .ok_or_else(|| not_found(cmd.room))?;
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
pub async fn list_mine(core: &Core, cmd: ListMine) -> Result<RoomList, ApiError> {
    let keys = store::keys(&core.rooms, MAX_SCAN).await?;
    let mut rooms = Vec::new();
    for key in keys {
        if let Some((rec, _)) = store::get::<RoomRecord>(&core.rooms, &key).await? {
            if rec
                .view
                .members
                .iter()
                .any(|m| m.user.id == cmd.requester.id)
            {
                rooms.push(rec.view);
            }
        }
    }
    rooms.sort_by_key(|r| r.created_at);
    Ok(RoomList { rooms })
}

/// `rotate_invite`: a new token id; older links stop working.
pub async fn rotate_invite(core: &Core, cmd: RoomCommand) -> Result<Invite, ApiError> {
    let (invite_id, issued, expires) = core.new_invite_fields();
    let (rec, _) = store::update::<RoomRecord, RoomRecord, ApiError, _>(
        &core.rooms,
        &subject::room_key(cmd.room),
        |cur| {
            let mut r = cur.ok_or_else(|| not_found(cmd.room))?;
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
        },
    )
    .await??;
    core.invite(&rec)
}

/// `leave`: drop the role (and the voice connection to the room's channel). The owner closes.
pub async fn leave(core: &Core, cmd: RoomCommand) -> Result<Done, ApiError> {
    let user = cmd.requester.id;
    let (rec, _) = store::update::<RoomRecord, RoomRecord, ApiError, _>(
        &core.rooms,
        &subject::room_key(cmd.room),
        |cur| {
            let mut r = cur.ok_or_else(|| not_found(cmd.room))?;
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
            Ok(Change::Put(r.clone(), r))
        },
    )
    .await??;
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
    core.publish_and_bump(
        rec.view.guild,
        cmd.room,
        Event::RoomMemberRemoved(RoomMemberRemoved {
            user: cmd.requester.clone(),
            reason: RemovedReason::Left,
        }),
    )
    .await;
    Ok(Done {})
}

/// `close`: the owner deletes the room now (same path as idle cleanup, without the warning).
pub async fn close(core: &Core, cmd: RoomCommand) -> Result<Done, ApiError> {
    let (rec, _) = core
        .record(cmd.room)
        .await?
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
pub async fn begin_closing(core: &Core, room: RoomId) -> Result<Option<Millis>, ApiError> {
    let now = now_ms();
    let idle = core.settings.idle_timeout_ms;
    let deadline = now + core.settings.closing_warning_ms;
    let (result, _) = store::update::<RoomRecord, Option<GuildId>, ApiError, _>(
        &core.rooms,
        &subject::room_key(room),
        |cur| {
            let Some(mut r) = cur else {
                return Ok(Change::Keep(None));
            };
            if r.view.state != RoomState::Open
                || !r.view.voice.is_empty()
                || now.saturating_sub(r.view.last_activity) < idle
            {
                return Ok(Change::Keep(None));
            }
            r.view.state = RoomState::Closing;
            r.view.closing_deadline = Some(deadline);
            let g = r.view.guild;
            Ok(Change::Put(r, Some(g)))
        },
    )
    .await??;
    let Some(guild) = result else { return Ok(None) };
    core.publish_and_bump(
        guild,
        room,
        Event::RoomClosing(RoomClosing {
            deadline,
            reason: CloseReason::Idle,
        }),
    )
    .await;
    tracing::info!(room = %room, deadline, "room idle: closing warning sent");
    Ok(Some(deadline))
}

/// The one deletion path. Claims the room (state `deleting` with a lease) unless someone else
/// holds a live lease, or (for idle closes) the warning was cancelled or has not run out;
/// deletes channel and role, publishes `room.deleted`, removes the state. Safe to repeat: a
/// replica dying halfway leaves `deleting` with a lease another replica takes over when it ends.
pub async fn finish_room(
    core: &Core,
    room: RoomId,
    reason: CloseReason,
    force: bool,
) -> Result<bool, ApiError> {
    let now = now_ms();
    let lease_until = now + core.settings.lease_ms;
    let me = core.instance.clone();
    let claimed = store::update::<RoomRecord, Option<RoomRecord>, ApiError, _>(
        &core.rooms,
        &subject::room_key(room),
        |cur| {
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
        },
    )
    .await??
    .0;
    let Some(rec) = claimed else { return Ok(false) };
    let reason = rec.close_reason.unwrap_or(reason);
    let guild = rec.view.guild;
    core.discord
        .delete_channel(room.get())
        .await
        .map_err(|e| e.to_api())?;
    core.discord
        .delete_role(guild.get(), rec.view.role.get())
        .await
        .map_err(|e| e.to_api())?;
    // A fixed message id: a replica finishing another's deletion publishes it once.
    core.publish(
        guild,
        room,
        Event::RoomDeleted(RoomDeleted { reason }),
        Some(format!("rm:{room}:deleted")),
    )
    .await?;
    let owner = rec.view.owner.id;
    let _ = store::update::<OwnerIndex, (), ApiError, _>(&core.state, &owner_key(owner), |cur| {
        let Some(mut idx) = cur else {
            return Ok(Change::Keep(()));
        };
        idx.rooms.retain(|r| *r != room);
        Ok(Change::Put(idx, ()))
    })
    .await;
    store::update::<RoomRecord, (), ApiError, _>(&core.rooms, &subject::room_key(room), |cur| {
        match cur {
            Some(r) if r.view.state == RoomState::Deleting => Ok(Change::Delete(())),
            _ => Ok(Change::Keep(())),
        }
    })
    .await??;
    core.metrics.rooms_deleted(reason);
    tracing::info!(room = %room, reason = ?reason, "room deleted");
    Ok(true)
}
