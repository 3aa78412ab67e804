//! Discord REST client: reqwest (rustls) behind twilight's rate-limit manager, with retries.
//!
//! Every request goes through the same path:
//!
//! 1. wait while a global 429 is in force (`X-RateLimit-Global` / scope `global`);
//! 2. take a permit from [`twilight_http_ratelimiting::RateLimiter`], which queues requests per
//!    bucket (learned from `X-RateLimit-Bucket`, so routes sharing a bucket id share a queue) and
//!    keeps under the global 50/s — a request waits, it is not failed;
//! 3. send, hand the response's bucket headers back to the limiter;
//! 4. on 429 wait exactly what Discord says (`retry_after`; per bucket, shared or global) and
//!    try again, at most `max_rate_limit_waits` times; on 5xx or a timeout back off
//!    1 → 2 → 4 → 8 → 16 s (`retry_base_ms` doubled), at most `max_retries` times; then a typed
//!    [`DiscordError`].
//!
//! Requests waiting for a permit are bounded (`max_queued_requests`): past it a request fails with
//! [`DiscordError::QueueFull`] at once. 4xx answers other than 429 are never retried, so the
//! invalid-request budget (10,000 per 10 min) is only spent by real mistakes.
//!
//! The bot token lives in one header value marked sensitive; it is never logged or put in an error.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;
use twilight_http_ratelimiting::{Endpoint, Method, RateLimitHeaders, RateLimiter};
use voicerooms_contract::{ApiError, ErrorCode};
use voicerooms_platform::Secret;

/// VIEW_CHANNEL.
pub const VIEW_CHANNEL: u64 = 1 << 10;
/// CONNECT.
pub const CONNECT: u64 = 1 << 20;
/// MOVE_MEMBERS.
pub const MOVE_MEMBERS: u64 = 1 << 24;
/// MANAGE_CHANNELS.
pub const MANAGE_CHANNELS: u64 = 1 << 4;
/// Discord's JSON code for "Target user is not connected to voice".
pub const NOT_IN_VOICE: u64 = 40032;
/// Unknown member.
pub const UNKNOWN_MEMBER: u64 = 10007;

/// Longest error body we keep from Discord (for the message).
const MAX_ERROR_BODY: usize = 2048;
/// Longest wait a single 429 may impose before we give up on the request.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why a Discord call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscordError {
    /// Discord answered with an error status (not 429, not 5xx after retries).
    #[error("discord answered {status} (code {code}): {message}")]
    Api {
        status: u16,
        code: u64,
        message: String,
    },
    /// Still rate limited after `max_rate_limit_waits` waits.
    #[error("discord rate limited the request {waits} times; retry after {retry_after_ms} ms")]
    RateLimited { waits: u32, retry_after_ms: u64 },
    /// 5xx or transport errors after every retry.
    #[error("discord unavailable after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    /// The request queue is full.
    #[error("too many discord requests queued")]
    QueueFull,
    /// Discord's answer could not be read.
    #[error("unexpected discord answer: {0}")]
    Decode(String),
}

impl DiscordError {
    /// Discord's JSON error code, when it gave one.
    pub fn json_code(&self) -> Option<u64> {
        match self {
            DiscordError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            DiscordError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// 404: the object is already gone (deleting it again is success).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The API error a client sees.
    pub fn to_api(&self) -> ApiError {
        match self {
            DiscordError::RateLimited { retry_after_ms, .. } => {
                let mut e = ApiError::new(ErrorCode::RateLimited, "Discord is rate limiting us");
                e.retry_after_ms = Some(*retry_after_ms);
                e
            }
            DiscordError::QueueFull => {
                let mut e =
                    ApiError::new(ErrorCode::RateLimited, "too many Discord requests queued");
                e.retry_after_ms = Some(1_000);
                e
            }
            DiscordError::Unavailable { .. } => {
                ApiError::new(ErrorCode::DiscordUnavailable, "Discord did not answer")
            }
            DiscordError::Api {
                status,
                code,
                message,
                ..
            } => ApiError::new(
                ErrorCode::DiscordUnavailable,
                format!("Discord refused ({status}, code {code}): {message}"),
            ),
            DiscordError::Decode(m) => ApiError::new(
                ErrorCode::DiscordUnavailable,
                format!("unexpected Discord answer: {m}"),
            ),
        }
    }
}

/// Retry policy of the client.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max_retries: u32,
    pub max_rate_limit_waits: u32,
    pub timeout: Duration,
}

impl RetryPolicy {
    /// Delay before transient retry number `n` (1-based): base × 2^(n-1).
    pub fn backoff(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
    }
}

/// Metrics of the Discord client.
#[derive(Clone)]
pub struct DiscordMetrics {
    /// Calls by route template, method and status ("timeout", "error" for transport errors).
    pub calls: Family<Vec<(String, String)>, Counter>,
    /// Time spent waiting for a rate-limit permit or a 429's `retry_after`, in seconds.
    pub rate_limit_wait: Histogram,
    /// 429 answers received, by scope.
    pub rate_limited: Family<Vec<(String, String)>, Counter>,
    /// Requests waiting for a rate-limit permit.
    pub queue_depth: Gauge<i64, AtomicI64>,
}

impl Default for DiscordMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DiscordMetrics {
    pub fn new() -> Self {
        Self {
            calls: Family::default(),
            rate_limit_wait: Histogram::new([
                0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
            ]),
            rate_limited: Family::default(),
            queue_depth: Gauge::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "discord_calls",
            "Discord REST calls by route, method and status",
            self.calls.clone(),
        );
        registry.register(
            "discord_rate_limit_wait_seconds",
            "Time Discord requests waited for rate limits",
            self.rate_limit_wait.clone(),
        );
        registry.register(
            "discord_rate_limited",
            "429 answers from Discord by scope",
            self.rate_limited.clone(),
        );
        registry.register(
            "discord_queue_depth",
            "Discord requests waiting for a rate-limit permit",
            self.queue_depth.clone(),
        );
    }
}

/// A channel as we read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Channel {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: u8,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub user_limit: Option<u32>,
    #[serde(default)]
    pub permission_overwrites: Vec<Overwrite>,
}

/// A permission overwrite (`type` 0 role, 1 member; bits as decimal strings).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Overwrite {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: u8,
    pub allow: String,
    pub deny: String,
}

/// A role as we read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Role {
    pub id: String,
    pub name: String,
}

/// A guild in `/users/@me/guilds`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartialGuild {
    pub id: String,
}

#[derive(Deserialize)]
struct RateLimitBody {
    #[serde(default)]
    retry_after: Option<f64>,
    #[serde(default)]
    global: Option<bool>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    auth: HeaderValue,
    limiter: RateLimiter,
    /// Until when a global 429 stops every request. A std mutex: held for a read or a write,
    /// never across an await.
    global_until: Mutex<Option<Instant>>,
    queue: Semaphore,
    policy: RetryPolicy,
    metrics: DiscordMetrics,
}

/// The Discord REST client. Cheap to clone.
#[derive(Clone)]
pub struct DiscordClient {
    inner: Arc<Inner>,
}

impl DiscordClient {
    /// Builds the client. `base` is e.g. `https://discord.com/api/v10`.
    pub fn new(
        base: &str,
        token: &Secret,
        policy: RetryPolicy,
        global_limit: u16,
        max_queued: usize,
        metrics: DiscordMetrics,
    ) -> Result<Self, DiscordError> {
        let mut auth = HeaderValue::from_str(&format!("Bot {}", token.expose()))
            .map_err(|_| DiscordError::Decode("bot token is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .user_agent("DiscordBot (https://github.com/voicerooms, 0.1) room-manager")
            .timeout(policy.timeout)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| DiscordError::Decode(format!("http client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base: base.trim_end_matches('/').to_owned(),
                auth,
                limiter: RateLimiter::new(global_limit.max(1)),
                global_until: Mutex::new(None),
                queue: Semaphore::new(max_queued.max(1)),
                policy,
                metrics,
            }),
        })
    }

    pub fn metrics(&self) -> &DiscordMetrics {
        &self.inner.metrics
    }

    /// Sends one request through the rate-limit manager with the retry policy, in a
    /// `discord.request` span (child of the command or event being handled) that records the
    /// final status. `route` is the path template, for metrics (`/guilds/{g}/channels`).
    async fn call(
        &self,
        method: Method,
        route: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Bytes), DiscordError> {
        let span = tracing::info_span!(
            "discord.request",
            route,
            method = method.name(),
            status = tracing::field::Empty
        );
        let result = self
            .call_with_retries(method, route, path, body)
            .instrument(span.clone())
            .await;
        match &result {
            Ok((status, _)) => span.record("status", *status),
            Err(e) => span.record("status", tracing::field::display(e)),
        };
        result
    }

    async fn call_with_retries(
        &self,
        method: Method,
        route: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Bytes), DiscordError> {
        let inner = &self.inner;
        let mut transient = 0u32;
        let mut waits = 0u32;
        loop {
            // 1. A global 429 stops everyone until it passes.
            let started = Instant::now();
            loop {
                let until = *inner.global_until.lock().unwrap_or_else(|p| p.into_inner());
                match until {
                    Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                    _ => break,
                }
            }
            // 2. A permit for the bucket (bounded queue).
            let slot = inner
                .queue
                .try_acquire()
                .map_err(|_| DiscordError::QueueFull)?;
            inner.metrics.queue_depth.inc();
            let permit = inner
                .limiter
                .acquire(Endpoint {
                    method,
                    path: path.clone(),
                })
                .await;
            inner.metrics.queue_depth.dec();
            drop(slot);
            let waited = started.elapsed();
            if waited > Duration::from_millis(1) {
                inner.metrics.rate_limit_wait.observe(waited.as_secs_f64());
            }
            // 3. Send.
            let url = format!("{}/{}", inner.base, path);
            let mut req = inner
                .http
                .request(to_reqwest(method), &url)
                .header(reqwest::header::AUTHORIZATION, inner.auth.clone());
            if let Some(b) = &body {
                req = req.json(b);
            }
            let sent = req.send().await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    drop(permit);
                    let kind = if e.is_timeout() { "timeout" } else { "error" };
                    self.count(route, method, kind);
                    transient += 1;
                    // Never echo the URL with reqwest's error: only its kind.
                    let last = if e.is_timeout() {
                        "timed out".to_owned()
                    } else if e.is_connect() {
                        "connection failed".to_owned()
                    } else {
                        "transport error".to_owned()
                    };
                    if transient > inner.policy.max_retries {
                        return Err(DiscordError::Unavailable {
                            attempts: transient,
                            last,
                        });
                    }
                    let delay = inner.policy.backoff(transient);
                    tracing::warn!(route, attempt = transient, delay_ms = delay.as_millis() as u64, error = %last, "discord request failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            self.count(route, method, &status.to_string());
            let headers = resp.headers().clone();
            let bucket = parse_bucket_headers(&headers);
            let bytes = resp.bytes().await.unwrap_or_default();
            if status == 429 {
                let parsed: Option<RateLimitBody> = serde_json::from_slice(&bytes).ok();
                let scope = header_str(&headers, "x-ratelimit-scope").unwrap_or("user");
                let global = parsed.as_ref().and_then(|b| b.global).unwrap_or(false)
                    || header_str(&headers, "x-ratelimit-global") == Some("true")
                    || scope == "global";
                let retry_after = parsed
                    .and_then(|b| b.retry_after)
                    .or_else(|| header_str(&headers, "retry-after").and_then(|v| v.parse().ok()))
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_RETRY_AFTER);
                let scope_label = if global { "global" } else { scope };
                inner
                    .metrics
                    .rate_limited
                    .get_or_create(&vec![("scope".to_owned(), scope_label.to_owned())])
                    .inc();
                let until = Instant::now() + retry_after;
                if global {
                    let mut g = inner.global_until.lock().unwrap_or_else(|p| p.into_inner());
                    if g.is_none_or(|t| t < until) {
                        *g = Some(until);
                    }
                    permit.complete(None);
                } else {
                    // Tell the limiter the bucket is empty until retry_after (user or shared).
                    let exhausted = bucket.map(|b| RateLimitHeaders {
                        bucket: b.bucket,
                        limit: b.limit.max(1),
                        remaining: 0,
                        reset_at: until.into_std(),
                    });
                    permit.complete(exhausted);
                }
                waits += 1;
                if waits > inner.policy.max_rate_limit_waits {
                    return Err(DiscordError::RateLimited {
                        waits,
                        retry_after_ms: retry_after.as_millis() as u64,
                    });
                }
                tracing::info!(
                    route,
                    scope = scope_label,
                    retry_after_ms = retry_after.as_millis() as u64,
                    "discord rate limited; waiting as told"
                );
                inner
                    .metrics
                    .rate_limit_wait
                    .observe(retry_after.as_secs_f64());
                tokio::time::sleep_until(until).await;
                continue;
            }
            permit.complete(bucket);
            if status >= 500 {
                transient += 1;
                if transient > inner.policy.max_retries {
                    return Err(DiscordError::Unavailable {
                        attempts: transient,
                        last: format!("status {status}"),
                    });
                }
                let delay = inner.policy.backoff(transient);
                tracing::warn!(
                    route,
                    status,
                    attempt = transient,
                    delay_ms = delay.as_millis() as u64,
                    "discord server error; retrying"
                );
                tokio::time::sleep(delay).await;
                continue;
            }
            if status >= 400 {
                let body: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
                let (code, message) = match body {
                    Some(b) => (b.code.unwrap_or(0), b.message.unwrap_or_default()),
                    None => (
                        0,
                        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ERROR_BODY)])
                            .into_owned(),
                    ),
                };
                return Err(DiscordError::Api {
                    status,
                    code,
                    message: message.chars().take(300).collect(),
                });
            }
            return Ok((status, bytes));
        }
    }

    fn count(&self, route: &'static str, method: Method, status: &str) {
        self.inner
            .metrics
            .calls
            .get_or_create(&vec![
                ("route".to_owned(), route.to_owned()),
                ("method".to_owned(), method.name().to_owned()),
                ("status".to_owned(), status.to_owned()),
            ])
            .inc();
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        route: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<T, DiscordError> {
        let (_, bytes) = self.call(method, route, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| DiscordError::Decode(e.to_string()))
    }

    /// Creates a private voice channel: @everyone denied view/connect, `role` allowed, the bot
    /// allowed (and may move members in).
    pub async fn create_room_channel(
        &self,
        guild: u64,
        name: &str,
        user_limit: u8,
        role: u64,
        bot: u64,
    ) -> Result<Channel, DiscordError> {
        let body = json!({
            "name": name,
            "type": 2,
            "user_limit": user_limit,
            "permission_overwrites": room_overwrites(guild, role, bot),
        });
        self.json(
            Method::Post,
            "/guilds/{g}/channels",
            format!("guilds/{guild}/channels"),
            Some(body),
        )
        .await
    }

    pub async fn create_role(&self, guild: u64, name: &str) -> Result<Role, DiscordError> {
        let body =
            json!({ "name": name, "permissions": "0", "mentionable": false, "hoist": false });
        self.json(
            Method::Post,
            "/guilds/{g}/roles",
            format!("guilds/{guild}/roles"),
            Some(body),
        )
        .await
    }

    /// Deletes a channel; an already deleted channel is success.
    pub async fn delete_channel(&self, channel: u64) -> Result<(), DiscordError> {
        match self
            .call(
                Method::Delete,
                "/channels/{c}",
                format!("channels/{channel}"),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a role; an already deleted role is success.
    pub async fn delete_role(&self, guild: u64, role: u64) -> Result<(), DiscordError> {
        match self
            .call(
                Method::Delete,
                "/guilds/{g}/roles/{r}",
                format!("guilds/{guild}/roles/{role}"),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn add_member_role(
        &self,
        guild: u64,
        user: u64,
        role: u64,
    ) -> Result<(), DiscordError> {
        self.call(
            Method::Put,
            "/guilds/{g}/members/{u}/roles/{r}",
            format!("guilds/{guild}/members/{user}/roles/{role}"),
            None,
        )
        .await
        .map(|_| ())
    }

    pub async fn remove_member_role(
        &self,
        guild: u64,
        user: u64,
        role: u64,
    ) -> Result<(), DiscordError> {
        match self
            .call(
                Method::Delete,
                "/guilds/{g}/members/{u}/roles/{r}",
                format!("guilds/{guild}/members/{user}/roles/{role}"),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Adds a user to the guild with their OAuth2 access token (`guilds.join`), with `roles`.
    pub async fn add_guild_member(
        &self,
        guild: u64,
        user: u64,
        access_token: &str,
        roles: &[u64],
    ) -> Result<(), DiscordError> {
        let roles: Vec<String> = roles.iter().map(u64::to_string).collect();
        self.call(
            Method::Put,
            "/guilds/{g}/members/{u}",
            format!("guilds/{guild}/members/{user}"),
            Some(json!({ "access_token": access_token, "roles": roles })),
        )
        .await
        .map(|_| ())
    }

    /// Moves a member who is connected to voice (`Some`), or disconnects them (`None`).
    /// Discord answers 400 / 40032 when they are not connected.
    pub async fn move_member(
        &self,
        guild: u64,
        user: u64,
        channel: Option<u64>,
    ) -> Result<(), DiscordError> {
        let channel = channel.map(|c| c.to_string());
        self.call(
            Method::Patch,
            "/guilds/{g}/members/{u}",
            format!("guilds/{guild}/members/{user}"),
            Some(json!({ "channel_id": channel })),
        )
        .await
        .map(|_| ())
    }

    pub async fn guild_channels(&self, guild: u64) -> Result<Vec<Channel>, DiscordError> {
        self.json(
            Method::Get,
            "/guilds/{g}/channels",
            format!("guilds/{guild}/channels"),
            None,
        )
        .await
    }

    pub async fn guild_roles(&self, guild: u64) -> Result<Vec<Role>, DiscordError> {
        self.json(
            Method::Get,
            "/guilds/{g}/roles",
            format!("guilds/{guild}/roles"),
            None,
        )
        .await
    }

    pub async fn my_guilds(&self) -> Result<Vec<PartialGuild>, DiscordError> {
        self.json(
            Method::Get,
            "/users/@me/guilds",
            "users/@me/guilds".to_owned(),
            None,
        )
        .await
    }

    /// The bot's own user id.
    pub async fn me(&self) -> Result<u64, DiscordError> {
        #[derive(Deserialize)]
        struct Me {
            id: String,
        }
        let me: Me = self
            .json(Method::Get, "/users/@me", "users/@me".to_owned(), None)
            .await?;
        me.id
            .parse()
            .map_err(|_| DiscordError::Decode("bot id is not a snowflake".into()))
    }
}

/// The overwrites of a room's channel.
pub fn room_overwrites(guild: u64, role: u64, bot: u64) -> Vec<Overwrite> {
    vec![
        Overwrite {
            id: guild.to_string(),
            kind: 0,
            allow: "0".into(),
            deny: (VIEW_CHANNEL | CONNECT).to_string(),
        },
        Overwrite {
            id: role.to_string(),
            kind: 0,
            allow: (VIEW_CHANNEL | CONNECT).to_string(),
            deny: "0".into(),
        },
        Overwrite {
            id: bot.to_string(),
            kind: 1,
            allow: (VIEW_CHANNEL | CONNECT | MOVE_MEMBERS | MANAGE_CHANNELS).to_string(),
            deny: "0".into(),
        },
    ]
}

fn to_reqwest(m: Method) -> reqwest::Method {
    match m {
        Method::Delete => reqwest::Method::DELETE,
        Method::Get => reqwest::Method::GET,
        Method::Patch => reqwest::Method::PATCH,
        Method::Post => reqwest::Method::POST,
        Method::Put => reqwest::Method::PUT,
        _ => reqwest::Method::GET,
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The bucket headers of a response, when all of them are present and sane.
fn parse_bucket_headers(headers: &HeaderMap) -> Option<RateLimitHeaders> {
    let bucket = header_str(headers, RateLimitHeaders::BUCKET)?;
    let limit: u16 = header_str(headers, RateLimitHeaders::LIMIT)?.parse().ok()?;
    let remaining: u16 = header_str(headers, RateLimitHeaders::REMAINING)?
        .parse()
        .ok()?;
    let reset_after: f64 = header_str(headers, RateLimitHeaders::RESET_AFTER)?
        .parse()
        .ok()?;
    if !reset_after.is_finite() || reset_after < 0.0 || bucket.len() > 128 {
        return None;
    }
    let reset_after = Duration::from_secs_f64(reset_after).min(MAX_RETRY_AFTER);
    Some(RateLimitHeaders {
        bucket: bucket.as_bytes().to_vec(),
        limit,
        remaining,
        reset_at: std::time::Instant::now() + reset_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base() {
        let p = RetryPolicy {
            base: Duration::from_secs(1),
            max_retries: 5,
            max_rate_limit_waits: 10,
            timeout: Duration::from_secs(10),
        };
        let delays: Vec<u64> = (1..=5).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16]);
    }

    #[test]
    fn bucket_headers_are_parsed_only_when_complete_and_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-bucket", HeaderValue::from_static("abc"));
        h.insert("x-ratelimit-limit", HeaderValue::from_static("5"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("4"));
        assert!(parse_bucket_headers(&h).is_none());
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("1.5"));
        let parsed = parse_bucket_headers(&h).unwrap();
        assert_eq!((parsed.limit, parsed.remaining), (5, 4));
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("NaN"));
        assert!(parse_bucket_headers(&h).is_none());
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("-1"));
        assert!(parse_bucket_headers(&h).is_none());
    }

    #[test]
    fn errors_map_to_stable_codes_without_secrets() {
        let e = DiscordError::RateLimited {
            waits: 11,
            retry_after_ms: 1500,
        };
        assert_eq!(e.to_api().code, ErrorCode::RateLimited);
        assert_eq!(e.to_api().retry_after_ms, Some(1500));
        let e = DiscordError::Unavailable {
            attempts: 6,
            last: "status 502".into(),
        };
        assert_eq!(e.to_api().code, ErrorCode::DiscordUnavailable);
    }
}
