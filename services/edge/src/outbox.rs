//! A connection's outgoing queue: unbounded as a queue, bounded by the bytes it holds.
//!
//! Producers (room pumps, the connection's own handler) never wait: [`Outbox::push`] either
//! queues the frame or, past the byte limit, marks the connection overflowed and returns false —
//! so one slow client can never delay the pump that feeds everyone else. The connection's own
//! task drains the queue into the socket ([`Inbox::poll_write`], as many frames as the socket
//! takes per wake-up) and closes the connection with 1008 once it sees the overflow.
//!
//! Memory per connection matters here (docs/BENCHMARKS.md, edge): the queue is a `VecDeque` that
//! allocates nothing until a frame is queued and gives its memory back once drained (a small
//! block is kept between bursts and dropped at the next ping). One waker serves every reason to
//! wake the connection — a frame queued into an empty queue, the overflow, a kick.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use actix_ws::{CloseCode, CloseReason, Message};
use bytestring::ByteString;
use futures::task::AtomicWaker;
use futures::Sink;
use prometheus_client::metrics::gauge::Gauge;
use voicerooms_contract::RoomId;

/// What the connection sends, in order.
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

/// Queue capacity kept after a burst drains (frames); more is given back at once.
const KEEP_SLOTS: usize = 8;

#[derive(Default)]
enum KickState {
    #[default]
    None,
    Pending(Kick),
    /// The connection took a kick; later ones are ignored (the first kick wins).
    Taken,
}

/// What the producers and the connection share under one lock.
#[derive(Default)]
struct State {
    frames: VecDeque<Out>,
    /// Bytes of frames queued and not yet handed to the socket.
    queued: usize,
    /// Subscriptions the server ended (membership revoked, room deleted, pump failed), as
    /// (room, subscription id); the connection's reader forgets them. At most one entry per
    /// subscription the client made, and the reader drains them before it makes another.
    ended: Vec<(RoomId, u64)>,
    kick: KickState,
}

/// State shared by a connection's producers and its task (one allocation per connection).
struct Shared {
    state: Mutex<State>,
    /// Wakes the connection's task: a frame queued into an empty queue, the overflow, a kick.
    waker: AtomicWaker,
    overflowed: AtomicBool,
    /// The connection ended: producers stop queueing.
    closed: AtomicBool,
    /// Bytes queued across every connection (`voicerooms_edge_queued_bytes`); moves with
    /// `queued`.
    total: Gauge,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The producer side, cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    limit: usize,
}

/// The connection's side: drains the queue into the socket. Dropping it closes the queue and
/// drops what is left.
pub struct Inbox {
    shared: Arc<Shared>,
    /// The overflow was reported once; later polls drain normally (the close that follows).
    overflow_reported: bool,
}

/// A queue holding at most `limit` bytes of frames; `total` counts the bytes queued across all
/// connections.
pub fn outbox(limit: usize, total: Gauge) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        waker: AtomicWaker::new(),
        overflowed: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        total,
    });
    (
        Outbox {
            shared: shared.clone(),
            limit,
        },
        Inbox {
            shared,
            overflow_reported: false,
        },
    )
}

impl Outbox {
    /// Queues a frame. False when the connection is gone or its queue overflowed (it will be
    /// closed with 1008); the caller just moves on.
    pub fn push(&self, frame: &ByteString) -> bool {
        self.enqueue(Out::Frame(frame.clone()), frame.len())
    }

    /// Queues an event frame stamped with its gateway receive time (ms).
    pub fn push_event(&self, frame: &ByteString, received_at: u64) -> bool {
        self.enqueue(Out::Event(frame.clone(), received_at), frame.len())
    }

    fn enqueue(&self, out: Out, len: usize) -> bool {
        let shared = &*self.shared;
        if shared.overflowed.load(Ordering::Relaxed) || shared.closed.load(Ordering::Relaxed) {
            return false;
        }
        let mut state = shared.lock();
        // Checked again under the lock: the connection's end clears the queue under it.
        if shared.closed.load(Ordering::Relaxed) {
            return false;
        }
        let total = state.queued.saturating_add(len);
        if total > self.limit {
            drop(state);
            shared.overflowed.store(true, Ordering::Release);
            shared.waker.wake();
            return false;
        }
        state.queued = total;
        let was_empty = state.frames.is_empty();
        state.frames.push_back(out);
        drop(state);
        shared.total.inc_by(len as i64);
        // A non-empty queue is being drained already (or waits on the socket, which wakes it).
        if was_empty {
            shared.waker.wake();
        }
        true
    }

    /// Queues a control message (not counted against the limit, queued even after an
    /// overflow: the close that follows one).
    pub fn control(&self, out: Out) -> bool {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return false;
        }
        let mut state = shared.lock();
        let was_empty = state.frames.is_empty();
        state.frames.push_back(out);
        drop(state);
        if was_empty {
            shared.waker.wake();
        }
        true
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().queued
    }

    pub fn is_overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// The connection ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Records that the server ended subscription `sub` to `room` (its frames are already
    /// queued).
    pub fn end_subscription(&self, room: RoomId, sub: u64) {
        self.shared.lock().ended.push((room, sub));
    }

    /// The subscriptions the server ended since the last call.
    pub fn take_ended(&self) -> Vec<(RoomId, u64)> {
        std::mem::take(&mut self.shared.lock().ended)
    }

    /// Asks the connection to close (the first kick wins); its task sees it in
    /// [`Inbox::poll_write`].
    pub fn kick(&self, kick: Kick) {
        let mut state = self.shared.lock();
        if matches!(state.kick, KickState::None) {
            state.kick = KickState::Pending(kick);
            drop(state);
            self.shared.waker.wake();
        }
    }

    /// Whether two handles are the same connection's.
    pub fn same_connection(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Why [`Inbox::poll_write`] stopped writing.
#[derive(Debug, PartialEq, Eq)]
pub enum Wrote {
    /// The connection was asked to close (e.g. its session ended).
    Kicked(Kick),
    /// The queue went over its byte limit: the client does not read fast enough (reported
    /// once).
    Overflowed,
    /// The socket is gone.
    Gone,
    /// A queued [`Out::Close`] was handed to the socket: nothing more is written.
    Closed,
}

impl Inbox {
    /// Hands queued frames to `socket` until the queue is empty or the socket is full, then
    /// waits (registering the task's waker with both). Resolves only for what ends the normal
    /// flow ([`Wrote`]); `on_event` gets the receive time of each event frame handed over.
    /// Nothing is lost when the future polling this is dropped: a frame leaves the queue only
    /// once the socket has accepted it.
    pub fn poll_write<S>(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut S,
        mut on_event: impl FnMut(u64),
    ) -> Poll<Wrote>
    where
        S: Sink<Message> + Unpin,
    {
        let shared = &*self.shared;
        shared.waker.register(cx.waker());
        if !self.overflow_reported && shared.overflowed.load(Ordering::Acquire) {
            self.overflow_reported = true;
            return Poll::Ready(Wrote::Overflowed);
        }
        let mut state = shared.lock();
        if let KickState::Pending(kick) = state.kick {
            state.kick = KickState::Taken;
            return Poll::Ready(Wrote::Kicked(kick));
        }
        let mut written = 0usize;
        let result = loop {
            if state.frames.is_empty() {
                if state.frames.capacity() > KEEP_SLOTS {
                    state.frames = VecDeque::new();
                }
                break Poll::Pending;
            }
            match Pin::new(&mut *socket).poll_ready(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(_)) => break Poll::Ready(Wrote::Gone),
                Poll::Ready(Ok(())) => {}
            }
            let Some(out) = state.frames.pop_front() else {
                break Poll::Pending;
            };
            let (message, last) = match out {
                Out::Frame(frame) => {
                    written = written.saturating_add(frame.len());
                    (Message::Text(frame), false)
                }
                Out::Event(frame, received_at) => {
                    written = written.saturating_add(frame.len());
                    on_event(received_at);
                    (Message::Text(frame), false)
                }
                Out::Ping => (Message::Ping(Default::default()), false),
                Out::Close(code, why) => (Message::Close(Some(reason(code, why))), true),
            };
            if Pin::new(&mut *socket).start_send(message).is_err() {
                break Poll::Ready(Wrote::Gone);
            }
            if last {
                break Poll::Ready(Wrote::Closed);
            }
        };
        state.queued = state.queued.saturating_sub(written);
        drop(state);
        if written > 0 {
            shared.total.dec_by(written as i64);
        }
        result
    }

    /// Drops what is queued (an overflowed connection's backlog); the queue stays open for
    /// the close.
    pub fn clear(&mut self) {
        let mut state = self.shared.lock();
        let left = std::mem::take(&mut state.queued);
        state.frames = VecDeque::new();
        drop(state);
        if left > 0 {
            self.shared.total.dec_by(left as i64);
        }
    }

    /// Gives back the queue's memory if it is empty (an idle connection holds none).
    pub fn trim(&mut self) {
        let mut state = self.shared.lock();
        if state.frames.is_empty() && state.frames.capacity() > 0 {
            state.frames = VecDeque::new();
        }
    }

    pub fn is_overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Acquire)
    }

    /// The next queued message, without a socket (tests).
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<Out> {
        let mut state = self.shared.lock();
        let out = state.frames.pop_front()?;
        if let Out::Frame(f) | Out::Event(f, _) = &out {
            state.queued = state.queued.saturating_sub(f.len());
            self.shared.total.dec_by(f.len() as i64);
        }
        Some(out)
    }
}

impl Drop for Inbox {
    /// The connection ended: producers stop queueing and what is left leaves the total.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        self.shared.closed.store(true, Ordering::Release);
        let left = std::mem::take(&mut state.queued);
        state.frames = VecDeque::new();
        drop(state);
        if left > 0 {
            self.shared.total.dec_by(left as i64);
        }
    }
}

/// A close frame's reason.
pub fn reason(code: u16, description: &str) -> CloseReason {
    CloseReason {
        code: CloseCode::from(code),
        description: Some(description.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes `room` messages, then is full until `room` is raised.
    #[derive(Default)]
    struct TestSocket {
        room: usize,
        sent: Vec<Message>,
        gone: bool,
    }

    impl Sink<Message> for TestSocket {
        type Error = ();
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            if self.gone {
                Poll::Ready(Err(()))
            } else if self.sent.len() < self.room {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), ()> {
            self.sent.push(item);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn poll(inbox: &mut Inbox, socket: &mut TestSocket) -> Poll<Wrote> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        inbox.poll_write(&mut cx, socket, |_| {})
    }

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
        let mut socket = TestSocket {
            room: 10,
            ..Default::default()
        };
        assert_eq!(
            poll(&mut inbox, &mut socket),
            Poll::Ready(Wrote::Overflowed)
        );
        assert!(socket.sent.is_empty(), "an overflowed queue is not written");
        inbox.clear();
        assert_eq!(total.get(), 0);
        assert!(
            outbox.control(Out::Close(1008, "slow")),
            "the close still goes"
        );
        drop((outbox, inbox));
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn frames_go_out_in_order_as_the_socket_takes_them_and_the_memory_comes_back() {
        let total = Gauge::default();
        let (outbox, mut inbox) = outbox(1000, total.clone());
        for i in 0..20 {
            assert!(outbox.push(&ByteString::from(format!("f{i:02}"))));
        }
        assert_eq!(total.get(), 60);
        let mut socket = TestSocket {
            room: 5,
            ..Default::default()
        };
        assert_eq!(poll(&mut inbox, &mut socket), Poll::Pending, "socket full");
        assert_eq!(socket.sent.len(), 5);
        assert_eq!(outbox.queued_bytes(), 45);
        assert_eq!(total.get(), 45);
        socket.room = 100;
        assert_eq!(poll(&mut inbox, &mut socket), Poll::Pending, "queue empty");
        let texts: Vec<String> = socket
            .sent
            .iter()
            .map(|m| match m {
                Message::Text(t) => t.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        let want: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
        assert_eq!(texts, want);
        assert_eq!(total.get(), 0);
        assert_eq!(
            inbox.shared.lock().frames.capacity(),
            0,
            "a drained burst gives its memory back"
        );
        assert!(outbox.push(&ByteString::from_static("x")));
        assert_eq!(poll(&mut inbox, &mut socket), Poll::Pending);
        assert!(
            inbox.shared.lock().frames.capacity() > 0,
            "a small block is kept"
        );
        inbox.trim();
        assert_eq!(
            inbox.shared.lock().frames.capacity(),
            0,
            "and dropped by trim"
        );
    }

    #[test]
    fn a_kick_and_a_close_end_the_writing_and_the_first_kick_wins() {
        let (outbox, mut inbox) = outbox(1000, Gauge::default());
        let mut socket = TestSocket {
            room: 100,
            ..Default::default()
        };
        let first = Kick {
            code: 4003,
            error: "session_ended",
            message: "a",
        };
        outbox.kick(first);
        outbox.kick(Kick {
            code: 4000,
            ..first
        });
        assert_eq!(
            poll(&mut inbox, &mut socket),
            Poll::Ready(Wrote::Kicked(first))
        );
        assert_eq!(poll(&mut inbox, &mut socket), Poll::Pending, "taken once");
        assert!(outbox.push(&ByteString::from_static("bye")));
        assert!(outbox.control(Out::Close(4003, "a")));
        assert!(outbox.push(&ByteString::from_static("after")));
        assert_eq!(poll(&mut inbox, &mut socket), Poll::Ready(Wrote::Closed));
        assert_eq!(
            socket.sent.len(),
            2,
            "the frame, then the close; nothing after"
        );
        assert!(
            matches!(socket.sent.get(1), Some(Message::Close(Some(r))) if r.code == CloseCode::from(4003))
        );
        socket.gone = true;
        assert_eq!(poll(&mut inbox, &mut socket), Poll::Ready(Wrote::Gone));
    }

    #[test]
    fn the_total_counts_every_connection_and_frames_to_a_closed_one_do_not_count() {
        let total = Gauge::default();
        let (a, mut a_in) = outbox(100, total.clone());
        let (b, b_in) = outbox(100, total.clone());
        assert!(a.push(&ByteString::from_static("abc")));
        assert!(b.push(&ByteString::from_static("abcdefg")));
        assert_eq!(total.get(), 10);
        drop(b_in);
        assert!(b.is_closed());
        assert_eq!(
            total.get(),
            3,
            "a closed connection's backlog leaves the total"
        );
        assert!(
            !b.push(&ByteString::from_static("xy")),
            "the connection is gone"
        );
        assert_eq!(total.get(), 3);
        assert!(matches!(a_in.try_recv(), Some(Out::Frame(_))));
        assert_eq!(total.get(), 0);
    }
}
