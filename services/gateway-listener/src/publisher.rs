//! Publishing normalized events to the `ROOMS` stream.
//!
//! The connection loop hands one [`Batch`] per gateway dispatch to a bounded queue; one task
//! publishes them in order through JetStream, pipelining up to `publish_window` publishes and
//! awaiting every ack. A failed publish (NATS down, ack timeout) is retried with backoff from the
//! first unacknowledged event, with the same `Nats-Msg-Id`, so what was already stored is stored
//! once. Nothing is dropped: when the queue is full the connection loop stops reading Discord.
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
pub async fn run(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Batch>,
    window: usize,
    shadow: SharedShadow,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut pending: Vec<Batch> = Vec::with_capacity(window);
    loop {
        let first = tokio::select! {
            b = rx.recv() => b,
            _ = shutdown.cancelled() => {
                // Publish what is already queued, then stop.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        pending.clear();
        let mut events = first.events.len();
        pending.push(first);
        while events < window {
            match rx.try_recv() {
                Ok(b) => {
                    events += b.events.len();
                    pending.push(b);
                }
                Err(_) => break,
            }
        }
        metrics.queue_depth.set(rx.len() as i64);
        publish_all(&js, &mut pending, &shadow, &metrics, &shutdown).await;
    }
}

/// Publishes every event of `batches` (in order, pipelined), retrying until all are acked.
async fn publish_all(
    js: &jetstream::Context,
    batches: &mut [Batch],
    shadow: &SharedShadow,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let mut delay = Duration::from_millis(50);
    // (batch, event) of the first event not yet acknowledged; batches before it are done.
    let mut pos = (0usize, 0usize);
    let mut applied = 0usize;
    let mut attempt = 0u32;
    loop {
        normalize(batches, &mut pos);
        let mut inflight = Vec::new();
        for (bi, batch) in batches.iter_mut().enumerate().skip(pos.0) {
            let start = if bi == pos.0 { pos.1 } else { 0 };
            for (ei, event) in batch.events.iter_mut().enumerate().skip(start) {
                event.published_at = now_ms();
                let sent = Instant::now();
                let r = send(js, event).await;
                inflight.push(((bi, ei), sent, r));
            }
        }
        let mut error = None;
        for ((bi, ei), sent, r) in inflight {
            // After a failure the remaining futures are dropped: they are re-sent below and
            // de-duplicated by their message ids if they were stored after all.
            let result = match r {
                Ok(fut) => fut.await.map_err(|e| e.to_string()),
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
                    let event = &batches[bi].events[ei];
                    tracing::debug!(
                        event_id = event.id.as_deref().unwrap_or(""),
                        kind = event.kind().as_str(),
                        guild = %event.guild,
                        room = %event.room,
                        stream_seq = ack.sequence,
                        duplicate = ack.duplicate,
                        "published"
                    );
                    pos = (bi, ei + 1);
                    normalize(batches, &mut pos);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if error.is_none() {
            pos = (batches.len(), 0);
        }
        if pos.0 > applied {
            advance_shadow(shadow, &batches[applied..pos.0]);
            applied = pos.0;
        }
        let Some(error) = error else {
            if attempt > 0 {
                tracing::info!(attempts = attempt + 1, "publishing to JetStream recovered");
            }
            return;
        };
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
            // During shutdown keep retrying (the grace period bounds us), but do not wait long.
            _ = shutdown.cancelled() => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Moves `pos` past finished batches (and batches without events).
fn normalize(batches: &[Batch], pos: &mut (usize, usize)) {
    while pos.0 < batches.len() && pos.1 >= batches[pos.0].events.len() {
        *pos = (pos.0 + 1, 0);
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
