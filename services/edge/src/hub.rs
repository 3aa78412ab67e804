//! Per-room fan-out.
//!
//! Each room with at least one local subscriber has one *pump* task: it holds the edge's only
//! NATS interest in the room (`live.rooms.<guild>.<room>.>`, the stream's republish with
//! `Nats-Sequence`), decodes each event once, serialises the client frame once and hands the same
//! bytes to every subscriber's [`Outbox`]. The pump is also where subscribers attach, so catch-up
//! and live delivery are ordered by construction:
//!
//! - **attach**: read the room's events after the client's starting point (`since`, or the
//!   snapshot's sequence) from the `ROOMS` stream, send `ack subscribed` and those events, then
//!   deliver live events whose sequence is higher than the last one that client got;
//! - **gap repair**: after a NATS reconnect, a slow-consumer report, or a `Nats-Last-Sequence`
//!   that skips a sequence this pump saw on that subject, re-read the stream after the last
//!   delivered sequence before going on;
//! - the pump ends (and the NATS interest is dropped) when its last subscriber leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use voicerooms_contract::command::RoomView;
use voicerooms_contract::subject::{self, ROOMS_STREAM};
use voicerooms_contract::{ApiError, ErrorCode, GuildId, RoomEvent, RoomId};
use voicerooms_platform::nats::{ConnectionEvent, LazyBucket};

use crate::metrics::EdgeMetrics;
use crate::outbox::Outbox;
use crate::protocol;

/// Identifies one WebSocket connection within this edge.
pub type ConnId = u64;

/// Commands to a room pump.
enum Command {
    Attach {
        conn: ConnId,
        outbox: Outbox,
        view: Box<RoomView>,
        since: Option<u64>,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Detach {
        conn: ConnId,
    },
}

struct RoomEntry {
    /// Tells this pump from a later one for the same room.
    pump_id: u64,
    commands: mpsc::Sender<Command>,
}

/// The fan-out hub: the set of room pumps of this edge.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    js: jetstream::Context,
    rooms_kv: Arc<LazyBucket>,
    rooms: Mutex<HashMap<RoomId, RoomEntry>>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    nats_events: broadcast::Sender<ConnectionEvent>,
    replay_limit: u64,
    metrics: EdgeMetrics,
    next_pump_id: std::sync::atomic::AtomicU64,
}

/// Events after a point, read from the stream.
struct Replay {
    events: Vec<(u64, RoomEvent)>,
}

enum ReplayError {
    /// The stream no longer holds events that old.
    TooOld,
    /// More events than the replay limit.
    TooMany(u64),
    Nats(String),
}

impl Hub {
    pub fn new(
        nats: async_nats::Client,
        rooms_kv: Arc<LazyBucket>,
        nats_events: broadcast::Sender<ConnectionEvent>,
        replay_limit: u64,
        shutdown: CancellationToken,
        metrics: EdgeMetrics,
    ) -> Self {
        let js = jetstream::new(nats.clone());
        Self {
            inner: Arc::new(Inner {
                nats,
                js,
                rooms_kv,
                rooms: Mutex::new(HashMap::new()),
                runtime: tokio::runtime::Handle::current(),
                shutdown,
                nats_events,
                replay_limit,
                metrics,
                next_pump_id: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    /// The room's snapshot from the `rooms` bucket.
    pub async fn room_view(&self, room: RoomId) -> Result<Option<RoomView>, ApiError> {
        let store = self.inner.rooms_kv.get().await.map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("room state unavailable: {e}"))
        })?;
        let entry = store
            .get(subject::room_key(room))
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("reading room state: {e}")))?;
        match entry {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ApiError::new(ErrorCode::Internal, format!("bad room state: {e}"))),
        }
    }

    /// Number of rooms with a pump on this edge.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Subscribes a connection to a room: `ack subscribed`, the catch-up events and then live
    /// events all arrive in `outbox`, in sequence order.
    pub async fn attach(
        &self,
        conn: ConnId,
        outbox: Outbox,
        view: RoomView,
        since: Option<u64>,
    ) -> Result<(), ApiError> {
        let mut view = Box::new(view);
        for _ in 0..3 {
            let commands = self.pump_for(view.guild, view.id).await?;
            let (reply, answer) = oneshot::channel();
            let command = Command::Attach {
                conn,
                outbox: outbox.clone(),
                view,
                since,
                reply,
            };
            match commands.send(command).await {
                Ok(()) => {
                    return answer.await.unwrap_or_else(|_| {
                        Err(ApiError::new(ErrorCode::Internal, "room pump stopped"))
                    })
                }
                // The pump retired between lookup and send: take the view back and retry.
                Err(mpsc::error::SendError(Command::Attach { view: v, .. })) => view = v,
                Err(_) => break,
            }
        }
        Err(ApiError::new(
            ErrorCode::Internal,
            "could not reach the room pump",
        ))
    }

    /// Unsubscribes a connection from a room (no-op if it was not subscribed).
    pub async fn detach(&self, room: RoomId, conn: ConnId) {
        let commands = self
            .inner
            .rooms
            .lock()
            .ok()
            .and_then(|rooms| rooms.get(&room).map(|e| e.commands.clone()));
        if let Some(commands) = commands {
            let _ = commands.send(Command::Detach { conn }).await;
        }
    }

    async fn pump_for(
        &self,
        guild: GuildId,
        room: RoomId,
    ) -> Result<mpsc::Sender<Command>, ApiError> {
        if let Some(existing) = self
            .inner
            .rooms
            .lock()
            .ok()
            .and_then(|rooms| rooms.get(&room).map(|e| e.commands.clone()))
        {
            return Ok(existing);
        }
        // Take the live interest before anything is read from the stream, so nothing stored
        // from now on can be missed.
        let live = self
            .inner
            .nats
            .subscribe(subject::filter::live_room(guild, room))
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("subscribing: {e}")))?;
        let (tx, rx) = mpsc::channel(1024);
        let pump_id = self
            .inner
            .next_pump_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut rooms = self
                .inner
                .rooms
                .lock()
                .map_err(|_| ApiError::new(ErrorCode::Internal, "hub lock poisoned"))?;
            if let Some(existing) = rooms.get(&room) {
                // Someone else started the pump meanwhile; our subscription is dropped.
                return Ok(existing.commands.clone());
            }
            rooms.insert(
                room,
                RoomEntry {
                    pump_id,
                    commands: tx.clone(),
                },
            );
        }
        self.inner.metrics.rooms.inc();
        let pump = Pump {
            id: pump_id,
            inner: self.inner.clone(),
            guild,
            room,
            subscribers: HashMap::new(),
            last_seq: 0,
            last_by_kind: HashMap::new(),
            stale: None,
        };
        self.inner.runtime.spawn(pump.run(rx, live));
        Ok(tx)
    }
}

struct Subscriber {
    outbox: Outbox,
    /// Highest sequence delivered to this subscriber.
    last: u64,
}

struct Pump {
    id: u64,
    inner: Arc<Inner>,
    guild: GuildId,
    room: RoomId,
    subscribers: HashMap<ConnId, Subscriber>,
    /// Highest sequence delivered live by this pump.
    last_seq: u64,
    /// Last sequence seen per event kind (subject), to detect gaps from `Nats-Last-Sequence`.
    last_by_kind: HashMap<&'static str, u64>,
    /// Why the live feed is not trusted until a repair succeeds (live delivery paused).
    stale: Option<&'static str>,
}

/// Repair retry backoff while the stream cannot be read (e.g. leader election).
const REPAIR_RETRY_MIN_MS: u64 = 50;
const REPAIR_RETRY_MAX_MS: u64 = 1_000;

impl Pump {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut live: async_nats::Subscriber,
    ) {
        let mut nats_events = self.inner.nats_events.subscribe();
        tracing::debug!(room = %self.room, "room pump started");
        // While the live feed may have lost messages (NATS connection lost, slow consumer,
        // resubscribe), live messages are left waiting in the subscription and not delivered:
        // a later event must never reach a client before a missed earlier one. The repair
        // re-reads the stream after the last delivered sequence, retried with backoff (a
        // JetStream leader election after a node loss takes seconds), then live resumes.
        let mut retry = Duration::from_millis(REPAIR_RETRY_MIN_MS);
        let mut next_repair = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => break,
                // Connection events first: a message that arrived after a reconnect must not
                // be delivered before the repair its disconnect calls for.
                event = nats_events.recv() => {
                    // Disconnected: the stream cannot be read until the client reconnects
                    // (then `Connected` repairs at once); the retry timer is the fallback.
                    let after_disconnect = Duration::from_millis(REPAIR_RETRY_MAX_MS);
                    let stale = match event {
                        Ok(ConnectionEvent::Disconnected) => Some(("nats disconnected", after_disconnect)),
                        Ok(ConnectionEvent::Connected) => Some(("nats reconnected", Duration::ZERO)),
                        Ok(ConnectionEvent::SlowConsumer) => Some(("slow consumer", Duration::ZERO)),
                        Err(broadcast::error::RecvError::Lagged(_)) => Some(("missed connection events", Duration::ZERO)),
                        Err(broadcast::error::RecvError::Closed) => None,
                    };
                    if let Some((why, wait)) = stale {
                        self.mark_stale(why);
                        retry = Duration::from_millis(REPAIR_RETRY_MIN_MS);
                        next_repair = tokio::time::Instant::now() + wait;
                    }
                }
                _ = tokio::time::sleep_until(next_repair), if self.stale.is_some() => {
                    if self.repair().await {
                        retry = Duration::from_millis(REPAIR_RETRY_MIN_MS);
                    } else {
                        next_repair = tokio::time::Instant::now() + retry;
                        retry = (retry * 2).min(Duration::from_millis(REPAIR_RETRY_MAX_MS));
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Attach { conn, outbox, view, since, reply }) => {
                        let result = self.attach(conn, outbox, *view, since).await;
                        let _ = reply.send(result);
                    }
                    Some(Command::Detach { conn }) => {
                        if self.subscribers.remove(&conn).is_some() {
                            self.inner.metrics.subscriptions.dec();
                        }
                        if self.subscribers.is_empty() && self.retire(&commands) {
                            break;
                        }
                    }
                    None => break,
                },
                message = live.next(), if self.stale.is_none() => match message {
                    Some(message) => self.on_live(message).await,
                    None => {
                        tracing::warn!(room = %self.room, "live subscription ended; resubscribing");
                        match self.inner.nats.subscribe(subject::filter::live_room(self.guild, self.room)).await {
                            Ok(s) => {
                                live = s;
                                self.mark_stale("resubscribed");
                                next_repair = tokio::time::Instant::now();
                            }
                            Err(e) => { tracing::error!(room = %self.room, error = %e, "resubscribe failed"); tokio::time::sleep(Duration::from_millis(200)).await; }
                        }
                    }
                },
            }
            // Drop subscribers whose connection ended or overflowed.
            let before = self.subscribers.len();
            self.subscribers
                .retain(|_, s| !s.outbox.is_closed() && !s.outbox.is_overflowed());
            let gone = before - self.subscribers.len();
            if gone > 0 {
                self.inner.metrics.subscriptions.dec_by(gone as i64);
                if self.subscribers.is_empty() && self.retire(&commands) {
                    break;
                }
            }
        }
        if !self.subscribers.is_empty() {
            self.inner
                .metrics
                .subscriptions
                .dec_by(self.subscribers.len() as i64);
        }
        self.remove_entry();
        tracing::debug!(room = %self.room, "room pump stopped");
    }

    /// Removes this pump from the hub if no command is waiting; true when it should stop.
    fn retire(&self, commands: &mpsc::Receiver<Command>) -> bool {
        let Ok(mut rooms) = self.inner.rooms.lock() else {
            return true;
        };
        if !commands.is_empty() {
            return false;
        }
        if rooms.get(&self.room).is_some_and(|e| e.pump_id == self.id) {
            rooms.remove(&self.room);
            self.inner.metrics.rooms.dec();
        }
        true
    }

    fn remove_entry(&self) {
        if let Ok(mut rooms) = self.inner.rooms.lock() {
            if rooms.get(&self.room).is_some_and(|e| e.pump_id == self.id) {
                rooms.remove(&self.room);
                self.inner.metrics.rooms.dec();
            }
        }
    }

    async fn attach(
        &mut self,
        conn: ConnId,
        outbox: Outbox,
        view: RoomView,
        since: Option<u64>,
    ) -> Result<(), ApiError> {
        let (recovered, start, replay) = match since {
            Some(since) => match self.replay_after(since, true).await {
                Ok(replay) => (true, since, replay),
                Err(ReplayError::Nats(e)) => return Err(ApiError::new(ErrorCode::Internal, e)),
                Err(ReplayError::TooOld | ReplayError::TooMany(_)) => {
                    (false, view.seq, self.snapshot_replay(view.seq).await?)
                }
            },
            None => (false, view.seq, self.snapshot_replay(view.seq).await?),
        };
        let ack = protocol::ack(
            "subscribed",
            Some(self.room),
            protocol::Subscribed {
                recovered,
                snapshot: (!recovered).then_some(&view),
                seq: start,
                replayed: replay.events.len(),
            },
        );
        outbox.push(&ack);
        let mut last = start;
        for (seq, event) in &replay.events {
            let frame = protocol::event(event, *seq, &protocol::event_data(event));
            outbox.push(&frame);
            last = *seq;
        }
        self.inner
            .metrics
            .replayed
            .inc_by(replay.events.len() as u64);
        if self
            .subscribers
            .insert(conn, Subscriber { outbox, last })
            .is_none()
        {
            self.inner.metrics.subscriptions.inc();
        }
        Ok(())
    }

    async fn snapshot_replay(&self, seq: u64) -> Result<Replay, ApiError> {
        match self.replay_after(seq, false).await {
            Ok(replay) => Ok(replay),
            Err(ReplayError::TooMany(n)) => Err(ApiError::new(
                ErrorCode::Timeout,
                format!("room state is {n} events behind; retry shortly"),
            )),
            Err(ReplayError::TooOld) => Ok(Replay { events: Vec::new() }),
            Err(ReplayError::Nats(e)) => Err(ApiError::new(ErrorCode::Internal, e)),
        }
    }

    /// The room's stored events with a sequence above `after`. With `strict`, fails when the
    /// stream may have dropped some of them (its first sequence is above `after + 1`).
    async fn replay_after(&self, after: u64, strict: bool) -> Result<Replay, ReplayError> {
        let mut stream = self
            .inner
            .js
            .get_stream(ROOMS_STREAM)
            .await
            .map_err(|e| ReplayError::Nats(format!("stream: {e}")))?;
        let state = stream
            .info()
            .await
            .map_err(|e| ReplayError::Nats(format!("stream info: {e}")))?
            .state
            .clone();
        if strict && after + 1 < state.first_sequence {
            return Err(ReplayError::TooOld);
        }
        if after >= state.last_sequence {
            return Ok(Replay { events: Vec::new() });
        }
        // Where the room's stored events end. nats-server 2.9 can under-report a new consumer's
        // `num_pending`, so the read stops at this sequence rather than after a count.
        let filter = subject::filter::room(self.guild, self.room);
        let end = match stream.get_last_raw_message_by_subject(&filter).await {
            Ok(message) => message.sequence,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Replay { events: Vec::new() })
            }
            Err(e) => return Err(ReplayError::Nats(format!("last event: {e}"))),
        };
        if end <= after {
            return Ok(Replay { events: Vec::new() });
        }
        let start = (after + 1).max(state.first_sequence).max(1);
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| ReplayError::Nats(format!("consumer: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ReplayError::Nats(format!("messages: {e}")))?;
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let message = match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(ReplayError::Nats(format!("reading: {e}"))),
                Ok(None) => return Err(ReplayError::Nats("replay ended early".into())),
                Err(_) => return Err(ReplayError::Nats("replay timed out".into())),
            };
            let seq = message
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| ReplayError::Nats(format!("message info: {e}")))?;
            if events.len() as u64 >= self.inner.replay_limit {
                return Err(ReplayError::TooMany(end - after));
            }
            match RoomEvent::decode_on(&message.subject, &message.payload) {
                Ok(event) => events.push((seq, event)),
                Err(e) => {
                    self.inner.metrics.bad_events.inc();
                    tracing::warn!(room = %self.room, seq, error = %e, "skipping undecodable stored event");
                }
            }
            if seq >= end {
                break;
            }
        }
        Ok(Replay { events })
    }

    async fn on_live(&mut self, message: async_nats::Message) {
        let headers = message.headers.as_ref();
        let Some(seq) = header_u64(headers, "Nats-Sequence") else {
            self.inner.metrics.bad_events.inc();
            tracing::warn!(room = %self.room, subject = %message.subject, "live event without Nats-Sequence");
            return;
        };
        if seq <= self.last_seq {
            return;
        }
        let event = match RoomEvent::decode_on(&message.subject, &message.payload) {
            Ok(event) => event,
            Err(e) => {
                self.inner.metrics.bad_events.inc();
                tracing::warn!(room = %self.room, seq, error = %e, "skipping undecodable event");
                self.last_seq = seq;
                return;
            }
        };
        let kind = event.kind().as_str();
        if let (Some(previous), Some(known)) = (
            header_u64(headers, "Nats-Last-Sequence"),
            self.last_by_kind.get(kind).copied(),
        ) {
            if previous > known && previous > self.last_seq {
                // Not delivered: the repair reads it (and this one) from the stream.
                self.mark_stale("sequence gap on the live feed");
                return;
            }
        }
        // Joins the event's trace (publisher's context in the headers the stream republished).
        let span = tracing::info_span!("edge.fanout", room = %self.room, seq, kind, subscribers = self.subscribers.len());
        voicerooms_platform::telemetry::extract_or_traceparent(
            &span,
            headers,
            event.traceparent.as_deref(),
        );
        let _in_span = span.enter();
        self.deliver(seq, &event);
    }

    fn deliver(&mut self, seq: u64, event: &RoomEvent) {
        let frame = protocol::event(event, seq, &protocol::event_data(event));
        let mut sent = 0u64;
        for subscriber in self.subscribers.values_mut() {
            if subscriber.last < seq {
                if subscriber.outbox.push_event(&frame, event.received_at) {
                    sent += 1;
                }
                subscriber.last = seq;
            }
        }
        self.last_seq = self.last_seq.max(seq);
        self.last_by_kind.insert(event.kind().as_str(), seq);
        self.inner.metrics.messages_out.inc_by(sent);
        self.inner.metrics.events_in.inc();
        let now = voicerooms_contract::now_ms();
        self.inner
            .metrics
            .fanout_latency
            .observe(now.saturating_sub(event.received_at) as f64 / 1000.0);
    }

    fn mark_stale(&mut self, why: &'static str) {
        if self.stale.is_none() {
            tracing::debug!(room = %self.room, why, "live feed paused until repaired");
        }
        self.stale = Some(why);
    }

    /// Re-reads the stream after the last delivered sequence and delivers what was missed;
    /// true when the live feed can be trusted again (false: retry later).
    async fn repair(&mut self) -> bool {
        let why = self.stale.unwrap_or("repair");
        if self.subscribers.is_empty() {
            self.stale = None;
            return true;
        }
        let after = self
            .subscribers
            .values()
            .map(|s| s.last)
            .min()
            .unwrap_or(self.last_seq);
        match self.replay_after(after, false).await {
            Ok(replay) => {
                self.inner.metrics.repairs.inc();
                tracing::info!(room = %self.room, why, after, recovered = replay.events.len(), "repaired live feed from the stream");
                for (seq, event) in &replay.events {
                    self.deliver(*seq, event);
                }
            }
            Err(ReplayError::TooMany(n)) => {
                self.inner.metrics.repairs.inc();
                tracing::error!(room = %self.room, why, pending = n, "gap too large to repair; asking clients to resubscribe");
                let frame = protocol::error_code(
                    "resubscribe",
                    "events were missed; subscribe again with since",
                    Some(self.room),
                );
                for subscriber in self.subscribers.values() {
                    subscriber.outbox.push(&frame);
                }
                self.inner
                    .metrics
                    .subscriptions
                    .dec_by(self.subscribers.len() as i64);
                self.subscribers.clear();
            }
            Err(ReplayError::TooOld) => {}
            Err(ReplayError::Nats(e)) => {
                tracing::warn!(room = %self.room, why, error = %e, "repair failed; retrying");
                return false;
            }
        }
        self.stale = None;
        true
    }
}

fn header_u64(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}
