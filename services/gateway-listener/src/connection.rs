//! The gateway connection loop: our reconnection policy over one websocket at a time.
//!
//! ```text
//!            ┌──────────── backoff 1,2,4,8,16 s after failed attempts ─────────────┐
//!            ▼                                                                     │
//! disconnected → connecting ─HELLO─▶ identifying ─READY──▶ connected ─close/op7/op9/zombie─▶ reconnecting
//!                            └─────▶ resuming ───RESUMED─┘          (fatal close → stopped)
//! ```
//!
//! - HELLO: heartbeats start at once (first after `interval × random(0..1)`, then one per
//!   interval), before IDENTIFY or RESUME, so no wait leaves the connection silent. A heartbeat
//!   still unacknowledged when the next is due marks the connection zombied: we close with 4000
//!   (never 1000/1001, which would end the session) and resume.
//! - Resume on `resume_gateway_url` after op 7, op 9 `true`, a resumable close or a drop; a new
//!   IDENTIFY on the cached gateway URL after op 9 `false`, 4007 or 4009. IDENTIFY is sent when the
//!   identify queue grants a turn, heartbeating meanwhile. After op 9 `false` the next attempt
//!   waits a random 1–5 s (Discord's rule); a refused RESUME is not a failed attempt. 4004 and
//!   4010–4014 stop the loop with an operator alert.
//! - An attempt succeeds at READY or RESUMED; that resets the failure count. After
//!   `alert_after_failures` consecutive failures: an error log, a critical alert, readiness off —
//!   and retries continue at the cap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::event::{ChannelDeleted, ChannelUpdated, Event};
use voicerooms_contract::status::{GatewayState, GatewayStatus, OperatorAlert, Severity};
use voicerooms_contract::{now_ms, wire, Millis, RoomEvent};
use voicerooms_platform::settings::Secret;

use crate::cache::{Change, VoiceCache};
use crate::config::GatewayConfig;
use crate::discord;
use crate::identify::{BotError, IdentifyError, IdentifyQueue};
use crate::metrics::{Metrics, ShardMetrics};
use crate::protocol::{self, op, NextStep};
use crate::publisher::{Batch, SessionInfo};
use crate::takeover::Restored;

/// Code of the alert raised after too many failed attempts.
pub const ALERT_RECONNECT_FAILING: &str = "gateway_reconnect_failing";
/// Code of the alert raised on a fatal close.
pub const ALERT_FATAL_CLOSE: &str = "gateway_fatal_close";
/// Code of the alert raised when identifying would take the session-start budget to the reserve.
pub const ALERT_SESSION_START_RESERVE: &str = "gateway_session_start_reserve";

/// Why the loop stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("Discord closed the gateway with {code}: {reason}; not reconnecting")]
    Fatal { code: u16, reason: &'static str },
}

/// Health shared with the readiness check and the lease supervisor.
#[derive(Debug, Default)]
pub struct Health {
    state: AtomicU8,
    failures: AtomicU32,
    established: AtomicBool,
    alerting: AtomicBool,
}

impl Health {
    pub fn state(&self) -> GatewayState {
        GatewayState::ALL
            .get(self.state.load(Ordering::Relaxed) as usize)
            .copied()
            .unwrap_or(GatewayState::Disconnected)
    }
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }
    /// Ready: a standby, or a session that has been established and is not failing or stopped.
    pub fn ready(&self) -> Result<(), String> {
        match self.state() {
            GatewayState::Standby => Ok(()),
            GatewayState::Stopped => Err("gateway stopped after a fatal close".into()),
            _ if self.alerting.load(Ordering::Relaxed) => Err(format!(
                "{} consecutive failed gateway connection attempts",
                self.failures()
            )),
            _ if !self.established.load(Ordering::Relaxed) => {
                Err("gateway session not yet established".into())
            }
            _ => Ok(()),
        }
    }
    /// A new holding period of the shard: not ready until its session is established.
    pub(crate) fn begin(&self) {
        self.set_state(GatewayState::Disconnected);
        self.established.store(false, Ordering::Relaxed);
    }
    pub(crate) fn set_state(&self, s: GatewayState) {
        let i = GatewayState::ALL.iter().position(|x| *x == s).unwrap_or(0);
        self.state.store(i as u8, Ordering::Relaxed);
    }
}

/// Everything the loop reports to: metrics, health, NATS status and alerts.
#[derive(Clone)]
pub struct Reporter {
    pub nats: async_nats::Client,
    /// This shard's metrics.
    pub metrics: ShardMetrics,
    /// The replica's metrics (operator alerts).
    pub all: Metrics,
    pub health: Arc<Health>,
    pub instance: String,
    pub shard: u32,
    pub shard_count: u32,
    /// The latest status, for the status task (last value in KV, periodic republish).
    pub latest: Arc<tokio::sync::watch::Sender<Option<GatewayStatus>>>,
}

impl Reporter {
    pub async fn state(&self, state: GatewayState, resumable: bool, detail: Option<String>) {
        let attempts = self.health.failures();
        self.health.set_state(state);
        self.metrics.set_state(state);
        tracing::info!(
            gateway_state = state.as_str(),
            attempts,
            resumable,
            detail = detail.as_deref().unwrap_or(""),
            "gateway state"
        );
        let status = GatewayStatus {
            v: wire::VERSION,
            shard: self.shard,
            shard_count: self.shard_count,
            state,
            attempts,
            resumable,
            instance: self.instance.clone(),
            at: now_ms(),
            detail: detail.map(|d| d.chars().take(400).collect()),
        };
        // Core NATS, fire and forget: a status is a snapshot, the next one supersedes it. Every
        // change goes out at once; the status task keeps the last one in KV and republishes it.
        if let Err(e) = self
            .nats
            .publish(status.subject(), status.encode().into())
            .await
        {
            tracing::debug!(error = %e, "status not published");
        }
        self.latest.send_replace(Some(status));
    }

    pub async fn alert(&self, severity: Severity, code: &str, message: String) {
        let alert = OperatorAlert {
            v: wire::VERSION,
            service: crate::SERVICE.into(),
            instance: self.instance.clone(),
            severity,
            code: code.into(),
            message: message.chars().take(400).collect(),
            at: now_ms(),
        };
        self.all
            .operator_alerts
            .get_or_create(&vec![
                ("service".to_owned(), crate::SERVICE.to_owned()),
                ("code".to_owned(), code.to_owned()),
                ("severity".to_owned(), severity.as_str().to_owned()),
            ])
            .inc();
        match severity {
            Severity::Resolved => {
                tracing::info!(alert = code, message = %alert.message, "alert resolved")
            }
            _ => {
                tracing::error!(alert = code, severity = ?severity, message = %alert.message, "operator alert")
            }
        }
        let Ok(subject) = alert.subject() else { return };
        if let Err(e) = self.nats.publish(subject, alert.encode().into()).await {
            tracing::warn!(error = %e, "alert not published");
        }
    }
}

/// The session we can resume.
#[derive(Debug, Clone)]
struct Session {
    info: Arc<SessionInfo>,
    seq: u64,
}

/// How one connection ended.
struct Ended {
    established: bool,
    next: NextStep,
    code: Option<u16>,
    reason: String,
    /// Discord answered op 9 `d: false`: identify again after a random 1–5 s (Discord's rule).
    invalid_session: bool,
    /// ...in answer to our RESUME: Discord's normal answer for a session it no longer keeps, not
    /// a failed attempt (no backoff slot, no step towards the alert).
    resume_refused: bool,
    /// No identify turn: the session-start budget is at the reserve. Not a failed attempt.
    reserve: Option<IdentifyError>,
}

impl Ended {
    fn new(established: bool, next: NextStep, code: Option<u16>, reason: String) -> Self {
        Self {
            established,
            next,
            code,
            reason,
            invalid_session: false,
            resume_refused: false,
            reserve: None,
        }
    }
}

/// Discord's wait after op 9 `d: false` before a new IDENTIFY: a random 1–5 s.
fn invalid_session_wait() -> Duration {
    Duration::from_millis(rand::random_range(1_000..=5_000))
}

/// The gateway client for one shard.
pub struct Gateway {
    config: GatewayConfig,
    token: Secret,
    report: Reporter,
    publisher: mpsc::Sender<Batch>,
    cache: VoiceCache,
    session: Option<Session>,
    gateway_url: Option<String>,
    identify: IdentifyQueue,
    /// Consecutive failed attempts.
    failures: u32,
    /// The session-start reserve alert is raised (resolved at the next granted turn).
    reserve_alerting: bool,
    /// The wait before the next attempt when it is not the backoff's (after op 9).
    retry_after: Option<Duration>,
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        token: Secret,
        report: Reporter,
        publisher: mpsc::Sender<Batch>,
        identify: IdentifyQueue,
    ) -> Self {
        let gateway_url = (!config.url.is_empty()).then(|| config.url.clone());
        Self {
            config,
            token,
            report,
            publisher,
            cache: VoiceCache::new(),
            session: None,
            gateway_url,
            identify,
            failures: 0,
            reserve_alerting: false,
            retry_after: None,
        }
    }

    /// Starts from a checkpoint left by the previous holder of the shard: its voice states, and
    /// its session to resume when it has one.
    pub fn restore(&mut self, restored: Restored) {
        self.cache = restored.cache;
        self.session = restored.session.map(|info| Session {
            info: Arc::new(info),
            seq: restored.seq,
        });
        tracing::info!(
            resumable = self.session.is_some(),
            seq = restored.seq,
            voice_states = self.cache.voice_count(),
            "restored the shard's state"
        );
    }

    /// Runs until `stop` is cancelled (`Ok`) or Discord closes fatally (`Err`).
    pub async fn run(&mut self, stop: &CancellationToken) -> Result<(), GatewayError> {
        self.report
            .state(GatewayState::Disconnected, self.session.is_some(), None)
            .await;
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let delay = self
                .retry_after
                .take()
                .unwrap_or_else(|| self.config.backoff(self.failures));
            if !delay.is_zero() {
                self.report
                    .state(
                        GatewayState::Reconnecting,
                        self.session.is_some(),
                        Some(format!("retrying in {} ms", delay.as_millis())),
                    )
                    .await;
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            self.report
                .state(GatewayState::Connecting, self.session.is_some(), None)
                .await;
            let ended = match self.url().await {
                Ok(url) => self.connect_once(&url, stop).await,
                Err((reason, fatal_code)) => Ended::new(
                    false,
                    if fatal_code.is_some() {
                        NextStep::Stop
                    } else {
                        NextStep::Resume
                    },
                    fatal_code,
                    reason,
                ),
            };
            if !ended.established && !ended.resume_refused && ended.reserve.is_none() {
                self.failures = self.failures.saturating_add(1);
            }
            if let Some(reserve) = &ended.reserve {
                let reset_after_ms = match reserve {
                    IdentifyError::Reserve { reset_after_ms, .. } => *reset_after_ms,
                    IdentifyError::Unauthorized => 0,
                };
                // Check again within a minute: Discord's reset, or an operator's change.
                self.retry_after = Some(Duration::from_millis(reset_after_ms).min(RESERVE_RECHECK));
                if !self.reserve_alerting {
                    self.reserve_alerting = true;
                    self.report
                        .alert(
                            Severity::Critical,
                            ALERT_SESSION_START_RESERVE,
                            format!("not identifying shard {}: {reserve}", self.report.shard),
                        )
                        .await;
                }
            }
            if ended.resume_refused {
                self.retry_after = Some(invalid_session_wait());
            } else if ended.invalid_session {
                let wait = invalid_session_wait().max(self.config.backoff(self.failures));
                self.retry_after = Some(wait);
            }
            let failures = self.failures;
            self.report
                .health
                .failures
                .store(failures, Ordering::Relaxed);
            self.report.metrics.attempts.set(i64::from(failures));
            if stop.is_cancelled() {
                return Ok(());
            }
            match ended.next {
                NextStep::Stop => {
                    let code = ended.code.unwrap_or(0);
                    let reason = protocol::fatal_reason(code);
                    self.report
                        .state(
                            GatewayState::Stopped,
                            false,
                            Some(format!("close {code}: {reason}")),
                        )
                        .await;
                    self.report
                        .alert(
                            Severity::Critical,
                            ALERT_FATAL_CLOSE,
                            format!("Discord closed the gateway with {code} ({reason}); not reconnecting until restarted"),
                        )
                        .await;
                    return Err(GatewayError::Fatal { code, reason });
                }
                NextStep::Reidentify => self.session = None,
                NextStep::Resume => {}
            }
            let alerting = self.report.health.alerting.load(Ordering::Relaxed);
            if failures >= self.config.alert_after_failures && !alerting {
                self.report.health.alerting.store(true, Ordering::Relaxed);
                self.report
                    .alert(
                        Severity::Critical,
                        ALERT_RECONNECT_FAILING,
                        format!(
                            "{failures} consecutive gateway connection attempts failed (last: {}); retrying every {} s",
                            ended.reason,
                            self.config.backoff_max_ms / 1000
                        ),
                    )
                    .await;
            }
            tracing::warn!(
                code = ended.code,
                reason = %ended.reason,
                established = ended.established,
                failures,
                next = ?ended.next,
                "gateway connection ended"
            );
        }
    }

    /// A session is up (READY or RESUMED): the failure count resets and a raised alert resolves.
    async fn on_established(&mut self) {
        self.failures = 0;
        self.report.health.failures.store(0, Ordering::Relaxed);
        self.report
            .health
            .established
            .store(true, Ordering::Relaxed);
        self.report.metrics.attempts.set(0);
        if self.report.health.alerting.swap(false, Ordering::Relaxed) {
            self.report
                .alert(
                    Severity::Resolved,
                    ALERT_RECONNECT_FAILING,
                    "gateway connection re-established".into(),
                )
                .await;
        }
    }

    /// Where to connect: the resume URL of our session, else the cached gateway URL (fetched once
    /// from `GET /gateway/bot`, which also gives `max_concurrency`).
    /// An error carries the reason and, for a rejected token (HTTP 401), the close code Discord
    /// would give an IDENTIFY with it (4004): retrying cannot help.
    async fn url(&mut self) -> Result<String, (String, Option<u16>)> {
        if let Some(s) = &self.session {
            return Ok(protocol::connect_url(&s.info.resume_url));
        }
        if self.gateway_url.is_none() {
            let bot = self.identify.gateway_bot().await.map_err(|e| match e {
                BotError::Unauthorized => (e.to_string(), Some(4004)),
                BotError::Failed(_) => (e.to_string(), None),
            })?;
            self.gateway_url = Some(bot.url);
        }
        Ok(protocol::connect_url(
            self.gateway_url.as_deref().unwrap_or_default(),
        ))
    }

    async fn connect_once(&mut self, url: &str, stop: &CancellationToken) -> Ended {
        let fail = |reason: String| Ended::new(false, NextStep::Resume, None, reason);
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let ws_config = WebSocketConfig {
            max_message_size: Some(self.config.max_frame_bytes),
            max_frame_size: Some(self.config.max_frame_bytes),
            ..Default::default()
        };
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true);
        let ws = tokio::select! {
            _ = stop.cancelled() => return fail("shutdown".into()),
            r = tokio::time::timeout(timeout, connect) => match r {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(e)) => return fail(format!("connect: {e}")),
                Err(_) => return fail("connect: timed out".into()),
            },
        };
        let (mut sink, mut stream) = ws.split();

        // HELLO
        let hello = tokio::select! {
            _ = stop.cancelled() => return fail("shutdown".into()),
            r = tokio::time::timeout(timeout, stream.next()) => r,
        };
        let interval = match hello {
            Ok(Some(Ok(Message::Text(t)))) => {
                match protocol::decode(&t, self.config.max_frame_bytes) {
                    Ok(f) if f.op == op::HELLO => match f
                        .d
                        .map(|d| serde_json::from_str::<protocol::Hello>(d.get()))
                    {
                        Some(Ok(h)) => {
                            Duration::from_millis(h.heartbeat_interval.clamp(50, 600_000))
                        }
                        _ => return fail("HELLO without a heartbeat interval".into()),
                    },
                    Ok(f) => return fail(format!("expected HELLO, got op {}", f.op)),
                    Err(e) => return fail(format!("HELLO: {e}")),
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map(|f| u16::from(f.code));
                return Ended::new(
                    false,
                    protocol::after_close(code),
                    code,
                    "closed before HELLO".into(),
                );
            }
            Ok(Some(Ok(other))) => {
                return fail(
                    format!("expected HELLO, got {other:?}")
                        .chars()
                        .take(200)
                        .collect(),
                )
            }
            Ok(Some(Err(e))) => return fail(format!("before HELLO: {e}")),
            Ok(None) => return fail("closed before HELLO".into()),
            Err(_) => return fail("no HELLO in time".into()),
        };
        tracing::debug!(heartbeat_interval_ms = interval.as_millis() as u64, "hello");

        // Heartbeats start at HELLO, whatever comes next: Discord closes a silent connection.
        let jitter: f64 = rand::random::<f64>();
        let mut next_beat = crate::later(tokio::time::Instant::now(), interval.mul_f64(jitter));

        // RESUME at once; IDENTIFY once the identify queue grants a turn (heartbeating meanwhile).
        let resuming = self.session.is_some();
        if let Some(s) = &self.session {
            self.report
                .state(GatewayState::Resuming, true, Some(format!("seq {}", s.seq)))
                .await;
            tracing::info!(session = %s.info.session_id, seq = s.seq, "resuming");
            let resume = protocol::resume(self.token.expose(), &s.info.session_id, s.seq);
            if let Err(e) = sink.send(Message::Text(resume)).await {
                return fail(format!("sending resume: {e}"));
            }
        } else {
            self.report
                .state(
                    GatewayState::Identifying,
                    false,
                    Some("waiting for an identify turn".into()),
                )
                .await;
        }
        let mut identify_pending = !resuming;
        let queue = self.identify.clone();
        let shard = self.report.shard;
        let mut identify_turn = Box::pin(async move {
            if resuming {
                std::future::pending().await
            } else {
                queue.acquire(shard).await
            }
        });
        let mut awaiting_ack = false;
        let mut beat_sent = Instant::now();
        let mut last_ack = Instant::now();
        let mut established = false;
        let mut outbox: VecDeque<Batch> = VecDeque::new();
        let publisher = self.publisher.clone();

        let ended = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // 4000, not 1000: the session stays resumable for whoever takes over.
                    close_gracefully(&mut sink, &mut stream, protocol::RESUMABLE_CLOSE, "shutting down").await;
                    break Ended::new(established, NextStep::Resume, None, "shutdown".into());
                }
                turn = &mut identify_turn, if identify_pending => {
                    identify_pending = false;
                    match turn {
                        Ok(_) => {}
                        Err(IdentifyError::Unauthorized) => {
                            close_gracefully(&mut sink, &mut stream, protocol::RESUMABLE_CLOSE, "token refused").await;
                            break Ended::new(established, NextStep::Stop, Some(4004), IdentifyError::Unauthorized.to_string());
                        }
                        Err(refused) => {
                            tracing::error!(error = %refused, "not identifying: the session-start budget is at its reserve");
                            close_gracefully(&mut sink, &mut stream, protocol::RESUMABLE_CLOSE, "no identify turn").await;
                            let mut ended = Ended::new(established, NextStep::Reidentify, None, refused.to_string());
                            ended.reserve = Some(refused);
                            break ended;
                        }
                    }
                    if self.reserve_alerting {
                        self.reserve_alerting = false;
                        self.report
                            .alert(
                                Severity::Resolved,
                                ALERT_SESSION_START_RESERVE,
                                "the session-start budget allows identifying again".into(),
                            )
                            .await;
                    }
                    self.report.metrics.identifies.inc();
                    tracing::info!(shard = self.report.shard, "identifying");
                    let identify = protocol::identify(
                        self.token.expose(),
                        [self.report.shard, self.report.shard_count],
                    );
                    if let Err(e) = sink.send(Message::Text(identify)).await {
                        break Ended::new(established, NextStep::Resume, None, format!("sending identify: {e}"));
                    }
                }
                _ = tokio::time::sleep_until(next_beat) => {
                    // While we wait on a full publish queue we do not read, so a missing ACK is
                    // ours, not Discord's.
                    if awaiting_ack && outbox.is_empty() {
                        tracing::warn!(
                            since_ack_ms = last_ack.elapsed().as_millis() as u64,
                            "no heartbeat ACK since the last heartbeat: zombied connection"
                        );
                        close(&mut sink, protocol::RESUMABLE_CLOSE, "zombied").await;
                        break Ended::new(established, NextStep::Resume, None, "zombied connection (no heartbeat ACK)".into());
                    }
                    let seq = self.session.as_ref().map(|s| s.seq);
                    if let Err(e) = sink.send(Message::Text(protocol::heartbeat(seq))).await {
                        break Ended::new(established, NextStep::Resume, None, format!("sending heartbeat: {e}"));
                    }
                    awaiting_ack = true;
                    beat_sent = Instant::now();
                    self.report.metrics.last_ack_age.set(last_ack.elapsed().as_secs_f64());
                    next_beat = crate::later(next_beat, interval);
                }
                permit = publisher.reserve(), if !outbox.is_empty() => {
                    match (permit, outbox.pop_front()) {
                        (Ok(p), Some(b)) => p.send(b),
                        _ => break Ended::new(established, NextStep::Resume, None, "publisher stopped".into()),
                    }
                    self.report.metrics.queue_depth.set(i64::try_from(publisher.max_capacity().saturating_sub(publisher.capacity())).unwrap_or(i64::MAX));
                }
                msg = stream.next(), if outbox.is_empty() => {
                    let received_at = now_ms();
                    let text = match msg {
                        None => break Ended::new(established, protocol::after_close(None), None, "connection dropped".into()),
                        Some(Err(e)) => break Ended::new(established, protocol::after_close(None), None, format!("connection error: {e}")),
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.as_ref().map(|f| u16::from(f.code));
                            let reason = frame.map(|f| f.reason.chars().take(200).collect::<String>()).unwrap_or_default();
                            break Ended::new(established, protocol::after_close(code), code, format!("closed by Discord: {reason}"));
                        }
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Binary(_))) => {
                            self.report.metrics.events_rejected.inc();
                            tracing::warn!(error = %protocol::ProtocolError::Binary, "gateway payload rejected");
                            continue;
                        }
                        Some(Ok(_)) => continue,
                    };
                    let frame = match protocol::decode(&text, self.config.max_frame_bytes) {
                        Ok(f) => f,
                        Err(e) => {
                            self.report.metrics.events_rejected.inc();
                            tracing::warn!(error = %e, "gateway payload rejected");
                            continue;
                        }
                    };
                    match frame.op {
                        op::DISPATCH => {
                            self.report.metrics.events_in.inc();
                            let t = frame.t.unwrap_or("");
                            let seq = frame.s.unwrap_or(0);
                            match t {
                                "READY" => match frame.d.map(|d| serde_json::from_str::<protocol::ReadyInfo>(d.get())) {
                                    Some(Ok(ready)) => {
                                        tracing::info!(event = t, seq, session = %ready.session_id, guilds = ready.guilds.len(), "READY");
                                        self.session = Some(Session {
                                            info: Arc::new(SessionInfo { session_id: ready.session_id, resume_url: ready.resume_gateway_url }),
                                            seq,
                                        });
                                        established = true;
                                        self.on_established().await;
                                        self.report.state(GatewayState::Connected, true, Some("identified".into())).await;
                                    }
                                    _ => {
                                        self.report.metrics.events_rejected.inc();
                                        tracing::error!(event = t, "READY without a usable session; reconnecting");
                                        close_gracefully(&mut sink, &mut stream, protocol::RESUMABLE_CLOSE, "bad READY").await;
                                        break Ended::new(established, NextStep::Reidentify, None, "bad READY".into());
                                    }
                                },
                                "RESUMED" => {
                                    tracing::info!(event = t, seq, "RESUMED");
                                    established = true;
                                    self.on_established().await;
                                    self.report.metrics.resumes.inc();
                                    self.report.state(GatewayState::Connected, true, Some("resumed".into())).await;
                                }
                                _ => {}
                            }
                            let Some(session) = self.session.as_mut() else { continue };
                            if frame.s.is_some() {
                                session.seq = seq;
                            }
                            let info = session.info.clone();
                            let events = {
                                let span = tracing::info_span!("gateway.dispatch", event = t, seq);
                                let _enter = span.enter();
                                let changes = self.dispatch(t, seq, frame.d);
                                build_events(&info.session_id, seq, received_at, changes)
                            };
                            outbox.push_back(Batch { session: info, seq, events });
                        }
                        op::HEARTBEAT => {
                            let seq = self.session.as_ref().map(|s| s.seq);
                            if let Err(e) = sink.send(Message::Text(protocol::heartbeat(seq))).await {
                                break Ended::new(established, NextStep::Resume, None, format!("sending heartbeat: {e}"));
                            }
                            awaiting_ack = true;
                            beat_sent = Instant::now();
                        }
                        op::HEARTBEAT_ACK => {
                            if awaiting_ack {
                                self.report.metrics.heartbeat_rtt.observe(beat_sent.elapsed().as_secs_f64());
                            }
                            awaiting_ack = false;
                            last_ack = Instant::now();
                            self.report.metrics.last_ack_age.set(0.0);
                        }
                        op::RECONNECT => {
                            tracing::info!(op = frame.op, "Discord asked us to reconnect");
                            close_gracefully(&mut sink, &mut stream, protocol::RESUMABLE_CLOSE, "reconnect requested").await;
                            break Ended::new(established, NextStep::Resume, None, "op 7 RECONNECT".into());
                        }
                        op::INVALID_SESSION => {
                            let resumable = frame.d.is_some_and(|d| d.get().trim() == "true");
                            tracing::warn!(resumable, "INVALID_SESSION");
                            close_gracefully(&mut sink, &mut stream, protocol::RESUMABLE_CLOSE, "invalid session").await;
                            let next = if resumable && self.session.is_some() { NextStep::Resume } else { NextStep::Reidentify };
                            let mut ended = Ended::new(established, next, None, format!("op 9 INVALID_SESSION resumable={resumable}"));
                            ended.invalid_session = !resumable;
                            ended.resume_refused = !resumable && resuming && !established;
                            break ended;
                        }
                        other => tracing::debug!(op = other, "ignored gateway opcode"),
                    }
                }
            }
        };
        // Whatever was read is handed to the publisher before we reconnect, so the sequence we
        // resume from never skips an event.
        for batch in outbox.drain(..) {
            if self.publisher.send(batch).await.is_err() {
                tracing::error!("publisher stopped; events of this connection are lost");
                break;
            }
        }
        ended
    }

    /// Normalizes one dispatch against the cache.
    fn dispatch(
        &mut self,
        t: &str,
        seq: u64,
        d: Option<&serde_json::value::RawValue>,
    ) -> Vec<(voicerooms_contract::GuildId, Change)> {
        let rejected = |e: &dyn std::fmt::Display| {
            tracing::warn!(event = t, seq, error = %e, "gateway dispatch rejected");
        };
        match t {
            "VOICE_STATE_UPDATE" => match discord::voice_state_update(d) {
                Ok(Some((guild, update))) => {
                    tracing::info!(
                        event = t, seq, guild = %guild, user = %update.user_id,
                        channel = update.channel.map(|c| c.get()),
                        self_mute = update.flags.self_mute, self_deaf = update.flags.self_deaf,
                        "voice state"
                    );
                    self.cache
                        .apply(guild, update)
                        .into_iter()
                        .map(|c| (guild, c))
                        .collect()
                }
                Ok(None) => vec![],
                Err(e) => {
                    self.report.metrics.events_rejected.inc();
                    rejected(&e);
                    vec![]
                }
            },
            "GUILD_CREATE" => match discord::guild_create(d) {
                Ok(g) if g.unavailable => {
                    tracing::info!(event = t, seq, guild = %g.guild, "guild unavailable");
                    vec![]
                }
                Ok(g) => {
                    for e in &g.skipped {
                        self.report.metrics.events_rejected.inc();
                        rejected(e);
                    }
                    let guild = g.guild;
                    let known = self.cache.knows_guild(guild);
                    let changes = self.cache.replace_guild(guild, g.members, g.states);
                    tracing::info!(
                        event = t, seq, guild = %guild, known, voice_states = self.cache.voice_count(),
                        converged = changes.len(), "guild available; voice states diffed against the cache"
                    );
                    changes.into_iter().map(|c| (guild, c)).collect()
                }
                Err(e) => {
                    self.report.metrics.events_rejected.inc();
                    rejected(&e);
                    vec![]
                }
            },
            "CHANNEL_UPDATE" | "CHANNEL_DELETE" => {
                let name = if t == "CHANNEL_UPDATE" {
                    "CHANNEL_UPDATE"
                } else {
                    "CHANNEL_DELETE"
                };
                match discord::voice_channel(name, d) {
                    Ok(Some(c)) => {
                        tracing::info!(event = t, seq, guild = %c.guild, channel = %c.channel, "voice channel changed");
                        let event = if t == "CHANNEL_UPDATE" {
                            Event::ChannelUpdated(ChannelUpdated {
                                name: c.name,
                                user_limit: c.user_limit,
                            })
                        } else {
                            Event::ChannelDeleted(ChannelDeleted {})
                        };
                        vec![(
                            c.guild,
                            Change {
                                room: c.channel,
                                event,
                            },
                        )]
                    }
                    Ok(None) => vec![],
                    Err(e) => {
                        self.report.metrics.events_rejected.inc();
                        rejected(&e);
                        vec![]
                    }
                }
            }
            _ => {
                tracing::debug!(event = t, seq, "dispatch");
                vec![]
            }
        }
    }
}

/// Envelopes with their de-duplication ids: `<session>:<seq>:<part>`. A dispatch replayed after
/// RESUME gets the same ids, so the stream stores it once.
///
/// `part` names the change rather than numbering it — `<kind>-<room>[-<user>]` (a dispatch
/// never holds two changes of one kind, room and user) — so that a dispatch re-driven after a
/// takeover, against the voice states that were actually stored, gets the same id for each change
/// that was already stored and a fresh one for any it had not: if a crash stored only the
/// `voice.left` half of a move, the re-driven dispatch yields just the `voice.joined` half, under
/// the id the lost half would have had. Numbered parts would give that join the stored leave's id
/// and the stream would drop it as a duplicate.
fn build_events(
    session: &str,
    seq: u64,
    received_at: Millis,
    changes: Vec<(voicerooms_contract::GuildId, Change)>,
) -> Vec<RoomEvent> {
    let traceparent = voicerooms_platform::telemetry::current_traceparent();
    changes
        .into_iter()
        .map(|(guild, c)| {
            let mut e = RoomEvent::new(guild, c.room, received_at, c.event);
            let part = match e.event.user() {
                Some(u) => format!("{}-{}-{}", e.kind().as_str(), e.room, u.id),
                None => format!("{}-{}", e.kind().as_str(), e.room),
            };
            e.id = Some(format!("{session}:{seq}:{part}"));
            e.traceparent = traceparent.clone();
            e
        })
        .collect()
}

/// Sends a Close with `code` (bounded by [`CLOSE_TIMEOUT`]); for a connection that no longer
/// answers (zombied).
async fn close<S>(sink: &mut S, code: u16, reason: &'static str)
where
    S: futures::Sink<Message> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(close_frame(code, reason))).await;
}

/// Closes with `code` and completes the closing handshake: reads (and discards) until Discord's
/// Close reply or the end of the stream, so the socket is not torn down with unread data (the
/// kernel would answer with a reset, and the peer could lose our Close frame and see a broken
/// connection instead). Bounded by [`CLOSE_TIMEOUT`] in all. What is discarded lies beyond our
/// sequence, so a resume replays it.
async fn close_gracefully<S, R, E>(sink: &mut S, stream: &mut R, code: u16, reason: &'static str)
where
    S: futures::Sink<Message> + Unpin,
    R: futures::Stream<Item = Result<Message, E>> + Unpin,
{
    let handshake = async {
        if sink.send(close_frame(code, reason)).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Longest wait before the session-start budget is checked again while it is at the reserve.
const RESERVE_RECHECK: Duration = Duration::from_secs(60);

/// Longest wait for our Close to be sent (and, when closing gracefully, answered).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
