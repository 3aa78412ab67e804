//! Voice and channel events in: one durable pull consumer on `rooms.>`, shared by all replicas
//! (each event goes to one of them), applied concurrently across rooms and in stream order
//! within a room: events are dealt to `event_lanes` lanes by room, each lane applies its events
//! one after the other. Applying is KV work only — Discord calls the events trigger (a pending
//! move, deleting a room whose channel a moderator deleted) are claimed by compare-and-set here
//! and done in the background, so one slow Discord call never holds up other rooms or outlives
//! the ack wait. An event still being applied after a third of the ack wait is marked in
//! progress, so it is not redelivered while it runs.
//!
//! - `voice.joined` / `voice.left` / `voice.updated` set that user's occupancy; an event older
//!   than the last one applied *for that user* (by stream sequence, within the same stream
//!   epoch) is ignored, so two replicas applying a join and a leave out of order still converge.
//!   When the `ROOMS` stream is recreated its sequences restart: a room's recorded sequences
//!   belong to the old epoch and are reset, and the durable consumer (deleted with the stream)
//!   is created again, reading the new stream from its start.
//! - a join anywhere in the guild fires the user's pending move (claimed by deleting the pending
//!   entry with its revision, so exactly one replica moves them);
//! - a join during a closing warning cancels it; `channel.deleted` closes the room.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use voicerooms_contract::command::{RoomState, VoiceOccupant};
use voicerooms_contract::event::{CloseReason, Event, RoomClosingCancelled, VoiceFlags};
use voicerooms_contract::{
    now_ms, subject, ApiError, GuildId, RoomEvent, RoomId, StreamEpoch, UserId, UserRef,
};

use crate::outbox;
use crate::rooms::lifecycle::{claim_deletion, complete_deletion};
use crate::rooms::Core;
use crate::store::{self, pending_key, Change, PendingMove, RoomRecord};
use crate::supervisor::Up;

/// Most users whose last voice sequence a record remembers after they left.
const MAX_VOICE_SEQ: usize = 64;
/// How long JetStream waits for an ack before redelivering.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// An event still being applied after this long is marked in progress (a third of the ack wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Events queued per lane before the consumer stops pulling.
const LANE_CAPACITY: usize = 64;

/// The stream epoch the durable consumer was last created for (key `consumer.<durable>` in the
/// `room_manager` bucket).
#[derive(Debug, Serialize, Deserialize)]
struct ConsumerEpoch {
    epoch: StreamEpoch,
}

/// Consumes until `token` is cancelled (the supervisor restarts it when it fails).
pub async fn run(
    core: Arc<Core>,
    durable: String,
    lanes: usize,
    token: CancellationToken,
    up: Up,
) -> anyhow::Result<()> {
    let mut stream = core.js.get_stream(subject::ROOMS_STREAM).await?;
    let epoch = voicerooms_platform::nats::stream_epoch(stream.info().await?)?;
    core.set_stream_epoch(epoch);
    let epoch_key = format!("consumer.{durable}");
    let known = store::get::<ConsumerEpoch>(&core.state, &epoch_key).await?;
    // A stream recreated since we last consumed is read from its start; a first deployment on a
    // stream with history starts with what comes next (old joins must not fire moves).
    let deliver_policy = match &known {
        Some((k, _)) if k.epoch != epoch => DeliverPolicy::All,
        _ => DeliverPolicy::New,
    };
    let consumer = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: subject::filter::all_rooms(),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_deliver: 5,
                max_ack_pending: 1_000,
                ..Default::default()
            },
        )
        .await?;
    if known.as_ref().is_none_or(|(k, _)| k.epoch != epoch) {
        let bytes = Bytes::from(serde_json::to_vec(&ConsumerEpoch { epoch })?);
        core.state.put(&epoch_key, bytes).await?;
    }
    let mut messages = consumer.messages().await?;
    let mut senders = Vec::new();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..lanes.max(1) {
        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
        senders.push(tx);
        workers.spawn(lane(core.clone(), rx, epoch));
    }
    up.set(true);
    tracing::info!(durable, %epoch, "consuming room events");
    let result = loop {
        let msg = tokio::select! {
            _ = token.cancelled() => break Ok(()),
            m = messages.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => break Err(anyhow::anyhow!("consumer failed: {e}")),
            None => break Err(anyhow::anyhow!("consumer stream ended")),
        };
        let lane = lane_of(&msg.subject, senders.len());
        let Some(tx) = senders.get(lane) else {
            break Err(anyhow::anyhow!("no lane {lane}"));
        };
        if tx.send(msg).await.is_err() {
            break Err(anyhow::anyhow!("lane {lane} stopped"));
        }
    };
    up.set(false);
    // Let the lanes finish what they hold (KV work only; bounded by the lane capacity).
    drop(senders);
    while workers.join_next().await.is_some() {}
    result
}

/// The lane of a room: a hash of its subject's room token, so a room's events stay in order.
fn lane_of(subject: &str, lanes: usize) -> usize {
    let room = subject.split('.').nth(2).unwrap_or(subject);
    let hash = room.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let lanes = u64::try_from(lanes.max(1)).unwrap_or(1);
    usize::try_from(hash.checked_rem(lanes).unwrap_or(0)).unwrap_or(0)
}

async fn lane(
    core: Arc<Core>,
    mut rx: mpsc::Receiver<async_nats::jetstream::Message>,
    epoch: StreamEpoch,
) {
    while let Some(msg) = rx.recv().await {
        handle(&core, msg, epoch).await;
    }
}

async fn handle(core: &Arc<Core>, msg: async_nats::jetstream::Message, epoch: StreamEpoch) {
    let (seq, delivered) = msg
        .info()
        .map(|i| (i.stream_sequence, i.delivered))
        .unwrap_or((0, 1));
    if delivered > 1 {
        core.metrics.event_redelivered();
    }
    let event = match RoomEvent::decode_on(&msg.subject, &msg.payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "undecodable room event; skipped");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    // The event's trace goes on here: from the headers, or the copy in the payload.
    let span =
        tracing::info_span!("roommgr.apply", kind = event.kind().as_str(), room = %event.room, seq);
    voicerooms_platform::telemetry::extract_or_traceparent(
        &span,
        msg.headers.as_ref(),
        event.traceparent.as_deref(),
    );
    let applying = apply(core, &event, seq, epoch).instrument(span);
    tokio::pin!(applying);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    // The first tick is immediate: skip it.
    progress.tick().await;
    let applied = loop {
        tokio::select! {
            r = &mut applying => break r,
            _ = progress.tick() => {
                // Still working on it: do not redeliver.
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    };
    match applied {
        Ok(()) => {
            core.metrics.event_applied(event.kind().as_str());
            let _ = msg.ack().await;
        }
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "applying event failed; redelivery later");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                .await;
        }
    }
}

/// Applies one event of stream epoch `epoch` (tests and benchmarks call it directly too).
pub async fn apply(
    core: &Arc<Core>,
    event: &RoomEvent,
    seq: u64,
    epoch: StreamEpoch,
) -> Result<(), ApiError> {
    let room = event.room;
    match &event.event {
        Event::VoiceJoined(j) => {
            set_voice(core, room, &j.user, seq, epoch, Some(j.flags)).await?;
            fire_pending_move(core, event.guild, room, &j.user).await;
            Ok(())
        }
        Event::VoiceLeft(l) => set_voice(core, room, &l.user, seq, epoch, None).await,
        Event::VoiceUpdated(u) => set_voice(core, room, &u.user, seq, epoch, Some(u.flags)).await,
        Event::ChannelDeleted(_) => {
            // Claimed here (durably: a lease another replica takes over if this one dies), the
            // Discord side in the background.
            if let Some(rec) = claim_deletion(core, room, CloseReason::ChannelDeleted, true).await?
            {
                let core2 = core.clone();
                core.spawn_job("delete room", async move {
                    if let Err(e) = complete_deletion(&core2, rec).await {
                        tracing::warn!(room = %room, error = %e, "deleting a room whose channel was deleted failed; the cleanup scan retries");
                    }
                });
            }
            Ok(())
        }
        // Our own room.* events and channel renames need nothing here.
        _ => Ok(()),
    }
}

/// Sets (`Some(flags)`) or clears (`None`) the user's presence in the room's channel.
async fn set_voice(
    core: &Arc<Core>,
    room: RoomId,
    user: &UserRef,
    seq: u64,
    epoch: StreamEpoch,
    flags: Option<VoiceFlags>,
) -> Result<(), ApiError> {
    let now = now_ms();
    let uid = user.id.to_string();
    let (cancelled, _) = core
        .change_room(room, |cur| {
            let Some(mut r) = cur else {
                return Ok(Change::Keep(false));
            };
            if r.stream_epoch != Some(epoch) {
                // Sequences of another stream epoch say nothing about this one.
                r.voice_seq.clear();
                r.view.seq = 0;
                r.stream_epoch = Some(epoch);
            }
            if r.voice_seq.get(&uid).is_some_and(|s| *s >= seq) {
                return Ok(Change::Keep(false));
            }
            r.voice_seq.insert(uid.clone(), seq);
            r.view.voice.retain(|o| o.user.id != user.id);
            if let Some(flags) = flags {
                let member = is_member(&r, user.id);
                r.view.voice.push(VoiceOccupant {
                    user: user.clone(),
                    flags,
                    member,
                });
            }
            r.view.last_activity = now;
            outbox::record_seq(&mut r, seq, Some(epoch));
            trim_voice_seq(&mut r);
            let mut cancelled = false;
            if flags.is_some() && r.view.state == RoomState::Closing {
                r.view.state = RoomState::Open;
                r.view.closing_deadline = None;
                outbox::queue(
                    &mut r,
                    Event::RoomClosingCancelled(RoomClosingCancelled {
                        by: Some(user.clone()),
                    }),
                )?;
                cancelled = true;
            }
            Ok(Change::Put(r, cancelled))
        })
        .await?;
    if cancelled {
        tracing::info!(room = %room, user = %user.id, "closing cancelled: someone joined voice");
        core.flush(room).await;
    }
    Ok(())
}

fn is_member(r: &RoomRecord, user: UserId) -> bool {
    r.view.members.iter().any(|m| m.user.id == user)
}

fn trim_voice_seq(r: &mut RoomRecord) {
    let excess = r.voice_seq.len().saturating_sub(MAX_VOICE_SEQ);
    if excess == 0 {
        return;
    }
    let present: Vec<String> = r.view.voice.iter().map(|o| o.user.id.to_string()).collect();
    let mut absent: Vec<(String, u64)> = r
        .voice_seq
        .iter()
        .filter(|(k, _)| !present.contains(k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    absent.sort_by_key(|(_, s)| *s);
    for (k, _) in absent.into_iter().take(excess) {
        r.voice_seq.remove(&k);
    }
}

/// Fires the user's pending move, if they have one for another channel of this guild: claimed
/// here, the move itself in the background.
async fn fire_pending_move(core: &Arc<Core>, guild: GuildId, joined: RoomId, user: &UserRef) {
    let key = pending_key(guild, user.id);
    let Ok(Some((pending, revision))) = store::get::<PendingMove>(&core.state, &key).await else {
        return;
    };
    // Claim it: only the replica whose delete succeeds moves them.
    if core
        .state
        .delete_expect_revision(&key, Some(revision))
        .await
        .is_err()
    {
        return;
    }
    if pending.expires_at < now_ms() {
        tracing::info!(user = %user.id, room = %pending.room, "pending move expired");
        core.metrics
            .placement_fired("expired", pending.registered_at);
        return;
    }
    if pending.room == joined {
        core.metrics
            .placement_fired("already_there", pending.registered_at);
        return;
    }
    let (core2, user) = (core.clone(), user.clone());
    core.spawn_job("pending move", async move {
        match core2
            .discord
            .move_member(guild.get(), user.id.get(), Some(pending.room.get()))
            .await
        {
            Ok(()) => {
                core2.metrics.placement_fired("moved", pending.registered_at);
                tracing::info!(user = %user.id, room = %pending.room, waited_ms = now_ms().saturating_sub(pending.registered_at), "pending move fired");
            }
            Err(e) => {
                core2
                    .metrics
                    .placement_fired("failed", pending.registered_at);
                tracing::warn!(user = %user.id, room = %pending.room, error = %e, "pending move failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_always_goes_to_the_same_lane_and_rooms_spread() {
        let a = lane_of("rooms.1.100.voice.joined", 16);
        assert_eq!(a, lane_of("rooms.1.100.voice.left", 16));
        let lanes: std::collections::HashSet<usize> = (0..200)
            .map(|r| lane_of(&format!("rooms.1.{r}.voice.joined"), 16))
            .collect();
        assert!(lanes.len() > 8, "{lanes:?}");
        assert_eq!(lane_of("garbage", 0), 0);
    }
}
