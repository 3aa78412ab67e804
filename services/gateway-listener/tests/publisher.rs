//! The publisher's window against a fake JetStream: a private nats-server *without* the `ROOMS`
//! stream, where the test itself answers each publish (a JetStream publish is a request whose
//! reply is the ack), so it decides which publishes are answered, when, and which never are.
//! That makes the window's rules observable: several events in flight, never two of one room
//! or one user, a failed one re-sent only after the window is answered, the `Voicerooms-After`
//! header, and a checkpoint that only covers dispatches stored in full.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Message;
use futures::StreamExt;
use gateway_listener::metrics::Metrics;
use gateway_listener::publisher::{self, Batch, SessionInfo, Shadow, SharedShadow, AFTER_HEADER};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicerooms_contract::event::{Event, UserRef, VoiceJoined};
use voicerooms_contract::{GuildId, RoomEvent, RoomId, UserId};
use voicerooms_testkit::NatsServer;

const GUILD: u64 = 1 << 22;

fn event(session: &str, seq: u64, room: u64, user: u64) -> RoomEvent {
    let mut e = RoomEvent::new(
        GuildId::new(GUILD).unwrap(),
        RoomId::new(room).unwrap(),
        1,
        Event::VoiceJoined(VoiceJoined {
            user: UserRef {
                id: UserId::new(user).unwrap(),
                username: format!("user{user}"),
                global_name: None,
                avatar: None,
            },
            flags: Default::default(),
            moved_from: None,
        }),
    );
    e.id = Some(format!("{session}:{seq}:voice.joined-{room}-{user}"));
    e
}

struct Fixture {
    _nats: NatsServer,
    client: async_nats::Client,
    requests: async_nats::Subscriber,
    tx: Option<mpsc::Sender<Batch>>,
    shadow: SharedShadow,
    session: Arc<SessionInfo>,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Fixture {
    async fn start(in_flight: usize, ack_timeout: Duration) -> Self {
        let nats = NatsServer::start().await;
        let client = nats.client().await;
        let requests = client.subscribe("rooms.>").await.unwrap();
        client.flush().await.unwrap();
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(ack_timeout);
        let (tx, rx) = mpsc::channel(1000);
        let shadow: SharedShadow = Arc::new(Mutex::new(Shadow::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(publisher::run(
            js,
            rx,
            shadow.clone(),
            Metrics::default().shard(0),
            stop.clone(),
            in_flight,
        ));
        Self {
            _nats: nats,
            client,
            requests,
            tx: Some(tx),
            shadow,
            session: Arc::new(SessionInfo {
                session_id: "s1".into(),
                resume_url: "ws://resume".into(),
            }),
            task,
            stop,
        }
    }

    async fn dispatch(&self, seq: u64, events: Vec<RoomEvent>) {
        let batch = Batch {
            session: self.session.clone(),
            seq,
            events,
        };
        self.tx.as_ref().unwrap().send(batch).await.unwrap();
    }

    /// The next publish the fake stream receives (fails the test after 10 s).
    async fn next_request(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(10), self.requests.next())
            .await
            .expect("a publish within 10 s")
            .expect("subscription open")
    }

    /// No publish arrives within `d` (the publisher is holding one back).
    async fn no_request_within(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.requests.next()).await.is_err()
    }

    async fn ack(&self, request: &Message, seq: u64) {
        let reply = request
            .reply
            .clone()
            .expect("a JetStream publish has a reply subject");
        let body = format!(r#"{{"stream":"ROOMS","seq":{seq}}}"#);
        self.client.publish(reply, body.into()).await.unwrap();
        self.client.flush().await.unwrap();
    }

    fn checkpoint(&self) -> (u64, u64) {
        let s = self.shadow.lock().unwrap();
        (s.seq, s.stream_seq)
    }

    async fn wait_checkpoint(&self, want_seq: u64) -> (u64, u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.checkpoint();
            if c.0 >= want_seq {
                return c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "checkpoint stuck at {c:?}, want dispatch {want_seq}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(mut self) {
        drop(self.tx.take());
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("publisher ends once its queue is closed and empty")
            .unwrap();
    }
}

fn id(m: &Message) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

fn after(m: &Message) -> Option<String> {
    m.headers
        .as_ref()
        .and_then(|h| h.get(AFTER_HEADER))
        .map(|v| v.as_str().to_owned())
}

#[tokio::test]
async fn events_of_different_rooms_and_users_are_in_flight_together_in_dispatch_order() {
    let mut f = Fixture::start(8, Duration::from_secs(5)).await;
    // Ten dispatches, each one user joining their own room.
    for seq in 1..=10u64 {
        f.dispatch(seq, vec![event("s1", seq, 100 + seq, 1000 + seq)])
            .await;
    }
    // The first eight arrive before any is answered (the window), in dispatch order, each
    // naming the one sent before it.
    let mut first = Vec::new();
    for _ in 0..8 {
        first.push(f.next_request().await);
    }
    let ids: Vec<String> = first.iter().map(id).collect();
    let want: Vec<String> = (1..=8u64)
        .map(|s| format!("s1:{s}:voice.joined-{}-{}", 100 + s, 1000 + s))
        .collect();
    assert_eq!(ids, want);
    assert_eq!(after(&first[0]), None);
    for i in 1..8 {
        assert_eq!(after(&first[i]), Some(ids[i - 1].clone()));
    }
    assert!(
        f.no_request_within(Duration::from_millis(300)).await,
        "a ninth event while eight are unanswered"
    );
    assert_eq!(
        f.checkpoint().0,
        0,
        "nothing acknowledged, nothing checkpointed"
    );

    // Answering the first lets the ninth go.
    f.ack(&first[0], 1).await;
    let ninth = f.next_request().await;
    assert_eq!(id(&ninth), "s1:9:voice.joined-109-1009");
    // Dispatch 2 was sent before 1 was acknowledged, so it may be stored anywhere above 0: the
    // checkpoint of dispatch 1 may not claim position 1.
    assert_eq!(f.wait_checkpoint(1).await, (1, 0));
    for (i, m) in first.iter().enumerate().skip(1) {
        f.ack(m, i as u64 + 1).await;
    }
    f.ack(&ninth, 9).await;
    let tenth = f.next_request().await;
    f.ack(&tenth, 10).await;
    assert_eq!(f.wait_checkpoint(10).await, (10, 10));
    f.finish().await;
}

#[tokio::test]
async fn an_event_waits_while_an_earlier_one_of_its_room_or_its_user_is_unanswered() {
    let mut f = Fixture::start(8, Duration::from_secs(5)).await;
    f.dispatch(1, vec![event("s1", 1, 100, 1000)]).await;
    f.dispatch(2, vec![event("s1", 2, 200, 2000)]).await;
    // Same room as dispatch 1.
    f.dispatch(3, vec![event("s1", 3, 100, 3000)]).await;
    // Unrelated, but behind dispatch 3: never overtakes it.
    f.dispatch(4, vec![event("s1", 4, 400, 4000)]).await;
    let one = f.next_request().await;
    let two = f.next_request().await;
    assert_eq!(id(&two), "s1:2:voice.joined-200-2000");
    assert!(
        f.no_request_within(Duration::from_millis(300)).await,
        "dispatch 3 shares dispatch 1's room and must wait for its answer; 4 must not overtake"
    );
    f.ack(&one, 1).await;
    let three = f.next_request().await;
    assert_eq!(id(&three), "s1:3:voice.joined-100-3000");
    let four = f.next_request().await;
    assert_eq!(id(&four), "s1:4:voice.joined-400-4000");
    // Same user as dispatch 4, other room.
    f.dispatch(5, vec![event("s1", 5, 500, 4000)]).await;
    assert!(
        f.no_request_within(Duration::from_millis(300)).await,
        "dispatch 5 shares dispatch 4's user"
    );
    f.ack(&two, 2).await;
    f.ack(&three, 3).await;
    f.ack(&four, 4).await;
    let five = f.next_request().await;
    assert_eq!(id(&five), "s1:5:voice.joined-500-4000");
    f.ack(&five, 5).await;
    assert_eq!(f.wait_checkpoint(5).await, (5, 5));
    f.finish().await;
}

#[tokio::test]
async fn a_lost_publish_is_resent_after_the_window_and_the_checkpoint_waits_for_it() {
    // Acks time out after 400 ms.
    let mut f = Fixture::start(8, Duration::from_millis(400)).await;
    for seq in 1..=4u64 {
        f.dispatch(seq, vec![event("s1", seq, 100 + seq, 1000 + seq)])
            .await;
    }
    let sent: Vec<Message> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(f.next_request().await);
        }
        v
    };
    // Dispatch 1's publish is lost (never answered); 2-4 are stored at 11-13.
    for (i, m) in sent.iter().enumerate().skip(1) {
        f.ack(m, 10 + i as u64).await;
    }
    // Once its ack times out it is re-sent, alone, with the same id.
    let resent = f.next_request().await;
    assert_eq!(
        id(&resent),
        id(&sent[0]),
        "the lost event is re-sent first, same id"
    );
    assert_eq!(after(&resent), None, "re-sent alone");
    assert_eq!(
        f.checkpoint().0,
        0,
        "dispatch 1 is not stored yet: no checkpoint"
    );
    // A fifth dispatch arriving now waits until the lost one is stored.
    f.dispatch(5, vec![event("s1", 5, 105, 1005)]).await;
    assert!(
        f.no_request_within(Duration::from_millis(200)).await,
        "nothing else while the lost one is retried"
    );
    f.ack(&resent, 14).await;
    let five = f.next_request().await;
    assert_eq!(id(&five), "s1:5:voice.joined-105-1005");
    // Dispatches 1-4 stored: the position covers 4 (and dispatch 5 is sent after 14).
    assert_eq!(f.wait_checkpoint(4).await, (4, 14));
    f.ack(&five, 15).await;
    assert_eq!(f.wait_checkpoint(5).await, (5, 15));
    f.finish().await;
}

#[tokio::test]
async fn the_checkpoint_position_stays_below_every_event_of_a_later_dispatch() {
    let mut f = Fixture::start(8, Duration::from_secs(5)).await;
    // Dispatch 1 has two events, dispatch 2 one.
    f.dispatch(
        1,
        vec![event("s1", 1, 100, 1000), event("s1", 1, 101, 1001)],
    )
    .await;
    f.dispatch(2, vec![event("s1", 2, 200, 2000)]).await;
    let a = f.next_request().await;
    let b = f.next_request().await;
    let c = f.next_request().await;
    assert_eq!(id(&c), "s1:2:voice.joined-200-2000");
    // Dispatch 1's events are stored at 21 and 22; dispatch 2's event, sent before either was
    // acknowledged, is still unanswered: the stream may hold it anywhere above 0 (say at 20).
    f.ack(&a, 21).await;
    f.ack(&b, 22).await;
    // So the checkpoint of dispatch 1 may not claim 22: a standby replaying after it would
    // miss dispatch 2's event.
    assert_eq!(f.wait_checkpoint(1).await, (1, 0));
    f.ack(&c, 20).await;
    assert_eq!(f.wait_checkpoint(2).await, (2, 22));
    f.finish().await;
}

/// A new holder reading the stream after the checkpoint: a stored event naming a missing one
/// (a publish lost in an outage, the old holder dead before its re-send) means the session
/// must not be resumed after the last stored dispatch — that would skip the lost event — so
/// it identifies and converges against what was stored. Without the hole it resumes as before.
#[tokio::test]
async fn a_takeover_finding_a_lost_publish_identifies_instead_of_resuming() {
    use gateway_listener::publisher::Checkpoint;
    use gateway_listener::takeover;
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    voicerooms_platform::nats::ensure_rooms_stream(&js, &Default::default())
        .await
        .unwrap();
    let session = SessionInfo {
        session_id: "s1".into(),
        resume_url: "ws://resume".into(),
    };
    let checkpoint = |stream_seq| Checkpoint {
        session: Some(session.clone()),
        seq: 10,
        voice: vec![],
        at: 0,
        stream_seq,
        holder: String::new(),
        token: 0,
    };
    async fn store(js: &async_nats::jetstream::Context, e: &RoomEvent, after: Option<&str>) -> u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", e.id.clone().unwrap().as_str());
        if let Some(after) = after {
            headers.insert(AFTER_HEADER, after);
        }
        js.publish_with_headers(e.subject(), headers, e.encode().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    // Whole: dispatch 11 stored, then 12 naming it.
    let before = store(&js, &event("s1", 9, 900, 9000), None).await;
    store(&js, &event("s1", 11, 101, 1011), None).await;
    store(
        &js,
        &event("s1", 12, 102, 1012),
        Some("s1:11:voice.joined-101-1011"),
    )
    .await;
    let whole = takeover::restore(&js, Some(checkpoint(before)), 0, 1)
        .await
        .unwrap();
    assert_eq!(whole.session.as_ref(), Some(&session), "no hole: resumed");
    assert_eq!(
        whole.seq, 11,
        "from the dispatch before the last stored one"
    );
    assert_eq!(whole.replayed, 2);

    // Hole: dispatch 14 stored, naming dispatch 13's event, which never was.
    let before = store(&js, &event("s1", 9, 901, 9001), None).await;
    store(
        &js,
        &event("s1", 14, 104, 1014),
        Some("s1:13:voice.joined-103-1013"),
    )
    .await;
    let hole = takeover::restore(&js, Some(checkpoint(before)), 0, 1)
        .await
        .unwrap();
    assert_eq!(
        hole.session, None,
        "a lost publish: identify, do not resume"
    );
    assert_eq!(
        hole.replayed, 1,
        "what was stored is still the state converged against"
    );
}
