//! The transactional outbox: a room's state and the events its change causes cannot diverge.
//!
//! A handler never publishes directly. It appends the event to the room record's `outbox` in the
//! same compare-and-set that changes the state ([`queue`]), so either both are stored or
//! neither. Then [`Outbox::drain`] publishes the outbox in order, each event with its fixed
//! `Nats-Msg-Id` (`rm:<room>:<n>`), and removes it (recording its stream sequence in `seq`) once
//! `ROOMS` acknowledged it. A publish that fails leaves the event in the outbox: the drain is
//! retried in the background, and every replica's sweep re-drives outboxes it finds non-empty,
//! so a replica dying after the state change loses nothing.
//!
//! A publish acknowledged with a sequence not above the room's recorded one (same epoch) means
//! the stream was recreated: its epoch is read again, and the record's `seq`, `voice_seq` and
//! `stream_epoch` move to the new stream, even before the event consumer restarts on it.
//!
//! Exactly once, in order: drains publish from the front and stop at the first failure, so the
//! stored events of a room are always a prefix of its outbox order; two drains racing publish the
//! same ids, which the stream's duplicate window stores once. An event older than the window is
//! first looked up in the stream (the last message on its subject, whose id counter tells
//! whether ours is already stored) instead of being published again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::event::Event;
use voicerooms_contract::{now_ms, subject, ApiError, ErrorCode, RoomEvent, RoomId, StreamEpoch};
use voicerooms_platform::retry::{self, Backoff, Jitter};

use crate::rooms::Core;
use crate::store::{self, Change, RoomRecord};

/// Most events a room's outbox holds; a change that would queue more is refused (retryable)
/// rather than dropping an event. Only reached while `ROOMS` refuses publishes.
pub const MAX_OUTBOX: usize = 64;

/// Queues `event` in `rec`'s outbox (call inside the compare-and-set that changes the state).
pub fn queue(rec: &mut RoomRecord, event: Event) -> Result<(), ApiError> {
    if rec.outbox.len() >= MAX_OUTBOX {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "room events cannot be stored right now; try again",
        ));
    }
    let n = rec.next_event;
    rec.next_event = n.saturating_add(1);
    let now = now_ms();
    let mut ev = RoomEvent::new(rec.view.guild, rec.view.id, now, event);
    ev.id = Some(event_id(rec.view.id, n));
    // The command's or event's trace continues in whoever reads this event.
    ev.traceparent = voicerooms_platform::telemetry::current_traceparent();
    rec.outbox.push(ev);
    Ok(())
}

/// The `Nats-Msg-Id` of a room's `n`th event.
pub fn event_id(room: RoomId, n: u64) -> String {
    format!("rm:{room}:{n}")
}

/// The counter in an id made by [`event_id`] for `room`.
fn event_counter(room: RoomId, id: &str) -> Option<u64> {
    id.strip_prefix(&format!("rm:{room}:"))?.parse().ok()
}

/// Publishing of outboxes, one drain per room at a time in this process.
pub struct Outbox {
    /// Rooms being drained here. A std mutex: held for an insert or remove, never across an
    /// await.
    draining: Mutex<HashMap<RoomId, Arc<tokio::sync::Mutex<()>>>>,
    /// Events older than this are looked up in the stream before being published again.
    dedup_window: Duration,
}

impl Outbox {
    pub fn new(dedup_window: Duration) -> Self {
        Self {
            draining: Mutex::new(HashMap::new()),
            dedup_window,
        }
    }

    fn room_lock(&self, room: RoomId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: entries nobody holds are dropped as the map grows.
        if map.len() > 4_096 {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(room).or_default().clone()
    }

    /// Publishes the room's outbox in order until it is empty. Returns how many events it
    /// published; an error leaves the rest for a later drain.
    pub async fn drain(&self, core: &Core, room: RoomId) -> Result<usize, ApiError> {
        let lock = self.room_lock(room);
        let _held = lock.lock().await;
        let key = subject::room_key(room);
        let mut published = 0usize;
        loop {
            let Some((rec, _)) = store::get::<RoomRecord>(&core.rooms, &key).await? else {
                return Ok(published);
            };
            let Some(front) = rec.outbox.first().cloned() else {
                return Ok(published);
            };
            let id = front.id.clone().unwrap_or_default();
            let seq = match self.already_stored(core, &front).await {
                Some(seq) => seq,
                None => publish(core, &front).await?,
            };
            let epoch = epoch_of(core, &rec, seq).await;
            store::update::<RoomRecord, (), ApiError, _>(&core.rooms, &key, |cur| {
                let Some(mut r) = cur else {
                    return Ok(Change::Keep(()));
                };
                let before = r.outbox.len();
                r.outbox.retain(|e| e.id.as_deref() != Some(id.as_str()));
                if r.outbox.len() == before {
                    return Ok(Change::Keep(()));
                }
                record_seq(&mut r, seq, epoch);
                Ok(Change::Put(r, ()))
            })
            .await??;
            published = published.saturating_add(1);
        }
    }

    /// Drains now; on failure keeps retrying in the background (with backoff) until it
    /// succeeds, the room is gone or shutdown. Handlers call this after their state change.
    pub async fn flush(self: &Arc<Self>, core: &Arc<Core>, room: RoomId) {
        if let Err(e) = self.drain(core, room).await {
            tracing::warn!(room = %room, error = %e, "publishing room events failed; retrying in the background");
            let (outbox, core) = (self.clone(), core.clone());
            let (tasks, token) = (core.tasks.clone(), core.shutdown.clone());
            tasks.spawn(async move { outbox.retry(&core, room, &token).await });
        }
    }

    async fn retry(&self, core: &Core, room: RoomId, token: &CancellationToken) {
        // 100 ms doubling to retry_interval_ms, until shutdown (the sweep takes over then).
        let policy = Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(core.tuning.retry_interval_ms),
        )
        .with_jitter(Jitter::Equal);
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep(policy.delay(1)) => {
                let result = retry::retry("publishing room events", &policy, token, retry::always, || {
                    self.drain(core, room)
                })
                .await;
                if let Ok(n) = result {
                    tracing::info!(room = %room, published = n, "room events published after a retry");
                }
            }
        }
    }

    /// For an event older than the duplicate window: its stream sequence if the stream already
    /// holds it (the last message on its subject is it or a later event of the room).
    async fn already_stored(&self, core: &Core, ev: &RoomEvent) -> Option<u64> {
        let age = Duration::from_millis(now_ms().saturating_sub(ev.received_at));
        // Half the window: a margin for clocks and for the publish itself.
        if age < self.dedup_window.checked_div(2).unwrap_or_default() {
            return None;
        }
        let ours = event_counter(ev.room, ev.id.as_deref()?)?;
        let stream = core.js.get_stream(subject::ROOMS_STREAM).await.ok()?;
        let last = stream
            .get_last_raw_message_by_subject(&ev.subject())
            .await
            .ok()?;
        let stored = RoomEvent::decode(&last.payload).ok()?;
        let theirs = event_counter(ev.room, stored.id.as_deref()?)?;
        (theirs >= ours).then_some(last.sequence)
    }

    /// Re-drives every room whose outbox is not empty (a replica died after a state change, or
    /// its background retry was cut by shutdown). Every replica runs it.
    pub async fn sweep(&self, core: &Core) -> Result<usize, ApiError> {
        let mut published = 0usize;
        for (_, rec, _) in
            store::scan::<RoomRecord>(&core.rooms, "", crate::rooms::MAX_SCAN).await?
        {
            let Some(oldest) = rec.outbox.first() else {
                continue;
            };
            // Leave fresh events to the handler that queued them.
            if now_ms().saturating_sub(oldest.received_at) < core.tuning.retry_interval_ms {
                continue;
            }
            published = published.saturating_add(self.drain(core, rec.view.id).await?);
        }
        Ok(published)
    }
}

/// The epoch of the stream that stored `seq`: the one last seen, unless `seq` is not above the
/// sequence the room recorded in that same epoch. Sequences only grow within a stream, so then
/// the stream was recreated since (or the ack was a duplicate's, naming an earlier sequence),
/// and the stream is asked — the event consumer may not have restarted on the new stream yet.
async fn epoch_of(core: &Core, rec: &RoomRecord, seq: u64) -> Option<StreamEpoch> {
    let known = core.stream_epoch();
    if known.is_none() || rec.stream_epoch != known || seq > rec.view.seq {
        return known;
    }
    match voicerooms_platform::nats::rooms_stream_epoch(&core.js).await {
        Ok(current) => {
            if Some(current) != known {
                tracing::info!(epoch = %current, "the ROOMS stream was recreated");
                core.set_stream_epoch(current);
            }
            Some(current)
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the ROOMS stream's epoch failed");
            known
        }
    }
}

/// Records that the snapshot reflects events up to `seq` of the stream epoch `epoch`.
pub fn record_seq(r: &mut RoomRecord, seq: u64, epoch: Option<StreamEpoch>) {
    if epoch.is_some() && r.stream_epoch != epoch {
        // The stream was recreated: sequences restarted.
        r.stream_epoch = epoch;
        r.view.seq = seq;
        r.voice_seq.clear();
    } else if r.view.seq < seq {
        r.view.seq = seq;
    }
}

/// Publishes one stored event with its fixed message id; returns its stream sequence.
async fn publish(core: &Core, ev: &RoomEvent) -> Result<u64, ApiError> {
    let mut ev = ev.clone();
    ev.published_at = now_ms();
    let mut headers = HeaderMap::new();
    if let Some(id) = ev.id.as_deref() {
        headers.insert("Nats-Msg-Id", id);
    }
    if let Some(tp) = ev.traceparent.as_deref() {
        headers.insert("traceparent", tp);
    }
    let ack = core
        .js
        .publish_with_headers(ev.subject(), headers, ev.encode().into())
        .await
        .map_err(|e| ApiError::new(ErrorCode::Timeout, format!("publishing event: {e}")))?
        .await
        .map_err(|e| ApiError::new(ErrorCode::Timeout, format!("event not stored: {e}")))?;
    Ok(ack.sequence)
}

/// Runs [`Outbox::sweep`] every `outbox_sweep_interval_ms` until shutdown.
pub async fn run_sweeper(core: Arc<Core>, token: CancellationToken) -> anyhow::Result<()> {
    let every = Duration::from_millis(core.tuning.outbox_sweep_interval_ms);
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        let result = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = core.outbox.sweep(&core) => r,
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(published = n, "outbox sweep published pending room events"),
            Err(e) => tracing::warn!(error = %e, "outbox sweep failed"),
        }
    }
}
