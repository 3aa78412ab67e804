//! Publishing normalized events to the `ROOMS` stream.
//!
//! The connection loop hands one [`Batch`] per gateway dispatch to a bounded queue; one task
//! publishes their events through JetStream, **several at once** (up to
//! `gateway.publish_in_flight`), in dispatch order, under one rule: **an event is never sent
//! while an earlier event of the same room or of the same user is unacknowledged**. Events in
//! flight together therefore concern different rooms and different users, and their effects
//! commute: whatever order the stream stores them in, every room's events and every user's
//! events are stored in dispatch order — the order consumers apply them in (the edge per room,
//! room-manager per room, the voice cache per user).
//!
//! **Failures.** A failed publish (NATS down, ack timeout, no responders) may leave a later
//! event of the window stored while it is not: after a reconnect, what was written to the dead
//! socket is lost while what still waited in the client's queue goes out (issue 15, defect 7).
//! The rule above makes that harmless for consumers — the later events concern other rooms and
//! users. The task then sends nothing new until every event of the window is answered, and
//! re-sends the failed ones one at a time, with backoff and the same `Nats-Msg-Id`, until they
//! are stored (one that was stored after all is recognised as a duplicate). Nothing is dropped:
//! when the queue is full the connection loop stops reading Discord.
//!
//! **Takeover.** A holder that dies while a failed event is still unstored leaves a *hole*: a
//! later event of the session stored, an earlier one not. Resuming from the last stored
//! dispatch would skip the lost one, so every event sent while another was unacknowledged names
//! the event sent just before it in the [`AFTER_HEADER`] header; the next holder looks for a
//! named event that is missing from the stream and, if it finds one, identifies anew and
//! converges against what was stored instead of resuming (crate::takeover).
//!
//! After each dispatch whose events are all acknowledged — and all dispatches before it — the
//! task applies its events to a *shadow* voice cache and records the dispatch's sequence: that
//! pair is the session checkpoint a standby resumes from. The checkpoint's stream position is
//! one every event of a later dispatch is stored above: the highest acknowledged position when
//! the first event of the next dispatch was sent.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, context::PublishAckFuture, message::PublishMessage, publish::PublishAck,
};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::{now_ms, GuildId, RoomEvent, RoomId, UserId};
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
/// Up to `in_flight` events are unacknowledged at once, never two of the same room or user (see
/// the module documentation); a dispatch counts as stored (shadow cache and checkpoint advance)
/// once its events and all earlier dispatches' events are acknowledged. After a failed publish
/// nothing new is sent until the window is answered; the failed events are then retried one at
/// a time with the same message id after a backoff (50 ms doubling to 2 s, no limit): if one was
/// stored after all, the stream recognises the duplicate.
pub async fn run(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Batch>,
    shadow: SharedShadow,
    metrics: Metrics,
    shutdown: CancellationToken,
    in_flight: usize,
) {
    let window = in_flight.max(1);
    // Dispatches taken off the queue and not yet stored in full (most carry no event).
    let pending_max = window.saturating_mul(4).max(64);
    let mut w = Window::default();
    let mut closing = false;
    let mut closed = false;
    loop {
        if w.flights.is_empty() && !w.failed.is_empty() {
            w.retry_failed(&js, &metrics, &shutdown).await;
        }
        if w.failed.is_empty() {
            w.send_ready(&js, &shadow, window).await;
        }
        w.complete(&shadow, !rx.is_empty());
        metrics
            .queue_depth
            .set(i64::try_from(rx.len().saturating_add(w.pending.len())).unwrap_or(i64::MAX));
        if closed && w.pending.is_empty() {
            return;
        }
        // Take another dispatch off the queue only when everything taken so far has been sent:
        // one held back (a conflict, a failure) holds the rest in the bounded queue, so a full
        // queue still stops the listener reading Discord.
        let take = !closed && w.pending.len() < pending_max && w.next_event().is_none();
        tokio::select! {
            biased;
            Some(result) = w.acks.next(), if !w.acks.is_empty() => w.answered(result, &metrics),
            b = rx.recv(), if take => match b {
                Some(b) => w.push(b),
                None => closed = true,
            },
            _ = shutdown.cancelled(), if !closing => {
                // Publish what is already queued, then stop.
                closing = true;
                rx.close();
            }
            else => {
                // Unreachable by construction (with nothing in flight every queued event can be
                // sent); kept so a mistake costs a millisecond's wait, not a spin or a panic.
                tracing::error!(pending = w.pending.len(), "publisher has nothing to wait for");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Header naming the event sent just before this one when that one was still unacknowledged
/// (its `Nats-Msg-Id`): a new holder that finds this event stored but the named one missing
/// knows a publish was lost before it (crate::takeover).
pub const AFTER_HEADER: &str = "Voicerooms-After";

/// What an event must not share with an event in flight: its room, or its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Keys {
    guild: GuildId,
    room: RoomId,
    user: Option<UserId>,
}

impl Keys {
    fn of(e: &RoomEvent) -> Self {
        Self {
            guild: e.guild,
            room: e.room,
            user: e.event.user().map(|u| u.id),
        }
    }

    fn conflicts(&self, other: &Self) -> bool {
        self.guild == other.guild
            && (self.room == other.room || (self.user.is_some() && self.user == other.user))
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, String>> + Send>>;

/// An event sent and not yet answered.
struct Flight {
    /// Position of its dispatch (see [`Window::base`]) and its index there.
    pos: u64,
    idx: usize,
    keys: Keys,
    id: String,
    sent: Instant,
}

/// A dispatch taken off the queue and not yet stored in full.
struct Pending {
    batch: Batch,
    /// Its events not acknowledged yet.
    unacked: usize,
    /// The highest acknowledged stream position when its first event was sent: every event of
    /// it is stored above that.
    floor: Option<u64>,
}

/// The publisher's state: dispatches in order, the events in flight (answers come back in the
/// order they were sent), and the ones that failed in the current window.
#[derive(Default)]
struct Window {
    pending: VecDeque<Pending>,
    /// Position of `pending[0]`; positions count every dispatch taken off the queue.
    base: u64,
    /// The next event to send: a dispatch position and an event index.
    next: (u64, usize),
    flights: VecDeque<Flight>,
    acks: FuturesOrdered<AckFuture>,
    failed: Vec<(u64, usize)>,
    /// Highest stream position acknowledged so far.
    max_ack: u64,
}

impl Window {
    fn push(&mut self, batch: Batch) {
        let unacked = batch.events.len();
        self.pending.push_back(Pending {
            batch,
            unacked,
            floor: None,
        });
    }

    fn event(&self, pos: u64, idx: usize) -> Option<&RoomEvent> {
        let i = usize::try_from(pos.checked_sub(self.base)?).ok()?;
        self.pending.get(i)?.batch.events.get(idx)
    }

    fn pending_mut(&mut self, pos: u64) -> Option<&mut Pending> {
        let i = usize::try_from(pos.checked_sub(self.base)?).ok()?;
        self.pending.get_mut(i)
    }

    /// The next event in dispatch order, skipping dispatches with nothing left to send.
    fn next_event(&mut self) -> Option<(u64, usize)> {
        loop {
            let (pos, idx) = self.next;
            let (pos, idx) = if pos < self.base {
                (self.base, 0)
            } else {
                (pos, idx)
            };
            self.next = (pos, idx);
            let len = self.pending_mut(pos)?.batch.events.len();
            if idx < len {
                return Some((pos, idx));
            }
            self.next = (pos.saturating_add(1), 0);
        }
    }

    /// Sends events in dispatch order while the window has room and the next one shares no room
    /// or user with an event in flight (else it waits: later events never overtake it).
    async fn send_ready(&mut self, js: &jetstream::Context, shadow: &SharedShadow, window: usize) {
        while self.flights.len() < window {
            let Some((pos, idx)) = self.next_event() else {
                return;
            };
            let Some(keys) = self.event(pos, idx).map(Keys::of) else {
                return;
            };
            if self.flights.iter().any(|f| f.keys.conflicts(&keys)) {
                return;
            }
            let max_ack = self.max_ack;
            let after = self.flights.back().map(|f| f.id.clone());
            if let Ok(mut s) = shadow.lock() {
                s.busy = true;
                s.started = s.started.wrapping_add(1);
            }
            let Some(event) = self
                .pending_mut(pos)
                .and_then(|p| p.batch.events.get_mut(idx))
            else {
                return;
            };
            event.published_at = now_ms();
            let id = event.id.clone().unwrap_or_default();
            let (ack, refused): (AckFuture, bool) = match send(js, event, after.as_deref()).await {
                Ok(ack) => (
                    Box::pin(async move { ack.await.map_err(|e| e.to_string()) }),
                    false,
                ),
                Err(e) => (Box::pin(std::future::ready(Err(e))), true),
            };
            if let Some(p) = self.pending_mut(pos) {
                p.floor.get_or_insert(max_ack);
            }
            self.acks.push_back(ack);
            self.flights.push_back(Flight {
                pos,
                idx,
                keys,
                id,
                sent: Instant::now(),
            });
            self.next = (pos, idx.saturating_add(1));
            if refused {
                // The client would not take it: send nothing more until it is answered.
                return;
            }
        }
    }

    /// The answer to the oldest event in flight.
    fn answered(&mut self, result: Result<PublishAck, String>, metrics: &Metrics) {
        let Some(f) = self.flights.pop_front() else {
            return;
        };
        match result {
            Ok(ack) => {
                metrics
                    .publish_latency
                    .observe(f.sent.elapsed().as_secs_f64());
                count_ack(&ack, &f.id, metrics);
                self.stored(f.pos, ack.sequence);
            }
            Err(error) => {
                metrics.publish_retries.inc();
                tracing::warn!(
                    error = %error,
                    event_id = f.id,
                    in_flight = self.flights.len(),
                    "publish to JetStream failed; the window is answered first, then it is \
                     retried with the same message id"
                );
                self.failed.push((f.pos, f.idx));
            }
        }
    }

    fn stored(&mut self, pos: u64, at: u64) {
        self.max_ack = self.max_ack.max(at);
        if let Some(p) = self.pending_mut(pos) {
            p.unacked = p.unacked.saturating_sub(1);
        }
    }

    /// Re-sends the window's failed events one at a time, in order, each until it is stored.
    async fn retry_failed(
        &mut self,
        js: &jetstream::Context,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) {
        for (pos, idx) in std::mem::take(&mut self.failed) {
            let Some(event) = self
                .pending_mut(pos)
                .and_then(|p| p.batch.events.get_mut(idx))
            else {
                continue;
            };
            let at = publish(js, event, metrics, shutdown).await;
            self.stored(pos, at);
        }
    }

    /// Hands every dispatch stored in full, in order, to the shadow cache.
    fn complete(&mut self, shadow: &SharedShadow, queued: bool) {
        while self.pending.front().is_some_and(|p| p.unacked == 0) {
            let Some(done) = self.pending.pop_front() else {
                return;
            };
            self.base = self.base.saturating_add(1);
            // Events of later dispatches already sent are stored above the floor of the first
            // of them; any sent from now on above what is acknowledged now.
            let position = match self.pending.front().and_then(|p| p.floor) {
                Some(floor) => floor.min(self.max_ack),
                None => self.max_ack,
            };
            let more = queued || !self.pending.is_empty();
            advance_shadow(shadow, &done.batch, position, more);
        }
    }
}

fn count_ack(ack: &PublishAck, id: &str, metrics: &Metrics) {
    if ack.duplicate {
        metrics.events_duplicate.inc();
    } else {
        metrics.events_out.inc();
    }
    tracing::debug!(
        event_id = id,
        stream_seq = ack.sequence,
        duplicate = ack.duplicate,
        "published"
    );
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
        let result = match send(js, event, None).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => {
                metrics
                    .publish_latency
                    .observe(sent.elapsed().as_secs_f64());
                count_ack(&ack, event.id.as_deref().unwrap_or(""), metrics);
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

async fn send(
    js: &jetstream::Context,
    event: &RoomEvent,
    after: Option<&str>,
) -> Result<PublishAckFuture, String> {
    let id = event.id.clone().unwrap_or_default();
    // The publisher task runs outside the dispatch's span: the trace context is the one the
    // event captured in `gateway.dispatch` (also kept in the payload for readers of the stream).
    let mut headers = async_nats::HeaderMap::new();
    match event.traceparent.as_deref() {
        Some(tp) => headers.insert("traceparent", tp),
        None => voicerooms_platform::telemetry::inject(&mut headers),
    }
    if let Some(after) = after {
        headers.insert(AFTER_HEADER, after);
    }
    let msg = PublishMessage::build()
        .payload(Bytes::from(event.encode()))
        .headers(headers)
        .message_id(id);
    js.send_publish(event.subject(), msg)
        .await
        .map_err(|e| e.to_string())
}

/// `position`: a stream position every event of a later dispatch is stored above.
fn advance_shadow(shadow: &SharedShadow, b: &Batch, position: u64, more: bool) {
    let Ok(mut s) = shadow.lock() else { return };
    for e in &b.events {
        s.cache.apply_published(e.guild, e.room, &e.event);
    }
    // Never backwards: an earlier position stays valid for every later dispatch.
    s.stream_seq = s.stream_seq.max(position);
    s.busy = more;
    if s.session.as_ref() != Some(&*b.session) {
        s.session = Some((*b.session).clone());
    }
    s.seq = b.seq;
    s.dirty = true;
    s.changed.notify_one();
}
