//! Per-room fan-out.
//!
//! Each room with at least one local subscriber has one *pump* task: it holds the edge's only
//! NATS interest in the room (`live.rooms.<guild>.<room>.>`, the stream's republish with
//! `Nats-Sequence`), decodes each event once, serialises the client frame once and hands the same
//! bytes to every subscriber's [`Outbox`]. The pump never waits on JetStream itself:
//!
//! - **attach**: a *catch-up* task reads the room's events after the client's starting point
//!   (`since`, or the snapshot's sequence) from the `ROOMS` stream while the pump goes on
//!   delivering live events to everyone else; the live events that arrive meanwhile are kept for
//!   the newcomer (bounded). When the read is done the pump queues `ack subscribed`, the read
//!   events and the kept ones, skipping duplicates, and the newcomer goes live. A catch-up that
//!   would pass `replay_max_bytes` (or `replay_limit` events) becomes a fresh snapshot
//!   (`recovered: false`), never a partial replay and never more than the client's queue holds.
//!   A pump that already knows the answer skips the read: primed by an earlier catch-up in this
//!   epoch, its live feed trusted, and the newcomer's snapshot of the same epoch at or past every
//!   event the pump has seen (`Pump::catch_up_in_memory`). Subscribes that arrive while the
//!   first read of an unprimed pump is in flight wait for it (parked) instead of reading the
//!   same again;
//! - **epochs**: sequences belong to one incarnation of the `ROOMS` stream (its creation time).
//!   A `since` from another epoch, beyond the stream's end, or older than what it keeps gets a
//!   snapshot; when the stream is recreated under live subscribers they are asked to resubscribe;
//! - **revocation**: `room.member_removed` for a subscriber's user ends that subscription
//!   (`error not_member`), `room.deleted` ends every subscription of the room
//!   (`error room_deleted`), after the event itself;
//! - **gap repair**: after a NATS reconnect (jittered), a slow-consumer report for this pump's
//!   own subscription, or a `Nats-Last-Sequence` that skips a sequence seen on that subject, live
//!   delivery pauses while a repair task re-reads the stream after the last delivered sequence,
//!   retried with backoff until it succeeds;
//! - every JetStream call of catch-ups and repairs goes through one budget per edge
//!   (`jetstream_rate` calls per second, `jetstream_concurrency` at once, each bounded by
//!   `read_timeout_ms`), so a reconnect of thousands of rooms cannot flood the server;
//! - pumps and their tasks are tracked (shutdown waits for them); a pump that ends for any reason,
//!   a panic included, removes its room entry and tells its subscribers to resubscribe (drop
//!   guard), so a room never stays dead on an edge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytestring::ByteString;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicerooms_contract::command::RoomView;
use voicerooms_contract::event::Event;
use voicerooms_contract::subject::{self, ROOMS_STREAM};
use voicerooms_contract::{ApiError, ErrorCode, GuildId, Millis, RoomEvent, RoomId, UserId};
use voicerooms_platform::nats::{ConnectionEvent, LazyBucket};
use voicerooms_platform::retry::{Backoff, Jitter};

use crate::metrics::EdgeMetrics;
use crate::outbox::Outbox;
use crate::protocol::{self, Epoch};

/// Identifies one WebSocket connection within this edge.
pub type ConnId = u64;

/// Limits and timings of the fan-out.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most events one catch-up or repair reads.
    pub replay_limit: u64,
    /// Most bytes of event frames one catch-up or repair reads (below a connection's queue limit).
    pub replay_max_bytes: usize,
    /// Bound of each JetStream request (and of each wait for the next replayed message).
    pub read_timeout: Duration,
    /// Repairs after a NATS reconnect start at a random delay up to this.
    pub repair_jitter: Duration,
    /// How often the stream's epoch is checked while rooms are served.
    pub epoch_check_interval: Duration,
    /// JetStream API calls per second for catch-ups and repairs, across the edge.
    pub jetstream_rate: u32,
    /// JetStream API calls in flight at once, across the edge.
    pub jetstream_concurrency: usize,
}

/// A subscriber: one connection's subscription to one room.
#[derive(Clone)]
pub struct Subscription {
    pub conn: ConnId,
    /// Tells this subscription from earlier ones of the same connection to the same room.
    pub id: u64,
    pub outbox: Outbox,
    pub user: UserId,
    /// The room's owner stays subscribed when removed from the members (only deletion ends it).
    pub owner: bool,
}

/// A room's snapshot from the `rooms` bucket, with the stream epoch its `seq` belongs to when
/// room-manager recorded it.
#[derive(Clone)]
pub struct RoomSnapshot {
    pub view: RoomView,
    pub epoch: Option<Epoch>,
}

#[derive(serde::Deserialize)]
struct StoredRoom {
    #[serde(flatten)]
    view: RoomView,
    #[serde(default, deserialize_with = "lenient_epoch")]
    stream_epoch: Option<Epoch>,
}

/// room-manager's record of the epoch its view belongs to. Unreadable (another writer's format)
/// counts as unknown: the view's sequence is then checked against the stream instead.
fn lenient_epoch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Epoch>, D::Error> {
    use serde::Deserialize as _;
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::String(s)) => Epoch::parse(&s).ok(),
        Some(serde_json::Value::Number(n)) => n.as_u64().map(Epoch::from_unix_nanos),
        _ => None,
    })
}

/// How an attach ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Live: events keep coming.
    Live,
    /// The subscription was ended during its catch-up (membership revoked, room deleted); the
    /// frames saying so are queued.
    Ended,
}

/// A client's claimed position.
#[derive(Debug, Clone, Copy)]
pub struct Since {
    pub seq: u64,
    pub epoch: Option<Epoch>,
}

/// Commands to a room pump.
enum Command {
    Attach {
        sub: Subscription,
        snapshot: Box<RoomSnapshot>,
        since: Option<Since>,
        reply: oneshot::Sender<Result<Attached, ApiError>>,
    },
    Detach {
        conn: ConnId,
    },
    CatchUpDone {
        conn: ConnId,
        id: u64,
        result: Result<CatchUp, ApiError>,
    },
    RepairDone {
        generation: u64,
        result: Result<Repaired, ReadError>,
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
    tasks: TaskTracker,
    shutdown: CancellationToken,
    nats_events: broadcast::Sender<ConnectionEvent>,
    config: HubConfig,
    metrics: EdgeMetrics,
    next_pump_id: AtomicU64,
    budget: Budget,
    /// The last stream position read (shared by every catch-up and repair).
    stream: tokio::sync::Mutex<Option<StreamPos>>,
    /// The newest stream epoch seen.
    epoch: watch::Sender<Option<Epoch>>,
}

/// What the stream looked like when asked at `asked`.
#[derive(Debug, Clone, Copy)]
struct StreamPos {
    epoch: Epoch,
    first: u64,
    last: u64,
    asked: Instant,
}

/// Why a read of the stream did not give the events.
#[derive(Debug)]
enum ReadError {
    /// More than `replay_max_bytes` / `replay_limit`.
    TooMuch,
    Nats(String),
}

/// What revoking an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Revokes {
    Nobody,
    Member(UserId),
    Everyone,
}

/// One event, decoded and serialised once.
#[derive(Clone)]
struct Item {
    seq: u64,
    frame: ByteString,
    received_at: Millis,
    kind: &'static str,
    revokes: Revokes,
}

impl Item {
    fn new(seq: u64, event: &RoomEvent) -> Self {
        let revokes = match &event.event {
            Event::RoomMemberRemoved(removed) => Revokes::Member(removed.user.id),
            Event::RoomDeleted(_) => Revokes::Everyone,
            _ => Revokes::Nobody,
        };
        Item {
            seq,
            frame: protocol::event(event, seq, &protocol::event_data(event)),
            received_at: event.received_at,
            kind: event.kind().as_str(),
            revokes,
        }
    }
}

/// What a catch-up read.
struct CatchUp {
    epoch: Epoch,
    recovered: bool,
    /// Events after this follow (`since`, or the snapshot's position).
    start: u64,
    /// Events after this are checked against the subscriber's membership (the snapshot's
    /// position: it showed them as a member).
    auth_from: u64,
    items: Vec<Item>,
    /// The room's last stored event when read.
    end: u64,
}

enum Repaired {
    Events(Vec<Item>),
    TooMuch,
    EpochChanged(Epoch),
}

/// Why a subscription ends while the connection stays.
#[derive(Debug, Clone, Copy)]
enum EndReason {
    NotMember,
    RoomDeleted,
    Resubscribe,
}

impl EndReason {
    fn frame(self, room: RoomId) -> ByteString {
        match self {
            EndReason::NotMember => protocol::error(
                ErrorCode::NotMember,
                "you are no longer a member of this room",
                Some(room),
            ),
            EndReason::RoomDeleted => {
                protocol::error_code("room_deleted", "the room was deleted", Some(room))
            }
            EndReason::Resubscribe => protocol::error_code(
                "resubscribe",
                "events could not be delivered in order; subscribe again with since and epoch",
                Some(room),
            ),
        }
    }
}

fn later(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay).unwrap_or(now)
}

/// Uniform in `[0, max]`: spreads the repairs of many pumps woken by one reconnect.
fn jitter(max: Duration) -> Duration {
    Backoff::new(max, max).with_jitter(Jitter::Full).delay(1)
}

/// The subscription id async-nats gave `subscriber` (it has no accessor; its `Debug` shows it),
/// to route slow-consumer reports. `None` if the format ever changes: then every report repairs.
fn sid_of(subscriber: &async_nats::Subscriber) -> Option<u64> {
    let debug = format!("{subscriber:?}");
    let rest = debug.split_once("sid: ")?.1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn header_u64(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

/// Paces JetStream API calls: at most `rate` per second (a burst of 1/20 s worth) and
/// `concurrency` at once, each bounded by `timeout`.
///
/// A call takes its slot when it is made, not when it starts waiting: a runtime stall then
/// cannot bunch up calls scheduled during it (only the burst goes at once). Waiters queue
/// fairly on `turn`, so only the first of them sleeps.
struct Budget {
    interval: Duration,
    burst: Duration,
    next: tokio::sync::Mutex<Instant>,
    permits: Semaphore,
    timeout: Duration,
    metrics: EdgeMetrics,
}

impl Budget {
    fn new(rate: u32, concurrency: usize, timeout: Duration, metrics: EdgeMetrics) -> Self {
        let interval = Duration::from_secs(1)
            .checked_div(rate.max(1))
            .unwrap_or(Duration::from_millis(1));
        Self {
            interval,
            burst: Duration::from_millis(50),
            next: tokio::sync::Mutex::new(Instant::now()),
            permits: Semaphore::new(concurrency.max(1)),
            timeout,
            metrics,
        }
    }

    /// Waits for `cost` calls' worth of the rate.
    async fn pace(&self, cost: u32) {
        let mut next = self.next.lock().await;
        let now = Instant::now();
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        let slot = (*next).max(earliest);
        if slot > now {
            tokio::time::sleep_until(slot).await;
        }
        let spend = self.interval.saturating_mul(cost);
        *next = slot.checked_add(spend).unwrap_or(slot);
        self.metrics.jetstream_calls.inc_by(u64::from(cost));
    }

    /// One JetStream request, paced, limited and bounded.
    async fn call<T, E: std::fmt::Display>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, ReadError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ReadError::Nats("closed".into()))?;
        self.pace(1).await;
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(ReadError::Nats(format!("{what}: {e}"))),
            Err(_) => Err(ReadError::Nats(format!("{what}: timed out"))),
        }
    }
}

/// Events of one room read from the stream, bounded by count and bytes.
struct Collected<'a> {
    inner: &'a Inner,
    room: RoomId,
    items: Vec<Item>,
    bytes: usize,
}

impl Collected<'_> {
    fn push(&mut self, seq: u64, subject: &str, payload: &[u8]) -> Result<(), ReadError> {
        match RoomEvent::decode_on(subject, payload) {
            Ok(event) => {
                let item = Item::new(seq, &event);
                self.bytes = self.bytes.saturating_add(item.frame.len());
                self.items.push(item);
                let count = u64::try_from(self.items.len()).unwrap_or(u64::MAX);
                if self.bytes > self.inner.config.replay_max_bytes
                    || count > self.inner.config.replay_limit
                {
                    return Err(ReadError::TooMuch);
                }
            }
            Err(e) => {
                self.inner.metrics.bad_events.inc();
                tracing::warn!(room = %self.room, seq, error = %e, "skipping undecodable stored event");
            }
        }
        Ok(())
    }
}

/// A gap this small is read with one leader read per event; larger ones with a consumer.
const SINGLE_READS: usize = 4;
/// A consumer asks for more about every this many messages (async-nats' ordered batch / 2).
const PULL_EVERY: usize = 250;

impl Inner {
    /// The stream's position, read no earlier than `fresher_than` (one read serves everyone
    /// waiting meanwhile).
    async fn stream_pos(&self, fresher_than: Instant) -> Result<StreamPos, ReadError> {
        let mut cached = self.stream.lock().await;
        if let Some(pos) = *cached {
            if pos.asked >= fresher_than {
                return Ok(pos);
            }
        }
        let asked = Instant::now();
        let stream = self
            .js
            .get_stream_no_info(ROOMS_STREAM)
            .await
            .map_err(|e| ReadError::Nats(format!("stream: {e}")))?;
        let info = self.budget.call("stream info", stream.get_info()).await?;
        let epoch = voicerooms_platform::nats::stream_epoch(&info)
            .map_err(|e| ReadError::Nats(e.to_string()))?;
        let pos = StreamPos {
            epoch,
            first: info.state.first_sequence,
            last: info.state.last_sequence,
            asked,
        };
        *cached = Some(pos);
        self.epoch.send_if_modified(|known| {
            let changed = *known != Some(pos.epoch);
            if changed {
                if known.is_some() {
                    tracing::warn!(
                        epoch = %pos.epoch,
                        "the ROOMS stream was recreated (new epoch)"
                    );
                }
                *known = Some(pos.epoch);
            }
            changed
        });
        Ok(pos)
    }

    /// Sequence of the room's last stored event (0: none).
    async fn last_room_seq(&self, guild: GuildId, room: RoomId) -> Result<u64, ReadError> {
        let stream = self
            .js
            .get_stream_no_info(ROOMS_STREAM)
            .await
            .map_err(|e| ReadError::Nats(format!("stream: {e}")))?;
        let filter = subject::filter::room(guild, room);
        let _permit = self
            .budget
            .permits
            .acquire()
            .await
            .map_err(|_| ReadError::Nats("closed".into()))?;
        self.budget.pace(1).await;
        match tokio::time::timeout(
            self.config.read_timeout,
            stream.get_last_raw_message_by_subject(&filter),
        )
        .await
        {
            Ok(Ok(message)) => Ok(message.sequence),
            Ok(Err(e))
                if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(0)
            }
            Ok(Err(e)) => Err(ReadError::Nats(format!("last event: {e}"))),
            Err(_) => Err(ReadError::Nats("last event: timed out".into())),
        }
    }

    /// The room's stored events in `(after, end]`, bounded by `replay_max_bytes` and
    /// `replay_limit` (else [`ReadError::TooMuch`]).
    async fn read_room(
        &self,
        guild: GuildId,
        room: RoomId,
        after: u64,
        end: u64,
    ) -> Result<Vec<Item>, ReadError> {
        let mut out = Collected {
            inner: self,
            room,
            items: Vec::new(),
            bytes: 0,
        };
        let Some(mut cursor) = after.checked_add(1) else {
            return Ok(out.items);
        };
        if cursor > end {
            return Ok(out.items);
        }
        let stream = self
            .js
            .get_stream_no_info(ROOMS_STREAM)
            .await
            .map_err(|e| ReadError::Nats(format!("stream: {e}")))?;
        let filter = subject::filter::room(guild, room);
        // Small gaps (most repairs): one leader read per event, no consumer to create.
        for _ in 0..SINGLE_READS {
            let _permit = self
                .budget
                .permits
                .acquire()
                .await
                .map_err(|_| ReadError::Nats("closed".into()))?;
            self.budget.pace(1).await;
            let message = match tokio::time::timeout(
                self.config.read_timeout,
                stream.get_first_raw_message_by_subject(&filter, cursor),
            )
            .await
            {
                Ok(Ok(message)) => message,
                Ok(Err(e))
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    return Ok(out.items);
                }
                Ok(Err(e)) => return Err(ReadError::Nats(format!("next event: {e}"))),
                Err(_) => return Err(ReadError::Nats("next event: timed out".into())),
            };
            out.push(message.sequence, &message.subject, &message.payload)?;
            if message.sequence >= end {
                return Ok(out.items);
            }
            cursor = match message.sequence.checked_add(1) {
                Some(next) => next,
                None => return Ok(out.items),
            };
        }
        // Larger: an ordered consumer from the cursor. nats-server 2.9 can under-report a new
        // consumer's `num_pending`, so the read stops at `end` rather than after a count.
        let consumer = self
            .budget
            .call(
                "consumer",
                stream.create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: filter,
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: cursor,
                    },
                    ..Default::default()
                }),
            )
            .await?;
        self.budget.pace(1).await;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ReadError::Nats(format!("messages: {e}")))?;
        let mut read = 0usize;
        loop {
            let message =
                match tokio::time::timeout(self.config.read_timeout, messages.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => return Err(ReadError::Nats(format!("reading: {e}"))),
                    Ok(None) => return Err(ReadError::Nats("replay ended early".into())),
                    Err(_) => return Err(ReadError::Nats("replay timed out".into())),
                };
            read = read.saturating_add(1);
            if read.is_multiple_of(PULL_EVERY) {
                self.budget.pace(1).await;
            }
            let seq = message
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| ReadError::Nats(format!("message info: {e}")))?;
            out.push(seq, &message.subject, &message.payload)?;
            if seq >= end {
                return Ok(out.items);
            }
        }
    }

    /// Reads what a new subscriber needs (outside the pump).
    async fn catch_up(
        &self,
        guild: GuildId,
        room: RoomId,
        snapshot: &RoomSnapshot,
        since: Option<Since>,
        asked: Instant,
    ) -> Result<CatchUp, ApiError> {
        let unavailable =
            |e: String| ApiError::new(ErrorCode::Unavailable, format!("reading the stream: {e}"));
        let pos = match self.stream_pos(asked).await {
            Ok(pos) => pos,
            Err(ReadError::Nats(e)) => return Err(unavailable(e)),
            Err(ReadError::TooMuch) => return Err(unavailable("too much".into())),
        };
        let end = match self.last_room_seq(guild, room).await {
            Ok(end) => end,
            Err(ReadError::Nats(e)) => return Err(unavailable(e)),
            Err(ReadError::TooMuch) => return Err(unavailable("too much".into())),
        };
        let first_kept = pos.first.saturating_sub(1);
        // Where the snapshot stands in this stream: its sequence, unless it was taken in another
        // epoch (or is beyond this stream's end, which only another epoch explains). Then every
        // stored event of the room is applied over it (events set state, so that converges).
        let view_seq = snapshot.view.seq;
        let view_start = match snapshot.epoch {
            Some(epoch) if epoch != pos.epoch => first_kept,
            _ if view_seq > pos.last => first_kept,
            _ => view_seq,
        };
        // `since` is trusted only from this epoch, within the stream, and with every event after
        // it still stored.
        let recoverable = since.and_then(|s| {
            let same_epoch = s.epoch == Some(pos.epoch);
            let kept = s.seq.checked_add(1).is_some_and(|next| next >= pos.first);
            (same_epoch && s.seq <= pos.last && kept).then_some(s.seq)
        });
        if let Some(since) = recoverable {
            // From the snapshot's position when it is older: events between it and `since`
            // are not sent, but a removal among them still ends the subscription.
            match self
                .read_room(guild, room, since.min(view_start), end)
                .await
            {
                Ok(items) => {
                    return Ok(CatchUp {
                        epoch: pos.epoch,
                        recovered: true,
                        start: since,
                        auth_from: view_start,
                        items,
                        end,
                    })
                }
                Err(ReadError::TooMuch) => {
                    self.metrics.snapshot_fallbacks.inc();
                    tracing::debug!(room = %room, since, "catch-up too large; sending a snapshot");
                }
                Err(ReadError::Nats(e)) => return Err(unavailable(e)),
            }
        }
        match self.read_room(guild, room, view_start, end).await {
            Ok(items) => Ok(CatchUp {
                epoch: pos.epoch,
                recovered: false,
                start: view_start,
                auth_from: view_start,
                items,
                end,
            }),
            Err(ReadError::TooMuch) => Err(ApiError::new(
                ErrorCode::Timeout,
                "the room's state is far behind its events; retry shortly",
            )),
            Err(ReadError::Nats(e)) => Err(unavailable(e)),
        }
    }

    /// Reads what a paused pump missed after `after`.
    async fn repair(
        &self,
        guild: GuildId,
        room: RoomId,
        epoch: Option<Epoch>,
        after: u64,
        fresher_than: Instant,
    ) -> Result<Repaired, ReadError> {
        let pos = self.stream_pos(fresher_than).await?;
        if epoch.is_some_and(|e| e != pos.epoch) {
            return Ok(Repaired::EpochChanged(pos.epoch));
        }
        let end = self.last_room_seq(guild, room).await?;
        if end <= after {
            return Ok(Repaired::Events(Vec::new()));
        }
        match self.read_room(guild, room, after, end).await {
            Ok(items) => Ok(Repaired::Events(items)),
            Err(ReadError::TooMuch) => Ok(Repaired::TooMuch),
            Err(e) => Err(e),
        }
    }

    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(task, &self.runtime);
    }
}

impl Hub {
    pub fn new(
        nats: async_nats::Client,
        rooms_kv: Arc<LazyBucket>,
        nats_events: broadcast::Sender<ConnectionEvent>,
        config: HubConfig,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        metrics: EdgeMetrics,
    ) -> Self {
        let mut js = jetstream::new(nats.clone());
        js.set_timeout(config.read_timeout);
        let budget = Budget::new(
            config.jetstream_rate,
            config.jetstream_concurrency,
            config.read_timeout,
            metrics.clone(),
        );
        let hub = Self {
            inner: Arc::new(Inner {
                nats,
                js,
                rooms_kv,
                rooms: Mutex::new(HashMap::new()),
                runtime: tokio::runtime::Handle::current(),
                tasks,
                shutdown,
                nats_events,
                config,
                metrics,
                next_pump_id: AtomicU64::new(1),
                budget,
                stream: tokio::sync::Mutex::new(None),
                epoch: watch::channel(None).0,
            }),
        };
        hub.inner.spawn(watch_epoch(hub.inner.clone()));
        hub
    }

    /// The room's snapshot from the `rooms` bucket.
    pub async fn room_view(&self, room: RoomId) -> Result<Option<RoomSnapshot>, ApiError> {
        let store = self.inner.rooms_kv.get().await.map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("room state unavailable: {e}"))
        })?;
        let entry = store
            .get(subject::room_key(room))
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("reading room state: {e}")))?;
        match entry {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice::<StoredRoom>(&bytes)
                .map(|stored| {
                    Some(RoomSnapshot {
                        view: stored.view,
                        epoch: stored.stream_epoch,
                    })
                })
                .map_err(|e| ApiError::new(ErrorCode::Internal, format!("bad room state: {e}"))),
        }
    }

    /// Number of rooms with a pump on this edge.
    pub fn room_count(&self) -> usize {
        self.inner
            .rooms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Subscribes a connection to a room: `ack subscribed`, the catch-up events and then live
    /// events all arrive in its outbox, in sequence order.
    pub async fn attach(
        &self,
        sub: Subscription,
        snapshot: RoomSnapshot,
        since: Option<Since>,
    ) -> Result<Attached, ApiError> {
        let (guild, room) = (snapshot.view.guild, snapshot.view.id);
        // A pump that retired or died between lookup and answer: try a fresh one.
        for _ in 0..3 {
            let commands = self.pump_for(guild, room).await?;
            let (reply, answer) = oneshot::channel();
            let command = Command::Attach {
                sub: sub.clone(),
                snapshot: Box::new(snapshot.clone()),
                since,
                reply,
            };
            if commands.send(command).await.is_err() {
                continue;
            }
            if let Ok(result) = answer.await {
                return result;
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
            .unwrap_or_else(PoisonError::into_inner)
            .get(&room)
            .map(|e| e.commands.clone());
        if let Some(commands) = commands {
            let _ = commands.send(Command::Detach { conn }).await;
        }
    }

    async fn pump_for(
        &self,
        guild: GuildId,
        room: RoomId,
    ) -> Result<mpsc::Sender<Command>, ApiError> {
        let existing = self
            .inner
            .rooms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&room)
            .map(|e| e.commands.clone());
        if let Some(existing) = existing {
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
        let pump_id = self.inner.next_pump_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut rooms = self
                .inner
                .rooms
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
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
            commands: tx.clone(),
            epoch: None,
            subscribers: HashMap::new(),
            pending: HashMap::new(),
            last_seq: 0,
            last_by_kind: HashMap::new(),
            sid: sid_of(&live),
            stale: None,
            stale_generation: 0,
            stale_since: Instant::now(),
            repairing: false,
            primed: false,
            seen_through: 0,
            clean_exit: false,
        };
        self.inner.spawn(pump.run(rx, live));
        Ok(tx)
    }
}

/// Checks the stream's epoch now and then while rooms are served, so live subscribers learn of a
/// recreated stream even when nothing else reads it.
async fn watch_epoch(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(inner.config.epoch_check_interval) => {}
        }
        let serving = !inner
            .rooms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if serving {
            if let Err(e) = inner.stream_pos(Instant::now()).await {
                tracing::debug!(error = ?e, "epoch check failed");
            }
        }
    }
}

struct Subscriber {
    sub: Subscription,
    /// Highest sequence delivered to this subscriber.
    last: u64,
}

/// A subscriber whose catch-up is being read.
struct Pending {
    sub: Subscription,
    snapshot: Box<RoomSnapshot>,
    since: Option<Since>,
    reply: oneshot::Sender<Result<Attached, ApiError>>,
    /// Live events delivered meanwhile, for after the catch-up.
    buffer: Vec<Item>,
    buffered_bytes: usize,
    /// The live feed may have lost something (or the buffer overflowed) meanwhile: read again.
    tainted: bool,
    attempts: u32,
    /// Waiting for another subscriber's read, which primes the pump, instead of reading the
    /// same again (no read of its own in flight).
    parked: bool,
}

/// Most catch-up reads for one subscribe (each is redone when the live feed had a gap meanwhile).
const MAX_CATCH_UP_ATTEMPTS: u32 = 4;

struct Pump {
    id: u64,
    inner: Arc<Inner>,
    guild: GuildId,
    room: RoomId,
    /// Given to the pump's tasks to report back.
    commands: mpsc::Sender<Command>,
    /// The stream epoch this pump's sequences belong to (set by the first catch-up).
    epoch: Option<Epoch>,
    subscribers: HashMap<ConnId, Subscriber>,
    pending: HashMap<ConnId, Pending>,
    /// Highest sequence delivered live by this pump.
    last_seq: u64,
    /// Last sequence seen per event kind (subject), to detect gaps from `Nats-Last-Sequence`.
    last_by_kind: HashMap<&'static str, u64>,
    /// The live subscription's id, to pick out its slow-consumer reports.
    sid: Option<u64>,
    /// Why the live feed is not trusted until a repair succeeds (live delivery paused).
    stale: Option<&'static str>,
    /// Bumped each time the feed is marked stale: a repair only clears the mark it was for.
    stale_generation: u64,
    /// When the feed was last marked stale: the repair reads the stream after this.
    stale_since: Instant,
    repairing: bool,
    /// A catch-up has completed in this epoch since the pump started (or since a hole it could
    /// not repair): every event of the room up to `seen_through` has passed through the pump,
    /// and every later one comes live while the feed is trusted.
    primed: bool,
    /// The highest sequence of this room's events the pump has read or delivered.
    seen_through: u64,
    /// Whether the pump ended normally (else its drop tells subscribers to resubscribe).
    clean_exit: bool,
}

/// Repair retry backoff while the stream cannot be read (e.g. leader election): 50-100 ms,
/// doubling to 0.5-1 s.
const REPAIR_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).with_jitter(Jitter::Equal);
/// The wait for a repair after a disconnect, should the reconnect not call for one sooner.
const REPAIR_AFTER_DISCONNECT: Duration = Duration::from_millis(500);
/// Before subscribing again after a failed resubscribe: 100-200 ms, doubling to 1-2 s.
const RESUBSCRIBE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(2)).with_jitter(Jitter::Equal);

impl Pump {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut live: async_nats::Subscriber,
    ) {
        let mut nats_events = self.inner.nats_events.subscribe();
        let mut epochs = self.inner.epoch.subscribe();
        epochs.mark_unchanged();
        tracing::debug!(room = %self.room, "room pump started");
        // While the live feed may have lost messages (NATS connection lost, slow consumer,
        // resubscribe), live messages are left waiting in the subscription and not delivered:
        // a later event must never reach a client before a missed earlier one.
        let mut retry = REPAIR_BACKOFF.schedule();
        let mut resubscribe = RESUBSCRIBE_BACKOFF.schedule();
        let mut next_repair = Instant::now();
        let mut epochs_open = true;
        // Until its first subscriber arrives a new pump does not retire (it was created for one).
        let mut served = false;
        loop {
            tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => {
                    self.clean_exit = true;
                    break;
                }
                // Connection events first: a message that arrived after a reconnect must not
                // be delivered before the repair its disconnect calls for.
                event = nats_events.recv() => {
                    let stale = match event {
                        // The stream cannot be read until the client reconnects (then
                        // `Connected` repairs); the retry timer is the fallback.
                        Ok(ConnectionEvent::Disconnected) => Some(("nats disconnected", REPAIR_AFTER_DISCONNECT)),
                        Ok(ConnectionEvent::Connected) => Some(("nats reconnected", jitter(self.inner.config.repair_jitter))),
                        Ok(ConnectionEvent::SlowConsumer(sid)) if self.sid.is_none_or(|own| own == sid) => {
                            Some(("slow consumer", Duration::ZERO))
                        }
                        Ok(ConnectionEvent::SlowConsumer(_)) => None,
                        Err(broadcast::error::RecvError::Lagged(_)) => Some(("missed connection events", jitter(self.inner.config.repair_jitter))),
                        Err(broadcast::error::RecvError::Closed) => None,
                    };
                    if let Some((why, wait)) = stale {
                        self.mark_stale(why);
                        retry.reset();
                        next_repair = later(wait);
                    }
                }
                changed = epochs.changed(), if epochs_open => {
                    if changed.is_err() {
                        // The hub is gone; nothing more will change.
                        epochs_open = false;
                        continue;
                    }
                    let latest = *epochs.borrow_and_update();
                    if let (Some(latest), Some(ours)) = (latest, self.epoch) {
                        if latest != ours {
                            self.reset_epoch(latest);
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Attach { sub, snapshot, since, reply }) => {
                        served = true;
                        self.attach(sub, snapshot, since, reply);
                    }
                    Some(Command::Detach { conn }) => {
                        if self.subscribers.remove(&conn).is_some() {
                            self.inner.metrics.subscriptions.dec();
                        }
                        self.pending.remove(&conn);
                    }
                    Some(Command::CatchUpDone { conn, id, result }) => self.caught_up(conn, id, result),
                    Some(Command::RepairDone { generation, result }) => {
                        self.repairing = false;
                        if self.repaired(generation, result) {
                            retry.reset();
                        } else {
                            next_repair = later(retry.next_delay().unwrap_or(REPAIR_BACKOFF.max()));
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(next_repair), if self.stale.is_some() && !self.repairing => {
                    self.start_repair();
                }
                message = live.next(), if self.stale.is_none() => match message {
                    Some(message) => self.on_live(message),
                    None => {
                        tracing::warn!(room = %self.room, "live subscription ended; resubscribing");
                        match self.inner.nats.subscribe(subject::filter::live_room(self.guild, self.room)).await {
                            Ok(s) => {
                                resubscribe.reset();
                                self.sid = sid_of(&s);
                                live = s;
                                self.mark_stale("resubscribed");
                                next_repair = Instant::now();
                            }
                            Err(e) => {
                                tracing::error!(room = %self.room, error = %e, "resubscribe failed");
                                let wait = resubscribe.next_delay().unwrap_or(RESUBSCRIBE_BACKOFF.max());
                                tokio::time::sleep(wait).await;
                            }
                        }
                    }
                },
            }
            self.drop_gone();
            if served
                && self.subscribers.is_empty()
                && self.pending.is_empty()
                && self.retire(&commands)
            {
                self.clean_exit = true;
                break;
            }
        }
        tracing::debug!(room = %self.room, "room pump stopped");
    }

    /// Drops subscribers whose connection ended or overflowed.
    fn drop_gone(&mut self) {
        let before = self.subscribers.len();
        self.subscribers
            .retain(|_, s| !s.sub.outbox.is_closed() && !s.sub.outbox.is_overflowed());
        let gone = before.saturating_sub(self.subscribers.len());
        if gone > 0 {
            self.inner
                .metrics
                .subscriptions
                .dec_by(i64::try_from(gone).unwrap_or(i64::MAX));
        }
        self.pending.retain(|_, p| !p.sub.outbox.is_closed());
    }

    /// Removes this pump from the hub if no command is waiting; true when it should stop.
    fn retire(&self, commands: &mpsc::Receiver<Command>) -> bool {
        let mut rooms = self
            .inner
            .rooms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !commands.is_empty() {
            return false;
        }
        if rooms.get(&self.room).is_some_and(|e| e.pump_id == self.id) {
            rooms.remove(&self.room);
            self.inner.metrics.rooms.dec();
        }
        true
    }

    fn attach(
        &mut self,
        sub: Subscription,
        snapshot: Box<RoomSnapshot>,
        since: Option<Since>,
        reply: oneshot::Sender<Result<Attached, ApiError>>,
    ) {
        let conn = sub.conn;
        // Re-subscribing (e.g. with a new `since`): start over.
        if self.subscribers.remove(&conn).is_some() {
            self.inner.metrics.subscriptions.dec();
        }
        let pending = Pending {
            sub,
            snapshot,
            since,
            reply,
            buffer: Vec::new(),
            buffered_bytes: 0,
            tainted: false,
            attempts: 1,
            parked: false,
        };
        if let Some(catch_up) = self.catch_up_in_memory(&pending.snapshot, pending.since) {
            let id = pending.sub.id;
            self.pending.insert(conn, pending);
            self.caught_up_one(conn, id, Ok(catch_up));
            return;
        }
        // Another subscriber's read is in flight and will prime the pump (a burst of subscribes
        // to one room, e.g. its clients coming back after an edge restart): wait for it rather
        // than read the same again. A snapshot without an epoch cannot be answered from memory.
        let reading = self
            .pending
            .iter()
            .any(|(other, p)| *other != conn && !p.parked);
        if !self.primed && reading && pending.snapshot.epoch.is_some() {
            let mut pending = pending;
            pending.parked = true;
            self.pending.insert(conn, pending);
            return;
        }
        self.start_catch_up(&pending);
        self.pending.insert(conn, pending);
    }

    /// Parked subscribers go on once no read that would prime the pump is in flight: from
    /// memory where the pump now knows the answer, else with a read of their own.
    fn release_parked(&mut self) {
        let reading = self.pending.values().any(|p| !p.parked);
        if !self.primed && reading {
            return;
        }
        let parked: Vec<ConnId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.parked)
            .map(|(conn, _)| *conn)
            .collect();
        for conn in parked {
            let Some(pending) = self.pending.get_mut(&conn) else {
                continue;
            };
            pending.parked = false;
            let (id, snapshot, since) = (pending.sub.id, pending.snapshot.clone(), pending.since);
            if let Some(catch_up) = self.catch_up_in_memory(&snapshot, since) {
                self.caught_up_one(conn, id, Ok(catch_up));
            } else if let Some(pending) = self.pending.get(&conn) {
                self.start_catch_up(pending);
            }
        }
    }

    /// A catch-up without reading the stream, when the pump already knows its answer: the pump
    /// is primed and its live feed trusted, and the snapshot is at or past every event of the
    /// room the pump has seen, so nothing between the snapshot and the live feed can be missing
    /// (anything later comes live and is delivered after the snapshot's sequence). A `since`
    /// is taken only when it equals the snapshot's sequence; anything else reads the stream.
    fn catch_up_in_memory(&self, snapshot: &RoomSnapshot, since: Option<Since>) -> Option<CatchUp> {
        if !self.primed || self.stale.is_some() || self.repairing {
            return None;
        }
        let epoch = self.epoch?;
        if *self.inner.epoch.borrow() != Some(epoch) || snapshot.epoch != Some(epoch) {
            return None;
        }
        let view_seq = snapshot.view.seq;
        if view_seq < self.seen_through {
            return None;
        }
        let recovered = match since {
            None => false,
            Some(s) if s.epoch == Some(epoch) && s.seq == view_seq => true,
            Some(_) => return None,
        };
        Some(CatchUp {
            epoch,
            recovered,
            start: view_seq,
            auth_from: view_seq,
            items: Vec::new(),
            end: view_seq,
        })
    }

    fn start_catch_up(&self, pending: &Pending) {
        let inner = self.inner.clone();
        let commands = self.commands.clone();
        let (guild, room) = (self.guild, self.room);
        let (conn, id) = (pending.sub.conn, pending.sub.id);
        let snapshot = pending.snapshot.clone();
        let since = pending.since;
        let asked = Instant::now();
        self.inner.spawn(async move {
            let result = tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                result = inner.catch_up(guild, room, &snapshot, since, asked) => result,
            };
            let _ = commands
                .send(Command::CatchUpDone { conn, id, result })
                .await;
        });
    }

    /// A catch-up read finished: its subscriber goes live, then the subscribers parked behind it.
    fn caught_up(&mut self, conn: ConnId, id: u64, result: Result<CatchUp, ApiError>) {
        self.caught_up_one(conn, id, result);
        self.release_parked();
    }

    /// Queues the ack, the events and what arrived live meanwhile.
    fn caught_up_one(&mut self, conn: ConnId, id: u64, result: Result<CatchUp, ApiError>) {
        let Some(mut pending) = self.pending.remove(&conn) else {
            return;
        };
        if pending.sub.id != id {
            // The answer to an earlier subscribe of this connection.
            self.pending.insert(conn, pending);
            return;
        }
        let catch_up = match result {
            Ok(catch_up) => catch_up,
            Err(e) => {
                let _ = pending.reply.send(Err(e));
                return;
            }
        };
        // The newest epoch anyone saw: a catch-up read before the stream was recreated is void.
        let latest = (*self.inner.epoch.borrow()).unwrap_or(catch_up.epoch);
        if latest != catch_up.epoch {
            pending.tainted = true;
        } else if self.epoch != Some(catch_up.epoch) {
            if self.epoch.is_some() {
                self.reset_epoch(catch_up.epoch);
                pending.tainted = true;
            } else {
                self.epoch = Some(catch_up.epoch);
            }
        }
        if pending.tainted {
            if pending.attempts >= MAX_CATCH_UP_ATTEMPTS {
                let _ = pending.reply.send(Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the room's events could not be read in order; retry",
                )));
                return;
            }
            pending.attempts = pending.attempts.saturating_add(1);
            pending.tainted = false;
            pending.buffer.clear();
            pending.buffered_bytes = 0;
            self.start_catch_up(&pending);
            self.pending.insert(conn, pending);
            return;
        }
        // Every event of the room up to `end` was read, and later ones come live.
        self.seen_through = self.seen_through.max(catch_up.end);
        if self.stale.is_none() && !self.repairing {
            self.primed = true;
        }
        let sub = pending.sub;
        let mut last = catch_up.start;
        let mut frames: Vec<&Item> = Vec::new();
        let mut ended = None;
        // What was read: events after the starting point are sent; the ones the client already
        // has still count when they end its membership.
        for item in &catch_up.items {
            if item.seq > last {
                frames.push(item);
                last = item.seq;
                ended = ended_by(&sub, item.revokes);
            } else if item.seq > catch_up.auth_from {
                ended = ended_by(&sub, item.revokes);
            }
            if ended.is_some() {
                break;
            }
        }
        let replayed = frames.len();
        if ended.is_none() {
            last = last.max(catch_up.end);
            // Then what arrived live meanwhile, past what was read.
            for item in &pending.buffer {
                if item.seq <= last {
                    continue;
                }
                frames.push(item);
                last = item.seq;
                ended = ended_by(&sub, item.revokes);
                if ended.is_some() {
                    break;
                }
            }
        }
        let ack = protocol::ack(
            "subscribed",
            Some(self.room),
            protocol::Subscribed {
                recovered: catch_up.recovered,
                snapshot: (!catch_up.recovered).then_some(&pending.snapshot.view),
                seq: catch_up.start,
                epoch: catch_up.epoch,
                replayed,
            },
        );
        sub.outbox.push(&ack);
        for item in &frames {
            sub.outbox.push_event(&item.frame, item.received_at);
        }
        self.inner
            .metrics
            .replayed
            .inc_by(u64::try_from(frames.len()).unwrap_or(u64::MAX));
        for item in &frames {
            self.last_by_kind
                .entry(item.kind)
                .and_modify(|s| *s = (*s).max(item.seq))
                .or_insert(item.seq);
        }
        if let Some(reason) = ended {
            self.end(&sub, reason);
            let _ = pending.reply.send(Ok(Attached::Ended));
            return;
        }
        self.inner.metrics.subscriptions.inc();
        self.subscribers.insert(conn, Subscriber { sub, last });
        let _ = pending.reply.send(Ok(Attached::Live));
    }

    /// Queues the frame that ends `sub` and tells its connection.
    fn end(&self, sub: &Subscription, reason: EndReason) {
        sub.outbox.push(&reason.frame(self.room));
        sub.outbox.end_subscription(self.room, sub.id);
        if !matches!(reason, EndReason::Resubscribe) {
            self.inner.metrics.revocations.inc();
        }
    }

    /// Ends every live subscription with `reason`.
    fn end_all(&mut self, reason: EndReason) {
        let ended = std::mem::take(&mut self.subscribers);
        self.inner
            .metrics
            .subscriptions
            .dec_by(i64::try_from(ended.len()).unwrap_or(i64::MAX));
        for subscriber in ended.values() {
            self.end(&subscriber.sub, reason);
        }
    }

    /// The stream was recreated: positions of the old one mean nothing in the new one.
    fn reset_epoch(&mut self, epoch: Epoch) {
        tracing::info!(room = %self.room, %epoch, "stream epoch changed; subscribers resubscribe");
        self.end_all(EndReason::Resubscribe);
        for pending in self.pending.values_mut() {
            pending.tainted = true;
        }
        self.epoch = Some(epoch);
        self.last_seq = 0;
        self.last_by_kind.clear();
        self.primed = false;
        self.seen_through = 0;
    }

    fn on_live(&mut self, message: async_nats::Message) {
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
        self.deliver(Item::new(seq, &event));
    }

    fn deliver(&mut self, item: Item) {
        let mut sent = 0u64;
        let mut ended = Vec::new();
        for (conn, subscriber) in &mut self.subscribers {
            if subscriber.last < item.seq {
                if subscriber
                    .sub
                    .outbox
                    .push_event(&item.frame, item.received_at)
                {
                    sent = sent.saturating_add(1);
                }
                subscriber.last = item.seq;
                if let Some(reason) = ended_by(&subscriber.sub, item.revokes) {
                    ended.push((*conn, reason));
                }
            }
        }
        for (conn, reason) in ended {
            if let Some(subscriber) = self.subscribers.remove(&conn) {
                self.inner.metrics.subscriptions.dec();
                self.end(&subscriber.sub, reason);
            }
        }
        let limit = self.inner.config.replay_max_bytes;
        for pending in self.pending.values_mut() {
            if pending.tainted {
                continue;
            }
            let bytes = pending.buffered_bytes.saturating_add(item.frame.len());
            if bytes > limit {
                // Too much arrived during the catch-up: read again from the stream.
                pending.tainted = true;
                pending.buffer.clear();
                pending.buffered_bytes = 0;
            } else {
                pending.buffered_bytes = bytes;
                pending.buffer.push(item.clone());
            }
        }
        self.last_seq = self.last_seq.max(item.seq);
        self.seen_through = self.seen_through.max(item.seq);
        self.last_by_kind.insert(item.kind, item.seq);
        self.inner.metrics.messages_out.inc_by(sent);
        self.inner.metrics.events_in.inc();
        let now = voicerooms_contract::now_ms();
        self.inner
            .metrics
            .fanout_latency
            .observe(now.saturating_sub(item.received_at) as f64 / 1000.0);
    }

    fn mark_stale(&mut self, why: &'static str) {
        if self.stale.is_none() {
            tracing::debug!(room = %self.room, why, "live feed paused until repaired");
        }
        self.stale = Some(why);
        self.stale_generation = self.stale_generation.wrapping_add(1);
        self.stale_since = Instant::now();
        // A catch-up in progress may have missed live events in the gap: it reads again.
        for pending in self.pending.values_mut() {
            pending.tainted = true;
        }
    }

    fn start_repair(&mut self) {
        let after = self
            .subscribers
            .values()
            .map(|s| s.last)
            .min()
            .unwrap_or(self.last_seq);
        self.repairing = true;
        let inner = self.inner.clone();
        let commands = self.commands.clone();
        let (guild, room, epoch) = (self.guild, self.room, self.epoch);
        let (generation, since) = (self.stale_generation, self.stale_since);
        self.inner.spawn(async move {
            let result = tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                result = inner.repair(guild, room, epoch, after, since) => result,
            };
            let _ = commands
                .send(Command::RepairDone { generation, result })
                .await;
        });
    }

    /// A repair finished; true when it succeeded (the feed is trusted again unless it was marked
    /// stale once more meanwhile).
    fn repaired(&mut self, generation: u64, result: Result<Repaired, ReadError>) -> bool {
        let why = self.stale.unwrap_or("repair");
        match result {
            Ok(Repaired::Events(items)) => {
                self.inner.metrics.repairs.inc();
                tracing::info!(room = %self.room, why, recovered = items.len(), "repaired live feed from the stream");
                for item in items {
                    self.deliver(item);
                }
            }
            Ok(Repaired::TooMuch) => {
                self.inner.metrics.repairs.inc();
                tracing::error!(room = %self.room, why, "gap too large to repair; asking clients to resubscribe");
                self.end_all(EndReason::Resubscribe);
                // The gap was skipped: only a catch-up read from the stream primes the pump again.
                self.primed = false;
            }
            Ok(Repaired::EpochChanged(epoch)) => self.reset_epoch(epoch),
            Err(e) => {
                tracing::warn!(room = %self.room, why, error = ?e, "repair failed; retrying");
                return false;
            }
        }
        if generation == self.stale_generation {
            self.stale = None;
        }
        true
    }
}

/// Whether an event ends `sub`'s subscription.
fn ended_by(sub: &Subscription, revokes: Revokes) -> Option<EndReason> {
    match revokes {
        Revokes::Member(user) if user == sub.user && !sub.owner => Some(EndReason::NotMember),
        Revokes::Everyone => Some(EndReason::RoomDeleted),
        _ => None,
    }
}

impl Drop for Pump {
    /// Whatever ended the pump — a panic included — its room entry goes and its subscribers
    /// are told to subscribe again (they get a fresh pump).
    fn drop(&mut self) {
        if !self.clean_exit {
            self.inner.metrics.pump_failures.inc();
            tracing::error!(room = %self.room, "room pump failed; subscribers resubscribe");
            self.end_all(EndReason::Resubscribe);
        } else if !self.subscribers.is_empty() {
            self.inner
                .metrics
                .subscriptions
                .dec_by(i64::try_from(self.subscribers.len()).unwrap_or(i64::MAX));
            self.subscribers.clear();
        }
        let mut rooms = self
            .inner
            .rooms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if rooms.get(&self.room).is_some_and(|e| e.pump_id == self.id) {
            rooms.remove(&self.room);
            self.inner.metrics.rooms.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{outbox, Out};

    #[tokio::test]
    async fn slow_consumer_reports_name_the_subscription_the_pump_knows() {
        let server = voicerooms_testkit::NatsServer::start().await;
        let (reports, mut reported) = mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1)
            .event_callback(move |event| {
                let reports = reports.clone();
                async move {
                    if let async_nats::Event::SlowConsumer(sid) = event {
                        let _ = reports.send(sid);
                    }
                }
            })
            .connect(server.url())
            .await
            .unwrap();
        let quiet = client.subscribe("quiet").await.unwrap();
        let flooded = client.subscribe("flooded").await.unwrap();
        for _ in 0..100 {
            client.publish("flooded", "x".into()).await.unwrap();
        }
        client.flush().await.unwrap();
        let sid = tokio::time::timeout(Duration::from_secs(10), reported.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sid_of(&flooded), Some(sid));
        assert_ne!(sid_of(&quiet), Some(sid));
    }

    fn config() -> HubConfig {
        HubConfig {
            replay_limit: 100,
            replay_max_bytes: 64 * 1024,
            read_timeout: Duration::from_millis(100),
            repair_jitter: Duration::ZERO,
            epoch_check_interval: Duration::from_secs(3600),
            jetstream_rate: 100,
            jetstream_concurrency: 4,
        }
    }

    /// A hub whose NATS client never connects (the pump below does no I/O).
    async fn offline_hub() -> Hub {
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .unwrap();
        let js = jetstream::new(nats.clone());
        Hub::new(
            nats,
            Arc::new(LazyBucket::new(js, "rooms", 1, 1)),
            broadcast::channel(4).0,
            config(),
            CancellationToken::new(),
            TaskTracker::new(),
            EdgeMetrics::default(),
        )
    }

    fn subscription(id: u64, outbox: Outbox) -> Subscription {
        Subscription {
            conn: 1,
            id,
            outbox,
            user: UserId::new(3).unwrap(),
            owner: false,
        }
    }

    /// A pump of `room` registered in the hub with one subscriber.
    fn pump_with_subscriber(hub: &Hub, room: RoomId, sub: Subscription) -> Pump {
        let (commands, _) = mpsc::channel(4);
        hub.inner.rooms.lock().unwrap().insert(
            room,
            RoomEntry {
                pump_id: 9,
                commands: commands.clone(),
            },
        );
        hub.inner.metrics.rooms.inc();
        hub.inner.metrics.subscriptions.inc();
        let mut subscribers = HashMap::new();
        subscribers.insert(sub.conn, Subscriber { sub, last: 0 });
        Pump {
            id: 9,
            inner: hub.inner.clone(),
            guild: GuildId::new(1).unwrap(),
            room,
            commands,
            epoch: Some(Epoch::from_unix_nanos(1)),
            subscribers,
            pending: HashMap::new(),
            last_seq: 0,
            last_by_kind: HashMap::new(),
            sid: None,
            stale: None,
            stale_generation: 0,
            stale_since: Instant::now(),
            repairing: false,
            primed: false,
            seen_through: 0,
            clean_exit: false,
        }
    }

    #[tokio::test]
    async fn a_pump_that_dies_removes_its_room_and_tells_subscribers_to_resubscribe() {
        let hub = offline_hub().await;
        let room = RoomId::new(7).unwrap();
        let (outbox, mut inbox) = outbox(64 * 1024, Default::default());
        let pump = pump_with_subscriber(&hub, room, subscription(5, outbox.clone()));
        assert_eq!(hub.room_count(), 1);
        // The task dies without the pump's loop ending: a panic unwinds the same way (drop runs),
        // but a panic here would count in the suite's panic log as a service panic.
        let task = tokio::spawn(async move {
            let _pump = pump;
            std::future::pending::<()>().await;
        });
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(
            hub.room_count(),
            0,
            "the dead room is gone: the next subscribe starts a pump"
        );
        assert_eq!(hub.inner.metrics.rooms.get(), 0);
        assert_eq!(hub.inner.metrics.subscriptions.get(), 0);
        assert_eq!(hub.inner.metrics.pump_failures.get(), 1);
        match inbox.try_recv() {
            Some(Out::Frame(frame)) => {
                assert!(frame.contains(r#""code":"resubscribe""#), "{frame}");
                assert!(frame.contains(r#""room":"7""#), "{frame}");
            }
            other => panic!("expected a resubscribe frame, got {other:?}"),
        }
        assert_eq!(outbox.take_ended(), vec![(room, 5)]);
    }

    #[tokio::test]
    async fn a_pump_that_ends_cleanly_sends_nothing() {
        let hub = offline_hub().await;
        let room = RoomId::new(8).unwrap();
        let (outbox, mut inbox) = outbox(64 * 1024, Default::default());
        let mut pump = pump_with_subscriber(&hub, room, subscription(1, outbox));
        pump.clean_exit = true;
        drop(pump);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.inner.metrics.subscriptions.get(), 0);
        assert!(inbox.try_recv().is_none());
    }

    #[test]
    fn members_lose_their_subscription_on_removal_and_everyone_on_deletion() {
        let (outbox, _inbox) = crate::outbox::outbox(1024, Default::default());
        let alice = UserId::new(1).unwrap();
        let bob = UserId::new(2).unwrap();
        let member = Subscription {
            conn: 1,
            id: 1,
            outbox: outbox.clone(),
            user: alice,
            owner: false,
        };
        let owner = Subscription {
            owner: true,
            ..member.clone()
        };
        assert!(matches!(
            ended_by(&member, Revokes::Member(alice)),
            Some(EndReason::NotMember)
        ));
        assert!(ended_by(&member, Revokes::Member(bob)).is_none());
        assert!(ended_by(&owner, Revokes::Member(alice)).is_none());
        assert!(matches!(
            ended_by(&owner, Revokes::Everyone),
            Some(EndReason::RoomDeleted)
        ));
        assert!(ended_by(&member, Revokes::Nobody).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_spaces_calls_at_its_rate() {
        let budget = Budget::new(100, 4, Duration::from_secs(1), EdgeMetrics::default());
        let start = Instant::now();
        for _ in 0..200 {
            budget.pace(1).await;
        }
        // 200 calls at 100/s: two seconds, less the 50 ms burst.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1940), "{took:?}");
        assert!(took <= Duration::from_millis(2000), "{took:?}");
    }
}
