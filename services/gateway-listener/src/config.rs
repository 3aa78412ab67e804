//! The `gateway` settings section (`VOICEROOMS__GATEWAY__*`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use voicerooms_platform::SettingsError;

/// How the listener connects to Discord, backs off, buffers and shares its shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Static mode: this replica runs only this shard (0-based), as holder or standby. Unset
    /// (the default): the replica joins the shard pool and runs whichever shards it is balanced
    /// to (docs/GATEWAY.md, "The shard pool").
    pub shard_id: Option<u32>,
    /// Total shards of the bot: `"auto"` (Discord's recommended `shards` from `GET /gateway/bot`,
    /// pinned in the pool bucket by the first replica) or a number. Static mode needs a number.
    pub shard_count: ShardCount,
    /// Gateway URL override; empty = ask `GET /gateway/bot` on `discord.api_base`.
    pub url: String,
    /// First retry delay after a failed attempt (ms); doubles per consecutive failure.
    pub backoff_base_ms: u64,
    /// Longest retry delay (ms).
    pub backoff_max_ms: u64,
    /// Consecutive failed attempts that raise the `gateway_reconnect_failing` alert and make
    /// the service unready.
    pub alert_after_failures: u32,
    /// Time allowed for the websocket handshake and for HELLO (ms).
    pub connect_timeout_ms: u64,
    /// Normalized events buffered between the gateway and JetStream. When full, the listener
    /// stops reading the gateway (Discord buffers and replays on resume).
    pub publish_buffer: usize,
    /// How long one JetStream publish waits for its acknowledgement before it is retried (ms).
    pub publish_timeout_ms: u64,
    /// Events unacknowledged at once per shard (never two of one room or one user; 1 publishes
    /// one at a time). At most [`MAX_PUBLISH_IN_FLIGHT`].
    pub publish_in_flight: usize,
    /// Largest gateway payload accepted (bytes); larger frames are rejected and logged.
    pub max_frame_bytes: usize,
    /// JetStream KV bucket holding the shard leases and session checkpoints.
    pub lease_bucket: String,
    /// A lease not renewed for this long may be taken by a standby (ms).
    pub lease_ttl_ms: u64,
    /// How often the holder renews its lease and writes its session checkpoint (ms).
    pub lease_renew_ms: u64,
    /// Session starts (IDENTIFY) left today below which no replica identifies: a critical alert
    /// (`gateway_session_start_reserve`) instead, until Discord resets the budget. Discord resets
    /// the bot's token when the budget runs out.
    pub session_start_reserve: u64,
    /// How often a shard's holder republishes its status and refreshes it in KV (ms).
    pub status_interval_ms: u64,
}

/// Upper bound of `gateway.publish_in_flight` (below the NATS client's own limit of pending
/// acknowledgements, 5,000).
pub const MAX_PUBLISH_IN_FLIGHT: usize = 4096;

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            shard_id: None,
            shard_count: ShardCount::Auto,
            url: String::new(),
            backoff_base_ms: 1_000,
            backoff_max_ms: 16_000,
            alert_after_failures: 5,
            connect_timeout_ms: 10_000,
            publish_buffer: 10_000,
            publish_timeout_ms: 2_000,
            publish_in_flight: 64,
            max_frame_bytes: 16 << 20,
            lease_bucket: "gateway_leases".into(),
            lease_ttl_ms: 6_000,
            lease_renew_ms: 1_000,
            session_start_reserve: 100,
            status_interval_ms: 5_000,
        }
    }
}

/// `gateway.shard_count`: `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShardCount {
    /// Discord's recommendation (`shards` of `GET /gateway/bot`), pinned in the pool bucket.
    #[default]
    Auto,
    Fixed(u32),
}

impl Serialize for ShardCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ShardCount::Auto => s.serialize_str("auto"),
            ShardCount::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for ShardCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ShardCount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\" or a number of shards")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ShardCount, E> {
                u32::try_from(v)
                    .map(ShardCount::Fixed)
                    .map_err(|_| E::custom("too many shards"))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ShardCount, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a negative number of shards"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ShardCount, E> {
                let v = v.trim();
                if v.eq_ignore_ascii_case("auto") {
                    return Ok(ShardCount::Auto);
                }
                v.parse::<u32>()
                    .map(ShardCount::Fixed)
                    .map_err(|_| E::custom("expected \"auto\" or a number of shards"))
            }
        }
        d.deserialize_any(V)
    }
}

impl std::fmt::Display for ShardCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardCount::Auto => f.write_str("auto"),
            ShardCount::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl GatewayConfig {
    pub fn check(&self) -> Result<(), SettingsError> {
        match (self.shard_id, self.shard_count) {
            (_, ShardCount::Fixed(0)) => {
                return Err(SettingsError::invalid(
                    "gateway.shard_count",
                    "must be \"auto\" or at least 1",
                ))
            }
            (Some(_), ShardCount::Auto) => {
                return Err(SettingsError::invalid(
                    "gateway.shard_count",
                    "a static gateway.shard_id needs a number of shards, not \"auto\"",
                ))
            }
            (Some(id), ShardCount::Fixed(count)) if id >= count => {
                return Err(SettingsError::invalid(
                    "gateway.shard_id",
                    "must be below gateway.shard_count",
                ))
            }
            _ => {}
        }
        if !(self.url.is_empty() || self.url.starts_with("ws://") || self.url.starts_with("wss://"))
        {
            return Err(SettingsError::invalid(
                "gateway.url",
                "must start with ws:// or wss://",
            ));
        }
        if self.backoff_base_ms == 0 || self.backoff_max_ms < self.backoff_base_ms {
            return Err(SettingsError::invalid(
                "gateway.backoff_max_ms",
                "backoff_base_ms must be > 0 and <= backoff_max_ms",
            ));
        }
        if self.alert_after_failures == 0 {
            return Err(SettingsError::invalid(
                "gateway.alert_after_failures",
                "must be at least 1",
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(SettingsError::invalid(
                "gateway.connect_timeout_ms",
                "must be > 0",
            ));
        }
        if self.publish_buffer == 0 {
            return Err(SettingsError::invalid(
                "gateway.publish_buffer",
                "must be > 0",
            ));
        }
        if self.publish_timeout_ms == 0 {
            return Err(SettingsError::invalid(
                "gateway.publish_timeout_ms",
                "must be > 0",
            ));
        }
        if self.publish_in_flight == 0 || self.publish_in_flight > MAX_PUBLISH_IN_FLIGHT {
            return Err(SettingsError::invalid(
                "gateway.publish_in_flight",
                "must be between 1 and 4096",
            ));
        }
        if self.max_frame_bytes < 4096 {
            return Err(SettingsError::invalid(
                "gateway.max_frame_bytes",
                "must be at least 4096",
            ));
        }
        let bucket_ok = !self.lease_bucket.is_empty()
            && self.lease_bucket.len() <= 64
            && self
                .lease_bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !bucket_ok {
            return Err(SettingsError::invalid(
                "gateway.lease_bucket",
                "1-64 of [A-Za-z0-9_-]",
            ));
        }
        if self.status_interval_ms == 0 {
            return Err(SettingsError::invalid(
                "gateway.status_interval_ms",
                "must be > 0",
            ));
        }
        if self.lease_renew_ms == 0 || self.lease_ttl_ms < self.lease_renew_ms.saturating_mul(2) {
            return Err(SettingsError::invalid(
                "gateway.lease_ttl_ms",
                "must be at least twice gateway.lease_renew_ms (> 0)",
            ));
        }
        Ok(())
    }

    /// The delay before attempt number `failures + 1`: 0 after a success, then base × 2^(n-1)
    /// capped at the maximum (1, 2, 4, 8, 16 s by default).
    pub fn backoff(&self, failures: u32) -> Duration {
        voicerooms_platform::retry::Backoff::from_millis(self.backoff_base_ms, self.backoff_max_ms)
            .nominal_delay(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_stays_at_sixteen() {
        let c = GatewayConfig::default();
        let delays: Vec<u64> = (0..8).map(|n| c.backoff(n).as_secs()).collect();
        assert_eq!(delays, vec![0, 1, 2, 4, 8, 16, 16, 16]);
        assert_eq!(c.backoff(u32::MAX).as_secs(), 16);
    }

    #[test]
    fn a_shard_id_beyond_the_count_is_rejected() {
        let c = GatewayConfig {
            shard_id: Some(2),
            shard_count: ShardCount::Fixed(2),
            ..Default::default()
        };
        assert!(c.check().is_err());
        assert!(GatewayConfig::default().check().is_ok());
        let auto_static = GatewayConfig {
            shard_id: Some(0),
            ..Default::default()
        };
        assert!(auto_static.check().is_err(), "static mode needs a count");
        let none = GatewayConfig {
            shard_count: ShardCount::Fixed(0),
            ..Default::default()
        };
        assert!(none.check().is_err());
    }

    #[test]
    fn shard_count_reads_auto_or_a_number() {
        let read = |v: serde_json::Value| serde_json::from_value::<ShardCount>(v).ok();
        assert_eq!(read(serde_json::json!("auto")), Some(ShardCount::Auto));
        assert_eq!(read(serde_json::json!("AUTO")), Some(ShardCount::Auto));
        assert_eq!(read(serde_json::json!(8)), Some(ShardCount::Fixed(8)));
        assert_eq!(read(serde_json::json!("8")), Some(ShardCount::Fixed(8)));
        assert_eq!(read(serde_json::json!(-1)), None);
        assert_eq!(read(serde_json::json!("many")), None);
        assert_eq!(read(serde_json::json!(5_000_000_000u64)), None);
        assert_eq!(
            serde_json::to_value(ShardCount::Fixed(3)).ok(),
            Some(serde_json::json!(3))
        );
    }
}
