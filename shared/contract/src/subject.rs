//! The NATS subject scheme: the only place a subject string is built or parsed.
//!
//! | subject | who publishes | what |
//! |---|---|---|
//! | `rooms.<guild>.<room>.<kind>` (kind is two tokens, e.g. `voice.joined`) | gateway-listener, room-manager | [`crate::event::RoomEvent`], stored in the `ROOMS` stream |
//! | `live.rooms.<guild>.<room>.<kind>` | JetStream (republish of the stream) | the same event with `Nats-Sequence` header: the edge's live feed |
//! | `gateway.<shard>.status` | gateway-listener | [`crate::status::GatewayStatus`] |
//! | `ops.alerts.<service>` | any service | [`crate::status::OperatorAlert`] |
//! | `roommgr.v1.<command>` | edge (request), room-manager (reply) | [`crate::command`] |
//!
//! Every variable token is either a validated snowflake or a fixed word from an enum, so a subject
//! built here never contains a wildcard or an empty token.

use std::fmt;

use crate::event::EventKind;
use crate::ids::{ChannelId, GuildId, IdError, RoomId};

/// Root token of room event subjects; the `ROOMS` stream captures `rooms.>`.
pub const ROOMS_ROOT: &str = "rooms";
/// Prefix under which the stream republishes every stored event (with its stream sequence).
pub const LIVE_PREFIX: &str = "live";
/// JetStream stream holding every room event.
pub const ROOMS_STREAM: &str = "ROOMS";
/// JetStream KV bucket of materialised rooms (room-manager writes, edge reads). Key: the room id
/// ([`room_key`]); value: a JSON [`crate::command::RoomView`] whose `seq` is the last applied
/// event's stream sequence. room-manager keeps any other state in buckets of its own.
pub const ROOMS_BUCKET: &str = "rooms";

/// JetStream KV bucket of players' Discord OAuth2 access tokens (secret): written by the edge at
/// login and refresh, read by room-manager to add a player to the guild (`guilds.join`). Key: the
/// user id ([`user_token_key`]); value: a JSON [`crate::command::UserToken`]. Tokens never travel
/// in request payloads, so tailing `roommgr.v1.>` shows none.
pub const OAUTH_TOKENS_BUCKET: &str = "oauth_tokens";

/// The key of a user's token in [`OAUTH_TOKENS_BUCKET`].
pub fn user_token_key(user: crate::ids::UserId) -> String {
    user.to_string()
}

/// The key of a room's snapshot in [`ROOMS_BUCKET`]: its id in decimal.
pub fn room_key(room: RoomId) -> String {
    room.to_string()
}
/// Version token of the room-manager request subjects.
pub const COMMAND_PREFIX: &str = "roommgr.v1";
/// Longest service name allowed in `ops.alerts.<service>`.
pub const MAX_SERVICE_NAME: usize = 32;

/// Why a subject could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject \"{0}\" is not one of ours")]
    Unknown(String),
    #[error("subject has a bad id: {0}")]
    BadId(#[from] IdError),
    #[error("unknown event kind \"{0}\"")]
    UnknownKind(String),
    #[error("unknown command \"{0}\"")]
    UnknownCommand(String),
    #[error("invalid service name \"{0}\": use 1-32 of [a-z0-9-]")]
    BadServiceName(String),
    #[error("invalid shard id \"{0}\"")]
    BadShard(String),
}

/// A parsed subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    RoomEvent {
        guild: GuildId,
        room: RoomId,
        kind: EventKind,
    },
    LiveRoomEvent {
        guild: GuildId,
        room: RoomId,
        kind: EventKind,
    },
    GatewayStatus {
        shard: u32,
    },
    OpsAlert {
        service: ServiceName,
    },
    Command(CommandKind),
}

impl Subject {
    pub fn parse(subject: &str) -> Result<Self, SubjectError> {
        let tokens: Vec<&str> = subject.split('.').collect();
        let unknown = || SubjectError::Unknown(truncate(subject));
        match tokens.as_slice() {
            [ROOMS_ROOT, guild, room, a, b] => Ok(Subject::RoomEvent {
                guild: GuildId::parse(guild)?,
                room: ChannelId::parse(room)?,
                kind: EventKind::from_tokens(a, b)?,
            }),
            [LIVE_PREFIX, ROOMS_ROOT, guild, room, a, b] => Ok(Subject::LiveRoomEvent {
                guild: GuildId::parse(guild)?,
                room: ChannelId::parse(room)?,
                kind: EventKind::from_tokens(a, b)?,
            }),
            ["gateway", shard, "status"] => Ok(Subject::GatewayStatus {
                shard: parse_shard(shard)?,
            }),
            ["ops", "alerts", service] => Ok(Subject::OpsAlert {
                service: ServiceName::new(service)?,
            }),
            ["roommgr", "v1", command] => Ok(Subject::Command(CommandKind::parse(command)?)),
            _ => Err(unknown()),
        }
    }

    pub fn render(&self) -> String {
        match self {
            Subject::RoomEvent { guild, room, kind } => room_event(*guild, *room, *kind),
            Subject::LiveRoomEvent { guild, room, kind } => {
                format!("{LIVE_PREFIX}.{}", room_event(*guild, *room, *kind))
            }
            Subject::GatewayStatus { shard } => gateway_status(*shard),
            Subject::OpsAlert { service } => ops_alert(service),
            Subject::Command(kind) => kind.subject(),
        }
    }
}

fn parse_shard(s: &str) -> Result<u32, SubjectError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SubjectError::BadShard(truncate(s)));
    }
    s.parse().map_err(|_| SubjectError::BadShard(truncate(s)))
}

/// Input quoted in an error: escaped like `{:?}` (control characters visible), then cut to 200
/// bytes, so an error never grows with its input.
pub(crate) fn truncate(s: &str) -> String {
    let escaped: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    crate::text::truncate_with_ellipsis(&escaped, 200).into_owned()
}

/// `rooms.<guild>.<room>.<kind>`: where one room event is published.
pub fn room_event(guild: GuildId, room: RoomId, kind: EventKind) -> String {
    format!("{ROOMS_ROOT}.{guild}.{room}.{}", kind.as_str())
}

/// Subjects a consumer or an operator can subscribe to.
pub mod filter {
    use super::*;

    /// Every room event: `rooms.>`.
    pub fn all_rooms() -> String {
        format!("{ROOMS_ROOT}.>")
    }
    /// Every room event of one guild: `rooms.<guild>.>`.
    pub fn guild(guild: GuildId) -> String {
        format!("{ROOMS_ROOT}.{guild}.>")
    }
    /// Every event of one room: `rooms.<guild>.<room>.>`.
    pub fn room(guild: GuildId, room: RoomId) -> String {
        format!("{ROOMS_ROOT}.{guild}.{room}.>")
    }
    /// One kind of event in every room: `rooms.*.*.<kind>`.
    pub fn kind(kind: EventKind) -> String {
        format!("{ROOMS_ROOT}.*.*.{}", kind.as_str())
    }
    /// The republished live feed of one room: `live.rooms.<guild>.<room>.>`.
    pub fn live_room(guild: GuildId, room: RoomId) -> String {
        format!("{LIVE_PREFIX}.{}", self::room(guild, room))
    }
    /// The republished live feed of everything: `live.rooms.>`.
    pub fn live_all() -> String {
        format!("{LIVE_PREFIX}.{ROOMS_ROOT}.>")
    }
    /// Room events narrowed by any of guild, room and kind (a missing part matches anything):
    /// `rooms.<guild|*>.<room|*>.<kind|>>`. With nothing given it is `rooms.>`. Room ids are
    /// channel ids, unique across guilds, so a room without its guild still names one room.
    pub fn select(guild: Option<GuildId>, room: Option<RoomId>, kind: Option<EventKind>) -> String {
        if guild.is_none() && room.is_none() && kind.is_none() {
            return all_rooms();
        }
        let g = guild.map_or_else(|| "*".to_owned(), |g| g.to_string());
        let r = room.map_or_else(|| "*".to_owned(), |r| r.to_string());
        let k = kind.map_or(">", EventKind::as_str);
        format!("{ROOMS_ROOT}.{g}.{r}.{k}")
    }
    /// [`select`] on the republished live feed: `live.rooms.<guild|*>.<room|*>.<kind|>>`.
    pub fn select_live(
        guild: Option<GuildId>,
        room: Option<RoomId>,
        kind: Option<EventKind>,
    ) -> String {
        format!("{LIVE_PREFIX}.{}", select(guild, room, kind))
    }
    /// Every gateway status: `gateway.*.status`.
    pub fn gateway_status() -> String {
        "gateway.*.status".to_owned()
    }
    /// Every operator alert: `ops.alerts.>`.
    pub fn ops_alerts() -> String {
        "ops.alerts.>".to_owned()
    }
}

/// `gateway.<shard>.status`.
pub fn gateway_status(shard: u32) -> String {
    format!("gateway.{shard}.status")
}

/// `ops.alerts.<service>`.
pub fn ops_alert(service: &ServiceName) -> String {
    format!("ops.alerts.{}", service.as_str())
}

/// A service name usable as one subject token: 1–32 of `[a-z0-9-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn new(name: &str) -> Result<Self, SubjectError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_SERVICE_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(SubjectError::BadServiceName(truncate(name)))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Room-manager request/reply endpoints, `roommgr.v1.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    Create,
    Join,
    Leave,
    Close,
    Get,
    ListMine,
    RotateInvite,
}

impl CommandKind {
    pub const ALL: [CommandKind; 7] = [
        CommandKind::Create,
        CommandKind::Join,
        CommandKind::Leave,
        CommandKind::Close,
        CommandKind::Get,
        CommandKind::ListMine,
        CommandKind::RotateInvite,
    ];

    /// The endpoint name, the last subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Create => "create",
            CommandKind::Join => "join",
            CommandKind::Leave => "leave",
            CommandKind::Close => "close",
            CommandKind::Get => "get",
            CommandKind::ListMine => "list_mine",
            CommandKind::RotateInvite => "rotate_invite",
        }
    }

    pub fn parse(s: &str) -> Result<Self, SubjectError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| SubjectError::UnknownCommand(truncate(s)))
    }

    pub fn subject(self) -> String {
        format!("{COMMAND_PREFIX}.{}", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> GuildId {
        GuildId::new(111).unwrap()
    }
    fn r() -> RoomId {
        RoomId::new(222).unwrap()
    }

    #[test]
    fn every_subject_round_trips() {
        let mut subjects: Vec<Subject> = EventKind::ALL
            .iter()
            .flat_map(|&kind| {
                [
                    Subject::RoomEvent {
                        guild: g(),
                        room: r(),
                        kind,
                    },
                    Subject::LiveRoomEvent {
                        guild: g(),
                        room: r(),
                        kind,
                    },
                ]
            })
            .collect();
        subjects.push(Subject::GatewayStatus { shard: 3 });
        subjects.push(Subject::OpsAlert {
            service: ServiceName::new("gateway-listener").unwrap(),
        });
        subjects.extend(CommandKind::ALL.map(Subject::Command));
        for s in subjects {
            let rendered = s.render();
            assert_eq!(Subject::parse(&rendered).unwrap(), s, "{rendered}");
        }
    }

    #[test]
    fn room_event_subject_has_the_documented_shape() {
        assert_eq!(
            room_event(g(), r(), EventKind::VoiceJoined),
            "rooms.111.222.voice.joined"
        );
        assert_eq!(filter::room(g(), r()), "rooms.111.222.>");
        assert_eq!(filter::guild(g()), "rooms.111.>");
        assert_eq!(
            filter::kind(EventKind::RoomDeleted),
            "rooms.*.*.room.deleted"
        );
        assert_eq!(filter::live_room(g(), r()), "live.rooms.111.222.>");
        assert_eq!(CommandKind::ListMine.subject(), "roommgr.v1.list_mine");
    }

    #[test]
    fn selections_narrow_by_guild_room_and_kind() {
        assert_eq!(filter::select(None, None, None), "rooms.>");
        assert_eq!(filter::select(Some(g()), None, None), "rooms.111.*.>");
        assert_eq!(filter::select(None, Some(r()), None), "rooms.*.222.>");
        assert_eq!(
            filter::select(Some(g()), Some(r()), Some(EventKind::VoiceLeft)),
            "rooms.111.222.voice.left"
        );
        assert_eq!(
            filter::select(None, None, Some(EventKind::RoomDeleted)),
            "rooms.*.*.room.deleted"
        );
        assert_eq!(
            filter::select_live(None, Some(r()), None),
            "live.rooms.*.222.>"
        );
    }

    #[test]
    fn hostile_subjects_are_rejected_with_typed_errors() {
        assert!(matches!(
            Subject::parse("rooms.*.222.voice.joined"),
            Err(SubjectError::BadId(_))
        ));
        assert!(matches!(
            Subject::parse("rooms.111.>.voice.joined"),
            Err(SubjectError::BadId(_))
        ));
        assert!(matches!(
            Subject::parse("rooms.111.222.voice.exploded"),
            Err(SubjectError::UnknownKind(_))
        ));
        assert!(matches!(
            Subject::parse("rooms.111.222.voice"),
            Err(SubjectError::Unknown(_))
        ));
        assert!(matches!(
            Subject::parse("roommgr.v1.drop_tables"),
            Err(SubjectError::UnknownCommand(_))
        ));
        assert!(matches!(
            Subject::parse("gateway.99999999999.status"),
            Err(SubjectError::BadShard(_))
        ));
        assert!(matches!(
            Subject::parse("ops.alerts.Bad*Name"),
            Err(SubjectError::BadServiceName(_))
        ));
        assert!(ServiceName::new("").is_err());
        assert!(ServiceName::new(&"a".repeat(33)).is_err());
        assert!(matches!(Subject::parse(""), Err(SubjectError::Unknown(_))));
    }
}
