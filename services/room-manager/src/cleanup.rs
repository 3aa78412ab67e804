//! Idle cleanup, run by every replica every `rooms.cleanup_interval_ms`: an open room whose
//! channel has been empty for `rooms.idle_timeout_ms` gets `room.closing` (deadline
//! `closing_warning_ms` ahead); the replica that sent it finishes the room at the deadline unless
//! a voice join (or a `join`) cancelled it; any replica's scan finishes a closing room past its
//! deadline or a `deleting` room whose lease ran out (its replica died halfway). Every step is a
//! compare-and-set, so one replica acts at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use voicerooms_contract::command::RoomState;
use voicerooms_contract::event::CloseReason;
use voicerooms_contract::{now_ms, ApiError, RoomId};

use crate::rooms::{begin_closing, finish_room, Core, MAX_SCAN};
use crate::store::{self, RoomRecord};

/// The periodic cleanup scan.
pub async fn run_cleanup(core: Arc<Core>, token: CancellationToken) -> anyhow::Result<()> {
    let every = Duration::from_millis(core.settings.cleanup_interval_ms);
    loop {
        // Dropped on shutdown: every step is a CAS, so an interrupted pass is resumed later.
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = scan(&core) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cleanup scan failed");
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One cleanup pass over every room.
pub async fn scan(core: &Arc<Core>) -> Result<(), ApiError> {
    let now = now_ms();
    let mut by_state = [0i64; 4];
    for (_, rec, _) in store::scan::<RoomRecord>(&core.rooms, "", MAX_SCAN).await? {
        let room = rec.view.id;
        if let Some(n) = by_state.get_mut(state_index(rec.view.state)) {
            *n = n.saturating_add(1);
        }
        match rec.view.state {
            RoomState::Open
                if rec.view.voice.is_empty()
                    && now.saturating_sub(rec.view.last_activity)
                        >= core.settings.idle_timeout_ms =>
            {
                if let Some(deadline) = begin_closing(core, room).await? {
                    schedule_finish(core.clone(), room, deadline);
                }
            }
            RoomState::Closing if rec.view.closing_deadline.is_some_and(|d| d <= now) => {
                finish_logged(core, room, CloseReason::Idle).await;
            }
            RoomState::Deleting if rec.lease.as_ref().is_none_or(|l| l.until <= now) => {
                finish_logged(core, room, CloseReason::Idle).await;
            }
            _ => {}
        }
    }
    core.metrics.set_rooms_by_state(by_state);
    core.metrics.cleanup_scans.inc();
    Ok(())
}

fn state_index(s: RoomState) -> usize {
    match s {
        RoomState::Creating => 0,
        RoomState::Open => 1,
        RoomState::Closing => 2,
        RoomState::Deleting => 3,
    }
}

async fn finish_logged(core: &Arc<Core>, room: RoomId, reason: CloseReason) {
    if let Err(e) = finish_room(core, room, reason, false).await {
        tracing::warn!(room = %room, error = %e, "finishing room failed; a later scan retries");
    }
}

/// Finishes the room at its deadline (unless cancelled meanwhile: the CAS in `finish_room` sees
/// the room open again and does nothing).
pub fn schedule_finish(core: Arc<Core>, room: RoomId, deadline: u64) {
    let (tasks, token) = (core.tasks.clone(), core.shutdown.clone());
    tasks.spawn(async move {
        let wait = Duration::from_millis(deadline.saturating_sub(now_ms()).saturating_add(5));
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            _ = token.cancelled() => {}
            _ = finish_logged(&core, room, CloseReason::Idle) => {}
        }
    });
}
