//! Room-manager's request/reply API on `roommgr.v1.<command>`.
//!
//! Requests carry the authenticated requester (the edge vouches for it after checking the session)
//! and are versioned by their subject. Every reply is `{"v":1,"ok":…}` or
//! `{"v":1,"error":{"code":…,"message":…}}`, where `code` is a stable [`ErrorCode`].

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::event::{JoinedVia, Millis, UserRef, VoiceFlags, MAX_MESSAGE_CHARS, MAX_NAME_CHARS};
use crate::ids::{ChannelId, GuildId, RoleId, RoomId};
use crate::wire::{self, check_text, check_token, DecodeError, Validate};

/// Longest invite token accepted (a JWT with our claims is ~400 bytes).
pub const MAX_INVITE_BYTES: usize = 2048;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 64;

/// Create a room: a private voice channel and a role in `guild`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRoom {
    pub requester: UserRef,
    pub guild: GuildId,
    pub name: String,
    /// Repeating a create with the same key returns the first result instead of a second room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Join a room with an invite token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRoom {
    pub requester: UserRef,
    pub invite: String,
    /// The room the invite link names, when the caller knows it (the link's URL): a valid
    /// token for another room is then refused with `invite_wrong_room` instead of joining it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomId>,
}

/// Commands that name a room: leave, close, get, rotate_invite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCommand {
    pub requester: UserRef,
    pub room: RoomId,
}

pub type LeaveRoom = RoomCommand;
pub type CloseRoom = RoomCommand;
pub type GetRoom = RoomCommand;
pub type RotateInvite = RoomCommand;

/// List the rooms the requester owns or belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMine {
    pub requester: UserRef,
}

impl Validate for CreateRoom {
    fn validate(&self) -> Result<(), DecodeError> {
        self.requester.validate()?;
        check_text("name", &self.name, 1, MAX_NAME_CHARS)?;
        if self.name.trim().is_empty() {
            return Err(DecodeError::invalid("name", "must not be blank"));
        }
        if let Some(key) = &self.idempotency_key {
            check_token("idempotency_key", key, MAX_IDEMPOTENCY_KEY_BYTES)?;
        }
        Ok(())
    }
}

impl Validate for JoinRoom {
    fn validate(&self) -> Result<(), DecodeError> {
        self.requester.validate()?;
        check_token("invite", &self.invite, MAX_INVITE_BYTES)
    }
}

impl Validate for RoomCommand {
    fn validate(&self) -> Result<(), DecodeError> {
        self.requester.validate()
    }
}

impl Validate for ListMine {
    fn validate(&self) -> Result<(), DecodeError> {
        self.requester.validate()
    }
}

/// Decodes a command body (size, parse, validation). The version is the subject's `v1`.
pub fn decode_command<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, DecodeError> {
    wire::decode_unversioned(bytes)
}

/// Lifecycle of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomState {
    /// Being created: Discord objects may exist only in part.
    Creating,
    Open,
    /// A deletion warning is out; see `closing_deadline`.
    Closing,
    /// Being deleted: Discord objects are going away.
    Deleting,
}

/// Someone holding the room's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMember {
    pub user: UserRef,
    pub via: JoinedVia,
    pub joined_at: Millis,
}

/// Someone connected to the room's voice channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceOccupant {
    pub user: UserRef,
    #[serde(default)]
    pub flags: VoiceFlags,
    /// False when they joined the channel directly in Discord without joining the room.
    pub member: bool,
}

/// A room as the API and the edge's snapshot show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomView {
    pub id: RoomId,
    pub guild: GuildId,
    pub name: String,
    pub owner: UserRef,
    pub role: RoleId,
    pub capacity: u8,
    pub state: RoomState,
    pub members: Vec<RoomMember>,
    pub voice: Vec<VoiceOccupant>,
    pub created_at: Millis,
    pub last_activity: Millis,
    pub invite_expires_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closing_deadline: Option<Millis>,
    /// Sequence of the last room event this view reflects.
    pub seq: u64,
}

/// A signed invite for a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    pub token: String,
    pub expires_at: Millis,
}

/// What automatic voice placement did for the requester.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Placement {
    /// They were in another voice channel of the guild and were moved in.
    Moved { channel: ChannelId },
    /// They were already in the room's channel.
    AlreadyThere { channel: ChannelId },
    /// They are not connected to voice: Discord cannot move them. Open `channel_url`; they will be
    /// moved automatically if they connect to any voice channel of the guild before `expires_at`.
    Pending {
        channel: ChannelId,
        channel_url: String,
        expires_at: Millis,
    },
    /// Placement failed; joining the room itself succeeded. Retry with `join`.
    Failed { code: ErrorCode, message: String },
}

/// Reply to `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    pub room: RoomView,
    pub invite: Invite,
    pub placement: Placement,
}

/// Reply to `join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub room: RoomView,
    pub placement: Placement,
}

/// Reply to `list_mine`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomList {
    pub rooms: Vec<RoomView>,
}

/// Reply to `leave` and `close`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Done {}

/// A player's Discord access token as kept in the `oauth_tokens` bucket.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserToken {
    pub v: u16,
    pub access_token: String,
    /// Milliseconds since the epoch at which Discord stops accepting it.
    pub expires_at: Millis,
    /// Granted scopes, space separated (must include `guilds.join` for adding to a guild).
    pub scope: String,
}

impl fmt::Debug for UserToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserToken")
            .field("access_token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Stable machine codes for every error that crosses a wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Validation,
    Unauthorized,
    RoomNotFound,
    RoomFull,
    RoomClosing,
    NotOwner,
    NotMember,
    InviteInvalid,
    InviteExpired,
    InviteWrongRoom,
    RoomLimitReached,
    Conflict,
    DiscordUnavailable,
    RateLimited,
    Timeout,
    /// A service the request needs is not reachable (e.g. no room-manager answered).
    Unavailable,
    Internal,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, [`ErrorCode::Unknown`] last.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::Validation,
        ErrorCode::Unauthorized,
        ErrorCode::RoomNotFound,
        ErrorCode::RoomFull,
        ErrorCode::RoomClosing,
        ErrorCode::NotOwner,
        ErrorCode::NotMember,
        ErrorCode::InviteInvalid,
        ErrorCode::InviteExpired,
        ErrorCode::InviteWrongRoom,
        ErrorCode::RoomLimitReached,
        ErrorCode::Conflict,
        ErrorCode::DiscordUnavailable,
        ErrorCode::RateLimited,
        ErrorCode::Timeout,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Validation => "validation",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::RoomNotFound => "room_not_found",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::RoomClosing => "room_closing",
            ErrorCode::NotOwner => "not_owner",
            ErrorCode::NotMember => "not_member",
            ErrorCode::InviteInvalid => "invite_invalid",
            ErrorCode::InviteExpired => "invite_expired",
            ErrorCode::InviteWrongRoom => "invite_wrong_room",
            ErrorCode::RoomLimitReached => "room_limit_reached",
            ErrorCode::Conflict => "conflict",
            ErrorCode::DiscordUnavailable => "discord_unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The HTTP status the edge answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Validation => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotOwner | ErrorCode::NotMember => 403,
            ErrorCode::RoomNotFound => 404,
            ErrorCode::RoomFull
            | ErrorCode::RoomClosing
            | ErrorCode::Conflict
            | ErrorCode::RoomLimitReached => 409,
            ErrorCode::InviteInvalid | ErrorCode::InviteWrongRoom => 400,
            ErrorCode::InviteExpired => 410,
            ErrorCode::RateLimited => 429,
            ErrorCode::DiscordUnavailable | ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }

    /// Whether repeating the same request later may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::DiscordUnavailable
                | ErrorCode::Unavailable
                | ErrorCode::RateLimited
                | ErrorCode::Timeout
                | ErrorCode::Conflict
                | ErrorCode::Internal
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with its stable code and a human message (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.chars().count() > MAX_MESSAGE_CHARS {
            message = message.chars().take(MAX_MESSAGE_CHARS).collect();
        }
        Self {
            code,
            message,
            retry_after_ms: None,
        }
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        ApiError::new(ErrorCode::Validation, e.to_string())
    }
}

#[derive(Serialize, Deserialize)]
struct ReplyWire<T> {
    v: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ApiError>,
}

/// Encodes a command result as a reply.
pub fn encode_reply<T: Serialize>(result: &Result<T, ApiError>) -> Vec<u8> {
    let wire = match result {
        Ok(value) => ReplyWire {
            v: wire::VERSION,
            ok: Some(value),
            error: None,
        },
        Err(e) => ReplyWire {
            v: wire::VERSION,
            ok: None,
            error: Some(e.clone()),
        },
    };
    wire::encode(&wire)
}

/// Decodes a reply. A reply that cannot be decoded becomes an `internal` error.
pub fn decode_reply<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    struct NoCheck<T>(ReplyWire<T>);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for NoCheck<T> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            ReplyWire::deserialize(d).map(NoCheck)
        }
    }
    impl<T> Validate for NoCheck<T> {
        fn validate(&self) -> Result<(), DecodeError> {
            Ok(())
        }
    }
    let wire = wire::decode_versioned::<NoCheck<T>>(bytes)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("bad reply: {e}")))?
        .0;
    match (wire.ok, wire.error) {
        (_, Some(error)) => Err(error),
        (Some(ok), None) => Ok(ok),
        (None, None) => Err(ApiError::new(
            ErrorCode::Internal,
            "bad reply: neither ok nor error",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;

    fn requester() -> UserRef {
        UserRef {
            id: UserId::new(7).unwrap(),
            username: "carol".into(),
            global_name: None,
            avatar: None,
        }
    }

    fn view() -> RoomView {
        RoomView {
            id: RoomId::new(2).unwrap(),
            guild: GuildId::new(1).unwrap(),
            name: "Raid".into(),
            owner: requester(),
            role: RoleId::new(3).unwrap(),
            capacity: 4,
            state: RoomState::Open,
            members: vec![RoomMember {
                user: requester(),
                via: JoinedVia::Owner,
                joined_at: 1,
            }],
            voice: vec![VoiceOccupant {
                user: requester(),
                flags: VoiceFlags::default(),
                member: true,
            }],
            created_at: 1,
            last_activity: 2,
            invite_expires_at: 3,
            closing_deadline: None,
            seq: 17,
        }
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug + Validate>(value: T) {
        let bytes = serde_json::to_vec(&value).unwrap();
        assert_eq!(decode_command::<T>(&bytes).unwrap(), value);
    }

    fn reply_round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug + Clone>(
        value: T,
    ) {
        let bytes = encode_reply::<T>(&Ok(value.clone()));
        assert_eq!(decode_reply::<T>(&bytes).unwrap(), value);
    }

    #[test]
    fn every_command_round_trips() {
        round_trip(CreateRoom {
            requester: requester(),
            guild: GuildId::new(1).unwrap(),
            name: "Friday raid".into(),
            idempotency_key: Some("0190f7e8-2c4b-7c3e".into()),
        });
        round_trip(JoinRoom {
            requester: requester(),
            invite: "eyJhbGciOiJIUzI1NiJ9.eyJyIjoiMSJ9.c2ln".into(),
            room: None,
        });
        round_trip(JoinRoom {
            requester: requester(),
            invite: "eyJhbGciOiJIUzI1NiJ9.eyJyIjoiMSJ9.c2ln".into(),
            room: Some(RoomId::new(2).unwrap()),
        });
        round_trip(RoomCommand {
            requester: requester(),
            room: RoomId::new(2).unwrap(),
        });
        round_trip(ListMine {
            requester: requester(),
        });
    }

    #[test]
    fn every_reply_round_trips() {
        let placements = [
            Placement::Moved {
                channel: ChannelId::new(2).unwrap(),
            },
            Placement::AlreadyThere {
                channel: ChannelId::new(2).unwrap(),
            },
            Placement::Pending {
                channel: ChannelId::new(2).unwrap(),
                channel_url: "https://discord.com/channels/1/2".into(),
                expires_at: 9,
            },
            Placement::Failed {
                code: ErrorCode::DiscordUnavailable,
                message: "Discord did not answer".into(),
            },
        ];
        for placement in placements {
            reply_round_trip(Created {
                room: view(),
                invite: Invite {
                    token: "t".into(),
                    expires_at: 5,
                },
                placement: placement.clone(),
            });
            reply_round_trip(Joined {
                room: view(),
                placement,
            });
        }
        reply_round_trip(RoomList {
            rooms: vec![view()],
        });
        reply_round_trip(Done {});
        reply_round_trip(view());
    }

    #[test]
    fn errors_keep_their_stable_codes() {
        for code in ErrorCode::ALL {
            let err = ApiError::new(code, "m");
            let bytes = encode_reply::<Done>(&Err(err.clone()));
            let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(json["error"]["code"], code.as_str());
            assert_eq!(decode_reply::<Done>(&bytes).unwrap_err(), err);
            assert!((400..600).contains(&code.http_status()));
        }
        let future = br#"{"v":1,"error":{"code":"quantum_flux","message":"?"}}"#;
        assert_eq!(
            decode_reply::<Done>(future).unwrap_err().code,
            ErrorCode::Unknown
        );
    }

    #[test]
    fn bad_commands_and_replies_give_typed_errors() {
        let blank = br#"{"requester":{"id":"7","username":"carol"},"guild":"1","name":"   "}"#;
        assert!(matches!(
            decode_command::<CreateRoom>(blank),
            Err(DecodeError::Invalid { field: "name", .. })
        ));
        let long = format!(
            r#"{{"requester":{{"id":"7","username":"carol"}},"guild":"1","name":"{}"}}"#,
            "n".repeat(101)
        );
        assert!(matches!(
            decode_command::<CreateRoom>(long.as_bytes()),
            Err(DecodeError::Invalid { field: "name", .. })
        ));
        let hostile = br#"{"requester":{"id":"7","username":"carol"},"room":"2.>"}"#;
        assert!(matches!(
            decode_command::<RoomCommand>(hostile),
            Err(DecodeError::Malformed(_))
        ));
        let bad_invite = br#"{"requester":{"id":"7","username":"carol"},"invite":"a b"}"#;
        assert!(matches!(
            decode_command::<JoinRoom>(bad_invite),
            Err(DecodeError::Invalid {
                field: "invite",
                ..
            })
        ));
        assert_eq!(
            decode_reply::<Done>(b"garbage").unwrap_err().code,
            ErrorCode::Internal
        );
        assert_eq!(
            decode_reply::<Done>(br#"{"v":9,"ok":{}}"#)
                .unwrap_err()
                .code,
            ErrorCode::Internal
        );
        assert_eq!(
            decode_reply::<Done>(br#"{"v":1}"#).unwrap_err().code,
            ErrorCode::Internal
        );
    }
}
