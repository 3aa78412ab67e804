//! When a shard may send IDENTIFY: Discord allows `max_concurrency` identifies per 5 s.
//!
//! The connection loop asks [`IdentifyQueue::acquire`] for a turn *after* HELLO, while the
//! connection is already heartbeating (Discord closes a connection that stays silent for longer
//! than the heartbeat interval, so a wait must never be idle), and sends IDENTIFY the moment the
//! turn is granted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Discord's identify window.
pub const IDENTIFY_WINDOW: Duration = Duration::from_secs(5);

/// Identify turns, shared by the shards of this process.
#[derive(Clone, Default)]
pub struct IdentifyQueue {
    inner: Arc<Mutex<Local>>,
}

#[derive(Default)]
struct Local {
    max_concurrency: usize,
    granted: VecDeque<Instant>,
}

impl IdentifyQueue {
    /// Sets `max_concurrency` from `GET /gateway/bot`.
    pub fn set_max_concurrency(&self, max: usize) {
        if let Ok(mut l) = self.inner.lock() {
            l.max_concurrency = max.clamp(1, 1024);
        }
    }

    /// Waits until an IDENTIFY fits in `max_concurrency` per 5 s, then takes that turn.
    pub async fn acquire(&self) {
        loop {
            let until = {
                let Ok(mut l) = self.inner.lock() else { return };
                let now = Instant::now();
                while l
                    .granted
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= IDENTIFY_WINDOW)
                {
                    l.granted.pop_front();
                }
                if l.granted.len() < l.max_concurrency.max(1) {
                    l.granted.push_back(now);
                    return;
                }
                l.granted
                    .front()
                    .map(|t| *t + IDENTIFY_WINDOW)
                    .unwrap_or(now)
            };
            tracing::info!(
                wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                "waiting for an identify turn"
            );
            tokio::time::sleep_until(until.into()).await;
        }
    }
}
