//! The bounded, observable record of everything the simulator did.

use std::collections::VecDeque;

use serde::Serialize;

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SimEventKind {
    /// A gateway websocket was accepted.
    Connected {
        conn: u64,
    },
    /// A gateway connection was refused (fault or connection cap).
    Refused {
        reason: String,
    },
    /// A gateway connection ended. `code` is the close code (None = dropped without a close frame).
    Disconnected {
        conn: u64,
        code: Option<u16>,
        by_server: bool,
    },
    Hello {
        conn: u64,
    },
    /// An accepted IDENTIFY: the shard it asked for and its rate-limit key
    /// (`shard_id % max_concurrency`); the entry's `at_ms` is when it was accepted.
    Identify {
        conn: u64,
        session_id: String,
        intents: u64,
        shard: [u64; 2],
        rate_limit_key: u64,
    },
    /// An IDENTIFY was refused (op 9, or close 4011 when sharding is required).
    IdentifyRejected {
        conn: u64,
        reason: String,
        shard: [u64; 2],
    },
    Resume {
        conn: u64,
        session_id: String,
        seq: u64,
        replayed: usize,
    },
    ResumeRejected {
        conn: u64,
        reason: String,
    },
    Heartbeat {
        conn: u64,
        seq: Option<u64>,
    },
    HeartbeatAck {
        conn: u64,
    },
    /// The server sent op 1 to ask for a heartbeat.
    HeartbeatRequested {
        conn: u64,
    },
    Dispatch {
        session_id: String,
        seq: u64,
        event: String,
    },
    Reconnect {
        conn: u64,
    },
    InvalidSession {
        conn: u64,
        resumable: bool,
    },
    /// One REST call: route is the template (`PATCH /guilds/{guild_id}/members/{user_id}`).
    Rest {
        method: String,
        route: String,
        path: String,
        status: u16,
    },
    Oauth {
        endpoint: String,
        outcome: String,
    },
    Fault {
        description: String,
    },
    Control {
        op: String,
    },
}

/// One entry: `id` increases by one per entry, so `since` queries never miss one.
#[derive(Debug, Clone, Serialize)]
pub struct SimEvent {
    pub id: u64,
    /// Milliseconds since the simulator started (monotonic clock).
    pub at_ms: u64,
    /// Wall-clock Unix milliseconds.
    pub unix_ms: u64,
    #[serde(flatten)]
    pub kind: SimEventKind,
}

/// A ring buffer of events; the oldest are dropped at capacity.
pub struct EventLog {
    events: VecDeque<SimEvent>,
    capacity: usize,
    next_id: u64,
    started: std::time::Instant,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            events: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            next_id: 1,
            started: std::time::Instant::now(),
        }
    }

    pub fn push(&mut self, kind: SimEventKind) {
        if self.events.len() >= self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(SimEvent {
            id: self.next_id,
            at_ms: self.started.elapsed().as_millis() as u64,
            unix_ms: crate::util::unix_ms(),
            kind,
        });
        self.next_id = self.next_id.wrapping_add(1);
    }

    /// Entries with `id > since`.
    pub fn since(&self, since: u64) -> Vec<SimEvent> {
        self.events
            .iter()
            .filter(|e| e.id > since)
            .cloned()
            .collect()
    }

    pub fn clear(&mut self) {
        self.events.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_drops_the_oldest_entries_at_capacity() {
        let mut log = EventLog::new(2);
        for i in 0..3 {
            log.push(SimEventKind::Control { op: i.to_string() });
        }
        let ids: Vec<u64> = log.since(0).iter().map(|e| e.id).collect();
        assert_eq!(ids, [2, 3]);
    }
}
