//! Edge benchmarks (not tests). Starts a private nats-server and the release `edge` binary, then
//! drives it over real sockets from this process. Results: docs/BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p edge --bins --examples
//! target/release/examples/edge_bench idle --connections 100000
//! target/release/examples/edge_bench fanout --rooms 2500 --clients 10000 --rate 1000 --seconds 20
//! target/release/examples/edge_bench fanout --rooms 20 --clients 2000 --rate 3000 --seconds 10   # throughput
//! target/release/examples/edge_bench slow --rooms 5 --clients 50 --rate 1000 --seconds 20
//! target/release/examples/edge_bench churn --connections 19000 --rounds 6 --settle 10
//! target/release/examples/edge_bench reads --rooms 25000 --rounds 6   # a subscribe's stream reads
//! ```
//!
//! `EDGE_BIN` runs another edge binary (e.g. a copy of the previous build, for side-by-side
//! runs); `LD_PRELOAD`, `MALLOC_CONF`, `_RJEM_MALLOC_CONF`, `MALLOC_ARENA_MAX` and `MIMALLOC_*`
//! are passed on to the edge (allocator experiments).
//!
//! Connections come from several 127.0.0.x source addresses (one source has ~28k ports) and
//! the open-file limit is raised inside the process (and inherited by the edge).

// A benchmark driver: a panic here (unwrap, expect, an index or an overflow) is a failed run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects,
    clippy::unreachable
)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use edge::session::{SessionStore, StoredSession};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use voicerooms_contract::command::{RoomMember, RoomState, RoomView};
use voicerooms_contract::event::{Event, JoinedVia, VoiceFlags, VoiceJoined};
use voicerooms_contract::{GuildId, RoleId, RoomEvent, RoomId, UserId, UserRef};
use voicerooms_platform::nats::{ensure_kv, ensure_rooms_stream, LazyBucket};
use voicerooms_testkit::{free_port, wait_until, NatsServer, ServiceProcess};

const KEY: &str = "bench-session-key-0123456789abcdef0123456789abcdef";
const GUILD: u64 = 200000000000000001;

struct Args {
    mode: String,
    connections: usize,
    rooms: usize,
    clients: usize,
    rate: u64,
    seconds: u64,
    workers: usize,
    rounds: usize,
    settle: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        mode: String::new(),
        connections: 10_000,
        rooms: 100,
        clients: 1_000,
        rate: 1_000,
        seconds: 10,
        workers: 2,
        rounds: 6,
        settle: 10,
    };
    let mut it = std::env::args().skip(1);
    args.mode = it.next().unwrap_or_else(|| usage());
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let n: u64 = value.parse().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--connections" => args.connections = n as usize,
            "--rooms" => args.rooms = n as usize,
            "--clients" => args.clients = n as usize,
            "--rate" => args.rate = n,
            "--seconds" => args.seconds = n,
            "--workers" => args.workers = n as usize,
            "--rounds" => args.rounds = n as usize,
            "--settle" => args.settle = n,
            _ => usage(),
        }
    }
    args
}

fn usage() -> ! {
    eprintln!("usage: bench idle|fanout|slow|churn|reads [--connections N] [--rooms N] [--clients N] [--rate EV/S] [--seconds S] [--workers N] [--rounds N] [--settle S]");
    std::process::exit(2)
}

/// Raises the open-file limit as far as allowed (the edge child inherits it).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if setrlimit(Resource::RLIMIT_NOFILE, 1_000_000, 1_000_000).is_err() {
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        eprintln!("open-file limit: {soft}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn user(n: u64) -> UserRef {
    UserRef {
        id: UserId::new(300000000000000000 + n).unwrap(),
        username: format!("u{n}"),
        global_name: None,
        avatar: None,
    }
}

struct Bench {
    _nats: NatsServer,
    edge: ServiceProcess,
    port: u16,
    js: jetstream::Context,
    cookie: String,
}

async fn setup(args: &Args, rooms: usize) -> Bench {
    raise_fd_limit();
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    ensure_rooms_stream(&js, &Default::default()).await.unwrap();
    let kv = ensure_kv(&js, "rooms", 1, 1).await.unwrap();
    // Every room has the one bench user as owner, so one session serves every connection.
    let owner = user(1);
    for r in 0..rooms {
        let view = RoomView {
            id: RoomId::new(1000 + r as u64).unwrap(),
            guild: GuildId::new(GUILD).unwrap(),
            name: format!("bench {r}"),
            owner: owner.clone(),
            role: RoleId::new(9).unwrap(),
            capacity: 4,
            state: RoomState::Open,
            members: vec![RoomMember {
                user: owner.clone(),
                via: JoinedVia::Owner,
                joined_at: 1,
            }],
            voice: vec![],
            created_at: 1,
            last_activity: 1,
            invite_expires_at: 2,
            closing_deadline: None,
            seq: 0,
        };
        kv.put(
            (1000 + r).to_string(),
            serde_json::to_vec(&view).unwrap().into(),
        )
        .await
        .unwrap();
    }
    let sessions = SessionStore::new(
        Arc::new(LazyBucket::new(js.clone(), "sessions", 1, 1)),
        cookie::Key::derive_from(KEY.as_bytes()),
        "vr_session".into(),
    );
    let now = voicerooms_contract::now_ms();
    let cookie = sessions
        .create(&StoredSession {
            v: 1,
            user: owner,
            access_token: "bench".into(),
            refresh_token: "bench".into(),
            access_expires_at: now + 3_600_000,
            scope: String::new(),
            created_at: now,
            expires_at: now + 3_600_000,
            refreshing_until: None,
        })
        .await
        .unwrap();
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let bin = std::env::var("EDGE_BIN").unwrap_or_else(|_| {
        let bin = exe.parent().unwrap().parent().unwrap().join("edge");
        bin.to_str().unwrap().to_owned()
    });
    eprintln!("edge binary: {bin}");
    let mut env = vec![
        ("VOICEROOMS__NATS__URL", nats.url()),
        ("VOICEROOMS__HTTP__PORT", port.to_string()),
        ("VOICEROOMS__HTTP__WORKERS", args.workers.to_string()),
        ("VOICEROOMS__LOG__LEVEL", "warn".into()),
        ("VOICEROOMS__SESSION__KEY", KEY.into()),
        (
            "VOICEROOMS__WEBSOCKET__MAX_CONNECTIONS_PER_USER",
            "1000000".into(),
        ),
        ("VOICEROOMS__WEBSOCKET__MAX_CONNECTIONS", "1000000".into()),
        ("VOICEROOMS__WEBSOCKET__AUTH_TIMEOUT_MS", "60000".into()),
        ("VOICEROOMS__NATS__SUBSCRIPTION_CAPACITY", "65536".into()),
    ];
    for (key, value) in std::env::vars() {
        if [
            "LD_PRELOAD",
            "MALLOC_CONF",
            "_RJEM_MALLOC_CONF",
            "MALLOC_ARENA_MAX",
        ]
        .contains(&key.as_str())
            || key.starts_with("MIMALLOC_")
        {
            eprintln!("edge environment: {key}={value}");
            env.push((leak(key), value));
        }
    }
    let edge = ServiceProcess::spawn(&bin, &env);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    wait_until(Duration::from_secs(30), "edge ready", || async {
        voicerooms_testkit::conformance::status_of(&readyz).await == Some(200)
    })
    .await;
    Bench {
        _nats: nats,
        edge,
        port,
        js,
        cookie,
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens one authenticated connection from source address 127.0.0.(1 + i % 16).
async fn connect(port: u16, cookie: &str, i: usize) -> anyhow::Result<Ws> {
    connect_with(port, cookie, i, None).await
}

/// `rcvbuf`: a small receive buffer makes a client that stops reading fill the edge's queue
/// quickly instead of the kernel's.
async fn connect_with(
    port: u16,
    cookie: &str,
    i: usize,
    rcvbuf: Option<u32>,
) -> anyhow::Result<Ws> {
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 16) as u8));
    let socket = TcpSocket::new_v4()?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket
        .connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://127.0.0.1:{port}/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("Cookie", format!("vr_session={cookie}").parse()?);
    request
        .headers_mut()
        .insert("Origin", format!("http://127.0.0.1:{port}").parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    // auth.ok
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("auth.ok") => Ok(ws),
        other => Err(anyhow::anyhow!("no auth.ok: {other:?}")),
    }
}

async fn subscribe(ws: &mut Ws, room: u64) -> anyhow::Result<()> {
    ws.send(Message::Text(format!(
        r#"{{"v":1,"type":"subscribe","payload":{{"room":"{room}"}}}}"#
    )))
    .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"subscribed\"") => return Ok(()),
            Some(Ok(Message::Text(t))) if t.contains("\"error\"") => {
                return Err(anyhow::anyhow!("subscribe failed: {t}"))
            }
            Some(Ok(_)) => continue,
            other => return Err(anyhow::anyhow!("subscribe: {other:?}")),
        }
    }
}

async fn idle(args: Args) {
    let bench = setup(&args, 0).await;
    let pid = bench.edge.pid();
    let before = rss_kib(pid);
    let started = Instant::now();
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let holders = Arc::new(Mutex::new(Vec::with_capacity(args.connections)));
    let limiter = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let permit = limiter.clone().acquire_owned().await.unwrap();
        let (cookie, port) = (bench.cookie.clone(), bench.port);
        let (opened, failed, holders) = (opened.clone(), failed.clone(), holders.clone());
        tasks.push(tokio::spawn(async move {
            match connect(port, &cookie, i).await {
                Ok(ws) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    holders.lock().unwrap().push(ws);
                }
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connect failed: {e}");
                    }
                }
            }
            drop(permit);
        }));
        if i % 10_000 == 9_999 {
            eprintln!(
                "{} connections, edge RSS {} MiB",
                i + 1,
                rss_kib(pid) / 1024
            );
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await; // let the edge settle before measuring
    let after = rss_kib(pid);
    let n = opened.load(Ordering::Relaxed);
    println!(
        "idle: {n} connections open ({} failed) in {:.1} s; edge RSS {} MiB → {} MiB; {:.2} KiB per connection",
        failed.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / n.max(1) as f64
    );
}

/// Opens `n` authenticated idle connections, 256 at a time; returns them and the failures.
async fn open_many(bench: &Bench, n: usize, offset: usize) -> (Vec<Ws>, usize) {
    let failed = Arc::new(AtomicUsize::new(0));
    let holders = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let limiter = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = limiter.clone().acquire_owned().await.unwrap();
        let (cookie, port) = (bench.cookie.clone(), bench.port);
        let (failed, holders) = (failed.clone(), holders.clone());
        tasks.push(tokio::spawn(async move {
            match connect(port, &cookie, offset + i).await {
                Ok(ws) => holders.lock().unwrap().push(ws),
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connect failed: {e}");
                    }
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let open = std::mem::take(&mut *holders.lock().unwrap());
    (open, failed.load(Ordering::Relaxed))
}

/// The edge's open-connections gauge.
async fn edge_connections(port: u16) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("voicerooms_edge_connections "))
        .and_then(|v| v.trim().parse().ok())
}

/// Rounds of opening `connections` idle connections and closing them all: the edge's RSS at
/// each peak and, `settle` seconds after the last one closed, with none open.
async fn churn(args: Args) {
    let bench = setup(&args, 0).await;
    let pid = bench.edge.pid();
    let fresh = rss_kib(pid);
    println!("churn: fresh edge RSS {:.1} MiB", fresh as f64 / 1024.0);
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        let started = Instant::now();
        let (open, failed) = open_many(&bench, args.connections, 0).await;
        let opened = open.len();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let peak = rss_kib(pid);
        drop(open);
        wait_until(
            Duration::from_secs(120),
            "every connection closed",
            || async { edge_connections(bench.port).await == Some(0) },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
        let idle = rss_kib(pid);
        println!(
            "churn round {round}: {opened} open ({failed} failed) in {:.1} s; peak RSS {:.1} MiB ({:.2} KiB per connection over fresh); idle RSS {:.1} MiB {} s after the last close",
            started.elapsed().as_secs_f64(),
            peak as f64 / 1024.0,
            peak.saturating_sub(fresh) as f64 / opened.max(1) as f64,
            idle as f64 / 1024.0,
            args.settle,
        );
        rows.push((peak, idle));
    }
    let (first_peak, first_idle) = rows[0];
    let (last_peak, last_idle) = rows[rows.len() - 1];
    let max_idle = rows.iter().map(|r| r.1).max().unwrap_or(0);
    let max_peak = rows.iter().map(|r| r.0).max().unwrap_or(0);
    println!(
        "churn summary: idle RSS fresh {:.1} → round 1 {:.1} → round {} {:.1} MiB (last/first {:+.1} %, worst {:.1} MiB); peak round 1 {:.1} → round {} {:.1} MiB (last/first {:+.1} %, worst {:.1} MiB)",
        fresh as f64 / 1024.0,
        first_idle as f64 / 1024.0,
        rows.len(),
        last_idle as f64 / 1024.0,
        100.0 * (last_idle as f64 / first_idle.max(1) as f64 - 1.0),
        max_idle as f64 / 1024.0,
        first_peak as f64 / 1024.0,
        rows.len(),
        last_peak as f64 / 1024.0,
        100.0 * (last_peak as f64 / first_peak.max(1) as f64 - 1.0),
        max_peak as f64 / 1024.0,
    );
}

/// Latency samples in microseconds, by event id.
struct Recorder {
    sent: Mutex<HashMap<u64, Instant>>,
    samples: Mutex<Vec<u64>>,
    delivered: AtomicU64,
}

fn event_for(room: u64, id: u64) -> RoomEvent {
    RoomEvent::new(
        GuildId::new(GUILD).unwrap(),
        RoomId::new(room).unwrap(),
        voicerooms_contract::now_ms(),
        Event::VoiceJoined(VoiceJoined {
            user: UserRef {
                id: UserId::new(400000000000000000 + (id % 1000)).unwrap(),
                username: format!("b{id}"),
                global_name: None,
                avatar: None,
            },
            flags: VoiceFlags::default(),
            moved_from: None,
        }),
    )
}

/// Connects `clients` clients spread over `rooms` rooms, each reading and recording.
async fn clients(
    bench: &Bench,
    rooms: usize,
    clients: usize,
    recorder: Arc<Recorder>,
    record: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    let limiter = Arc::new(tokio::sync::Semaphore::new(128));
    let ready = Arc::new(AtomicUsize::new(0));
    for i in 0..clients {
        let permit = limiter.clone().acquire_owned().await.unwrap();
        let (cookie, port) = (bench.cookie.clone(), bench.port);
        let recorder = recorder.clone();
        let ready = ready.clone();
        let room = 1000 + (i % rooms) as u64;
        handles.push(tokio::spawn(async move {
            let mut ws = match connect(port, &cookie, i).await {
                Ok(ws) => ws,
                Err(e) => {
                    eprintln!("connect: {e}");
                    return;
                }
            };
            if let Err(e) = subscribe(&mut ws, room).await {
                eprintln!("{e}");
                return;
            }
            drop(permit);
            ready.fetch_add(1, Ordering::Relaxed);
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Text(text) = message {
                    let now = Instant::now();
                    recorder.delivered.fetch_add(1, Ordering::Relaxed);
                    if record {
                        if let Some(id) = text
                            .split("\"username\":\"b")
                            .nth(1)
                            .and_then(|r| r.split('"').next())
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            let sent = recorder.sent.lock().unwrap().get(&id).copied();
                            if let Some(sent) = sent {
                                recorder
                                    .samples
                                    .lock()
                                    .unwrap()
                                    .push(now.duration_since(sent).as_micros() as u64);
                            }
                        }
                    }
                }
            }
        }));
    }
    wait_until(Duration::from_secs(600), "clients subscribed", || {
        let ready = ready.clone();
        async move { ready.load(Ordering::Relaxed) >= clients }
    })
    .await;
    handles
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

async fn publish_at(
    bench: &Bench,
    rooms: usize,
    rate: u64,
    seconds: u64,
    recorder: &Recorder,
) -> u64 {
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut acks = futures::stream::FuturesUnordered::new();
    for id in 0..total {
        ticker.tick().await;
        let room = 1000 + (id % rooms as u64);
        let event = event_for(room, id);
        recorder.sent.lock().unwrap().insert(id, Instant::now());
        match bench
            .js
            .publish(event.subject(), event.encode().into())
            .await
        {
            Ok(ack) => acks.push(std::future::IntoFuture::into_future(ack)),
            Err(e) => eprintln!("publish: {e}"),
        }
        while acks.len() > 4096 {
            acks.next().await;
        }
    }
    while acks.next().await.is_some() {}
    total
}

async fn fanout(args: Args, record: bool) {
    let bench = setup(&args, args.rooms).await;
    let recorder = Arc::new(Recorder {
        sent: Mutex::new(HashMap::new()),
        samples: Mutex::new(Vec::new()),
        delivered: AtomicU64::new(0),
    });
    let connect_start = Instant::now();
    let handles = clients(&bench, args.rooms, args.clients, recorder.clone(), record).await;
    eprintln!(
        "{} clients on {} rooms subscribed in {:.1} s; edge RSS {} MiB",
        args.clients,
        args.rooms,
        connect_start.elapsed().as_secs_f64(),
        rss_kib(bench.edge.pid()) / 1024
    );
    let expected_per_event = args.clients / args.rooms;
    let start = Instant::now();
    let cpu_before = bench.edge.cpu_seconds();
    let total = publish_at(&bench, args.rooms, args.rate, args.seconds, &recorder).await;
    let want = total * expected_per_event as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorder.delivered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let edge_cpu = bench.edge.cpu_seconds() - cpu_before;
    let delivered = recorder.delivered.load(Ordering::Relaxed);
    // The edge's own cost: frames per second of edge CPU time (user + system), i.e. per core
    // fully used by the edge, whatever the load generator and NATS took.
    println!(
        "edge CPU {:.2} s over {:.2} s ({:.0} % of one core); {:.0} frames per edge CPU-second",
        edge_cpu,
        elapsed,
        100.0 * edge_cpu / elapsed,
        delivered as f64 / edge_cpu.max(1e-9)
    );
    let mut samples = recorder.samples.lock().unwrap().clone();
    samples.sort_unstable();
    println!(
        "{}: {} events at {} ev/s to {} clients in {} rooms: {} of {} frames delivered ({:.0}/s); latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        args.mode,
        total,
        args.rate,
        args.clients,
        args.rooms,
        delivered,
        want,
        delivered as f64 / elapsed,
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0),
    );
    for h in handles {
        h.abort();
    }
}

async fn slow(args: Args) {
    // Same load twice: without and with one client per room that never reads.
    let recorder_run = |with_slow: bool, args: &Args| {
        let args = Args {
            mode: if with_slow {
                "with-slow".into()
            } else {
                "baseline".into()
            },
            ..*args
        };
        async move {
            let bench = setup(&args, args.rooms).await;
            let recorder = Arc::new(Recorder {
                sent: Mutex::new(HashMap::new()),
                samples: Mutex::new(Vec::new()),
                delivered: AtomicU64::new(0),
            });
            let handles = clients(&bench, args.rooms, args.clients, recorder.clone(), true).await;
            let mut stalled = Vec::new();
            if with_slow {
                for r in 0..args.rooms {
                    let mut ws = connect(bench.port, &bench.cookie, 50_000 + r)
                        .await
                        .unwrap();
                    subscribe(&mut ws, 1000 + r as u64).await.unwrap();
                    stalled.push(ws); // never read again
                }
            }
            publish_at(&bench, args.rooms, args.rate, args.seconds, &recorder).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut samples = recorder.samples.lock().unwrap().clone();
            samples.sort_unstable();
            let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", bench.port))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let closes = metrics
                .lines()
                .find_map(|l| l.strip_prefix("voicerooms_edge_slow_consumer_closes_total "))
                .unwrap_or("0")
                .to_owned();
            println!(
                "{}: p50 {:.2} ms p99 {:.2} ms over {} samples; slow-consumer closes {}",
                args.mode,
                percentile(&samples, 0.5),
                percentile(&samples, 0.99),
                samples.len(),
                closes
            );
            for h in handles {
                h.abort();
            }
            drop(stalled);
        }
    };
    recorder_run(false, &args).await;
    recorder_run(true, &args).await;
}

/// What one read of a subscribe costs the server: `--rounds` events in each of `--rooms` rooms
/// (round-robin, as rooms live side by side), then timed one at a time: the room's last event
/// (a wildcard last-by-subject get, as a subscribe asked it on every server before) and the
/// forward read from just after the room's last event that finds nothing (what a subscribe with
/// a current snapshot asks on nats-server before 2.10.17). "early rooms" are the first tenth:
/// their last event is furthest from the stream's end. `NATS_SERVER_BIN` picks the server.
async fn reads(args: Args) {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    use rand::Rng;
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    ensure_rooms_stream(&js, &Default::default()).await.unwrap();
    let stream = js.get_stream("ROOMS").await.unwrap();
    let rooms = args.rooms.max(10) as u64;
    let started = Instant::now();
    let mut last = vec![0u64; rooms as usize];
    let mut acks = Vec::new();
    for round in 0..args.rounds as u64 {
        for room in 0..rooms {
            let event = event_for(1 + room, round);
            acks.push((
                room,
                js.publish(event.subject(), event.encode().into())
                    .await
                    .unwrap(),
            ));
            if acks.len() >= 2_000 {
                for (room, ack) in acks.drain(..) {
                    last[room as usize] = ack.await.unwrap().sequence;
                }
            }
        }
    }
    for (room, ack) in acks.drain(..) {
        last[room as usize] = ack.await.unwrap().sequence;
    }
    eprintln!(
        "nats-server {}: {} events stored over {rooms} rooms in {:.1} s",
        client.server_info().version,
        rooms * args.rounds as u64,
        started.elapsed().as_secs_f64()
    );
    let filter = |room: u64| format!("rooms.{GUILD}.{}.>", 1 + room);
    const N: usize = 300;
    for (label, pick) in [("early rooms", rooms / 10), ("any room", rooms)] {
        let picks: Vec<u64> = (0..N)
            .map(|_| rand::rng().random_range(0..pick.max(1)))
            .collect();
        let started = Instant::now();
        for &room in &picks {
            let message = stream
                .get_last_raw_message_by_subject(&filter(room))
                .await
                .unwrap();
            assert_eq!(message.sequence, last[room as usize]);
        }
        let last_get = started.elapsed().as_secs_f64() * 1000.0 / N as f64;
        let started = Instant::now();
        for &room in &picks {
            match stream
                .get_first_raw_message_by_subject(&filter(room), last[room as usize] + 1)
                .await
            {
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                other => panic!("expected nothing after the room's last event: {other:?}"),
            }
        }
        let forward = started.elapsed().as_secs_f64() * 1000.0 / N as f64;
        eprintln!(
            "{label}: last-by-subject {last_get:.2} ms, forward read finding nothing {forward:.2} ms (mean of {N})"
        );
    }
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        match args.mode.as_str() {
            "idle" => idle(args).await,
            "fanout" => fanout(args, true).await,
            "slow" => slow(args).await,
            "churn" => churn(args).await,
            "reads" => reads(args).await,
            _ => usage(),
        }
    });
}
