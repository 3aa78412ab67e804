//! A connection's outgoing queue: unbounded as a channel, bounded by the bytes it holds.
//!
//! Producers (room pumps, the connection's own handler) never wait: [`Outbox::push`] either
//! queues the frame or, past the byte limit, marks the connection overflowed and returns false —
//! so one slow client can never delay the pump that feeds everyone else. The writer task drains
//! the queue into the socket and closes the connection with 1008 once it sees the overflow.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytestring::ByteString;
use tokio::sync::{mpsc, Notify};

/// What the writer sends, in order.
#[derive(Debug)]
pub enum Out {
    Frame(ByteString),
    /// An event frame with its gateway receive time, for the end-to-end latency histogram.
    Event(ByteString, u64),
    Ping,
    Close(u16, String),
}

/// The producer side, cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Out>,
    queued: Arc<AtomicUsize>,
    overflowed: Arc<AtomicBool>,
    overflow: Arc<Notify>,
    limit: usize,
}

/// The writer side.
pub struct Inbox {
    pub rx: mpsc::UnboundedReceiver<Out>,
    queued: Arc<AtomicUsize>,
    overflowed: Arc<AtomicBool>,
    overflow: Arc<Notify>,
}

/// A queue holding at most `limit` bytes of frames.
pub fn outbox(limit: usize) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let overflowed = Arc::new(AtomicBool::new(false));
    let overflow = Arc::new(Notify::new());
    (
        Outbox {
            tx,
            queued: queued.clone(),
            overflowed: overflowed.clone(),
            overflow: overflow.clone(),
            limit,
        },
        Inbox {
            rx,
            queued,
            overflowed,
            overflow,
        },
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
        if self.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.len();
        let total = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if total > self.limit {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.overflowed.store(true, Ordering::Release);
            self.overflow.notify_one();
            return false;
        }
        let out = match received_at {
            Some(at) => Out::Event(frame.clone(), at),
            None => Out::Frame(frame.clone()),
        };
        if self.tx.send(out).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
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
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Inbox {
    /// Call after a frame taken from `rx` was written.
    pub fn written(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::AcqRel);
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// A handle that resolves when the queue overflows (usable while `rx` is borrowed).
    pub fn overflow_signal(&self) -> OverflowSignal {
        OverflowSignal {
            overflowed: self.overflowed.clone(),
            notify: self.overflow.clone(),
        }
    }
}

/// Resolves when a queue overflows.
pub struct OverflowSignal {
    overflowed: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl OverflowSignal {
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        if self.overflowed.load(Ordering::Acquire) {
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
        let (outbox, mut inbox) = outbox(10);
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
        assert!(matches!(inbox.rx.try_recv(), Ok(Out::Frame(_))));
        inbox.written(4);
        assert_eq!(outbox.queued_bytes(), 4);
    }

    #[test]
    fn writing_frees_room_in_the_queue() {
        let (outbox, mut inbox) = outbox(8);
        let frame = ByteString::from_static("abcd");
        for _ in 0..10 {
            assert!(outbox.push(&frame));
            assert!(matches!(inbox.rx.try_recv(), Ok(Out::Frame(_))));
            inbox.written(4);
        }
        assert_eq!(outbox.queued_bytes(), 0);
    }
}
