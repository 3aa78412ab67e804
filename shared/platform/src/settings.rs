//! Configuration: defaults in code → optional TOML file → environment variables.
//!
//! Every variable starts with [`ENV_PREFIX`] and nests with `__`, e.g. `VOICEROOMS__NATS__URL`.
//! The optional file is named by `VOICEROOMS_CONFIG_FILE` (one underscore: it is not a setting).
//! Each service's settings struct flattens [`CommonSettings`] and adds its own sections; all the
//! section names any service uses are listed in [`KNOWN_SECTIONS`], so one `.env` can serve every
//! service while a typo in a section name (or, via `deny_unknown_fields`, in a key of a section the
//! service owns) still fails start-up with a message naming the key.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of every environment variable the services read.
pub const ENV_PREFIX: &str = "VOICEROOMS";
/// Separator between prefix, sections and keys.
pub const ENV_SEPARATOR: &str = "__";
/// Environment variable naming an optional TOML settings file.
pub const CONFIG_FILE_VAR: &str = "VOICEROOMS_CONFIG_FILE";

/// Largest NATS connect and request timeout (10 minutes).
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// Largest NATS client or subscription buffer, in messages.
pub const MAX_BUFFERED_MESSAGES: u64 = 10_000_000;
/// Longest the ROOMS stream may keep events (10 years).
pub const MAX_STREAM_AGE_SECS: u64 = 10 * 365 * 86_400;
/// Most HTTP worker threads.
pub const MAX_HTTP_WORKERS: u64 = 1024;
/// Longest shutdown grace period (1 hour).
pub const MAX_GRACE_PERIOD_MS: u64 = 3_600_000;

/// Every top-level section any service reads. A section not in this list is a typo.
pub const KNOWN_SECTIONS: &[&str] = &[
    "nats",
    "http",
    "log",
    "telemetry",
    "shutdown",
    "instance",
    "discord",
    "gateway",
    "room_manager",
    "rooms",
    "invites",
    "edge",
    "oauth",
    "session",
    "websocket",
];

/// Why settings could not be loaded. Messages name the offending key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Not `#[source]`: the message already includes it, and chains would print it twice.
    #[error("configuration error: {0}")]
    Source(config::ConfigError),
    #[error("configuration error: unknown section `{section}` (from {ENV_PREFIX}__{upper}__… or the config file); known sections: {known}")]
    UnknownSection {
        section: String,
        upper: String,
        known: String,
    },
    #[error("configuration error: invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl From<config::ConfigError> for SettingsError {
    fn from(e: config::ConfigError) -> Self {
        SettingsError::Source(e)
    }
}

impl SettingsError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        SettingsError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Checks run after loading (ranges, formats, cross-field rules).
pub trait CheckSettings {
    fn check(&self) -> Result<(), SettingsError>;
}

/// A service's settings: the common sections plus its own (`T`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Settings<T> {
    pub common: CommonSettings,
    pub service: T,
}

/// Loads settings from the process environment (and the optional file), on top of the service's
/// own defaults for the common sections (e.g. its default HTTP port).
pub fn load<T>(common_defaults: CommonSettings) -> Result<Settings<T>, SettingsError>
where
    T: DeserializeOwned + Serialize + Default + CheckSettings,
{
    let file = std::env::var(CONFIG_FILE_VAR).ok();
    load_from(common_defaults, None, file.as_deref())
}

/// Loads settings from an explicit variable map (tests) or the process environment (`None`).
///
/// The common part and the service's part are deserialized separately (rather than flattened
/// into one struct) so that errors keep the full key path, e.g. `http.port`.
pub fn load_from<T>(
    common_defaults: CommonSettings,
    env: Option<HashMap<String, String>>,
    file: Option<&str>,
) -> Result<Settings<T>, SettingsError>
where
    T: DeserializeOwned + Serialize + Default + CheckSettings,
{
    let mut builder = config::Config::builder()
        .add_source(config::Config::try_from(&common_defaults)?)
        .add_source(config::Config::try_from(&T::default())?);
    if let Some(path) = file {
        builder =
            builder.add_source(config::File::new(path, config::FileFormat::Toml).required(true));
    }
    let env_source = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .source(env);
    let built = builder.add_source(env_source).build()?;
    let table = built.clone().cache.into_table()?;
    for section in table.keys() {
        if !KNOWN_SECTIONS.contains(&section.as_str()) {
            return Err(SettingsError::UnknownSection {
                section: section.clone(),
                upper: section.to_uppercase(),
                known: KNOWN_SECTIONS.join(", "),
            });
        }
    }
    let common: CommonSettings = built.clone().try_deserialize()?;
    let service: T = built.try_deserialize()?;
    common.check()?;
    service.check()?;
    Ok(Settings { common, service })
}

/// The environment variable names a service reads: the common ones and `T`'s (docs and tests).
pub fn env_var_names<T: Serialize + Default>() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for value in [
        serde_json::to_value(CommonSettings::default()),
        serde_json::to_value(T::default()),
    ]
    .into_iter()
    .flatten()
    {
        collect_keys(&value, &mut Vec::new(), &mut out);
    }
    out
}

fn collect_keys(value: &serde_json::Value, path: &mut Vec<String>, out: &mut BTreeSet<String>) {
    match value {
        // An empty section has no keys to list.
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                path.push(k.to_uppercase());
                collect_keys(v, path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(format!(
                "{ENV_PREFIX}{ENV_SEPARATOR}{}",
                path.join(ENV_SEPARATOR)
            ));
        }
    }
}

/// A secret setting: never printed by `Debug`, `Display` or `Serialize`.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }
    /// The secret value. Call it only where the value is used (signing, an auth header).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Accept numbers too: `try_parsing` turns an all-digit secret into an integer.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            I(i64),
            U(u64),
        }
        let s = match Raw::deserialize(deserializer)? {
            Raw::S(s) => s,
            Raw::I(i) => i.to_string(),
            Raw::U(u) => u.to_string(),
        };
        Ok(Secret::new(s))
    }
}

/// How to reach NATS and how the shared JetStream objects are configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL(s), comma separated: `nats://host:4222,nats://other:4222`.
    pub url: String,
    /// Optional auth token.
    pub token: Option<Secret>,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// Outgoing messages buffered while disconnected or slow; past it publishes fail fast.
    pub client_capacity: usize,
    /// Messages buffered per subscription before the client reports a slow consumer.
    pub subscription_capacity: usize,
    /// Replicas of the ROOMS stream and the KV buckets (3 on a production cluster).
    pub replicas: usize,
    /// How long the ROOMS stream keeps events (replay horizon for reconnecting clients).
    pub stream_max_age_secs: u64,
    pub stream_max_bytes: i64,
    /// JetStream de-duplication window for `Nats-Msg-Id`.
    pub duplicate_window_secs: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            token: None,
            connect_timeout_ms: 2_000,
            request_timeout_ms: 5_000,
            client_capacity: 4_096,
            subscription_capacity: 16_384,
            replicas: 1,
            stream_max_age_secs: 24 * 3600,
            stream_max_bytes: 1 << 30,
            duplicate_window_secs: 120,
        }
    }
}

/// Where the service's HTTP server listens (health, metrics, and the edge's API).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    pub workers: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            workers: 1,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line: production.
    Json,
    /// Human-readable: development.
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,room_manager=debug`.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP/HTTP endpoint (e.g. `http://otel-collector:4318/v1/traces`); tracing export is off
    /// when unset.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (parents' decisions are followed).
    pub sample_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long in-flight work may take after SIGTERM before the process gives up on it.
    pub grace_period_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            grace_period_ms: 10_000,
        }
    }
}

/// How to reach Discord (or the simulator). Read by gateway-listener and room-manager.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscordSettings {
    /// Bot token. When unset, the dev stack runs the Discord simulator instead of Discord.
    pub token: Option<Secret>,
    /// REST base URL, `https://discord.com/api/v10` in production.
    pub api_base: String,
}

impl Default for DiscordSettings {
    fn default() -> Self {
        Self {
            token: None,
            api_base: "https://discord.com/api/v10".into(),
        }
    }
}

impl CheckSettings for DiscordSettings {
    fn check(&self) -> Result<(), SettingsError> {
        if !(self.api_base.starts_with("http://") || self.api_base.starts_with("https://")) {
            return Err(SettingsError::invalid(
                "discord.api_base",
                "must be an http:// or https:// URL",
            ));
        }
        if self.token.is_none() && self.api_base.starts_with("https://discord.com") {
            return Err(SettingsError::invalid(
                "discord.token",
                "is required with Discord's API; only a simulator api_base may run without one",
            ));
        }
        if let Some(token) = &self.token {
            let t = token.expose();
            if t.is_empty()
                || t.len() > 200
                || t.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(SettingsError::invalid(
                    "discord.token",
                    "must be 1-200 characters without whitespace (value not shown)",
                ));
            }
        }
        Ok(())
    }
}

/// What every service reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonSettings {
    pub nats: NatsSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub shutdown: ShutdownSettings,
    /// This replica's name in logs, alerts and leases; random when empty.
    pub instance: String,
}

impl CheckSettings for CommonSettings {
    fn check(&self) -> Result<(), SettingsError> {
        if self.nats.url.trim().is_empty() {
            return Err(SettingsError::invalid("nats.url", "must not be empty"));
        }
        for url in self.nats.url.split(',') {
            let url = url.trim();
            if !(url.starts_with("nats://")
                || url.starts_with("tls://")
                || url.starts_with("ws://"))
            {
                return Err(SettingsError::invalid(
                    "nats.url",
                    format!("{url:?} must start with nats://, tls:// or ws://"),
                ));
            }
        }
        // Upper bounds too: nothing sane lies beyond them, and integers past i64::MAX would be
        // read through f64 and silently rounded (the config crate's number parsing).
        in_range(
            "nats.connect_timeout_ms",
            self.nats.connect_timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        )?;
        in_range(
            "nats.request_timeout_ms",
            self.nats.request_timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        )?;
        in_range(
            "nats.client_capacity",
            self.nats.client_capacity as u64,
            1,
            MAX_BUFFERED_MESSAGES,
        )?;
        in_range(
            "nats.subscription_capacity",
            self.nats.subscription_capacity as u64,
            1,
            MAX_BUFFERED_MESSAGES,
        )?;
        if !(1..=5).contains(&self.nats.replicas) {
            return Err(SettingsError::invalid("nats.replicas", "must be 1-5"));
        }
        in_range(
            "nats.stream_max_age_secs",
            self.nats.stream_max_age_secs,
            1,
            MAX_STREAM_AGE_SECS,
        )?;
        if self.nats.stream_max_bytes <= 0 {
            return Err(SettingsError::invalid(
                "nats.stream_max_bytes",
                "must be positive",
            ));
        }
        // JetStream refuses a duplicate window longer than the stream's max age.
        in_range(
            "nats.duplicate_window_secs",
            self.nats.duplicate_window_secs,
            1,
            self.nats.stream_max_age_secs,
        )?;
        in_range(
            "http.workers",
            self.http.workers as u64,
            1,
            MAX_HTTP_WORKERS,
        )?;
        if self.http.host.trim().is_empty() {
            return Err(SettingsError::invalid("http.host", "must not be empty"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(SettingsError::invalid("log.level", e.to_string()));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(SettingsError::invalid(
                "telemetry.sample_ratio",
                "must be within 0-1",
            ));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(SettingsError::invalid(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        in_range(
            "shutdown.grace_period_ms",
            self.shutdown.grace_period_ms,
            1,
            MAX_GRACE_PERIOD_MS,
        )?;
        if !self.instance.is_empty()
            && !self
                .instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(SettingsError::invalid(
                "instance",
                "use only [A-Za-z0-9._-]",
            ));
        }
        Ok(())
    }
}

impl CommonSettings {
    /// Defaults with the service's own HTTP port.
    pub fn with_port(port: u16) -> Self {
        let mut common = Self::default();
        common.http.port = port;
        common
    }

    /// The configured instance name, or a random one (stable for the process).
    pub fn instance_name(&self, service: &str) -> String {
        if self.instance.is_empty() {
            let id = uuid::Uuid::new_v4().simple().to_string();
            // A simple UUID is 32 ASCII hex digits, so `get` always succeeds.
            format!("{service}-{}", id.get(..8).unwrap_or(&id))
        } else {
            self.instance.clone()
        }
    }
}

/// Fails with the key's name when `value` is outside `min..=max`.
pub fn in_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), SettingsError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(SettingsError::invalid(
            key,
            format!("must be {min}-{max}, got {value}"),
        ))
    }
}

/// Fails with the key's name when `value` is zero.
pub fn positive(key: &str, value: u64) -> Result<(), SettingsError> {
    if value == 0 {
        Err(SettingsError::invalid(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct TestSettings {
        discord: TestDiscord,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TestDiscord {
        token: Option<Secret>,
        api_base: String,
    }

    impl Default for TestDiscord {
        fn default() -> Self {
            Self {
                token: None,
                api_base: "https://discord.com/api/v10".into(),
            }
        }
    }

    impl CheckSettings for TestSettings {
        fn check(&self) -> Result<(), SettingsError> {
            Ok(())
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_apply_and_env_overrides_nested_keys() {
        let s: Settings<TestSettings> = load_from(
            CommonSettings::default(),
            env(&[
                ("VOICEROOMS__NATS__URL", "nats://10.0.0.1:4222"),
                ("VOICEROOMS__HTTP__PORT", "9000"),
                ("VOICEROOMS__DISCORD__TOKEN", "123456789"),
                ("VOICEROOMS__LOG__FORMAT", "pretty"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(s.common.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(s.common.http.port, 9000);
        assert_eq!(s.common.http.host, "127.0.0.1");
        assert_eq!(s.common.log.format, LogFormat::Pretty);
        assert_eq!(
            s.service.discord.token.as_ref().unwrap().expose(),
            "123456789"
        );
        assert_eq!(s.service.discord.api_base, "https://discord.com/api/v10");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = load_from::<TestSettings>(
            CommonSettings::default(),
            env(&[("VOICEROOMS__HTTP__PORT", "eighty")]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("http.port"), "{err}");
        let err = load_from::<TestSettings>(
            CommonSettings::default(),
            env(&[("VOICEROOMS__HTTP__PORT", "70000")]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("http.port"), "{err}");
        let err = load_from::<TestSettings>(
            CommonSettings::default(),
            env(&[("VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS", "0")]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("shutdown.grace_period_ms"), "{err}");
        let err = load_from::<TestSettings>(
            CommonSettings::default(),
            env(&[("VOICEROOMS__NATS__URL", "http://x")]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nats.url"), "{err}");
    }

    #[test]
    fn absurd_values_are_refused_not_rounded() {
        // Past i64::MAX the config crate reads integers through f64: 9223372036854775809 would
        // become ...808. Bounds make such values an error naming the key.
        for (var, value, key) in [
            (
                "VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS",
                "9223372036854775809",
                "shutdown.grace_period_ms",
            ),
            (
                "VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS",
                "3600001",
                "shutdown.grace_period_ms",
            ),
            (
                "VOICEROOMS__NATS__REQUEST_TIMEOUT_MS",
                "18446744073709551615",
                "nats.request_timeout_ms",
            ),
            (
                "VOICEROOMS__NATS__DUPLICATE_WINDOW_SECS",
                "86401",
                "nats.duplicate_window_secs",
            ),
            ("VOICEROOMS__HTTP__WORKERS", "100000", "http.workers"),
        ] {
            let err =
                load_from::<TestSettings>(CommonSettings::default(), env(&[(var, value)]), None)
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn typos_in_sections_and_keys_fail_loudly() {
        let err = load_from::<TestSettings>(
            CommonSettings::default(),
            env(&[("VOICEROOMS__NATTS__URL", "nats://x:1")]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown section `natts`"), "{err}");
        let err = load_from::<TestSettings>(
            CommonSettings::default(),
            env(&[("VOICEROOMS__NATS__URLL", "nats://x:1")]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn sections_of_other_services_are_ignored() {
        let s: Settings<TestSettings> = load_from(
            CommonSettings::default(),
            env(&[("VOICEROOMS__EDGE__ANYTHING", "1")]),
            None,
        )
        .unwrap();
        assert_eq!(s.common.http.port, 0);
    }

    #[test]
    fn secrets_never_print() {
        let s: Settings<TestSettings> = load_from(
            CommonSettings::default(),
            env(&[("VOICEROOMS__DISCORD__TOKEN", "super-secret-token")]),
            None,
        )
        .unwrap();
        let debug = format!("{s:?}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(!debug.contains("super-secret-token"));
        assert!(!json.contains("super-secret-token"));
        assert!(debug.contains("[redacted]"));
    }

    #[test]
    fn env_var_names_list_every_key() {
        let names = env_var_names::<TestSettings>();
        assert!(names.contains("VOICEROOMS__NATS__URL"));
        assert!(names.contains("VOICEROOMS__DISCORD__TOKEN"));
        assert!(names.contains("VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS"));
        assert!(names.contains("VOICEROOMS__INSTANCE"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Values an operator (or a template gone wrong) might put in a variable.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,40}",
                "-?[0-9]{1,30}",
                "[0-9]{1,5}\\.[0-9]{0,5}",
                "(true|false|yes|no|on|off|TRUE|1e400|NaN|inf|-0|0x10)",
                "(nats|tls|ws|http)://[a-z0-9.:,]{0,30}",
                proptest::collection::vec(any::<char>(), 0..20).prop_map(String::from_iter),
                Just(String::new()),
                Just("\u{1d4d0}".repeat(300)),
            ]
        }

        /// Names: every real variable, and made-up ones under the prefix (empty tokens, unknown
        /// sections and keys, any characters).
        fn name() -> impl Strategy<Value = String> {
            let known: Vec<String> = env_var_names::<TestSettings>().into_iter().collect();
            prop_oneof![
                3 => proptest::sample::select(known),
                1 => "VOICEROOMS(__[A-Za-z0-9_]{0,12}){0,4}",
                1 => "VOICEROOMS__.{0,20}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 256,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn arbitrary_environments_give_settings_or_a_typed_error(
                vars in proptest::collection::hash_map(name(), value(), 0..8),
            ) {
                match load_from::<TestSettings>(CommonSettings::default(), Some(vars.clone()), None) {
                    Ok(s) => {
                        // Whatever was accepted passed the checks.
                        prop_assert!(s.common.check().is_ok());
                    }
                    Err(e) => {
                        let message = e.to_string();
                        prop_assert!(message.starts_with("configuration error"), "{message}");
                    }
                }
            }

            #[test]
            fn valid_numbers_are_read_exactly(
                port in any::<u16>(),
                grace in 1..=MAX_GRACE_PERIOD_MS,
                replicas in 1..=5usize,
            ) {
                let s = load_from::<TestSettings>(
                    CommonSettings::default(),
                    env(&[
                        ("VOICEROOMS__HTTP__PORT", &port.to_string()),
                        ("VOICEROOMS__SHUTDOWN__GRACE_PERIOD_MS", &grace.to_string()),
                        ("VOICEROOMS__NATS__REPLICAS", &replicas.to_string()),
                    ]),
                    None,
                )
                .unwrap();
                prop_assert_eq!(s.common.http.port, port);
                prop_assert_eq!(s.common.shutdown.grace_period_ms, grace);
                prop_assert_eq!(s.common.nats.replicas, replicas);
            }
        }
    }

    #[test]
    fn a_config_file_sits_between_defaults_and_env() {
        let dir = std::env::temp_dir().join(format!("vr-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settings.toml");
        std::fs::write(&path, "[http]\nport = 7000\nhost = \"0.0.0.0\"\n").unwrap();
        let s: Settings<TestSettings> = load_from(
            CommonSettings::default(),
            env(&[("VOICEROOMS__HTTP__PORT", "7001")]),
            Some(path.to_str().unwrap()),
        )
        .unwrap();
        assert_eq!(s.common.http.host, "0.0.0.0");
        assert_eq!(s.common.http.port, 7001);
        let missing = load_from::<TestSettings>(
            CommonSettings::default(),
            None,
            Some("/nonexistent/settings.toml"),
        );
        assert!(missing.is_err());
    }
}
