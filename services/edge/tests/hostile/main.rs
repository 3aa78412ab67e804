//! No panic reachable from input, tried from outside (issue 14): a running edge process gets well
//! over 10,000 random and hostile WebSocket frames and HTTP requests — deep nesting, huge numbers,
//! invalid UTF-8, multi-byte text at every length, wrong types, fragments, oversize frames,
//! garbage cookies, queries and headers — while honest clients follow a room. Afterwards: no
//! panic in its log or its panic file, the process alive, every connection slot returned, and the
//! honest clients got every event of their room, in order.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects,
    clippy::unreachable
)]

#[path = "../ws/helpers.rs"]
mod helpers;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use edge::session::{SessionStore, StoredSession};
use futures::{SinkExt, StreamExt};
use helpers::{seqs, user, Client, World, SESSION_KEY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use voicerooms_contract::UserRef;
use voicerooms_platform::nats::LazyBucket;
use voicerooms_testkit::{free_port, wait_until, NatsServer, ServiceProcess};

const ROOM: u64 = 77;
const FRAMES: usize = 12_000;
const REQUESTS: usize = 2_000;
const SENDERS: usize = 6;

/// Sessions made as the edge makes them (same bucket, same key).
async fn sign_in(nats: &NatsServer, who: &UserRef) -> String {
    let js = jetstream::new(nats.client().await);
    let store = SessionStore::new(
        Arc::new(LazyBucket::new(js, "sessions", 1, 1)),
        cookie::Key::derive_from(SESSION_KEY.as_bytes()),
        "vr_session".into(),
    );
    let now = voicerooms_contract::now_ms();
    store
        .create(&StoredSession {
            v: 1,
            user: who.clone(),
            access_token: "hostile-test-access".into(),
            refresh_token: "hostile-test-refresh".into(),
            access_expires_at: now + 3_600_000,
            scope: "identify guilds.join".into(),
            created_at: now,
            expires_at: now + 3_600_000,
            refreshing_until: None,
        })
        .await
        .unwrap()
}

/// Text of `n` characters drawn from every UTF-8 width, controls and quotes included.
fn text(rng: &mut StdRng, n: usize) -> String {
    const PICK: [char; 10] = [
        'a',
        'é',
        '€',
        '😀',
        '\u{1D4D0}',
        '"',
        '\\',
        '\u{0}',
        '\n',
        '}',
    ];
    (0..n)
        .map(|_| {
            if rng.random_bool(0.1) {
                rng.random::<char>()
            } else {
                PICK[rng.random_range(0..PICK.len())]
            }
        })
        .collect()
}

/// A hostile JSON value.
fn value(rng: &mut StdRng, depth: usize) -> Value {
    match rng.random_range(0..12) {
        0 => json!(u64::MAX),
        1 => json!(-1),
        2 => json!(rng.random::<f64>() * 1e300),
        3 => json!(rng.random::<i64>()),
        4 => Value::Null,
        5 => json!(true),
        6 => json!("18446744073709551616"),
        7 => {
            let n = rng.random_range(0..300);
            json!(text(rng, n))
        }
        8 if depth < 3 => Value::Array((0..3).map(|_| value(rng, depth + 1)).collect()),
        9 if depth < 3 => json!({"room": value(rng, depth + 1), "since": value(rng, depth + 1)}),
        10 => json!(ROOM.to_string()),
        _ => json!(rng.random::<u64>()),
    }
}

/// One hostile frame. `true` when the edge is expected to close the connection after it.
fn hostile_frame(rng: &mut StdRng) -> (Vec<Message>, bool) {
    let kinds = ["auth", "subscribe", "unsubscribe", "ping"];
    let text_frame = |s: String| vec![Message::Text(s)];
    match rng.random_range(0..100) {
        // Closing ones, rare so that most frames reach the protocol decoder.
        0 => {
            // Invalid UTF-8, sometimes split across fragments.
            let mut bytes = br#"{"v":1,"type":"ping"}"#.to_vec();
            let at = rng.random_range(0..bytes.len());
            bytes.insert(at, [0xff, 0xc3, 0xed, 0x80][rng.random_range(0..4)]);
            if rng.random_bool(0.5) {
                let (a, b) = bytes.split_at(at);
                (
                    vec![
                        Message::Frame(Frame::message(a.to_vec(), OpCode::Data(Data::Text), false)),
                        Message::Frame(Frame::message(
                            b.to_vec(),
                            OpCode::Data(Data::Continue),
                            true,
                        )),
                    ],
                    true,
                )
            } else {
                (
                    vec![Message::Frame(Frame::message(
                        bytes,
                        OpCode::Data(Data::Text),
                        true,
                    ))],
                    true,
                )
            }
        }
        1 => (text_frame("x".repeat(17 * 1024)), true),
        // Deep nesting.
        2..=7 => {
            let depth = rng.random_range(1..5_000);
            (
                text_frame(format!(
                    r#"{{"v":1,"type":"subscribe","payload":{}{}}}"#,
                    "[".repeat(depth),
                    "]".repeat(depth)
                )),
                false,
            )
        }
        // Multi-byte text of every length in every field.
        8..=35 => {
            let n = rng.random_range(0..400);
            let t = text(rng, n);
            let frame = match rng.random_range(0..5) {
                0 => {
                    json!({"v":1,"type":"subscribe","payload":{"room":ROOM.to_string(),"since":t}})
                }
                1 => json!({"v":1,"type":"subscribe","payload":{"room":t}}),
                2 => json!({"v":1,"type":t}),
                3 => {
                    json!({"v":1,"type":"subscribe","payload":{"room":ROOM.to_string(),"since":1,"epoch":t}})
                }
                _ => json!({"v":1,"type":"auth","payload":{"session":t}}),
            };
            (text_frame(frame.to_string()), false)
        }
        // Right shape, hostile values: huge sinces, other epochs, rooms of others.
        36..=60 => {
            let since =
                [0, 1, u64::MAX, u64::MAX - 1, 1 << 53, rng.random()][rng.random_range(0..6)];
            let epoch = ["1", "0", "18446744073709551615", "01", ""][rng.random_range(0..5)];
            let room = [ROOM, ROOM + 1, 1, u64::MAX][rng.random_range(0..4)];
            let frame = if rng.random_bool(0.5) {
                json!({"v":1,"type":"subscribe","payload":{"room":room.to_string(),"since":since,"epoch":epoch}})
            } else {
                json!({"v":1,"type":"unsubscribe","payload":{"room":room.to_string()}})
            };
            (text_frame(frame.to_string()), false)
        }
        // Wrong types anywhere.
        61..=80 => {
            let frame = json!({
                "v": value(rng, 0),
                "type": if rng.random_bool(0.7) { json!(kinds[rng.random_range(0..4)]) } else { value(rng, 0) },
                "payload": value(rng, 0),
            });
            (text_frame(frame.to_string()), false)
        }
        // Not JSON at all.
        81..=90 => {
            let n = rng.random_range(0..500);
            (text_frame(text(rng, n)), false)
        }
        91..=94 => (
            vec![Message::Binary(
                (0..rng.random_range(0..300))
                    .map(|_| rng.random())
                    .collect(),
            )],
            false,
        ),
        95..=97 => (
            vec![Message::Ping(
                (0..rng.random_range(0..125))
                    .map(|_| rng.random())
                    .collect(),
            )],
            false,
        ),
        _ => (text_frame(json!({"v":1,"type":"ping"}).to_string()), false),
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(port: u16, cookie: Option<&str>) -> Option<Socket> {
    let mut request = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "Origin",
        format!("http://127.0.0.1:{port}").parse().unwrap(),
    );
    if let Some(cookie) = cookie {
        headers.insert("Cookie", format!("vr_session={cookie}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .ok()
        .map(|(s, _)| s)
}

/// One sender: connections (authenticated or not) that get hostile frames until `frames` were
/// sent; each connection's answers are drained so the edge's queue never decides the outcome.
async fn send_frames(port: u16, cookie: String, seed: u64, frames: usize, sent: Arc<AtomicUsize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut done = 0;
    while done < frames {
        let authed = rng.random_bool(0.8);
        let Some(socket) = open(port, authed.then_some(cookie.as_str())).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (mut sink, mut stream) = socket.split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        // A connection lives for a random number of frames, then vanishes or closes.
        let life = rng.random_range(1..400);
        for _ in 0..life {
            let (messages, closes) = hostile_frame(&mut rng);
            let mut broken = false;
            for message in messages {
                if sink.send(message).await.is_err() {
                    broken = true;
                    break;
                }
            }
            done += 1;
            sent.fetch_add(1, Ordering::Relaxed);
            if broken || closes || done >= frames {
                break;
            }
        }
        if rng.random_bool(0.5) {
            let _ = sink.close().await;
        }
        drop(sink);
        drain.abort();
    }
}

/// Hostile HTTP requests: bodies, paths, queries, cookies and headers.
async fn send_requests(
    port: u16,
    cookie: String,
    seed: u64,
    requests: usize,
    sent: Arc<AtomicUsize>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..requests {
        let n = rng.random_range(0..300);
        let t = text(&mut rng, n);
        let enc = urlencoding::encode(&t).into_owned();
        let body: Vec<u8> = match rng.random_range(0..6) {
            0 => (0..rng.random_range(0..600)).map(|_| rng.random()).collect(),
            1 => json!({"name": t}).to_string().into_bytes(),
            2 => json!({"invite": t, "room": value(&mut rng, 0)}).to_string().into_bytes(),
            3 => {
                let mut o = serde_json::Map::new();
                o.insert(t.clone(), value(&mut rng, 0));
                Value::Object(o).to_string().into_bytes()
            }
            4 => format!("{}{}", "[".repeat(n * 10), "]".repeat(n * 10)).into_bytes(),
            _ => json!({"name": "ok", "guild": value(&mut rng, 0), "idempotency_key": value(&mut rng, 0)})
                .to_string()
                .into_bytes(),
        };
        let cookie_header = match rng.random_range(0..4) {
            0 => format!("vr_session={cookie}"),
            1 => format!("vr_session={enc}"),
            2 => format!("vr_session={cookie}; vr_oauth={enc}"),
            _ => enc.clone(),
        };
        let request = match rng.random_range(0..7) {
            0 => http.post(format!("{base}/api/rooms")).body(body),
            1 => http.post(format!("{base}/api/rooms/join")).body(body),
            2 => http
                .post(format!("{base}/api/rooms/{enc}/{enc}"))
                .body(body),
            3 => http.get(format!("{base}/auth/login?return_to={enc}")),
            4 => http.get(format!(
                "{base}/auth/callback?code={enc}&state={enc}&error={enc}"
            )),
            5 => http.get(format!("{base}/api/rooms/{enc}")),
            _ => http.get(format!("{base}/api/me")),
        };
        let mut request = request.header("Content-Type", "application/json").header(
            "Origin",
            if rng.random_bool(0.8) {
                base.clone()
            } else {
                "null".into()
            },
        );
        if let Ok(cookie) = reqwest::header::HeaderValue::from_str(&cookie_header) {
            request = request.header("Cookie", cookie);
        }
        if let Ok(value) = reqwest::header::HeaderValue::from_bytes(t.as_bytes()) {
            request = request.header("X-Return-To", value);
        }
        let answer = request.send().await;
        // Every request gets an answer (a dropped connection would be a crashed handler).
        let answer = answer.unwrap_or_else(|e| panic!("no answer: {e}"));
        assert_ne!(
            answer.status().as_u16(),
            500,
            "an internal error for hostile input"
        );
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        let (series, value) = line.split_once(' ')?;
        (series == name).then(|| value.trim().parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_frames_and_bodies_leave_the_edge_alive_and_its_clients_served() {
    let nats = NatsServer::start().await;
    let world = World::new(&nats).await;
    let (alice, bob, mallory) = (user(1), user(2), user(3));
    world.put_room(ROOM, &[alice.clone(), bob.clone()], 0).await;
    world
        .put_room(ROOM + 1, std::slice::from_ref(&alice), 0)
        .await;
    let panic_file = tempfile::NamedTempFile::new().unwrap();
    let port = free_port();
    let mut edge = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_edge"),
        &[
            ("VOICEROOMS__NATS__URL", nats.url()),
            ("VOICEROOMS__HTTP__PORT", port.to_string()),
            ("VOICEROOMS__SESSION__KEY", SESSION_KEY.to_owned()),
            ("VOICEROOMS__LOG__FORMAT", "json".to_owned()),
            ("VOICEROOMS__WEBSOCKET__AUTH_TIMEOUT_MS", "1000".to_owned()),
            ("VOICEROOMS__EDGE__REQUEST_TIMEOUT_MS", "200".to_owned()),
            (
                "VOICEROOMS_PANIC_LOG",
                panic_file.path().display().to_string(),
            ),
        ],
    );
    wait_until(Duration::from_secs(30), "the edge ready", || async {
        voicerooms_testkit::conformance::status_of(&format!("http://127.0.0.1:{port}/readyz")).await
            == Some(200)
    })
    .await;

    // Honest clients follow the room while events are published throughout.
    let honest_cookie = sign_in(&nats, &alice).await;
    let mut honest = Vec::new();
    for _ in 0..3 {
        let mut client = Client::authed(&format!("ws://127.0.0.1:{port}/ws"), &honest_cookie).await;
        let ack = client.subscribe(ROOM, None).await;
        assert_eq!(ack["event"], "subscribed", "{ack}");
        honest.push(client);
    }
    let published = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let (published, stop) = (published.clone(), stop.clone());
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut joined = true;
            while !stop.is_cancelled() {
                let seq = world.voice(ROOM, &alice, joined).await;
                published.lock().unwrap().push(seq);
                joined = !joined;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            world
        })
    };

    // The attack: members and a stranger, authenticated or not.
    let frames = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for i in 0..SENDERS {
        let who = [&bob, &mallory][i % 2];
        let cookie = sign_in(&nats, who).await;
        attackers.push(tokio::spawn(send_frames(
            port,
            cookie.clone(),
            i as u64,
            FRAMES / SENDERS,
            frames.clone(),
        )));
        attackers.push(tokio::spawn(send_requests(
            port,
            cookie,
            100 + i as u64,
            REQUESTS / SENDERS,
            requests.clone(),
        )));
    }
    for attacker in attackers {
        attacker.await.unwrap();
    }
    stop.cancel();
    let _world = publisher.await.unwrap();
    let sent = (
        frames.load(Ordering::Relaxed),
        requests.load(Ordering::Relaxed),
    );
    println!("HOSTILE {} frames and {} requests sent", sent.0, sent.1);
    assert!(sent.0 + sent.1 >= 10_000);

    // The honest clients got every event of their room, in order, and nothing else.
    let published = published.lock().unwrap().clone();
    for client in &mut honest {
        let events = client.events(published.len()).await;
        assert_eq!(seqs(&events), published, "every event, in order");
        client.send(json!({"v":1,"type":"ping"})).await;
        assert_eq!(client.next_json().await["event"], "pong");
    }
    // Every hostile connection's slot came back: only the honest ones are open.
    wait_until(
        Duration::from_secs(30),
        "hostile connections gone",
        || async { metric(port, "voicerooms_edge_connections").await == Some(3.0) },
    )
    .await;
    drop(honest);
    wait_until(Duration::from_secs(30), "connections back to 0", || async {
        metric(port, "voicerooms_edge_connections").await == Some(0.0)
    })
    .await;
    // The per-user slots too: the attackers' users can open their full allowance again.
    let bob_cookie = sign_in(&nats, &bob).await;
    let mut again = Vec::new();
    for _ in 0..20 {
        again.push(Client::authed(&format!("ws://127.0.0.1:{port}/ws"), &bob_cookie).await);
    }
    drop(again);

    // Alive, and no panic anywhere.
    assert!(
        edge.wait_exit(Duration::from_millis(100)).await.is_none(),
        "the edge exited:\n{}",
        edge.output()
    );
    let output = edge.output();
    assert!(
        !output.contains("panicked"),
        "a panic in the log:\n{output}"
    );
    let panics = std::fs::read_to_string(panic_file.path()).unwrap();
    assert!(panics.is_empty(), "panics recorded:\n{panics}");
    println!(
        "HOSTILE bad frames counted {:?}",
        metric(port, "voicerooms_edge_bad_frames_total").await
    );
}
