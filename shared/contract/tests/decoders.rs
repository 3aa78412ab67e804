//! Property tests over every decoder of the contract: what arrives on NATS (room events, commands,
//! replies, gateway status, operator alerts), subjects and ids.
//!
//! For each decoder: arbitrary bytes, arbitrary JSON values, and mutations of valid payloads never
//! panic and give a typed error of bounded size; every valid value round-trips through its
//! encoding unchanged.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

use proptest::prelude::*;
use proptest::sample::select;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use voicerooms_contract::command::{
    self, ApiError, CreateRoom, Created, Done, ErrorCode, Invite, JoinRoom, Joined, ListMine,
    Placement, RoomCommand, RoomList, RoomMember, RoomState, RoomView, VoiceOccupant,
};
use voicerooms_contract::epoch::StreamEpoch;
use voicerooms_contract::event::{
    ChannelDeleted, ChannelUpdated, CloseReason, Event, EventKind, JoinedVia, RemovedReason,
    RoomClosing, RoomClosingCancelled, RoomCreated, RoomDeleted, RoomEvent, RoomMemberAdded,
    RoomMemberRemoved, UserRef, VoiceFlag, VoiceFlags, VoiceJoined, VoiceLeft, VoiceUpdated,
};
use voicerooms_contract::ids::{ChannelId, GuildId, Id, RoleId, Snowflake, UserId};
use voicerooms_contract::status::{GatewayState, GatewayStatus, OperatorAlert, Severity};
use voicerooms_contract::subject::{CommandKind, ServiceName, Subject};
use voicerooms_contract::wire::{DecodeError, Validate, MAX_MESSAGE_BYTES};

/// No error message may grow with the input: they end up in logs and replies.
const MAX_ERROR_BYTES: usize = 1024;

// ---- strategies for valid values ----

fn id<M: 'static>() -> impl Strategy<Value = Id<M>> {
    (1..=u64::MAX).prop_map(|v| Id::new(v).unwrap())
}

/// Human text as `check_text` accepts it: no control characters, any script, 1..=`max` chars.
fn text(max: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        proptest::char::range(' ', '~'),
        any::<char>().prop_map(|c| if c.is_control() { '\u{fffd}' } else { c }),
    ];
    proptest::collection::vec(ch, 1..=max).prop_map(|chars| chars.into_iter().collect())
}

/// A name that is not only white space.
fn name(max: usize) -> impl Strategy<Value = String> {
    text(max).prop_filter("not blank", |s| !s.trim().is_empty())
}

/// An opaque token as `check_token` accepts it.
fn token(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9_.:-]{{1,{max}}}")).unwrap()
}

fn user() -> impl Strategy<Value = UserRef> {
    (
        id::<voicerooms_contract::ids::marker::User>(),
        text(32),
        proptest::option::of(text(32)),
        proptest::option::of(token(64)),
    )
        .prop_map(|(id, username, global_name, avatar)| UserRef {
            id,
            username,
            global_name,
            avatar,
        })
}

fn flags() -> impl Strategy<Value = VoiceFlags> {
    any::<[bool; 7]>().prop_map(|b| VoiceFlags {
        mute: b[0],
        deaf: b[1],
        self_mute: b[2],
        self_deaf: b[3],
        self_stream: b[4],
        self_video: b[5],
        suppress: b[6],
    })
}

fn changed() -> impl Strategy<Value = Vec<VoiceFlag>> {
    proptest::collection::vec(
        select(vec![
            VoiceFlag::Mute,
            VoiceFlag::Deaf,
            VoiceFlag::SelfMute,
            VoiceFlag::SelfDeaf,
            VoiceFlag::SelfStream,
            VoiceFlag::SelfVideo,
            VoiceFlag::Suppress,
        ]),
        1..=7,
    )
}

fn close_reason() -> impl Strategy<Value = CloseReason> {
    select(vec![
        CloseReason::Idle,
        CloseReason::Owner,
        CloseReason::ChannelDeleted,
    ])
}

fn via() -> impl Strategy<Value = JoinedVia> {
    select(vec![JoinedVia::Owner, JoinedVia::Invite])
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (user(), flags(), proptest::option::of(id())).prop_map(|(user, flags, moved_from)| {
            Event::VoiceJoined(VoiceJoined {
                user,
                flags,
                moved_from,
            })
        }),
        (user(), proptest::option::of(id()))
            .prop_map(|(user, moved_to)| Event::VoiceLeft(VoiceLeft { user, moved_to })),
        (user(), flags(), changed()).prop_map(|(user, flags, changed)| {
            Event::VoiceUpdated(VoiceUpdated {
                user,
                flags,
                changed,
            })
        }),
        (text(100), proptest::option::of(any::<u16>())).prop_map(|(name, user_limit)| {
            Event::ChannelUpdated(ChannelUpdated { name, user_limit })
        }),
        Just(Event::ChannelDeleted(ChannelDeleted {})),
        (text(100), user(), id(), 1..=99u8, any::<u64>()).prop_map(
            |(name, owner, role, capacity, invite_expires_at)| {
                Event::RoomCreated(RoomCreated {
                    name,
                    owner,
                    role,
                    capacity,
                    invite_expires_at,
                })
            }
        ),
        (user(), via())
            .prop_map(|(user, via)| Event::RoomMemberAdded(RoomMemberAdded { user, via })),
        (
            user(),
            select(vec![RemovedReason::Left, RemovedReason::Removed])
        )
            .prop_map(
                |(user, reason)| Event::RoomMemberRemoved(RoomMemberRemoved { user, reason })
            ),
        (any::<u64>(), close_reason())
            .prop_map(|(deadline, reason)| Event::RoomClosing(RoomClosing { deadline, reason })),
        proptest::option::of(user())
            .prop_map(|by| Event::RoomClosingCancelled(RoomClosingCancelled { by })),
        close_reason().prop_map(|reason| Event::RoomDeleted(RoomDeleted { reason })),
    ]
}

prop_compose! {
    fn room_event()(
        guild in id(),
        room in id(),
        seq in proptest::option::of(any::<u64>()),
        occurred_at in proptest::option::of(any::<u64>()),
        received_at in any::<u64>(),
        published_at in any::<u64>(),
        traceparent in proptest::option::of(token(128)),
        event_id in proptest::option::of(token(200)),
        event in event(),
    ) -> RoomEvent {
        let mut e = RoomEvent::new(guild, room, received_at, event);
        e.seq = seq;
        e.occurred_at = occurred_at;
        e.published_at = published_at;
        e.traceparent = traceparent;
        e.id = event_id;
        e
    }
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    select(ErrorCode::ALL.to_vec())
}

fn api_error() -> impl Strategy<Value = ApiError> {
    (error_code(), ".{0,200}", proptest::option::of(any::<u64>())).prop_map(
        |(code, message, retry_after_ms)| ApiError {
            code,
            message,
            retry_after_ms,
        },
    )
}

fn room_view() -> impl Strategy<Value = RoomView> {
    (
        (id(), id(), name(100), user(), id(), any::<u8>()),
        select(vec![
            RoomState::Creating,
            RoomState::Open,
            RoomState::Closing,
            RoomState::Deleting,
        ]),
        proptest::collection::vec(
            (user(), via(), any::<u64>()).prop_map(|(user, via, joined_at)| RoomMember {
                user,
                via,
                joined_at,
            }),
            0..4,
        ),
        proptest::collection::vec(
            (user(), flags(), any::<bool>()).prop_map(|(user, flags, member)| VoiceOccupant {
                user,
                flags,
                member,
            }),
            0..4,
        ),
        any::<[u64; 4]>(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |((id, guild, name, owner, role, capacity), state, members, voice, times, deadline)| {
                RoomView {
                    id,
                    guild,
                    name,
                    owner,
                    role,
                    capacity,
                    state,
                    members,
                    voice,
                    created_at: times[0],
                    last_activity: times[1],
                    invite_expires_at: times[2],
                    closing_deadline: deadline,
                    seq: times[3],
                }
            },
        )
}

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![
        id().prop_map(|channel| Placement::Moved { channel }),
        id().prop_map(|channel| Placement::AlreadyThere { channel }),
        (id(), ".{0,100}", any::<u64>()).prop_map(|(channel, channel_url, expires_at)| {
            Placement::Pending {
                channel,
                channel_url,
                expires_at,
            }
        }),
        (error_code(), ".{0,100}").prop_map(|(code, message)| Placement::Failed { code, message }),
    ]
}

fn invite() -> impl Strategy<Value = Invite> {
    (token(400), any::<u64>()).prop_map(|(token, expires_at)| Invite { token, expires_at })
}

fn gateway_state() -> impl Strategy<Value = GatewayState> {
    select(GatewayState::ALL.to_vec())
}

prop_compose! {
    fn gateway_status()(
        shard_count in 1..=u32::MAX,
        shard_seed in any::<u32>(),
        state in gateway_state(),
        attempts in any::<u32>(),
        resumable in any::<bool>(),
        instance in token(128),
        at in any::<u64>(),
        detail in proptest::option::of(prop_oneof![Just(String::new()), text(500)]),
    ) -> GatewayStatus {
        GatewayStatus {
            v: 1,
            shard: shard_seed % shard_count,
            shard_count,
            state,
            attempts,
            resumable,
            instance,
            at,
            detail,
        }
    }
}

prop_compose! {
    fn operator_alert()(
        service in "[a-z0-9-]{1,32}",
        instance in token(128),
        severity in select(vec![Severity::Warning, Severity::Critical, Severity::Resolved]),
        code in token(64),
        message in text(500),
        at in any::<u64>(),
    ) -> OperatorAlert {
        OperatorAlert { v: 1, service, instance, severity, code, message, at }
    }
}

fn subject() -> impl Strategy<Value = Subject> {
    let kind = select(EventKind::ALL.to_vec());
    prop_oneof![
        (id(), id(), kind.clone()).prop_map(|(guild, room, kind)| Subject::RoomEvent {
            guild,
            room,
            kind
        }),
        (id(), id(), kind).prop_map(|(guild, room, kind)| Subject::LiveRoomEvent {
            guild,
            room,
            kind
        }),
        // Shard ids travel in one subject token of at most 5 digits.
        (0..=99_999u32).prop_map(|shard| Subject::GatewayStatus { shard }),
        "[a-z0-9-]{1,32}".prop_map(|s| Subject::OpsAlert {
            service: ServiceName::new(&s).unwrap()
        }),
        select(CommandKind::ALL.to_vec()).prop_map(Subject::Command),
    ]
}

// ---- strategies for hostile input ----

/// Arbitrary JSON, with keys from the contract's vocabulary often enough to get past the outer
/// layers, numbers beyond every integer type, and text of every width.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        select(vec![
            "v",
            "kind",
            "data",
            "guild",
            "room",
            "seq",
            "user",
            "id",
            "username",
            "requester",
            "name",
            "invite",
            "ok",
            "error",
            "code",
            "message",
            "shard",
            "shard_count",
            "state",
            "instance",
            "service",
            "severity",
            "flags",
            "changed",
            "capacity",
            "members",
            "voice",
            "placement",
            "reason",
            "deadline",
            "received_at",
            "published_at",
        ])
        .prop_map(str::to_owned),
        ".{0,12}",
    ];
    let number = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(serde_json::from_str::<Value>("1e308").unwrap()),
        Just(Value::from(1u64)),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number,
        ".{0,40}".prop_map(Value::from),
        "[0-9]{1,25}".prop_map(Value::from),
        select(vec![
            "voice.joined",
            "room.deleted",
            "open",
            "owner",
            "validation"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid payload with a few bytes changed, cut or inserted (multi-byte text included).
fn mutate(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = bytes.len().max(1);
    let edit = prop_oneof![
        (0..len, any::<u8>()).prop_map(|(i, b)| (0u8, i, vec![b])),
        (0..len).prop_map(|i| (1u8, i, Vec::new())),
        (
            0..len,
            select(vec![
                "\u{e9}",
                "\u{1d4d0}",
                "\"",
                "\\",
                "{",
                "]",
                "9999999999999999999999"
            ])
        )
            .prop_map(|(i, s)| (2u8, i, s.as_bytes().to_vec())),
    ];
    proptest::collection::vec(edit, 1..4).prop_map(move |edits| {
        let mut out = bytes.clone();
        for (op, i, data) in edits {
            let i = i.min(out.len());
            match op {
                0 if i < out.len() => out[i] = data[0],
                1 => out.truncate(i),
                _ => {
                    out.splice(i..i, data);
                }
            }
        }
        out
    })
}

// ---- what every decoder must do ----

/// Runs every decoder on `bytes` (and `subject`); each must return, with a bounded error.
fn decode_everything(subject: &str, bytes: &[u8]) {
    fn bounded<T>(what: &str, result: Result<T, impl std::fmt::Display>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.len() <= MAX_ERROR_BYTES,
                    "{what}: an error of {} bytes: {message}",
                    message.len()
                );
                None
            }
        }
    }
    if let Some(event) = bounded("RoomEvent::decode", RoomEvent::decode(bytes)) {
        // What decodes is valid and encodes to something that decodes to the same value.
        assert_eq!(RoomEvent::decode(&event.encode()).unwrap(), event);
    }
    bounded("RoomEvent::decode_on", RoomEvent::decode_on(subject, bytes));
    bounded(
        "decode_command::<CreateRoom>",
        command::decode_command::<CreateRoom>(bytes),
    );
    bounded(
        "decode_command::<JoinRoom>",
        command::decode_command::<JoinRoom>(bytes),
    );
    bounded(
        "decode_command::<RoomCommand>",
        command::decode_command::<RoomCommand>(bytes),
    );
    bounded(
        "decode_command::<ListMine>",
        command::decode_command::<ListMine>(bytes),
    );
    bounded(
        "decode_reply::<Created>",
        command::decode_reply::<Created>(bytes),
    );
    bounded(
        "decode_reply::<Joined>",
        command::decode_reply::<Joined>(bytes),
    );
    bounded(
        "decode_reply::<RoomView>",
        command::decode_reply::<RoomView>(bytes),
    );
    bounded(
        "decode_reply::<RoomList>",
        command::decode_reply::<RoomList>(bytes),
    );
    bounded(
        "decode_reply::<Invite>",
        command::decode_reply::<Invite>(bytes),
    );
    bounded("decode_reply::<Done>", command::decode_reply::<Done>(bytes));
    bounded("GatewayStatus::decode", GatewayStatus::decode(bytes));
    bounded("OperatorAlert::decode", OperatorAlert::decode(bytes));
    // The KV value of a room (read by the edge) and a player's token (read by room-manager) are
    // read with plain serde: they must fail without a panic (serde's own messages quote input,
    // so their length is not bounded here; the versioned decoders above cut them).
    let _ = serde_json::from_slice::<RoomView>(bytes);
    let _ = serde_json::from_slice::<command::UserToken>(bytes);
    let text = String::from_utf8_lossy(bytes);
    if let Some(parsed) = bounded("Subject::parse", Subject::parse(&text)) {
        assert_eq!(Subject::parse(&parsed.render()).unwrap(), parsed);
    }
    bounded("Subject::parse(subject)", Subject::parse(subject));
    bounded("EventKind::parse", EventKind::parse(&text));
    bounded("CommandKind::parse", CommandKind::parse(&text));
    bounded("ServiceName::new", ServiceName::new(&text));
    bounded("Snowflake::parse", Snowflake::parse(&text));
    bounded("GuildId::parse", GuildId::parse(&text));
    bounded("StreamEpoch::parse", StreamEpoch::parse(&text));
    bounded(
        "StreamEpoch (JSON)",
        serde_json::from_slice::<StreamEpoch>(bytes),
    );
}

fn any_subject() -> impl Strategy<Value = String> {
    prop_oneof![
        subject().prop_map(|s| s.render()),
        ".{0,80}",
        "(rooms|live|gateway|ops|roommgr)(\\.[^.]{0,22}){0,6}",
    ]
}

fn command_round_trip<T: Serialize + DeserializeOwned + Validate + PartialEq + std::fmt::Debug>(
    value: &T,
) {
    let bytes = serde_json::to_vec(value).unwrap();
    assert_eq!(&command::decode_command::<T>(&bytes).unwrap(), value);
}

fn reply_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + Clone>(
    value: &T,
) {
    let bytes = command::encode_reply::<T>(&Ok(value.clone()));
    assert_eq!(&command::decode_reply::<T>(&bytes).unwrap(), value);
}

proptest! {
    // 512 cases a property by default (PROPTEST_CASES overrides); a failure prints its minimal
    // input, nothing is written to the source tree.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(subject in any_subject(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&subject, &bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(subject in any_subject(), value in json()) {
        decode_everything(&subject, &serde_json::to_vec(&value).unwrap());
        // The same value as a versioned envelope of each kind, to reach the inner decoders.
        let mut with_version = value.clone();
        if let Value::Object(map) = &mut with_version {
            map.insert("v".into(), Value::from(1));
            decode_everything(&subject, &serde_json::to_vec(&with_version).unwrap());
        }
        for kind in ["ok", "error", "data"] {
            let wrapped = serde_json::json!({"v": 1, kind: value.clone()});
            decode_everything(&subject, &serde_json::to_vec(&wrapped).unwrap());
        }
    }

    #[test]
    fn mutated_events_never_panic(
        bytes in room_event().prop_flat_map(|e| mutate(e.encode())),
        subject in any_subject(),
    ) {
        decode_everything(&subject, &bytes);
    }

    #[test]
    fn mutated_replies_and_statuses_never_panic(
        bytes in prop_oneof![
            room_view().prop_flat_map(|v| mutate(command::encode_reply::<RoomView>(&Ok(v)))),
            gateway_status().prop_flat_map(|s| mutate(s.encode())),
            operator_alert().prop_flat_map(|a| mutate(a.encode())),
        ],
    ) {
        decode_everything("rooms.1.2.voice.joined", &bytes);
    }

    #[test]
    fn every_valid_event_round_trips_on_its_subject(event in room_event()) {
        let bytes = event.encode();
        prop_assert!(bytes.len() <= MAX_MESSAGE_BYTES);
        prop_assert_eq!(&RoomEvent::decode(&bytes).unwrap(), &event);
        prop_assert_eq!(&RoomEvent::decode_on(&event.subject(), &bytes).unwrap(), &event);
        let live = format!("live.{}", event.subject());
        prop_assert_eq!(&RoomEvent::decode_on(&live, &bytes).unwrap(), &event);
    }

    #[test]
    fn every_valid_command_round_trips(
        requester in user(),
        guild in id(),
        name in name(100),
        key in proptest::option::of(token(64)),
        invite in token(2048),
        room in id(),
        link_room in proptest::option::of(id()),
    ) {
        command_round_trip(&CreateRoom { requester: requester.clone(), guild, name, idempotency_key: key });
        command_round_trip(&JoinRoom { requester: requester.clone(), invite, room: link_room });
        command_round_trip(&RoomCommand { requester: requester.clone(), room });
        command_round_trip(&ListMine { requester });
    }

    #[test]
    fn every_valid_reply_round_trips(
        view in room_view(),
        invite in invite(),
        placement in placement(),
        error in api_error(),
    ) {
        reply_round_trip(&view);
        reply_round_trip(&Created { room: view.clone(), invite: invite.clone(), placement: placement.clone() });
        reply_round_trip(&Joined { room: view.clone(), placement });
        reply_round_trip(&RoomList { rooms: vec![view] });
        reply_round_trip(&invite);
        reply_round_trip(&Done {});
        let bytes = command::encode_reply::<Done>(&Err(error.clone()));
        prop_assert_eq!(command::decode_reply::<Done>(&bytes).unwrap_err(), error);
    }

    #[test]
    fn every_valid_status_and_alert_round_trips(status in gateway_status(), alert in operator_alert()) {
        prop_assert_eq!(GatewayStatus::decode(&status.encode()).unwrap(), status);
        prop_assert_eq!(OperatorAlert::decode(&alert.encode()).unwrap(), alert.clone());
        prop_assert!(alert.subject().is_ok());
    }

    #[test]
    fn every_subject_id_and_epoch_round_trips(
        subject in subject(),
        raw in 1..=u64::MAX,
        nanos in any::<u64>(),
    ) {
        prop_assert_eq!(&Subject::parse(&subject.render()).unwrap(), &subject);
        let guild = GuildId::new(raw).unwrap();
        prop_assert_eq!(GuildId::parse(&guild.to_string()).unwrap(), guild);
        let json = serde_json::to_string(&UserId::new(raw).unwrap()).unwrap();
        prop_assert_eq!(serde_json::from_str::<UserId>(&json).unwrap().get(), raw);
        prop_assert_eq!(RoleId::new(raw).unwrap().get(), ChannelId::new(raw).unwrap().get());
        let epoch = StreamEpoch::from_unix_nanos(nanos);
        prop_assert_eq!(StreamEpoch::parse(&epoch.to_string()).unwrap(), epoch);
        let json = serde_json::to_string(&epoch).unwrap();
        prop_assert_eq!(serde_json::from_str::<StreamEpoch>(&json).unwrap(), epoch);
    }

    #[test]
    fn text_of_every_width_at_every_length_is_an_error_or_a_value(
        ch in select(vec!["a", "\u{e9}", "\u{20ac}", "\u{1d4d0}", "\u{0}", "\u{7f}"]),
        n in 0..400usize,
        field in select(vec!["username", "name", "invite", "instance", "message", "v", "guild"]),
    ) {
        let s = ch.repeat(n);
        let event = serde_json::json!({
            "v": 1, "guild": "1", "room": "2", "received_at": 1, "published_at": 1,
            "kind": "voice.left", "data": {"user": {"id": "3", field: s}},
        });
        decode_everything("rooms.1.2.voice.left", &serde_json::to_vec(&event).unwrap());
        let command = serde_json::json!({"requester": {"id": "3", "username": "u"}, field: s});
        decode_everything("roommgr.v1.create", &serde_json::to_vec(&command).unwrap());
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [127, 128, 129, 1_000, MAX_MESSAGE_BYTES / 2] {
        let open = "[".repeat(depth);
        let close = "]".repeat(depth);
        decode_everything("rooms.1.2.voice.left", format!("{open}{close}").as_bytes());
        let nested = format!("{{\"v\":1,\"data\":{}1{}}}", "[".repeat(depth), close);
        decode_everything("rooms.1.2.voice.left", nested.as_bytes());
        let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        decode_everything("rooms.1.2.voice.left", objects.as_bytes());
    }
}

#[test]
fn oversized_and_overflowing_messages_get_typed_errors() {
    let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
    assert!(matches!(
        RoomEvent::decode(&big),
        Err(DecodeError::TooLarge { .. })
    ));
    for v in [
        "18446744073709551616",
        "-1",
        "1e400",
        "1.5",
        "\"1\"",
        "null",
    ] {
        let body = format!("{{\"v\":{v}}}");
        assert!(RoomEvent::decode(body.as_bytes()).is_err(), "{v}");
    }
    let seq = br#"{"v":1,"guild":"1","room":"2","seq":18446744073709551616,"received_at":1,"published_at":1,"kind":"room.deleted","data":{"reason":"idle"}}"#;
    assert!(matches!(
        RoomEvent::decode(seq),
        Err(DecodeError::Malformed(_))
    ));
}
