//! # voicerooms-contract
//!
//! The wire contract between gateway-listener, room-manager, edge and anyone tailing NATS. It is
//! serde only — no I/O — and it is the one place where a NATS subject is built or parsed.
//!
//! ## Layout
//! - [`ids`]: typed Discord snowflakes (`GuildId`, `ChannelId`, `UserId`, `RoleId`, `RoomId`),
//!   validated on parse so no id can inject subject tokens or overflow.
//! - [`subject`]: the subject scheme (`rooms.<guild>.<room>.<kind>`, `gateway.<shard>.status`,
//!   `ops.alerts.<service>`, `roommgr.v1.<command>`) and the stream / bucket names.
//! - [`event`]: the room event envelope and every event body (`voice.joined`, `voice.left`,
//!   `voice.updated`, `channel.*`, `room.*`).
//! - [`epoch`]: [`epoch::StreamEpoch`], the identity of the `ROOMS` stream (positions are
//!   (epoch, sequence) pairs: a recreated stream restarts its sequences).
//! - [`status`]: gateway status and operator alerts.
//! - [`command`]: room-manager's requests, replies and the stable [`command::ErrorCode`]s.
//! - [`wire`]: size limits, version check and validation shared by every decoder.
//! - [`text`]: cutting text to a byte budget on a character boundary (`String::truncate` and
//!   `&s[..n]` panic inside a multi-byte character: never use them on text from outside).
//!
//! Every decoder returns a typed [`wire::DecodeError`]; nothing here panics on input.

pub mod command;
pub mod epoch;
pub mod event;
pub mod ids;
pub mod status;
pub mod subject;
pub mod text;
pub mod wire;

pub use command::{ApiError, ErrorCode};
pub use epoch::StreamEpoch;
pub use event::{Event, EventKind, Millis, RoomEvent, UserRef};
pub use ids::{ChannelId, GuildId, RoleId, RoomId, UserId};
pub use wire::DecodeError;

/// Milliseconds since the Unix epoch, as every `*_at` field carries them.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}
