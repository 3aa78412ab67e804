//! A connection's outgoing queue: unbounded as a queue, bounded by the bytes it holds.
//!
//! Producers (room pumps, the connection's own handler) never wait: [`Outbox::push`] either
//! queues the frame or, past the byte limit, marks the connection overflowed and returns false —
//! so one slow client can never delay the pump that feeds everyone else.
//!
//! The queue is written by actix-http's connection dispatcher itself: [`OutboxBody`] is the
//! WebSocket response's body, and each time the dispatcher polls it, it encodes every queued
//! frame (up to [`CHUNK_BYTES`]) into one buffer, which the dispatcher writes with one `write`.
//! There is no second queue in between (actix-ws' session channel is not used for writing) and a
//! frame queued into an empty queue wakes the dispatcher directly. The connection's own task
//! holds the [`Inbox`] and learns only what ends the normal flow: a kick, the overflow (it then
//! closes the connection with 1008), its close handed to the socket, the socket gone.
//!
//! Memory per connection matters here (docs/BENCHMARKS.md, edge): the queue is a `VecDeque` that
//! allocates nothing until a frame is queued and gives its memory back once drained (a small
//! block is kept between bursts and dropped at the next ping).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use actix_http::ws::{OpCode, Parser};
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_ws::{CloseCode, CloseReason};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::task::AtomicWaker;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
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

/// The most bytes one poll of the body encodes into one chunk (actix-http's dispatcher stops
/// polling the body once its write buffer holds 32 KiB, and writes it).
pub const CHUNK_BYTES: usize = 32 * 1024;

/// RFC 6455: a control frame's payload is at most 125 bytes; a close's reason follows its 2-byte
/// code.
const MAX_CLOSE_REASON_BYTES: usize = 123;

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

/// State shared by a connection's producers, its task and its writer (one allocation per
/// connection).
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer (the response body, polled by actix-http's dispatcher): a frame queued
    /// into an empty queue, the connection's end.
    writer: AtomicWaker,
    /// Wakes the connection's task: the overflow, a kick, the close written, the socket gone.
    task: AtomicWaker,
    overflowed: AtomicBool,
    /// The connection's task ended: producers stop queueing and the body ends.
    closed: AtomicBool,
    /// A queued [`Out::Close`] was handed to the socket.
    close_written: AtomicBool,
    /// The body was dropped: the socket is gone.
    gone: AtomicBool,
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

/// The connection task's side. Dropping it closes the queue, drops what is left and ends the
/// body (the connection closes once what was written is flushed).
pub struct Inbox {
    shared: Arc<Shared>,
    /// The overflow was reported once; later polls report the rest.
    overflow_reported: bool,
}

/// A queue holding at most `limit` bytes of frames; `total` counts the bytes queued across all
/// connections.
pub fn outbox(limit: usize, total: Gauge) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        writer: AtomicWaker::new(),
        task: AtomicWaker::new(),
        overflowed: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        close_written: AtomicBool::new(false),
        gone: AtomicBool::new(false),
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
            shared.task.wake();
            return false;
        }
        state.queued = total;
        let was_empty = state.frames.is_empty();
        state.frames.push_back(out);
        drop(state);
        shared.total.inc_by(len as i64);
        // A non-empty queue is being written already (or waits on the socket, which wakes it).
        if was_empty {
            shared.writer.wake();
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
            shared.writer.wake();
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
    /// [`Inbox::poll_event`].
    pub fn kick(&self, kick: Kick) {
        let mut state = self.shared.lock();
        if matches!(state.kick, KickState::None) {
            state.kick = KickState::Pending(kick);
            drop(state);
            self.shared.task.wake();
        }
    }

    /// Whether two handles are the same connection's.
    pub fn same_connection(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// What ends a connection's normal flow, as [`Inbox::poll_event`] reports it.
#[derive(Debug, PartialEq, Eq)]
pub enum Wrote {
    /// The connection was asked to close (e.g. its session ended).
    Kicked(Kick),
    /// The queue went over its byte limit: the client does not read fast enough (reported
    /// once). Its frames are no longer written.
    Overflowed,
    /// The socket is gone.
    Gone,
    /// A queued [`Out::Close`] was handed to the socket: nothing more is written.
    Closed,
}

impl Inbox {
    /// Waits for what ends the normal flow ([`Wrote`]); frames are written by the body
    /// ([`Inbox::body`]) meanwhile.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Wrote> {
        let shared = &*self.shared;
        shared.task.register(cx.waker());
        if !self.overflow_reported && shared.overflowed.load(Ordering::Acquire) {
            self.overflow_reported = true;
            return Poll::Ready(Wrote::Overflowed);
        }
        let mut state = shared.lock();
        if let KickState::Pending(kick) = state.kick {
            state.kick = KickState::Taken;
            return Poll::Ready(Wrote::Kicked(kick));
        }
        drop(state);
        if shared.close_written.load(Ordering::Acquire) {
            return Poll::Ready(Wrote::Closed);
        }
        if shared.gone.load(Ordering::Acquire) {
            return Poll::Ready(Wrote::Gone);
        }
        Poll::Pending
    }

    /// The WebSocket response's body: writes this queue. `latency` observes the end-to-end
    /// latency (seconds) of every event frame written; `hold` is kept as long as the body (actix-ws'
    /// own body: dropping it tells actix-ws' message stream that the connection ended).
    pub fn body(&self, latency: Histogram, hold: BoxBody) -> OutboxBody {
        OutboxBody {
            shared: self.shared.clone(),
            latency,
            done: false,
            _hold: hold,
        }
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
    /// The connection ended: producers stop queueing, what is left leaves the total and the
    /// body ends.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        self.shared.closed.store(true, Ordering::Release);
        let left = std::mem::take(&mut state.queued);
        state.frames = VecDeque::new();
        drop(state);
        if left > 0 {
            self.shared.total.dec_by(left as i64);
        }
        self.shared.writer.wake();
    }
}

/// A WebSocket connection's response body: its queue, encoded as server frames (RFC 6455,
/// unmasked) by actix-http's frame encoder, as many frames per chunk as are queued. A frame
/// leaves the queue only when the dispatcher takes the chunk holding it.
pub struct OutboxBody {
    shared: Arc<Shared>,
    latency: Histogram,
    /// The close was written or the connection's task ended: the body is over.
    done: bool,
    _hold: BoxBody,
}

/// Bytes `payload` bytes take as an unmasked frame.
fn frame_len(payload: usize) -> usize {
    let header = if payload < 126 {
        2
    } else if payload <= 0xFFFF {
        4
    } else {
        10
    };
    payload.saturating_add(header)
}

/// A close reason's text, cut to what a control frame can carry (at a character boundary).
fn close_reason(why: &str) -> &str {
    if why.len() <= MAX_CLOSE_REASON_BYTES {
        return why;
    }
    let mut end = MAX_CLOSE_REASON_BYTES;
    while end > 0 && !why.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    why.get(..end).unwrap_or_default()
}

impl MessageBody for OutboxBody {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let shared = &*this.shared;
        shared.writer.register(cx.waker());
        // An overflowed connection's frames are not written: only the close that follows.
        let overflowed = shared.overflowed.load(Ordering::Acquire);
        let mut state = shared.lock();
        // The chunk's exact size first: one allocation, no growth.
        let mut size = 0usize;
        let mut count = 0usize;
        for out in &state.frames {
            if size >= CHUNK_BYTES {
                break;
            }
            let len = match out {
                Out::Frame(_) | Out::Event(..) if overflowed => 0,
                Out::Frame(f) | Out::Event(f, _) => frame_len(f.len()),
                Out::Ping => frame_len(0),
                Out::Close(_, why) => frame_len(close_reason(why).len().saturating_add(2)),
            };
            size = size.saturating_add(len);
            count = count.saturating_add(1);
        }
        if count == 0 {
            if state.frames.capacity() > KEEP_SLOTS {
                state.frames = VecDeque::new();
            }
            drop(state);
            if shared.closed.load(Ordering::Acquire) {
                this.done = true;
                return Poll::Ready(None);
            }
            return Poll::Pending;
        }
        let mut buf = BytesMut::with_capacity(size);
        let mut written = 0usize;
        let mut closed = false;
        let mut now = None;
        for _ in 0..count {
            let Some(out) = state.frames.pop_front() else {
                break;
            };
            let (frame, received_at) = match out {
                Out::Frame(frame) => (frame, None),
                Out::Event(frame, received_at) => (frame, Some(received_at)),
                Out::Ping => {
                    Parser::write_message(&mut buf, b"", OpCode::Ping, true, false);
                    continue;
                }
                Out::Close(code, why) => {
                    Parser::write_close(&mut buf, Some(reason(code, close_reason(why))), false);
                    closed = true;
                    break;
                }
            };
            written = written.saturating_add(frame.len());
            if overflowed {
                continue;
            }
            Parser::write_message(&mut buf, frame.as_bytes(), OpCode::Text, true, false);
            if let Some(received_at) = received_at {
                let now = *now.get_or_insert_with(voicerooms_contract::now_ms);
                this.latency
                    .observe(now.saturating_sub(received_at) as f64 / 1000.0);
            }
        }
        state.queued = state.queued.saturating_sub(written);
        let more = !state.frames.is_empty();
        if !more && state.frames.capacity() > KEEP_SLOTS {
            // A drained burst gives its memory back at once.
            state.frames = VecDeque::new();
        }
        drop(state);
        if written > 0 {
            shared.total.dec_by(written as i64);
        }
        if closed {
            this.done = true;
            shared.close_written.store(true, Ordering::Release);
            shared.task.wake();
        }
        if buf.is_empty() {
            // Only an overflowed connection's frames were dropped: nothing to write yet.
            if more {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(buf.freeze())))
    }
}

impl Drop for OutboxBody {
    /// The dispatcher dropped the body: the connection is gone (or its close was written).
    fn drop(&mut self) {
        self.shared.gone.store(true, Ordering::Release);
        self.shared.task.wake();
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

    /// What a client reads: a frame's opcode and payload.
    #[derive(Debug, PartialEq, Eq)]
    enum Read {
        Text(String),
        Ping,
        Close(u16, String),
    }

    fn new_body(inbox: &Inbox) -> OutboxBody {
        inbox.body(Histogram::new([0.001, 1.0]), BoxBody::new(()))
    }

    /// Polls the body once; `Some(frames)` for a chunk, `None` for pending, panics at its end.
    fn poll(body: &mut OutboxBody) -> Option<Vec<Read>> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match Pin::new(body).poll_next(&mut cx) {
            Poll::Pending => None,
            Poll::Ready(Some(Ok(chunk))) => Some(decode(&chunk)),
            Poll::Ready(None) => panic!("the body ended"),
        }
    }

    fn ended(body: &mut OutboxBody) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        matches!(Pin::new(body).poll_next(&mut cx), Poll::Ready(None))
    }

    fn decode(chunk: &[u8]) -> Vec<Read> {
        let mut buf = BytesMut::from(chunk);
        let mut frames = Vec::new();
        while let Some((fin, op, payload)) = Parser::parse(&mut buf, false, 1_048_576).unwrap() {
            assert!(fin);
            let payload = payload.unwrap_or_default();
            frames.push(match op {
                OpCode::Text => Read::Text(String::from_utf8(payload.to_vec()).unwrap()),
                OpCode::Ping => Read::Ping,
                OpCode::Close => Read::Close(
                    u16::from_be_bytes([payload[0], payload[1]]),
                    String::from_utf8(payload[2..].to_vec()).unwrap(),
                ),
                other => panic!("{other:?}"),
            });
        }
        assert!(buf.is_empty(), "whole frames only");
        frames
    }

    fn event(inbox: &mut Inbox) -> Poll<Wrote> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        inbox.poll_event(&mut cx)
    }

    #[test]
    fn the_queue_is_bounded_by_bytes() {
        let total = Gauge::default();
        let (outbox, mut inbox) = outbox(10, total.clone());
        let mut body = new_body(&inbox);
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
        assert_eq!(event(&mut inbox), Poll::Ready(Wrote::Overflowed));
        assert_eq!(event(&mut inbox), Poll::Pending, "reported once");
        assert_eq!(poll(&mut body), None, "an overflowed queue is not written");
        assert_eq!(total.get(), 0);
        inbox.clear();
        assert_eq!(total.get(), 0);
        assert!(
            outbox.control(Out::Close(1008, "slow")),
            "the close still goes"
        );
        assert_eq!(
            poll(&mut body),
            Some(vec![Read::Close(1008, "slow".into())])
        );
        assert_eq!(event(&mut inbox), Poll::Ready(Wrote::Closed));
        assert!(ended(&mut body));
        drop((outbox, inbox));
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn queued_frames_go_out_in_order_in_one_chunk_and_the_memory_comes_back() {
        let total = Gauge::default();
        let (outbox, mut inbox) = outbox(1_048_576, total.clone());
        let mut body = new_body(&inbox);
        assert_eq!(poll(&mut body), None, "nothing queued");
        for i in 0..20 {
            assert!(outbox.push_event(&ByteString::from(format!("f{i:02}")), 1));
        }
        assert!(outbox.control(Out::Ping));
        assert_eq!(total.get(), 60);
        let want: Vec<Read> = (0..20)
            .map(|i| Read::Text(format!("f{i:02}")))
            .chain([Read::Ping])
            .collect();
        assert_eq!(poll(&mut body), Some(want), "one chunk for what is queued");
        assert_eq!(total.get(), 0);
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(
            inbox.shared.lock().frames.capacity(),
            0,
            "a drained burst gives its memory back"
        );
        assert_eq!(poll(&mut body), None);
        assert!(outbox.push(&ByteString::from_static("x")));
        assert_eq!(poll(&mut body), Some(vec![Read::Text("x".into())]));
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
        // Frames of every header size, and more than one chunk's worth.
        let sizes = [125, 126, 65_535, 65_536, 3, 40_000];
        for size in sizes {
            assert!(outbox.push(&ByteString::from("y".repeat(size))));
        }
        let mut read = Vec::new();
        let mut chunks = 0u32;
        while let Some(frames) = poll(&mut body) {
            read.extend(frames);
            chunks = chunks.saturating_add(1);
        }
        let lens: Vec<usize> = read
            .iter()
            .map(|r| match r {
                Read::Text(t) => t.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lens, sizes);
        assert!(chunks > 1, "a chunk stops past {CHUNK_BYTES} bytes");
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn a_kick_and_a_close_end_the_writing_and_the_first_kick_wins() {
        let (outbox, mut inbox) = outbox(1000, Gauge::default());
        let mut body = new_body(&inbox);
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
        assert_eq!(event(&mut inbox), Poll::Ready(Wrote::Kicked(first)));
        assert_eq!(event(&mut inbox), Poll::Pending, "taken once");
        assert!(outbox.push(&ByteString::from_static("bye")));
        assert!(outbox.control(Out::Close(4003, "a")));
        assert!(outbox.push(&ByteString::from_static("after")));
        assert_eq!(
            poll(&mut body),
            Some(vec![
                Read::Text("bye".into()),
                Read::Close(4003, "a".into())
            ]),
            "the frame, then the close; nothing after"
        );
        assert_eq!(event(&mut inbox), Poll::Ready(Wrote::Closed));
        assert!(ended(&mut body));
        drop(body);
        assert_eq!(event(&mut inbox), Poll::Ready(Wrote::Closed));
    }

    #[test]
    fn the_body_ends_with_the_task_and_the_task_learns_when_the_socket_is_gone() {
        let (outbox, inbox) = outbox(1000, Gauge::default());
        let mut body = new_body(&inbox);
        assert!(outbox.push(&ByteString::from_static("late")));
        drop(inbox);
        assert!(ended(&mut body), "the task ended: the body ends");
        assert!(!outbox.push(&ByteString::from_static("x")));

        let (_outbox, mut inbox) = super::outbox(1000, Gauge::default());
        let body = new_body(&inbox);
        assert_eq!(event(&mut inbox), Poll::Pending);
        drop(body);
        assert_eq!(event(&mut inbox), Poll::Ready(Wrote::Gone));
    }

    #[test]
    fn a_long_close_reason_is_cut_at_a_character_boundary() {
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(
            cut.len() <= MAX_CLOSE_REASON_BYTES
                && cut.len() >= MAX_CLOSE_REASON_BYTES.saturating_sub(1)
        );
        assert!(long.starts_with(cut));
        assert_eq!(close_reason("short"), "short");
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
