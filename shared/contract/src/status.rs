//! Operational messages: gateway connection status and operator alerts.

use serde::{Deserialize, Serialize};

use crate::event::{Millis, MAX_MESSAGE_CHARS};
use crate::subject::{self, ServiceName};
use crate::wire::{self, check_text, check_token, DecodeError, Validate};

/// The gateway connection's state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayState {
    Disconnected,
    Connecting,
    Identifying,
    Resuming,
    Connected,
    Reconnecting,
    /// A fatal close (bad token, disallowed intents): it will not retry until restarted.
    Stopped,
    /// Another replica holds the shard's lease; this one waits to take over.
    Standby,
}

impl GatewayState {
    pub const ALL: [GatewayState; 8] = [
        GatewayState::Disconnected,
        GatewayState::Connecting,
        GatewayState::Identifying,
        GatewayState::Resuming,
        GatewayState::Connected,
        GatewayState::Reconnecting,
        GatewayState::Stopped,
        GatewayState::Standby,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GatewayState::Disconnected => "disconnected",
            GatewayState::Connecting => "connecting",
            GatewayState::Identifying => "identifying",
            GatewayState::Resuming => "resuming",
            GatewayState::Connected => "connected",
            GatewayState::Reconnecting => "reconnecting",
            GatewayState::Stopped => "stopped",
            GatewayState::Standby => "standby",
        }
    }
}

/// Published on `gateway.<shard>.status` at every state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub v: u16,
    pub shard: u32,
    pub shard_count: u32,
    pub state: GatewayState,
    /// Consecutive failed attempts (reset by a successful connection).
    pub attempts: u32,
    /// Whether the current session could still be resumed.
    pub resumable: bool,
    /// The replica publishing this status.
    pub instance: String,
    pub at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl GatewayStatus {
    pub fn subject(&self) -> String {
        subject::gateway_status(self.shard)
    }
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        wire::decode_versioned(bytes)
    }
}

impl Validate for GatewayStatus {
    fn validate(&self) -> Result<(), DecodeError> {
        if self.shard_count == 0 || self.shard >= self.shard_count {
            return Err(DecodeError::invalid("shard", "must be below shard_count"));
        }
        check_token("instance", &self.instance, 128)?;
        if let Some(detail) = &self.detail {
            check_text("detail", detail, 0, MAX_MESSAGE_CHARS)?;
        }
        Ok(())
    }
}

/// The gateway pool's JetStream KV bucket (`gateway.lease_bucket`'s default): shard leases,
/// session checkpoints, the last status of each shard, the identify queue and the pool's members
/// and shard count. Keys are built only here.
pub const GATEWAY_POOL_BUCKET: &str = "gateway_leases";

/// Keys of the gateway pool's bucket. `<id>` and `<count>` are a shard and the shard count (the
/// count is part of the key, so two shard counts never share a lease).
pub mod pool_key {
    /// `shard-<id>-of-<count>.lease`: [`super::ShardLease`].
    pub fn lease(shard: u32, count: u32) -> String {
        format!("shard-{shard}-of-{count}.lease")
    }
    /// `shard-<id>-of-<count>.checkpoint`: the holder's session checkpoint (gateway-internal).
    pub fn checkpoint(shard: u32, count: u32) -> String {
        format!("shard-{shard}-of-{count}.checkpoint")
    }
    /// `shard-<id>-of-<count>.status`: the holder's last [`super::GatewayStatus`], rewritten at
    /// every change and every `gateway.status_interval_ms`.
    pub fn status(shard: u32, count: u32) -> String {
        format!("shard-{shard}-of-{count}.status")
    }
    /// `pool.members`: the pool's live replicas ([`super::PoolMembers`]), rewritten by each
    /// replica (compare-and-set) at every pool tick.
    pub const MEMBERS: &str = "pool.members";
    /// `pool.shard_count`: the pool's shard count (decimal), pinned by the first replica of an
    /// `"auto"` pool so that every replica runs the same count.
    pub const SHARD_COUNT: &str = "pool.shard_count";
    /// `(shard, count)` of a `shard-<id>-of-<count>.<what>` key, with `<what>`.
    pub fn parse(key: &str) -> Option<(u32, u32, &str)> {
        let (shard_part, what) = key.split_once('.')?;
        let rest = shard_part.strip_prefix("shard-")?;
        let (id, count) = rest.split_once("-of-")?;
        Some((id.parse().ok()?, count.parse().ok()?, what))
    }
}

/// A shard's lease in the pool bucket: who holds it and until when (wall clock). Expired = free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLease {
    pub holder: String,
    pub expires_at: Millis,
}

/// The gateway pool's live replicas (`pool.members` in the pool bucket), by instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMembers {
    #[serde(default)]
    pub members: std::collections::BTreeMap<String, PoolMember>,
}

/// One replica of the gateway pool, as it last wrote itself down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMember {
    /// The entry counts as live until then (wall clock, ms); rewritten at every pool tick.
    pub expires_at: Millis,
    /// The shard count it runs.
    pub shard_count: u32,
    /// The shards it holds.
    #[serde(default)]
    pub held: Vec<u32>,
    /// How many shards its balance gives it.
    #[serde(default)]
    pub target: u32,
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
    /// The condition that raised an earlier alert with the same code has cleared.
    Resolved,
}

impl Severity {
    /// The wire name (also the `severity` label of `voicerooms_operator_alerts_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
            Severity::Resolved => "resolved",
        }
    }
}

/// Published on `ops.alerts.<service>` for conditions a human must look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorAlert {
    pub v: u16,
    pub service: String,
    pub instance: String,
    pub severity: Severity,
    /// Stable machine code, e.g. `gateway_reconnect_failing`, `gateway_fatal_close`.
    pub code: String,
    pub message: String,
    pub at: Millis,
}

impl OperatorAlert {
    /// The subject, or an error when `service` is not a valid subject token.
    pub fn subject(&self) -> Result<String, crate::subject::SubjectError> {
        ServiceName::new(&self.service).map(|s| subject::ops_alert(&s))
    }
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        wire::decode_versioned(bytes)
    }
}

impl Validate for OperatorAlert {
    fn validate(&self) -> Result<(), DecodeError> {
        ServiceName::new(&self.service)
            .map_err(|e| DecodeError::invalid("service", e.to_string()))?;
        check_token("instance", &self.instance, 128)?;
        check_token("code", &self.code, 64)?;
        check_text("message", &self.message, 1, MAX_MESSAGE_CHARS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_alert_round_trip() {
        for state in GatewayState::ALL {
            let status = GatewayStatus {
                v: 1,
                shard: 0,
                shard_count: 1,
                state,
                attempts: 3,
                resumable: true,
                instance: "gw-1".into(),
                at: 5,
                detail: Some("close 4000".into()),
            };
            assert_eq!(GatewayStatus::decode(&status.encode()).unwrap(), status);
            assert_eq!(status.subject(), "gateway.0.status");
        }
        let alert = OperatorAlert {
            v: 1,
            service: "gateway-listener".into(),
            instance: "gw-1".into(),
            severity: Severity::Critical,
            code: "gateway_reconnect_failing".into(),
            message: "5 consecutive connection attempts failed".into(),
            at: 9,
        };
        assert_eq!(OperatorAlert::decode(&alert.encode()).unwrap(), alert);
        assert_eq!(alert.subject().unwrap(), "ops.alerts.gateway-listener");
    }

    #[test]
    fn pool_keys_are_built_and_parsed_in_one_place() {
        assert_eq!(pool_key::lease(3, 8), "shard-3-of-8.lease");
        assert_eq!(
            pool_key::parse("shard-3-of-8.status"),
            Some((3, 8, "status"))
        );
        assert_eq!(
            pool_key::parse(&pool_key::checkpoint(0, 1)),
            Some((0, 1, "checkpoint"))
        );
        assert_eq!(pool_key::parse("identify"), None);
        assert_eq!(pool_key::parse("shard-x-of-8.lease"), None);
    }

    #[test]
    fn bad_status_and_alerts_are_rejected() {
        let bad = br#"{"v":1,"shard":2,"shard_count":1,"state":"connected","attempts":0,"resumable":false,"instance":"x","at":1}"#;
        assert!(matches!(
            GatewayStatus::decode(bad),
            Err(DecodeError::Invalid { field: "shard", .. })
        ));
        let bad = br#"{"v":1,"service":"a.b","instance":"x","severity":"warning","code":"c","message":"m","at":1}"#;
        assert!(matches!(
            OperatorAlert::decode(bad),
            Err(DecodeError::Invalid {
                field: "service",
                ..
            })
        ));
        let bad = br#"{"v":1,"service":"a","instance":"x","severity":"apocalyptic","code":"c","message":"m","at":1}"#;
        assert!(matches!(
            OperatorAlert::decode(bad),
            Err(DecodeError::Malformed(_))
        ));
    }
}
