//! A connection's outgoing queue: unbounded as a channel, bounded by the bytes it holds.
//!
//! Producers (room pumps, the connection's own handler) never wait: [`Outbox::push`] either
//! queues the frame or, past the byte limit, marks the connection overflowed and returns false —
//! so one slow client can never delay the pump that feeds everyone else. The writer task drains
//! the queue into the socket and closes the connection with 1008 once it sees the overflow.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytestring::ByteString;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, Notify};
use voicerooms_contract::RoomId;

/// What the writer sends, in order.
#[derive(Debug)]
pub enum Out {
    Frame(ByteString),
    /// An event frame with its gateway receive time, for the end-to-end latency histogram.
    Event(ByteString, u64),
    Ping,
    Close(u16, &'static str),
}

/// Why the server closes a connection from outside its reader (e.g. its session ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kick {
    /// The WebSocket close code.
    pub code: u16,
    /// The `error` frame's code sent before the close.
    pub error: &'static str,
    pub message: &'static str,
}

/// State shared by a connection's producers and its writer (one allocation per connection).
struct Shared {
    /// Bytes of frames queued and not yet handed to the socket.
    queued: AtomicUsize,
    overflowed: AtomicBool,
    overflow: Notify,
    /// Bytes queued across every connection (`voicerooms_edge_queued_bytes`); moves with
    /// `queued`.
    total: Gauge,
    /// Subscriptions the server ended (membership revoked, room deleted, pump failed), as
    /// (room, subscription id); the connection's reader forgets them. At most one entry per
    /// subscription the client made, and the reader drains them before it makes another.
    ended: Mutex<Vec<(RoomId, u64)>>,
    /// Set when the connection must close (its session ended); `kicked` wakes the reader.
    kick: Mutex<Option<Kick>>,
    kicked: Notify,
}

impl Drop for Shared {
    /// The last handle is gone: frames still queued (a closed or overflowed connection) are
    /// dropped with the channel, so they leave the total too.
    fn drop(&mut self) {
        let left = *self.queued.get_mut();
        if left > 0 {
            self.total.dec_by(left as i64);
        }
    }
}

/// The producer side, cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Out>,
    shared: Arc<Shared>,
    limit: usize,
}

/// The writer side.
pub struct Inbox {
    pub rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
}

/// A queue holding at most `limit` bytes of frames; `total` counts the bytes queued across all
/// connections.
pub fn outbox(limit: usize, total: Gauge) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        overflowed: AtomicBool::new(false),
        overflow: Notify::new(),
        total,
        ended: Mutex::new(Vec::new()),
        kick: Mutex::new(None),
        kicked: Notify::new(),
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
            limit,
        },
        Inbox { rx, shared },
    )
}

impl Outbox {
    /// Queues a frame. False when the connection is gone or its queue overflowed (it will be
    /// closed with 1008); the caller just moves on.
    pub fn push(&self, frame: &ByteString) -> bool {
        self.enqueue(frame, None)
    }

    /// Queues an event frame stamped with its gateway receive time (ms).
    pub fn push_event(&self, frame: &ByteString, received_at: u64) -> bool {
        self.enqueue(frame, Some(received_at))
    }

    fn enqueue(&self, frame: &ByteString, received_at: Option<u64>) -> bool {
        let shared = &*self.shared;
        if shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.len();
        let total = shared
            .queued
            .fetch_add(len, Ordering::AcqRel)
            .saturating_add(len);
        if total > self.limit {
            shared.queued.fetch_sub(len, Ordering::AcqRel);
            shared.overflowed.store(true, Ordering::Release);
            shared.overflow.notify_one();
            return false;
        }
        shared.total.inc_by(len as i64);
        let out = match received_at {
            Some(at) => Out::Event(frame.clone(), at),
            None => Out::Frame(frame.clone()),
        };
        if self.tx.send(out).is_err() {
            shared.queued.fetch_sub(len, Ordering::AcqRel);
            shared.total.dec_by(len as i64);
            return false;
        }
        true
    }

    /// Queues a control message (not counted against the limit).
    pub fn control(&self, out: Out) -> bool {
        self.tx.send(out).is_ok()
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    pub fn is_overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Records that the server ended subscription `sub` to `room` (its frames are already
    /// queued).
    pub fn end_subscription(&self, room: RoomId, sub: u64) {
        let mut ended = self
            .shared
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ended.push((room, sub));
    }

    /// The subscriptions the server ended since the last call.
    pub fn take_ended(&self) -> Vec<(RoomId, u64)> {
        std::mem::take(
            &mut *self
                .shared
                .ended
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Asks the connection's reader to close it (the first kick wins).
    pub fn kick(&self, kick: Kick) {
        let mut slot = self
            .shared
            .kick
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(kick);
            self.shared.kicked.notify_one();
        }
    }

    /// Resolves with the kick once one was made.
    pub async fn kicked(&self) -> Kick {
        loop {
            if let Some(kick) = *self
                .shared
                .kick
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
            {
                return kick;
            }
            self.shared.kicked.notified().await;
        }
    }

    /// Whether two handles are the same connection's.
    pub fn same_connection(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Inbox {
    /// Call after a frame taken from `rx` was written.
    pub fn written(&self, len: usize) {
        self.shared.queued.fetch_sub(len, Ordering::AcqRel);
        self.shared.total.dec_by(len as i64);
    }

    pub fn is_overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Acquire)
    }

    /// A handle that resolves when the queue overflows (usable while `rx` is borrowed).
    pub fn overflow_signal(&self) -> OverflowSignal {
        OverflowSignal {
            shared: self.shared.clone(),
        }
    }
}

/// Resolves when a queue overflows.
pub struct OverflowSignal {
    shared: Arc<Shared>,
}

impl OverflowSignal {
    pub async fn wait(&self) {
        let notified = self.shared.overflow.notified();
        if self.shared.overflowed.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_by_bytes() {
        let total = Gauge::default();
        let (outbox, mut inbox) = outbox(10, total.clone());
        let frame = ByteString::from_static("abcd");
        assert!(outbox.push(&frame));
        assert!(outbox.push(&frame));
        assert_eq!(outbox.queued_bytes(), 8);
        assert!(
            !outbox.push(&frame),
            "12 bytes would pass the 10-byte limit"
        );
        assert!(outbox.is_overflowed());
        assert!(inbox.is_overflowed());
        assert!(
            !outbox.push(&ByteString::from_static("a")),
            "stays overflowed"
        );
        assert_eq!(total.get(), 8, "only queued frames count");
        assert!(matches!(inbox.rx.try_recv(), Ok(Out::Frame(_))));
        inbox.written(4);
        assert_eq!(outbox.queued_bytes(), 4);
        assert_eq!(total.get(), 4);
        drop((outbox, inbox));
        assert_eq!(
            total.get(),
            0,
            "frames dropped with the queue leave the total"
        );
    }

    #[test]
    fn writing_frees_room_in_the_queue() {
        let total = Gauge::default();
        let (outbox, mut inbox) = outbox(8, total.clone());
        let frame = ByteString::from_static("abcd");
        for _ in 0..10 {
            assert!(outbox.push(&frame));
            assert!(matches!(inbox.rx.try_recv(), Ok(Out::Frame(_))));
            inbox.written(4);
        }
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn the_total_counts_every_connection_and_frames_to_a_closed_one_do_not_count() {
        let total = Gauge::default();
        let (a, a_in) = outbox(100, total.clone());
        let (b, b_in) = outbox(100, total.clone());
        assert!(a.push(&ByteString::from_static("abc")));
        assert!(b.push(&ByteString::from_static("abcdefg")));
        assert_eq!(total.get(), 10);
        drop(b_in);
        assert!(
            !b.push(&ByteString::from_static("xy")),
            "the writer is gone"
        );
        assert_eq!(total.get(), 10);
        drop(b);
        assert_eq!(total.get(), 3);
        a_in.written(3);
        assert_eq!(total.get(), 0);
    }
}
