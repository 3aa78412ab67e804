//! Room events: what gateway-listener and room-manager publish on `rooms.<guild>.<room>.<kind>`,
//! what the `ROOMS` stream stores, and what the edge forwards to browsers.
//!
//! A [`RoomEvent`] is the envelope (`v`, `kind`, `guild`, `room`, times, trace context) with the
//! kind-specific body under `data`. The per-room sequence (`seq`) is not written by publishers: it
//! is the JetStream stream sequence, filled in by whoever reads the event from the stream.

use serde::{Deserialize, Serialize};

use crate::ids::{ChannelId, GuildId, RoleId, RoomId, UserId};
use crate::subject::{self, SubjectError};
use crate::wire::{self, check_text, check_token, DecodeError, Validate};

/// Longest user-visible name we relay (Discord's own limit is 32; room names are 1–100).
pub const MAX_NAME_CHARS: usize = 100;
/// Longest avatar hash (`a_` + 32 hex in practice).
pub const MAX_AVATAR_BYTES: usize = 64;
/// Longest W3C `traceparent` we carry.
pub const MAX_TRACEPARENT_BYTES: usize = 128;
/// Longest free-text reason or message.
pub const MAX_MESSAGE_CHARS: usize = 500;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// The kind of a room event; also the last two tokens of its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "voice.joined")]
    VoiceJoined,
    #[serde(rename = "voice.left")]
    VoiceLeft,
    #[serde(rename = "voice.updated")]
    VoiceUpdated,
    #[serde(rename = "channel.updated")]
    ChannelUpdated,
    #[serde(rename = "channel.deleted")]
    ChannelDeleted,
    #[serde(rename = "room.created")]
    RoomCreated,
    #[serde(rename = "room.member_added")]
    RoomMemberAdded,
    #[serde(rename = "room.member_removed")]
    RoomMemberRemoved,
    #[serde(rename = "room.closing")]
    RoomClosing,
    #[serde(rename = "room.closing_cancelled")]
    RoomClosingCancelled,
    #[serde(rename = "room.deleted")]
    RoomDeleted,
}

impl EventKind {
    pub const ALL: [EventKind; 11] = [
        EventKind::VoiceJoined,
        EventKind::VoiceLeft,
        EventKind::VoiceUpdated,
        EventKind::ChannelUpdated,
        EventKind::ChannelDeleted,
        EventKind::RoomCreated,
        EventKind::RoomMemberAdded,
        EventKind::RoomMemberRemoved,
        EventKind::RoomClosing,
        EventKind::RoomClosingCancelled,
        EventKind::RoomDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::VoiceJoined => "voice.joined",
            EventKind::VoiceLeft => "voice.left",
            EventKind::VoiceUpdated => "voice.updated",
            EventKind::ChannelUpdated => "channel.updated",
            EventKind::ChannelDeleted => "channel.deleted",
            EventKind::RoomCreated => "room.created",
            EventKind::RoomMemberAdded => "room.member_added",
            EventKind::RoomMemberRemoved => "room.member_removed",
            EventKind::RoomClosing => "room.closing",
            EventKind::RoomClosingCancelled => "room.closing_cancelled",
            EventKind::RoomDeleted => "room.deleted",
        }
    }

    pub fn parse(s: &str) -> Result<Self, SubjectError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| SubjectError::UnknownKind(subject::truncate(s)))
    }

    pub(crate) fn from_tokens(a: &str, b: &str) -> Result<Self, SubjectError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().split_once('.') == Some((a, b)))
            .ok_or_else(|| SubjectError::UnknownKind(subject::truncate(&format!("{a}.{b}"))))
    }
}

/// A Discord user as we relay them: enough to draw a member list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    pub id: UserId,
    pub username: String,
    /// Display name, when the user set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_name: Option<String>,
    /// Avatar hash (CDN: `avatars/<id>/<hash>.png`); none for the default avatar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
}

impl Validate for UserRef {
    fn validate(&self) -> Result<(), DecodeError> {
        check_text("user.username", &self.username, 1, MAX_NAME_CHARS)?;
        if let Some(name) = &self.global_name {
            check_text("user.global_name", name, 1, MAX_NAME_CHARS)?;
        }
        if let Some(avatar) = &self.avatar {
            check_token("user.avatar", avatar, MAX_AVATAR_BYTES)?;
        }
        Ok(())
    }
}

/// Discord's per-user voice flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VoiceFlags {
    pub mute: bool,
    pub deaf: bool,
    pub self_mute: bool,
    pub self_deaf: bool,
    pub self_stream: bool,
    pub self_video: bool,
    pub suppress: bool,
}

/// Names of the flags in [`VoiceFlags`], used to say what a `voice.updated` changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoiceFlag {
    Mute,
    Deaf,
    SelfMute,
    SelfDeaf,
    SelfStream,
    SelfVideo,
    Suppress,
}

impl VoiceFlags {
    /// The flags that differ between `self` and `other`, in a fixed order.
    pub fn changed(&self, other: &VoiceFlags) -> Vec<VoiceFlag> {
        let pairs = [
            (self.mute != other.mute, VoiceFlag::Mute),
            (self.deaf != other.deaf, VoiceFlag::Deaf),
            (self.self_mute != other.self_mute, VoiceFlag::SelfMute),
            (self.self_deaf != other.self_deaf, VoiceFlag::SelfDeaf),
            (self.self_stream != other.self_stream, VoiceFlag::SelfStream),
            (self.self_video != other.self_video, VoiceFlag::SelfVideo),
            (self.suppress != other.suppress, VoiceFlag::Suppress),
        ];
        pairs
            .into_iter()
            .filter(|(c, _)| *c)
            .map(|(_, f)| f)
            .collect()
    }
}

/// Someone connected to the room's voice channel (or moved into it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceJoined {
    pub user: UserRef,
    #[serde(default)]
    pub flags: VoiceFlags,
    /// Set when this join is the second half of a move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<ChannelId>,
}

/// Someone left the room's voice channel (disconnected, or moved elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceLeft {
    pub user: UserRef,
    /// Set when this leave is the first half of a move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<ChannelId>,
}

/// Mute/deaf/stream/video changed for someone who stays in the channel. Never a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceUpdated {
    pub user: UserRef,
    pub flags: VoiceFlags,
    pub changed: Vec<VoiceFlag>,
}

/// The voice channel behind the room was changed in Discord.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelUpdated {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_limit: Option<u16>,
}

/// The voice channel behind the room was deleted in Discord (e.g. by a moderator).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChannelDeleted {}

/// A room was created: its channel and role exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCreated {
    pub name: String,
    pub owner: UserRef,
    pub role: RoleId,
    pub capacity: u8,
    pub invite_expires_at: Millis,
}

/// How someone became a member of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinedVia {
    /// The creator.
    Owner,
    /// Through an invite link.
    Invite,
}

/// Someone was given the room's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMemberAdded {
    pub user: UserRef,
    pub via: JoinedVia,
}

/// Why someone stopped being a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovedReason {
    Left,
    Removed,
}

/// Someone lost the room's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMemberRemoved {
    pub user: UserRef,
    pub reason: RemovedReason,
}

/// Why a room is closing or was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Nobody in voice for the idle limit (1 h by default).
    Idle,
    /// The owner closed it.
    Owner,
    /// Its Discord channel disappeared.
    ChannelDeleted,
}

/// Warning: the room will be deleted at `deadline` unless someone joins voice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomClosing {
    pub deadline: Millis,
    pub reason: CloseReason,
}

/// The closing warning was withdrawn (someone joined voice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomClosingCancelled {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<UserRef>,
}

/// The room is gone: channel and role deleted, state removed. The last event of a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomDeleted {
    pub reason: CloseReason,
}

/// The body of a room event, tagged by `kind` with its fields under `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data")]
pub enum Event {
    #[serde(rename = "voice.joined")]
    VoiceJoined(VoiceJoined),
    #[serde(rename = "voice.left")]
    VoiceLeft(VoiceLeft),
    #[serde(rename = "voice.updated")]
    VoiceUpdated(VoiceUpdated),
    #[serde(rename = "channel.updated")]
    ChannelUpdated(ChannelUpdated),
    #[serde(rename = "channel.deleted")]
    ChannelDeleted(ChannelDeleted),
    #[serde(rename = "room.created")]
    RoomCreated(RoomCreated),
    #[serde(rename = "room.member_added")]
    RoomMemberAdded(RoomMemberAdded),
    #[serde(rename = "room.member_removed")]
    RoomMemberRemoved(RoomMemberRemoved),
    #[serde(rename = "room.closing")]
    RoomClosing(RoomClosing),
    #[serde(rename = "room.closing_cancelled")]
    RoomClosingCancelled(RoomClosingCancelled),
    #[serde(rename = "room.deleted")]
    RoomDeleted(RoomDeleted),
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::VoiceJoined(_) => EventKind::VoiceJoined,
            Event::VoiceLeft(_) => EventKind::VoiceLeft,
            Event::VoiceUpdated(_) => EventKind::VoiceUpdated,
            Event::ChannelUpdated(_) => EventKind::ChannelUpdated,
            Event::ChannelDeleted(_) => EventKind::ChannelDeleted,
            Event::RoomCreated(_) => EventKind::RoomCreated,
            Event::RoomMemberAdded(_) => EventKind::RoomMemberAdded,
            Event::RoomMemberRemoved(_) => EventKind::RoomMemberRemoved,
            Event::RoomClosing(_) => EventKind::RoomClosing,
            Event::RoomClosingCancelled(_) => EventKind::RoomClosingCancelled,
            Event::RoomDeleted(_) => EventKind::RoomDeleted,
        }
    }

    /// The user the event is about, if any.
    pub fn user(&self) -> Option<&UserRef> {
        match self {
            Event::VoiceJoined(e) => Some(&e.user),
            Event::VoiceLeft(e) => Some(&e.user),
            Event::VoiceUpdated(e) => Some(&e.user),
            Event::RoomCreated(e) => Some(&e.owner),
            Event::RoomMemberAdded(e) => Some(&e.user),
            Event::RoomMemberRemoved(e) => Some(&e.user),
            Event::RoomClosingCancelled(e) => e.by.as_ref(),
            Event::ChannelUpdated(_)
            | Event::ChannelDeleted(_)
            | Event::RoomClosing(_)
            | Event::RoomDeleted(_) => None,
        }
    }
}

impl Validate for Event {
    fn validate(&self) -> Result<(), DecodeError> {
        if let Some(user) = self.user() {
            user.validate()?;
        }
        match self {
            Event::VoiceUpdated(e) if e.changed.is_empty() => Err(DecodeError::invalid(
                "data.changed",
                "a voice.updated must change something",
            )),
            Event::ChannelUpdated(e) => check_text("data.name", &e.name, 1, MAX_NAME_CHARS),
            Event::RoomCreated(e) => {
                check_text("data.name", &e.name, 1, MAX_NAME_CHARS)?;
                if e.capacity == 0 || e.capacity > 99 {
                    return Err(DecodeError::invalid("data.capacity", "must be 1-99"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The envelope of every room event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEvent {
    /// Protocol version, [`wire::VERSION`].
    pub v: u16,
    pub guild: GuildId,
    pub room: RoomId,
    /// Per-room sequence = JetStream stream sequence. Absent when published; set by readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// When Discord says it happened, where Discord gives a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<Millis>,
    /// When our first service saw it (gateway receive time for Discord events).
    pub received_at: Millis,
    /// When it was published to NATS.
    pub published_at: Millis,
    /// W3C trace context of the publishing span (also sent in the NATS `traceparent` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Id used for JetStream de-duplication (`Nats-Msg-Id`), unique per logical event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(flatten)]
    pub event: Event,
}

impl RoomEvent {
    pub fn new(guild: GuildId, room: RoomId, received_at: Millis, event: Event) -> Self {
        Self {
            v: wire::VERSION,
            guild,
            room,
            seq: None,
            occurred_at: None,
            received_at,
            published_at: received_at,
            traceparent: None,
            id: None,
            event,
        }
    }

    pub fn kind(&self) -> EventKind {
        self.event.kind()
    }

    /// The subject this event is published on.
    pub fn subject(&self) -> String {
        subject::room_event(self.guild, self.room, self.kind())
    }

    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        wire::decode_versioned(bytes)
    }

    /// Decodes and checks that the payload agrees with the subject it arrived on, so a message
    /// cannot claim to belong to another room than the one its subject names.
    pub fn decode_on(subject: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        let event = Self::decode(bytes)?;
        let (guild, room, kind) = match subject::Subject::parse(subject) {
            Ok(subject::Subject::RoomEvent { guild, room, kind })
            | Ok(subject::Subject::LiveRoomEvent { guild, room, kind }) => (guild, room, kind),
            Ok(_) => return Err(DecodeError::invalid("subject", "not a room event subject")),
            Err(e) => return Err(DecodeError::invalid("subject", e.to_string())),
        };
        if event.guild != guild || event.room != room || event.kind() != kind {
            return Err(DecodeError::invalid(
                "subject",
                "payload guild/room/kind differ from the subject",
            ));
        }
        Ok(event)
    }
}

impl Validate for RoomEvent {
    fn validate(&self) -> Result<(), DecodeError> {
        if let Some(tp) = &self.traceparent {
            check_token("traceparent", tp, MAX_TRACEPARENT_BYTES)?;
        }
        if let Some(id) = &self.id {
            check_token("id", id, 200)?;
        }
        self.event.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn alice() -> UserRef {
        UserRef {
            id: UserId::new(80351110224678912).unwrap(),
            username: "alice".into(),
            global_name: Some("Alice".into()),
            avatar: Some("a_1269e74af4df7417b13759eae50c83dc".into()),
        }
    }

    fn every_event() -> Vec<Event> {
        let flags = VoiceFlags {
            self_mute: true,
            ..Default::default()
        };
        vec![
            Event::VoiceJoined(VoiceJoined {
                user: alice(),
                flags,
                moved_from: Some(ChannelId::new(9).unwrap()),
            }),
            Event::VoiceLeft(VoiceLeft {
                user: alice(),
                moved_to: None,
            }),
            Event::VoiceUpdated(VoiceUpdated {
                user: alice(),
                flags,
                changed: vec![VoiceFlag::SelfMute],
            }),
            Event::ChannelUpdated(ChannelUpdated {
                name: "Room".into(),
                user_limit: Some(4),
            }),
            Event::ChannelDeleted(ChannelDeleted {}),
            Event::RoomCreated(RoomCreated {
                name: "Friday raid".into(),
                owner: alice(),
                role: RoleId::new(5).unwrap(),
                capacity: 4,
                invite_expires_at: 1_700_000_000_000,
            }),
            Event::RoomMemberAdded(RoomMemberAdded {
                user: alice(),
                via: JoinedVia::Invite,
            }),
            Event::RoomMemberRemoved(RoomMemberRemoved {
                user: alice(),
                reason: RemovedReason::Left,
            }),
            Event::RoomClosing(RoomClosing {
                deadline: 1_700_000_030_000,
                reason: CloseReason::Idle,
            }),
            Event::RoomClosingCancelled(RoomClosingCancelled { by: Some(alice()) }),
            Event::RoomDeleted(RoomDeleted {
                reason: CloseReason::ChannelDeleted,
            }),
        ]
    }

    fn envelope(event: Event) -> RoomEvent {
        let mut e = RoomEvent::new(
            GuildId::new(1).unwrap(),
            RoomId::new(2).unwrap(),
            1_700_000_000_000,
            event,
        );
        e.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        e.id = Some("gw:abc:17".into());
        e
    }

    #[test]
    fn every_event_round_trips_through_json() {
        let events = every_event();
        assert_eq!(
            events.len(),
            EventKind::ALL.len(),
            "a kind is missing a test case"
        );
        for event in events {
            let kind = event.kind();
            let original = envelope(event);
            let bytes = original.encode();
            let decoded = RoomEvent::decode_on(&original.subject(), &bytes).unwrap();
            assert_eq!(decoded, original);
            let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(json["kind"], kind.as_str());
            assert_eq!(json["v"], 1);
            assert_eq!(json["guild"], "1");
        }
    }

    #[test]
    fn the_wire_shape_is_stable() {
        let event = RoomEvent::new(
            GuildId::new(1).unwrap(),
            RoomId::new(2).unwrap(),
            10,
            Event::VoiceLeft(VoiceLeft {
                user: UserRef {
                    id: UserId::new(3).unwrap(),
                    username: "bob".into(),
                    global_name: None,
                    avatar: None,
                },
                moved_to: None,
            }),
        );
        assert_eq!(
            String::from_utf8(event.encode()).unwrap(),
            r#"{"v":1,"guild":"1","room":"2","received_at":10,"published_at":10,"kind":"voice.left","data":{"user":{"id":"3","username":"bob"}}}"#
        );
    }

    #[test]
    fn malformed_and_hostile_events_give_typed_errors() {
        type Check = fn(&DecodeError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (b"not json".to_vec(), |e| matches!(e, DecodeError::Malformed(_))),
            (b"{}".to_vec(), |e| matches!(e, DecodeError::Invalid { field: "v", .. })),
            (br#"{"v":"1"}"#.to_vec(), |e| matches!(e, DecodeError::Invalid { field: "v", .. })),
            (br#"{"v":2,"anything":true}"#.to_vec(), |e| {
                matches!(e, DecodeError::UnsupportedVersion { found: 2, .. })
            }),
            (
                br#"{"v":1,"guild":"1","room":"2","received_at":1,"published_at":1,"kind":"voice.exploded","data":{}}"#.to_vec(),
                |e| matches!(e, DecodeError::Malformed(_)),
            ),
            (
                br#"{"v":1,"guild":"1.*","room":"2","received_at":1,"published_at":1,"kind":"room.deleted","data":{"reason":"idle"}}"#.to_vec(),
                |e| matches!(e, DecodeError::Malformed(m) if m.contains("invalid id")),
            ),
            (
                format!(
                    r#"{{"v":1,"guild":"1","room":"2","received_at":1,"published_at":1,"kind":"voice.left","data":{{"user":{{"id":"3","username":"{}"}}}}}}"#,
                    "x".repeat(101)
                )
                .into_bytes(),
                |e| matches!(e, DecodeError::Invalid { field: "user.username", .. }),
            ),
            (
                br#"{"v":1,"guild":"1","room":"2","received_at":1,"published_at":1,"kind":"voice.left","data":{"user":{"id":"3","username":"bo\nb"}}}"#.to_vec(),
                |e| matches!(e, DecodeError::Invalid { field: "user.username", .. }),
            ),
            (
                br#"{"v":1,"guild":"1","room":"2","received_at":1,"published_at":1,"kind":"voice.updated","data":{"user":{"id":"3","username":"bob"},"flags":{},"changed":[]}}"#.to_vec(),
                |e| matches!(e, DecodeError::Invalid { field: "data.changed", .. }),
            ),
            (vec![b' '; wire::MAX_MESSAGE_BYTES + 1], |e| {
                matches!(e, DecodeError::TooLarge { .. })
            }),
        ];
        for (bytes, check) in cases {
            let err = RoomEvent::decode(&bytes).unwrap_err();
            assert!(
                check(&err),
                "unexpected error {err:?} for {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(120)])
            );
        }
    }

    #[test]
    fn a_payload_cannot_claim_another_room_than_its_subject() {
        let event = envelope(Event::RoomDeleted(RoomDeleted {
            reason: CloseReason::Owner,
        }));
        let bytes = event.encode();
        let err = RoomEvent::decode_on("rooms.1.3.room.deleted", &bytes).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Invalid {
                field: "subject",
                ..
            }
        ));
        let err = RoomEvent::decode_on("rooms.1.2.voice.joined", &bytes).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Invalid {
                field: "subject",
                ..
            }
        ));
        assert!(RoomEvent::decode_on("live.rooms.1.2.room.deleted", &bytes).is_ok());
    }

    #[test]
    fn a_flag_change_is_reported_by_name() {
        let before = VoiceFlags::default();
        let after = VoiceFlags {
            self_deaf: true,
            self_stream: true,
            ..Default::default()
        };
        assert_eq!(
            before.changed(&after),
            vec![VoiceFlag::SelfDeaf, VoiceFlag::SelfStream]
        );
        assert!(after.changed(&after).is_empty());
    }
}
