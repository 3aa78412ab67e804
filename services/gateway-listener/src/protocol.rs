//! Discord Gateway v10 (JSON) as this service speaks it: the payload envelope, the commands it
//! sends and what each close code means for the connection policy.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Gateway API version in the connection URL.
pub const API_VERSION: u8 = 10;
/// GUILDS (1 << 0) and GUILD_VOICE_STATES (1 << 7).
pub const INTENTS: u64 = 1 | (1 << 7);

pub mod op {
    pub const DISPATCH: u8 = 0;
    pub const HEARTBEAT: u8 = 1;
    pub const IDENTIFY: u8 = 2;
    pub const RESUME: u8 = 6;
    pub const RECONNECT: u8 = 7;
    pub const INVALID_SESSION: u8 = 9;
    pub const HELLO: u8 = 10;
    pub const HEARTBEAT_ACK: u8 = 11;
}

/// The close code we use for our own closes when we intend to resume: anything but 1000/1001
/// (which would end the session on Discord's side).
pub const RESUMABLE_CLOSE: u16 = 4000;

/// A received gateway payload: `d` is kept raw and decoded only for the events we use.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    pub op: u8,
    #[serde(borrow, default)]
    pub d: Option<&'a RawValue>,
    #[serde(default)]
    pub s: Option<u64>,
    #[serde(default)]
    pub t: Option<&'a str>,
}

/// Why a payload from Discord was rejected. Never fatal for the connection loop by itself.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed gateway payload: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("gateway payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("op {0} without the data it needs")]
    MissingData(u8),
    #[error("binary frames are not supported (no compression requested)")]
    Binary,
}

pub fn decode(text: &str, max_bytes: usize) -> Result<Frame<'_>, ProtocolError> {
    if text.len() > max_bytes {
        return Err(ProtocolError::TooLarge(text.len()));
    }
    Ok(serde_json::from_str(text)?)
}

#[derive(Debug, Deserialize)]
pub struct Hello {
    pub heartbeat_interval: u64,
}

/// The fields of READY we keep (serenity's `Ready` needs the full application object; we only
/// need the session).
#[derive(Debug, Deserialize)]
pub struct ReadyInfo {
    pub session_id: String,
    pub resume_gateway_url: String,
    #[serde(default)]
    pub guilds: Vec<serde_json::Value>,
}

/// `GET /gateway/bot`.
#[derive(Debug, Clone, Deserialize)]
pub struct GatewayBot {
    pub url: String,
    /// Discord's recommended shard count.
    #[serde(default = "one_u32")]
    pub shards: u32,
    #[serde(default)]
    pub session_start_limit: Option<SessionStartLimit>,
}

fn one_u32() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
pub struct SessionStartLimit {
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub reset_after: u64,
    #[serde(default = "one")]
    pub max_concurrency: u64,
}

fn one() -> u64 {
    1
}

#[derive(Serialize)]
struct Out<T> {
    op: u8,
    d: T,
}

pub fn heartbeat(seq: Option<u64>) -> String {
    serde_json::json!({"op": op::HEARTBEAT, "d": seq}).to_string()
}

/// IDENTIFY. The token is written straight into the payload and never logged.
pub fn identify(token: &str, shard: [u32; 2]) -> String {
    serde_json::to_string(&Out {
        op: op::IDENTIFY,
        d: serde_json::json!({
            "token": token,
            "intents": INTENTS,
            "shard": shard,
            "properties": {"os": std::env::consts::OS, "browser": "voicerooms", "device": "voicerooms"},
        }),
    })
    .unwrap_or_default()
}

pub fn resume(token: &str, session_id: &str, seq: u64) -> String {
    serde_json::to_string(&Out {
        op: op::RESUME,
        d: serde_json::json!({"token": token, "session_id": session_id, "seq": seq}),
    })
    .unwrap_or_default()
}

/// `wss://host` → `wss://host/?v=10&encoding=json` (keeps a path, replaces any query).
pub fn connect_url(base: &str) -> String {
    let base = base.split('?').next().unwrap_or(base).trim_end_matches('/');
    format!("{base}/?v={API_VERSION}&encoding=json")
}

/// What to do after the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Reconnect on `resume_gateway_url` and RESUME the session.
    Resume,
    /// Start a new session: IDENTIFY on the cached gateway URL.
    Reidentify,
    /// Never reconnect (bad token, bad shard, disallowed intents, bad version).
    Stop,
}

/// Discord's close-code table ("Reconnect" column), for a close code sent by the gateway.
/// `None` is a connection dropped without a close frame: resume.
pub fn after_close(code: Option<u16>) -> NextStep {
    match code {
        None => NextStep::Resume,
        Some(4004 | 4010 | 4011 | 4012 | 4013 | 4014) => NextStep::Stop,
        // Invalid sequence and session timed out: the session is gone.
        Some(4007 | 4009) => NextStep::Reidentify,
        Some(_) => NextStep::Resume,
    }
}

/// A human explanation for a fatal close code (logs and the operator alert).
pub fn fatal_reason(code: u16) -> &'static str {
    match code {
        4004 => "authentication failed: the bot token is wrong or was reset",
        4010 => "invalid shard: check gateway.shard_id and gateway.shard_count",
        4011 => "sharding required: the bot is in too many guilds for one shard",
        4012 => "invalid API version",
        4013 => "invalid intents",
        4014 => "disallowed intents: enable them for the application in the developer portal",
        _ => "fatal close",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_to_discords_reconnect_column() {
        assert_eq!(after_close(None), NextStep::Resume);
        for code in [1006, 4000, 4001, 4002, 4003, 4005, 4008] {
            assert_eq!(after_close(Some(code)), NextStep::Resume, "{code}");
        }
        assert_eq!(after_close(Some(4007)), NextStep::Reidentify);
        assert_eq!(after_close(Some(4009)), NextStep::Reidentify);
        for code in [4004, 4010, 4011, 4012, 4013, 4014] {
            assert_eq!(after_close(Some(code)), NextStep::Stop, "{code}");
        }
    }

    #[test]
    fn frames_decode_and_bad_ones_are_typed_errors() {
        let f = decode(r#"{"op":0,"s":3,"t":"X","d":{"a":1}}"#, 4096).unwrap();
        assert_eq!((f.op, f.s, f.t), (0, Some(3), Some("X")));
        assert!(matches!(
            decode("{", 4096),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode(&"x".repeat(5000), 4096),
            Err(ProtocolError::TooLarge(5000))
        ));
    }

    #[test]
    fn connect_urls_carry_version_and_encoding_once() {
        assert_eq!(
            connect_url("wss://gateway.discord.gg"),
            "wss://gateway.discord.gg/?v=10&encoding=json"
        );
        assert_eq!(
            connect_url("ws://127.0.0.1:1/?v=9"),
            "ws://127.0.0.1:1/?v=10&encoding=json"
        );
    }

    #[test]
    fn identify_and_resume_carry_the_token_only_in_the_payload() {
        let p = identify("tok", [0, 1]);
        assert!(p.contains(r#""intents":129"#) && p.contains("tok"));
        assert!(resume("tok", "s1", 5).contains(r#""seq":5"#));
    }
}
