//! Publishing normalized events to the `ROOMS` stream.
//!
//! The connection loop hands one [`Batch`] per gateway dispatch to a bounded queue; one task
//! publishes them in order through JetStream, keeping up to `publish_window` publishes in flight
//! continuously and consuming their acks in order. A failed publish (NATS down, ack timeout) is
//! retried with backoff from the first unacknowledged event, with the same `Nats-Msg-Id`, so what
//! was already stored is stored once. Nothing is dropped: when the queue is full the connection loop stops reading Discord.
//!
//! After each acknowledged dispatch the task applies its events to a *shadow* voice cache and
//! records the dispatch's sequence: that pair is the session checkpoint a standby resumes from
//! (every event up to that sequence is in the stream).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::{now_ms, RoomEvent};

use crate::cache::{GuildSnapshot, VoiceCache};
use crate::metrics::Metrics;

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
}

/// The shadow cache and the acknowledged position, shared with the lease task.
#[derive(Default)]
pub struct Shadow {
    pub cache: VoiceCache,
    pub session: Option<SessionInfo>,
    pub seq: u64,
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
        }
    }
}

pub type SharedShadow = Arc<Mutex<Shadow>>;

/// The sending half: bounded.
pub type Sender = mpsc::Sender<Batch>;

/// Runs until the queue closes (all senders dropped) or `shutdown` fires with the queue empty.
///
/// A continuous pipeline: up to `window` publishes are in flight at any time; new dispatches
/// are taken from the queue while earlier acks are awaited, and acks are consumed in order, so
/// a dispatch counts as stored (shadow cache and checkpoint advance) only once it and every
/// dispatch before it are acknowledged. A failed publish or ack drops everything in flight and
/// re-sends from the first unacknowledged event with the same message ids, after a backoff
/// (50 ms doubling to 2 s, no limit): what was stored meanwhile is recognised as a duplicate.
pub async fn run(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Batch>,
    window: usize,
    shadow: SharedShadow,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let window = window.max(1);
    // Dispatches not yet fully acknowledged, oldest first.
    let mut queue: VecDeque<Batch> = VecDeque::with_capacity(window);
    // Events of `queue[0]` acknowledged so far.
    let mut acked = 0usize;
    // (index in `queue`, event) of the next event to send.
    let mut next = (0usize, 0usize);
    let mut inflight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    let mut closing = false;
    let mut closed = false;
    let mut delay = RETRY_MIN;
    let mut attempt = 0u32;
    loop {
        // Fill the window.
        while inflight.len() < window {
            normalize(&queue, &mut next);
            let Some(batch) = queue.get_mut(next.0) else {
                break;
            };
            let event = &mut batch.events[next.1];
            event.published_at = now_ms();
            let sent = Instant::now();
            let ack: AckFuture = match send(&js, event).await {
                Ok(fut) => Box::pin(async move { (fut.await.map_err(|e| e.to_string()), sent) }),
                Err(e) => Box::pin(std::future::ready((Err(e), sent))),
            };
            inflight.push_back(ack);
            next.1 += 1;
        }
        complete_front(&mut queue, &mut acked, &mut next, &shadow);
        if closed && queue.is_empty() {
            return;
        }
        metrics.queue_depth.set(rx.len() as i64);
        tokio::select! {
            biased;
            Some((result, sent)) = inflight.next(), if !inflight.is_empty() => match result {
                Ok(ack) => {
                    metrics.publish_latency.observe(sent.elapsed().as_secs_f64());
                    if ack.duplicate {
                        metrics.events_duplicate.inc();
                    } else {
                        metrics.events_out.inc();
                    }
                    if let Some(event) = queue.front().and_then(|b| b.events.get(acked)) {
                        tracing::debug!(
                            event_id = event.id.as_deref().unwrap_or(""),
                            kind = event.kind().as_str(),
                            guild = %event.guild,
                            room = %event.room,
                            stream_seq = ack.sequence,
                            duplicate = ack.duplicate,
                            "published"
                        );
                    }
                    acked += 1;
                    if attempt > 0 {
                        tracing::info!(attempts = attempt + 1, "publishing to JetStream recovered");
                        attempt = 0;
                        delay = RETRY_MIN;
                    }
                }
                Err(error) => {
                    // Later publishes may or may not be stored: re-send them all (same ids).
                    inflight = FuturesOrdered::new();
                    next = (0, acked);
                    attempt += 1;
                    metrics.publish_retries.inc();
                    tracing::warn!(
                        error = %error,
                        attempt,
                        retry_ms = delay.as_millis() as u64,
                        "publish to JetStream failed; retrying with the same message ids"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // During shutdown keep retrying (the grace period bounds us), briefly.
                        _ = shutdown.cancelled() => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                }
            },
            b = rx.recv(), if !closed && queue.len() < window => match b {
                Some(b) => queue.push_back(b),
                None => closed = true,
            },
            _ = shutdown.cancelled(), if !closing => {
                // Publish what is already queued, then stop.
                closing = true;
                rx.close();
            }
            // Nothing in flight, nothing more to receive, shutdown handled: all done.
            else => return,
        }
    }
}

type AckFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Result<PublishAck, String>, Instant)> + Send>,
>;

const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Moves `next` past finished batches (and batches without events).
fn normalize(queue: &VecDeque<Batch>, next: &mut (usize, usize)) {
    while next.0 < queue.len() && next.1 >= queue[next.0].events.len() {
        *next = (next.0 + 1, 0);
    }
}

/// Retires the dispatches at the front whose events are all acknowledged (in order, so every
/// earlier one is too) into the shadow cache and checkpoint.
fn complete_front(
    queue: &mut VecDeque<Batch>,
    acked: &mut usize,
    next: &mut (usize, usize),
    shadow: &SharedShadow,
) {
    let mut done = Vec::new();
    while queue.front().is_some_and(|b| *acked >= b.events.len()) {
        let Some(batch) = queue.pop_front() else {
            break;
        };
        *acked = 0;
        *next = if next.0 > 0 {
            (next.0 - 1, next.1)
        } else {
            (0, 0)
        };
        done.push(batch);
    }
    if !done.is_empty() {
        advance_shadow(shadow, &done);
    }
}

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

fn advance_shadow(shadow: &SharedShadow, batches: &[Batch]) {
    let Ok(mut s) = shadow.lock() else { return };
    for b in batches {
        for e in &b.events {
            s.cache.apply_published(e.guild, e.room, &e.event);
        }
        if s.session.as_ref() != Some(&*b.session) {
            s.session = Some((*b.session).clone());
        }
        s.seq = b.seq;
        s.dirty = true;
    }
    s.changed.notify_one();
}
