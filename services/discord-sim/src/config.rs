//! Simulator settings: defaults in code, overridable from `DISCORD_SIM__*` environment variables.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::error::ConfigError;

/// Per-route and global REST rate limits. Small numbers make limits reachable in tests.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Turn all rate limiting off (headers are still sent).
    pub enabled: bool,
    /// Requests per bucket window for routes without an override.
    pub route_limit: u32,
    /// Length of a bucket window.
    pub route_window: Duration,
    /// Per-route overrides keyed by route template, e.g. `PATCH /guilds/{guild_id}/members/{user_id}`.
    pub route_overrides: HashMap<String, (u32, Duration)>,
    /// Requests per second across all routes for one bot token (Discord: 50).
    pub global_per_second: u32,
    /// Invalid requests (401, 403, 429 except `shared` scope) allowed per window before the
    /// simulator answers everything with 403 like Cloudflare's temporary ban (Discord: 10,000 / 10 min).
    pub invalid_request_limit: u32,
    /// Window for counting invalid requests.
    pub invalid_request_window: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            route_limit: 5,
            route_window: Duration::from_secs(5),
            route_overrides: HashMap::new(),
            global_per_second: 50,
            invalid_request_limit: 10_000,
            invalid_request_window: Duration::from_secs(600),
        }
    }
}

/// OAuth2 application and token lifetimes.
#[derive(Debug, Clone)]
pub struct OAuthConfig {
    pub client_id: String,
    pub client_secret: String,
    /// Allowed redirect URIs; empty accepts any.
    pub redirect_uris: Vec<String>,
    pub code_lifetime: Duration,
    pub access_token_lifetime: Duration,
    pub refresh_token_lifetime: Duration,
    /// Most authorization codes, access tokens and refresh tokens kept, each (the oldest goes
    /// first when full).
    pub max_grants: usize,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        Self {
            client_id: "100000000000000001".to_owned(),
            client_secret: "sim-client-secret".to_owned(),
            redirect_uris: Vec::new(),
            code_lifetime: Duration::from_secs(600),
            access_token_lifetime: Duration::from_secs(604_800),
            refresh_token_lifetime: Duration::from_secs(30 * 86_400),
            max_grants: 200_000,
        }
    }
}

/// Everything the simulator can be told at start-up.
#[derive(Clone)]
pub struct SimConfig {
    /// Address to bind; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Host name used in the URLs the simulator hands out (defaults to the bound IP).
    pub public_host: Option<String>,
    /// actix worker threads.
    pub workers: usize,
    /// Bot token accepted on REST (`Bot <token>`) and in IDENTIFY.
    pub bot_token: String,
    /// Bot user id and name.
    pub bot_user_id: u64,
    pub bot_username: String,
    /// Guild-level permissions of the bot's managed role.
    pub bot_permissions: u64,
    /// Check the bot's permissions per channel (after overwrites) as Discord does: a private
    /// channel that does not grant the bot VIEW_CHANNEL is 50001 to it, moving members into a
    /// channel needs CONNECT + MOVE_MEMBERS there. Off by default (the bot then always can).
    pub strict_bot_permissions: bool,
    /// Interval announced in HELLO.
    pub heartbeat_interval: Duration,
    /// A connection with no heartbeat for `heartbeat_interval × this` is closed with 4009.
    pub heartbeat_timeout_factor: f64,
    /// Dispatches kept per session for RESUME.
    pub replay_buffer: usize,
    /// Outgoing frames buffered per connection before it is closed as too slow.
    pub connection_queue: usize,
    /// Maximum concurrent gateway connections.
    pub max_connections: usize,
    /// Gateway payloads a client may send per 60 s before a 4008 close (Discord: 120).
    pub gateway_send_limit: u32,
    /// Identifies allowed per `identify_window` (Discord's `max_concurrency` per 5 s).
    pub max_concurrency: u32,
    pub identify_window: Duration,
    /// Daily session starts (`session_start_limit.total`).
    pub session_start_total: u32,
    /// `shards` in `GET /gateway/bot`; `None`: one per 1,000 guilds the bot is in (at least 1).
    pub recommended_shards: Option<u32>,
    /// Guilds one session may handle; an IDENTIFY that would handle more is closed with 4011
    /// (Discord: 2,500).
    pub max_guilds_per_shard: usize,
    /// Privileged intents this application may use (GUILD_MEMBERS by default).
    pub allowed_privileged_intents: u64,
    pub rate_limits: RateLimitConfig,
    pub oauth: OAuthConfig,
    /// Seed for ids, tokens and jitter; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Events kept in the observable log.
    pub log_capacity: usize,
    /// Seed the default world (one guild, bot, alice..erin, two voice channels).
    pub seed_world: bool,
}

impl std::fmt::Debug for SimConfig {
    // Hand-written so the bot token and client secret never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("bind", &self.bind)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("seed", &self.seed)
            .field("bot_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Permission bits the simulator checks.
pub mod perms {
    pub const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_CHANNELS: u64 = 1 << 4;
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    pub const SEND_MESSAGES: u64 = 1 << 11;
    pub const CONNECT: u64 = 1 << 20;
    pub const SPEAK: u64 = 1 << 21;
    pub const MUTE_MEMBERS: u64 = 1 << 22;
    pub const DEAFEN_MEMBERS: u64 = 1 << 23;
    pub const MOVE_MEMBERS: u64 = 1 << 24;
    pub const MANAGE_ROLES: u64 = 1 << 28;
    /// What @everyone gets in a new guild (a practical subset of Discord's default).
    pub const EVERYONE_DEFAULT: u64 =
        CREATE_INSTANT_INVITE | VIEW_CHANNEL | SEND_MESSAGES | CONNECT | SPEAK;
    /// What the bot's role gets by default: enough for voicerooms.
    pub const BOT_DEFAULT: u64 = MANAGE_CHANNELS
        | MANAGE_ROLES
        | MOVE_MEMBERS
        | VIEW_CHANNEL
        | CONNECT
        | SPEAK
        | MUTE_MEMBERS
        | DEAFEN_MEMBERS;
}

/// Gateway intent bits.
pub mod intents {
    pub const GUILDS: u64 = 1 << 0;
    pub const GUILD_MEMBERS: u64 = 1 << 1;
    pub const GUILD_PRESENCES: u64 = 1 << 8;
    pub const GUILD_VOICE_STATES: u64 = 1 << 7;
    pub const MESSAGE_CONTENT: u64 = 1 << 15;
    pub const PRIVILEGED: u64 = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT;
    /// Every bit Discord defines today (0..=25, with gaps we do not police).
    pub const ALL_KNOWN: u64 = (1 << 26) - 1;
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_host: None,
            workers: 1,
            bot_token: "sim-bot-token".to_owned(),
            bot_user_id: 100_000_000_000_000_001,
            bot_username: "voicerooms-bot".to_owned(),
            bot_permissions: perms::BOT_DEFAULT,
            strict_bot_permissions: false,
            heartbeat_interval: Duration::from_millis(41_250),
            heartbeat_timeout_factor: 1.5,
            replay_buffer: 1024,
            connection_queue: 1024,
            max_connections: 256,
            gateway_send_limit: 120,
            max_concurrency: 1,
            identify_window: Duration::from_secs(5),
            session_start_total: 1000,
            recommended_shards: None,
            max_guilds_per_shard: 2_500,
            allowed_privileged_intents: intents::GUILD_MEMBERS,
            rate_limits: RateLimitConfig::default(),
            oauth: OAuthConfig::default(),
            seed: None,
            log_capacity: 10_000,
            seed_world: true,
        }
    }
}

impl SimConfig {
    /// A config for tests: port 0, fast heartbeats, a fixed seed, relaxed identify concurrency.
    pub fn for_tests() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(500),
            // Discord allows 120 sends per 60 s with a 41.25 s heartbeat, so heartbeats use ~2 of
            // them; at 500 ms they alone would be 120 a minute and every test connection would
            // be closed with 4008 after a minute. Keep Discord's 120 for everything else.
            gateway_send_limit: 120 + 2 * 60_000 / 500,
            seed: Some(7),
            max_concurrency: 16,
            ..Self::default()
        }
    }

    /// Reads `DISCORD_SIM__*` variables over the defaults (see docs/SIMULATOR.md).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Same as [`SimConfig::from_env`] over any list of variables (testable).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        for (key, value) in vars {
            let Some(name) = key.strip_prefix("DISCORD_SIM__") else {
                continue;
            };
            let bad = |_| ConfigError::Invalid {
                key: key.clone(),
                value: value.clone(),
            };
            let ms = |v: &str| v.parse::<u64>().map(Duration::from_millis);
            let secs = |v: &str| v.parse::<u64>().map(Duration::from_secs);
            match name {
                "BIND" => c.bind = value.parse().map_err(|_| bad(()))?,
                "PUBLIC_HOST" => c.public_host = Some(value.clone()),
                "WORKERS" => c.workers = value.parse().map_err(|_| bad(()))?,
                "BOT_TOKEN" => c.bot_token = value.clone(),
                "BOT_USER_ID" => c.bot_user_id = value.parse().map_err(|_| bad(()))?,
                "BOT_PERMISSIONS" => c.bot_permissions = value.parse().map_err(|_| bad(()))?,
                "HEARTBEAT_INTERVAL_MS" => {
                    c.heartbeat_interval = ms(&value).map_err(|_| bad(()))?
                }
                "REPLAY_BUFFER" => c.replay_buffer = value.parse().map_err(|_| bad(()))?,
                "HEARTBEAT_TIMEOUT_FACTOR" => {
                    c.heartbeat_timeout_factor = value.parse().map_err(|_| bad(()))?
                }
                "CONNECTION_QUEUE" => c.connection_queue = value.parse().map_err(|_| bad(()))?,
                "GATEWAY_SEND_LIMIT" => {
                    c.gateway_send_limit = value.parse().map_err(|_| bad(()))?
                }
                "IDENTIFY_WINDOW_MS" => c.identify_window = ms(&value).map_err(|_| bad(()))?,
                "ALLOWED_PRIVILEGED_INTENTS" => {
                    c.allowed_privileged_intents = value.parse().map_err(|_| bad(()))?
                }
                "BOT_USERNAME" => c.bot_username = value.clone(),
                "STRICT_BOT_PERMISSIONS" => {
                    c.strict_bot_permissions = value.parse().map_err(|_| bad(()))?
                }
                "RATE_LIMIT__INVALID_REQUEST_WINDOW_SECS" => {
                    c.rate_limits.invalid_request_window = secs(&value).map_err(|_| bad(()))?
                }
                "MAX_CONNECTIONS" => c.max_connections = value.parse().map_err(|_| bad(()))?,
                "MAX_CONCURRENCY" => c.max_concurrency = value.parse().map_err(|_| bad(()))?,
                "SESSION_START_TOTAL" => {
                    c.session_start_total = value.parse().map_err(|_| bad(()))?
                }
                "RECOMMENDED_SHARDS" => {
                    c.recommended_shards = if value.trim().is_empty() {
                        None
                    } else {
                        Some(value.parse().map_err(|_| bad(()))?)
                    }
                }
                "MAX_GUILDS_PER_SHARD" => {
                    c.max_guilds_per_shard = value.parse().map_err(|_| bad(()))?
                }
                "SEED" => c.seed = Some(value.parse().map_err(|_| bad(()))?),
                "LOG_CAPACITY" => c.log_capacity = value.parse().map_err(|_| bad(()))?,
                "SEED_WORLD" => c.seed_world = value.parse().map_err(|_| bad(()))?,
                "RATE_LIMIT__ENABLED" => {
                    c.rate_limits.enabled = value.parse().map_err(|_| bad(()))?
                }
                "RATE_LIMIT__ROUTE_LIMIT" => {
                    c.rate_limits.route_limit = value.parse().map_err(|_| bad(()))?
                }
                "RATE_LIMIT__ROUTE_WINDOW_MS" => {
                    c.rate_limits.route_window = ms(&value).map_err(|_| bad(()))?
                }
                "RATE_LIMIT__GLOBAL_PER_SECOND" => {
                    c.rate_limits.global_per_second = value.parse().map_err(|_| bad(()))?
                }
                "RATE_LIMIT__INVALID_REQUEST_LIMIT" => {
                    c.rate_limits.invalid_request_limit = value.parse().map_err(|_| bad(()))?
                }
                "OAUTH__CLIENT_ID" => c.oauth.client_id = value.clone(),
                "OAUTH__CLIENT_SECRET" => c.oauth.client_secret = value.clone(),
                "OAUTH__REDIRECT_URIS" => {
                    c.oauth.redirect_uris = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "OAUTH__CODE_LIFETIME_SECS" => {
                    c.oauth.code_lifetime = secs(&value).map_err(|_| bad(()))?
                }
                "OAUTH__ACCESS_TOKEN_LIFETIME_SECS" => {
                    c.oauth.access_token_lifetime = secs(&value).map_err(|_| bad(()))?
                }
                "OAUTH__REFRESH_TOKEN_LIFETIME_SECS" => {
                    c.oauth.refresh_token_lifetime = secs(&value).map_err(|_| bad(()))?
                }
                "OAUTH__MAX_GRANTS" => {
                    c.oauth.max_grants = match value.parse() {
                        Ok(n) if n > 0 => n,
                        _ => return Err(bad(())),
                    }
                }
                _ => return Err(ConfigError::Unknown(key.clone())),
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars_override_defaults() {
        let c = SimConfig::from_vars([
            ("DISCORD_SIM__BIND".to_owned(), "127.0.0.1:8790".to_owned()),
            (
                "DISCORD_SIM__HEARTBEAT_INTERVAL_MS".to_owned(),
                "1000".to_owned(),
            ),
            ("PATH".to_owned(), "/bin".to_owned()),
        ])
        .expect("valid vars");
        assert_eq!(c.bind.port(), 8790);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(1000));
    }

    #[test]
    fn unknown_and_invalid_vars_are_rejected() {
        assert!(SimConfig::from_vars([("DISCORD_SIM__NOPE".to_owned(), "1".to_owned())]).is_err());
        assert!(
            SimConfig::from_vars([("DISCORD_SIM__WORKERS".to_owned(), "x".to_owned())]).is_err()
        );
        assert!(SimConfig::from_vars([(
            "DISCORD_SIM__OAUTH__MAX_GRANTS".to_owned(),
            "0".to_owned()
        )])
        .is_err());
    }

    #[test]
    fn every_variable_in_the_env_example_parses_to_the_defaults() {
        let vars = include_str!("../.env.example")
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())));
        let c = SimConfig::from_vars(vars).expect("the example is valid");
        let d = SimConfig::default();
        assert_eq!(c.heartbeat_interval, d.heartbeat_interval);
        assert_eq!(c.bot_token, d.bot_token);
        assert_eq!(c.rate_limits.route_window, d.rate_limits.route_window);
        assert_eq!(
            c.oauth.refresh_token_lifetime,
            d.oauth.refresh_token_lifetime
        );
        assert_eq!(c.oauth.max_grants, d.oauth.max_grants);
        assert_eq!(c.allowed_privileged_intents, d.allowed_privileged_intents);
    }
}
