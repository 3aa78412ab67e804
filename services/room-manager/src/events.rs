//! Voice and channel events in: one durable pull consumer on `rooms.>`, shared by all replicas
//! (each event goes to one of them). Each event is applied to the room's record by CAS:
//!
//! - `voice.joined` / `voice.left` / `voice.updated` set that user's occupancy; an event older
//!   than the last one applied *for that user* (by stream sequence) is ignored, so two replicas
//!   applying a join and a leave out of order still converge;
//! - a join anywhere in the guild fires the user's pending move (claimed by deleting the pending
//!   entry with its revision, so exactly one replica moves them);
//! - a join during a closing warning cancels it; `channel.deleted` closes the room.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use voicerooms_contract::command::{RoomState, VoiceOccupant};
use voicerooms_contract::event::{CloseReason, Event, RoomClosingCancelled};
use voicerooms_contract::{now_ms, subject, ApiError, GuildId, RoomEvent, RoomId, UserId, UserRef};

use crate::rooms::{finish_room, Core};
use crate::store::{self, pending_key, Change, PendingMove, RoomRecord};

/// Most users whose last voice sequence a record remembers after they left.
const MAX_VOICE_SEQ: usize = 64;

/// Runs the consumer until `token` is cancelled; reconnects with backoff on errors.
pub async fn run(core: Arc<Core>, durable: String, token: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        let result = consume(&core, &durable, &token).await;
        if token.is_cancelled() {
            return;
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, retry_ms = delay.as_millis() as u64, "event consumer failed; restarting");
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn consume(core: &Arc<Core>, durable: &str, token: &CancellationToken) -> anyhow::Result<()> {
    let stream = core.js.get_stream(subject::ROOMS_STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: subject::filter::all_rooms(),
                deliver_policy: DeliverPolicy::New,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: 5,
                max_ack_pending: 1_000,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    tracing::info!(durable, "consuming room events");
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(msg) = msg else {
            anyhow::bail!("consumer stream ended")
        };
        let msg = msg?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let event = match RoomEvent::decode_on(&msg.subject, &msg.payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "undecodable room event; skipped");
                let _ = msg.ack_with(AckKind::Term).await;
                continue;
            }
        };
        // The event's trace goes on here: from the headers, or the copy in the payload.
        let span = tracing::info_span!("roommgr.apply", kind = event.kind().as_str(), room = %event.room, seq);
        voicerooms_platform::telemetry::extract_or_traceparent(
            &span,
            msg.headers.as_ref(),
            event.traceparent.as_deref(),
        );
        // Unacknowledged on shutdown: another replica (or this one, restarted) gets it again.
        let applied = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = apply(core, &event, seq).instrument(span) => r,
        };
        match applied {
            Ok(()) => {
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
}

/// Applies one event (the unit tests and benchmarks call it directly too).
pub async fn apply(core: &Core, event: &RoomEvent, seq: u64) -> Result<(), ApiError> {
    let room = event.room;
    match &event.event {
        Event::VoiceJoined(j) => {
            fire_pending_move(core, event.guild, room, &j.user).await;
            set_voice(core, room, &j.user, seq, Some(j.flags)).await
        }
        Event::VoiceLeft(l) => set_voice(core, room, &l.user, seq, None).await,
        Event::VoiceUpdated(u) => set_voice(core, room, &u.user, seq, Some(u.flags)).await,
        Event::ChannelDeleted(_) => {
            if core.record(room).await?.is_some() {
                finish_room(core, room, CloseReason::ChannelDeleted, true).await?;
            }
            Ok(())
        }
        // Our own room.* events and channel renames need nothing here.
        _ => Ok(()),
    }
}

/// Sets (`Some(flags)`) or clears (`None`) the user's presence in the room's channel.
async fn set_voice(
    core: &Core,
    room: RoomId,
    user: &UserRef,
    seq: u64,
    flags: Option<voicerooms_contract::event::VoiceFlags>,
) -> Result<(), ApiError> {
    let now = now_ms();
    let uid = user.id.to_string();
    let (cancelled, _) = store::update::<RoomRecord, Option<GuildId>, ApiError, _>(
        &core.rooms,
        &subject::room_key(room),
        |cur| {
            let Some(mut r) = cur else {
                return Ok(Change::Keep(None));
            };
            if r.voice_seq.get(&uid).is_some_and(|s| *s >= seq) {
                return Ok(Change::Keep(None));
            }
            r.voice_seq.insert(uid.clone(), seq);
            r.view.voice.retain(|o| o.user.id != user.id);
            if let Some(flags) = flags {
                let member = r.view_members_contains(user.id);
                r.view.voice.push(VoiceOccupant {
                    user: user.clone(),
                    flags,
                    member,
                });
            }
            r.view.last_activity = now;
            r.view.seq = r.view.seq.max(seq);
            trim_voice_seq(&mut r);
            let mut cancelled = None;
            if flags.is_some() && r.view.state == RoomState::Closing {
                r.view.state = RoomState::Open;
                r.view.closing_deadline = None;
                cancelled = Some(r.view.guild);
            }
            Ok(Change::Put(r, cancelled))
        },
    )
    .await??;
    if let Some(guild) = cancelled {
        tracing::info!(room = %room, user = %user.id, "closing cancelled: someone joined voice");
        let ev = Event::RoomClosingCancelled(RoomClosingCancelled {
            by: Some(user.clone()),
        });
        let seq = core.publish(guild, room, ev, None).await?;
        core.bump_seq(room, seq).await?;
    }
    Ok(())
}

fn trim_voice_seq(r: &mut RoomRecord) {
    if r.voice_seq.len() <= MAX_VOICE_SEQ {
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
    let excess = r.voice_seq.len() - MAX_VOICE_SEQ;
    for (k, _) in absent.into_iter().take(excess) {
        r.voice_seq.remove(&k);
    }
}

/// Fires the user's pending move, if they have one for another channel of this guild.
async fn fire_pending_move(core: &Core, guild: GuildId, joined: RoomId, user: &UserRef) {
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
    match core
        .discord
        .move_member(guild.get(), user.id.get(), Some(pending.room.get()))
        .await
    {
        Ok(()) => {
            core.metrics.placement_fired("moved", pending.registered_at);
            tracing::info!(user = %user.id, room = %pending.room, waited_ms = now_ms().saturating_sub(pending.registered_at), "pending move fired");
        }
        Err(e) => {
            core.metrics
                .placement_fired("failed", pending.registered_at);
            tracing::warn!(user = %user.id, room = %pending.room, error = %e, "pending move failed");
        }
    }
}

impl RoomRecord {
    fn view_members_contains(&self, user: UserId) -> bool {
        self.view.members.iter().any(|m| m.user.id == user)
    }
}
