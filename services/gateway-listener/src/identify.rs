//! When a shard may send IDENTIFY, across every replica: Discord's `max_concurrency` and the
//! daily session-start budget, kept in JetStream KV.
//!
//! Discord groups shards by rate-limit key `shard_id % max_concurrency`; each key allows one
//! IDENTIFY per 5 s (so at most `max_concurrency` per 5 s in all), and a bot has a daily budget of
//! session starts (`session_start_limit`; running out resets the token). Pacing per process is
//! not enough once several replicas run shards (issue 15, defect 4: four replicas sent four
//! identifies within 30 ms and Discord refused three).
//!
//! The queue is one KV entry, `identify` in the lease bucket: for each rate-limit key the
//! wall-clock time of its last granted turn, and the session starts left today. A shard takes a
//! turn by compare-and-set on that entry: it waits until its key's last turn is 5 s (plus a
//! margin for clock skew and latency) old, checks the budget, and writes the new time and the
//! budget minus one; a concurrent claim makes the write fail and the shard reads again. So two
//! turns of one key are never granted less than 5 s apart, whichever replicas ask.
//!
//! The budget is the smaller of what the entry says and what `GET /gateway/bot` said (fetched
//! at most once per 5 s per process), until Discord's reset time passes. When it would fall to
//! `gateway.session_start_reserve`, no turn is granted: [`IdentifyError::Reserve`] (the caller
//! raises a critical alert instead of identifying). RESUME is not an identify and never waits.
//!
//! The connection loop asks for a turn *after* HELLO, while the connection already heartbeats
//! (Discord closes a connection that stays silent), and sends IDENTIFY the moment it is granted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use voicerooms_contract::now_ms;
use voicerooms_platform::retry::{Backoff, Jitter};
use voicerooms_platform::settings::Secret;

use crate::config::GatewayConfig;
use crate::protocol::GatewayBot;

/// Discord's identify window.
pub const IDENTIFY_WINDOW: Duration = Duration::from_secs(5);
/// Added to the window: replicas' clocks and their paths to Discord differ by a little.
pub const IDENTIFY_MARGIN: Duration = Duration::from_millis(250);
/// Between attempts while NATS or Discord's REST API do not answer: 125-250 ms, doubling to
/// 2.5-5 s.
const UNAVAILABLE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(250), Duration::from_secs(5)).with_jitter(Jitter::Equal);
/// KV key of the queue in the lease bucket.
pub const QUEUE_KEY: &str = "identify";

/// Discord's REST API as far as the gateway needs it (`GET /gateway/bot`).
pub struct DiscordApi {
    http: reqwest::Client,
    api_base: String,
    token: Secret,
}

/// Why `GET /gateway/bot` gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    /// HTTP 401: the token is wrong (an IDENTIFY with it would get 4004).
    #[error("GET /gateway/bot: HTTP 401")]
    Unauthorized,
    #[error("GET /gateway/bot: {0}")]
    Failed(String),
}

impl DiscordApi {
    pub fn new(api_base: &str, token: Secret) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            api_base: api_base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    pub async fn gateway_bot(&self) -> Result<GatewayBot, BotError> {
        let url = format!("{}/gateway/bot", self.api_base);
        let resp = self
            .http
            .get(&url)
            .header("Authorization", format!("Bot {}", self.token.expose()))
            .send()
            .await
            .map_err(|e| BotError::Failed(e.without_url().to_string()))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(BotError::Unauthorized);
        }
        if !status.is_success() {
            return Err(BotError::Failed(format!("HTTP {status}")));
        }
        let bot: GatewayBot = resp
            .json()
            .await
            .map_err(|e| BotError::Failed(e.without_url().to_string()))?;
        if let Some(limit) = &bot.session_start_limit {
            tracing::info!(
                shards = bot.shards,
                remaining = limit.remaining,
                reset_after_ms = limit.reset_after,
                max_concurrency = limit.max_concurrency,
                "GET /gateway/bot"
            );
        }
        Ok(bot)
    }
}

/// Why no turn was granted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentifyError {
    /// Identifying now would take the session-start budget to the reserve.
    #[error("{remaining} session starts left today, at the reserve of {reserve}; the budget resets in {reset_after_ms} ms")]
    Reserve {
        remaining: u64,
        reserve: u64,
        reset_after_ms: u64,
    },
    /// `GET /gateway/bot` answered 401: the token is wrong (an IDENTIFY would get 4004).
    #[error("the bot token was refused (GET /gateway/bot: HTTP 401)")]
    Unauthorized,
}

/// The stored queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct QueueState {
    /// Rate-limit key → wall-clock ms of its last granted turn.
    #[serde(default)]
    keys: BTreeMap<u64, u64>,
    /// Session starts left until `reset_at` (as far as we know).
    #[serde(default)]
    remaining: Option<u64>,
    /// Wall-clock ms when Discord resets the budget.
    #[serde(default)]
    reset_at: u64,
    /// Who took the last turn (`instance/shard`), for operators.
    #[serde(default)]
    last: String,
}

/// A granted turn.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    pub rate_limit_key: u64,
    /// Session starts left after this one.
    pub remaining: u64,
}

/// Identify turns shared by every replica (see the module docs).
#[derive(Clone)]
pub struct IdentifyQueue {
    kv: kv::Store,
    api: Arc<DiscordApi>,
    instance: String,
    reserve: u64,
    op_timeout: Duration,
    /// The last `GET /gateway/bot` answer and when it was fetched.
    bot: Arc<Mutex<Option<(Instant, GatewayBot)>>>,
}

impl IdentifyQueue {
    /// Opens (creating if needed) the lease bucket that holds the queue.
    pub async fn open(
        js: &jetstream::Context,
        config: &GatewayConfig,
        api: Arc<DiscordApi>,
        instance: &str,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let kv =
            voicerooms_platform::nats::ensure_kv(js, &config.lease_bucket, 1, replicas).await?;
        Ok(Self {
            kv,
            api,
            instance: instance.to_owned(),
            reserve: config.session_start_reserve,
            op_timeout: Duration::from_millis(config.lease_renew_ms),
            bot: Arc::default(),
        })
    }

    /// `GET /gateway/bot`, at most once per [`IDENTIFY_WINDOW`] per process (the route is rate
    /// limited); a failed fetch falls back to the last answer.
    pub async fn gateway_bot(&self) -> Result<GatewayBot, BotError> {
        let cached = self
            .bot
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(|(at, bot)| (*at, bot.clone())));
        if let Some((at, bot)) = &cached {
            if at.elapsed() < IDENTIFY_WINDOW {
                return Ok(bot.clone());
            }
        }
        match self.api.gateway_bot().await {
            Ok(bot) => {
                if let Ok(mut b) = self.bot.lock() {
                    *b = Some((Instant::now(), bot.clone()));
                }
                Ok(bot)
            }
            Err(BotError::Unauthorized) => Err(BotError::Unauthorized),
            Err(e) => match cached {
                Some((_, bot)) => {
                    tracing::warn!(error = %e, "using the last GET /gateway/bot answer");
                    Ok(bot)
                }
                None => Err(e),
            },
        }
    }

    /// Waits for shard `shard`'s turn and takes it. Retries while NATS or Discord's REST API do
    /// not answer (the caller's connection heartbeats meanwhile; cancel by dropping the future).
    pub async fn acquire(&self, shard: u32) -> Result<Turn, IdentifyError> {
        let started = Instant::now();
        let mut unavailable = UNAVAILABLE_BACKOFF.schedule();
        loop {
            match self.try_take(shard).await {
                Ok(Ok(turn)) => {
                    tracing::info!(
                        shard,
                        rate_limit_key = turn.rate_limit_key,
                        remaining = turn.remaining,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "identify turn granted"
                    );
                    return Ok(turn);
                }
                Ok(Err(Wait::Refused(e))) => return Err(e),
                Ok(Err(Wait::Until(ms))) => {
                    let wait = Duration::from_millis(ms.saturating_sub(now_ms()))
                        // A few ms of spread, so waiters of one key do not all ask at once.
                        .saturating_add(Duration::from_millis(rand::random_range(0..=20)));
                    tokio::time::sleep(wait).await;
                }
                Ok(Err(Wait::Raced)) => {}
                Err(e) if matches!(e.downcast_ref::<BotError>(), Some(BotError::Unauthorized)) => {
                    return Err(IdentifyError::Unauthorized)
                }
                Err(e) => {
                    let wait = unavailable
                        .next_delay()
                        .unwrap_or(UNAVAILABLE_BACKOFF.max());
                    tracing::warn!(error = %e, shard, retry_ms = wait.as_millis() as u64, "identify queue unavailable; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One attempt: `Ok(Ok(turn))`, or why not (wait until, raced, refused).
    async fn try_take(&self, shard: u32) -> anyhow::Result<Result<Turn, Wait>> {
        let bot = self.gateway_bot().await?;
        let limit = bot.session_start_limit.clone();
        let max_concurrency = limit.as_ref().map_or(1, |l| l.max_concurrency).max(1);
        let key = u64::from(shard).checked_rem(max_concurrency).unwrap_or(0);
        let entry = tokio::time::timeout(self.op_timeout, self.kv.entry(QUEUE_KEY))
            .await
            .map_err(|_| anyhow::anyhow!("identify queue read timed out"))??;
        let (mut state, revision) = match &entry {
            Some(e) => (
                serde_json::from_slice::<QueueState>(&e.value).unwrap_or_default(),
                Some(e.revision),
            ),
            None => (QueueState::default(), None),
        };
        let now = now_ms();
        let spacing = u64::try_from(IDENTIFY_WINDOW.saturating_add(IDENTIFY_MARGIN).as_millis())
            .unwrap_or(u64::MAX);
        if let Some(last) = state.keys.get(&key) {
            let next = last.saturating_add(spacing);
            if now < next {
                return Ok(Err(Wait::Until(next)));
            }
        }
        // The budget: the smaller of ours and Discord's, until Discord's reset time.
        let (discord_remaining, reset_after) = limit
            .as_ref()
            .map_or((u64::MAX, 86_400_000), |l| (l.remaining, l.reset_after));
        let (remaining, reset_at) = match state.remaining {
            Some(ours) if now < state.reset_at => (ours.min(discord_remaining), state.reset_at),
            _ => (discord_remaining, now.saturating_add(reset_after)),
        };
        if remaining <= self.reserve {
            return Ok(Err(Wait::Refused(IdentifyError::Reserve {
                remaining,
                reserve: self.reserve,
                reset_after_ms: reset_at.saturating_sub(now),
            })));
        }
        let left = remaining.saturating_sub(1);
        state.keys.insert(key, now);
        state.remaining = Some(left);
        state.reset_at = reset_at;
        state.last = format!("{}/{shard}", self.instance);
        let value = Bytes::from(serde_json::to_vec(&state)?);
        let written = match revision {
            Some(rev) => {
                tokio::time::timeout(self.op_timeout, self.kv.update(QUEUE_KEY, value, rev))
                    .await
                    .map(|r| r.map_err(|e| e.to_string()))
            }
            None => tokio::time::timeout(self.op_timeout, self.kv.create(QUEUE_KEY, value))
                .await
                .map(|r| r.map_err(|e| e.to_string())),
        };
        match written {
            Ok(Ok(_)) => Ok(Ok(Turn {
                rate_limit_key: key,
                remaining: left,
            })),
            // Another claim won (or our write is in doubt): read again. A write that landed
            // after our timeout holds a turn we do not use; it only delays that key once.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "identify turn raced");
                Ok(Err(Wait::Raced))
            }
            Err(_) => Ok(Err(Wait::Raced)),
        }
    }
}

enum Wait {
    Until(u64),
    Raced,
    Refused(IdentifyError),
}
