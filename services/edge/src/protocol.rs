//! The browser WebSocket protocol, version 1 (docs/WEBSOCKET.md).
//!
//! It keeps the original envelope — `{"v":1, "type", "event"?, "payload"?, "error"?, "ts"}` — and
//! adds per-room subscriptions, a per-room sequence on every event and resume-from-sequence.
//!
//! Client → server: `auth {session}`, `subscribe {room, since?, epoch?}`, `unsubscribe {room}`,
//! `ping`.
//! Server → client: `ack` (`auth.ok`, `subscribed`, `unsubscribed`, `pong`), `event`, `error`.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use voicerooms_contract::command::RoomView;
use voicerooms_contract::{ErrorCode, Millis, RoomEvent, RoomId, UserRef};

pub const VERSION: u16 = 1;

/// Close codes the server uses; clients act on them (docs/WEBSOCKET.md).
pub mod close {
    /// Normal closure (client asked, or unsubscribe-all then close).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down: reconnect (to any instance) with `since`.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame that breaks the WebSocket protocol (e.g. unmasked, bad opcode).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not valid UTF-8 (RFC 6455 §7.4.1).
    pub const INVALID_DATA: u16 = 1007;
    /// The outgoing queue passed its limit: the client was too slow. Reconnect with `since`.
    pub const SLOW_CONSUMER: u16 = 1008;
    /// A frame larger than the limit.
    pub const TOO_BIG: u16 = 1009;
    /// The edge cannot serve the connection right now (e.g. its session store is unreachable):
    /// reconnect after a backoff.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Not authenticated within the deadline, or authentication failed.
    pub const UNAUTHENTICATED: u16 = 4001;
    /// The session expired, could not be refreshed, or was ended (logout): log in again.
    pub const SESSION_EXPIRED: u16 = 4003;
    /// Too many connections (per user or per instance).
    pub const CONNECTION_LIMIT: u16 = 4008;
    /// The client stopped answering pings.
    pub const IDLE: u16 = 4009;
}

/// Why a client frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid JSON: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {0}; this server speaks 1")]
    Version(u64),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("invalid payload: {0}")]
    Payload(String),
}

/// Identity of the `ROOMS` stream the sequences belong to (its creation time). Sequences restart
/// when the stream is recreated, so a position is `(epoch, seq)`; on the wire the epoch is a
/// string of digits (JavaScript numbers cannot hold every `u64`).
pub type Epoch = voicerooms_contract::StreamEpoch;

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Auth {
        session: String,
    },
    /// `since` is the last sequence the client applied, `epoch` the stream it came from (from the
    /// `subscribed` ack). A `since` without the current epoch cannot be trusted: the client gets
    /// a snapshot.
    Subscribe {
        room: RoomId,
        since: Option<u64>,
        epoch: Option<Epoch>,
    },
    Unsubscribe {
        room: RoomId,
    },
    Ping,
}

#[derive(Deserialize)]
struct RawClientFrame {
    v: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthPayload {
    session: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribePayload {
    room: RoomId,
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomPayload {
    room: RoomId,
}

fn payload<T: serde::de::DeserializeOwned>(p: Option<serde_json::Value>) -> Result<T, FrameError> {
    let value = p.ok_or_else(|| FrameError::Payload("missing payload".into()))?;
    serde_json::from_value(value).map_err(|e| FrameError::Payload(truncate(e.to_string())))
}

/// Longest error message sent back (they may quote the client's input).
const MAX_ERROR_BYTES: usize = 200;

fn truncate(mut s: String) -> String {
    voicerooms_contract::text::truncate_string(&mut s, MAX_ERROR_BYTES);
    s
}

/// An epoch as the client sent it back.
fn parse_epoch(raw: &str) -> Result<Epoch, FrameError> {
    Epoch::parse(raw).map_err(|e| FrameError::Payload(format!("epoch: {e}")))
}

impl ClientMessage {
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        let raw: RawClientFrame = serde_json::from_str(text)
            .map_err(|e| FrameError::Malformed(truncate(e.to_string())))?;
        match raw.v {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
            Some(serde_json::Value::Number(n)) => {
                return Err(FrameError::Version(n.as_u64().unwrap_or(u64::MAX)))
            }
            _ => return Err(FrameError::Payload("`v` must be 1".into())),
        }
        match raw.kind.as_str() {
            "auth" => {
                let p: AuthPayload = payload(raw.payload)?;
                if p.session.is_empty() || p.session.len() > 512 {
                    return Err(FrameError::Payload("session must be 1-512 bytes".into()));
                }
                Ok(ClientMessage::Auth { session: p.session })
            }
            "subscribe" => {
                let p: SubscribePayload = payload(raw.payload)?;
                let epoch = p.epoch.as_deref().map(parse_epoch).transpose()?;
                Ok(ClientMessage::Subscribe {
                    room: p.room,
                    since: p.since,
                    epoch,
                })
            }
            "unsubscribe" => {
                let p: RoomPayload = payload(raw.payload)?;
                Ok(ClientMessage::Unsubscribe { room: p.room })
            }
            "ping" => Ok(ClientMessage::Ping),
            other => Err(FrameError::UnknownType(
                voicerooms_contract::text::truncate_str(other, 64).to_owned(),
            )),
        }
    }
}

/// An error as the client sees it: a stable code and a message.
#[derive(Debug, Clone, Serialize)]
pub struct WireError<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

#[derive(Serialize)]
struct AckFrame<'a, P: Serialize> {
    v: u16,
    #[serde(rename = "type")]
    kind: &'static str,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<RoomId>,
    payload: P,
    ts: Millis,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    v: u16,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<RoomId>,
    error: WireError<'a>,
    ts: Millis,
}

/// An event as the client sees it. Serialised once per event, shared by every recipient.
#[derive(Serialize)]
struct EventFrame<'a> {
    v: u16,
    #[serde(rename = "type")]
    kind: &'static str,
    event: &'static str,
    room: RoomId,
    guild: voicerooms_contract::GuildId,
    seq: u64,
    payload: &'a serde_json::Value,
    /// When our gateway (or room-manager) saw it; `ts - received_at` is our latency.
    received_at: Millis,
    #[serde(skip_serializing_if = "Option::is_none")]
    occurred_at: Option<Millis>,
    ts: Millis,
}

fn to_frame<T: Serialize>(value: &T) -> ByteString {
    ByteString::from(serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"v":1,"type":"error","error":{{"code":"internal","message":"encode: {e}"}}}}"#)
    }))
}

/// `ack` frame.
pub fn ack<P: Serialize>(event: &str, room: Option<RoomId>, payload: P) -> ByteString {
    to_frame(&AckFrame {
        v: VERSION,
        kind: "ack",
        event,
        room,
        payload,
        ts: voicerooms_contract::now_ms(),
    })
}

/// `error` frame with a stable code.
pub fn error(code: ErrorCode, message: &str, room: Option<RoomId>) -> ByteString {
    error_code(code.as_str(), message, room)
}

/// `error` frame with a protocol-level code (e.g. `invalid_frame`, `session_expired`).
pub fn error_code(code: &str, message: &str, room: Option<RoomId>) -> ByteString {
    to_frame(&ErrorFrame {
        v: VERSION,
        kind: "error",
        room,
        error: WireError { code, message },
        ts: voicerooms_contract::now_ms(),
    })
}

/// `event` frame for a room event with its sequence.
pub fn event(event: &RoomEvent, seq: u64, data: &serde_json::Value) -> ByteString {
    to_frame(&EventFrame {
        v: VERSION,
        kind: "event",
        event: event.kind().as_str(),
        room: event.room,
        guild: event.guild,
        seq,
        payload: data,
        received_at: event.received_at,
        occurred_at: event.occurred_at,
        ts: voicerooms_contract::now_ms(),
    })
}

/// The `data` object of an event, as JSON (the frame's payload).
pub fn event_data(event: &RoomEvent) -> serde_json::Value {
    serde_json::to_value(&event.event)
        .ok()
        .and_then(|mut v| v.get_mut("data").map(serde_json::Value::take))
        .unwrap_or(serde_json::Value::Null)
}

/// Payload of `ack auth.ok`.
#[derive(Serialize)]
pub struct AuthOk<'a> {
    pub user: &'a UserRef,
    pub session_expires_at: Millis,
}

/// Payload of `ack subscribed`.
#[derive(Serialize)]
pub struct Subscribed<'a> {
    /// True when every event after `since` follows; false when the client must replace its state
    /// with `snapshot` (its `since` was too old, too far behind, from another epoch, beyond the
    /// stream, or it gave none).
    pub recovered: bool,
    /// The room's state at `seq`, sent when not recovering from `since`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<&'a RoomView>,
    /// Events after this sequence follow, in order.
    pub seq: u64,
    /// The stream `seq` belongs to; send it back with `since`.
    pub epoch: Epoch,
    /// How many events are being replayed right after this ack.
    pub replayed: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse() {
        assert_eq!(
            ClientMessage::parse(r#"{"v":1,"type":"subscribe","payload":{"room":"42","since":7}}"#),
            Ok(ClientMessage::Subscribe {
                room: RoomId::new(42).unwrap(),
                since: Some(7),
                epoch: None,
            })
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"v":1,"type":"subscribe","payload":{"room":"42","since":7,"epoch":"1764100000123456789"}}"#
            ),
            Ok(ClientMessage::Subscribe {
                room: RoomId::new(42).unwrap(),
                since: Some(7),
                epoch: Some(Epoch::from_unix_nanos(1_764_100_000_123_456_789)),
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"v":1,"type":"auth","payload":{"session":"abc"}}"#),
            Ok(ClientMessage::Auth {
                session: "abc".into()
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"v":1,"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        );
    }

    #[test]
    fn bad_client_frames_give_typed_errors() {
        assert!(matches!(
            ClientMessage::parse("{"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"v":2,"type":"ping"}"#),
            Err(FrameError::Version(2))
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"ping"}"#),
            Err(FrameError::Payload(_))
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"v":1,"type":"explode"}"#),
            Err(FrameError::UnknownType(_))
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"v":1,"type":"subscribe","payload":{"room":"1.>"}}"#),
            Err(FrameError::Payload(_))
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"v":1,"type":"subscribe","payload":{"room":"1","since":-1}}"#),
            Err(FrameError::Payload(_))
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"v":1,"type":"subscribe"}"#),
            Err(FrameError::Payload(_))
        ));
        for epoch in [
            r#""""#,
            r#""-1""#,
            r#""1e3""#,
            r#""99999999999999999999""#,
            "7",
        ] {
            let frame = format!(
                r#"{{"v":1,"type":"subscribe","payload":{{"room":"1","since":1,"epoch":{epoch}}}}}"#
            );
            assert!(
                matches!(ClientMessage::parse(&frame), Err(FrameError::Payload(_))),
                "{frame}"
            );
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        /// Error frames quote the client's input; they must stay small whatever it is.
        const MAX_MESSAGE: usize = 300;

        /// Text of every width: ASCII, 2-, 3- and 4-byte characters, controls, quotes.
        fn any_text() -> impl Strategy<Value = String> {
            let ch = prop_oneof![
                proptest::char::range(' ', '~'),
                Just('é'),
                Just('€'),
                Just('😀'),
                Just('\u{1D4D0}'),
                Just('"'),
                Just('\\'),
                Just('\u{0}'),
                any::<char>(),
            ];
            proptest::collection::vec(ch, 0..300).prop_map(|c| c.into_iter().collect())
        }

        /// Any JSON value, nested a few levels, with the protocol's words and hostile numbers.
        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<u64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|n| json!(n)),
                Just(json!(u64::MAX)),
                Just(json!(-1)),
                Just(json!(1e300)),
                prop_oneof![
                    Just("auth"),
                    Just("subscribe"),
                    Just("unsubscribe"),
                    Just("ping"),
                    Just("1"),
                    Just("18446744073709551615"),
                    Just("18446744073709551616"),
                    Just("1.>"),
                ]
                .prop_map(|s| json!(s)),
                any_text().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("v".to_owned()),
                            Just("type".to_owned()),
                            Just("payload".to_owned()),
                            Just("room".to_owned()),
                            Just("since".to_owned()),
                            Just("epoch".to_owned()),
                            Just("session".to_owned()),
                            any_text(),
                        ],
                        inner,
                        0..6
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn check(text: &str) {
            if let Err(e) = ClientMessage::parse(text) {
                let message = e.to_string();
                assert!(
                    message.len() <= MAX_MESSAGE,
                    "{} bytes: {message}",
                    message.len()
                );
                // What the client gets back is valid JSON whatever the message holds.
                let frame = error_code("invalid_frame", &message, None);
                let _: Value = serde_json::from_str(&frame).unwrap();
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_text_never_panics_and_errors_stay_small(text in any_text()) {
                check(&text);
            }

            #[test]
            fn arbitrary_json_never_panics_and_errors_stay_small(value in any_json()) {
                check(&value.to_string());
            }

            #[test]
            fn frames_with_hostile_payloads_never_panic(
                kind in prop_oneof![Just("auth"), Just("subscribe"), Just("unsubscribe"), Just("ping")],
                payload in any_json(),
            ) {
                check(&json!({"v": 1, "type": kind, "payload": payload}).to_string());
            }

            #[test]
            fn deep_nesting_is_an_error_not_a_stack_overflow(depth in 1usize..2_000) {
                let text = format!(
                    r#"{{"v":1,"type":"subscribe","payload":{}{}}}"#,
                    "[".repeat(depth),
                    "]".repeat(depth)
                );
                check(&text);
            }

            #[test]
            fn valid_subscribes_round_trip(
                room in 1..=u64::MAX,
                since in proptest::option::of(any::<u64>()),
                epoch in proptest::option::of(any::<u64>()),
            ) {
                let mut payload = serde_json::Map::new();
                payload.insert("room".into(), json!(room.to_string()));
                if let Some(since) = since {
                    payload.insert("since".into(), json!(since));
                }
                if let Some(epoch) = epoch {
                    payload.insert("epoch".into(), json!(epoch.to_string()));
                }
                let text = json!({"v": 1, "type": "subscribe", "payload": payload}).to_string();
                prop_assert_eq!(
                    ClientMessage::parse(&text),
                    Ok(ClientMessage::Subscribe {
                        room: RoomId::new(room).unwrap(),
                        since,
                        epoch: epoch.map(Epoch::from_unix_nanos),
                    })
                );
            }

            #[test]
            fn valid_auths_round_trip(session in "[A-Za-z0-9%=._-]{1,512}") {
                let text = json!({"v": 1, "type": "auth", "payload": {"session": session}}).to_string();
                prop_assert_eq!(ClientMessage::parse(&text), Ok(ClientMessage::Auth { session }));
            }
        }
    }
}
