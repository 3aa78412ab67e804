//! State in JetStream KV, changed only by compare-and-set on the entry's revision.
//!
//! - Bucket `rooms` ([`subject::ROOMS_BUCKET`]), key `<room id>`: a [`RoomRecord`] — the
//!   contract's `RoomView` (what the edge reads as the snapshot, with `seq`) plus room-manager's
//!   own fields (invite id, deletion lease, per-user voice sequence). Extra fields are ignored by
//!   anyone decoding a `RoomView`.
//!   Its `outbox` holds the room's events not yet confirmed stored in `ROOMS`: a state change and
//!   the events it causes are written in the same compare-and-set (see [`crate::outbox`]).
//! - Bucket `room_manager` ([`STATE_BUCKET`]):
//!   - `owner.<user id>`: [`OwnerIndex`] — the rooms a user owns, their creates in progress (the
//!     crash-safe intent the reconciler rolls back) and recent idempotency keys;
//!   - `pending.<guild id>.<user id>`: [`PendingMove`] — move this user into the room's channel
//!     the moment they connect to voice in that guild;
//!   - `replicas`: live replicas (see [`crate::replicas`]);
//!   - `consumer.<durable>`: the stream epoch the event consumer was created for.
//! - Bucket `room_manager_cleanup` ([`CLEANUP_BUCKET`]), key `<nonce>`: [`CleanupEntry`] —
//!   Discord objects of a failed create that could not be deleted yet (the durable cleanup
//!   queue, retried by every replica).
//!
//! [`update`] is the one way to change an entry: read, apply a closure, write with the revision
//! read; on a lost race, read again (bounded attempts).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use voicerooms_contract::command::RoomView;
use voicerooms_contract::event::CloseReason;
use voicerooms_contract::{
    ApiError, ErrorCode, GuildId, Millis, RoomEvent, RoomId, StreamEpoch, UserId,
};
use voicerooms_platform::retry::{Backoff, Jitter};

/// room-manager's own bucket.
pub const STATE_BUCKET: &str = "room_manager";
/// The durable cleanup queue.
pub const CLEANUP_BUCKET: &str = "room_manager_cleanup";

/// Attempts of one compare-and-set loop (enough for 50 replicas' worth of contention).
const MAX_CAS_ATTEMPTS: u32 = 200;
/// Between compare-and-set attempts after the third lost race: 200 µs doubling to 4 ms, fully
/// jittered, so many contenders spread out.
const CONTENTION: Backoff =
    Backoff::new(Duration::from_micros(200), Duration::from_millis(4)).with_jitter(Jitter::Full);
/// Longest wait for the next entry of a scan before it is started over.
const SCAN_WAIT: Duration = Duration::from_secs(3);
/// Scans started over after a stall before the scan fails.
const SCAN_ATTEMPTS: u32 = 3;
const STALLED: &str = "scan stalled";
/// Most idempotency keys remembered per user.
const MAX_RECENT_KEYS: usize = 16;

/// A room as stored in the `rooms` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    #[serde(flatten)]
    pub view: RoomView,
    /// The current invite: only a token with this id is accepted.
    pub invite_id: String,
    pub invite_issued_at: Millis,
    /// Who is deleting the room, until when (set with state `deleting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<CloseReason>,
    /// Sequence of the last voice event applied per user: an older event for that user is stale.
    #[serde(default)]
    pub voice_seq: BTreeMap<String, u64>,
    /// Identity of the `ROOMS` stream `view.seq` and `voice_seq` count in (its creation time).
    /// When the stream is recreated its sequences restart, so both are reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_epoch: Option<StreamEpoch>,
    /// The create's nonce (the `vr-<nonce>` tag of the role's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Events written with the state, not yet confirmed stored in `ROOMS` (oldest first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<RoomEvent>,
    /// Number of events this room has queued so far: the next event's id is
    /// `rm:<room>:<next_event>` (its `Nats-Msg-Id`).
    #[serde(default)]
    pub next_event: u64,
    /// Set once `room.deleted` is queued (the room is gone in Discord).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted_queued: bool,
    /// A fence the reconciler wrote to stop an abandoned create from committing: the room was
    /// never announced, so its deletion publishes nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fence: bool,
}

/// A replica's claim on a room while it deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub instance: String,
    pub until: Millis,
}

/// A create in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSlot {
    /// Tag put in the role's name (`vr-<nonce>`), so Discord objects can be traced to it.
    pub nonce: String,
    pub guild: GuildId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub started_at: Millis,
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<u64>,
    /// The room's name (the reconciler needs it to fence an abandoned create).
    #[serde(default)]
    pub name: String,
}

/// Discord objects a failed create left behind, to be deleted (the durable cleanup queue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupEntry {
    pub guild: GuildId,
    /// The create's nonce: its role is named `vr-<nonce> …`, its channel names that role.
    pub nonce: String,
    /// The role's name, looked up to find a role whose create answer was lost.
    pub role_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<u64>,
    pub queued_at: Millis,
    /// Until when an object whose create answer was lost may still appear (`None`: not yet
    /// decided; set when queued). The role is kept until then: it is how its channel is found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_at: Option<Millis>,
    #[serde(default)]
    pub attempts: u32,
}

/// A finished create remembered by its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentKey {
    pub key: String,
    pub room: RoomId,
}

/// What one user owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerIndex {
    #[serde(default)]
    pub rooms: Vec<RoomId>,
    #[serde(default)]
    pub creating: Vec<CreateSlot>,
    #[serde(default)]
    pub recent: Vec<RecentKey>,
}

impl OwnerIndex {
    pub fn remember(&mut self, key: Option<&str>, room: RoomId) {
        if let Some(key) = key {
            self.recent.retain(|r| r.key != key);
            self.recent.push(RecentKey {
                key: key.to_owned(),
                room,
            });
            let excess = self.recent.len().saturating_sub(MAX_RECENT_KEYS);
            self.recent.drain(..excess);
        }
    }
}

/// Move this user into `channel` when they connect to voice before `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingMove {
    pub room: RoomId,
    pub registered_at: Millis,
    pub expires_at: Millis,
}

pub fn owner_key(user: UserId) -> String {
    format!("owner.{user}")
}

pub fn pending_key(guild: GuildId, user: UserId) -> String {
    format!("pending.{guild}.{user}")
}

/// A KV failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("stored state is corrupt at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("too much contention on {0}")]
    Contention(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Contention(_) => ApiError::new(ErrorCode::Conflict, e.to_string()),
            StoreError::Unavailable(_) => ApiError::new(ErrorCode::Timeout, e.to_string()),
            StoreError::Corrupt { .. } => ApiError::new(ErrorCode::Internal, e.to_string()),
        }
    }
}

/// Reads a JSON value and its revision; a deleted key is `None`.
pub async fn get<T: DeserializeOwned>(
    store: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, StoreError> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&e.value).map_err(|err| StoreError::Corrupt {
                key: key.to_owned(),
                reason: err.to_string(),
            })?;
            Ok(Some((value, e.revision)))
        }
        _ => Ok(None),
    }
}

/// What an update closure decided.
pub enum Change<T, R> {
    /// Write this value.
    Put(T, R),
    /// Delete the entry.
    Delete(R),
    /// Leave it as it is.
    Keep(R),
}

/// Compare-and-set loop: `f` sees the current value (or `None`) and decides.
/// Returns the closure's result and the new revision (when it wrote).
pub async fn update<T, R, E, F>(
    store: &kv::Store,
    key: &str,
    mut f: F,
) -> Result<Result<(R, Option<u64>), E>, StoreError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> Result<Change<T, R>, E>,
{
    for attempt in 0..MAX_CAS_ATTEMPTS {
        let current = get::<T>(store, key).await?;
        let revision = current.as_ref().map(|(_, r)| *r);
        let change = match f(current.map(|(v, _)| v)) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let result = match change {
            Change::Keep(r) => return Ok(Ok((r, None))),
            Change::Put(value, r) => {
                let bytes =
                    Bytes::from(serde_json::to_vec(&value).map_err(|e| StoreError::Corrupt {
                        key: key.to_owned(),
                        reason: e.to_string(),
                    })?);
                let written = match revision {
                    Some(rev) => store.update(key, bytes, rev).await.map_err(|e| {
                        matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision)
                            .then_some(())
                            .ok_or_else(|| e.to_string())
                    }),
                    None => store.create(key, bytes).await.map_err(|e| {
                        matches!(e.kind(), kv::CreateErrorKind::AlreadyExists)
                            .then_some(())
                            .ok_or_else(|| e.to_string())
                    }),
                };
                written.map(|rev| (r, Some(rev)))
            }
            Change::Delete(r) => match revision {
                None => return Ok(Ok((r, None))),
                Some(rev) => store
                    .delete_expect_revision(key, Some(rev))
                    .await
                    .map(|_| (r, None))
                    .map_err(|e| {
                        // A lost race is JetStream's "wrong last sequence" (10071).
                        let s = e.to_string();
                        if s.contains("wrong last sequence") || s.contains("10071") {
                            Ok(())
                        } else {
                            Err(s)
                        }
                    }),
            },
        };
        match result {
            Ok(done) => return Ok(Ok(done)),
            Err(Ok(())) => {
                // Lost the race: someone else wrote first. Read again, with a little jitter so
                // many contenders spread out.
                if let Some(waited) = attempt.checked_sub(2).filter(|n| *n > 0) {
                    tokio::time::sleep(CONTENTION.delay(waited)).await;
                }
            }
            Err(Err(reason)) => return Err(StoreError::Unavailable(reason)),
        }
    }
    Err(StoreError::Contention(key.to_owned()))
}

/// Every live entry whose key starts with `prefix` (empty, or ending with `.`), with its
/// revision, at most `max`: one ordered consumer over the bucket's stream delivering the last
/// value of each key — a scan of thousands of rooms costs one round trip, not one per key.
/// An entry that does not decode fails the scan (a reader acting on a partial view could
/// mistake the objects of an unreadable room for orphans).
pub async fn scan<T: DeserializeOwned>(
    store: &kv::Store,
    prefix: &str,
    max: usize,
) -> Result<Vec<(String, T, u64)>, StoreError> {
    // A consumer that stops delivering (seen under heavy load) is given up and the scan started
    // over with a new one, a few times.
    let mut attempt = 0u32;
    loop {
        match scan_once(store, prefix, max).await {
            Err(StoreError::Unavailable(reason))
                if reason == STALLED && attempt < SCAN_ATTEMPTS =>
            {
                attempt = attempt.saturating_add(1);
                tracing::debug!(bucket = %store.name, attempt, "KV scan stalled; starting over");
            }
            other => return other,
        }
    }
}

async fn scan_once<T: DeserializeOwned>(
    store: &kv::Store,
    prefix: &str,
    max: usize,
) -> Result<Vec<(String, T, u64)>, StoreError> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures::StreamExt;
    let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
    let bucket_prefix = if store.prefix.ends_with('.') {
        store.prefix.clone()
    } else {
        format!("{}.", store.prefix)
    };
    let consumer = store
        .stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("{bucket_prefix}{prefix}>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
    loop {
        let msg = match tokio::time::timeout(SCAN_WAIT, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(unavailable(&e)),
            Ok(None) => return Err(StoreError::Unavailable("scan ended early".into())),
            Err(_) => return Err(StoreError::Unavailable(STALLED.into())),
        };
        let info = msg.info().map_err(|e| unavailable(&e))?;
        let (revision, remaining) = (info.stream_sequence, info.pending);
        let deleted = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() != "PUT");
        if !deleted {
            let key = msg
                .subject
                .strip_prefix(bucket_prefix.as_str())
                .unwrap_or(msg.subject.as_str())
                .to_owned();
            let value =
                serde_json::from_slice(&msg.payload).map_err(|err| StoreError::Corrupt {
                    key: key.clone(),
                    reason: err.to_string(),
                })?;
            out.push((key, value, revision));
        }
        if remaining == 0 || out.len() >= max {
            return Ok(out);
        }
    }
}
