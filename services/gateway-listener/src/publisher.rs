//! Publishing normalized events to the `ROOMS` stream.
//!
//! The connection loop hands one [`Batch`] per gateway dispatch to a bounded queue; one task
//! publishes them through JetStream **one event at a time**: an event is sent only once the one
//! before it is acknowledged. A failed publish (NATS down, ack timeout) is retried with backoff
//! and the same `Nats-Msg-Id`, so an event that was stored after all is stored once. Nothing is
//! dropped: when the queue is full the connection loop stops reading Discord.
//!
//! **Why not pipelined.** With several distinct events unacknowledged at once, a later one can be
//! stored while an earlier one is not: when the connection to NATS breaks, what the client had
//! already written to the dead socket is lost while what still waited in its send queue is
//! written to the new connection after the reconnect; a stream leader change or a momentary
//! "no responders" can likewise drop one publish and store the next. Re-sending the lost one then
//! stores it *behind* the later one, and consumers applying the stream in order show a user in a
//! room they have left (issue 15, defect 7: dispatch 1310 stored after dispatch 1402). Neither
//! nats-server 2.9 nor 2.10 can make a publish conditional on another subject's progress, so the
//! only order-safe protocol is one unacknowledged event at a time. Its cost is one JetStream round
//! trip per event per shard (docs/BENCHMARKS.md); shards publish independently.
//!
//! After each acknowledged dispatch the task applies its events to a *shadow* voice cache and
//! records the dispatch's sequence: that pair is the session checkpoint a standby resumes from
//! (every event up to that sequence is in the stream).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::{now_ms, RoomEvent};
use voicerooms_platform::retry::{Backoff, Jitter};

use crate::cache::{GuildSnapshot, VoiceCache};
use crate::metrics::ShardMetrics as Metrics;

/// The session a dispatch came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    pub resume_url: String,
}

/// The events of one dispatch (possibly none: the sequence still advances the checkpoint).
#[derive(Debug)]
pub struct Batch {
    pub session: Arc<SessionInfo>,
    /// Gateway sequence of the dispatch the events came from.
    pub seq: u64,
    pub events: Vec<RoomEvent>,
}

/// What a standby needs to resume: the session, the last sequence whose events are all in the
/// stream, and the voice states as of that sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub session: Option<SessionInfo>,
    pub seq: u64,
    pub voice: Vec<GuildSnapshot>,
    pub at: u64,
    /// The `ROOMS` stream position the voice states are valid at: every event of this shard
    /// stored at or below it is in them, none stored above it is. 0: unknown (written by an
    /// older version), no stream replay at takeover.
    #[serde(default)]
    pub stream_seq: u64,
    /// The replica that wrote it (set by the lease when it writes).
    #[serde(default)]
    pub holder: String,
    /// The revision of the shard's lease when `holder` took it (its fencing token).
    #[serde(default)]
    pub token: u64,
}

/// The shadow cache and the acknowledged position, shared with the lease task.
#[derive(Default)]
pub struct Shadow {
    pub cache: VoiceCache,
    pub session: Option<SessionInfo>,
    pub seq: u64,
    /// Stream sequence of the last acknowledged event (see [`Checkpoint::stream_seq`]).
    pub stream_seq: u64,
    /// Publishes started so far, and whether one is under way or queued: the lease task may only
    /// move `stream_seq` up to the stream's end while nothing of ours can land in between.
    pub started: u64,
    pub busy: bool,
    /// Changed since the last checkpoint was written.
    pub dirty: bool,
    /// Wakes the checkpoint writer when `dirty` becomes true.
    pub changed: Arc<tokio::sync::Notify>,
}

impl Shadow {
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            session: self.session.clone(),
            seq: self.seq,
            voice: self.cache.snapshot(),
            at: now_ms(),
            stream_seq: self.stream_seq,
            holder: String::new(),
            token: 0,
        }
    }
}

pub type SharedShadow = Arc<Mutex<Shadow>>;

/// The sending half: bounded.
pub type Sender = mpsc::Sender<Batch>;

/// Runs until the queue closes (all senders dropped) or `shutdown` fires with the queue empty.
///
/// Each event is published and its acknowledgement awaited before the next is sent; a dispatch
/// counts as stored (shadow cache and checkpoint advance) once all its events are acknowledged.
/// A failed publish or ack is retried with the same message id after a backoff (50 ms doubling
/// to 2 s, no limit): if it was stored after all, the stream recognises the duplicate.
pub async fn run(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Batch>,
    shadow: SharedShadow,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut closing = false;
    loop {
        metrics.queue_depth.set(rx.len() as i64);
        let batch = tokio::select! {
            biased;
            b = rx.recv() => match b {
                Some(b) => b,
                None => return,
            },
            _ = shutdown.cancelled(), if !closing => {
                // Publish what is already queued, then stop.
                closing = true;
                rx.close();
                continue;
            }
        };
        let mut batch = batch;
        let mut stored_at = None;
        for event in &mut batch.events {
            if let Ok(mut s) = shadow.lock() {
                s.busy = true;
                s.started = s.started.wrapping_add(1);
            }
            stored_at = Some(publish(&js, event, &metrics, &shutdown).await);
        }
        advance_shadow(&shadow, &batch, stored_at, !rx.is_empty());
    }
}

/// Publishes one event and waits for its acknowledgement, retrying until it is stored; returns
/// its stream sequence.
async fn publish(
    js: &jetstream::Context,
    event: &mut RoomEvent,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> u64 {
    let mut retry = RETRY.schedule();
    loop {
        event.published_at = now_ms();
        let sent = Instant::now();
        let result = match send(js, event).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => {
                metrics
                    .publish_latency
                    .observe(sent.elapsed().as_secs_f64());
                if ack.duplicate {
                    metrics.events_duplicate.inc();
                } else {
                    metrics.events_out.inc();
                }
                tracing::debug!(
                    event_id = event.id.as_deref().unwrap_or(""),
                    kind = event.kind().as_str(),
                    guild = %event.guild,
                    room = %event.room,
                    stream_seq = ack.sequence,
                    duplicate = ack.duplicate,
                    "published"
                );
                if retry.failures() > 0 {
                    tracing::info!(
                        attempts = retry.failures().saturating_add(1),
                        "publishing to JetStream recovered"
                    );
                }
                return ack.sequence;
            }
            Err(error) => {
                let delay = retry.next_delay().unwrap_or(RETRY.max());
                let attempt = retry.failures();
                metrics.publish_retries.inc();
                tracing::warn!(
                    error = %error,
                    attempt,
                    event_id = event.id.as_deref().unwrap_or(""),
                    retry_ms = delay.as_millis() as u64,
                    "publish to JetStream failed; retrying with the same message id"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    // During shutdown keep retrying (the grace period bounds us), briefly.
                    _ = shutdown.cancelled() => tokio::time::sleep(RETRY.base()).await,
                }
            }
        }
    }
}

/// Between publish attempts: 50 ms doubling to 2 s (25-50 ms ... 1-2 s with the jitter).
const RETRY: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).with_jitter(Jitter::Equal);

async fn send(js: &jetstream::Context, event: &RoomEvent) -> Result<PublishAckFuture, String> {
    let id = event.id.clone().unwrap_or_default();
    // The publisher task runs outside the dispatch's span: the trace context is the one the
    // event captured in `gateway.dispatch` (also kept in the payload for readers of the stream).
    let mut headers = async_nats::HeaderMap::new();
    match event.traceparent.as_deref() {
        Some(tp) => headers.insert("traceparent", tp),
        None => voicerooms_platform::telemetry::inject(&mut headers),
    }
    let msg = PublishMessage::build()
        .payload(Bytes::from(event.encode()))
        .headers(headers)
        .message_id(id);
    js.send_publish(event.subject(), msg)
        .await
        .map_err(|e| e.to_string())
}

fn advance_shadow(shadow: &SharedShadow, b: &Batch, stored_at: Option<u64>, more: bool) {
    let Ok(mut s) = shadow.lock() else { return };
    for e in &b.events {
        s.cache.apply_published(e.guild, e.room, &e.event);
    }
    // A duplicate's ack names where the first copy was stored: never move backwards.
    if let Some(at) = stored_at {
        s.stream_seq = s.stream_seq.max(at);
    }
    s.busy = more;
    if s.session.as_ref() != Some(&*b.session) {
        s.session = Some((*b.session).clone());
    }
    s.seq = b.seq;
    s.dirty = true;
    s.changed.notify_one();
}
