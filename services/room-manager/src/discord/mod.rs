//! Discord REST client: reqwest (rustls) behind twilight's rate-limit manager, with retries.
//!
//! Every request goes through the same path:
//!
//! 1. wait while a global 429 is in force (`X-RateLimit-Global` / scope `global`), and for this
//!    replica's share of the global limit (`global_rate_limit` divided by the live replicas);
//! 2. take a permit from [`twilight_http_ratelimiting::RateLimiter`], which queues requests per
//!    bucket (learned from `X-RateLimit-Bucket`; keyed by route and major parameter, see
//!    [`limits::limiter_path`]) with at most one request per bucket in flight — a request waits,
//!    it is not failed;
//! 3. send, and hand the response's bucket headers back to the limiter — on every response, 4xx
//!    and 5xx included — keeping back one request of the bucket per other live replica
//!    ([`limits::reserve`]), so replicas sharing the bot's buckets do not run into 429s;
//! 4. on 429 wait exactly what Discord says (`retry_after`; per bucket, shared or global) and
//!    try again, at most `max_rate_limit_waits` times; on 5xx or a timeout back off
//!    1 → 2 → 4 → 8 → 16 s (`retry_base_ms` doubled), at most `max_retries` times; then a typed
//!    [`DiscordError`].
//!
//! Creates (`POST`) are never sent twice blindly: when an attempt's outcome is unknown (timeout,
//! connection lost after sending, 5xx) the object is looked up (by the nonce tag in its role's
//! name, or the role in its channel's overwrites) at each retry, and only posted again once a
//! lookup made `request_timeout_ms` after the lost attempt still finds nothing.
//!
//! Requests waiting for a permit are bounded (`max_queued_requests`): past it a request fails with
//! [`DiscordError::QueueFull`] at once. 4xx answers other than 429 are never retried, so the
//! invalid-request budget (10,000 per 10 min) is only spent by real mistakes. Once shutdown's
//! cut-off passes ([`DiscordClient::stop`]), every call fails at once with
//! [`DiscordError::ShuttingDown`], so handlers unwind and answer within the grace period.
//!
//! The bot token lives in one header value marked sensitive; it is never logged or put in an error.

pub mod limits;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use twilight_http_ratelimiting::{Endpoint, Method, RateLimitHeaders, RateLimiter};
use voicerooms_contract::{ApiError, ErrorCode};
use voicerooms_platform::retry::Backoff;
use voicerooms_platform::Secret;

use self::limits::header_str;

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
/// Unknown guild.
pub const UNKNOWN_GUILD: u64 = 10004;
/// Missing access (e.g. the bot is not in the guild).
pub const MISSING_ACCESS: u64 = 50001;
/// The guild has Discord's maximum of roles (250).
pub const MAX_ROLES: u64 = 30005;
/// The guild has Discord's maximum of channels (500).
pub const MAX_CHANNELS: u64 = 30013;
/// Voice channel type.
pub const GUILD_VOICE: u8 = 2;

/// Longest error message we keep from Discord.
const MAX_ERROR_CHARS: usize = 300;
/// Largest response body read (Discord's answers here are a few KiB; a guild's channel list
/// stays well under this).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

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
    /// The service is shutting down and no longer calls Discord.
    #[error("shutting down: no more discord calls")]
    ShuttingDown,
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
            DiscordError::ShuttingDown => ApiError::new(
                ErrorCode::Unavailable,
                "room-manager is restarting; try again",
            ),
        }
    }
}

/// Retry policy of the client.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Delays between retries after 5xx and timeouts: `retry_base_ms` doubling (1, 2, 4, 8,
    /// 16 s), exactly as the product specifies (no jitter: a bucket's own queue spreads requests).
    pub backoff: Backoff,
    pub max_retries: u32,
    pub max_rate_limit_waits: u32,
    pub timeout: Duration,
}

impl RetryPolicy {
    /// `base` doubling up to its `max_retries`th value.
    pub fn new(
        base: Duration,
        max_retries: u32,
        max_rate_limit_waits: u32,
        timeout: Duration,
    ) -> Self {
        let top = Backoff::new(base, Duration::MAX).nominal_delay(max_retries.max(1));
        Self {
            backoff: Backoff::new(base, top),
            max_retries,
            max_rate_limit_waits,
            timeout,
        }
    }

    /// Delay before transient retry number `n` (1-based): base × 2^(n-1).
    pub fn backoff(&self, n: u32) -> Duration {
        self.backoff.delay(n)
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

impl Channel {
    pub fn id_u64(&self) -> Option<u64> {
        self.id.parse().ok()
    }

    /// Whether one of its overwrites is for role `role`.
    pub fn names_role(&self, role: u64) -> bool {
        self.permission_overwrites
            .iter()
            .any(|o| o.kind == 0 && o.id.parse::<u64>().ok() == Some(role))
    }

    /// Whether its overwrites are exactly a room channel's (see [`room_overwrites`]) for some
    /// role that is not in `roles` — one of ours whose role was deleted (a create's channel that
    /// arrived after its rollback).
    pub fn is_ours_without_role(&self, guild: u64, bot: u64, roles: &HashSet<u64>) -> bool {
        let Some(role) = self.roles().find(|r| *r != guild && !roles.contains(r)) else {
            return false;
        };
        let mut mine = self.permission_overwrites.clone();
        let mut shape = room_overwrites(guild, role, bot);
        mine.sort_by(|a, b| a.id.cmp(&b.id));
        shape.sort_by(|a, b| a.id.cmp(&b.id));
        mine == shape
    }

    /// The roles its overwrites name.
    pub fn roles(&self) -> impl Iterator<Item = u64> + '_ {
        self.permission_overwrites
            .iter()
            .filter(|o| o.kind == 0)
            .filter_map(|o| o.id.parse().ok())
    }
}

/// A role as we read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Role {
    pub id: String,
    pub name: String,
}

impl Role {
    pub fn id_u64(&self) -> Option<u64> {
        self.id.parse().ok()
    }
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

/// What one attempt came to.
enum Attempt {
    /// 2xx.
    Done(u16, Bytes),
    /// 4xx other than 429: final.
    Refused(DiscordError),
    /// 429: wait this long, then try again.
    RateLimited(Duration),
    /// 5xx, timeout, transport error. `ambiguous`: Discord may have acted on it.
    Transient { ambiguous: bool, last: String },
}

/// This replica's share of the global limit, per second.
struct GlobalWindow {
    started: Instant,
    used: u32,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    auth: HeaderValue,
    limiter: RateLimiter,
    /// Until when a global 429 stops every request. Std mutexes here are held for a read or a
    /// write, never across an await.
    global_until: Mutex<Option<Instant>>,
    global_window: Mutex<GlobalWindow>,
    global_limit: u32,
    /// Live replicas sharing the bot's limits (at least 1), kept up to date by the replica
    /// registry.
    replicas: Arc<AtomicU32>,
    queue: Semaphore,
    policy: RetryPolicy,
    metrics: DiscordMetrics,
    stop: CancellationToken,
}

/// The Discord REST client. Cheap to clone.
#[derive(Clone)]
pub struct DiscordClient {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        let global_limit = global_limit.max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base: base.trim_end_matches('/').to_owned(),
                auth,
                limiter: RateLimiter::new(global_limit),
                global_until: Mutex::new(None),
                global_window: Mutex::new(GlobalWindow {
                    started: Instant::now(),
                    used: 0,
                }),
                global_limit: u32::from(global_limit),
                replicas: Arc::new(AtomicU32::new(1)),
                queue: Semaphore::new(max_queued.max(1)),
                policy,
                metrics,
                stop: CancellationToken::new(),
            }),
        })
    }

    pub fn metrics(&self) -> &DiscordMetrics {
        &self.inner.metrics
    }

    /// The number of live replicas sharing the bot's rate limits (written by the registry).
    pub fn replicas(&self) -> Arc<AtomicU32> {
        self.inner.replicas.clone()
    }

    /// Cancel to stop calling Discord: every call in progress or to come fails at once with
    /// [`DiscordError::ShuttingDown`].
    pub fn stop(&self) -> &CancellationToken {
        &self.inner.stop
    }

    fn replica_count(&self) -> u32 {
        self.inner.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Waits for this replica's share of the global limit.
    async fn global_permit(&self) {
        let inner = &self.inner;
        loop {
            // 1. A global 429 stops everyone until it passes.
            let until = *lock(&inner.global_until);
            if let Some(t) = until.filter(|t| *t > Instant::now()) {
                tokio::time::sleep_until(t).await;
                continue;
            }
            let share = inner
                .global_limit
                .checked_div(self.replica_count())
                .unwrap_or(1)
                .max(1);
            let wait = {
                let mut w = lock(&inner.global_window);
                let now = Instant::now();
                if now.duration_since(w.started) >= Duration::from_secs(1) {
                    w.started = now;
                    w.used = 0;
                }
                if w.used < share {
                    w.used = w.used.saturating_add(1);
                    None
                } else {
                    Some(w.started.into_std())
                }
            };
            match wait {
                None => return,
                Some(started) => {
                    let next = limits::after(started, Duration::from_secs(1));
                    tokio::time::sleep_until(next.into()).await;
                }
            }
        }
    }

    /// One attempt through the limiter.
    async fn attempt(
        &self,
        method: Method,
        route: &'static str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Attempt, DiscordError> {
        let inner = &self.inner;
        let started = Instant::now();
        let slot = inner
            .queue
            .try_acquire()
            .map_err(|_| DiscordError::QueueFull)?;
        inner.metrics.queue_depth.inc();
        self.global_permit().await;
        let permit = inner
            .limiter
            .acquire(Endpoint {
                method,
                path: limits::limiter_path(path),
            })
            .await;
        inner.metrics.queue_depth.dec();
        drop(slot);
        let waited = started.elapsed();
        if waited > Duration::from_millis(1) {
            inner.metrics.rate_limit_wait.observe(waited.as_secs_f64());
        }
        let url = format!("{}/{}", inner.base, path);
        let mut req = inner
            .http
            .request(to_reqwest(method), &url)
            .header(reqwest::header::AUTHORIZATION, inner.auth.clone());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                drop(permit);
                let kind = if e.is_timeout() { "timeout" } else { "error" };
                self.count(route, method, kind);
                // Never echo the URL with reqwest's error: only its kind. A refused connection
                // never reached Discord; anything else may have.
                let (ambiguous, last) = if e.is_connect() {
                    (false, "connection failed")
                } else if e.is_timeout() {
                    (true, "timed out")
                } else {
                    (true, "transport error")
                };
                return Ok(Attempt::Transient {
                    ambiguous,
                    last: last.to_owned(),
                });
            }
        };
        let status = resp.status().as_u16();
        self.count(route, method, &status.to_string());
        let headers = resp.headers().clone();
        let received = std::time::Instant::now();
        let reserve = limits::reserve(self.replica_count());
        let bucket = limits::bucket_headers(&headers, received, reserve);
        let bytes = read_body(resp).await;
        if status == 429 {
            let parsed: Option<RateLimitBody> = serde_json::from_slice(&bytes).ok();
            let scope = header_str(&headers, "x-ratelimit-scope").unwrap_or("user");
            let global = parsed.as_ref().and_then(|b| b.global).unwrap_or(false)
                || header_str(&headers, "x-ratelimit-global") == Some("true")
                || scope == "global";
            let retry_after = limits::retry_after(parsed.and_then(|b| b.retry_after), &headers);
            let scope_label = if global { "global" } else { scope };
            inner
                .metrics
                .rate_limited
                .get_or_create(&vec![("scope".to_owned(), scope_label.to_owned())])
                .inc();
            let until = limits::after(Instant::now().into_std(), retry_after);
            if global {
                let mut g = lock(&inner.global_until);
                if g.is_none_or(|t| t.into_std() < until) {
                    *g = Some(until.into());
                }
                permit.complete(None);
            } else {
                // The bucket is empty until retry_after (user or shared scope).
                let exhausted = bucket.map(|b| RateLimitHeaders {
                    bucket: b.bucket,
                    limit: b.limit.max(1),
                    remaining: 0,
                    reset_at: until,
                });
                permit.complete(exhausted);
            }
            tracing::info!(
                route,
                scope = scope_label,
                retry_after_ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
                "discord rate limited; waiting as told"
            );
            inner
                .metrics
                .rate_limit_wait
                .observe(retry_after.as_secs_f64());
            return Ok(Attempt::RateLimited(retry_after));
        }
        permit.complete(bucket);
        if status >= 500 {
            return Ok(Attempt::Transient {
                ambiguous: true,
                last: format!("status {status}"),
            });
        }
        if status >= 400 {
            let body: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
            let (code, message) = match body {
                Some(b) => (b.code.unwrap_or(0), b.message.unwrap_or_default()),
                None => (0, String::from_utf8_lossy(&bytes).into_owned()),
            };
            return Ok(Attempt::Refused(DiscordError::Api {
                status,
                code,
                message: message.chars().take(MAX_ERROR_CHARS).collect(),
            }));
        }
        Ok(Attempt::Done(status, bytes))
    }

    /// Sends one idempotent request (GET, PUT, PATCH, DELETE) with the retry policy, in a
    /// `discord.request` span (child of the command or event being handled) that records the
    /// final status. `route` is the path template, for metrics (`/guilds/{g}/channels`).
    async fn call(
        &self,
        method: Method,
        route: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Bytes), DiscordError> {
        let retries = self.inner.policy.max_retries;
        self.call_with(method, route, path, body, retries).await
    }

    /// [`DiscordClient::call`] with at most `max_retries` retries after 5xx or timeouts (429s
    /// are still waited out). Lookups inside a create's retry loop make one attempt each.
    async fn call_with(
        &self,
        method: Method,
        route: &'static str,
        path: String,
        body: Option<serde_json::Value>,
        max_retries: u32,
    ) -> Result<(u16, Bytes), DiscordError> {
        let work = async {
            let policy = &self.inner.policy;
            let (mut transient, mut waits) = (0u32, 0u32);
            loop {
                match self.attempt(method, route, &path, body.as_ref()).await? {
                    Attempt::Done(status, bytes) => return Ok((status, bytes)),
                    Attempt::Refused(e) => return Err(e),
                    Attempt::RateLimited(wait) => {
                        waits = waits.saturating_add(1);
                        if waits > policy.max_rate_limit_waits {
                            return Err(rate_limited(waits, wait));
                        }
                        tokio::time::sleep(wait).await;
                    }
                    Attempt::Transient { last, .. } => {
                        transient = transient.saturating_add(1);
                        if transient > max_retries {
                            return Err(DiscordError::Unavailable {
                                attempts: transient,
                                last,
                            });
                        }
                        let delay = policy.backoff(transient);
                        tracing::warn!(route, attempt = transient, delay_ms = millis(delay), error = %last, "discord request failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        };
        self.traced(method, route, work).await
    }

    /// Creates an object with `POST`, never twice: when an attempt's outcome is unknown,
    /// `lookup` is asked whether the object exists at each retry, and the `POST` is only sent
    /// again once a lookup made `request_timeout` after the lost attempt finds nothing.
    async fn create<T, L, Fut>(
        &self,
        route: &'static str,
        path: String,
        body: serde_json::Value,
        lookup: L,
    ) -> Result<T, DiscordError>
    where
        T: for<'de> Deserialize<'de>,
        L: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, DiscordError>>,
    {
        let work = async {
            let policy = &self.inner.policy;
            let (mut transient, mut waits) = (0u32, 0u32);
            loop {
                match self
                    .attempt(Method::Post, route, &path, Some(&body))
                    .await?
                {
                    Attempt::Done(_, bytes) => return decode(&bytes),
                    Attempt::Refused(e) => return Err(e),
                    Attempt::RateLimited(wait) => {
                        waits = waits.saturating_add(1);
                        if waits > policy.max_rate_limit_waits {
                            return Err(rate_limited(waits, wait));
                        }
                        tokio::time::sleep(wait).await;
                    }
                    Attempt::Transient {
                        ambiguous,
                        mut last,
                    } => {
                        let settled = limits::after(std::time::Instant::now(), policy.timeout);
                        loop {
                            transient = transient.saturating_add(1);
                            if transient > policy.max_retries {
                                return Err(DiscordError::Unavailable {
                                    attempts: transient,
                                    last,
                                });
                            }
                            let delay = policy.backoff(transient);
                            tracing::warn!(route, attempt = transient, delay_ms = millis(delay), ambiguous, error = %last, "discord create failed; retrying");
                            tokio::time::sleep(delay).await;
                            if !ambiguous {
                                break;
                            }
                            // It may exist: look before posting again.
                            match lookup().await {
                                Ok(Some(found)) => {
                                    tracing::info!(
                                        route,
                                        "the create went through after all; not posting again"
                                    );
                                    return Ok(found);
                                }
                                Ok(None) if std::time::Instant::now() >= settled => break,
                                Ok(None) => {}
                                Err(e) => last = format!("lookup: {e}"),
                            }
                        }
                    }
                }
            }
        };
        self.traced(Method::Post, route, work).await
    }

    /// Runs `work` in a `discord.request` span, unless shutdown's cut-off stops it first.
    async fn traced<T>(
        &self,
        method: Method,
        route: &'static str,
        work: impl Future<Output = Result<T, DiscordError>>,
    ) -> Result<T, DiscordError> {
        let span = tracing::info_span!(
            "discord.request",
            route,
            method = method.name(),
            status = tracing::field::Empty
        );
        let stop = self.inner.stop.clone();
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => Err(DiscordError::ShuttingDown),
            r = work.instrument(span.clone()) => r,
        };
        match &result {
            Ok(_) => span.record("status", "ok"),
            Err(e) => span.record("status", tracing::field::display(e)),
        };
        result
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
        decode(&bytes)
    }

    /// Creates a private voice channel: @everyone denied view/connect, `role` allowed, the bot
    /// allowed (and may move members in). `role` is unique to this create, so a channel whose
    /// overwrites name it is this create's channel.
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
            "type": GUILD_VOICE,
            "user_limit": user_limit,
            "permission_overwrites": room_overwrites(guild, role, bot),
        });
        self.create(
            "/guilds/{g}/channels",
            format!("guilds/{guild}/channels"),
            body,
            || async move {
                let channels: Vec<Channel> = self.list_once(guild, "channels").await?;
                Ok(oldest(
                    channels
                        .into_iter()
                        .filter(|c| c.kind == GUILD_VOICE && c.names_role(role)),
                    Channel::id_u64,
                ))
            },
        )
        .await
    }

    /// Creates a role named `name` (which must be unique: it carries the create's nonce).
    pub async fn create_role(&self, guild: u64, name: &str) -> Result<Role, DiscordError> {
        let body =
            json!({ "name": name, "permissions": "0", "mentionable": false, "hoist": false });
        self.create(
            "/guilds/{g}/roles",
            format!("guilds/{guild}/roles"),
            body,
            || async move {
                let roles: Vec<Role> = self.list_once(guild, "roles").await?;
                Ok(oldest(
                    roles.into_iter().filter(|r| r.name == name),
                    Role::id_u64,
                ))
            },
        )
        .await
    }

    /// The roles called exactly `name`, oldest first.
    pub async fn roles_named(&self, guild: u64, name: &str) -> Result<Vec<Role>, DiscordError> {
        let mut found: Vec<Role> = self
            .guild_roles(guild)
            .await?
            .into_iter()
            .filter(|r| r.name == name)
            .collect();
        found.sort_by_key(|r| r.id_u64().unwrap_or(u64::MAX));
        Ok(found)
    }

    /// `GET /guilds/{guild}/{what}` (channels or roles) in one attempt: a create's lookups are
    /// already inside its retry loop.
    async fn list_once<T: for<'de> Deserialize<'de>>(
        &self,
        guild: u64,
        what: &'static str,
    ) -> Result<Vec<T>, DiscordError> {
        let route = if what == "roles" {
            "/guilds/{g}/roles"
        } else {
            "/guilds/{g}/channels"
        };
        let (_, bytes) = self
            .call_with(
                Method::Get,
                route,
                format!("guilds/{guild}/{what}"),
                None,
                0,
            )
            .await?;
        decode(&bytes)
    }

    /// Deletes a channel; an already deleted channel is success.
    pub async fn delete_channel(&self, channel: u64) -> Result<(), DiscordError> {
        gone_is_ok(
            self.call(
                Method::Delete,
                "/channels/{c}",
                format!("channels/{channel}"),
                None,
            )
            .await,
        )
    }

    /// Deletes a role; an already deleted role is success.
    pub async fn delete_role(&self, guild: u64, role: u64) -> Result<(), DiscordError> {
        gone_is_ok(
            self.call(
                Method::Delete,
                "/guilds/{g}/roles/{r}",
                format!("guilds/{guild}/roles/{role}"),
                None,
            )
            .await,
        )
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
        gone_is_ok(
            self.call(
                Method::Delete,
                "/guilds/{g}/members/{u}/roles/{r}",
                format!("guilds/{guild}/members/{user}/roles/{role}"),
                None,
            )
            .await,
        )
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

    /// A channel, or `None` when Discord says it does not exist.
    pub async fn channel(&self, channel: u64) -> Result<Option<Channel>, DiscordError> {
        match self
            .json(
                Method::Get,
                "/channels/{c}",
                format!("channels/{channel}"),
                None,
            )
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
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

/// The item with the lowest id (the first one made).
fn oldest<T>(items: impl Iterator<Item = T>, id: impl Fn(&T) -> Option<u64>) -> Option<T> {
    items.min_by_key(|t| id(t).unwrap_or(u64::MAX))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DiscordError> {
    serde_json::from_slice(bytes).map_err(|e| DiscordError::Decode(e.to_string()))
}

fn gone_is_ok(r: Result<(u16, Bytes), DiscordError>) -> Result<(), DiscordError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

fn rate_limited(waits: u32, wait: Duration) -> DiscordError {
    DiscordError::RateLimited {
        waits,
        retry_after_ms: millis(wait),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads at most [`MAX_BODY_BYTES`] of a response; a body cut short reads as what arrived.
async fn read_body(mut resp: reqwest::Response) -> Bytes {
    let mut buf = BytesMut::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_BODY_BYTES.saturating_sub(buf.len());
        if chunk.len() > room {
            buf.extend_from_slice(chunk.get(..room).unwrap_or_default());
            break;
        }
        buf.extend_from_slice(&chunk);
    }
    buf.freeze()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base() {
        let p = RetryPolicy::new(Duration::from_secs(1), 5, 10, Duration::from_secs(10));
        let delays: Vec<u64> = (1..=5).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16]);
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
        assert_eq!(
            DiscordError::ShuttingDown.to_api().code,
            ErrorCode::Unavailable
        );
    }
}
