//! Taking a shard over: what was actually stored, not what the previous holder last wrote down.
//!
//! The previous holder's checkpoint trails the stored events (it is written within 100 ms of
//! progress, and a holder can die in between). Converging a new session against it would publish
//! changes consumers already have a second time, or miss undoing ones they have (issue 15,
//! defect 5). So the new holder reads the `ROOMS` stream after the checkpoint's stream position
//! and applies this shard's voice events to the checkpoint's voice states: the result is exactly
//! what consumers have seen. From that state it resumes the session — from the dispatch before
//! the last one it finds stored, so a dispatch whose events were only partly stored is re-driven
//! (its stored changes come out under the same ids and are dropped as duplicates, the rest is
//! stored) — or, when the session cannot be resumed, identifies and publishes the difference
//! between that state and Discord's.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use voicerooms_contract::subject::ROOMS_STREAM;
use voicerooms_contract::{GuildId, RoomEvent};

use crate::cache::{GuildSnapshot, VoiceCache};
use crate::publisher::{Checkpoint, SessionInfo};

/// Where a new holder starts from.
#[derive(Debug, Default)]
pub struct Restored {
    /// Voice states as stored: the checkpoint's plus this shard's events after it.
    pub cache: VoiceCache,
    /// The session to resume, when there is one we can.
    pub session: Option<SessionInfo>,
    /// The sequence to resume from.
    pub seq: u64,
    /// The stream position `cache` is valid at.
    pub stream_seq: u64,
    /// This shard's events found after the checkpoint.
    pub replayed: usize,
}

/// Whether guild `g` is routed to shard `shard` of `count` (Discord's formula).
pub fn shard_of(guild: GuildId, count: u32) -> u32 {
    let count = u64::from(count.max(1));
    u32::try_from((guild.get() >> 22).checked_rem(count).unwrap_or(0)).unwrap_or(0)
}

/// `(session, seq)` of a gateway event id `<session>:<seq>:<part>`.
pub fn session_and_seq(id: &str) -> Option<(&str, u64)> {
    let mut parts = id.splitn(3, ':');
    let session = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((session, seq))
}

/// Builds the new holder's starting point from the previous holder's checkpoint and what the
/// stream holds after it. Without a checkpoint (or one from an older version, with no stream
/// position) there is nothing to replay: the stream end is the position.
pub async fn restore(
    js: &jetstream::Context,
    checkpoint: Option<Checkpoint>,
    shard: u32,
    count: u32,
) -> anyhow::Result<Restored> {
    let stream_end = stream_end(js).await?;
    let Some(c) = checkpoint else {
        return Ok(Restored {
            stream_seq: stream_end,
            ..Restored::default()
        });
    };
    let mut restored = Restored {
        cache: VoiceCache::from_snapshot(c.voice),
        session: c.session,
        seq: c.seq,
        stream_seq: c.stream_seq.max(stream_end),
        replayed: 0,
    };
    if c.stream_seq == 0 || c.stream_seq >= stream_end {
        if c.stream_seq == 0 {
            tracing::warn!(
                "checkpoint without a stream position: converging against it as written"
            );
        }
        return Ok(restored);
    }
    let tail = read_tail(js, c.stream_seq, stream_end).await?;
    let lost = lost_before_stored(&tail, restored.session.as_ref(), c.seq);
    let mut last_seq: Option<u64> = None;
    let mut foreign_session = false;
    for e in tail
        .iter()
        .map(|t| &t.event)
        .filter(|e| shard_of(e.guild, count) == shard)
    {
        restored.cache.apply_published(e.guild, e.room, &e.event);
        restored.replayed = restored.replayed.saturating_add(1);
        let ours = restored.session.as_ref().map(|s| s.session_id.as_str());
        match e.id.as_deref().and_then(session_and_seq) {
            Some((session, seq)) if Some(session) == ours => {
                last_seq = Some(last_seq.map_or(seq, |l| l.max(seq)));
            }
            _ => foreign_session = true,
        }
    }
    if foreign_session {
        // Events of a session the checkpoint does not name (the holder identified anew and
        // died before checkpointing it): we cannot resume it, and must not resume the older one.
        tracing::warn!("stored events of a session the checkpoint does not name; identifying");
        restored.session = None;
    }
    if let Some(missing) = lost {
        // A publish of this session was lost while later ones were stored (the previous holder
        // died before its retry succeeded). Resuming after the last stored dispatch would skip
        // it; resuming before it would re-drive dispatches against a cache that already holds
        // later ones. Converging a new session against what was stored publishes exactly the
        // difference.
        tracing::warn!(
            missing = %missing,
            "an event sent before stored ones is not in the stream; identifying to converge"
        );
        restored.session = None;
    }
    if let Some(last) = last_seq {
        // Re-drive the last dispatch found: it may have been stored only in part.
        restored.seq = restored.seq.max(last.saturating_sub(1));
    }
    tracing::info!(
        replayed = restored.replayed,
        from = c.stream_seq,
        to = stream_end,
        resume_from = restored.seq,
        resumable = restored.session.is_some(),
        "took over from the stream: checkpoint plus the events stored after it"
    );
    Ok(restored)
}

/// A shard of a new shard count that has no checkpoint of its own (the first start after
/// resharding): its guilds' voice states from the checkpoints the previous shard count left, each
/// guild brought up to date with the events stored after its old shard's checkpoint. The new
/// session identifies and converges against that — exactly what consumers have — so resharding
/// publishes only real differences. `None`: no other shard count has checkpoints.
///
/// The previous count is the one whose newest checkpoint is newest. Its shards must have stopped
/// (written their final checkpoints) before the new count starts: docs/RUNBOOK.md, "Resharding".
pub async fn restore_resharded(
    js: &jetstream::Context,
    kv: &kv::Store,
    shard: u32,
    count: u32,
) -> anyhow::Result<Option<Restored>> {
    use std::collections::BTreeMap;
    let mut keys = tokio::time::timeout(TAIL_READ_TIMEOUT, kv.keys())
        .await
        .map_err(|_| anyhow::anyhow!("listing the pool bucket timed out"))??;
    let mut others: BTreeMap<u32, Vec<(u32, String)>> = BTreeMap::new();
    loop {
        let next = tokio::time::timeout(TAIL_READ_TIMEOUT, keys.next())
            .await
            .map_err(|_| anyhow::anyhow!("listing the pool bucket timed out"))?;
        let Some(key) = next else { break };
        let key = key?;
        if let Some((old, old_count, "checkpoint")) =
            voicerooms_contract::status::pool_key::parse(&key)
        {
            if old_count != count && old < old_count {
                others.entry(old_count).or_default().push((old, key));
            }
        }
    }
    // The previous count: the one with the newest checkpoint.
    let mut best: Option<(u64, u32, BTreeMap<u32, Checkpoint>)> = None;
    for (old_count, keys) in others {
        let mut checkpoints = BTreeMap::new();
        for (old, key) in keys {
            let value = tokio::time::timeout(TAIL_READ_TIMEOUT, kv.get(key))
                .await
                .map_err(|_| anyhow::anyhow!("reading an old checkpoint timed out"))??;
            if let Some(c) = value.and_then(|v| serde_json::from_slice::<Checkpoint>(&v).ok()) {
                checkpoints.insert(old, c);
            }
        }
        let newest = checkpoints.values().map(|c| c.at).max().unwrap_or(0);
        if best.as_ref().is_none_or(|(at, _, _)| newest > *at) {
            best = Some((newest, old_count, checkpoints));
        }
    }
    let Some((_, old_count, checkpoints)) = best else {
        return Ok(None);
    };
    if checkpoints.is_empty() {
        return Ok(None);
    }
    let ours = |g: GuildId| shard_of(g, count) == shard;
    let snapshot: Vec<GuildSnapshot> = checkpoints
        .values()
        .flat_map(|c| c.voice.iter().filter(|g| ours(g.guild)).cloned())
        .collect();
    let mut cache = VoiceCache::from_snapshot(snapshot);
    let stream_end = stream_end(js).await?;
    let from = checkpoints
        .values()
        .map(|c| c.stream_seq)
        .filter(|s| *s > 0)
        .min()
        .unwrap_or(stream_end);
    let mut replayed = 0usize;
    if from < stream_end {
        for Stored { event: e, .. } in read_tail(js, from, stream_end).await? {
            if !ours(e.guild) {
                continue;
            }
            // Only what its old shard's checkpoint does not hold yet.
            let after = checkpoints
                .get(&shard_of(e.guild, old_count))
                .map_or(0, |c| c.stream_seq);
            if e.seq.unwrap_or(0) > after {
                cache.apply_published(e.guild, e.room, &e.event);
                replayed = replayed.saturating_add(1);
            }
        }
    }
    tracing::info!(
        shard,
        count,
        previous_count = old_count,
        previous_checkpoints = checkpoints.len(),
        voice_states = cache.voice_count(),
        replayed,
        "resharded: starting from the previous shard count's checkpoints and the stream after them"
    );
    Ok(Some(Restored {
        cache,
        session: None,
        seq: 0,
        stream_seq: stream_end,
        replayed,
    }))
}

async fn stream_end(js: &jetstream::Context) -> anyhow::Result<u64> {
    let mut stream = js.get_stream(ROOMS_STREAM).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// A stored event and the event its publisher had sent just before it while that one was
/// unacknowledged ([`crate::publisher::AFTER_HEADER`]).
#[derive(Debug)]
pub struct Stored {
    pub event: RoomEvent,
    pub after: Option<String>,
}

/// The first event of `session` that a stored event names as sent before it and that is not in
/// `tail`: a publish lost in an outage while later ones were stored. Only events of dispatches
/// after the checkpoint's `checkpoint_seq` count — the checkpoint holds every earlier one (and
/// every event of a later dispatch is stored after the checkpoint's stream position, so a
/// stored one is in `tail`).
pub fn lost_before_stored(
    tail: &[Stored],
    session: Option<&SessionInfo>,
    checkpoint_seq: u64,
) -> Option<String> {
    let ours = session.map(|s| s.session_id.as_str())?;
    let ids: std::collections::HashSet<&str> =
        tail.iter().filter_map(|t| t.event.id.as_deref()).collect();
    tail.iter()
        .filter(|t| {
            t.event
                .id
                .as_deref()
                .and_then(session_and_seq)
                .is_some_and(|(s, _)| s == ours)
        })
        .filter_map(|t| t.after.as_deref())
        .find(|after| {
            session_and_seq(after).is_some_and(|(s, seq)| s == ours && seq > checkpoint_seq)
                && !ids.contains(after)
        })
        .map(str::to_owned)
}

/// Voice events stored after `after` up to `end`, in order. Reads every message in between
/// (a filtered read cannot tell where its last match is without a pending count that
/// nats-server 2.9 does not report reliably) and keeps the voice events.
async fn read_tail(js: &jetstream::Context, after: u64, end: u64) -> anyhow::Result<Vec<Stored>> {
    let stream = js.get_stream(ROOMS_STREAM).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after.saturating_add(1),
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(TAIL_READ_TIMEOUT, messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("reading the stream after the checkpoint timed out"))?
            .ok_or_else(|| anyhow::anyhow!("the stream read ended early"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = next
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        if seq > end {
            return Ok(out);
        }
        if next.subject.as_str().contains(".voice.") {
            match RoomEvent::decode_on(&next.subject, &next.payload) {
                Ok(mut e) => {
                    e.seq = Some(seq);
                    let after = next
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(crate::publisher::AFTER_HEADER))
                        .map(|v| v.as_str().to_owned());
                    out.push(Stored { event: e, after })
                }
                Err(e) => tracing::warn!(error = %e, seq, "skipping an undecodable stored event"),
            }
        }
        if seq >= end {
            return Ok(out);
        }
    }
}

/// Longest wait for the next stored message while reading after the checkpoint.
const TAIL_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_give_their_session_and_sequence() {
        assert_eq!(session_and_seq("abc:42:voice.left-1-2"), Some(("abc", 42)));
        assert_eq!(session_and_seq("abc:x:voice.left-1-2"), None);
        assert_eq!(session_and_seq("abc:42"), None);
        assert_eq!(session_and_seq(""), None);
    }

    fn stored(id: &str, after: Option<&str>) -> Stored {
        use voicerooms_contract::event::{Event, UserRef, VoiceLeft};
        let guild = GuildId::new(1 << 22).unwrap();
        let room = voicerooms_contract::RoomId::new(7).unwrap();
        let user = UserRef {
            id: voicerooms_contract::UserId::new(9).unwrap(),
            username: "u".into(),
            global_name: None,
            avatar: None,
        };
        let mut event = RoomEvent::new(
            guild,
            room,
            1,
            Event::VoiceLeft(VoiceLeft {
                user,
                moved_to: None,
            }),
        );
        event.id = Some(id.to_owned());
        Stored {
            event,
            after: after.map(str::to_owned),
        }
    }

    #[test]
    fn a_stored_event_naming_a_missing_one_of_a_later_dispatch_reveals_a_lost_publish() {
        let session = SessionInfo {
            session_id: "s".into(),
            resume_url: String::new(),
        };
        // 11 stored, then 12 (sent after 11 while it was unacknowledged): no hole.
        let whole = [stored("s:11:a", None), stored("s:12:b", Some("s:11:a"))];
        assert_eq!(lost_before_stored(&whole, Some(&session), 10), None);
        // 13 stored, naming 12, which is not in the stream: lost.
        let hole = [stored("s:11:a", None), stored("s:13:c", Some("s:12:b"))];
        assert_eq!(
            lost_before_stored(&hole, Some(&session), 10).as_deref(),
            Some("s:12:b")
        );
        // The named event belongs to a dispatch the checkpoint holds: not a hole.
        assert_eq!(lost_before_stored(&hole, Some(&session), 12), None);
        // Another session's events and headers are not ours to judge.
        let other = [stored("t:13:c", Some("t:12:b"))];
        assert_eq!(lost_before_stored(&other, Some(&session), 10), None);
        let named_other = [stored("s:13:c", Some("t:12:b"))];
        assert_eq!(lost_before_stored(&named_other, Some(&session), 10), None);
        assert_eq!(lost_before_stored(&hole, None, 10), None);
    }

    #[test]
    fn guilds_route_to_shards_by_discords_formula() {
        let guild = GuildId::new(5 << 22).unwrap();
        assert_eq!(shard_of(guild, 4), 1);
        assert_eq!(shard_of(guild, 1), 0);
        assert_eq!(shard_of(guild, 0), 0);
    }
}
